"""Exact order statistics of a float64 tensor seen in chunks, in passes, at flat memory.

The value at a rank of the sorted elements (a quantile) is found by radix selection over
the elements' bits, as TIES's magnitude threshold is (:mod:`~hub_soup.merging.methods.sparsify`),
but for any sign: a float64's bits, the lower 63 flipped where it is negative, order as
signed 64-bit integers as the floats do (``-0.0`` just below ``0.0``, equal as floats
anyway). Each pass counts one 16-bit digit of the elements that share the digits found
so far (a 65,536-bin histogram per distinct prefix), so four passes give every rank's
value exactly: a few histograms of memory, however large the tensor. Tensor methods only:
importing this imports no torch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WIDTH = 16
PASSES = 64 // WIDTH
_LOW = (1 << 63) - 1  # the bits a negative float's key flips


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64) as int64 keys that order as the values do."""
    import torch

    bits = values.view(torch.int64)
    return bits ^ ((bits >> 63) & _LOW)


class OrderStatistics:
    """The values at ascending ranks (0: the smallest) of a float64 tensor's elements, over :data:`PASSES` passes.

    Each pass, :meth:`observe` every chunk of the tensor (the same values each pass, in any order)
    then :meth:`finish_pass`; after the last, :attr:`values` holds each rank's value.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self._need = list(ranks)  # each rank within the elements sharing the digits found so far
        self._prefix = [0] * len(self._need)  # the digits found so far (signed: the key's top bits)
        self._pass = 0
        self._counts: dict[int, torch.Tensor] = {}
        self.values: list[float] = []

    def observe(self, values: torch.Tensor) -> None:
        """Count the current digit of one chunk of values.

        After the first pass only the elements sharing a rank's prefix count, a small share of them: they
        are picked out by one shift and a comparison per prefix, then counted, rather than every element
        counted once per prefix. Where every prefix is of non-negative values (importances, magnitudes),
        the raw bits serve as keys: a non-negative float's bits are its key, and a negative one's are
        negative as int64, so they match no such prefix.
        """
        import torch

        flat = values.reshape(-1)
        shift = 64 - WIDTH * (self._pass + 1)
        bins = 1 << WIDTH
        if self._pass == 0:  # every rank shares the empty prefix; the top digit, signed, shifted to 0 ..
            counts = {0: torch.bincount((ordered_keys(flat) >> shift).add_(bins // 2), minlength=bins)}
        else:
            prefixes = sorted(set(self._prefix))
            keys = flat.view(torch.int64) if prefixes[0] >= 0 else ordered_keys(flat)
            shifted = keys >> shift
            high = shifted >> WIDTH
            matches = high == prefixes[0]
            for prefix in prefixes[1:]:
                matches |= high == prefix
            picked, picked_high = shifted[matches], high[matches]
            counts = {
                prefix: torch.bincount(picked[picked_high == prefix] - (prefix << WIDTH), minlength=bins)
                for prefix in prefixes
            }
        for prefix, found in counts.items():
            previous = self._counts.get(prefix)
            self._counts[prefix] = found if previous is None else previous.add_(found)

    def finish_pass(self) -> None:
        """Settle this pass's digit of each rank: the bin its element lies in."""
        import torch

        for i, need in enumerate(self._need):
            counts = self._counts.get(self._prefix[i])
            if counts is None:  # no elements: no rank to place
                continue
            below = counts.cumsum(0)
            digit = int(torch.searchsorted(below, need, right=True))
            self._need[i] = need - (int(below[digit - 1]) if digit else 0)
            first = self._pass == 0
            self._prefix[i] = digit - (1 << WIDTH) // 2 if first else (self._prefix[i] << WIDTH) + digit
        self._counts = {}
        self._pass += 1
        if self._pass == PASSES:  # each prefix is now a whole key: its float
            self.values = [struct.unpack("<d", struct.pack("<q", key ^ ((key >> 63) & _LOW)))[0]
                           for key in self._prefix]
