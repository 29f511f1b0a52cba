"""``nuslerp``: SLERP of two models (or of their task vectors from a base), ``t`` from their weights.

mergekit's own method, as its code computes it. ``t = w1 / (w0 + w1)`` (0.5 where ``|w0 + w1| <
1e-6``) from each model's ``weight``; ``v_i`` the models, or with a base their task vectors ``x_i -
base`` (the soup is then ``base + ...``). With ``Omega`` the angle between ``v0`` and ``v1``::

    soup = sin((1 - t) Omega) / sin(Omega) * v0 + sin(t Omega) / sin(Omega) * v1

linear ``(1 - t) v0 + t v1`` where they are collinear (``1 - cos^2 <= 1e-16``); each norm is
floored at ``1e-7`` for the angle, as mergekit's. ``nuslerp_flatten`` (default) takes the whole
tensor as one vector: its angle comes from a statistics pass (dot products in float64, chunk by
chunk) and the kernel streams. ``nuslerp_flatten: false`` takes each vector along the last axis on
its own (each row of a matrix), or with ``nuslerp_row_wise: true`` each vector along the *first*
axis (each column of a matrix, despite the name: mergekit's code transposes the first axis to the
last); those angles need whole rows, so the engine gives such a tensor whole. Float64 throughout,
one rounding to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram, arc_coefficients
from hub_soup.merging.methods.arithmetic import combination_

if TYPE_CHECKING:
    import torch

# mergekit's floor on a norm for the angle, and its bound on 1 - cos^2 below which the vectors are collinear.
NORM_FLOOR = 1e-7
COLLINEAR = 1e-16


class NuslerpParameters(NoParameters):
    """mergekit's ``nuslerp`` parameters (each model's ``weight`` is its ingredient's weight)."""

    nuslerp_flatten: bool = Field(True, description="one angle for the whole tensor; false: one per vector")
    nuslerp_row_wise: bool = Field(False, description="with nuslerp_flatten false: the vectors along the first "
                                   "axis (a matrix's columns) instead of the last (its rows), as mergekit's code")


def coefficients(t: float, dot: float, square0: float, square1: float) -> tuple[float, float]:
    """The weights of ``v0`` and ``v1`` at ``t``, from their dot product and squared norms (mergekit's guards)."""
    cosine = max(-1.0, min(1.0, dot / (max(math.sqrt(square0), NORM_FLOOR) * max(math.sqrt(square1), NORM_FLOOR))))
    return (1 - t, t) if 1 - cosine * cosine <= COLLINEAR else arc_coefficients(t, cosine)


class Nuslerp(MergeMethod):
    """mergekit's ``nuslerp``: SLERP at ``t = w1 / (w0 + w1)``, of task vectors where a base is given."""

    name = "nuslerp"
    title = "NuSLERP"
    paper = "[mergekit's nuslerp](https://github.com/arcee-ai/mergekit)"
    summary = (
        "per tensor (or per row), the two models (their task vectors, with a base) were interpolated along the "
        "great circle between them, at t = w1 / (w0 + w1) (linearly where they are collinear)."
    )
    Parameters = NuslerpParameters
    optional_base = True
    uses_weights = True
    normalizes_weights = False  # they set t alone
    exact_ingredients = 2
    float64_kernel = True

    @property
    def whole_tensor(self) -> bool:  # type: ignore[override]  # the parameter decides, per tensor
        """A tensor is merged whole where each of its vectors has its own angle (``nuslerp_flatten: false``)."""
        return not self.parameters.nuslerp_flatten  # type: ignore[attr-defined]

    @property
    def t(self) -> float:
        """``w1 / (w0 + w1)``, 0.5 where the weights cancel (mergekit's)."""
        w0, w1 = self.weights_for(2)
        return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)

    def start_statistics(self, tensor: MergedTensor) -> Gram:
        return Gram(2)

    def observe(self, statistics: Gram, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        return statistics.add(parts, base)

    def finish_statistics(self, statistics: Gram, tensor: MergedTensor) -> tuple[float, float]:
        """The weights of the two (task) vectors in the tensor."""
        return coefficients(self.t, statistics.dot(0, 1), statistics.dot(0, 0), statistics.dot(1, 1))

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        combination_(acc, parts, statistics, scratch, base)

    def merge_tensor(self, parts: Sequence[torch.Tensor], base: torch.Tensor | None, tensor: MergedTensor
                     ) -> torch.Tensor:
        """Each vector along the last axis (the first, ``nuslerp_row_wise``) interpolated on its own."""
        anchor = None if base is None else base.to(tensor.dtype)
        v0, v1 = (p.to(tensor.dtype) if anchor is None else p.to(tensor.dtype) - anchor for p in parts)
        turn = self.parameters.nuslerp_row_wise and v0.dim() > 1  # type: ignore[attr-defined]
        if turn:
            v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        t = self.t
        norm0 = v0.norm(dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
        norm1 = v1.norm(dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
        cosine = ((v0 / norm0) * (v1 / norm1)).sum(dim=-1, keepdim=True).clamp_(-1, 1)
        collinear = (1 - cosine.square()) <= COLLINEAR
        omega = cosine.masked_fill(collinear, 0).acos_()
        sine = omega.sin().masked_fill_(collinear, 1)
        c0 = ((1 - t) * omega).sin_().div_(sine).masked_fill_(collinear, 1 - t)
        c1 = (t * omega).sin_().div_(sine).masked_fill_(collinear, t)
        result = c0 * v0 + c1 * v1
        if turn:
            result = result.transpose(0, -1)
        return result if anchor is None else result + anchor
