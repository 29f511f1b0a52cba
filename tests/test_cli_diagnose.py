"""``hub-soup diagnose`` reads its models as ``merge`` does: ``--no-ema`` and ``--exclude`` reach it.

On the bundled digits models (examples/digits), through :func:`hub_soup.cli.main`; the
curve's printed scores are compared between runs, so each check is of which weights
were read and aligned, not of any number fixed in the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT
from tests import checkpoints as ck

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
A, B = (DIGITS / "ingredients" / name for name in ("ft-lr0.01", "ft-lr0.02-shift"))
BASE = DIGITS / "base"
# a small, fixed sample of the val split: the checks compare runs, they need no precise score
EVAL = ["--eval-task", "image-classification", "--eval-data", str(DIGITS / "data"), "--eval-split", "val",
        "--eval-limit", "120", "--alphas", "1"]


def _curve(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict[str, str]:
    """The printed curve of a successful diagnose: alpha -> score as printed."""
    code = main(["--quiet", "diagnose", *map(str, argv), *EVAL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("   ")]
    return {row[0]: row[1] for row in rows if len(row) == 2}


def test_no_ema_reads_the_raw_weights_of_a_training_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a timm training checkpoint whose EMA weights are B's and whose raw weights are the base's
    train = ck.save_timm_train(
        tmp_path / "train" / "model_best.pth.tar", raw=load_file(BASE / "model.safetensors"),
        ema=load_file(B / "model.safetensors"),
    )
    reference = _curve(capsys, B, BASE)  # alpha 0: B alone; alpha 1: the base alone
    assert reference["0.00"] != reference["1.00"], reference  # else the check below could not tell them apart

    assert _curve(capsys, A, train)["1.00"] == reference["0.00"]  # EMA by default, as merge
    assert _curve(capsys, A, train, "--no-ema")["1.00"] == reference["1.00"]


def test_exclude_lets_models_with_other_heads_align(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seven = load_file(B / "model.safetensors")
    seven["fc.weight"], seven["fc.bias"] = seven["fc.weight"][:7].clone(), seven["fc.bias"][:7].clone()
    save_file(seven, tmp_path / "seven-classes.safetensors")
    other = tmp_path / "seven-classes.safetensors"

    assert main(["--quiet", "diagnose", str(A), str(other), *EVAL]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "shape mismatch at fc." in err and "--exclude" in err, err

    curve = _curve(capsys, A, other, "--exclude", "fc.*")
    # the head is A's at every alpha, so B's body under A's head is what alpha 1 scores
    body = {k: v if k.startswith("fc.") else seven[k] for k, v in load_file(A / "model.safetensors").items()}
    save_file(body, tmp_path / "b-body-a-head.safetensors")
    assert curve["1.00"] == _curve(capsys, A, tmp_path / "b-body-a-head.safetensors")["1.00"]


def test_a_test_split_is_not_a_diagnose_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """The curve is scored on one split: a --test-eval that diagnose would ignore is refused instead."""
    with pytest.raises(SystemExit) as stopped:
        main(["diagnose", str(A), str(B), *EVAL, "--test-eval", "test"])
    assert stopped.value.code == EXIT_BAD_INPUT and "--test-eval" in capsys.readouterr().err
