"""hub_soup.io.safetensors_io: strict headers, chunked reads and streamed writes.

Files come from strangers on the Hub, so every malformed or hostile header must
end in a :class:`CheckpointFormatError` naming the file, never in another
exception, a huge allocation or a read outside the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hub_soup.errors import CheckpointFormatError
from hub_soup.io.safetensors_io import (
    MAX_HEADER_BYTES,
    SafetensorsReader,
    SafetensorsWriter,
    TensorMeta,
    plan_shards,
    read_header,
    shard_filenames,
)
from hub_soup.io.sizes import parse_size
from tests.checkpoints import assert_bit_equal

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors-shaped file: 8-byte length, header (JSON object or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "f64": torch.randn(5, generator=g).double(),
        "i64": torch.tensor([1, -2, 3 << 40]),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "odd": torch.randn(13, generator=g).half(),
    }


# ---------------------------------------------------------------- valid files


def test_reads_what_the_official_library_writes(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.tensors) == set(tensors)
    for name, tensor in tensors.items():
        assert header.tensors[name] == TensorMeta(tensor.dtype, tuple(tensor.shape)), name
    reader = SafetensorsReader(path)
    try:
        buffer = torch.empty(64, dtype=torch.uint8)
        for name, tensor in tensors.items():
            assert_bit_equal(reader.read(name), tensor, name)
            # chunk by chunk into one reused buffer: 3 elements at a time
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), 3):
                count = min(3, flat.numel() - start)
                assert_bit_equal(reader.read_into(name, start, count, buffer), flat[start : start + count], name)
    finally:
        reader.close()


def test_writer_streams_a_file_the_official_library_reads(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    metas = {name: TensorMeta(t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, metas, {"format": "pt"})
    for tensor in tensors.values():
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), 4):  # in pieces, as the merge writes
            writer.write(flat[start : start + 4])
    writer.close()
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + length) % 8 == 0, "data must start 8-byte aligned"
    loaded = load_file(path)
    for name, tensor in tensors.items():
        assert_bit_equal(loaded[name], tensor, name)
    assert read_header(path).metadata == {"format": "pt"}


def test_writer_checks_the_byte_count(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {"a": TensorMeta(torch.float32, (4,))}, {})
    writer.write(torch.zeros(3))
    with pytest.raises(AssertionError, match="wrote 12 bytes, header announced 16"):
        writer.close()


def test_writer_refuses_dtypes_safetensors_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="complex64"):
        SafetensorsWriter(tmp_path / "x.safetensors", {"z": TensorMeta(torch.complex64, (2,))}, {})


def test_sizes_and_shards() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("200KB") == 200_000
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size(123) == 123
    for bad in ("", "GB", "-1MB", "0", "lots"):
        with pytest.raises(ValueError):
            parse_size(bad)
    metas = {f"t{i}": TensorMeta(torch.float32, (25,)) for i in range(5)}  # 100 bytes each
    assert plan_shards(metas, 250) == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert plan_shards(metas, 50) == [[f"t{i}"] for i in range(5)]  # a tensor above the limit gets its own shard
    assert plan_shards(metas, 10_000) == [list(metas)]
    assert shard_filenames(1) == ["model.safetensors"]
    assert shard_filenames(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


# ---------------------------------------------------------------- hostile headers

A = _entry("F32", [2], 0, 8)
B = _entry("F16", [3], 8, 14)

HOSTILE: list[tuple[str, dict, list[str]]] = [
    # (case, how to build it, words the message must hold)
    ("huge claimed length", {"header": b"{}", "length": 2**63}, ["claims", str(2**63)]),
    ("length over the 100 MB limit", {"header": b"{}", "length": MAX_HEADER_BYTES + 1, "data": b"\0" * 16}, ["claims"]),
    ("length past the end of the file", {"header": b'{"a":1}', "length": 4096}, ["claims 4096 bytes"]),
    ("overlapping offsets", {"header": {"a": A, "b": _entry("F16", [3], 4, 10)}, "data": b"\0" * 14}, ["'b'", "overlaps"]),
    ("gap between tensors", {"header": {"a": A, "b": _entry("F16", [3], 10, 16)}, "data": b"\0" * 16}, ["'b'", "gap"]),
    ("offsets out of the file", {"header": {"a": A, "b": B}, "data": b"\0" * 10}, ["truncated", "14 bytes", "holds 10"]),
    ("offset far out of range", {"header": {"a": _entry("F32", [2], 2**40, 2**40 + 8)}, "data": b"\0" * 8}, ["'a'"]),
    ("undescribed trailing bytes", {"header": {"a": A, "b": B}, "data": b"\0" * 20}, ["6 bytes after the last tensor"]),
    ("shape larger than its bytes", {"header": {"a": _entry("F32", [3], 0, 8)}, "data": b"\0" * 8},
     ["'a'", "float32[3] = 12 bytes", "span 8 bytes"]),
    ("dtype wider than its bytes", {"header": {"a": _entry("F64", [2], 0, 8)}, "data": b"\0" * 8}, ["float64[2] = 16 bytes"]),
    ("astronomic shape", {"header": {"a": _entry("F32", [2**40, 2**40], 0, 8)}, "data": b"\0" * 8}, ["'a'", "bytes"]),
    ("unknown dtype", {"header": {"a": _entry("F128", [2], 0, 16)}, "data": b"\0" * 16}, ["unknown dtype", "F128"]),
    ("dtype not a string", {"header": {"a": _entry(["F32"], [2], 0, 8)}, "data": b"\0" * 8}, ["unknown dtype"]),
    ("negative dimension", {"header": {"a": _entry("F32", [-2], 0, 0)}}, ["invalid shape"]),
    ("boolean dimension", {"header": {"a": _entry("F32", [True], 0, 4)}, "data": b"\0" * 4}, ["invalid shape"]),
    ("float dimension", {"header": {"a": _entry("F32", [2.0], 0, 8)}, "data": b"\0" * 8}, ["invalid shape"]),
    ("shape not a list", {"header": {"a": _entry("F32", "2", 0, 8)}, "data": b"\0" * 8}, ["invalid shape"]),
    ("reversed offsets", {"header": {"a": _entry("F32", [2], 8, 0)}, "data": b"\0" * 8}, ["invalid data_offsets"]),
    ("negative offsets", {"header": {"a": _entry("F32", [2], -8, 0)}, "data": b"\0" * 8}, ["invalid data_offsets"]),
    ("three offsets", {"header": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, "data": b"\0" * 8},
     ["invalid data_offsets"]),
    ("entry with an extra field", {"header": {"a": {**A, "x": 1}}, "data": b"\0" * 8}, ["exactly dtype, shape and data_offsets"]),
    ("entry missing a field", {"header": {"a": {"dtype": "F32", "shape": [2]}}, "data": b"\0" * 8}, ["exactly dtype"]),
    ("entry not an object", {"header": {"a": 5}}, ["exactly dtype"]),
    ("metadata not strings", {"header": {"__metadata__": {"format": 1}, "a": A}, "data": b"\0" * 8}, ["__metadata__"]),
    ("not UTF-8", {"header": b'{"\xff\xfe": 1}'}, ["UTF-8"]),
    ("not JSON", {"header": b"{this is not json"}, ["JSON"]),
    ("JSON but not an object", {"header": b"[1, 2, 3]"}, ["not a JSON object"]),
    ("header cut short", {"header": b'{"a": {"dtype": "F32", "sha', "data": b""}, ["JSON"]),
    ("deeply nested JSON", {"header": b"[" * 200_000 + b"]" * 200_000}, ["header"]),
    ("integer with 5000 digits", {"header": b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
                                      "data": b"\0" * 4}, ["header"]),
]


@pytest.mark.parametrize("case,spec,words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_headers_are_rejected_cleanly(tmp_path: Path, case: str, spec: dict, words: list[str]) -> None:
    path = _file(tmp_path / "evil.safetensors", **spec)
    with pytest.raises(CheckpointFormatError) as caught:
        read_header(path)
    message = str(caught.value)
    assert "evil.safetensors" in message, message
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    with pytest.raises(CheckpointFormatError):
        SafetensorsReader(path)  # the reader validates before opening for reads


def test_files_too_short_or_unreadable(tmp_path: Path) -> None:
    for size in (0, 1, 7):
        path = tmp_path / f"short{size}.safetensors"
        path.write_bytes(b"\x01" * size)
        with pytest.raises(CheckpointFormatError, match="too short"):
            read_header(path)
    with pytest.raises(CheckpointFormatError, match="cannot be read"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointFormatError, match="cannot be read"):
        read_header(tmp_path)  # a folder


def test_truncated_file_is_reported_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match="truncated") as caught:
        read_header(path)
    assert "fetch the file again" in str(caught.value)
    # cut inside the header: still a clean error
    path.write_bytes(data[:40])
    with pytest.raises(CheckpointFormatError, match="claims"):
        read_header(path)


def test_empty_and_zero_size_tensors_tile(tmp_path: Path) -> None:
    """Zero-byte tensors may sit anywhere, even at the very end; the header alone is a valid file."""
    path = _file(tmp_path / "z.safetensors", {"e": _entry("F32", [0, 3], 0, 0), "a": A, "z": _entry("F16", [0], 8, 8)},
                 b"\0" * 8)
    header = read_header(path)
    assert header.tensors["e"].shape == (0, 3) and header.tensors["z"].numel == 0
    assert read_header(_file(tmp_path / "none.safetensors", {})).tensors == {}


# ---------------------------------------------------------------- fuzzing


def _check_or_reject(path: Path, data: bytes) -> None:
    """read_header either raises CheckpointFormatError or returns a header that really fits the file."""
    path.write_bytes(data)
    try:
        header = read_header(path)
    except CheckpointFormatError:
        return
    (length,) = struct.unpack("<Q", data[:8])
    data_start, size = 8 + length, len(data)
    spans = sorted((header.offsets[n], header.offsets[n] + m.nbytes) for n, m in header.tensors.items())
    position = data_start
    for begin, end in spans:
        assert begin == position and end <= size
        position = end
    assert position == size


def _valid_file() -> bytes:
    raw = json.dumps({"__metadata__": {"format": "pt"}, "a": A, "b": B, "c": _entry("I64", [1], 14, 22)}).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(22))


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _check_or_reject(_fuzz_path(tmp_path_factory), data)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 400)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8))),
)
def test_fuzz_mutated_valid_header(tmp_path_factory: pytest.TempPathFactory, edits, cut, insert) -> None:
    data = bytearray(_valid_file())
    for position, value in edits:
        data[position % len(data)] = value
    if insert is not None:
        position, chunk = insert
        data[position % len(data) : position % len(data)] = chunk
    if cut is not None:
        del data[cut % len(data) :]
    _check_or_reject(_fuzz_path(tmp_path_factory), bytes(data))


_DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", "f32", ""])
_INTS = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=True))
_ENTRY = st.one_of(
    st.fixed_dictionaries(
        {"dtype": _DTYPE_NAMES, "shape": st.lists(_INTS, max_size=3), "data_offsets": st.lists(_INTS, max_size=3)}
    ),
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), _INTS, max_size=4),
    _INTS,
)


@FUZZ
@given(
    entries=st.dictionaries(st.text(max_size=4), _ENTRY, max_size=4),
    data_size=st.integers(0, 64),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), _INTS), max_size=2)),
)
def test_fuzz_structured_headers(tmp_path_factory: pytest.TempPathFactory, entries, data_size, metadata) -> None:
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    _check_or_reject(_fuzz_path(tmp_path_factory), struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)


_FUZZ_DIR: list[Path] = []


def _fuzz_path(factory: pytest.TempPathFactory) -> Path:
    if not _FUZZ_DIR:
        _FUZZ_DIR.append(factory.mktemp("fuzz"))
    return _FUZZ_DIR[0] / "fuzz.safetensors"
