"""``hub-soup``: a thin command line over :class:`~hub_soup.recipe.Recipe` and :func:`hub_soup.pipeline.run`.

Each command parses flags, builds the same :class:`~hub_soup.recipe.Recipe` the
YAML files and the Python API build, calls the pipeline, and maps errors to one
readable line and a documented exit code (see README, "Exit codes"). Bugs (any
exception that is not a :class:`~hub_soup.errors.HubSoupError`) keep their
traceback.

One module per command (``merge``, ``run``, ``verify``, ``inspect``, ``diagnose``, ``schema``,
``validate``, ``convert``), each adding its subparser and the handler it runs; options more
than one command takes are defined once, in :mod:`hub_soup.cli.options`. This
package imports no torch: the pipeline is imported by the handlers that make
or read models, so ``--help``, ``--version``, ``schema`` and ``validate`` answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hub_soup.cli import convert, diagnose, inspect, merge, run, schema, validate, verify
from hub_soup.errors import HubSoupError

logger = logging.getLogger("hub_soup")

#: The commands, in the order ``--help`` lists them: each module adds its subparser and handler.
COMMANDS = (merge, run, verify, inspect, diagnose, schema, validate, convert)

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


# What argparse reads as a negative number, hence as a value and not an option (its ``_negative_number_matcher``).
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")


class Parser(argparse.ArgumentParser):
    """argparse's parser, saying which option a misspelt one was meant to be, as git does.

    ``--mehtod uniform`` is otherwise "unrecognized arguments: --mehtod uniform" (or, in
    ``diagnose``, a complaint about a required option the misspelling hid). Each command's
    parser is one of these (``add_subparsers`` makes its parsers of the parent's class), so
    each suggests from its own options, and the top-level one from its own (``--quiet``).
    """

    _given: Sequence[str] = ()  # the arguments this parser was last given

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        parsed, extras = super().parse_known_args(args, namespace)
        misspelt = self._misspelt()
        if misspelt is not None:
            self.error(misspelt)
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        """argparse's error (usage, the message, exit 2), with a misspelt option named first: a misspelling
        also makes the errors that follow from it (a required option "missing"), which would mislead."""
        super().error(self._misspelt() or message)

    def _misspelt(self) -> str | None:
        """The message for the first given option this parser does not know but has one close to ("unknown
        option --mehtod: did you mean --method?"); None when there is none (argparse then says what it says)."""
        known = list(self._option_string_actions)
        commands = {name for action in self._actions if isinstance(action, argparse._SubParsersAction)
                    for name in action.choices}
        for given in self._given:
            if given == "--" or given in commands:  # positionals from here on, or the command's own arguments
                return None
            flag = given.partition("=")[0]
            if not flag.startswith("-") or flag == "-" or " " in given or _NEGATIVE_NUMBER.fullmatch(flag):
                continue  # a value or a positional, as argparse reads it
            if any(option.startswith(flag) if flag.startswith("--") else flag[:2] == option for option in known):
                continue  # an option, a unique or ambiguous abbreviation, or a short one with its value attached
            close = difflib.get_close_matches(flag, [option for option in known if option.startswith("--")], n=1)
            if close:
                return f"unknown option {flag}: did you mean {close[0]}?"
        return None


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then each command module's subparser.

    Each command module adds its own subparser with ``handler`` as a default, so
    :func:`main` runs ``args.handler(args)`` and a new command is a new module
    plus one name in :data:`COMMANDS`.
    """
    parser = Parser(
        prog=program_name(), description="Average fine-tuned models (model soups) from the Hugging Face Hub, timm or local files."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def _version() -> str:
    """The installed distribution's version, without importing the package (and torch with it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hub-soup")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _setup_output(quiet: bool) -> None:
    """Log lines to stderr; no progress bars when quiet, in CI, or without a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{program_name()}: %(message)s"))
    logger.handlers[:] = [handler]  # main() may run many times in one process (tests, notebooks)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet or os.environ.get("CI", "").lower() in ("1", "true") or not sys.stderr.isatty():
        # the tqdm bars other libraries draw (datasets' "Generating ... split", lm-eval's): off by default. tqdm
        # reads TQDM_DISABLE once, when first imported, which the command line has not done yet (the next line does)
        os.environ.setdefault("TQDM_DISABLE", "1")
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # datasets follows this switch when evaluation imports it, and so does lm-eval's model


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (CI cancelling a job, ``kill``) unwinds like Ctrl-C, so partial output is removed."""
    raise KeyboardInterrupt


def _placed_soups() -> list[Path]:
    """The soups this process put in place (:data:`hub_soup.io.write.PLACED`); none if the writer was never
    imported, which this package does not do itself (it imports no torch)."""
    write = sys.modules.get("hub_soup.io.write")
    return write.PLACED if write is not None else []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub-soup`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_output(args.quiet)
    placed_before = len(_placed_soups())  # main() may run many times in one process
    try:
        return args.handler(args)
    except HubSoupError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        from hub_soup.summary import write_step_summary

        write_step_summary(f"## hub-soup failed (exit {exc.exit_code})\n\n```\n{exc}\n```")
        return exc.exit_code
    except KeyboardInterrupt:
        # an interrupt after the soup's last rename (during a push, or the closing lines) leaves it whole
        kept = [str(path) for path in dict.fromkeys(_placed_soups()[placed_before:]) if path.exists()]
        said = f"the soup was written to {', '.join(kept)} and kept" if kept else "nothing was kept"
        print(f"{program_name()}: interrupted; {said}", file=sys.stderr)
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

