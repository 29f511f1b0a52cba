"""Task lm-eval: lm-evaluation-harness scores candidates in memory, with the harness's own numbers.

Real objects throughout: tiny Llamas built offline, a local multiple-choice task YAML
(``dataset_path: json``) in a folder passed as ``include_path``, and the harness's own
``simple_evaluate`` on a fresh model loaded from the same weights as the yardstick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import open_checkpoint
from hub_soup.recipe import Recipe, load_recipe
from tests.hub_models import llama_folder, state_dict_of

TASK = "tiny_mc"
DOCS = [
    {"question": "the sky is", "choices": ["blue", "green", "hot"], "label": 0},
    {"question": "the grass is", "choices": ["blue", "green", "cold"], "label": 1},
    {"question": "fire is", "choices": ["cold", "green", "hot"], "label": 2},
    {"question": "ice is", "choices": ["cold", "hot", "blue"], "label": 0},
    {"question": "the soup is", "choices": ["blue", "hot", "green"], "label": 1},
]
WORDS = sorted({w for doc in DOCS for w in [*doc["question"].split(), *doc["choices"]]})


def write_task(folder: Path, name: str = TASK, docs: list[dict] = DOCS) -> Path:
    """A multiple-choice task of the harness's own kind: local JSONL data, accuracy, and the Brier score
    (continuous, lower is better as the harness declares, so two models rarely tie on it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "brier_score"}, {"metric": "acc_norm"}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lm-eval")
    folders = [llama_folder(root / f"llama{i}", seed=i + 1, words=WORDS) for i in range(3)]
    return {"folders": folders, "tasks": write_task(root / "tasks")}


def harness_numbers(folder: Path, tasks: Path, **options: object) -> dict[str, float]:
    """What the harness itself reports for the model saved in ``folder``: a fresh model, its own TaskManager."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=64)
    results = simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **options
    )
    assert results is not None
    row = results["results"][TASK]
    return {metric: row[f"{metric},none"] for metric in ("acc", "brier_score", "acc_norm")}


def _values(score) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {metric.measure: value for metric, value in score.measurements()}


def test_scores_are_the_harness_own_numbers(kit: dict) -> None:
    """One Evaluator scores three candidates in turn, then the first again: each gets exactly what
    simple_evaluate gives a fresh model of those weights (few-shot examples drawn alike every time;
    nothing cached from the model before)."""
    options = {"num_fewshot": 2, "limit": 4}  # few-shot examples drawn from the other documents, at random
    spec = EvalSpec(task="lm-eval", tasks=[TASK], include_path=str(kit["tasks"]), **options)
    checkpoints = [open_checkpoint(f) for f in kit["folders"]]
    evaluator = Evaluator(spec, checkpoints[0], trust_remote_code=True)
    assert evaluator.examples == 4
    scores = [evaluator.score_state_dict(state_dict_of(f)) for f in [*kit["folders"], kit["folders"][0]]]
    expected = [harness_numbers(f, kit["tasks"], **options) for f in kit["folders"]]
    for score, numbers in zip(scores, [*expected, expected[0]]):
        assert _values(score) == numbers  # exactly: the same harness on the same weights
    assert len({e["brier_score"] for e in expected}) == 3  # the three models really differ
    first = scores[0]
    assert (first.metric, first.higher_is_better, first.primary.percent) == (f"{TASK}/acc", True, True)
    others = {metric.name: metric for metric, _ in first.others}
    assert list(others) == [f"{TASK}/brier_score", f"{TASK}/acc_norm"]  # the YAML's order
    assert not others[f"{TASK}/brier_score"].higher_is_better  # the harness's direction, not a guess
    assert (first.dataset, first.split, first.examples) == (TASK, "test", evaluator.examples)


def test_an_offloaded_model_gets_the_numbers_it_gets_on_one_device(kit: dict, tmp_path: Path) -> None:
    """``--device-map`` with weights on disk: the harness is handed the device the hooks run the model on (not
    ``model.device``, the meta device of an offloaded first weight), and each model scores as on one device."""
    spec = EvalSpec(task="lm-eval", tasks=[TASK], include_path=str(kit["tasks"]))
    offload = tmp_path / "offload"
    placed_spec = spec.model_copy(update={"device_map": "auto", "max_memory": {"cpu": "30KB"}, "offload_folder": str(offload)})
    reference = open_checkpoint(kit["folders"][0])
    with Evaluator(spec, reference, trust_remote_code=True) as plain, \
            Evaluator(placed_spec, reference, trust_remote_code=True) as placed:
        assert "disk" in set(placed.model.hf_device_map.values())
        assert next(placed.model.parameters()).is_meta  # what the harness would have put its inputs on
        for folder in kit["folders"]:
            state_dict = state_dict_of(folder)
            assert _values(placed.score_state_dict(state_dict)) == _values(plain.score_state_dict(state_dict))
    assert list(offload.iterdir()) == []
    reference.close()


def test_greedy_soup_through_the_cli(kit: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`merge ... --eval-task lm-eval --greedy`: the card's model-index names the harness task and its
    metrics, whose values are what the harness gives the written soup; the step summary has them too."""
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "soup"
    argv = ["merge", *map(str, kit["folders"]), "-o", str(out), "--eval-task", "lm-eval", "--eval-tasks", TASK,
            "--include-path", str(kit["tasks"]), "--num-fewshot", "1", "--greedy", "--trust-remote-code"]
    assert main(argv) == 0

    card = (out / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]["results"]
    assert {(r["dataset"]["type"], r["dataset"]["split"]) for r in index} == {(TASK, "test")}
    reported = {m["type"]: m["value"] for r in index for m in r["metrics"]}
    numbers = harness_numbers(out, kit["tasks"], num_fewshot=1)
    assert reported == {metric: round(value, 6) for metric, value in numbers.items()}
    assert f"| soup | test | {TASK}/acc | {numbers['acc']:.4f} |" in summary.read_text()

    recipe = load_recipe(out / "hub-soup.yaml")  # rebuilds from the soup folder: the task folder found from there
    assert recipe.greedy and recipe.eval is not None and recipe.eval.tasks == [TASK] and recipe.eval.num_fewshot == 1
    assert Path(recipe.eval.include_path or "").resolve() == kit["tasks"].resolve()


def test_a_union_soup_of_different_vocabularies(tmp_path: Path) -> None:
    """Ingredients whose vocabularies differ (tests/vocab_models.py): each is scored in its own model with its own
    tokenizer, the union soup in its own with its tokenizer, each getting what the harness gives that model as saved."""
    import hub_soup
    from tests.vocab_models import build

    models = build(tmp_path / "models")
    docs = [{"question": "the soup is", "choices": ["good", "world", "hello"], "label": 0},
            {"question": "hello <|im_start|>", "choices": ["world", "tasty", "a"], "label": 0},
            {"question": "a very", "choices": ["tasty", "the", "is"], "label": 0}]
    tasks = write_task(tmp_path / "tasks", docs=docs)
    names = ["chat", "padded"]
    recipe = Recipe.from_refs(
        [str(models / name) for name in names], tokenizer={"source": "union"}, output={"path": str(tmp_path / "soup")},
        eval={"task": "lm-eval", "tasks": [TASK], "include_path": str(tasks), "dtype": "float32"},
    )
    result = hub_soup.run(recipe, trust_remote_code=True)
    assert result is not None and result.report is not None
    report = result.report
    assert [_values(s) for s in report.ingredient_scores] == [harness_numbers(models / n, tasks) for n in names]
    assert _values(report.soup_score) == harness_numbers(tmp_path / "soup", tasks)


def test_no_progress_bars_when_stderr_is_a_file(kit: dict, tmp_path: Path) -> None:
    """A run whose stderr is a file (CI, a log) shows no bar: not datasets' "Generating test split" (a fresh datasets
    cache, so the task's data is read), nor lm-eval's while it builds requests or runs the model, whatever the
    task's kind (multiple choice, rolling loglikelihood, generation); log lines still go there."""
    tasks = write_task(tmp_path / "tasks")
    data = {"test": str(tasks / f"{TASK}.jsonl")}
    kinds = {
        "tiny_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{question}}",
                         "metric_list": [{"metric": "word_perplexity"}]},
        "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                     "doc_to_target": "{{choices[label]}}", "metric_list": [{"metric": "exact_match"}],
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 2, "do_sample": False}},
    }
    for name, kind in kinds.items():
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": data}, "test_split": "test"}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump({**config, **kind}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}  # as a user's shell has it
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "hub_soup.cli", "merge", *map(str, kit["folders"][:2]), "-o", str(tmp_path / "soup"),
             "--eval-task", "lm-eval", "--eval-tasks", f"{TASK},tiny_rolling,tiny_gen", "--include-path", str(tasks),
             "--trust-remote-code", "--eval-limit", "1"],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**env, "HF_DATASETS_CACHE": str(tmp_path / "datasets")},
            timeout=240, check=False,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "hub-soup: resolved" in text and "\r" not in text
    assert not [line for line in text.splitlines() if "Generating" in line or "%|" in line], text


def test_a_task_under_two_names_is_refused(kit: dict, tmp_path: Path) -> None:
    """A task listed by its name and by its tag would be scored once and reported twice: refused, as the harness does."""
    from hub_soup.errors import EvalError

    folder = write_task(tmp_path / "tasks")
    config = yaml.safe_load((folder / f"{TASK}.yaml").read_text())
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump({"tag": ["tiny_tag"], **config}, sort_keys=False))
    spec = EvalSpec(task="lm-eval", tasks=[TASK, "tiny_tag"], include_path=str(folder))
    with pytest.raises(EvalError, match=f"lm-eval task {TASK} is in both {TASK} and tiny_tag"):
        Evaluator(spec, open_checkpoint(kit["folders"][0]), trust_remote_code=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "task: lm-eval needs tasks: the harness task names"),
        ({"tasks": ["t"], "data": "d"}, "data: task lm-eval does not take it"),
        ({"tasks": ["t"], "test_split": "test", "text_column": "x"},
         "test_split, text_column: task lm-eval does not take them"),
        ({"tasks": []}, "tasks: List should have at least 1 item"),
        ({"tasks": ["arc_easy", " "]}, "harness task names must not be empty"),
        ({"tasks": ["t"], "num_fewshot": -1}, "num_fewshot: Input should be greater than or equal to 0"),
    ],
)
def test_eval_fields_lm_eval_refuses(fields: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_refs(["a", "b"], eval={"task": "lm-eval", **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eval": {"task": "causal-lm", "data": "d", "tasks": ["t"], "num_fewshot": 1}},
         "tasks, num_fewshot: only task: lm-eval takes them"),
        ({"eval": {"task": "causal-lm"}}, "task: causal-lm needs data"),
        ({"eval": {"task": "lm-eval", "tasks": ["t"]}, "recalibrate_bn": 2}, "recalibrate_bn: task lm-eval scores"),
        ({"eval": {"task": "lm-eval", "tasks": ["t"]}, "ensemble_reference": True},
         "ensemble_reference: task lm-eval scores"),
    ],
)
def test_recipes_that_cannot_work_with_or_without_lm_eval(fields: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_refs(["a", "b"], **fields)


def test_include_path_is_code_to_trust() -> None:
    """Task YAMLs run as code (unsandboxed Jinja, !function): a recipe naming some needs --trust-remote-code."""
    recipe = Recipe.from_refs(["a", "b"], eval={"task": "lm-eval", "tasks": ["t"], "include_path": "tasks"})
    assert [field for field, _ in recipe.code_refs()] == ["eval.include_path"]
    assert Recipe.from_refs(["a", "b"], eval={"task": "lm-eval", "tasks": ["arc_easy"]}).code_refs() == []
