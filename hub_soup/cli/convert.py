"""``hub-soup convert CONFIG``: print the native recipe a mergekit config (or a recipe) is read as."""

from __future__ import annotations

import argparse
from pathlib import Path

from hub_soup.errors import EXIT_OK
from hub_soup.recipe import load_recipe


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``convert`` command to ``commands``."""
    parser = commands.add_parser(
        "convert", help="print the hub-soup recipe a mergekit config is read as (no torch, no download)",
        description="Read a mergekit config (or a recipe) as `run` does and print it as a hub-soup recipe: what "
        "`run` makes of it, in the recipe's own words. Its paths stay as the file's (relative to its folder).",
    )
    parser.add_argument("config", type=Path, help="a mergekit config YAML (top-level merge_method) or a recipe")
    parser.set_defaults(handler=convert_command)


def convert_command(args: argparse.Namespace) -> int:
    """The recipe, as YAML, on stdout."""
    recipe = load_recipe(args.config).with_paths_for(args.config.parent)  # the config itself left out: the recipe
    print(recipe.with_fields(mergekit_config=None).to_yaml(), end="")  # replaces it (its soup carries no copy)
    return EXIT_OK
