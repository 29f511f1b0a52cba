"""Evaluation through the whole pipeline: the README's quickstart, the worse-soup gate, diagnose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.errors import EXIT_WORSE_SOUP
from tests import checkpoints as ck
from tests.hub_fixtures import TEST_USER
from tests.hub_models import unique
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())
EVAL = ["--eval-task", "image-classification", "--eval-data", str(DIGITS / "data"), "--eval-split", "val"]


def test_quickstart_recipe_makes_a_greedy_soup_at_least_as_good_as_its_best_ingredient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the recipe file, not to where it runs
    out = tmp_path / "quickstart"
    assert main(["--quiet", "run", str(ROOT / "recipes" / "quickstart.yaml"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy soup, scored on" in printed and "kept" in printed
    verdicts = [line for line in printed.splitlines() if "its best ingredient" in line]
    assert "is at least as good as its best ingredient" in verdicts[0] and "on val:" in verdicts[0]
    # the written soup is the scored one: BN statistics recalibrated, in fp16 like its ingredients
    soup = load_file(out / "model.safetensors")
    assert {t.dtype for t in soup.values() if t.is_floating_point()} == {torch.float16}
    card = ModelCard.load(out / "README.md")
    results = card.data.eval_results
    assert results and {r.dataset_split for r in results} == {"val", "test"}
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["greedy"] is True and recipe["recalibrate_bn"] == 8


def test_worse_soup_is_not_pushed_without_force(
    hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A uniform soup of BN networks without recalibration loses to its best ingredient (see README)."""
    soup_repo = f"{TEST_USER}/{unique('worse')}"
    args = ["--quiet", "merge", *INGREDIENTS, *EVAL, "--push", soup_repo, "--token", hub_token]
    assert main([*args, "-o", str(tmp_path / "a")]) == EXIT_WORSE_SOUP
    err = capsys.readouterr().err
    assert "not pushing" in err and "worse than its best ingredient" in err and "--recalibrate-bn" in err
    assert not HfApi(token=hub_token).repo_exists(soup_repo)
    assert (tmp_path / "a" / "model.safetensors").is_file()  # written locally, for a look

    assert main([*args, "-o", str(tmp_path / "b"), "--force"]) == 0
    assert HfApi(token=hub_token).repo_exists(soup_repo)
    card = ModelCard.load(soup_repo, token=hub_token)  # what was pushed with --force says why it was held back
    assert "## Warnings" in card.text and "worse than its best ingredient" in card.text


def test_diagnose_prints_the_curve_and_saves_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "curve.png"
    base = str(DIGITS / "base")
    code = main(["diagnose", INGREDIENTS[0], INGREDIENTS[1], *EVAL, "--base", base, "--plot", str(plot),
                 "--alphas", "0", "0.5", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    assert f"plot: {plot}" in printed
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("   ")][:3] == ["0.00", "0.50", "1.00"]
    assert f"distance from the base {base}, relative to the base's weight norm:" in printed
    for label in INGREDIENTS[:2]:  # each fine-tune moved a measurable, finite distance from the base
        distance = next(line for line in printed.splitlines() if line.startswith(f"  {label}: "))
        assert 0 < float(distance.rsplit(": ", 1)[1]) < 1


def test_diagnose_writes_no_plot_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["diagnose", INGREDIENTS[0], INGREDIENTS[1], *EVAL, "--alphas", "0", "0.5", "1"]) == 0
    assert "plot:" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no silent ./diagnose.png


def test_an_evaluated_soup_honours_dtype_like_the_streamed_one(tmp_path: Path) -> None:
    """fp16 ingredients, --dtype float32: scoring the soup must not round it to fp16 first."""
    pair = INGREDIENTS[:2]
    assert main(["--quiet", "merge", *pair, "--dtype", "float32", "-o", str(tmp_path / "streamed")]) == 0
    assert main(["--quiet", "merge", *pair, "--dtype", "float32", *EVAL, "-o", str(tmp_path / "scored")]) == 0
    streamed, scored = (tmp_path / name / "model.safetensors" for name in ("streamed", "scored"))
    assert scored.read_bytes() == streamed.read_bytes()

    assert main(["--quiet", "merge", *pair, "--dtype", "float32", "--greedy", *EVAL, "-o", str(tmp_path / "greedy")]) == 0
    soup = load_file(tmp_path / "greedy" / "model.safetensors")
    floats = [t for t in soup.values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float32}
    if sum(1 for line in (tmp_path / "greedy" / "README.md").read_text().splitlines() if "| yes |" in line) == 2:
        assert any(not torch.equal(t, t.half().float()) for t in floats)  # an fp32 average, not an fp16 one


def test_a_scored_soup_read_back_from_the_model_is_the_soup_merged_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written in float32, the eval dtype, a scored soup is read back from the model that scored it, with
    its recalibrated BN statistics (and ``num_batches_tracked``) as kept: the same file, bit for bit, as
    merging it again and overriding the statistics, which is what the writer does otherwise."""
    from hub_soup.eval.evaluate import Evaluator
    from hub_soup.merging import engine

    merges: list[int] = []
    merge = engine.stream_merge
    monkeypatch.setattr(engine, "stream_merge", lambda *a, **k: merges.append(1) or merge(*a, **k))
    args = ["--quiet", "merge", *INGREDIENTS, *EVAL, "--recalibrate-bn", "4", "--dtype", "float32"]
    assert main([*args, "-o", str(tmp_path / "held")]) == 0
    assert len(merges) == 1  # merged to be scored, read back to be written
    monkeypatch.setattr(Evaluator, "held", lambda self, weights: weights)
    assert main([*args, "-o", str(tmp_path / "merged")]) == 0
    assert len(merges) == 3
    held, merged = load_file(tmp_path / "held" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert list(held) == list(merged) and any(key.endswith("running_var") for key in held)
    for key, tensor in held.items():
        ck.assert_bit_equal(tensor, merged[key], key)
    card = (tmp_path / "held" / "README.md").read_text()
    assert "recalibrat" in card.lower()
