"""The elementwise steps kernels are built from, each one IEEE-rounded op.

Nothing here depends on where a tensor is cut or on the CPU's vector width, so a
kernel built from these steps gives the same bits block by block as on a whole
tensor. Tensor methods only: importing this imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def weighted_sum_(
    acc: torch.Tensor, chunk: torch.Tensor, weight: float | torch.Tensor, scratch: torch.Tensor, first: bool
) -> None:
    """``acc += weight * chunk`` (``acc = ...`` when ``first``), each op rounded once in acc's dtype.

    ``chunk`` may be any floating dtype; ``scratch`` is a buffer like ``acc``.
    Not ``acc.add_(chunk, alpha=weight)``: a fused multiply-add rounds once
    where the scalar tail of the kernel rounds twice, so results would depend
    on where chunks end.
    """
    if first:
        acc.copy_(chunk)
        acc.mul_(weight)
    else:
        scratch.copy_(chunk)
        scratch.mul_(weight)
        acc.add_(scratch)


def multiply_first_(
    acc: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float | torch.Tensor], scratch: torch.Tensor
) -> None:
    """``acc = w0 * p0 + w1 * p1 + ...``, one :func:`weighted_sum_` per part."""
    for i, (part, weight) in enumerate(zip(parts, weights)):
        weighted_sum_(acc, part, weight, scratch, first=i == 0)


def sum_(acc: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``acc = t0 + t1 + ...`` in order, for ``terms`` already in ``acc``'s dtype (no scratch copy needed)."""
    acc.copy_(terms[0])
    for term in terms[1:]:
        acc.add_(term)
    return acc


def combination_(
    acc: torch.Tensor, parts: Sequence[torch.Tensor], coefficients: Sequence[float], scratch: torch.Tensor,
    base: torch.Tensor | None = None,
) -> None:
    """``acc = base + c0 (p0 - base) + c1 (p1 - base) + ...`` (``c0 p0 + c1 p1 + ...`` without a base): the soup
    of a method whose statistics pass chose one coefficient per input for the whole tensor (SLERP's kind).

    Each task vector is formed in ``acc``'s dtype before it is scaled (exact in float64 for bf16, fp16 and
    float32 inputs), so a coefficient of 1 with the others 0 gives that input back bit for bit.
    """
    for i, (part, coefficient) in enumerate(zip(parts, coefficients)):
        target = acc if i == 0 else scratch
        target.copy_(part)
        if base is not None:
            target.sub_(base)
        target.mul_(coefficient)
        if i:
            acc.add_(scratch)
    if base is not None:
        scratch.copy_(base)
        acc.add_(scratch)
