"""``nearswap``: the other model's value where it is near the base's, a step of ``t`` towards it elsewhere.

mergekit's own method (mergekit's code is the definition; after alchemonaut's QuartetAnemoi
merges). With ``a`` the base and ``b`` the one other model, elementwise::

    w = clamp(t / max(|a - b|, 1e-6), 0, 1)
    soup = w * b + (1 - w) * a

Elements closer than ``t`` become ``b``'s; the others move by ``t`` from ``a`` towards ``b``.
Computed in float64, rounded once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergeMethod, NoParameters

if TYPE_CHECKING:
    import torch

# mergekit's floor on |a - b|, so that equal elements take b (w clamped to 1) without a division by 0.
NEAREST = 1e-6


class NearswapParameters(NoParameters):
    """mergekit's ``nearswap`` parameters."""

    t: float = Field(allow_inf_nan=False, description="the distance below which the other model's value is taken, "
                     "and the step towards it elsewhere")


class Nearswap(MergeMethod):
    """mergekit's ``nearswap``: ``w b + (1 - w) a`` with ``w = clamp(t / |a - b|, 0, 1)``, ``a`` the base."""

    name = "nearswap"
    title = "NearSwap"
    paper = "[alchemonaut, QuartetAnemoi-70B-t0.0001](https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)"
    summary = ("each element took the other model's value where it was within t of the base's, and moved t "
               "from the base's towards it elsewhere.")
    Parameters = NearswapParameters
    needs_base = True
    exact_ingredients = 1
    min_ingredients = 1
    float64_kernel = True

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        assert base is not None
        (other,) = parts
        t = self.parameters.t  # type: ignore[attr-defined]
        scratch.copy_(base)
        scratch.sub_(other).abs_().clamp_(min=NEAREST)  # |a - b|
        scratch.reciprocal_().mul_(t).clamp_(0, 1)  # w
        acc.copy_(other)
        acc.sub_(base)
        acc.mul_(scratch)
        acc.add_(base)  # a + w (b - a)
