"""Open any checkpoint people really have, as one lazily read set of clean keys.

A :class:`Checkpoint` hides where tensors live (one safetensors file, shards
behind an index, a ``pytorch_model.bin``, a ``.pth.tar`` training checkpoint
with ``state_dict``/``state_dict_ema``, a ``torch.compile``/DDP-wrapped model)
behind clean state_dict keys, and reads them chunk by chunk. What is the same
for every format lives here: which file of a folder holds the weights, shard
indexes, clean keys. What differs (sniffing a file's bytes, opening it, pickles
refused unless the user passes ``allow_pickle``) is each format's, in
:mod:`hub_soup.io.formats`, so a wrong file gets a precise message naming the
known formats instead of a stack trace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hub_soup.errors import CheckpointFormatError
from hub_soup.io import files, formats
from hub_soup.io.formats import OpenOptions, TensorFile, TensorSource
from hub_soup.io.safetensors_io import TensorMeta

# Wrapper components that are never part of a model's own names.
DDP_PREFIX = "module."
COMPILE_COMPONENT = "_orig_mod."


@dataclass
class Checkpoint:
    """One ingredient: tensors under clean keys, with where they came from.

    Attributes:
        label: how the user named it (a path or a Hub reference), used in messages.
        path: the file or folder that was opened.
        format: what its format calls it (:attr:`hub_soup.io.formats.TensorFile.format`):
            ``safetensors``, ``safetensors-sharded``, ``pytorch``, ``pytorch-sharded``, ``torch-pickle``,
            or a plugin format's.
        metas: dtype and shape of each tensor, under its clean key, in file order.
        aliases: groups of keys that share storage (tied weights), as saved.
        sidecars: config/tokenizer/preprocessor files found beside the weights.
        notes: what was done to read it (prefixes stripped, EMA chosen, ...).
    """

    label: str
    path: Path
    format: str
    metas: dict[str, TensorMeta]
    aliases: list[tuple[str, ...]] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _where: dict[str, tuple[TensorSource, str]] = field(default_factory=dict, repr=False)
    _sources: list[TensorSource] = field(default_factory=list, repr=False)

    def read_into(self, key: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start+count)`` of ``key``, flattened (see SafetensorsReader.read_into)."""
        source, raw = self._where[key]
        return source.read_into(raw, start, count, buffer)

    def read(self, key: str) -> torch.Tensor:
        """One whole tensor."""
        source, raw = self._where[key]
        return source.read(raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in memory, under clean keys (for evaluation of small models)."""
        return {key: self.read(key) for key in self.metas}

    @property
    def num_elements(self) -> int:
        """Numbers in every tensor: parameters and buffers (a state dict does not say which is which)."""
        return sum(meta.numel for meta in self.metas.values())

    @property
    def config(self) -> dict[str, Any] | None:
        """The ``config.json`` beside the weights, if any."""
        for path in self.sidecars:
            if path.name == "config.json":
                return json.loads(path.read_text())
        return None

    def close(self) -> None:
        for source in self._sources:
            source.close()
        self._sources.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: str | Path,
    *,
    label: str | None = None,
    allow_pickle: bool = False,
    ema: bool = True,
    sidecars: list[Path] | None = None,
    weights: str | None = None,
) -> Checkpoint:
    """Open a checkpoint file or folder without reading its tensors.

    Args:
        path: a weights file, or a folder as saved by ``save_pretrained`` / timm's
            ``push_to_hf_hub`` / a training script.
        label: the name to use in messages (defaults to the path).
        allow_pickle: allow torch pickles that need arbitrary code to load
            (a whole pickled ``nn.Module``). Only for files you trust.
        ema: when a training checkpoint holds EMA weights next to the raw ones, use
            the EMA ones (timm's default); ``False`` takes the raw weights.
        sidecars: config/tokenizer files that go with a weights *file* (a folder's
            are found in it).
        weights: the weights file to open in a folder, by name, instead of the one found in it
            (a PEFT adapter's ``adapter_model.safetensors`` beside a trainer's other files).
    """
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise CheckpointFormatError(f"{label}: no such file or folder")
    if path.is_dir():
        found, sidecars = path / weights if weights else _find_weights(path, label), _find_sidecars(path)
    else:
        found, sidecars = path, sidecars or []
    options = OpenOptions(allow_pickle=allow_pickle, ema=ema)
    if found.name.endswith(formats.INDEX_SUFFIX):
        checkpoint = _open_index(found, label, options)
    else:
        opened = formats.sniff(found).open(found, label, options)
        checkpoint = _checkpoint(label, found, opened.format, [opened])
    checkpoint.path = path
    checkpoint.sidecars = sidecars
    return checkpoint


def _find_weights(folder: Path, label: str) -> Path:
    """The weights of a folder: a format's standard names first, else its only weights file."""
    chosen = formats.choose_weights(
        [p.name for p in folder.iterdir() if p.is_file()], label,
        none_hint="pass the weights file itself, or a folder saved with save_pretrained / timm",
        several_hint="pass the one file you mean",
    )
    return folder / chosen[0]


def _find_sidecars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and files.is_sidecar(p.name))


def _open_index(index_path: Path, label: str, options: OpenOptions) -> Checkpoint:
    """Sharded weights: validate the index, then open every shard it names (each sniffed on its own)."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
        if not weight_map:
            raise ValueError("its weight_map names no tensors")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{index_path}: not a valid shard index ({exc})") from None
    shard_names = sorted(set(weight_map.values()))
    for name in shard_names:
        if name != Path(name).name or name in ("", ".", "..") or "\\" in name:
            raise CheckpointFormatError(
                f"{index_path}: refuses shard {name!r}: shards must be plain file names beside the index",
                hint="the index points outside its folder; do not use this repository",
            )
        if not (index_path.parent / name).is_file():
            raise CheckpointFormatError(f"{index_path}: shard {name} is missing", hint="download the repo again")
    shards: list[TensorFile] = []
    shard_formats: list[formats.CheckpointFormat] = []
    try:
        for name in shard_names:
            shard = index_path.parent / name
            shard_formats.append(formats.sniff(shard))
            shards.append(shard_formats[-1].open(shard, f"{label}/{name}", options))
        # The index names tensors as saved (``module.x``): keep, per name, the tensor of the shard it names.
        holder = dict(zip(shard_names, shards))
        missing = [key for key, shard_name in weight_map.items() if key not in holder[shard_name].metas]
        if missing:
            raise CheckpointFormatError(
                f"{index_path}: {len(missing)} tensors named in the index are not in their shard, e.g. {missing[0]!r}",
                hint="the shards and the index do not belong together; download the repo again",
            )
    except BaseException:  # the shards opened so far hold file descriptors
        for opened in shards:
            opened.source.close()
        raise
    sharded = min(shard_formats, key=lambda fmt: fmt.preference).sharded_format()
    # Keep the index's order: transformers writes it sorted, shards hold each part in order.
    order = {key: holder[shard_name] for key, shard_name in weight_map.items()}
    return _checkpoint(label, index_path, sharded, shards, order)


def _checkpoint(
    label: str, path: Path, fmt: str, opened: list[TensorFile], order: Mapping[str, TensorFile] | None = None
) -> Checkpoint:
    """Build a Checkpoint of the files ``opened``, renaming keys through :func:`clean_keys` in one place.

    Args:
        order: which file holds each saved name, in the checkpoint's order (a shard index's); default:
            the one file's names in its order.
    """
    order = order if order is not None else dict.fromkeys(opened[0].metas, opened[0])
    renamed, prefix_notes = clean_keys(list(order), label)
    clean = {saved: new for new, saved in renamed.items()}
    notes: list[str] = []
    for file in opened:
        notes.extend(note for note in file.notes if note not in notes)
    # tied names, each group restricted to the names its file holds for the checkpoint
    aliases = [kept for file in opened for group in file.aliases
               if len(kept := tuple(clean[k] for k in group if order.get(k) is file)) > 1]
    return Checkpoint(
        label=label,
        path=path,
        format=fmt,
        metas={new: order[saved].metas[saved] for new, saved in renamed.items()},
        aliases=aliases,
        notes=notes + prefix_notes,
        _where={new: (order[saved].source, saved) for new, saved in renamed.items()},
        _sources=[file.source for file in opened],
    )


def clean_keys(keys: list[str], label: str) -> tuple[dict[str, str], list[str]]:
    """Strip wrapper prefixes, like timm's ``clean_state_dict``: map clean key -> saved key.

    ``_orig_mod.`` (``torch.compile``) is dropped wherever it appears, since no
    model names a module that; ``module.`` (DDP/DataParallel) only when every key
    starts with it, since a real submodule may be called ``module``.
    """
    notes: list[str] = []
    cleaned = list(keys)
    if any(COMPILE_COMPONENT in k for k in cleaned):
        cleaned = [re.sub(r"(^|\.)_orig_mod\.", r"\1", k) for k in cleaned]
        notes.append("stripped torch.compile's '_orig_mod.'")
    while cleaned and all(k.startswith(DDP_PREFIX) for k in cleaned):
        cleaned = [k[len(DDP_PREFIX) :] for k in cleaned]
        notes.append("stripped DDP's 'module.' prefix")
    mapping: dict[str, str] = {}
    for new, old in zip(cleaned, keys):
        if new in mapping:
            raise CheckpointFormatError(f"{label}: keys {mapping[new]!r} and {old!r} both clean to {new!r}")
        mapping[new] = old
    return mapping, notes
