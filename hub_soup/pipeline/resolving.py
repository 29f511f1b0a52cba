"""Resolving: every model the recipe names located and pinned (a Hub repo at a commit, a local path),
as one :class:`~hub_soup.ingredients.Models` value, an ingredient that is the base left out.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from hub_soup.adapters.config import check_applied, with_adapter_weights
from hub_soup.errors import RecipeError
from hub_soup.hub.resolve import ResolvedRef, resolve_ref
from hub_soup.ingredients import Models
from hub_soup.merging.methods import get_method
from hub_soup.recipe import ModelRef, Recipe

logger = logging.getLogger(__name__)


def resolve_models(recipe: Recipe, token: str | bool | None) -> tuple[Recipe, Models[ResolvedRef]]:
    """The recipe's ingredients and base, resolved (relative paths from the recipe's folder), and the recipe
    and its models without an ingredient that is the base (:func:`without_listed_base`)."""
    resolved = Models[ModelRef](list(recipe.ingredients), recipe.base).map(
        lambda model: resolve_model(model, token, recipe.base_dir)
    )
    for ref in resolved:
        logger.info("resolved %s -> %s", ref.ref, ref.pinned)
    return without_listed_base(recipe, resolved)


def resolve_model(model: ModelRef, token: str | bool | None, base_dir: Path) -> ResolvedRef:
    """One model resolved, and the LoRA adapter applied to it (``lora``) resolved the same way, its
    ``adapter_config.json`` read (a few kB) and checked to be a LoRA hub-soup applies: a missing or
    unsupported adapter stops the run before any weights are downloaded."""
    resolved = resolve_ref(model.ref, model.revision, token=token, base=base_dir)
    if model.lora is None:
        return resolved
    lora = resolve_ref(model.lora.ref, model.lora.revision, token=token, base=base_dir)
    check_applied(lora, token)
    return replace(resolved, lora=with_adapter_weights(lora))


def without_listed_base(recipe: Recipe, resolved: Models[ResolvedRef]) -> tuple[Recipe, Models[ResolvedRef]]:
    """The recipe and its resolved models with every ingredient that is the base left out.

    mergekit's configs, and the habits of its users, list ``base_model`` among ``models``, and mergekit
    leaves it out of the task vectors (its task vector would be zero). Kept, it would count as a
    fine-tune: a zero task vector halves a normalised task arithmetic and pulls Model Stock towards the
    base. So an ingredient that resolves to the base (the same Hub repo and commit, or the same local
    file or folder) is not an ingredient, and the soup (its pinned recipe and card too) is bit for bit
    the soup of the same command without it listed.

    Raises:
        RecipeError: fewer ingredients are left than the method merges.
    """
    method = get_method(recipe.method)
    base = resolved.base
    if base is None:
        return recipe, resolved
    listed = [i for i, ref in enumerate(resolved.ingredients) if same_model(ref, base)]
    if not listed:
        return recipe, resolved
    names = ", ".join(repr(recipe.ingredients[i].ref) for i in listed)
    kept = [i for i in range(len(resolved.ingredients)) if i not in listed]
    if len(kept) < method.min_ingredients:
        raise RecipeError(
            f"ingredient {names} is the base ({base.pinned}), which is not an ingredient of a soup (as mergekit "
            f"leaves base_model out of the task vectors); that leaves {len(kept)}, and method {method.name} "
            f"needs at least {method.min_ingredients}",
            hint=f"list at least {method.min_ingredients} fine-tunes of the base besides it",
        )
    logger.info("%s %s the base (%s): left out of the ingredients, as mergekit leaves base_model out of the task "
                "vectors", names, "is" if len(listed) == 1 else "are", base.pinned)
    return recipe.with_ingredients(kept), Models([resolved.ingredients[i] for i in kept], base)


def same_model(a: ResolvedRef, b: ResolvedRef) -> bool:
    """Whether two resolved refs are the same bytes: one Hub repo at one commit (and weights file), or one
    local file or folder (symlinks resolved), with the same LoRA adapter applied, or none."""
    if (a.lora is not None or b.lora is not None) and (  # a model with an adapter applied is another model
            a.lora is None or b.lora is None or not same_model(a.lora, b.lora)):
        return False
    if a.kind == "local" or b.kind == "local":
        return a.path is not None and b.path is not None and a.path.resolve() == b.path.resolve()
    return (a.repo_id, a.sha, a.filename) == (b.repo_id, b.sha, b.filename)
