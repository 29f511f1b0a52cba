"""mergekit's config format, read as it is onto the one :class:`~hub_soup.recipe.Recipe`.

A YAML file whose top level has ``merge_method`` is a mergekit (0.1.5) config: ``models``
(each a ``model`` and its ``parameters``), ``base_model`` (listed among the models or not),
``merge_method``, global ``parameters``, ``dtype``/``out_dtype`` and ``slices`` (``sources``
with ``model``, ``layer_range`` and ``parameters``, and the slice's ``parameters``). Each
means what mergekit makes of it: the models become ingredients (with their parameters as
their own settings), the slices the recipe's slices. A method that takes no base reads
``base_model`` as mergekit's SLERP does, as its first model (``t = 0``).

A model may be ``model+lora`` (a PEFT LoRA adapter applied to the model before merging, as
mergekit's ``ModelReference`` reads it): the ingredient (or base) with its ``lora``.
``tokenizer_source`` and ``tokenizer`` (``source``, per-token ``tokens`` overrides,
``pad_to_multiple_of``) become the recipe's ``tokenizer`` section, and ``chat_template`` its
``chat_template``, a model they name spelled as the recipe names it (the base as ``base`` where
it has the base's role).

Anything else is refused, named with its line: a key of mergekit's that hub-soup does not do
yet (a token override by ``token_id``) and any key or value mergekit does not know. A parameter that mergekit ignores for
a method (published ``arcee_fusion`` configs carry ``normalize``) is refused too, with a hint
to delete it: the config then says only what made the soup, and the soup is the same.
"""

from __future__ import annotations

from typing import Any

import yaml

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method, method_names

# The keys of a mergekit config hub-soup reads; those it refuses by name, and why.
KEYS = ("models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "slices", "tokenizer_source",
        "tokenizer", "chat_template")
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def is_mergekit(data: object) -> bool:
    """Whether loaded YAML is a mergekit config: a mapping with ``merge_method`` (a recipe's is ``method``)."""
    return isinstance(data, dict) and "merge_method" in data


Location = tuple[int | str, ...]  # a path of keys and indices in a YAML document


def recipe_data(data: dict[str, Any], node: yaml.Node, where: str) -> tuple[dict[str, Any], list[Location]]:
    """The native recipe's data of a mergekit config (``data`` as loaded, ``node`` as composed, for lines),
    and where in the config each of its ingredients is named (:func:`location_in_config`): the models are
    not the ingredients one for one (a listed base is left out, a base that is mergekit's first model moves
    first, slices name models source by source).

    Raises:
        RecipeError: a key or value hub-soup does not read, named with its line.
    """
    def refuse(location: tuple[int | str, ...], message: str, hint: str) -> RecipeError:
        from hub_soup.recipe import _line_of  # the recipe's own line finder

        line = _line_of(node, location)
        return RecipeError(f"{where}:{line}: {message}" if line else f"{where}: {message}", hint=hint)

    for key in data:
        if key not in KEYS:
            raise refuse((key,), f"{key}: not a key of a mergekit config hub-soup reads",
                         hint=f"the keys read: {', '.join(KEYS)}")
    name = data["merge_method"]
    if not isinstance(name, str) or name not in method_names():
        raise refuse(("merge_method",), f"merge_method: {name!r} is not a method hub-soup has",
                     hint=f"methods: {', '.join(method_names())}")
    method = get_method(name)
    takes = set(method.Parameters.model_fields) | {f.alias for f in method.Parameters.model_fields.values() if f.alias}
    takes |= set(method.ingredient_parameters) | ({"weight"} if method.uses_weights else set())
    per_model = set(method.ingredient_parameters) | ({"weight"} if method.uses_weights else set())

    def parameters(value: Any, location: tuple[int | str, ...], allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise refuse(location, f"{'.'.join(map(str, location))}: parameters are a mapping, got {value!r}",
                         hint="write name: value lines")
        for key in value:
            if key not in allowed:
                where_ = ".".join(map(str, (*location, key)))
                ignored = key in takes
                raise refuse(
                    (*location, key),
                    f"{where_}: " + (f"{key} is not a per-model parameter: mergekit ignores it here" if ignored
                                     else f"method {name} takes no parameter {key} (mergekit ignores it)"),
                    hint="delete it: the soup is the same without it" if not ignored
                    else "move it to the slice's or the config's parameters",
                )
        return dict(value)

    def model(value: Any, location: tuple[int | str, ...]) -> str:
        if not isinstance(value, str) or not value.strip():
            raise refuse(location, f"{'.'.join(map(str, location))}: a model is a Hub id or a path, got {value!r}",
                         hint="write model: org/name")
        if value.count("+") > 1 or any(not part.strip() for part in value.split("+")):
            raise refuse(location, f"{'.'.join(map(str, location))}: {value!r} is not a model or a model+lora "
                         "(one LoRA adapter applied to one model)", hint="write model: org/name+org/adapter")
        return value.strip()

    base = model(data["base_model"], ("base_model",)) if data.get("base_model") is not None else None
    uses_base = method.takes_base()  # else the base is mergekit's first model
    refs: list[str] = []
    origins: list[Location] = []  # where each of refs is named first
    own: dict[str, dict[str, Any]] = {}
    if ("models" in data) == ("slices" in data):
        raise refuse(("merge_method",), "a mergekit config gives models or slices (one of them)",
                     hint="list the models, or the slices of layers")
    for index, entry in enumerate(data.get("models") or []):
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"}:
            raise refuse(("models", index), f"models.{index}: an entry is model: and parameters:, got {entry!r}",
                         hint="write - model: org/name")
        ref = model(entry.get("model"), ("models", index, "model"))
        if ref == base and uses_base:  # mergekit leaves a listed base_model out of the models it merges
            continue
        refs.append(ref)
        origins.append(("models", index))
        own[ref] = parameters(entry.get("parameters"), ("models", index, "parameters"), per_model)
    slices: list[dict[str, Any]] = []
    for s, piece in enumerate(data.get("slices") or []):
        if not isinstance(piece, dict) or set(piece) - {"sources", "parameters"} or not piece.get("sources"):
            raise refuse(("slices", s), f"slices.{s}: a slice is sources: (and parameters:)",
                         hint="write - sources: [{model: ..., layer_range: [0, N]}]")
        sources = []
        for k, source in enumerate(piece["sources"]):
            location = ("slices", s, "sources", k)
            if not isinstance(source, dict) or set(source) - {"model", "layer_range", "parameters"}:
                raise refuse(location, f"slices.{s}.sources.{k}: a source is model:, layer_range: (and parameters:)",
                             hint="write - model: org/name")
            ref = model(source.get("model"), (*location, "model"))
            if ref != base and ref not in refs:
                refs.append(ref)
                origins.append(location)
            sources.append({"model": ref, "layer_range": source.get("layer_range"),
                            "parameters": parameters(source.get("parameters"), (*location, "parameters"), per_model)})
        slices.append({"sources": sources,
                       "parameters": parameters(piece.get("parameters"), ("slices", s, "parameters"), takes)})
    if base is not None and not uses_base:  # SLERP's t = 0; one more model to karcher
        origins = [("base_model",), *(o for r, o in zip(refs, origins) if r != base)]
        refs = [base, *(r for r in refs if r != base)]
    ingredients = [{**reference(ref), **({"parameters": own[ref]} if own.get(ref) else {})} for ref in refs]
    recipe: dict[str, Any] = {"ingredients": ingredients, "method": name,
                              "parameters": parameters(data.get("parameters"), ("parameters",), takes)}
    if base is not None and uses_base:
        recipe["base"] = reference(base)
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        spelled = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if spelled not in DTYPES:
            field = "out_dtype" if "out_dtype" in data else "dtype"
            raise refuse((field,), f"{field}: {dtype!r} is not a dtype", hint=f"dtypes: {', '.join(DTYPES)}")
        recipe["dtype"] = spelled
    if data.get("chat_template") is not None:
        template = data["chat_template"]
        if not isinstance(template, str) or not template.strip():
            raise refuse(("chat_template",), f"chat_template: auto, a model or a template, got {template!r}",
                         hint="write chat_template: auto")
        recipe["chat_template"] = "base" if template == base and uses_base else template
    if "tokenizer_source" in data or "tokenizer" in data:
        recipe["tokenizer"] = tokenizer_section(data, refuse, "base" if base is not None and uses_base else None, base)
    if slices:
        numbered = {ref: i for i, ref in enumerate(refs)}
        for piece in slices:
            for source in piece["sources"]:
                ref = source["model"]
                source["model"] = "base" if ref == base and uses_base else numbered[ref]
        recipe["slices"] = slices
    return recipe, origins


def reference(model: str) -> dict[str, Any]:
    """A model of a mergekit config as the recipe names it: ``org/model+org/lora`` (mergekit's
    ``ModelReference``: a LoRA adapter applied to the model before merging) is the model with its ``lora``;
    a ``@revision`` stays on the name it follows."""
    name, _, lora = model.partition("+")
    return {"ref": name.strip(), **({"lora": {"ref": lora.strip()}} if lora else {})}


def tokenizer_section(
    data: dict[str, Any], refuse: Any, base_name: str | None, base: str | None,
) -> dict[str, Any]:
    """The recipe's ``tokenizer`` section of a config's ``tokenizer_source`` or ``tokenizer`` (mergekit's
    ``TokenizerConfig``: ``source`` defaults to ``union`` there too); a model named as the recipe names it."""
    def name(value: Any, location: tuple[int | str, ...]) -> str:
        if not isinstance(value, str) or not value.strip():
            raise refuse(location, f"{'.'.join(map(str, location))}: a tokenizer source is base, union or a model, "
                         f"got {value!r}", hint="write source: union")
        value = value.strip()
        return base_name if base_name is not None and value == base else value

    if "tokenizer_source" in data and "tokenizer" in data:
        raise refuse(("tokenizer_source",), "tokenizer_source and tokenizer: give one (mergekit refuses both)",
                     hint="move the source into tokenizer: {source: ...}")
    if "tokenizer_source" in data:
        return {"source": name(data["tokenizer_source"], ("tokenizer_source",))}
    given = data["tokenizer"]
    if not isinstance(given, dict) or set(given) - {"source", "tokens", "pad_to_multiple_of"}:
        raise refuse(("tokenizer",), "tokenizer: a mapping of source, tokens and pad_to_multiple_of",
                     hint="write tokenizer: {source: union}")
    section: dict[str, Any] = {}
    if "source" in given:
        section["source"] = name(given["source"], ("tokenizer", "source"))
    if given.get("pad_to_multiple_of") is not None:
        section["pad_to_multiple_of"] = given["pad_to_multiple_of"]
    tokens: dict[str, Any] = {}
    for token, entry in (given.get("tokens") or {}).items():
        location = ("tokenizer", "tokens", token)
        source = entry.get("source") if isinstance(entry, dict) else None
        if isinstance(source, dict) and source.get("kind") == "zero":
            spec: dict[str, Any] = {"source": "zero"}
        elif isinstance(source, dict) and source.get("kind") == "model_token" and "token" in source:
            spec = {"source": name(source.get("model"), (*location, "source", "model")), "token": source["token"]}
        elif isinstance(source, str):
            spec = {"source": name(source, (*location, "source"))}
        else:
            raise refuse(location, f"tokenizer.tokens.{token}: a source is a model, {{kind: model_token, model, token}} "
                         f"or {{kind: zero}}, got {source!r}", hint="write source: org/name")
        if entry.get("force"):
            spec["force"] = True
        tokens[token] = spec
    if tokens:
        section["tokens"] = tokens
    return section


def location_in_config(location: Location, data: dict[str, Any], origins: list[Location]) -> Location:
    """Where in the mergekit config a native recipe's field (``location``) comes from, for its line:
    ingredient ``i``'s fields from where it is named (``origins``, from :func:`recipe_data`), its ``ref``
    and ``lora`` being that entry's ``model``."""
    head = location[0] if location else None
    renamed = {"method": ("merge_method",), "base": ("base_model",),
               "dtype": ("out_dtype",) if "out_dtype" in data else ("dtype",)}
    if head in renamed:
        return renamed[head]
    if head == "ingredients" and len(location) > 1 and isinstance(location[1], int) and location[1] < len(origins):
        origin, rest = origins[location[1]], location[2:]
        if origin == ("base_model",):
            return origin
        return (*origin, "model") if rest[:1] in (("ref",), ("lora",)) else (*origin, *rest)  # `model: a+lora`
    return location
