"""The compiled elementwise loops of ``elementwise.c``, called on bfloat16 blocks: each returns whether it did the
work (``False``: no compiled library, or tensors it does not take; the caller then computes with torch).

One call a cache-sized block does in one pass what eager torch does in one op a step (a widening copy, a product,
a sum, a mask, each reading and writing the block): linear's weighted sum of three bfloat16 models spent 4.3 ns
an element in torch, mostly in widening copies and passes over the block. The loops' results are the torch
path's bit for bit (tests check), so a soup does not depend on whether a compiler was found.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hub_soup import native
from hub_soup.native import pointer

if TYPE_CHECKING:
    import torch

#: Ingredients :func:`generalized` and the RAM loops take at most (their rows of a span are on the C stack).
MOST = 16

_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


def _library(tensors: Sequence[torch.Tensor]) -> ctypes.CDLL | None:
    """The library where its loops can read ``tensors`` (:func:`hub_soup.native.for_tensors`), its functions
    typed for ctypes."""
    found = native.for_tensors("elementwise", tensors)
    if found is not None and not hasattr(found, "typed"):
        for narrow in (found.narrow_f64_bf16, found.narrow_f32_bf16):
            narrow.argtypes, narrow.restype = [_P, _P, _I64], _I64
        found.weighted_sum_bf16.argtypes = [_P, _P, _I64, _P, ctypes.c_int, _F64, _I64]
        found.weighted_sum_bf16.restype = None
        found.generalized_bf16.argtypes = [_P, _P, _P, _I64, _P, _P, _P, _P, _P, _P, _P, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_int, ctypes.c_int, _F64, _F64, _I64, _I64]
        found.generalized_bf16.restype = None
        found.ram_bf16.argtypes, found.ram_bf16.restype = [_P, _P, _P, _I64, _F64, _P, _I64], None
        found.ram_counts_bf16.argtypes, found.ram_counts_bf16.restype = [_P, _P, _I64, _F64, _I64, _P], None
        found.nearswap_bf16.argtypes, found.nearswap_bf16.restype = [_P, _P, _P, _F64, _I64], None
        found.typed = True  # type: ignore[attr-defined]
    return found


def _compiled(tensors: Sequence[torch.Tensor], acc: torch.Tensor) -> ctypes.CDLL | None:
    """The library where ``tensors`` are bfloat16 and ``acc`` float64, all on the CPU and contiguous."""
    import torch

    if acc.dtype != torch.float64 or acc.device.type != "cpu" or not acc.is_contiguous():
        return None
    return _library(tensors)


def _addresses(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _doubles(values: Sequence[float]) -> ctypes.Array[ctypes.c_double]:
    return (ctypes.c_double * len(values))(*values)


def narrow(out: torch.Tensor, value: torch.Tensor) -> bool | None:
    """``out`` (bfloat16) = ``value`` (float64 or float32) rounded as torch's ``copy_`` rounds it; whether every
    result is finite, or ``None`` where no compiled loop takes them (``out`` untouched)."""
    import torch

    if value.dtype not in (torch.float64, torch.float32) or value.device.type != "cpu" or not value.is_contiguous():
        return None
    library = _library([out])  # out: bfloat16, on the CPU, contiguous
    if library is None:
        return None
    loop = library.narrow_f64_bf16 if value.dtype == torch.float64 else library.narrow_f32_bf16
    return loop(pointer(out), pointer(value), out.numel()) == 0


def weighted_sum(acc: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float],
                 divisor: float | None = None) -> bool:
    """``acc = (w0 p0 + w1 p1 + ...) [/ divisor]`` in float64, each product and sum rounded in order
    (:func:`~hub_soup.merging.methods.arithmetic.weighted_sum_`'s steps); whether it was done."""
    library = _compiled(parts, acc)
    if library is None:
        return False
    library.weighted_sum_bf16(pointer(acc), _addresses(parts), len(parts), _doubles(weights), divisor is not None,
                              1.0 if divisor is None else divisor, acc.numel())
    return True


@dataclass(frozen=True)
class Trim:
    """How :func:`generalized` trims one ingredient's task vector: not at all (the default), ``drop`` it whole, by
    DARE's mask (``limit``: the draw a kept element is below; ``key``: the mask's 32-bit key), or to the magnitudes
    above ``lower`` and below ``upper`` (either ``None``: no bound)."""

    drop: bool = False
    limit: int | None = None
    key: int = 0
    lower: float | None = None
    upper: float | None = None

    @property
    def mode(self) -> int:
        """elementwise.c's KEEP, DROP, RANDOM or MAGNITUDE."""
        if self.drop:
            return 1
        if self.limit is not None:
            return 2
        return 3 if self.lower is not None or self.upper is not None else 0


def generalized(acc: torch.Tensor, parts: Sequence[torch.Tensor], base: torch.Tensor, *, weights: Sequence[float],
                densities: Sequence[float], trims: Sequence[Trim], element_key: int, rescale: bool, consensus: bool,
                normalize: bool, divisor: float, lambda_: float, offset: int) -> bool:
    """One block of :class:`~hub_soup.merging.methods.generalized.GeneralizedTaskArithmetic`'s soup (TIES, DARE,
    Breadcrumbs), from element ``offset`` of the tensor on, each ingredient's task vector trimmed as its ``trims``
    says; whether it was done. ``element_key``: DARE's key of the element hash."""
    library = _compiled([*parts, base], acc)
    if library is None or len(parts) > MOST:
        return False
    count = len(parts)
    nan = float("nan")
    library.generalized_bf16(
        pointer(acc), _addresses(parts), pointer(base), count, _doubles(weights),
        (ctypes.c_int64 * count)(*(t.mode for t in trims)), _doubles(densities),
        (ctypes.c_int64 * count)(*(t.limit or 0 for t in trims)),
        _doubles([nan if t.lower is None else t.lower for t in trims]),
        _doubles([nan if t.upper is None else t.upper for t in trims]),
        (ctypes.c_uint32 * count)(*(t.key & 0xFFFFFFFF for t in trims)), element_key & 0xFFFFFFFF,
        rescale, consensus, normalize, divisor, lambda_, offset, acc.numel(),
    )
    return True


def ram(acc: torch.Tensor, parts: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float,
        factors: Sequence[float] | None = None) -> bool:
    """One block of ``ram``'s soup, or with ``factors`` (each ingredient's ``lambda_i``) of ``ramplus_tl``'s
    (:class:`~hub_soup.merging.methods.ram.Ram`'s and its subclass's kernels, bit for bit); whether it was done."""
    library = _compiled([*parts, base], acc)
    if library is None or len(parts) > MOST:
        return False
    library.ram_bf16(pointer(acc), _addresses(parts), pointer(base), len(parts), epsilon,
                     None if factors is None else _doubles(factors), acc.numel())
    return True


def ram_counts(parts: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> list[tuple[int, int]] | None:
    """Each ingredient's ``(shared, unique)`` count of contributions in one block (``ramplus_tl``'s statistics
    pass), or ``None`` where no compiled loop takes them."""
    library = _library([*parts, base])
    if library is None or len(parts) > MOST:
        return None
    counted = (ctypes.c_int64 * (2 * len(parts)))()
    library.ram_counts_bf16(_addresses(parts), pointer(base), len(parts), epsilon, base.numel(), counted)
    return [(counted[2 * i], counted[2 * i + 1]) for i in range(len(parts))]


def nearswap(acc: torch.Tensor, other: torch.Tensor, base: torch.Tensor, t: float) -> bool:
    """One block of ``nearswap``'s soup for ``t >= 1e-6``, ``base + clamp(other - base, -t, t)``
    (:class:`~hub_soup.merging.methods.nearswap.Nearswap`'s kernel, bit for bit); whether it was done."""
    library = _compiled([other, base], acc)
    if library is None:
        return False
    library.nearswap_bf16(pointer(acc), pointer(other), pointer(base), t, acc.numel())
    return True
