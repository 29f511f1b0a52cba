"""Open any checkpoint people really have, as one lazily read set of clean keys.

A :class:`Checkpoint` hides where tensors live (one safetensors file, shards
behind an index, a ``pytorch_model.bin``, a ``.pth.tar`` training checkpoint
with ``state_dict``/``state_dict_ema``, a ``torch.compile``/DDP-wrapped model)
behind clean state_dict keys, and reads them chunk by chunk. The format is
sniffed from the bytes, not trusted from the suffix, so a wrong file gets a
precise message instead of a stack trace. Pickles are loaded with
``weights_only=True``; anything that would run code is refused unless the user
passes ``allow_pickle``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from hub_soup.errors import CheckpointFormatError, UnsafePickleError
from hub_soup.io import files
from hub_soup.io.safetensors_io import SafetensorsReader, TensorMeta

# Sub-dicts of a training checkpoint that hold the model, most specific first
# (the names timm, Lightning, DeepSpeed and hand-written trainers use).
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
RAW_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
# Wrapper components that are never part of a model's own names.
DDP_PREFIX = "module."
COMPILE_COMPONENT = "_orig_mod."


class TensorSource(Protocol):
    """One physical file of tensors, read in chunks."""

    def read_into(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class _LoadedTensors:
    """Tensors from a torch pickle (memory-mapped when the file is a zip archive)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def read_into(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        tensor = self._tensors[name]
        if not tensor.is_contiguous():  # once: later chunks slice the contiguous copy
            tensor = self._tensors[name] = tensor.contiguous()
        return tensor.view(-1)[start : start + count]

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors.clear()


@dataclass
class Checkpoint:
    """One ingredient: tensors under clean keys, with where they came from.

    Attributes:
        label: how the user named it (a path or a Hub reference), used in messages.
        path: the file or folder that was opened.
        format: ``safetensors``, ``safetensors-sharded``, ``pytorch``, ``pytorch-sharded``
            or ``torch-pickle``.
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
        found, sidecars = [path / weights] if weights else _find_weights(path, label), _find_sidecars(path)
    else:
        found, sidecars = [path], sidecars or []
    if found[0].name.endswith(".index.json"):
        checkpoint = _open_index(found[0], label, allow_pickle, ema)
    else:
        checkpoint = _open_file(found[0], label, allow_pickle, ema)
    checkpoint.path = path
    checkpoint.sidecars = sidecars
    return checkpoint


def _find_weights(folder: Path, label: str) -> list[Path]:
    """The weights of a folder: the HF standard names first, else its only weights file."""
    for name in (files.SAFETENSORS_INDEX, files.SAFETENSORS_SINGLE, files.PYTORCH_INDEX, files.PYTORCH_SINGLE):
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and files.is_weight_file(p.name))
    safetensors = [p for p in candidates if p.name.endswith(files.SAFETENSORS_SUFFIXES)]
    candidates = safetensors or candidates  # safetensors preferred when both exist
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise CheckpointFormatError(
            f"{label}: no weights found (looked for *.safetensors, {', '.join('*' + s for s in files.PICKLE_SUFFIXES)})",
            hint="pass the weights file itself, or a folder saved with save_pretrained / timm",
        )
    raise CheckpointFormatError(
        f"{label}: several weights files and none is the standard name: {', '.join(p.name for p in candidates)}",
        hint="pass the one file you mean",
    )


def _find_sidecars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and files.is_sidecar(p.name))


def _sniff(path: Path) -> str:
    """``safetensors``, ``zip`` (torch >= 1.6) or ``pickle`` (legacy torch), from the bytes."""
    with path.open("rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    shown = head[:12]
    raise CheckpointFormatError(
        f"{path}: not a checkpoint: neither safetensors nor a torch file (it starts with {shown!r})",
        hint="pass a .safetensors, .bin, .pt, .pth, .pth.tar or .ckpt file, or the folder holding it",
    )


def _open_file(path: Path, label: str, allow_pickle: bool, ema: bool) -> Checkpoint:
    kind = _sniff(path)
    if kind == "safetensors":
        reader = SafetensorsReader(path)
        where = {name: (reader, name) for name in reader.header.tensors}
        return _checkpoint(label, path, "safetensors", reader.header.tensors, where, [reader], [])
    tensors, notes = _load_pickle(path, label, allow_pickle, ema, mmap=kind == "zip")
    source = _LoadedTensors(tensors)
    metas = {name: TensorMeta(t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    fmt = "pytorch" if path.name == files.PYTORCH_SINGLE else "torch-pickle"
    checkpoint = _checkpoint(label, path, fmt, metas, {n: (source, n) for n in metas}, [source], notes)
    checkpoint.aliases = _shared_storage_groups(tensors, checkpoint)
    return checkpoint


def _open_index(index_path: Path, label: str, allow_pickle: bool, ema: bool) -> Checkpoint:
    """Sharded weights: validate the index, then open every shard it names."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
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
    where: dict[str, tuple[TensorSource, str]] = {}
    metas: dict[str, TensorMeta] = {}
    sources: list[TensorSource] = []
    aliases: list[tuple[str, ...]] = []
    notes: list[str] = []
    sharded_format = "pytorch-sharded"
    for name in shard_names:
        shard = _open_file(index_path.parent / name, f"{label}/{name}", allow_pickle, ema)
        sources.extend(shard._sources)
        # The index names tensors as saved (``module.x``): match on saved names, and clean
        # them once for the whole checkpoint below (a shard's own prefix notes would repeat).
        saved = {key: shard._where[key][1] for key in shard.metas}
        aliases.extend(tuple(saved[k] for k in group) for group in shard.aliases)
        notes.extend(n for n in shard.notes if n not in notes and not n.startswith("stripped "))
        if shard.format == "safetensors":
            sharded_format = "safetensors-sharded"
        for key, meta in shard.metas.items():
            if weight_map.get(saved[key]) == name:
                metas[saved[key]], where[saved[key]] = meta, shard._where[key]
    missing = [key for key in weight_map if key not in metas]
    if missing:
        raise CheckpointFormatError(
            f"{index_path}: {len(missing)} tensors named in the index are not in their shard, e.g. {missing[0]!r}",
            hint="the shards and the index do not belong together; download the repo again",
        )
    # Keep the index's order: transformers writes it sorted, shards hold each part in order.
    ordered = {key: metas[key] for key in weight_map}
    checkpoint = _checkpoint(label, index_path, sharded_format, ordered, where, sources, notes)
    clean = {checkpoint._where[key][1]: key for key in checkpoint.metas}
    checkpoint.aliases = [tuple(clean[k] for k in group) for group in aliases]
    return checkpoint


def _checkpoint(
    label: str,
    path: Path,
    fmt: str,
    metas: Mapping[str, TensorMeta],
    where: Mapping[str, tuple[TensorSource, str]],
    sources: list[TensorSource],
    notes: list[str],
) -> Checkpoint:
    """Build a Checkpoint, renaming keys through :func:`clean_keys` in one place."""
    renamed, prefix_notes = clean_keys(list(metas), label)
    return Checkpoint(
        label=label,
        path=path,
        format=fmt,
        metas={new: metas[old] for new, old in renamed.items()},
        notes=notes + prefix_notes,
        _where={new: where[old] for new, old in renamed.items()},
        _sources=sources,
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


# Classes that training checkpoints hold besides tensors and that are safe to build:
# timm's train.py saves its argparse ``args`` in every ``.pth.tar``.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

_GLOBAL_RE = re.compile(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)")


def _load_pickle(
    path: Path, label: str, allow_pickle: bool, ema: bool, mmap: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``torch.load`` safely, then dig the state_dict out of whatever was saved."""
    notes: list[str] = []
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.search(str(exc))
        # The weights-only unpickler words every failure "Weights only load failed", a
        # corrupt opcode too: only a refused GLOBAL means the file wants to run code.
        if "Weights only load failed" not in str(exc) or found is None:
            raise _corrupt(path, exc) from None
        what = f" (it needs {found.group(1)})"
        if not allow_pickle:
            raise UnsafePickleError(
                f"{label}: {path.name} is a pickle that runs code when loaded{what}; refusing to load it",
                hint="this is how a whole pickled nn.Module (torch.save(model)) looks. Loading it executes "
                "whatever code the file names, so only if you trust its author: pass --allow-pickle "
                "(Python: allow_pickle=True). Better: save model.state_dict() or use safetensors",
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except (ImportError, AttributeError) as import_exc:
            raise CheckpointFormatError(
                f"{label}: {path.name} needs code that is not installed to load ({import_exc})",
                hint="install the package that defined the model, or save its state_dict instead",
            ) from None
        except Exception as load_exc:  # noqa: BLE001  (not caught by the handlers below: we are inside one)
            raise _corrupt(path, load_exc) from None
        notes.append("loaded with --allow-pickle (code in the file was executed)")
    except Exception as exc:  # noqa: BLE001  (torch raises RuntimeError, EOFError, ValueError... for broken files)
        raise _corrupt(path, exc) from None
    return _find_state_dict(obj, label, ema, notes), notes


def _corrupt(path: Path, exc: Exception) -> CheckpointFormatError:
    truncated = isinstance(exc, EOFError) or "central directory" in str(exc) or "truncated" in str(exc).lower()
    what = "truncated" if truncated else "corrupt"
    return CheckpointFormatError(
        f"{path}: the torch checkpoint is {what} and cannot be read ({exc.__class__.__name__}: {str(exc)[:200]})",
        hint="download or copy the file again",
    )


def _holds_weights(value: Any) -> bool:
    """A module, a tensor dict, or a dict wrapping one (``{"ema": {"decay": ..}}`` is none of these)."""
    if isinstance(value, torch.nn.Module):
        return True
    if not isinstance(value, Mapping):
        return False
    return any(isinstance(v, torch.Tensor) for v in value.values()) or any(
        _holds_weights(value.get(k)) for k in EMA_KEYS + RAW_KEYS if k in value
    )


def _find_state_dict(obj: Any, label: str, ema: bool, notes: list[str]) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style checkpoints and whole modules to a flat tensor dict."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}: a few levels, never unbounded
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
            notes.append("took the state_dict of a pickled nn.Module")
            continue
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        keys = (EMA_KEYS if ema else ()) + RAW_KEYS
        inner = next((k for k in keys if _holds_weights(obj.get(k))), None)
        if inner is None:
            break
        has_ema = [k for k in EMA_KEYS if k in obj]
        note = f"used the checkpoint's {inner!r} entry"
        if has_ema and inner not in EMA_KEYS:
            note += f" (raw weights; it also holds EMA weights in {has_ema[0]!r})"
        notes.append(note)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{label}: holds a {type(obj).__name__}, not a state_dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(
            f"{label}: no tensors found; top-level keys: {', '.join(map(str, list(obj)[:10]))}",
            hint="pass a file that holds a model's state_dict",
        )
    skipped = len(obj) - len(tensors)
    if skipped:
        notes.append(f"ignored {skipped} non-tensor entries")
    return tensors


def _shared_storage_groups(tensors: Mapping[str, torch.Tensor], checkpoint: Checkpoint) -> list[tuple[str, ...]]:
    """Keys saved as views of one storage (tied weights such as lm_head/embeddings), by clean key."""
    saved_to_clean = {checkpoint._where[k][1]: k for k in checkpoint.metas}
    groups: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0 or name not in saved_to_clean:
            continue
        ident = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())
        groups.setdefault(ident, []).append(saved_to_clean[name])
    return [tuple(group) for group in groups.values() if len(group) > 1]
