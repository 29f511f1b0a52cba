"""Reads around the page cache (``hub_soup.io.direct_io``) give the same bytes as buffered reads, and
writes around it the same file as buffered writes.

A chunk whose data the page cache does not hold is read with ``O_DIRECT``: the
aligned blocks around it land in an aligned buffer and the reader returns a
view that starts up to a page into it. Offsets that are not block-aligned,
sizes that are not whole blocks, the first and last bytes of a file, one-element
chunks and every dtype must come back exactly; data the cache holds keeps
coming from there; a file cut short after opening is reported, not padded.
A soup written direct, in pieces of any size across blocks and the staging
buffer's end, is exactly its bytes, cut to its size, and leaves no descriptor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_soup.errors import CheckpointFormatError
from hub_soup.io import direct_io
from hub_soup.io.safetensors_io import SafetensorsReader
from tests.page_cache import cached_fraction_of, evict_or_skip

# Odd sizes and mixed dtypes put tensors at offsets that are not block-aligned.
TENSORS = {
    "a.f16": ((3, 1001), torch.float16),
    "b.bf16": ((4099,), torch.bfloat16),
    "c.f32": ((17, 513), torch.float32),
    "d.f64": ((2, 2049), torch.float64),
    "e.i64": ((5,), torch.int64),
    "f.u8": ((12289,), torch.uint8),
    "g.f32": ((1,), torch.float32),
}


def _file(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, (shape, dtype) in TENSORS.items():
        if dtype.is_floating_point:
            state[name] = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        else:
            state[name] = torch.randint(0, 100, shape, generator=generator, dtype=torch.int64).to(dtype)
    save_file(state, path)
    return state


def _slices(numel: int) -> list[tuple[int, int]]:
    """(start, count) pairs: whole, first and last element, block-straddling and odd pieces."""
    pieces = [(0, numel), (0, 1), (numel - 1, 1), (1, numel - 1), (numel // 3, numel // 2)]
    return [(start, count) for start, count in pieces if count > 0]


@pytest.fixture
def cold(tmp_path: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor], SafetensorsReader]]:
    """A safetensors file of odd tensors, out of the page cache, and a reader on it (header read)."""
    path = tmp_path / "m.safetensors"
    state = _file(path)
    evict_or_skip([path])
    reader = SafetensorsReader(path)
    yield path, state, reader
    reader.close()


def test_uncached_chunks_are_read_direct_and_exactly(cold: tuple[Path, dict[str, torch.Tensor], SafetensorsReader]) -> None:
    path, state, reader = cold
    for name, want in state.items():
        flat = want.reshape(-1)
        for start, count in _slices(flat.numel()):
            buffer = direct_io.aligned_buffer(direct_io.padded(count * want.dtype.itemsize))
            got = reader.read_into(name, start, count, buffer)
            assert got.dtype == want.dtype and got.numel() == count
            assert torch.equal(got.view(torch.uint8), flat[start : start + count].contiguous().view(torch.uint8)), (
                name, start, count)
            assert got.data_ptr() - buffer.data_ptr() < direct_io.ALIGN
    assert reader._direct_fd is not None, "no read went around the page cache"
    assert cached_fraction_of(path) < 0.5  # and the direct reads did not fill it


def test_cached_data_comes_from_the_page_cache(cold: tuple[Path, dict[str, torch.Tensor], SafetensorsReader]) -> None:
    path, state, reader = cold
    path.read_bytes()  # back in the cache before the first chunk is read
    want = state["c.f32"].reshape(-1)
    buffer = direct_io.aligned_buffer(direct_io.padded(want.nbytes))
    assert torch.equal(reader.read_into("c.f32", 0, want.numel(), buffer), want)
    assert reader._direct_fd is None


def test_unaligned_buffers_are_read_through_the_cache(cold: tuple[Path, dict[str, torch.Tensor], SafetensorsReader]) -> None:
    """Buffers that are not page-aligned, or have no room around the data, take the buffered path."""
    _, state, reader = cold
    want = state["b.bf16"]
    tight = direct_io.aligned_buffer(want.nbytes)
    shifted = direct_io.aligned_buffer(direct_io.padded(want.nbytes) + 2)[2:]
    for buffer in (tight, shifted):
        got = reader.read_into("b.bf16", 0, want.numel(), buffer)
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, want)
    assert reader._direct_fd is None


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_cut_short_after_opening_is_reported(
    cold: tuple[Path, dict[str, torch.Tensor], SafetensorsReader], direct: bool
) -> None:
    path, state, reader = cold  # header checked against the full file
    os.truncate(path, path.stat().st_size - 100)
    evict_or_skip([path])
    want = state["f.u8"]
    size = direct_io.padded(want.nbytes) if direct else want.nbytes
    buffer = direct_io.aligned_buffer(size) if direct else torch.empty(size, dtype=torch.uint8)
    with pytest.raises(CheckpointFormatError, match="truncated"):
        reader.read_into("f.u8", 0, want.numel(), buffer)
    assert (reader._direct_fd is not None) == direct


def test_reader_threads_share_one_decision_and_leave_no_descriptor(
    cold: tuple[Path, dict[str, torch.Tensor], SafetensorsReader],
) -> None:
    """The merge's reader threads hit a fresh reader at once: right bytes, one O_DIRECT descriptor opened."""
    path, state, reader = cold
    names = list(state)
    barrier = threading.Barrier(len(names))

    def read(name: str) -> bool:
        want = state[name].reshape(-1)
        buffer = direct_io.aligned_buffer(direct_io.padded(want.nbytes))
        barrier.wait()
        got = reader.read_into(name, 0, want.numel(), buffer)
        return torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))

    with ThreadPoolExecutor(len(names)) as pool:
        assert all(pool.map(read, names))
    assert len(_open_descriptors(path)) == 2  # the buffered descriptor and one O_DIRECT one, whatever the race


# ---------------------------------------------------------------- writes


def _open_descriptors(path: Path) -> list[str]:
    return [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(path)]


@pytest.mark.parametrize("size", [0, 1, direct_io.ALIGN, 5 * direct_io.ALIGN, 5 * direct_io.ALIGN + 1234])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_a_file_written_in_pieces_is_exactly_its_bytes(tmp_path: Path, size: int, direct: bool) -> None:
    """Pieces of 1 byte to more than the stage, across blocks and the stage's end: the bytes as written, the
    file cut back from its padded last block, the page cache not filled with it (direct)."""
    data = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    path = tmp_path / "soup.bin"
    out = direct_io.DirectFile(path, size, stage_bytes=2 * direct_io.ALIGN, direct=direct)
    if direct and not out.direct:
        pytest.skip(f"no O_DIRECT on the filesystem of {tmp_path}")
    assert out.direct is direct
    pieces = [1, direct_io.ALIGN - 1, direct_io.ALIGN, 0, 3 * direct_io.ALIGN + 7, 513]
    done, turn = 0, 0
    while done < size:
        take = pieces[turn % len(pieces)]
        out.write(data[done : done + take])
        done, turn = done + take, turn + 1
    out.close()
    assert out.written == size
    if direct and (cached := cached_fraction_of(path)) is not None:  # but the last page, zeroed past the end
        assert cached * -(-size // direct_io.ALIGN) <= 1, "a direct write went through the page cache"
    assert path.read_bytes() == data.numpy().tobytes()
    assert not _open_descriptors(path)


def test_a_discarded_file_leaves_no_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "soup.bin"
    out = direct_io.DirectFile(path, 3 * direct_io.ALIGN, stage_bytes=direct_io.ALIGN)
    out.write(torch.ones(direct_io.ALIGN + 5, dtype=torch.uint8))
    out.discard()
    assert not _open_descriptors(path)
