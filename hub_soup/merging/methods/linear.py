"""``linear``: mergekit's linear merge, the weighted sum of the models, divided by the weights' sum by default.

Wortsman et al. 2022, "Model soups" (https://arxiv.org/abs/2203.05482), with mergekit's parameters:
each model's ``weight`` (required), and ``normalize`` (default true) dividing by their sum::

    soup = (w0 * p0 + w1 * p1 + ...) / (w0 + w1 + ...)      (normalize: true)
    soup =  w0 * p0 + w1 * p1 + ...                         (normalize: false)

Unlike ``weighted`` (the soup of the first floor, always a weighted average of non-negative
weights), a weight may be negative, as mergekit allows, and the kernel works in float64: a weighted
sum of terms of either sign can cancel, and the soup is then still its definition rounded once. On bfloat16
models the sum runs in a compiled loop (:mod:`hub_soup.native.elementwise`), the same steps bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import MergeMethod, NoParameters
from hub_soup.merging.methods.arithmetic import multiply_first_
from hub_soup.native import elementwise

if TYPE_CHECKING:
    import torch


class LinearParameters(NoParameters):
    """mergekit's ``linear`` parameters (each model's ``weight`` is its ingredient's weight)."""

    normalize: bool = Field(True, description="divide the weighted sum by the sum of the weights")


class Linear(MergeMethod):
    """mergekit's ``linear``: ``sum_i w_i p_i``, divided by ``sum_i w_i`` unless ``normalize`` is false."""

    name = "linear"
    title = "linear merge"
    paper = "[Wortsman et al., 2022, Model soups](https://arxiv.org/abs/2203.05482)"
    summary = "each model was multiplied by its weight and the products summed{divided}."
    divisor = "the sum of the weights"
    Parameters = LinearParameters
    uses_weights = True
    normalizes_weights = False  # the parameter decides, per tensor (see kernel)
    averages = False  # with normalize: false (or a negative weight) the soup is no average
    float64_kernel = True

    def _weights_from(self, weights: Sequence[float] | None) -> list[float] | None:
        """The weights as given, refused before anything is read where ``normalize`` would divide by 0."""
        given = super()._weights_from(weights)
        if given is not None and self.parameters.normalize:  # type: ignore[attr-defined]
            _sum(given)
        return given

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """The weighted sum, then one division by the weights' sum (the definition's order: an element whose
        products cancel exactly is 0, not a rounding of divided weights)."""
        assert self.weights is not None
        normalize = self.parameters.normalize  # type: ignore[attr-defined]
        if elementwise.weighted_sum(acc, parts, self.weights, self.total if normalize else None):
            return
        multiply_first_(acc, parts, self.scalars(self.weights, acc), scratch)
        if normalize:
            acc.div_(self.total)

    @cached_property
    def total(self) -> float:
        """The weights' sum, what ``normalize`` divides by."""
        assert self.weights is not None
        return _sum(self.weights)


def _sum(weights: Sequence[float]) -> float:
    """The weights' sum, what ``normalize`` divides by: refused where it is 0 (mergekit writes inf and NaN)."""
    total = math.fsum(weights)
    if total == 0:
        raise RecipeError(f"method linear: the weights {list(weights)} sum to 0, and normalize divides by their sum",
                          hint="change a weight, or set normalize: false")
    return total
