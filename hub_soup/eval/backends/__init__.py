"""Where models run: a backend knows its rank, the world size, and how to gather outputs.

Every process holds the whole (small) eval set; each scores its contiguous share
of the batches (:meth:`Backend.shard`) and :meth:`Backend.gather` puts every
process's outputs back together in data order, so metrics, ensembles and greedy
decisions are the same on every rank and the same as in one process. The
defaults are one process (:class:`~hub_soup.eval.backends.local.LocalBackend`,
like lm-evaluation-harness's ``LM``: rank 0, world size 1); many processes or
GPUs (accelerate, ``torch.distributed``) are one more subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

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

    @abstractmethod
    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        """Every process's ``outputs`` (its shard's, on the CPU) concatenated along dim 0 in rank order,
        returned on every process."""
