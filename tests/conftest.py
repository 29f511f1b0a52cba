"""Session-wide loopback Hub (see ``tests/hub_fixtures.py``), and the test kit's thread count.

The server starts when this conftest is imported, before any test module imports
``huggingface_hub``, because the client reads ``HF_ENDPOINT`` at import time. Under
pytest-xdist each worker process imports this conftest and runs a Hub of its own.

Threads: the suite runs one pytest worker per CPU (``-n auto`` in pyproject.toml), so each
process, and every process a test starts (CLI runs, ``accelerate launch``), computes with one
torch thread: ``HUB_SOUP_THREADS`` for what hub-soup runs (see ``hub_soup/threads.py``) and
``OMP_NUM_THREADS`` for torch's own default, set here before torch is first imported. More
threads than CPUs is what made single tests 25x slower on a busy machine.
"""

from __future__ import annotations

import os

os.environ["HUB_SOUP_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import logging  # after the thread count above, read when torch is first imported
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_fixtures import TEST_TOKEN, TEST_USER, configure_client_env, start_hub
from tests.hub_server import HubServer

_ROOT = Path(tempfile.mkdtemp(prefix="hub-soup-tests-"))
os.environ["HUB_SOUP_CACHE"] = str(_ROOT / "cache")  # compiled loops (hub_soup/native), not the user's cache
_HUB = start_hub(_ROOT)
_HUB.add_token(TEST_TOKEN, TEST_USER)
configure_client_env(_HUB, _ROOT / "hf_home")


def pytest_unconfigure(config: pytest.Config) -> None:
    _HUB.stop()
    shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """The session's server; faults a test armed but did not trigger are dropped after it."""
    yield _HUB
    _HUB.reset_faults()


@pytest.fixture
def hub_token() -> str:
    """A write token of ``TEST_USER``: repos created with it are ``f"{TEST_USER}/<name>"``."""
    return TEST_TOKEN


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` adds a stderr handler to the ``hub_soup`` logger on every call; drop them after each test."""
    logger = logging.getLogger("hub_soup")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
