"""The run's result: what was made, of what, by which method, how it scored and where it went.

One object, three views that read the same fields: the CLI's closing lines
(:func:`hub_soup.cli.run.closing_lines`), the model card (:func:`hub_soup.hub.card.build_card`)
and the GitHub step summary (:func:`hub_soup.summary.markdown_summary`). What differs by kind of
soup (the words for what was done to its tensors, the base's role, an adapter's card section)
is set by the kind, so no view asks what kind it was.

Nothing here imports torch: a failed run writes its step summary without the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from hub_soup.eval.greedy import GreedyReport
    from hub_soup.eval.score import Score
    from hub_soup.hub.push import PushResult
    from hub_soup.hub.resolve import ResolvedRef
    from hub_soup.merging.engine import MergeStats
    from hub_soup.merging.methods import MergeMethod
    from hub_soup.merging.plan import MergePlan
    from hub_soup.merging.similarity import Similarity
    from hub_soup.merging.vocab import Vocabulary
    from hub_soup.recipe import Recipe


class ModelScore(NamedTuple):
    """A score with the model it belongs to (``soup``, ``ensemble`` or an ingredient's label): a card row."""

    model: str
    score: Score


def score_rows(scores: Sequence[ModelScore]) -> list[str]:
    """Markdown rows ``| model | split | metric | value |`` for the card and the step summary:
    every metric of every score, each score's primary first (a metric of one of several eval sets in its own split)."""
    return [
        f"| {model} | {metric.split or score.split} | {metric.name} | {value:.4f} |"
        for model, score in scores
        for metric, value in score.measurements()
    ]


@dataclass(frozen=True)
class AdapterCard:
    """What the card of a LoRA adapter soup says: it is an adapter of its base (``base_model_relation:
    adapter``, ``library_name: peft``), or, ``merged``, the base with the adapters merged in (``merge``).
    ``summary`` replaces the card's first paragraph, which for other soups speaks of averaged tensors."""

    merged: bool
    summary: str
    task_type: str | None = None  # the adapters' PEFT task_type (CAUSAL_LM...): the pipeline tag the card gives


@dataclass
class SoupResult:
    """Everything a run did, for the CLI, the card, the step summary and Python callers.

    Attributes:
        output: the soup's folder; None when the soup was staged for a push and removed after it.
        ingredients: every ingredient, pinned, in recipe order (a greedy soup's left-out ones too).
        base: a method's base, or the model LoRA adapters were trained on, pinned.
        kept: which ingredients went into the soup.
        weights: as the method used them (normalised by an average), one per kept ingredient.
        plan: the written tensors: what each is made of.
        similarity: the ingredients' weight similarity, where it was measured (full models).
        pinned_recipe: the recipe the soup carries.
        method: the merge method, with its parameters, as it made the soup.
        combined: what was done to the soup's floating tensors, in the closing line's words (``averaged``,
            ``merged by ties``, ``combined from the adapters' deltas``).
        base_role: what the base is to this soup.
        adapter_card: the card's section of a soup of LoRA adapters (None: a merge of full models).
        scores: the soup's, each ingredient's and the base's, held-out split first.
        report: ingredient scores, greedy steps, the evaluated soup (None unscored).
        push: where it was pushed (None when it was not).
        warnings: what the run warned about.
        vocabulary: the soup's vocabulary, where the ingredients' differ (None: one vocabulary, rows as stored).
    """

    output: Path | None
    ingredients: list[ResolvedRef]
    base: ResolvedRef | None
    kept: list[bool]
    weights: list[float]
    plan: MergePlan
    stats: MergeStats
    similarity: Similarity | None
    pinned_recipe: Recipe
    method: MergeMethod
    combined: str
    base_role: str = "the ingredients' common start"
    adapter_card: AdapterCard | None = None
    scores: list[ModelScore] = field(default_factory=list)
    report: GreedyReport | None = None
    push: PushResult | None = None
    warnings: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None

    @property
    def method_title(self) -> str:
        """How the card, the score table and the commit name the soup's method (:func:`method_title`)."""
        return method_title(self.pinned_recipe)

    @property
    def bn_recalibrated(self) -> bool:
        """The soup's BatchNorm statistics were recomputed on eval data (because that scored higher)."""
        return self.report is not None and self.report.bn_recalibrated


def method_title(recipe: Recipe) -> str:
    """How a soup's method is named: ``greedy`` for a greedy uniform soup, ``greedy model_stock`` when greedy
    chose the ingredients another method combined, else the method's name."""
    if not recipe.greedy:
        return recipe.method
    return "greedy" if recipe.method == "uniform" else f"greedy {recipe.method}"
