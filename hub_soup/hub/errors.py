"""Turn huggingface_hub's exceptions into hub-soup's, with what to do next.

resolve, fetch and push all talk to the Hub; one translation keeps their
messages alike: which repo, which revision, and the command that fixes it.
Tokens never appear in these messages (the client's own messages do not carry
them, and we only ever format repo ids, revisions and status codes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_soup.errors import AccessError, HubSoupError, NetworkError, RefNotFoundError

logger = logging.getLogger(__name__)
T = TypeVar("T")

LOGIN_HINT = "run `hf auth login`, set HF_TOKEN, or pass --token"


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, action: str = "read") -> Iterator[None]:
    """Map any huggingface_hub/HTTP failure inside the block to a :class:`HubSoupError`."""
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except HubSoupError:
        raise
    except LocalTokenNotFoundError:
        raise AccessError(f"a Hub token is needed to {action} {at}, and none was found", hint=LOGIN_HINT) from None
    except GatedRepoError:
        raise AccessError(
            f"{at} is gated: its authors require you to accept their terms first",
            hint=f"accept them at {constants.ENDPOINT}/{repo_id}, then {LOGIN_HINT}",
        ) from None
    except RevisionNotFoundError:
        raise RefNotFoundError(
            f"revision {revision!r} not found in {repo_id}", hint="check the branch, tag or commit SHA"
        ) from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and _token_rejected(exc):
            raise AccessError(f"the Hub rejected your token while trying to {action} {at}", hint=LOGIN_HINT) from None
        raise RefNotFoundError(
            f"repository {repo_id} not found on {constants.ENDPOINT}",
            hint=f"check the name; if it is private, {LOGIN_HINT}",
        ) from None
    except RemoteEntryNotFoundError as exc:
        raise RefNotFoundError(f"{at}: file not found ({exc.response.url if exc.response is not None else ''})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            verb = "rejected your token" if status == 401 else "denied access"
            raise AccessError(f"the Hub {verb} while trying to {action} {at} (HTTP {status})", hint=LOGIN_HINT) from None
        transient = status is None or status >= 500 or status in (408, 429)
        raise NetworkError(
            f"the Hub failed while trying to {action} {at} (HTTP {status})",
            hint="try again later" if transient else "the Hub refused the request; check the repo id and revision",
            retryable=transient,
        ) from None
    except OfflineModeIsEnabled:
        raise offline_error(f"{action} {at}") from None
    except LocalEntryNotFoundError:
        if not constants.is_offline_mode():
            raise NetworkError(
                f"cannot reach the Hub at {constants.ENDPOINT} to {action} {at}, and its files are not all in the "
                "local cache", hint="check your connection (or HF_ENDPOINT)"
            ) from None
        raise offline_error(f"{action} {at}: some of its files are not in the local cache") from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise NetworkError(
            f"cannot reach the Hub at {constants.ENDPOINT} to {action} {at} ({exc.__class__.__name__})",
            hint="check your connection (or HF_ENDPOINT); with HF_HUB_OFFLINE=1, ingredients already in the local "
            "cache are used without asking the Hub",
        ) from None


def offline_error(what: str) -> NetworkError:
    """Offline mode forbids the request: no retry can change that, and the message must not suggest
    setting HF_HUB_OFFLINE=1, which is what caused it."""
    return NetworkError(
        f"offline mode is on (HF_HUB_OFFLINE=1), so hub-soup cannot {what}",
        hint="Hub ingredients already in the local cache are used offline; unset HF_HUB_OFFLINE to download others",
        retryable=False,
    )


def _token_rejected(exc: HfHubHTTPError) -> bool:
    """401 from a bad token (the Hub says so) rather than from an anonymous look at a private repo."""
    text = str(exc).lower()
    return "invalid credentials" in text or "invalid token" in text or "invalid username or password" in text


def with_retries(call: Callable[[], T], what: str, attempts: int = 3, backoff: float = 0.5) -> T:
    """Run ``call``, retrying :class:`NetworkError` (connection lost, 5xx) with exponential backoff.

    A retried download resumes: huggingface_hub keeps the ``.incomplete`` file in
    its cache and asks the server for the remaining bytes only.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except NetworkError as exc:
            if not exc.retryable:
                raise
            if attempt == attempts:
                exc.message += f" (after {attempts} attempts)"
                raise
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("%s failed (%s); retrying in %.1fs", what, exc.message, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
