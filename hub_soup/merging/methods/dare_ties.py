"""``dare_ties``: DARE's random dropping (Yu et al., 2024) with TIES's sign election.

As ``dare_linear`` (see :mod:`~hub_soup.merging.methods.dare_linear`), then each
element's sign is elected by the weighted sum of the trimmed vectors and only the
entries that agree are summed (divided by the sum of their weights with ``normalize``,
off by default as in mergekit), scaled by ``lambda`` and added to the base model.
"""

from __future__ import annotations

from hub_soup.merging.methods.generalized import DARE_DROPPED, DARE_PAPER, GeneralizedTaskArithmetic, RandomParameters


class DareTies(GeneralizedTaskArithmetic):
    """DARE with TIES's sign election."""

    name = "dare_ties"
    Parameters = RandomParameters
    sparsification = "random"
    consensus = True
    title = "DARE with TIES sign election"
    paper = DARE_PAPER
    summary = (
        DARE_DROPPED + "each element's sign was elected by the weighted sum, the agreeing entries were "
        "summed{divided}, scaled by lambda and added to the base model."
    )
    divisor = "the sum of their weights"
