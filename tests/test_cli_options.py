"""The CLI's options cannot drift: choices are the recipe's own, and a flag two commands take is one flag."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest
import yaml

from hub_soup.cli import build_parser, main
from hub_soup.errors import RecipeError
from hub_soup.eval.tasks import task_names
from hub_soup.recipe import DEVICE_FORMS, Dtype, Recipe


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option(command: str, flag: str) -> argparse.Action:
    return next(a for a in _commands()[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    ("command", "flag", "recipe_choices"),
    [
        ("merge", "--dtype", get_args(Dtype)),
        ("merge", "--eval-task", task_names()),
        ("diagnose", "--eval-task", task_names()),
    ],
)
def test_choices_are_the_recipes_own(command: str, flag: str, recipe_choices: tuple[str, ...]) -> None:
    choices = _option(command, flag).choices
    assert choices is not None and tuple(choices) == recipe_choices


@pytest.mark.parametrize("command", ["merge", "diagnose"])
def test_device_takes_what_the_recipe_takes_and_lists_its_forms(command: str) -> None:
    """``cuda:N`` fits no list of choices: the flag's check is the recipe's, and its usage shows every form."""
    action = _option(command, "--device")
    assert action.metavar == "{" + ",".join(DEVICE_FORMS) + "}"
    parser = _commands()[command]
    for value in ("cpu", "cuda", "cuda:0", "cuda:13", "auto", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:01", "CUDA"):
        try:
            Recipe.from_refs(["a", "b"], None, device=value)
            recipe_takes = True
        except RecipeError:
            recipe_takes = False
        try:
            flag_takes = parser._get_values(action, [value]) == value
        except argparse.ArgumentError:
            flag_takes = False
        assert flag_takes == recipe_takes, value


def test_an_option_of_several_commands_means_the_same_in_each() -> None:
    """Only help (the option in that command's words) and whether it is required may differ."""
    seen: dict[str, tuple[str, argparse.Action]] = {}
    shared = set()
    for name, command in _commands().items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                if flag not in seen:
                    seen[flag] = (name, action)
                    continue
                first_name, first = seen[flag]
                shared.add(flag)
                for setting in ("option_strings", "dest", "nargs", "const", "default", "type", "choices", "metavar"):
                    assert getattr(action, setting) == getattr(first, setting), (flag, setting, first_name, name)
                assert type(action) is type(first), (flag, first_name, name)
    # the options the issue found defined several times are among those checked
    assert {"--token", "--allow-pickle", "--no-ema", "--exclude", "--device", "--trust-remote-code",
            "--eval-task", "--overwrite"} <= shared


def _misspelt(option: str) -> str:
    """``option`` with two of its letters swapped, as fingers do: ``--method`` -> ``--mehtod``."""
    i = max(3, len(option) // 2)
    return option[:i] + option[i + 1] + option[i] + option[i + 2:]


@pytest.mark.parametrize("command", [None, *_commands()])
def test_a_misspelt_option_is_named_with_the_one_meant(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command (and the options before it) says which option a misspelt one was meant to be, exit 2,
    whatever else the misspelling left wrong (a required option or REF missing)."""
    parser = build_parser() if command is None else _commands()[command]
    options = [flag for action in parser._actions for flag in action.option_strings if len(flag) > 5]
    assert options
    for option in options:
        typo = _misspelt(option)
        if typo == option or any(flag.startswith(typo) for flag in options):
            continue  # a swap of two equal letters, or one that spells an option: nothing misspelt
        with pytest.raises(SystemExit) as exit_:
            main([typo, "schema"] if command is None else [command, typo, "x"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown option {typo}: did you mean {option}?" in err, err


def test_abbreviations_negative_numbers_and_values_are_no_misspellings(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["merge", "a", "b", "--meth", "task_arithmetic", "--base", "c", "--weights", "-1", "1", "-ox",
            "--commit-message=--mehtod", "--dump-recipe"]
    assert main(argv) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ingredients"][0] == {"ref": "a", "weight": -1.0}


@pytest.mark.parametrize("flag", ["--weights", "--density"])
def test_refs_after_numbers_say_where_refs_go(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--method", "ties", "--base", "c", flag, "1", "0.5", "a", "b", "-o", "out"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: 'a' is not a number: {flag} takes numbers; put the REFs before {flag}" in err, err
