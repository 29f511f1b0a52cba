"""``nearswap``: the other model's value where it is near the base's, a step of ``t`` towards it elsewhere.

mergekit's own method (mergekit's code is the definition; after alchemonaut's QuartetAnemoi
merges). With ``a`` the base and ``b`` the one other model, elementwise::

    w = clamp(t / max(|a - b|, 1e-6), 0, 1)
    soup = w * b + (1 - w) * a

Elements closer than ``t`` become ``b``'s; the others move by ``t`` from ``a`` towards ``b``:
for ``t >= 1e-6`` that is ``a + clamp(b - a, -t, t)``, what the kernel computes (in float64,
rounded once to the output dtype): two float64 operations where the formula takes six, on bfloat16
models in a compiled loop where one is built (:mod:`hub_soup.native.elementwise`, the same bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from hub_soup.merging.methods import MergeMethod, NoParameters
from hub_soup.native import elementwise

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
        if t >= NEAREST and elementwise.nearswap(acc, other, base, t):
            return
        acc.copy_(base)  # a, widened once: a float64 op with a bf16 operand is several times slower
        if t <= 0:
            return  # w = 0: the base
        scratch.copy_(other)
        scratch.sub_(acc)  # d = b - a, exact in float64
        if t >= NEAREST:
            # w d = d where |d| <= t (w = 1), else (t / |d|) d = t sign(d): a + w d is a + clamp(d, -t, t), the
            # definition's value without its roundings (b itself where near, exactly)
            acc.add_(scratch.clamp_(-t, t))
            return
        (w,) = self.workspace("nearswap", acc)  # t below the floor: w = t / max(|d|, 1e-6) < 1 everywhere
        torch.abs(scratch, out=w).clamp_(min=NEAREST)
        torch.div(self.scalars([t], w)[0], w, out=w)
        acc.addcmul_(scratch, w)  # a + w d
