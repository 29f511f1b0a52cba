"""The README's synopsis (section "Command line") and the parsers cannot drift apart.

Each command's lines in the synopsis must name every option its parser takes (by one of
its spellings: ``-o`` for ``-o/--output``; ``--help`` aside), and every option they name
must be one the parser takes. The parsers are built as ``hub-soup`` builds them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hub_soup.cli import COMMANDS, build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
# An option as a word of its own: ``--t`` is not in ``--tag``, ``-o`` is not in ``--overwrite``.
FLAG = r"(?<![\w-]){}(?![\w-])"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _synopses() -> dict[str, str]:
    """Each command's lines of the README's synopsis block, by command name."""
    section = README.read_text().split("\n## Command line\n", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    synopses: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        started = re.match(r"hub-soup (\w+)", line)
        if started:
            command = started.group(1)
            synopses[command] = ""
        assert command is not None, f"a synopsis line before any command: {line!r}"
        synopses[command] += line.split("#", 1)[0] + "\n"  # comments say what a command does, not its options
    return synopses


def test_the_synopsis_has_every_command() -> None:
    assert list(_synopses()) == [command.__name__.rsplit(".", 1)[1] for command in COMMANDS] == list(_parsers())


@pytest.mark.parametrize("command", list(_parsers()))
def test_the_synopsis_names_every_option_of_the_command(command: str) -> None:
    synopsis = _synopses()[command]
    options = [a.option_strings for a in _parsers()[command]._actions if a.option_strings and a.dest != "help"]
    missing = [
        "/".join(flags) for flags in options
        if not any(re.search(FLAG.format(re.escape(flag)), synopsis) for flag in flags)
    ]
    assert not missing, f"README synopsis of {command} lacks {missing}"
    taken = {flag for flags in options for flag in flags}
    unknown = sorted(set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", synopsis)) - taken)
    assert not unknown, f"README synopsis of {command} names options it does not take: {unknown}"
