"""Write a soup folder tensor by tensor, all or nothing.

Everything is written into a hidden temporary folder beside the destination and
renamed into place only once every byte is on disk, so a failed or killed run
never leaves a half-written soup (and an existing soup, replaced with
``overwrite``, stays intact until the new one is complete).

The hidden folders are ``.<name>.partial-<pid>-<random>`` (the soup being
written) and ``.<name>.old-<pid>-<random>`` (an existing soup set aside for the
instant of an overwrite). An interrupt (Ctrl-C, or SIGTERM, which the command
line turns into ``KeyboardInterrupt``) removes them on the way out, whatever
moment it lands at; a run killed outright (SIGKILL, power loss) leaves them, and
the next run on the same destination sweeps those of processes that are gone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from hub_soup.errors import OutputError, OutputExistsError
from hub_soup.io.safetensors_io import SafetensorsWriter, TensorMeta, plan_shards, shard_filenames

logger = logging.getLogger(__name__)


def check_destination(destination: Path, overwrite: bool, *, sweep: bool = True) -> None:
    """Refuse an existing output unless told to replace it (the pipeline asks before any download).

    Leftovers of killed runs are swept first (:func:`_sweep_abandoned`), so a
    soup that a killed overwrite had set aside is back in place before it is judged.
    ``sweep=False`` only looks: for the processes of a launch that do not write
    (two processes restoring one folder would race).
    """
    if sweep:
        _sweep_abandoned(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(
            f"{destination} already exists; refusing to overwrite it", hint="pass --overwrite or choose another -o"
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

    Args:
        destination: the output folder.
        tensors: every output tensor, in the order they will be written.
        max_shard_bytes: shard size limit (``save_pretrained``'s ``max_shard_size``).
        overwrite: replace an existing destination (only once the new soup is complete).
        stem: the weights files' name: ``model`` (``model.safetensors``), or ``adapter_model`` for a PEFT adapter.
    """

    def __init__(
        self, destination: Path, tensors: Mapping[str, TensorMeta], max_shard_bytes: int, overwrite: bool = False,
        *, stem: str = "model",
    ) -> None:
        self.destination = destination
        self._overwrite = overwrite
        check_destination(destination, overwrite)
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
        self._backup: Path | None = None  # the previous soup, for the instant of an overwrite
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
        place it stays, even if an interrupt lands before the old one is deleted.
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
                self._backup = _hidden_name(self.destination, "old")
                os.replace(self.destination, self._backup)
                os.replace(tmp, self.destination)
                shutil.rmtree(self._backup, ignore_errors=True)
            else:
                os.replace(tmp, self.destination)
        except OSError as exc:
            raise _disk_error(self.destination, exc) from None
        self._committed = True  # abort() is harmless from the last rename on; this only spares it
        return self.destination

    def abort(self) -> None:
        """Drop everything written so far (an existing soup set aside by an interrupted commit goes back)."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        if self._backup is not None:  # first: one quick rename, before the slow removals
            try:
                _restore_or_drop(self._backup, self.destination)
            except OSError:  # left for the sweep of the next run, which restores it then
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        for parent in self._made_parents:  # innermost first; rmdir keeps any that are not empty
            try:
                parent.rmdir()
            except FileNotFoundError:  # interrupted before it was made
                continue
            except OSError:
                break


def _hidden_name(destination: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>-<random>`` beside the destination: the pid tells the sweep whose it is."""
    return destination.parent / f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def _restore_or_drop(backup: Path, destination: Path) -> None:
    """A soup set aside by an overwrite goes back, unless the new one took its place."""
    if backup.exists() and not destination.exists():  # stopped between the two renames of commit()
        os.replace(backup, destination)
    else:
        shutil.rmtree(backup, ignore_errors=True)


def _sweep_abandoned(destination: Path) -> None:
    """Remove hidden folders of this destination left by runs that were killed (SIGKILL, power loss).

    Their names carry the writing process's id; a folder whose process is gone
    can never be completed, and a live run's folder is left alone. A soup that a
    killed overwrite had set aside (``.old-``) goes back in place if nothing took
    its place, so a killed overwrite always leaves the old soup or the new one.
    """
    parent = destination.parent
    for kind in ("old", "partial"):  # old first: restoring it is the one step that matters
        for folder in sorted(parent.glob(f".{destination.name}.{kind}-*")):
            pid, sep, _ = folder.name.rsplit(f".{kind}-", 1)[1].partition("-")
            if not sep or not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old":
                restore = not destination.exists()
                try:
                    _restore_or_drop(folder, destination)
                except OSError:
                    continue  # leave it for a later run rather than lose it
                if restore:
                    logger.warning("put back %s: a run killed while overwriting it had set it aside", destination)
            else:
                shutil.rmtree(folder, ignore_errors=True)


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
