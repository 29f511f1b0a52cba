"""``weighted``: each ingredient counts by its weight (normalised to sum to one)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.methods.arithmetic import multiply_first_
from hub_soup.merging.methods.uniform import sum_then_scale_

if TYPE_CHECKING:
    import torch


class Weighted(MergeMethod):
    """``w0 * p0 + w1 * p1 + ...``, every product and sum rounded once in the accumulator's dtype.

    Equal weights make the uniform soup, bit for bit (summed first, scaled once: see
    :func:`~hub_soup.merging.methods.uniform.sum_then_scale_`), so ``weighted`` with
    weights 1, 1 writes the same file as ``uniform``.
    """

    name = "weighted"
    averages = True
    uses_weights = True

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        assert self.weights is not None
        weights = self.scalars(self.weights, acc)
        if self.equal:
            sum_then_scale_(acc, parts, weights[0], scratch)
        else:
            multiply_first_(acc, parts, weights, scratch)

    @cached_property
    def equal(self) -> bool:
        """All weights are the same: the kernel then sums first and scales once."""
        assert self.weights is not None
        return all(w == self.weights[0] for w in self.weights)
