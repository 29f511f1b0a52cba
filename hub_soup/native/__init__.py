"""Loops eager torch cannot fuse, compiled from C on first use, with torch's own ops as the fallback.

A method whose time goes into per-element transcendental functions (arcee_fusion's two float64
softmaxes and a logarithm per element) spends most of it, in eager torch, on passes over memory
between ops: fifteen ops a slice, each reading and writing the slice. Fused into one loop per row,
with glibc's vector ``exp`` and ``log`` (libmvec), the same float64 arithmetic costs a third. The
dot products behind angles between whole tensors (model_stock's, slerp's) widen each bfloat16
piece into float64 rows, subtract and call BLAS once per pair: in one loop, a few thousand
elements at a time, they stay in the first-level cache.

The C source ships in this package. :func:`library` compiles it once per machine with the C
compiler found (``$CC``, else ``cc``, else ``gcc``) for this CPU (``-march=native``), into
``$HUB_SOUP_CACHE`` (else ``$XDG_CACHE_HOME/hub-soup``, else ``~/.cache/hub-soup``), keyed by the
source, the flags, the compiler's version and the CPU's features, so a cache shared between
machines never hands one the other's instructions. It returns ``None``, and the caller computes
with torch, where there is no compiler, where compiling or loading fails, where loops that call
``exp`` and ``log`` did not get vector calls for them (scalar, they would be slower than torch), or
where ``$HUB_SOUP_NATIVE`` is ``0``. Nothing here changes a result's definition: every element's
arithmetic is the same IEEE float64 as the torch path's, and sums over a row are float64 in
another order (see the method's documentation for what that can change).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: ``0`` computes with torch alone (for a soup bit for bit as on a machine without a compiler).
NATIVE_ENV = "HUB_SOUP_NATIVE"
#: Where compiled libraries are kept.
CACHE_ENV = "HUB_SOUP_CACHE"

# Strict IEEE float64 (no contraction into fused multiply-adds, no reassociation but the reductions an
# `omp simd` pragma names), errno left alone by the math functions so that they can be vector calls, and wide
# vectors where the CPU has them.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno",
         "-ffp-contract=off", "-fPIC", "-shared")
LIBS = ("-lmvec", "-lm")
# libmvec's symbols (the vector ABI's mangling): present once a loop's exp and log were vectorized.
VECTOR_CALLS = b"_ZGV"

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def library(name: str, *, vector_math: bool = False) -> ctypes.CDLL | None:
    """``name``.c of this package compiled and loaded (once per process), or ``None`` (see the module docstring).
    ``vector_math``: its loops call ``exp`` and ``log``, and are of no use unless those became vector calls."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name, vector_math) if os.environ.get(NATIVE_ENV, "1").strip() != "0" else None
        return _loaded[name]


def for_tensors(name: str, tensors: Sequence[torch.Tensor], *, vector_math: bool = False) -> ctypes.CDLL | None:
    """:func:`library` ``name`` where its loops can read ``tensors`` (every one bfloat16, on the CPU and
    contiguous), else ``None``: the caller computes with torch."""
    import torch

    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return library(name, vector_math=vector_math)


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    """A contiguous CPU tensor's first element's address, for a compiled loop."""
    return ctypes.c_void_p(tensor.data_ptr())


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hub-soup"


def _load(name: str, vector_math: bool) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        logger.debug("native %s: no C compiler (or not Linux); computing with torch", name)
        return None
    source = resources.files(__package__).joinpath(f"{name}.c").read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=60).stdout
        key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + LIBS).encode(), version, _cpu_features()]))
        path = cache_dir() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
        if not path.exists():
            _compile(compiler, source, path)
        if vector_math and VECTOR_CALLS not in path.read_bytes():
            logger.debug("native %s: %s made scalar exp and log; computing with torch", name, compiler)
            return None
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("native %s: %s; computing with torch", name, error)
        return None


def _compile(compiler: str, source: bytes, path: Path) -> None:
    """Compile ``source`` into ``path``, written whole or not at all (another process may be compiling it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        c_file, built = Path(work) / "source.c", Path(work) / path.name
        c_file.write_bytes(source)
        subprocess.run([compiler, *FLAGS, str(c_file), "-o", str(built), *LIBS], capture_output=True, check=True,
                       timeout=300)
        os.replace(built, path)


def _cpu_features() -> bytes:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_bytes().splitlines()
    except OSError:
        return platform.machine().encode()
    return b"\n".join(sorted({line for line in lines if line.startswith((b"flags", b"model name", b"Features"))}))
