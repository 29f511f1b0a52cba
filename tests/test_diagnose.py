"""Diagnostics on real digits models: the curve between two ingredients, its plot, weight distances.

Models come from the shared digits kit (see ``tests/test_evaluate.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hub_soup.align import Layout, MergePlan, align
from hub_soup.diagnose import ALPHAS, diagnose
from hub_soup.errors import EvalError
from hub_soup.evaluate import Evaluator
from hub_soup.read import Checkpoint
from tests.test_evaluate import DigitsKit, digits_kit, image_spec


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsKit:
    return digits_kit(tmp_path_factory)


def _plan(checkpoints: list[Checkpoint]) -> MergePlan:
    return align([Layout(c.label, c.metas, tuple(c.aliases)) for c in checkpoints])


def test_curve_points_are_direct_evaluations_and_the_plot_is_written(digits: DigitsKit, tmp_path: Path) -> None:
    a, b, base = digits.open([digits.ingredients[0], digits.ingredients[2], digits.base])
    plan = _plan([a, b, base])
    evaluator = Evaluator(image_spec(digits.data), a)
    plot = tmp_path / "plots" / "curve.png"
    report = diagnose(a, b, plan, evaluator, base=base, plot_path=plot)
    print(report.text())

    assert [alpha for alpha, _ in report.curve] == list(ALPHAS)
    first, second = a.state_dict(), b.state_dict()
    for alpha, score in report.curve:
        # interpolated independently of hub-soup's arithmetic: fp32, cast back to each tensor's dtype
        soup = {
            k: (v.float() * (1 - alpha) + second[k].float() * alpha).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()
        }
        assert evaluator.score_state_dict(soup) == score
    assert report.curve[0][1] == evaluator.score_state_dict(first)
    assert report.curve[-1][1] == evaluator.score_state_dict(second)

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.plot_path == plot
    assert report.similarity.labels == [a.label, b.label, base.label] and report.similarity.independent_pairs() == []
    base_weights = base.state_dict()
    compared = [t.key for t in plan.tensors if t.average and len(t.meta.shape) >= 2]
    base_norm = torch.sqrt(sum(base_weights[k].double().square().sum() for k in compared))
    for label, weights in ((a.label, first), (b.label, second)):
        distance = torch.sqrt(sum((weights[k].double() - base_weights[k].double()).square().sum() for k in compared))
        assert report.base_distances is not None
        assert report.base_distances[label] == pytest.approx(float(distance / base_norm))
    # the higher learning rate moved further from the base
    assert report.base_distances[b.label] > report.base_distances[a.label] > 0
    text = report.text()
    assert "alpha" in text and "distance from the base" in text and str(plot) in text


def test_independent_trainings_show_a_barrier(digits: DigitsKit) -> None:
    a, b = digits.open(digits.independent)
    evaluator = Evaluator(image_spec(digits.data), a)
    report = diagnose(a, b, _plan([a, b]), evaluator, alphas=(0.5,), recalibrate_bn_batches=4)
    print(report.text())
    assert [alpha for alpha, _ in report.curve] == [0.0, 0.5, 1.0]
    ends = min(report.curve[0][1].value, report.curve[-1][1].value)
    assert ends > 0.85 and report.curve[1][1].value < 0.3
    assert report.has_barrier and report.barrier > 0.5
    assert report.curve_recalibrated is not None and len(report.curve_recalibrated) == 3
    assert "different basins" in report.verdict()
    assert report.similarity.independent_pairs() == [(0, 1)]
    assert "independent trainings" in report.text()


def test_fine_tunes_are_connected_once_bn_is_recalibrated(digits: DigitsKit) -> None:
    a, b = digits.open([digits.ingredients[0], digits.ingredients[3]])
    evaluator = Evaluator(image_spec(digits.data), a)
    report = diagnose(a, b, _plan([a, b]), evaluator, recalibrate_bn_batches=4)
    print(report.text())
    assert report.curve_recalibrated is not None
    recalibrated = [score.value for _, score in report.curve_recalibrated]
    assert min(recalibrated) >= min(recalibrated[0], recalibrated[-1]) - 0.02


def test_plan_must_cover_the_checkpoints(digits: DigitsKit) -> None:
    a, b, base = digits.open([digits.ingredients[0], digits.ingredients[1], digits.base])
    evaluator = Evaluator(image_spec(digits.data, limit=20), a)
    with pytest.raises(EvalError, match="aligns 2 checkpoints, diagnose got 3"):
        diagnose(a, b, _plan([a, b]), evaluator, base=base)
    with pytest.raises(EvalError, match=r"alphas must lie in \[0, 1\]"):
        diagnose(a, b, _plan([a, b]), evaluator, alphas=(0.5, 1.5))
