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
the few keys near each quantile gathered and sorted; four at most); the first also keeps each
row's divergence (one float64 per row: 64 KiB for a 8192-row matrix), so the later passes and
the kernel recompute each importance, bit for bit, from it and ``|x - b|``. The engine reads the
tensor once per pass the selection needs (:meth:`ArceeFusion.passes_left`), then for the kernel;
both split among the compute workers. Float64 throughout, rounded once.

A deliberate difference: above 1,000,000 elements mergekit estimates the quantiles from a sample
drawn with replacement from torch's unseeded global generator, so its soup of a large tensor
differs from run to run; hub-soup counts every element (the exact quantiles), so the soup is
reproducible and is the definition's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hub_soup.merging.methods import MergedTensor, MergeMethod
from hub_soup.merging.methods.order import PASSES, OrderStatistics, Tally
from hub_soup.threads import in_parts

if TYPE_CHECKING:
    import torch

# mergekit's floor on both softmaxes, so that the KL divergence's logarithm stays finite.
FLOOR = 1e-8
# Elements a statistics pass computes on at a time (whole rows of them): its float64 temporaries stay a few MiB.
SLICE = 1 << 17
QUANTILES = (0.25, 0.5, 0.75)


@dataclass
class Fusion:
    """One tensor's statistics: each row's divergence (found in the first pass), the quantiles' selection, the
    rows seen in this pass, and at the end the threshold."""

    tensor: MergedTensor
    quantiles: OrderStatistics
    divergence: torch.Tensor  # every row's, filled in the first pass (made whole up front: no small allocations
    # left between a pass's large temporaries, which would keep the allocator from handing those back)
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

    def start_statistics(self, tensor: MergedTensor) -> Fusion:
        import torch

        last = tensor.numel - 1
        width = tensor.dims[-1] if tensor.dims else 1
        return Fusion(tensor, OrderStatistics([int(q * last) for q in QUANTILES] if tensor.numel else []),
                      torch.empty(tensor.numel // max(width, 1), 1, dtype=torch.float64))

    def observe(self, statistics: Fusion, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Fusion:
        """Count one chunk's importances (whole rows, a slice of rows at a time, the slices split among the compute
        workers), finding its rows' divergences in the first pass."""
        assert base is not None
        if statistics.quantiles.done:  # the selection finished early: the passes left are reads alone
            return statistics
        (other,) = parts
        width = statistics.width
        step = max(1, SLICE // width) * width
        row = statistics.row

        def importances(part: int, first: int, last: int) -> Tally:
            """The importances of slices ``first`` to ``last``, tallied."""
            import torch

            found: Tally = {}
            for begin in range(first * step, min(last * step, other.numel()), step):
                # copies, even of float64 chunks: the importances are made in x, and the chunks are the next pass's
                x, b = (t[begin : begin + step].to(torch.float64, copy=True).view(-1, width) for t in (other, base))
                start = row + begin // width
                if statistics.passes == 0:
                    p = x.softmax(dim=-1).add_(FLOOR)
                    q = b.softmax(dim=-1).add_(FLOOR)
                    statistics.divergence[start : start + x.shape[0]] = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
                # |x - b| has no sign bit set; where no row's divergence has one either (a rounding below 0, a -0.0)
                # neither has their product: its bits are its key
                divergence = statistics.divergence[start : start + x.shape[0]]
                unsigned = bool(divergence.view(torch.int64).min() >= 0)
                statistics.quantiles.tally(statistics.importance(x, b, start), found, unsigned=unsigned)
            return found

        for tally in in_parts(-(-other.numel() // step), importances):
            statistics.quantiles.add(tally)
        statistics.row += other.numel() // width
        return statistics

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
        """``b + (x - b) [importance >= threshold]`` on a block of whole rows."""
        assert base is not None
        fusion: Fusion = statistics
        (other,) = parts
        rows = acc.view(-1, fusion.width)
        wide = scratch.view(-1, fusion.width)
        rows.copy_(other.view(-1, fusion.width))
        wide.copy_(base.view(-1, fusion.width))
        (importance,) = self.workspace("importance", acc)
        keep = fusion.importance(importance.view_as(rows).copy_(rows), wide, offset // fusion.width)
        keep.ge_(fusion.threshold)
        rows.sub_(wide).mul_(keep).add_(wide)
