"""Task arithmetic with sparsified task vectors and sign election: what ``ties``, ``dare_linear`` and
``dare_ties`` share (mergekit's "generalized task arithmetic").

Per tensor and element, with ``delta_i = theta_i - theta_base``::

    d_i   = sparsify(delta_i, density_i) * w_i        # magnitude top-k (TIES) or random (DARE)
    keep  = sign(d_i) == sign(sum_j d_j)              # with sign election (ties, dare_ties): else all
    mixed = sum_i keep_i d_i                          # / sum_i keep_i w_i with normalize (else / sum_i w_i)
    soup  = theta_base + lambda * mixed

An element whose votes sum to 0 elects ``+``; a zero ``d_i`` agrees with neither sign;
where no weight agrees, the divisor is 1 (all as mergekit). The kernel computes in
float64, keeps every ingredient's ``d_i`` of a block in a workspace (so each is computed
once), and every step is one IEEE-rounded elementwise op, so the soup does not depend on
where the engine cuts a tensor; mergekit computes in the tensors' own dtype (bf16),
hub-soup rounds once, at the end. float64 and not float32 for the reason task arithmetic
gives (:mod:`~hub_soup.merging.methods.task_arithmetic`): a soup element can cancel to far
below the base and task vectors it is made of (one element of the 1.5B benchmark models'
TIES soup did), and float32's rounding of the large terms is then more than an ulp of it.
The magnitude threshold is then selected over float64 bits (two passes as a rule, four at most).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.arithmetic import sum_
from hub_soup.merging.methods.sparsify import DROP, MagnitudeThresholds, RandomMasks, delta_, radix_passes
from hub_soup.native import elementwise

if TYPE_CHECKING:
    import torch


class GeneralizedParameters(NoParameters):
    """Parameters every generalized task-arithmetic method takes, spelled as mergekit spells them."""

    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the mixed task vectors")
    density: float = Field(
        1.0, gt=0, le=1, description="fraction of each task vector's elements kept (per ingredient too)"
    )
    int8_mask: bool = Field(
        False, description="mergekit's memory saving for its whole-tensor masks; accepted so configs port, and "
        "without effect: hub-soup's masks are per block",
    )


class MagnitudeParameters(GeneralizedParameters):
    """Parameters of the methods that trim by magnitude (``ties``, ``breadcrumbs``), which refuse mergekit's
    ``rescale``: no paper defines it for them."""

    rescale: bool = Field(False, description="mergekit's L1 rescaling of trimmed task vectors: only false is supported")

    @field_validator("rescale")
    @classmethod
    def _not_rescaled(cls, value: bool) -> bool:
        if value:
            raise ValueError("rescale: true (mergekit's L1 rescaling of trimmed vectors) is not supported for "
                             "ties or breadcrumbs")
        return value


class RandomParameters(GeneralizedParameters):
    """Parameters of the DARE methods (mergekit's names and defaults), which drop elements at random.

    ``rescale`` divides the kept elements by ``density``, as the DARE paper does, so each
    task vector is unchanged in expectation; mergekit's ``rescale`` instead matches each
    trimmed vector's L1 norm to the untrimmed one's (also 1 / density in expectation).
    """

    normalize: bool = Field(False, description="divide by the sum of the (agreeing) weights")
    rescale: bool = Field(True, description="divide the kept elements by density (the DARE paper's rescaling)")
    seed: int = Field(0, ge=0, description="the random masks' seed: the same seed gives the same soup anywhere")


DARE_PAPER = (
    "[Yu et al., 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch](https://arxiv.org/abs/2311.03099)"
)
DARE_DROPPED = (
    "each task vector (a fine-tune's difference from the base model) kept each element with probability density "
    "(a hash of the seed, the tensor and the element decides){rescaled}; "
)


class GeneralizedTaskArithmetic(MergeMethod):
    """The shared kernel; a subclass sets :attr:`sparsification` and :attr:`consensus` (and its parameters)."""

    sparsification: ClassVar[Literal["magnitude", "random"]]
    consensus: ClassVar[bool]
    Parameters: ClassVar[type[GeneralizedParameters]] = GeneralizedParameters
    needs_base = True
    min_ingredients = 1  # one task vector added (or, weighted -1, negated)
    uses_weights = True
    default_weight = 1.0
    normalizes_weights = False
    ingredient_parameters: ClassVar[tuple[str, ...]] = ("density",)
    float64_kernel = True

    def card_summary(self) -> str | None:
        """The summary with DARE's ``{rescaled}`` true of this merge: the kept elements divided by density only
        when ``rescale`` did it."""
        summary = super().card_summary()
        if summary is None:
            return None
        rescaled = getattr(self.parameters, "rescale", False)
        return summary.replace(
            "{rescaled}", ", the kept ones divided by density (rescale)" if rescaled else ", the kept ones not rescaled"
        )

    def densities(self, count: int) -> list[float]:
        return self.per_ingredient("density", count)

    @property
    def _sparsifies(self) -> bool:
        """Some ingredient keeps less than its whole task vector."""
        own = [i.get("density", 1.0) for i in self.ingredients]
        return min([self.parameters.density, *own]) < 1  # type: ignore[attr-defined]

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """Magnitude sparsification reads each tensor once per radix digit of its threshold at most (4)."""
        return radix_passes(dtype) if self.sparsification == "magnitude" and self._sparsifies else 0

    def start_statistics(self, tensor: MergedTensor) -> Any:
        if self.sparsification == "random":
            return RandomMasks(self.parameters.seed, tensor)  # type: ignore[attr-defined]
        return tensor  # the thresholds are made on the first chunk, which says how many ingredients there are

    def passes_left(self, statistics: Any) -> int | None:
        """The magnitude thresholds' passes left (none once every threshold is found)."""
        return statistics.passes_left if isinstance(statistics, MagnitudeThresholds) else None

    def observe(self, statistics: Any, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Any:
        assert base is not None
        if isinstance(statistics, MergedTensor):
            statistics = self.thresholds(len(parts), statistics)
        statistics.observe(parts, base)
        return statistics

    def thresholds(self, count: int, tensor: MergedTensor) -> MagnitudeThresholds:
        """The magnitude thresholds a tensor's statistics passes find: each ingredient's top ``density``."""
        return MagnitudeThresholds(self.densities(count), tensor)

    def bounds(self, statistics: MagnitudeThresholds, index: int) -> tuple[float | str | None, float | None]:
        """Ingredient ``index``'s window of kept magnitudes: ``|delta| > lower`` (a :class:`MagnitudeThresholds`
        value: ``None`` keeps all, :data:`DROP` none) and, where ``upper`` is given, ``|delta| < upper``. TIES
        keeps ``|delta| >= threshold``: no upper end."""
        return statistics.below[index], None

    def trim_(self, delta: torch.Tensor, statistics: MagnitudeThresholds, index: int, scratch: torch.Tensor) -> None:
        """Zero the elements of ingredient ``index``'s task vector (a block of it) outside its :meth:`bounds`;
        below the upper end as ``sign(max(upper - |delta|, 0))`` (exact, in float ops only)."""
        import torch

        lower, upper = self.bounds(statistics, index)
        keep_above_(delta, lower, scratch, self.scalars)
        if upper is not None:
            torch.abs(delta, out=scratch).neg_().add_(self.scalars([upper], scratch)[0]).clamp_(min=0).sign_()
            delta.mul_(scratch)

    def finish_statistics(self, statistics: Any, tensor: MergedTensor) -> Any:
        if isinstance(statistics, MagnitudeThresholds):
            statistics.finish_pass()
        return statistics

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        assert base is not None
        count = len(parts)
        weights = self.weights_for(count)
        if self._compiled(acc, parts, base, weights, statistics, offset):
            return
        deltas = self.workspace("deltas", acc, count)
        self._sparse_weighted_deltas(deltas, parts, base, weights, scratch, statistics, offset)
        self.mix_(acc, deltas, weights, scratch, base)

    def _compiled(self, acc: torch.Tensor, parts: Sequence[torch.Tensor], base: torch.Tensor,
                  weights: list[float], statistics: Any, offset: int) -> bool:
        """The kernel as one compiled loop (:func:`hub_soup.native.elementwise.generalized`: the same steps as
        :meth:`_sparse_weighted_deltas` and :meth:`mix_`, bit for bit); whether it ran."""
        densities = self.densities(len(parts))
        trims = [elementwise.Trim()] * len(parts)
        if isinstance(statistics, RandomMasks) and min(densities) < 1:
            trims = [elementwise.Trim(limit=statistics.limit(d), key=statistics.key(i)) if d < 1 else elementwise.Trim()
                     for i, d in enumerate(densities)]
        elif isinstance(statistics, MagnitudeThresholds):
            trims = [elementwise.Trim(drop=lower is DROP, lower=lower if isinstance(lower, float) else None,
                                      upper=upper)
                     for lower, upper in (self.bounds(statistics, i) for i in range(len(parts)))]
        parameters = self.parameters
        return elementwise.generalized(
            acc, parts, base, weights=weights, densities=densities, trims=trims,
            element_key=statistics.key(-1) if isinstance(statistics, RandomMasks) else 0,
            rescale=getattr(parameters, "rescale", False), consensus=self.consensus,
            normalize=parameters.normalize,  # type: ignore[attr-defined]
            divisor=_divisor(weights), lambda_=parameters.lambda_, offset=offset,  # type: ignore[attr-defined]
        )

    def mix_(self, acc: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], scratch: torch.Tensor,
             base: torch.Tensor) -> None:
        """``acc`` = the soup of a block from its sparsified, weighted task vectors (which it consumes): the
        agreeing ones (:attr:`consensus`) or all summed, divided with ``normalize``, scaled, added to ``base``."""
        parameters = self.parameters
        if self.consensus:
            divisor = self._elect_and_mix(acc, deltas, weights, scratch)
        else:
            sum_(acc, deltas)
            divisor = self.scalars([_divisor(weights)], acc)[0]
        if parameters.normalize:  # type: ignore[attr-defined]
            acc.div_(divisor)
        if parameters.lambda_ != 1:  # type: ignore[attr-defined]
            acc.mul_(self.scalars([parameters.lambda_], acc)[0])  # type: ignore[attr-defined]
        acc.add_(base)

    def _sparse_weighted_deltas(
        self, deltas: list[torch.Tensor], parts: Sequence[torch.Tensor], base: torch.Tensor, weights: list[float],
        scratch: torch.Tensor, statistics: Any, offset: int,
    ) -> None:
        """``deltas[i] = sparsify(parts[i] - base) * w_i`` for one block."""
        import torch

        densities = self.densities(len(parts))
        scales = self.scalars(weights, scratch)
        if base.dtype != scratch.dtype:  # upcast once, not once per ingredient (exact either way)
            (wide,) = self.workspace("base", scratch)
            base = wide.copy_(base)
        hashed = None
        if self.sparsification == "random" and min(densities) < 1:
            hashed, bits, tmp = self.workspace("hashes", scratch, 3, torch.int32)
            statistics.element_hash_(hashed, tmp, offset)
        for i, (delta, part) in enumerate(zip(deltas, parts)):
            delta_(delta, part, base)
            if isinstance(statistics, MagnitudeThresholds):  # magnitude trimming (not at density 1)
                self.trim_(delta, statistics, i, scratch)
            elif hashed is not None and densities[i] < 1:
                delta.mul_(statistics.keep_(scratch, hashed, bits, tmp, i, densities[i]))  # -d or 0: sign below
                negated = -weights[i]
                if self.parameters.rescale:  # type: ignore[attr-defined]
                    delta.div_(self.scalars([-densities[i]], scratch)[0])  # (-d) / (-p) is exactly d / p
                    negated = weights[i]
                delta.mul_(self.scalars([negated], scratch)[0])
                continue
            delta.mul_(scales[i])

    def _elect_and_mix(
        self, acc: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], scratch: torch.Tensor,
    ) -> torch.Tensor:
        """``acc`` = the sum of the ``deltas`` that agree with their element's elected sign; returns the divisor
        normalising divides by (the sum of the agreeing weights, 1 where none agrees), in ``scratch``.

        With ``e`` the elected sign (+1 where the votes sum to 0 or more, else -1), ``d * e`` is positive exactly
        where ``d`` agrees, so the agreeing sum is ``e * sum(max(d * e, 0))``: every product by ``e`` and every
        clamp is exact, and the sum adds the same numbers (and zeros) as summing the agreeing ``d`` would, in
        float ops without masks.
        """
        import torch

        (elected,) = self.workspace("elected", acc)
        elected.copy_(sum_(acc, deltas).ge_(0)).mul_(2).sub_(1)
        normalize = self.parameters.normalize  # type: ignore[attr-defined]
        for i, (delta, weight) in enumerate(zip(deltas, self.scalars(weights, acc))):
            delta.mul_(elected).clamp_(min=0)
            if i:
                acc.add_(delta)
            else:
                acc.copy_(delta)
            if normalize:  # the agreeing weights: sign(max(d * e, 0)) is 1 where d agrees, else 0
                if i:
                    scratch.add_(delta.sign_().mul_(weight))
                else:
                    scratch.copy_(delta.sign_().mul_(weight))
        acc.mul_(elected)
        if normalize:  # where no weight agrees, the divisor is 1: scratch + (1 - sign(|scratch|))
            torch.abs(scratch, out=elected).sign_().neg_().add_(1)
            scratch.add_(elected)
        return scratch


def _divisor(weights: Sequence[float]) -> float:
    """What ``normalize`` divides a plain weighted sum by: the weights' sum, or 1 where it is about 0 (mergekit's)."""
    total = math.fsum(weights)
    return total if abs(total) >= 1e-8 else 1.0


def keep_above_(delta: torch.Tensor, below: float | str | None, scratch: torch.Tensor,
                scalars: Callable[[list[float], torch.Tensor], list[torch.Tensor]]) -> None:
    """Zero the elements of ``delta`` with ``|delta| <= below`` (a :class:`MagnitudeThresholds` value: ``None``
    keeps all, :data:`DROP` none).

    ``sign(max(|d| - below, 0))`` is 1 where ``|d| > below``, else 0 (exact: a difference is 0 only between
    equal floats). Float ops only: a bool mask and masked_fill cost 5x more per element here.
    """
    import torch

    if below is DROP:
        delta.zero_()
    elif isinstance(below, float):
        torch.abs(delta, out=scratch).sub_(scalars([below], scratch)[0]).clamp_(min=0).sign_()
        delta.mul_(scratch)
