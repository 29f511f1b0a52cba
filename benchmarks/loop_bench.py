"""Time hub-soup's merge loop alone (no start-up, no similarity pass), for tuning.

    .venv/bin/python benchmarks/loop_bench.py DIR [DIR ...] [--chunk 1048576] [--threads 1] [--repeat 3]
                                              [--null-writer] [--similarity]

Prints one line per run: seconds, input GB/s, thread and chunk settings. Used to
choose CHUNK_ELEMENTS and the thread default in hub_soup/merge.py (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import importlib

from huggingface_hub.utils import disable_progress_bars

from hub_soup.align import align
from hub_soup.pipeline import layouts_of
from hub_soup.read import open_checkpoint
from hub_soup.similarity import weight_similarity
from hub_soup.write import SoupWriter

merge = importlib.import_module("hub_soup.merge")  # the package's `merge` function shadows the module


class NullWriter:
    """Accepts the soup's bytes and drops them (isolates reading + arithmetic)."""

    def begin(self, key: str) -> None:
        pass

    def write(self, chunk: torch.Tensor) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--chunk", type=int, default=merge.CHUNK_ELEMENTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (stream_merge's threads=)")
    parser.add_argument("--read-ahead", type=int, default=None, help="read-ahead slots (0: synchronous reads)")
    parser.add_argument("--workers", type=int, default=None, help="reader threads (merge.READ_WORKERS)")
    parser.add_argument("--write-behind", type=int, default=None, help="queued soup chunks (0: synchronous writes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--null-writer", action="store_true")
    parser.add_argument("--similarity", action="store_true", help="time the pipeline's similarity pass instead")
    args = parser.parse_args()
    disable_progress_bars()
    if args.workers is not None:
        merge.READ_WORKERS = args.workers
    options = {"chunk_elements": args.chunk}
    if args.threads is not None:
        options["threads"] = args.threads
        torch.set_num_threads(args.threads)  # for the similarity pass
    if args.read_ahead is not None:
        options["read_ahead"] = args.read_ahead
    if args.write_behind is not None:
        options["write_behind"] = args.write_behind
    checkpoints = [open_checkpoint(d) for d in args.dirs]
    plan = align(layouts_of(checkpoints))
    weights = merge.normalize_weights(None, len(checkpoints))
    total = sum(t.meta.nbytes * (len(checkpoints) if t.average else 1) for t in plan.tensors)
    out_root = Path(tempfile.mkdtemp(dir=Path(__file__).parent / "_work"))
    for _ in range(args.repeat):
        start = time.perf_counter()
        if args.similarity:
            weight_similarity(checkpoints, plan)
        elif args.null_writer:
            merge.stream_merge(checkpoints, plan, weights, NullWriter(), **options)
        else:
            with SoupWriter(out_root / "soup", merge.output_metas(plan, None), 5 * 10**9, overwrite=True) as writer:
                merge.stream_merge(checkpoints, plan, weights, writer, **options)
                writer.commit()
        seconds = time.perf_counter() - start
        print(f"{seconds:7.2f} s  {total / seconds / 1e9:5.2f} GB/s  threads={options.get('threads', 'default')} "
              f"chunk={args.chunk} read_ahead={options.get('read_ahead', merge.READ_AHEAD)} workers={merge.READ_WORKERS} write_behind={options.get('write_behind', merge.WRITE_BEHIND)} {'similarity' if args.similarity else 'null-writer' if args.null_writer else 'write'}",
              flush=True)
    shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()
