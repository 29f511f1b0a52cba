"""The elementwise steps kernels are built from, each one IEEE-rounded op.

Nothing here depends on where a tensor is cut or on the CPU's vector width, so a
kernel built from these steps gives the same bits block by block as on a whole
tensor. Tensor methods only: importing this imports no torch. :func:`combination_`'s
weighted sums of bfloat16 inputs run in a compiled loop where one is built
(:mod:`hub_soup.native.elementwise`), the same steps in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hub_soup.native import elementwise

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
    base: torch.Tensor | None = None, *, scalars: Callable[[Sequence[float], torch.Tensor], Sequence[torch.Tensor]],
) -> None:
    """``acc = base + c0 (p0 - base) + c1 (p1 - base) + ...`` (``c0 p0 + c1 p1 + ...`` without a base): the soup
    of a method whose coefficients are one number per input for the whole tensor (task arithmetic's and
    SLERP's kinds).

    A base narrower than ``acc`` (bf16, fp16, float32 into float64) is computed as
    ``c0 p0 + c1 p1 + ... + (1 - sum c) base``: each input widened once, where forming every task
    vector first subtracts the base in its own dtype once per input (a mixed-dtype op, the kernel's
    slowest: this way is 1.5x faster on three fine-tunes). The two differ by roundings of 2^-53 of a
    term, far below the output's ulp, and agree bit for bit where the coefficients are small integers or
    halves, as most recipes' are. A base as wide as ``acc`` (float64 models) takes the task vectors
    first, whose differences are exact where the models are close. Either way a coefficient of 1 with
    the others 0 gives that input back bit for bit. ``scalars`` is the method's
    :meth:`~hub_soup.merging.methods.MergeMethod.scalars` (0-dim tensors multiply faster than floats).
    """
    if base is not None and base.dtype == acc.dtype:
        for i, (part, weight) in enumerate(zip(parts, scalars(coefficients, acc))):
            target = acc if i == 0 else scratch
            target.copy_(part)
            target.sub_(base)
            target.mul_(weight)
            if i:
                acc.add_(scratch)
        acc.add_(base)
        return
    rest = 1.0 - math.fsum(coefficients)
    values = [*coefficients, rest] if base is not None and rest != 0 else list(coefficients)
    if elementwise.weighted_sum(acc, [*parts, base] if len(values) > len(parts) else parts, values):  # type: ignore[list-item]
        return
    weights = scalars(values, acc)
    for i, (part, weight) in enumerate(zip(parts, weights)):
        weighted_sum_(acc, part, weight, scratch, first=i == 0)
    if len(weights) > len(parts):
        assert base is not None
        weighted_sum_(acc, base, weights[-1], scratch, first=False)
