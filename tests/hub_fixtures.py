"""Helpers to point the real ``huggingface_hub`` client at the loopback :class:`HubServer`.

``huggingface_hub`` (and ``datasets``) read their settings from the environment *when imported*,
so a conftest must start the server and export the variables before anything imports them::

    # conftest.py, at import time, before any `import huggingface_hub`
    from tests.hub_fixtures import start_hub, configure_client_env

    HUB = start_hub(Path(tempfile.mkdtemp(prefix="hub-soup-tests-")))
    configure_client_env(HUB, HUB.root / "hf_home")

The variables set (see :func:`client_env`):

- ``HF_ENDPOINT=<hub.endpoint>``: every Hub url the client builds.
- ``HF_HUB_DISABLE_XET=1``: otherwise 2.x uploads LFS files through Xet (``hf_xet`` is a hard
  dependency) and no server reply can turn that off; the server answers ``xet-*`` with 501.
- ``HF_HOME=<tmp>``: the download cache, the ``datasets`` cache and the stored token all live
  there, so a developer's real token and cache are never touched.
- ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``: no calls to other hosts.
- ``HF_HUB_ETAG_TIMEOUT``/``HF_HUB_DOWNLOAD_TIMEOUT``: bounded waits if the server misbehaves.
- ``HF_HUB_DISABLE_PROGRESS_BARS`` is deliberately left alone: progress bars are part of the path
  a user's run takes. ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are removed so that only the tokens a
  test passes explicitly are used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.hub_server import HubServer

#: The user and write token the conftest registers for tests.
TEST_USER = "tester"
TEST_TOKEN = "hf_tester_write_token"

#: Environment variables removed so a developer's shell cannot leak into the tests.
CLEARED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def start_hub(tmp_root: Path) -> HubServer:
    """Start a :class:`HubServer` storing its blobs under ``tmp_root/hub``; the caller stops it."""
    return HubServer(Path(tmp_root) / "hub").start()


def client_env(hub: HubServer, hf_home: Path) -> dict[str, str]:
    """The environment the client needs to talk to ``hub`` (see the module docstring for why)."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    }


def configure_client_env(hub: HubServer, hf_home: Path) -> None:
    """Export :func:`client_env` into ``os.environ``. Must run before ``huggingface_hub`` (or
    ``datasets``, ``transformers``...) is imported, which is why it mutates the process environment;
    raises if the client was already imported, since it would silently keep talking to the real Hub."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before the test Hub was configured: HF_ENDPOINT is ignored")
    for name in CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(client_env(hub, hf_home))
