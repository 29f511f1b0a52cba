"""Read data that is not in the page cache straight from the disk, and write soups there (``O_DIRECT``).

Why: a merge reads every input byte once and never again. Through the page
cache, each byte from a cold disk costs the kernel a page allocation, the I/O
completion and a copy out, and with several reader threads on a small machine
that is more CPU than the merge's own arithmetic (measured on a 2-core VM:
8.5 s of kernel CPU to read 7.9 GB in a merge, about 0.2 s with ``O_DIRECT``;
see ``benchmarks/NOTES.md``). Direct reads let the disk write into the reader's
buffer and leave the user's page cache alone, which also matters when the
inputs are larger than RAM.

Data the page cache already holds (a second merge of the same models) is
better copied from there: :func:`cached_fraction` asks the kernel
(``cachestat``, Linux 6.5+) before the first read of each file. Where that is not known, or
``O_DIRECT`` is not supported (tmpfs, some network filesystems, other OSes),
reads stay buffered: the result is the same bytes either way.
``HUB_SOUP_DIRECT_READS=0`` turns direct reads off.

A soup is written the same way (:class:`DirectFile`), for the same reason: it
is written once, and the kernel's copy of it into new page-cache pages costs
the CPU the merge's arithmetic needs. ``HUB_SOUP_DIRECT_WRITES=0`` turns that off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable

import torch

# Direct reads move whole aligned blocks into aligned memory. 4096 covers the
# logical block size of common disks and the page size of x86-64 and most arm64.
ALIGN = 4096
# A read of [offset, offset + n) becomes a read of the aligned blocks around it:
# up to ALIGN - 1 bytes before and after the data.
SLACK = 2 * ALIGN

ENABLED = os.environ.get("HUB_SOUP_DIRECT_READS", "1") != "0" and hasattr(os, "O_DIRECT")
WRITES_ENABLED = os.environ.get("HUB_SOUP_DIRECT_WRITES", "1") != "0" and hasattr(os, "O_DIRECT")

# cachestat(2): the same syscall number on every Linux architecture (added after they were unified).
_SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


def _load_syscall() -> Callable[..., int] | None:
    if not ENABLED or os.uname().sysname != "Linux":
        return None
    try:  # the C library the interpreter already uses (find_library would spawn ldconfig)
        return ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_syscall = _load_syscall()


def cached_fraction(fd: int, offset: int, nbytes: int) -> float | None:
    """How much of ``[offset, offset + nbytes)`` of ``fd`` is in the page cache (0..1), or ``None`` if unknown."""
    global _syscall
    if _syscall is None:
        return None
    span = _CachestatRange(offset, nbytes)
    stat = _Cachestat()
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        _syscall = None  # ENOSYS (kernel before 6.5) or a seccomp filter: stop asking
        return None
    pages = -(-(offset + nbytes) // ALIGN) - offset // ALIGN
    return stat.nr_cache / pages


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose first byte is :data:`ALIGN`-aligned, as direct reads need."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    pad = -raw.data_ptr() % ALIGN
    return raw[pad : pad + nbytes]


def padded(nbytes: int) -> int:
    """Bytes a read buffer needs so that any ``nbytes`` of a file can be read into it directly."""
    return -(-(nbytes + SLACK) // ALIGN) * ALIGN


def can_read_into(buffer: torch.Tensor, offset: int, nbytes: int, itemsize: int) -> bool:
    """Whether :func:`read_direct` can read ``nbytes`` at ``offset`` into ``buffer`` and view them as the dtype.

    The data lands ``offset % ALIGN`` bytes into the buffer, so that must be a
    multiple of the element size (true for every tensor of a well-formed safetensors file).
    """
    return buffer.data_ptr() % ALIGN == 0 and buffer.numel() >= nbytes + SLACK and offset % ALIGN % itemsize == 0


def read_direct(fd: int, offset: int, nbytes: int, buffer: torch.Tensor) -> int:
    """Read the aligned blocks around ``[offset, offset + nbytes)`` of an ``O_DIRECT`` ``fd`` into ``buffer``.

    Returns where the data starts in ``buffer`` (``offset % ALIGN``), or ``-1`` if
    the file ended first. Raises ``OSError`` if the device refuses the read
    (alignment rules stricter than :data:`ALIGN`); callers then read buffered.
    """
    delta = offset % ALIGN
    end = delta + nbytes
    view = buffer.numpy().data.cast("B")[: -(-end // ALIGN) * ALIGN]
    done = 0
    while done < end:
        got = os.preadv(fd, [view[done:]], offset - delta + done)
        done += got
        if got == 0 or got % ALIGN:  # only the end of the file cuts a direct read short of a block
            break
    return delta if done >= end else -1


class DirectFile:
    """A new file written front to back around the page cache (``O_DIRECT``), through aligned staging memory.

    Why: a buffered write has the kernel allocate a page-cache page for every 4 KiB of
    the soup and copy into it, on the core the merge's arithmetic needs; measured on
    this project's 2-core VM, writing a 3.1 GB soup cost 2.2-8.2 s of kernel CPU that
    way (more when the pages are new to the VM) and 0.36 s direct. What is written
    is staged in :data:`ALIGN`-aligned memory and handed to the disk in whole staged
    pieces; the last, partial block is written padded and the file cut back to its
    size on :meth:`close`. A filesystem that refuses ``O_DIRECT`` (at open, or a write,
    where its alignment rules are stricter than :data:`ALIGN`) gets the same bytes buffered.
    """

    def __init__(
        self, path: str | os.PathLike[str], size: int, *, stage_bytes: int = 8 << 20, direct: bool = WRITES_ENABLED
    ) -> None:
        """Create (truncate) ``path``, to hold ``size`` bytes (its blocks reserved up front); ``direct=False``
        writes through the page cache."""
        self.path = path
        self.direct = False
        self._fd = -1
        if direct:
            with contextlib.suppress(OSError):  # no O_DIRECT on this filesystem: the page cache it is
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
                self.direct = True
        if self._fd < 0:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._stage = aligned_buffer(-(-stage_bytes // ALIGN) * ALIGN)
        self._staged = 0  # bytes in the stage
        self._position = 0  # where the stage's first byte goes in the file (a multiple of ALIGN while direct)
        try:
            _reserve(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of ``data`` (a contiguous uint8 tensor)."""
        done, total = 0, data.numel()
        while done < total:
            take = min(total - done, self._stage.numel() - self._staged)
            self._stage[self._staged : self._staged + take].copy_(data[done : done + take])
            self._staged += take
            done += take
            if self._staged == self._stage.numel():
                self._flush(self._staged)

    @property
    def written(self) -> int:
        """Bytes written so far (on the disk or staged)."""
        return self._position + self._staged

    def _flush(self, nbytes: int) -> None:
        """Write the stage's first ``nbytes`` (rounded up to :data:`ALIGN` while direct) and empty it."""
        rounded = -(-nbytes // ALIGN) * ALIGN if self.direct else nbytes
        view = self._stage.numpy().data.cast("B")[:rounded]
        try:
            self._pwrite_all(view)
        except OSError as exc:
            if not self.direct or exc.errno != errno.EINVAL:
                raise
            # the device's alignment rules are stricter than ALIGN: the rest goes through the page cache
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY)
            self.direct = False
            self._pwrite_all(view[:nbytes])
        self._position += nbytes
        self._staged = 0

    def _pwrite_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._position + done)

    def close(self) -> None:
        """Write what is staged and cut the file to its size (the last direct block was padded)."""
        try:
            if self._staged:
                self._flush(self._staged)
            if self.direct:
                os.ftruncate(self._fd, self._position)
        finally:
            os.close(self._fd)

    def discard(self) -> None:
        """Close without writing what is staged: the file is being thrown away."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _reserve(fd: int, size: int) -> None:
    """Allocate a file's blocks up front (``posix_fallocate``).

    A full disk fails here, before any merging, and writing into allocated
    blocks costs ext4 a fraction of the kernel time of growing a file write
    by write (0.2 s per GB instead of up to 1.8 s, measured here). Filesystems
    that cannot preallocate just skip it.
    """
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
