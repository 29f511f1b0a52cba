"""A checkpoint format as a plugin adds one: numpy's ``.npz`` archives (``np.savez``), read without pickles.

``tests/test_formats.py`` installs this module as a distribution of its own whose entry point names
:class:`Npz` under ``hub_soup.formats``; nothing imports it by hand.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from hub_soup.errors import CheckpointFormatError
from hub_soup.io.formats import CheckpointFormat, InMemory, OpenOptions, TensorFile
from hub_soup.io.safetensors_io import TensorMeta


class Npz(CheckpointFormat):
    """A zip archive of ``.npy`` arrays, one per tensor: torch's zip magic too, so it is told apart by its name."""

    name = "npz"
    description = "a numpy .npz archive"
    suffixes = (".npz",)

    def sniff(self, head: bytes) -> bool:
        return head[:4] == b"PK\x03\x04"

    def open(self, path: Path, label: str, options: OpenOptions) -> TensorFile:
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointFormatError(f"{label}: {path.name} is not a readable .npz archive ({exc})") from None
        tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
        metas = {name: TensorMeta(tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
        return TensorFile(self.name, metas, InMemory(tensors))
