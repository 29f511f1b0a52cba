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
* Scoring (forward passes, BatchNorm recalibration) runs on :func:`eval_threads` threads:
  ``$HUB_SOUP_THREADS``, else ``$OMP_NUM_THREADS``, else the CPUs this process may run on
  (its affinity mask, which taskset and container cpusets narrow, where torch counts every core),
  shared among the processes of an ``accelerate launch`` on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from hub_soup.errors import RecipeError

#: Sets every thread count hub-soup chooses (merge and scoring); see the module docstring.
THREADS_ENV = "HUB_SOUP_THREADS"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when torch is first imported


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
