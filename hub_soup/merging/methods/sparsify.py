"""Sparsified task vectors, streamed: TIES's exact magnitude threshold and DARE's random masks.

Both work on each ingredient's task vector ``delta = part - base`` in the kernel's
dtype, computed the same way (one upcast, one subtraction) in the statistics pass
as in the kernel, so the threshold is compared with the very values it was chosen
from.

**Magnitude** (TIES, mergekit's ``magnitude``): keep the ``k = int(density * numel)``
largest ``|delta|`` of the whole tensor. The k-th largest value is found exactly with
flat memory by radix selection over the bits of ``|delta|`` (non-negative floats
order as their bit patterns do; :mod:`~hub_soup.merging.methods.order`): the first
statistics pass counts the top 16 bits, the second, as a rule, gathers the few elements
near the threshold and sorts them (four passes at most). Elements equal to the threshold are all kept (mergekit's ``argsort``
keeps an arbitrary ``k`` of them): the only way the two may differ.

**Random** (DARE, mergekit's ``random``): keep each element with probability
``density``. The draw is a hash of (seed, tensor, ingredient, element index), so it
does not depend on where the engine cuts the tensor, on the device, or on how many
threads run: the same seed gives the same soup on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import MergedTensor
from hub_soup.merging.methods.order import PASSES, OrderStatistics

if TYPE_CHECKING:
    import torch

# DARE compares the top 24 bits of a 32-bit hash with density * 2**24.
UNIFORM_BITS = 24


def delta_(out: torch.Tensor, part: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``out = part - base`` in ``out``'s dtype: one exact upcast, one rounded subtraction."""
    out.copy_(part)
    return out.sub_(base)


def radix_passes(dtype: torch.dtype) -> int:
    """Statistics passes the exact magnitude threshold of a tensor computed in ``dtype`` takes at most (its
    magnitudes are selected over float64 bits; two passes as a rule, see :attr:`MagnitudeThresholds.done`)."""
    return PASSES


DROP = "drop"
"""A :class:`MagnitudeThresholds` threshold: the ingredient keeps no element of the tensor (``k = 0``)."""


class MagnitudeThresholds:
    """One tensor's exact top-``k`` magnitude threshold of each ingredient's task vector, pass by pass.

    :meth:`observe` counts a chunk, :meth:`finish_pass` settles the pass; once :attr:`done` (after
    :func:`radix_passes` passes at the latest, two as a rule) :attr:`below` holds, per ingredient,
    ``None`` (density 1: keep every element), :data:`DROP` (``k = 0``: keep none), or the value of
    the kernel's dtype just below the k-th largest ``|delta|``: keeping ``|delta| > below`` keeps
    exactly ``|delta| >= threshold``. The selection is :class:`~hub_soup.merging.methods.order.OrderStatistics`'s
    (the k-th largest of ``n`` is the ascending rank ``n - k``), one per ingredient, all its thresholds at once.
    """

    def __init__(self, densities: Sequence[float], tensor: MergedTensor, *,
                 ranks: Sequence[int | None] | None = None, of: Sequence[int] | None = None) -> None:
        """Thresholds of the ``int(density * numel)`` largest of each ingredient; or, with ``ranks``, of the
        ``ranks[s]``-th largest ``|delta|`` of ingredient ``of[s]`` for each selection ``s`` (an ingredient may
        have several: Breadcrumbs bounds a window from above and below), :attr:`below` then one per selection."""
        import torch

        self.tensor = tensor
        # Per selection: k (None: keep all; 0: keep none), and whose |delta| it ranks.
        self._k: list[int | None] = (
            list(ranks) if ranks is not None else [None if d >= 1 else int(d * tensor.numel) for d in densities]
        )
        self._of = list(of) if of is not None else list(range(len(self._k)))
        ascending: dict[int, list[int]] = {}
        for k, ingredient in zip(self._k, self._of):
            if k:
                ascending.setdefault(ingredient, []).append(tensor.numel - k)
        self._orders = {ingredient: OrderStatistics(found) for ingredient, found in ascending.items()}
        self._scratch = torch.empty(0, dtype=tensor.dtype)
        self.below: list[float | str | None] = []
        self.done = False
        self._settle()

    def observe(self, parts: Sequence[torch.Tensor], base: torch.Tensor) -> None:
        """Count every ingredient's ``|delta|`` in one chunk (those whose thresholds are still sought)."""
        import torch

        if base.dtype != self.tensor.dtype:  # upcast once, not once per ingredient (exact either way)
            base = base.to(self.tensor.dtype)
        for ingredient, part in enumerate(parts):
            order = self._orders.get(ingredient)
            if order is None or order.done:
                continue
            if self._scratch.numel() < part.numel():
                self._scratch = part.new_empty(part.numel(), dtype=self.tensor.dtype)
            magnitude = delta_(self._scratch[: part.numel()], part, base).abs_()  # as the kernel computes it
            # abs clears every sign bit (of -0.0 and NaN too): the bits are the keys
            order.observe(magnitude if magnitude.dtype == torch.float64 else magnitude.to(torch.float64),
                          unsigned=True)

    def observe_values(self, values: torch.Tensor, selection: int = 0) -> None:
        """Count one chunk of non-negative ``values`` for ``selection``: a threshold of some other magnitude
        than ``|delta|`` (SCE's variances)."""
        import torch

        order = self._orders.get(self._of[selection])
        if order is not None and not order.done:
            order.observe(values if values.dtype == torch.float64 else values.to(torch.float64))

    @property
    def passes_left(self) -> int:
        """Passes the selections still need, at most (:attr:`OrderStatistics.passes_left`)."""
        return max((order.passes_left for order in self._orders.values()), default=0)

    def finish_pass(self) -> None:
        """Settle this pass of every selection; once all are done, :attr:`below`."""
        for order in self._orders.values():
            order.finish_pass()
        self._settle()

    def _settle(self) -> None:
        import torch

        if self.done or not all(order.done for order in self._orders.values()):
            return
        values = {ingredient: iter(order.values) for ingredient, order in self._orders.items()}
        down = torch.tensor(-1.0, dtype=self.tensor.dtype)
        self.below = [  # the threshold's value; below it, the next value down in the kernel's dtype
            None if k is None else DROP if k == 0
            else float(torch.nextafter(torch.tensor(next(values[of]), dtype=self.tensor.dtype), down))
            for k, of in zip(self._k, self._of)
        ]
        self.done = True


class RandomMasks:
    """DARE's keep-masks of one tensor: element ``j`` of ingredient ``i`` is kept when a hash of
    (seed, tensor, ``i``, ``j``) falls below ``density_i``.

    Per block, :meth:`element_hash_` hashes the element indices once (keyed by the seed and
    the tensor), and :meth:`keep_` mixes that with each ingredient's key into its mask.
    """

    def __init__(self, seed: int, tensor: MergedTensor) -> None:
        if tensor.numel > 1 << 32:
            raise RecipeError(
                f"{tensor.key}: {tensor.numel:,} elements; DARE's masks index at most 2**32 elements of a tensor",
                hint="exclude the tensor (--exclude) or choose a method that does not sample",
            )
        self.tensor = tensor
        self._seed = seed
        self._keys: dict[int, int] = {}

    def key(self, stream: int) -> int:
        """A signed 32-bit key of (seed, tensor, ``stream``): ``-1`` keys the element hash, ``i`` ingredient ``i``."""
        found = self._keys.get(stream)
        if found is None:
            text = f"{self._seed}\0{self.tensor.key}\0{stream}".encode()
            found = self._keys[stream] = int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little", signed=True)
        return found

    def element_hash_(self, out: torch.Tensor, tmp: torch.Tensor, offset: int) -> torch.Tensor:
        """``out`` (int32) = the keyed hash of the element indices ``offset, offset + 1, ...``; ``tmp``: int32 scratch."""
        import torch

        end = offset + out.numel()
        if end <= 1 << 31:
            torch.arange(offset, end, dtype=torch.int32, out=out)
        else:  # indices as their low 32 bits (two's complement): unique below 2**32
            out.copy_(torch.arange(offset, end, dtype=torch.int64).to(torch.int32))
        out.bitwise_xor_(self.key(-1))
        return mix_(out, tmp)

    def keep_(self, out: torch.Tensor, hashed: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor, index: int,
              density: float) -> torch.Tensor:
        """``out`` (the kernel's float dtype) = ``-1`` where ingredient ``index`` keeps the element, ``0`` where
        it drops it, from the block's :meth:`element_hash_`; ``bits`` and ``tmp`` are int32 scratch.

        Kept: the hash's top 24 bits below ``density * 2**24``. In integer ops only (``u - limit`` is negative
        exactly when kept, and its arithmetic shift by 31 is then -1): comparisons that make bool masks cost
        several times more per element.
        """
        import torch

        limit = self.limit(density)
        if limit >= 1 << UNIFORM_BITS:  # density within 2**-25 of 1
            return out.fill_(-1.0)
        self.uniform_(tmp, hashed, bits, index).sub_(limit)
        torch.bitwise_right_shift(tmp, 31, out=bits)
        return out.copy_(bits)

    @staticmethod
    def limit(density: float) -> int:
        """The bound a kept element's draw is below: ``density * 2**24``, rounded."""
        return round(density * (1 << UNIFORM_BITS))

    def uniform_(self, out: torch.Tensor, hashed: torch.Tensor, bits: torch.Tensor, index: int) -> torch.Tensor:
        """``out`` (int32) = ingredient ``index``'s uniform draw of each element of the block, as an integer in
        ``[0, 2**24)``, from the block's :meth:`element_hash_`; ``bits`` is int32 scratch. An element is kept
        with probability ``p`` when its draw is below ``round(p * 2**24)``."""
        import torch

        bits.copy_(hashed)
        bits.bitwise_xor_(self.key(index))
        mix_(bits, out)
        torch.bitwise_right_shift(bits, 32 - UNIFORM_BITS, out=out)
        return out.bitwise_and_((1 << UNIFORM_BITS) - 1)


def mix_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``x`` (int32) through the ``lowbias32`` integer hash (C. Wellons), in place; ``tmp`` is int32 scratch.

    Right shifts are logical (masked after torch's arithmetic shift); products wrap modulo 2**32,
    as int32 arithmetic does on CPUs and GPUs alike.
    """
    import torch

    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if multiplier is not None:
            x.mul_(multiplier)
    return x
