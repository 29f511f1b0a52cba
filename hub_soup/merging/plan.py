"""Map every ingredient's keys onto one canonical set, or stop before any averaging.

Alignment works on :class:`Layout` (names, dtypes, shapes and tied groups), which
can come from local files or from safetensors headers read over HTTP, so a
mismatch is found in seconds, before anything large is downloaded. The first
ingredient sets the canonical names, order and tied-weight convention. A base
model (the one the ingredients were fine-tuned from, for methods that need it)
has its own role: it is aligned like an ingredient, but it is not one.

The plan is data the engine reads: per output tensor, its :class:`Input` s (an
ingredient's key, where needed some of its rows or another layer's tensor) and its
own method parameters. Alignment makes the plain plan (every ingredient's tensor of
the same name, the recipe's parameters); the helpers below make the rest of it
(:meth:`MergePlan.with_parameters` with :func:`resolve_setting` for gradients and
filters, :func:`restack` for layer stacking, :meth:`TensorPlan.gathered` for rows, and
:mod:`hub_soup.merging.vocab_rows` for rows an input lacks: a token not in its vocabulary).
"""

from __future__ import annotations

import fnmatch
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from hub_soup.errors import AlignmentError
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.rows import Gather, rows_of
from hub_soup.merging.vocab import SOURCE_HINT, Fill

if TYPE_CHECKING:
    from hub_soup.io.read import Checkpoint

# Names of token-indexed tensors: rows that differ in number there are different vocabularies.
_TOKEN_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")

# Names of classifier heads: a shape mismatch there usually means different num_classes.
_HEAD_HINTS = ("head", "classifier", "fc.", "lm_head", "score", "logits", "last_linear")


@dataclass(frozen=True)
class Layout:
    """What alignment needs to know of an ingredient: no tensor data."""

    label: str
    metas: dict[str, TensorMeta]
    aliases: tuple[tuple[str, ...], ...] = ()


# An input's rows: a ``range`` of consecutive rows is read as one span; any other sequence gathers (kept as
# the runs of a :class:`~hub_soup.merging.rows.Gather` once planned).
Rows = range | tuple[int, ...] | Gather

# The ingredient index of an input in the base's role (:attr:`TensorPlan.base_input`).
BASE = -1


@dataclass(frozen=True)
class Input:
    """One tensor an output tensor is made of: where to read it, and which part of it.

    Attributes:
        ingredient: the index of the ingredient read (in the merge's order), or :data:`BASE`.
        key: the tensor to read in it (which may be another layer's, or another name's, than
            the output tensor's).
        rows: the rows of that tensor (its first dimension) that make the output's rows, in order:
            a ``range`` (a slice, read as one span) or any sequence of row indices (a gather, such
            as an embedding's rows in another vocabulary's order); ``None``: every row, as stored.
        layer: the layer of the ingredient this input comes from, where the plan took it from
            another layer than the output's (stacked slices); what the card and the soup's config
            say of it. Reading follows :attr:`key` alone.
        fills: rows the ingredient lacks (a token not in its vocabulary, a padding row), which
            :attr:`rows` selects as ``-1 - j`` for ``fills[j]`` (:mod:`hub_soup.merging.vocab`).
        filled: those rows' values, one row per fill in the stored dtype, computed from the
            checkpoints before the merge (:func:`hub_soup.merging.vocab_rows.fill_rows`).
    """

    ingredient: int
    key: str
    rows: Rows | None = None
    layer: int | None = None
    fills: tuple[Fill, ...] = ()
    filled: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def spans(self, start: int, count: int, row_numel: int) -> list[tuple[int, int, bool]]:
        """The (start, count, filled) spans that hold this input's elements ``[start, start + count)`` in
        order (rows of ``row_numel`` elements each): of the stored tensor, flattened, or (``filled``) of
        :attr:`filled`, flattened. One span unless the rows are gathered out of order or filled."""
        if self.rows is None:
            return [(start, count, False)]
        if isinstance(self.rows, range) and self.rows.step == 1:
            return [(self.rows.start * row_numel + start, count, False)]
        spans: list[tuple[int, int, bool]] = []
        end = start + count
        position = start // row_numel * row_numel  # where the current run's first output row begins
        for row, rows in rows_of(self.rows).runs(start // row_numel, -(-end // row_numel)):
            filled = row < 0
            low, high = max(start, position), min(end, position + rows * row_numel)
            begin = (-1 - row if filled else row) * row_numel + low - position
            if spans and spans[-1][2] == filled and spans[-1][0] + spans[-1][1] == begin:
                spans[-1] = (spans[-1][0], spans[-1][1] + high - low, filled)
            else:
                spans.append((begin, high - low, filled))
            position += rows * row_numel
        return spans

    def read_into(
        self, checkpoint: Checkpoint, start: int, count: int, row_numel: int, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Elements ``[start, start + count)`` of this input, flattened (rows of ``row_numel`` elements), read
        as :meth:`~hub_soup.io.read.Checkpoint.read_into` reads a tensor's, into ``buffer``: a whole tensor
        or a slice of rows in one read, gathered rows run by run (each run of consecutive rows one read,
        through a staging buffer of this thread), filled rows copied from :attr:`filled`."""
        if self.rows is None:
            return checkpoint.read_into(self.key, start, count, buffer)
        spans = self.spans(start, count, row_numel)
        if len(spans) == 1 and not spans[0][2]:
            return checkpoint.read_into(self.key, spans[0][0], spans[0][1], buffer)
        dtype = checkpoint.metas[self.key].dtype
        gathered = buffer[: count * dtype.itemsize].view(dtype)
        staging = _staging(max(size for _, size, _ in spans) * dtype.itemsize)
        done = 0
        for begin, size, filled in spans:
            if filled:
                if self.filled is None:
                    raise RuntimeError(f"{self.key}: rows of ingredient {self.ingredient} are filled, not yet computed")
                gathered[done : done + size].copy_(self.filled.view(-1)[begin : begin + size])
            else:
                gathered[done : done + size].copy_(checkpoint.read_into(self.key, begin, size, staging))
            done += size
        return gathered


_STAGING = threading.local()


def _staging(nbytes: int) -> torch.Tensor:
    """A byte buffer of this thread of at least ``nbytes``, reused: where gathered runs are read before
    they are copied into place (a read may land anywhere in the buffer it is given)."""
    buffer: torch.Tensor | None = getattr(_STAGING, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _STAGING.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: its inputs, the base's (for methods that use one), and its own
    method parameters. Everything a merge does to a tensor is here, as data the engine reads.

    Attributes:
        key: the output tensor's name.
        meta: its stored dtype (the first input's) and shape.
        inputs: what it is made of, in the order the method takes its parts (ingredient order for
            an aligned plan: one input per ingredient).
        average: merged by the method; ``False``: the first input is copied (integers, bools,
            excluded keys, a layer taken from one model).
        base_input: the base's tensor (ingredient :data:`BASE`), for a merged tensor of a method
            that uses a base.
        parameters: the method parameters of this tensor, resolved (gradients over layers and
            filters already evaluated), over the merge's own: a value for all (``{"t": 0.37}``), or
            a list with one value per input (``{"density": [0.5, 0.7]}``, ``{"weight": [...]}``).
            Empty: the merge's parameters, as the recipe gives them.
    """

    key: str
    meta: TensorMeta
    inputs: tuple[Input, ...]
    average: bool
    base_input: Input | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def aligned(
        cls, key: str, meta: TensorMeta, sources: Sequence[str], average: bool, base_source: str | None = None
    ) -> TensorPlan:
        """The tensor read as ``sources[i]`` in ingredient ``i`` (and ``base_source`` in the base), whole."""
        inputs = tuple(Input(i, source) for i, source in enumerate(sources))
        base = Input(BASE, base_source) if base_source is not None else None
        return cls(key, meta, inputs, average, base)

    @property
    def sources(self) -> tuple[str, ...]:
        """The key each input reads, in order (in an aligned plan, the key each ingredient keeps it under)."""
        return tuple(i.key for i in self.inputs)

    @property
    def base_source(self) -> str | None:
        """The key read in the base (``None``: no base, or not merged)."""
        return self.base_input.key if self.base_input is not None else None

    @property
    def row_numel(self) -> int:
        """Elements in one row (first-dimension index) of the tensor, what rows of its inputs are made of."""
        return math.prod(self.meta.shape[1:])

    def input_of(self, ingredient: int) -> Input:
        """The input read from ``ingredient`` (the first, if several are)."""
        for each in self.inputs:
            if each.ingredient == ingredient:
                return each
        raise KeyError(f"{self.key} reads nothing of ingredient {ingredient}")

    def gathered(self, rows: Sequence[Rows | None]) -> TensorPlan:
        """This tensor made of the given rows of each input (one entry per input, ``None``: as planned),
        all of one length: the output has that many rows (an embedding in another vocabulary)."""
        if len(rows) != len(self.inputs):
            raise ValueError(f"{self.key}: {len(rows)} row selections for {len(self.inputs)} inputs")
        inputs = tuple(
            i if r is None else replace(i, rows=r if isinstance(r, range) else rows_of(r))
            for i, r in zip(self.inputs, rows)
        )
        counts = {len(i.rows) if i.rows is not None else self.meta.shape[0] for i in inputs}
        if len(counts) != 1 or not self.meta.shape:
            raise ValueError(f"{self.key}: its inputs' rows differ in number ({sorted(counts)})")
        shape = (counts.pop(), *self.meta.shape[1:])
        return replace(self, inputs=inputs, meta=TensorMeta(self.meta.dtype, shape))


@dataclass
class MergePlan:
    """One canonical key set and, for each key, where each ingredient keeps it."""

    tensors: list[TensorPlan]
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: str | None = None  # the base model's label, when one was aligned

    @property
    def ingredients(self) -> int:
        """How many ingredients the plan reads (one more than the highest index an input names)."""
        return 1 + max((i.ingredient for t in self.tensors for i in t.inputs), default=-1)

    def select(self, indices: Sequence[int]) -> MergePlan:
        """The plan of the ingredients at ``indices`` only (in that order), as if only they had
        been aligned: the first of them gives the tensors that are copied (greedy's candidate soups).
        Per-input parameters keep the values of the inputs kept."""
        renumber = {old: new for new, old in enumerate(indices)}
        tensors = []
        for t in self.tensors:
            kept = [n for old in indices for n, i in enumerate(t.inputs) if i.ingredient == old]
            if not kept:
                raise ValueError(f"{t.key} reads none of ingredients {list(indices)}")
            inputs = tuple(replace(t.inputs[n], ingredient=renumber[t.inputs[n].ingredient]) for n in kept)
            parameters = {
                name: [value[n] for n in kept] if isinstance(value, (list, tuple)) else value
                for name, value in t.parameters.items()
            }
            tensors.append(replace(t, inputs=inputs, parameters=parameters))
        return replace(self, tensors=tensors)

    def with_base_as_ingredient(self) -> MergePlan:
        """The plan with its base (if any) as one more ingredient, last: a tensor the base does not hold
        for the soup (copied) reads the first ingredient's there."""
        if self.base is None:
            return self
        last = self.ingredients
        return replace(self, base=None, tensors=[
            replace(t, base_input=None, inputs=(*t.inputs, replace(t.base_input or t.inputs[0], ingredient=last)))
            for t in self.tensors
        ])

    def with_parameters(self, resolve: Callable[[TensorPlan], Mapping[str, Any] | None]) -> MergePlan:
        """The plan with each merged tensor's own method parameters: ``resolve(tensor)``'s, over those it had
        (``None`` or empty: unchanged). Gradients and filters are resolved here, once, into plain values
        (see :func:`resolve_setting`); the engine gives the method each tensor's."""
        tensors = []
        for t in self.tensors:
            own = resolve(t) if t.average else None
            tensors.append(replace(t, parameters={**t.parameters, **own}) if own else t)
        return replace(self, tensors=tensors)

    @property
    def copied(self) -> list[str]:
        """Keys taken from the first ingredient unchanged (integers, bools, excluded)."""
        return [t.key for t in self.tensors if not t.average]

    @property
    def has_batchnorm(self) -> bool:
        """BatchNorm running statistics among the tensors (what the card and the hints speak of)."""
        return any(t.key.endswith("running_var") for t in self.tensors)


# A block's index in a key: ``model.layers.12.mlp...`` (Llama, Mistral, Qwen), ``transformer.h.3...`` (GPT-2),
# ``blocks.7...`` (timm ViTs), ``encoder.layer.5...`` (BERT).
_LAYER = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")


def layer_of(key: str) -> int | None:
    """The index of the layer (transformer block) ``key`` belongs to, ``None`` outside the layers."""
    found = _LAYER.search(key)
    return int(found.group(3)) if found else None


def relayer(key: str, layer: int) -> str:
    """``key`` of layer ``layer`` instead of its own (a key outside the layers is returned as it is)."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.{layer}.", key, count=1)


def gradient_position(index: int, count: int) -> float:
    """Where layer ``index`` of ``count`` stands in a gradient, 0 to 1, as mergekit places a slice's layers
    (``index / (count - 1)``; a slice of one layer stands at 1). Tensors outside the layers stand at 0."""
    return index / (count - 1) if count > 1 else 1.0


def gradient(values: Sequence[float], position: float) -> float:
    """The value of a gradient (mergekit's list setting) at ``position`` in [0, 1]: the list's entries
    spread evenly over [0, 1], linear between neighbours (mergekit's ``evaluate_setting``)."""
    scaled = position * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def resolve_setting(setting: Any, key: str, position: float) -> Any:
    """A parameter's value for tensor ``key`` at gradient ``position``, from mergekit's setting forms: a
    scalar; a gradient (a list of numbers, :func:`gradient`); or filters (a list of ``{"filter": ...,
    "value": ...}``, the first whose filter is a substring of ``key``, or is missing or ``*``, gives the
    value). ``None`` where no filter matches."""
    if not isinstance(setting, (list, tuple)):
        return setting
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        return gradient(setting, position)
    if all(not isinstance(v, Mapping) for v in setting):  # mergekit: a list of other scalars steps
        return setting[int(position * (len(setting) - 1))]
    for condition in setting:
        where = condition.get("filter")
        if where is None or where == "*" or where in key:
            return resolve_setting(condition["value"], key, position)
    return None


def restack(plan: MergePlan, layers: Sequence[Sequence[tuple[int, int]]]) -> MergePlan:
    """The plan of a soup whose layer ``o`` is made of ``layers[o]``, a list of (ingredient, source layer):
    merged by the method where it names several, taken from the one it names otherwise (mergekit's
    ``passthrough`` slices, layer stacking). ``plan`` is aligned; its layer 0 gives each layer's tensors
    and their order. Tensors before the layers and after them keep their plan (the base's tensor of a
    layer is read from the first source's layer)."""
    templates = [t for t in plan.tensors if layer_of(t.key) == 0]
    first = next((n for n, t in enumerate(plan.tensors) if layer_of(t.key) is not None), None)
    if first is None:
        raise ValueError("the plan has no layers to stack")
    before = plan.tensors[:first]
    after = [t for t in plan.tensors[first:] if layer_of(t.key) is None]
    tensors = list(before)
    for output, sources in enumerate(layers):
        if not sources:
            raise ValueError(f"output layer {output} has no source")
        for t in templates:
            inputs = tuple(
                replace(t.input_of(ingredient), ingredient=ingredient, layer=source,
                        key=relayer(t.input_of(ingredient).key, source))
                for ingredient, source in sources
            )
            merged = t.average and len(inputs) > 1
            base = t.base_input
            if merged and base is not None:
                base = replace(base, key=relayer(base.key, sources[0][1]), layer=sources[0][1])
            tensors.append(replace(t, key=relayer(t.key, output), inputs=inputs if merged else inputs[:1],
                                   average=merged, base_input=base if merged else None))
    return replace(plan, tensors=[*tensors, *after])


def align(
    layouts: list[Layout], exclude: list[str] | tuple[str, ...] = (), base: Layout | None = None
) -> MergePlan:
    """Build the merge plan, or raise :class:`AlignmentError` naming the key, shapes and files.

    Args:
        layouts: the ingredients, first one canonical.
        exclude: glob patterns of keys not to average; the soup takes them from the
            first ingredient as they are (e.g. ``head.*`` for heads of different classes).
        base: the base model, for methods that need it: every averaged tensor must be in
            it with the ingredients' shape (messages call it "the base"); it may lack excluded keys.
    """
    reference = layouts[0]
    plans: list[list[str]] = [list(reference.metas)]
    notes: list[str] = []
    for other in layouts[1:]:
        plans.append(_map_keys(reference, other, exclude, notes))
    base_label = base.label if base is not None else None
    if base is not None:
        base = replace(base, label=f"the base {base.label}")
        base_keys = _map_keys(reference, base, exclude, notes)
    tensors: list[TensorPlan] = []
    excluded: list[str] = []
    for index, key in enumerate(reference.metas):
        meta = reference.metas[key]
        is_excluded = _excluded(key, exclude)
        if is_excluded:
            excluded.append(key)
        else:
            for other, keys in zip(layouts[1:], plans[1:]):
                _check_pair(reference, other, key, keys[index])
            if base is not None:
                _check_pair(reference, base, key, base_keys[index])
        average = meta.dtype.is_floating_point and not is_excluded
        tensors.append(
            TensorPlan.aligned(
                key, meta, [keys[index] for keys in plans], average,
                base_source=base_keys[index] if base is not None and average else None,
            )
        )
    return MergePlan(tensors=tensors, excluded=excluded, notes=notes, base=base_label)


def _excluded(key: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _map_keys(reference: Layout, other: Layout, exclude: list[str] | tuple[str, ...], notes: list[str]) -> list[str]:
    """For each reference key, the key to read in ``other``; raise when some have no match."""
    theirs = set(other.metas)
    rename = _prefix_rename(reference, other)
    if rename is not None:
        old, new = rename
        notes.append(f"{other.label}: read keys with prefix {old!r} as {new!r}")
    tied = _tie_map(reference, other)
    mapped: list[str] = []
    missing: list[str] = []
    for key in reference.metas:
        candidate = key
        if rename is not None and key.startswith(rename[1]):
            candidate = rename[0] + key[len(rename[1]) :]
        if candidate not in theirs:
            candidate = tied.get(key, candidate)
            if candidate in theirs and candidate != key:
                notes.append(f"{other.label}: {key!r} is tied to {candidate!r} there")
        if candidate not in theirs and not _excluded(key, exclude):
            missing.append(key)
        mapped.append(candidate)
    used = set(mapped)
    tied_extra = {k for group in other.aliases for k in group} | {k for group in reference.aliases for k in group}
    extra = [k for k in other.metas if k not in used and k not in tied_extra and not _excluded(k, exclude)]
    if missing or extra:
        raise AlignmentError(_key_mismatch_message(reference, other, missing, extra), hint=_key_hint(missing, extra))
    return mapped


def _prefix_rename(reference: Layout, other: Layout) -> tuple[str, str] | None:
    """Detect a whole-model prefix that one side has and the other lacks (e.g. Lightning's ``model.``)."""
    ours, theirs = set(reference.metas), set(other.metas)
    if ours & theirs or not ours or not theirs:
        return None
    for a, b, swap in ((ours, theirs, False), (theirs, ours, True)):
        first = next(iter(b)).split(".", 1)[0] + "."
        if all(k.startswith(first) for k in b) and {k[len(first) :] for k in b} == a:
            return (first, "") if not swap else ("", first)
    return None


def _tie_map(reference: Layout, other: Layout) -> dict[str, str]:
    """Reference key -> another key of the same tied group, from either side's saved ties."""
    result: dict[str, str] = {}
    for group in reference.aliases + other.aliases:
        for key in group:
            for alias in group:
                if alias != key and alias in other.metas:
                    result.setdefault(key, alias)
    return result


def _key_mismatch_message(reference: Layout, other: Layout, missing: list[str], extra: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys of {reference.label} are missing in {other.label}, e.g. {missing[0]!r}")
    if extra:
        parts.append(f"{len(extra)} keys of {other.label} are not in {reference.label}, e.g. {extra[0]!r}")
    return "cannot align the ingredients: " + "; ".join(parts)


def _key_hint(missing: list[str], extra: list[str]) -> str:
    keys = missing + extra
    if all(any(h in k for h in _HEAD_HINTS) for k in keys):
        return "only head keys differ: use --exclude with their pattern (the soup keeps the first ingredient's head)"
    return "the ingredients are different architectures; a soup needs models of one architecture (run `hub-soup inspect` on them)"


def _check_pair(reference: Layout, other: Layout, key: str, their_key: str) -> None:
    ours, theirs = reference.metas[key], other.metas[their_key]
    where = key if key == their_key else f"{key} ({their_key} in {other.label})"
    if ours.shape != theirs.shape:
        head = any(h in key for h in _HEAD_HINTS)
        vocabulary = ours.shape[1:] == theirs.shape[1:] and any(h in key for h in _TOKEN_HINTS)
        hint = SOURCE_HINT if vocabulary else (
            f"different num_classes: use --exclude '{key.rsplit('.', 1)[0]}.*' to keep the first ingredient's head, "
            "or fine-tune heads to the same classes"
            if head
            else "the ingredients are different architectures or sizes; a soup needs one architecture"
        )
        raise AlignmentError(
            f"shape mismatch at {where}: {ours.describe()} in {reference.label} vs {theirs.describe()} in {other.label}",
            hint=hint,
        )
    if ours.dtype.is_floating_point != theirs.dtype.is_floating_point:
        raise AlignmentError(
            f"dtype mismatch at {where}: {ours.describe()} in {reference.label} vs {theirs.describe()} in {other.label}",
            hint="a floating tensor cannot be averaged with an integer one; are these the same model?",
        )
