"""``hub-soup verify``: is a published merge what its recipe makes, and does it beat its ingredients?

``flow.py`` finds the recipe a merge carries, rebuilds the merge streamed and compares it
(``compare.py``) with the published weights; ``report.py`` is the verdict and its evidence,
as the command prints it, as JSON and in a pull request on the merge's card.
"""

from __future__ import annotations

from hub_soup.verification.flow import verify
from hub_soup.verification.report import EXIT_DIFFERS, TensorDifference, VerifyReport

__all__ = ["EXIT_DIFFERS", "TensorDifference", "VerifyReport", "verify"]
