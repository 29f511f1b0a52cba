"""``breadcrumbs``: Model Breadcrumbs (Davari and Belilovsky, 2023): drop each task vector's outliers and its
negligible changes, sum the rest.

Per tensor, each fine-tune's task vector ``delta = part - base`` keeps a window of its
magnitudes: the ``int(gamma * n)`` largest ``|delta|`` (the outliers) go, and so do the
smallest, so that ``int(density * n)`` are kept (where ``density + gamma > 1``, fewer
outliers go: the window is the ``int(density * n)`` largest after at most ``n - int(density
* n)`` of them). ``density`` (default 1: nothing is trimmed, ``gamma`` too is then without
effect, as in mergekit) and ``gamma`` (default 0.01) are per ingredient. The two ends of the
window are exact thresholds found by the same streamed radix selection as TIES's (see
:mod:`~hub_soup.merging.methods.sparsify`), two per ingredient in the same passes;
elements equal to a threshold are all kept (mergekit's ``argsort`` keeps an arbitrary
subset of them). The weighted vectors are summed (divided by the sum of the weights with
``normalize``, off by default), scaled by ``lambda`` and added to the base model.
"""

from __future__ import annotations

import functools
import math

from pydantic import Field

from hub_soup.merging.methods import MergedTensor
from hub_soup.merging.methods.generalized import GeneralizedTaskArithmetic, MagnitudeParameters
from hub_soup.merging.methods.sparsify import MagnitudeThresholds

BREADCRUMBS_PAPER = (
    "[Davari and Belilovsky, 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse "
    "Masks](https://arxiv.org/abs/2312.06795)"
)
BREADCRUMBS_TRIMMED = (
    "per tensor, each task vector (a fine-tune's difference from the base model) lost its gamma fraction of "
    "largest magnitudes (outliers) and its smallest, keeping a density fraction; "
)


class BreadcrumbsParameters(MagnitudeParameters):
    """``parameters`` of ``breadcrumbs`` and ``breadcrumbs_ties`` (mergekit's names and defaults)."""

    gamma: float = Field(0.01, ge=0, le=1, description="fraction of largest magnitudes dropped as outliers "
                         "(per ingredient too)")
    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")


@functools.lru_cache(maxsize=256)
def windows(densities: tuple[float, ...], gammas: tuple[float, ...], numel: int) -> tuple[int | None, ...]:
    """The ranks (from the largest, 1-based) bounding each ingredient's window: ``(lower_0, upper_0, lower_1,
    ...)``; a lower bound keeps ``|delta| >=`` its value (``0``: keeps nothing), an upper one ``|delta| <=``
    its value, ``None`` bounds nothing."""
    ranks: list[int | None] = []
    for density, gamma in zip(densities, gammas):
        if density >= 1:
            ranks += [None, None]
            continue
        target = int(density * numel)
        outliers = min(int(gamma * numel), numel - target)
        if target == 0:
            ranks += [0, None]
        else:
            ranks += [outliers + target if outliers + target < numel else None, outliers + 1 if outliers else None]
    return tuple(ranks)


class Breadcrumbs(GeneralizedTaskArithmetic):
    """Breadcrumbs' window of magnitudes, then a plain weighted sum of the trimmed task vectors."""

    name = "breadcrumbs"
    Parameters = BreadcrumbsParameters
    sparsification = "magnitude"
    consensus = False
    ingredient_parameters = ("density", "gamma")
    title = "Model Breadcrumbs"
    paper = BREADCRUMBS_PAPER
    summary = BREADCRUMBS_TRIMMED + "the weighted vectors were summed{divided}, scaled by lambda and added to the base model."
    divisor = "the sum of the weights"

    def _windows(self, count: int, numel: int) -> tuple[int | None, ...]:
        return windows(tuple(self.densities(count)), tuple(self.per_ingredient("gamma", count)), numel)

    def thresholds(self, count: int, tensor: MergedTensor) -> MagnitudeThresholds:
        """Two selections per ingredient (the window's lower and upper end), in the same passes."""
        ranks = self._windows(count, tensor.numel)
        return MagnitudeThresholds((), tensor, ranks=ranks, of=[i // 2 for i in range(len(ranks))])

    def bounds(self, statistics: MagnitudeThresholds, index: int) -> tuple[float | str | None, float | None]:
        """Keep ``lower <= |delta| <= upper``: above the lower end as TIES keeps, below the upper end's next float64
        up (the kernel is float64: the threshold and the value above it, exactly)."""
        below = statistics.below[2 * index + 1]
        above = math.nextafter(math.nextafter(below, math.inf), math.inf) if isinstance(below, float) else None
        return statistics.below[2 * index], above
