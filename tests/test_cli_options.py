"""The CLI's options cannot drift: choices are the recipe's own, and a flag two commands take is one flag."""

from __future__ import annotations

import argparse
from typing import get_args

import pytest

from hub_soup.cli import build_parser
from hub_soup.recipe import Device, Dtype, task_names


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option(command: str, flag: str) -> argparse.Action:
    return next(a for a in _commands()[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    ("command", "flag", "recipe_choices"),
    [
        ("merge", "--dtype", get_args(Dtype)),
        ("merge", "--device", get_args(Device)),
        ("diagnose", "--device", get_args(Device)),
        ("merge", "--eval-task", task_names()),
        ("diagnose", "--eval-task", task_names()),
    ],
)
def test_choices_are_the_recipes_own(command: str, flag: str, recipe_choices: tuple[str, ...]) -> None:
    choices = _option(command, flag).choices
    assert choices is not None and tuple(choices) == recipe_choices


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
