"""A :class:`~hub_soup.merging.vocab.Vocabulary` carried into the merge plan: token-indexed tensors gathered by token.

Every tensor indexed by token (``embed_tokens``, ``lm_head`` tied or not, any tensor outside the
layers whose first dimension is the model's ``vocab_size``) becomes, per input, a row selection
in the soup's vocabulary (:attr:`~hub_soup.merging.plan.Input.rows`); rows an input lacks are its
:attr:`~hub_soup.merging.plan.Input.fills`, whose values (a few rows: a donor's row, an average, a
padding row's mean) are computed once from the checkpoints (:func:`fill_rows`) before anything is
merged. The engine then streams those tensors like any other, so the method merges each model's
permuted tensor, as mergekit's ``PermutedVocabulary`` hands them to it.

Each fill is computed in float64 and stored in the filling input's dtype: it *is* that model's
row of the token, as mergekit makes it before merging.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hub_soup.errors import AlignmentError
from hub_soup.io import direct_io
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.plan import BASE, Input, Layout, MergePlan, TensorPlan, layer_of
from hub_soup.merging.vocab import (
    TOKENIZER_FILES,
    TokenizerChoice,
    TokenizerFiles,
    Vocabulary,
    choose_vocabulary,
    read_tokenizer,
    vocab_size,
)

# Rows of a tensor read at a time when a padding row's mean is computed.
_MEAN_CHUNK_BYTES = 8 << 20


def token_keys(metas: Mapping[str, TensorMeta], rows: int) -> list[str]:
    """The tensors of a model indexed by token: outside the layers, first dimension its ``vocab_size``."""
    return [key for key, meta in metas.items() if meta.shape and meta.shape[0] == rows and layer_of(key) is None]


def vocabulary_of(
    checkpoints: Sequence[Checkpoint], base: Checkpoint | None, choice: TokenizerChoice, names: Sequence[str],
) -> Vocabulary:
    """The soup's vocabulary, from each opened model's tokenizer files and ``config.json`` (its embedding rows);
    ``names``: the ingredients as the recipe names them (what a source or an override may name).

    Raises:
        AlignmentError: as :func:`vocabulary_from`.
    """
    models = {**dict(enumerate(checkpoints)), **({BASE: base} if base is not None else {})}
    return vocabulary_from({i: ModelFiles(c.label, c.config, c.sidecars) for i, c in models.items()}, choice, names)


@dataclass(frozen=True)
class ModelFiles:
    """What a model's vocabulary is read from: its ``config.json`` and its tokenizer files (opened, or fetched
    alone from the Hub before any weights)."""

    label: str
    config: Mapping[str, Any] | None
    files: Sequence[Path]


def vocabulary_from(models: Mapping[int, ModelFiles], choice: TokenizerChoice, names: Sequence[str]) -> Vocabulary:
    """The soup's vocabulary from each model's files (ingredients ``0 .. n-1``, the base as :data:`BASE`).

    Raises:
        AlignmentError: a model has no ``vocab_size`` in its config, or no tokenizer files.
    """
    sizes = {}
    for index, model in models.items():
        size = vocab_size(model.config)
        if size is None:
            raise AlignmentError(
                f"{model.label} has no vocab_size in a config.json: its token-indexed tensors are unknown",
                hint="give every model its config.json, or merge ingredients of one vocabulary",
            )
        sizes[index] = size
    labels = {**dict(enumerate(names)), **({BASE: "base"} if BASE in models else {})}
    tokenizers: dict[int, TokenizerFiles] = {}
    read: dict[tuple[tuple[str, bytes], ...], TokenizerFiles] = {}  # by content: fine-tunes often share files
    for index, model in models.items():  # one at a time, each holding the first's strings where they agree
        contents = tuple((p.name, hashlib.sha256(p.read_bytes()).digest()) for p in model.files
                         if p.name in TOKENIZER_FILES)
        if contents not in read:
            tokenizer = read_tokenizer(model.files, model.label)
            read[contents] = tokenizer.sharing(next(iter(read.values()))) if read else tokenizer
            del tokenizer
        tokenizers[index] = read[contents]
    return choose_vocabulary(tokenizers, sizes, labels, choice)


def resized(layout: Layout, rows: int, size: int) -> Layout:
    """``layout`` with its token-indexed tensors (``rows`` rows) as the soup's (``size`` rows): so alignment
    compares everything else, and the vocabulary is :func:`with_vocabulary`'s."""
    keys = set(token_keys(layout.metas, rows))
    metas = {key: TensorMeta(m.dtype, (size, *m.shape[1:])) if key in keys else m for key, m in layout.metas.items()}
    return replace(layout, metas=metas)


def own_rows(plan: MergePlan, keys: Sequence[str], rows: int) -> MergePlan:
    """``plan`` (aligned on :func:`resized` layouts, rows not gathered) with its token-indexed tensors (``keys``,
    canonical) at ``rows`` rows: one model's own tensors as it saved them (``rows``: its ``vocab_size``), read
    whole, to be scored in a model of its own."""
    wanted = set(keys)
    return replace(plan, tensors=[
        replace(t, meta=TensorMeta(t.meta.dtype, (rows, *t.meta.shape[1:]))) if t.key in wanted else t
        for t in plan.tensors
    ])


def with_vocabulary(plan: MergePlan, vocabulary: Vocabulary, keys: Sequence[str]) -> MergePlan:
    """``plan`` (aligned on :func:`resized` layouts) with each token-indexed tensor (``keys``, canonical) read
    row by row in the soup's vocabulary, rows an input lacks filled (values still to be computed)."""
    wanted = set(keys)
    tensors = []
    for tensor in plan.tensors:
        if tensor.key not in wanted:
            tensors.append(tensor)
            continue
        tensor = tensor.gathered([vocabulary.rows[i.ingredient] for i in tensor.inputs])
        tensor = replace(tensor, inputs=tuple(replace(i, fills=vocabulary.fills[i.ingredient]) for i in tensor.inputs))
        if tensor.base_input is not None:
            tensor = replace(tensor, base_input=replace(
                tensor.base_input, rows=vocabulary.rows[BASE], fills=vocabulary.fills[BASE]))
        tensors.append(tensor)
    return replace(plan, tensors=tensors)


def fill_rows(plan: MergePlan, checkpoints: Sequence[Checkpoint], base: Checkpoint | None) -> MergePlan:
    """``plan`` with every fill's value computed (:attr:`~hub_soup.merging.plan.Input.filled`): each read
    row once, in float64, averaged, rounded once to the filling input's dtype; a padding row's mean over
    the input's permuted rows of the vocabulary (one more read of that tensor)."""
    models = {**dict(enumerate(checkpoints)), **({BASE: base} if base is not None else {})}
    tensors = []
    for tensor in plan.tensors:
        if not any(i.fills for i in _inputs(tensor)):
            tensors.append(tensor)
            continue
        keys = {i.ingredient: i.key for i in _inputs(tensor)}
        inputs = tuple(_filled(i, tensor, keys, models) for i in tensor.inputs)
        base_input = _filled(tensor.base_input, tensor, keys, models) if tensor.base_input is not None else None
        tensors.append(replace(tensor, inputs=inputs, base_input=base_input))
    return replace(plan, tensors=tensors)


def _inputs(tensor: TensorPlan) -> list[Input]:
    return [*tensor.inputs, *([tensor.base_input] if tensor.base_input is not None else [])]


def _filled(source: Input, tensor: TensorPlan, keys: Mapping[int, str], models: Mapping[int, Checkpoint]) -> Input:
    """``source`` with its fills' values, in its stored dtype."""
    if not source.fills:
        return source
    row_numel = tensor.row_numel
    dtype = models[source.ingredient].metas[source.key].dtype
    values = torch.zeros(len(source.fills), row_numel, dtype=torch.float64)
    for j, fill in enumerate(source.fills):
        for ingredient, row in fill.rows:
            values[j] += _row(models[ingredient], keys[ingredient], row, row_numel)
        if fill.rows:
            values[j] /= len(fill.rows)
    filled = values.to(dtype)
    means = [j for j, fill in enumerate(source.fills) if fill.mean]
    if means:
        assert source.rows is not None
        filled[means] = _mean(source, models[source.ingredient], filled, row_numel).to(dtype)
    return replace(source, filled=filled)


def _row(checkpoint: Checkpoint, key: str, row: int, row_numel: int) -> torch.Tensor:
    """Row ``row`` of ``key`` in ``checkpoint``, in float64."""
    dtype = checkpoint.metas[key].dtype
    buffer = direct_io.aligned_buffer(direct_io.padded(row_numel * dtype.itemsize))
    return checkpoint.read_into(key, row * row_numel, row_numel, buffer).to(torch.float64)


def _mean(source: Input, checkpoint: Checkpoint, filled: torch.Tensor, row_numel: int) -> torch.Tensor:
    """The mean, in float64, of ``source``'s rows that are tokens (not padding): its own rows as stored,
    the others as filled (mergekit's ``avg_embed`` of each permuted tensor)."""
    assert source.rows is not None
    padding = {j for j, fill in enumerate(source.fills) if fill.mean}
    tokens = [r for r in source.rows if r >= 0 or -1 - r not in padding]
    stored = checkpoint.metas[source.key]
    counts = torch.zeros(stored.shape[0], dtype=torch.float64)
    used = torch.tensor([r for r in tokens if r >= 0], dtype=torch.long)
    counts.index_add_(0, used, torch.ones(used.numel(), dtype=torch.float64))
    total = torch.zeros(row_numel, dtype=torch.float64)
    for r in tokens:
        if r < 0:
            total += filled[-1 - r].to(torch.float64)
    step = max(1, _MEAN_CHUNK_BYTES // (row_numel * stored.dtype.itemsize))
    buffer = direct_io.aligned_buffer(direct_io.padded(step * row_numel * stored.dtype.itemsize))
    for first in range(0, stored.shape[0], step):
        count = min(step, stored.shape[0] - first)
        chunk = checkpoint.read_into(source.key, first * row_numel, count * row_numel, buffer).view(count, row_numel)
        total += counts[first : first + count] @ chunk.to(torch.float64)
    return total / len(tokens)
