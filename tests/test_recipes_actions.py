"""Recipes and GitHub Actions: soups as reviewed, reproducible files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, hf_hub_download

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.recipe import Recipe, load_recipe, parse_recipe
from tests.hub_fixtures import TEST_USER
from tests.hub_models import timm_folder, unique, upload

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "ingredients"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_recipe_validates_and_names_what_exists(path: Path) -> None:
    """What validation cannot see: each ref is a local path that exists from the recipe's folder or a well-formed
    Hub id, local eval data exists, and the output lands in the repository's ignored ``soups/``, beside no input."""
    recipe = load_recipe(path)
    for ingredient in [*recipe.ingredients, *([recipe.base] if recipe.base else [])]:
        local = recipe.base_dir / ingredient.ref
        assert local.exists() if ingredient.ref.startswith(".") else re.fullmatch(r"[\w.-]+/[\w.-]+", ingredient.ref)
    if recipe.eval is not None and recipe.eval.data is not None and recipe.eval.data.startswith((".", "/")):
        assert Path(recipe.eval.data).is_dir()
    assert recipe.output.path is not None
    assert Path(recipe.output.path).resolve().parent == ROOT / "soups"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("ingredients:\n  - ref: a\n  - ref: b\noutput:\n  path: o\n  colour: red\n",
         ":6: output.colour: Extra inputs are not permitted"),
        ("ingredients:\n  - ref: a\n    weight: 1\n  - ref: b\n    weight: -1\nmethod: weighted\noutput: {path: o}\n",
         ":5: ingredients.1.weight: -1 is negative, and method weighted averages the ingredients"),
        ("ingredients:\n  - ref: a\noutput: {path: o}\n", ":1: ingredients: a soup needs at least 2 ingredients"),
        ("ingredients: [{ref: a}, {ref: b}]\nmethod: average\noutput: {path: o}\n",
         (":2: method: unknown merge method 'average'; choose one of: arcee_fusion, breadcrumbs, breadcrumbs_ties, "
          "dare_linear, dare_ties, della, della_linear, karcher, linear, model_stock, multislerp, nearswap, nuslerp, "
          "passthrough, ram, ramplus_tl, sce, slerp, task_arithmetic, ties, uniform, weighted")),
        ("ingredients:\n  - ref: a\n    weight: .nan\n  - ref: b\nmethod: weighted\n",
         ":3: ingredients.0.weight: Input should be a finite number"),
        ("ingredients: [{ref: a}]\n", ":1: ingredients: a soup needs at least 2 ingredients, got 1"),  # no "Value error,"
        ("ingredients: [{ref: a}, {ref: b}]\ngreedy: true\noutput: {path: o}\n",
         ":2: greedy: true needs an eval section"),  # a rule of the whole recipe, at the line of the field it names
    ],
)
def test_bad_recipe_names_the_field_and_line(text: str, where: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "bad.yaml")
    assert str(info.value).startswith(f"bad.yaml{where}"), str(info.value)  # the file, the line, the field, the why


def test_bad_recipe_exits_2_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("ingredients: [{ref: a}, {ref: b}]\noutput: {path: o, shard: 1}\n")
    assert main(["run", str(recipe)]) == 2
    assert "r.yaml:2: output.shard: Extra inputs are not permitted" in capsys.readouterr().err


def test_dump_recipe_then_run_gives_the_same_soup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")]
    flags = [*refs, "--weights", "1", "3", "--dtype", "float32", "--exclude", "fc.*"]
    assert main(["--quiet", "merge", *flags, "-o", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    assert main(["merge", *flags, "-o", str(tmp_path / "recipe-out"), "--dump-recipe"]) == 0
    dumped = capsys.readouterr().out
    assert yaml.safe_load(dumped)["method"] == "weighted"
    (tmp_path / "r.yaml").write_text(dumped)
    assert not (tmp_path / "recipe-out").exists()  # --dump-recipe only prints
    assert main(["--quiet", "run", str(tmp_path / "r.yaml")]) == 0
    assert sha256(tmp_path / "cli" / "model.safetensors") == sha256(tmp_path / "recipe-out" / "model.safetensors")


def test_a_dumped_recipe_runs_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``merge m/ft0 m/ft1 --dump-recipe``, printed and saved elsewhere or written to ``sub/r.yaml``, then run
    from another folder: ``run`` reads a recipe's paths from its folder, so the dump writes them relative to
    FILE, or absolute when printed, and the soup is the merge's, byte for byte."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for i, name in enumerate(("ft-lr0.01", "ft-lr0.02-shift")):
        shutil.copytree(DIGITS / name, here / "m" / f"ft{i}")
    (here / "sub").mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    flags = ["m/ft0", "m/ft1", "--weights", "1", "3", "--exclude", "fc.*"]
    assert main(["--quiet", "merge", *flags, "-o", "direct"]) == 0
    assert main(["merge", *flags, "-o", "from-file", "--dump-recipe", "sub/r.yaml"]) == 0
    capsys.readouterr()
    assert main(["merge", *flags, "-o", "printed", "--dump-recipe"]) == 0
    (elsewhere / "r.yaml").write_text(capsys.readouterr().out)
    assert not (here / "from-file").exists() and not (here / "printed").exists()  # a dump makes no soup
    written = yaml.safe_load((here / "sub" / "r.yaml").read_text())
    assert [i["ref"] for i in written["ingredients"]] == ["../m/ft0", "../m/ft1"]
    assert written["output"]["path"] == "../from-file"
    printed = yaml.safe_load((elsewhere / "r.yaml").read_text())
    assert [i["ref"] for i in printed["ingredients"]] == [str(here / "m" / "ft0"), str(here / "m" / "ft1")]

    monkeypatch.chdir(elsewhere)
    assert main(["--quiet", "run", str(here / "sub" / "r.yaml")]) == 0
    assert main(["--quiet", "run", "r.yaml"]) == 0
    # the pinned recipe, too, where the paths were relative (absolute ones it keeps as written)
    for soup, names in (("from-file", ("hub-soup.yaml",)), ("printed", ())):
        for name in ("model.safetensors", "config.json", *names):
            assert (here / soup / name).read_bytes() == (here / "direct" / name).read_bytes(), (soup, name)


def test_dump_recipe_refuses_a_file_that_is_no_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--dump-recipe REF REF`` reads the first REF as FILE: a name that is not .yaml is refused, untouched."""
    refs = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    assert main(["merge", "--dump-recipe", str(notes), *refs, "-o", str(tmp_path / "soup")]) == 2
    assert "a recipe file's name ends in .yaml or .yml" in capsys.readouterr().err
    assert notes.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert main(["merge", *refs, "--dump-recipe", str(tmp_path / "no" / "r.yaml")]) == 2
    assert "there is no folder" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_recipe_paths_move_to_the_folder_a_recipe_is_written_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every local path a recipe names (ingredients, base, eval data, eval function, include_path, output) is
    rewritten for a file in another folder, or made absolute; Hub ids, absolute and ``~`` paths stay."""
    for folder in ("m/ft0", "base", "data", "tasks", "sub"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    fields = {"method": "task_arithmetic", "base": {"ref": "base"}, "output": {"path": "out"}}
    images = Recipe.from_refs(["m/ft0", "org/ft1", "~/ft2"], **fields,
                              eval={"task": "custom", "data": "data", "function": "f.py:score"})
    harness = Recipe.from_refs(["m/ft0", str(tmp_path / "m" / "ft0")], **fields,
                               eval={"task": "lm-eval", "tasks": ["mine"], "include_path": "tasks"})
    moved = images.with_paths_for(tmp_path / "sub")
    assert [i.ref for i in moved.ingredients] == ["../m/ft0", "org/ft1", "~/ft2"]
    assert moved.base is not None and moved.base.ref == "../base" and moved.output.path == "../out"
    assert moved.eval is not None and (moved.eval.data, moved.eval.function) == ("../data", "../f.py:score")
    moved = harness.with_paths_for(None)
    assert [i.ref for i in moved.ingredients] == [str(tmp_path / "m" / "ft0")] * 2
    assert moved.eval is not None and moved.eval.include_path == str(tmp_path / "tasks")
    # a file read from its folder names what the recipe named
    (tmp_path / "sub" / "r.yaml").write_text(images.with_paths_for(tmp_path / "sub").to_yaml())
    again = load_recipe(tmp_path / "sub" / "r.yaml")
    assert again.output.path == str(tmp_path / "out") and again.eval is not None
    assert again.eval.data == str(tmp_path / "data")
    assert (again.base_dir / again.ingredients[0].ref).resolve() == tmp_path / "m" / "ft0"


def test_pinned_recipe_rebuilds_a_bit_identical_soup_from_the_hub(hub_token: str, tmp_path: Path) -> None:
    api = HfApi(token=hub_token)
    repos = [f"{TEST_USER}/{unique(f'pin{i}')}" for i in (1, 2)]
    for i, repo in enumerate(repos):
        upload(api, timm_folder(tmp_path / f"f{i}", seed=20 + i), repo)
    soup_repo = f"{TEST_USER}/{unique('pinned-soup')}"
    assert main(["--quiet", "merge", *repos, "--push", soup_repo, "--token", hub_token, "-o", str(tmp_path / "s")]) == 0
    # the ingredients move on after the soup was made; the pinned recipe must not follow them
    upload(api, timm_folder(tmp_path / "later", seed=99), repos[0])

    recipe = Path(hf_hub_download(soup_repo, "hub-soup.yaml"))
    assert main(["--quiet", "run", str(recipe), "-o", str(tmp_path / "rebuilt"), "--token", hub_token]) == 0
    pushed = Path(hf_hub_download(soup_repo, "model.safetensors"))
    assert sha256(tmp_path / "rebuilt" / "model.safetensors") == sha256(pushed)


def test_step_summary_has_the_ingredient_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("CI", "true")
    refs = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-ls0.1")]
    assert main(["merge", *refs, "-o", str(tmp_path / "soup")]) == 0
    text = summary.read_text()
    assert "| # | ingredient | commit | weight | in the soup |" in text
    assert "ft-lr0.02-ls0.1` | local | 0.5000 | yes |" in text
    assert main(["merge", *refs, "-o", str(tmp_path / "soup")]) == 2  # output exists
    assert "## hub-soup failed (exit 2)" in summary.read_text()


def test_ci_mode_prints_no_progress_bars(tmp_path: Path) -> None:
    refs = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-ls0.1")]
    env = {"CI": "true", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", *refs, "-o", str(tmp_path / "soup")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "merging" not in done.stderr and "\r" not in done.stderr
    assert done.stdout.startswith("soup: 92 tensors")


def test_schema_lists_the_recipe_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"ingredients", "output", "push", "eval", "greedy"} <= set(schema["properties"])


def test_workflows_pass_actionlint() -> None:
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert actionlint, "actionlint is part of the test extras: pip install -e '.[test]'"
    workflows = sorted(str(p) for p in [*(ROOT / ".github" / "workflows").glob("*.yml"),
                                        *(ROOT / "examples" / "workflows").glob("*.yml")])
    assert len(workflows) >= 3
    done = subprocess.run([actionlint, "-no-color", *workflows], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_composite_action_runs_the_recipe() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    assert set(action["inputs"]) >= {"recipe", "hf-token"}
    script = "\n".join(step.get("run", "") for step in action["runs"]["steps"])
    assert 'hub-soup run "$RECIPE"' in script and "--isolated" in script
