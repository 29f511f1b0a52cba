"""Options that more than one command takes, each defined once, and the recipe sections they fill.

A flag used by two commands is one :class:`Option` here, so its name, default,
choices and help cannot drift apart between commands. Choices come from the
recipe's own types (``Dtype``, :func:`~hub_soup.eval.tasks.task_names`), and
``--device`` (``cuda:N`` is no list of choices) is checked by the recipe's own
:func:`~hub_soup.recipe.check_device`: a value the CLI offers is a value the
recipe accepts. A command whose option means something narrower there
(``--exclude`` in ``inspect`` leaves keys out of a table, not out of an average)
says so with its own ``help``, never with its own definition. Nothing here
imports torch: every command's ``--help`` builds this parser.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any, get_args

from pydantic import BaseModel

from hub_soup.errors import RecipeError
from hub_soup.eval.spec import Dtype, EvalSpec, ImageColumn, LabelColumn, TextColumn
from hub_soup.eval.tasks import task_names
from hub_soup.recipe import DEVICE_FORMS, Recipe, check_device


def default(model: type[BaseModel], name: str) -> str:
    """``(default: X)`` for a help text, X the recipe's own default of ``model``'s field ``name``: a default is
    defined once, in the recipe, and the CLI passes only what the user gave (:func:`given_fields`)."""
    return f"(default: {model.model_fields[name].default})"


def given_fields(**fields: Any) -> dict[str, Any]:
    """The recipe fields a command line gave: options left out (None) take the recipe's defaults, so a recipe
    can tell a value the user wrote from one nobody chose (``model_fields_set``)."""
    return {name: value for name, value in fields.items() if value is not None}


def _device(value: str) -> str:
    """``--device``, checked by the recipe's own rule; argparse names the flag before its words (exit 2)."""
    try:
        return check_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Option:
    """One command-line option: its flags and :meth:`argparse.ArgumentParser.add_argument` settings.

    Args:
        flags: the option strings (``"-o", "--output"``), or a positional's name.
        settings: ``add_argument`` keywords; each command that takes the option gets a copy.
    """

    def __init__(self, *flags: str, **settings: Any) -> None:
        self.flags = flags
        self.settings = settings

    def add(self, parser: argparse._ActionsContainer, **changes: Any) -> argparse.Action:
        """Add this option to ``parser`` (a parser or an argument group); ``changes`` override settings,
        as when a command describes what the option does there in its own words (``help``)."""
        return parser.add_argument(*self.flags, **{**copy.deepcopy(self.settings), **changes})


REFS = Option("refs", nargs="+", metavar="REF", help="org/name[@rev], hf-hub:org/name, timm name, or local path")
TOKEN = Option("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
ALLOW_PICKLE = Option(
    "--allow-pickle", action="store_true", help="load pickles that execute code (only files you trust)"
)
NO_EMA = Option(
    "--no-ema", dest="ema", action="store_false", help="use raw weights even when a checkpoint has EMA weights"
)
EXCLUDE = Option(
    "--exclude", action="append", default=[], metavar="GLOB",
    help="keys not averaged: taken from the first REF",
)
BASE = Option("--base", metavar="REF", help="the model the ingredients were fine-tuned from (the recipe's base)")
DEVICE = Option(
    "--device", type=_device, metavar="{" + ",".join(DEVICE_FORMS) + "}",
    help=f"where to merge and score: cuda:N is GPU N, auto a GPU if there is one {default(Recipe, 'device')}",
)
OVERWRITE = Option(
    "--overwrite", action="store_true", help="replace an existing output folder: a soup hub-soup wrote, or an empty one"
)
TOKENIZER_SOURCE = Option(
    "--tokenizer-source", metavar="SOURCE",
    help="the soup's vocabulary, for ingredients whose vocabularies differ (rows then aligned by token): base (the "
    "base's, or the first REF's), union (that one plus every token another adds), or a REF (its vocabulary)",
)
RECALIBRATE_BN = Option("--recalibrate-bn", type=int, metavar="N", help="recompute BatchNorm statistics on N eval batches")
TRUST_REMOTE_CODE = Option(
    "--trust-remote-code", action="store_true",
    help="allow code a recipe names (eval function) and custom model code in configs to run: only code you have read",
)


def add_eval_options(parser: argparse.ArgumentParser, required: bool = False, test_split: bool = True) -> None:
    """The "evaluation" group: what to score on, read back by :func:`eval_spec_from_args`.

    ``required``: the command needs ``--eval-task`` (the recipe's validation says which task needs ``--eval-data``).
    ``test_split``: the command scores a second split (``--test-eval``); ``diagnose`` scores one.
    """
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-task", required=required, choices=task_names(),
                       help="what to score: timm image classifiers, transformers text classifiers, language models "
                       "(perplexity), lm-evaluation-harness tasks (lm-eval), or your own function")
    group.add_argument("--eval-data", metavar="DATA",
                       help="image folder (DATA/<split>/<class>/*), data file (.jsonl, .json, .csv, .parquet, .txt: "
                       "one split), local dataset, or Hub dataset repo id (every task but lm-eval)")
    group.add_argument("--eval-split", help=f"held-out split that decides {default(EvalSpec, 'split')}")
    if test_split:
        group.add_argument("--test-eval", metavar="SPLIT", help="second split for unbiased final numbers")
    group.add_argument("--eval-limit", type=int, metavar="N", help="score on N examples (a fixed random sample)")
    group.add_argument("--eval-batch-size", type=int, metavar="N", help=f"examples per batch {default(EvalSpec, 'batch_size')}")
    group.add_argument("--eval-dtype", choices=get_args(Dtype),
                       help="dtype models are scored in (default: the soup's; float16 on the CPU: float32)")
    for kind, columns in (("image", ImageColumn), ("text", TextColumn), ("label", LabelColumn)):
        group.add_argument(f"--{kind}-column", help=f"dataset column with the {kind}s {default(columns, f'{kind}_column')}")
    group.add_argument("--eval-function", metavar="MODULE:FUNCTION",
                       help="for --eval-task custom: model -> float (needs --trust-remote-code)")
    group.add_argument("--lower-is-better", action="store_true", help="for --eval-task custom: a loss, not an accuracy")
    group.add_argument("--eval-tasks", type=_comma_separated, metavar="NAME[,NAME...]",
                       help="for --eval-task lm-eval: harness task, group or tag names (lm_eval --tasks)")
    group.add_argument("--num-fewshot", type=int, metavar="N",
                       help="for --eval-task lm-eval: few-shot examples per prompt (default: each task's own)")
    group.add_argument("--include-path", metavar="DIR",
                       help="for --eval-task lm-eval: a folder of task YAMLs of your own (needs --trust-remote-code: "
                       "the harness runs task YAMLs as code)")
    group.add_argument("--device-map", type=_device_map, metavar="MAP",
                       help="spread the scored model over devices with accelerate, as from_pretrained(device_map=...): "
                       "auto, balanced, balanced_low_0, sequential, or MODULE=DEVICE[,...] or JSON; keeps --device cpu")
    group.add_argument("--max-memory", type=_mapping, metavar="DEVICE=SIZE[,...]",
                       help="with --device-map: the most each device holds, as accelerate's max_memory: 0=20GiB,cpu=60GiB "
                       "or JSON")
    group.add_argument("--offload-folder", metavar="DIR",
                       help="with --device-map: where disk-offloaded weights are kept while scoring (removed afterwards)")


def _mapping(value: str) -> dict[str, str]:
    """``0=20GiB,cpu=60GiB`` or a JSON object, as a mapping; each key and value is checked by the recipe."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object ({exc})") from None
        if not isinstance(parsed, dict):
            raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object")
        return parsed
    pairs = [pair.partition("=") for pair in value.split(",")]
    if not all(key.strip() and sep and item.strip() for key, sep, item in pairs):
        raise argparse.ArgumentTypeError(f"{value!r}: write KEY=VALUE[,KEY=VALUE...] (e.g. 0=20GiB,cpu=60GiB) or JSON")
    return {key.strip(): item.strip() for key, _, item in pairs}


def _device_map(value: str) -> str | dict[str, str]:
    """A named device map (``auto``), or a module -> device mapping (``""=cpu`` places the whole model)."""
    return value if "=" not in value and not value.lstrip().startswith("{") else _mapping(value)


def _comma_separated(value: str) -> list[str]:
    """``arc_easy,hellaswag`` as lm_eval's ``--tasks`` spells a list."""
    return [name.strip() for name in value.split(",")]


# The eval section's fields the evaluation options give: (field, argparse dest, flag); also how
# `verify --create-pr` spells an evaluation back as a command.
EVAL_FLAGS = (
    ("data", "eval_data", "--eval-data"), ("split", "eval_split", "--eval-split"), ("test_split", "test_eval", "--test-eval"),
    ("limit", "eval_limit", "--eval-limit"), ("batch_size", "eval_batch_size", "--eval-batch-size"),
    ("dtype", "eval_dtype", "--eval-dtype"), ("image_column", "image_column", "--image-column"),
    ("text_column", "text_column", "--text-column"), ("label_column", "label_column", "--label-column"),
    ("function", "eval_function", "--eval-function"), ("higher_is_better", "lower_is_better", "--lower-is-better"),
    ("tasks", "eval_tasks", "--eval-tasks"), ("include_path", "include_path", "--include-path"),
    ("num_fewshot", "num_fewshot", "--num-fewshot"), ("device_map", "device_map", "--device-map"),
    ("max_memory", "max_memory", "--max-memory"), ("offload_folder", "offload_folder", "--offload-folder"),
)


def eval_spec_from_args(args: argparse.Namespace, section: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The recipe's ``eval`` section from the evaluation options (``None`` when none was given).

    Without ``--eval-task`` the options add to ``section`` (``run``: the recipe file's own eval
    section); with no section to add to they are refused, never dropped: ``--eval-data`` alone
    would otherwise make an unscored soup the user believes was scored.

    Raises:
        RecipeError: an evaluation option without ``--eval-task`` and no section to add it to.
    """
    values = {field: getattr(args, dest, None) for field, dest, _ in EVAL_FLAGS}
    values["higher_is_better"] = False if values["higher_is_better"] else None  # --lower-is-better is a switch
    fields = given_fields(**values)
    if args.eval_task:
        return {"task": args.eval_task, **fields}
    if not fields:
        return None
    if section is not None:
        return {**section, **fields}
    flag = next(flag for field, _, flag in EVAL_FLAGS if field in fields)
    raise RecipeError(
        f"{flag} needs an evaluation to belong to: add --eval-task",
        hint=f"e.g. --eval-task image-classification {flag} ..., or drop {flag}",
    )


def add_push_options(parser: argparse.ArgumentParser) -> None:
    """The "push to the Hub" group (the token with it), read back by :func:`push_spec_from_args`."""
    group = parser.add_argument_group("push to the Hub")
    group.add_argument("--push", metavar="ORG/NAME", help="upload the soup to this model repo")
    group.add_argument(
        "--force", action="store_true",
        help="push even if the soup scores below its best ingredient (or, unscored, its ingredients look "
        "independent); the card carries the warning",
    )
    group.add_argument("--private", action="store_true", help="create the repo private")
    group.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    group.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: main)")
    group.add_argument("--commit-message", metavar="MSG", help="commit title (default: names the method and ingredients)")
    group.add_argument("--license", metavar="ID", help="license for the card (default: the ingredients' if they agree)")
    group.add_argument("--tag", action="append", default=[], help="extra card tag (repeatable)")
    TOKEN.add(group)


def push_spec_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The recipe's ``push`` section from the push options (``None`` without --push)."""
    if not args.push:
        return None
    return {
        "repo_id": args.push,
        "private": args.private,
        "create_pr": args.create_pr,
        "revision": args.revision,
        "commit_message": args.commit_message,
        "license": args.license,
        "tags": args.tag,
    }
