"""`hub-soup merge org/a org/b --push org/soup`, run as a user runs it, against the loopback Hub.

Everything goes through the real huggingface_hub client over HTTP; the soup is
then read back with plain huggingface_hub, timm (``hf-hub:``) and transformers
(``from_pretrained``), as its users would.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hub_soup.cli import main
from tests.checkpoints import reference_soup
from tests.hub_fixtures import TEST_USER
from tests.hub_models import bert_folder, state_dict_of, timm_folder, unique, upload
from tests.hub_server import HubServer


@pytest.fixture
def api(hub_token: str) -> HfApi:
    return HfApi(token=hub_token)


@pytest.fixture(scope="module")
def timm_pair(tmp_path_factory: pytest.TempPathFactory, hub_token_module: str) -> tuple[str, str, Path, Path]:
    """Two timm fine-tunes of one init on the Hub: (repo a, repo b, folder a, folder b)."""
    api = HfApi(token=hub_token_module)
    root = tmp_path_factory.mktemp("timm")
    folders = [timm_folder(root / f"ft{i}", seed=i) for i in (1, 2)]
    repos = [f"{TEST_USER}/{unique(f'timm-ft{i}')}" for i in (1, 2)]
    for folder, repo in zip(folders, repos):
        upload(api, folder, repo)
    return repos[0], repos[1], folders[0], folders[1]


@pytest.fixture(scope="module")
def hub_token_module() -> str:
    from tests.hub_fixtures import TEST_TOKEN

    return TEST_TOKEN


def merge(*args: str) -> int:
    return main(["--quiet", "merge", *args])


def expected_average(*folders: Path) -> dict[str, torch.Tensor]:
    dicts = [state_dict_of(f) for f in folders]
    return {
        k: reference_soup([d[k] for d in dicts], [1 / len(dicts)] * len(dicts)) if v.is_floating_point() else v
        for k, v in dicts[0].items()
    }


def test_merge_and_push_timm_soup_loads_everywhere(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], hub_token: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_a, repo_b, folder_a, folder_b = timm_pair
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    code = merge(repo_a, repo_b, "--push", soup_repo, "--token", hub_token, "-o", str(tmp_path / "soup"))
    assert code == 0, capsys.readouterr().err
    assert f"pushed: {hub.endpoint}/{soup_repo}/commit/" in capsys.readouterr().out
    assert [c["title"] for c in hub.commits(soup_repo)][1:] == ["initial commit"]  # one commit holds the soup

    # plain huggingface_hub, then timm's own hf-hub: loader
    weights = load_file(hf_hub_download(soup_repo, "model.safetensors"))
    expected = expected_average(folder_a, folder_b)
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    model = timm.create_model(f"hf-hub:{soup_repo}", pretrained=True)
    assert torch.equal(model.state_dict()["bn1.running_var"], expected["bn1.running_var"])

    card = ModelCard.load(soup_repo)
    assert card.data.base_model == [repo_a, repo_b]
    assert card.data.base_model_relation == "merge"
    assert {"merge", "model-soup"} <= set(card.data.tags)
    assert card.data.library_name == "timm"
    recipe = yaml.safe_load(Path(hf_hub_download(soup_repo, "hub-soup.yaml")).read_text())
    shas = [HfApi().model_info(r).sha for r in (repo_a, repo_b)]
    assert [(i["ref"], i["revision"]) for i in recipe["ingredients"]] == list(zip([repo_a, repo_b], shas))
    for sha in shas:
        assert sha in card.text


def test_the_canonical_command_runs_twice_with_one_commit(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], hub_token: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`hub-soup merge org/a org/b --push org/soup`, then again (a CI re-run): no -o, nothing left behind."""
    repo_a, repo_b, _, _ = timm_pair
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    work, stage = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    stage.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(stage))  # where the soup is staged
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    assert main(["merge", repo_a, repo_b, "--push", soup_repo, "--token", hub_token]) == 0
    assert "written to a temporary folder, removed after the push" in (tmp_path / "summary.md").read_text()
    first = capsys.readouterr()
    assert "staged in a temporary folder and removed after the push (pass -o DIR to keep a copy)" in first.err
    assert "-> a temporary folder, removed after the push" in first.out
    history = hub.commits(soup_repo)
    assert [c["title"] for c in history][1:] == ["initial commit"]

    assert main(["merge", repo_a, repo_b, "--push", soup_repo, "--token", hub_token]) == 0
    assert "no changes: the Hub already has this soup at" in capsys.readouterr().out
    assert hub.commits(soup_repo) == history  # no second commit
    assert list(work.iterdir()) == [] and list(stage.iterdir()) == []  # no ./soup, no staging folder left

    # the same soup as a recipe (what a GitHub Action re-runs): no output path, staged, no commit either
    assert main(["merge", repo_a, repo_b, "--push", soup_repo, "--dump-recipe"]) == 0
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(capsys.readouterr().out)
    assert "output" not in yaml.safe_load(recipe.read_text())
    assert main(["run", str(recipe), "--token", hub_token]) == 0
    assert "no changes: the Hub already has this soup at" in capsys.readouterr().out
    assert hub.commits(soup_repo) == history
    assert list(work.iterdir()) == [] and list(stage.iterdir()) == []

    # with -o, the soup is kept, and a second run with the same -o needs --overwrite, as before
    out = str(work / "kept")
    assert merge(repo_a, repo_b, "--push", soup_repo, "--token", hub_token, "-o", out) == 0
    assert (work / "kept" / "model.safetensors").is_file()
    assert merge(repo_a, repo_b, "--push", soup_repo, "--token", hub_token, "-o", out) == 2
    assert hub.commits(soup_repo) == history  # the kept copy is the same soup: still no commit


def test_create_pr_leaves_main_untouched(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], hub_token: str, api: HfApi, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_a, repo_b, _, _ = timm_pair
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    api.create_repo(soup_repo)
    main_before = hub.commits(soup_repo)
    assert merge(repo_a, repo_b, "--push", soup_repo, "--create-pr", "--token", hub_token, "-o", str(tmp_path / "s")) == 0
    assert "/discussions/1" in capsys.readouterr().out
    assert hub.commits(soup_repo) == main_before
    assert "model.safetensors" in hub.files(soup_repo, revision="refs/pr/1")


def test_push_to_branch(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], hub_token: str, tmp_path: Path
) -> None:
    repo_a, repo_b, _, _ = timm_pair
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    args = ["--push", soup_repo, "--revision", "soups", "--token", hub_token, "-o", str(tmp_path / "s")]
    assert merge(repo_a, repo_b, *args) == 0
    assert "model.safetensors" in hub.files(soup_repo, revision="soups")
    assert "model.safetensors" not in hub.files(soup_repo)


def test_transformers_soup_round_trips_through_from_pretrained(
    hub_token: str, api: HfApi, tmp_path: Path
) -> None:
    folders = [bert_folder(tmp_path / f"bert{i}", seed=i) for i in (1, 2)]
    repos = [f"{TEST_USER}/{unique(f'bert{i}')}" for i in (1, 2)]
    for folder, repo in zip(folders, repos):
        upload(api, folder, repo)
    soup_repo = f"{TEST_USER}/{unique('bert-soup')}"
    assert merge(*repos, "--push", soup_repo, "--token", hub_token, "-o", str(tmp_path / "soup")) == 0

    model = AutoModelForSequenceClassification.from_pretrained(soup_repo)
    tokenizer = AutoTokenizer.from_pretrained(soup_repo)
    expected = expected_average(*folders)
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert tokenizer("good soup")["input_ids"][1:3] == [5, 7]
    card = ModelCard.load(soup_repo)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"


def test_timm_name_resolves_through_its_pretrained_config(
    timm_pair: tuple[str, str, Path, Path], api: HfApi, tmp_path: Path
) -> None:
    """``test_resnet.r160_in1k`` -> timm's pretrained cfg -> hf_hub_id ``timm/test_resnet.r160_in1k``."""
    if not api.repo_exists("timm/test_resnet.r160_in1k"):
        upload(api, timm_folder(tmp_path / "pre", seed=5, num_classes=1000), "timm/test_resnet.r160_in1k")
    ft = f"{TEST_USER}/{unique('ft-1k')}"
    upload(api, timm_folder(tmp_path / "ft", seed=6, num_classes=1000), ft)
    out = tmp_path / "soup"
    assert merge("test_resnet.r160_in1k", f"hf-hub:{ft}", "-o", str(out)) == 0
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["ingredients"][0]["ref"] == "test_resnet.r160_in1k"
    assert recipe["ingredients"][0]["revision"] == api.model_info("timm/test_resnet.r160_in1k").sha
    assert recipe["ingredients"][1] == {"ref": ft, "revision": api.model_info(ft).sha}


def test_unknown_timm_name_suggests_close_matches(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert merge("test_resnett.r160_in1k", "test_resnet.r160_in1k", "-o", str(tmp_path / "s")) == 2
    err = capsys.readouterr().err
    assert "not a timm pretrained model" in err and "test_resnet.r160_in1k" in err
    assert not (tmp_path / "s").exists()


def test_revision_pins_an_older_commit(hub_token: str, api: HfApi, tmp_path: Path) -> None:
    repo = f"{TEST_USER}/{unique('history')}"
    old_sha = upload(api, timm_folder(tmp_path / "v1", seed=11), repo)
    upload(api, timm_folder(tmp_path / "v2", seed=12), repo)
    other = f"{TEST_USER}/{unique('other')}"
    upload(api, timm_folder(tmp_path / "o", seed=13), other)
    out = tmp_path / "soup"
    assert merge(f"{repo}@{old_sha}", other, "-o", str(out)) == 0
    expected = expected_average(tmp_path / "v1", tmp_path / "o")
    assert torch.equal(load_file(out / "model.safetensors")["fc.weight"], expected["fc.weight"])
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["ingredients"][0] == {"ref": repo, "revision": old_sha}


def test_mismatch_fails_from_headers_before_downloading(
    hub: HubServer, api: HfApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = f"{TEST_USER}/{unique('c10')}"
    b = f"{TEST_USER}/{unique('c7')}"
    upload(api, timm_folder(tmp_path / "a", seed=1, num_classes=10), a)
    upload(api, timm_folder(tmp_path / "b", seed=2, num_classes=7), b)
    hub.requests.clear()
    assert merge(a, b, "-o", str(tmp_path / "soup")) == 2
    err = capsys.readouterr().err
    assert "shape mismatch at fc." in err and "[10" in err and "[7" in err and "--exclude 'fc.*'" in err
    cache = Path(os.environ["HF_HOME"], "hub")
    for repo in (a, b):  # only headers were read over HTTP: nothing of either repo reached the cache
        assert not list(cache.glob(f"models--{repo.replace('/', '--')}/blobs/*"))
    assert not (tmp_path / "soup").exists()


@pytest.mark.parametrize(
    ("ref", "code", "words"),
    [
        (f"{TEST_USER}/does-not-exist", 2, ["does-not-exist", "not found"]),
        ("{a}@no-such-branch", 2, ["no-such-branch", "not found"]),
    ],
)
def test_missing_repo_or_revision(
    ref: str, code: int, words: list[str], timm_pair: tuple[str, str, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = ref.format(a=timm_pair[0])
    assert merge(ref, timm_pair[1], "-o", str(tmp_path / "soup")) == code
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "soup").exists()


def test_private_repo_needs_a_token(
    hub_token: str, api: HfApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = f"{TEST_USER}/{unique('private')}"
    upload(api, timm_folder(tmp_path / "p", seed=1), private, private=True)
    other = f"{TEST_USER}/{unique('public')}"
    upload(api, timm_folder(tmp_path / "q", seed=2), other)
    assert merge(private, other, "-o", str(tmp_path / "anon")) == 2
    assert "hf auth login" in capsys.readouterr().err
    assert merge(private, other, "-o", str(tmp_path / "auth"), "--token", hub_token) == 0


def test_bad_token_is_refused_before_any_work(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    code = merge(*timm_pair[:2], "--push", soup_repo, "--token", "hf_not_a_real_token", "-o", str(tmp_path / "s"))
    assert code == 1
    err = capsys.readouterr().err
    assert "rejected your token" in err and "hf_not_a_real_token" not in err
    assert not (tmp_path / "s").exists()
    assert not HfApi().repo_exists(soup_repo, token=False)


def test_gated_repo_says_where_to_accept(
    hub: HubServer, api: HfApi, timm_pair: tuple[str, str, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gated = f"{TEST_USER}/{unique('gated')}"
    upload(api, timm_folder(tmp_path / "g", seed=3), gated)
    hub.add_gated(gated)
    assert merge(gated, timm_pair[1], "-o", str(tmp_path / "soup")) == 1
    err = capsys.readouterr().err
    assert "gated" in err and f"/{gated}" in err


def test_download_cut_half_way_resumes(
    hub: HubServer, api: HfApi, timm_pair: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    repo = f"{TEST_USER}/{unique('cut')}"
    folder = timm_folder(tmp_path / "c", seed=4)
    upload(api, folder, repo)
    # the first GET is the 100 kB header read (shorter than the cut), the second the download
    hub.cut_next_download(rf"/{repo}/resolve/.*/model\.safetensors$", after_bytes=300_000, times=2)
    hub.requests.clear()
    out = tmp_path / "soup"
    assert merge(repo, timm_pair[1], "-o", str(out)) == 0
    gets = [p for m, p in hub.requests if m == "GET" and p.startswith(f"/{repo}/resolve/") and p.endswith(".safetensors")]
    assert len(gets) == 3  # the header read, the download that was cut, the resumed download
    expected = expected_average(folder, timm_pair[3])
    assert torch.equal(load_file(out / "model.safetensors")["fc.weight"], expected["fc.weight"])


def test_failed_upload_leaves_the_repo_unchanged(
    hub: HubServer, api: HfApi, timm_pair: tuple[str, str, Path, Path], hub_token: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    api.create_repo(soup_repo)
    before = hub.commits(soup_repo)
    hub.fail_next("POST", rf"/api/models/{soup_repo}/commit/", status=500, times=10)
    code = merge(*timm_pair[:2], "--push", soup_repo, "--token", hub_token, "-o", str(tmp_path / "s"))
    assert code == 1
    assert "HTTP 500" in capsys.readouterr().err
    assert hub.commits(soup_repo) == before
    assert set(hub.files(soup_repo)) == {".gitattributes"}


def test_failed_first_push_leaves_no_empty_repo(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], hub_token: str, tmp_path: Path
) -> None:
    soup_repo = f"{TEST_USER}/{unique('soup')}"
    hub.fail_next("POST", rf"/api/models/{soup_repo}/commit/", status=503, times=10)
    assert merge(*timm_pair[:2], "--push", soup_repo, "--token", hub_token, "-o", str(tmp_path / "s")) == 1
    assert not HfApi(token=hub_token).repo_exists(soup_repo)


def test_second_run_downloads_nothing(
    hub: HubServer, timm_pair: tuple[str, str, Path, Path], tmp_path: Path
) -> None:
    assert merge(*timm_pair[:2], "-o", str(tmp_path / "one")) == 0
    hub.requests.clear()
    assert merge(*timm_pair[:2], "-o", str(tmp_path / "two")) == 0
    assert not [p for m, p in hub.requests if m == "GET" and "/resolve/" in p and p.endswith(".safetensors")][2:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["architecture"] == "test_resnet"
