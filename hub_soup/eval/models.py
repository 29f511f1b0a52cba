"""Models to score: the reference ingredient's architecture, built by the library that saved it.

Every candidate is streamed strictly (:class:`ModelSink`) into one instance built
from the reference's own ``config.json`` (timm or transformers), in the dtype it
is scored in: a key the model does not expect is an error, never silently skipped. Custom model code named by a config
(``auto_map``) runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub_soup.errors import EvalError, UntrustedCodeError
from hub_soup.eval.placement import Placement, placed_build, weight_storage
from hub_soup.hub.library import detect_library
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import POSITION_BYTES, Sink


@dataclass(frozen=True)
class Architecture:
    """The reference ingredient's config and sidecar files (tokenizer too), and the library that reads them.

    Attributes:
        label: the reference ingredient's label, for messages.
        config: its ``config.json``.
        files: its small files beside the weights (config, tokenizer), by name: a path, or the file's text
            (a soup's own files, made before they are written).
        family: ``timm`` or ``transformers``.
        trust_remote_code: let transformers build models and tokenizers whose config names custom code.
    """

    label: str
    config: dict[str, Any]
    files: Mapping[str, str | Path]
    family: str
    trust_remote_code: bool = False

    @classmethod
    def of(cls, reference: Checkpoint, *, trust_remote_code: bool = False) -> Architecture:
        """The architecture ``reference``'s config.json describes.

        Raises:
            EvalError: no config.json, or one neither timm nor transformers wrote.
        """
        config = reference.config
        if config is None:
            raise EvalError(
                f"{reference.label}: no config.json beside the weights, so the architecture to evaluate is unknown",
                hint="evaluate a folder saved by timm (save_for_hf/push_to_hf_hub) or transformers (save_pretrained)",
            )
        library, _ = detect_library(config)
        if library is None:
            raise EvalError(
                f"{reference.label}: config.json is neither timm's (no 'architecture') nor transformers' "
                "(no 'model_type')",
                hint="use task custom with your own function, or save the model with timm or transformers",
            )
        return cls(reference.label, config, {p.name: p for p in reference.sidecars}, library, trust_remote_code)

    def written_as(self, files: Mapping[str, str | Path]) -> Architecture:
        """The model ``files`` describe instead (side files by name, a path or a text), read by this one's
        library: a soup scored as it is written, whose config (stacked layers, a chosen vocabulary's size) and
        tokenizer are not its reference's."""
        config = files.get("config.json")
        text = config.read_text() if isinstance(config, Path) else config
        return replace(self, config=json.loads(text) if text is not None else self.config, files=dict(files))

    def build(
        self, device: torch.device, auto_class: str | None = None, dtype: torch.dtype | None = None,
        placement: Placement | None = None,
    ) -> nn.Module:
        """A fresh instance in ``dtype`` (None: float32), eval mode, on ``device`` (or spread over devices as
        ``placement`` says), its weights left uninitialised (every one is streamed in before it is scored).

        The model is made in ``dtype`` on ``device`` from the start, never in float32 on the CPU first:
        a 7B model then needs its own size once, not twice that. transformers keeps what it keeps in
        float32 whatever the dtype (rotary frequencies), as ``from_pretrained`` does. A placed model is
        made on the meta device and dispatched by accelerate (:mod:`hub_soup.eval.placement`).

        ``auto_class`` names the transformers Auto class of the task (``AutoModelForCausalLM``);
        ``None`` takes the config's own ``architectures`` (timm ignores it).
        """
        dtype = dtype or torch.float32
        if placement is not None:
            model = placed_build(lambda: self._model(auto_class, dtype))
            return placement.dispatch(model, dtype, self.label).eval()
        with torch.device(device):
            return self._model(auto_class, dtype).eval()

    def _model(self, auto_class: str | None, dtype: torch.dtype) -> nn.Module:
        """The model in ``dtype``, made on the current default device (``with torch.device``, or meta)."""
        if self.family == "timm":
            import timm

            with self.sidecar_dir() as folder:
                return timm.create_model(f"local-dir:{folder}", pretrained=False).to(dtype)
        return self._transformers_model(auto_class, dtype)

    def _transformers_model(self, auto_class: str | None, dtype: torch.dtype) -> nn.Module:
        import transformers
        from transformers.initialization import no_init_weights

        with self.sidecar_dir() as folder, self.custom_code_refused():
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        if auto_class is not None:
            auto: Any = getattr(transformers, auto_class)
        else:
            auto = next(
                (getattr(transformers, a) for a in config.architectures or [] if hasattr(transformers, a)),
                transformers.AutoModel,
            )
        try:
            with self.custom_code_refused(), no_init_weights():
                if hasattr(auto, "from_config"):  # an Auto class
                    model = auto.from_config(config, dtype=dtype, trust_remote_code=self.trust_remote_code)
                else:  # the config's own class (LlamaForCausalLM), as the Auto classes build it
                    model = auto._from_config(config, dtype=dtype)
        except ValueError as exc:
            what = auto_class or "its architecture"
            raise EvalError(f"{self.label}: cannot build a model with {what}: {exc}") from None
        model.tie_weights()  # skipped with the initialisation; from_pretrained ties them after loading too
        return model

    def tokenizer(self, task: str) -> Any:
        """The reference's own tokenizer (from its sidecar files), for text task ``task``.

        Raises:
            EvalError: the model is not a transformers one, or its tokenizer files are missing or unreadable.
        """
        if self.family != "transformers":
            raise EvalError(f"task {task} needs a transformers model; {self.label} is a timm model")
        import transformers

        with self.sidecar_dir() as folder:
            try:
                with self.custom_code_refused():
                    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as exc:
                raise EvalError(
                    f"{self.label}: cannot load its tokenizer ({exc})",
                    hint="the ingredient folder must hold its tokenizer files (tokenizer.json or vocab files)",
                ) from None

    def num_classes(self) -> int | None:
        """How many classes the config's classifier has, when it says."""
        if self.family == "transformers":
            labels = self.config.get("id2label")
            return len(labels) if labels else self.config.get("num_labels")
        return self.config.get("num_classes")

    def max_positions(self) -> int:
        """The longest input the model takes (texts are truncated to it)."""
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        return 1 << 30

    @contextmanager
    def custom_code_refused(self) -> Iterator[None]:
        """transformers' refusal of a config's custom code (``auto_map``), as one line naming our flag."""
        try:
            yield
        except ValueError as exc:
            if self.trust_remote_code or "trust_remote_code" not in str(exc):
                raise
            raise UntrustedCodeError(
                f"{self.label}: its config names custom model code (auto_map); refusing to run it without "
                "--trust-remote-code",
                hint="read the code in the ingredient's repo first; then pass --trust-remote-code",
            ) from None

    @contextmanager
    def sidecar_dir(self) -> Iterator[str]:
        """A temporary folder holding the config and tokenizer files, for ``from_pretrained``.

        Copying the few small files makes one folder ``transformers`` (or timm) can read wherever the
        sidecars live (a Hub snapshot, a local folder, a soup's files not written yet), without touching the
        weights. ``config.json`` is :attr:`config`.
        """
        with tempfile.TemporaryDirectory(prefix="hub-soup-eval-") as folder:
            for name, file in self.files.items():
                if isinstance(file, Path):
                    shutil.copyfile(file, Path(folder) / name)
                else:
                    (Path(folder) / name).write_text(file, encoding="utf-8")
            (Path(folder) / "config.json").write_text(json.dumps(self.config))
            yield folder


class ModelSink:
    """A :class:`~hub_soup.merging.engine.Sink` that writes weights straight into a model's own tensors,
    chunk by chunk, each cast to the model's dtype and device there: a soup is scored without a copy
    of it anywhere else.

    The keys are checked once, strictly, as ``load_state_dict(strict=True)`` checks them, except that
    a model key tied to a streamed one may be absent: transformers saves tied weights once
    (``lm_head.weight`` is ``embed_tokens.weight``). A tensor the model ties to one already streamed
    takes the first one's values and later ones are dropped, as transformers' ``tie_weights`` keeps the
    input embeddings: the model then holds what ``from_pretrained`` of the written soup holds.

    A model accelerate placed (``eval.device_map``) reads an offloaded module's weights from its hook's
    weights map, not from its own (meta) tensors: those copies are written instead, each copy of a tied
    weight (accelerate offloads tied keys once per key), so the forward reads the streamed values.

    Raises:
        EvalError: keys missing or extra, or a shape the model does not have, naming the first.
    """

    def __init__(self, model: nn.Module, metas: Mapping[str, TensorMeta], label: str) -> None:
        own = model.state_dict(keep_vars=True)
        identity = {key: _identity(tensor) for key, tensor in own.items()}
        extra = [key for key in metas if key not in own]
        streamed = {identity[key] for key in metas if key in own}
        missing = [key for key in own if key not in metas and identity[key] not in streamed]
        details = []
        if missing:
            details.append(f"{len(missing)} model keys are missing, e.g. {missing[0]!r}")
        if extra:
            details.append(f"{len(extra)} keys are not in the model, e.g. {extra[0]!r}")
        if not details:
            details = [
                f"{key} is {list(meta.shape)}, the model's {list(own[key].shape)}"
                for key, meta in metas.items() if tuple(own[key].shape) != tuple(meta.shape)
            ][:1]
        if details:
            raise EvalError(
                f"the weights do not fit the architecture of {label}'s config: " + "; ".join(details),
                hint="the config.json beside the first ingredient must describe the ingredients' architecture",
            )
        # every copy of a weight the forward may read: tied keys offloaded by accelerate are stored once per key
        copies: dict[tuple[object, ...], dict[tuple[str, int], torch.Tensor]] = {}
        for key, tensors in weight_storage(model).items():
            group = copies.setdefault(identity[key], {})
            for tensor in tensors:
                group.setdefault((str(tensor.device), tensor.data_ptr()), tensor)
        self._targets: dict[str, list[torch.Tensor]] = {}
        claimed: set[tuple[object, ...]] = set()
        for key in metas:
            first = identity[key] not in claimed
            self._targets[key] = [t.view(-1) for t in copies[identity[key]].values()] if first else []
            claimed.add(identity[key])
        self._flat: list[torch.Tensor] = []
        self._filled = 0
        self._metas = dict(metas)
        self._model = weakref.ref(model)
        _LAST_SINK[model] = self

    def begin(self, key: str) -> None:
        self._flat, self._filled = self._targets[key], 0

    def write(self, chunk: torch.Tensor) -> None:
        for flat in self._flat:
            flat[self._filled : self._filled + chunk.numel()].copy_(chunk)
        self._filled += chunk.numel()

    def holds_exactly(self) -> bool:
        """Whether reading the model back gives the streamed tensors bit for bit: the model has each in its
        streamed dtype (not cast to the eval dtype) and in storage of its own (no tied copy dropped)."""
        return all(
            targets and targets[0].dtype == self._metas[key].dtype for key, targets in self._targets.items()
        )

    def is_latest(self) -> bool:
        """No other sink has streamed into the model since this one: it still holds these weights (BatchNorm
        statistics as the evaluator left them)."""
        model = self._model()
        return model is not None and _LAST_SINK.get(model) is self

    def stream_back(self, sink: Sink) -> None:
        """Stream the model's tensors, in this sink's keys and order, into ``sink`` (on the CPU, in chunks of about
        :data:`~hub_soup.merging.engine.POSITION_BYTES`): only while :meth:`is_latest`, and exact where
        :meth:`holds_exactly`."""
        for key, targets in self._targets.items():
            sink.begin(key)
            flat = targets[0]
            step = max(POSITION_BYTES // flat.element_size(), 1)
            for begin in range(0, flat.numel(), step):
                sink.write(flat[begin : begin + step].to("cpu"))


# The sink that last streamed into each model: the model holds those weights until another one streams in.
_LAST_SINK: weakref.WeakKeyDictionary[nn.Module, ModelSink] = weakref.WeakKeyDictionary()


def _identity(tensor: torch.Tensor) -> tuple[object, ...]:
    """What tied tensors share: their memory, or, offloaded by accelerate (meta), the one parameter object."""
    return ("meta", id(tensor)) if tensor.is_meta else (str(tensor.device), tensor.data_ptr())


def logits(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a tensor batch (timm) or keyword tensors (transformers)."""
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output.logits if hasattr(output, "logits") else output


