"""Open a file as a checkpoint and read every tensor: what a merge does to each input.

Shared by the fuzzers (``tests/fuzz_readers.py``, in a subprocess) and the
hostile-file tests, so both exercise exactly the same reading path.
"""

from __future__ import annotations

from pathlib import Path

from hub_soup.io.read import open_checkpoint


def read_everything(path: Path) -> None:
    """Open ``path`` and read each tensor whole; any failure propagates."""
    with open_checkpoint(path) as checkpoint:
        for key in checkpoint.metas:
            checkpoint.read(key)
