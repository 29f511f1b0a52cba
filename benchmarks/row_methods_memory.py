"""Working memory of the methods that need whole rows or whole-tensor statistics, on one large tensor.

    .venv/bin/python benchmarks/row_methods_memory.py                  # the methods below, 8192 x 4096 bf16
    .venv/bin/python benchmarks/row_methods_memory.py --rows 512       # a smoke run of the script
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/row_methods_memory.py   # another version

A base and three fine-tunes of one ``ROWS x 4096`` bf16 tensor (64 MiB each at 8192 rows, an MLP
projection's size) are written to ``benchmarks/_work/rows/`` once. Each method then merges them in a
process of its own, streamed into a sink that drops the soup (no writing), and reports its peak RSS
(``VmHWM``, reset just before the merge) above what the process held then (the interpreter, torch,
the opened checkpoints): the merge's working memory. The tensor is one ingredient here, so the ratio
to one ingredient is that working memory over the tensor's size. The ``hub_soup`` imported is the
one on ``sys.path`` (``PYTHONPATH``), so two checkouts compare under the same script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hub_soup  # noqa: F401  (before torch, in every process: its OMP_WAIT_POLICY is read as torch is imported)

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "rows"
COLUMNS = 4096

# label: (method, parameters, weights, fine-tunes merged)
METHODS: dict[str, tuple[str, dict[str, Any], list[float] | None, int]] = {
    "ties": ("ties", {"density": 0.5}, None, 3),
    "della_linear": ("della_linear", {"density": 0.5, "epsilon": 0.1}, None, 3),
    "model_stock filter_wise": ("model_stock", {"filter_wise": True}, None, 3),
    "nuslerp (per row)": ("nuslerp", {"nuslerp_flatten": False}, [1.0, 1.0], 2),
    "arcee_fusion": ("arcee_fusion", {}, None, 1),
}


def inputs(rows: int) -> list[Path]:
    """The base and the three fine-tunes' files (written once per size)."""
    import torch
    from safetensors.torch import save_file

    folder = WORK / f"{rows}x{COLUMNS}"
    paths = [folder / f"{name}.safetensors" for name in ("base", "ft1", "ft2", "ft3")]
    if not all(p.exists() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(0)
        base = torch.randn(rows, COLUMNS, generator=generator) * 0.02
        for i, path in enumerate(paths):
            tensor = base if i == 0 else base + torch.randn(rows, COLUMNS, generator=generator) * 0.002
            save_file({"model.layers.0.mlp.up_proj.weight": tensor.to(torch.bfloat16).contiguous()}, str(path))
    return paths


class _Dropped:
    """A sink that keeps nothing: the merge's own memory alone is measured."""

    def begin(self, key: str) -> None:
        pass

    def write(self, chunk: Any) -> None:
        pass


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(label: str, rows: int) -> dict[str, Any]:
    """Merge with ``label``'s method in this process; its working memory and time."""
    import torch  # noqa: F401  (imported before the baseline, as the merge imports it)

    from hub_soup.ingredients import layouts_of
    from hub_soup.io.read import open_checkpoint
    from hub_soup.merging.engine import stream_merge
    from hub_soup.merging.methods import get_method
    from hub_soup.merging.plan import align

    name, parameters, weights, count = METHODS[label]
    base_path, *tune_paths = inputs(rows)
    base = open_checkpoint(base_path)
    tunes = [open_checkpoint(p) for p in tune_paths[:count]]
    plan = align(layouts_of(tunes), base=layouts_of([base])[0])
    method = get_method(name)(parameters, weights)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now: imports' peaks left out
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    stream_merge(tunes, plan, method, _Dropped(), base=base)
    seconds = time.perf_counter() - start
    working = _status_mib("VmHWM") - before
    tensor_mib = rows * COLUMNS * 2 / 2**20
    return {"method": label, "rows": rows, "working_mib": round(working, 1), "ingredient_mib": tensor_mib,
            "ratio": round(working / tensor_mib, 3), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows)))
        return
    inputs(args.rows)
    print(f"| method | working memory (MiB) | / one ingredient ({args.rows} x {COLUMNS} bf16) | seconds |")
    print("|---|---|---|---|")
    for label in args.methods:
        done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--child", label],
                              check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {result['working_mib']} | {result['ratio']} | {result['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
