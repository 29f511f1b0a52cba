"""The command line passes only what the user gave: every default is the recipe's, defined once there."""

from __future__ import annotations

import pytest

from hub_soup.cli import build_parser, main
from hub_soup.cli.merge import recipe_from_args
from hub_soup.eval.spec import EvalSpec, TextColumn
from hub_soup.recipe import OutputSpec, Recipe


def _recipe(*argv: str) -> Recipe:
    return recipe_from_args(build_parser().parse_args(["merge", *argv]))


def test_options_left_out_are_not_given() -> None:
    recipe = _recipe("a", "b", "-o", "out", "--eval-task", "image-classification", "--eval-data", "d")
    assert recipe.output.model_fields_set == {"path"}
    assert "device" not in recipe.model_fields_set
    assert recipe.eval is not None and recipe.eval.model_fields_set == {"task", "data"}
    assert (recipe.device, recipe.output.max_shard_size) == (Recipe.model_fields["device"].default, "5GB")


def test_options_given_are_given_even_at_their_default_value() -> None:
    recipe = _recipe("a", "b", "-o", "out", "--max-shard-size", "5GB", "--device", "cpu", "--overwrite",
                     "--eval-task", "custom", "--eval-function", "f.py:score", "--lower-is-better")
    assert recipe.output.model_fields_set == {"path", "max_shard_size", "overwrite"}
    assert "device" in recipe.model_fields_set
    assert recipe.eval is not None and recipe.eval.higher_is_better is False


def test_lm_eval_refuses_a_split_it_would_ignore_whatever_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    """lm-eval's tasks read their own split: one given is refused, the default's value too (it was let through
    when given as --eval-split validation, because it equalled the default)."""
    code = main(["merge", "a", "b", "-o", "out", "--eval-task", "lm-eval", "--eval-tasks", "arc_easy",
                 "--eval-split", str(EvalSpec.model_fields["split"].default), "--dump-recipe"])
    assert code == 2 and "split: task lm-eval does not take it" in capsys.readouterr().err


def test_help_states_the_recipes_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for model, name in ((OutputSpec, "max_shard_size"), (EvalSpec, "split"), (EvalSpec, "batch_size"),
                        (TextColumn, "text_column"), (Recipe, "device")):
        assert f"(default: {model.model_fields[name].default})" in text, name
