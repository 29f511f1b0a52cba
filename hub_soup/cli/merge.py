"""``hub-soup merge REF REF...``: the recipe a command line describes, made (or printed, ``--dump-recipe``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, get_args

from hub_soup.cli.options import (
    ALLOW_PICKLE,
    BASE,
    DEVICE,
    EXCLUDE,
    NO_EMA,
    OVERWRITE,
    RECALIBRATE_BN,
    REFS,
    TOKENIZER_SOURCE,
    TRUST_REMOTE_CODE,
    add_eval_options,
    add_push_options,
    default,
    eval_spec_from_args,
    given_fields,
    push_spec_from_args,
)
from hub_soup.cli.run import run_recipe
from hub_soup.errors import EXIT_OK, RecipeError
from hub_soup.merging.methods import get_method
from hub_soup.recipe import Dtype, OutputSpec, Recipe, method_names

# The method parameters the CLI takes, as (flag, the recipe's parameters key, type, help): mergekit's names.
# Each fills ``parameters`` only when given; a method that takes no such parameter refuses it by name.
METHOD_PARAMETERS = (
    ("--lambda", "lambda", float, "task vectors' scale (task_arithmetic, ties, dare_linear, dare_ties)"),
    ("--t", "t", float, "interpolation factor (slerp)"),
    ("--seed", "seed", int, "random seed (dare_linear, dare_ties; default 0)"),
)

EXAMPLES = """examples:
  # average two Hub fine-tunes and push the soup (staged in a temporary folder)
  %(prog)s org/ft-a org/ft-b --push org/soup
  # local folders, uneven weights, kept in ./soup
  %(prog)s ./ft-a ./ft-b --weights 1 3 -o soup
  # task arithmetic: the base plus half the sum of the task vectors
  %(prog)s ./ft-a ./ft-b --method task_arithmetic --base ./base --lambda 0.5 -o soup
  # TIES: each task vector trimmed to its largest 30%%, signs elected, the agreeing entries averaged
  %(prog)s ./ft-a ./ft-b ./ft-c --method ties --base ./base --density 0.3 -o soup
  # a greedy soup scored on an image folder, BatchNorm statistics recalibrated
  %(prog)s ./ft-* --greedy --recalibrate-bn 8 --eval-task image-classification \\
      --eval-data data/ --eval-split val -o soup
  # a greedy soup of language models, scored by lm-evaluation-harness on two of its tasks
  %(prog)s ./llm-ft-* --greedy --eval-task lm-eval --eval-tasks arc_easy,hellaswag --eval-limit 500 -o soup
  # an exact soup of two LoRA adapters of one base (their base named in adapter_config.json)
  %(prog)s org/lora-a org/lora-b -o soup
  # the same soup merged into the base: a full model
  %(prog)s org/lora-a org/lora-b --merge-into-base -o merged
  # the adapters' base from a local copy of it
  %(prog)s org/lora-a org/lora-b --adapter-base ./base -o soup
  # the recipe file for the same soup, for the `run` command (local paths relative to it)
  %(prog)s ./ft-a ./ft-b --push org/soup --dump-recipe recipes/soup.yaml
"""


class Numbers(argparse.Action):
    """``--weights`` and ``--density``: numbers, one per REF (or one for all).

    A REF typed after them (``--weights 1 2 a b``) is one more value to argparse, which
    would say "invalid float value: 'a'"; this says where the REFs go instead (exit 2).
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:
        numbers = []
        for value in values:
            try:
                numbers.append(float(value))
            except ValueError:
                parser.error(
                    f"argument {option_string}: {value!r} is not a number: {option_string} takes numbers; "
                    f"put the REFs before {option_string}: {parser.prog} a b {option_string} "
                    + ("1 2" if self.dest == "weights" else "0.5 0.3")
                )
        setattr(namespace, self.dest, numbers)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``merge`` command to ``commands``."""
    parser = commands.add_parser(
        "merge", help="average checkpoints into a soup (and optionally push it)",
        description="Average fine-tuned checkpoints into a soup folder, optionally scored and pushed to the Hub.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    REFS.add(parser)
    parser.add_argument(
        "-o", "--output", metavar="DIR",
        help="write the soup here (with --push and no -o: a temporary folder, removed after the push)",
    )
    parser.add_argument("--weights", action=Numbers, nargs="+", metavar="W",
                        help="one weight per REF (normalised by weighted, as given by task_arithmetic)")
    methods = parser.add_argument_group("merge method (mergekit's names)")
    methods.add_argument("--method", choices=method_names(),
                         help="how to merge (default: uniform, or weighted with --weights)")
    BASE.add(methods, help="the model the ingredients were fine-tuned from, for methods that need one")
    for flag, key, kind, text in METHOD_PARAMETERS:
        methods.add_argument(flag, dest=f"parameter_{key}", type=kind, metavar=key[0].upper(), help=text)
    methods.add_argument(
        "--density", action=Numbers, nargs="+", metavar="D",
        help="fraction of each task vector kept (ties, dare_linear, dare_ties): one for every REF, or one per REF",
    )
    parser.add_argument("--dtype", choices=get_args(Dtype), help="output dtype of averaged tensors")
    adapters = parser.add_argument_group("LoRA adapter soups (PEFT adapters of one base, found by adapter_config.json)")
    adapters.add_argument(
        "--max-rank", type=int, metavar="R",
        help="reduce each module's delta to rank R by a truncated SVD (default: the exact soup, of the summed ranks)",
    )
    adapters.add_argument(
        "--merge-into-base", action="store_true", help="write the base model with the soup's delta merged in",
    )
    adapters.add_argument(
        "--adapter-base", metavar="REF",
        help="the adapters' base (default: the one their adapter_config.json names): that repo at a revision, "
        "or a local copy of it",
    )
    EXCLUDE.add(parser)
    TOKENIZER_SOURCE.add(parser)
    NO_EMA.add(parser)
    ALLOW_PICKLE.add(parser)
    parser.add_argument(
        "--max-shard-size", help=f"split output into shards of this size {default(OutputSpec, 'max_shard_size')}"
    )
    OVERWRITE.add(parser)
    DEVICE.add(parser)
    parser.add_argument(
        "--dump-recipe", nargs="?", const="-", metavar="FILE",
        help="write the equivalent recipe to FILE.yaml, local paths relative to it (or, without FILE, print it, "
        "local paths absolute), and exit: `run FILE` makes the same soup from any folder",
    )
    TRUST_REMOTE_CODE.add(parser)
    add_eval_options(parser)
    validate = parser.add_argument_group("validate the soup (needs --eval-task and its data or harness tasks)")
    validate.add_argument("--greedy", action="store_true", help="greedy soup: keep an ingredient only if the score does not drop")
    RECALIBRATE_BN.add(validate)
    validate.add_argument("--ensemble-reference", action="store_true", help="also score the output ensemble (a yardstick)")
    add_push_options(parser)
    parser.set_defaults(handler=merge_command)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe a ``merge`` command line describes (``--dump-recipe`` prints it)."""
    scoring = [flag for flag, on in (("--greedy", args.greedy), ("--recalibrate-bn", args.recalibrate_bn),
                                     ("--ensemble-reference", args.ensemble_reference)) if on]
    if scoring and not args.eval_task:  # the recipe would say "needs an eval section": say it in flags
        raise RecipeError(
            f"{scoring[0]} needs an evaluation: add --eval-task (and its --eval-data, or --eval-tasks for lm-eval)",
            hint="e.g. --eval-task image-classification --eval-data DATA --eval-split val",
        )
    given = {key: getattr(args, f"parameter_{key}") for _, key, _, _ in METHOD_PARAMETERS}
    densities = args.density
    if densities is not None and len(densities) == 1 and len(args.refs) != 1:
        given["density"], densities = densities[0], None  # one density for every ingredient: the parameter
    method = {"method": args.method} if args.method else {}
    name = args.method or ("weighted" if args.weights else "uniform")
    takes = {field.alias or key for key, field in get_method(name).Parameters.model_fields.items()}
    flags = {key: flag for flag, key, _, _ in METHOD_PARAMETERS} | {"density": "--density"}
    used = {key for key, value in given.items() if value is not None} | ({"density"} if densities else set())
    refused = [key for key in flags if key in used and key not in takes]  # the flags' order
    if refused:
        key = refused[0]
        raise RecipeError(
            f"parameters.{key}: method {name} takes no {key} ({flags[key]})",
            hint=f"drop {flags[key]}, or choose a method that takes it with --method",
        )
    return Recipe.from_refs(
        args.refs,
        args.weights,
        densities=densities,
        **method,
        parameters={key: value for key, value in given.items() if value is not None},
        base={"ref": args.base} if args.base else None,
        adapter_base={"ref": args.adapter_base} if args.adapter_base else None,
        dtype=args.dtype,
        exclude=args.exclude,
        tokenizer={"source": args.tokenizer_source} if args.tokenizer_source else None,
        ema=args.ema,
        allow_pickle=args.allow_pickle,
        **given_fields(device=args.device),
        eval=eval_spec_from_args(args),
        greedy=args.greedy,
        recalibrate_bn=args.recalibrate_bn,
        ensemble_reference=args.ensemble_reference,
        force=args.force,
        output=given_fields(path=args.output, max_shard_size=args.max_shard_size, overwrite=args.overwrite or None,
                            max_rank=args.max_rank, merge_into_base=args.merge_into_base or None),
        push=push_spec_from_args(args),
    )


def merge_command(args: argparse.Namespace) -> int:
    """Write the recipe (``--dump-recipe``) or make its soup exactly as ``run`` would."""
    recipe = recipe_from_args(args)
    if args.dump_recipe is not None:
        dump_recipe(recipe, args.dump_recipe)
        return EXIT_OK
    return run_recipe(recipe, args.token, args.trust_remote_code)


def dump_recipe(recipe: Recipe, file: str) -> None:
    """The recipe as a file ``run`` reads from anywhere: ``run`` reads local paths from the recipe file's
    folder, so a FILE gets them relative to its own folder, and the printed recipe (``-``), which may be
    saved anywhere, gets them absolute.

    Raises:
        RecipeError: FILE is no ``.yaml``/``.yml`` name (``--dump-recipe REF REF`` would take the first REF
            for FILE and overwrite it), or its folder does not exist; nothing is written.
    """
    if file == "-":
        sys.stdout.write(recipe.with_paths_for(None).to_yaml())
        return
    path = Path(file)
    if path.suffix not in (".yaml", ".yml"):
        raise RecipeError(
            f"--dump-recipe {file}: a recipe file's name ends in .yaml or .yml",
            hint="put the REFs before --dump-recipe (a REF right after it is read as its FILE); "
            "without FILE it prints the recipe",
        )
    if not path.parent.is_dir():
        raise RecipeError(f"--dump-recipe {file}: there is no folder {path.parent}", hint="create it first")
    text = recipe.with_paths_for(path.parent).to_yaml()
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # renamed over FILE: never half a recipe there
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
