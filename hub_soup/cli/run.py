"""``hub-soup run RECIPE``: make the soup a recipe file describes; also how ``merge`` runs its recipe."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub_soup.cli.options import (
    OVERWRITE,
    TOKENIZER_SOURCE,
    TRUST_REMOTE_CODE,
    add_eval_options,
    add_push_options,
    eval_spec_from_args,
    push_spec_from_args,
)
from hub_soup.errors import EXIT_OK
from hub_soup.io.sizes import describe_size
from hub_soup.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from hub_soup.report import SoupResult


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``run`` command to ``commands``."""
    parser = commands.add_parser(
        "run", help="make the soup a recipe file describes",
        description="Make the soup a recipe file (or a mergekit config) describes. Local paths in it are relative "
        "to the file. The evaluation and push options add to the file's sections, or replace them.",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML (see recipes/ and `hub-soup schema`) or a mergekit "
                        "config (top-level merge_method)")
    parser.add_argument("-o", "--output", metavar="DIR", help="write the soup here instead of the recipe's output.path")
    OVERWRITE.add(parser)
    TOKENIZER_SOURCE.add(parser, help="choose the soup's vocabulary (the recipe's tokenizer.source, over its own): "
                         "base, union, or an ingredient as the recipe names it")
    parser.add_argument(
        "--no-push", dest="keep_local", action="store_true", help="make the soup locally even if the recipe pushes it"
    )
    TRUST_REMOTE_CODE.add(parser)
    add_eval_options(parser)
    parser.add_argument("--greedy", action="store_true", help="greedy soup: keep an ingredient only if the score "
                        "does not drop (needs an evaluation)")
    add_push_options(parser)
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """The recipe file, with the command line's output, evaluation and push choices over its own."""
    recipe = load_recipe(args.recipe)
    if args.output or args.overwrite:
        output = recipe.output.model_copy(
            update={"path": args.output or recipe.output.path, "overwrite": args.overwrite or recipe.output.overwrite}
        )
        recipe = recipe.model_copy(update={"output": output})
    section = recipe.eval.model_dump(exclude_unset=True) if recipe.eval is not None else None
    given: dict[str, Any] = {"eval": eval_spec_from_args(args, section), "push": push_spec_from_args(args),
                             "greedy": args.greedy or None, "force": args.force or None}
    if args.tokenizer_source:
        tokenizer = recipe.tokenizer.model_dump(exclude_unset=True) if recipe.tokenizer is not None else {}
        given["tokenizer"] = {**tokenizer, "source": args.tokenizer_source}
    if any(value is not None for value in given.values()):
        recipe = recipe.with_fields(**{name: value for name, value in given.items() if value is not None})
    if args.keep_local:
        recipe = recipe.model_copy(update={"push": None})
    return run_recipe(recipe, args.token, args.trust_remote_code)


def run_recipe(recipe: Recipe, token: str | None, trust_remote_code: bool) -> int:
    """Make the soup and say what was made (here, and in the step summary): the one path of ``run`` and ``merge``.

    The pipeline (and torch with it) is imported here, not at the top, so that
    commands that only parse (``--help``, ``schema``, ``validate``) stay light.
    """
    from hub_soup.pipeline import run
    from hub_soup.summary import markdown_summary, write_step_summary

    result = run(recipe, token=token, trust_remote_code=trust_remote_code)
    if result is None:  # a process of a launch that scored its share; the main one reports
        return EXIT_OK
    write_step_summary(markdown_summary(result))
    print("\n".join(closing_lines(result)))
    return EXIT_OK


def closing_lines(result: SoupResult) -> list[str]:
    """The run's result as the command line says it: the score table, what was written, where it was pushed."""
    stats = result.stats
    lines = [result.report.table()] if result.report is not None else []
    read = f"read {describe_size(stats.bytes_read)}, " if stats.bytes_read else ""
    lines.append(
        f"soup: {stats.tensors} tensors ({stats.averaged} {result.combined}, {stats.copied} copied from the first), "
        f"{stats.elements:,} elements, {read}wrote {describe_size(stats.bytes_written)} in {stats.seconds:.1f}s "
        f"-> {result.output or 'a temporary folder, removed after the push'}"
    )
    if result.push is not None:
        where = result.push.pr_url or result.push.commit_url
        lines.append(f"pushed: {where}" if result.push.changed else f"no changes: the Hub already has this soup at {where}")
    return lines
