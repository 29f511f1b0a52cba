"""Angles between whole tensors, from dot products accumulated chunk by chunk (a statistics pass).

:class:`Gram` keeps every pair's dot product of a few flattened vectors in float64
Python floats: a few numbers per tensor, however large the tensor. Tensor methods
only: importing this imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hub_soup import native
from hub_soup.native import pointer
from hub_soup.threads import in_blocks

if TYPE_CHECKING:
    import torch

#: Elements of each vector whose dot products are summed as one (a few float64 rows that stay in the cache).
PIECE = 1 << 17

#: A method's :meth:`~hub_soup.merging.methods.MergeMethod.workspace`: ``(name, like, count, dtype)`` to buffers.
Workspace = Callable[[str, "torch.Tensor", int, "torch.dtype"], list["torch.Tensor"]]


class Gram:
    """The dot products ``<v_i, v_j>`` (``i <= j``) of ``count`` vectors seen one chunk at a time.

    ``workspace`` is the method's :meth:`~hub_soup.merging.methods.MergeMethod.workspace`: the chunks are
    widened into buffers made once per merge, not once per tensor (a new buffer of a few tens of MiB per
    tensor grew the process by 700 MiB over a 1.5B model: the allocator kept what each freed).
    """

    def __init__(self, count: int, workspace: Workspace) -> None:
        self.count = count
        self._dots = [[0.0] * count for _ in range(count)]
        self._workspace = workspace

    def add(self, vectors: Sequence[torch.Tensor], origin: torch.Tensor | None = None) -> Gram:
        """Fold in the next chunk of every vector (any floating dtype; multiplied and summed in float64), or
        with an ``origin`` (a base's chunk) of every vector's difference from it (task vectors).

        The chunk is taken :data:`PIECE` elements at a time, each piece's dot products summed into the Gram
        in order: the same sums however many compute workers share the pieces (:func:`~hub_soup.threads.in_blocks`),
        so a soup's angles do not depend on the machine. Each piece is copied into float64 rows (the base widened
        once, where a float64 - bf16 subtraction is several times slower) still in the cache, and reduced by
        BLAS ``dot``: about five times faster than float64 copies multiplied and summed pair by pair, and as
        exact (float64 products, float64 sums).
        """
        flat = [vector.reshape(-1) for vector in vectors]
        base = origin.reshape(-1) if origin is not None else None
        for dots in in_blocks(flat[0].numel(), PIECE, lambda begin, end: self._piece(flat, base, begin, end)):
            for i, row in enumerate(dots):
                for j, value in enumerate(row, start=i):
                    self._dots[i][j] += value
        return self

    def _piece(self, flat: Sequence[torch.Tensor], base: torch.Tensor | None, begin: int, end: int
               ) -> list[list[float]]:
        """One piece's dot products ``<v_i, v_j>`` (``i <= j``), elements ``begin`` to ``end``: of bfloat16
        vectors in a compiled loop where one is built (:mod:`hub_soup.native`, ``native/gram.c``: the same float64
        products, summed in vector lanes a few thousand elements at a time), else in torch."""
        import torch

        *wide, widened = self._workspace("gram", flat[0][begin:end], self.count + 1, torch.float64)
        compiled = native.for_tensors("gram", [*flat, *([] if base is None else [base])])
        if compiled is not None:
            import ctypes

            pairs = (ctypes.c_double * (self.count * (self.count + 1) // 2))()
            compiled.gram_bf16(
                (ctypes.c_void_p * self.count)(*(vector[begin:end].data_ptr() for vector in flat)),
                None if base is None else pointer(base[begin:end]), ctypes.c_int64(self.count),
                ctypes.c_int64(end - begin), pairs, pointer(wide[0]),
                ctypes.c_int64((widened.data_ptr() - wide[0].data_ptr()) // (8 * self.count)))  # the rows' stride
            found = iter(pairs)
            return [[next(found) for _ in range(i, self.count)] for i in range(self.count)]
        if base is not None:
            widened.copy_(base[begin:end])
        for row, vector in zip(wide, flat, strict=True):
            row.copy_(vector[begin:end])
            if base is not None:
                row.sub_(widened)
        return [[float(torch.dot(wide[i], wide[j])) for j in range(i, self.count)] for i in range(self.count)]

    def dot(self, i: int, j: int) -> float:
        """``<v_i, v_j>``."""
        return self._dots[min(i, j)][max(i, j)]

    def cosine(self, i: int, j: int) -> float | None:
        """The cosine of the angle between ``v_i`` and ``v_j``, in [-1, 1]; ``None`` where either is zero.

        ``dot / sqrt(|v_i|^2 |v_j|^2)``: for equal vectors that is exactly 1 (the square root of a
        rounded square is exact in binary floating point).
        """
        squares = self.dot(i, i) * self.dot(j, j)
        if squares == 0:
            return None
        return max(-1.0, min(1.0, self.dot(i, j) / math.sqrt(squares)))


def arc_coefficients(t: float, cosine: float) -> tuple[float, float]:
    """SLERP's weights of two vectors at angle ``acos(cosine)``, at ``t`` along the arc from the first to the
    second: ``sin((1 - t) Omega) / sin(Omega)`` and ``sin(t Omega) / sin(Omega)`` (``cosine`` not +-1)."""
    omega = math.acos(cosine)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
