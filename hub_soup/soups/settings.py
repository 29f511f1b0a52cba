"""The recipe's per-tensor parameters and layers, in the plan: gradients, filters, slices.

A recipe's parameters may vary by tensor (mergekit's settings: a gradient over the layers, filters
on the tensor's name), an ingredient (or a slice's source) may set its own, and slices may make the
soup's layers of other layers of other models. All of that is resolved here, once, into the plan the
engine reads (:class:`~hub_soup.merging.plan.TensorPlan`'s ``parameters``, and
:func:`~hub_soup.merging.plan.restack`'s inputs), with mergekit 0.1.5's rules:

- precedence: a slice source's (or an ingredient's) own setting, then the slice's, then the
  recipe's; a setting whose filters match nothing passes to the next, and after the last the
  method's default counts. A parameter the merge shares (``t``, ``lambda``) is read from the
  slice and the recipe only, as mergekit reads it;
- positions: layer ``i`` of a slice of ``n`` layers reads a gradient at ``i / (n - 1)`` (a one-layer
  slice at 1); a tensor outside the layers at 0, with the first slice's settings and sources
  before the layers (embeddings, :func:`before_layers`) and the last's after them (final norm, head);
- filters match the tensor's name as its input holds it (a stacked layer's source layer) for a
  per-ingredient parameter, and the soup's name for a shared one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import (
    BASE,
    Input,
    MergePlan,
    TensorPlan,
    gradient_position,
    layer_of,
    relayer,
    resolve_setting,
    restack,
)
from hub_soup.recipe import Recipe, Slice


@dataclass(frozen=True)
class Place:
    """Where a tensor stands for its settings: the slice whose settings count (``None``: no slices), its
    gradient position, and each input's own parameters (one mapping per input, in order)."""

    slice: Slice | None
    position: float
    own: tuple[Mapping[str, Any], ...]


def resolve_settings(recipe: Recipe, plan: MergePlan) -> MergePlan:
    """The aligned ``plan`` with the recipe's slices stacked (if any) and every merged tensor's parameters
    resolved. A recipe whose parameters are one value each gets its plan back as it is.

    Raises:
        RecipeError: a tensor left without a required parameter, or a slice's layers the models lack.
    """
    if not recipe.varies():
        return plan
    if recipe.slices is None:
        count = layer_count(plan)
        owns = tuple(_ingredient_own(recipe, i) for i in range(plan.ingredients))
        places = {t.key: Place(None, _position(layer_of(t.key), count), owns) for t in plan.tensors}
    else:
        plan, places = _stack(recipe, plan)
    return plan.with_parameters(lambda t: _parameters(recipe, t, places[t.key]))


def layer_count(plan: MergePlan) -> int:
    """How many layers the (aligned) plan's models have: one more than the highest layer a key names."""
    return 1 + max((layer for t in plan.tensors if (layer := layer_of(t.key)) is not None), default=-1)


def _position(layer: int | None, count: int) -> float:
    return gradient_position(layer, count) if layer is not None else 0.0


def _ingredient_own(recipe: Recipe, index: int) -> dict[str, Any]:
    """Ingredient ``index``'s own settings (its fields and its ``parameters``)."""
    ingredient = recipe.ingredients[index]
    return {name: s for name in ("weight", "density", *ingredient.parameters) if (s := ingredient.setting(name)) is not None}


def _stack(recipe: Recipe, plan: MergePlan) -> tuple[MergePlan, dict[str, Place]]:
    """The plan of the slices' layers (:func:`restack`), the tensors outside the layers read from the first
    slice's sources (before the layers) and the last's (after them); and each tensor's place."""
    slices = recipe.slices or []
    count = layer_count(plan)
    layers: list[list[tuple[int, int]]] = []
    where: list[tuple[Slice, int]] = []
    for s, piece in enumerate(slices):
        for k, source in enumerate(piece.sources):
            if source.layer_range[1] > count:
                raise RecipeError(f"slices.{s}.sources.{k}.layer_range: {list(source.layer_range)} is past the "
                                  f"models' {count} layers", hint=f"give layers within [0, {count}]")
        models = [src for src in piece.sources if src.model != "base"]
        if not models:
            raise RecipeError(f"slices.{s}: the slice has only the base as a source",
                              hint="list the models it merges (the base alone is no soup's layer)")
        for offset in range(piece.length):
            layers.append([(int(src.model), src.layers[offset]) for src in models])
            where.append((piece, offset))
    stacked = restack(plan, layers)
    aligned = {t.key: t for t in plan.tensors}
    # a method whose soup of one model means something (task arithmetic of one task vector, a scale) merges a
    # layer of one source too, as mergekit runs the method on every slice; another copies it (the same tensor)
    alone = get_method(recipe.method).min_ingredients == 1
    places: dict[str, Place] = {}
    tensors: list[TensorPlan] = []
    for tensor in stacked.tensors:
        layer = layer_of(tensor.key)
        if layer is None:
            piece = slices[0] if before_layers(tensor.key) else slices[-1]
            sources = [src for src in piece.sources if src.model != "base"]
            inputs = tuple(tensor.input_of(int(src.model)) for src in sources)
            merged = tensor.average and (len(inputs) > 1 or alone)
            tensor = replace(tensor, inputs=inputs if merged else inputs[:1], average=merged,
                             base_input=tensor.base_input if merged else None)
            position = 0.0
        else:
            piece, offset = where[layer]
            sources = [src for src in piece.sources if src.model != "base"]
            position = gradient_position(offset, piece.length)
            template = aligned[relayer(tensor.key, 0)]
            if template.average and (tensor.average or alone):
                tensor = replace(tensor, average=True, base_input=_base_input(template, piece, offset))
        owns = tuple(source.parameters | _ingredient_own(recipe, int(source.model)) for source in sources)
        places[tensor.key] = Place(piece, position, owns)
        tensors.append(tensor)
    return replace(stacked, tensors=tensors), places


def _base_input(template: TensorPlan, piece: Slice, offset: int) -> Input | None:
    """The base's tensor of a slice's layer ``offset``: its own source's layer where the slice names the base,
    else the first source's (``None``: the method uses no base)."""
    if template.base_input is None:
        return None
    source = next((src for src in piece.sources if src.model == "base"), piece.sources[0])
    layer = source.layers[offset]
    return replace(template.base_input, key=relayer(template.base_input.key, layer), layer=layer)


# Names of the tensors a transformer reads before its layers (its embeddings): Llama's embed_tokens, GPT-2's wte
# and wpe, BERT's embeddings. Every other tensor outside the layers (final norm, head) is read after them.
_EMBEDDINGS = ("embed", "wte", "wpe")


def before_layers(key: str) -> bool:
    """Whether ``key``, a tensor outside the layers, is read before them (an embedding), as mergekit's
    architectures say: it then takes the first slice's sources and settings, else the last's. (Files list
    tensors in any order: ``lm_head`` sorts before ``model.layers``.)"""
    return any(name in key for name in _EMBEDDINGS)


def _parameters(recipe: Recipe, tensor: TensorPlan, place: Place) -> dict[str, Any]:
    """One merged tensor's parameters: the shared ones at its place, and a list of each per-ingredient one."""
    method = get_method(recipe.method)
    per_input = (*method.ingredient_parameters, *(("weight",) if method.uses_weights else ()))
    defaults = {field.alias or name: field for name, field in method.Parameters.model_fields.items()}
    piece = place.slice.parameters if place.slice is not None else {}
    resolved: dict[str, Any] = {}
    shared = [n for n in dict.fromkeys([*recipe.parameters, *piece]) if n not in per_input]
    for name in shared:
        value = _first([piece.get(name), recipe.parameters.get(name)], tensor.key, place.position)
        resolved[name] = value if value is not None else _default(name, defaults, tensor.key)
    for name in per_input:
        if not any(name in own for own in place.own) and name not in piece and name not in recipe.parameters:
            continue
        values = []
        for own, each in zip(place.own, tensor.inputs):
            key = each.key if each.ingredient != BASE else tensor.key
            value = _first([own.get(name), piece.get(name), recipe.parameters.get(name)], key, place.position)
            if value is None:
                value = method.default_weight if name == "weight" else _default(name, defaults, tensor.key)
                if value is None:
                    raise RecipeError(f"{tensor.key}: no weight for an input of it ({each.key})",
                                      hint=f"give weight on every model, or a default in parameters (method {method.name})")
            values.append(value)
        resolved[name] = values
    return resolved


def _first(settings: Sequence[Any], key: str, position: float) -> Any:
    """The first setting, in precedence order, that gives ``key`` a value (``None``: none does)."""
    for setting in settings:
        if setting is not None and (value := resolve_setting(setting, key, position)) is not None:
            return value
    return None


def _default(name: str, fields: Mapping[str, Any], key: str) -> Any:
    """The method's default of parameter ``name``, where no setting gives tensor ``key`` a value."""
    field = fields.get(name)
    if field is None or field.is_required():
        raise RecipeError(f"{key}: no value of parameter {name} for this tensor (no filter of it matches)",
                          hint=f"add a default, {{value: ...}} without a filter, to {name}'s filters")
    return field.default


# The config fields that count a transformer's layers (Llama, Mistral, Qwen: num_hidden_layers; GPT-2: n_layer).
LAYER_COUNTS = ("num_hidden_layers", "n_layer")


def stacked_config(config: dict[str, Any] | None, recipe: Recipe) -> None:
    """``config`` (the soup's config.json, changed in place) as a soup of the recipe's slices says it: its
    layer count, and every per-layer list (Qwen's ``layer_types``, ...) made of the entries of the layers
    each output layer is taken from (its first model's)."""
    if config is None or not recipe.slices:
        return
    sources = [source.layers[offset] for piece in recipe.slices for offset in range(piece.length)
               for source in piece.sources[:1]]
    for name in LAYER_COUNTS:
        if isinstance(config.get(name), int):
            count = config[name]
            for key, value in config.items():
                if isinstance(value, list) and len(value) == count and count != len(sources):
                    config[key] = [value[layer] for layer in sources]
            config[name] = len(sources)
