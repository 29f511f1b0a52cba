"""``dare_linear``: DARE (Yu et al., 2024): drop task-vector elements at random, rescale, sum.

Each fine-tune's task vector keeps each element with probability ``density`` (a hash
of the seed, tensor, ingredient and element decides: reproducible on any machine and
chunking, see :mod:`~hub_soup.merging.methods.sparsify`), the kept elements divided by
``density`` with ``rescale`` (the default); the weighted vectors are summed as in task
arithmetic, scaled by ``lambda`` and added to the base model.
"""

from __future__ import annotations

from hub_soup.merging.methods.generalized import DARE_DROPPED, DARE_PAPER, GeneralizedTaskArithmetic, RandomParameters


class DareLinear(GeneralizedTaskArithmetic):
    """DARE with a plain weighted sum of the trimmed task vectors."""

    name = "dare_linear"
    Parameters = RandomParameters
    sparsification = "random"
    consensus = False
    title = "DARE (linear)"
    paper = DARE_PAPER
    summary = DARE_DROPPED + "the weighted vectors were summed{divided}, scaled by lambda and added to the base model."
    divisor = "the sum of the weights"
