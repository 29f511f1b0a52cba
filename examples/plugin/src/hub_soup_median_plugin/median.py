"""``median``: the element-wise median of the ingredients.

For an odd number of ingredients, each element of the soup is the middle one of the
ingredients' values; for an even number, the mean of the two middle ones (numpy's
``median``). It is computed in float64 and rounded once to the soup's dtype. The median
ignores an ingredient that strays far from the others in one element, where the mean
would follow it part of the way.

Like hub-soup's own methods, this module imports no torch: ``hub-soup validate`` loads
a method to check a recipe's parameters, and stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hub_soup.merging.methods import MergeMethod

if TYPE_CHECKING:
    import torch


class Median(MergeMethod):
    """``median(p0, p1, ...)`` per element; the mean of the two middle values for an even count."""

    name = "median"
    title = "element-wise median (the hub-soup-median-plugin)"
    summary = (
        "each element of the soup is the median of the models' values (for an even count, the mean of the "
        "two middle ones), computed in float64 and rounded once."
    )
    float64_kernel = True  # acc is float64: the mean of two middle values is rounded once, to the output dtype

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        # One row per ingredient, sorted per element (column): exact in float64, whatever the stored dtypes.
        values = acc.new_empty((len(parts), acc.numel()))
        for row, part in zip(values, parts):
            row.copy_(part.reshape(-1))
        ordered = values.sort(dim=0).values
        middle = len(parts) // 2
        flat = acc.view(-1)
        flat.copy_(ordered[middle])
        if len(parts) % 2 == 0:
            flat.add_(ordered[middle - 1])
            flat.mul_(0.5)
