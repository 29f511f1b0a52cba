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
import time
from collections.abc import Sequence
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
) -> MergeStats:
    """Average ``checkpoints`` along ``plan`` into ``writer``, never holding more than a chunk per tensor.

    Memory does not grow with the number of ingredients: one read buffer, one
    accumulator and one scratch buffer of ``chunk_elements`` are reused for
    everything. ``weights`` must already be normalised.
    """
    device = torch.device(device)
    start_time = time.perf_counter()
    metas = output_metas(plan, dtype)
    read_buffer = torch.empty(chunk_elements * 8, dtype=torch.uint8)
    accumulators = {
        acc_dtype: (
            torch.empty(chunk_elements, dtype=acc_dtype, device=device),
            torch.empty(chunk_elements, dtype=acc_dtype, device=device),
        )
        for acc_dtype in (torch.float32, torch.float64)
    }
    total_read = sum(t.meta.nbytes * (len(checkpoints) if t.average else 1) for t in plan.tensors)
    bytes_read = 0
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
                    for i, (checkpoint, key) in enumerate(zip(checkpoints, tensor.sources)):
                        chunk = checkpoint.read_into(key, begin, count, read_buffer)
                        weighted_sum_(acc, chunk.to(device, non_blocking=False), weights[i], scratch, first=i == 0)
                        bytes_read += chunk.nbytes
                    writer.write(acc.to(out_dtype).cpu())
                else:
                    chunk = checkpoints[0].read_into(tensor.sources[0], begin, count, read_buffer)
                    bytes_read += chunk.nbytes
                    writer.write(chunk.to(out_dtype))
                bar.update(bytes_read - bar.n)
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
