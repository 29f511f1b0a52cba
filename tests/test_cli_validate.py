"""``hub-soup validate``: recipe files checked as ``run`` reads them, one line each, exit 2 if any is bad."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT

ROOT = Path(__file__).resolve().parent.parent
GOOD = "ingredients: [{ref: org/a}, {ref: org/b}, {ref: org/c}]\npush: {repo_id: org/soup}\n"
CODE = "ingredients: [{ref: a}, {ref: b}]\ngreedy: true\neval: {task: custom, data: d, function: 'f.py:score'}\npush: {repo_id: org/soup}\n"
TYPO = "ingredients: [{ref: org/a}, {ref: org/b}]\noutput: {path: soup}\nmethd: uniform\n"


def _validate(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> tuple[int, list[str], list[str]]:
    code = main(["validate", *map(str, paths)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def test_every_example_recipe_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    code, out, err = _validate(capsys, *recipes)
    assert code == 0 and err == [], err
    assert [line.split(": ok (")[0] for line in out] == [str(p) for p in recipes]
    timm = next(line for line in out if "timm-uniform.yaml" in line)
    assert timm.endswith(f"ok (2 ingredients, uniform, writes {ROOT / 'soups' / 'vit-b16-soup'}, "
                         "pushes to your-name/vit_base_patch16_224.soup)"), timm


@pytest.mark.parametrize(
    ("text", "summary"),
    [
        (GOOD, "3 ingredients, uniform, pushes to org/soup"),
        ("ingredients: [{ref: a, weight: 1}, {ref: b, weight: 3}]\nmethod: weighted\n",
         "2 ingredients, weighted, no output: run it with -o DIR"),
        (CODE, "2 ingredients, greedy uniform, scored by custom, pushes to org/soup, names code: run it with --trust-remote-code"),
    ],
)
def test_the_line_says_what_the_recipe_makes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, summary: str
) -> None:
    (tmp_path / "soup.yaml").write_text(text)
    code, out, err = _validate(capsys, tmp_path / "soup.yaml")
    assert code == 0 and err == []
    assert out == [f"{tmp_path / 'soup.yaml'}: ok ({summary})"]


def test_every_bad_file_gets_the_line_run_would_give(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, typo, missing = tmp_path / "good.yaml", tmp_path / "typo.yaml", tmp_path / "nowhere.yaml"
    good.write_text(GOOD)
    typo.write_text(TYPO)
    code, out, err = _validate(capsys, typo, good, missing)
    assert code == EXIT_BAD_INPUT
    assert out == [f"{good}: ok (3 ingredients, uniform, pushes to org/soup)"]  # the good one between them too
    errors = [line for line in err if ": error: " in line]
    assert errors[0] == f"hub-soup: error: {typo}:3: methd: Extra inputs are not permitted"
    assert errors[1].startswith(f"hub-soup: error: {missing}: cannot read the recipe")
    assert len(errors) == 2 and "Traceback" not in "\n".join(err)

    for path, line in ((typo, errors[0]), (missing, errors[1])):  # the same reading as `run`, the same words
        assert main(["run", str(path)]) == EXIT_BAD_INPUT
        assert line in capsys.readouterr().err.splitlines()


def test_a_base_for_a_method_that_uses_none_is_refused_with_the_adapter_field_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rule "a base only for a method that uses one" is the recipe's: ``validate`` sees it, at the base's
    line, and the hint names where the base of LoRA adapters goes."""
    recipe = tmp_path / "soup.yaml"
    recipe.write_text("ingredients: [{ref: org/a}, {ref: org/b}]\nmethod: uniform\nbase: {ref: org/base}\n")
    code, out, err = _validate(capsys, recipe)
    assert code == EXIT_BAD_INPUT and out == []
    assert err[0] == f"hub-soup: error: {recipe}:3: base: a base is given but method uniform uses none; drop base or " \
        "change the method"
    assert err[1].strip().startswith("hint:") and "adapter_base (--adapter-base)" in err[1]
