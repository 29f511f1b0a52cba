"""``ties``: TIES-Merging (Yadav et al., 2023): trim each task vector, elect signs, merge the agreeing entries.

Per tensor, each fine-tune's task vector keeps its ``density`` fraction of largest
magnitudes (the exact threshold, found in two streamed passes: see
:mod:`~hub_soup.merging.methods.sparsify`); each element's sign is elected by the
weighted sum of the trimmed vectors; the entries that agree are summed and, with
``normalize`` (on by default, as in mergekit), divided by the sum of their weights;
``lambda`` scales the result, which is added to the base model. See
:mod:`~hub_soup.merging.methods.generalized` for the kernel.
"""

from __future__ import annotations

from pydantic import Field

from hub_soup.merging.methods.generalized import GeneralizedTaskArithmetic, MagnitudeParameters


class TiesParameters(MagnitudeParameters):
    """``parameters`` of ``method: ties`` (mergekit's names and defaults)."""

    normalize: bool = Field(True, description="divide the agreeing entries' sum by the sum of their weights")


class Ties(GeneralizedTaskArithmetic):
    """TIES: magnitude trimming, sign election by the weighted sum, the agreeing entries merged."""

    name = "ties"
    Parameters = TiesParameters
    sparsification = "magnitude"
    consensus = True
    title = "TIES"
    paper = "[Yadav et al., 2023, TIES-Merging: Resolving Interference When Merging Models](https://arxiv.org/abs/2306.01708)"
    summary = (
        "per tensor, each task vector (a fine-tune's difference from the base model) kept its density fraction of "
        "largest magnitudes; each element's sign was elected by the weighted sum of the trimmed vectors, the entries "
        "that agree were summed{divided}, scaled by lambda and added to the base model."
    )
    divisor = "the sum of their weights"
