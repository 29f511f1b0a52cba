"""``della``: DELLA-Merging (Deep et al., 2024): MagPrune (drop by magnitude rank, at random), elect, fuse.

Per tensor and ingredient, each element of the task vector ``delta = part - base`` is kept with
probability ``p = density - epsilon + 2 epsilon r / (n - 1)``, ``r`` its magnitude's rank
(0 the smallest, ties in index order) among the ``n`` elements of its row (the vectors along
axis 1; a 1-D tensor is one row; ``density`` for a row of one), as mergekit and the authors'
code parameterise the paper's MagPrune. The draw is the DARE methods' hash of (seed, tensor,
ingredient, element) compared with ``p`` (see :mod:`~hub_soup.merging.methods.sparsify`), so
a soup is reproducible on any machine. With ``rescale`` (default true) each kept element is
divided by its own ``p``, as the paper does (so each task vector is unchanged in
expectation); mergekit instead scales each trimmed vector to its untrimmed L1 norm. Then, as
``dare_ties``: weighted, signs elected, the agreeing entries summed (divided by the sum of
their weights with ``normalize``, on by default: the paper's mean), scaled by ``lambda``,
added to the base model.

The ranks need whole rows: the method says how long its rows are
(:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`: ``shape[1:]``'s elements, the whole
of a 1-D tensor), so the engine streams it in chunks and blocks of whole rows and its working
memory is a few blocks, as any method's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from hub_soup.merging.methods.generalized import GeneralizedTaskArithmetic, RandomParameters
from hub_soup.merging.methods.sparsify import UNIFORM_BITS, RandomMasks, delta_

if TYPE_CHECKING:
    import torch

DELLA_PAPER = (
    "[Deep et al., 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling](https://arxiv.org/abs/2406.11617)"
)
DELLA_DROPPED = (
    "each task vector (a fine-tune's difference from the base model) kept each element with a probability from "
    "density - epsilon (the smallest magnitude of its row) to density + epsilon (the largest), a hash of the "
    "seed, the tensor and the element deciding{kept}; "
)


class DellaParameters(RandomParameters):
    """``parameters`` of ``della`` (mergekit's names and defaults)."""

    epsilon: float = Field(0.15, ge=0, allow_inf_nan=False, description="half the spread of the keep probabilities "
                           "around density, by magnitude rank (per ingredient too)")
    normalize: bool = Field(True, description="divide the agreeing entries' sum by the sum of their weights")
    rescale: bool = Field(True, description="divide each kept element by its keep probability (the paper's)")

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParameters:
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(f"density +- epsilon must lie in (0, 1): density {self.density}, epsilon {self.epsilon}")
        return self


def rank_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(n, rest)`` of a tensor of ``shape``: its rows' ``n`` elements ranked against each other (axis 1; a 1-D
    tensor's all), each ``rest`` elements apart (the elements of the axes after it)."""
    if len(shape) < 2:
        return math.prod(shape), 1
    return shape[1], math.prod(shape[2:])


def keep_probabilities(delta: torch.Tensor, rows: tuple[int, int, int], density: float, epsilon: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """MagPrune's keep probability of each element of ``delta`` (flat, whole rows), viewed as ``rows`` =
    ``(rows, n, rest)``: ranked by magnitude along the middle axis; and its keep limit (int32: the element
    is kept when its draw is below ``round(p * 2**24)``).

    Each rank's probability is worked out once per row length (:func:`_by_rank`) and scattered to the
    elements in rank order (where computing it per element took six passes); the limits follow from it.
    """
    import numpy as np
    import torch

    n = rows[1]
    # Sorted by their bits as integers: a non-negative float's bits order as the float does, and an integer
    # sort is faster than a float one (the ranks are DELLA's hot spot).
    magnitude = delta.view(rows).abs()
    if magnitude.dtype == torch.float64 and torch.equal(narrow := magnitude.float(), magnitude):
        magnitude = narrow  # the same values (a bf16 model's deltas, as a rule): the same order, in 31 bits
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[magnitude.element_size()]
    keys = magnitude.view(bits)
    if bits != torch.int64 and delta.device.type == "cpu" and n < 1 << 32:
        # Keys of at most 31 bits, each with its index below them: all distinct, so a sort of the values alone
        # is the stable argsort (ties in index order), and numpy's sorts those 4-5x faster than torch.argsort.
        packed = keys.to(torch.int64).bitwise_left_shift_(32).bitwise_or_(torch.arange(n).view(1, n, 1))
        order = torch.from_numpy(np.sort(packed.numpy(), axis=1)).bitwise_and_(0xFFFFFFFF)
    else:
        order = torch.argsort(keys, dim=1, stable=True)
    probability = _by_rank(n, density, epsilon, delta.dtype)
    p = torch.empty_like(delta).view(rows).scatter_(1, order, probability.view(1, n, 1).expand_as(order))
    # each element's limit from its probability (cheaper than a second scatter, of a per-rank table)
    limits = p.mul(1 << UNIFORM_BITS).round_().to(torch.int32)
    return p.view(-1), limits.view(-1)


@functools.lru_cache(maxsize=64)
def _by_rank(n: int, density: float, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``r``'s keep probability ``density - epsilon + 2 epsilon r / (n - 1)`` (``density`` for a row of one),
    each op rounded in ``dtype`` as it was per element."""
    import torch

    if n == 1:
        return torch.full((1,), density, dtype=dtype)
    return torch.arange(n).to(dtype).div_(n - 1).mul_(2 * epsilon).add_(density - epsilon)


class Della(GeneralizedTaskArithmetic):
    """DELLA: MagPrune's random drop by magnitude rank per row, the kept elements rescaled, TIES's election."""

    name = "della"
    Parameters = DellaParameters
    sparsification = "random"
    consensus = True
    compute_bound = True
    ingredient_parameters = ("density", "epsilon")
    title = "DELLA"
    paper = DELLA_PAPER
    summary = (
        DELLA_DROPPED + "each element's sign was elected by the weighted sum, the agreeing entries were "
        "summed{divided}, scaled by lambda and added to the base model."
    )
    divisor = "the sum of their weights"

    def card_summary(self) -> str | None:
        """The summary with ``{kept}`` true of this merge: the kept elements divided by their own probability
        only when ``rescale`` did it (the paper's rescaling, named against mergekit's)."""
        summary = super(GeneralizedTaskArithmetic, self).card_summary()
        assert summary is not None
        rescaled = self.parameters.rescale  # type: ignore[attr-defined]
        return summary.replace(
            "{kept}", ", the kept ones divided by their own probability (rescale, as the paper; mergekit matches "
            "each trimmed vector's L1 norm instead)" if rescaled else ", the kept ones not rescaled"
        )

    def row_elements(self, shape: tuple[int, ...]) -> int:
        """A row is the elements of ``shape[1:]`` (the whole of a 1-D tensor): each element's rank is among those."""
        n, rest = rank_axes(shape)
        return n * rest

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """The soup of a block of whole rows (``statistics``: the tensor's :class:`RandomMasks`)."""
        import torch

        assert base is not None
        masks: RandomMasks = statistics
        count = len(parts)
        weights, densities, epsilons = self.weights_for(count), self.densities(count), self.per_ingredient("epsilon", count)
        n, rest = rank_axes(masks.tensor.dims)
        rows = (acc.numel() // max(n * rest, 1), n, rest)
        deltas = self.workspace("deltas", acc, count)
        (wide,) = self.workspace("base", acc)
        wide.copy_(base)
        hashed, bits, draw = self.workspace("hashes", acc, 3, torch.int32)
        masks.element_hash_(hashed, draw, offset)
        rescale = self.parameters.rescale  # type: ignore[attr-defined]
        for i, (delta, part) in enumerate(zip(deltas, parts)):
            delta_(delta, part, wide)
            if densities[i] < 1:
                p, limits = keep_probabilities(delta, rows, densities[i], epsilons[i])
                kept = torch.lt(masks.uniform_(draw, hashed, bits, i), limits)  # draws below the limit kept
                if rescale:
                    delta.div_(p)
                delta.mul_(kept)
            delta.mul_(self.scalars([weights[i]], acc)[0])
        self.mix_(acc, deltas, weights, scratch, wide)
