"""Greedy soups, and the same scored report for plain soups.

The greedy recipe of Wortsman et al. (2022, "Model soups"): score every
ingredient on held-out data, sort them best first, start the soup from the best
and add each next ingredient only if the soup's held-out score does not drop.
Uniform soups of fine-tunes that ended up in different basins can score below
their best ingredient; greedy never does on the held-out split, and its table
shows which ingredient would have hurt and by how much.

Every model is streamed into the evaluator's one model instance, chunk by chunk
(:class:`~hub_soup.merging.engine.Weights`): an ingredient from its files, each
candidate soup (the kept ingredients plus the next one, in recipe order) from the
streamed engine, exactly as the soup of those ingredients alone would be written
(:func:`hub_soup.merging.engine.soup_weights`), so the soup greedy scores is bit
for bit the soup a recipe of the kept ingredients streams, and memory stays near
one model whatever the number of ingredients. That re-reads the kept ingredients
at every step (from the page cache, for models that fit in it) instead of keeping
a float32 running sum (twice the model, on disk or on the device): exactness, at
the price of reading the kept ingredients again (benchmarks/RESULTS.md measures it).
The first step, the best ingredient alone, is that ingredient when the method
averages, so it is not merged or scored again; the chosen soup is written from the
model when the model still holds it exactly (the last candidate was kept, in the
dtypes written), else merged once more, into the writer, the same way. With BatchNorm recalibration every
candidate soup is recalibrated before it is judged, so an ingredient is kept or
dropped on the soup it would really make (averaged running statistics are not the
statistics of the averaged network). The recalibrated statistics are kept only
where they do not lower the held-out score: like the greedy choice itself, it is
a choice made on held-out data, so the soup never scores below its start.

Methods that merge the ingredients into a base model (task arithmetic, Model Stock)
get the base scored beside them, judged the way an ingredient is: a soup below its
base lost what fine-tuning gained. That is reported and warned about; whether to
publish is still decided against the best ingredient, as for every soup.

Ingredients whose vocabularies differ are each scored in a model of their own (their
config, their tokenizer: the eval texts tokenized by each), and every candidate in the
soup's (its chosen vocabulary, its tokenizer), one model at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from hub_soup.eval.bn import batchnorm_state, restore_batchnorm
from hub_soup.eval.evaluate import Comparison, Evaluator, Inputs, Score, compare_to_best
from hub_soup.merging.engine import Weights
from hub_soup.merging.plan import BASE

# Ingredient ``i``'s weights (canonical keys, its own dtypes).
Loader = Callable[[int], Weights]
# The soup of the ingredients at the given indices (in recipe order), as the engine streams it.
SoupMaker = Callable[[Sequence[int]], Weights]
# A model's evaluators: the held-out split's, and the test split's (None without one), scoring in its model.
Evaluators = tuple[Evaluator, Evaluator | None]
# The evaluators of the model of its own that ingredient ``i`` (the base: ``BASE``) is scored in, where the
# ingredients are not scored in the soup's model (vocabularies that differ): made when it is scored, closed right
# after (one model in memory).
OwnEvaluators = Callable[[int], Evaluators]


class Base(NamedTuple):
    """The model the ingredients were fine-tuned from, scored beside them (methods that use a base)."""

    label: str
    load: Callable[[], Weights]  # its weights under the plan's canonical keys; called once


@dataclass
class GreedyStep:
    """One ingredient tried: its own score and the score of the soup with it added."""

    index: int  # position in recipe order
    label: str
    ingredient_score: Score
    soup_score: Score  # what decided: with recalibrated BN stats where those did not lower it
    kept: bool
    soup_score_before_bn: Score | None = None  # averaged BN stats, when recalibration ran
    soup_score_after_bn: Score | None = None  # recalibrated BN stats, when recalibration ran


@dataclass
class GreedyReport:
    """Every ingredient's score, every greedy step, and the final soup (also for plain soups).

    ``soup`` streams the scored soup's tensors in the dtypes written (recalibrated BN
    statistics included when ``bn_recalibrated``): stream it into the writer as it is,
    since that is the soup that earned ``soup_score``.
    """

    ingredient_scores: list[Score]  # each like the soup's: recalibrated BN statistics where those did not lower it
    steps: list[GreedyStep]
    kept: list[bool]
    soup: Weights
    soup_score: Score
    soup_score_before_bn: Score | None
    test_scores: dict[str, Score] | None  # by ingredient label, plus "soup" (and "ensemble")
    labels: list[str]
    method: str = "greedy"
    bn_recalibrated: bool = False
    soup_score_after_bn: Score | None = None
    ensemble_score: Score | None = None
    # with BN recalibration: each ingredient's score as saved where the recalibrated one was used
    ingredient_scores_as_saved: list[Score | None] | None = None
    # methods with a base: the base, judged like an ingredient, on the held-out and the test split
    base_label: str | None = None
    base_score: Score | None = None
    base_score_as_saved: Score | None = None  # with BN recalibration, where the recalibrated score was used
    base_test_score: Score | None = None

    @property
    def comparison(self) -> Comparison:
        """The soup against its best ingredient on the held-out split, both recalibrated when the soup may be."""
        return compare_to_best(self.soup_score, self.labels, self.ingredient_scores, self.ingredient_scores_as_saved)

    @property
    def test_comparison(self) -> Comparison | None:
        """The same on the test split (unbiased: nothing was chosen on it), when one was given."""
        if self.test_scores is None:
            return None
        return compare_to_best(
            self.test_scores["soup"], self.labels, [self.test_scores[label] for label in self.labels]
        )

    @property
    def base_comparison(self) -> Comparison | None:
        """The soup against its base on the held-out split (methods with a base; else None)."""
        if self.base_score is None or self.base_label is None:
            return None
        return Comparison(self.soup_score, self.base_score, self.base_label, self.base_score_as_saved, "its base")

    @property
    def below_base_warning(self) -> str | None:
        """Why a soup that scores below its base deserves a look (None when it does not): the merge
        undid what fine-tuning gained. Warned about, not gated: the gate compares with the best ingredient."""
        comparison = self.base_comparison
        if comparison is None or not comparison.soup_is_worse:
            return None
        return (
            f"{comparison.message()}: the merge undid what fine-tuning gained; check that the ingredients were "
            "fine-tuned from this base, and try other parameters or greedy selection"
        )

    @property
    def base_name(self) -> str | None:
        """The base's row name in tables, the card and the step summary, apart from any ingredient's
        (None without a base)."""
        return f"base ({self.base_label})" if self.base_label is not None else None

    def table(self) -> str:
        """The whole story as text: ingredients, steps, the soup, its yardsticks and the verdict."""
        first = self.soup_score
        direction = "higher" if first.higher_is_better else "lower"
        lines = [
            f"{self.method} soup, scored on {first.dataset} split {first.split} "
            + f"({first.examples} examples; {first.metric}, {direction} is better)"
        ]
        width = max(len(label) for label in [*self.labels, "ingredient", *([self.base_name] if self.base_name else [])])
        lines += self._step_rows(width) if self.steps else self._ingredient_rows(width)
        kept = sum(self.kept)
        lines.append(f"soup of {kept} of {len(self.kept)} ingredients: {self.soup_score.formatted()}")
        if self.soup_score_before_bn is not None:
            what = "kept" if self.bn_recalibrated else "not kept (it lowered the score)"
            lines.append(
                f"  BN recalibration: {self.soup_score_before_bn.formatted()} with averaged statistics, "
                f"{_formatted(self.soup_score_after_bn)} recalibrated; {what}"
            )
        if self.ensemble_score is not None:
            lines.append(f"output ensemble of the same {kept} (yardstick): {self.ensemble_score.formatted()}")
        lines.append(self.comparison.message())
        if self.base_comparison is not None:
            lines.append(self.below_base_warning or self.base_comparison.message())
        test = self.test_comparison
        if self.test_scores is not None and test is not None:
            lines.append(f"test split {test.soup.split} ({test.soup.examples} examples; nothing was chosen on it):")
            for label in self.labels + ["soup", "ensemble"]:
                if label in self.test_scores:
                    lines.append(f"  {label:<{width}}  {self.test_scores[label].formatted():>9}")
            if self.base_name is not None and self.base_test_score is not None:
                lines.append(f"  {self.base_name:<{width}}  {self.base_test_score.formatted():>9}")
            lines.append(test.message())
            if self.base_label is not None and self.base_test_score is not None:
                lines.append(Comparison(test.soup, self.base_test_score, self.base_label, against="its base").message())
        if self.comparison.soup_is_worse:
            lines.append(
                "why? if the ensemble yardstick also falls short, the ingredients themselves are weak; if only the "
                "soup does, they sit in different basins"
                + (" (or their BatchNorm statistics no longer fit: try recalibrate_bn)" if self.soup_score_before_bn
                   is None else "")
                + "; `hub-soup diagnose` shows the curve between two of them; greedy keeps only those that help"
            )
        return "\n".join(lines)

    def _as_saved(self, index: int) -> str:
        """An ingredient's score as saved, for the column beside its (recalibrated) score."""
        saved = self.ingredient_scores_as_saved[index] if self.ingredient_scores_as_saved else None
        return _formatted(saved or self.ingredient_scores[index])

    def _step_rows(self, width: int) -> list[str]:
        recal = self.soup_score_before_bn is not None
        saved = self.ingredient_scores_as_saved is not None
        header = f"  step  {'ingredient':<{width}}" + (f"  {'as saved':>9}" if saved else "")
        header += f"  {'alone':>9}  {'soup':>9}"
        rows = [header + (f"  {'(avg BN)':>9}  {'(recal)':>9}" if recal else "") + "  kept"]
        for number, step in enumerate(self.steps, 1):
            row = f"  {number:>4}  {step.label:<{width}}" + (f"  {self._as_saved(step.index):>9}" if saved else "")
            row += f"  {step.ingredient_score.formatted():>9}  {step.soup_score.formatted():>9}"
            if recal:
                row += f"  {_formatted(step.soup_score_before_bn):>9}  {_formatted(step.soup_score_after_bn):>9}"
            rows.append(row + ("  yes (start)" if number == 1 else "  yes" if step.kept else "  no"))
        if self.base_name is not None and self.base_score is not None:
            row = f"  {'-':>4}  {self.base_name:<{width}}"
            row += f"  {_formatted(self.base_score_as_saved or self.base_score):>9}" if saved else ""
            row += f"  {self.base_score.formatted():>9}  {'-':>9}" + (f"  {'-':>9}  {'-':>9}" if recal else "")
            rows.append(row + "  (the base: not an ingredient)")
        return rows

    def _ingredient_rows(self, width: int) -> list[str]:
        saved = self.ingredient_scores_as_saved is not None
        rows = [f"  #  {'ingredient':<{width}}" + (f"  {'as saved':>9}  {'recal BN':>9}" if saved else f"  {'score':>9}")]
        for i, (label, score) in enumerate(zip(self.labels, self.ingredient_scores)):
            rows.append(f"  {i:>1}  {label:<{width}}" + (f"  {self._as_saved(i):>9}" if saved else "")
                        + f"  {score.formatted():>9}")
        if self.base_name is not None and self.base_score is not None:
            rows.append(f"  -  {self.base_name:<{width}}"
                        + (f"  {_formatted(self.base_score_as_saved or self.base_score):>9}" if saved else "")
                        + f"  {self.base_score.formatted():>9}")
        return rows


def greedy_soup(
    labels: Sequence[str],
    load: Loader,
    evaluator: Evaluator,
    *,
    soup_of: SoupMaker,
    recalibrate_bn_batches: int | None = None,
    test_evaluator: Evaluator | None = None,
    ensemble: bool = False,
    base: Base | None = None,
    method: str = "greedy",
    alone_is_soup: bool = False,
    own: OwnEvaluators | None = None,
) -> GreedyReport:
    """Make a greedy soup (see the module docstring).

    Args:
        labels: the ingredients' names, in recipe order.
        load: ``load(i)`` returns ingredient ``i``'s weights (canonical keys, original dtypes);
            streamed once per ingredient, to score it.
        evaluator: scores on the held-out split that selection uses.
        soup_of: ``soup_of(indices)`` gives the soup of the ingredients at ``indices`` (sorted,
            recipe order) as the engine streams it, in the dtypes it is written in, as a recipe of
            those ingredients alone would (uniform: tensors not averaged from the first of them).
        recalibrate_bn_batches: recalibrate BatchNorm on this many eval batches for every candidate.
        test_evaluator: scores ingredients and the final soup on a split nothing was chosen on.
        ensemble: also score the output ensemble of the kept ingredients (a yardstick).
        base: the base model of a method that merges into one (``soup_of`` then uses it), scored
            beside the ingredients, judged as they are; never a candidate.
        method: how the table names the soup (``greedy``, or ``greedy model_stock`` for another method).
        alone_is_soup: the soup of one ingredient is that ingredient bit for bit (an average of one, in its
            own dtypes): the first step, the best ingredient alone, takes the judgment the ingredient already
            had instead of being merged and scored again.
        own: each ingredient's (and the base's) evaluators, where they are scored in models of their own;
            ``evaluator`` and ``test_evaluator`` then score the candidates only, in the soup's model. None: all
            in ``evaluator``'s.
    """
    batches = evaluator.unlabelled_batches(recalibrate_bn_batches) if recalibrate_bn_batches else None
    pass_ = _IngredientPass(labels, load, evaluator, test_evaluator, ensemble, batches, base, own)
    order = sorted(range(len(labels)), key=lambda i: _rank(pass_.scores[i]))
    kept = [False] * len(labels)
    steps: list[GreedyStep] = []
    best: _Candidate | None = None
    for i in order:
        if best is None and alone_is_soup:
            candidate = pass_.judged[i]
        else:
            members = [j for j in range(len(labels)) if kept[j] or j == i]
            candidate = pass_.judge(soup_of(members))
        keep = best is None or candidate.score.at_least(best.score)
        steps.append(
            GreedyStep(i, labels[i], pass_.scores[i], candidate.score, keep, candidate.before_bn, candidate.after_bn)
        )
        if keep:
            kept[i], best = True, candidate
    assert best is not None
    return pass_.report(steps, kept, best, method)


def score_soup(
    labels: Sequence[str],
    load: Loader,
    soup: Weights,
    evaluator: Evaluator,
    *,
    method: str = "uniform",
    recalibrate_bn_batches: int | None = None,
    test_evaluator: Evaluator | None = None,
    ensemble: bool = False,
    base: Base | None = None,
    soup_evaluators: Evaluators | None = None,
    own: OwnEvaluators | None = None,
) -> GreedyReport:
    """Score every ingredient and a soup made without greedy selection, in the same report.

    Args:
        soup: the soup's weights (from :func:`hub_soup.merging.engine.soup_weights`).
        method: how the soup was made, for the table (``uniform``, ``weighted``, ``task_arithmetic``...).
        soup_evaluators: the soup's evaluator and test split's, where its model is not the ingredients'
            (slices that stack layers); the ingredients' model is let go of before the soup's is built.
        Other arguments as in :func:`greedy_soup`; with ``recalibrate_bn_batches`` the
        soup's BN statistics are recalibrated and kept if they do not lower its score.
    """
    batches = evaluator.unlabelled_batches(recalibrate_bn_batches) if recalibrate_bn_batches else None
    pass_ = _IngredientPass(labels, load, evaluator, test_evaluator, ensemble, batches, base, own)
    if soup_evaluators is not None:
        evaluator.close()  # one model in memory: the ingredients' are scored, their outputs kept
        pass_.evaluator, pass_.test_evaluator = soup_evaluators  # the same data: the same batches and targets
    return pass_.report([], [True] * len(labels), pass_.judge(soup), method)


@dataclass
class _Candidate:
    weights: Weights  # as judged: with the recalibrated BN statistics where those were kept
    score: Score
    before_bn: Score | None
    after_bn: Score | None
    recalibrated: bool


def _judge(weights: Weights, evaluator: Evaluator, batches: list[Inputs] | None) -> _Candidate:
    """Score a candidate soup; with ``batches``, also recalibrated, keeping whichever is not worse.

    The evaluator's model holds the candidate as judged afterwards (its BN statistics as kept)."""
    model = evaluator.model_from(weights)
    plain = evaluator.score(model)
    if batches is None:
        return _Candidate(weights, plain, None, None, False)
    as_streamed = batchnorm_state(model)
    recalibrated = evaluator.recalibrated_weights(weights, batches)
    if recalibrated is None:  # no BatchNorm: nothing to recalibrate
        return _Candidate(weights, plain, None, None, False)
    after = evaluator.score(model)
    if after.at_least(plain):
        return _Candidate(weights.overridden(recalibrated), after, plain, after, True)
    restore_batchnorm(model, as_streamed)
    return _Candidate(weights, plain, plain, after, False)


def _rank(score: Score) -> tuple[bool, float]:
    """Sort key, best first; NaN last; ties keep recipe order (``sorted`` is stable)."""
    if math.isnan(score.value):
        return (True, 0.0)
    return (False, -score.value if score.higher_is_better else score.value)


def _formatted(score: Score | None) -> str:
    return "-" if score is None else score.formatted()


class _IngredientPass:
    """Reads every ingredient (and the base) once: scores it (and keeps an ingredient's outputs for
    the ensemble, and its test score).

    With recalibration ``batches``, each model is judged as a soup is (recalibrated BN
    statistics kept where they do not lower its score): a soup that may recompute its
    statistics is compared with ingredients (and a base) that may too, not with them as saved.
    With ``own`` evaluators, each is scored in its own model, and the pass's evaluators score soups only.
    """

    def __init__(
        self,
        labels: Sequence[str],
        load: Loader,
        evaluator: Evaluator,
        test_evaluator: Evaluator | None,
        ensemble: bool,
        batches: list[Inputs] | None,
        base: Base | None = None,
        own: OwnEvaluators | None = None,
    ) -> None:
        self.labels = list(labels)
        self.own = own
        self.evaluator = evaluator
        self.test_evaluator = test_evaluator
        self.batches = batches
        self.scores: list[Score] = []
        self.as_saved: list[Score | None] | None = [] if batches is not None else None
        self.outputs: list[torch.Tensor] = []
        self.test_outputs: list[torch.Tensor] = []
        self.test_scores: dict[str, Score] = {}
        self.ensemble = ensemble
        self.judged: list[_Candidate] = []  # each ingredient as judged, what a soup of it alone would be
        self.held: _Candidate | None = None  # what the evaluator's model holds, as judged
        for i in range(len(labels)):
            with self._evaluators(i) as evaluators:
                judged, test = self._measure(load(i), ensemble, *evaluators)
            self.judged.append(judged)
            self.scores.append(judged.score)
            if self.as_saved is not None:
                self.as_saved.append(judged.before_bn if judged.recalibrated else None)
            if test is not None:
                self.test_scores[labels[i]] = test
        self.base = base
        self.base_scores = None
        if base is not None:
            with self._evaluators(BASE) as evaluators:
                judged, test = self._measure(base.load(), False, *evaluators)
            self.base_scores = (judged.score, judged.before_bn if judged.recalibrated else None, test)

    def judge(self, weights: Weights) -> _Candidate:
        """:func:`_judge`, noting that the evaluator's model now holds the candidate."""
        self.held = _judge(weights, self.evaluator, self.batches)
        return self.held

    @contextmanager
    def _evaluators(self, index: int) -> Iterator[Evaluators]:
        """The evaluators ingredient ``index`` (the base: ``BASE``) is scored with: its own, closed once it is
        scored, or the pass's."""
        if self.own is None:
            yield self.evaluator, self.test_evaluator
            return
        evaluator, test_evaluator = self.own(index)
        with evaluator, test_evaluator or nullcontext():
            yield evaluator, test_evaluator

    def _measure(
        self, weights: Weights, keep_outputs: bool, evaluator: Evaluator, test_evaluator: Evaluator | None,
    ) -> tuple[_Candidate, Score | None]:
        """A model as judged (recalibrated where that helps), and its test score; ``keep_outputs`` keeps its
        outputs for the ensemble.

        The model is streamed into the evaluator's instance once; the test split is scored on it there."""
        if self.batches is None:
            model = evaluator.model_from(weights)
            judged = _Candidate(weights, self._score(evaluator, model, self.outputs if keep_outputs else None),
                                None, None, False)
        else:
            judged = _judge(weights, evaluator, self.batches)
            model = evaluator.model
            if keep_outputs:
                self.outputs.append(evaluator.predict(model))
        test = None
        if test_evaluator is not None:
            test = self._score(test_evaluator, model, self.test_outputs if keep_outputs else None)
        self.held = judged if evaluator is self.evaluator else self.held  # what the pass's model holds
        return judged, test

    @staticmethod
    def _score(evaluator: Evaluator, model: nn.Module, outputs: list[torch.Tensor] | None) -> Score:
        """The score; with ``outputs``, from outputs predicted once and kept there (for the ensemble)."""
        if outputs is None:
            return evaluator.score(model)
        outputs.append(evaluator.predict(model))
        return evaluator.score_outputs(outputs[-1])

    def report(self, steps: list[GreedyStep], kept: list[bool], soup: _Candidate, method: str) -> GreedyReport:
        """The report of ``soup``. Where the evaluator's model holds it as judged (it was judged last), the test
        split scores it without streaming it in again, and the report's weights read it back from the model
        where that is exact (:meth:`~hub_soup.eval.evaluate.Evaluator.held`): the soup is written without
        being merged again."""
        ensemble_score = None
        test_scores = None
        members = [i for i, k in enumerate(kept) if k]
        if self.ensemble:
            ensemble_score = self.evaluator.ensemble_of_outputs([self.outputs[i] for i in members])
        if self.test_evaluator is not None:
            test_scores = dict(self.test_scores)
            if self.held is not soup:
                self.evaluator.model_from(soup.weights)
                self.held = soup
            test_scores["soup"] = self.test_evaluator.score(self.evaluator.model)
            if self.ensemble:
                test_scores["ensemble"] = self.test_evaluator.ensemble_of_outputs(
                    [self.test_outputs[i] for i in members]
                )
        base_score, base_as_saved, base_test = self.base_scores or (None, None, None)
        return GreedyReport(
            ingredient_scores=self.scores,
            steps=steps,
            kept=kept,
            soup=self.evaluator.held(soup.weights) if self.held is soup else soup.weights,
            soup_score=soup.score,
            soup_score_before_bn=soup.before_bn,
            test_scores=test_scores,
            labels=self.labels,
            method=method,
            bn_recalibrated=soup.recalibrated,
            soup_score_after_bn=soup.after_bn,
            ensemble_score=ensemble_score,
            ingredient_scores_as_saved=self.as_saved if self.as_saved and any(self.as_saved) else None,
            base_label=self.base.label if self.base is not None else None,
            base_score=base_score,
            base_score_as_saved=base_as_saved,
            base_test_score=base_test,
        )
