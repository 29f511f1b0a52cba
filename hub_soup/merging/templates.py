"""The soup's chat template (mergekit's ``chat_template``), chosen from the models' tokenizer files.

``auto``: the template most models carry (mergekit 0.1.5's plurality, a tie going to the model
listed first, the base last); a model's name (an ingredient as the recipe names it, or ``base``):
that model's; anything with a ``{``: the template itself. mergekit's own named templates
(``chatml``, ``llama3``...) are files of mergekit's, which hub-soup does not ship: write the
template out instead. The soup carries it as ``chat_template.jinja``, where transformers reads it
first, and no other template file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from hub_soup.errors import RecipeError

# Files a tokenizer's chat template may be kept in, besides ``tokenizer_config.json``'s ``chat_template``.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def template_of(paths: Sequence[Path]) -> str | None:
    """A model's chat template, from its side files (``chat_template.jinja``, ``chat_template.json`` or
    ``tokenizer_config.json``; of several named templates, the ``default`` one)."""
    by_name = {p.name: p for p in paths}
    if "chat_template.jinja" in by_name:
        return by_name["chat_template.jinja"].read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name in by_name:
            template = json.loads(by_name[name].read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str) and template:
                return template
    return None


def choose_template(choice: str, models: Mapping[str, Sequence[Path]]) -> str | None:
    """The soup's chat template: ``choice`` as the recipe gives it, ``models`` each model's side files by name
    (ingredients in order, then ``base``). ``None``: ``auto`` and no model has one.

    Raises:
        RecipeError: a name that is no model of the merge, or a model without a template.
    """
    if choice == "auto":
        found = [t.strip() for t in (template_of(paths) for paths in models.values()) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if "{" in choice:
        return choice
    if choice not in models:
        raise RecipeError(
            f"chat_template: {choice!r} is none of the models merged, nor a template",
            hint="give auto, an ingredient as the recipe names it (or base), or the template itself (Jinja)",
        )
    template = template_of(models[choice])
    if template is None:
        raise RecipeError(f"chat_template: {choice} has no chat template", hint="name a model that has one, or auto")
    return template


def with_template(files: dict[str, str | Path], template: str) -> dict[str, str | Path]:
    """The soup's side files carrying ``template`` as ``chat_template.jinja``, and no other template."""
    files = {name: f for name, f in files.items() if name not in TEMPLATE_FILES}
    if "tokenizer_config.json" in files:
        given = files["tokenizer_config.json"]
        config = json.loads(given.read_text(encoding="utf-8") if isinstance(given, Path) else given)
        if config.pop("chat_template", None) is not None:
            files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    files["chat_template.jinja"] = template
    return files
