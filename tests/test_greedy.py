"""Greedy soups, BatchNorm recalibration and plain-soup reports on real digits fine-tunes.

The models come from the shared digits kit (see ``tests/test_evaluate.py``): four fine-tunes
of one pretrained timm ``test_resnet`` and two trainings from independent random inits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.greedy import GreedyReport, greedy_soup, score_soup
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import Checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import Weights, ingredient_weights, output_metas, soup_weights, stream_merge
from hub_soup.merging.methods.uniform import Uniform
from hub_soup.merging.plan import Layout, MergePlan, align
from hub_soup.merging.similarity import weight_similarity
from tests import checkpoints as ck
from tests.test_evaluate import DigitsKit, digits_kit, image_spec


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsKit:
    return digits_kit(tmp_path_factory)


class Soup:
    """Ingredients opened and aligned, with the loader, the soup maker and evaluators greedy_soup takes."""

    def __init__(self, kit: DigitsKit, checkpoints: list[Checkpoint]) -> None:
        self.checkpoints = checkpoints
        self.labels = [c.label for c in checkpoints]
        self.plan: MergePlan = align([Layout(c.label, c.metas, tuple(c.aliases)) for c in checkpoints])
        self.val = Evaluator(image_spec(kit.data), checkpoints[0])
        self.test = Evaluator(image_spec(kit.data), checkpoints[0], split="test")
        self.loads: list[int] = []
        self.soups: list[list[int]] = []

    def load(self, i: int) -> Weights:
        self.loads.append(i)
        return ingredient_weights(self.checkpoints[i], self.plan, i)

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Ingredient ``i`` in memory."""
        return {t.key: self.checkpoints[i].read(t.sources[i]) for t in self.plan.tensors}

    def soup_of(self, members: Sequence[int]) -> Weights:
        """The uniform soup of ``members`` through the engine, as the pipeline makes greedy's candidates."""
        self.soups.append(list(members))
        return soup_weights([self.checkpoints[i] for i in members], self.plan.select(members), Uniform())

    def streamed(self, members: Sequence[int], folder: Path) -> dict[str, torch.Tensor]:
        """The uniform soup of ``members`` streamed into a file and read back: what a recipe of them writes."""
        plan = self.plan.select(members)
        with SoupWriter(folder, output_metas(plan, None), 10**9) as writer:
            stream_merge([self.checkpoints[i] for i in members], plan, Uniform(), writer)
            writer.commit()
        return ck.load_soup(folder)


@pytest.fixture(scope="module")
def fine_tunes(digits: DigitsKit) -> Soup:
    return Soup(digits, digits.open(digits.ingredients))


@pytest.fixture(scope="module")
def independent(digits: DigitsKit) -> Soup:
    return Soup(digits, digits.open(digits.independent))


@pytest.fixture(scope="module")
def plain_greedy(fine_tunes: Soup) -> GreedyReport:
    fine_tunes.loads.clear()
    fine_tunes.soups.clear()
    report = greedy_soup(
        fine_tunes.labels,
        fine_tunes.load,
        fine_tunes.val,
        soup_of=fine_tunes.soup_of,
        test_evaluator=fine_tunes.test,
        ensemble=True,
    )
    print(report.table())
    return report


def test_greedy_soup_never_scores_below_its_best_ingredient(fine_tunes: Soup, plain_greedy: GreedyReport) -> None:
    report = plain_greedy
    best = max(report.ingredient_scores, key=lambda s: s.value)
    assert report.soup_score.at_least(best) and not report.comparison.soup_is_worse
    assert all(s.value > 0.85 for s in report.ingredient_scores)
    # steps: best first, then in descending order, each judged on the soup of the kept ones and itself
    assert [s.ingredient_score.value for s in report.steps] == sorted(
        (s.value for s in report.ingredient_scores), reverse=True
    )
    assert report.steps[0].kept and report.steps[0].soup_score == report.steps[0].ingredient_score
    assert report.kept == [any(s.kept and s.index == i for s in report.steps) for i in range(4)]
    current = report.steps[0].soup_score
    for step in report.steps[1:]:
        assert step.kept == step.soup_score.at_least(current)
        current = step.soup_score if step.kept else current
    assert report.soup_score == current
    # every ingredient loaded once, to score it; each candidate soup made from the files, in recipe order
    assert sorted(fine_tunes.loads) == [0, 1, 2, 3]
    kept: list[int] = []
    for step, members in zip(report.steps, fine_tunes.soups, strict=True):
        assert members == sorted([*kept, step.index])
        kept = members if step.kept else kept


def test_greedy_soup_is_the_streamed_soup_of_the_kept_ingredients(
    fine_tunes: Soup, plain_greedy: GreedyReport, tmp_path: Path
) -> None:
    report = plain_greedy
    kept = [i for i, k in enumerate(report.kept) if k]
    streamed = fine_tunes.streamed(kept, tmp_path / "soup")
    soup = report.soup.state_dict()
    assert list(soup) == [t.key for t in fine_tunes.plan.tensors]  # canonical key order
    assert soup.keys() == streamed.keys()
    for key, tensor in soup.items():
        ck.assert_bit_equal(tensor, streamed[key], key)  # fp16 in, fp16 out; copied tensors from the first kept
    assert fine_tunes.val.score_state_dict(soup) == report.soup_score  # the soup is what was scored
    # every candidate greedy judged is a streamed soup too: the second one has two members, kept or not
    pair = sorted([report.steps[0].index, report.steps[1].index])
    candidate, streamed_pair = fine_tunes.soup_of(pair).state_dict(), fine_tunes.streamed(pair, tmp_path / "pair")
    for key, tensor in candidate.items():
        ck.assert_bit_equal(tensor, streamed_pair[key], key)
    assert fine_tunes.val.score_state_dict(candidate) == report.steps[1].soup_score  # what greedy judged


def test_greedy_reports_test_split_and_ensemble(fine_tunes: Soup, plain_greedy: GreedyReport) -> None:
    report = plain_greedy
    assert report.test_scores is not None
    assert set(report.test_scores) == {*fine_tunes.labels, "soup", "ensemble"}
    assert all(s.split == "test" and s.examples == 360 for s in report.test_scores.values())
    assert report.test_scores["soup"] == fine_tunes.test.score_weights(report.soup)
    kept = [fine_tunes.state(i) for i, k in enumerate(report.kept) if k]
    assert report.ensemble_score == fine_tunes.val.ensemble_score(kept)
    table = report.table()
    for label in fine_tunes.labels:
        assert label in table
    assert "yes (start)" in table and "test split test (360 examples; nothing was chosen on it)" in table
    assert f"soup of {sum(report.kept)} of 4 ingredients: {report.soup_score.formatted()}" in table


def test_uniform_bn_soup_improves_after_recalibration(fine_tunes: Soup) -> None:
    report = score_soup(
        fine_tunes.labels,
        fine_tunes.load,
        fine_tunes.soup_of([0, 1, 2, 3]),
        fine_tunes.val,
        recalibrate_bn_batches=4,
        test_evaluator=fine_tunes.test,
    )
    print(report.table())
    before, after = report.soup_score_before_bn, report.soup_score_after_bn
    assert before is not None and after is not None
    # Averaged running statistics describe no network that exists; recomputing them must not lose accuracy.
    # How much it gains depends on the trained kit (a few points with one torch release, one image with
    # another), so the gain's size is the quickstart's to show, not this test's.
    assert after.value >= before.value
    uniform = fine_tunes.soup_of([0, 1, 2, 3]).state_dict()
    soup = report.soup.state_dict()
    assert not torch.equal(soup["conv1.1.running_var"], uniform["conv1.1.running_var"])
    assert report.bn_recalibrated and report.soup_score == after
    assert fine_tunes.val.score_state_dict(soup) == after  # shipped with the recalibrated fp16 statistics
    assert soup["conv1.1.running_mean"].dtype == torch.float16
    assert "BN recalibration" in report.table() and report.steps == [] and report.kept == [True] * 4

    # like with like: each ingredient was judged as the soup was, recalibrated where that did not lower it
    batches = fine_tunes.val.unlabelled_batches(4)
    saved = report.ingredient_scores_as_saved or [None] * 4
    for i, score in enumerate(report.ingredient_scores):
        as_saved = fine_tunes.val.score_state_dict(fine_tunes.state(i))
        recalibrated = fine_tunes.val.recalibrated(fine_tunes.state(i), batches)
        assert recalibrated is not None
        with_recalibration = fine_tunes.val.score_state_dict(recalibrated)
        uses_recalibration = with_recalibration.at_least(as_saved)
        assert score == (with_recalibration if uses_recalibration else as_saved)
        assert saved[i] == (as_saved if uses_recalibration else None)
    best = report.comparison
    assert best.best == max(report.ingredient_scores, key=lambda s: s.value)
    if best.best_as_saved is not None:  # the verdict names both, so a gain recalibration explains shows as such
        assert f"{best.best_as_saved.formatted()} as saved" in best.message()
        assert "with recalibrated BatchNorm statistics" in best.message()
    assert ("as saved" in report.table()) == (report.ingredient_scores_as_saved is not None)


def test_greedy_judges_every_candidate_with_recalibrated_bn(fine_tunes: Soup, plain_greedy: GreedyReport) -> None:
    report = greedy_soup(
        fine_tunes.labels,
        fine_tunes.load,
        fine_tunes.val,
        soup_of=fine_tunes.soup_of,
        recalibrate_bn_batches=4,
    )
    print(report.table())
    for step in report.steps:
        before, after = step.soup_score_before_bn, step.soup_score_after_bn
        assert before is not None and after is not None
        assert step.soup_score == (after if after.at_least(before) else before)
    assert report.soup_score.at_least(plain_greedy.steps[0].ingredient_score)  # never below the best ingredient
    assert report.soup_score_before_bn is not None
    assert fine_tunes.val.score_weights(report.soup) == report.soup_score
    assert "(avg BN)" in report.table()


def test_independent_inits_collapse_and_are_flagged(independent: Soup) -> None:
    report = score_soup(
        independent.labels,
        independent.load,
        independent.soup_of([0, 1]),
        independent.val,
        recalibrate_bn_batches=4,
    )
    print(report.table())
    assert all(s.value > 0.85 for s in report.ingredient_scores)
    assert report.soup_score_before_bn is not None and report.soup_score_before_bn.value < 0.3  # chance is 0.1
    assert report.comparison.soup_is_worse
    assert "is worse than its best ingredient" in report.table() and "hub-soup diagnose" in report.table()
    assert weight_similarity(independent.checkpoints, independent.plan).independent_pairs() == [(0, 1)]


def test_fine_tunes_are_not_flagged_as_independent(fine_tunes: Soup) -> None:
    similarity = weight_similarity(fine_tunes.checkpoints, fine_tunes.plan)
    assert similarity.independent_pairs() == []


def test_greedy_follows_a_lower_is_better_metric(digits: DigitsKit, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A custom metric where lower is better (distance of the head to ingredient 2's): greedy must start there."""
    module = tmp_path_factory.mktemp("metric") / "head_distance.py"
    soup = Soup(digits, digits.open(digits.ingredients))
    torch.save(soup.state(2)["fc.weight"].float(), module.with_suffix(".pt"))
    module.write_text(
        "import torch\n"
        f"TARGET = torch.load({str(module.with_suffix('.pt'))!r})\n"
        "def score(model):\n"
        "    return float((model.fc.weight - TARGET).norm())\n"
    )
    evaluator = Evaluator(
        EvalSpec(task="custom", function=f"{module}:score", higher_is_better=False), soup.checkpoints[0],
        trust_remote_code=True,
    )
    report = greedy_soup(soup.labels, soup.load, evaluator, soup_of=soup.soup_of)
    assert report.steps[0].index == 2 and report.steps[0].ingredient_score.value == 0.0
    assert report.kept == [False, False, True, False] and report.soup_score.value == 0.0
    assert "lower is better" in report.table()
