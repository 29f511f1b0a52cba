"""Turn what the user typed into an ingredient pinned to one exact commit.

Accepted spellings, tried in this order:

1. a local path that exists (it wins over everything);
2. ``hf-hub:org/name[@rev]`` (timm's spelling) or ``org/name[@rev]``: a Hub model repo;
3. a timm model name (``resnet50.a1_in1k``, ``resnet50``): looked up in timm's
   pretrained configs, which name the Hub repo (and sometimes the file) holding it.

Hub references are pinned to the commit SHA the revision pointed to when the
soup was made, so the recipe that travels with the soup rebuilds it exactly.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import HfApi, ModelInfo, constants, get_cached_repo_tree
from huggingface_hub.errors import CachedRepoTreeNotFoundError
from huggingface_hub.file_download import repo_folder_name

from hub_soup.errors import RefError, RefNotFoundError
from hub_soup.hub.errors import hub_errors, offline_error, with_retries

# The Hub's names neither start nor end with '.' or '-': ./x and ../x are paths, never repos.
_REPO_ID = re.compile(r"^(?![.-])[\w.\-]+(?<![.-])/(?![.-])[\w.\-]+(?<![.-])$")
_TIMM_NAME = re.compile(r"^[a-z0-9_]+(\.[\w\-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedRef:
    """An ingredient, located and pinned.

    Attributes:
        ref: as the user wrote it.
        kind: ``local``, ``hub`` or ``timm`` (a timm name, which also lives on the Hub).
        repo_id: the Hub repo (hub and timm kinds).
        revision: the revision asked for (branch, tag, SHA), if any.
        sha: the commit it resolved to.
        filename: the weights file to use when the repo's config names one (timm).
        path: the local path (local kind).
        library: ``timm`` or ``transformers`` when known from the repo.
        license, pipeline_tag: from the repo's card, carried over to the soup's card.
        lora: the PEFT LoRA adapter applied to the model before merging (mergekit's ``model+lora``),
            resolved the same way, its weights file named.
    """

    ref: str
    kind: Literal["local", "hub", "timm"]
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None
    filename: str | None = None
    path: Path | None = None
    library: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    files: tuple[str, ...] = ()  # the repo's files at ``sha``
    lora: ResolvedRef | None = None  # a LoRA adapter applied to the model (mergekit's model+lora), pinned too

    @property
    def pinned(self) -> str:
        """``org/name@<sha>`` (or the path), ``+`` its adapter's: a reference that always gives the same bytes."""
        own = str(self.path) if self.kind == "local" else f"{self.repo_id}@{self.sha}"
        return own if self.lora is None else f"{own}+{self.lora.pinned}"

    @property
    def label(self) -> str:
        """Short name for tables and messages: a local path as the user wrote it (``+`` its adapter's)."""
        if self.kind == "local":
            own = self.ref
        else:
            own = f"{self.repo_id}@{self.sha[:10]}" if self.sha else str(self.repo_id)
        return own if self.lora is None else f"{own}+{self.lora.label}"


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    if "@" in ref:
        name, revision = ref.rsplit("@", 1)
        if not revision:
            raise RefError(f"{ref!r}: empty revision after '@'")
        return name, revision
    return ref, None


def resolve_ref(
    ref: str, revision: str | None = None, *, token: str | bool | None = None, base: Path | None = None
) -> ResolvedRef:
    """Locate one ingredient and pin it (see module docstring for the spellings).

    Args:
        ref: what the user typed.
        revision: overrides an ``@rev`` in ``ref``.
        token: Hub token (``None``: the logged-in one, or ``HF_TOKEN``).
        base: the folder a relative path is read from (a recipe file's); default the working directory.
    """
    base = base if base is not None else Path()
    local = base / Path(ref).expanduser()
    if local.exists():
        if revision:
            raise RefError(f"{ref!r} is a local path: a revision ({revision!r}) makes no sense for it")
        return ResolvedRef(ref=ref, kind="local", path=local.resolve())
    name, at = split_revision(ref.removeprefix("hf-hub:"))
    revision = revision or at
    if _REPO_ID.match(name):
        near = None if ref.startswith("hf-hub:") else near_miss(base, name)
        if near is not None and constants.is_offline_mode():
            raise RefNotFoundError(
                f"{ref!r}: no local path of that name exists ({near}), and offline mode is on "
                "(HF_HUB_OFFLINE=1), so it was not looked up on the Hub",
                hint="check the path; a Hub repo is only used offline once it is in the local cache",
            )
        try:
            return _resolve_hub(ref, "hub", name, revision, None, token)
        except RefNotFoundError as exc:
            if near is None:
                raise
            exc.message += f"; nor is it a local path ({near})"
            raise
    if not ref.startswith("hf-hub:") and _TIMM_NAME.match(name):
        return _resolve_timm(ref, name, revision, token)
    if "/" in ref or ref.startswith((".", "~")):
        raise RefNotFoundError(f"{ref!r}: no such local path, and it is not a Hub repo id (org/name)")
    raise RefError(
        f"{ref!r} is not a path, a Hub repo id (org/name[@revision]) or a timm model name",
        hint="e.g. ./checkpoints/a, timm/resnet50.a1_in1k, hf-hub:timm/resnet50.a1_in1k, resnet50.a1_in1k",
    )


def near_miss(base: Path, name: str) -> str | None:
    """How ``org/name`` reads as a mistyped local path: its first folder exists here (None if not)."""
    folder, _, rest = name.partition("/")
    parent = base / folder
    if not parent.is_dir():
        return None
    close = closest_entry(parent, rest)
    there = f"{folder}/ exists but holds no {rest!r}"
    return f"{there}; did you mean {folder}/{close}?" if close else there


def closest_entry(folder: Path, name: str) -> str | None:
    """The name of the entry of ``folder`` closest to ``name``, for a "did you mean" (None: none close)."""
    close = difflib.get_close_matches(name, [p.name for p in folder.iterdir()], n=1, cutoff=0.6)
    return close[0] if close else None


def _resolve_timm(ref: str, name: str, revision: str | None, token: str | bool | None) -> ResolvedRef:
    """A timm model name -> the Hub repo named by its pretrained config."""
    import timm  # heavy: only when a timm name is used

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        known = timm.list_pretrained()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        arch = name.split(".", 1)[0]
        close += [n for n in known if n.startswith(arch + ".") and n not in close][: 5 - len(close)]
        hint = f"did you mean: {', '.join(close)}" if close else "`timm.list_pretrained('pattern*')` lists the names"
        why = "has no weights on the Hub" if cfg is not None else "is not a timm pretrained model"
        raise RefNotFoundError(f"{name!r} {why}", hint=hint)
    repo_id, cfg_revision = split_revision(cfg.hf_hub_id)
    return _resolve_hub(ref, "timm", repo_id, revision or cfg_revision, cfg.hf_hub_filename, token)


def _resolve_hub(
    ref: str, kind: Literal["hub", "timm"], repo_id: str, revision: str | None, filename: str | None,
    token: str | bool | None,
) -> ResolvedRef:
    if constants.is_offline_mode():
        return _resolve_cached(ref, kind, repo_id, revision, filename)

    def lookup() -> ModelInfo:
        with hub_errors(repo_id, revision, action="resolve"):
            return HfApi().model_info(repo_id, revision=revision, token=token)

    info = with_retries(lookup, f"resolving {repo_id}")
    card = info.card_data.to_dict() if info.card_data is not None else {}
    return ResolvedRef(
        ref=ref,
        kind=kind,
        repo_id=repo_id,
        revision=revision,
        sha=info.sha,
        filename=filename,
        library=info.library_name or card.get("library_name"),
        license=card.get("license"),
        pipeline_tag=info.pipeline_tag or card.get("pipeline_tag"),
        files=tuple(s.rfilename for s in info.siblings or ()),
    )


def _resolve_cached(
    ref: str, kind: Literal["hub", "timm"], repo_id: str, revision: str | None, filename: str | None
) -> ResolvedRef:
    """Offline (``HF_HUB_OFFLINE=1``): pin from the huggingface_hub cache, as a download would.

    The revision is read from the cache's refs (a branch or tag downloaded before)
    and the file list from the tree listing ``snapshot_download`` cached; the Hub
    is never asked, so a re-run offline makes the same soup as the run before it.
    """
    asked = revision or constants.DEFAULT_REVISION
    if _COMMIT.fullmatch(asked):
        sha: str | None = asked
    else:
        refs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / asked
        sha = refs.read_text().strip() if refs.is_file() else None
    try:
        tree = get_cached_repo_tree(repo_id, revision=sha) if sha else None
    except CachedRepoTreeNotFoundError:
        tree = None
    if sha is None or tree is None:
        raise offline_error(f"resolve {repo_id}@{asked}: it is not in the local cache")
    return ResolvedRef(
        ref=ref, kind=kind, repo_id=repo_id, revision=revision, sha=sha, filename=filename,
        files=tuple(f.path for f in tree),
    )
