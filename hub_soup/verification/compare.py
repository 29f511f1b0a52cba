"""The rebuilt merge compared with the published one, chunk by chunk, at flat memory.

:class:`ComparingSink` is a :class:`~hub_soup.merging.engine.Sink`: the engine streams the
rebuilt merge into it as it would into the soup's writer, and each chunk is compared with
the same elements of the published tensor, read into one reused buffer. Nothing of either
merge is held beyond a chunk, so verifying costs what merging costs, without the writes.

Differences are counted in units in the last place (ulp): floats of one sign are ordered as
their bit patterns are, so the distance between two floats' ordered bits is how many floats
lie between them, whatever their magnitude. That is the measure rounding differences have
(one rounding in another order, another dtype's arithmetic) where an absolute tolerance
would hide a real edit of a small tensor or flag a rounding of a large one.
"""

from __future__ import annotations

import torch

from hub_soup.io.read import Checkpoint
from hub_soup.verification.report import TensorDifference

# The integer of each float's width, to read its bits as.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many floats of their dtype lie between ``a`` and ``b``, element by element (int64; 0 for the
    same bits, and for +0 and -0). Integer and bool tensors: the difference of values."""
    if not a.is_floating_point():
        return (a.to(torch.int64) - b.to(torch.int64)).abs()
    bits = _BITS[a.element_size()]
    ordered_a, ordered_b = _ordered(a.view(bits)), _ordered(b.view(bits))
    if a.element_size() < 8:
        return (ordered_a - ordered_b).abs()
    # float64: the distance across zero can pass int64's range; the same sign cannot
    same_sign = (ordered_a >= 0) == (ordered_b >= 0)
    across = ordered_a.abs().double() + ordered_b.abs().double()
    return torch.where(same_sign, (ordered_a - ordered_b).abs(), across.clamp(max=2.0**63 - 1024).to(torch.int64))


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """A float's bits as an integer that orders as the floats do: its magnitude, negated when its sign is set."""
    wide = bits.to(torch.int64)
    magnitude = wide & ((1 << (bits.element_size() * 8 - 1)) - 1)
    return torch.where(wide < 0, -magnitude, magnitude)


class ComparingSink:
    """A sink that compares each chunk of the rebuilt merge with the published tensor's same elements.

    Args:
        published: the published merge, opened (its tensors are read as they are compared).
        tolerance_ulp: elements of floating tensors that differ by more are counted apart
            (:attr:`TensorDifference.beyond`).
        chunk_bytes: the read buffer's first size (it grows to the largest chunk the engine writes).

    Attributes:
        differences: each tensor that differs, in the order written.
        max_ulp: the largest difference of each dtype.
        tensors: how many tensors were compared.
    """

    def __init__(self, published: Checkpoint, tolerance_ulp: int, chunk_bytes: int) -> None:
        self._published = published
        self._tolerance = tolerance_ulp
        self._buffer = torch.empty(chunk_bytes, dtype=torch.uint8)
        self._key: str | None = None
        self._offset = 0
        self._current: TensorDifference | None = None
        self.differences: list[TensorDifference] = []
        self.max_ulp: dict[str, int] = {}
        self.tensors = 0

    def begin(self, key: str) -> None:
        """The next chunks are ``key``'s, from its first element."""
        self._settle()
        meta = self._published.metas[key]
        self._key, self._offset, self.tensors = key, 0, self.tensors + 1
        self._current = TensorDifference(key, str(meta.dtype).removeprefix("torch."), meta.numel, 0, 0, 0,
                                         meta.dtype.is_floating_point)
        self.max_ulp.setdefault(self._current.dtype, 0)

    def write(self, chunk: torch.Tensor) -> None:
        """Compare the next elements of the current tensor with the published ones."""
        assert self._key is not None and self._current is not None
        count = chunk.numel()
        if count > self._buffer.numel() // max(chunk.element_size(), 1):
            self._buffer = torch.empty(count * chunk.element_size(), dtype=torch.uint8)
        published = self._published.read_into(self._key, self._offset, count, self._buffer)
        self._offset += count
        rebuilt = chunk.reshape(-1)
        if chunk.element_size() in _BITS and chunk.is_floating_point():
            bits = _BITS[chunk.element_size()]
            differ = rebuilt.view(bits) != published.view(bits)
        else:
            differ = rebuilt != published
        differing = int(differ.sum())
        if differing:
            distance = ulp_distance(rebuilt[differ], published[differ])
            self._current.differing += differing
            self._current.beyond += int((distance > self._tolerance).sum()) if self._current.floating else differing
            self._current.max_ulp = max(self._current.max_ulp, int(distance.max()))

    def finish(self) -> None:
        """Settle the last tensor (call once the engine is done)."""
        self._settle()
        self._key, self._current = None, None

    def _settle(self) -> None:
        current = self._current
        if current is None:
            return
        if current.differing:
            self.differences.append(current)
            if current.floating:
                self.max_ulp[current.dtype] = max(self.max_ulp[current.dtype], current.max_ulp)
