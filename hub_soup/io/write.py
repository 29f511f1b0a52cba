"""Write a soup folder tensor by tensor, all or nothing.

Everything is written into a hidden temporary folder beside the destination and
renamed into place only once every byte is on disk, so a failed or killed run
never leaves a half-written soup (and an existing soup, replaced with
``overwrite``, stays intact until the new one is complete).

``overwrite`` replaces only what a soup is: an empty folder, or a folder hub-soup
wrote (its ``hub-soup.yaml`` beside nothing but the files a soup holds, the names
:class:`SoupWriter` writes). Anything else is the user's, and is refused, named.

The hidden folders are ``.<name>.partial-<pid>-<random>`` (the soup being
written) and ``.<name>.old-<pid>-<random>`` (an existing soup set aside for the
instant of an overwrite). The current folder (``-o .``) cannot be renamed away
from under the shell standing in it, so its contents are swapped instead, through
``.<name>.swap-<pid>-<random>`` (the old soup's files being set aside), renamed
``.<name>.swapped-...`` once they all are. An interrupt (Ctrl-C, or SIGTERM, which the command
line turns into ``KeyboardInterrupt``) removes them on the way out, whatever
moment it lands at; a run killed outright (SIGKILL, power loss) leaves them, and
the next run on the same destination sweeps those of processes that are gone.
Either way, the destination ends as the old soup or the new one, whole.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from hub_soup.errors import OutputError, OutputExistsError, OutputNotASoupError
from hub_soup.io.files import is_sidecar
from hub_soup.io.safetensors_io import SafetensorsWriter, TensorMeta, plan_shards, shard_filenames

logger = logging.getLogger(__name__)

RECIPE_FILENAME = "hub-soup.yaml"  # the recipe every soup carries: what tells a soup folder from another
MERGEKIT_CONFIG = "mergekit_config.yml"  # the mergekit config a soup was made from, where it was (as mergekit writes it)
WEIGHT_STEMS = ("model", "adapter_model")  # model.safetensors, or a PEFT adapter's adapter_model.safetensors
# Every name a soup's files have: SoupWriter writes no other (add_file checks), so ``overwrite``
# knows a soup's files from the user's. Side files (config, tokenizer, processor, custom *.py)
# are those io.files carries along.
_SOUP_FILES = (RECIPE_FILENAME, MERGEKIT_CONFIG, "README.md", "adapter_config.json")
_WEIGHT_FILE = re.compile(
    rf"(?:{'|'.join(WEIGHT_STEMS)})(?:\.safetensors|-\d{{5}}-of-\d{{5}}\.safetensors|\.safetensors\.index\.json)"
)
SHOWN = 5  # entries named when a folder is refused; the rest are counted

#: Every soup this process put in place, in order: what an interrupt that lands after the
#: last rename leaves (the command line says so, rather than that nothing was kept).
PLACED: list[Path] = []


def is_soup_file(name: str) -> bool:
    """Whether a soup's files may have this name: its weights (shards, index), side files, adapter config,
    card and recipe."""
    return name in _SOUP_FILES or _WEIGHT_FILE.fullmatch(name) is not None or is_sidecar(name)


def check_destination(destination: Path, overwrite: bool, *, sweep: bool = True) -> None:
    """Refuse an existing output unless told to replace it, and what is not a soup even then (the
    pipeline asks before any download).

    Leftovers of killed runs are swept first (:func:`_sweep_abandoned`), so a
    soup that a killed overwrite had set aside is back in place before it is judged.
    ``sweep=False`` only looks: for the processes of a launch that do not write
    (two processes restoring one folder would race).
    """
    destination = _absolute(destination)
    if sweep:
        _sweep_abandoned(destination)
    if not destination.exists():
        return
    if not overwrite:
        raise OutputExistsError(
            f"{destination} already exists; refusing to overwrite it", hint="pass --overwrite or choose another -o"
        )
    check_replaceable(destination)


def check_replaceable(destination: Path) -> None:
    """Refuse to replace anything but an empty folder or a soup hub-soup wrote.

    A soup is a folder with a ``hub-soup.yaml`` and only files whose names a soup's
    files have (:func:`is_soup_file`): replacing it loses nothing that a run of its
    recipe cannot make again. Anything else in the folder (notes, a subfolder, a
    ``.git``) is the user's, and replacing the folder would delete it.

    Raises:
        OutputNotASoupError: naming the first entries that would have been deleted, and how many more.
    """
    if destination.is_dir():
        with os.scandir(destination) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        if not entries:
            return
        soup = any(entry.name == RECIPE_FILENAME for entry in entries)
        theirs = [
            entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "") for entry in entries
            if not (soup and entry.is_file(follow_symlinks=False) and is_soup_file(entry.name))
        ]
        if not theirs:
            return
        what = "it holds more than a soup" if soup else f"it is not a soup (no {RECIPE_FILENAME})"
        more = f" and {len(theirs) - SHOWN} more" if len(theirs) > SHOWN else ""
        what += f", and --overwrite would delete {', '.join(theirs[:SHOWN])}{more}"
    else:
        what = "it is a file, not a soup folder"
    raise OutputNotASoupError(
        f"refusing to overwrite {destination}: {what}",
        hint="--overwrite replaces only an empty folder or a soup hub-soup wrote: choose another -o, "
        "or move those out of it first",
    )


class SoupWriter:
    """Stream tensors into ``model.safetensors`` (or shards + index) in a temporary folder.

    Use as a context manager (``with SoupWriter(...) as writer:``): entering it
    creates the temporary folder (and any missing parents of the destination),
    :meth:`commit` renames it to the destination, and leaving the block without
    a commit (an exception, an interrupt) removes everything it created.
    :attr:`tmp` and the writing methods are valid only inside the block.

    Interrupts: constructing the writer creates nothing, so an interrupt before
    the ``with`` block is entered leaves nothing behind. Inside :meth:`__enter__`
    each path is recorded *before* it is created (a random name is chosen first,
    then ``os.mkdir``), and the whole of ``__enter__`` runs under
    ``except BaseException: abort(); raise``: an interrupt landing anywhere in it,
    even between the ``mkdir`` and the next line, finds the exact names to remove.
    Once ``__enter__`` has returned, the ``with`` statement guarantees ``__exit__``
    (CPython 3.10+ runs signal handlers only around calls and at backward jumps, and
    there is none between ``__enter__`` returning and the protected block).
    (Blocking SIGTERM/SIGINT with ``pthread_sigmask`` would be the other way; it
    only works in the main thread, and unblocking runs the pending handler right
    there, so the same cleanup would be needed anyway.)

    Replacing the current folder (``-o .``, with ``overwrite``) swaps its contents
    (see :meth:`_swap_contents`): renaming it would leave the shell that stands in it
    in a deleted folder.

    Args:
        destination: the output folder.
        tensors: every output tensor, in the order they will be written.
        max_shard_bytes: shard size limit (``save_pretrained``'s ``max_shard_size``).
        overwrite: replace an existing destination (only once the new soup is complete), if it is an empty
            folder or a soup (:func:`check_replaceable`).
        stem: the weights files' name: ``model`` (``model.safetensors``), or ``adapter_model`` for a PEFT adapter
            (one of :data:`WEIGHT_STEMS`).
    """

    def __init__(
        self, destination: Path, tensors: Mapping[str, TensorMeta], max_shard_bytes: int, overwrite: bool = False,
        *, stem: str = "model",
    ) -> None:
        assert stem in WEIGHT_STEMS, f"a soup's weights are {WEIGHT_STEMS} files, not {stem}: add it there"
        self.destination = _absolute(destination)
        self._overwrite = overwrite
        check_destination(self.destination, overwrite)
        self._shards = plan_shards(tensors, max_shard_bytes)
        self._stem = stem
        self._names = shard_filenames(len(self._shards), stem)
        self._tensors = tensors
        self._shard_of = {key: i for i, shard in enumerate(self._shards) for key in shard}
        self._current: SafetensorsWriter | None = None
        self._current_index = -1
        self.files: list[str] = []
        # Every path below is set before the thing it names is created, so abort() always knows it.
        self._made_parents: list[Path] = []  # ``-o new/dir/soup``: parents this run creates go again if it fails
        self._tmp: Path | None = None
        # Where the previous soup goes for the instant of an overwrite: ``old`` (the folder), or, for the
        # current folder, ``swap`` then ``swapped`` (its files; the folder is renamed once they are all there).
        self._aside: dict[str, Path] = {}
        self._committing = False  # from the first rename on: once tmp is gone, the new soup is in place
        self._committed = False

    @property
    def tmp(self) -> Path:
        """The temporary folder the soup is written into; it exists only inside the ``with`` block."""
        if self._tmp is None:
            raise RuntimeError("use SoupWriter as a context manager: `with SoupWriter(...) as writer:`")
        return self._tmp

    def __enter__(self) -> SoupWriter:
        assert self._tmp is None and not self._committed, "a SoupWriter is entered once"
        try:
            self._made_parents = [p for p in self.destination.parents if not p.exists()]
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            while True:
                self._tmp = _hidden_name(self.destination, "partial")
                try:
                    os.mkdir(self._tmp)  # 0o777 less the umask: an ordinary folder once renamed into place
                    break
                except FileExistsError:
                    self._tmp = None  # not ours: never remove it (a fresh random name follows)
            return self
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise _disk_error(self.destination, exc) from None
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:  # an exception, an interrupt, or no commit(): keep nothing
            self.abort()

    def begin(self, key: str) -> None:
        """Start tensor ``key``; its bytes follow through :meth:`write`."""
        index = self._shard_of[key]
        if index != self._current_index:
            self._close_shard()
            names = self._shards[index]
            try:
                self._current = SafetensorsWriter(
                    self.tmp / self._names[index], {n: self._tensors[n] for n in names}, {"format": "pt"}
                )
            except OSError as exc:
                raise _disk_error(self.destination, exc) from None
            self._current_index = index
            self.files.append(self._names[index])

    def write(self, chunk: torch.Tensor) -> None:
        """Append the next bytes of the current tensor."""
        assert self._current is not None, "begin() a tensor first"
        try:
            self._current.write(chunk)
        except OSError as exc:
            raise _disk_error(self.destination, exc) from None

    def _close_shard(self) -> None:
        if self._current is not None:
            try:
                self._current.close()
            except OSError as exc:
                raise _disk_error(self.destination, exc) from None
            self._current = None

    def add_file(self, name: str, content: bytes | str | Path) -> None:
        """Put a side file (config, tokenizer, card, recipe) in the soup."""
        assert is_soup_file(name), f"{name} is not a name a soup's files have: add it to _SOUP_FILES"
        target = self.tmp / name
        try:
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)
        except OSError as exc:
            raise _disk_error(self.destination, exc) from None
        self.files.append(name)

    def commit(self) -> Path:
        """Finish the last shard, write the index, and move the folder into place.

        Replacing an existing soup takes two renames: the old soup aside to a
        hidden ``.old-`` folder, then the new one into place. Interrupted between
        them, :meth:`abort` (on leaving the ``with`` block) puts the old soup back;
        killed between them, the next run's sweep does. Once the new soup is in
        place it stays, even if an interrupt lands before the old one is deleted,
        and it is in :data:`PLACED`. What is replaced is judged again here
        (:func:`check_replaceable`): files may have appeared in it during the merge.
        """
        self._close_shard()
        if len(self._names) > 1:
            weight_map = {key: self._names[i] for key, i in self._shard_of.items()}
            total = sum(meta.nbytes for meta in self._tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            self.add_file(f"{self._stem}.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        tmp = self.tmp
        try:
            if self.destination.exists():
                if not self._overwrite:  # another run made it meanwhile
                    raise OutputExistsError(
                        f"{self.destination} appeared while the soup was being written; refusing to overwrite it",
                        hint="pass --overwrite or choose another -o",
                    )
                check_replaceable(self.destination)
                self._committing = True
                if _is_cwd(self.destination):
                    self._swap_contents(tmp)
                else:
                    self._aside["old"] = _hidden_name(self.destination, "old")
                    os.replace(self.destination, self._aside["old"])
                    os.replace(tmp, self.destination)
                    shutil.rmtree(self._aside["old"], ignore_errors=True)
            else:
                self._committing = True
                os.replace(tmp, self.destination)
        except OSError as exc:
            raise _disk_error(self.destination, exc) from None
        PLACED.append(self.destination)
        self._committed = True  # abort() is harmless from the last rename on; this only spares it
        return self.destination

    def _swap_contents(self, tmp: Path) -> None:
        """Replace the current folder's contents with the new soup's, keeping the folder itself.

        The old soup's files go into a hidden ``.swap-`` folder, which is renamed
        ``.swapped-`` once it holds them all; the new soup's files then move in, and
        removing the emptied temporary folder is the moment the new soup is in place.
        Each step is a rename, so a stop anywhere is undone exactly
        (:func:`_settle_aside`): before ``.swapped-``, the folder holds only old files;
        after it, only new ones.
        """
        token = secrets.token_hex(6)
        self._aside = {kind: _hidden_name(self.destination, kind, token) for kind in ("swap", "swapped")}
        os.mkdir(self._aside["swap"])
        for name in os.listdir(self.destination):
            os.replace(self.destination / name, self._aside["swap"] / name)
        os.replace(self._aside["swap"], self._aside["swapped"])
        for name in os.listdir(tmp):
            os.replace(tmp / name, self.destination / name)
        os.rmdir(tmp)
        shutil.rmtree(self._aside["swapped"], ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far (an existing soup set aside by an interrupted commit goes back),
        unless the new soup was already in place: then it stays, and goes in :data:`PLACED`."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        placed = self._committing and self._tmp is not None and not self._tmp.exists()
        for kind, aside in self._aside.items():  # first: quick renames, before the slow removals
            try:
                _settle_aside(aside, kind, self.destination, placed)
            except OSError:  # left for the sweep of the next run, which restores it then
                pass
        if placed:
            PLACED.append(self.destination)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        for parent in self._made_parents:  # innermost first; rmdir keeps any that are not empty
            try:
                parent.rmdir()
            except FileNotFoundError:  # interrupted before it was made
                continue
            except OSError:
                break


def _absolute(destination: Path) -> Path:
    """The destination as an absolute path without ``.`` or ``..``: ``-o .`` has a name and a parent to stage beside."""
    return Path(os.path.abspath(destination))


def _is_cwd(destination: Path) -> bool:
    """Whether ``destination`` is the folder this process (and likely the shell that started it) stands in."""
    try:
        return os.path.samefile(destination, os.getcwd())
    except OSError:  # the current folder was deleted
        return False


def _hidden_name(destination: Path, kind: str, token: str | None = None) -> Path:
    """``.<name>.<kind>-<pid>-<random>`` beside the destination: the pid tells the sweep whose it is."""
    return destination.parent / f".{destination.name}.{kind}-{os.getpid()}-{token or secrets.token_hex(6)}"


def _settle_aside(aside: Path, kind: str, destination: Path, placed: bool) -> bool:
    """A soup an overwrite set aside goes back, unless the new one took its place; True if it went back.

    ``old``: the whole folder, back where nothing took its place. ``swap``/``swapped``
    (the current folder's files, see :meth:`SoupWriter._swap_contents`): the new soup
    took their place if ``placed``; otherwise the folder holds only old files (``swap``,
    kept) or only new ones (``swapped``, removed), and the old ones move back beside them.
    """
    if not aside.exists():
        return False
    if kind == "old":
        if destination.exists():  # the new soup took its place
            shutil.rmtree(aside, ignore_errors=True)
            return False
        os.replace(aside, destination)
        return True
    if placed:
        shutil.rmtree(aside, ignore_errors=True)
        return False
    if kind == "swapped":
        for name in os.listdir(destination):
            _remove(destination / name)
    for name in os.listdir(aside):
        os.replace(aside / name, destination / name)
    os.rmdir(aside)
    return True


def _remove(path: Path) -> None:
    """Delete a file or a folder (a link is a file: what it points to stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _sweep_abandoned(destination: Path) -> None:
    """Remove hidden folders of this destination left by runs that were killed (SIGKILL, power loss).

    Their names carry the writing process's id; a folder whose process is gone
    can never be completed, and a live run's folder is left alone. A soup that a
    killed overwrite had set aside (``.old-``, ``.swap-``, ``.swapped-``) goes back in
    place if the new one did not take its place (a swap's new soup is in place once its
    run's ``.partial-`` folder is gone), so a killed overwrite always leaves the old soup
    or the new one.
    """
    parent = destination.parent
    # escaped: a destination named `soup[1]` or `s*` must match its own folders, never another soup's
    name = glob.escape(destination.name)
    # set-aside soups first: restoring one is the one step that matters, and a swap's needs its partial folder
    for kind in ("swapped", "swap", "old", "partial"):
        for folder in sorted(parent.glob(f".{name}.{kind}-*")):
            pid, sep, _ = folder.name.rsplit(f".{kind}-", 1)[1].partition("-")
            if not sep or not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "partial":
                shutil.rmtree(folder, ignore_errors=True)
                continue
            placed = not any(parent.glob(f".{name}.partial-{pid}-*"))
            try:
                restored = _settle_aside(folder, kind, destination, placed)
            except OSError:
                continue  # leave it for a later run rather than lose it
            if restored:
                logger.warning("put back %s: a run killed while overwriting it had set it aside", destination)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_error(destination: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"no space left for {destination} ({exc.strerror}); nothing was kept",
            hint="free some space or choose another -o (the soup needs about one ingredient's size)",
        )
    return OutputError(f"cannot write {destination}: {exc.strerror or exc}")
