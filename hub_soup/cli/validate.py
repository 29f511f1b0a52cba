"""``hub-soup validate RECIPE...``: check recipe files the way ``run`` reads them, without making a soup.

Meant for CI over a repository of recipes: seconds, no torch, no download. Each
file is read by the same :func:`~hub_soup.recipe.load_recipe` as ``hub-soup run``,
so a file that passes here passes there (the ingredients themselves are only
checked when a soup is made). Every file is reported, not only the first bad one,
so one CI run lists every fix to make.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hub_soup.errors import EXIT_BAD_INPUT, EXIT_OK, RecipeError
from hub_soup.recipe import Recipe, load_recipe

logger = logging.getLogger("hub_soup")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``validate`` command to ``commands``."""
    parser = commands.add_parser(
        "validate", help="check recipe files without making a soup (no torch, no download)",
        description="Read and validate recipe files as `run` does; one line per file. Exit 2 if any is invalid.",
    )
    parser.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE", help="recipe YAML files")
    parser.set_defaults(handler=validate_command)


def validate_command(args: argparse.Namespace) -> int:
    """``PATH: ok (...)`` on stdout for each valid file, the usual error line on stderr for each other one."""
    invalid = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:  # the message starts with the path (and line): "r.yaml:3: methd: ..."
            logger.error("error: %s", exc)
            invalid += 1
        else:
            print(f"{path}: ok ({describe(recipe)})")
    return EXIT_BAD_INPUT if invalid else EXIT_OK


def describe(recipe: Recipe) -> str:
    """What the recipe would make, in a few words: "3 ingredients, uniform, pushes to org/soup"."""
    parts = [f"{len(recipe.ingredients)} ingredients", f"greedy {recipe.method}" if recipe.greedy else recipe.method]
    if recipe.slices:
        parts.append(f"{sum(piece.length for piece in recipe.slices)} layers in {len(recipe.slices)} slices")
    if recipe.mergekit_config is not None:
        parts.insert(0, "a mergekit config")
    if recipe.eval is not None:
        parts.append(f"scored by {recipe.eval.task}")
    if recipe.output.path is not None:
        parts.append(f"writes {recipe.output.path}")
    if recipe.push is not None:
        parts.append(f"pushes to {recipe.push.repo_id}")
    if recipe.output.path is None and recipe.push is None:
        parts.append("no output: run it with -o DIR")
    if recipe.code_refs():
        parts.append("names code: run it with --trust-remote-code")
    return ", ".join(parts)
