"""``breadcrumbs_ties``: Model Breadcrumbs' window of magnitudes (see
:mod:`~hub_soup.merging.methods.breadcrumbs`) with TIES's sign election (mergekit's combination).

Each element's sign is elected by the weighted sum of the trimmed task vectors, the
entries that agree are summed (divided by the sum of their weights with ``normalize``:
off by default, as in mergekit, where ``ties`` has it on), scaled by ``lambda`` and added
to the base model.
"""

from __future__ import annotations

from hub_soup.merging.methods.breadcrumbs import BREADCRUMBS_TRIMMED, Breadcrumbs


class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs with TIES's sign election."""

    name = "breadcrumbs_ties"
    consensus = True
    title = "Model Breadcrumbs with TIES sign election"
    summary = (
        BREADCRUMBS_TRIMMED + "each element's sign was elected by the weighted sum, the agreeing entries were "
        "summed{divided}, scaled by lambda and added to the base model."
    )
    divisor = "the sum of their weights"
