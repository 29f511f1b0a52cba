"""The one kind of score: a model's metrics on one split, one of them declared primary.

Greedy selection, the comparisons and the worse-soup gate decide on the primary
metric in its declared direction; the others (e.g. the log loss beside accuracy)
are reported beside it, in tables and in the card's model-index. ``value``,
``metric``, ``higher_is_better``, ``better_than``, ``at_least``, ``formatted``
and ``difference`` all speak of the primary metric, so code that decides reads
one number. Torch-free: the card and the step summary use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hub_soup.eval.metrics import Metric


@dataclass(frozen=True)
class Score:
    """One model's result on one eval set.

    Args:
        primary: the metric that decides (greedy, comparisons, the gate).
        value: the primary metric's value.
        examples: how many examples were scored (0 for a custom function).
        split: the split scored.
        dataset: the eval data (path or Hub id).
        others: further metrics measured on the same outputs, reported beside the primary.
    """

    primary: Metric
    value: float
    examples: int
    split: str
    dataset: str
    others: tuple[tuple[Metric, float], ...] = ()

    @property
    def metric(self) -> str:
        """The primary metric's name."""
        return self.primary.name

    @property
    def higher_is_better(self) -> bool:
        """The primary metric's direction."""
        return self.primary.higher_is_better

    def measurements(self) -> Iterator[tuple[Metric, float]]:
        """Every metric with its value, the primary first."""
        yield self.primary, self.value
        yield from self.others

    def better_than(self, other: Score) -> bool:
        """Strictly better in the primary metric's direction (NaN is never better)."""
        return self.value > other.value if self.higher_is_better else self.value < other.value

    def at_least(self, other: Score) -> bool:
        """As good or better (the greedy soup's rule); False for NaN, so a broken soup is never kept."""
        return self.value >= other.value if self.higher_is_better else self.value <= other.value

    def formatted(self) -> str:
        """The primary value as people read it (see :meth:`Metric.format`)."""
        return self.primary.format(self.value)

    def difference(self, other: Score) -> str:
        """``self - other`` of the primary metric, signed, as people read it."""
        return self.primary.format_delta(self.value - other.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.formatted()}"


@dataclass(frozen=True)
class Comparison:
    """The soup against a yardstick on one split: its best ingredient (what decides whether to
    publish) or, for methods with one, its base (what the merge started from).

    With BatchNorm recalibration the yardstick gets it too (like with like), and
    ``best_as_saved`` keeps its score with the statistics it was saved with, so a
    gain that recalibration alone explains is visible as such.
    """

    soup: Score
    best: Score  # the yardstick's score
    best_label: str
    best_as_saved: Score | None = None  # set when ``best`` is the yardstick with recalibrated BN statistics
    against: str = "its best ingredient"  # what the yardstick is to the soup, in the message ("its base")

    @property
    def soup_is_worse(self) -> bool:
        return self.best.better_than(self.soup)

    def message(self) -> str:
        """One line for logs, the step summary and :class:`~hub_soup.errors.WorseSoupError`."""
        verdict = "worse than" if self.soup_is_worse else "at least as good as"
        best = f"{self.best}"
        if self.best_as_saved is not None:
            best += f" with recalibrated BatchNorm statistics, {self.best_as_saved.formatted()} as saved"
        return (
            f"the soup ({self.soup}) is {verdict} {self.against} {self.best_label} ({best}) on "
            f"{self.soup.split}: {self.soup.difference(self.best)}, {self.soup.primary.direction} is better"
        )


def compare_to_best(
    soup: Score, labels: Sequence[str], scores: Sequence[Score], as_saved: Sequence[Score | None] | None = None
) -> Comparison:
    """Compare ``soup`` with the best of ``scores`` (first one on ties).

    ``as_saved[i]``, when given and not None, is ingredient ``i``'s score before BN
    recalibration, where ``scores[i]`` is the recalibrated one.
    """
    best = 0
    for i, score in enumerate(scores):
        if score.better_than(scores[best]):
            best = i
    saved = as_saved[best] if as_saved is not None else None
    return Comparison(soup=soup, best=scores[best], best_label=labels[best], best_as_saved=saved)
