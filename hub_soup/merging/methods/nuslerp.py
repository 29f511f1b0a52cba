"""``nuslerp``: SLERP of two models (or of their task vectors from a base), ``t`` from their weights.

mergekit's own method, as its code computes it. ``t = w1 / (w0 + w1)`` (0.5 where ``|w0 + w1| <
1e-6``) from each model's ``weight``; ``v_i`` the models, or with a base their task vectors ``x_i -
base`` (the soup is then ``base + ...``). With ``Omega`` the angle between ``v0`` and ``v1``::

    soup = sin((1 - t) Omega) / sin(Omega) * v0 + sin(t Omega) / sin(Omega) * v1

linear ``(1 - t) v0 + t v1`` where they are collinear (``1 - cos^2 <= 1e-16``); each norm is
floored at ``1e-7`` for the angle, as mergekit's. ``nuslerp_flatten`` (default) takes the whole
tensor as one vector: its angle comes from a statistics pass (dot products in float64, chunk by
chunk) and the kernel streams. ``nuslerp_flatten: false`` takes each vector along the last axis on
its own (each row of a matrix): the engine streams whole rows
(:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`) and each block's rows give their own
angles, with no statistics pass. With ``nuslerp_row_wise: true`` it takes each vector along the
*first* axis instead (each column of a matrix, despite the name: mergekit's code transposes the
first axis to the last): a statistics pass sums each column's dot products over chunks of whole
rows (three float64 numbers per column: a row's worth of memory), and the kernel streams. Float64
throughout, one rounding to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram
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


def coefficients(t: float, dot: torch.Tensor, square0: torch.Tensor, square1: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of ``v0`` and ``v1`` at ``t`` (for each vector, float64), from their dot products and squared
    norms (mergekit's guards)."""
    norm0 = square0.sqrt().clamp_(min=NORM_FLOOR)
    norm1 = square1.sqrt().clamp_(min=NORM_FLOOR)
    cosine = (dot / (norm0 * norm1)).clamp_(-1, 1)
    collinear = (1 - cosine.square()) <= COLLINEAR
    omega = cosine.masked_fill(collinear, 0).acos_()
    sine = omega.sin().masked_fill_(collinear, 1)
    c0 = ((1 - t) * omega).sin_().div_(sine).masked_fill_(collinear, 1 - t)
    c1 = (t * omega).sin_().div_(sine).masked_fill_(collinear, t)
    return c0, c1


@dataclass
class Columns:
    """``nuslerp_row_wise``'s statistics of one tensor: each column's (vector along the first axis) dot products,
    summed over chunks of whole rows; after the pass, each column's two coefficients."""

    tensor: MergedTensor
    dot: torch.Tensor | float = 0.0
    square0: torch.Tensor | float = 0.0
    square1: torch.Tensor | float = 0.0
    c0: torch.Tensor | None = None
    c1: torch.Tensor | None = None


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

    def _columns(self, shape: tuple[int, ...]) -> bool:
        """The tensor's vectors are its columns (along the first axis): ``nuslerp_row_wise`` of a 2-D or larger."""
        parameters = self.parameters
        return not parameters.nuslerp_flatten and parameters.nuslerp_row_wise and len(shape) > 1  # type: ignore[attr-defined]

    def row_elements(self, shape: tuple[int, ...]) -> int:
        """Each vector its own angle (``nuslerp_flatten: false``): whole rows, a vector along the last axis each;
        ``nuslerp_row_wise``: whole rows along the first axis, each holding one element of every column (a 1-D
        tensor, one vector, any cut)."""
        parameters = self.parameters
        if parameters.nuslerp_flatten or not shape:  # type: ignore[attr-defined]
            return 1
        if parameters.nuslerp_row_wise:  # type: ignore[attr-defined]
            return math.prod(shape[1:])
        return shape[-1]

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """One pass (the tensor's angle, or each column's), none for vectors along the last axis (each block's
        rows hold theirs)."""
        parameters = self.parameters
        return 1 if parameters.nuslerp_flatten or parameters.nuslerp_row_wise else 0  # type: ignore[attr-defined]

    @property
    def t(self) -> float:
        """``w1 / (w0 + w1)``, 0.5 where the weights cancel (mergekit's)."""
        w0, w1 = self.weights_for(2)
        return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)

    def start_statistics(self, tensor: MergedTensor) -> Gram | Columns | MergedTensor:
        """The tensor's dot products (one vector, or each column) for the pass; the tensor itself for vectors
        along its last axis (no pass: the kernel's rows)."""
        if self._columns(tensor.dims):
            return Columns(tensor)
        if self.parameters.nuslerp_flatten or self.parameters.nuslerp_row_wise:  # type: ignore[attr-defined]
            return Gram(2, self.workspace)
        return tensor

    def observe(self, statistics: Gram | Columns, parts: Sequence[torch.Tensor], base: torch.Tensor | None
                ) -> Gram | Columns:
        if isinstance(statistics, Gram):
            return statistics.add(parts, base)
        width = math.prod(statistics.tensor.dims[1:])
        v0, v1 = (vector.view(-1, width) for vector in _vectors(parts, base))
        statistics.dot = (v0 * v1).sum(0).add_(statistics.dot)
        statistics.square0 = v0.square().sum(0).add_(statistics.square0)
        statistics.square1 = v1.square().sum(0).add_(statistics.square1)
        return statistics

    def finish_statistics(self, statistics: Gram | Columns, tensor: MergedTensor) -> tuple[float, float] | Columns:
        """The weights of the two (task) vectors in the tensor, or of each column's."""
        import torch

        if isinstance(statistics, Columns):
            dots = [torch.as_tensor(d, dtype=torch.float64)
                    for d in (statistics.dot, statistics.square0, statistics.square1)]
            statistics.c0, statistics.c1 = coefficients(self.t, *dots)
            return statistics
        dots = [torch.tensor(statistics.dot(i, j), dtype=torch.float64) for i, j in ((0, 1), (0, 0), (1, 1))]
        c0, c1 = coefficients(self.t, *dots)
        return float(c0), float(c1)

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """The tensor's coefficients applied (one pair, or each column's), or each row of the block
        interpolated by its own angle."""
        import torch

        if isinstance(statistics, tuple):
            combination_(acc, parts, statistics, scratch, base, scalars=self.scalars)
            return
        if isinstance(statistics, Columns):
            assert statistics.c0 is not None and statistics.c1 is not None
            width = statistics.c0.numel()
            c0, c1 = statistics.c0.to(acc.device), statistics.c1.to(acc.device)
        else:
            width = statistics.dims[-1] if statistics.dims else 1
        rows = acc.numel() // width
        v0, v1 = (vector.view(rows, width) for vector in _vectors(parts, base, acc.device))
        if not isinstance(statistics, Columns):
            c0, c1 = coefficients(self.t, (v0 * v1).sum(1, keepdim=True), v0.square().sum(1, keepdim=True),
                                  v1.square().sum(1, keepdim=True))
        soup = acc.view(rows, width)
        torch.mul(v0, c0, out=soup)
        soup.add_(v1.mul_(c1))
        if base is not None:
            scratch.copy_(base)
            acc.add_(scratch)


def _vectors(parts: Sequence[torch.Tensor], base: torch.Tensor | None, device: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two (task) vectors of a chunk or block, flat, in float64 (on ``device``)."""
    import torch

    wide = [p.to(device=device, dtype=torch.float64, copy=True) for p in parts]  # consumed below: never the input
    if base is not None:
        anchor = base.to(device=device, dtype=torch.float64)
        wide = [w.sub_(anchor) for w in wide]
    v0, v1 = wide
    return v0, v1
