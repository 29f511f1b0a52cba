"""The recipe: one validated description of a soup, built by every entry point.

The CLI turns its flags into a :class:`Recipe`, ``hub-soup run`` reads one from
YAML, the GitHub Action passes a file, and the Python API builds one from its
arguments; all of them then call :func:`hub_soup.pipeline.run`. Validation
happens here, before anything is downloaded, with the field's path in every
message. Secrets (the Hub token) never live in a recipe, and neither does
trust: a recipe may name code (``eval.function``), but only the person running
it can allow that code to run (``--trust-remote-code``).

Local paths in a recipe *file* (ingredient paths, ``eval.data``, an
``eval.function`` file, ``output.path``) are relative to the file, not to
wherever the command runs, so a recipe travels with what it names: the pinned
``hub-soup.yaml`` inside a soup rebuilds it from any working directory.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema

from hub_soup.dialects import mergekit
from hub_soup.errors import RecipeError
from hub_soup.eval.spec import Dtype, EvalSpec
from hub_soup.eval.tasks import get_task
from hub_soup.io.sizes import parse_size
from hub_soup.merging import methods
from hub_soup.merging.methods import MergeMethod, get_method
from hub_soup.merging.vocab import TokenizerChoice, TokenSetting

# Where to merge and score: N is a GPU's index as torch spells it (cuda:01 is no device to torch). A pattern,
# not choices: ``--device`` checks with check_device and lists DEVICE_FORMS, so flags and recipes agree still.
DEVICE_FORMS = ("cpu", "cuda", "cuda:N", "auto")
_DEVICE = re.compile(r"cpu|cuda(?::(?:0|[1-9][0-9]*))?|auto")


def check_device(value: object) -> str:
    """``value`` if it is a device a recipe takes (:data:`DEVICE_FORMS`); whether this machine has that
    GPU is :func:`hub_soup.pipeline.device_for`'s question, asked where torch is imported.

    Raises:
        ValueError: anything else, in words naming the value and the forms taken.
    """
    if not isinstance(value, str) or _DEVICE.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a device: use {', '.join(DEVICE_FORMS[:-1])} or {DEVICE_FORMS[-1]} "
                         "(N: a GPU index, 0, 1, ...)")
    return value


Device = Annotated[
    str,
    BeforeValidator(check_device),
    WithJsonSchema({"type": "string", "pattern": f"^(?:{_DEVICE.pattern})$"}),
]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a recipe must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False)


M = TypeVar("M", bound=BaseModel)


def _settings(value: dict[str, Any]) -> dict[str, Any]:
    """Parameters whose every value is a setting (:func:`setting_leaves`), named ``parameters.<name>``."""
    for name, setting in value.items():
        setting_leaves(setting, f"parameters.{name}")
    return value


# Method parameters as settings: an ingredient's, a slice's or a slice source's own.
Settings = Annotated[dict[str, Any], AfterValidator(_settings)]


class Reference(_Strict):
    """Something named on the Hub or on disk: a repo at a revision (pinned to its commit), or a local path."""

    ref: str = Field(description="Hub repo id (org/name[@rev]), hf-hub:org/name, timm model name, or local path")
    revision: str | None = Field(None, description="branch, tag or commit SHA (overrides @rev in ref)")

    @field_validator("ref")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("ref must not be empty")
        return value.strip()


class ModelRef(Reference):
    """A model, named the way an ingredient is: the recipe's ``base``; with a LoRA adapter applied to it, if
    ``lora`` names one (mergekit's ``model+lora``)."""

    lora: Reference | None = Field(
        None, description="a PEFT LoRA adapter (its folder or Hub repo: adapter_config.json and its weights) "
        "applied to the model before merging, as PEFT's merge_and_unload does: each target weight plus "
        "lora_alpha / r * B @ A (mergekit's model+lora)"
    )


class Ingredient(ModelRef):
    """One model to put in the soup."""

    weight: float | None = Field(
        None, allow_inf_nan=False,
        description="weight, a finite number, for methods that weigh ingredients: weighted (relative, "
        "normalised, >= 0), task_arithmetic, ties, dare_linear, dare_ties (scales the task vector, default 1; "
        "negative subtracts it: task negation)",
    )
    density: float | None = Field(
        None, gt=0, le=1,
        description="fraction of this ingredient's task vector kept, for methods that sparsify (ties, dare_linear, "
        "dare_ties; default: parameters.density)",
    )

    parameters: Settings = Field(
        default_factory=dict,
        description="this ingredient's own method parameters (its method's per-ingredient ones, and weight), each "
        "a setting: a value, a gradient over the layers (a list) or filters (a list of {filter, value})",
    )

    @model_validator(mode="after")
    def _said_once(self) -> Ingredient:
        for name in ("weight", "density"):
            if getattr(self, name) is not None and name in self.parameters:
                raise ValueError(f"{name} is given twice (as {name} and as parameters.{name}): keep one")
        return self

    def method_parameters(self, names: Sequence[str]) -> dict[str, Any]:
        """The per-ingredient method parameters among ``names`` this ingredient sets, as values: a setting that
        varies by tensor (a gradient, filters) stands here as its first value, and the plan gives each
        tensor its own (:func:`resolve_settings`)."""
        own = {name: getattr(self, name) for name in PER_INGREDIENT if getattr(self, name) is not None}
        own |= {name: setting_leaves(setting)[0] for name, setting in self.parameters.items() if name != "weight"}
        return {name: value for name, value in own.items() if name in names}

    @property
    def given_weight(self) -> float | None:
        """The ingredient's weight (the first value of a weight that varies by tensor), ``None`` if it gives none."""
        return self.weight if "weight" not in self.parameters else float(setting_leaves(self.parameters["weight"])[0])

    def setting(self, name: str) -> Any:
        """This ingredient's own setting of parameter ``name`` (``None``: it sets none)."""
        return self.parameters.get(name, getattr(self, name, None) if name in ("weight", *PER_INGREDIENT) else None)


# The method parameters an ingredient may set for itself as fields (a method says which it takes:
# ``ingredient_parameters``); any of them may be set in its ``parameters`` too, and so may its weight.
PER_INGREDIENT = ("density",)


def setting_leaves(setting: Any, where: str = "") -> list[Any]:
    """The values a parameter's setting can take, in order, for validation (its errors are ValueErrors, which
    pydantic reports as the field's): mergekit's forms, a value, a
    gradient (a non-empty list of values: numbers, or booleans or strings, which step), or filters (a
    ``{filter, value}`` or a list of them: the first whose ``filter`` is in the tensor's name gives its
    value, itself a value or a gradient; no ``filter``, or ``*``, matches every tensor).

    Raises:
        ValueError: a setting of none of these forms, naming ``where`` and what is wrong.
    """
    if isinstance(setting, (bool, int, float, str)):
        return [setting]
    at = f"{where}: " if where else ""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise ValueError(
            f"{at}{setting!r} is not a value, a gradient (a list of values) or a list of filters"
        )
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting]
        if any(numbers) and not all(numbers):
            raise ValueError(f"{at}the gradient {setting!r} mixes numbers with other values")
        return list(setting)
    if not all(isinstance(entry, dict) for entry in setting):
        raise ValueError(f"{at}{setting!r} is neither a gradient (a list of values) nor a list of filters")
    leaves: list[Any] = []
    for index, entry in enumerate(setting):
        if "value" not in entry or set(entry) - {"filter", "value"}:
            raise ValueError(
                f"{at}entry {index} is not a filter ({{filter: NAME, value: ...}}, or {{value: ...}} for every "
                f"tensor): {entry!r}"
            )
        if not isinstance(entry.get("filter", "*"), str):
            raise ValueError(f"{at}entry {index}'s filter must be a string, got {entry['filter']!r}")  # noqa: TRY004
        if isinstance(entry["value"], dict) or (
            isinstance(entry["value"], list) and not all(isinstance(v, (bool, int, float, str)) for v in entry["value"])
        ):
            raise ValueError(f"{at}entry {index}'s value must be a value or a gradient, got {entry['value']!r}")
        leaves += setting_leaves(entry["value"], f"{where}.{index}.value")
    return leaves


def varies(setting: Any) -> bool:
    """Whether a setting can differ from tensor to tensor (a gradient or filters), not one value for all."""
    return isinstance(setting, (list, dict))


class SliceSource(_Strict):
    """Layers of one model in a slice: mergekit's ``sources`` entry."""

    model: int | Literal["base"] = Field(description="the ingredient (its index in ingredients) or the base")
    layer_range: tuple[int, int] = Field(description="the model's layers [start, end): end excluded, as mergekit")
    parameters: Settings = Field(
        default_factory=dict, description="this source's per-ingredient parameters (settings, over the slice's)"
    )

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} is no layers: give [start, end) with 0 <= start < end")
        return value

    @property
    def layers(self) -> range:
        """The source's layers, in order."""
        return range(*self.layer_range)


class Slice(_Strict):
    """Consecutive output layers made of the same layers' count of each of its sources (mergekit's ``slices``):
    layer ``i`` of the slice merges layer ``start + i`` of each source (for one source, copies it, unless the
    method's soup of one model means something: task arithmetic of one task vector)."""

    sources: list[SliceSource] = Field(min_length=1)
    parameters: Settings = Field(
        default_factory=dict, description="this slice's parameters (settings, over the recipe's)"
    )

    @field_validator("sources")
    @classmethod
    def _same_length(cls, value: list[SliceSource]) -> list[SliceSource]:
        lengths = {len(s.layers) for s in value}
        if len(lengths) > 1:
            raise ValueError(f"the sources of a slice give one count of layers each, got {sorted(lengths)}")
        return value

    @property
    def length(self) -> int:
        """How many output layers the slice makes."""
        return len(self.sources[0].layers)


class OutputSpec(_Strict):
    """Where and how the soup is written.

    Without a ``path``, a soup that is pushed is staged in a temporary folder that
    is removed after the push; one that is not pushed needs ``-o``.
    """

    path: str | None = Field(None, description="output folder (default with push: a temporary one)")
    max_shard_size: str = Field("5GB", description="shard size limit, e.g. 5GB, 500MB")
    overwrite: bool = False
    # LoRA adapter soups (hub_soup.adapters): what is written of the ingredients' weighted mean delta
    max_rank: int | None = Field(
        None, gt=0,
        description="adapter soups: reduce each module's delta to this rank by a truncated SVD (the reconstruction "
        "error is reported) instead of the exact concatenated-rank adapter",
    )
    merge_into_base: bool = Field(
        False, description="adapter soups: write the full base model with the mean delta merged in, not an adapter"
    )

    @model_validator(mode="after")
    def _one_adapter_output(self) -> OutputSpec:
        if self.max_rank is not None and self.merge_into_base:
            raise ValueError(
                "max_rank reduces the adapter soup's rank, merge_into_base writes a full model instead of an "
                "adapter: choose one"
            )
        return self

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value


class PushSpec(_Strict):
    """Where the soup goes on the Hub."""

    repo_id: str
    private: bool = False
    create_pr: bool = False
    revision: str | None = Field(None, description="branch to commit to (default: main)")
    commit_message: str | None = None
    license: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"repo_id must look like 'org/name', got {value!r}")
        return value


class TokenSpec(_Strict):
    """Where one token's row comes from (mergekit's per-token ``tokens:`` entry)."""

    source: str = Field(description="the model whose row of the token fills it (an ingredient as the recipe names "
                        "it, or base), or zero")
    token: str | None = Field(None, description="take that model's row of this other token instead")
    force: bool = Field(False, description="every model takes that row, even those that have the token")


class TokenizerSpec(_Strict):
    """The soup's vocabulary when the ingredients' differ (mergekit's ``tokenizer:`` section)."""

    source: str = Field("union", description="base (the base's vocabulary, or the first ingredient's), union (that "
                        "one plus every token another model adds), or a model (an ingredient as the recipe names it)")
    tokens: dict[str, TokenSpec] = Field(default_factory=dict, description="per-token overrides of the row's source")
    pad_to_multiple_of: int | None = Field(None, gt=0, description="round the rows up to a multiple of this; extra "
                                           "rows are each model's mean embedding")

    def renamed(self, refs: dict[str, str]) -> TokenizerSpec:
        """This section with the ingredients it names spelled as ``refs`` maps them (their paths moved)."""
        tokens = {name: t.model_copy(update={"source": refs.get(t.source, t.source)}) for name, t in self.tokens.items()}
        return self.model_copy(update={"source": refs.get(self.source, self.source), "tokens": tokens})

    def choice(self) -> TokenizerChoice:
        """The torch-free form the vocabulary is chosen from."""
        tokens = {name: TokenSetting(t.source, t.token, t.force) for name, t in self.tokens.items()}
        return TokenizerChoice(self.source, tokens, self.pad_to_multiple_of)


# The fields that name a base model: a method's (``base``), and LoRA adapters' (``adapter_base``).
BASES = ("base", "adapter_base")


class Recipe(_Strict):
    """A whole soup: ingredients, method, checks, output and destination."""

    ingredients: list[Ingredient]
    method: str = Field(
        "uniform", description="merge method (hub_soup.merging.methods, or an installed plugin's: entry points "
        "hub_soup.methods)",
        json_schema_extra=lambda schema: schema.update(enum=list(method_names())),
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, validate_default=True,
        description="the method's parameters, each a setting: a value, a gradient over the layers (a list) or "
        "filters (a list of {filter, value}); a per-ingredient one (weight too) is every ingredient's default",
    )  # validated even when left out: a method's required parameter (slerp's t) is then missing
    base: ModelRef | None = Field(
        None, description="the model the ingredients were fine-tuned from, for methods that need one (and only "
        "for them)"
    )
    adapter_base: ModelRef | None = Field(
        None, description="LoRA adapter soups: the base the adapters were trained on (default: the one their "
        "adapter_config.json names, which the pinned recipe records here); another copy of that base: the same "
        "repo at a revision, or a local folder"
    )
    dtype: Dtype | None = Field(
        None, description="output dtype of averaged tensors (default: each tensor's own)"
    )
    exclude: list[str] = Field(default_factory=list, description="glob patterns of keys taken from the first ingredient")
    ema: bool = Field(True, description="use EMA weights when a training checkpoint has them (timm's default)")
    allow_pickle: bool = Field(False, description="allow pickles that execute code on load: only for trusted files")
    device: Device = Field("cpu", description=f"where to merge and score: {', '.join(DEVICE_FORMS)}; auto is cuda "
                           "when there is a GPU, cuda and cuda:N fall back to the CPU (with a warning) when there is none")
    eval: SerializeAsAny[EvalSpec] | None = None  # the task's own spec (a subclass): dumped with its own fields
    greedy: bool = False
    recalibrate_bn: int | None = Field(None, gt=0, description="recompute BatchNorm stats on N batches")
    ensemble_reference: bool = False
    force: bool = Field(
        False,
        description="push even if the soup scores below its best ingredient (or, unscored, its ingredients look "
        "independent); the card then carries the warning",
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    push: PushSpec | None = None
    chat_template: str | None = Field(
        None, description="the soup's chat template: auto (the one most ingredients carry), an ingredient as the "
        "recipe names it (or base), or the template itself (Jinja); default: the tokenizer files' own"
    )
    tokenizer: TokenizerSpec | None = Field(
        None, description="the soup's vocabulary, for ingredients whose vocabularies differ: their token-indexed "
        "rows (embeddings, lm_head) are then aligned by token"
    )
    slices: list[Slice] | None = Field(
        None, description="the soup's layers, slice by slice (mergekit's slices): each output layer made of the "
        "sources' layers; without it, layer i of the soup is made of layer i of every ingredient"
    )
    mergekit_config: str | None = Field(
        None, description="the mergekit config this recipe was read from, as written: the soup carries it as "
        "mergekit_config.yml and in its card, as mergekit's own soups do (the pinned recipe records it, so that "
        "a rebuild writes the same files; delete it from a recipe edited to make another soup)"
    )
    _base: Path | None = PrivateAttr(None)  # the recipe file's folder (see relative_to)

    @field_validator("ingredients")
    @classmethod
    def _at_least_one(cls, value: list[Ingredient]) -> list[Ingredient]:
        """At least one; how many a method needs (:attr:`~MergeMethod.min_ingredients`) is a rule of the recipe."""
        if not value:
            raise ValueError("a soup needs at least 1 ingredient, got 0")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        try:
            get_method(value)
        except RecipeError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}") from None
        return value

    @field_validator("parameters")
    @classmethod
    def _method_parameters(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validated by the method's own ``Parameters``, every value a setting can take: pydantic's errors then
        name ``parameters.<field>``. ``weight``, for a method that weighs ingredients, is every ingredient's
        default (as mergekit's global parameters give it)."""
        if "method" in info.data:  # else the method's own error is the one to show
            method = get_method(info.data["method"])
            shared = {name: setting for name, setting in value.items() if name != "weight" or not method.uses_weights}
            check_settings(method, shared)
            if "weight" in value and method.uses_weights:
                for leaf in setting_leaves(value["weight"], "parameters.weight"):
                    _finite(leaf, "parameters.weight")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        method = get_method(self.method)
        exact = method.exact_ingredients
        # the models merged into each output tensor: every ingredient, or the sources of each slice
        for where, count in ([(f"slices.{i}", sum(s.model != "base" for s in piece.sources))
                              for i, piece in enumerate(self.slices)] if self.slices
                             else [("the recipe", len(self.ingredients))]):
            if exact is not None and count != exact:
                raise ValueError(f"method: {self.method} merges exactly {exact} ingredients, {where} lists {count}")
        if len(self.ingredients) < method.min_ingredients:
            alone = [n for n in method_names() if get_method(n).min_ingredients == 1]
            raise ValueError(
                f"ingredients: a soup needs at least {method.min_ingredients} ingredients, got {len(self.ingredients)}"
                + (f" (with a base, {', '.join(alone)} take one)" if alone else "")
            )
        weighted = [i.given_weight is not None for i in self.ingredients]
        if method.uses_weights and method.default_weight is None and not all(weighted) and "weight" not in self.parameters:
            raise ValueError(f"method: {self.method} needs a weight on every ingredient")
        if not method.uses_weights and any(weighted):
            takes = [name for name in method_names() if get_method(name).uses_weights]
            raise ValueError(
                f"weights are given but method {self.method} takes none; set method: {' or '.join(takes)}"
            )
        for index, ingredient in enumerate(self.ingredients):
            for name in sorted(set(ingredient.method_parameters(PER_INGREDIENT)) - set(method.ingredient_parameters)):
                takes = [m for m in method_names() if name in get_method(m).ingredient_parameters]
                raise ValueError(
                    f"ingredients.{index}.{name}: method {self.method} takes no per-ingredient {name}"
                    + (f"; methods that do: {', '.join(takes)}" if takes else "")
                )
            self._own_settings(method, ingredient.parameters, f"ingredients.{index}.parameters")
        self._slices_fit(method)
        if method.uses_weights and method.normalizes_weights:
            self._weights_not_negative(method)
        if method.needs_base and self.base is None:
            raise ValueError(
                f"method: {self.method} needs a base: the model the ingredients were fine-tuned from "
                "(base: {ref: org/name})"
            )
        if self.base is not None and not method.takes_base():
            raise HintedValueError(
                f"base: a base is given but method {self.method} uses none; drop base or change the method",
                hint="for LoRA adapters, leave the base out (their adapter_config.json names it) or name "
                "another copy of it with adapter_base (--adapter-base)",
            )
        if self.adapter_base is not None and self.adapter_base.lora is not None:
            raise ValueError("adapter_base.lora: the base of LoRA adapter soups takes no adapter of its own; drop it")
        if self.greedy and self.eval is None:
            raise ValueError("greedy: true needs an eval section to score candidates")
        if self.eval is not None and self.eval.device_map is not None and self.device != "cpu":
            # transformers' pipeline(device=..., device_map=...) refuses the pair the same way
            raise ValueError(
                f"eval.device_map places the scored model and device: {self.device} would too, and they might "
                "conflict: use only one (--device-map, with merging streamed on the CPU, or --device)"
            )
        if self.greedy and method.exact_ingredients is not None:
            raise ValueError(f"greedy soups try subsets of the ingredients, method {self.method} merges exactly "
                             f"{method.exact_ingredients}; drop greedy")
        if self.greedy and method.uses_weights:
            raise ValueError(
                "greedy soups weigh the kept ingredients equally; "
                + ("drop the weights" if any(weighted) else f"method {self.method} weighs each ingredient")
            )
        if (self.recalibrate_bn or self.ensemble_reference) and self.eval is None:
            raise ValueError("recalibrate_bn and ensemble_reference need an eval section (for data)")
        if self.tokenizer is not None and (self.recalibrate_bn or self.ensemble_reference):
            field = "recalibrate_bn" if self.recalibrate_bn else "ensemble_reference"
            raise HintedValueError(
                f"{field}: not with a chosen vocabulary (tokenizer): each model is scored with its own tokenizer, "
                + ("so one model's batches are not another's inputs" if self.recalibrate_bn
                   else "so their outputs are probabilities of different tokens, which do not average"),
                hint=f"drop {field}",
            )
        scorer = get_task(self.eval.task) if self.eval is not None else None
        if scorer is not None and not scorer.has_outputs and (self.recalibrate_bn or self.ensemble_reference):
            field, lacking = (
                ("recalibrate_bn", "eval inputs to recompute BatchNorm statistics on") if self.recalibrate_bn
                else ("ensemble_reference", "model outputs to average into an ensemble")
            )
            raise ValueError(f"{field}: task {scorer.name} scores {scorer.scoring}, not {lacking}; drop {field}")
        return self

    def _own_settings(self, method: type[MergeMethod], parameters: dict[str, Any], where: str) -> None:
        """An ingredient's (or a slice source's) own parameters: its method's per-ingredient ones and its weight,
        every value a setting can take valid."""
        takes = (*method.ingredient_parameters, *(("weight",) if method.uses_weights else ()))
        for name, setting in parameters.items():
            if name not in takes:
                raise ValueError(f"{where}.{name}: method {self.method} takes no per-ingredient {name} (its "
                                 f"per-ingredient parameters: {', '.join(takes) or 'none'})")
            if name == "weight":
                for leaf in setting_leaves(setting):
                    _finite(leaf, f"{where}.weight")
        try:
            check_settings(method, self.merge_parameters() | {n: s for n, s in parameters.items() if n != "weight"})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{where}.{'.'.join(map(str, first['loc']))}: {_message(first)}") from None

    def _slices_fit(self, method: type[MergeMethod]) -> None:
        """Slices name models the recipe has, and are not greedy's (it tries subsets of whole models)."""
        for s, piece in enumerate(self.slices or ()):
            for k, source in enumerate(piece.sources):
                where = f"slices.{s}.sources.{k}"
                if source.model == "base" and self.base is None:
                    raise ValueError(f"{where}.model: the slice names the base, and the recipe has none")
                if isinstance(source.model, int) and not 0 <= source.model < len(self.ingredients):
                    raise ValueError(f"{where}.model: there is no ingredient {source.model} (0 to "
                                     f"{len(self.ingredients) - 1})")
                self._own_settings(method, source.parameters, f"{where}.parameters")
            shared = {n: v for n, v in piece.parameters.items() if n != "weight" or not method.uses_weights}
            try:
                check_settings(method, self.merge_parameters() | shared)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"slices.{s}.parameters.{'.'.join(map(str, first['loc']))}: {_message(first)}") from None
        if self.slices and self.greedy:
            raise HintedValueError(
                "greedy: greedy soups try subsets of whole models; a recipe with slices names layers",
                hint="drop --greedy (greedy: true): with an eval section the soup of the slices is scored as "
                "written; or list models without slices to let greedy choose among them")

    def _weights_not_negative(self, method: type[MergeMethod]) -> None:
        """A method that averages (weights normalised to sum to one) takes no negative weight: only
        one that scales task vectors by their weights as given can subtract one (task negation)."""
        for i, ingredient in enumerate(self.ingredients):
            if ingredient.given_weight is not None and ingredient.given_weight < 0:
                negates = [n for n in method_names() if get_method(n).uses_weights and not get_method(n).normalizes_weights]
                raise ValueError(
                    f"ingredients.{i}.weight: {ingredient.given_weight:g} is negative, and method {method.name} averages "
                    "the ingredients (weights >= 0, normalised to sum to 1); to subtract a fine-tune's task vector "
                    f"(task negation), use method {' or '.join(negates)} with a base"
                )

    @classmethod
    def from_refs(
        cls, refs: list[str], weights: list[float] | None = None, *,
        densities: Sequence[float] | None = None, **fields: Any,
    ) -> Recipe:
        """The recipe for a command line or an API call: refs (with their weights and densities, one per ref)
        plus any other fields.

        Raises:
            RecipeError: naming the offending field.
        """
        ingredients: list[dict[str, Any]] = [{"ref": r} for r in refs]
        for name, plural, values in (("weight", "weights", weights), ("density", "densities", densities)):
            if values is None:
                continue
            if len(values) != len(refs):
                raise RecipeError(f"got {len(values)} {plural} for {len(refs)} refs", hint=f"give one {name} per ref")
            for ingredient, value in zip(ingredients, values):
                ingredient[name] = value
        data = {"ingredients": ingredients, "method": "uniform" if weights is None else "weighted", **fields}
        return validated(cls, data)

    def code_refs(self) -> list[tuple[str, str]]:
        """The code this recipe would import and run, as ``(field, value)``: each needs ``trust_remote_code``.

        The eval section's task says what of it is code (:meth:`~hub_soup.eval.spec.EvalSpec.code`).
        """
        return self.eval.code_refs() if self.eval is not None else []

    def relative_to(self, base: Path) -> Recipe:
        """This recipe with its relative local paths read from ``base`` (a recipe file's folder).

        ``output.path``, an ``eval.data`` path (one that exists, or can only be a path) and an
        ``eval.function`` file are rewritten from ``base``; ingredient refs keep the user's spelling (it
        labels them in tables) and are resolved from :attr:`base_dir`, where a ref
        that exists is a path and anything else may be a Hub id or a timm name.
        """
        update: dict[str, Any] = {}
        if self.output.path is not None:
            update["output"] = self.output.model_copy(update={"path": _from_base(base, self.output.path)})
        if self.eval is not None:
            update["eval"] = self.eval.with_local_paths(lambda path: _from_base(base, path), base)
        recipe = self.model_copy(update=update)
        recipe._base = base
        return recipe

    def with_ingredients(self, indices: Sequence[int]) -> Recipe:
        """This recipe with only the ingredients at ``indices`` (in that order), validated again (a method's
        ingredient count, greedy's rules) and still reading relative paths from :attr:`base_dir`.

        Raises:
            RecipeError: naming the rule the smaller recipe breaks.
        """
        data = self.model_dump(exclude_unset=True)
        renumber: dict[int | str, int | str] = {old: new for new, old in enumerate(indices)}
        for piece in data.get("slices") or ():  # a dropped ingredient a slice names is the base (a listed base)
            for source in piece["sources"]:
                source["model"] = renumber.get(source["model"], "base")
        return self.with_fields(ingredients=[data["ingredients"][i] for i in indices], slices=data.get("slices"))

    def with_fields(self, **fields: Any) -> Recipe:
        """This recipe with ``fields`` (as a recipe file or flags give them) over its own, validated again, and
        still reading relative paths from :attr:`base_dir`.

        Raises:
            RecipeError: naming the rule the new recipe breaks.
        """
        recipe = validated(Recipe, self.model_dump(exclude_unset=True) | fields)
        recipe._base = self._base
        return recipe

    def with_paths_for(self, folder: str | Path | None, local: Sequence[bool] | None = None) -> Recipe:
        """This recipe as a recipe file in ``folder`` must say it: every relative local path rewritten to be
        read from ``folder`` (absolute when ``folder`` is None, for a recipe that does not know where it will be).

        A recipe file's paths are read from its folder (:func:`load_recipe`), so this is what a
        recipe written anywhere (``--dump-recipe FILE``, the pinned ``hub-soup.yaml`` in a soup)
        needs to name what this one names. Ingredient and base refs (and the LoRA adapters applied to
        them) are read from :attr:`base_dir`, ``eval``'s paths and ``output.path`` from the working directory
        (:meth:`relative_to` already read a file's from its folder); absolute and ``~`` paths
        stay as written, and so do symlinks.

        Args:
            local: which ingredients, then the base (or adapter base), are local paths (a resolved ref's kind); default: those
                that exist, the rule :func:`~hub_soup.hub.resolve.resolve_ref` tries first.
        """
        where = os.path.abspath(folder) if folder is not None else None
        bases = {name: model for name in BASES if (model := getattr(self, name)) is not None}
        models = [*self.ingredients, *bases.values()]
        if local is None:
            local = [(self.base_dir / Path(model.ref).expanduser()).exists() for model in models]
        moved = [
            model.model_copy(update={"ref": _moved(model.ref, self.base_dir, where)}) if is_local else model
            for model, is_local in zip(models, local)
        ]
        for index, model in enumerate(moved):  # an adapter applied to a model: a local one is a folder that exists
            lora = model.lora
            if lora is not None and (self.base_dir / Path(lora.ref).expanduser()).exists():
                lora = lora.model_copy(update={"ref": _moved(lora.ref, self.base_dir, where)})
                moved[index] = model.model_copy(update={"lora": lora})
        count = len(self.ingredients)
        update: dict[str, Any] = {"ingredients": moved[:count], **dict(zip(bases, moved[count:]))}
        refs = {old.ref: new.ref for old, new in zip(self.ingredients, moved[:count])}
        if self.tokenizer is not None:  # a source or an override names an ingredient as its ref says
            update["tokenizer"] = self.tokenizer.renamed(refs)
        if self.chat_template is not None:
            update["chat_template"] = refs.get(self.chat_template, self.chat_template)
        if self.output.path is not None:
            update["output"] = self.output.model_copy(update={"path": _moved(self.output.path, Path(), where)})
        if self.eval is not None:
            update["eval"] = self.eval.with_local_paths(lambda path: _moved(path, Path(), where), Path())
        return self.model_copy(update=update)

    @property
    def base_dir(self) -> Path:
        """The folder relative ingredient paths are read from: the recipe file's, else the working directory."""
        return self._base if self._base is not None else Path()

    @property
    def weights(self) -> list[float] | None:
        """Each ingredient's weight, as given (or the method's default weight), for a method that weighs them; else None."""
        method = get_method(self.method)
        if not method.uses_weights:
            return None
        default = setting_leaves(self.parameters["weight"])[0] if "weight" in self.parameters else method.default_weight
        return [i.given_weight if i.given_weight is not None else default for i in self.ingredients]  # type: ignore[misc]

    def merge_method(self, weights: Sequence[float] | None = None) -> MergeMethod:
        """The recipe's method with its parameters, weighing the ingredients by ``weights``
        (default: the recipe's own, for a method that uses them)."""
        method = get_method(self.method)
        own = [i.method_parameters(method.ingredient_parameters) for i in self.ingredients]
        return method(self.merge_parameters(), weights if weights is not None else self.weights, own if any(own) else None)

    def merge_parameters(self) -> dict[str, Any]:
        """The method's parameters for the merge as a whole: a setting that varies by tensor (a gradient,
        filters) stands as its first value, and the plan gives each tensor its own
        (:func:`~hub_soup.soups.settings.resolve_settings`); a per-ingredient default (``weight``) is the
        ingredients' business (:attr:`weights`)."""
        shared = {name: s for name, s in self.parameters.items() if name != "weight" or not get_method(self.method).uses_weights}
        return {name: setting_leaves(setting)[0] for name, setting in shared.items()}

    def varies(self) -> bool:
        """Whether a parameter differs from tensor to tensor or layer to layer (gradients, filters, an
        ingredient's parameters that vary, slices): the plan then gives each tensor its own."""
        settings = [*self.parameters.values(), *(s for i in self.ingredients for s in i.parameters.values())]
        return self.slices is not None or any(varies(s) for s in settings) or (
            "weight" in self.parameters and get_method(self.method).uses_weights)

    def pinned_parameters(self) -> dict[str, Any]:
        """The method's parameters with every default filled in (DARE's seed among them), as the pinned recipe
        records them: a rebuild does not depend on defaults that may change. Settings that vary by tensor stay
        as written."""
        filled = get_method(self.method).parameters_from(self.merge_parameters()).model_dump(mode="json", by_alias=True)
        return filled | {name: s for name, s in self.parameters.items() if varies(s) or name not in filled}

    def to_yaml(self) -> str:
        """The recipe as a YAML file, defaults omitted, that :func:`load_recipe` reads back identically."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False)


class _RecipeDumper(yaml.SafeDumper):
    """YAML as a recipe file shows it: a text of several lines (:attr:`Recipe.mergekit_config`) as a ``|``
    block, read as it was written, rather than one quoted line of ``\\n`` escapes."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_RecipeDumper.add_representer(str, _RecipeDumper.represent_str)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; errors name the field path and its line.

    Relative local paths in it are taken relative to the file (see :meth:`Recipe.relative_to`).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    return parse_recipe(text, str(path)).relative_to(path.parent)


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """Validate recipe text; see :func:`load_recipe`. A mergekit config (top-level ``merge_method``) is read
    onto the same recipe (:mod:`hub_soup.dialects.mergekit`), its errors naming its own lines."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping with ingredients and output")
    config = mergekit.is_mergekit(data)
    origins: list[mergekit.Location] = []  # a config's: where each ingredient is named
    try:
        if config:
            native, origins = mergekit.recipe_data(data, node, where)
            return Recipe.model_validate(native | {"mergekit_config": text})
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        location, message = first["loc"], _message(first)
        named = _NAMED_FIELD.match(message)
        if named and location and not named.group(1).startswith(".".join(map(str, location)) + "."):
            named = None  # a rule of the whole recipe (or of a field, about a part of it: parameters.t) names
        if named:  # the field its message is about: the line is that field's
            location = tuple(int(p) if p.isdigit() else p for p in named.group(1).split("."))
        field_path = ".".join(str(p) for p in location) or "(top level)"
        line = _line_of(node, mergekit.location_in_config(location, data, origins) if config else location)
        at = f"{where}:{line}" if line else where
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        said = message if named else f"{field_path}: {message}"
        raise RecipeError(f"{at}: {said}{more}", hint=_hint(first) or "`hub-soup schema` prints every field") from None


# A recipe-wide rule (a model validator, whose error is at the top level) that is about one field
# starts its message with that field's path: ``ingredients.1.weight: ...``, ``greedy: ...``.
_NAMED_FIELD = re.compile(r"([a-z_]+(?:\.[a-z0-9_]+)*): ")


def validated(model: type[M], data: dict[str, Any], section: str = "") -> M:
    """``model`` (a recipe or one of its sections, at ``section``) from flags or API arguments.

    Raises:
        RecipeError: pydantic's first error, naming its field path (none for a rule of the whole model).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(map(str, (*([section] if section else []), *first["loc"])))
        raise RecipeError(f"{path}: {_message(first)}" if path else _message(first), hint=_hint(first)) from None


def check_settings(method: type[MergeMethod], parameters: dict[str, Any]) -> None:
    """Validate ``parameters`` (settings, :func:`setting_leaves`) by ``method``'s ``Parameters``: once with
    every setting at its first value, then each value of a setting that varies in its place.

    Raises:
        ValidationError: pydantic's, naming the field (and its value).
        ValueError: a setting of no form a setting takes.
    """
    leaves = {name: setting_leaves(setting, f"parameters.{name}") for name, setting in parameters.items()}
    first = {name: values[0] for name, values in leaves.items()}
    for name, values in [("", [None]), *leaves.items()]:
        for value in values[1:] if name else values:
            method.parameters_from(first | ({name: value} if name else {}))


def _finite(value: Any, where: str) -> None:
    """A weight's value: a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number")


class HintedValueError(ValueError):
    """A rule of the recipe, broken, that knows what to do about it: pydantic keeps the exception in its
    error (``ctx``), and the :class:`~hub_soup.errors.RecipeError` raised from that error carries the hint."""

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _hint(error: Any) -> str | None:
    """The hint of a rule that gave one (:class:`HintedValueError`), else None."""
    return getattr(error.get("ctx", {}).get("error"), "hint", None)


def _message(error: Any) -> str:
    """A pydantic error's message without the "Value error, " pydantic puts before our own words."""
    message = str(error["msg"])
    return message.removeprefix("Value error, ") if error.get("type") == "value_error" else message


def _from_base(base: Path, path: str) -> str:
    """``path`` read from ``base``: absolute paths and ``~`` stay as they are."""
    expanded = Path(path).expanduser()
    return path if expanded.is_absolute() or path.startswith("~") else os.path.normpath(base / expanded)


def _moved(path: str, base: Path, folder: str | None) -> str:
    """``path``, read from ``base``, as read from the absolute ``folder`` (absolute when ``folder`` is None);
    absolute and ``~`` paths as written (see :meth:`Recipe.with_paths_for`)."""
    if Path(path).expanduser().is_absolute():
        return path
    where = os.path.abspath(base / Path(path))
    return os.path.relpath(where, folder) if folder is not None else where


def _line_of(node: Any, location: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node on ``location`` that exists."""
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key_node = next((k for k, _ in node.value if k.value == part), None)
            if key_node is None:
                break
            line, node = key_node.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line if line is not None else (node.start_mark.line + 1 if node is not None else None)


def method_names() -> tuple[str, ...]:
    """The merge methods a recipe may name: the registry's (the CLI's choices come from here)."""
    return methods.method_names()


def recipe_schema() -> dict[str, Any]:
    """JSON Schema of recipes, for editors (``hub-soup schema``)."""
    return Recipe.model_json_schema()
