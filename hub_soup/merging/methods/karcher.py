"""``karcher``: the Karcher (Frechet) mean of the models' directions on the unit sphere, times their mean norm.

Wang, Ye and Yin 2026, "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold"
(https://arxiv.org/abs/2603.04972; mergekit's ``karcher`` is the paper's code). Per tensor, each
model ``x_i = |x_i| u_i`` flattened, equal weights ``1/N``: models of norm at most ``tol`` leave the
direction (the others' weights renormalised) but count in the norm. Start at the normalised mean of
the ``u_i``; at most ``max_iter`` times: the tangent ``T = sum_i a_i theta_i / sin(theta_i) (u_i -
cos(theta_i) m)`` (``theta_i`` the angle of ``u_i`` from ``m``, terms under ``tol`` left out), stop
once ``|T| < tol``, else ``m <- cos|T| m + sin|T| T / |T|``, renormalised. The soup is ``(sum_i |x_i|
/ N) m``.

The mean is always a combination of the ``u_i``, so the iteration runs on the ``N x N`` matrix of
their dot products, gathered in one statistics pass (float64), and ends in one coefficient per
model: the kernel then streams the combination in float64, rounded once, at flat memory (mergekit
holds every model's tensor and iterates on them). A base listed among a mergekit config's models is
one more model here (``karcher`` takes no base).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.angles import Gram
from hub_soup.merging.methods.arithmetic import combination_

if TYPE_CHECKING:
    import torch


class KarcherParameters(NoParameters):
    """mergekit's ``karcher`` parameters: its iteration's."""

    max_iter: int = Field(10, ge=0, description="the most steps of the iteration")
    tol: float = Field(1e-5, ge=0, allow_inf_nan=False, description="the tangent's length at which it stops, and "
                       "the norm below which a model has no direction")


def karcher_coefficients(gram: Gram, max_iter: int, tol: float) -> list[float]:
    """Each model's coefficient in the soup: the paper's iteration, on the unit vectors' dot products."""
    count = gram.count
    norms = [math.sqrt(gram.dot(i, i)) for i in range(count)]
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    size = len(valid)
    units = [[gram.dot(i, j) / (norms[i] * norms[j]) for j in valid] for i in valid]

    def dot(a: Sequence[float], b: Sequence[float]) -> float:
        return math.fsum(a[i] * units[i][j] * b[j] for i in range(size) for j in range(size))

    weights = [1.0 / size] * size  # the 1/N of the valid ones, renormalised
    mean = list(weights)
    length = math.sqrt(max(dot(mean, mean), 0.0))
    mean = [1.0] + [0.0] * (size - 1) if length < tol else [m / length for m in mean]
    for _ in range(max_iter):
        tangent = [0.0] * size
        for i, w in enumerate(weights):
            cosine = max(-1.0, min(1.0, math.fsum(mean[j] * units[j][i] for j in range(size))))
            theta = math.acos(cosine)
            if theta < tol:
                continue
            factor = w * theta / math.sin(theta)
            tangent = [t - factor * cosine * m for t, m in zip(tangent, mean)]
            tangent[i] += factor
        length = math.sqrt(max(dot(tangent, tangent), 0.0))
        if length < tol:
            break
        mean = [math.cos(length) * m + math.sin(length) * t / length for m, t in zip(mean, tangent)]
        unit = math.sqrt(max(dot(mean, mean), 0.0))
        if unit > tol:
            mean = [m / unit for m in mean]
    scale = math.fsum(norms) / count
    coefficients = [0.0] * count
    for m, i in zip(mean, valid):
        coefficients[i] = scale * m / norms[i]
    return coefficients


class Karcher(MergeMethod):
    """The Karcher mean (Wang et al. 2026, https://arxiv.org/abs/2603.04972): the models' mean direction on the
    sphere, iterated on their Gram matrix, times their mean norm."""

    name = "karcher"
    title = "Karcher mean"
    paper = ("[Wang et al., 2026, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold]"
             "(https://arxiv.org/abs/2603.04972)")
    summary = ("per tensor, the models' directions were averaged on the unit sphere (their Karcher mean, "
               "iterated) and scaled to their mean norm.")
    Parameters = KarcherParameters
    float64_kernel = True

    def start_statistics(self, tensor: MergedTensor) -> Gram | None:
        return None  # made on the first chunk, which says how many ingredients there are

    def observe(self, statistics: Gram | None, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Gram:
        return (statistics or Gram(len(parts), self.workspace)).add(parts)

    def finish_statistics(self, statistics: Gram | None, tensor: MergedTensor) -> list[float]:
        """Each model's coefficient in the tensor (none for an empty tensor)."""
        if statistics is None:
            return []
        if statistics.count == 1:
            return [1.0]
        parameters = self.parameters
        return karcher_coefficients(statistics, parameters.max_iter, parameters.tol)  # type: ignore[attr-defined]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        combination_(acc, parts, statistics, scratch, scalars=self.scalars)
