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
done (:attr:`OrderStatistics.done`; a caller skips the passes left). A caller that can keep
each element's first digit (its *code*, two bytes: :meth:`OrderStatistics.code`, counted by
:meth:`OrderStatistics.tally_codes`) hands later passes only the elements whose code matches a
rank's prefix (:meth:`OrderStatistics.candidates`, a few percent of them), so it need not
recompute the rest. Later passes pick in numpy, whose int16 comparisons, boolean indexing and
``flatnonzero`` are several times as fast as torch's on the CPU, and the gathered keys are put
in place by a partial sort. Tensor methods only: importing this imports no torch.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
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


def _first_digits(keys: torch.Tensor) -> torch.Tensor:
    """Each of ``keys`` (1-d, contiguous) shifted right to its top :data:`WIDTH` (16) bits, as int16: a view of
    those bits where the machine stores them last of the four (half the time of a shift, and no copy)."""
    import torch

    if sys.byteorder == "little":
        return keys.view(torch.int16)[3::4]
    return (keys >> (64 - WIDTH)).to(torch.int16)


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

    def observe(self, values: torch.Tensor, *, unsigned: bool = False) -> None:
        """Count the current digit of one chunk of values (or gather its keys that share a rank's prefix);
        ``unsigned`` as :meth:`tally`'s."""
        self.add(self.tally(values, unsigned=unsigned))

    def tally(self, values: torch.Tensor, into: Tally | None = None, *, unsigned: bool = False) -> Tally:
        """This pass's counts of ``values`` (or their gathered keys), added to ``into``: nothing of the selection
        changes, so parts of a chunk can be tallied side by side and :meth:`add` ed in turn. ``unsigned``: the
        caller knows no value's sign bit is set, so their bits are their keys (three ops an element fewer).
        Later passes may be given any of the values that include those sharing a rank's prefix (the others
        are passed over).

        After the first pass only the elements sharing a rank's prefix count, a small share of them: they
        are picked out by one shift and a comparison per prefix, then counted, rather than every element
        counted once per prefix. Where every prefix is of non-negative values (importances, magnitudes),
        the raw bits serve as keys: a non-negative float's bits are its key, and a negative one's are
        negative as int64, so they match no such prefix.
        """
        import torch

        into = {} if into is None else into
        if self._pass == 0:  # every rank shares the empty prefix: the histogram of the first digits
            codes = torch.empty(values.numel(), dtype=torch.int16)
            return self.tally_codes(self.code(values, codes, unsigned=unsigned), into)
        flat = values.reshape(-1)
        shift = 64 - WIDTH * (self._pass + 1)
        bins = 1 << WIDTH
        prefixes = sorted(set(self._prefix))
        raw = unsigned or prefixes[0] >= 0
        keys = flat.view(torch.int64) if raw else ordered_keys(flat)
        bits = keys.numpy()
        high = bits >> (shift + WIDTH)
        matches = high == prefixes[0]
        for prefix in prefixes[1:]:
            matches |= high == prefix
        picked, picked_high = bits[matches], high[matches]
        for prefix in prefixes:
            mine = torch.from_numpy(picked[picked_high == prefix])
            if self._gathering:
                into.setdefault(prefix, []).append(mine)  # type: ignore[union-attr]
            else:
                _tallied(into, prefix, torch.bincount((mine >> shift) - (prefix << WIDTH), minlength=bins))
        return into

    @staticmethod
    def code(values: torch.Tensor, out: torch.Tensor, *, unsigned: bool = False) -> torch.Tensor:
        """``out`` (int16, contiguous): each value's code, the first digit of its key (what the first pass counts),
        for :meth:`tally_codes` to count and :meth:`candidates` to read in the passes after. ``unsigned``: as
        :meth:`tally`'s."""
        import torch

        flat = values.reshape(-1)
        return out.copy_(_first_digits(flat.view(torch.int64) if unsigned else ordered_keys(flat)))

    def tally_codes(self, codes: torch.Tensor, into: Tally | None = None) -> Tally:
        """The first pass's counts of values given by their :meth:`code` s, added to ``into`` (as :meth:`tally`):
        counted at once, many slices' codes in one call, is cheaper than slice by slice."""
        import torch

        into = {} if into is None else into
        bins = 1 << WIDTH
        counts = into.get(0)
        if not isinstance(counts, torch.Tensor):
            counts = into[0] = torch.zeros(bins, dtype=torch.int64)
        if codes.numel() and int(codes.min()) >= 0:  # the codes of non-negative values: the upper half, as they are
            counts[bins // 2 :] += torch.bincount(codes, minlength=bins // 2)
        elif codes.numel():  # signed: shifted to 0 ..
            counts += torch.bincount(codes.to(torch.int32).add_(bins // 2), minlength=bins)
        return into

    def candidates(self, codes: torch.Tensor) -> np.ndarray:
        """The indices of ``codes`` (the first pass's :meth:`code` s of some values, on the CPU) that match a
        rank's prefix: in a pass after the first, only those values can count; :meth:`tally` needs no others."""
        import numpy as np

        tops = self.tops()
        digits = codes.numpy()
        found = digits == tops[0]
        for top in tops[1:]:
            found |= digits == top
        return np.flatnonzero(found)

    def digit(self) -> tuple[list[int], int, bool]:
        """What a pass after the first looks for, for a caller that tallies keys itself: the ranks' distinct
        prefixes (ascending), the shift that brings a key's digit after its prefix to the lowest 16 bits (its
        prefix: the bits above), and whether the pass gathers the keys that share a prefix (else it counts
        their digits, a 65,536-bin histogram per prefix: the :data:`Tally` :meth:`add` takes either way)."""
        return sorted(set(self._prefix)), 64 - WIDTH * (self._pass + 1), self._gathering

    def tops(self) -> list[int]:
        """The codes (:meth:`code`) the ranks' prefixes begin with, in a pass after the first: the values a later
        pass counts are among those with these codes."""
        return sorted({prefix >> (WIDTH * (self._pass - 1)) for prefix in self._prefix})

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
        if self._gathering:  # each rank's key among its prefix's, put in place by a partial sort (numpy's)
            import numpy as np

            wanted: dict[int, list[int]] = {}
            for prefix, need in zip(self._prefix, self._need):
                wanted.setdefault(prefix, []).append(need)
            placed = {prefix: np.partition(self._gathered[prefix].numpy(), needs) for prefix, needs in wanted.items()}
            self._settle([int(placed[prefix][need]) for prefix, need in zip(self._prefix, self._need)])
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
