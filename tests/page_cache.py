"""Take files out of the page cache, so that tests reach the reads a cold disk gets.

``fsync`` then ``POSIX_FADV_DONTNEED`` drops a file's clean pages without root.
Where the kernel cannot say what it caches (``cachestat``, Linux 6.5+), keeps
the pages anyway, or the filesystem has no ``O_DIRECT``, the calling test is
skipped: there would be no direct read to check.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from hub_soup.io import direct_io


def cached_fraction_of(path: Path) -> float | None:
    """How much of ``path`` the page cache holds (0..1), ``None`` where the kernel cannot say."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return direct_io.cached_fraction(fd, 0, max(os.fstat(fd).st_size, 1))
    finally:
        os.close(fd)


def evict_or_skip(paths: Iterable[Path]) -> None:
    """Drop every file of ``paths`` from the page cache, or skip the test where that cannot be seen."""
    if not direct_io.ENABLED:
        pytest.skip("direct reads are off here (no O_DIRECT, or HUB_SOUP_DIRECT_READS=0)")
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        cached = cached_fraction_of(path)
        if cached is None:
            pytest.skip("this kernel cannot tell what the page cache holds (cachestat, Linux 6.5+)")
        if cached > 0.1:
            pytest.skip(f"the kernel kept {path.name} in the page cache")
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            pytest.skip(f"no O_DIRECT on the filesystem of {path.parent}")
