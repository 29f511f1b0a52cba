"""The config, tokenizer and preprocessor files a soup carries, and the check that they agree.

A soup must load like its ingredients, so it needs a ``config.json`` even when the
first ingredient is a bare ``.pth``: each group of side files (config, processor,
tokenizer; see :func:`hub_soup.io.files.sidecar_group`) comes from the first
ingredient that has one. Configs that disagree on the architecture describe
models a soup cannot be (a head count is invisible in tensor shapes), so they stop
the run with both values named.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub_soup.errors import AlignmentError
from hub_soup.io import files
from hub_soup.io.read import Checkpoint
from hub_soup.merging.vocab import SOURCE_HINT

logger = logging.getLogger(__name__)

# Config fields that define the network: not its labels or its head's size (heads for other label
# sets are averaged-around with --exclude), dtype or training settings.
ARCHITECTURE_FIELDS = (
    # timm (config.json written by save_for_hf / push_to_hf_hub)
    "architecture", "num_features", "global_pool", "model_args",
    # transformers (PretrainedConfig.to_dict)
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "vocab_size",
    "max_position_embeddings", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
)


@dataclass(frozen=True)
class SideFiles:
    """The side files a soup carries: file name -> path, and which ingredient each group came from."""

    paths: dict[str, Path]
    origins: dict[str, int]  # group -> index of the ingredient it came from

    @property
    def config_source(self) -> int | None:
        """The ingredient whose ``config.json`` the soup carries (and evaluation builds its model from)."""
        return self.origins.get("config") if "config.json" in self.paths else None


def choose_side_files(checkpoints: Sequence[Checkpoint], *, config: bool = True) -> SideFiles:
    """Each group of side files from the first ingredient that has one; says where each came from.

    ``config=False`` leaves the config group out (a PEFT adapter soup: PEFT reads its base's config).
    """
    paths: dict[str, Path] = {}
    origins: dict[str, int] = {}
    for index, checkpoint in enumerate(checkpoints):
        groups = {files.sidecar_group(p.name) for p in checkpoint.sidecars} - set(origins) - (set() if config else {"config"})
        for group in sorted(groups):
            origins[group] = index
            members = [p for p in checkpoint.sidecars if files.sidecar_group(p.name) == group]
            paths.update((p.name, p) for p in members)
            logger.info("%s: from %s", ", ".join(sorted(p.name for p in members)), checkpoint.label)
    if config and len(checkpoints) and "config" not in origins:
        logger.info("no ingredient has a config.json: the soup is weights only")
    return SideFiles(paths=paths, origins=origins)


def check_configs(configs: Sequence[tuple[str, dict[str, Any] | None]], *, by_token: bool = False) -> None:
    """Stop when two ingredients' configs disagree on an architecture field (ingredients without one are skipped).

    ``by_token``: the soup's vocabulary is chosen (its rows aligned by token), so ``vocab_size`` may differ.

    Raises:
        AlignmentError: naming the field and both values.
    """
    present = [(label, _architecture(config)) for label, config in configs if config is not None]
    if len(present) < 2:
        return
    first_label, first = present[0]
    for label, config in present[1:]:
        for field in ARCHITECTURE_FIELDS:
            if (by_token and field == "vocab_size") or (field == "tie_word_embeddings" and not first.get(field)):
                continue  # an untied soup reads a tied ingredient's head as its embeddings (layout_of)
            if field in first and field in config and first[field] != config[field]:
                raise AlignmentError(
                    f"the ingredients' configs describe different architectures: {field} is {first[field]!r} in "
                    f"{first_label} and {config[field]!r} in {label}",
                    hint="a soup averages fine-tunes of one model; check that every ingredient is the architecture "
                    "you mean",
                )


def check_vocab_sizes(configs: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
    """Stop when the ingredients' ``vocab_size`` differ and no vocabulary was chosen: row ``i`` of their
    embeddings is not one token, and the message names the option that aligns rows by token. Checked
    before tensor shapes, whose mismatch at the embeddings would say less.

    Raises:
        AlignmentError: naming each ingredient's ``vocab_size``, the hint each ``tokenizer_source``.
    """
    sizes = {label: config["vocab_size"] for label, config in configs if config is not None and "vocab_size" in config}
    if len(set(sizes.values())) > 1:
        said = ", ".join(f"{size} in {label}" for label, size in sizes.items())
        raise AlignmentError(
            f"the ingredients' vocabularies differ (vocab_size {said}): row i of their embeddings is not one token",
            hint=SOURCE_HINT,
        )


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The config's architecture fields; timm's ``model_args`` without the head size it repeats."""
    fields = {k: config[k] for k in ARCHITECTURE_FIELDS if k in config}
    if isinstance(fields.get("model_args"), dict):
        fields["model_args"] = {k: v for k, v in fields["model_args"].items() if k != "num_classes"}
    return fields
