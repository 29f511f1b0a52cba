"""Download only what a soup needs, through the huggingface_hub cache.

One weights format per ingredient (the most preferred the repo holds, safetensors
first, never two; :mod:`hub_soup.io.formats` chooses), plus the config, tokenizer
and preprocessor files: never optimizer states, ONNX, TF or Flax files.
Everything goes through ``snapshot_download`` at the pinned commit, so a second
run downloads nothing, interrupted downloads resume, and the user sees
huggingface_hub's own progress bars. Before that, :func:`remote_layout`
reads only the safetensors headers over HTTP so alignment can fail in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download

from hub_soup.errors import RefNotFoundError
from hub_soup.hub.errors import hub_errors, with_retries
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.io import files, formats
from hub_soup.io.read import clean_keys
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.plan import Layout
from hub_soup.registry import FORMATS_GROUP


@dataclass(frozen=True)
class Fetched:
    """Local copies of an ingredient's files, inside the huggingface_hub cache."""

    weights: Path  # the single weights file, or the shard index
    sidecars: list[Path]


def choose_weights(repo_files: tuple[str, ...] | list[str], filename: str | None, where: str) -> list[str]:
    """The weights files to download: one format only, the most preferred (safetensors first), as
    :func:`hub_soup.io.formats.choose_weights` chooses a folder's.

    Returns:
        The files, the first of which is what :func:`hub_soup.io.read.open_checkpoint` opens
        (the index for sharded weights).
    """
    if filename:
        if filename not in repo_files:
            raise RefNotFoundError(f"{where}: its config names {filename!r}, which is not in the repo")
        fmt = formats.claimed_by(filename)
        return fmt.hub_files(filename, repo_files) if fmt is not None else [filename]
    return formats.choose_weights(
        repo_files, where, none_hint=f"check the repo id; a package can add a format (entry points {FORMATS_GROUP!r})",
        several_hint="download the one you mean and pass its local path",
    )


def fetch(resolved: ResolvedRef, token: str | bool | None = None) -> Fetched:
    """Download the ingredient's weights and side files at its pinned commit (or reuse the cache).

    Progress bars are huggingface_hub's, switched off globally with
    ``huggingface_hub.utils.disable_progress_bars()`` (the CLI does so in CI).
    """
    if resolved.kind == "local":
        raise ValueError("local ingredients are not fetched")
    repo_id, sha = resolved.repo_id, resolved.sha
    assert repo_id and sha
    weights = choose_weights(resolved.files, resolved.filename, resolved.label)
    sidecars = [f for f in resolved.files if files.is_sidecar(f)]

    def download() -> Path:
        with hub_errors(repo_id, sha, action="download"):
            return Path(snapshot_download(repo_id, revision=sha, allow_patterns=weights + sidecars, token=token))

    folder = with_retries(download, f"downloading {resolved.label}")
    _remember_revision(folder, resolved)
    return Fetched(weights=folder / weights[0], sidecars=[folder / f for f in sidecars])


def _remember_revision(snapshot: Path, resolved: ResolvedRef) -> None:
    """Record in the cache's ``refs/`` which commit the asked revision (``main`` by default) resolved to.

    The download asks for the pinned SHA, so huggingface_hub records no branch; this
    is the entry it writes itself when it downloads by branch name, and what lets a
    later run with ``HF_HUB_OFFLINE=1`` find the same commit (see ``resolve``).
    """
    revision = resolved.revision or constants.DEFAULT_REVISION
    if resolved.sha is None or revision == resolved.sha or snapshot.parent.name != "snapshots":
        return
    ref = snapshot.parent.parent / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text() != resolved.sha:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(resolved.sha)
    except OSError:  # a read-only shared cache: offline runs then need the SHA, nothing else changes
        pass


def remote_layout(resolved: ResolvedRef, token: str | bool | None = None) -> Layout | None:
    """Tensor names, dtypes and shapes read over HTTP, without the weights, by the weights' format
    (safetensors headers: :meth:`hub_soup.io.formats.CheckpointFormat.remote_metas`).

    Returns ``None`` when the format cannot tell before the download (pickles are only
    checked after it).
    """
    repo_id, sha = resolved.repo_id, resolved.sha
    assert repo_id and sha
    weights = choose_weights(resolved.files, resolved.filename, resolved.label)
    fmt = formats.claimed_by(weights[0])
    if fmt is None:
        return None

    def read_headers() -> dict[str, TensorMeta] | None:
        with hub_errors(repo_id, sha, action="read the headers of"):
            return fmt.remote_metas(repo_id, sha, weights, resolved.label, token)

    metas = with_retries(read_headers, f"reading the headers of {resolved.label}")
    if metas is None:
        return None
    renamed, _ = clean_keys(list(metas), resolved.label)
    return Layout(label=resolved.label, metas={new: metas[old] for new, old in renamed.items()})
