"""Exception classes for every way a soup can fail.

Each failure a user can cause or fix has its own class, in the manner of
``huggingface_hub.errors``: callers (the CLI, the GitHub Action, tests) catch the
precise class, and the CLI turns any :class:`HubSoupError` into one readable line
plus a hint, with the class's :attr:`exit_code`. Anything that is not a
``HubSoupError`` is a bug in hub-soup and is shown with its traceback.
"""

from __future__ import annotations

# Documented process exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1  # the run failed for a reason outside the user's input (network, Hub, disk)
EXIT_BAD_INPUT = 2  # bad flags, bad recipe, bad or mismatched checkpoints
EXIT_WORSE_SOUP = 3  # an eval showed the soup is worse than its best ingredient; nothing pushed


class HubSoupError(Exception):
    """Base class: a failure with a message for humans and a hint on what to do.

    Args:
        message: what went wrong, naming the file, key or repo involved.
        hint: what the user can do about it (a flag, a command, a link).
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RefError(HubSoupError):
    """An ingredient reference could not be resolved (bad syntax, unknown name)."""


class RefNotFoundError(RefError):
    """The repo, revision, timm name or local path does not exist."""


class AccessError(HubSoupError):
    """The Hub refused access: missing or invalid token, private or gated repo."""

    exit_code = EXIT_FAILURE


class NetworkError(HubSoupError):
    """The Hub could not be reached or kept failing after retries.

    ``retryable`` is False for failures that a second try cannot change (offline
    mode, a 4xx answer): :func:`hub_soup.hub.errors.with_retries` raises those at once.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool = True) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class CheckpointFormatError(HubSoupError):
    """A file is not a checkpoint we can read: unknown format, corrupt or truncated."""


class UnsafePickleError(CheckpointFormatError):
    """Reading the file would execute arbitrary code and ``allow_pickle`` was not given."""


class AlignmentError(HubSoupError):
    """The ingredients' state_dicts cannot be mapped onto one set of keys and shapes."""


class AdapterError(AlignmentError):
    """LoRA adapters that cannot make one exact soup: another base, other settings, a kind of adapter not handled."""


class RecipeError(HubSoupError):
    """A recipe file or a set of command-line options is invalid."""


class UntrustedCodeError(RecipeError):
    """A recipe names code to run (a custom eval function) and ``trust_remote_code`` was not given."""

    HINT = (
        "read that code first; then pass --trust-remote-code (Python: trust_remote_code=True, "
        "the Action: trust-remote-code: true)"
    )


class NonFiniteSoupError(HubSoupError):
    """The soup would hold inf or nan where its inputs are finite: its dtype cannot hold a value (a narrowing
    ``dtype``), or the method scaled it beyond any range (a large ``lambda``). Nothing is written."""


class EvalError(HubSoupError):
    """An evaluation could not be set up or run (missing data, unknown task)."""


class WorseSoupError(HubSoupError):
    """The soup scored below its best ingredient, so it is not published silently."""

    exit_code = EXIT_WORSE_SOUP


class IndependentIngredientsError(WorseSoupError):
    """Without an eval, the ingredients look like independent trainings: their average likely collapsed."""


class OutputError(HubSoupError):
    """The soup could not be written (output exists, disk full, permission denied)."""

    exit_code = EXIT_FAILURE


class OutputExistsError(OutputError):
    """The output folder exists and ``overwrite`` was not given: the user's choice to make."""

    exit_code = EXIT_BAD_INPUT


class OutputNotASoupError(OutputExistsError):
    """``overwrite`` was given, but the output is neither an empty folder nor a soup hub-soup wrote: replacing
    it would delete what the user keeps there."""


class OutputOverlapsInputError(OutputError):
    """The output is an ingredient, contains one or lies inside one: writing it would destroy an input."""

    exit_code = EXIT_BAD_INPUT


class PushError(HubSoupError):
    """Uploading the soup to the Hub failed; the remote repo was left unchanged."""

    exit_code = EXIT_FAILURE
