"""The workflow around a merge, as a Hub user runs it twice and types it wrong.

Each test is one way the mission's command used to break: an output that
destroys an ingredient, a collapsed soup pushed with only a log line, a soup
without the config its second ingredient had, recipes that only ran from where
they were written, a typo treated as a Hub id offline, and code a recipe named
run without being asked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from safetensors.torch import load_file, save_file

import hub_soup
from hub_soup.cli import build_parser, main
from hub_soup.errors import EXIT_BAD_INPUT, EXIT_WORSE_SOUP, UntrustedCodeError
from hub_soup.eval.data import check_data
from hub_soup.eval.spec import EvalSpec
from tests.hub_fixtures import TEST_USER
from tests.hub_models import bert_folder, timm_folder, unique, upload
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
A, B = DIGITS / "ingredients" / "ft-lr0.01", DIGITS / "ingredients" / "ft-lr0.02-shift"


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links followed) -> its sha256: to prove an input was not touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two digits fine-tunes copied into ``tmp_path/ing``: folders the tests may try to destroy."""
    folders = []
    for source in (A, B):
        folders.append(Path(shutil.copytree(source, tmp_path / "ing" / source.name)))
    return folders[0], folders[1]


# ---------------------------------------------------------------- an output that is an input


@pytest.mark.parametrize(
    ("output", "relation"),
    [
        ("ing/ft-lr0.01", "is the ingredient"),
        ("ing", "contains the ingredient"),
        (".", "contains the ingredient"),
        ("ing/ft-lr0.01/soup", "lies inside the ingredient"),
        ("alias", "is the ingredient"),  # a symlink to ingredient A
        ("blobs", "contains the ingredient"),  # where a snapshot-like ingredient's files really are
        ("hf-cache", "the Hugging Face cache"),
    ],
)
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(
    tmp_path: Path, pair: tuple[Path, Path], output: str, relation: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pair
    (tmp_path / "alias").symlink_to(a, target_is_directory=True)
    # a Hub snapshot: files that are links into a blobs folder elsewhere
    (tmp_path / "blobs").mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in b.iterdir():
        shutil.copyfile(file, tmp_path / "blobs" / file.name)
        (snapshot / file.name).symlink_to(tmp_path / "blobs" / file.name)
    monkeypatch.chdir(tmp_path)
    target = constants.HF_HUB_CACHE if output == "hf-cache" else output
    before = _digest(tmp_path / "ing"), _digest(tmp_path / "blobs"), sorted(p.name for p in tmp_path.iterdir())

    assert main(["merge", "ing/ft-lr0.01", "snapshot", "-o", target, "--overwrite"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert relation in err and "writing the soup there would destroy an input" in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert (_digest(tmp_path / "ing"), _digest(tmp_path / "blobs"), sorted(p.name for p in tmp_path.iterdir())) == before
    assert not (a / "soup").exists()


def test_a_recipe_cannot_make_its_soup_inside_an_ingredient_either(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    recipe = tmp_path / "ing" / "r.yaml"
    recipe.write_text("ingredients: [{ref: ft-lr0.01}, {ref: ft-lr0.02-shift}]\noutput: {path: ft-lr0.01, overwrite: true}\n")
    before = _digest(pair[0])
    assert main(["--quiet", "run", str(recipe)]) == EXIT_BAD_INPUT
    assert _digest(pair[0]) == before


# ---------------------------------------------------------------- independent ingredients are not pushed


def test_independent_ingredients_are_not_pushed_without_an_eval(
    hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = HfApi(token=hub_token)
    repos = [f"{TEST_USER}/{unique(f'indep{i}')}" for i in range(3)]
    for i, repo in enumerate(repos):  # three trainings from three random initialisations
        upload(api, timm_folder(tmp_path / f"m{i}", seed=i, init_seed=100 + i), repo)
    soup_repo = f"{TEST_USER}/{unique('collapsed')}"
    argv = ["merge", *repos, "--push", soup_repo, "--token", hub_token]

    assert main(argv) == EXIT_WORSE_SOUP
    err = capsys.readouterr().err
    assert f"not pushing to {soup_repo}" in err and "look like independent trainings" in err
    assert "--force" in err and "nothing was kept" in err
    assert not api.repo_exists(soup_repo)

    assert main([*argv, "--force"]) == 0
    card = ModelCard.load(soup_repo, token=hub_token)
    assert "## Warnings" in card.text and "look like independent trainings" in card.text


# ---------------------------------------------------------------- side files from the first that has them


def test_a_plain_pth_first_still_gives_a_soup_timm_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "a.pth"
    torch.save(load_file(A / "model.safetensors"), first)  # a bare state_dict, no config beside it
    out = tmp_path / "soup"
    assert main(["merge", str(first), str(B), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"config.json: from {B}" in err  # where each side file came from
    assert json.loads((out / "config.json").read_text()) == json.loads((B / "config.json").read_text())
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    soup = load_file(out / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], soup[k].to(loaded[k].dtype)) for k in soup)


def test_configs_that_disagree_on_the_architecture_stop_the_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two heads per layer or four: the tensors have the same shapes, the models are not the same."""
    a, b = bert_folder(tmp_path / "a", seed=1), bert_folder(tmp_path / "b", seed=2)
    config = json.loads((b / "config.json").read_text())
    config["num_attention_heads"] = 4
    (b / "config.json").write_text(json.dumps(config))
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "soup")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"num_attention_heads is 2 in {a} and 4 in {b}" in err, err
    assert not (tmp_path / "soup").exists()


# ---------------------------------------------------------------- recipes travel with what they name


def test_a_soups_own_recipe_rebuilds_it_from_inside_its_folder(
    tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").symlink_to(DIGITS / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    evaluation = ["--eval-task", "image-classification", "--eval-data", "data", "--eval-split", "val",
                  "--eval-limit", "64"]
    assert main(["--quiet", "merge", "ing/ft-lr0.01", "ing/ft-lr0.02-shift", *evaluation, "-o", "soups/s"]) == 0
    soup = tmp_path / "soups" / "s"
    recipe = yaml.safe_load((soup / "hub-soup.yaml").read_text())
    assert [i["ref"] for i in recipe["ingredients"]] == ["../../ing/ft-lr0.01", "../../ing/ft-lr0.02-shift"]
    assert recipe["eval"]["data"] == "../../data" and "output" not in recipe
    assert "`hub-soup run hub-soup.yaml -o rebuilt`" in (soup / "README.md").read_text()

    monkeypatch.chdir(soup)  # as the card says: from the soup's folder
    assert main(["--quiet", "run", "hub-soup.yaml", "-o", "rebuilt"]) == 0
    assert (soup / "rebuilt" / "model.safetensors").read_bytes() == (soup / "model.safetensors").read_bytes()
    monkeypatch.chdir("/")  # and from anywhere else
    assert main(["--quiet", "run", str(soup / "hub-soup.yaml"), "-o", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (soup / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["--quiet", "run", str(soup / "hub-soup.yaml")]) == EXIT_BAD_INPUT  # a rebuild needs a place
    assert "no output: pass -o OUT_DIR" in capsys.readouterr().err


# ---------------------------------------------------------------- a typo offline is a typo


def _offline(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", *argv], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=240, check=False,
    )


def test_a_mistyped_local_path_offline_says_so_at_once(tmp_path: Path) -> None:
    shutil.copytree(A, tmp_path / "myorg" / "my-finetune")
    done = _offline(["merge", "myorg/my-finetun", str(B), "-o", "soup"], tmp_path)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "'myorg/my-finetun': no local path of that name exists" in done.stderr
    assert "did you mean myorg/my-finetune?" in done.stderr and "offline mode is on (HF_HUB_OFFLINE=1)" in done.stderr
    assert "retrying" not in done.stderr and "set HF_HUB_OFFLINE" not in done.stderr
    assert not (tmp_path / "soup").exists()


def test_a_mistyped_local_path_online_names_both_readings(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(A, tmp_path / "myorg" / "my-finetune")
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "myorg/my-finetun", str(B), "-o", "soup"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "repository myorg/my-finetun not found" in err
    assert "nor is it a local path (myorg/ exists but holds no 'my-finetun'; did you mean myorg/my-finetune?)" in err


def test_eval_data_that_reads_as_a_mistyped_folder_is_refused_before_any_download(
    hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``data/val`` with a local ``data/`` folder: online, the Hub is asked at once whether it is a dataset (one that
    is, is taken); offline (huggingface_hub reads the switch at each call), it is a typo, as a model ref is."""
    (tmp_path / "data" / "validation").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = ["merge", str(A), str(B), "--eval-task", "text-classification", "--eval-data", "data/valdation",
            "-o", "soup"]
    near = "data/ exists but holds no 'valdation'; did you mean data/validation?"
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"eval data 'data/valdation': no Hub dataset of that name, nor is it a local path ({near})" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"eval data 'data/valdation': no local path of that name exists ({near}), and offline mode is on" in err
    assert not (tmp_path / "soup").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo_id = HfApi(token=hub_token).create_repo(f"{TEST_USER}/{unique('reviews')}", repo_type="dataset").repo_id
    (tmp_path / TEST_USER).mkdir()
    check_data(EvalSpec(task="text-classification", data=repo_id), Path(), hub_token)  # a Hub dataset: taken


def test_offline_runs_use_the_ingredients_in_the_cache(hub: HubServer, hub_token: str, tmp_path: Path) -> None:
    api = HfApi(token=hub_token)
    repos = [f"{TEST_USER}/{unique(f'cached{i}')}" for i in (1, 2)]
    for i, repo in enumerate(repos):
        upload(api, timm_folder(tmp_path / f"m{i}", seed=60 + i), repo)
    assert main(["--quiet", "merge", *repos, "-o", str(tmp_path / "online")]) == 0  # fills the cache

    done = _offline(["merge", *repos, "-o", str(tmp_path / "offline")], tmp_path)
    assert done.returncode == 0, done.stderr
    online, offline = (tmp_path / name / "model.safetensors" for name in ("online", "offline"))
    assert online.read_bytes() == offline.read_bytes()
    assert (tmp_path / "online" / "hub-soup.yaml").read_text() == (tmp_path / "offline" / "hub-soup.yaml").read_text()

    done = _offline(["merge", repos[0], f"{TEST_USER}/never-downloaded", "-o", str(tmp_path / "x")], tmp_path)
    assert done.returncode == 1 and "retrying" not in done.stderr
    assert f"offline mode is on (HF_HUB_OFFLINE=1), so hub-soup cannot resolve {TEST_USER}/never-downloaded" in done.stderr


# ---------------------------------------------------------------- no code runs unasked


def _custom_eval_recipe(folder: Path) -> Path:
    """A recipe whose eval function lives in a file that leaves a marker when it is imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('RAN').touch()\n"
        "def head_norm(model):\n"
        "    return float(model.fc.weight.norm())\n"
    )
    recipe = folder / "soup.yaml"
    recipe.write_text(
        f"ingredients: [{{ref: {A}}}, {{ref: {B}}}]\n"
        "eval: {task: custom, function: score.py:head_norm}\n"
        "output: {path: soup}\n"
    )
    return recipe


def test_a_recipes_eval_function_never_runs_without_trust_remote_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _custom_eval_recipe(tmp_path / "theirs")
    marker, out = tmp_path / "theirs" / "RAN", tmp_path / "theirs" / "soup"

    assert main(["run", str(recipe)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"eval.function names code to run ({tmp_path / 'theirs' / 'score.py'}:head_norm)" in err
    assert "--trust-remote-code" in err
    with pytest.raises(UntrustedCodeError, match="trust_remote_code=True"):
        hub_soup.run(hub_soup.load_recipe(recipe))
    assert main(["merge", str(A), str(B), "--eval-task", "custom", "--eval-function",
                 f"{tmp_path / 'theirs' / 'score.py'}:head_norm", "-o", str(out)]) == 2
    assert not marker.exists() and not out.exists()

    assert main(["--quiet", "run", str(recipe), "--trust-remote-code"]) == 0
    assert marker.exists() and (out / "model.safetensors").is_file()
    marker.unlink()
    loaded = hub_soup.load_recipe(recipe)
    loaded = loaded.model_copy(update={"output": loaded.output.model_copy(update={"path": str(tmp_path / "py")})})
    result = hub_soup.run(loaded, trust_remote_code=True)
    soup, score = result.scores[0]
    assert marker.exists() and soup == "soup" and score.metric.endswith("score.py:head_norm")
    assert score.higher_is_better and score.examples == 0  # the spec's direction; a function scores no examples


# ---------------------------------------------------------------- the small ones


def test_version_and_help_for_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hub-soup {hub_soup.__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in [("hub-soup", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # the list of commands: each has its own help
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help text"
    merge_help = commands["merge"].format_help()
    assert "examples:" in merge_help and "hub-soup merge org/ft-a org/ft-b --push org/soup" in merge_help


def test_cards_say_only_what_is_true_of_the_soup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = []
    for i in range(2):  # no BatchNorm anywhere
        torch.manual_seed(0)
        linear = torch.nn.Linear(4, 3)
        with torch.no_grad():
            linear.weight.add_(0.01 * i)
        plain.append(tmp_path / f"linear{i}.safetensors")
        save_file(linear.state_dict(), plain[-1])
    assert main(["merge", *map(str, plain), "-o", str(tmp_path / "plain")]) == 0
    assert "BatchNorm" not in (tmp_path / "plain" / "README.md").read_text()
    out = capsys.readouterr().out
    assert "15 elements" in out and "parameters" not in out  # 12 weights + 3 biases; buffers would count too

    assert main(["merge", str(A), str(B), "-o", str(tmp_path / "digits")]) == 0
    card = (tmp_path / "digits" / "README.md").read_text()
    assert ("77 floating tensors, BatchNorm running statistics included, were averaged in float32 and each stored "
            "in its own dtype. 15 integer or bool tensors were taken from the first ingredient unchanged.") in card
    assert main(["merge", str(A), str(B), "--exclude", "fc.*", "--dtype", "float64", "-o", str(tmp_path / "f64")]) == 0
    f64 = (tmp_path / "f64" / "README.md").read_text()
    assert "75 floating tensors, BatchNorm running statistics included, were averaged in float64 and stored as float64" in f64
    assert "2 floating tensors left out of the average (`--exclude`) were taken from the first ingredient (cast to float64)" in f64
    assert "timm.create_model('local-dir:./digits', pretrained=True)" in card and "hf-hub:" not in card


def test_datasets_progress_bars_follow_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    import datasets
    from huggingface_hub.utils import enable_progress_bars

    from hub_soup.eval.data import import_datasets

    datasets.enable_progress_bars()
    enable_progress_bars()
    try:
        assert main(["schema"]) == 0  # stderr is captured here: not a terminal
        assert import_datasets().is_progress_bar_enabled() is False  # as evaluation imports it
    finally:
        datasets.enable_progress_bars()


def test_the_actions_trust_input_is_the_only_way_to_run_a_recipes_code(tmp_path: Path) -> None:
    """The composite action's own step script, run by bash as a runner would, off and on."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    step = next(s for s in action["runs"]["steps"] if s.get("id") == "soup")
    recipe = _custom_eval_recipe(tmp_path / "theirs")
    for trust, code in (("false", EXIT_BAD_INPUT), ("true", 0)):
        outputs = tmp_path / f"outputs-{trust}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "RECIPE": str(recipe), "TRUST_REMOTE_CODE": trust, "EXTRA_ARGS": "--overwrite", "CI": "true",
               "GITHUB_OUTPUT": str(outputs)}
        done = subprocess.run(["bash", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=240,
                              check=False)
        assert done.returncode == code, done.stderr
        assert outputs.read_text() == f"exit-code={code}\n"
        assert (tmp_path / "theirs" / "RAN").exists() == (trust == "true")


def _count_load(path: str) -> None:
    """Called by the unpickler: one line per time a pickle is loaded."""
    with open(path, "a") as f:
        f.write("loaded\n")


class _CountsLoads:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_count_load, (str(self.path),))


def test_a_local_pickle_is_loaded_once_beside_a_hub_ingredient(
    hub: HubServer, hub_token: str, tmp_path: Path
) -> None:
    api = HfApi(token=hub_token)
    remote = f"{TEST_USER}/{unique('beside-pickle')}"
    upload(api, timm_folder(tmp_path / "remote", seed=2), remote)
    state_dict = load_file(timm_folder(tmp_path / "local", seed=1) / "model.safetensors")
    loads = tmp_path / "loads.txt"
    torch.save({"state_dict": state_dict, "trainer": _CountsLoads(loads)}, tmp_path / "local.pth")
    argv = ["--quiet", "merge", str(tmp_path / "local.pth"), remote, "--allow-pickle", "-o", str(tmp_path / "soup")]
    assert main(argv) == 0
    assert loads.read_text() == "loaded\n"  # the early header check and the merge share one opening

