"""The CLI's options cannot drift: choices are the recipe's own, and a flag two commands take is one flag."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from hub_soup.cli import build_parser
from hub_soup.errors import RecipeError
from hub_soup.recipe import DEVICE_FORMS, Dtype, Recipe, task_names


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
