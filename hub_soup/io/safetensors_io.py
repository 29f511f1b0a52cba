"""Read safetensors headers strictly and stream tensors in and out in chunks.

Why not ``safetensors.safe_open``? It is correct but hands back whole tensors
(or mmap-backed views that put every input page into RSS), while the merge loop
wants to read *chunks* of each tensor into buffers it reuses, so memory stays
flat whatever the number or size of ingredients. Files come from strangers on
the Hub, so the header is validated before any byte of data is trusted: its
length is bounded, every offset must lie in the file, tensors must tile the
data region exactly, and each byte count must match dtype x shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hub_soup.errors import CheckpointFormatError
from hub_soup.io import direct_io

# The safetensors reference implementation refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """What is known of a tensor before reading it: enough to plan and align."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def describe(self) -> str:
        """``float16[64, 3, 3, 3]``: the spelling used in every message."""
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order with their absolute byte offsets."""

    tensors: dict[str, TensorMeta]
    offsets: dict[str, int]  # absolute offset in the file of each tensor's first byte
    metadata: dict[str, str]


def parse_header(raw: bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Validate a header (the JSON after the 8-byte length) against the file size.

    Args:
        raw: the header bytes.
        file_size: total size of the file, to check that the data is all there.
        where: the file's name, used in every message.
    """
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError: JSONDecodeError, and integers past Python's 4300-digit limit;
    # RecursionError: arrays or objects nested thousands deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointFormatError(
            f"{where}: the safetensors header is not valid UTF-8 JSON ({exc.__class__.__name__}: {exc})",
            hint="the file is corrupt or not a safetensors file; download it again",
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointFormatError(f"{where}: __metadata__ must map strings to strings")

    tensors: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        meta, begin, end = _parse_entry(name, entry, where)
        tensors[name] = meta
        spans.append((begin, end, name))

    # Tensors must tile [0, data_size) exactly: no gap, no overlap, nothing outside.
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            kind = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CheckpointFormatError(f"{where}: tensor {name!r} at bytes {begin}-{end} {kind}")
        position = end
    data_size = file_size - data_start
    if position != data_size:
        if position > data_size:
            raise CheckpointFormatError(
                f"{where}: truncated: the header describes {position} bytes of data, the file holds {data_size}",
                hint="the download or copy was cut short; fetch the file again",
            )
        raise CheckpointFormatError(
            f"{where}: {data_size - position} bytes after the last tensor are not described by the header"
        )
    offsets = {name: data_start + begin for begin, _, name in spans}  # file order
    return SafetensorsHeader({name: tensors[name] for name in offsets}, offsets, dict(metadata))


def _parse_entry(name: str, entry: object, where: str) -> tuple[TensorMeta, int, int]:
    """Check one tensor entry: known dtype, sane shape, offsets matching its byte count."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointFormatError(f"{where}: tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise CheckpointFormatError(f"{where}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    meta = TensorMeta(dtype, tuple(shape))
    if offsets[1] - offsets[0] != meta.nbytes:
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} is {meta.describe()} = {meta.nbytes} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]} bytes"
        )
    return meta, offsets[0], offsets[1]


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a local safetensors file (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _read_header_from(f, size, str(path))
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_header_from(f: BinaryIO, size: int, where: str) -> SafetensorsHeader:
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointFormatError(f"{where}: {size} bytes is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CheckpointFormatError(
            f"{where}: the safetensors header claims {length} bytes but the file holds {size}",
            hint="the file is truncated, corrupt or not a safetensors file",
        )
    return parse_header(f.read(length), size, where)


class SafetensorsReader:
    """Random access to one safetensors file, chunk by chunk, into caller-owned buffers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)
        # Decided, and the O_DIRECT descriptor opened, at the first chunk read (reader threads share this object).
        self._direct: bool | None = None if direct_io.ENABLED else False
        self._direct_fd: int | None = None
        self._decide_lock = threading.Lock()

    def read_into(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Read elements ``[start, start+count)`` of tensor ``name`` (flattened).

        Args:
            buffer: a uint8 tensor of at least ``count * itemsize`` bytes that the
                caller reuses from chunk to chunk: no allocation happens here. If it
                is page-aligned with :func:`~hub_soup.io.direct_io.padded` room
                (:func:`~hub_soup.io.direct_io.aligned_buffer`), data that is not in
                the page cache is read around it (see :mod:`hub_soup.io.direct_io`).

        Returns:
            A 1-D view of ``buffer`` with the tensor's dtype and ``count`` elements,
            at its start or, after a direct read, up to a page into it.
        """
        meta = self.header.tensors[name]
        itemsize = meta.dtype.itemsize
        nbytes = count * itemsize
        if nbytes == 0:
            return buffer[:0].view(meta.dtype)
        offset = self.header.offsets[name] + start * itemsize
        if self._direct is not False and direct_io.can_read_into(buffer, offset, nbytes, itemsize):
            if self._direct is None:
                self._decide()
            if self._direct:
                at = self._read_direct(offset, nbytes, buffer, name)
                if at is not None:
                    return buffer[at : at + nbytes].view(meta.dtype)
        view = buffer.numpy().data.cast("B")[:nbytes]
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise self._truncated(name)
            done += got
        return buffer[:nbytes].view(meta.dtype)

    def _decide(self) -> None:
        """Whether this file's reads go around the page cache: decided once, for the whole file.

        Not chunk by chunk: a buffered read starts the kernel's read-ahead, which
        caches the next chunks, which then look cached and are read buffered too,
        so one partly cached chunk (the pages read with the header) would turn a
        whole cold file back into page-cache reads.
        """
        with self._decide_lock:
            if self._direct is not None:
                return
            cached = direct_io.cached_fraction(self._fd, 0, max(os.fstat(self._fd).st_size, 1))
            if cached is not None and cached < 0.5:
                with contextlib.suppress(OSError):  # no O_DIRECT on this filesystem: the page cache it is
                    self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            self._direct = self._direct_fd is not None

    def _read_direct(self, offset: int, nbytes: int, buffer: torch.Tensor, name: str) -> int | None:
        """Read with ``O_DIRECT``: where the data starts in ``buffer``, or ``None`` to read buffered instead."""
        assert self._direct_fd is not None
        try:
            at = direct_io.read_direct(self._direct_fd, offset, nbytes, buffer)
        except OSError:  # alignment rules stricter than direct_io.ALIGN: the page cache it is
            self._direct = False
            return None
        if at < 0:
            raise self._truncated(name)
        return at

    def _truncated(self, name: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path}: file ended while reading {name!r} (truncated?)")

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, freshly allocated (for evaluation and small models)."""
        meta = self.header.tensors[name]
        buffer = torch.empty(meta.nbytes, dtype=torch.uint8)
        return self.read_into(name, 0, meta.numel, buffer).reshape(meta.shape)

    def close(self) -> None:
        os.close(self._fd)
        if self._direct_fd is not None:
            os.close(self._direct_fd)


class SafetensorsWriter:
    """Write a safetensors file whose header is known up front, tensor data streamed after it.

    The merge knows every output name, dtype and shape before reading any data
    (they come from the inputs' headers), so the header goes first and the data
    follows in chunks, in header order: the output never has to sit in memory.
    """

    def __init__(self, path: Path, tensors: Mapping[str, TensorMeta], metadata: Mapping[str, str]) -> None:
        self.path = path
        entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        position = 0
        for name, meta in tensors.items():
            if meta.dtype not in DTYPE_NAMES:
                raise CheckpointFormatError(f"{name!r}: dtype {meta.dtype} cannot be stored in safetensors")
            entries[name] = {
                "dtype": DTYPE_NAMES[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [position, position + meta.nbytes],
            }
            position += meta.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
        self._expected = position
        self._header_bytes = 8 + len(raw)
        self._file = direct_io.DirectFile(path, self._header_bytes + position)
        try:
            self.write(torch.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw), dtype=torch.uint8))
        except BaseException:
            self.discard()
            raise

    def write(self, chunk: torch.Tensor) -> None:
        """Append the bytes of ``chunk`` (contiguous, CPU) as the next piece of data."""
        self._file.write(chunk.contiguous().view(-1).view(torch.uint8))

    def discard(self) -> None:
        """Close without the completeness check: the file is being thrown away."""
        self._file.discard()

    def close(self) -> None:
        """Flush and check that exactly the announced bytes were written."""
        self._file.close()
        if (written := self._file.written - self._header_bytes) != self._expected:
            raise AssertionError(f"{self.path}: wrote {written} bytes, header announced {self._expected}")


def plan_shards(tensors: Mapping[str, TensorMeta], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it).

    Same rule as ``transformers``/``huggingface_hub``'s ``split_state_dict_into_shards``:
    start a new shard when the next tensor would overflow the current one.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, meta in tensors.items():
        if shards[-1] and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += meta.nbytes
    return shards


def shard_filenames(count: int, stem: str = "model") -> list[str]:
    """``model.safetensors`` or ``model-00001-of-00003.safetensors``, the HF names."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
