"""Publish a finished soup folder to the Hub in one commit (or one pull request).

The Hub applies a commit atomically: the files are uploaded first and appear
together, or not at all, so a failed upload leaves the repo as it was. Stale
weights of an earlier soup with a different shard count are deleted in the same
commit. huggingface_hub skips files whose content the Hub already has, and makes
no commit at all when nothing changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import HfApi

from hub_soup.errors import PushError
from hub_soup.hub.errors import hub_errors

if TYPE_CHECKING:  # for annotations only: the Hub layer imports no recipe (the recipe imports eval, eval the Hub)
    from hub_soup.recipe import PushSpec

logger = logging.getLogger(__name__)

# Weights of a previous soup that this one may not overwrite file for file.
STALE_WEIGHTS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]


@dataclass(frozen=True)
class PushResult:
    """Where the soup landed."""

    repo_id: str
    commit_sha: str
    commit_url: str
    pr_url: str | None
    changed: bool  # False when the Hub already had exactly these files


def check_push_access(spec: PushSpec, token: str | bool | None) -> None:
    """Fail before any work when the token cannot write: missing, invalid, or read-only."""
    api = HfApi()
    with hub_errors(spec.repo_id, action="push to"):
        who = api.whoami(token=token)
    role = (who.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise PushError(
            f"your token is read-only: it cannot push to {spec.repo_id}",
            hint="create a token with write access at https://huggingface.co/settings/tokens",
        )


def push_soup(folder: Path, spec: PushSpec, token: str | bool | None, commit_message: str) -> PushResult:
    """Upload ``folder`` to ``spec.repo_id`` as one commit (or PR); create the repo if needed."""
    api = HfApi()
    with hub_errors(spec.repo_id, spec.revision, action="push to"):
        created = not api.repo_exists(spec.repo_id, token=token)
        api.create_repo(spec.repo_id, private=spec.private, exist_ok=True, token=token)
        try:
            if spec.revision and spec.revision != "main":
                api.create_branch(spec.repo_id, branch=spec.revision, exist_ok=True, token=token)
            before = api.repo_info(spec.repo_id, revision=spec.revision, token=token).sha
            info = api.upload_folder(
                repo_id=spec.repo_id,
                folder_path=folder,
                revision=spec.revision,
                commit_message=spec.commit_message or commit_message,
                create_pr=spec.create_pr,
                delete_patterns=STALE_WEIGHTS,
                token=token,
            )
        except Exception:
            if created:  # a repo we made seconds ago for this push: leave no empty husk behind
                api.delete_repo(spec.repo_id, token=token, missing_ok=True)
            raise
    changed = info.oid != before or info.pr_url is not None
    if not changed:
        logger.info("the Hub already has this exact soup at %s; no commit made", info.commit_url)
    return PushResult(
        repo_id=spec.repo_id, commit_sha=info.oid, commit_url=info.commit_url, pr_url=info.pr_url, changed=changed
    )
