"""``arcee_fusion``: the other model's changes kept where they are important, by a threshold per tensor.

mergekit's own method (only mergekit's code defines it, so that code is the definition). With
``b`` the base and ``x`` the one other model, per tensor::

    importance = |x - b| * KL(softmax(x) || softmax(b))     (per row: the last axis; 1e-8 added to both)
    threshold  = median + 1.5 (Q3 - Q1)                     (of every element's importance)
    soup       = b + (x - b) [importance >= threshold]

Each quantile is the sorted importances' element at ``int(q (n - 1))``. Streamed, at flat memory:
the engine gives the method whole rows (:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`,
for the softmaxes), and statistics passes find the three quantiles exactly by radix selection
(:class:`~hub_soup.merging.methods.order.OrderStatistics`: usually two passes, a histogram then
the few keys near each quantile gathered and sorted; four at most). The first pass also keeps
each row's divergence (one float64 per row: 64 KiB for a 8192-row matrix) and each element's
code (its importance's first 16 bits: two bytes an element, for up to :data:`CODED` elements), so
a later pass recomputes, bit for bit from the divergence and ``|x - b|``, only the importances
whose codes are a quantile's (a few percent; every importance of a larger tensor's rows beyond).
The kernel recomputes every importance: cheaper than picking out by their codes the few that
share the threshold's. The engine reads the tensor once per pass the selection needs
(:meth:`ArceeFusion.passes_left`), then for the kernel (once in all where it fits its keep
buffer); each is split among the compute workers, a worker's float64 temporaries made once per
merge (:meth:`~hub_soup.merging.methods.MergeMethod.workspace`). Float64 throughout, rounded once.

On bfloat16 tensors (most language models), where a C compiler is found, each pass and the kernel
run as compiled loops, one a row (:mod:`hub_soup.native`; ``native/arcee_fusion.c``): eager torch
spends most of a pass moving each slice through fifteen ops, so the fused loops take a third of the
time. Every element's arithmetic there is the torch path's; a row's divergence is the same float64
KL divergence summed in another order, with libmvec's ``exp`` and ``log`` for SLEEF's, so its last
bits may differ, and with them, where an importance lies within that rounding of the threshold, an
element's fate (none of 1.5 billion did on the benchmark models). ``HUB_SOUP_NATIVE=0`` computes
with torch alone.

A deliberate difference: above 1,000,000 elements mergekit estimates the quantiles from a sample
drawn with replacement from torch's unseeded global generator, so its soup of a large tensor
differs from run to run; hub-soup counts every element (the exact quantiles), so the soup is
reproducible and is the definition's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub_soup import native
from hub_soup.merging.methods import MergedTensor, MergeMethod
from hub_soup.merging.methods.order import PASSES, WIDTH, OrderStatistics, Tally
from hub_soup.native import pointer
from hub_soup.threads import current_part, in_parts

if TYPE_CHECKING:
    import numpy as np
    import torch

# mergekit's floor on both softmaxes, so that the KL divergence's logarithm stays finite.
FLOOR = 1e-8
# Elements a statistics pass computes on at a time (whole rows of them): its float64 temporaries stay a few MiB.
SLICE = 1 << 17
# Elements a later pass picks its elements from at a time, by their codes (a few percent of them computed on): the
# larger, the fewer calls into torch per element. Compiled, a quarter of it is the most keys it gathers for a prefix
# before handing them over (2 MiB of int64 a prefix and worker).
PICK = 1 << 20
QUANTILES = (0.25, 0.5, 0.75)
# Elements of a tensor whose codes are kept (two bytes each: 64 MiB, made once per merge): every tensor of a 1.5B
# model but its embedding whole (a 7B model's MLP matrices in part). A larger tensor's rows beyond recompute every
# importance in each pass.
CODED = 1 << 25
# Elements the compiled first pass takes at a call (whole rows): its histograms count in int32.
NATIVE_ELEMENTS = 1 << 30


@dataclass
class Fusion:
    """One tensor's statistics: each row's divergence (found in the first pass), the first elements' codes, the
    quantiles' selection, the rows seen in this pass, and at the end the threshold."""

    tensor: MergedTensor
    quantiles: OrderStatistics
    divergence: torch.Tensor  # every row's, filled in the first pass (made whole up front: no small allocations
    # left between a pass's large temporaries, which would keep the allocator from handing those back)
    codes: torch.Tensor  # int16, the first elements' (whole rows): the method's buffer, lent for this tensor
    row: int = 0
    passes: int = 0
    threshold: float = 0.0

    @property
    def width(self) -> int:
        """Elements of a row (the last axis; a 0-dim tensor's one)."""
        return self.tensor.dims[-1] if self.tensor.dims else 1

    def importance(self, x: torch.Tensor, b: torch.Tensor, row: int) -> torch.Tensor:
        """``|x - b|`` times each row's divergence, in ``x`` (float64 rows from ``row`` on): the same bits in
        every pass and in the kernel."""
        return x.sub_(b).abs_().mul_(self.divergence[row : row + x.shape[0]].to(x.device))

    def unsigned(self, row: int, rows: int) -> bool:
        """Whether no importance of these rows has its sign bit set, so that their bits are their keys: ``|x - b|``
        has none, and where no row's divergence has one either (a rounding below 0, a -0.0), neither has their
        product."""
        import torch

        return bool(self.divergence[row : row + rows].view(torch.int64).min() >= 0)

    def picked(self, other: torch.Tensor, base: torch.Tensor, at: np.ndarray, first: int) -> torch.Tensor:
        """The importances of the elements at ``at`` of ``other`` and ``base`` (flat, on the CPU, from the tensor's
        element ``first`` on, a row's first), computed as :meth:`importance` computes them: the same bits."""
        import torch

        index = torch.from_numpy(at)
        rows = torch.from_numpy(self.divergence.numpy().reshape(-1)[at // self.width + first // self.width])
        wide = other.index_select(0, index).to(torch.float64)
        return wide.sub_(base.index_select(0, index).to(torch.float64)).abs_().mul_(rows)


class ArceeFusion(MergeMethod):
    """mergekit's ``arcee_fusion``: ``base + (x - base)`` where the change's importance reaches the threshold."""

    name = "arcee_fusion"
    title = "Arcee Fusion"
    paper = "[mergekit's arcee_fusion](https://github.com/arcee-ai/mergekit)"
    summary = (
        "per tensor, the fine-tune's changes were kept where their importance (|change| times the KL divergence "
        "of the row's softmaxes) reached median + 1.5 IQR of all importances, and dropped elsewhere (exact "
        "quantiles, where mergekit samples a million elements of a larger tensor)."
    )
    needs_base = True
    exact_ingredients = 1
    min_ingredients = 1
    float64_kernel = True
    compute_bound = True

    def row_elements(self, shape: tuple[int, ...]) -> int:
        """A row is a vector along the last axis: its softmax is the row's."""
        return shape[-1] if shape else 1

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """The quantiles' radix passes (the first also finds each row's divergence)."""
        return PASSES

    # Each compute worker's four int32 histograms for the compiled first pass (1 MiB each), made once per merge.
    _histograms: dict[int, torch.Tensor] | None = None
    # Every tensor's codes, in turn (one at a time: a tensor's statistics end with its kernel): made once, at the
    # size of the largest tensor's, up to CODED.
    _codes: torch.Tensor | None = None

    def start_statistics(self, tensor: MergedTensor) -> Fusion:
        import torch

        last = tensor.numel - 1
        width = tensor.dims[-1] if tensor.dims else 1
        rows = tensor.numel // max(width, 1)
        coded = min(rows, CODED // max(width, 1)) * width
        if self._codes is None or self._codes.numel() < coded:
            self._codes = torch.empty(coded, dtype=torch.int16)
        return Fusion(tensor, OrderStatistics([int(q * last) for q in QUANTILES] if tensor.numel else []),
                      torch.empty(rows, 1, dtype=torch.float64), self._codes[:coded])

    def observe(self, statistics: Fusion, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Fusion:
        """Count one chunk's importances (whole rows, split among the compute workers, each worker's a slice of
        rows at a time), finding its rows' divergences and codes in the first pass."""
        assert base is not None
        if statistics.quantiles.done:  # the selection finished early: the passes left are reads alone
            return statistics
        (other,) = parts
        width = statistics.width
        first = statistics.row * width  # the chunk's first element in the tensor
        coded = min(max(statistics.codes.numel() - first, 0), other.numel())  # of the chunk's, whole rows
        compiled = native.for_tensors("arcee_fusion", [other, base], vector_math=True)

        def importances(part: int, first_row: int, last_row: int) -> Tally:
            """The importances of rows ``first_row`` to ``last_row`` of the chunk, tallied."""
            found: Tally = {}
            begin, end = first_row * width, last_row * width
            mid = min(max(coded, begin), end)  # coded before, not after
            if statistics.passes == 0 and compiled is not None:
                self._native_first_pass(compiled, statistics, other[begin:end], base[begin:end], first + begin,
                                        mid - begin, found)
                return found
            if statistics.passes == 0:
                step = max(1, SLICE // width) * width
                for start in range(begin, end, step):
                    stop = min(start + step, end)
                    self._first_pass(statistics, other[start:stop], base[start:stop], first + start,
                                     min(max(mid - start, 0), stop - start), found)
                statistics.quantiles.tally_codes(statistics.codes[first + begin : first + mid], found)
                return found
            if compiled is not None:
                self._native_later_pass(compiled, statistics, other[begin:end], base[begin:end], first + begin,
                                        mid - begin, found)
                return found
            step = max(1, PICK // width) * width
            for start in range(begin, mid, step):
                stop = min(start + step, mid)
                self._coded_pass(statistics, other[start:stop], base[start:stop], first + start, found)
            if mid < end:
                self._recomputed_pass(statistics, other[mid:end], base[mid:end], first + mid, found)
            return found

        for tally in in_parts(other.numel() // width, importances):
            statistics.quantiles.add(tally)
        statistics.row += other.numel() // width
        return statistics

    def _native_first_pass(self, compiled: Any, statistics: Fusion, other: torch.Tensor, base: torch.Tensor,
                           first: int, coded: int, found: Tally) -> None:
        """The first pass over whole rows in one compiled loop a row (:mod:`hub_soup.native`): their divergences,
        the first ``coded`` elements' codes kept, every code counted into ``found``."""
        import ctypes

        import torch

        width = statistics.width
        counts = found.setdefault(0, torch.zeros(1 << WIDTH, dtype=torch.int64))
        assert isinstance(counts, torch.Tensor)
        xs, bs = self.workspace("native rows", other[:width], 2, torch.float64)
        (spare,) = self.workspace("native spare", other[:width], 1, torch.int16)
        if self._histograms is None:
            self._histograms = {}
        histograms = self._histograms.setdefault(current_part(), torch.empty(4 << WIDTH, dtype=torch.int32))
        step = max(1, NATIVE_ELEMENTS // width) * width
        for start in range(0, other.numel(), step):
            stop = min(start + step, other.numel())
            row = (first + start) // width
            compiled.arcee_first_pass(
                pointer(other[start:stop]), pointer(base[start:stop]), ctypes.c_int64((stop - start) // width),
                ctypes.c_int64(width), pointer(statistics.divergence[row:]),
                pointer(statistics.codes[first + start :]), ctypes.c_int64(max(0, coded - start)), pointer(spare),
                pointer(counts), pointer(xs), pointer(bs), pointer(histograms))

    def _native_later_pass(self, compiled: Any, statistics: Fusion, other: torch.Tensor, base: torch.Tensor,
                           first: int, coded: int, found: Tally) -> None:
        """A later pass over whole rows in compiled loops: the elements whose codes (kept for the first ``coded``,
        else recomputed) begin a rank's prefix have their importances' keys counted, or gathered (up to
        :data:`PICK` a prefix at a time), into ``found``, as :meth:`OrderStatistics.tally` would."""
        import ctypes

        import torch

        width = statistics.width
        tops = statistics.quantiles.tops()
        prefixes, shift, gathering = statistics.quantiles.digit()
        assert 0 < len(tops) <= 4 and len(prefixes) <= 4, prefixes  # three ranks
        wanted = (ctypes.c_int16 * len(tops))(*tops)
        looked_for = (ctypes.c_int64 * len(prefixes))(*prefixes)
        step = max(1, PICK // 4 // width) * width
        room = min(other.numel(), max(PICK // 4, step))  # a prefix's keys gathered at most before handed over
        filled = (ctypes.c_int64 * len(prefixes))()
        keys: list[torch.Tensor] = []
        counts = None
        if gathering:
            keys = self.workspace("native keys", other[:room], len(prefixes), torch.int64)
        else:
            counts = torch.zeros(len(prefixes), 1 << WIDTH, dtype=torch.int64)
            found.update(zip(prefixes, counts))
        rooms = (ctypes.c_void_p * len(prefixes))(*(key.data_ptr() for key in keys)) if keys else None
        scratch, _ = self.workspace("native rows", other[:width], 2, torch.float64)  # the first pass's
        (marks,) = self.workspace("native marks", other[:width], 1, torch.int32)

        def gathered() -> None:
            """The keys gathered so far handed to ``found``, their room emptied."""
            for k, prefix in enumerate(prefixes):
                if filled[k]:
                    found.setdefault(prefix, []).append(keys[k][: filled[k]].clone())  # type: ignore[union-attr]
                filled[k] = 0

        starts = [(start, min(start + step, coded), True) for start in range(0, coded, step)]
        starts += [(start, min(start + step, other.numel()), False) for start in range(coded, other.numel(), step)]
        for start, stop, with_codes in starts:
            if gathering and max(filled) + stop - start > room:
                gathered()
            row = (first + start) // width
            compiled.arcee_later_pass(
                pointer(other[start:stop]), pointer(base[start:stop]), ctypes.c_int64((stop - start) // width),
                ctypes.c_int64(width), pointer(statistics.divergence[row:]),
                pointer(statistics.codes[first + start :]) if with_codes else None, wanted,
                ctypes.c_int64(len(tops)), looked_for, ctypes.c_int64(len(prefixes)), ctypes.c_int64(shift),
                None if counts is None else pointer(counts), rooms, filled, pointer(scratch), pointer(marks))
        if gathering:
            gathered()

    def _first_pass(self, statistics: Fusion, other: torch.Tensor, base: torch.Tensor, first: int, coded: int,
                    found: Tally) -> None:
        """Whole rows of ``other`` and ``base`` from the tensor's element ``first`` on: their divergences (kept),
        the first ``coded`` importances' codes kept (counted by the caller), the others' counted. The chunks are
        left as they were (the next pass may be given them): the float64 copies are made in this worker's
        workspace."""
        import torch

        width = statistics.width
        x, b, p, q = (w.view(-1, width) for w in self.workspace("first pass", other, 4, torch.float64))
        x.copy_(other.view(-1, width))
        b.copy_(base.view(-1, width))
        (floor,) = self.scalars([FLOOR], x)
        torch.softmax(x, dim=-1, out=p).add_(floor)
        torch.softmax(b, dim=-1, out=q).add_(floor)
        row = first // width
        divergence = statistics.divergence[row : row + x.shape[0]]
        torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True, out=divergence)
        importance = statistics.importance(x, b, row).view(-1)
        unsigned = statistics.unsigned(row, x.shape[0])
        statistics.quantiles.code(importance[:coded], statistics.codes[first : first + coded], unsigned=unsigned)
        if coded < importance.numel():
            statistics.quantiles.tally(importance[coded:], found, unsigned=unsigned)

    def _coded_pass(self, statistics: Fusion, other: torch.Tensor, base: torch.Tensor, first: int,
                    found: Tally) -> None:
        """A later pass over elements with codes: only those whose code is a quantile's prefix's, recomputed."""
        import torch

        at = statistics.quantiles.candidates(statistics.codes[first : first + other.numel()])
        if at.size:
            importance = statistics.picked(other, base, at, first)
            statistics.quantiles.tally(importance, found, unsigned=bool(importance.view(torch.int64).min() >= 0))

    def _recomputed_pass(self, statistics: Fusion, other: torch.Tensor, base: torch.Tensor, first: int,
                         found: Tally) -> None:
        """A later pass over whole rows without codes: every importance recomputed, a slice of rows at a time."""
        import torch

        width = statistics.width
        step = max(1, SLICE // width) * width
        for begin in range(0, other.numel(), step):
            end = min(begin + step, other.numel())
            x, b = (w.view(-1, width) for w in self.workspace("later pass", other[begin:end], 2, torch.float64))
            x.copy_(other[begin:end].view(-1, width))
            b.copy_(base[begin:end].view(-1, width))
            row = (first + begin) // width
            importance = statistics.importance(x, b, row)
            statistics.quantiles.tally(importance, found, unsigned=statistics.unsigned(row, x.shape[0]))

    def finish_statistics(self, statistics: Fusion, tensor: MergedTensor) -> Fusion:
        """Settle the pass's digit; after the last, the threshold ``median + 1.5 (Q3 - Q1)``."""
        statistics.quantiles.finish_pass()
        statistics.row, statistics.passes = 0, statistics.passes + 1
        if statistics.quantiles.done and statistics.quantiles.values:
            q1, median, q3 = statistics.quantiles.values
            statistics.threshold = median + 1.5 * (q3 - q1)
        return statistics

    def passes_left(self, statistics: Fusion) -> int:
        """The selection's passes left (none once the quantiles are found, one where the next gathers them)."""
        return statistics.quantiles.passes_left

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """``b + (x - b) [importance >= threshold]`` on a block of whole rows. (Every importance recomputed: that
        costs less than picking out, by their codes, the few whose code is the threshold's.)"""
        assert base is not None
        fusion: Fusion = statistics
        (other,) = parts
        compiled = native.for_tensors("arcee_fusion", [other, base], vector_math=True)
        if compiled is not None and acc.device.type == "cpu":
            import ctypes

            compiled.arcee_kernel(
                pointer(other), pointer(base), ctypes.c_int64(acc.numel() // fusion.width),
                ctypes.c_int64(fusion.width), pointer(fusion.divergence[offset // fusion.width :]),
                ctypes.c_double(fusion.threshold), pointer(acc))
            return
        change = acc.view(-1, fusion.width)
        wide = scratch.view(-1, fusion.width)
        change.copy_(other.view(-1, fusion.width)).sub_(wide.copy_(base.view(-1, fusion.width)))
        (keep,) = self.workspace("keep", acc)
        row = offset // fusion.width
        divergence = fusion.divergence[row : row + change.shape[0]].to(change.device)
        importance = keep.view_as(change).copy_(change).abs_().mul_(divergence)
        importance.ge_(self.scalars([fusion.threshold], importance)[0])  # 1.0 where kept, else 0.0
        change.mul_(importance).add_(wide)

