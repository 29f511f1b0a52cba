"""Rows of a tensor taken in another order, kept as runs: what an embedding in another vocabulary reads.

An embedding of 152K rows put into another vocabulary is, as a rule, the model's rows
``0 .. n-1`` in order and a few rows it lacks (filled). As a tuple of row indices that is
152K Python ints per model (megabytes, and a Python loop per row to find what to read);
as runs it is a handful of entries, and the reads of a chunk are found by bisection.
No torch here: :mod:`hub_soup.merging.vocab` builds these before anything is read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload


@dataclass(frozen=True)
class Gather(Sequence[int]):
    """A selection of rows (stored rows ``>= 0``, fills ``-1 - j``) in runs: run ``k`` holds the output rows
    from ``starts[k]`` on, taking ``firsts[k]``, then the next stored row (``firsts[k] + 1``) or the next
    fill (``firsts[k] - 1``), and so on until the next run's start (or :attr:`length`).

    Equal selections compare equal, whatever they were built from; :meth:`of` builds the fewest runs.
    """

    starts: tuple[int, ...]
    firsts: tuple[int, ...]
    length: int

    @classmethod
    def of(cls, *parts: Iterable[int]) -> Gather:
        """The rows of ``parts`` one after another (each a ``range`` of stored rows, read as one run, or any
        iterable of rows)."""
        starts: list[int] = []
        firsts: list[int] = []
        length = 0
        last = 0  # the row the current run holds at ``length - 1``
        for part in parts:
            if isinstance(part, range) and part.step == 1:
                if len(part) == 0:
                    continue
                if not (starts and last >= 0 and part.start == last + 1):
                    starts.append(length)
                    firsts.append(part.start)
                length += len(part)
                last = part.stop - 1
                continue
            for row in part:
                if not (starts and (row == last + 1 if last >= 0 else row == last - 1) and (row >= 0) == (last >= 0)):
                    starts.append(length)
                    firsts.append(row)
                length += 1
                last = row
        return cls(tuple(starts), tuple(firsts), length)

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"row {index} of a selection of {self.length}")
        run = bisect.bisect_right(self.starts, index) - 1
        return _step(self.firsts[run], index - self.starts[run])

    def __iter__(self) -> Iterator[int]:
        for (start, stop), first in zip(self._bounds(), self.firsts):
            yield from (range(first, first + stop - start) if first >= 0 else range(first, first - (stop - start), -1))

    def runs(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Rows ``first .. stop - 1`` of the selection as (row, count) runs, in order: ``count`` consecutive
        stored rows from ``row`` (``>= 0``), or fills ``-1 - row``, ``-2 - row``, ... (``row < 0``)."""
        run = bisect.bisect_right(self.starts, first) - 1
        while first < stop:
            end = min(stop, self.starts[run + 1] if run + 1 < len(self.starts) else self.length)
            yield _step(self.firsts[run], first - self.starts[run]), end - first
            first = end
            run += 1

    def _bounds(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts, (*self.starts[1:], self.length))


def _step(first: int, offset: int) -> int:
    """The row ``offset`` rows into a run beginning at ``first`` (stored rows count up, fills down)."""
    return first + offset if first >= 0 else first - offset


def rows_of(rows: Sequence[int]) -> Gather:
    """``rows`` as a :class:`Gather` (itself if it is one)."""
    return rows if isinstance(rows, Gather) else Gather.of(rows)
