"""``task_arithmetic``: the base plus the weighted sum of task vectors (Ilharco et al., 2023).

Spelled as mergekit spells it, so a mergekit config ports line by line: a global
``lambda`` (default 1) that scales the summed task vectors, ``normalize`` (default
false for task arithmetic, as in mergekit) that divides them by the sum of the
weights, and a ``weight`` per ingredient (default 1, used as given).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergeMethod, NoParameters
from hub_soup.merging.methods.arithmetic import combination_

if TYPE_CHECKING:
    import torch


class TaskArithmeticParameters(NoParameters):
    """``parameters`` of ``method: task_arithmetic`` (mergekit's names)."""

    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the summed task vectors by the sum of the weights")


class TaskArithmetic(MergeMethod):
    """``base + lambda * (w0 * (p0 - base) + w1 * (p1 - base) + ...)``, ``/ sum(w)`` with ``normalize``.

    Each ingredient's coefficient (``lambda * w_i``, divided by the sum of the weights
    when normalising) is worked out once per merge in float64, and the kernel
    (:func:`~hub_soup.merging.methods.arithmetic.combination_`) computes per element, one
    IEEE-rounded float64 op at a time, so the result does not depend on where the engine
    cuts a tensor. float64, not float32, because a soup element can be far smaller than the
    base and task vectors it is made of: on the 0.5B benchmark models,
    ``base + sum_i (p_i - base)`` cancelled down from 3e-3 to -6.8e-9, and float32's
    rounding of the 3e-3 terms was 3% of the result (8 bf16 ulps). float64's roundings are
    2^-53 of the terms, so the soup is its definition rounded once; the merge reads and
    writes as much as in float32.
    """

    name = "task_arithmetic"
    Parameters = TaskArithmeticParameters
    needs_base = True
    min_ingredients = 1  # one task vector added (or, weighted -1, negated)
    uses_weights = True
    default_weight = 1.0
    normalizes_weights = False
    float64_kernel = True
    title = "task arithmetic"
    paper = "[Ilharco et al., 2023, Editing Models with Task Arithmetic](https://arxiv.org/abs/2212.04089)"
    summary = (
        "each fine-tune's task vector (its difference from the base model) was scaled by its weight, and "
        "their sum{divided}, scaled by lambda, was added to the base model."
    )
    divisor = "the sum of the weights"

    def coefficients(self, count: int) -> list[float]:
        """``lambda * w_i`` (over the sum of the weights with ``normalize``, unless it is about 0, as in mergekit)."""
        return self._coefficients if self.weights is not None else self._coefficients_for(count)

    @cached_property
    def _coefficients(self) -> list[float]:
        assert self.weights is not None
        return self._coefficients_for(len(self.weights))

    def _coefficients_for(self, count: int) -> list[float]:
        weights = self.weights_for(count)
        scale: float = self.parameters.lambda_  # type: ignore[attr-defined]
        total = math.fsum(weights)
        if self.parameters.normalize and abs(total) >= 1e-8:  # type: ignore[attr-defined]
            scale /= total
        return [scale * w for w in weights]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        assert base is not None
        combination_(acc, parts, self.coefficients(len(parts)), scratch, base, scalars=self.scalars)
