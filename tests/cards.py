"""Cards of results made by hand: the card is a view of a run's result, so a test of what a card says builds the
result a run would have made (without making a soup)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from hub_soup.hub.card import build_card
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.merging.engine import MergeStats
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import MergePlan
from hub_soup.recipe import Recipe
from hub_soup.report import AdapterCard, SoupResult
from hub_soup.soups.adapter import BASE_ROLE


def card_of(
    ingredients: Sequence[ResolvedRef], weights: Sequence[float], *, base: ResolvedRef | None = None,
    method: str = "uniform", parameters: dict[str, Any] | None = None, repo_id: str | None = None,
    name: str = "soup", config: dict[str, Any] | None = None, adapter: AdapterCard | None = None,
) -> ModelCard:
    """The card of a soup of every one of ``ingredients`` (and ``base``: a method's, or the adapters' with
    ``adapter``), pushed to ``repo_id`` or kept in a folder called ``name``; no tensors (an empty plan)."""
    uses_weights = get_method(method).uses_weights
    based = {"adapter_base" if adapter is not None else "base": {"ref": base.ref}} if base is not None else {}
    recipe = Recipe.from_refs(
        [ref.ref for ref in ingredients], list(weights) if uses_weights else None, method=method,
        parameters=parameters or {}, push={"repo_id": repo_id} if repo_id else None, **based,
    )
    result = SoupResult(
        output=Path(name), ingredients=list(ingredients), base=base, kept=[True] * len(ingredients),
        weights=list(weights), plan=MergePlan([]), stats=MergeStats(0, 0, 0, 0, 0, 0, 0.0), similarity=None,
        pinned_recipe=recipe, method=recipe.merge_method(), combined="averaged",
        **({"base_role": BASE_ROLE, "adapter_card": adapter} if adapter is not None else {}),
    )
    return build_card(result, config=config)
