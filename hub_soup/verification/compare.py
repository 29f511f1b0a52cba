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

But arithmetic in a low precision (mergekit's, in the config's dtype) rounds each term it adds
by a few ulp *of that term*: where the terms cancel (``0.25 * a + 0.75 * b`` near zero), the sum
is much smaller than they are and those roundings are many ulp of it. So an element further
than the tolerance from its rebuilt value is judged once more, against the inputs' scale
(:class:`InputScale`): within N ulp of the larger of its rebuilt value and the largest of its
inputs (each ingredient's and the base's value at that element). Elements within N ulp of their
own value pass as before, at the cost of before; only a chunk holding elements beyond that reads
its inputs, through the engine's own read path (rows selected, layers restacked, as merged).
A weight above 1 makes a term larger than its input: the inputs' scale is then the smaller, and
the rule errs towards "differs", never towards hiding an edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hub_soup.io import direct_io
from hub_soup.io.read import Checkpoint
from hub_soup.merging.engine import tensor_sources
from hub_soup.merging.plan import MergePlan
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


def ulp_at(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s floats at each ``magnitude`` (float64, non-negative): one ulp there, as a value.
    Below the smallest normal float, the subnormals' fixed spacing."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1): one ulp is eps * 2**(exponent-1)
    spacing = torch.ldexp(torch.full_like(magnitude, info.eps / 2), exponent)
    return torch.where(magnitude < info.smallest_normal, info.smallest_normal * info.eps, spacing)


class InputScale:
    """The largest magnitude among each soup element's inputs, read as the engine reads them.

    The inputs of a tensor are those :func:`~hub_soup.merging.engine.stream_merge` reads for it
    (:func:`~hub_soup.merging.engine.tensor_sources`: each ingredient's input, then the base's; a copied
    tensor's one input), each read by :meth:`~hub_soup.merging.plan.Input.read_into` for the same
    elements of the output tensor, so rows gathered for another vocabulary, filled rows and layers
    stacked from other layers are the very values the rebuilt element was made of. Memory: one chunk
    buffer, reused (it grows to the largest chunk asked for).

    Args:
        checkpoints: the ingredients the rebuild merged, in its order.
        base: the base it merged with, if any.
        plan: the rebuild's plan: every output tensor's inputs.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], base: Checkpoint | None, plan: MergePlan) -> None:
        self._sources = {t.key: (t.row_numel, tensor_sources(checkpoints, base, t)) for t in plan.tensors}
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def covers(self, key: str) -> bool:
        """Whether ``key``'s inputs are known (a tensor of the plan)."""
        return key in self._sources

    def largest(self, key: str, start: int, count: int, at: torch.Tensor) -> torch.Tensor:
        """The largest magnitude, over ``key``'s inputs, of elements ``start + at`` (``at``: indices into the
        ``count`` elements from ``start``), as float64."""
        row_numel, sources = self._sources[key]
        nbytes = direct_io.padded(count * max(c.metas[i.key].dtype.itemsize for c, i in sources))
        if self._buffer.numel() < nbytes:
            self._buffer = direct_io.aligned_buffer(nbytes)
        largest = torch.zeros(at.numel(), dtype=torch.float64)
        for checkpoint, source in sources:
            values = source.read_into(checkpoint, start, count, row_numel, self._buffer)
            torch.maximum(largest, values[at].double().abs(), out=largest)
        return largest


class ComparingSink:
    """A sink that compares each chunk of the rebuilt merge with the published tensor's same elements.

    Args:
        published: the published merge, opened (its tensors are read as they are compared).
        tolerance_ulp: elements of floating tensors that differ by more are counted apart
            (:attr:`TensorDifference.beyond`).
        chunk_bytes: the read buffer's first size (it grows to the largest chunk the engine writes).
        scale: the rebuild's inputs, where each element's are known: elements beyond the tolerance of their
            own value are then judged against their inputs' scale. ``None``: against their own value only.

    Attributes:
        differences: each tensor that differs, in the order written.
        max_ulp: the largest difference of each dtype.
        tensors: how many tensors were compared.
    """

    def __init__(
        self, published: Checkpoint, tolerance_ulp: int, chunk_bytes: int, scale: InputScale | None = None
    ) -> None:
        self._published = published
        self._tolerance = tolerance_ulp
        self._scale = scale
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
        start = self._offset
        published = self._published.read_into(self._key, start, count, self._buffer)
        self._offset += count
        rebuilt = chunk.reshape(-1)
        if chunk.element_size() in _BITS and chunk.is_floating_point():
            bits = _BITS[chunk.element_size()]
            differ = rebuilt.view(bits) != published.view(bits)
        else:
            differ = rebuilt != published
        differing = int(differ.sum())
        if not differing:
            return
        current = self._current
        where = differ.nonzero().view(-1)
        distance = ulp_distance(rebuilt[where], published[where])
        current.differing += differing
        current.max_ulp = max(current.max_ulp, int(distance.max()))
        if not current.floating:
            current.beyond += differing
            return
        far = where[distance > self._tolerance]
        current.beyond_own += far.numel()
        if far.numel() and self._scale is not None and self._scale.covers(self._key):
            current.judged_by = "inputs"
            far = far[~self._within_inputs(start, count, far, rebuilt, published)]
        current.beyond += far.numel()

    def _within_inputs(
        self, start: int, count: int, far: torch.Tensor, rebuilt: torch.Tensor, published: torch.Tensor
    ) -> torch.Tensor:
        """Which elements ``far`` (indices into this chunk) differ by at most the tolerance in ulp of the larger
        of their rebuilt value and their inputs' largest magnitude (an infinite one judges nothing)."""
        assert self._scale is not None and self._key is not None
        ours, theirs = rebuilt[far].double(), published[far].double()
        scale = torch.maximum(self._scale.largest(self._key, start, count, far), ours.abs())
        allowed = self._tolerance * ulp_at(scale, rebuilt.dtype)
        return ((ours - theirs).abs() <= allowed) & allowed.isfinite()

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
