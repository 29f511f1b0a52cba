"""The one code path from a :class:`~hub_soup.recipe.Recipe` to a soup on disk (and on the Hub).

Stages run in order and data only flows down: resolve -> (remote headers ->
align early) -> fetch -> read -> align -> [evaluate] -> merge/write -> card ->
push. Every check that can fail on the user's input runs before the expensive
stages: the output folder, the push token, the alignment (from headers over
HTTP when possible), so a mistake costs seconds, not a download.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hub_soup import card as card_stage
from hub_soup.align import Layout, MergePlan, align
from hub_soup.errors import WorseSoupError
from hub_soup.evaluate import Evaluator
from hub_soup.fetch import fetch, remote_layout
from hub_soup.greedy import GreedyReport, greedy_soup, score_soup
from hub_soup.merge import (
    MergeStats,
    aligned_state_dict,
    merged_state_dict,
    normalize_weights,
    output_metas,
    stream_merge,
    write_state_dict,
)
from hub_soup.push import PushResult, check_push_access, push_soup
from hub_soup.read import Checkpoint, open_checkpoint
from hub_soup.recipe import Ingredient, Recipe
from hub_soup.resolve import ResolvedRef, resolve_ref
from hub_soup.safetensors_io import parse_size
from hub_soup.similarity import GramAccumulator, Similarity, weight_similarity
from hub_soup.write import SoupWriter, check_destination

logger = logging.getLogger(__name__)

# Elements of each tensor the shared-initialization check reads during a merge.
SIMILARITY_SAMPLE = 1 << 16

INDEPENDENT_WARNING = (
    "ingredients {pairs} look like independent trainings (weight cosine similarity {cos:.2f} < 0.5): "
    "averaging models that do not share an initialization usually collapses; see `hub-soup diagnose`"
)


@dataclass
class SoupResult:
    """Everything a run did, for the CLI summary, the step summary and Python callers."""

    output: Path
    ingredients: list[ResolvedRef]
    kept: list[bool]
    weights: list[float]  # normalised, one per kept ingredient
    plan: MergePlan
    stats: MergeStats
    similarity: Similarity | None
    pinned_recipe: Recipe
    scores: list[card_stage.Score] = field(default_factory=list)
    report: GreedyReport | None = None  # ingredient scores, greedy steps, the evaluated soup
    push: PushResult | None = None
    warnings: list[str] = field(default_factory=list)


def run(recipe: Recipe, *, token: str | bool | None = None) -> SoupResult:
    """Make the soup a recipe describes; see the module docstring for the stages.

    Args:
        recipe: a validated recipe (from flags, YAML or Python).
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the logged-in one. Never stored.
    """
    output = Path(recipe.output.path)
    check_destination(output, recipe.output.overwrite)
    if recipe.push is not None:
        check_push_access(recipe.push, token)
    resolved = [resolve_ref(i.ref, i.revision, token=token) for i in recipe.ingredients]
    for ref in resolved:
        logger.info("resolved %s -> %s", ref.ref, ref.pinned)
    _align_early(resolved, recipe, token)
    checkpoints = open_ingredients(resolved, allow_pickle=recipe.allow_pickle, ema=recipe.ema, token=token)
    try:
        return _make_soup(recipe, resolved, checkpoints, output, token)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()


def _align_early(resolved: Sequence[ResolvedRef], recipe: Recipe, token: str | bool | None) -> None:
    """Align from safetensors headers over HTTP, before any download, when every ingredient allows it."""
    remote = [r for r in resolved if r.kind != "local"]
    if not remote:
        return  # local files are aligned right after opening, which reads headers only
    layouts: list[Layout] = []
    for ref in resolved:
        if ref.kind == "local":
            with open_checkpoint(ref.path, label=ref.label, allow_pickle=recipe.allow_pickle, ema=recipe.ema) as ckpt:
                layouts.append(Layout(ckpt.label, ckpt.metas, tuple(ckpt.aliases)))
        else:
            layout = remote_layout(ref, token)
            if layout is None:
                return  # pickled weights: checked after download
            layouts.append(layout)
    align(layouts, recipe.exclude)
    logger.info("headers align across %d ingredients; downloading", len(layouts))


def open_ingredients(
    resolved: Sequence[ResolvedRef], *, allow_pickle: bool, ema: bool, token: str | bool | None
) -> list[Checkpoint]:
    """Fetch (Hub) and open (all) ingredients; on failure, close what was opened."""
    checkpoints: list[Checkpoint] = []
    try:
        for ref in resolved:
            if ref.kind == "local":
                assert ref.path is not None
                checkpoint = open_checkpoint(ref.path, label=ref.label, allow_pickle=allow_pickle, ema=ema)
            else:
                fetched = fetch(ref, token)
                checkpoint = open_checkpoint(
                    fetched.weights, label=ref.label, allow_pickle=allow_pickle, ema=ema, sidecars=fetched.sidecars
                )
            for note in checkpoint.notes:
                logger.info("%s: %s", checkpoint.label, note)
            checkpoints.append(checkpoint)
    except BaseException:
        for checkpoint in checkpoints:
            checkpoint.close()
        raise
    return checkpoints


def layouts_of(checkpoints: Sequence[Checkpoint]) -> list[Layout]:
    """What alignment needs of opened checkpoints."""
    return [Layout(c.label, c.metas, tuple(c.aliases)) for c in checkpoints]


def _make_soup(
    recipe: Recipe, resolved: list[ResolvedRef], checkpoints: list[Checkpoint], output: Path, token: str | bool | None
) -> SoupResult:
    plan = align(layouts_of(checkpoints), recipe.exclude)
    for note in plan.notes:
        logger.info(note)
    warnings: list[str] = []
    weights = normalize_weights(recipe.weights, len(checkpoints))
    device = device_for(recipe.device)
    report = _evaluate(recipe, checkpoints, plan, weights, device) if recipe.eval is not None else None
    kept = report.kept if report is not None else [True] * len(checkpoints)
    if recipe.greedy:  # a greedy soup is the uniform average of what it kept
        weights = [1 / sum(kept)] * len(checkpoints)
    kept_weights = [w for w, k in zip(weights, kept) if k]
    logger.info("weights: %s", ", ".join(f"{c.label}={w:.4f}" for c, w, k in zip(checkpoints, weights, kept) if k))
    if report is not None and report.comparison.soup_is_worse:
        warnings.append(report.comparison.message())
        logger.warning(warnings[-1])
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    pinned = pin_recipe(recipe, resolved)
    config = _soup_config(checkpoints[0], recipe.dtype)
    scores = _card_scores(report) if report is not None else []
    card = card_stage.build_card(
        repo_id=recipe.push.repo_id if recipe.push else None,
        name=output.name,
        ingredients=resolved,
        weights=kept_weights,
        kept=kept,
        config=config,
        recipe_yaml=pinned.to_yaml(),
        license=recipe.push.license if recipe.push else None,
        tags=recipe.push.tags if recipe.push else (),
        scores=scores,
        method="greedy" if recipe.greedy else recipe.method,
        bn_recalibrated=report is not None and report.bn_recalibrated,
    )
    metas = output_metas(plan, dtype)
    with SoupWriter(output, metas, parse_size(recipe.output.max_shard_size), recipe.output.overwrite) as writer:
        if report is not None:  # write exactly the soup that was scored (BN statistics recalibrated or not)
            stats = write_state_dict(report.soup, plan, metas, writer)
            similarity = weight_similarity(checkpoints, plan, sample_per_tensor=SIMILARITY_SAMPLE)
        else:  # the shared-initialization check rides along the merge's own reads
            gram = GramAccumulator(len(checkpoints), SIMILARITY_SAMPLE)
            stats = stream_merge(checkpoints, plan, weights, writer, dtype=dtype, device=device, gram=gram)
            similarity = gram.similarity([c.label for c in checkpoints])
        pairs = similarity.independent_pairs()
        if pairs:
            worst = min(similarity.cosine[i][j] for i, j in pairs)
            warnings.append(INDEPENDENT_WARNING.format(pairs=", ".join(f"{i}&{j}" for i, j in pairs), cos=worst))
            logger.warning(warnings[-1])
        for sidecar in checkpoints[0].sidecars:
            if sidecar.name == "config.json" and config is not None:
                writer.add_file("config.json", json.dumps(config, indent=2) + "\n")
            else:
                writer.add_file(sidecar.name, sidecar)
        writer.add_file(card_stage.RECIPE_FILENAME, pinned.to_yaml())
        writer.add_file("README.md", str(card))
        writer.commit()
    result = SoupResult(
        output=output, ingredients=resolved, kept=kept, weights=kept_weights, plan=plan, stats=stats,
        similarity=similarity, pinned_recipe=pinned, scores=scores, report=report, warnings=warnings,
    )
    if recipe.push is not None:
        if report is not None and report.comparison.soup_is_worse and not recipe.force:
            raise WorseSoupError(
                f"not pushing to {recipe.push.repo_id}: {report.comparison.message()}; the soup was written to {output}",
                hint="try greedy: true (--greedy) to keep only ingredients that help"
                + (", or recalibrate_bn (--recalibrate-bn N) for BatchNorm networks" if _has_bn(plan) else "")
                + "; --force pushes it anyway",
            )
        names = ", ".join(r.label for r, k in zip(resolved, kept) if k)
        method = "greedy" if recipe.greedy else recipe.method
        result.push = push_soup(output, recipe.push, token, f"hub-soup: {method} soup of {names}")
    return result


def _evaluate(
    recipe: Recipe, checkpoints: Sequence[Checkpoint], plan: MergePlan, weights: Sequence[float], device: torch.device
) -> GreedyReport:
    """Score every ingredient and the soup (greedy or not), with optional BN recalibration."""
    assert recipe.eval is not None
    evaluator = Evaluator(recipe.eval, checkpoints[0], device=device)
    test_evaluator = (
        Evaluator(recipe.eval, checkpoints[0], split=recipe.eval.test_split, device=device)
        if recipe.eval.test_split
        else None
    )
    labels = [c.label for c in checkpoints]

    def load(i: int) -> dict[str, torch.Tensor]:
        return aligned_state_dict(checkpoints[i], plan, i)

    options = {
        "recalibrate_bn_batches": recipe.recalibrate_bn,
        "test_evaluator": test_evaluator,
        "ensemble": recipe.ensemble_reference,
    }
    if recipe.greedy:
        average_keys = {t.key for t in plan.tensors if t.average}
        report = greedy_soup(labels, load, evaluator, average_keys=average_keys, **options)
    else:
        soup = merged_state_dict(checkpoints, plan, weights)
        report = score_soup(labels, load, soup, evaluator, method=recipe.method, **options)
    return report


def _card_scores(report: GreedyReport) -> list[card_stage.Score]:
    """The soup's and each ingredient's scores, held-out split first, then the test split."""
    soup = report.soup_score
    scores = [card_stage.Score("soup", soup.metric, soup.value, soup.split, soup.dataset)]
    scores += [card_stage.Score(label, s.metric, s.value, s.split, s.dataset)
               for label, s in zip(report.labels, report.ingredient_scores)]
    for name, s in (report.test_scores or {}).items():
        scores.append(card_stage.Score(name, s.metric, s.value, s.split, s.dataset))
    return scores


def _has_bn(plan: MergePlan) -> bool:
    return any(t.key.endswith("running_var") for t in plan.tensors)


def _soup_config(first: Checkpoint, dtype: str | None) -> dict[str, Any] | None:
    """The first ingredient's config.json, its dtype field updated when ``--dtype`` changes it."""
    config = first.config
    if config is not None and dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
    return config


def device_for(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU falls back to CPU with a warning."""
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        logger.warning("--device cuda: no CUDA device is available; accumulating on the CPU")
    return torch.device("cpu")


def pin_recipe(recipe: Recipe, resolved: Sequence[ResolvedRef]) -> Recipe:
    """The recipe with every Hub ingredient pinned to the commit it resolved to.

    Run-time switches that do not change the soup (``overwrite``) are reset, so the
    same soup always carries the same recipe file (and a re-push changes nothing).
    """
    ingredients = [
        Ingredient(ref=r.ref.removeprefix("hf-hub:").rsplit("@", 1)[0] if r.kind != "local" else i.ref,
                   revision=r.sha if r.kind != "local" else None, weight=i.weight)
        for i, r in zip(recipe.ingredients, resolved)
    ]
    output = recipe.output.model_copy(update={"overwrite": False})
    return recipe.model_copy(update={"ingredients": ingredients, "output": output})
