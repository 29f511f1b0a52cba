"""Write a soup folder tensor by tensor, all or nothing.

Everything is written into a hidden temporary folder beside the destination and
renamed into place only once every byte is on disk, so a failed or killed run
never leaves a half-written soup (and an existing soup, replaced with
``overwrite``, stays intact until the new one is complete).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from hub_soup import files
from hub_soup.errors import OutputError, OutputExistsError
from hub_soup.safetensors_io import SafetensorsWriter, TensorMeta, plan_shards, shard_filenames


def check_destination(destination: Path, overwrite: bool) -> None:
    """Refuse an existing output unless told to replace it (the pipeline asks before any download)."""
    if destination.exists() and not overwrite:
        raise OutputExistsError(
            f"{destination} already exists; refusing to overwrite it", hint="pass --overwrite or choose another -o"
        )


class SoupWriter:
    """Stream tensors into ``model.safetensors`` (or shards + index) in a temporary folder.

    Use as a context manager: leaving it with an exception removes the temporary
    folder; :meth:`commit` renames it to the destination.

    Args:
        destination: the output folder.
        tensors: every output tensor, in the order they will be written.
        max_shard_bytes: shard size limit (``save_pretrained``'s ``max_shard_size``).
        overwrite: replace an existing destination (only once the new soup is complete).
    """

    def __init__(
        self, destination: Path, tensors: Mapping[str, TensorMeta], max_shard_bytes: int, overwrite: bool = False
    ) -> None:
        self.destination = destination
        check_destination(destination, overwrite)
        # Parents this run creates (``-o new/dir/soup``) go again if it fails: nothing is left.
        self._made_parents = [p for p in destination.parents if not p.exists()]
        destination.parent.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned(destination)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-{os.getpid()}-", dir=destination.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the soup is an ordinary folder
        self._shards = plan_shards(tensors, max_shard_bytes)
        self._names = shard_filenames(len(self._shards))
        self._tensors = tensors
        self._shard_of = {key: i for i, shard in enumerate(self._shards) for key in shard}
        self._current: SafetensorsWriter | None = None
        self._current_index = -1
        self.files: list[str] = []

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
        """Finish the last shard, write the index, and move the folder into place."""
        self._close_shard()
        if len(self._names) > 1:
            weight_map = {key: self._names[i] for key, i in self._shard_of.items()}
            total = sum(meta.nbytes for meta in self._tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            self.add_file(files.SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        if self.destination.exists():  # overwrite: keep the old soup until the new one is in place
            backup = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.old-", dir=self.destination.parent))
            os.replace(self.destination, backup / "soup")
            os.replace(self.tmp, self.destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(self.tmp, self.destination)
        return self.destination

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        for parent in self._made_parents:  # innermost first; rmdir keeps any that are not empty
            try:
                parent.rmdir()
            except OSError:
                break

    def __enter__(self) -> SoupWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()


def _sweep_abandoned(destination: Path) -> None:
    """Remove temporary folders of this destination left by runs that were killed (SIGKILL, power loss).

    Their names carry the writing process's id; a folder whose process is gone
    can never be completed, and a live run's folder is left alone.
    """
    for partial in destination.parent.glob(f".{destination.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_error(destination: Path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"no space left for {destination} ({exc.strerror}); nothing was kept",
            hint="free some space or choose another -o (the soup needs about one ingredient's size)",
        )
    return OutputError(f"cannot write {destination}: {exc.strerror or exc}")
