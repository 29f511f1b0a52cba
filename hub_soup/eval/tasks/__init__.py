"""Eval tasks behind one interface, and the registry that names them.

A task (:class:`EvalTask`) gives three things: its batches (the split read once,
in a fixed order), its forward pass (outputs in a space where averaging over
models *is* the output ensemble: probabilities, not logits) and its metrics (one
declared primary, which greedy and the worse-soup gate decide on, and others
reported beside it). Where the forward passes run is the backend's business
(:mod:`hub_soup.eval.backends`), and scores, ensembles and BatchNorm
recalibration are the :class:`~hub_soup.eval.evaluate.Evaluator`'s, the same for
every task.

A task declares the fields of the recipe's ``eval`` section it takes beyond the
shared ones as its :attr:`EvalTask.Spec`, a subclass of
:class:`~hub_soup.eval.spec.EvalSpec` (lm-eval's harness task names, custom's
function, a classifier's columns), the way a merge method declares its
``Parameters``: the section is validated as the spec of the task it names.

The built-in tasks are named here with the module that defines each, imported
only when a task is used, so the CLI offers the choices without importing any.
Validating a section imports its task's module for the spec, so a task's
module imports no torch at the top (as a merge method's does not): it imports
torch, and the data and model code that need it, in the methods that run. An
installed package adds a task by the entry-point group ``hub_soup.tasks``
(:mod:`hub_soup.registry`); a script or a test adds one with a decorator::

    @register_task
    class MyTask(EvalTask):
        name = "my-task"
        primary = register_metric("f1", higher_is_better=True, percent=True)
        Spec = MySpec  # its own fields, if any: class MySpec(EvalSpec): threshold: float = 0.5
        ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from hub_soup.errors import EvalError
from hub_soup.eval.metrics import Metric
from hub_soup.registry import TASKS_GROUP, Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub_soup.eval.data import Inputs
    from hub_soup.eval.models import Architecture
    from hub_soup.eval.spec import EvalSpec


@dataclass
class Batch:
    """One batch of a task's data, on the task's device."""

    inputs: Inputs
    targets: torch.Tensor | None = None  # what outputs are measured against (class indices); None: the inputs are


class EvalTask(ABC):
    """One kind of evaluation: its data, its forward pass and its metrics.

    Subclasses set :attr:`name` and :attr:`primary` (and :attr:`others`) and implement
    :meth:`batches`, :meth:`forward` and :meth:`measure`; the constructor's arguments are
    available as attributes. A task that measures the model itself rather than its
    outputs (``custom``, ``lm-eval``) sets :attr:`has_outputs` False and implements :meth:`measure_model`.
    A task with fields of its own in the recipe's section sets :attr:`Spec` (and narrows :attr:`spec`'s type).

    Args:
        spec: the recipe's eval section (data, split, batch size, limit, and the task's own fields): an
            instance of :attr:`Spec`.
        architecture: the reference ingredient's config and files; :meth:`build_model` builds from it.
        split: the split to read (``spec.split`` or ``spec.test_split``).
        device: where models run and batches live.
        trust_remote_code: the user allowed code named by the recipe or the configs to run.
        dtype: the dtype models are built and scored in (None: float32). The evaluator casts the
            floating tensors of the batches to it, so a task's batches need not know it.
        model_of: the task whose model instance this one uses (reads preprocessing configs from,
            scores in) instead of building its own: a test split's task shares the selection split's,
            so an LLM is in memory once. That task builds, places and releases it.
    """

    name: ClassVar[str]
    # the recipe's eval section for this task: its own fields beside the shared ones; None: the shared ones only
    Spec: ClassVar[type[EvalSpec] | None] = None
    primary: Metric  # decides greedy and the gate
    others: tuple[Metric, ...] = ()  # measured on the same outputs, reported beside the primary
    has_outputs: ClassVar[bool] = True  # False: no inputs to recalibrate BatchNorm on, no outputs to ensemble
    # without outputs: how a model is scored, for the recipe's refusal ("task X scores <scoring>, not ...")
    scoring: ClassVar[str] = "each model as a whole, which gives back metrics"
    # True: ``spec.data`` is read by :func:`hub_soup.eval.data.open_split`, and so checked before any download
    # (:func:`hub_soup.eval.data.check_data`); a task of one's own reads it as it likes
    opens_data: ClassVar[bool] = False
    auto_class: ClassVar[str | None] = None  # the transformers Auto class; None: the config's architectures

    def __init__(
        self,
        spec: EvalSpec,
        architecture: Architecture,
        *,
        split: str,
        device: torch.device,
        trust_remote_code: bool = False,
        dtype: torch.dtype | None = None,
        model_of: EvalTask | None = None,
    ) -> None:
        self.spec = spec
        self.architecture = architecture
        self.split = split
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self._model: nn.Module | None = None
        self._model_of = model_of

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """Every metric the task reports, the primary first."""
        return (self.primary, *self.others)

    @property
    def dataset(self) -> str:
        """What scores name as their eval data: ``spec.data`` (a task that reads data of its own choosing,
        as lm-eval's harness tasks do, names that instead)."""
        assert self.spec.data is not None  # EvalSpec requires data of a task whose spec does not say otherwise
        return self.spec.data

    def measured_examples(self) -> int:
        """How many examples a score of :meth:`measure_model` covers; 0 where the task cannot say (custom).
        Tasks with outputs count their batches instead."""
        return 0

    def build_model(self) -> nn.Module:
        """A fresh instance of the reference's architecture (in :attr:`dtype`, eval mode, on the device, or
        spread over devices as ``spec.device_map`` says)."""
        from hub_soup.eval.placement import Placement

        return self.architecture.build(self.device, self.auto_class, self.dtype, Placement.of(self.spec))

    def model(self) -> nn.Module:
        """One instance built on first use and reused, so reading the data (which may need the model's
        preprocessing config) and scoring build the architecture once; ``model_of``'s instance when given."""
        if self._model_of is not None:
            return self._model_of.model()
        if self._model is None:
            self._model = self.build_model()
        return self._model

    def close(self) -> None:
        """Let go of the reused model, and of what its placement keeps on disk (an offload folder); a model
        shared from ``model_of`` is that task's to let go of."""
        if self._model is not None:
            from hub_soup.eval.placement import release

            release(self._model)
            self._model = None

    @abstractmethod
    def batches(self) -> list[Batch]:
        """The split, read and preprocessed once, in the fixed order of :func:`hub_soup.eval.data.example_order`."""

    @abstractmethod
    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """One batch's outputs, on any device, in a space where their mean over models is the ensemble's.

        Outputs of all batches are concatenated along dim 0 in data order before :meth:`measure`.
        """

    @abstractmethod
    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        """Every metric's value (by name) from all outputs (one model's, or averaged over several)
        and the batches' targets concatenated (``None`` when the batches have none)."""

    def measure_model(self, model: nn.Module) -> Mapping[str, float]:
        """Every metric's value measured on the model itself: for tasks without outputs only."""
        raise EvalError(f"task {self.name} scores outputs; it does not measure models directly")


_T = TypeVar("_T", bound=type[EvalTask])

# The built-in tasks are references until first used (their modules import torch); plugins add theirs by entry point.
_TASKS: Registry[type[EvalTask]] = Registry(
    "eval task", error=EvalError, group=TASKS_GROUP, expected=EvalTask, unknown="no {kind} named {name!r}",
    how_to_add=f"or register your own with @hub_soup.eval.tasks.register_task (entry points {TASKS_GROUP!r})",
    references={
        "image-classification": "hub_soup.eval.tasks.image_classification:ImageClassification",
        "text-classification": "hub_soup.eval.tasks.text_classification:TextClassification",
        "causal-lm": "hub_soup.eval.tasks.causal_lm:CausalLM",
        "custom": "hub_soup.eval.tasks.custom:Custom",
        "lm-eval": "hub_soup.eval.tasks.lm_eval:LmEval",
    },
)


def register_task(task: _T) -> _T:
    """Class decorator: make ``task`` available as ``eval.task: <task.name>`` in recipes and the API.

    An installed package can instead declare the class under the entry-point group ``hub_soup.tasks``.

    Raises:
        EvalError: the class has no ``name``, or another task already has it.
    """
    name = getattr(task, "name", "")
    if not name:
        raise EvalError(f"task class {task.__qualname__} has no name", hint="set name = 'my-task' in the class")
    _TASKS.register(name, task)
    return task


def task_names(*, plugins: bool = True) -> tuple[str, ...]:
    """Every task a recipe may name: the built-in ones, the registered ones, the installed plugins' (no import
    of any). ``plugins=False``: without the installed plugins' tasks not imported yet (``hub-soup schema`` lists
    the fields of the others, and imports no plugin)."""
    return _TASKS.names(plugins=plugins)


def get_task(name: str) -> type[EvalTask]:
    """The task class called ``name``, importing a built-in or a plugin's on first use.

    Raises:
        EvalError: no task has that name (the hint lists the known ones).
    """
    return _TASKS.get(name)
