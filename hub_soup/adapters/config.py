"""Which ingredients are PEFT adapters, their ``adapter_config.json``, and whether they can share one soup.

Everything here reads config files only (a few kB, over HTTP for Hub refs), so an
adapter of another base, or one trained with settings a soup cannot combine, stops
the run before any weights are downloaded, with the field and both values named.
Names follow PEFT's ``LoraConfig`` (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ...), and per-module patterns are matched the
way PEFT matches them (``peft.utils.other.get_pattern_key``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download

from hub_soup.errors import AdapterError, HubSoupError
from hub_soup.hub.errors import hub_errors
from hub_soup.hub.resolve import ResolvedRef

ADAPTER_CONFIG = "adapter_config.json"
# The weights PEFT's save_pretrained writes, safetensors first (a .bin is read with the usual pickle rules).
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Settings every adapter of a soup must share: the base they adapt, and what their saved tensors mean.
SHARED_FIELDS = ("base_model_name_or_path", "revision", "task_type", "fan_in_fan_out", "bias", "modules_to_save")

# LoRA variants whose delta is not ``scaling * B @ A`` (or that add tensors of another kind): refused, by name.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true) rescales each weight by a learned magnitude, so its delta is not B @ A",
    "lora_bias": "lora_bias: true adds a bias to lora_B",
    "target_parameters": "target_parameters adapts nn.Parameters (MoE experts), not modules",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "layer_replication": "layer_replication changes the base model's layers",
    "use_qalora": "QA-LoRA (use_qalora: true) pools the input before lora_A",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) activates the adapter only after given tokens",
    "use_bdlora": "BD-LoRA (use_bdlora) shares its factors in blocks",
}


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter's ``adapter_config.json``, as PEFT wrote it."""

    label: str
    raw: dict[str, Any]

    @property
    def base(self) -> str:
        """The model the adapter was trained on (``base_model_name_or_path``)."""
        return str(self.raw.get("base_model_name_or_path") or "")

    @property
    def revision(self) -> str | None:
        """The base's revision, when the adapter names one."""
        return self.raw.get("revision") or None

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling of ``module``'s delta: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``), per-module patterns
        honoured; ``rank`` is the module's rank in the weights, which must be the config's."""
        r = pattern_value(self.raw.get("rank_pattern") or {}, module, self.raw.get("r", 8))
        alpha = pattern_value(self.raw.get("alpha_pattern") or {}, module, self.raw.get("lora_alpha", 8))
        if r != rank:
            raise AdapterError(
                f"{self.label}: {module} has rank {rank} in its weights but r={r} in its {ADAPTER_CONFIG}",
                hint="the adapter's files do not belong together; download or save it again",
            )
        return alpha / math.sqrt(r) if self.raw.get("use_rslora") else alpha / r


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern matching ``module`` as PEFT matches it (``(.*\\.)?(pattern)$``), else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def is_adapter(ref: ResolvedRef) -> bool:
    """A PEFT adapter: a folder or Hub repo with an ``adapter_config.json``."""
    if ref.kind == "local":
        return ref.path is not None and (ref.path / ADAPTER_CONFIG).is_file()
    return ADAPTER_CONFIG in ref.files


def read_adapters(refs: Sequence[ResolvedRef], token: str | bool | None) -> list[AdapterConfig] | None:
    """The ingredients' adapter configs, checked to make one soup; None when they are full models.

    Raises:
        AdapterError: adapters mixed with full models, a LoRA variant a soup cannot combine, or settings
            (the base first) that differ, naming the field and both values.
    """
    kinds = [is_adapter(ref) for ref in refs]
    if not any(kinds):
        return None
    if not all(kinds):
        adapter, full = refs[kinds.index(True)], refs[kinds.index(False)]
        raise AdapterError(
            f"{adapter.label} is a LoRA adapter ({ADAPTER_CONFIG}) and {full.label} a full model: a soup is made "
            "of adapters of one base, or of full models",
            hint=f"merge the adapter into its base first (hub-soup merge {adapter.label} ... --merge-into-base), "
            "or leave it out",
        )
    configs = [read_config(ref, token) for ref in refs]
    for config in configs:
        _check_supported(config)
    check_compatible(configs)
    return configs


def with_adapter_weights(ref: ResolvedRef) -> ResolvedRef:
    """``ref`` naming its adapter weights file, so that only it (and the side files) is opened or downloaded."""
    present = (
        [name for name in ADAPTER_WEIGHTS if ref.path is not None and (ref.path / name).is_file()]
        if ref.kind == "local" else [name for name in ADAPTER_WEIGHTS if name in ref.files]
    )
    if not present:
        raise AdapterError(
            f"{ref.label}: has an {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}",
            hint="save the adapter with PEFT's save_pretrained, which writes both",
        )
    return replace(ref, filename=present[0])


def read_config(ref: ResolvedRef, token: str | bool | None) -> AdapterConfig:
    if ref.kind == "local":
        assert ref.path is not None
        path = ref.path / ADAPTER_CONFIG
    else:
        assert ref.repo_id is not None
        with hub_errors(ref.repo_id, ref.sha, action="download the adapter config of"):
            path = Path(hf_hub_download(ref.repo_id, ADAPTER_CONFIG, revision=ref.sha, token=token))
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{ref.label}: cannot read its {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{ref.label}: its {ADAPTER_CONFIG} is not a JSON object")
    return AdapterConfig(ref.label, raw)


def check_applied(ref: ResolvedRef, token: str | bool | None) -> AdapterConfig:
    """The config of an adapter applied to a model before merging (mergekit's ``model+lora``), checked to be
    a plain LoRA (the model it names is not checked: mergekit and PEFT apply an adapter to any model it fits).

    Raises:
        AdapterError: no adapter there, or a kind of adapter (DoRA, ...) whose delta is not ``scaling * B @ A``.
    """
    if not is_adapter(ref):
        raise AdapterError(
            f"{ref.label}: is applied as a LoRA adapter (model+lora) but has no {ADAPTER_CONFIG}",
            hint="name a PEFT adapter saved with save_pretrained (adapter_config.json and adapter_model.safetensors)",
        )
    config = read_config(ref, token)
    _check_kind(config, "applies", "merge the adapter into the model with PEFT (merge_and_unload) and name the result")
    return config


def _check_kind(config: AdapterConfig, does: str, hint: str) -> None:
    """A plain LoRA adapter: ``peft_type`` LORA and none of the variants of :data:`UNSUPPORTED`; ``does``: what
    hub-soup does with it (``makes soups of``), ``hint``: what to do instead."""
    kind = config.raw.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{config.label}: a {kind} adapter (peft_type); hub-soup {does} LoRA adapters only",
                           hint=hint)
    for field, why in UNSUPPORTED.items():
        if config.raw.get(field):
            raise AdapterError(f"{config.label}: {why}; hub-soup {does} plain LoRA adapters only", hint=hint)


def _check_supported(config: AdapterConfig) -> None:
    _check_kind(config, "makes soups of",
                "merge each adapter into the base with PEFT (merge_and_unload) and make a soup of the full models")
    if not config.base:
        raise AdapterError(
            f"{config.label}: its {ADAPTER_CONFIG} names no base model (base_model_name_or_path)",
            hint="set base_model_name_or_path to the model the adapter was trained on",
        )


def _shared(config: AdapterConfig, field: str) -> Any:
    """A shared field, in a form that compares as PEFT means it (an unset revision is ``main``)."""
    value = config.raw.get(field)
    if field == "revision":
        return value or "main"
    if field == "modules_to_save":
        return sorted(value) if value else None
    return value


def check_compatible(configs: Sequence[AdapterConfig]) -> None:
    """Stop when two adapters differ in a setting they must share (:data:`SHARED_FIELDS`), naming both values."""
    first = configs[0]
    for other in configs[1:]:
        for field in SHARED_FIELDS:
            ours, theirs = _shared(first, field), _shared(other, field)
            if ours != theirs:
                hint = (
                    "a soup averages adapters of one base model; give it only adapters trained on the same base"
                    if field in ("base_model_name_or_path", "revision")
                    else "the adapters' saved tensors mean different things; retrain or leave one out"
                )
                raise AdapterError(
                    f"the adapters cannot make one soup: {field} is {ours!r} in {first.label} and {theirs!r} in "
                    f"{other.label}",
                    hint=hint,
                )


def check_base(configs: Sequence[AdapterConfig], base: ResolvedRef) -> None:
    """A base given by the user (``--adapter-base``) must be the one the adapters name: the same repo, or a local
    folder."""
    if base.kind == "local":
        return
    named = configs[0].base
    if base.repo_id != named:
        raise AdapterError(
            f"the base {base.ref} is not the base the adapters were trained on: their {ADAPTER_CONFIG} names "
            f"{named!r} (base_model_name_or_path)",
            hint="drop --adapter-base (the adapters' own base is used), or pass a revision of that repo or a local "
            "copy of it",
        )


def base_error(configs: Sequence[AdapterConfig], exc: HubSoupError) -> AdapterError:
    """The adapters' own base could not be resolved: say which field named it and how to give another."""
    return AdapterError(
        f"the adapters' base {configs[0].base!r} (base_model_name_or_path in {ADAPTER_CONFIG}): {exc.message}",
        hint="pass --adapter-base REF: that repo (at a revision), or a local copy of it",
    )
