"""The base listed among the ingredients, as mergekit's configs list ``base_model`` among ``models``.

mergekit leaves the base out of the task vectors; counted as an ingredient it would add a zero
task vector (halving a normalised task arithmetic, pulling Model Stock towards the base). For
every method with a base, the soup of a command or recipe that lists the base is bit for bit the
soup of the same command without it: weights, config, card and pinned recipe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

from hub_soup.cli import main
from hub_soup.merging.methods import get_method, method_names
from tests.hub_fixtures import TEST_TOKEN, TEST_USER
from tests.hub_models import timm_folder, unique, upload

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
BASE = DIGITS / "base"
FT = [DIGITS / "ingredients" / "ft-lr0.01", DIGITS / "ingredients" / "ft-lr0.02-shift"]
# Methods of a base and any number of fine-tunes (nearswap and arcee_fusion merge exactly one into the base).
WITH_BASE = [name for name in method_names() if get_method(name).needs_base and get_method(name).exact_ingredients is None]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _soup(tmp: Path, where: str, *argv: str | Path) -> dict[str, bytes]:
    """The files of the soup ``merge ARGV`` writes to ``tmp/where/soup`` (the same folder name each time)."""
    out = tmp / where / "soup"
    assert main(["merge", *map(str, argv), "-o", str(out)]) == 0
    return _files(out)


def test_every_method_with_a_base_is_covered() -> None:
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock"} <= set(WITH_BASE)


@pytest.mark.parametrize("method", WITH_BASE)
def test_a_listed_base_is_left_out_bit_for_bit(
    method: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Listed first, as mergekit configs do, and spelled another way (./path/, a trailing slash)."""
    plain = _soup(tmp_path, "plain", *FT, "--method", method, "--base", BASE)
    spelled = f"{BASE}/"
    with caplog.at_level("INFO", logger="hub_soup"):
        listed = _soup(tmp_path, "listed", spelled, *FT, "--method", method, "--base", BASE)
    assert listed == plain
    said = [r.getMessage() for r in caplog.records if "left out of the ingredients" in r.getMessage()]
    assert len(said) == 1 and "is the base" in said[0]


def test_normalised_task_arithmetic_is_not_halved(tmp_path: Path) -> None:
    """The issue's case: task_arithmetic with normalize: true, the base listed last, by a recipe file."""
    recipe = {
        "ingredients": [{"ref": str(FT[0]), "weight": 1.0}, {"ref": str(FT[1]), "weight": 1.0},
                        {"ref": str(BASE), "weight": 1.0}],
        "method": "task_arithmetic", "parameters": {"normalize": True}, "base": {"ref": str(BASE)},
        "output": {"path": str(tmp_path / "listed" / "soup")},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    recipe["ingredients"] = recipe["ingredients"][:2]
    recipe["output"] = {"path": str(tmp_path / "plain" / "soup")}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "p.yaml")]) == 0
    assert _files(tmp_path / "listed" / "soup") == _files(tmp_path / "plain" / "soup")


def test_the_base_on_the_hub_listed_at_its_commit(tmp_path: Path) -> None:
    """Hub refs are the same model when they resolve to one repo and commit: ``org/base@<sha>`` listed,
    ``org/base`` given as the base (a symlinked local copy of a fine-tune stays an ingredient's path)."""
    api = HfApi(token=TEST_TOKEN)
    repos = [f"{TEST_USER}/{unique(name)}" for name in ("lb-base", "lb-ft0", "lb-ft1")]
    shas = [upload(api, timm_folder(tmp_path / "m" / str(i), seed=i), repo) for i, repo in enumerate(repos)]
    plain = _soup(tmp_path, "plain", repos[1], repos[2], "--method", "task_arithmetic", "--base", repos[0])
    listed = _soup(tmp_path, "listed", repos[1], f"{repos[0]}@{shas[0]}", repos[2],
                   "--method", "task_arithmetic", "--base", repos[0])
    assert listed == plain


def test_a_symlink_to_the_base_is_the_base(tmp_path: Path) -> None:
    link = tmp_path / "base-link"
    link.symlink_to(BASE, target_is_directory=True)
    plain = _soup(tmp_path, "plain", *FT, "--method", "model_stock", "--base", BASE)
    assert _soup(tmp_path, "listed", *FT, link, "--method", "model_stock", "--base", BASE) == plain


def test_a_copy_of_the_base_is_an_ingredient(tmp_path: Path) -> None:
    """Only the same file or folder is the base: a copy elsewhere is the user's own ingredient."""
    copy = tmp_path / "copy"
    shutil.copytree(BASE, copy)
    plain = _soup(tmp_path, "plain", *FT, "--method", "task_arithmetic", "--base", BASE)
    assert _soup(tmp_path, "listed", *FT, copy, "--method", "task_arithmetic", "--base", BASE) != plain


def test_the_base_and_one_fine_tune_is_task_arithmetic_of_one_task_vector(tmp_path: Path) -> None:
    """Task arithmetic of one fine-tune (a negation, say) is a soup of one ingredient and its base: listing
    the base beside it, as the way to get two ingredients, is no longer needed and no longer changes it."""
    plain = _soup(tmp_path, "plain", FT[0], "--method", "task_arithmetic", "--base", BASE, "--weights", "-1")
    listed = _soup(tmp_path, "listed", FT[0], BASE, "--method", "task_arithmetic", "--base", BASE,
                   "--weights", "-1", "1")
    assert listed == plain


def test_the_base_and_one_fine_tune_is_too_few_for_model_stock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["merge", str(BASE), str(FT[0]), "--method", "model_stock", "--base", str(BASE),
                 "-o", str(tmp_path / "soup")])
    err = capsys.readouterr().err
    assert code == 2 and "is the base" in err and "model_stock needs at least 2" in err and "Traceback" not in err
    assert not (tmp_path / "soup").exists()


def test_one_ingredient_is_refused_by_the_methods_that_need_two(capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("uniform", "model_stock"):
        code = main(["merge", str(FT[0]), "--method", method, *(["--base", str(BASE)] if method != "uniform" else []),
                     "--dump-recipe"])
        assert code == 2 and "a soup needs at least 2 ingredients, got 1" in capsys.readouterr().err
