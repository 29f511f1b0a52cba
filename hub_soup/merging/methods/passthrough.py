"""``passthrough``: each output tensor is one input's tensor, times its ``scale`` where one is given.

mergekit's ``passthrough``, what layer stacking (frankenmerges) is written with: every output
tensor is made of exactly one input (an output layer taken from one layer of one model), so
nothing is averaged. A per-input ``scale`` (mergekit's per-model parameter, often given by a
filter: ``o_proj`` at 0.5) multiplies it, in float64, rounded once to the output dtype; without
one the tensor is copied bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergeMethod, NoParameters
from hub_soup.native import elementwise

if TYPE_CHECKING:
    import torch


class PassthroughParameters(NoParameters):
    """mergekit's ``passthrough`` parameters."""

    scale: float | None = Field(None, allow_inf_nan=False, description="multiply the input's tensor by this "
                                "(per input; none: the tensor as it is)")


class Passthrough(MergeMethod):
    """mergekit's ``passthrough``: one input per output tensor, scaled where ``scale`` says."""

    name = "passthrough"
    title = "passthrough"
    summary = "each tensor was taken from one model as it is (times its scale, where one was given)."
    Parameters = PassthroughParameters
    ingredient_parameters = ("scale",)
    exact_ingredients = 1  # per merged tensor: a stacked plan reads several models, one for each tensor
    min_ingredients = 1
    float64_kernel = True

    def copies(self) -> bool:
        """Without a scale the tensor is its input's, bit for bit (rounded to the output dtype where it differs)."""
        return self.per_ingredient("scale", 1) == [None]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        (part,) = parts
        (scale,) = self.per_ingredient("scale", 1)
        if elementwise.weighted_sum(acc, parts, [1.0 if scale is None else scale]):  # times 1 is exact
            return
        acc.copy_(part)
        if scale is not None:
            acc.mul_(self.scalars([scale], acc)[0])
