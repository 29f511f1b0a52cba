"""``sce``: Select, Calculate, Erase (Wan et al., 2024, FuseChat), streamed.

Per tensor, with task vectors ``tau_i = part_i - base``:

* **Select**: with ``select_topk < 1``, every ``tau_i`` is zeroed outside the ``k =
  int(select_topk * #nonzero)`` positions of largest variance across the fine-tunes (the
  population variance; positions tied with the k-th are all kept);
* **Calculate**: ``eta_i = sum |tau_i|^2 / sum_j sum |tau_j|^2`` over the tensor, of the
  selected vectors;
* **Erase**: the elected sign of a position is that of ``sum_i tau_i`` (``+`` for 0); only the
  ``tau_i`` of that sign count; ``soup = base + sum_i eta_i m_i tau_i / sum_i eta_i m_i`` (0
  where nothing agrees).

Where the paper's formula is 0/0 (every selected task vector zero) the weights are equal, as
mergekit's code has them; elsewhere the paper's formula is followed: mergekit also takes equal
weights whenever ``sum_j mean(tau_j^2) < 1e-6`` (an absolute bound real fine-tunes fall under)
and divides by ``max(sum_i eta_i m_i, 1e-6)``; hub-soup does neither.

Streamed at flat memory: one read counts the non-zero variances, the exact k-th largest is
found by the radix selection TIES uses (four reads over float64 bits at most, two as a rule, see
:mod:`~hub_soup.merging.methods.sparsify`; the engine skips the rest), one more read sums the squares; all in float64,
the variance computed the same way in every read and in the kernel.

The variance is ``(n sum_i tau_i^2 - (sum_i tau_i)^2) / n^2``, not the mean of the squared deviations
from the mean: for bf16 and fp16 fine-tunes every term of it is exact in float64 (task vectors are
differences of two such numbers, a few bits wide), so it is the exact variance rounded once, and
positions whose variances are equal (a permutation or a shift of the same task vectors: frequent
among bf16 values) tie, as TIES's equal magnitudes do: all those tied with the k-th are kept. The
two-pass form rounds the mean and ranks such positions by rounding noise, each implementation its
own way (tests/mergekit_reference.py's ``sce_select`` computes it as here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters
from hub_soup.merging.methods.arithmetic import sum_
from hub_soup.merging.methods.sparsify import DROP, MagnitudeThresholds, delta_, radix_passes

if TYPE_CHECKING:
    import torch


class SceParameters(NoParameters):
    """``parameters`` of ``sce`` (mergekit's names and defaults)."""

    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of the positions (of non-zero variance "
                               "across the fine-tunes) kept, those of largest variance")
    int8_mask: bool = Field(False, description="mergekit's memory saving for its masks; accepted so configs port, "
                            "and without effect")


@dataclass
class _SceStatistics:
    """One tensor's statistics, pass by pass: the non-zero variances, their threshold, the squared norms."""

    tensor: MergedTensor
    passes: int
    done: int = 0
    nonzero: int = 0
    thresholds: MagnitudeThresholds | None = None
    below: float | str | None = None
    squares: list[float] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)


class Sce(MergeMethod):
    """SCE: variance selection, squared-norm weights, sign election."""

    name = "sce"
    Parameters = SceParameters
    needs_base = True
    min_ingredients = 1
    float64_kernel = True
    title = "SCE (Select, Calculate, Erase)"
    paper = "[Wan et al., 2024, FuseChat: Knowledge Fusion of Chat Models](https://arxiv.org/abs/2408.07990)"
    summary = (
        "per tensor, the task vectors (the fine-tunes' differences from the base model) kept the select_topk "
        "fraction of positions of largest variance across them; each was weighted by its share of their squared "
        "norms (the paper's formula, without mergekit's absolute 1e-6 guards), each element's sign was elected by "
        "their sum, and the agreeing entries' weighted mean was added to the base model."
    )

    @property
    def _selects(self) -> bool:
        return self.parameters.select_topk < 1  # type: ignore[attr-defined]

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """Selecting: count the non-zero variances, the threshold's radix digits, the squares; else the squares."""
        return 2 + radix_passes(dtype) if self._selects else 1

    def start_statistics(self, tensor: MergedTensor) -> _SceStatistics:
        return _SceStatistics(tensor, self.statistics_passes(tensor.dtype))

    def observe(self, statistics: _SceStatistics, parts: Sequence[torch.Tensor], base: torch.Tensor | None
                ) -> _SceStatistics:
        import torch

        assert base is not None
        (scratch,) = self.workspace("observe", base, dtype=statistics.tensor.dtype)  # not one per chunk: see Gram
        taus, variance = self._selected(parts, base, scratch, statistics)
        if statistics.done == statistics.passes - 1:  # the squares, of the selected vectors
            if not statistics.squares:
                statistics.squares = [0.0] * len(parts)
            for i, tau in enumerate(taus):
                statistics.squares[i] += float(torch.dot(tau, tau))
        elif statistics.done == 0:
            statistics.nonzero += int(torch.count_nonzero(variance))
        else:
            assert statistics.thresholds is not None
            statistics.thresholds.observe_values(variance)
        return statistics

    def finish_statistics(self, statistics: _SceStatistics, tensor: MergedTensor) -> _SceStatistics:
        last = statistics.passes - 1
        if statistics.done == last:
            total = sum(statistics.squares)
            count = len(statistics.squares)
            statistics.eta = [s / total if total else 1 / count for s in statistics.squares]
        elif statistics.done == 0:
            k = int(statistics.nonzero * self.parameters.select_topk)  # type: ignore[attr-defined]
            statistics.thresholds = MagnitudeThresholds((), tensor, ranks=[k])
        else:
            assert statistics.thresholds is not None
            statistics.thresholds.finish_pass()
            if statistics.thresholds.done and statistics.done < last:  # found: the next pass is the squares'
                statistics.below = statistics.thresholds.below[0]
                statistics.done = last - 1
        statistics.done += 1
        return statistics

    def passes_left(self, statistics: _SceStatistics) -> int:
        """The threshold's radix passes left, if any, then the squares' (none after it): a threshold found before
        its last digit skips the rest (:meth:`finish_statistics` makes the next pass the squares')."""
        return max(statistics.passes - statistics.done, 0)

    def _selected(self, parts: Sequence[torch.Tensor], base: torch.Tensor, scratch: torch.Tensor,
                  statistics: _SceStatistics) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each ingredient's task vector (a workspace), zeroed outside the selection once its threshold is
        known (the last statistics pass and the kernel), and the variance across them (a workspace; unset
        when not selecting). ``scratch`` is overwritten."""
        import torch

        taus = self.workspace("taus", scratch, len(parts))
        total, variance = self.workspace("variance", scratch, 2)
        if base.dtype != scratch.dtype:  # upcast once, not once per ingredient (exact either way)
            (wide,) = self.workspace("base", scratch)
            base = wide.copy_(base)
        for tau, part in zip(taus, parts):
            delta_(tau, part, base)
        if not self._selects:
            return taus, variance
        count = len(taus)
        for i, tau in enumerate(taus):  # (n sum tau^2 - (sum tau)^2) / n^2: see the module docstring
            if i:
                variance.addcmul_(tau, tau)
            else:
                torch.mul(tau, tau, out=variance)
        sum_(total, taus)
        variance.mul_(count).addcmul_(total, total, value=-1).clamp_(min=0).div_(count * count)
        if statistics.done >= statistics.passes - 1:  # the threshold is known: keep variance > below
            below = statistics.below
            if below is DROP:
                for tau in taus:
                    tau.zero_()
            elif isinstance(below, float):
                torch.sub(variance, self.scalars([below], scratch)[0], out=scratch).clamp_(min=0).sign_()
                for tau in taus:
                    tau.mul_(scratch)
        return taus, variance

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """``base + sum_i eta_i m_i tau_i / sum_i eta_i m_i``, ``m_i`` 1 where ``tau_i`` has the elected sign:
        ``sign(max(tau e, 0))`` with ``e`` the elected sign (float ops, no masks; every product by 0 or 1
        exact)."""
        assert base is not None
        taus, _ = self._selected(parts, base, scratch, statistics)
        elected, divisor = self.workspace("elected", acc, 2)
        sum_(elected, taus).ge_(0).mul_(2).sub_(1)
        for i, (tau, eta) in enumerate(zip(taus, self.scalars(statistics.eta, acc))):
            scratch.copy_(tau).mul_(elected).clamp_(min=0).sign_().mul_(eta)
            if i:
                acc.addcmul_(tau, scratch)
                divisor.add_(scratch)
            else:
                acc.copy_(tau).mul_(scratch)
                divisor.copy_(scratch)
        scratch.copy_(divisor).sign_().neg_().add_(1)  # where nothing agrees (divisor 0), divide by 1
        acc.div_(divisor.add_(scratch))
        acc.add_(base)
