"""Checkpoint formats, one file each, and the registry that knows them.

A format (:class:`CheckpointFormat`) says everything hub-soup needs to know of one
kind of weights file, in one place: the names and suffixes it claims, how to
recognise its bytes (:meth:`~CheckpointFormat.sniff`), how to open a file of it
as tensors (:meth:`~CheckpointFormat.open`), which files to download from a Hub
repo that holds it (:meth:`~CheckpointFormat.hub_files`), whether its layout can
be read over HTTP before downloading (:meth:`~CheckpointFormat.remote_metas`),
and how much it is preferred when a folder or a repo holds several
(:attr:`~CheckpointFormat.preference`). Folders, shard indexes and clean keys
are the same for every format (:mod:`hub_soup.io.read`); safetensors
(:mod:`.safetensors`) and torch pickles (:mod:`.torch_pickle`) are the built-in
ones. An installed package adds a format under the entry-point group
``hub_soup.formats`` (:mod:`hub_soup.registry`)::

    [project.entry-points."hub_soup.formats"]
    npz = "my_package.npz:Npz"

The format of a file is sniffed from its bytes, never trusted from its name: a
file that several formats recognise goes to the one that also claims its name,
and one that none recognises is refused naming every known format.

Torch-free (the built-in formats are references, imported on first use), so the
registry can be listed by light commands.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from hub_soup.errors import CheckpointFormatError
from hub_soup.registry import FORMATS_GROUP, Registry

if TYPE_CHECKING:
    import torch

    from hub_soup.io.safetensors_io import TensorMeta

# Bytes of a file's start that every format's sniff sees.
SNIFF_BYTES = 64
INDEX_SUFFIX = ".index.json"  # a shard index of any format (``model.safetensors.index.json``)


class TensorSource(Protocol):
    """One physical file of tensors, read in chunks, under the names it saved them as."""

    def read_into(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class InMemory:
    """A :class:`TensorSource` of tensors loaded whole (a torch pickle, memory-mapped when it is a zip archive;
    any format whose reader hands back whole arrays)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def read_into(self, name: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        tensor = self._tensors[name]
        if not tensor.is_contiguous():  # once: later chunks slice the contiguous copy
            tensor = self._tensors[name] = tensor.contiguous()
        return tensor.view(-1)[start : start + count]

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors.clear()


@dataclass(frozen=True)
class OpenOptions:
    """What the user asked of every reader; a format uses what applies to it.

    Attributes:
        allow_pickle: load files that run code when loaded (a whole pickled ``nn.Module``).
        ema: take a training checkpoint's EMA weights when it also holds raw ones.
    """

    allow_pickle: bool = False
    ema: bool = True


@dataclass
class TensorFile:
    """One weights file, opened: its tensors under the names they were saved as.

    Attributes:
        format: what :attr:`hub_soup.io.read.Checkpoint.format` says of it (``safetensors``, ``pytorch``, ...).
        metas: dtype and shape of each tensor, in file order.
        source: where the tensors are read from.
        aliases: groups of names that share storage (tied weights).
        notes: what was done to read it (EMA chosen, entries ignored, ...).
    """

    format: str
    metas: dict[str, TensorMeta]
    source: TensorSource
    aliases: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class CheckpointFormat(ABC):
    """One kind of weights file. Subclasses set :attr:`name` and :attr:`suffixes` and implement
    :meth:`sniff` and :meth:`open`; the rest has defaults that fit a format of single files.

    Attributes:
        name: the registry's name of the format (``safetensors``).
        description: how messages call its files (``a torch file``); empty: ``a <name> file``.
        suffixes: the file-name endings it claims: a folder's or a repo's weights are the files some
            format claims, and a file several formats recognise goes to the one claiming its name.
        single_name: the name ``save_pretrained`` gives an unsharded file of it (``model.safetensors``),
            chosen in a folder or a repo before any other file.
        index_name: the name of its shard index (``model.safetensors.index.json``), chosen first of all.
        shard_pattern: the names of the shards its index points to (``model-*-of-*.safetensors``).
        sharded: what ``Checkpoint.format`` says of sharded weights of it; empty: ``<name>-sharded``.
        preference: lower is chosen first when a folder or a repo holds files of several formats.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]]
    single_name: ClassVar[str | None] = None
    index_name: ClassVar[str | None] = None
    shard_pattern: ClassVar[str | None] = None
    sharded: ClassVar[str] = ""
    preference: ClassVar[int] = 50

    @abstractmethod
    def sniff(self, head: bytes) -> bool:
        """Whether a file starting with ``head`` (its first :data:`SNIFF_BYTES` bytes, fewer for a shorter
        file) looks like this format. Cheap and never raising: every format sniffs every file."""

    @abstractmethod
    def open(self, path: Path, label: str, options: OpenOptions) -> TensorFile:
        """Open ``path`` without reading more tensor data than the format needs to.

        Args:
            label: the name to use in messages.

        Raises:
            CheckpointFormatError: the file is corrupt, truncated, or holds no tensors (a subclass for a
                file that would run code without ``options.allow_pickle``).
        """

    def claims(self, name: str) -> bool:
        """Whether a file called ``name`` is (by its name) a weights file of this format."""
        return name.endswith(self.suffixes)

    def hub_files(self, chosen: str, present: Collection[str]) -> list[str]:
        """The files to download for the weights file ``chosen`` among a repo's ``present`` ones, ``chosen``
        first: an index's shards after it; a format whose files need others beside them adds them here."""
        if chosen != self.index_name or self.shard_pattern is None:
            return [chosen]
        pattern = self.shard_pattern
        return [chosen] + sorted(f for f in present if "/" not in f and fnmatch.fnmatchcase(f, pattern))

    def remote_metas(
        self, repo_id: str, sha: str, weights: list[str], label: str, token: str | bool | None
    ) -> dict[str, TensorMeta] | None:
        """The tensors of the weights ``weights`` (as :meth:`hub_files` gave them) of a Hub repo, read over
        HTTP without downloading them, under their saved names; None when the format cannot tell before
        the download (its files are checked once downloaded). Hub errors are the caller's to translate."""
        return None

    def describe(self) -> str:
        """How messages call a file of this format."""
        return self.description or f"a {self.name} file"

    def sharded_format(self) -> str:
        """What ``Checkpoint.format`` says of sharded weights whose preferred shard format is this one."""
        return self.sharded or f"{self.name}-sharded"


# The built-in formats are references until first used (their modules import torch); plugins add theirs by entry point.
FORMATS: Registry[type[CheckpointFormat]] = Registry(
    "checkpoint format", error=CheckpointFormatError, group=FORMATS_GROUP, expected=CheckpointFormat,
    how_to_add=f"or install a package that adds one (entry points {FORMATS_GROUP!r})",
    references={
        "safetensors": "hub_soup.io.formats.safetensors:Safetensors",
        "torch": "hub_soup.io.formats.torch_pickle:TorchPickle",
    },
)


def format_names() -> tuple[str, ...]:
    """Every format's name: the built-in ones, then the installed plugins' (no import of any)."""
    return FORMATS.names()


def get_format(name: str) -> CheckpointFormat:
    """The format called ``name``, importing a built-in or a plugin's on first use.

    Raises:
        CheckpointFormatError: no format has that name (the hint lists the known ones), or a plugin's does not load.
    """
    return FORMATS.get(name)()


def known_formats() -> list[CheckpointFormat]:
    """Every format, most preferred first (the registry's order among equals): importing each one."""
    formats = [get_format(name) for name in format_names()]
    return sorted(formats, key=lambda fmt: fmt.preference)


def _listing(formats: list[CheckpointFormat]) -> str:
    """``safetensors: .safetensors; torch: .bin, .pt, ...``: the known formats and the names they claim."""
    return "; ".join(f"{fmt.name}: {', '.join(fmt.suffixes)}" for fmt in formats)


def sniff(path: Path) -> CheckpointFormat:
    """The format of the file ``path``, from its first bytes; among several that recognise it, the one that
    also claims its name, else the most preferred.

    Raises:
        CheckpointFormatError: no format recognises it (the message names them all).
    """
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    formats = known_formats()
    matching = [fmt for fmt in formats if fmt.sniff(head)]
    if not matching:
        described = [fmt.describe() for fmt in formats]
        which = f"neither {', '.join(described[:-1])} nor {described[-1]}" if len(described) > 1 else f"not {described[0]}"
        raise CheckpointFormatError(
            f"{path}: not a checkpoint: {which} (it starts with {head[:12]!r})",
            hint=f"pass a file of a known format ({_listing(formats)}), or the folder holding it; "
            f"or install a package that adds its format (entry points {FORMATS_GROUP!r})",
        )
    return next((fmt for fmt in matching if fmt.claims(path.name)), matching[0])


def claimed_by(name: str, formats: list[CheckpointFormat] | None = None) -> CheckpointFormat | None:
    """The format a weights file called ``name`` belongs to by its name (its index's, its standard
    name's or its suffix's; the most preferred when several claim it); None for a file no format claims.

    Args:
        formats: :func:`known_formats`, when the caller has them already.
    """
    formats = known_formats() if formats is None else formats
    return next((fmt for fmt in formats if name in (fmt.index_name, fmt.single_name)), None) or next(
        (fmt for fmt in formats if fmt.claims(name)), None
    )


def choose_weights(names: Collection[str], where: str, *, none_hint: str, several_hint: str) -> list[str]:
    """Which of a folder's or a repo's top-level files ``names`` are its weights, one format only.

    A format's shard index, then its single standard name, in order of preference; else the one file of
    the most preferred format that has files there.

    Returns:
        The files, the first of which is what :func:`hub_soup.io.read.open_checkpoint` opens (an index's
        shards follow it: :meth:`CheckpointFormat.hub_files`).

    Raises:
        CheckpointFormatError: no file of any format (``none_hint``), or several of the preferred one and
            none of them its standard name (``several_hint``).
    """
    present = {name for name in names if "/" not in name}
    formats = known_formats()
    for fmt in formats:
        for standard in (fmt.index_name, fmt.single_name):
            if standard is not None and standard in present:
                return fmt.hub_files(standard, present)
    for fmt in formats:
        files = sorted(name for name in present if claimed_by(name, formats) is fmt)
        if len(files) == 1:
            return fmt.hub_files(files[0], present)
        if files:
            raise CheckpointFormatError(
                f"{where}: several weights files and none is the standard name: {', '.join(files)}",
                hint=several_hint,
            )
    raise CheckpointFormatError(f"{where}: no weights found (looked for {_listing(formats)})", hint=none_hint)
