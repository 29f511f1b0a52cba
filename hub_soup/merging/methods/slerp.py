"""``slerp``: spherical linear interpolation between two models, tensor by tensor.

Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH), as model merges
use it (mergekit's ``slerp``). Per tensor, ``a`` and ``b`` the two ingredients flattened
over the whole tensor and ``Omega`` the angle between them::

    soup = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b

``t = 0`` is the first ingredient, ``t = 1`` the second. Where the two are nearly
parallel (or opposite: ``|cos Omega| > 0.9995``, mergekit's threshold) or either is zero,
the soup is the linear ``(1 - t) a + t b``. The angle comes from the statistics pass
(dot products accumulated in float64, chunk by chunk); the kernel works in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram, arc_coefficients
from hub_soup.merging.methods.arithmetic import combination_

if TYPE_CHECKING:
    import torch

# mergekit's DOT_THRESHOLD: above this |cos|, sin(Omega) is too small to divide by.
PARALLEL = 0.9995


class SlerpParameters(NoParameters):
    """SLERP's parameters, named as mergekit names them."""

    t: float = Field(ge=0, le=1, allow_inf_nan=False, description="0: the first ingredient, 1: the second")


def coefficients(t: float, cosine: float | None) -> tuple[float, float]:
    """The weights of ``a`` and ``b`` at ``t`` for vectors at angle ``acos(cosine)`` (``None``: one is zero)."""
    if cosine is None or abs(cosine) > PARALLEL:
        return 1 - t, t
    return arc_coefficients(t, cosine)


class Slerp(MergeMethod):
    """SLERP (Shoemake 1985, "Animating rotation with quaternion curves"): two models along the arc between them."""

    name = "slerp"
    title = "spherical linear interpolation (SLERP)"
    paper = "[Shoemake, 1985, Animating Rotation with Quaternion Curves](https://doi.org/10.1145/325165.325242)"
    summary = (
        "per tensor, the two models were interpolated along the great circle between them, at t from the "
        "first to the second (linearly where they are nearly parallel)."
    )
    Parameters = SlerpParameters
    exact_ingredients = 2
    float64_kernel = True

    def start_statistics(self, tensor: MergedTensor) -> Gram:
        return Gram(2, self.workspace)

    def observe(self, statistics: Gram, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        return statistics.add(parts)

    def finish_statistics(self, statistics: Gram, tensor: MergedTensor) -> tuple[float, float]:
        """The weights of the two ingredients in the tensor."""
        return coefficients(self.parameters.t, statistics.cosine(0, 1))  # type: ignore[attr-defined]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """``s_a * a + s_b * b``; an end (``t`` 0 or 1) is copied, so it comes back bit for bit."""
        a, b = parts
        s_a, s_b = statistics
        if s_b == 0 or s_a == 0:
            acc.copy_(a if s_b == 0 else b)
            return
        combination_(acc, parts, statistics, scratch, scalars=self.scalars)
