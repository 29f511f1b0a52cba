"""Why didn't the soup help? The score along the straight line between two ingredients.

Averaging works when the ingredients sit in one basin of the loss landscape:
then every point on the segment between them scores about as well as its ends,
or better in the middle (Wortsman et al. 2022; Frankle et al. 2020 call this
linear mode connectivity). A dip in the middle of the curve, a *barrier*, means
different basins, and no weighting of those two will make a good soup. A dip
that BatchNorm recalibration removes means the weights are fine and only the
averaged running statistics are wrong. Weight distances say why the models
drifted apart: independent initialisations (cosine near 0), or fine-tunes that
moved far from their base relative to its own norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hub_soup.errors import EvalError
from hub_soup.eval.evaluate import Evaluator, Score
from hub_soup.io.read import Checkpoint
from hub_soup.merging.engine import merged_state_dict
from hub_soup.merging.methods.weighted import Weighted
from hub_soup.merging.plan import MergePlan, TensorPlan
from hub_soup.merging.similarity import SHARED_INIT_COSINE, Similarity, weight_similarity

if TYPE_CHECKING:  # matplotlib is an optional dependency, imported where the plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# An interior point this far (relative to the endpoints' mean score) below the straight
# line between the endpoint scores is called a barrier: ~2 points of accuracy at 98%.
BARRIER_TOLERANCE = 0.02

# Ingredient labels longer than this are shortened on the plot (see _plot_name).
PLOT_NAME_WIDTH = 28
# Up to this many scored alphas each gets its own tick on the plot; more fall back to matplotlib's.
MAX_ALPHA_TICKS = 11

Curve = list[tuple[float, Score]]


@dataclass(frozen=True)
class _BestSoup:
    """The best soup between two ingredients against the better ingredient's own score.

    What a user of a soup asks is whether it beats the model they already have, so this,
    not the barrier, decides whether the verdict may say "helps" or "safe".
    """

    alpha: float
    score: Score
    ingredient: str  # the label of the better ingredient (the first on a tie)
    reference: Score  # that ingredient's own score

    @property
    def helps(self) -> bool:
        """The soup beats the better ingredient, hence both."""
        return self.score.better_than(self.reference)

    @property
    def safe(self) -> bool:
        """The soup is at least as good as the better ingredient: nothing lost by averaging."""
        return self.score.at_least(self.reference)

    def __str__(self) -> str:
        return (
            f"best soup {self.score.formatted()} at alpha {self.alpha:.2f}, "
            f"{self.ingredient} alone {self.reference.formatted()}"
        )


@dataclass(frozen=True)
class Dip:
    """The interior point of a curve furthest below its worse end: a dip within the barrier tolerance
    is no barrier, but the soups there are worse than either ingredient, and the verdict says so."""

    alpha: float
    depth: float  # how much worse than the worse end, in the metric's units (positive)
    ingredient: str  # the worse end's label


def dip_below_ends(curve: Curve, labels: tuple[str, str]) -> Dip | None:
    """The point between the ends that scores furthest below the worse end (the first on a tie), or None
    when no point between them scores below it."""
    (_, first), (_, second) = curve[0], curve[-1]
    ingredient, worse = (labels[0], first) if second.better_than(first) else (labels[1], second)
    dip = None
    for alpha, score in curve[1:-1]:
        depth = abs(worse.value - score.value)
        if worse.better_than(score) and (dip is None or depth > dip.depth):
            dip = Dip(alpha, depth, ingredient)
    return dip


def barrier_tolerance(curve: Curve) -> float:
    """How far (in the metric's units) a point may fall below the straight line between the endpoint
    scores before it is a barrier: ``BARRIER_TOLERANCE`` of the endpoints' mean score."""
    return BARRIER_TOLERANCE * abs(curve[0][1].value + curve[-1][1].value) / 2


@dataclass
class DiagnoseReport:
    """Scores between two ingredients, weight distances, and what they mean."""

    labels: tuple[str, str]
    curve: Curve  # (alpha, score): alpha 0 is the first ingredient, 1 the second
    similarity: Similarity  # of the two ingredients (and the base, last, when given)
    curve_recalibrated: Curve | None = None  # the same soups with recalibrated BatchNorm statistics
    base_label: str | None = None
    base_distances: dict[str, float] | None = None  # label -> ||x - base|| / ||base||
    plot_path: Path | None = None

    @property
    def barrier(self) -> float:
        """How far the curve falls below the straight line between its endpoint scores, at worst
        (in the metric's units, positive when worse); 0 when no interior point is worse."""
        return _barrier(self.curve)

    @property
    def has_barrier(self) -> bool:
        """True when the dip exceeds ``BARRIER_TOLERANCE`` of the endpoints' mean score."""
        return _has_barrier(self.curve)

    def verdict(self) -> str:
        """What the curve says about averaging these two.

        "No dip" alone is not "averaging is safe": the barrier is measured against the straight
        line between the endpoint scores, so a curve that climbs from a weak ingredient to a
        strong one has no barrier even where every soup on it is worse than the strong one.
        Whether averaging helps is therefore judged against the better ingredient's own score.
        """
        a, b = self.labels
        if len(self.curve) < 3:
            return f"only {a} and {b} themselves were scored: add alphas between 0 and 1 to see their soups"
        if not self.has_barrier:
            best = _best_soup(self.curve, self.labels)
            basin = self._no_barrier()
            if best.helps:
                return f"{a} and {b} are in one basin and soups between them beat both: averaging helps ({best}); {basin}"
            if best.safe:
                return f"{a} and {b} are in one basin: averaging them is safe but gains nothing ({best}); {basin}"
            return (
                f"no barrier between {a} and {b}, but no point between them beats {best.ingredient} "
                f"({best.reference.formatted()}): the best soup on the line scores {best.score.formatted()} "
                f"(alpha {best.alpha:.2f}); {basin}; averaging them does not help"
            )
        if self.curve_recalibrated is not None and not _has_barrier(self.curve_recalibrated):
            best = _best_soup(self.curve_recalibrated, self.labels)  # like with like: recalibrated ingredients
            cause = (
                f"the dip between {a} and {b} disappears with recalibrated BatchNorm statistics: the weights "
                "average well, the averaged running statistics do not"
            )
            if best.helps:
                return f"{cause}; recalibrated soups beat both: use recalibrate_bn, averaging helps ({best})"
            if best.safe:
                return f"{cause}; use recalibrate_bn: averaging is then safe but gains nothing ({best})"
            return (
                f"{cause}; even so no recalibrated soup beats {best.ingredient} recalibrated "
                f"({best.reference.formatted()}): "
                f"the best scores {best.score.formatted()} (alpha {best.alpha:.2f}); averaging them does not help"
            )
        dip = self._amount(self.barrier)
        return (
            f"a dip of {dip} in the middle, more than the barrier tolerance of {self._tolerance()}: {a} and {b} "
            "sit in different basins, so any average of the two "
            "scores worse than its ends. Usual causes: independent initialisations, or fine-tunes that moved "
            "far from their shared start (large learning rates, long training)"
        )

    def _amount(self, difference: float) -> str:
        """A difference of the metric, as people read it: ``0.28 points``, ``0.3125``."""
        return self.curve[0][1].primary.format_delta(difference).lstrip("+")

    def _tolerance(self) -> str:
        """The barrier tolerance, in the metric's units and in what it is."""
        return f"{self._amount(barrier_tolerance(self.curve))} ({BARRIER_TOLERANCE:.0%} of the ends' mean score)"

    def _no_barrier(self) -> str:
        """What "no barrier" rests on: the tolerance, and how far the curve dips below the worse end, if it does.

        A curve can dip below both ends and still be no barrier (97.77%, 97.49%, 97.49%, 98.05%): within
        the tolerance, but the soups there are worse than either ingredient, which "no dip" would hide.
        """
        line = "worse than the straight line between the ends"
        dip = dip_below_ends(self.curve, self.labels)
        if dip is None:
            return (
                f"no point between them is worse than the worse end, and none is more than the barrier tolerance, "
                f"{self._tolerance()}, {line}"
            )
        return (
            f"at alpha {dip.alpha:.2f} the curve is {self._amount(dip.depth)} worse than {dip.ingredient}, the worse "
            f"end, within the barrier tolerance: {self._tolerance()} {line}"
        )

    def text(self) -> str:
        """The curve, the verdict, the distances, and where the plot is."""
        first = self.curve[0][1]
        a, b = self.labels
        direction = "higher" if first.higher_is_better else "lower"
        lines = [
            (
                f"scores on the line (1 - alpha) * {a} + alpha * {b}, {first.dataset} split {first.split} "
                f"({first.examples} examples; {first.metric}, {direction} is better):"
            ),
            f"  alpha  {'score':>9}" + (f"  {'recal BN':>9}" if self.curve_recalibrated else ""),
        ]
        for n, (alpha, score) in enumerate(self.curve):
            row = f"  {alpha:5.2f}  {score.formatted():>9}"
            if self.curve_recalibrated:
                row += f"  {self.curve_recalibrated[n][1].formatted():>9}"
            lines.append(row)
        lines.append(self.verdict())
        lines.append(self.similarity.table())
        pairs = self.similarity.independent_pairs()
        if pairs:
            lines.append(
                f"independent trainings (cosine < {SHARED_INIT_COSINE}): "
                + ", ".join(f"{self.similarity.labels[i]} & {self.similarity.labels[j]}" for i, j in pairs)
            )
        if self.base_distances is not None:
            lines.append(f"distance from the base {self.base_label}, relative to the base's weight norm:")
            lines.extend(f"  {label}: {distance:.4f}" for label, distance in self.base_distances.items())
        if self.plot_path is not None:
            lines.append(f"plot: {self.plot_path}")
        return "\n".join(lines)


def diagnose(
    a: Checkpoint,
    b: Checkpoint,
    plan: MergePlan,
    evaluator: Evaluator,
    *,
    alphas: Sequence[float] = ALPHAS,
    base: Checkpoint | None = None,
    plot_path: Path | None = None,
    recalibrate_bn_batches: int | None = None,
) -> DiagnoseReport:
    """Score the soups ``(1 - alpha) * a + alpha * b`` and measure how far apart the weights are.

    Args:
        a, b: the two ingredients (alpha 0 is ``a``).
        plan: the alignment of ``[a, b]``, with ``base`` in the base role when it is given
            (``align([a, b], base=base)``).
        evaluator: scores every point (built with ``a`` as reference); the caller's to close.
        alphas: where to evaluate, each in [0, 1]; sorted, and 0 and 1 are always included.
        base: the checkpoint both were fine-tuned from, for distances relative to its norm.
        plot_path: write the curve as a PNG there.
        recalibrate_bn_batches: also score every point with BatchNorm recalibrated on this many batches.
    """
    if len(plan.tensors[0].sources) != 2:
        raise EvalError(
            f"the merge plan aligns {len(plan.tensors[0].sources)} ingredients, diagnose compares 2",
            hint="align [a, b] (with base=... for a base)",
        )
    if (base is None) != (plan.base is None):
        raise EvalError(
            "diagnose got a base and a plan without one" if base is not None else
            f"the merge plan aligns the base {plan.base}, but diagnose got no base",
            hint="align [a, b] with base=... exactly when diagnose gets a base",
        )
    if any(not 0.0 <= alpha <= 1.0 for alpha in alphas):
        raise EvalError(f"alphas must lie in [0, 1], got {list(alphas)}")
    alphas = sorted({0.0, 1.0, *map(float, alphas)})
    batches = evaluator.unlabelled_batches(recalibrate_bn_batches) if recalibrate_bn_batches else None
    curve: Curve = []
    recalibrated_curve: Curve = []
    for alpha in alphas:
        soup = interpolate(a, b, plan, alpha)
        curve.append((alpha, evaluator.score_state_dict(soup)))
        if batches is not None:
            recalibrated = evaluator.recalibrated(soup, batches)
            if recalibrated is not None:
                recalibrated_curve.append((alpha, evaluator.score_state_dict(recalibrated)))
    report = DiagnoseReport(
        labels=(a.label, b.label),
        curve=curve,
        similarity=weight_similarity([a, b, *([base] if base is not None else [])], _base_as_last(plan)),
        curve_recalibrated=recalibrated_curve or None,
    )
    if base is not None:
        report.base_label = base.label
        report.base_distances = _distances_from_base(plan, [a, b], base)
    if plot_path is not None:
        report.plot_path = plot_curve(report, Path(plot_path))
    return report


def interpolate(a: Checkpoint, b: Checkpoint, plan: MergePlan, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b``: the weighted soup the engine streams, in ``a``'s dtypes;
    tensors the plan does not average are ``a``'s, as in every soup."""
    return merged_state_dict([a, b], plan, Weighted(weights=[1.0 - alpha, alpha]))


def _base_as_last(plan: MergePlan) -> MergePlan:
    """``plan`` with its base (if any) as a third ingredient, for the weight similarity of all three."""
    return plan.with_base_as_ingredient()


def plot_curve(report: DiagnoseReport, path: Path) -> Path:
    """Save :func:`curve_figure` as a PNG at ``path`` (parent folders created)."""
    figure = curve_figure(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def curve_figure(report: DiagnoseReport) -> Figure:
    """The curve (and the recalibrated one) as a matplotlib Figure, without touching pyplot's global state.

    It reads like the text: accuracy on a percent axis, other metrics in their own units. Each
    ingredient's own score is a labelled horizontal line, because the question the plot answers
    is whether any soup clears the better ingredient, not only whether the curve dips. Labels and
    legend sit outside the axes so that nothing hides the curve; a single curve needs no legend.
    Built separately from :func:`plot_curve` so that what it shows can be checked without pixels.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:
        raise EvalError("the diagnose plot needs matplotlib", hint="pip install 'hub-soup[eval]'") from None
    first = report.curve[0][1]
    names = (_plot_name(report.labels[0]), _plot_name(report.labels[1]))
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    recalibrated = report.curve_recalibrated
    axes.plot(*_xy(report.curve), marker="o", label="averaged BN statistics")  # in the legend only beside the other
    if recalibrated:
        axes.plot(*_xy(recalibrated), marker="s", linestyle="--", label="recalibrated BN statistics")
        figure.legend(loc="outside lower center", ncols=2, frameon=False)
    _reference_lines(axes, report, names)
    percent = first.primary.percent
    if percent:
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    direction = "higher" if first.higher_is_better else "lower"
    axes.set_ylabel(f"{first.metric}{' (%)' if percent else ''} on {first.split}, {direction} is better")
    axes.set_xlabel(f"alpha: 0 = {names[0]}, 1 = {names[1]}")
    if len(report.curve) <= MAX_ALPHA_TICKS:  # a tick under every scored point, while they stay legible
        axes.set_xticks([alpha for alpha, _ in report.curve])
    axes.set_title("score along the line between two ingredients")
    axes.grid(True, alpha=0.3)
    return figure


def _reference_lines(axes: Axes, report: DiagnoseReport, names: tuple[str, str]) -> None:
    """A grey line at each ingredient's score, labelled in the right margin (the higher label above
    its line, the lower one below, so close scores never print over each other)."""
    (_, first), (_, second) = report.curve[0], report.curve[-1]
    if first.value == second.value:
        labelled = [(f"{names[0]} and {names[1]} {first.formatted()}", first.value, "bottom")]
    else:
        (low_name, low), (high_name, high) = sorted(zip(names, (first, second)), key=lambda pair: pair[1].value)
        labelled = [
            (f"{low_name} {low.formatted()}", low.value, "top"),
            (f"{high_name} {high.formatted()}", high.value, "bottom"),
        ]
    for text, value, place in labelled:
        axes.axhline(value, color="grey", linestyle=":", linewidth=1.2, zorder=1)
        axes.annotate(
            text, xy=(1, value), xycoords=axes.get_yaxis_transform(), xytext=(4, 2 if place == "bottom" else -2),
            textcoords="offset points", ha="left", va=place, color="dimgrey", fontsize="small",
            annotation_clip=False,
        )


def _plot_name(label: str, width: int = PLOT_NAME_WIDTH) -> str:
    """``label`` cut to its last path components that fit in ``width`` characters, behind "…/".

    Labels are paths as typed or ``org/name@rev``: whole, two of them would squeeze the axes to
    a sliver, and the distinctive part is the end. The text report keeps the full labels.
    """
    if len(label) <= width:
        return label
    parts = label.split("/")
    name = parts.pop()
    while parts and len(parts[-1]) + len(name) + 3 <= width:
        name = f"{parts.pop()}/{name}"
    return f"…/{name}" if parts else name


def _xy(curve: Curve) -> tuple[list[float], list[float]]:
    return [alpha for alpha, _ in curve], [score.value for _, score in curve]


def _best_soup(curve: Curve, labels: tuple[str, str]) -> _BestSoup:
    """The best interior point of ``curve`` (the first on a tie) and the better of its endpoints.

    A recalibrated curve's endpoints are the ingredients recalibrated: a soup whose
    statistics were recomputed is judged against ingredients that got the same chance.
    """
    (_, first), (_, second) = curve[0], curve[-1]
    ingredient, better = (labels[1], second) if second.better_than(first) else (labels[0], first)
    alpha, score = curve[1]
    for point_alpha, point in curve[2:-1]:
        if point.better_than(score):
            alpha, score = point_alpha, point
    return _BestSoup(alpha=alpha, score=score, ingredient=ingredient, reference=better)


def _barrier(curve: Curve) -> float:
    (a0, s0), (a1, s1) = curve[0], curve[-1]
    sign = 1.0 if s0.higher_is_better else -1.0
    worst = 0.0
    for alpha, score in curve[1:-1]:
        expected = s0.value + (alpha - a0) / (a1 - a0) * (s1.value - s0.value)
        drop = sign * (expected - score.value)
        worst = max(worst, drop if not math.isnan(drop) else math.inf)
    return worst


def _has_barrier(curve: Curve) -> bool:
    return _barrier(curve) > barrier_tolerance(curve)


def _compared(tensor: TensorPlan) -> bool:
    """The tensors weight similarity compares: averaged matrices and kernels (see hub_soup.merging.similarity)."""
    return tensor.average and len(tensor.meta.shape) >= 2


def _distances_from_base(plan: MergePlan, ingredients: Sequence[Checkpoint], base: Checkpoint) -> dict[str, float]:
    """``||x - base|| / ||base||`` over the compared tensors, in float64: how far each fine-tune moved."""
    squared = [0.0] * len(ingredients)
    base_squared = 0.0
    for tensor in plan.tensors:
        if not _compared(tensor):
            continue
        assert tensor.base_source is not None
        reference = base.read(tensor.base_source).double()
        base_squared += float(reference.square().sum())
        for n, (ingredient, key) in enumerate(zip(ingredients, tensor.sources)):
            squared[n] += float((ingredient.read(key).double() - reference).square().sum())
    norm = math.sqrt(base_squared)
    return {c.label: math.sqrt(s) / norm if norm else math.inf for c, s in zip(ingredients, squared)}
