"""Many processes, and GPUs, through accelerate: ``accelerate launch --num_processes K -m hub_soup merge ...``.

The launcher starts K copies of the command; each joins one process group
through :class:`accelerate.PartialState` (NCCL between GPUs, gloo on the CPU),
makes every candidate soup itself and scores its contiguous share of the eval
batches (:meth:`~hub_soup.eval.backends.Backend.shard`). :meth:`gather` is
:func:`accelerate.utils.gather_object`: shares of uneven (or no) length come
back whole, in rank order, which is data order, on every process, so every
process measures the same outputs and makes the same greedy choices as one
process would, bit for bit. Which process writes and pushes is the pipeline's
business (the main one, rank 0).
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from hub_soup.eval.backends import Backend

#: How long a process waits for the others at a gather before it gives up. They do the same
#: work (the same downloads, which one machine's HF cache locks share out, the same merges), so
#: they arrive together, but a slower machine's download can hold the others for minutes: longer
#: than NCCL's default of 10. A process that died is noticed at once instead: ``accelerate
#: launch`` (torchrun's agent) stops the others when one fails. The value is torch's gloo default.
GATHER_TIMEOUT = timedelta(minutes=30)


class AccelerateBackend(Backend):
    """One process of an ``accelerate launch`` (or ``torchrun``) run.

    Args:
        device: where the recipe runs models (``cpu``, ``cuda`` or ``cuda:N``). On the
            CPU the processes talk gloo; on CUDA, NCCL, each process on its own GPU
            (``cuda:LOCAL_RANK``, see :meth:`device_for`).
    """

    def __init__(self, device: torch.device) -> None:
        self._state = PartialState(cpu=device.type == "cpu", timeout=GATHER_TIMEOUT)

    @property
    def rank(self) -> int:
        return int(self._state.process_index)

    @property
    def world_size(self) -> int:
        return int(self._state.num_processes)

    def device_for(self, requested: torch.device) -> torch.device:
        """This process's own GPU for ``cuda`` (``accelerate``'s ``cuda:LOCAL_RANK``); ``cuda:N`` names one GPU,
        kept in every process (NCCL still talks through each process's own); the CPU stays the CPU."""
        return self._state.device if requested.type != "cpu" and requested.index is None else requested

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        parts = gather_object([outputs])  # one tensor per process, in rank order
        return torch.cat([part for part in parts if len(part)] or parts)
