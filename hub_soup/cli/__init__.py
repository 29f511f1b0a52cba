"""``hub-soup``: a thin command line over :mod:`hub_soup.pipeline`.

Each command parses flags, builds the same :class:`~hub_soup.recipe.Recipe` the
YAML files and the Python API build, calls the pipeline, and maps errors to one
readable line and a documented exit code (see README, "Exit codes"). Bugs (any
exception that is not a :class:`~hub_soup.errors.HubSoupError`) keep their
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub_soup.errors import EXIT_BAD_INPUT, EXIT_OK, HubSoupError, RecipeError
from hub_soup.recipe import Recipe, load_recipe, recipe_schema

logger = logging.getLogger("hub_soup")

#: Where ``hf extensions install`` puts extensions (``huggingface_hub.cli.extensions.EXTENSIONS_ROOT``:
#: under the home directory, whatever ``HF_HOME`` or ``XDG_DATA_HOME`` say).
HF_EXTENSIONS_ROOT = "~/.local/share/hf/extensions"


def program_name(argv0: str | None = None) -> str:
    """The name this program was called by (default: from ``sys.argv[0]``), for help, log lines and errors.

    ``hf`` (huggingface_hub >= 1.5) runs an installed extension as a plain child,
    ``subprocess.call([manifest.executable_path, *args])``: no variable, no name, the
    environment unchanged. So the only sign of ``hf soup`` is argv[0], the path of the
    ``hf-soup`` script that ``hf extensions install`` put in its venv under
    ``HF_EXTENSIONS_ROOT/hf-soup/``: an ``hf-soup`` there is ``hf soup`` (or ``hf extensions
    exec soup``, the same thing), any other ``hf-soup`` is ``hf-soup``, and everything else is
    ``hub-soup``: the ``hub-soup`` script, ``python -m hub_soup.cli``, :func:`main` called in a
    test or a notebook (where argv[0] is pytest's or the kernel's).
    """
    if argv0 is None:
        argv0 = (getattr(sys, "argv", None) or [""])[0]
    if Path(argv0).name.removesuffix(".exe") != "hf-soup":
        return "hub-soup"
    where = Path(os.path.realpath(os.path.dirname(os.path.abspath(argv0))))
    installed = Path(os.path.realpath(Path(HF_EXTENSIONS_ROOT).expanduser() / "hf-soup"))
    return "hf soup" if where.is_relative_to(installed) else "hf-soup"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(), description="Average fine-tuned models (model soups) from the Hugging Face Hub, timm or local files."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge", help="average checkpoints into a soup (and optionally push it)",
        description="Average fine-tuned checkpoints into a soup folder, optionally scored and pushed to the Hub.",
        epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("refs", nargs="+", metavar="REF", help="org/name[@rev], hf-hub:org/name, timm name, or local path")
    merge.add_argument(
        "-o", "--output", metavar="DIR",
        help="write the soup here (with --push and no -o: a temporary folder, removed after the push)",
    )
    merge.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per REF (normalised)")
    merge.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="output dtype of averaged tensors")
    merge.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keys not averaged: taken from the first REF")
    merge.add_argument("--no-ema", dest="ema", action="store_false", help="use raw weights even when a checkpoint has EMA weights")
    merge.add_argument("--allow-pickle", action="store_true", help="load pickles that execute code (only files you trust)")
    merge.add_argument("--max-shard-size", default="5GB", help="split output into shards of this size (default 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where to accumulate")
    merge.add_argument("--dump-recipe", action="store_true", help="print the equivalent recipe YAML and exit")
    _add_trust_flag(merge)
    _add_eval_flags(merge)
    validate = merge.add_argument_group("validate the soup (needs --eval-task and --eval-data)")
    validate.add_argument("--greedy", action="store_true", help="greedy soup: keep an ingredient only if the score does not drop")
    validate.add_argument("--recalibrate-bn", type=int, metavar="N", help="recompute BatchNorm statistics on N eval batches")
    validate.add_argument("--ensemble-reference", action="store_true", help="also score the output ensemble (a yardstick)")
    _add_push_flags(merge)

    run = commands.add_parser(
        "run", help="make the soup a recipe file describes",
        description="Make the soup a recipe file describes. Local paths in it are relative to the recipe file.",
    )
    run.add_argument("recipe", type=Path, help="recipe YAML (see recipes/ and `hub-soup schema`)")
    run.add_argument("-o", "--output", metavar="DIR", help="write the soup here instead of the recipe's output.path")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--no-push", dest="push", action="store_false", help="make the soup locally even if the recipe pushes it")
    run.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    _add_trust_flag(run)

    inspect = commands.add_parser("inspect", help="formats, dtypes and sizes; with several refs, alignment and similarity")
    inspect.add_argument("refs", nargs="+", metavar="REF", help="org/name[@rev], hf-hub:org/name, timm name, or local path")
    inspect.add_argument("--allow-pickle", action="store_true", help="load pickles that execute code (only files you trust)")
    inspect.add_argument("--no-ema", dest="ema", action="store_false", help="inspect raw weights, not EMA ones")
    inspect.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="keys left out of the alignment check and the similarity table (repeatable)")
    inspect.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")

    diagnose = commands.add_parser("diagnose", help="why (not) a soup: the score along the line between two models")
    diagnose.add_argument("refs", nargs=2, metavar="REF", help="the two ingredients (alpha 0 is the first)")
    diagnose.add_argument("--base", metavar="REF", help="the model both were fine-tuned from: distances relative to it")
    diagnose.add_argument("--alphas", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1], help="points on the line")
    diagnose.add_argument("--plot", type=Path, metavar="PNG", help="also save the curve as a PNG there")
    diagnose.add_argument("--recalibrate-bn", type=int, metavar="N", help="also score each point with BatchNorm recalibrated")
    diagnose.add_argument("--allow-pickle", action="store_true", help="load pickles that execute code (only files you trust)")
    diagnose.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the models run")
    diagnose.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")
    _add_trust_flag(diagnose)
    _add_eval_flags(diagnose, required=True)

    commands.add_parser("schema", help="print the JSON Schema of recipe files")
    return parser


MERGE_EXAMPLES = """examples:
  # average two Hub fine-tunes and push the soup (staged in a temporary folder)
  %(prog)s org/ft-a org/ft-b --push org/soup
  # local folders, uneven weights, kept in ./soup
  %(prog)s ./ft-a ./ft-b --weights 1 3 -o soup
  # a greedy soup scored on an image folder, BatchNorm statistics recalibrated
  %(prog)s ./ft-* --greedy --recalibrate-bn 8 --eval-task image-classification \\
      --eval-data data/ --eval-split val -o soup
  # the recipe file for the same soup, for the `run` command
  %(prog)s org/ft-a org/ft-b --push org/soup --dump-recipe > soup.yaml
"""


def _version() -> str:
    """The installed distribution's version, without importing the package (and torch with it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hub-soup")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow code a recipe names (eval function) and custom model code in configs to run: only code you have read",
    )


def _add_eval_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-task", required=required,
                       choices=["image-classification", "text-classification", "causal-lm", "custom"],
                       help="what to score: timm image classifiers, transformers text classifiers, language models "
                       "(perplexity), or your own function")
    group.add_argument("--eval-data", required=required, metavar="DATA",
                       help="image folder (DATA/<split>/<class>/*), local dataset, or Hub dataset repo id")
    group.add_argument("--eval-split", default="validation", help="held-out split that decides (default: validation)")
    group.add_argument("--test-eval", metavar="SPLIT", help="second split for unbiased final numbers")
    group.add_argument("--eval-limit", type=int, metavar="N", help="score on N examples (a fixed random sample)")
    group.add_argument("--eval-batch-size", type=int, default=64, metavar="N", help="examples per batch (default: 64)")
    group.add_argument("--image-column", default="image", help="dataset column with the images (default: image)")
    group.add_argument("--text-column", default="text", help="dataset column with the texts (default: text)")
    group.add_argument("--label-column", default="label", help="dataset column with the labels (default: label)")
    group.add_argument("--eval-function", metavar="MODULE:FUNCTION",
                       help="for --eval-task custom: model -> float (needs --trust-remote-code)")
    group.add_argument("--lower-is-better", action="store_true", help="for --eval-task custom: a loss, not an accuracy")


def eval_spec_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The recipe's ``eval`` section from the evaluation flags (``None`` without --eval-task)."""
    if not args.eval_task:
        return None
    if not args.eval_data:
        raise RecipeError("--eval-task needs --eval-data")
    return {
        "task": args.eval_task,
        "data": args.eval_data,
        "split": args.eval_split,
        "test_split": args.test_eval,
        "limit": args.eval_limit,
        "batch_size": args.eval_batch_size,
        "image_column": args.image_column,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "function": args.eval_function,
        "higher_is_better": not args.lower_is_better,
    }


def _add_push_flags(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`)")


def recipe_from_merge_args(args: argparse.Namespace) -> Recipe:
    """The recipe a ``merge`` command line describes (``--dump-recipe`` prints it)."""
    push = None
    if args.push:
        push = {
            "repo_id": args.push,
            "private": args.private,
            "create_pr": args.create_pr,
            "revision": args.revision,
            "commit_message": args.commit_message,
            "license": args.license,
            "tags": args.tag,
        }
    return Recipe.from_refs(
        args.refs,
        args.weights,
        dtype=args.dtype,
        exclude=args.exclude,
        ema=args.ema,
        allow_pickle=args.allow_pickle,
        device=args.device,
        eval=eval_spec_from_args(args),
        greedy=args.greedy,
        recalibrate_bn=args.recalibrate_bn,
        ensemble_reference=args.ensemble_reference,
        force=args.force,
        output={"path": args.output, "max_shard_size": args.max_shard_size, "overwrite": args.overwrite},
        push=push,
    )


def _cmd_merge(args: argparse.Namespace) -> int:
    recipe = recipe_from_merge_args(args)
    if args.dump_recipe:
        sys.stdout.write(recipe.to_yaml())
        return EXIT_OK
    return _run_recipe(recipe, args.token, args.trust_remote_code)


def _cmd_run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    if args.output or args.overwrite:
        output = recipe.output.model_copy(
            update={"path": args.output or recipe.output.path, "overwrite": args.overwrite or recipe.output.overwrite}
        )
        recipe = recipe.model_copy(update={"output": output})
    if not args.push:
        recipe = recipe.model_copy(update={"push": None})
    return _run_recipe(recipe, args.token, args.trust_remote_code)


def _run_recipe(recipe: Recipe, token: str | None, trust_remote_code: bool) -> int:
    from hub_soup.io.sizes import describe_size
    from hub_soup.pipeline import run
    from hub_soup.summary import markdown_summary, write_step_summary

    result = run(recipe, token=token, trust_remote_code=trust_remote_code)
    write_step_summary(markdown_summary(result))
    stats = result.stats
    if result.report is not None:
        print(result.report.table())
    read = f"read {describe_size(stats.bytes_read)}, " if stats.bytes_read else ""
    print(
        f"soup: {stats.tensors} tensors ({stats.averaged} averaged, {stats.copied} copied from the first), "
        f"{stats.elements:,} elements, {read}wrote {describe_size(stats.bytes_written)} in {stats.seconds:.1f}s "
        f"-> {result.output or 'a temporary folder, removed after the push'}"
    )
    if result.push is not None:
        where = result.push.pr_url or result.push.commit_url
        print(f"pushed: {where}" if result.push.changed else f"no changes: the Hub already has this soup at {where}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from hub_soup.errors import AlignmentError
    from hub_soup.hub.resolve import resolve_ref
    from hub_soup.io.sizes import describe_size
    from hub_soup.merging.plan import align
    from hub_soup.merging.similarity import SHARED_INIT_COSINE, weight_similarity
    from hub_soup.pipeline import layouts_of, open_ingredients

    resolved = [resolve_ref(r, token=args.token) for r in args.refs]
    checkpoints = open_ingredients(resolved, allow_pickle=args.allow_pickle, ema=args.ema, token=args.token)
    try:
        for ref, ckpt in zip(resolved, checkpoints):
            dtypes = Counter(str(m.dtype).removeprefix("torch.") for m in ckpt.metas.values())
            size = sum(m.nbytes for m in ckpt.metas.values())
            print(f"{ref.pinned}")
            print(f"  format:     {ckpt.format}")
            print(f"  tensors:    {len(ckpt.metas)} ({', '.join(f'{n} {d}' for d, n in dtypes.most_common())})")
            print(f"  elements:   {ckpt.num_elements:,} ({describe_size(size)})")
            if ckpt.aliases:
                print(f"  tied:       {'; '.join(' = '.join(g) for g in ckpt.aliases)}")
            for note in ckpt.notes:
                print(f"  note:       {note}")
        if len(checkpoints) > 1:
            try:
                plan = align(layouts_of(checkpoints), args.exclude)
            except AlignmentError as exc:
                print(f"alignment: FAILS: {exc}")
                return EXIT_BAD_INPUT
            print(f"alignment: ok, {len(plan.tensors)} tensors ({len(plan.tensors) - len(plan.copied)} averaged, "
                  f"{len(plan.copied)} copied from the first)")
            for note in plan.notes:
                print(f"  note: {note}")
            similarity = weight_similarity(checkpoints, plan)
            print(similarity.table())
            pairs = similarity.independent_pairs()
            print(
                f"shared initialization: NO for pairs {pairs}: averaging them will likely collapse"
                if pairs
                else f"shared initialization: likely (all pairs have cosine >= {SHARED_INIT_COSINE})"
            )
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    return EXIT_OK


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from hub_soup.eval.diagnose import diagnose
    from hub_soup.eval.evaluate import Evaluator
    from hub_soup.hub.resolve import resolve_ref
    from hub_soup.merging.plan import align
    from hub_soup.pipeline import device_for, layouts_of, open_ingredients
    from hub_soup.recipe import EvalSpec

    spec = EvalSpec.model_validate(eval_spec_from_args(args))
    refs = [*args.refs, *([args.base] if args.base else [])]
    resolved = [resolve_ref(r, token=args.token) for r in refs]
    checkpoints = open_ingredients(resolved, allow_pickle=args.allow_pickle, ema=True, token=args.token)
    try:
        plan = align(layouts_of(checkpoints))
        evaluator = Evaluator(
            spec, checkpoints[0], device=device_for(args.device), trust_remote_code=args.trust_remote_code
        )
        report = diagnose(
            checkpoints[0], checkpoints[1], plan, evaluator, alphas=args.alphas,
            base=checkpoints[2] if args.base else None, plot_path=args.plot,
            recalibrate_bn_batches=args.recalibrate_bn,
        )
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    print(report.text())
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(recipe_schema(), indent=2))
    return EXIT_OK


def _setup_output(quiet: bool) -> None:
    """Log lines to stderr; no progress bars when quiet, in CI, or without a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{program_name()}: %(message)s"))
    logger.handlers[:] = [handler]  # main() may run many times in one process (tests, notebooks)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet or os.environ.get("CI", "").lower() in ("1", "true") or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # datasets follows this switch when evaluation imports it


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (CI cancelling a job, ``kill``) unwinds like Ctrl-C, so partial output is removed."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub-soup`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_output(args.quiet)
    handlers = {
        "merge": _cmd_merge, "run": _cmd_run, "inspect": _cmd_inspect, "diagnose": _cmd_diagnose, "schema": _cmd_schema,
    }
    try:
        return handlers[args.command](args)
    except HubSoupError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        from hub_soup.summary import write_step_summary

        write_step_summary(f"## hub-soup failed (exit {exc.exit_code})\n\n```\n{exc}\n```")
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{program_name()}: interrupted; nothing was kept", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``hub-soup`` console script: :func:`main`, with SIGTERM unwinding like Ctrl-C.

    Once :func:`main` has returned, every file is closed and every thread joined,
    so the process ends at once (``os._exit``) instead of tearing the interpreter
    down: with torch imported, the teardown (thousands of modules, the C++ static
    destructors of a CUDA build) takes 0.3-0.4 s here, 10-15% of merging a 0.5B
    model (see benchmarks/RESULTS.md). A crash still exits normally, traceback and all.
    """
    signal.signal(signal.SIGTERM, _terminate)
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

