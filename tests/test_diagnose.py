"""Diagnostics on real digits models: the curve between two ingredients, its plot, weight distances.

Models come from the shared digits kit (see ``tests/test_evaluate.py``). The verdict and the plot
are also checked on constructed curves, whose shapes real models give only by chance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from matplotlib.ticker import PercentFormatter

from hub_soup.errors import EvalError
from hub_soup.eval.diagnose import (
    ALPHAS,
    Curve,
    DiagnoseReport,
    barrier_tolerance,
    curve_figure,
    diagnose,
    dip_below_ends,
)
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.metrics import get_metric
from hub_soup.eval.score import Score
from hub_soup.io.read import Checkpoint
from hub_soup.merging.plan import Layout, MergePlan, align
from hub_soup.merging.similarity import Similarity
from tests.test_evaluate import DigitsKit, digits_kit, image_spec


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsKit:
    return digits_kit(tmp_path_factory)


def _layout(checkpoint: Checkpoint) -> Layout:
    return Layout(checkpoint.label, checkpoint.metas, tuple(checkpoint.aliases))


def _plan(checkpoints: list[Checkpoint], base: Checkpoint | None = None) -> MergePlan:
    return align([_layout(c) for c in checkpoints], base=_layout(base) if base is not None else None)


def test_curve_points_are_direct_evaluations_and_the_plot_is_written(digits: DigitsKit, tmp_path: Path) -> None:
    a, b, base = digits.open([digits.ingredients[0], digits.ingredients[2], digits.base])
    plan = _plan([a, b], base)
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
    with pytest.raises(EvalError, match="diagnose got a base and a plan without one"):
        diagnose(a, b, _plan([a, b]), evaluator, base=base)
    with pytest.raises(EvalError, match="aligns the base .* but diagnose got no base"):
        diagnose(a, b, _plan([a, b], base), evaluator)
    with pytest.raises(EvalError, match="aligns 3 ingredients, diagnose compares 2"):
        diagnose(a, b, _plan([a, b, base]), evaluator)
    with pytest.raises(EvalError, match=r"alphas must lie in \[0, 1\]"):
        diagnose(a, b, _plan([a, b]), evaluator, alphas=(0.5, 1.5))


def _curve(values: list[float], metric: str = "accuracy") -> Curve:
    """Scores at evenly spaced alphas; accuracy is higher-is-better, perplexity lower."""
    alphas = [n / (len(values) - 1) for n in range(len(values))]
    return [(alpha, Score(get_metric(metric), value, 360, "val", "digits"))
            for alpha, value in zip(alphas, values)]


def _report(
    values: list[float],
    metric: str = "accuracy",
    recalibrated: list[float] | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> DiagnoseReport:
    similarity = Similarity(list(labels), [[1.0, 0.9], [0.9, 1.0]], [[0.0, 0.1], [0.1, 0.0]])
    return DiagnoseReport(
        labels=labels, curve=_curve(values, metric), similarity=similarity,
        curve_recalibrated=_curve(recalibrated, metric) if recalibrated is not None else None,
    )


def test_no_barrier_is_not_safe_when_every_soup_is_worse_than_the_better_ingredient() -> None:
    # the midpoint lies between the endpoint scores: on the straight line, so no barrier, yet worse than B
    report = _report([0.90, 0.93, 0.94, 0.95, 0.99])
    assert not report.has_barrier
    verdict = report.verdict()
    assert verdict.startswith("no barrier between A and B, but no point between them beats B (99.00%)")
    assert "the best soup on the line scores 95.00% (alpha 0.75)" in verdict
    assert verdict.endswith("averaging them does not help")
    assert "safe" not in verdict and "helps" not in verdict
    assert verdict in report.text()


def test_lower_is_better_names_the_better_ingredient_in_its_direction() -> None:
    verdict = _report([12.0, 11.1, 10.0], metric="perplexity").verdict()
    assert "no point between them beats B (10)" in verdict and "scores 11.1" in verdict
    assert verdict.endswith("does not help")
    assert "beat both: averaging helps" in _report([12.0, 9.0, 10.0], metric="perplexity").verdict()


def test_soups_that_beat_both_help_and_a_tie_is_only_safe() -> None:
    helps = _report([0.98, 0.99, 0.995, 0.99, 0.985]).verdict()
    assert "beat both: averaging helps" in helps and "best soup 99.50% at alpha 0.50, B alone 98.50%" in helps
    ties = _report([0.98, 0.99, 0.99]).verdict()
    assert "averaging them is safe but gains nothing" in ties and "helps" not in ties
    assert "B alone 99.00%" in ties


def test_recalibrated_verdict_is_judged_against_the_ingredients_recalibrated() -> None:
    # the averaged-statistics curve dips; recalibrated, it is straight but still below B recalibrated
    report = _report([0.90, 0.50, 0.99], recalibrated=[0.92, 0.955, 0.995])
    assert report.has_barrier
    verdict = report.verdict()
    assert "disappears with recalibrated BatchNorm statistics" in verdict
    assert "no recalibrated soup beats B recalibrated (99.50%): the best scores 95.50% (alpha 0.50)" in verdict
    assert verdict.endswith("averaging them does not help")
    # like with like: 99.25% beats B as saved (99.00%) but not B recalibrated (99.50%)
    recalibration_only = _report([0.90, 0.50, 0.99], recalibrated=[0.92, 0.9925, 0.995]).verdict()
    assert "does not help" in recalibration_only and "helps (" not in recalibration_only
    helps = _report([0.90, 0.50, 0.99], recalibrated=[0.92, 0.995, 0.99]).verdict()
    assert "recalibrated soups beat both" in helps and "averaging helps" in helps
    assert "different basins" in _report([0.90, 0.50, 0.99], recalibrated=[0.92, 0.60, 0.99]).verdict()


def test_the_dip_below_the_worse_end_is_found_on_the_points_alone() -> None:
    # the curve: below both ends in the middle, yet within the barrier tolerance
    dip = dip_below_ends(_curve([0.9777, 0.9749, 0.9749, 0.9805]), ("A", "B"))
    assert dip is not None and (dip.alpha, dip.ingredient) == (1 / 3, "A")  # the first of the two lowest
    assert dip.depth == pytest.approx(0.0028)
    assert dip_below_ends(_curve([0.90, 0.93, 0.94, 0.95, 0.99]), ("A", "B")) is None  # nothing below A
    assert dip_below_ends(_curve([0.98, 0.99, 0.98]), ("A", "B")) is None  # the worse end's score is no dip
    # lower is better: the worse end is the higher one, and a dip is a rise above it
    dip = dip_below_ends(_curve([12.0, 12.2, 12.5, 10.0], metric="perplexity"), ("A", "B"))
    assert dip is not None and (dip.alpha, dip.ingredient) == (2 / 3, "A") and dip.depth == pytest.approx(0.5)
    assert barrier_tolerance(_curve([0.9777, 0.9749, 0.9749, 0.9805])) == pytest.approx(0.02 * 0.9791)


def test_no_barrier_states_its_tolerance_and_the_dip_below_both_ends() -> None:
    """A curve below both ends in the middle is no "no dip": the verdict says how far below, where, and
    the tolerance that made it no barrier."""
    dipped = _report([0.9777, 0.9749, 0.9749, 0.9805, 0.9805])
    assert not dipped.has_barrier
    verdict = dipped.verdict()
    assert "averaging them is safe but gains nothing" in verdict and "no dip" not in verdict
    assert verdict.endswith(
        "at alpha 0.25 the curve is 0.28 points worse than A, the worse end, within the barrier tolerance: "
        "1.96 points (2% of the ends' mean score) worse than the straight line between the ends"
    )
    worse = _report([0.9777, 0.9749, 0.9749, 0.9805]).verdict()
    assert "at alpha 0.33 the curve is 0.28 points worse than A" in worse and worse.endswith("does not help")
    helps = _report([0.98, 0.99, 0.995, 0.99, 0.985]).verdict()
    assert helps.endswith(
        "no point between them is worse than the worse end, and none is more than the barrier tolerance, "
        "1.96 points (2% of the ends' mean score), worse than the straight line between the ends"
    )
    assert "more than the barrier tolerance of 1.89 points (2% of the ends' mean score)" in _report(
        [0.90, 0.50, 0.99]
    ).verdict()


def test_only_the_endpoints_scored_says_nothing_about_soups() -> None:
    verdict = _report([0.90, 0.99]).verdict()
    assert verdict.startswith("only A and B themselves were scored") and "safe" not in verdict


def _reference_lines(figure_axes: object) -> list[float]:
    """The y values of the full-width horizontal lines (the curves have a point per alpha)."""
    lines = figure_axes.get_lines()  # type: ignore[attr-defined]
    return sorted(
        float(line.get_ydata()[0]) for line in lines
        if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1
    )


def test_plot_shows_accuracy_in_percent_with_the_ingredients_as_labelled_reference_lines() -> None:
    figure = curve_figure(_report([0.90, 0.93, 0.94, 0.95, 0.99]))
    figure.canvas.draw()
    (axes,) = figure.axes
    assert isinstance(axes.yaxis.get_major_formatter(), PercentFormatter)
    ticks = [label.get_text() for label in axes.get_yticklabels() if label.get_text()]
    assert ticks and all(tick.endswith("%") for tick in ticks)
    assert "%" in axes.get_ylabel()
    assert list(axes.get_xticks()) == [0.0, 0.25, 0.5, 0.75, 1.0]  # a tick under every scored point
    assert _reference_lines(axes) == [0.90, 0.99]
    assert sorted(text.get_text() for text in axes.texts) == ["A 90.00%", "B 99.00%"]
    # the labels sit in the right margin, beside the axes, where the curve never runs
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    box = axes.get_window_extent(renderer)
    assert all(text.get_window_extent(renderer).x0 >= box.x1 for text in axes.texts)
    # one curve: nothing to tell apart, so no legend anywhere
    assert axes.get_legend() is None and not figure.legends


def test_plot_legend_for_two_curves_is_outside_the_axes_and_other_metrics_keep_their_units(tmp_path: Path) -> None:
    figure = curve_figure(_report([0.90, 0.50, 0.99], recalibrated=[0.92, 0.955, 0.995]))
    figure.canvas.draw()
    (axes,) = figure.axes
    assert axes.get_legend() is None and len(figure.legends) == 1
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    legend, box = figure.legends[0].get_window_extent(renderer), axes.get_window_extent(renderer)
    assert legend.y1 <= box.y0  # below the axes (and their tick labels), never over the curve
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [
        "averaged BN statistics", "recalibrated BN statistics"
    ]
    # the reference lines are the ingredients as they are, not their recalibrated scores
    assert _reference_lines(axes) == [0.90, 0.99]

    figure = curve_figure(_report([12.0, 11.5, 12.0], metric="perplexity"))
    figure.canvas.draw()
    (axes,) = figure.axes
    assert not isinstance(axes.yaxis.get_major_formatter(), PercentFormatter)
    assert not any(label.get_text().endswith("%") for label in axes.get_yticklabels())
    assert "lower is better" in axes.get_ylabel()
    assert _reference_lines(axes) == [12.0] and [text.get_text() for text in axes.texts] == ["A and B 12"]


def test_plot_shortens_long_labels_so_everything_fits_in_the_figure() -> None:
    labels = ("examples/digits/ingredients/ft-lr0.01", "some-organisation/a-long-model-name@0123456789")
    report = _report([0.9777, 0.9415, 0.9443, 0.9777, 0.9889], recalibrated=[0.9777, 0.9833, 0.9889, 0.9889, 0.9916],
                     labels=labels)
    figure = curve_figure(report)
    figure.canvas.draw()
    (axes,) = figure.axes
    assert sorted(text.get_text() for text in axes.texts) == [
        "…/a-long-model-name@0123456789 98.89%", "…/ingredients/ft-lr0.01 97.77%"
    ]
    assert axes.get_xlabel() == "alpha: 0 = …/ingredients/ft-lr0.01, 1 = …/a-long-model-name@0123456789"
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    page = figure.bbox
    for text in [*axes.texts, axes.xaxis.label, axes.yaxis.label, axes.title]:
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text
    assert axes.get_window_extent(renderer).width > 0.5 * page.width  # the curve keeps most of the width
    assert labels[0] in report.text() and labels[1] in report.text()  # the text keeps the full labels
