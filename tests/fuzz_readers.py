"""Coverage-guided fuzzing of the checkpoint readers with atheris (libFuzzer).

Run by ``tests/test_reliability.py`` in a subprocess for a bounded time; by hand::

    python tests/fuzz_readers.py -max_total_time=60 -artifact_prefix=/tmp/crash- CORPUS_DIR

Every input is written as a file and opened the way a downloaded checkpoint is:
whatever the bytes, the reader must either read tensors or raise
``CheckpointFormatError``; any other exception, a hang or a huge allocation is
a crash. Crashes found are kept in ``tests/fuzz_regressions/`` and replayed by
the normal test suite.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["hub_soup"]):
    from read_everything import read_everything  # the same path as tests/test_reliability.py

    from hub_soup.errors import CheckpointFormatError
    from hub_soup.io.formats import known_formats

    known_formats()  # the formats' modules are imported on first use: import them here, instrumented

_DIR = Path(tempfile.mkdtemp(prefix="hub-soup-fuzz-"))


def read_all(data: bytes, suffix: str) -> None:
    """Open ``data`` as a checkpoint file and read every tensor; only format errors may escape."""
    path = _DIR / f"input{suffix}"
    path.write_bytes(data)
    try:
        read_everything(path)
    except CheckpointFormatError:
        pass


def test_one_input(data: bytes) -> None:
    read_all(data, ".safetensors" if data[:1] != b"P" else ".bin")


def main() -> None:
    # memory bound: a "huge allocation" from a lying header is a crash, not a slow test
    sys.argv.append("-rss_limit_mb=2048")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
