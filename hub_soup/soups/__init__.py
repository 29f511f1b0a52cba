"""Kinds of soup, one file each, behind one interface (:class:`~hub_soup.soups.kind.SoupKind`).

``full.py``: full models merged by the recipe's method; ``adapter.py``: LoRA adapters of one base,
written as an adapter or merged into their base. :func:`choose_kind` picks one, once per run.
"""

from __future__ import annotations

from typing import Any

from hub_soup.adapters.config import read_adapters
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.ingredients import Models
from hub_soup.recipe import Recipe
from hub_soup.soups.adapter import Adapter, MergedIntoBase
from hub_soup.soups.full import Full
from hub_soup.soups.kind import Output, Scorers, Soup, SoupKind

__all__ = ["Output", "Scorers", "Soup", "SoupKind", "choose_kind"]


def choose_kind(recipe: Recipe, resolved: Models[ResolvedRef], token: str | bool | None) -> SoupKind[Any]:
    """The kind of soup the resolved ingredients make, its early checks done: LoRA adapters (found by their
    ``adapter_config.json``, read here: a few kB each, no weights) or full models.

    Raises:
        HubSoupError: adapters mixed with full models, adapters that cannot make one soup, or a recipe field
            the kind does not take (each kind's own message).
    """
    configs = read_adapters(resolved.ingredients, token)
    if configs is None:
        return Full(recipe, resolved)
    kind = MergedIntoBase if recipe.output.merge_into_base else Adapter
    return kind(recipe, resolved.ingredients, configs, token)
