"""Eval tasks and backends as seams: a task a test defines, metrics that declare their direction,
and the evaluator running on the backend it is given (two real processes, gloo).

The models are the repo's digits example (``examples/digits``: four timm fine-tunes of one base
and their val/test image folders), so nothing is trained here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from huggingface_hub import ModelCard
from pydantic import Field
from sklearn.metrics import f1_score
from timm.data import ImageDataset, create_transform, resolve_data_config
from torch import nn

import hub_soup
from hub_soup.errors import EvalError, RecipeError
from hub_soup.eval import tasks
from hub_soup.eval.backends import Backend
from hub_soup.eval.data import Inputs, check_data, example_order
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.metrics import ACCURACY, Metric, get_metric, register_metric
from hub_soup.eval.spec import EvalSpec
from hub_soup.eval.tasks import Batch, EvalTask, get_task, register_task, task_names
from hub_soup.io.read import open_checkpoint
from hub_soup.recipe import Recipe, recipe_schema

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted((DIGITS / "ingredients").iterdir())
# Declared by the toy task, not registered: a test must not leave metrics behind.
F1 = Metric("f1", higher_is_better=True, percent=True, description="macro-averaged F1 over the classes")
ERRORS = Metric("errors", higher_is_better=False, description="misclassified examples")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The task registry as it is, restored after the test (tasks registered in it vanish)."""
    monkeypatch.setattr(tasks, "_TASKS", tasks._TASKS.copy())
    yield


@pytest.fixture
def digits_f1(registry: None) -> type[EvalTask]:
    """The toy task: one class, one decorator. Macro F1 (primary, higher is better) and an error count."""

    @register_task
    class DigitsF1(EvalTask):
        name = "digits-f1"
        primary = F1
        others = (ERRORS,)

        def batches(self) -> list[Batch]:
            transform = create_transform(**resolve_data_config(model=self.model()))
            dataset = ImageDataset(str(Path(self.spec.data) / self.split), input_img_mode="L", transform=transform)
            images, labels = zip(*(dataset[i] for i in example_order(len(dataset), self.spec.limit)))
            size = self.spec.batch_size
            return [
                Batch(torch.stack(images[i : i + size]), torch.tensor(labels[i : i + size]))
                for i in range(0, len(images), size)
            ]

        def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
            return model(inputs).softmax(-1)

        def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
            assert targets is not None
            predicted = outputs.argmax(-1)
            return {
                "f1": float(f1_score(targets.numpy(), predicted.numpy(), average="macro")),
                "errors": float((predicted != targets).sum()),
            }

    return DigitsF1


def _greedy_run(task: str, tmp_path: Path) -> hub_soup.SoupResult:
    recipe = Recipe.model_validate({
        "ingredients": [{"ref": str(p)} for p in INGREDIENTS],
        "greedy": True,
        "eval": {"task": task, "data": str(DIGITS / "data"), "split": "val", "batch_size": 128},
        "output": {"path": str(tmp_path / "soup")},
    })
    return hub_soup.run(recipe)


def _assert_greedy_followed(result: hub_soup.SoupResult, metric: Metric) -> None:
    """Greedy started from the best ingredient by ``metric``'s direction and kept exactly the
    candidates that did not make the soup worse in that direction."""
    report = result.report
    assert report is not None and report.soup_score.primary == metric
    better = max if metric.higher_is_better else min
    values = [s.value for s in report.ingredient_scores]
    assert len(set(values)) > 1  # otherwise the direction could not show
    assert report.steps[0].label == report.labels[values.index(better(values))]
    best = report.steps[0].soup_score.value
    for step in report.steps[1:]:
        assert step.kept == (better(step.soup_score.value, best) == step.soup_score.value)
        if step.kept:
            best = step.soup_score.value
    assert report.soup_score.value == best


def test_a_registered_task_decides_greedy_by_its_primary_metric(digits_f1: type[EvalTask], tmp_path: Path) -> None:
    assert "digits-f1" in task_names() and get_task("digits-f1") is digits_f1
    assert "digits-f1" in recipe_schema()["$defs"]["EvalSpec"]["properties"]["task"]["enum"]
    result = _greedy_run("digits-f1", tmp_path)
    # "f1" is not "accuracy": a direction guessed from the name would have started from the worst ingredient
    _assert_greedy_followed(result, F1)
    report = result.report
    assert report is not None and not report.comparison.soup_is_worse
    soup = report.soup_score
    assert [metric for metric, _ in soup.measurements()] == [F1, ERRORS] and soup.examples == 359
    assert soup.formatted().endswith("%") and "points" in soup.difference(report.ingredient_scores[0])
    card = ModelCard.load(tmp_path / "soup" / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("f1", round(soup.value, 6)), ("errors", soup.others[0][1])
    ]
    assert "| soup | val | f1 |" in card.text and "| soup | val | errors |" in card.text


def test_a_lower_is_better_primary_metric_decides_the_other_way(digits_f1: type[EvalTask], tmp_path: Path) -> None:
    @register_task
    class DigitsErrors(digits_f1):  # type: ignore[misc, valid-type]
        name = "digits-errors"
        primary = ERRORS
        others = (F1,)

    result = _greedy_run("digits-errors", tmp_path)
    _assert_greedy_followed(result, ERRORS)
    assert result.report is not None and "errors, lower is better" in result.report.table()


def test_the_data_of_a_task_of_ones_own_is_its_own_to_read(digits_f1: type[EvalTask], tmp_path: Path) -> None:
    """Before a run, only the data the built-in tasks open is checked: a task of one's own reads ``spec.data``
    as it likes (here, a file of a kind none of the built-in tasks reads)."""
    mine = tmp_path / "digits.npz"
    mine.write_bytes(b"")
    check_data(EvalSpec(task=digits_f1.name, data=str(mine)), tmp_path)
    with pytest.raises(EvalError, match="is a file, and not one of the kinds read as eval data"):
        check_data(EvalSpec(task="image-classification", data=str(mine)), tmp_path)


def test_the_task_registry_names_what_recipes_accept(registry: None) -> None:
    for name in ("image-classification", "text-classification", "causal-lm", "custom", "lm-eval"):
        assert get_task(name).name == name
    with pytest.raises(RecipeError, match="eval.task: unknown eval task 'nope'; known tasks: image-classification"):
        Recipe.from_refs(["a", "b"], eval={"task": "nope", "data": "d"})
    with pytest.raises(EvalError, match="no eval task named 'nope'"):
        get_task("nope")

    class Nameless(EvalTask):
        pass

    with pytest.raises(EvalError, match="has no name"):
        register_task(Nameless)
    with pytest.raises(EvalError, match="'custom' is already registered"):
        register_task(type("Custom2", (Nameless,), {"name": "custom"}))


def test_metrics_declare_direction_and_format() -> None:
    assert get_metric("accuracy") is ACCURACY and not get_metric("perplexity").higher_is_better
    assert ACCURACY.format(0.975) == "97.50%" and ACCURACY.format_delta(-0.0125) == "-1.25 points"
    assert ERRORS.format(12.0) == "12" and ERRORS.format_delta(-0.3125) == "-0.3125"
    assert register_metric("accuracy", higher_is_better=True, percent=True, description=ACCURACY.description) is not None
    with pytest.raises(EvalError, match="'accuracy' is already registered differently"):
        register_metric("accuracy", higher_is_better=False)
    with pytest.raises(EvalError, match="no metric named 'acc'; registered: accuracy"):
        get_metric("acc")


def test_a_task_must_measure_what_it_declares(digits_f1: type[EvalTask]) -> None:
    @register_task
    class Forgetful(digits_f1):  # type: ignore[misc, valid-type]
        name = "digits-forgetful"

        def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
            return {"f1": 1.0}

    checkpoint = open_checkpoint(INGREDIENTS[0])
    evaluator = Evaluator(EvalSpec(task="digits-forgetful", data=str(DIGITS / "data"), split="val", limit=8), checkpoint)
    with pytest.raises(EvalError, match="task digits-forgetful measured f1 but declares f1, errors"):
        evaluator.score_state_dict(checkpoint.state_dict())


class AveragedSpec(EvalSpec):
    """The toy task's own field: how F1 averages over the classes."""

    average: Literal["macro", "micro", "weighted"] = Field("macro", description="how F1 averages over the classes")


@pytest.fixture
def digits_averaged(digits_f1: type[EvalTask]) -> type[EvalTask]:
    """The toy task with a field of its own in the recipe's eval section, read when it measures."""

    @register_task
    class DigitsAveraged(digits_f1):  # type: ignore[misc, valid-type]
        name = "digits-averaged"
        Spec = AveragedSpec

        def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
            assert targets is not None
            predicted = outputs.argmax(-1)
            return {
                "f1": float(f1_score(targets.numpy(), predicted.numpy(), average=self.spec.average)),
                "errors": float((predicted != targets).sum()),
            }

    return DigitsAveraged


def test_a_task_of_ones_own_declares_fields_of_its_own(digits_averaged: type[EvalTask]) -> None:
    """Its Spec's fields are fields of the flat eval section for that task only, validated as a merge method's
    Parameters are, listed by the schema, and what the task reads when it scores."""
    section = {"task": "digits-averaged", "data": str(DIGITS / "data"), "split": "val", "limit": 64}
    recipe = Recipe.from_refs(["a", "b"], eval={**section, "average": "weighted"})
    assert isinstance(recipe.eval, AveragedSpec) and recipe.eval.average == "weighted"
    assert recipe.eval.model_fields_set == {*section, "average"}
    assert "average: weighted" in recipe.to_yaml()
    with pytest.raises(RecipeError, match="eval.average: Input should be 'macro', 'micro' or 'weighted'"):
        Recipe.from_refs(["a", "b"], eval={**section, "average": "binary"})
    with pytest.raises(RecipeError, match="eval: average: only task: digits-averaged takes it"):
        Recipe.from_refs(["a", "b"], eval={**section, "task": "image-classification", "average": "micro"})
    with pytest.raises(RecipeError, match="eval: average: task lm-eval does not take it"):
        Recipe.from_refs(["a", "b"], eval={"task": "lm-eval", "tasks": ["arc_easy"], "average": "micro"})
    schema = recipe_schema()["$defs"]["EvalSpec"]
    assert schema["properties"]["average"]["description"] == "for task: digits-averaged: how F1 averages over the classes"
    assert schema["additionalProperties"] is False  # every task's fields are listed: none is a plugin's

    checkpoint = open_checkpoint(INGREDIENTS[0])
    scores = {}
    for average in ("macro", "micro"):
        spec = EvalSpec(**section, average=average)
        assert type(spec) is AveragedSpec
        scores[average] = Evaluator(spec, checkpoint).score_state_dict(checkpoint.state_dict()).value
    assert scores["micro"] != scores["macro"]  # the task measured with the field the section gave it


# -- backends ---------------------------------------------------------------------------------------


class _Ranks(Backend):
    """A backend that is only its rank arithmetic (for :meth:`Backend.shard`)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self._rank, self._world_size = rank, world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("not gathered in this test")


@pytest.mark.parametrize("items, world_size", [(7, 2), (7, 3), (2, 3), (12, 4), (0, 2)])
def test_shards_are_contiguous_and_cover_the_data_in_rank_order(items: int, world_size: int) -> None:
    shards = [list(_Ranks(rank, world_size).shard(range(items))) for rank in range(world_size)]
    assert [item for shard in shards for item in shard] == list(range(items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


class GlooBackend(Backend):
    """``torch.distributed`` on CPU (gloo): what a multi-process backend is, in a dozen lines."""

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor | None] = [None] * self.world_size
        dist.all_gather_object(parts, outputs)
        return torch.cat([p for p in parts if p is not None])


def _spec() -> EvalSpec:
    return EvalSpec(task="image-classification", data=str(DIGITS / "data"), split="val", limit=100, batch_size=16)


def _score_on_rank(rank: int, world_size: int, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        checkpoint = open_checkpoint(INGREDIENTS[0])
        evaluator = Evaluator(_spec(), checkpoint, backend=GlooBackend())
        model = evaluator.model_with(checkpoint.state_dict())
        calls = []
        forward = evaluator.task.forward

        def counted(model: nn.Module, inputs: Inputs) -> torch.Tensor:
            calls.append(len(inputs))
            return forward(model, inputs)

        evaluator.task.forward = counted  # type: ignore[method-assign]
        outputs = evaluator.predict(model)
        score = evaluator.score_outputs(outputs)
        torch.save({"outputs": outputs, "score": score, "local": sum(calls)}, f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_score_like_one(tmp_path: Path) -> None:
    """Each process runs its half of the batches; the gather gives both the whole, in data order."""
    mp.spawn(_score_on_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    checkpoint = open_checkpoint(INGREDIENTS[0])
    evaluator = Evaluator(_spec(), checkpoint)
    alone = evaluator.predict(evaluator.model_with(checkpoint.state_dict()))
    ranks = [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2)]
    assert [r["local"] for r in ranks] == [64, 36]  # 7 batches of 16 (the last 4): 4 on rank 0, 3 on rank 1
    for r in ranks:
        assert torch.allclose(r["outputs"], alone, atol=1e-6)
        assert r["score"].value == evaluator.score_outputs(alone).value
