"""The side files that travel with a checkpoint's weights, in one place.

The reader finds them beside the weights, the fetcher downloads them with the
weights, and the writer copies them (config, tokenizer, preprocessor) so the
soup loads exactly like its ingredients. Which files are weights is each
format's business (:mod:`hub_soup.io.formats`).
"""

from __future__ import annotations

import fnmatch

# Files that travel with the weights so the soup loads like its ingredients.
SIDECAR_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "image_processor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "*.py",  # custom model code a config's auto_map names: carried, and run only with trust_remote_code
)


# Side files that belong together: a soup takes each group from one ingredient, so a
# tokenizer.json never meets another model's tokenizer_config.json.
CONFIG_FILES = ("config.json", "generation_config.json")
PROCESSOR_FILES = (
    "preprocessor_config.json", "image_processor_config.json", "processor_config.json", "feature_extractor_config.json"
)


def sidecar_group(name: str) -> str:
    """``config``, ``processor`` or ``tokenizer``: which group a side file belongs to."""
    if name in CONFIG_FILES or name.endswith(".py"):  # code defines the config's classes: it goes with it
        return "config"
    if name in PROCESSOR_FILES:
        return "processor"
    return "tokenizer"


def is_sidecar(name: str) -> bool:
    """True for a top-level config/tokenizer/preprocessor file a soup carries along."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in SIDECAR_PATTERNS)

