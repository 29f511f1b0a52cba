"""Scoring: every ingredient, the base of a method (or of adapters) that has one, and the soup (greedy or
not), with optional BN recalibration, through the scorers the soup's kind gives.

One model is built, from the soup's reference config (a soup whose slices stack layers has one of its own,
built from its config as written once the ingredients are scored; ingredients whose vocabularies differ are
each scored in a model of their own, with their own tokenizer, and every candidate in the soup's, from its
config and tokenizer as written), in the eval dtype
(:func:`~hub_soup.eval.evaluate.eval_dtype`) on the device, and every model scored (on the
test split too) is streamed into that one instance: ingredients (and the base) from their
files, candidate soups from the streamed engine (in the dtypes written), so what is scored,
and then written, is what the streamed merge writes, and memory stays near one model. Greedy
chooses the ingredients; the recipe's method (Model Stock, with its base) combines each
candidate set.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hub_soup.eval.evaluate import Evaluator, eval_dtype
from hub_soup.eval.greedy import Evaluators, GreedyReport, OwnEvaluators, greedy_soup, score_soup
from hub_soup.io.read import Checkpoint
from hub_soup.merging.engine import Weights
from hub_soup.merging.plan import BASE
from hub_soup.recipe import Recipe
from hub_soup.report import ModelScore, method_title
from hub_soup.soups import Soup, SoupKind


def score(
    recipe: Recipe, kind: SoupKind[Any], soup: Soup, trust_remote_code: bool, stack: ExitStack,
    merged: Weights | None = None,
) -> GreedyReport:
    """The report of scoring the soup's candidates (see the module docstring).

    The evaluators (the model, and its offload folder) go when ``stack`` closes: after the soup is
    written, since the report's soup may be read back from the model that holds it. ``merged``: the
    weights scored as the soup instead of the recipe's (a published merge, which ``verify`` scores
    beside the ingredients its recipe names); not with greedy, which makes its own.
    """
    spec = recipe.eval
    assert spec is not None
    dtype = eval_dtype(spec.dtype, soup.metas, soup.device)
    options: dict[str, Any] = {
        "device": soup.device, "trust_remote_code": trust_remote_code, "backend": soup.backend, "dtype": dtype,
    }

    def evaluators(reference: Checkpoint, files: Mapping[str, str | Path] | None = None) -> Evaluators:
        """The evaluators of the model ``reference`` (or ``files``) describes: the held-out split's, and the test
        split's, which scores in the same model instance (one model in memory for both splits)."""
        evaluator = Evaluator(spec, reference, files=files, **options)
        test = Evaluator(spec, reference, split=spec.test_split, model_of=evaluator, files=files, **options) \
            if spec.test_split else None
        return evaluator, test

    def entered(pair: Evaluators) -> Evaluators:
        for evaluator in pair:
            if evaluator is not None:
                stack.enter_context(evaluator)
        return pair

    labels = [c.label for c in soup.checkpoints]
    scorers = kind.scorers(soup)
    own: OwnEvaluators | None = None
    soup_evaluators = None
    if scorers.own_models:  # each ingredient (and the base) in its own model, made when it is scored
        models = {**dict(enumerate(soup.checkpoints)), **({BASE: soup.base} if soup.base is not None else {})}
        own = lambda index: evaluators(models[index])
        evaluator, test_evaluator = entered(evaluators(soup.reference, scorers.soup_files))
    else:
        evaluator, test_evaluator = entered(evaluators(soup.reference))
        if scorers.soup_files is not None:  # stacked layers: the soup is scored as written, in a model of its own
            soup_evaluators = entered(evaluators(soup.reference, scorers.soup_files))
    judged: dict[str, Any] = {
        "recalibrate_bn_batches": recipe.recalibrate_bn,
        "test_evaluator": test_evaluator,
        "ensemble": recipe.ensemble_reference,
        "base": scorers.base,
        "own": own,
    }
    if recipe.greedy:
        return greedy_soup(
            labels, scorers.load, evaluator, soup_of=scorers.soup_of, method=method_title(recipe),
            alone_is_soup=scorers.alone_is_soup, **judged,
        )
    soup_weights = merged if merged is not None else scorers.soup_of(range(len(labels)))
    return score_soup(labels, scorers.load, soup_weights, evaluator, method=recipe.method,
                      soup_evaluators=soup_evaluators, **judged)


def scores_of(report: GreedyReport) -> list[ModelScore]:
    """The soup's, each ingredient's and the base's scores, held-out split first, then the test split."""
    base = report.base_name or ""  # a base's scores exist only with its name
    scores = [ModelScore("soup", report.soup_score)]
    scores += [ModelScore(label, s) for label, s in zip(report.labels, report.ingredient_scores)]
    scores += [ModelScore(base, report.base_score)] if report.base_score is not None else []
    # like with like: the soup's BN statistics were recalibrated
    saved = [*zip(report.labels, report.ingredient_scores_as_saved or []), (base, report.base_score_as_saved)]
    scores += [ModelScore(f"{label} (BN statistics as saved)", s) for label, s in saved if s is not None]
    scores += [ModelScore(name, s) for name, s in (report.test_scores or {}).items()]
    scores += [ModelScore(base, report.base_test_score)] if report.base_test_score is not None else []
    return scores
