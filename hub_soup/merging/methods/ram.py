"""``ram``: Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5's code defines it.

Per element, with task vectors ``tau_i = part_i - base``: ingredient ``i`` *contributes*
where ``|tau_i| > epsilon`` (default 1e-5, an absolute bound, as mergekit); the soup is
``base + sum_i tau_i [contributes] / max(count, 1)``, ``count`` the number of contributors:
a change only one fine-tune made is taken whole, changes several made are averaged, and
where none changed the element the base's value stays. Computed in float64 per block and
rounded once (mergekit computes in the tensors' dtype); on bfloat16 models in a compiled loop where one is
built (:mod:`hub_soup.native.elementwise`: the same steps, bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hub_soup.merging.methods import MergeMethod, NoParameters
from hub_soup.merging.methods.sparsify import delta_
from hub_soup.native import elementwise

if TYPE_CHECKING:
    import torch

RAM_PAPER = "[Reinforced Agent Merging, 2026](https://arxiv.org/abs/2601.13572)"


class RamParameters(NoParameters):
    """``parameters`` of ``ram`` (mergekit's names and defaults)."""

    epsilon: float = Field(1e-5, ge=0, allow_inf_nan=False,
                           description="a task vector's element counts as changed where its magnitude exceeds this")


class Ram(MergeMethod):
    """The mean of each element's changes over the fine-tunes that changed it."""

    name = "ram"
    Parameters = RamParameters
    needs_base = True
    min_ingredients = 1  # one fine-tune: its changes above epsilon, the rest the base's
    float64_kernel = True
    title = "RAM (Reinforced Agent Merging)"
    paper = RAM_PAPER
    summary = (
        "per element, the changes of the fine-tunes that moved it by more than epsilon from the base model were "
        "averaged over those fine-tunes (a change only one made was taken whole) and added to the base model."
    )

    def contributions_(self, parts: Sequence[torch.Tensor], base: torch.Tensor, scratch: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each ingredient's task vector zeroed where it does not contribute, and the contributors' count (a
        workspace): ``sign(max(|tau| - epsilon, 0))`` is 1 exactly where ``|tau| > epsilon``."""
        import torch

        taus = self.workspace("taus", scratch, len(parts))
        (count,) = self.workspace("count", scratch)
        if base.dtype != scratch.dtype:  # upcast once, not once per ingredient (exact either way)
            (wide,) = self.workspace("base", scratch)
            base = wide.copy_(base)
        epsilon = self.scalars([self.parameters.epsilon], scratch)[0]  # type: ignore[attr-defined]
        for i, (tau, part) in enumerate(zip(taus, parts)):
            delta_(tau, part, base)
            torch.abs(tau, out=scratch).sub_(epsilon).clamp_(min=0).sign_()
            tau.mul_(scratch)
            if i:
                count.add_(scratch)
            else:
                count.copy_(scratch)
        return taus, count

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        assert base is not None
        if elementwise.ram(acc, parts, base, self.parameters.epsilon):  # type: ignore[attr-defined]
            return
        taus, count = self.contributions_(parts, base, scratch)
        acc.copy_(taus[0])
        for tau in taus[1:]:
            acc.add_(tau)
        acc.div_(count.clamp_(min=1))
        acc.add_(base)
