"""Exact order statistics of a float64 tensor seen in chunks, in passes, at flat memory.

The value at a rank of the sorted elements (a quantile) is found by radix selection over
the elements' bits, as TIES's magnitude threshold is (:mod:`~hub_soup.merging.methods.sparsify`),
but for any sign: a float64's bits, the lower 63 flipped where it is negative, order as
signed 64-bit integers as the floats do (``-0.0`` just below ``0.0``, equal as floats
anyway). Each pass counts one 16-bit digit of the elements that share the digits found
so far (a 65,536-bin histogram per distinct prefix), so four passes give every rank's
value exactly: a few histograms of memory, however large the tensor. Sooner, as a rule:
once the elements sharing the ranks' prefixes are few (at most :data:`GATHER`, known from
the last histogram), the next pass gathers their keys and sorts them, and the selection is
done (:attr:`OrderStatistics.done`; a caller skips the passes left). Tensor methods only:
importing this imports no torch.
"""

from __future__ import annotations

import struct
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: One pass's counts of a part of the values, by prefix: a histogram of the digit after it, or (a gathering pass)
#: the keys that share it.
Tally = dict[int, "torch.Tensor | list[torch.Tensor]"]

WIDTH = 16
PASSES = 64 // WIDTH
_LOW = (1 << 63) - 1  # the bits a negative float's key flips
# Keys a pass may gather to finish the selection by sorting them (16 MiB of int64 at most).
GATHER = 1 << 21


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64) as int64 keys that order as the values do."""
    import torch

    bits = values.view(torch.int64)
    return bits ^ ((bits >> 63) & _LOW)


class OrderStatistics:
    """The values at ascending ranks (0: the smallest) of a float64 tensor's elements, in at most :data:`PASSES` passes.

    Each pass, :meth:`observe` every chunk of the tensor (the same values each pass, in any order)
    then :meth:`finish_pass`; once :attr:`done` (after the last pass at the latest), :attr:`values`
    holds each rank's value and further passes may be skipped.
    """

    def __init__(self, ranks: Sequence[int]) -> None:
        self._need = list(ranks)  # each rank within the elements sharing the digits found so far
        self._prefix = [0] * len(self._need)  # the digits found so far (signed: the key's top bits)
        self._pass = 0
        self._counts: dict[int, torch.Tensor] = {}
        self._gathering = False  # this pass gathers the keys sharing the prefixes (few) instead of counting
        # Where they go, made whole up front (their sizes are the last histogram's): small tensors kept between
        # a pass's large temporaries would keep the allocator from handing those back.
        self._gathered: dict[int, torch.Tensor] = {}
        self._filled: dict[int, int] = {}
        self.values: list[float] = []
        self.done = not self._need

    @property
    def passes_left(self) -> int:
        """Passes still to observe, at most: none once done, one where the next gathers, else one per digit left."""
        return 0 if self.done else 1 if self._gathering else PASSES - self._pass

    def observe(self, values: torch.Tensor) -> None:
        """Count the current digit of one chunk of values (or gather its keys that share a rank's prefix)."""
        self.add(self.tally(values))

    def tally(self, values: torch.Tensor, into: Tally | None = None, *, unsigned: bool = False) -> Tally:
        """This pass's counts of ``values`` (or their gathered keys), added to ``into``: nothing of the selection
        changes, so parts of a chunk can be tallied side by side and :meth:`add` ed in turn. ``unsigned``: the
        caller knows no value's sign bit is set, so their bits are their keys (three ops an element fewer).

        After the first pass only the elements sharing a rank's prefix count, a small share of them: they
        are picked out by one shift and a comparison per prefix, then counted, rather than every element
        counted once per prefix. Where every prefix is of non-negative values (importances, magnitudes),
        the raw bits serve as keys: a non-negative float's bits are its key, and a negative one's are
        negative as int64, so they match no such prefix.
        """
        import torch

        into = {} if into is None else into
        flat = values.reshape(-1)
        shift = 64 - WIDTH * (self._pass + 1)
        bins = 1 << WIDTH
        prefixes = sorted(set(self._prefix))
        raw = unsigned or (self._pass > 0 and prefixes[0] >= 0)
        keys = flat.view(torch.int64) if raw else ordered_keys(flat)
        if self._pass == 0:  # every rank shares the empty prefix; the top digit, signed, shifted to 0 ..
            return _tallied(into, 0, torch.bincount((keys >> shift).add_(bins // 2), minlength=bins))
        high = keys >> (shift + WIDTH)
        matches = high == prefixes[0]
        for prefix in prefixes[1:]:
            matches |= high == prefix
        picked = keys[matches]
        picked_high = picked >> (shift + WIDTH)
        for prefix in prefixes:
            mine = picked[picked_high == prefix]
            if self._gathering:
                into.setdefault(prefix, []).append(mine)  # type: ignore[union-attr]
            else:
                _tallied(into, prefix, torch.bincount((mine >> shift) - (prefix << WIDTH), minlength=bins))
        return into

    def add(self, tally: Tally) -> None:
        """Take one part's :meth:`tally` into this pass's counts (or gathered keys)."""
        for prefix, found in tally.items():
            if not isinstance(found, list):
                _tallied(self._counts, prefix, found)
                continue
            for mine in found:  # a gathering pass's keys
                start = self._filled[prefix]
                self._gathered[prefix][start : start + mine.numel()] = mine
                self._filled[prefix] = start + mine.numel()

    def finish_pass(self) -> None:
        """Settle this pass's digit of each rank (the bin its element lies in), or, after a gathering pass, each
        rank's element among the sorted keys."""
        import torch

        if self.done:
            return
        if self._gathering:
            ordered = {prefix: found.sort().values for prefix, found in self._gathered.items()}
            self._settle([int(ordered[prefix][need]) for prefix, need in zip(self._prefix, self._need)])
            return
        sizes: dict[int, int] = {}
        for i, need in enumerate(self._need):
            counts = self._counts.get(self._prefix[i])
            if counts is None:  # no elements: no rank to place
                continue
            below = counts.cumsum(0)
            digit = int(torch.searchsorted(below, need, right=True))
            self._need[i] = need - (int(below[digit - 1]) if digit else 0)
            first = self._pass == 0
            self._prefix[i] = digit - (1 << WIDTH) // 2 if first else (self._prefix[i] << WIDTH) + digit
            sizes[self._prefix[i]] = int(counts[digit])
        self._counts = {}
        self._pass += 1
        if self._pass == PASSES:  # each prefix is now a whole key
            self._settle(self._prefix)
        elif sum(sizes.values()) <= GATHER:
            self._gathering = True
            self._gathered = {prefix: torch.empty(size, dtype=torch.int64) for prefix, size in sizes.items()}
            self._filled = dict.fromkeys(sizes, 0)

    def _settle(self, keys: Sequence[int]) -> None:
        """Each rank's value from its whole key."""
        self.values = [struct.unpack("<d", struct.pack("<q", key ^ ((key >> 63) & _LOW)))[0] for key in keys]
        self.done = True


def _tallied(into: MutableMapping[int, Any], prefix: int, found: torch.Tensor) -> Any:
    """``into`` (a :data:`Tally`, or a pass's counts) with ``found`` added to its histogram of ``prefix``."""
    previous = into.get(prefix)
    into[prefix] = found if previous is None else previous.add_(found)
    return into
