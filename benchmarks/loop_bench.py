"""Time hub-soup's merge loop alone (no start-up), in-process, for tuning hub_soup/merging/engine.py.

    .venv/bin/python benchmarks/loop_bench.py DIR [DIR ...] [--chunk N] [--threads 1] [--write-behind 4]
                                              [--repeat 3] [--cold] [--null-writer] [--no-gram] [--similarity]
                                              [--method uniform|weighted]

Prints one line per run: seconds, input GB/s and the settings. ``--null-writer``
drops the soup's bytes (reading + arithmetic only); ``--no-gram`` leaves out the
shared-initialization check the pipeline feeds from the merge; ``--similarity``
times the check's separate pass instead (what ``inspect`` and evaluated soups run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub.utils import disable_progress_bars

from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging import engine as merge
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import align
from hub_soup.merging.similarity import GramAccumulator, weight_similarity
from hub_soup.soups.full import SIMILARITY_SAMPLE


class NullWriter:
    """Accepts the soup's bytes and drops them (isolates reading + arithmetic)."""

    def begin(self, key: str) -> None:
        pass

    def write(self, chunk: torch.Tensor) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--chunk", type=int, default=None, help="elements per ingredient (default: merge's choice)")
    parser.add_argument("--block", type=int, default=merge.BLOCK_ELEMENTS, help="elements the arithmetic works on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (stream_merge's threads=)")
    parser.add_argument("--read-ahead", type=int, default=merge.READ_AHEAD, help="positions read ahead (0: sync)")
    parser.add_argument("--workers", type=int, default=merge.READ_WORKERS, help="reader threads")
    parser.add_argument("--write-behind", type=int, default=merge.WRITE_BEHIND, help="queued soup chunks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--method", default="uniform", help="uniform, or weighted (weights 1, 2, 3, ...)")
    parser.add_argument("--null-writer", action="store_true")
    parser.add_argument("--no-gram", action="store_true", help="leave out the shared-initialization check")
    parser.add_argument("--similarity", action="store_true", help="time the check's separate pass instead")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = parser.parse_args()
    disable_progress_bars()
    checkpoints = [open_checkpoint(d) for d in args.dirs]
    plan = align(layouts_of(checkpoints))
    method_class = get_method(args.method)
    method = method_class(weights=[i + 1.0 for i in range(len(checkpoints))] if method_class.uses_weights else None)
    chunk = args.chunk or merge.chunk_elements_for(checkpoints)
    merge.READ_WORKERS = args.workers
    options = {"chunk_elements": chunk, "threads": args.threads, "read_ahead": args.read_ahead,
               "write_behind": args.write_behind, "block_elements": args.block}
    total = sum(t.meta.nbytes * (len(checkpoints) if t.average else 1) for t in plan.tensors)
    out_root = Path(tempfile.mkdtemp(dir=Path(__file__).parent / "_work"))
    for _ in range(args.repeat):
        gram = None if args.no_gram else GramAccumulator(len(checkpoints), SIMILARITY_SAMPLE)
        shutil.rmtree(out_root / "soup", ignore_errors=True)  # weights only, no hub-soup.yaml: not a soup to overwrite
        if args.cold:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        start = time.perf_counter()
        if args.similarity:
            torch.set_num_threads(args.threads or 1)
            weight_similarity(checkpoints, plan, SIMILARITY_SAMPLE)
        elif args.null_writer:
            merge.stream_merge(checkpoints, plan, method, NullWriter(), gram=gram, **options)
        else:
            with SoupWriter(out_root / "soup", merge.output_metas(plan, None), 5 * 10**9) as writer:
                merge.stream_merge(checkpoints, plan, method, writer, gram=gram, **options)
                writer.commit()
        seconds = time.perf_counter() - start
        mode = "similarity" if args.similarity else "null-writer" if args.null_writer else "write"
        print(f"{seconds:7.2f} s  {total / seconds / 1e9:5.2f} GB/s  threads={args.threads or 'default'} "
              f"chunk={chunk} block={args.block} read_ahead={args.read_ahead} workers={args.workers} "
              f"write_behind={args.write_behind} gram={not args.no_gram} cold={args.cold} {args.method} {mode}", flush=True)
    shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
