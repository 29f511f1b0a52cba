"""Writing: the soup of the kept ingredients, as its kind writes it, with its side files, its pinned
recipe and its card, all or nothing (:class:`~hub_soup.io.write.SoupWriter`).

The run's result is made here, before the card: the card renders it, as the CLI and the step
summary will.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub_soup.eval.greedy import GreedyReport
from hub_soup.hub.card import build_card
from hub_soup.io.read import Checkpoint
from hub_soup.io.sizes import parse_size
from hub_soup.io.write import MERGEKIT_CONFIG, RECIPE_FILENAME, SoupWriter
from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.similarity import SHARED_INIT_COSINE, Similarity
from hub_soup.pipeline.scoring import scores_of
from hub_soup.recipe import Recipe
from hub_soup.report import SoupResult
from hub_soup.soups import Soup, SoupKind

logger = logging.getLogger(__name__)

INDEPENDENT_WARNING = (
    "ingredients {pairs} look like independent trainings (weight cosine similarity {cos:.2f} < "
    f"{SHARED_INIT_COSINE}): "
    "averaging models that do not share an initialization usually collapses; see `hub-soup diagnose`"
)


def write_soup(
    recipe: Recipe, kind: SoupKind[Any], soup: Soup, report: GreedyReport | None, pinned: Recipe, output: Path
) -> SoupResult:
    """Write the soup greedy kept (every ingredient, unscored) into ``output``; what was written."""
    kept = report.kept if report is not None else [True] * len(soup.checkpoints)
    members = [i for i, k in enumerate(kept) if k]
    weights = kept_weights(recipe, soup.method, soup.checkpoints, kept)
    warnings: list[str] = []

    def warn(message: str) -> None:  # said now, and carried by the card
        warnings.append(message)
        logger.warning(message)

    if report is not None and report.comparison.soup_is_worse:
        warn(report.comparison.message())
    if report is not None and report.below_base_warning is not None:  # warned, not gated (see the gate)
        warn(report.below_base_warning)
    made = kind.output(soup, members, weights, report)
    shard_size = (
        parse_size(recipe.output.max_shard_size) if made.sharded else sum(m.nbytes for m in made.metas.values()) + 1
    )
    with SoupWriter(output, made.metas, shard_size, recipe.output.overwrite, stem=made.stem) as writer:
        stats, similarity = made.write(writer)
        if (independent := independence_warning(similarity)) is not None:
            warn(independent)
        for name, content in made.files.items():
            writer.add_file(name, content)
        result = SoupResult(
            output=output, ingredients=kind.models.ingredients, base=kind.models.base, kept=kept, weights=weights,
            plan=made.plan, stats=stats, similarity=similarity, pinned_recipe=pinned, method=soup.method,
            combined=made.combined, base_role=made.base_role, adapter_card=made.card, vocabulary=made.vocabulary,
            scores=scores_of(report) if report is not None else [], report=report, warnings=warnings,
        )
        writer.add_file(RECIPE_FILENAME, pinned.to_yaml())
        if pinned.mergekit_config is not None:  # as mergekit's own soups carry it: the Hub and its users know it
            writer.add_file(MERGEKIT_CONFIG, pinned.mergekit_config)
        writer.add_file("README.md", str(build_card(result, config=made.config)))
        writer.commit()
    return result


def kept_weights(
    recipe: Recipe, method: MergeMethod, checkpoints: Sequence[Checkpoint], kept: Sequence[bool]
) -> list[float]:
    """The weight of each kept ingredient, as the method used it (normalised by an average; a greedy soup
    weighs what it kept equally), logged."""
    weights = [1 / sum(kept)] * len(kept) if recipe.greedy else method.weights_for(len(kept))
    logger.info("weights: %s", ", ".join(f"{c.label}={w:.4f}" for c, w, k in zip(checkpoints, weights, kept) if k))
    return [w for w, k in zip(weights, kept) if k]


def independence_warning(similarity: Similarity | None) -> str | None:
    """What to say when the ingredients' weights look like independent trainings (None when they do not, or
    when their similarity was not measured)."""
    pairs = similarity.independent_pairs() if similarity is not None else []
    if similarity is None or not pairs:
        return None
    worst = min(similarity.cosine[i][j] for i, j in pairs)
    return INDEPENDENT_WARNING.format(pairs=", ".join(f"{i}&{j}" for i, j in pairs), cos=worst)
