"""``model_stock``: Model Stock, the soup of a few fine-tunes pulled towards their base by their angle.

Jang, Han and Yun 2024, "Model Stock: All we need is just a few fine-tuned models"
(https://arxiv.org/abs/2403.19522). Per tensor, with ``N`` fine-tunes ``theta_i`` of a
base ``theta_0`` and ``cos`` the mean cosine between every pair of task vectors
``theta_i - theta_0`` (each flattened over the whole tensor)::

    t = N cos / (1 + (N - 1) cos)
    soup = t * mean(theta_i) + (1 - t) * theta_0

The cosines come from the statistics pass (dot products accumulated in float64, chunk
by chunk); the kernel works in float64, so the soup is its definition rounded once.

With ``filter_wise`` (mergekit's parameter) the angle, and so ``t``, is taken per row: each
vector along the tensor's last axis (a 1-D tensor is one row). The engine then streams the
tensor in blocks of whole rows (:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`),
each row's angle computed from the block, in float64, with no statistics pass.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class _Rows:
    """A ``filter_wise`` merge of one tensor: how many of its rows were merged and how many of those had their
    ``t`` clamped (for its warning), so far; blocks are merged side by side, counted under the lock."""

    tensor: MergedTensor
    clamped: int = 0
    merged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class ModelStockParameters(NoParameters):
    """Model Stock's parameters, named as mergekit names them."""

    filter_wise: bool = Field(
        False, description="an angle per row (each vector along the last axis, mergekit's 'filter') instead of "
        "one per tensor (the paper's)",
    )


def interpolation_ratio(cosine: float, count: int) -> float:
    """The paper's ``t = N cos / (1 + (N - 1) cos)`` for ``cos`` in (0, 1]: in (0, 1], 1 at ``cos = 1``."""
    return count * cosine / (1 + (count - 1) * cosine)


class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): ``t * mean + (1 - t) * base`` per tensor.

    Where the mean cosine is not positive (task vectors at a right or obtuse angle), the
    formula leaves [0, 1]: ``t`` is clamped to 0, its value at ``cos = 0`` (the tensor is the
    base's), with a warning naming the tensor. A zero task vector (a fine-tune that left the
    tensor as the base had it) has no angle: its pairs count as cosine 0, with a warning;
    where every task vector is zero (a frozen tensor) the soup is the base's, quietly.
    """

    name = "model_stock"
    title = "Model Stock"
    paper = "[Jang et al., 2024, Model Stock: All we need is just a few fine-tuned models](https://arxiv.org/abs/2403.19522)"
    summary = (
        "per tensor, the fine-tunes' average was pulled towards the base model by a ratio set by the angle "
        "between their task vectors (t = N cos / (1 + (N - 1) cos); soup = t * average + (1 - t) * base)."
    )
    Parameters = ModelStockParameters
    needs_base = True
    float64_kernel = True
    compute_bound = True  # the Gram's float64 dot products: the statistics pass is most of the time
    # A few ns an element: at 6 MiB a position, waking the workers and readers for each cost more than it gave
    # (1.5B x 3 on 2 cores: 11.9-12.1 s at 6 MiB, 9.6-10.5 s at 24, 8.5-10.1 s at 48 for 120 MiB more memory;
    # arcee_fusion and della_linear, seconds of work a position, took as long and twice the memory at 24).
    position_bytes = 24 << 20

    @property
    def filter_wise(self) -> bool:
        """An angle per row (mergekit's ``filter_wise``), not one per tensor."""
        return bool(self.parameters.filter_wise)  # type: ignore[attr-defined]

    def row_elements(self, shape: tuple[int, ...]) -> int:
        """``filter_wise``: a row is a vector along the last axis (a 1-D tensor's all); elementwise otherwise."""
        return shape[-1] if self.filter_wise and shape else 1

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """One pass (the tensor's angle), none for ``filter_wise`` (each block's rows hold their angles)."""
        return 0 if self.filter_wise else 1

    def card_summary(self) -> str | None:
        """The summary, saying ``per row`` where ``filter_wise`` took an angle per row."""
        assert self.summary is not None
        if not self.filter_wise:
            return self.summary
        return self.summary.replace("per tensor,", "per row of each tensor (filter_wise),")

    @staticmethod
    def _merge_rows(out: torch.Tensor, parts: Sequence[torch.Tensor], base: torch.Tensor) -> int:
        """One block of rows into ``out``; returns how many rows' ``t`` was clamped to 0."""
        import torch

        count = len(parts)
        wide = base.to(out.dtype)
        deltas = [p.to(out.dtype).sub_(wide) for p in parts]
        norms = [torch.linalg.vector_norm(d, dim=1) for d in deltas]
        cosine = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        for i in range(count):
            for j in range(i + 1, count):
                product = norms[i] * norms[j]  # a zero task vector has no angle: cosine 0, as per tensor
                dot = (deltas[i] * deltas[j]).sum(1)
                cosine += torch.where(product > 0, dot / product.clamp(min=torch.finfo(out.dtype).tiny), 0.0)
        cosine = (cosine / (count * (count - 1) // 2)).clamp_(-1, 1)
        positive = cosine > 0
        t = torch.where(positive, count * cosine / (1 + (count - 1) * cosine), 0.0)
        out.copy_(deltas[0])
        for delta in deltas[1:]:
            out.add_(delta)
        out.mul_((t / count).unsqueeze(1)).add_(wide)
        frozen = torch.stack(norms).amax(0) == 0  # every task vector zero: the base's row, quietly
        return int((~positive & ~frozen).sum())

    def start_statistics(self, tensor: MergedTensor) -> _Rows | None:
        """``filter_wise``: the rows' count of clamped ``t``; else ``None``: the :class:`Gram` is made on the
        first chunk, which says how many ingredients there are."""
        return _Rows(tensor) if self.filter_wise else None

    def observe(self, statistics: Gram | None, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        assert base is not None
        return (statistics or Gram(len(parts), self.workspace)).add(parts, base)

    def finish_statistics(self, statistics: Gram | None, tensor: MergedTensor) -> float:
        """``t`` of the tensor (1 for a tensor the engine never observed: a 0-dim one is observed, an
        empty one has no elements to merge)."""
        if statistics is None:
            return 1.0
        count = statistics.count
        moved = [statistics.dot(i, i) > 0 for i in range(count)]
        if not any(moved):
            return 0.0
        if count == 1:
            return 1.0
        cosines = [statistics.cosine(i, j) for i in range(count) for j in range(i + 1, count)]
        cosine = math.fsum(c or 0.0 for c in cosines) / len(cosines)
        if not all(moved):
            logger.warning(
                "model_stock: %s: %d of %d fine-tunes leave it as the base has it (no angle: cosine 0 for them)",
                tensor.key, moved.count(False), count,
            )
        if cosine <= 0:
            logger.warning(
                "model_stock: %s: the task vectors' mean cosine is %.3g <= 0; t clamped to 0 (the base's tensor)",
                tensor.key, cosine,
            )
            return 0.0
        return interpolation_ratio(cosine, count)

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """``(t / N) sum(part) + (1 - t) base``: the paper's soup (``filter_wise``: a block of whole rows, each
        with its ``t``; the tensor's last block warns of the rows clamped).

        The parts are summed in float64 (exactly, for 16-bit parts within 2^40 of each other), then scaled and
        the base added: as exact as the task vectors' sum scaled, without its float64 - bf16 subtraction per
        part (each several times slower than a widening copy and a float64 add).
        """
        assert base is not None and statistics is not None
        if isinstance(statistics, _Rows):
            width = statistics.tensor.dims[-1] if statistics.tensor.dims else 1
            rows = acc.numel() // width
            clamped = self._merge_rows(acc.view(rows, width),  # on acc's device (a GPU's, with one)
                                       [p.view(rows, width).to(acc.device) for p in parts],
                                       base.view(rows, width).to(acc.device))
            with statistics.lock:
                statistics.clamped += clamped
                statistics.merged += rows
                last = statistics.merged * width == statistics.tensor.numel
            if statistics.clamped and last:
                logger.warning("model_stock: %s: %d of %d rows' task vectors have a mean cosine <= 0; t clamped to "
                               "0 there (the base's rows)", statistics.tensor.key, statistics.clamped,
                               statistics.tensor.numel // width)
            return
        if statistics == 0:
            acc.copy_(base)
            return
        acc.copy_(parts[0])
        for part in parts[1:]:
            scratch.copy_(part)
            acc.add_(scratch)
        acc.mul_(statistics / len(parts))
        scratch.copy_(base)
        acc.add_(scratch, alpha=1 - statistics)
