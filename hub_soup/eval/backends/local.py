"""One process, the default: the whole eval set runs here and gathering is the identity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub_soup.eval.backends import Backend

if TYPE_CHECKING:
    import torch


class LocalBackend(Backend):
    """Rank 0 of a world of one (see :class:`~hub_soup.eval.backends.Backend`)."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs
