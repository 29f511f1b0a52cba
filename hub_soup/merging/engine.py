"""Merge the ingredients, tensor by tensor and chunk by chunk: the one place tensors are combined.

A merge method (:mod:`hub_soup.merging.methods`) says what each soup element is,
in a kernel over cache-sized blocks; :func:`stream_merge` feeds it. The soup that
is written (into a :class:`~hub_soup.io.write.SoupWriter`) and the soups that are
scored (:func:`soup_weights`, streamed straight into the model being scored, or
:func:`merged_state_dict` into memory) run this same loop with the same chunks and
blocks, into different sinks, so a scored soup is the written one bit for bit by
construction. The built-in kernels
do not even depend on where a tensor is cut: every step is a single IEEE-rounded
elementwise op.

Floating tensors, parameters and buffers alike (BatchNorm running stats
included), are accumulated in float32 (float64 stays float64, and methods that ask
for it work in float64) and written back
in their own dtype, so an fp16 soup of fp16 ingredients cannot overflow even
where an fp16 sum would. Integer and bool tensors (``num_batches_tracked``,
``position_ids``) are never averaged: the soup takes the first ingredient's.

A soup never holds inf or nan that its inputs did not: where every block is rounded
to the output dtype, one ``sum`` of the rounded block (a finite sum means every
element is finite) sees an overflow, from a narrowing ``--dtype`` or a large
``lambda``, and the tensor stops the merge (:class:`~hub_soup.errors.NonFiniteSoupError`)
before anything is written or scored. Non-finite values an ingredient already holds
(a masked buffer) are carried, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from huggingface_hub.utils import tqdm

from hub_soup.errors import NonFiniteSoupError, RecipeError
from hub_soup.io import direct_io
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.methods import MergedTensor, MergeMethod
from hub_soup.merging.plan import Input, MergePlan, TensorPlan
from hub_soup.merging.similarity import GramAccumulator
from hub_soup.native import elementwise
from hub_soup.threads import compute_workers, current_part, in_blocks, merge_threads, torch_threads

logger = logging.getLogger(__name__)

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

# Chunk positions read ahead, and reader threads: two reads in flight keep a
# disk busier than one, and reads overlap the arithmetic (see benchmarks/RESULTS.md).
READ_AHEAD = 4
READ_WORKERS = 2

# Soup chunks queued for the writer thread: writes (direct to the disk, see
# hub_soup.io.direct_io.DirectFile) overlap the arithmetic instead of following it.
WRITE_BEHIND = 4

# Memory for chunk positions a method with statistics passes reads once and is given again (see _ReadAhead): a
# 1.5B model's tensors but its embedding (one MLP matrix of a base and three fine-tunes, 110 MB: the next
# tensor's first positions take the slots as its kernel frees them). 192 MiB kept no more and held 50 MiB more.
KEEP_BYTES = 128 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """float64 if either side is float64 (so ``--dtype float64`` accumulates in float64)."""
    return torch.float64 if torch.float64 in (a, b) else a


def kernel_dtype(method: MergeMethod, stored: torch.dtype, output: torch.dtype) -> torch.dtype:
    """The dtype ``method``'s kernel computes a tensor stored as ``stored`` and written as ``output`` in:
    float64 for a float64 kernel or when either side is float64, float32 otherwise. The engine
    follows it and the card states it, so what the card says is what was done."""
    return torch.float64 if method.float64_kernel else accumulation_dtype(max_precision(stored, output))


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


def whole_rows(elements: int, row: int) -> int:
    """The most elements, at most ``elements``, that are whole rows of ``row`` elements each (one row where a row
    is longer): a chunk or block of a tensor merged by rows."""
    return max(1, elements // row) * row


def chunk_elements_for(checkpoints: Sequence[Checkpoint], position_bytes: int = POSITION_BYTES) -> int:
    """Elements per ingredient and chunk position, so that a position's input fits ``position_bytes``."""
    per_row = position_bytes // (len(checkpoints) * _widest(_input_metas(checkpoints)))
    return max(MIN_CHUNK_ELEMENTS, per_row // BLOCK_ELEMENTS * BLOCK_ELEMENTS)


class Sink(Protocol):
    """Where :func:`stream_merge` puts the soup: a :class:`~hub_soup.io.write.SoupWriter`, or memory."""

    def begin(self, key: str) -> None:
        """The next chunks are tensor ``key``'s, in order."""

    def write(self, chunk: torch.Tensor) -> None:
        """The next elements of the current tensor, flat, in its output dtype."""


def stream_merge(
    checkpoints: Sequence[Checkpoint],
    plan: MergePlan,
    method: MergeMethod,
    sink: Sink,
    dtype: torch.dtype | None = None,
    *,
    base: Checkpoint | None = None,
    device: torch.device | str = "cpu",
    chunk_elements: int | None = None,
    threads: int | None = None,
    gram: GramAccumulator | None = None,
    read_ahead: int = READ_AHEAD,
    write_behind: int = WRITE_BEHIND,
    block_elements: int = BLOCK_ELEMENTS,
    keep_bytes: int = KEEP_BYTES,
) -> MergeStats:
    """Merge ``checkpoints`` along ``plan`` with ``method`` into ``sink``, never holding more than a chunk per input.

    Three things overlap: reader threads fill the next chunk positions (every
    input's chunk of the same elements: each ingredient's, and the base's when
    the method needs it) with ``preadv`` (``O_DIRECT`` for files not in the page
    cache, see :mod:`hub_soup.io.direct_io`), this thread runs the method's kernel
    on the current one, cache-sized block by block, and a writer thread hands the
    previous soup chunks to ``sink``. Reads and writes are memory copies in the
    kernel that release the GIL. Memory does not grow with the model or the
    number of ingredients: the read slots, the accumulator and the write slots
    are a few MiB, reused for everything. A method with statistics passes
    (:meth:`~hub_soup.merging.methods.MergeMethod.statistics_passes`) reads each
    merged tensor once more per pass, through the same read-ahead, before it merges it.
    A method that works on whole rows (:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`)
    is given chunks and blocks of whole rows, at most as large as the others (or one row, where a
    row is longer): still a few MiB. Only a
    :attr:`~hub_soup.merging.methods.MergeMethod.whole_tensor` method is given each
    merged tensor whole (memory: its inputs, and what the method computes).

    What each output tensor is made of is ``plan``'s: the inputs it names (another key
    or layer of an ingredient, rows of it), and the tensor's own method parameters, which
    :meth:`~hub_soup.merging.methods.MergeMethod.for_tensor` gives the method.

    Args:
        method: the merge method, with its parameters and weights (one per checkpoint).
        dtype: every floating tensor's output dtype (default: each tensor's own).
        base: the base model, aligned in ``plan``'s base role, exactly when ``method`` needs one (or, for a
            method with an optional base, where the merge has one).
        chunk_elements: elements per input and position (default: :func:`chunk_elements_for`, of the method's
            :attr:`~hub_soup.merging.methods.MergeMethod.position_bytes` where it is split among compute
            workers); whole rows of it for a method that works on rows.
        threads: torch threads for the arithmetic, or a compute-bound method's compute workers (default
            :func:`~hub_soup.threads.merge_threads`).
        gram: if given, the shared-initialization check is fed from the chunks as they
            pass (see :class:`~hub_soup.merging.similarity.GramAccumulator`), at no extra read.
        read_ahead: positions read ahead by the reader threads (0: read in this thread).
        write_behind: soup chunks that may wait for the writer thread (at least 1).
        block_elements: elements the kernel works on at a time (on the CPU; whole rows of it, for a method
            that works on rows).
        keep_bytes: memory for positions kept from a tensor's first statistics pass for its later passes and
            its kernel, instead of read again (0: every pass reads; see :class:`_ReadAhead`).
    """
    _check_roles(checkpoints, plan, method, base)
    device = torch.device(device)
    start_time = time.perf_counter()
    inputs = [*checkpoints, *([base] if base is not None else [])]
    # A compute-bound method's blocks are split among workers (one torch thread each; see hub_soup.threads), each
    # with its own accumulator and scratch; every other merge gives torch the threads.
    threads = threads or merge_threads(method.compute_bound)
    workers = threads if method.compute_bound and device.type == "cpu" else 1
    position_bytes = method.position_bytes if workers > 1 and method.position_bytes else POSITION_BYTES
    chunk_elements = chunk_elements or chunk_elements_for(inputs, position_bytes)
    metas = output_metas(plan, dtype)
    methods = _tensor_methods(plan, method)
    merged = {t.key: MergedTensor(t.key, t.meta.numel, kernel_dtype(methods[t.key], t.meta.dtype, metas[t.key].dtype),
                                  tuple(t.meta.shape))
              for t in plan.tensors if t.average}
    # Each tensor's chunk and block: whole rows, for a method that needs them (1 element otherwise). The block is
    # about the CPU's caches; a GPU takes whole chunks (fewer, larger copies to it).
    rows = {key: max(1, methods[key].row_elements(m.dims)) for key, m in merged.items()}
    steps = {t.key: whole_rows(chunk_elements, rows.get(t.key, 1)) for t in plan.tensors}
    blocks = {key: min(steps[key], whole_rows(block_elements, row)) if device.type == "cpu" else steps[key]
              for key, row in rows.items()}
    chunk_room = max(steps.values(), default=chunk_elements)
    block_room = max(blocks.values(), default=1)
    buffers = {d: [(torch.empty(block_room, dtype=d, device=device), torch.empty(block_room, dtype=d, device=device))
                   for _ in range(workers)]
               for d in (torch.float32, torch.float64)}
    passes = {key: 0 if methods[key].whole_tensor or methods[key].copies() else methods[key].statistics_passes(m.dtype)
              for key, m in merged.items()}
    planned = dict(passes)  # passes lowers where a method needs fewer
    sources = {t.key: tensor_sources(checkpoints, base, t) for t in plan.tensors}
    total_read = sum(
        t.meta.nbytes * len(sources[t.key]) * (1 + passes[t.key] if t.average else 1) for t in plan.tensors
    )
    width = max((len(s) for s in sources.values()), default=1)
    reader = _ReadAhead(
        _positions(plan, sources, steps, passes), width, chunk_room * _widest(_input_metas(inputs)), read_ahead,
        keep_bytes,
    )
    try:
        with torch_threads(threads), compute_workers(workers), _WriteBehind(
            sink, chunk_room * _widest(metas.values()), max(write_behind, 1)
        ) as out, tqdm(total=total_read, unit="B", unit_scale=True, desc="merging") as bar:
            for tensor in plan.tensors:
                out_dtype = metas[tensor.key].dtype
                sample = gram.sample_of(tensor) if gram is not None else 0
                found = _NonFinite()
                tensor_method = methods.get(tensor.key)
                step = steps[tensor.key]
                if tensor_method is not None and tensor_method.whole_tensor:
                    _merge_whole(tensor, tensor_method, merged[tensor.key], sources[tensor.key], reader, out,
                                 out_dtype, step, device, gram, sample, found)
                else:
                    statistics = None
                    # a tensor the method takes unchanged (or copies from the first) is copied, rounded once
                    kernel = tensor_method if tensor_method is not None and not tensor_method.copies() else None
                    if kernel is not None:
                        statistics, read = _statistics(tensor, kernel, merged[tensor.key], passes, reader, step)
                        if read < planned[tensor.key]:  # passes the method found it did not need
                            bar.total -= (planned[tensor.key] - read) * tensor.meta.nbytes * len(sources[tensor.key])
                        kernel_buffers = [(acc[: blocks[tensor.key]], scratch[: blocks[tensor.key]])
                                          for acc, scratch in buffers[merged[tensor.key].dtype]]
                    out.begin(tensor.key)
                    count = len(tensor.inputs)
                    for begin in range(0, tensor.meta.numel, step):
                        chunks = reader.next()
                        soup = out.slot(chunks[0].numel(), out_dtype)
                        if tensor_method is not None and begin < sample:
                            gram.add(torch.stack([c[: sample - begin] for c in chunks[:count]]))  # type: ignore[union-attr]
                        if kernel is not None:
                            _merge_chunks(kernel, chunks, count, kernel_buffers, soup, statistics, begin, found)
                        else:
                            soup.copy_(chunks[0])
                            if out_dtype.is_floating_point and out_dtype != chunks[0].dtype:  # rounded: may overflow
                                _check_finite(soup, chunks[0], chunks[:1], found)
                        out.submit()
                        reader.release()
                if found.any:  # a scale that a method chose can be chosen smaller; an average's cannot
                    scalable = tensor_method is not None and not tensor_method.averages
                    found.settle(tensor, out_dtype, [c.label for c, _ in sources[tensor.key]], scalable)
                if tensor_method is not None:
                    _hand_back_freed_memory()
                bar.update(reader.bytes_given - bar.n)
    finally:
        reader.close()
    return _stats(plan, metas, reader.bytes_read, start_time)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (``None`` elsewhere: other allocators hand memory back their own way).

    Looked up in the C library the interpreter already uses, as :mod:`hub_soup.io.direct_io` does:
    ``ctypes.util.find_library`` would fork ``ldconfig`` from a process holding a merge's buffers.
    """
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _hand_back_freed_memory() -> None:
    """Give the operating system back the pages of the temporaries a tensor's statistics and kernel freed.

    A method's temporaries are chunk- or block-sized and differ from tensor to tensor (a last chunk, a row
    length); glibc serves them from its heaps once its dynamic mmap threshold has risen past them, and keeps
    the holes they leave: an SCE merge of the 1.5B models peaked 615 MiB above a bare ``import torch``, run to run
    different, where one ``malloc_trim`` after each tensor holds it at ~36 MiB, in the same time (a call with
    nothing to hand back takes microseconds; the pages handed back are faulted in again by the next tensor, once).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _tensor_methods(plan: MergePlan, method: MergeMethod) -> dict[str, MergeMethod]:
    """Each merged tensor's method: ``method`` with the tensor's own parameters, checked before anything
    is read (a message names the tensor whose parameters do not fit)."""
    methods = {}
    for tensor in plan.tensors:
        if tensor.average:
            try:
                methods[tensor.key] = method.for_tensor(tensor.parameters)
            except RecipeError as exc:
                raise RecipeError(f"{tensor.key}: {exc.message}", hint=exc.hint) from None
    return methods


def _statistics(
    tensor: TensorPlan, method: MergeMethod, merged: MergedTensor, passes: dict[str, int], reader: _ReadAhead,
    chunk_elements: int,
) -> tuple[Any, int]:
    """What ``method``'s statistics passes over ``tensor`` make of it, for its kernel, and how many were read.

    At most ``passes[tensor.key]``; fewer where the method says, after a pass, that it needs no more
    (:meth:`~hub_soup.merging.methods.MergeMethod.passes_left`): lowered there, the reads not yet planned are
    not made (:func:`_positions` looks the count up as each pass is about to be read) and those already
    under way are observed as any (the method ignores what it no longer needs)."""
    statistics = method.start_statistics(merged)
    key, count, done = tensor.key, len(tensor.inputs), 0
    while reader.peek() == (key, done):
        for _ in range(0, tensor.meta.numel, chunk_elements):
            chunks = reader.next()
            statistics = method.observe(statistics, chunks[:count], chunks[count] if len(chunks) > count else None)
            reader.release()
        statistics = method.finish_statistics(statistics, merged)
        done += 1
        left = method.passes_left(statistics)
        if left is not None:
            passes[key] = min(passes[key], done + left)
    return statistics, done


def _merge_whole(
    tensor: TensorPlan, method: MergeMethod, merged: MergedTensor, sources: list[tuple[Checkpoint, Input]],
    reader: _ReadAhead, out: _WriteBehind, out_dtype: torch.dtype, chunk_elements: int, device: torch.device,
    gram: GramAccumulator | None, sample: int, found: _NonFinite,
) -> None:
    """``tensor`` merged by a :attr:`~hub_soup.merging.methods.MergeMethod.whole_tensor` method: every input
    read in full (chunk by chunk, through the same read-ahead) into one buffer each, merged at once by
    :meth:`~hub_soup.merging.methods.MergeMethod.merge_tensor`, and handed to ``out`` in chunks rounded to the
    output dtype and checked as a kernel's blocks are."""
    numel, count = tensor.meta.numel, len(tensor.inputs)
    wholes = [torch.empty(numel, dtype=checkpoint.metas[source.key].dtype) for checkpoint, source in sources]
    for begin in range(0, numel, chunk_elements):
        chunks = reader.next()
        if begin < sample:
            gram.add(torch.stack([c[: sample - begin] for c in chunks[:count]]))  # type: ignore[union-attr]
        for whole, chunk in zip(wholes, chunks):
            whole[begin : begin + chunk.numel()].copy_(chunk)
        reader.release()
    parts = [whole.view(tensor.meta.shape).to(device) for whole in wholes]
    result = method.merge_tensor(parts[:count], parts[count] if len(parts) > count else None, merged)
    if tuple(result.shape) != tuple(tensor.meta.shape):
        raise RuntimeError(f"method {method.name} made {tensor.key} of shape {list(result.shape)}, "
                           f"not {list(tensor.meta.shape)}")
    flat = result.reshape(-1)
    out.begin(tensor.key)
    for begin in range(0, numel, chunk_elements):
        end = min(begin + chunk_elements, numel)
        soup = out.slot(end - begin, out_dtype)
        soup.copy_(flat[begin:end])  # the one rounding to the output dtype
        _check_finite(soup, flat[begin:end], [whole[begin:end] for whole in wholes], found)
        out.submit()


def _check_roles(checkpoints: Sequence[Checkpoint], plan: MergePlan, method: MergeMethod, base: Checkpoint | None) -> None:
    """The inputs fit the plan and the method: one checkpoint per planned ingredient, a base exactly when needed."""
    aligned = plan.ingredients if plan.tensors else len(checkpoints)
    if aligned != len(checkpoints):
        raise RecipeError(f"the merge plan aligns {aligned} ingredients, the merge got {len(checkpoints)}")
    if method.needs_base and (base is None or plan.base is None):
        raise RecipeError(
            f"method {method.name} needs a base model, aligned in the plan's base role",
            hint="give the recipe a base: (the model the ingredients were fine-tuned from)",
        )
    if method.exact_ingredients is not None:
        merged = {len(t.inputs) for t in plan.tensors if t.average} or {len(checkpoints)}
        if merged != {method.exact_ingredients}:
            raise RecipeError(f"method {method.name} merges exactly {method.exact_ingredients} ingredients, "
                              f"got {max(merged - {method.exact_ingredients})}")
    if base is not None and not method.takes_base():
        raise RecipeError(f"method {method.name} uses no base model, got {base.label}", hint="drop the base")


def _merge_chunks(
    method: MergeMethod, chunks: Sequence[torch.Tensor], count: int, buffers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    soup: torch.Tensor, statistics: Any, offset: int, found: _NonFinite,
) -> None:
    """``soup`` = the method's soup of one position, the tensor's elements from ``offset`` on: ``chunks`` are the
    ``count`` ingredients' (then the base's), merged block by block, each block's result rounded out of the
    cache-sized accumulator and checked for values the output dtype cannot hold (into ``found``). The blocks are
    split among the compute workers (:func:`~hub_soup.threads.in_blocks`), each with its own ``buffers``."""
    with_base = len(chunks) > count

    def merge_block(start: int, end: int) -> None:
        acc_buffer, scratch_buffer = buffers[current_part()]
        acc = acc_buffer[: end - start]
        parts = [chunk[start:end] for chunk in chunks]
        method.kernel(
            acc, parts[:count], scratch=scratch_buffer[: end - start], base=parts[count] if with_base else None,
            statistics=statistics, offset=offset + start,
        )
        block = soup[start:end]
        # the one rounding to the output dtype: a compiled loop rounds a bfloat16 block as copy_ does, and tells
        # whether every result is finite; copy_ (across devices too) and the check where it cannot, or some is not
        if not elementwise.narrow(block, acc):
            block.copy_(acc)
            _check_finite(block, acc, parts, found)

    in_blocks(soup.numel(), buffers[0][0].numel(), merge_block)


def _check_finite(
    rounded: torch.Tensor, value: torch.Tensor, inputs: Sequence[torch.Tensor], found: _NonFinite
) -> None:
    """Note in ``found`` the elements of ``rounded`` (``value`` in the output dtype) that are inf or nan.

    The common case costs one ``sum`` of a block still in the cache, conservative: a sum
    is finite only if every element is. (``isfinite().all()`` costs 20-30 times as much;
    the sum adds a few percent to a two-ingredient merge's CPU time, less with more
    ingredients.) A sum that is not finite (an element, or a total beyond the dtype's
    range) takes the exact look, elementwise, against the ``inputs`` of each element
    (the ingredients', the base's).
    """
    if math.isfinite(rounded.sum()):
        return
    bad = ~rounded.isfinite()
    if not bad.any():
        return
    finite_inputs = torch.stack([part.isfinite() for part in inputs])
    made = bad & finite_inputs.all(0)
    carried = bad & ~made
    magnitude = value.to("cpu", torch.float64)[made].abs()
    overflowed = magnitude[~magnitude.isnan()]
    with found.lock:  # blocks of one tensor may be checked side by side
        found.carried += int(carried.sum())
        found.holders.update(i for i, holds in enumerate((~finite_inputs & carried).any(1).tolist()) if holds)
        found.overflowed += overflowed.numel()
        found.nan += magnitude.numel() - overflowed.numel()
        if overflowed.numel():
            found.largest = max(found.largest, float(overflowed.max()))


@dataclass
class _NonFinite:
    """What one soup tensor's check found (:func:`_check_finite`), settled once the tensor is merged.

    An element counts as the soup's own when every input of it (each ingredient's, the
    base's) is finite: those stop the merge. The others carry what an ingredient holds
    (a masked buffer can legitimately hold inf): a warning names the ingredients.
    """

    overflowed: int = 0  # inputs finite, value beyond the output dtype's range
    largest: float = 0.0  # their largest magnitude before rounding (inf: beyond the accumulation's range too)
    nan: int = 0  # inputs finite, value nan
    carried: int = 0  # an input inf or nan there
    holders: set[int] = field(default_factory=set)  # inputs (by position) inf or nan where the soup is
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def any(self) -> bool:
        return bool(self.overflowed or self.nan or self.carried)

    def settle(self, tensor: TensorPlan, dtype: torch.dtype, labels: Sequence[str], scalable: bool) -> None:
        """Stop the merge for what the soup made (``labels``: the inputs', by position), warn of what it carried."""
        if self.overflowed or self.nan:
            raise _non_finite_error(tensor, dtype, self.overflowed, self.largest, self.nan, scalable)
        holders = ", ".join(sorted({labels[i] for i in self.holders}))
        logger.warning("%s: inf or nan in %s of the soup, carried over from %s", tensor.key, _elements(self.carried),
                       holders)


def _non_finite_error(
    tensor: TensorPlan, dtype: torch.dtype, overflowed: int, largest: float, nan: int, scalable: bool
) -> NonFiniteSoupError:
    """What the soup would hold in ``tensor``, and what would hold it instead: a wider dtype, or (``scalable``:
    the method's scale, not an average) a smaller scale."""
    limit = torch.finfo(dtype).max
    said, hints = [], ["scale the soup down (a smaller lambda, or smaller weights)"] if scalable else []
    if overflowed:
        size = f"{largest:.4g}" if math.isfinite(largest) else "beyond the range it was computed in"
        said.append(f"{_elements(overflowed)} overflow{'s' if overflowed == 1 else ''} {_name(dtype)} (largest magnitude {size} before rounding; "
                    f"{_name(dtype)} holds at most {limit:.6g}) and would be inf")
        wider = [_name(d) for d in (torch.bfloat16, torch.float32, torch.float64) if torch.finfo(d).max > largest]
        if wider:
            hints.insert(0, f"write the soup in a dtype that holds them (--dtype {' or '.join(wider[:2])})")
    if nan:
        said.append(f"{_elements(nan)} would be nan")
    return NonFiniteSoupError(
        f"tensor {tensor.key} ({_elements(tensor.meta.numel)}): {' and '.join(said)} in the soup, though their "
        "inputs are finite",
        hint=", or ".join(hints) or None,
    )


def _elements(count: int) -> str:
    return f"{count} element{'' if count == 1 else 's'}"


def _name(dtype: torch.dtype) -> str:
    """``float16``, as ``--dtype`` spells it."""
    return str(dtype).removeprefix("torch.")


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


@dataclass(frozen=True)
class Weights:
    """A model's tensors as a stream: ``stream(sink)`` begins each tensor of :attr:`metas`, in order, and
    writes its elements, flat, in its dtype there.

    An ingredient read from its files, a soup made by the engine, a state dict: the evaluator
    streams each into its one model (:class:`~hub_soup.eval.models.ModelSink`) and the writer into the
    soup's files, so scoring a model or a soup never holds a second copy of it. Streaming the same
    weights twice streams the same bits (the engine is deterministic), which is how the soup that
    was scored is the soup that is written.
    """

    metas: Mapping[str, TensorMeta]  # every tensor streamed, under canonical keys, in order and dtype
    stream: Callable[[Sink], None]

    def overridden(self, tensors: Mapping[str, torch.Tensor]) -> Weights:
        """These weights with ``tensors`` (recalibrated BatchNorm statistics, a few kB) in place of their
        own, each cast to the dtype streamed."""
        metas = self.metas
        replaced = {key: tensor.detach().to("cpu", metas[key].dtype).reshape(-1) for key, tensor in tensors.items()}
        return Weights(metas, lambda sink: self.stream(_OverridingSink(sink, replaced)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors in memory, shaped (for tests and small models)."""
        sink = _StateDictSink(dict(self.metas))
        self.stream(sink)
        return sink.tensors


class _OverridingSink:
    """Passes tensors through to ``sink``, except those in ``tensors``: written from there, their streamed
    chunks dropped."""

    def __init__(self, sink: Sink, tensors: Mapping[str, torch.Tensor]) -> None:
        self._sink, self._tensors, self._dropping = sink, tensors, False

    def begin(self, key: str) -> None:
        self._sink.begin(key)
        self._dropping = key in self._tensors
        if self._dropping:
            self._sink.write(self._tensors[key])

    def write(self, chunk: torch.Tensor) -> None:
        if not self._dropping:
            self._sink.write(chunk)


def stream_copy(sources: Sequence[tuple[str, Checkpoint, Input]], plan: MergePlan, sink: Sink,
                chunk_bytes: int = POSITION_BYTES) -> None:
    """Stream tensors unchanged into ``sink``: for each ``(key, checkpoint, input)``, ``key`` begins and the
    ``input``'s elements in ``checkpoint`` (its rows, where it selects some, as ``plan`` lays out ``key``) follow
    in chunks of about ``chunk_bytes``, read into one reused buffer."""
    buffer = direct_io.aligned_buffer(direct_io.padded(chunk_bytes))
    tensors = {t.key: t for t in plan.tensors}
    with torch_threads(merge_threads()):
        for key, checkpoint, source in sources:
            tensor = tensors[key]
            step = max(chunk_bytes // checkpoint.metas[source.key].dtype.itemsize, 1)
            sink.begin(key)
            for begin in range(0, tensor.meta.numel, step):
                count = min(step, tensor.meta.numel - begin)
                sink.write(source.read_into(checkpoint, begin, count, tensor.row_numel, buffer))


def ingredient_weights(checkpoint: Checkpoint, plan: MergePlan, index: int) -> Weights:
    """Ingredient ``index`` as it is saved (its own dtypes), under the plan's canonical keys (and in its
    layout: rows gathered where the plan gathers them)."""
    sources = [(t.key, checkpoint, t.input_of(index)) for t in plan.tensors]
    return _copied(sources, plan)


def saved_weights(checkpoint: Checkpoint, metas: Mapping[str, TensorMeta], chunk_bytes: int = POSITION_BYTES) -> Weights:
    """The tensors ``metas`` names, read from ``checkpoint`` as it saved them under those keys (a published
    merge, scored beside its ingredients), in chunks of about ``chunk_bytes`` through one reused buffer."""

    def stream(sink: Sink) -> None:
        buffer = direct_io.aligned_buffer(direct_io.padded(chunk_bytes))
        for key, meta in metas.items():
            step = max(chunk_bytes // meta.dtype.itemsize, 1)
            sink.begin(key)
            for begin in range(0, meta.numel, step):
                sink.write(checkpoint.read_into(key, begin, min(step, meta.numel - begin), buffer))

    return Weights(dict(metas), stream)


def base_weights(base: Checkpoint, first: Checkpoint, plan: MergePlan) -> Weights:
    """The base model under the plan's canonical keys, to be scored beside the ingredients.

    Merged tensors are read from the base where the plan aligned them (:attr:`TensorPlan.base_input`);
    the tensors every soup copies from the first ingredient (integers, ``--exclude``d keys, which a
    base may lack or hold for another head) are the first ingredient's here too. So the base is
    scored as the soup with every task vector zero (task arithmetic at ``lambda: 0``), on the same
    architecture, head and config as the soup.
    """
    sources = [
        (t.key, base, t.base_input) if t.base_input is not None else (t.key, first, t.inputs[0])
        for t in plan.tensors
    ]
    return _copied(sources, plan)


def _copied(sources: list[tuple[str, Checkpoint, Input]], plan: MergePlan) -> Weights:
    metas = {key: TensorMeta(c.metas[source.key].dtype, t.meta.shape) for (key, c, source), t in zip(sources, plan.tensors)}
    return Weights(metas, lambda sink: stream_copy(sources, plan, sink))


def soup_weights(
    checkpoints: Sequence[Checkpoint], plan: MergePlan, method: MergeMethod, dtype: torch.dtype | None = None,
    **options: Any,
) -> Weights:
    """The soup :func:`stream_merge` makes of ``checkpoints`` (``options`` are its own: ``base``, ``device``...),
    in the dtypes it is written in; each stream merges again, to the same bits."""

    def stream(sink: Sink) -> None:
        stream_merge(checkpoints, plan, method, sink, dtype, **options)

    return Weights(output_metas(plan, dtype), stream)


def state_dict_weights(state_dict: Mapping[str, torch.Tensor]) -> Weights:
    """A state dict in memory as weights (its keys, dtypes and order)."""
    metas = {key: TensorMeta(t.dtype, tuple(t.shape)) for key, t in state_dict.items()}

    def stream(sink: Sink) -> None:
        for key, tensor in state_dict.items():
            sink.begin(key)
            sink.write(tensor.detach().reshape(-1))

    return Weights(metas, stream)


class _StateDictSink:
    """A :class:`Sink` that keeps the soup in memory: each tensor filled chunk by chunk, in its output dtype."""

    def __init__(self, metas: dict[str, TensorMeta]) -> None:
        self._metas = metas
        self.tensors: dict[str, torch.Tensor] = {}
        self._flat = torch.empty(0)
        self._filled = 0

    def begin(self, key: str) -> None:
        meta = self._metas[key]
        self.tensors[key] = torch.empty(meta.shape, dtype=meta.dtype)
        self._flat, self._filled = self.tensors[key].view(-1), 0

    def write(self, chunk: torch.Tensor) -> None:
        self._flat[self._filled : self._filled + chunk.numel()].copy_(chunk)
        self._filled += chunk.numel()


def merged_state_dict(
    checkpoints: Sequence[Checkpoint], plan: MergePlan, method: MergeMethod, dtype: torch.dtype | None = None,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """The soup in memory, made by :func:`stream_merge` itself (same chunks, blocks and kernel, into
    memory instead of a writer), so the soup that is scored is the soup that is streamed, bit for bit.

    ``options`` are :func:`stream_merge`'s (``base``, ``device``, ``chunk_elements``, ...).
    """
    return soup_weights(checkpoints, plan, method, dtype, **options).state_dict()


def write_weights(weights: Weights, plan: MergePlan, metas: dict[str, TensorMeta], writer: Sink) -> MergeStats:
    """Stream weights in the soup's dtypes (``metas``: a scored soup, merged again) into the writer."""
    start_time = time.perf_counter()
    weights.stream(writer)
    return _stats(plan, metas, 0, start_time)


Position = list[tuple[Checkpoint, Input, int, int, int]]
#: What a position is read for: a tensor's statistics pass (by number) or its kernel (:data:`KERNEL`).
Read = tuple[str, int]
KERNEL = -1


def _positions(
    plan: MergePlan, sources: Mapping[str, list[tuple[Checkpoint, Input]]], steps: Mapping[str, int],
    passes: Mapping[str, int],
) -> Iterator[tuple[Read, Position]]:
    """Every chunk position :func:`stream_merge` consumes, in order: the reads of each input, each with what
    it is read for.

    A merged tensor is read once per statistics pass (``passes``, by key, looked up as each pass is about to
    be read: the merge lowers it once a method needs fewer), then for the kernel; a copied one once, from its
    first input; each in chunks of ``steps`` elements (by key).
    """
    for tensor in plan.tensors:
        row_numel, step, key = tensor.row_numel, steps[tensor.key], tensor.key
        for read in _reads(key, passes if tensor.average else {key: 0}):
            for begin in range(0, tensor.meta.numel, step):
                size = min(step, tensor.meta.numel - begin)
                yield (key, read), [(checkpoint, source, begin, size, row_numel) for checkpoint, source in sources[key]]


def _reads(key: str, passes: Mapping[str, int]) -> Iterator[int]:
    """What a tensor is read for, in order: its statistics passes (their count looked up as each is about to
    start), then its kernel."""
    done = 0
    while done < passes[key]:
        yield done
        done += 1
    yield KERNEL


def tensor_sources(
    checkpoints: Sequence[Checkpoint], base: Checkpoint | None, tensor: TensorPlan
) -> list[tuple[Checkpoint, Input]]:
    """What :func:`stream_merge` reads for ``tensor``: each input in its checkpoint (then the base's), or the
    first input alone for a copied tensor."""
    if not tensor.average:
        first = tensor.inputs[0]
        return [(checkpoints[first.ingredient], first)]
    sources = [(checkpoints[i.ingredient], i) for i in tensor.inputs]
    if base is not None:
        assert tensor.base_input is not None
        sources.append((base, tensor.base_input))
    return sources


class _ReadAhead:
    """Chunk positions in merge order, read ahead by background threads into slots of one reused buffer.

    ``next()`` gives the next position's chunks (views of a slot), ``release()``
    hands the oldest slot back once they are used, and the slot's next read
    starts at once. One job reads a whole position, so the threads take the GIL
    once per position, not once per chunk. With ``slots == 0`` every read
    happens in ``next()``, in the caller's thread. :attr:`bytes_read` counts the
    bytes read, :attr:`bytes_given` those handed out (kept ones again).

    A position read for a tensor's first statistics pass is read into a slot of a
    second buffer of ``keep_bytes`` where one is free, and kept there: the tensor's
    later passes and its kernel are given the same memory, unread, and the slot is
    free again once the kernel's position is released. A tensor of a few tens of MiB
    is read once instead of once per pass (for a 1.5B model, every tensor but the
    embedding's): half or less of the page-cache copies, or of the disk's reads. A
    position that finds no slot free (a tensor larger than the buffer) is read again.
    """

    def __init__(self, positions: Iterator[tuple[Read, Position]], count: int, chunk_bytes: int, slots: int,
                 keep_bytes: int = 0) -> None:
        self._positions = positions
        self.bytes_read = 0
        self.bytes_given = 0
        # Page-aligned rows with room around the data: chunks not in the page cache are read around it.
        self._shape = (count, direct_io.padded(chunk_bytes))
        self._buffer = direct_io.aligned_buffer(max(slots, 1) * math.prod(self._shape)).view(-1, *self._shape)
        self._pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="hub-soup-reader") if slots else None
        self._keep_slots = keep_bytes // math.prod(self._shape)
        self._kept_buffer: torch.Tensor | None = None  # made at the first position kept
        self._free = list(range(self._keep_slots))  # a stack: the slots last used (their pages made) first
        self._kept: dict[tuple[str, int], tuple[int, Future[list[torch.Tensor]]]] = {}
        # Each position under way: what it is read for, its read slot, its chunks, whether they were read (or
        # kept from an earlier pass), and the keep slot its release frees (after a kept tensor's kernel).
        self._pending: deque[tuple[Read, int, Future[list[torch.Tensor]], bool, int | None]] = deque()
        self._ahead: tuple[Read, Position] | None = None  # without threads: the next position, once peeked at
        self._in_use: deque[tuple[int, int | None]] = deque()
        for slot in range(slots):
            self._submit(slot)

    def _read(self, position: Position, buffers: torch.Tensor) -> list[torch.Tensor]:
        return [source.read_into(checkpoint, begin, size, row_numel, buffer)
                for (checkpoint, source, begin, size, row_numel), buffer in zip(position, buffers)]

    def _start(self, read: Read, position: Position, slot: int) -> None:
        """Queue ``position``: read into read slot ``slot`` (or a keep slot, for a first statistics pass), or
        given from the keep slot an earlier pass read it into."""
        done, where = read[1], (read[0], position[0][2])  # the tensor's key and the position's first element
        kept = self._kept.get(where)
        if kept is not None:  # a later pass over a kept position, or its kernel: nothing to read
            frees = kept[0] if done == KERNEL else None
            if frees is not None:
                del self._kept[where]
            self._pending.append((read, slot, kept[1], False, frees))
            return
        buffers = self._buffer[slot]
        keep = done == 0 and bool(self._free)  # pass 0: the first of two reads at least (the kernel's follows)
        if keep:
            if self._kept_buffer is None:
                self._kept_buffer = direct_io.aligned_buffer(self._keep_slots * math.prod(self._shape)).view(
                    -1, *self._shape)
            keep_slot = self._free.pop()
            buffers = self._kept_buffer[keep_slot]
        future: Future[list[torch.Tensor]]
        if self._pool is not None:
            future = self._pool.submit(self._read, position, buffers)
        else:
            future = Future()
            future.set_result(self._read(position, buffers))
        if keep:
            self._kept[where] = (keep_slot, future)
        self._pending.append((read, slot, future, True, None))

    def _submit(self, slot: int) -> None:
        upcoming = next(self._positions, None)
        if upcoming is not None:
            self._start(*upcoming, slot)

    def peek(self) -> Read | None:
        """What the next position is read for (``None`` after the last)."""
        if self._pool is not None:
            return self._pending[0][0] if self._pending else None
        if self._ahead is None:
            self._ahead = next(self._positions, None)
        return self._ahead[0] if self._ahead is not None else None

    def next(self) -> list[torch.Tensor]:
        if self._pool is None:
            self._start(*(self._ahead or next(self._positions)), 0)
            self._ahead = None
        _, slot, future, read, frees = self._pending.popleft()
        self._in_use.append((slot, frees))
        chunks = future.result()
        given = sum(chunk.nbytes for chunk in chunks)
        self.bytes_given += given
        self.bytes_read += given if read else 0
        return chunks

    def release(self) -> None:
        slot, frees = self._in_use.popleft()
        if frees is not None:
            self._free.append(frees)
        if self._pool is not None:
            self._submit(slot)

    def close(self) -> None:
        """Drop reads not started and wait for running ones: no read outlives the merge."""
        if self._pool is not None:
            for _, _, future, _, _ in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


class _WriteBehind:
    """Hands soup chunks to a writer thread, so writing overlaps the next chunk's arithmetic.

    :meth:`slot` gives a free buffer from a small pool for the next chunk, which
    the caller fills and hands over with :meth:`submit`; the thread writes slots
    in order and frees them. Writes release the GIL, so the disk's (or the
    kernel's) work runs beside the arithmetic. The first error the
    thread meets is raised in the caller's thread, at its next call or on exit;
    leaving the ``with`` block always waits for the thread.
    """

    def __init__(self, writer: Sink, slot_bytes: int, slots: int) -> None:
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
