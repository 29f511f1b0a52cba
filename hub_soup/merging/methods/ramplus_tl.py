"""``ramplus_tl``: RAM+ (tensor-local), as mergekit 0.1.5's code defines it: :mod:`~hub_soup.merging.methods.ram`
with each fine-tune's unique changes scaled up by how much it otherwise shares.

Per tensor and ingredient ``i`` (one statistics pass, counting in the kernel's own float64
arithmetic): ``shared_i`` the elements it contributes to together with another, ``unique_i``
those only it changed; ``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0,
alpha)`` (defaults ``r`` 0.1, ``alpha`` 0.2, ``epsilon`` 1e-5). Per element, a change only
``i`` made is multiplied by ``lambda_i``; changes several made are averaged, as in ``ram``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergedTensor
from hub_soup.merging.methods.ram import Ram, RamParameters
from hub_soup.native import elementwise
from hub_soup.threads import in_blocks

if TYPE_CHECKING:
    import torch

# Elements counted at a time: the float64 task vectors of a block of a few fine-tunes stay in the cache.
BLOCK = 1 << 17


class RamPlusParameters(RamParameters):
    """``parameters`` of ``ramplus_tl`` (mergekit's names and defaults)."""

    r: float = Field(0.1, allow_inf_nan=False, description="how much unique changes are scaled up, at most r * alpha")
    alpha: float = Field(0.2, ge=0, allow_inf_nan=False, description="the bound of the shared-to-unique ratio")


class RamPlusTL(Ram):
    """RAM with each fine-tune's unique changes scaled by ``lambda_i``, from one counting pass per tensor."""

    name = "ramplus_tl"
    Parameters = RamPlusParameters
    compute_bound = True  # a dozen float64 operations an element, in the kernel and again in the counting pass
    title = "RAM+ (tensor-local)"
    summary = (
        "per element, the changes of the fine-tunes that moved it by more than epsilon from the base model were "
        "averaged over those fine-tunes; a change only one made was taken whole, times 1 + r * min(alpha, its "
        "shared-to-unique ratio in the tensor), and added to the base model."
    )

    def start_statistics(self, tensor: MergedTensor) -> list[list[float]] | None:
        return None  # made on the first chunk, which says how many ingredients there are

    def observe(self, statistics: list[list[float]] | None, parts: Sequence[torch.Tensor],
                base: torch.Tensor | None) -> list[list[float]]:
        """Add a chunk's ``[shared_i, unique_i]`` counts (the contributions as the kernel computes them), a
        cache-sized block at a time, the blocks split among the compute workers (whole counts: the same sums in
        any order). On whole chunks, float64 temporaries of several MiB each made the pass slower than the
        kernel."""
        assert base is not None
        counts = statistics or [[0.0, 0.0] for _ in parts]
        flat, origin = [part.reshape(-1) for part in parts], base.reshape(-1)
        epsilon = self.parameters.epsilon  # type: ignore[attr-defined]

        def count_block(begin: int, end: int) -> list[tuple[int, int]]:
            """Each ingredient's ``(shared, unique)`` count in elements ``begin`` to ``end``."""
            import torch

            compiled = elementwise.ram_counts([p[begin:end] for p in flat], origin[begin:end], epsilon)
            if compiled is not None:
                return compiled
            (scratch,) = self.workspace("observed", origin[begin:end], 1, torch.float64)
            taus, count = self.contributions_([p[begin:end] for p in flat], origin[begin:end], scratch)
            unique = count.eq(1)
            found = []
            for tau in taus:
                changed = tau.ne(0)  # contributing: |tau| > epsilon >= 0, so 0 exactly where i does not
                contributed = int(changed.sum())
                both = int(changed.logical_and_(unique).sum())
                found.append((contributed - both, both))
            return found

        for found in in_blocks(origin.numel(), BLOCK, count_block):
            for tally, (shared, unique_only) in zip(counts, found):
                tally[0] += shared
                tally[1] += unique_only
        return counts

    def finish_statistics(self, statistics: list[list[float]] | None, tensor: MergedTensor) -> list[float] | None:
        """Each ingredient's ``lambda_i`` (``None``: a tensor never observed, with no element to merge)."""
        if statistics is None:
            return None
        parameters = self.parameters
        epsilon, r, alpha = parameters.epsilon, parameters.r, parameters.alpha  # type: ignore[attr-defined]
        return [1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha) for shared, unique in statistics]

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """``unique * sum_i lambda_i tau_i + (1 - unique) * sum_i tau_i / max(count, 1)``, ``unique`` 1 where one
        ingredient contributes (its ``lambda_i tau_i`` is then the sum), else 0."""
        assert base is not None and statistics is not None
        import torch

        if elementwise.ram(acc, parts, base, self.parameters.epsilon, statistics):  # type: ignore[attr-defined]
            return
        taus, count = self.contributions_(parts, base, scratch)
        (scaled,) = self.workspace("scaled", scratch)
        for i, (tau, factor) in enumerate(zip(taus, self.scalars(statistics, scratch))):
            if i:
                acc.add_(tau)
                scaled.addcmul_(tau, factor)
            else:
                acc.copy_(tau)
                torch.mul(tau, factor, out=scaled)
        acc.div_(torch.clamp(count, min=1, out=scratch))
        unique = count.sub_(1).abs_().clamp_(max=1).neg_().add_(1)  # 1 where count == 1, else 0 (counts are whole)
        scaled.mul_(unique)
        acc.mul_(unique.neg_().add_(1)).add_(scaled)  # each term times 1 or 0: exact
        acc.add_(base)
