"""Byte sizes as people write and read them, in huggingface_hub's units.

Its own module, free of torch, because recipe validation (``max_shard_size``)
and the light commands (``schema``, ``--help``) need it before any tensor does.
"""

from __future__ import annotations

import math


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524288000 (huggingface_hub's units)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    spec = text.strip().upper()
    for unit, factor in units.items():
        if spec.endswith(unit):
            number = spec[: -len(unit)].strip()
            break
    else:
        number, factor = spec, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * factor)


def describe_size(num_bytes: int) -> str:
    """Human size in the Hub's units: ``1.2 GB``."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    exponent = min(int(math.log(num_bytes, 1000)), 4)
    return f"{num_bytes / 1000**exponent:.1f} {['B', 'kB', 'MB', 'GB', 'TB'][exponent]}"
