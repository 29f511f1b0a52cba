"""Read data that is not in the page cache straight from the disk (``O_DIRECT``).

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
"""

from __future__ import annotations

import ctypes
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
