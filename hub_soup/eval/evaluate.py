"""Score a model on a small eval set, the same way for every ingredient, soup and ensemble.

A soup is only worth publishing if it beats its ingredients, and "the averaging
doesn't raise accuracy" is only actionable with numbers measured identically for
all of them. An :class:`Evaluator` therefore loads and preprocesses its data once
(into cached tensors, in a fixed order) and reuses one model instance, into which
every candidate state dict is loaded strictly: a key the model does not expect
is an error, never silently skipped.

Tasks (``EvalSpec.task``):

- ``image-classification``: timm models; an image folder (one folder per class)
  or a ``datasets`` dataset, preprocessed with the model's own pretrained config
  (``resolve_data_config`` + ``create_transform``); top-1 accuracy.
- ``text-classification``: transformers sequence classifiers, tokenized with the
  ingredient's own tokenizer files; accuracy.
- ``causal-lm``: perplexity of a text column (lower is better).
- ``custom``: a user's ``module:function`` (or ``path/to/file.py:function``)
  taking the model and returning a float, in the declared direction.

Model outputs are kept in a space where averaging over models *is* the output
ensemble (softmax probabilities; target-token probabilities for language
models, since averaging logits is not an ensemble), so ensembles and scores
share one code path.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hub_soup.errors import EvalError, UntrustedCodeError
from hub_soup.hub.card import detect_library
from hub_soup.io.read import Checkpoint
from hub_soup.recipe import EvalSpec

logger = logging.getLogger(__name__)

# Model inputs: an image batch tensor, or the keyword tensors a transformers model takes.
Inputs = torch.Tensor | dict[str, torch.Tensor]
# Files ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write.
_SAVED_DATASET = "state.json"
_SAVED_DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class Score:
    """One model's result on one eval set, with the direction that makes it better."""

    value: float
    metric: str
    higher_is_better: bool
    examples: int
    split: str
    dataset: str

    def better_than(self, other: Score) -> bool:
        """Strictly better in the declared direction (NaN is never better)."""
        return self.value > other.value if self.higher_is_better else self.value < other.value

    def at_least(self, other: Score) -> bool:
        """As good or better (the greedy soup's rule); False for NaN, so a broken soup is never kept."""
        return self.value >= other.value if self.higher_is_better else self.value <= other.value

    def formatted(self) -> str:
        """The value as people read it: accuracy in percent, anything else with 4 significant digits."""
        return f"{self.value:.2%}" if self.metric == "accuracy" else f"{self.value:.4g}"

    def difference(self, other: Score) -> str:
        """``self - other``, signed, as people read it."""
        return format_delta(self.metric, self.value - other.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.formatted()}"


def format_delta(metric: str, delta: float) -> str:
    """A signed change of ``metric``: in points for accuracy, 4 significant digits otherwise."""
    return f"{delta * 100:+.2f} points" if metric == "accuracy" else f"{delta:+.4g}"


@dataclass(frozen=True)
class Comparison:
    """The soup against its best ingredient on one split: what decides whether to publish.

    With BatchNorm recalibration the ingredients get it too (like with like), and
    ``best_as_saved`` keeps the best one's score with the statistics it was saved
    with, so a gain that recalibration alone explains is visible as such.
    """

    soup: Score
    best: Score
    best_label: str
    best_as_saved: Score | None = None  # set when ``best`` is the ingredient with recalibrated BN statistics

    @property
    def soup_is_worse(self) -> bool:
        return self.best.better_than(self.soup)

    def message(self) -> str:
        """One line for logs, the step summary and :class:`~hub_soup.errors.WorseSoupError`."""
        direction = "higher" if self.soup.higher_is_better else "lower"
        verdict = "worse than" if self.soup_is_worse else "at least as good as"
        best = f"{self.best}"
        if self.best_as_saved is not None:
            best += f" with recalibrated BatchNorm statistics, {self.best_as_saved.formatted()} as saved"
        return (
            f"the soup ({self.soup}) is {verdict} its best ingredient {self.best_label} ({best}) on "
            f"{self.soup.split}: {self.soup.difference(self.best)}, {direction} is better"
        )


def compare_to_best(
    soup: Score, labels: Sequence[str], scores: Sequence[Score], as_saved: Sequence[Score | None] | None = None
) -> Comparison:
    """Compare ``soup`` with the best of ``scores`` (first one on ties).

    ``as_saved[i]``, when given and not None, is ingredient ``i``'s score before BN
    recalibration, where ``scores[i]`` is the recalibrated one.
    """
    best = 0
    for i, score in enumerate(scores):
        if score.better_than(scores[best]):
            best = i
    saved = as_saved[best] if as_saved is not None else None
    return Comparison(soup=soup, best=scores[best], best_label=labels[best], best_as_saved=saved)


@dataclass
class _Batch:
    inputs: Inputs
    labels: torch.Tensor | None  # class indices; None for language modelling (targets are the inputs)


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

    Attributes:
        examples: how many examples (images, texts) are scored; 0 for task custom.

    Raises:
        EvalError: for data, columns, labels or configs that cannot be used.
    """

    def __init__(
        self,
        spec: EvalSpec,
        reference: Checkpoint,
        *,
        split: str | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        self.spec = spec
        self.trust_remote_code = trust_remote_code
        self.split = split or spec.split
        self.device = torch.device(device)
        self.reference = reference.label
        config = reference.config
        if config is None:
            raise EvalError(
                f"{reference.label}: no config.json beside the weights, so the architecture to evaluate is unknown",
                hint="evaluate a folder saved by timm (save_for_hf/push_to_hf_hub) or transformers (save_pretrained)",
            )
        self._config: dict[str, Any] = config
        self._family = _family(config, reference.label)
        self._sidecars = list(reference.sidecars)
        self._model: nn.Module | None = None
        self._function: Callable[[nn.Module], float] | None = None
        self._batches: list[_Batch] = []
        self.examples = 0
        if spec.task == "custom":
            assert spec.function is not None  # EvalSpec validates it
            if not trust_remote_code:
                raise UntrustedCodeError(
                    f"eval function {spec.function} is code to run; refusing to import it without --trust-remote-code",
                    hint=UntrustedCodeError.HINT,
                )
            self._function = load_function(spec.function)
        elif spec.task == "image-classification":
            self._batches = self._image_batches()
        else:
            self._batches = self._text_batches()

    # -- models --------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh instance of the reference's architecture, float32, eval mode, on the device."""
        if self._family == "timm":
            import timm

            config_dir = next(p.parent for p in self._sidecars if p.name == "config.json")
            model = timm.create_model(f"local-dir:{config_dir}", pretrained=False)
        else:
            model = self._transformers_model()
        return model.float().eval().to(self.device)

    def _transformers_model(self) -> nn.Module:
        import transformers

        with _sidecar_dir(self._sidecars) as folder, self._custom_code_refused():
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        if self.spec.task == "text-classification":
            auto: Any = transformers.AutoModelForSequenceClassification
        elif self.spec.task == "causal-lm":
            auto = transformers.AutoModelForCausalLM
        else:
            auto = next(
                (getattr(transformers, a) for a in config.architectures or [] if hasattr(transformers, a)),
                transformers.AutoModel,
            )
        try:
            with self._custom_code_refused():
                return auto.from_config(config, dtype=torch.float32, trust_remote_code=self.trust_remote_code)
        except ValueError as exc:
            raise EvalError(f"{self.reference}: cannot build a model for task {self.spec.task}: {exc}") from None

    @contextmanager
    def _custom_code_refused(self) -> Iterator[None]:
        """transformers' refusal of a config's custom code (``auto_map``), as one line naming our flag."""
        try:
            yield
        except ValueError as exc:
            if self.trust_remote_code or "trust_remote_code" not in str(exc):
                raise
            raise UntrustedCodeError(
                f"{self.reference}: its config names custom model code (auto_map); refusing to run it without "
                "--trust-remote-code",
                hint="read the code in the ingredient's repo first; then pass --trust-remote-code",
            ) from None

    def model_with(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """The evaluator's reused model instance with ``state_dict`` loaded strictly."""
        if self._model is None:
            self._model = self.build_model()
        load_state_dict_strict(self._model, state_dict, self.reference)
        return self._model

    # -- scoring -------------------------------------------------------------------------

    def score(self, model: nn.Module) -> Score:
        """Score ``model`` (put in eval mode) on this split."""
        if self._function is not None:
            model.eval()
            with torch.inference_mode():
                value = float(self._function(model))
            return self._score(value, self.spec.function or "custom", 0)
        return self.score_outputs(self.predict(model))

    def score_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Score:
        """Score a state dict (canonical keys, any floating dtype) in the reused model instance."""
        return self.score(self.model_with(state_dict))

    def predict(self, model: nn.Module) -> torch.Tensor:
        """Every output the metric needs, in data order, on the CPU: class probabilities ``[N, C]``
        or, for language models, each target token's probability (float64, flattened).

        Averaging these over models gives the output ensemble's.
        """
        if self._function is not None:
            raise EvalError("task custom has no model outputs to ensemble", hint="drop ensemble_reference")
        forward = _token_probabilities if self.spec.task == "causal-lm" else _class_probabilities
        model.eval()
        with torch.inference_mode():
            return torch.cat([forward(model, batch.inputs).cpu() for batch in self._batches])

    def score_outputs(self, outputs: torch.Tensor) -> Score:
        """The metric of :meth:`predict`'s outputs (of one model, or averaged over several)."""
        if self.spec.task == "causal-lm":
            value = math.exp(-outputs.log().mean().item())
            return self._score(value, "perplexity", self.examples)
        labels = torch.cat([b.labels for b in self._batches if b.labels is not None])
        value = (outputs.argmax(dim=-1) == labels.cpu()).double().mean().item()
        return self._score(value, "accuracy", self.examples)

    def ensemble_score(self, state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> Score:
        """Score of the output ensemble: outputs (probabilities) averaged over the models."""
        return self.ensemble_of_outputs([self.predict(self.model_with(sd)) for sd in state_dicts])

    def ensemble_of_outputs(self, outputs: Sequence[torch.Tensor]) -> Score:
        """Score of the mean of several models' :meth:`predict` outputs."""
        return self.score_outputs(torch.stack(list(outputs)).mean(dim=0))

    def _score(self, value: float, metric: str, examples: int) -> Score:
        # built-in metrics have their own direction; the spec's declares a custom function's
        higher = self.spec.higher_is_better if self.spec.task == "custom" else metric == "accuracy"
        return Score(value, metric, higher, examples, self.split, self.spec.data)

    # -- BatchNorm recalibration --------------------------------------------------------

    def unlabelled_batches(self, n: int) -> list[Inputs]:
        """The first ``n`` cached input batches (fewer if the split is smaller), for BN recalibration.

        The examples are in a fixed shuffled order (see :func:`_example_order`), so these
        batches are a sample of every class, not the first classes of a sorted folder.
        """
        if self._function is not None:
            raise EvalError(
                "recalibrate_bn needs eval inputs, and task custom has none",
                hint="use an image/text task for the BN data, or recalibrate inside your function",
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
        if not recalibrate_bn(model, batches):
            return None
        result = dict(state_dict)
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    key = f"{name}.{buffer_name}" if name else buffer_name
                    if key in result:
                        result[key] = buffer.detach().to("cpu", result[key].dtype, copy=True)
        return result

    # -- data ----------------------------------------------------------------------------

    def _image_batches(self) -> list[_Batch]:
        """Decode and transform every image once, with the transform from the model's own config."""
        if self._family != "timm":
            raise EvalError(
                "task image-classification supports timm models; this is a transformers model",
                hint="use task custom with a function that runs your image processor",
            )
        from timm.data import ImageDataset, create_transform, resolve_data_config

        self._model = self.build_model()
        data_config = resolve_data_config(model=self._model)
        transform = create_transform(**data_config)
        mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        source = self._open_source(allow_image_folder=True)
        if isinstance(source, Path):
            dataset = ImageDataset(
                str(source), input_img_mode=mode, transform=transform, class_map=self._class_map(source)
            )
            if len(dataset) == 0:
                raise EvalError(f"{source}: no images found in class folders", hint="lay out images as <class>/<image>")
            indices = _example_order(len(dataset), self.spec.limit)
            samples = (dataset[i] for i in indices)
        else:
            table = self._check_columns(source, (self.spec.image_column, self.spec.label_column))
            indices = _example_order(len(table), self.spec.limit)
            table = _decoded_images(table.select(indices), self.spec.image_column)
            samples = (
                (transform(row[self.spec.image_column].convert(mode)), self._label(row[self.spec.label_column]))
                for row in table
            )
        batches: list[_Batch] = []
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for image, label in samples:
            images.append(image)
            labels.append(label)
            if len(images) == self.spec.batch_size:
                batches.append(self._image_batch(images, labels))
                images, labels = [], []
        if images:
            batches.append(self._image_batch(images, labels))
        self.examples = len(indices)
        self._check_labels(batches)
        logger.info(
            "eval data: %d images from %s (%s), input %s",
            self.examples,
            self.spec.data,
            self.split,
            data_config["input_size"],
        )
        return batches

    def _image_batch(self, images: list[torch.Tensor], labels: list[int]) -> _Batch:
        return _Batch(torch.stack(images).to(self.device), torch.tensor(labels, device=self.device))

    def _class_map(self, folder: Path) -> dict[str, int] | None:
        """Folder name -> class index from the model's ``label_names`` when they name every folder;
        otherwise ``None``: timm's convention (class folders in natural sort order)."""
        names = self._config.get("label_names") or self._config.get("pretrained_cfg", {}).get("label_names")
        folders = {p.name for p in folder.iterdir() if p.is_dir()}
        if names and folders <= set(names):
            return {name: i for i, name in enumerate(names)}
        return None

    def _text_batches(self) -> list[_Batch]:
        """Tokenize every text once with the ingredient's own tokenizer, padded per batch."""
        if self._family != "transformers":
            raise EvalError(f"task {self.spec.task} needs a transformers model; {self.reference} is a timm model")
        import transformers

        with _sidecar_dir(self._sidecars) as folder:
            try:
                with self._custom_code_refused():
                    tokenizer = transformers.AutoTokenizer.from_pretrained(
                        folder, trust_remote_code=self.trust_remote_code
                    )
            except (OSError, ValueError) as exc:
                raise EvalError(
                    f"{self.reference}: cannot load its tokenizer ({exc})",
                    hint="the ingredient folder must hold its tokenizer files (tokenizer.json or vocab files)",
                ) from None
        language_model = self.spec.task == "causal-lm"
        if language_model and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise EvalError(
                    f"{self.reference}: the tokenizer has neither a pad nor an eos token to pad batches with"
                )
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the loss
        tokenizer.padding_side = "right"
        columns = (self.spec.text_column,) if language_model else (self.spec.text_column, self.spec.label_column)
        source = self._open_source(allow_image_folder=False)
        table = self._check_columns(source, columns)
        table = table.select(_example_order(len(table), self.spec.limit))
        texts = [str(t) for t in table[self.spec.text_column]]
        labels = None if language_model else [self._label(v) for v in table[self.spec.label_column]]
        max_length = min(tokenizer.model_max_length, _max_positions(self._config))
        batches = []
        scored_tokens = 0  # for perplexity: every token after the first of each text
        for start in range(0, len(texts), self.spec.batch_size):
            encoded = tokenizer(
                texts[start : start + self.spec.batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
                # a language model scores tokens alone; GPT-2 would add token-type embeddings
                return_token_type_ids=False if language_model else None,
            )
            inputs = {k: v.to(self.device) for k, v in encoded.items()}
            scored_tokens += int(encoded["attention_mask"][:, 1:].sum())
            batch_labels = (
                None
                if labels is None
                else torch.tensor(labels[start : start + self.spec.batch_size], device=self.device)
            )
            batches.append(_Batch(inputs, batch_labels))
        self.examples = len(texts)
        if language_model and scored_tokens == 0:
            raise EvalError(f"{self.spec.data} ({self.split}): no text has two tokens or more; perplexity is undefined")
        self._check_labels(batches)
        logger.info("eval data: %d texts from %s (%s)", self.examples, self.spec.data, self.split)
        return batches

    def _open_source(self, *, allow_image_folder: bool) -> Any:
        """The split as an image folder (a ``Path``) or a ``datasets.Dataset``.

        A local ``data`` path may be: a ``DatasetDict.save_to_disk`` folder; a folder with one
        subfolder per split (``data/<split>``), each an image folder or a ``save_to_disk`` dataset;
        a single image folder or saved dataset (then only ``spec.split`` refers to it, so a test split
        can never silently reuse the selection data); or data files ``datasets`` can split by name
        (``data/<split>-*.parquet``). Anything else is a Hub dataset repo id.
        """
        path = Path(self.spec.data).expanduser()
        if not path.exists():
            return self._hub_dataset()
        if (path / _SAVED_DATASET_DICT).is_file():
            splits = _import_datasets().load_from_disk(str(path))
            if self.split not in splits:
                raise EvalError(f"{path}: no split {self.split!r}; it has {', '.join(splits)}")
            return splits[self.split]
        folder = path / self.split
        if not folder.is_dir() and (_is_image_folder(path) or (path / _SAVED_DATASET).is_file()):
            if self.split != self.spec.split:
                raise EvalError(
                    f"{path} holds one split, already used as {self.spec.split!r}; there is no {path / self.split}",
                    hint=f"put each split in its own folder: {path}/<split>/<class>/<image>",
                )
            folder = path
        if (folder / _SAVED_DATASET).is_file():
            return _import_datasets().load_from_disk(str(folder))
        if folder.is_dir() and _is_image_folder(folder):
            if not allow_image_folder:
                raise EvalError(f"{folder} is an image folder, but task {self.spec.task} reads text")
            return folder  # read with timm, no datasets needed
        try:
            return _import_datasets().load_dataset(str(path), split=self.split)
        except (ValueError, FileNotFoundError) as exc:
            raise EvalError(f"{path}: cannot read split {self.split!r} as a dataset ({exc})") from None

    def _hub_dataset(self) -> Any:
        datasets = _import_datasets()
        try:
            return datasets.load_dataset(self.spec.data, split=self.split)
        except datasets.exceptions.DatasetNotFoundError as exc:
            raise EvalError(
                f"eval data {self.spec.data!r} is neither a local path nor a Hub dataset ({exc})",
                hint="pass an image folder, a saved dataset, or a Hub dataset repo id you can access",
            ) from None
        except ValueError as exc:  # datasets' "Unknown split" and friends
            raise EvalError(f"Hub dataset {self.spec.data}: cannot load split {self.split!r} ({exc})") from None

    def _check_columns(self, table: Any, columns: Sequence[str]) -> Any:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise EvalError(
                f"{self.spec.data} ({self.split}) has no column {missing[0]!r}; columns: {', '.join(table.column_names)}",
                hint="set image_column / text_column / label_column in the eval section",
            )
        return table

    def _label(self, value: Any) -> int:
        """A class index from an int label or a class name the model's config knows."""
        if isinstance(value, (int, bool)) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        config = self._config
        names = config.get("label2id") or {n: i for i, n in enumerate(config.get("label_names") or [])}
        if isinstance(value, str) and value in names:
            return int(names[value])
        raise EvalError(
            f"label {value!r} in column {self.spec.label_column!r} is not a class index, nor a class name of {self.reference}",
            hint="use integer labels in the model's class order",
        )

    def _check_labels(self, batches: Sequence[_Batch]) -> None:
        """Labels outside the model's classes mean the eval set does not match the model."""
        classes = _num_classes(self._config)
        labels = [b.labels for b in batches if b.labels is not None]
        if classes is None or not labels:
            return
        low, high = int(torch.cat(labels).min()), int(torch.cat(labels).max())
        if low < 0 or high >= classes:
            raise EvalError(
                f"{self.spec.data} ({self.split}) has labels {low}..{high}, but {self.reference} has {classes} classes",
                hint="the eval set's classes must be the model's classes, in the model's order",
            )


def recalibrate_bn(model: nn.Module, batches: Iterable[Inputs]) -> bool:
    """Recompute BatchNorm running statistics on ``batches``, as ``torch.optim.swa_utils.update_bn`` does.

    Averaged running statistics are not the statistics of the averaged network;
    re-estimating them on unlabelled inputs is what makes many BN soups work.
    This calls ``update_bn`` itself (stats reset, cumulative average with
    ``momentum=None``, momenta and train/eval mode restored), without autograd,
    feeding keyword inputs (transformers batches) through a small adapter.

    Returns:
        False (and leaves the model untouched) if it has no BatchNorm layer.
    """
    if not has_batchnorm(model):
        return False
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, _KeywordInputs(model))
    return True


def has_batchnorm(model: nn.Module) -> bool:
    """True if any module is a BatchNorm layer (what ``update_bn`` recalibrates)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


class _KeywordInputs(nn.Module):
    """Lets ``update_bn``, which calls ``model(batch)``, run models that take keyword tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # update_bn restores the mode it finds on the module it is given

    def forward(self, inputs: Inputs) -> Any:
        return self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], label: str) -> None:
    """``load_state_dict(strict=True)``, except that a missing key tied to a loaded one is fine.

    transformers saves tied weights once (``lm_head.weight`` is ``wte.weight``), so a
    saved state dict legitimately lacks the alias; anything else missing or extra is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state_dict if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        details = []
        if missing:
            details.append(f"{len(missing)} model keys are missing, e.g. {missing[0]!r}")
        if result.unexpected_keys:
            details.append(
                f"{len(result.unexpected_keys)} keys are not in the model, e.g. {result.unexpected_keys[0]!r}"
            )
        raise EvalError(
            f"the weights do not fit the architecture of {label}'s config: " + "; ".join(details),
            hint="the config.json beside the first ingredient must describe the ingredients' architecture",
        )


def load_function(ref: str) -> Callable[[nn.Module], float]:
    """Import ``module:function`` or ``path/to/file.py:function`` for task custom."""
    module_name, _, name = ref.partition(":")
    if not module_name or not name:
        raise EvalError(f"function {ref!r} must look like 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise EvalError(
            f"cannot import the eval function's module {module_name!r} ({exc})",
            hint="pass an importable module, or a file path like ./my_eval.py:score",
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise EvalError(f"{module_name} has no function {name!r}")
    return function


def _family(config: dict[str, Any], label: str) -> str:
    """``timm`` or ``transformers``, from what each library writes into config.json."""
    library, _ = detect_library(config)
    if library is not None:
        return library
    raise EvalError(
        f"{label}: config.json is neither timm's (no 'architecture') nor transformers' (no 'model_type')",
        hint="use task custom with your own function, or save the model with timm or transformers",
    )


def _num_classes(config: dict[str, Any]) -> int | None:
    if "model_type" in config:
        labels = config.get("id2label")
        return len(labels) if labels else config.get("num_labels")
    return config.get("num_classes")


def _max_positions(config: dict[str, Any]) -> int:
    """The longest input the model takes (texts are truncated to it)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 1 << 30


def _example_order(total: int, limit: int | None) -> list[int]:
    """The examples to score, in a fixed pseudo-random order (its first ``limit`` with a limit).

    Not the stored order: image folders and many datasets are sorted by class, so the
    first N examples, and the first batches BatchNorm is recalibrated on, would cover
    a few classes only (measured: 4 class-sorted batches of digits cost a soup 2 points).
    """
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0)).tolist()
    return order[:limit] if limit is not None else order


def _class_probabilities(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return torch.softmax(_logits(model, inputs).float(), dim=-1)


def _token_probabilities(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Each next token's probability under the model, for positions that are not padding."""
    assert isinstance(inputs, dict)
    logits = _logits(model, inputs)[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return log_probs.double().exp()[inputs["attention_mask"][:, 1:].bool()]


def _logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output.logits if hasattr(output, "logits") else output


def _is_image_folder(folder: Path) -> bool:
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    return any(p.suffix.lower() in extensions for p in folder.glob("*/*"))


def _decoded_images(table: Any, column: str) -> Any:
    """Make ``datasets`` decode ``column`` to PIL images (parquet files often store raw ``{bytes, path}``)."""
    datasets = _import_datasets()
    if not isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image())
    return table


def _import_datasets() -> Any:
    """``datasets``, its progress bars off when huggingface_hub's are (the CLI's switch: quiet, CI, no terminal)."""
    try:
        import datasets
    except ImportError:
        raise EvalError("evaluation data needs the datasets package", hint="pip install 'hub-soup[eval]'") from None
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        datasets.disable_progress_bars()
    return datasets


@contextmanager
def _sidecar_dir(sidecars: Sequence[Path]) -> Iterator[str]:
    """A temporary folder holding the reference's config and tokenizer files, for ``from_pretrained``.

    Copying the few small files makes one folder ``transformers`` can read wherever the
    sidecars live (a Hub snapshot, a local folder), without touching the weights.
    """
    with tempfile.TemporaryDirectory(prefix="hub-soup-eval-") as folder:
        for path in sidecars:
            shutil.copyfile(path, Path(folder) / path.name)
        yield folder
