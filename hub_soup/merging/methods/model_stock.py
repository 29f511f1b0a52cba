"""``model_stock``: Model Stock, the soup of a few fine-tunes pulled towards their base by their angle.

Jang, Han and Yun 2024, "Model Stock: All we need is just a few fine-tuned models"
(https://arxiv.org/abs/2403.19522). Per tensor, with ``N`` fine-tunes ``theta_i`` of a
base ``theta_0`` and ``cos`` the mean cosine between every pair of task vectors
``theta_i - theta_0`` (each flattened over the whole tensor)::

    t = N cos / (1 + (N - 1) cos)
    soup = t * mean(theta_i) + (1 - t) * theta_0

The cosines come from the statistics pass (dot products accumulated in float64, chunk
by chunk); the kernel works in float64, so the soup is its definition rounded once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class ModelStockParameters(NoParameters):
    """Model Stock's parameters, named as mergekit names them."""

    filter_wise: bool = Field(
        False, description="mergekit's angle per row (filter) of a tensor: only false (one angle per tensor, "
        "the paper's) is supported",
    )

    @field_validator("filter_wise")
    @classmethod
    def _whole_tensors(cls, value: bool) -> bool:
        if value:
            raise ValueError("filter_wise: true (an angle per row) is not supported; hub-soup takes one per tensor")
        return value


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

    def start_statistics(self, tensor: MergedTensor) -> Gram | None:
        return None  # made on the first chunk, which says how many ingredients there are

    def observe(self, statistics: Gram | None, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        assert base is not None
        gram = statistics or Gram(len(parts))
        wide = base.double()
        return gram.add([p.double().sub_(wide) for p in parts])

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
        """``base + (t / N) * sum(part - base)``: the paper's soup, on task vectors."""
        assert base is not None and statistics is not None
        if statistics == 0:
            acc.copy_(base)
            return
        for i, part in enumerate(parts):
            target = acc if i == 0 else scratch
            target.copy_(part)
            target.sub_(base)
            if i:
                acc.add_(scratch)
        acc.mul_(statistics / len(parts))
        scratch.copy_(base)
        acc.add_(scratch)
