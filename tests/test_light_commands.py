"""Light commands answer without importing torch (~1.5 s): they need the recipe's types only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def _imported(*args: str) -> set[str]:
    """Top-level packages a fresh ``python -X importtime ...`` imports (importtime reports every import)."""
    command = [sys.executable, "-X", "importtime", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {name.split(".")[0] for name in rows}


COMMANDS = ["merge", "run", "verify", "inspect", "diagnose", "schema", "validate", "convert"]
MERGEKIT_CONFIG = str(Path(__file__).resolve().parent / "mergekit_configs" / "slerp_gradient.yml")


def test_every_command_is_checked() -> None:
    from hub_soup.cli import build_parser

    parser = build_parser()
    assert next(a for a in parser._actions if a.dest == "command").choices.keys() == set(COMMANDS)


@pytest.mark.parametrize(
    "command",
    [["schema"], ["--help"], ["--version"], ["validate", *RECIPES], ["validate", MERGEKIT_CONFIG],
     ["convert", MERGEKIT_CONFIG], *([name, "--help"] for name in COMMANDS)],
    ids=lambda c: " ".join(Path(a).name for a in c),
)
def test_light_command_imports_no_torch(command: list[str]) -> None:
    imported = _imported("-m", "hub_soup.cli", *command)
    assert "hub_soup" in imported  # the measurement sees our own imports
    assert "torch" not in imported


def test_import_hub_soup_and_validate_a_recipe_import_no_torch() -> None:
    code = "import hub_soup; hub_soup.Recipe.from_refs(['a', 'b'], output={'path': 'soup'})"
    assert "torch" not in _imported("-c", code)


def test_validating_every_built_in_tasks_section_imports_no_torch() -> None:
    """Validating a section imports its task's module, for the task's own fields: none imports torch at the top."""
    sections = [
        {"task": "image-classification", "data": "d", "image_column": "img"},
        {"task": "text-classification", "data": "d", "label_column": "y"},
        {"task": "causal-lm", "data": "d", "text_column": "t"},
        {"task": "custom", "function": "m:f", "higher_is_better": False},
        {"task": "lm-eval", "tasks": ["arc_easy"], "num_fewshot": 0},
    ]
    code = f"import hub_soup\nfor section in {sections!r}:\n    hub_soup.Recipe.from_refs(['a', 'b'], eval=section)"
    assert "torch" not in _imported("-c", code)
