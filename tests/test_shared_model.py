"""One model instance for every split: the test split is scored in the selection split's model.

A recipe with ``eval.test_split`` scores every ingredient and the soup on two splits; building a model
per split would double an LLM's memory. The test split's Evaluator therefore shares the selection
Evaluator's instance (``model_of``), which that one builds, places and releases. Builds are counted
through the real :meth:`Architecture.build`. Also: ``hub-soup diagnose`` closes its Evaluator, so a
disk-offloaded model's folder goes when the command ends, not when the garbage collector gets to it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import EvalError
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.models import Architecture
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import open_checkpoint
from hub_soup.pipeline import SoupResult
from hub_soup.recipe import Recipe
from tests.test_device_map import SMALL
from tests.test_streamed_eval import Kit

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """The tiny Llama ingredients, their texts split into a validation and a test split."""
    import datasets

    kit = Kit(tmp_path_factory.mktemp("llama"), "llama")
    kit.data = tmp_path_factory.mktemp("llama-splits") / "texts"
    half = len(kit.texts) // 2
    datasets.DatasetDict({
        "validation": datasets.Dataset.from_dict({"text": kit.texts[:half]}),
        "test": datasets.Dataset.from_dict({"text": kit.texts[half:]}),
    }).save_to_disk(kit.data)
    return kit


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every model the real ``Architecture.build`` makes while the test runs."""
    made: list[Any] = []
    build = Architecture.build

    def counted(self: Architecture, *args: Any, **kwargs: Any) -> Any:
        made.append(build(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Architecture, "build", counted)
    yield made


def _soup(recipe: Recipe) -> SoupResult:
    result = hub_soup.run(recipe)
    assert isinstance(result, SoupResult) and result.report is not None
    return result


def test_a_greedy_soup_with_a_test_split_builds_one_image_model(builds: list[Any], tmp_path: Path) -> None:
    """timm's preprocessing config is read from the model: the test split reads it from the shared one."""
    recipe = Recipe.from_refs(
        INGREDIENTS, greedy=True, output={"path": str(tmp_path / "soup")},
        eval={"task": "image-classification", "data": str(DIGITS / "data"), "split": "val", "test_split": "test",
              "limit": 40},
    )
    _assert_one_model_scored_the_test_split(_soup(recipe).report, builds)


def test_a_greedy_soup_with_a_test_split_builds_one_language_model(
    kit: Kit, builds: list[Any], tmp_path: Path
) -> None:
    recipe = kit.recipe(tmp_path / "soup", greedy=True, eval={"test_split": "test"})
    _assert_one_model_scored_the_test_split(_soup(recipe).report, builds)


def _assert_one_model_scored_the_test_split(report: Any, builds: list[Any]) -> None:
    """The report has test scores (the soup's too) and one model was built for both splits."""
    assert report is not None and report.test_scores is not None
    assert {s.split for s in report.test_scores.values()} == {"test"} and "soup" in report.test_scores
    assert len(builds) == 1, f"{len(builds)} models built"


def test_the_test_split_scores_in_the_owners_placed_model_and_leaves_it_to_the_owner(
    kit: Kit, builds: list[Any], tmp_path: Path
) -> None:
    """The sharer scores what an Evaluator with a model of its own scores; closing it keeps the owner's
    model and its offload folder, closing the owner removes them."""
    offload = tmp_path / "offload"
    reference = open_checkpoint(kit.folders[0])
    spec = EvalSpec(task="causal-lm", data=str(kit.data), test_split="test")
    placed = spec.model_copy(update={"device_map": "auto", "max_memory": SMALL, "offload_folder": str(offload)})
    state_dict = open_checkpoint(kit.folders[1]).state_dict()
    with Evaluator(spec, reference, split="test", dtype=torch.bfloat16) as alone:
        expected = alone.score_state_dict(state_dict)
    builds.clear()
    with Evaluator(placed, reference, dtype=torch.bfloat16) as owner:
        sharer = Evaluator(placed, reference, split="test", dtype=torch.bfloat16, model_of=owner)
        assert sharer.score_state_dict(state_dict) == expected
        assert sharer.model is owner.model and builds == [owner.model]
        (folder,) = offload.iterdir()
        sharer.close()
        assert folder.is_dir() and owner.model is builds[0]
    assert list(offload.iterdir()) == []
    reference.close()


def test_a_model_of_another_dtype_or_device_is_not_shared(kit: Kit) -> None:
    reference = open_checkpoint(kit.folders[0])
    spec = EvalSpec(task="causal-lm", data=str(kit.data), test_split="test")
    with Evaluator(spec, reference, dtype=torch.bfloat16) as owner:
        with pytest.raises(EvalError, match="float32.*bfloat16"):
            Evaluator(spec, reference, split="test", dtype=torch.float32, model_of=owner)
        with pytest.raises(EvalError, match="cuda:1.*cpu"):
            Evaluator(spec, reference, split="test", device="cuda:1", dtype=torch.bfloat16, model_of=owner)
    reference.close()


def test_diagnose_removes_the_offload_folder_when_it_ends(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the collector (a model dispatched by accelerate is in reference cycles), only closing the
    Evaluator removes the folder."""
    offload = tmp_path / "offload"
    argv = [
        "--quiet", "diagnose", str(kit.folders[0]), str(kit.folders[1]), "--alphas", "0.5",
        "--eval-task", "causal-lm", "--eval-data", str(kit.data),
        "--device-map", "auto", "--max-memory", "cpu=30KB", "--offload-folder", str(offload),
    ]
    gc.disable()
    try:
        code = main(argv)
        left = list(offload.iterdir())
    finally:
        gc.enable()
    assert code == 0, capsys.readouterr().err
    assert "alpha" in capsys.readouterr().out
    assert left == []
