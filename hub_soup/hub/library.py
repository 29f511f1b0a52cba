"""What a ``config.json`` says a model is, in the Hub's words: the library that saved it and its pipeline tag.

The card states both (``library_name``, ``pipeline_tag``), and evaluation builds a
model with the library that saved it; neither depends on the other, so this module
depends on neither.
"""

from __future__ import annotations

from typing import Any

# The pipeline tag of a transformers model, by its class name's head (config.json's ``architectures``).
HEAD_TAGS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
)


def detect_library(config: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """``(library_name, pipeline_tag)`` from a ``config.json``: timm's has ``architecture``."""
    if not config:
        return None, None
    if "architecture" in config and "model_type" not in config:
        return "timm", "image-classification"
    if "model_type" in config:
        architectures = config.get("architectures") or []
        arch = architectures[0] if architectures else ""
        return "transformers", next((tag for head, tag in HEAD_TAGS if arch.endswith(head)), None)
    return None, None
