"""Torch pickles: ``pytorch_model.bin`` (and its shard index), ``.pt``, ``.pth``, ``.pth.tar``, ``.ckpt``.

Loaded with ``torch.load(weights_only=True)`` (memory-mapped when the file is a
zip archive), which builds tensors and plain containers only; a file that needs
more (a whole pickled ``nn.Module``) would run code, and is refused unless the
user passes ``allow_pickle``. Training checkpoints wrap the model's tensors
(``{"state_dict": ..., "state_dict_ema": ...}``, a pickled module): the
state_dict is dug out of them, EMA weights first unless told otherwise.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hub_soup.errors import CheckpointFormatError, UnsafePickleError
from hub_soup.io.formats import CheckpointFormat, InMemory, OpenOptions, TensorFile
from hub_soup.io.safetensors_io import TensorMeta

# Sub-dicts of a training checkpoint that hold the model, most specific first
# (the names timm, Lightning, DeepSpeed and hand-written trainers use).
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
RAW_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 saves a zip archive; older torch a bare pickle (protocol 2 to 5)


class TorchPickle(CheckpointFormat):
    """What ``torch.save`` writes: a zip archive holding a pickle, or (legacy) the pickle itself."""

    name = "torch"
    description = "a torch file"
    suffixes = (".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".tar")
    single_name = "pytorch_model.bin"
    index_name = "pytorch_model.bin.index.json"
    shard_pattern = "pytorch_model-*-of-*.bin"
    sharded = "pytorch-sharded"
    preference = 20  # after safetensors: a pickle is only read when no safer file is there

    def sniff(self, head: bytes) -> bool:
        return head[:4] == ZIP_MAGIC or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5)

    def open(self, path: Path, label: str, options: OpenOptions) -> TensorFile:
        with path.open("rb") as f:
            mmap = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        tensors, notes = _load_pickle(path, label, options.allow_pickle, options.ema, mmap=mmap)
        metas = {name: TensorMeta(t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        fmt = "pytorch" if path.name == self.single_name else "torch-pickle"
        return TensorFile(fmt, metas, InMemory(tensors), _shared_storage_groups(tensors), notes)


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


def _shared_storage_groups(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Names saved as views of one storage (tied weights such as lm_head/embeddings)."""
    groups: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())
        groups.setdefault(ident, []).append(name)
    return [tuple(group) for group in groups.values() if len(group) > 1]
