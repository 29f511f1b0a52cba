"""Where models run: a backend knows its rank, the world size, and how to gather outputs.

Every process holds the whole (small) eval set; each scores its contiguous share
of the batches (:meth:`Backend.shard`) and :meth:`Backend.gather` puts every
process's outputs back together in data order, so metrics, ensembles and greedy
decisions are the same on every rank and the same as in one process. The
defaults are one process (:class:`~hub_soup.eval.backends.local.LocalBackend`,
like lm-evaluation-harness's ``LM``: rank 0, world size 1); many processes or
GPUs are :class:`~hub_soup.eval.backends.accelerate.AccelerateBackend`, which
:func:`launched_backend` chooses when a launcher started this process.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from hub_soup.errors import EvalError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class Backend(ABC):
    """Where an :class:`~hub_soup.eval.evaluate.Evaluator` runs its forward passes."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's index, ``0 <= rank < world_size``."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """How many processes score together."""

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of ``items`` (the first ranks take one more when it does not divide).

        Contiguous shares, concatenated in rank order, are the data order again: what
        :meth:`gather` relies on.
        """
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return items[start : start + size + (self.rank < extra)]

    def device_for(self, requested: torch.device) -> torch.device:
        """Where this process runs what the recipe asks to run on ``requested``: the device itself,
        unless the backend gives each process a device of its own."""
        return requested

    @abstractmethod
    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        """Every process's ``outputs`` (its shard's, on the CPU; an empty 1-D tensor when the shard is
        empty) concatenated along dim 0 in rank order, returned on every process."""


def launched_world_size() -> int:
    """How many processes a launcher started together with this one: ``WORLD_SIZE``, 1 without one.

    ``accelerate launch`` (for more than one process: ``--multi_gpu``, which is how it starts
    processes on the CPU too, or a config that says so) and ``torchrun`` set ``WORLD_SIZE``,
    ``RANK`` and ``LOCAL_RANK`` for every process they start; ``accelerate launch`` of one
    process sets none of them, and runs exactly as a plain ``hub-soup`` does.
    """
    return int(os.environ.get("WORLD_SIZE") or 1)


def launched_backend(device: torch.device) -> Backend:
    """The backend of this process: accelerate's when a launcher started it among others
    (:func:`launched_world_size` above 1), one process otherwise.

    Choosing from the environment, as accelerate and transformers' ``Trainer`` do, means the
    command is the same with one process or many: no flag of ours says how it was started.

    Raises:
        EvalError: the launch needs accelerate and it is not installed.
    """
    if launched_world_size() == 1:
        from hub_soup.eval.backends.local import LocalBackend

        return LocalBackend()
    try:
        from hub_soup.eval.backends.accelerate import AccelerateBackend
    except ImportError as exc:
        raise EvalError(
            f"this process is one of {launched_world_size()} (WORLD_SIZE) and scoring together needs accelerate "
            f"({exc})",
            hint="pip install 'hub-soup[accelerate]'",
        ) from None
    return AccelerateBackend(device)
