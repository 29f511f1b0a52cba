"""``della_linear``: DELLA's MagPrune (see :mod:`~hub_soup.merging.methods.della`) without the sign election:
the weighted trimmed task vectors are summed (divided by the sum of the weights with ``normalize``, off by
default as in mergekit), scaled by ``lambda`` and added to the base model.
"""

from __future__ import annotations

from pydantic import Field

from hub_soup.merging.methods.della import DELLA_DROPPED, Della, DellaParameters


class DellaLinearParameters(DellaParameters):
    """``parameters`` of ``della_linear`` (mergekit's names and defaults: as ``della``'s, ``normalize`` false)."""

    normalize: bool = Field(False, description="divide by the sum of the weights")


class DellaLinear(Della):
    """DELLA with a plain weighted sum of the trimmed task vectors."""

    name = "della_linear"
    Parameters = DellaLinearParameters
    consensus = False
    title = "DELLA (linear)"
    summary = DELLA_DROPPED + "the weighted vectors were summed{divided}, scaled by lambda and added to the base model."
    divisor = "the sum of the weights"
