"""How many CPU threads hub-soup computes with: one decision, made here and documented in the README.

Torch's default (one intra-op thread per physical core, spinning between parallel regions) is fast
on a quiet machine and pathological on a busy one: with another process on every core, each
parallel region waits for a thread the kernel has descheduled, and the spinning threads take the
cores the waited-for one needs. Measured on a 2-core machine with two busy loops beside it, an
offloaded evaluation took over 200 s with torch's default and 43 s with one thread (7 s quiet).
So:

* ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (threads sleep between regions instead of spinning)
  when hub-soup is imported before torch (the command line always is); a value the user set wins.
  With it the same evaluation took 52 s on two threads under the same load.
* The merge's arithmetic runs on :func:`merge_threads` threads: ``$HUB_SOUP_THREADS``, else 1
  (elementwise ops on a few MiB are bound by memory; see benchmarks/RESULTS.md), else, for a
  method whose time goes into computing (a ``compute_bound`` method: DELLA's per-row sorts,
  arcee_fusion's softmaxes and order statistics), the CPUs this process may run on, as scoring.
  A compute-bound merge splits its work among that many :func:`compute_workers`, each running
  torch on one thread, rather than giving torch the threads: a cache-sized op lasts ~100 us, and
  a passive OpenMP team woken for each one spent more than it saved (arcee_fusion of 1.5B
  models: 92 s on two torch threads, 60 s on one, 47 s spinning; split among two workers, one
  wake-up per half of a chunk's blocks instead of one per op).
* Scoring (forward passes, BatchNorm recalibration) runs on :func:`eval_threads` threads:
  ``$HUB_SOUP_THREADS``, else ``$OMP_NUM_THREADS``, else the CPUs this process may run on
  (its affinity mask, which taskset and container cpusets narrow, where torch counts every core),
  shared among the processes of an ``accelerate launch`` on this machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

from hub_soup.errors import RecipeError

#: Sets every thread count hub-soup chooses (merge and scoring); see the module docstring.
THREADS_ENV = "HUB_SOUP_THREADS"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when torch is first imported

T = TypeVar("T")
# Per thread: .workers, the compute workers beside this thread inside its compute_workers() (a merge run in
# another thread has its own, or none); .part, the in_parts part this thread runs now, if any (work it splits
# again runs there, whole).
_local = threading.local()


def _from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise RecipeError(f"{name}={value!r}: a thread count is a whole number of at least 1")
    return count


def merge_threads(compute_bound: bool = False) -> int:
    """Torch threads for a merge: ``$HUB_SOUP_THREADS``, else 1 for elementwise arithmetic and copies, else (a
    ``compute_bound`` method's sorts and softmaxes) the CPUs this process may run on."""
    return _from_env(THREADS_ENV) or (_usable_cpus() if compute_bound else 1)


def _usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (which taskset and container cpusets narrow, where
    torch counts every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def eval_threads() -> int:
    """Torch threads for scoring models: ``$HUB_SOUP_THREADS``, ``$OMP_NUM_THREADS``, else this process's
    share of the CPUs it may run on (a launch's local processes split them)."""
    chosen = _from_env(THREADS_ENV) or _from_env("OMP_NUM_THREADS")
    if chosen is not None:
        return chosen
    cpus = _usable_cpus()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, cpus // max(1, local_processes))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``count`` inside the block, then as they were (a caller's own
    setting survives a merge run from Python)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def compute_workers(count: int) -> Iterator[None]:
    """Inside the block, :func:`in_parts` called from this thread splits work among ``count`` threads (this one
    and ``count - 1`` more), with torch on one thread each: set here, and read by each worker at its first op."""
    if count <= 1:
        yield
        return
    with torch_threads(1), ThreadPoolExecutor(count - 1, thread_name_prefix="hub-soup-compute") as pool:
        _local.workers = (pool, count)
        try:
            yield
        finally:
            _local.workers = None


def in_parts(total: int, work: Callable[[int, int, int], T]) -> list[T]:
    """``work(part, begin, end)`` for consecutive, near-equal ranges of ``range(total)``, one per compute worker
    (part 0 in the calling thread), their results in order; the whole range at once outside
    :func:`compute_workers` or inside a part. ``part`` tells a worker's scratch buffers from another's."""
    inside: int | None = getattr(_local, "part", None)
    workers: tuple[ThreadPoolExecutor, int] | None = getattr(_local, "workers", None)
    if workers is None or inside is not None or min(workers[1], total) <= 1:
        return [work(inside or 0, 0, total)]
    pool, parts = workers[0], min(workers[1], total)
    bounds = [total * i // parts for i in range(parts + 1)]

    def run(part: int) -> T:
        _local.part = part
        try:
            return work(part, bounds[part], bounds[part + 1])
        finally:
            _local.part = None

    others = [pool.submit(run, part) for part in range(1, parts)]
    try:
        first = run(0)
    finally:
        wait(others)  # even when part 0 failed: no part outlives the call
    return [first, *(future.result() for future in others)]


def in_blocks(total: int, block: int, work: Callable[[int, int], T]) -> list[T]:
    """``work(begin, end)`` for each ``block`` elements of ``range(total)`` (the last block shorter), the blocks
    split among the compute workers (:func:`in_parts`), their results in block order: the same results, in
    the same order, on any number of workers."""

    def blocks(part: int, first: int, last: int) -> list[T]:
        return [work(begin, min(begin + block, total)) for begin in range(first * block, min(last * block, total), block)]

    return [result for results in in_parts(-(-total // block), blocks) for result in results]


def current_part() -> int:
    """The :func:`in_parts` part this thread runs (0 outside any): what keeps one part's scratch from another's."""
    return getattr(_local, "part", None) or 0
