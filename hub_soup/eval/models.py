"""Models to score: the reference ingredient's architecture, built by the library that saved it.

Every candidate state dict is loaded strictly into an instance built from the
reference's own ``config.json`` (timm or transformers): a key the model does not
expect is an error, never silently skipped. Custom model code named by a config
(``auto_map``) runs only with ``trust_remote_code``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hub_soup.errors import EvalError, UntrustedCodeError
from hub_soup.hub.card import detect_library
from hub_soup.io.read import Checkpoint


@dataclass(frozen=True)
class Architecture:
    """The reference ingredient's config and sidecar files (tokenizer too), and the library that reads them.

    Attributes:
        label: the reference ingredient's label, for messages.
        config: its ``config.json``.
        sidecars: its small files beside the weights (config, tokenizer).
        family: ``timm`` or ``transformers``.
        trust_remote_code: let transformers build models and tokenizers whose config names custom code.
    """

    label: str
    config: dict[str, Any]
    sidecars: tuple[Path, ...]
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
        return cls(reference.label, config, tuple(reference.sidecars), library, trust_remote_code)

    def build(self, device: torch.device, auto_class: str | None = None) -> nn.Module:
        """A fresh, randomly initialised instance: float32, eval mode, on ``device``.

        ``auto_class`` names the transformers Auto class of the task (``AutoModelForCausalLM``);
        ``None`` takes the config's own ``architectures`` (timm ignores it).
        """
        if self.family == "timm":
            import timm

            config_dir = next(p.parent for p in self.sidecars if p.name == "config.json")
            model = timm.create_model(f"local-dir:{config_dir}", pretrained=False)
        else:
            model = self._transformers_model(auto_class)
        return model.float().eval().to(device)

    def _transformers_model(self, auto_class: str | None) -> nn.Module:
        import transformers

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
            with self.custom_code_refused():
                return auto.from_config(config, dtype=torch.float32, trust_remote_code=self.trust_remote_code)
        except ValueError as exc:
            what = auto_class or "its architecture"
            raise EvalError(f"{self.label}: cannot build a model with {what}: {exc}") from None

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

        Copying the few small files makes one folder ``transformers`` can read wherever the
        sidecars live (a Hub snapshot, a local folder), without touching the weights.
        """
        with tempfile.TemporaryDirectory(prefix="hub-soup-eval-") as folder:
            for path in self.sidecars:
                shutil.copyfile(path, Path(folder) / path.name)
            yield folder


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


def logits(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a tensor batch (timm) or keyword tensors (transformers)."""
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output.logits if hasattr(output, "logits") else output


