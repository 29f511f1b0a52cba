"""The gate and the push: a soup that looks collapsed is not published silently.
"""

from __future__ import annotations

from hub_soup.errors import IndependentIngredientsError, WorseSoupError
from hub_soup.hub.push import PushResult, push_soup
from hub_soup.pipeline.writing import independence_warning
from hub_soup.recipe import Recipe
from hub_soup.report import SoupResult


def gate(recipe: Recipe, result: SoupResult, has_batchnorm: bool) -> None:
    """Refuse to publish a soup that is worse than its best ingredient (with an eval) or, without
    one, whose ingredients look independent: both usually mean a collapsed soup. ``force`` pushes.

    A soup below its base (methods with one) is only warned about: a soup at least as good as
    its best ingredient is what the gate promises, and a fine-tune is better than its base on
    the task it was tuned for, so such a soup is below its best ingredient as well unless the
    eval measures something the fine-tunes gave up (a task negation forgets on purpose).
    ``has_batchnorm``: the soup has BatchNorm statistics, which ``recalibrate_bn`` may recompute.
    """
    assert recipe.push is not None
    if recipe.force:
        return
    kept = (
        f"the soup was written to {result.output}"
        if recipe.output.path is not None
        else "nothing was kept (pass -o DIR to keep the soup and look at it)"
    )
    report = result.report
    if report is not None and report.comparison.soup_is_worse:
        raise WorseSoupError(
            f"not pushing to {recipe.push.repo_id}: {report.comparison.message()}; {kept}",
            hint="try greedy: true (--greedy) to keep only ingredients that help"
            + (", or recalibrate_bn (--recalibrate-bn N) for BatchNorm networks" if has_batchnorm else "")
            + "; --force pushes it anyway",
        )
    independent = independence_warning(result.similarity)
    if report is None and independent is not None:
        raise IndependentIngredientsError(
            f"not pushing to {recipe.push.repo_id}: {independent}; {kept}",
            hint="score the soup with --eval-task/--eval-data (a soup that scores well is pushed), check the "
            "ingredients with `hub-soup inspect`, or pass --force to push it anyway (its card says so)",
        )


def push(recipe: Recipe, result: SoupResult, token: str | bool | None) -> PushResult:
    """Push the soup's folder in one commit, named after its method and kept ingredients."""
    assert recipe.push is not None and result.output is not None
    names = ", ".join(ref.label for ref, kept in zip(result.ingredients, result.kept) if kept)
    return push_soup(result.output, recipe.push, token, f"hub-soup: {result.method_title} soup of {names}")
