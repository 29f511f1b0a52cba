"""Average the ingredients, tensor by tensor and chunk by chunk.

The arithmetic is defined once, in :func:`weighted_sum_`, and both paths use it:
the streaming path (:func:`stream_merge`, what the CLI runs) and the in-memory
path (:func:`average_tensors`, used by evaluation and as the reference in tests).
Every step is a single IEEE-rounded elementwise op, so the result does not depend
on how a tensor is cut into chunks: the two paths agree bit for bit.

Floating tensors, parameters and buffers alike (BatchNorm running stats
included), are accumulated in float32 (float64 stays float64) and written back
in their own dtype, so an fp16 soup of fp16 ingredients cannot overflow even
where an fp16 sum would. Integer and bool tensors (``num_batches_tracked``,
``position_ids``) are never averaged: the soup takes the first ingredient's.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from huggingface_hub.utils import tqdm

from hub_soup.align import MergePlan
from hub_soup.errors import RecipeError
from hub_soup.read import Checkpoint
from hub_soup.safetensors_io import TensorMeta
from hub_soup.write import SoupWriter

# 1M elements: a 4 MiB float32 accumulator stays in cache; whole 64 MiB tensors
# run about 10x slower on this arithmetic (measured, see benchmarks/RESULTS.md).
CHUNK_ELEMENTS = 1 << 20

# Torch threads for the merge's elementwise ops (restored afterwards). One: the
# loop is bound by reading and memory bandwidth, a second thread gains ~5% with
# warm inputs, and its spinning between ops starves the kernel's I/O on small
# machines (1.5B x 8 from a cold cache: 94 s with 2 threads, 24 s with 1; see
# benchmarks/RESULTS.md). ``HUB_SOUP_THREADS`` overrides.
THREADS_ENV = "HUB_SOUP_THREADS"

# Slots of the read buffer: background threads read up to this many chunks
# ahead while the current one is averaged (0 reads synchronously). Overlapping
# reads with arithmetic is worth ~30% with warm inputs; from disk, two reads in
# flight beat one sequential stream (see benchmarks/RESULTS.md).
READ_AHEAD = 4
READ_WORKERS = 2


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


def weighted_sum_(acc: torch.Tensor, chunk: torch.Tensor, weight: float, scratch: torch.Tensor, first: bool) -> None:
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


def average_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighted average of whole tensors (the simple path); ``weights`` already normalised."""
    out_dtype = dtype or tensors[0].dtype
    acc_dtype = accumulation_dtype(tensors[0].dtype if dtype is None else max_precision(tensors[0].dtype, dtype))
    acc = torch.empty(tensors[0].shape, dtype=acc_dtype)
    scratch = torch.empty_like(acc)
    for i, (tensor, weight) in enumerate(zip(tensors, weights)):
        weighted_sum_(acc, tensor, weight, scratch, first=i == 0)
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
    parameters: int
    bytes_read: int
    bytes_written: int
    seconds: float


def stream_merge(
    checkpoints: Sequence[Checkpoint],
    plan: MergePlan,
    weights: Sequence[float],
    writer: SoupWriter,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    chunk_elements: int = CHUNK_ELEMENTS,
    threads: int | None = None,
    read_ahead: int = READ_AHEAD,
) -> MergeStats:
    """Average ``checkpoints`` along ``plan`` into ``writer``, never holding more than a chunk per tensor.

    Memory does not grow with the number of ingredients: one read buffer (cut
    into ``read_ahead`` slots), one accumulator and one scratch buffer of
    ``chunk_elements`` are reused for everything. ``weights`` must already be
    normalised. ``threads``: torch threads for the arithmetic (default
    ``$HUB_SOUP_THREADS`` or 1).
    """
    device = torch.device(device)
    start_time = time.perf_counter()
    metas = output_metas(plan, dtype)
    accumulators = {
        acc_dtype: (
            torch.empty(chunk_elements, dtype=acc_dtype, device=device),
            torch.empty(chunk_elements, dtype=acc_dtype, device=device),
        )
        for acc_dtype in (torch.float32, torch.float64)
    }
    total_read = sum(t.meta.nbytes * (len(checkpoints) if t.average else 1) for t in plan.tensors)
    bytes_read = 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or int(os.environ.get(THREADS_ENV) or 1))
    reader = _ChunkReader(_reads(checkpoints, plan, chunk_elements), chunk_elements * 8, read_ahead, READ_WORKERS)
    try:
        with tqdm(total=total_read, unit="B", unit_scale=True, desc="merging") as bar:
            for tensor in plan.tensors:
                writer.begin(tensor.key)
                out_dtype = metas[tensor.key].dtype
                numel = tensor.meta.numel
                for begin in range(0, numel, chunk_elements):
                    count = min(chunk_elements, numel - begin)
                    if tensor.average:
                        acc_dtype = accumulation_dtype(max_precision(tensor.meta.dtype, out_dtype))
                        acc, scratch = (buf[:count] for buf in accumulators[acc_dtype])
                        for i in range(len(checkpoints)):
                            chunk = reader.next()
                            weighted_sum_(acc, chunk.to(device, non_blocking=False), weights[i], scratch, first=i == 0)
                            bytes_read += chunk.nbytes
                            reader.release()
                        writer.write(acc.to(out_dtype).cpu())
                    else:
                        chunk = reader.next()
                        bytes_read += chunk.nbytes
                        writer.write(chunk.to(out_dtype))
                        reader.release()
                    bar.update(bytes_read - bar.n)
    finally:
        reader.close()
        torch.set_num_threads(previous_threads)
    return _stats(plan, metas, bytes_read, start_time)


def _stats(plan: MergePlan, metas: dict[str, TensorMeta], bytes_read: int, start_time: float) -> MergeStats:
    averaged = sum(t.average for t in plan.tensors)
    return MergeStats(
        tensors=len(plan.tensors),
        averaged=averaged,
        copied=len(plan.tensors) - averaged,
        parameters=sum(t.meta.numel for t in plan.tensors),
        bytes_read=bytes_read,
        bytes_written=sum(m.nbytes for m in metas.values()),
        seconds=time.perf_counter() - start_time,
    )


def aligned_state_dict(checkpoint: Checkpoint, plan: MergePlan, index: int) -> dict[str, torch.Tensor]:
    """Ingredient ``index`` in memory under the plan's canonical keys (for evaluation)."""
    return {t.key: checkpoint.read(t.sources[index]).reshape(t.meta.shape) for t in plan.tensors}


def merged_state_dict(
    checkpoints: Sequence[Checkpoint], plan: MergePlan, weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The soup in memory, tensor by tensor, with the same arithmetic as :func:`stream_merge`."""
    soup: dict[str, torch.Tensor] = {}
    for t in plan.tensors:
        if t.average:
            soup[t.key] = average_tensors([c.read(k) for c, k in zip(checkpoints, t.sources)], weights)
        else:
            soup[t.key] = checkpoints[0].read(t.sources[0])
        soup[t.key] = soup[t.key].reshape(t.meta.shape)
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


def _reads(
    checkpoints: Sequence[Checkpoint], plan: MergePlan, chunk_elements: int
) -> Iterator[tuple[Checkpoint, str, int, int]]:
    """Every read :func:`stream_merge` makes, in the order it consumes them."""
    for tensor in plan.tensors:
        sources = list(zip(checkpoints, tensor.sources)) if tensor.average else [(checkpoints[0], tensor.sources[0])]
        for begin in range(0, tensor.meta.numel, chunk_elements):
            count = min(chunk_elements, tensor.meta.numel - begin)
            for checkpoint, key in sources:
                yield checkpoint, key, begin, count


class _ChunkReader:
    """Chunks in merge order, read ahead by background threads into slots of one reused buffer.

    ``next()`` gives the next chunk (a view of a slot), ``release()`` hands the
    oldest slot back once its chunk is used, and the slot's next read starts at
    once. Reads release the GIL (``os.preadv``), so the disk and the page-cache
    copies overlap the arithmetic; two readers keep two requests in flight, which
    reads faster than one sequential stream does. With ``slots == 0`` every
    read happens in ``next()``, in the caller's thread.
    """

    def __init__(
        self, reads: Iterator[tuple[Checkpoint, str, int, int]], slot_bytes: int, slots: int, workers: int = 2
    ) -> None:
        self._reads = reads
        self._buffer = torch.empty(max(slots, 1), slot_bytes, dtype=torch.uint8)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hub-soup-reader") if slots else None
        self._pending: deque[tuple[int, Future[torch.Tensor]]] = deque()
        self._in_use: deque[int] = deque()
        for slot in range(slots):
            self._submit(slot)

    def _submit(self, slot: int) -> None:
        read = next(self._reads, None)
        if read is not None and self._pool is not None:
            checkpoint, key, begin, count = read
            self._pending.append((slot, self._pool.submit(checkpoint.read_into, key, begin, count, self._buffer[slot])))

    def next(self) -> torch.Tensor:
        if self._pool is None:
            checkpoint, key, begin, count = next(self._reads)
            return checkpoint.read_into(key, begin, count, self._buffer[0])
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
