"""Pinning: the recipe a soup carries, so that it rebuilds bit for bit from anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from hub_soup.hub.resolve import ResolvedRef
from hub_soup.ingredients import Models
from hub_soup.recipe import ModelRef, Recipe, Reference

R = TypeVar("R", bound=Reference)  # an ingredient, the base, or the LoRA adapter applied to one


def pin_recipe(recipe: Recipe, resolved: Models[ResolvedRef], soup: Path | None = None) -> Recipe:
    """The recipe the soup carries: every Hub ingredient (and the base, and the LoRA adapters applied to them)
    pinned to the commit it resolved to.

    Local paths are written relative to the soup folder ``soup`` (absolute when the
    soup is not kept: :meth:`~hub_soup.recipe.Recipe.with_paths_for`), so the recipe
    rebuilds from wherever the folder is read. The
    output path is left out: a rebuild goes where its runner says (``-o``), or to
    the Hub. Run-time switches (``overwrite``) are reset too, so the same soup
    always carries the same recipe file (and a re-push changes nothing).
    """
    located = recipe.with_paths_for(soup, [ref.kind == "local" for ref in resolved])

    def pinned(model: R, ref: ResolvedRef) -> R:
        if isinstance(model, ModelRef) and model.lora is not None and ref.lora is not None:
            model = model.model_copy(update={"lora": pinned(model.lora, ref.lora)})  # the adapter's commit too
        if ref.kind == "local":
            return model
        return model.model_copy(update={"ref": ref.ref.removeprefix("hf-hub:").rsplit("@", 1)[0], "revision": ref.sha})

    ingredients = [pinned(i, r) for i, r in zip(located.ingredients, resolved.ingredients)]
    output = recipe.output.model_copy(update={"path": None, "overwrite": False})
    update: dict[str, Any] = {"ingredients": ingredients, "output": output, "parameters": recipe.pinned_parameters()}
    if resolved.base is not None:  # a method's base, or LoRA adapters' (never both: theirs is a method without one)
        field = "adapter_base" if located.adapter_base is not None else "base"
        update[field] = pinned(getattr(located, field), resolved.base)
    return located.model_copy(update=update)
