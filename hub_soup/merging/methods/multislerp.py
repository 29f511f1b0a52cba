"""``multislerp``: barycentric interpolation of any number of models on the hypersphere.

C. Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit's
code computes it. Per tensor, each flattened: ``v_i`` the models, or with a base their task vectors
``x_i - base`` (the soup is then ``base + ...``); weights ``w_i`` (each model's ``weight``, divided by
their sum with ``normalize_weights``); unit vectors ``u_i = v_i / (|v_i| + eps)``; their weighted
mean ``m``, normalised; the tangent vectors ``u_i - (u_i . m) m`` and their weighted sum ``T``; the
soup is the exponential map ``m cos|T| + T sin|T| / |T|`` (``|T|`` plus ``eps``), times the mean
norm ``sum_i w_i |v_i|``.

Every vector in that computation is a combination of the ``v_i``, so the whole of it runs on their
``k x k`` dot products (a statistics pass, in float64) and gives one coefficient per input: the
kernel then streams ``sum_i c_i v_i`` in float64, rounded once. A weighted mean of the unit vectors
shorter than ``eps`` (antipodal inputs) is the weighted sum for two models and an error for more, as
mergekit's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram
from hub_soup.merging.methods.arithmetic import combination_

if TYPE_CHECKING:
    import torch


class MultislerpParameters(NoParameters):
    """mergekit's ``multislerp`` parameters (each model's ``weight`` is its ingredient's weight)."""

    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0, allow_inf_nan=False, description="added to norms before dividing by them")


def quadratic(gram: Gram, a: Sequence[float], b: Sequence[float]) -> float:
    """``<sum_i a_i v_i, sum_j b_j v_j>``, from the vectors' dot products."""
    return math.fsum(a[i] * b[j] * gram.dot(i, j) for i in range(gram.count) for j in range(gram.count))


class Multislerp(MergeMethod):
    """Multi-SLERP (Goddard): the weighted mean of the models' directions on the sphere, times their mean norm."""

    name = "multislerp"
    title = "Multi-SLERP"
    paper = "[Goddard, Multi-SLERP](https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)"
    summary = (
        "per tensor, the models (their task vectors, with a base) were interpolated on the hypersphere by their "
        "weights (a weighted mean in the tangent space at their mean direction), times their weighted mean norm."
    )
    Parameters = MultislerpParameters
    optional_base = True
    uses_weights = True
    normalizes_weights = False  # normalize_weights decides
    float64_kernel = True

    def start_statistics(self, tensor: MergedTensor) -> Gram | None:
        return None  # made on the first chunk, which says how many ingredients there are

    def observe(self, statistics: Gram | None, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        return (statistics or Gram(len(parts), self.workspace)).add(parts, base)

    def finish_statistics(self, statistics: Gram | None, tensor: MergedTensor) -> list[float]:
        """Each (task) vector's coefficient in the soup."""
        if statistics is None:  # an empty tensor: nothing to merge
            return []
        count, eps = statistics.count, self.parameters.eps  # type: ignore[attr-defined]
        if count == 1:
            return [1.0]
        weights = self.weights_for(count)
        if self.parameters.normalize_weights:  # type: ignore[attr-defined]
            total = math.fsum(weights)
            if total == 0:
                raise RecipeError(f"multislerp: {tensor.key}: the weights {weights} sum to 0, and normalize_weights "
                                  "divides by their sum", hint="change a weight, or set normalize_weights: false")
            weights = [w / total for w in weights]
        norms = [math.sqrt(statistics.dot(i, i)) for i in range(count)]
        mean = [w / (n + eps) for w, n in zip(weights, norms)]  # sum_i w_i u_i, in the v_i
        length = math.sqrt(max(quadratic(statistics, mean, mean), 0.0))
        if length < eps:
            if count == 2:
                return weights
            raise RecipeError(
                f"multislerp: {tensor.key}: the weighted mean of the models' directions is 0 (antipodal models "
                "whose weights balance)", hint="change a weight")
        mean = [m / length for m in mean]
        dots = [math.fsum(mean[j] * statistics.dot(i, j) for j in range(count)) / (norms[i] + eps)
                for i in range(count)]
        along = math.fsum(w * d for w, d in zip(weights, dots))
        tangent = [w / (n + eps) - along * m for w, n, m in zip(weights, norms, mean)]
        angle = math.sqrt(max(quadratic(statistics, tangent, tangent), 0.0)) + eps
        scale = math.fsum(n * w for n, w in zip(norms, weights))
        return [(m * math.cos(angle) + g * math.sin(angle) / angle) * scale for m, g in zip(mean, tangent)]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        combination_(acc, parts, statistics, scratch, base, scalars=self.scalars)
