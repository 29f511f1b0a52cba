"""Download only what a soup needs, through the huggingface_hub cache.

One weights format per ingredient (safetensors preferred, never both), plus the
config, tokenizer and preprocessor files: never optimizer states, ONNX, TF or
Flax files. Everything goes through ``snapshot_download`` at the pinned commit,
so a second run downloads nothing, interrupted downloads resume, and the user
sees huggingface_hub's own progress bars. Before that, :func:`remote_layout`
reads only the safetensors headers over HTTP so alignment can fail in seconds.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError
from huggingface_hub.utils import TensorInfo

from hub_soup.errors import CheckpointFormatError, RefNotFoundError
from hub_soup.hub.errors import hub_errors, with_retries
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.io import files
from hub_soup.io.read import clean_keys
from hub_soup.io.safetensors_io import DTYPES, TensorMeta
from hub_soup.merging.plan import Layout


@dataclass(frozen=True)
class Fetched:
    """Local copies of an ingredient's files, inside the huggingface_hub cache."""

    weights: Path  # the single weights file, or the shard index
    sidecars: list[Path]


def choose_weights(repo_files: tuple[str, ...] | list[str], filename: str | None, where: str) -> list[str]:
    """The weights files to download: one format only, safetensors first.

    Returns:
        The files, the first of which is what :func:`hub_soup.io.read.open_checkpoint` opens
        (the index for sharded weights).
    """
    present = set(repo_files)
    if filename:
        if filename not in present:
            raise RefNotFoundError(f"{where}: its config names {filename!r}, which is not in the repo")
        return [filename]
    for index, shard_glob in (
        (files.SAFETENSORS_INDEX, "model-*-of-*.safetensors"),
        (files.PYTORCH_INDEX, "pytorch_model-*-of-*.bin"),
    ):
        single = index.removesuffix(".index.json")
        if index in present:
            return [index] + sorted(f for f in present if fnmatch.fnmatchcase(f, shard_glob) and "/" not in f)
        if single in present:
            return [single]
    top = sorted(f for f in present if "/" not in f and files.is_weight_file(f))
    safetensors = [f for f in top if f.endswith(files.SAFETENSORS_SUFFIXES)]
    candidates = safetensors or top
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise CheckpointFormatError(f"{where}: the repo holds no weights file (safetensors, .bin, .pt, .pth, .ckpt)")
    raise CheckpointFormatError(
        f"{where}: several weights files and none is the standard name: {', '.join(candidates)}",
        hint="download the one you mean and pass its local path",
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
    """Tensor names, dtypes and shapes from safetensors headers over HTTP, without the weights.

    Returns ``None`` when the weights are not safetensors (pickles are only
    checked after download).
    """
    repo_id, sha = resolved.repo_id, resolved.sha
    assert repo_id and sha
    weights = choose_weights(resolved.files, resolved.filename, resolved.label)
    if not weights[0].endswith((".safetensors", files.SAFETENSORS_INDEX)):
        return None
    api = HfApi()

    def read_headers() -> dict[str, TensorInfo]:
        with hub_errors(repo_id, sha, action="read the headers of"):
            try:
                if weights[0] in (files.SAFETENSORS_SINGLE, files.SAFETENSORS_INDEX):
                    repo = api.get_safetensors_metadata(repo_id, revision=sha, token=token)
                    return {n: info for meta in repo.files_metadata.values() for n, info in meta.tensors.items()}
                meta = api.parse_safetensors_file_metadata(repo_id, weights[0], revision=sha, token=token)
                return dict(meta.tensors)
            except (NotASafetensorsRepoError, SafetensorsParsingError) as exc:
                raise CheckpointFormatError(f"{resolved.label}: unreadable safetensors header ({exc})") from None

    infos = with_retries(read_headers, f"reading the headers of {resolved.label}")
    metas: dict[str, TensorMeta] = {}
    for name, info in infos.items():
        if info.dtype not in DTYPES:
            return None  # a dtype we do not know: leave the verdict to the local reader
        metas[name] = TensorMeta(DTYPES[info.dtype], tuple(info.shape))
    renamed, _ = clean_keys(list(metas), resolved.label)
    return Layout(label=resolved.label, metas={new: metas[old] for new, old in renamed.items()})
