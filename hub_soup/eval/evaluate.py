"""Score a model on a small eval set, the same way for every ingredient, soup and ensemble.

A soup is only worth publishing if it beats its ingredients, and "the averaging
doesn't raise accuracy" is only actionable with numbers measured identically for
all of them. An :class:`Evaluator` therefore reads its data once (through its
task, into cached batches in a fixed order) and reuses one model instance, built
once in the dtype models are scored in, into which every candidate is streamed
strictly, chunk by chunk (:class:`~hub_soup.eval.models.ModelSink`): a key the
model does not expect is an error, never silently skipped, and no candidate is
ever held beside the model.

Models are scored in one dtype (:func:`eval_dtype`): by default the soup's own
(bf16 ingredients are scored in bf16), except that float16 on the CPU is scored
in float32, since CPU kernels for float16 are slow and some are missing.

What is measured is the task's (:mod:`hub_soup.eval.tasks`: image and text
classification, causal-lm perplexity, a custom function, lm-evaluation-harness
tasks, or a registered one);
where the forward passes run is the backend's (:mod:`hub_soup.eval.backends`,
one process by default). Task outputs live in a space where averaging over
models *is* the output ensemble (probabilities), so ensembles and scores share
one code path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hub_soup.errors import EvalError
from hub_soup.eval.backends import Backend
from hub_soup.eval.backends.local import LocalBackend
from hub_soup.eval.bn import batchnorm_buffers, recalibrate_bn, saved_batchnorm
from hub_soup.eval.data import Inputs
from hub_soup.eval.models import Architecture, ModelSink
from hub_soup.eval.score import Comparison, Score, compare_to_best
from hub_soup.eval.spec import EvalSpec
from hub_soup.eval.tasks import EvalTask, get_task
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import Sink, Weights, state_dict_weights

# Score, Comparison and Inputs live in score.py and data.py; greedy and diagnose import them from here.
__all__ = ["Comparison", "Evaluator", "Inputs", "Score", "compare_to_best"]

logger = logging.getLogger(__name__)


class Evaluator:
    """Scores models of the reference's architecture on one split of ``spec.data``.

    Args:
        spec: what to evaluate (task, data, columns, batch size, direction).
        reference: the ingredient whose ``config.json`` (and tokenizer files) define
            the architecture; every state dict scored must have its keys.
        split: the split to score (default ``spec.split``); e.g. ``spec.test_split``.
        device: where models run (``cpu``, ``cuda``, ``cuda:1``); data is cached there.
        trust_remote_code: import a custom task's function, and let transformers build models
            and tokenizers whose config names custom code (``auto_map``). Off by default: the
            eval spec may come from someone else's recipe.
        backend: where forward passes run; one process by default. Every process of a
            multi-process backend gets the same scores.
        dtype: the dtype the model is built and scored in (the pipeline's: :func:`eval_dtype`);
            floating inputs are cast to it once, when they are read.
        model_of: the evaluator whose model instance this one reuses instead of building its own (a test
            split's evaluator shares the selection split's: one model in memory). That evaluator builds,
            places and releases the model (closing this one leaves it), and must have this one's
            reference, device and dtype.
        files: the side files (``config.json``, tokenizer files; by name, a path or a text) the model and the
            tokenizer are built from, where they are not the reference's: a soup's own, as it writes them (slices
            that stack layers: its layer count; a chosen vocabulary: its size, special token ids and tokenizer).

    Attributes:
        task: the :class:`~hub_soup.eval.tasks.EvalTask` that reads the data and measures.
        examples: how many examples (images, texts, harness documents) are scored; 0 for task custom.

    Raises:
        EvalError: for data, columns, labels or configs that cannot be used; a ``model_of`` of another
            reference, device or dtype.
    """

    def __init__(
        self,
        spec: EvalSpec,
        reference: Checkpoint,
        *,
        split: str | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        backend: Backend | None = None,
        dtype: torch.dtype = torch.float32,
        model_of: Evaluator | None = None,
        files: Mapping[str, str | Path] | None = None,
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.split = split or spec.split
        self.device = torch.device(device)
        self.backend = backend or LocalBackend()
        self.reference = reference.label
        self._sink: ModelSink | None = None  # what streamed into the model last (see :meth:`held`)
        if model_of is not None:
            _check_shareable(model_of, self)
        architecture = Architecture.of(reference, trust_remote_code=trust_remote_code)
        if files is not None:
            architecture = architecture.written_as(files)
        self.task: EvalTask = get_task(spec.task)(
            spec, architecture, split=self.split, device=self.device, trust_remote_code=trust_remote_code, dtype=dtype,
            model_of=model_of.task if model_of is not None else None,
        )
        self._batches = [replace(b, inputs=_cast(b.inputs, dtype)) for b in self.task.batches()]
        targets = [b.targets for b in self._batches if b.targets is not None]
        self._targets = torch.cat(targets).cpu() if targets else None
        self.examples = (
            sum(_batch_size(b.inputs) for b in self._batches) if self.task.has_outputs
            else self.task.measured_examples()
        )

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the reused model and remove its disk offload folder, if it has one (a model shared from
        ``model_of`` stays: that evaluator closes it)."""
        self.task.close()

    # -- models --------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh instance of the reference's architecture, in the evaluator's dtype, eval mode, on the device."""
        return self.task.build_model()

    @property
    def model(self) -> nn.Module:
        """The reused model instance: it holds the weights streamed into it last."""
        return self.task.model()

    def model_from(self, weights: Weights) -> nn.Module:
        """The reused model instance with ``weights`` streamed into it, strictly (see :class:`ModelSink`)."""
        model = self.model
        self._sink = ModelSink(model, weights.metas, self.reference)
        with torch.no_grad():
            weights.stream(self._sink)
        return model

    def held(self, weights: Weights) -> Weights:
        """``weights``, which the model holds as judged (streamed into it last, BatchNorm statistics as kept),
        read back from the model rather than made again, where that is exact: the model holds every tensor in
        the dtype it is written in, each in storage of its own. Else ``weights`` itself. Reading back is a
        copy instead of a merge: writing a scored soup then costs no more reading of the ingredients. Should
        other weights be streamed into the model before it is read, the stream falls back to ``weights``."""
        sink = self._sink
        if sink is None or not sink.is_latest() or not sink.holds_exactly():
            return weights

        def stream(out: Sink) -> None:
            (sink.stream_back if sink.is_latest() else weights.stream)(out)

        return Weights(weights.metas, stream)

    def model_with(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """The reused model instance with ``state_dict`` loaded strictly."""
        return self.model_from(state_dict_weights(state_dict))

    # -- scoring -------------------------------------------------------------------------

    def score(self, model: nn.Module) -> Score:
        """Score ``model`` (put in eval mode) on this split."""
        if self.task.has_outputs:
            return self.score_outputs(self.predict(model))
        model.eval()
        with torch.inference_mode(), self._runs_in_dtype():
            return self._score(self.task.measure_model(model))

    def score_weights(self, weights: Weights) -> Score:
        """Score weights streamed into the reused model instance."""
        return self.score(self.model_from(weights))

    def score_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Score:
        """Score a state dict (canonical keys, any floating dtype) in the reused model instance."""
        return self.score(self.model_with(state_dict))

    def predict(self, model: nn.Module) -> torch.Tensor:
        """Every output the task's metrics need, in data order, on the CPU (e.g. class probabilities
        ``[N, C]``, or each target token's probability): averaging these over models gives the
        output ensemble's. Each process of the backend runs its shard; the gather restores the order.
        """
        self._need_outputs("ensemble_reference needs model outputs", "drop ensemble_reference")
        model.eval()
        with torch.inference_mode(), self._runs_in_dtype():
            mine = [self.task.forward(model, batch.inputs).cpu() for batch in self.backend.shard(self._batches)]
        # more processes than batches leave some with none: they still take part in the gather
        return self.backend.gather(torch.cat(mine) if mine else torch.empty(0))

    def score_outputs(self, outputs: torch.Tensor) -> Score:
        """The metrics of :meth:`predict`'s outputs (of one model, or averaged over several)."""
        return self._score(self.task.measure(outputs, self._targets))

    def ensemble_score(self, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> Score:
        """Score of the output ensemble: outputs (probabilities) averaged over the models."""
        return self.ensemble_of_outputs([self.predict(self.model_with(sd)) for sd in state_dicts])

    def ensemble_of_outputs(self, outputs: Sequence[torch.Tensor]) -> Score:
        """Score of the mean of several models' :meth:`predict` outputs (in float64)."""
        return self.score_outputs(torch.stack(list(outputs)).double().mean(0))

    def _score(self, values: Mapping[str, float]) -> Score:
        """The task's measured ``values`` as a Score of its declared metrics."""
        metrics = self.task.metrics
        names = [m.name for m in metrics]
        if sorted(values) != sorted(names):
            raise EvalError(
                f"task {self.task.name} measured {', '.join(values) or 'nothing'} but declares {', '.join(names)}",
                hint="a task's measure() returns one value per metric it declares (primary and others), by name",
            )
        others = tuple((m, float(values[m.name])) for m in metrics[1:])
        primary = self.task.primary
        return Score(primary, float(values[primary.name]), self.examples, self.task.split, self.task.dataset, others)

    def _need_outputs(self, what: str, hint: str) -> None:
        if not self.task.has_outputs:
            raise EvalError(f"{what}, and task {self.task.name} has none", hint=hint)

    # -- BatchNorm recalibration --------------------------------------------------------

    def unlabelled_batches(self, n: int) -> list[Inputs]:
        """The first ``n`` cached input batches (fewer if the split is smaller), for BN recalibration.

        The examples are in a fixed shuffled order (see :func:`hub_soup.eval.data.example_order`), so
        these batches are a sample of every class, not the first classes of a sorted folder.
        """
        self._need_outputs(
            "recalibrate_bn needs eval inputs",
            "use an image/text task for the BN data, or recalibrate inside your function",
        )
        if n > len(self._batches):
            logger.info("recalibrate_bn: %s has only %d batches; using all of them", self.split, len(self._batches))
        return [batch.inputs for batch in self._batches[:n]]

    def recalibrated(
        self, state_dict: Mapping[str, torch.Tensor], batches: Sequence[Inputs]
    ) -> dict[str, torch.Tensor] | None:
        """``state_dict`` with its BatchNorm statistics recomputed on ``batches`` (see :func:`recalibrate_bn`),
        in the state dict's own dtypes, so the result is exactly what would be saved; ``None`` without BN.
        """
        model = self.model_with(state_dict)
        if not self.recalibrate(model, batches):
            return None
        return batchnorm_buffers(model, state_dict)

    def recalibrate(self, model: nn.Module, batches: Sequence[Inputs]) -> bool:
        """Recompute ``model``'s BatchNorm statistics on ``batches``, in place; False (untouched) without BN."""
        with self._runs_in_dtype():
            return recalibrate_bn(model, batches)

    def recalibrated_weights(self, weights: Weights, batches: Sequence[Inputs]) -> dict[str, torch.Tensor] | None:
        """The reused model, holding ``weights``, with its BatchNorm statistics recomputed on ``batches`` and
        rounded to the dtypes ``weights`` streams them in: those statistics, as they would be saved (the
        model holds them so), or ``None`` (the model untouched) without BN."""
        model = self.model
        if not self.recalibrate(model, batches):
            return None
        return saved_batchnorm(model, {key: meta.dtype for key, meta in weights.metas.items()})

    @contextmanager
    def _runs_in_dtype(self) -> Iterator[None]:
        """An operation the device has no kernel for in the evaluator's dtype, as one line saying what to do."""
        try:
            yield
        except (NotImplementedError, RuntimeError) as exc:
            if self.dtype == torch.float32 or _TORCH_NAMES.get(self.dtype, "?") not in str(exc):
                raise
            raise EvalError(
                f"{self.reference} cannot be scored in {_name(self.dtype)} on {self.device}: an operation of the "
                f"model or the task has no {_name(self.dtype)} kernel there ({str(exc).splitlines()[0]})",
                hint="pass --eval-dtype float32 (eval.dtype: float32), which every device runs, or score on a "
                f"device that runs {_name(self.dtype)} (--device)",
            ) from None


def _check_shareable(owner: Evaluator, sharer: Evaluator) -> None:
    """``sharer`` may score in ``owner``'s model: the same reference, and its batches on the model's
    device in the model's dtype."""
    mine = (sharer.reference, sharer.device, sharer.dtype)
    theirs = (owner.reference, owner.device, owner.dtype)
    if mine != theirs:
        raise EvalError(
            f"the {sharer.split} evaluator of {sharer.reference} on {sharer.device} in {_name(sharer.dtype)} cannot "
            f"share the model of the {owner.split} evaluator of {owner.reference} on {owner.device} in "
            f"{_name(owner.dtype)}",
            hint="build both evaluators with the same reference, device and dtype",
        )


# How torch's kernel errors name the dtypes ("not implemented for 'BFloat16'", "Unsupported dtype Half").
_TORCH_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double"}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating input tensors in ``dtype`` (images, features); token ids and masks as they are."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    return cast(inputs) if isinstance(inputs, torch.Tensor) else {key: cast(t) for key, t in inputs.items()}


def eval_dtype(requested: str | None, metas: Mapping[str, TensorMeta], device: torch.device) -> torch.dtype:
    """The dtype models are scored in: ``requested`` (``eval.dtype``), else the soup's: the dtype most of
    its floating elements are written in (bf16 ingredients: bf16), except float16 on the CPU, scored in
    float32 (CPU float16 kernels are slow, and some are missing; ask for float16 to have it anyway).

    Raises:
        EvalError: the device cannot compute in that dtype at all (a small matrix product fails there).
    """
    if requested is not None:
        dtype = getattr(torch, requested)
    else:
        counts: Counter[torch.dtype] = Counter()
        for meta in metas.values():
            if meta.dtype.is_floating_point:
                counts[meta.dtype] += meta.numel
        dtype = counts.most_common(1)[0][0] if counts else torch.float32
        if dtype == torch.float16 and device.type == "cpu":
            dtype = torch.float32
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).softmax(-1).sum().item()
    except (NotImplementedError, RuntimeError, TypeError) as exc:
        raise EvalError(
            f"eval dtype {_name(dtype)}: {device} cannot compute in {_name(dtype)} ({str(exc).splitlines()[0]})",
            hint="pass --eval-dtype float32 (eval.dtype: float32), which every device runs, or another --device",
        ) from None
    logger.info("models are scored in %s on %s", _name(dtype), device)
    return dtype


def _batch_size(inputs: Inputs) -> int:
    """Examples in a batch: an image tensor's first dimension, or that of its keyword tensors."""
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
    return int(first.shape[0])
