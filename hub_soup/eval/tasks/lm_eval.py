"""Task ``lm-eval``: EleutherAI's lm-evaluation-harness scores each candidate, in memory.

``tasks`` are harness task, group or tag names (the built-in ones, or task YAMLs
of your own in ``include_path``), run with ``num_fewshot`` and ``limit`` as the
harness reads them. Each name reports the metrics the harness reports for it (a
task's, or a group's aggregate; a tag reports each of its tasks), in its YAML's
``metric_list`` order, each in the direction the harness declares for it
(``higher_is_better``), named ``<task>/<metric>`` as the harness's W&B logger
names them. The first name's first metric decides greedy and the gate.

The model under test is the Evaluator's one instance, wrapped once in the
harness's ``HFLM``: every candidate's weights are loaded into it and scored, never
saved and reloaded. The harness's task objects are built once (each dataset read
once); before every candidate they are prepared as ``simple_evaluate`` prepares
them (the few-shot count, its seeds), and the harness's own ``evaluate`` scores
it, so a candidate gets the number ``simple_evaluate`` gives it, without the
environment report ``simple_evaluate`` collects on every call (``pip list`` and
``git``: seconds per candidate). Nothing is cached between candidates: no request
cache (``use_cache``), no reused responses. The harness's ``HFLM`` around a model
object is a world of one, so under a multi-process launch every process scores
every document: the same numbers on every rank, without a speedup.

Task YAMLs are code: the harness renders their Jinja templates unsandboxed and
imports what their ``!function`` tags name, so task YAMLs of your own
(``include_path``) run only with ``trust_remote_code``, like a custom function.

Like every task module, this one imports no torch (nor the harness) at the top:
validating a recipe reads :class:`LmEvalSpec` from it.
"""

from __future__ import annotations

import difflib
import functools
import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from hub_soup.errors import EvalError, NetworkError, UntrustedCodeError
from hub_soup.eval.metrics import Metric
from hub_soup.eval.spec import EvalSpec
from hub_soup.eval.tasks import Batch, EvalTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub_soup.eval.data import Inputs

logger = logging.getLogger(__name__)

# Metrics the harness reports as fractions of documents: shown in percent, changes in points.
_FRACTIONS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "f1"})
INSTALL_HINT = "pip install 'hub-soup[lm-eval]' (lm-evaluation-harness 0.4.13)"


class LmEvalSpec(EvalSpec):
    """``task: lm-eval``: harness task names, spelled as the harness spells them; no data, split or columns."""

    needs_data = False
    not_taken = ("data", "split", "test_split")
    not_taken_because = (
        "each harness task reads its own dataset and split (its YAML's dataset_path and test_split); for data of "
        "your own, write a task YAML with dataset_path: json and put its folder in include_path"
    )

    tasks: list[str] | None = Field(
        None, min_length=1, description="harness task, group or tag names (lm_eval --tasks)"
    )
    include_path: str | None = Field(
        None, description="a folder of task YAMLs of your own (lm_eval --include_path)"
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="few-shot examples per prompt (default: each task's own)"
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(name.strip() for name in value):
            raise ValueError("harness task names must not be empty")
        return [name.strip() for name in value] if value is not None else None

    @model_validator(mode="after")
    def _tasks_given(self) -> LmEvalSpec:
        if not self.tasks:
            raise ValueError(
                "task: lm-eval needs tasks: the harness task names (--eval-tasks arc_easy,hellaswag); "
                "`lm-eval ls tasks` lists the built-in ones"
            )
        return self

    def local_paths(self, convert: Callable[[str], str]) -> dict[str, str]:
        paths = super().local_paths(convert)
        if self.include_path is not None:
            paths["include_path"] = convert(self.include_path)
        return paths

    def code(self) -> list[tuple[str, str]]:
        return [*super().code(), *(
            [("include_path", f"task YAMLs in {self.include_path}, which the harness runs as code")]
            if self.include_path else []
        )]

    def inputs(self) -> list[tuple[str, Path]]:
        return [*super().inputs(), *(
            [(f"the task YAMLs {self.include_path}", Path(self.include_path).expanduser())]
            if self.include_path is not None else []
        )]


class LmEval(EvalTask):
    """lm-evaluation-harness tasks on a transformers causal language model; no outputs to ensemble.

    The metrics are known once the harness has scored a first model: :attr:`primary` and
    :attr:`others` are set then, and every later score must report the same ones.

    Raises:
        EvalError: lm-eval is not installed, a name is no harness task, a task's data cannot be
            read (offline, not on the Hub, a missing file), or a task needs what this model lacks.
        UntrustedCodeError: ``include_path`` without ``trust_remote_code``.
        NetworkError: a task's dataset is on the Hub and the Hub cannot be reached.
    """

    name = "lm-eval"
    Spec = LmEvalSpec
    spec: LmEvalSpec
    has_outputs = False
    scoring = "each model through the harness, which gives back metrics"
    auto_class = "AutoModelForCausalLM"

    def __init__(self, spec: EvalSpec, *args: Any, trust_remote_code: bool = False, **kwargs: Any) -> None:
        super().__init__(spec, *args, trust_remote_code=trust_remote_code, **kwargs)
        spec = self.spec  # this task's own: LmEvalSpec
        assert spec.tasks is not None  # LmEvalSpec requires them
        if spec.include_path is not None and not trust_remote_code:
            raise UntrustedCodeError(
                f"include_path {spec.include_path} holds task YAMLs, which the harness runs as code (Jinja "
                "templates, !function tags); refusing to load them without --trust-remote-code",
                hint=UntrustedCodeError.HINT,
            )
        harness = _import_harness()
        self._tokenizer = self.architecture.tokenizer(self.name)
        manager = _task_manager(spec.include_path, tuple(spec.tasks))
        for name in spec.tasks:  # every name checked before any dataset is read
            _check_known(manager, name, spec.include_path)
        self._loaded = {name: _load(manager, name) for name in spec.tasks}
        self._task_dict = _merged(self._loaded)
        for task_name, task in self._task_dict["tasks"].items():
            self._check_runnable(task_name, task)
            _set_num_fewshot(task, spec.num_fewshot)
        self._splits = {task_name: _split_of(task) for task_name, task in self._task_dict["tasks"].items()}
        self.split = "/".join(sorted(set(self._splits.values())))
        self._evaluate = harness.evaluate
        self._lm: Any = None  # the HFLM wrapping the model under test, built on first use
        self._declared = False  # primary and others are set from the first model's results

    @property
    def dataset(self) -> str:
        """The harness task names, as the recipe lists them."""
        assert self.spec.tasks is not None
        return ", ".join(self.spec.tasks)

    def measured_examples(self) -> int:
        """Documents scored: each task's (test or validation) documents, the first ``limit`` of each with one."""
        limit = self.spec.limit
        return sum(
            len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
            for task in self._task_dict["tasks"].values()
        )

    def batches(self) -> list[Batch]:
        return []  # the harness reads and batches its own documents

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        raise _no_outputs()

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        raise _no_outputs()

    def measure_model(self, model: nn.Module) -> Mapping[str, float]:
        """Every reported metric of ``model``, as the harness's ``simple_evaluate`` would score it."""
        import numpy as np
        import torch
        from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

        lm = self._harness_model(model)
        # simple_evaluate's seeds, set again before every candidate, so each is scored on the same
        # few-shot examples (the samplers draw from their seeded generators) and the same random state
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        for task in self._task_dict["tasks"].values():
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        results = self._evaluate(
            lm=lm, task_dict=self._task_dict, limit=self.spec.limit, bootstrap_iters=0, log_samples=False,
            confirm_run_unsafe_code=self.trust_remote_code,
        )
        measured = self._metrics_of(results)
        if not self._declared:  # the first model scored: what the harness reports is what the task declares
            if not measured:
                raise EvalError(f"lm-eval reported no metric for {self.dataset}", hint="check the tasks' metric_list")
            self.primary, self.others = measured[0][0], tuple(metric for metric, _ in measured[1:])
            self._declared = True
        return {metric.name: value for metric, value in measured}

    def _harness_model(self, model: nn.Module) -> Any:
        """The HFLM around ``model``: built once for the Evaluator's reused instance (new weights are
        loaded into that same module), again only for another module."""
        from hub_soup.eval.placement import input_device

        if self._lm is None or self._lm.model is not model:
            # its two warnings about a model passed as an object (not to launch it with accelerate) are
            # about the way hub-soup means to use it: quiet while it is built, warnings of the run kept
            harness_logger = logging.getLogger("lm_eval.models.huggingface")
            level = harness_logger.level
            harness_logger.setLevel(logging.ERROR)
            try:
                self._lm = _hflm_class()(pretrained=model, tokenizer=self._tokenizer, batch_size=self.spec.batch_size)
            finally:
                harness_logger.setLevel(level)
            placed = input_device(model)
            if placed is not None:  # the harness takes model.device, meta where the first weight is offloaded
                self._lm._device = placed
        return self._lm

    def _metrics_of(self, results: Mapping[str, Any]) -> list[tuple[Metric, float]]:
        """Each requested name's metrics with their values: its own row (a task's, a group's aggregate),
        or, for a tag, each of its tasks' rows."""
        measured = []
        for name, loaded in self._loaded.items():
            rows = [name] if name in results["results"] else list(loaded["tasks"])
            for row in rows:
                group = loaded["groups"].get(row)
                leaves = [t.task_name for t in group.get_all_tasks()] if group is not None else [row]
                splits = {self._splits[leaf] for leaf in leaves}
                source = group if group is not None else loaded["tasks"].get(row)
                measured += _row_metrics(
                    row, results, _declared_order(source), splits.pop() if len(splits) == 1 else None
                )
        return measured

    def _check_runnable(self, task_name: str, task: Any) -> None:
        """Refuse now, before any model is scored, what the harness would refuse halfway through."""
        if getattr(task, "MULTIMODAL", False):
            raise EvalError(
                f"lm-eval task {task_name} is multimodal; hub-soup scores text-only causal language models"
            )
        if getattr(task, "UNSAFE_CODE", False) and not self.trust_remote_code:
            raise UntrustedCodeError(
                f"lm-eval task {task_name} runs the code the model writes (the harness marks it unsafe); refusing "
                "to run it without --trust-remote-code",
                hint=UntrustedCodeError.HINT,
            )


def _no_outputs() -> EvalError:
    return EvalError("task lm-eval has no model outputs to ensemble", hint="drop ensemble_reference")


def _import_harness() -> Any:
    try:
        import lm_eval
        import lm_eval.evaluator
    except ImportError:
        raise EvalError("task lm-eval needs lm-evaluation-harness", hint=INSTALL_HINT) from None
    return lm_eval.evaluator


@functools.cache
def _hflm_class() -> Any:
    """The harness's ``HFLM``, its progress bars off when huggingface_hub's are (the CLI's switch: quiet, CI, no
    terminal). ``HFLM`` draws them unless asked not to (``disable_tqdm``), whatever tqdm's defaults say, and
    ``evaluate`` never asks; each method that draws one is asked here."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or are_progress_bars_disabled())

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or are_progress_bars_disabled())

        def _loglikelihood_tokens(
            self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None
        ) -> Any:
            return super()._loglikelihood_tokens(
                requests, disable_tqdm=disable_tqdm or are_progress_bars_disabled(), override_bs=override_bs
            )

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or are_progress_bars_disabled())

    return QuietHFLM


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool, fingerprint: tuple[tuple[str, int, int], ...]) -> Any:
    """One harness TaskManager per folder, for the whole process: indexing the harness's 14,000 built-in
    task YAMLs takes 15 s here, and two Evaluators (or diagnose) need not pay it twice. The folder's
    ``fingerprint`` is part of the key, so a task YAML edited between two runs (a notebook) is read again."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _task_manager(include_path: str | None, names: tuple[str, ...]) -> Any:
    """The harness TaskManager that knows ``names``: ``include_path``'s own tasks alone when they are
    all there (no index of the built-in ones to build), else the built-in ones with ``include_path``'s
    (which take precedence over built-in ones of the same name, as with ``lm-eval --include_path``)."""
    if include_path is None:
        return _manager(None, True, ())
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise EvalError(
            f"include_path {include_path}: no such folder",
            hint="include_path is a folder of task YAMLs (lm-eval --include_path)",
        )
    fingerprint = tuple(
        (str(path), path.stat().st_mtime_ns, path.stat().st_size) for path in sorted(folder.rglob("*")) if path.is_file()
    )
    own = _manager(str(folder), False, fingerprint)
    if all(name in own.all_tasks for name in names):
        return own
    return _manager(str(folder), True, fingerprint)


def _check_known(manager: Any, name: str, include_path: str | None) -> None:
    """Refuse a name the harness does not know, with the known names closest to it."""
    if name not in manager.all_tasks:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        where = f" nor in include_path {include_path}" if include_path is not None else ""
        raise EvalError(
            f"no lm-eval task named {name!r}: it is not one of the harness's tasks, groups or tags{where}"
            + (f" (close: {', '.join(close)})" if close else ""),
            hint="`lm-eval ls tasks` lists the harness's own; for a task of your own, put its YAML in a folder "
            "and pass that folder as include_path (--include-path)",
        )


def _load(manager: Any, name: str) -> Any:
    """The harness's TaskDict for ``name`` (its datasets loaded), or one line saying why it cannot be."""
    try:
        return manager.load([name])
    except ConnectionError as exc:  # datasets' "Couldn't reach ... on the Hub", offline or not
        import datasets

        hint = (
            "use a task whose data is local: a task YAML with dataset_path: json and dataset_kwargs: "
            "{data_files: ...}, in a folder passed as include_path; or run once online to cache the dataset"
        )
        message = f"lm-eval task {name} needs its dataset from the Hub ({exc})"
        if datasets.config.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE: the user's choice
            raise EvalError(f"{message}, and the Hub is switched off (HF_HUB_OFFLINE)", hint=hint) from None
        raise NetworkError(message, hint=hint, retryable=False) from None
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError, a data file that is not there
        raise EvalError(
            f"lm-eval task {name}: cannot read its dataset ({exc})",
            hint="check the task YAML's dataset_path and data_files (paths are read from the working directory)",
        ) from None
    except (KeyError, ValueError) as exc:  # a group naming an unknown task, a malformed task YAML
        raise EvalError(f"lm-eval task {name} cannot be loaded: {exc}", hint="check its task YAML") from None


def _merged(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """One TaskDict of every name's, as ``TaskManager.load(names)`` makes it; a task under two names is refused
    (the harness refuses it too: it would be scored once and reported twice)."""
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    group_map: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, one in loaded.items():
        for task_name, task in one["tasks"].items():
            if task_name in owner:
                raise EvalError(
                    f"lm-eval task {task_name} is in both {owner[task_name]} and {name}",
                    hint="list each harness task once",
                )
            owner[task_name] = name
            tasks[task_name] = task
        groups.update(one.get("groups", {}))
        group_map.update(one.get("group_map", {}))
    return {"tasks": tasks, "groups": groups, "group_map": group_map}


def _set_num_fewshot(task: Any, num_fewshot: int | None) -> None:
    """``simple_evaluate``'s few-shot rule: ``num_fewshot`` replaces a task's own count, except a count of 0
    its YAML sets; without it, a task that sets none gets 0."""
    own = task.get_config("num_fewshot")
    if num_fewshot is not None:
        if own == 0:
            logger.info("lm-eval task %s sets num_fewshot: 0 in its YAML; num_fewshot %d is not used for it",
                        task.task_name, num_fewshot)
        else:
            task.set_config(key="num_fewshot", value=num_fewshot)
    elif own is None:
        task.set_config(key="num_fewshot", value=0)


def _split_of(task: Any) -> str:
    """The split the harness scores a task on: its test split when it has one, else its validation split."""
    split = task.config.test_split if task.has_test_docs() else task.config.validation_split
    return str(split)


def _declared_order(source: Any) -> list[str]:
    """A task's ``metric_list`` (a group's ``aggregate_metric_list``) metric names, in its YAML's order."""
    if source is None:
        return []
    entries = getattr(source, "aggregate_metric_list", None)
    if entries is None and hasattr(source, "config"):
        entries = getattr(source.config, "metric_list", None)
    names = []
    for entry in entries or []:
        name = entry.get("metric") if isinstance(entry, Mapping) else getattr(entry, "metric", None)
        if isinstance(name, str):
            names.append(name)
    return names


def _row_metrics(
    row: str, results: Mapping[str, Any], order: list[str], split: str | None
) -> list[tuple[Metric, float]]:
    """The metrics of one result row (scored on ``split``), declared order first, each in the harness's direction.

    The harness keys a value ``metric,filter`` (``acc,none``; ``exact_match,strict-match``); the
    name here drops the ``none`` filter: ``arc_easy/acc``, ``gsm8k/exact_match,strict-match``.
    """
    directions = results.get("higher_is_better", {}).get(row, {})
    found = []
    for key, value in results["results"][row].items():
        metric, comma, filter_name = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        if directions.get(metric) is None:
            raise EvalError(
                f"lm-eval task {row}: the harness declares no direction for metric {metric}",
                hint="set higher_is_better for it in the task's metric_list",
            )
        name = f"{row}/{metric}" + ("" if filter_name == "none" else f",{filter_name}")
        found.append((Metric(name, bool(directions[metric]), metric in _FRACTIONS, dataset=row, split=split), float(value)))
    rank = {metric: i for i, metric in enumerate(order)}
    return sorted(found, key=lambda item: rank.get(item[0].measure.partition(",")[0], len(rank)))
