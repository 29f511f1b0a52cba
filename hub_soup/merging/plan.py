"""Map every ingredient's keys onto one canonical set, or stop before any averaging.

Alignment works on :class:`Layout` (names, dtypes, shapes and tied groups), which
can come from local files or from safetensors headers read over HTTP, so a
mismatch is found in seconds, before anything large is downloaded. The first
ingredient sets the canonical names, order and tied-weight convention. A base
model (the one the ingredients were fine-tuned from, for methods that need it)
has its own role: it is aligned like an ingredient, but it is not one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hub_soup.errors import AlignmentError
from hub_soup.io.safetensors_io import TensorMeta

# Names of classifier heads: a shape mismatch there usually means different num_classes.
_HEAD_HINTS = ("head", "classifier", "fc.", "lm_head", "score", "logits", "last_linear")


@dataclass(frozen=True)
class Layout:
    """What alignment needs to know of an ingredient: no tensor data."""

    label: str
    metas: dict[str, TensorMeta]
    aliases: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made."""

    key: str
    meta: TensorMeta  # the first ingredient's dtype and shape
    sources: tuple[str, ...]  # the key to read in each ingredient
    average: bool  # False: copied from the first ingredient (integer, bool, excluded)
    base_source: str | None = None  # the key to read in the base (None: no base, or not averaged)


@dataclass
class MergePlan:
    """One canonical key set and, for each key, where each ingredient keeps it."""

    tensors: list[TensorPlan]
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: str | None = None  # the base model's label, when one was aligned

    def select(self, indices: Sequence[int]) -> MergePlan:
        """The plan of the ingredients at ``indices`` only (in that order), as if only they had
        been aligned: the first of them gives the tensors that are copied (greedy's candidate soups)."""
        tensors = [replace(t, sources=tuple(t.sources[i] for i in indices)) for t in self.tensors]
        return replace(self, tensors=tensors)

    @property
    def copied(self) -> list[str]:
        """Keys taken from the first ingredient unchanged (integers, bools, excluded)."""
        return [t.key for t in self.tensors if not t.average]

    @property
    def has_batchnorm(self) -> bool:
        """BatchNorm running statistics among the tensors (what the card and the hints speak of)."""
        return any(t.key.endswith("running_var") for t in self.tensors)


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
            TensorPlan(
                key=key,
                meta=meta,
                sources=tuple(keys[index] for keys in plans),
                average=average,
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
        hint = (
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
