"""Average the ingredients, tensor by tensor and chunk by chunk.

The arithmetic is defined once, in :func:`average_into_`: with equal weights
(the default soup) the ingredients are summed and the sum multiplied by the
weight once; with other weights each ingredient is multiplied by its weight
and added to the sum. Every step is a single IEEE-rounded elementwise op. The
in-memory path (:func:`average_tensors`, used by evaluation and as the
reference in tests) applies it to whole tensors; the streaming path
(:func:`stream_merge`, what the CLI runs) applies it to cache-sized blocks of
each chunk. Nothing depends on where a tensor is cut or on the CPU's vector
width, so the two paths agree bit for bit.

Floating tensors, parameters and buffers alike (BatchNorm running stats
included), are accumulated in float32 (float64 stays float64) and written back
in their own dtype, so an fp16 soup of fp16 ingredients cannot overflow even
where an fp16 sum would. Integer and bool tensors (``num_batches_tracked``,
``position_ids``) are never averaged: the soup takes the first ingredient's.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from huggingface_hub.utils import tqdm

from hub_soup.errors import RecipeError
from hub_soup.io import direct_io
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.io.write import SoupWriter
from hub_soup.merging.plan import MergePlan
from hub_soup.merging.similarity import GramAccumulator

# Input bytes of one chunk position (every ingredient's chunk of the same
# elements), the unit the reader threads fill: memory stays flat as ingredients
# are added. Smaller positions spend their time handing work between threads.
POSITION_BYTES = 6 << 20
MIN_CHUNK_ELEMENTS = 1 << 16

# Elements the arithmetic works on at a time: accumulator and scratch (1 MiB in
# float32) stay in the core's L2 cache (2 MiB here), where these elementwise ops
# run 2-4x faster per element than on multi-MiB buffers; much smaller blocks
# spend their time in per-op dispatch (measured, see benchmarks/NOTES.md).
BLOCK_ELEMENTS = 1 << 17

# Torch threads for the merge's elementwise ops (restored afterwards). One: the
# loop is bound by reading and memory bandwidth, and a second thread's spinning
# between ops starves the kernel's I/O and the writer thread on small machines
# (see benchmarks/RESULTS.md). ``HUB_SOUP_THREADS`` overrides.
THREADS_ENV = "HUB_SOUP_THREADS"

# Chunk positions read ahead, and reader threads: two reads in flight keep a
# disk busier than one, and reads overlap the arithmetic (see benchmarks/RESULTS.md).
READ_AHEAD = 4
READ_WORKERS = 2

# Soup chunks queued for the writer thread: page-cache writes (memory copies in
# the kernel, ~1 GB/s here) overlap the arithmetic instead of following it.
WRITE_BEHIND = 4


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights that sum to one (uniform when ``None``); refuses negative or all-zero weights."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise RecipeError(f"got {len(weights)} weights for {count} ingredients", hint="give one weight per ingredient")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise RecipeError(f"weights must be finite, non-negative and not all zero: {list(weights)}")
    total = math.fsum(weights)
    return [w / total for w in weights]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum_(
    acc: torch.Tensor, chunk: torch.Tensor, weight: float | torch.Tensor, scratch: torch.Tensor, first: bool
) -> None:
    """``acc += weight * chunk`` (``acc = ...`` when ``first``), each op rounded once in acc's dtype.

    ``chunk`` may be any floating dtype; ``scratch`` is a buffer like ``acc``.
    Not ``acc.add_(chunk, alpha=weight)``: a fused multiply-add rounds once
    where the scalar tail of the kernel rounds twice, so results would depend
    on where chunks end.
    """
    if first:
        acc.copy_(chunk)
        acc.mul_(weight)
    else:
        scratch.copy_(chunk)
        scratch.mul_(weight)
        acc.add_(scratch)


def is_uniform(weights: Sequence[float]) -> bool:
    """All weights equal: :func:`average_into_` then sums first and multiplies once."""
    return all(w == weights[0] for w in weights)


def average_into_(
    acc: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float] | Sequence[torch.Tensor],
    scratch: torch.Tensor, uniform: bool,
) -> None:
    """``acc`` = the weighted average of ``parts``: the definition of a soup's tensor.

    Equal weights (``uniform``): ``(p0 + p1 + ...) * w``. That is one multiplication
    instead of one per ingredient, 20% less time for the merge's arithmetic
    (measured, benchmarks/NOTES.md), and one rounding fewer per ingredient.
    Elements whose sum leaves the accumulator's range (values near float32's
    maximum, such as a mask filled with ``finfo.min``) take the weighted form,
    where each value is scaled before the sum; the check costs one ``sum`` of
    ``acc`` and is conservative (a finite total means every element's sum is finite).
    Other weights: ``w0 * p0 + w1 * p1 + ...`` (:func:`_multiply_first_`).

    ``parts`` may be of any floating dtype; ``acc`` and ``scratch`` are alike.
    """
    if not uniform:
        _multiply_first_(acc, parts, weights, scratch)
        return
    acc.copy_(parts[0])
    for part in parts[1:]:
        scratch.copy_(part)
        acc.add_(scratch)
    if math.isfinite(acc.sum()):
        acc.mul_(weights[0])
        return
    finite = torch.isfinite(acc)
    acc.mul_(weights[0])
    weighted = torch.empty_like(acc)
    _multiply_first_(weighted, parts, weights, scratch)
    acc.copy_(torch.where(finite, acc, weighted))


def _multiply_first_(
    acc: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor],
    scratch: torch.Tensor,
) -> None:
    """``acc = w0 * p0 + w1 * p1 + ...``, one :func:`weighted_sum_` per part."""
    for i, (part, weight) in enumerate(zip(parts, weights)):
        weighted_sum_(acc, part, weight, scratch, first=i == 0)


def weight_scalars(weights: Sequence[float], dtype: torch.dtype, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The weights as 0-dim tensors of the accumulator's dtype, for :func:`average_into_`.

    ``t.mul_(w)`` gives the same bits for a Python float and for a 0-dim tensor of
    ``t``'s dtype (both multiply in that dtype, tests check), but the tensor skips
    a slow wrapped-scalar path: 3-5x faster on cache-sized blocks.
    """
    return [torch.tensor(w, dtype=dtype, device=device) for w in weights]


def average_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighted average of whole tensors through :func:`average_into_`: the definition,
    which :func:`stream_merge` matches bit for bit (tests check). ``weights`` already normalised."""
    out_dtype = dtype or tensors[0].dtype
    acc_dtype = accumulation_dtype(tensors[0].dtype if dtype is None else max_precision(tensors[0].dtype, dtype))
    acc = torch.empty(tensors[0].shape, dtype=acc_dtype)
    scratch = torch.empty_like(acc)
    average_into_(acc, tensors, weights, scratch, is_uniform(weights))
    return acc.to(out_dtype)


def max_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """float64 if either side is float64 (so ``--dtype float64`` accumulates in float64)."""
    return torch.float64 if torch.float64 in (a, b) else a


def output_metas(plan: MergePlan, dtype: torch.dtype | None) -> dict[str, TensorMeta]:
    """The soup's tensors: ``dtype`` overrides every floating tensor's dtype (averaged or
    excluded, so the soup is all one float dtype as its config says), never an integer's."""
    return {
        t.key: TensorMeta(dtype if (dtype is not None and t.meta.dtype.is_floating_point) else t.meta.dtype, t.meta.shape)
        for t in plan.tensors
    }


@dataclass
class MergeStats:
    """What a merge did, for the closing summary."""

    tensors: int
    averaged: int
    copied: int
    elements: int  # numbers in every tensor, buffers included (not only parameters)
    bytes_read: int
    bytes_written: int
    seconds: float


def _widest(metas: Iterable[TensorMeta]) -> int:
    """The largest element size among ``metas``: what a buffer must hold per element."""
    return max((m.dtype.itemsize for m in metas), default=1)


def _input_metas(checkpoints: Sequence[Checkpoint]) -> Iterator[TensorMeta]:
    return (m for c in checkpoints for m in c.metas.values())


def chunk_elements_for(checkpoints: Sequence[Checkpoint]) -> int:
    """Elements per ingredient and chunk position, so that a position's input fits :data:`POSITION_BYTES`."""
    per_row = POSITION_BYTES // (len(checkpoints) * _widest(_input_metas(checkpoints)))
    return max(MIN_CHUNK_ELEMENTS, per_row // BLOCK_ELEMENTS * BLOCK_ELEMENTS)


def stream_merge(
    checkpoints: Sequence[Checkpoint],
    plan: MergePlan,
    weights: Sequence[float],
    writer: SoupWriter,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    chunk_elements: int | None = None,
    threads: int | None = None,
    gram: GramAccumulator | None = None,
    read_ahead: int = READ_AHEAD,
    write_behind: int = WRITE_BEHIND,
    block_elements: int = BLOCK_ELEMENTS,
) -> MergeStats:
    """Average ``checkpoints`` along ``plan`` into ``writer``, never holding more than a chunk per ingredient.

    Three things overlap: reader threads fill the next chunk positions (every
    ingredient's chunk of the same elements) with ``preadv`` (``O_DIRECT`` for
    files not in the page cache, see :mod:`hub_soup.io.direct_io`), this thread
    averages the current one, cache-sized block by block, and a writer thread
    writes the previous soup chunks. Reads and writes are memory copies in the
    kernel that release the GIL. Memory does not grow with the model or the
    number of ingredients: the read slots, the accumulator and the write slots
    are a few MiB, reused for everything.

    Args:
        weights: one per checkpoint, already normalised.
        chunk_elements: elements per ingredient and position (default: :func:`chunk_elements_for`).
        threads: torch threads for the arithmetic (default ``$HUB_SOUP_THREADS`` or 1).
        gram: if given, the shared-initialization check is fed from the chunks as they
            pass (see :class:`~hub_soup.merging.similarity.GramAccumulator`), at no extra read.
        read_ahead: positions read ahead by the reader threads (0: read in this thread).
        write_behind: soup chunks that may wait for the writer thread (at least 1).
        block_elements: elements the arithmetic works on at a time (on the CPU).
    """
    device = torch.device(device)
    start_time = time.perf_counter()
    count = len(checkpoints)
    chunk_elements = chunk_elements or chunk_elements_for(checkpoints)
    # The block is about the CPU's caches; a GPU takes whole chunks (fewer, larger copies to it).
    block_elements = min(block_elements, chunk_elements) if device.type == "cpu" else chunk_elements
    metas = output_metas(plan, dtype)
    buffers = {d: (torch.empty(block_elements, dtype=d, device=device), torch.empty(block_elements, dtype=d, device=device))
               for d in (torch.float32, torch.float64)}
    scalars = {d: weight_scalars(weights, d, device) for d in buffers}
    uniform = is_uniform(weights)
    total_read = sum(t.meta.nbytes * (count if t.average else 1) for t in plan.tensors)
    bytes_read = 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or int(os.environ.get(THREADS_ENV) or 1))
    reader = _ReadAhead(
        _positions(checkpoints, plan, chunk_elements), count, chunk_elements * _widest(_input_metas(checkpoints)), read_ahead
    )
    try:
        with _WriteBehind(writer, chunk_elements * _widest(metas.values()), max(write_behind, 1)) as out, tqdm(
            total=total_read, unit="B", unit_scale=True, desc="merging"
        ) as bar:
            for tensor in plan.tensors:
                out.begin(tensor.key)
                out_dtype = metas[tensor.key].dtype
                acc_dtype = accumulation_dtype(max_precision(tensor.meta.dtype, out_dtype))
                sample = gram.sample_of(tensor) if gram is not None else 0
                for begin in range(0, tensor.meta.numel, chunk_elements):
                    chunks = reader.next()
                    size = chunks[0].numel()
                    soup = out.slot(size, out_dtype)
                    if tensor.average:
                        if begin < sample:
                            gram.add(torch.stack([c[: sample - begin] for c in chunks]))  # type: ignore[union-attr]
                        _average_chunks(chunks, scalars[acc_dtype], buffers[acc_dtype], soup, uniform)
                    else:
                        soup.copy_(chunks[0])
                    out.submit()
                    bytes_read += sum(chunk.nbytes for chunk in chunks)
                    reader.release()
                bar.update(bytes_read - bar.n)
    finally:
        reader.close()
        torch.set_num_threads(previous_threads)
    return _stats(plan, metas, bytes_read, start_time)


def _average_chunks(
    chunks: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], buffers: tuple[torch.Tensor, torch.Tensor],
    soup: torch.Tensor, uniform: bool,
) -> None:
    """``soup`` = the average of ``chunks``, block by block through :func:`average_into_` (the definition)."""
    acc_buffer, scratch_buffer = buffers
    size = soup.numel()
    for start in range(0, size, acc_buffer.numel()):
        end = min(start + acc_buffer.numel(), size)
        acc = acc_buffer[: end - start]
        average_into_(acc, [chunk[start:end] for chunk in chunks], weights, scratch_buffer[: end - start], uniform)
        soup[start:end].copy_(acc)  # copy_ crosses devices


def _stats(plan: MergePlan, metas: dict[str, TensorMeta], bytes_read: int, start_time: float) -> MergeStats:
    averaged = sum(t.average for t in plan.tensors)
    return MergeStats(
        tensors=len(plan.tensors),
        averaged=averaged,
        copied=len(plan.tensors) - averaged,
        elements=sum(t.meta.numel for t in plan.tensors),
        bytes_read=bytes_read,
        bytes_written=sum(m.nbytes for m in metas.values()),
        seconds=time.perf_counter() - start_time,
    )


def aligned_state_dict(checkpoint: Checkpoint, plan: MergePlan, index: int) -> dict[str, torch.Tensor]:
    """Ingredient ``index`` in memory under the plan's canonical keys (for evaluation)."""
    return {t.key: checkpoint.read(t.sources[index]).reshape(t.meta.shape) for t in plan.tensors}


def merged_state_dict(
    checkpoints: Sequence[Checkpoint], plan: MergePlan, weights: Sequence[float],
    metas: Mapping[str, TensorMeta] | None = None,
) -> dict[str, torch.Tensor]:
    """The soup in memory, tensor by tensor, with the same arithmetic and output dtypes as
    :func:`stream_merge` (``metas`` from :func:`output_metas`; default: each tensor's own dtype),
    so an evaluated soup is the streamed one."""
    metas = metas if metas is not None else output_metas(plan, None)
    soup: dict[str, torch.Tensor] = {}
    for t in plan.tensors:
        out = metas[t.key].dtype
        if t.average:
            tensor = average_tensors([c.read(k) for c, k in zip(checkpoints, t.sources)], weights, out)
        else:
            tensor = checkpoints[0].read(t.sources[0]).to(out)
        soup[t.key] = tensor.reshape(t.meta.shape)
    return soup


def write_state_dict(
    state_dict: dict[str, torch.Tensor], plan: MergePlan, metas: dict[str, TensorMeta], writer: SoupWriter
) -> MergeStats:
    """Write an in-memory soup (an evaluated one) through the same writer, in each tensor's output dtype."""
    start_time = time.perf_counter()
    for t in plan.tensors:
        writer.begin(t.key)
        writer.write(state_dict[t.key].to(metas[t.key].dtype))
    return _stats(plan, metas, 0, start_time)


Position = list[tuple[Checkpoint, str, int, int]]


def _positions(checkpoints: Sequence[Checkpoint], plan: MergePlan, chunk_elements: int) -> Iterator[Position]:
    """Every chunk position :func:`stream_merge` consumes, in order: the reads of each ingredient."""
    for tensor in plan.tensors:
        sources = list(zip(checkpoints, tensor.sources)) if tensor.average else [(checkpoints[0], tensor.sources[0])]
        for begin in range(0, tensor.meta.numel, chunk_elements):
            size = min(chunk_elements, tensor.meta.numel - begin)
            yield [(checkpoint, key, begin, size) for checkpoint, key in sources]


class _ReadAhead:
    """Chunk positions in merge order, read ahead by background threads into slots of one reused buffer.

    ``next()`` gives the next position's chunks (views of a slot), ``release()``
    hands the oldest slot back once they are used, and the slot's next read
    starts at once. One job reads a whole position, so the threads take the GIL
    once per position, not once per chunk. With ``slots == 0`` every read
    happens in ``next()``, in the caller's thread.
    """

    def __init__(self, positions: Iterator[Position], count: int, chunk_bytes: int, slots: int) -> None:
        self._positions = positions
        # Page-aligned rows with room around the data: chunks not in the page cache are read around it.
        rows, row = max(slots, 1) * count, direct_io.padded(chunk_bytes)
        self._buffer = direct_io.aligned_buffer(rows * row).view(max(slots, 1), count, row)
        self._pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="hub-soup-reader") if slots else None
        self._pending: deque[tuple[int, Future[list[torch.Tensor]]]] = deque()
        self._in_use: deque[int] = deque()
        for slot in range(slots):
            self._submit(slot)

    def _read(self, position: Position, slot: int) -> list[torch.Tensor]:
        buffers = self._buffer[slot]
        return [checkpoint.read_into(key, begin, size, buffer)
                for (checkpoint, key, begin, size), buffer in zip(position, buffers)]

    def _submit(self, slot: int) -> None:
        position = next(self._positions, None)
        if position is not None and self._pool is not None:
            self._pending.append((slot, self._pool.submit(self._read, position, slot)))

    def next(self) -> list[torch.Tensor]:
        if self._pool is None:
            return self._read(next(self._positions), 0)
        slot, future = self._pending.popleft()
        self._in_use.append(slot)
        return future.result()

    def release(self) -> None:
        if self._pool is not None:
            self._submit(self._in_use.popleft())

    def close(self) -> None:
        """Drop reads not started and wait for running ones: no read outlives the merge."""
        if self._pool is not None:
            for _, future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


class _WriteBehind:
    """Hands soup chunks to a writer thread, so writing overlaps the next chunk's arithmetic.

    :meth:`slot` gives a free buffer from a small pool for the next chunk, which
    the caller fills and hands over with :meth:`submit`; the thread writes slots
    in order and frees them. ``file.write`` releases the GIL, so the kernel's
    copy into the page cache runs beside the arithmetic. The first error the
    thread meets is raised in the caller's thread, at its next call or on exit;
    leaving the ``with`` block always waits for the thread.
    """

    def __init__(self, writer: SoupWriter, slot_bytes: int, slots: int) -> None:
        self._writer = writer
        self._pool = torch.empty(slots, slot_bytes, dtype=torch.uint8)
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._jobs: queue.Queue[str | tuple[int, torch.Tensor] | None] = queue.Queue()
        self._filling: tuple[int, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hub-soup-writer", daemon=True)
        self._thread.start()

    def begin(self, key: str) -> None:
        """The next chunks belong to tensor ``key``."""
        self._check()
        self._jobs.put(key)

    def slot(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer for the next ``count`` elements of the current tensor (waits while all are queued)."""
        self._check()
        slot = self._free.get()
        view = self._pool[slot, : count * dtype.itemsize].view(dtype)
        self._filling = (slot, view)
        return view

    def submit(self) -> None:
        """Queue the filled slot for writing."""
        assert self._filling is not None
        self._jobs.put(self._filling)
        self._filling = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    if isinstance(job, str):
                        self._writer.begin(job)
                    else:
                        self._writer.write(job[1])
            except Exception as exc:  # noqa: BLE001  (any failure is handed to the caller's thread, and re-raised there)
                self._error = exc
            if not isinstance(job, str):
                self._free.put(job[0])

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._jobs.put(None)
        self._thread.join()
        if exc_type is None:
            self._check()
