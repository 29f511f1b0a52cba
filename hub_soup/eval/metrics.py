"""What a number means: a metric's name, its direction and how people read it.

A metric's direction is declared, never guessed from its name: a task reporting
``acc`` or ``f1`` must not be taken for lower-is-better, or greedy would keep
the ingredients that hurt. Each task declares the metrics it reports (as
lm-evaluation-harness's ``register_metric(higher_is_better=...)`` does), and the
built-in ones live in a small registry so tasks and plugins share one definition.

Torch-free: the recipe, the card and the step summary read metrics too.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub_soup.errors import EvalError
from hub_soup.registry import Registry


@dataclass(frozen=True)
class Metric:
    """A named measurement with the direction that makes it better.

    Args:
        name: as reports, cards and the model-index show it.
        higher_is_better: the direction greedy, the comparisons and the worse-soup gate use.
        percent: a fraction in [0, 1] read as a percentage (accuracy, F1): values in percent,
            changes in points; anything else shows 4 significant digits.
        description: one line for people (docs, plugins); not shown in tables.
        dataset: for a score that spans several eval sets (lm-eval's harness tasks), the one this metric
            measures, and ``name`` starts with ``dataset/`` (``arc_easy/acc``); None: the score's own.
        split: that eval set's split, where it is known; None: the score's.
    """

    name: str
    higher_is_better: bool
    percent: bool = False
    description: str = ""
    dataset: str | None = None
    split: str | None = None

    @property
    def measure(self) -> str:
        """What is measured, without the eval set a qualified name starts with: ``acc`` for ``arc_easy/acc``
        (the model-index names the eval set and the metric apart)."""
        return self.name.removeprefix(f"{self.dataset}/") if self.dataset is not None else self.name

    def format(self, value: float) -> str:
        """``value`` as people read it: ``97.50%`` or ``12.34``."""
        return f"{value:.2%}" if self.percent else f"{value:.4g}"

    def format_delta(self, delta: float) -> str:
        """A signed change of this metric: ``+1.25 points`` for percentages, ``-0.3125`` otherwise."""
        return f"{delta * 100:+.2f} points" if self.percent else f"{delta:+.4g}"

    @property
    def direction(self) -> str:
        """``higher`` or ``lower``: which way is better, for messages."""
        return "higher" if self.higher_is_better else "lower"

    def __str__(self) -> str:
        return self.name


_METRICS: Registry[Metric] = Registry(
    "metric", error=EvalError, unknown="no {kind} named {name!r}; registered: {names}",
    taken="{kind} {name!r} is already registered differently: {known}",
    how_to_add="define it with hub_soup.eval.metrics.register_metric(name, higher_is_better=...)",
)


def register_metric(name: str, *, higher_is_better: bool, percent: bool = False, description: str = "") -> Metric:
    """Define a metric once, by name, so every task that reports it agrees on its direction and format.

    Raises:
        EvalError: the name is already defined differently (two meanings of one name would make
            scores of different tasks look comparable when they are not).
    """
    metric = Metric(name, higher_is_better, percent, description)
    _METRICS.register(name, metric)
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric ``name``.

    Raises:
        EvalError: no metric has that name (the hint lists the known ones).
    """
    return _METRICS.get(name)


ACCURACY = register_metric(
    "accuracy", higher_is_better=True, percent=True, description="fraction of examples whose top class is the label"
)
NLL = register_metric(
    "nll", higher_is_better=False, description="mean negative log-likelihood of the label, in nats (the log loss)"
)
PERPLEXITY = register_metric(
    "perplexity", higher_is_better=False, description="exp of the mean negative log-likelihood per predicted token"
)
