"""``arcee_fusion``: the other model's changes kept where they are important, by a threshold per tensor.

mergekit's own method (only mergekit's code defines it, so that code is the definition). With
``b`` the base and ``x`` the one other model, per tensor::

    importance = |x - b| * KL(softmax(x) || softmax(b))     (per row: the last axis; 1e-8 added to both)
    threshold  = median + 1.5 (Q3 - Q1)                     (of every element's importance)
    soup       = b + (x - b) [importance >= threshold]

Each quantile is the sorted importances' element at ``int(q (n - 1))``. A row's softmax and the
quantiles need the whole tensor, so the engine gives it whole (:attr:`MergeMethod.whole_tensor`);
it is computed in float64 and rounded once.

A deliberate difference: above 1,000,000 elements mergekit estimates the quantiles from a sample
drawn with replacement from torch's unseeded global generator, so its soup of a large tensor
differs from run to run; hub-soup sorts every element (the exact quantiles), so the soup is
reproducible and is the definition's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hub_soup.merging.methods import MergedTensor, MergeMethod

if TYPE_CHECKING:
    import torch

# mergekit's floor on both softmaxes, so that the KL divergence's logarithm stays finite.
FLOOR = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


class ArceeFusion(MergeMethod):
    """mergekit's ``arcee_fusion``: ``base + (x - base)`` where the change's importance reaches the threshold."""

    name = "arcee_fusion"
    title = "Arcee Fusion"
    paper = "[mergekit's arcee_fusion](https://github.com/arcee-ai/mergekit)"
    summary = (
        "per tensor, the fine-tune's changes were kept where their importance (|change| times the KL divergence "
        "of the row's softmaxes) reached median + 1.5 IQR of all importances, and dropped elsewhere (exact "
        "quantiles, where mergekit samples a million elements of a larger tensor)."
    )
    needs_base = True
    exact_ingredients = 1
    min_ingredients = 1
    float64_kernel = True
    whole_tensor = True

    def merge_tensor(self, parts: Sequence[torch.Tensor], base: torch.Tensor | None, tensor: MergedTensor
                     ) -> torch.Tensor:
        assert base is not None
        (other,) = parts
        x, b = other.to(tensor.dtype), base.to(tensor.dtype)
        change = x - b
        p = x.softmax(dim=-1).add_(FLOOR)
        q = b.softmax(dim=-1).add_(FLOOR)
        divergence = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
        importance = change.abs().mul_(divergence)
        ordered = importance.reshape(-1).sort().values
        last = ordered.numel() - 1
        q1, median, q3 = (ordered[int(q * last)] for q in QUANTILES)
        threshold = median + 1.5 * (q3 - q1)
        return change.mul_(importance >= threshold).add_(b)
