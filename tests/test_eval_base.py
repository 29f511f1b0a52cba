"""Methods with a base: the base is scored beside the ingredients, in the table, the card and the step summary.

Three soups: a greedy Model Stock soup of the digits fine-tunes (real accuracy, against the base
scored here on its own); a greedy Model Stock soup of tiny timm fine-tunes scored by their distance
from the centre they were drawn around, where greedy keeps several and drops the far one, so the
written soup must be Model Stock's streamed soup of exactly those; and a task-arithmetic soup on
the loopback Hub that scores below its base but above its ingredients: warned about, still pushed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import open_checkpoint
from tests import checkpoints as ck
from tests.hub_fixtures import TEST_USER
from tests.hub_models import unique, upload
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())
BASE = str(DIGITS / "base")
EVAL = ["--eval-task", "image-classification", "--eval-data", str(DIGITS / "data"), "--eval-split", "val"]


def _table_row(printed: str, name: str) -> str:
    return next(line for line in printed.splitlines() if f"  {name}  " in line)


def _kept(card_text: str) -> list[str]:
    """The ingredients the card's table says are in the soup, in recipe order."""
    return re.findall(r"^\| \d+ \| `([^`]+)` \| [^|]+ \| [^|]+ \| yes \|", card_text, flags=re.MULTILINE)


def test_greedy_model_stock_of_the_digits_scores_the_base_beside_its_ingredients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "soup"
    code = main(["--quiet", "merge", *INGREDIENTS, "--method", "model_stock", "--base", BASE, "--greedy", *EVAL,
                 "--test-eval", "test", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    with open_checkpoint(BASE) as base:  # the base on its own, without the plan or the pipeline
        val = Evaluator(EvalSpec(task="image-classification", data=str(DIGITS / "data"), split="val"), base)
        test = Evaluator(EvalSpec(task="image-classification", data=str(DIGITS / "data"), split="test"), base)
        expected_val, expected_test = val.score_state_dict(base.state_dict()), test.score_state_dict(base.state_dict())
    name = f"base ({BASE})"

    assert printed.startswith("greedy model_stock soup, scored on")
    row = _table_row(printed, name)
    assert expected_val.formatted() in row and "(the base: not an ingredient)" in row
    assert expected_test.formatted() in _table_row(printed.split("test split test", 1)[1], name)
    assert "is at least as good as its best ingredient" in printed  # greedy's promise, with Model Stock too
    assert f"its base {BASE} (accuracy {expected_val.formatted()}) on val" in printed
    assert "merged by model_stock, " in printed and "averaged" not in printed

    card = ModelCard.load(out / "README.md")
    for split, score in (("val", expected_val), ("test", expected_test)):
        assert f"| {name} | {split} | accuracy | {score.value:.4f} |" in card.text
    # the model-index is the soup's own results: two splits, two metrics each, none of them the base's
    results = card.data.eval_results
    assert len(results) == 4 and card.data.model_name == "soup"
    assert {(r.dataset_split, r.metric_type) for r in results} == {(s, m) for s in ("val", "test") for m in ("accuracy", "nll")}
    assert "chosen by greedy selection" in card.text and "by Model Stock" in card.text
    assert "used by the model_stock method" in card.text

    written = summary.read_text()
    assert f"| {name} | val | accuracy | {expected_val.value:.4f} |" in written
    assert "Base model (the ingredients' common start)" in written and "merged by model_stock)" in written


def _centre_kit(tmp_path: Path) -> tuple[list[str], str, Path, dict[str, torch.Tensor]]:
    """A base, three fine-tunes drawn around one centre (base + shared move + each one's own, as
    Model Stock assumes) and one drawn far from it; the custom eval's file; the centre."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    base = ck.state_dict_of(model)
    generator = torch.Generator().manual_seed(1)

    def noise(scale: float) -> dict[str, torch.Tensor]:
        return {k: scale * torch.randn(v.shape, generator=generator) for k, v in base.items() if v.is_floating_point()}

    shared = noise(0.02)
    centre = {k: base[k] + shared[k] for k in shared}
    folders = []
    for i, scale in enumerate((0.02, 0.025, 0.03, 0.1)):  # the last is far from the centre
        own = noise(scale)
        model.load_state_dict({k: centre[k] + own[k] if k in centre else v for k, v in base.items()})
        folders.append(str(ck.save_timm_folder(model, tmp_path / f"ft{i}")))
    model.load_state_dict(base)
    ck.save_timm_folder(model, tmp_path / "base")
    ck.save_safetensors(centre, tmp_path / "centre.safetensors")
    metric = tmp_path / "closeness.py"
    metric.write_text(
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "CENTRE = load_file(Path(__file__).parent / 'centre.safetensors')\n"
        "def closeness(model):\n"
        "    state = model.state_dict()\n"
        "    return -sum(float(((state[k].double() - c.double()) ** 2).sum()) for k, c in CENTRE.items())\n"
    )
    return folders, str(tmp_path / "base"), metric, centre


def test_greedy_keeps_what_helps_and_model_stock_combines_the_kept_with_the_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders, base, metric, centre = _centre_kit(tmp_path)
    custom = ["--eval-task", "custom", "--eval-function", f"{metric}:closeness",
              "--trust-remote-code"]
    method = ["--method", "model_stock", "--base", base]
    out = tmp_path / "greedy"
    assert main(["--quiet", "merge", *folders, *method, "--greedy", *custom, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    kept = _kept((out / "README.md").read_text())
    assert kept == folders[:3], printed  # Model Stock of more fine-tunes of one centre comes closer to it

    assert main(["--quiet", "merge", *kept, *method, "-o", str(tmp_path / "streamed")]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "streamed" / "model.safetensors").read_bytes()

    based = load_file(Path(base) / "model.safetensors")
    distance = -sum(float(((based[k].double() - c.double()) ** 2).sum()) for k, c in centre.items())
    assert f"{distance:.4g}" in _table_row(printed, f"base ({base})")
    assert f"| base ({base}) | validation | {metric}:closeness | {distance:.4f} |" in (out / "README.md").read_text()


def test_a_soup_below_its_base_is_warned_about_and_still_pushed_when_it_beats_its_ingredients(
    hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both fine-tunes lowered the measured bias by 1: the soup (base + 0.25 * both task vectors) lowers
    it by 0.5, so it is below the base and above either ingredient. The gate compares with the best
    ingredient: pushed, with the warning in the card and the summary. Hub refs: ``base_model`` lists
    the base, then the ingredients."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    api = HfApi(token=hub_token)
    repos = [f"{TEST_USER}/{unique(name)}" for name in ("neg-base", "neg-a", "neg-b")]
    base_bias = float(model.fc.bias.detach().double().mean())
    for i, repo in enumerate(repos):
        with torch.no_grad():
            if i == 1:
                model.fc.bias.sub_(1.0)  # a: the base's bias - 1
            if i == 2:
                model.fc.weight.add_(0.01)  # b: a's bias (the base's - 1), another head
        upload(api, ck.save_timm_folder(model, tmp_path / repo.split("/")[1]), repo)
    metric = tmp_path / "bias.py"
    metric.write_text("def bias(model):\n    return float(model.fc.bias.double().mean())\n")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    soup_repo = f"{TEST_USER}/{unique('below-base')}"
    code = main(["merge", repos[1], repos[2], "--method", "task_arithmetic", "--base", repos[0], "--lambda", "0.25",
                 "--eval-task", "custom", "--eval-function", f"{metric}:bias",
                 "--trust-remote-code", "--push", soup_repo, "--token", hub_token])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "is at least as good as its best ingredient" in captured.out
    row = rf"^  -  base \({repos[0]}@[0-9a-f]{{10}}\) +{re.escape(f'{base_bias:.4g}')}$"  # the plain soup's table
    assert re.search(row, captured.out, flags=re.MULTILINE), captured.out
    assert "is worse than its base" in captured.out and "the merge undid what fine-tuning gained" in captured.err

    card = ModelCard.load(soup_repo, token=hub_token)
    assert card.data.base_model == repos  # the base first, then the ingredients
    warnings = card.text.split("## Warnings", 1)[1].split("##", 1)[0]
    assert "is worse than its base" in warnings and "the merge undid what fine-tuning gained" in warnings
    assert "> **warning:** the soup" in summary.read_text() and "worse than its base" in summary.read_text()
