"""The thread count is one decision (``hub_soup/threads.py``), not torch's default."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io import direct_io
from hub_soup.io.read import Checkpoint, open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import KEEP_BYTES, output_metas, stream_merge
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import align
from hub_soup.threads import (
    THREADS_ENV,
    compute_workers,
    current_part,
    eval_threads,
    in_blocks,
    in_parts,
    merge_threads,
    torch_threads,
)
from tests import checkpoints as ck

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "ingredients"


def test_scoring_takes_the_cpus_this_process_may_use_shared_by_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert eval_threads() == cpus and merge_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))  # more processes than CPUs: one thread each
    assert eval_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert eval_threads() == 3 and merge_threads() == 1
    assert merge_threads(compute_bound=True) == cpus  # sorts and softmaxes: every CPU, as scoring
    monkeypatch.setenv(THREADS_ENV, "5")
    assert eval_threads() == 5 and merge_threads() == 5 and merge_threads(compute_bound=True) == 5


@pytest.mark.parametrize(("method", "parameters", "count"), [
    ("della_linear", {"density": 0.5, "epsilon": 0.2}, 2), ("arcee_fusion", {}, 1), ("model_stock", {}, 3),
    ("model_stock", {"filter_wise": True}, 2),
    ("ramplus_tl", {}, 3),
])
def test_a_compute_bound_method_gives_the_same_bits_on_any_number_of_threads(
    method: str, parameters: dict[str, float], count: int, tmp_path: Path
) -> None:
    """The soup of a method merged on every CPU is the one-thread soup, bit for bit: its sorts, hashes, per-row
    reductions and dot products do not depend on how the work is split among compute workers (two blocks and
    two Gram pieces per chunk: split two and three ways)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(256, 1024, generator=generator).to(torch.bfloat16)
    paths = [ck.save_safetensors({"w": (base.float() + torch.randn(256, 1024, generator=generator) * 0.1
                                        ).to(torch.bfloat16)}, tmp_path / f"ft{i}.safetensors") for i in range(count)]
    tunes = [open_checkpoint(p) for p in paths]
    base_checkpoint = open_checkpoint(ck.save_safetensors({"w": base}, tmp_path / "base.safetensors"))
    plan = align(layouts_of(tunes), base=layouts_of([base_checkpoint])[0])
    soups = []
    for threads in (1, 2, 3):
        out = tmp_path / f"soup-{threads}"
        with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
            stream_merge(tunes, plan, get_method(method)(parameters), writer, base=base_checkpoint, threads=threads)
            writer.commit()
        soups.append(load_file(out / "model.safetensors")["w"])
    for checkpoint in [*tunes, base_checkpoint]:
        checkpoint.close()
    for threads, soup in zip((2, 3), soups[1:]):
        ck.assert_bit_equal(soups[0], soup, f"{method} on 1 and {threads} threads")


def test_work_in_parts_runs_side_by_side_in_order_and_whole_inside_a_part() -> None:
    """Each part's range, results in order; a part that splits its work again runs it whole, in its own thread;
    outside compute_workers (or with one, or in a thread that did not enter them) the whole range runs in the
    caller; a part's error reaches the caller after every part has ended."""
    seen: dict[int, str] = {}

    def work(part: int, first: int, last: int) -> tuple[int, int, int, list[tuple[int, int, int]]]:
        seen[part] = threading.current_thread().name
        inner = in_parts(3, lambda *inside: inside)
        return part, first, last, [(current_part(), *bounds[1:]) for bounds in inner]

    assert in_parts(10, work) == [(0, 0, 10, [(0, 0, 3)])]
    with compute_workers(3):
        assert torch.get_num_threads() == 1  # torch on one thread in each worker
        got = in_parts(10, work)
        assert in_parts(2, lambda part, first, last: (part, first, last)) == [(0, 0, 1), (1, 1, 2)]
        with ThreadPoolExecutor(1) as elsewhere:  # another thread's merge (none here) has its own workers
            assert elsewhere.submit(in_parts, 10, lambda *bounds: bounds).result() == [(0, 0, 10)]
        ended: list[int] = []

        def failing(part: int, first: int, last: int) -> None:
            if part == 0:
                raise ValueError("part 0")
            ended.append(part)

        with pytest.raises(ValueError, match="part 0"):
            in_parts(3, failing)
        assert sorted(ended) == [1, 2]
    assert got == [(0, 0, 3, [(0, 0, 3)]), (1, 3, 6, [(1, 0, 3)]), (2, 6, 10, [(2, 0, 3)])]
    assert seen[0] == threading.current_thread().name  # part 0 in the caller, the others in the workers
    assert all(seen[part].startswith("hub-soup-compute") for part in (1, 2))
    assert current_part() == 0


def test_a_method_reads_no_statistics_pass_it_no_longer_needs(tmp_path: Path) -> None:
    """arcee_fusion's quantiles are found in two passes as a rule (a histogram, then the keys near them gathered):
    the merge reads the tensor three times (with the kernel's), not the five planned, and the soup is the same
    as one read in whole passes without read-ahead (every position read in turn). Kept from the first pass
    (the engine's default), the tensor is read once, and the soup is the same again."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(512, 512, generator=generator).to(torch.bfloat16)
    tune = (base.float() + torch.randn(512, 512, generator=generator) * 0.1).to(torch.bfloat16)
    checkpoints = [open_checkpoint(ck.save_safetensors({"w": t}, tmp_path / f"{name}.safetensors"))
                   for name, t in (("tune", tune), ("base", base))]
    plan = align(layouts_of(checkpoints[:1]), base=layouts_of(checkpoints[1:])[0])
    soups = []
    for read_ahead, keep_bytes, reads in ((0, 0, 3), (4, 0, 3), (0, KEEP_BYTES, 1), (4, KEEP_BYTES, 1)):
        out = tmp_path / f"soup-{read_ahead}-{keep_bytes}"
        with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
            stats = stream_merge(checkpoints[:1], plan, get_method("arcee_fusion")({}), writer, base=checkpoints[1],
                                 read_ahead=read_ahead, chunk_elements=1 << 15, keep_bytes=keep_bytes)
            writer.commit()
        assert stats.bytes_read == reads * 2 * base.nbytes
        soups.append(load_file(out / "model.safetensors")["w"])
    for checkpoint in checkpoints:
        checkpoint.close()
    for soup in soups[1:]:
        ck.assert_bit_equal(soups[0], soup, "arcee_fusion with and without read-ahead, kept or read again")


@pytest.mark.parametrize("read_ahead", [0, 4])
def test_positions_kept_while_memory_lasts_and_the_rest_read_again_make_the_same_soup(
    tmp_path: Path, read_ahead: int
) -> None:
    """TIES (two statistics passes as a rule) over tensors of 1 to 20 positions, with room to keep 6: each tensor's
    first pass keeps what fits (the rest read again by the later passes), the kept memory is free again after
    its kernel, and the soups are those of a merge that reads every pass, bit for bit, in float64 too (whose
    chunks a method could change in place, as it could not a bf16 chunk's widened copy)."""
    generator = torch.Generator().manual_seed(11)
    chunk = 1 << 12
    sizes = {"a": 20 * chunk, "b": chunk // 3, "c": 5 * chunk + 7, "d": 3, "e": 6 * chunk}
    for dtype in (torch.bfloat16, torch.float64):
        folder = tmp_path / str(dtype).removeprefix("torch.")
        folder.mkdir()
        base = {k: torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for k, n in sizes.items()}
        tunes = [{k: (v.double() + torch.randn(v.shape, generator=generator, dtype=torch.float64)).to(dtype)
                  for k, v in base.items()} for _ in range(2)]
        checkpoints = [open_checkpoint(ck.save_safetensors(state, folder / f"{i}.safetensors"))
                       for i, state in enumerate([*tunes, base])]
        plan = align(layouts_of(checkpoints[:2]), base=layouts_of(checkpoints[2:])[0])
        per_position = 3 * direct_io.padded(chunk * dtype.itemsize)
        soups, read = [], []
        for keep_bytes in (0, 6 * per_position):
            out = folder / f"soup-{keep_bytes}"
            with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
                stats = stream_merge(checkpoints[:2], plan, get_method("ties")({"density": 0.3}), writer,
                                     base=checkpoints[2], read_ahead=read_ahead, chunk_elements=chunk,
                                     keep_bytes=keep_bytes)
                writer.commit()
            soups.append(load_file(out / "model.safetensors"))
            read.append(stats.bytes_read)
        for checkpoint in checkpoints:
            checkpoint.close()
        for key in sizes:
            ck.assert_bit_equal(soups[0][key], soups[1][key], f"{key} ({dtype}) kept or read again")
        # a's first 6 positions are kept (all the room), the rest read by its second pass and its kernel again;
        # every later tensor is kept whole, in the room a's kernel gave back, and read once
        model = sum(sizes.values()) * 3 * dtype.itemsize
        assert read[0] > 2 * model and read[1] == model + 2 * (sizes["a"] - 6 * chunk) * 3 * dtype.itemsize


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_thread_count_that_is_not_one_or_more_is_named(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(RecipeError, match=f"HUB_SOUP_THREADS={value!r}: a thread count is a whole number"):
        merge_threads()


def test_a_run_sets_its_threads_and_gives_the_callers_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    monkeypatch.setenv(THREADS_ENV, "2")
    from hub_soup.soups import full

    merge = full.stream_merge  # the name the pipeline calls, however it was imported before
    monkeypatch.setattr(full, "stream_merge", lambda *a, **k: seen.append(torch.get_num_threads()) or merge(*a, **k))
    with torch_threads(3):
        assert main(["merge", str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift"), "-o", str(tmp_path / "s")]) == 0
        assert torch.get_num_threads() == 3
    assert seen == [2]  # the pipeline's scoring threads around the merge (which sets its own inside)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_threads_sleep_between_regions_unless_the_user_says(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import hub_soup, os, sys; import torch; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert done.stdout.strip() == expected


def test_model_stock_reads_larger_positions_on_workers_and_the_same_soup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model_stock's ``position_bytes`` (24 MiB) sets its chunks where it is split among compute workers, the
    engine's 6 MiB on one thread: a 1536 x 1024 tensor of a base and three fine-tunes is read in one chunk a
    pass on two threads, in two on one, and the soups are the same bits."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(1536, 1024, generator=generator).to(torch.bfloat16)
    tunes = [open_checkpoint(ck.save_safetensors({"w": (base.float() + torch.randn(1536, 1024, generator=generator)
                                                        * 0.1).to(torch.bfloat16)}, tmp_path / f"ft{i}.safetensors"))
             for i in range(3)]
    base_checkpoint = open_checkpoint(ck.save_safetensors({"w": base}, tmp_path / "base.safetensors"))
    plan = align(layouts_of(tunes), base=layouts_of([base_checkpoint])[0])
    reads: list[int] = []
    read_into = Checkpoint.read_into

    def counted(self: Checkpoint, key: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        reads.append(count)
        return read_into(self, key, start, count, buffer)

    monkeypatch.setattr(Checkpoint, "read_into", counted)
    soups = []
    for threads, chunks in ((1, 2), (2, 1)):
        reads.clear()
        out = tmp_path / f"soup-{threads}"
        with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
            stream_merge(tunes, plan, get_method("model_stock")({}), writer, base=base_checkpoint, threads=threads)
            writer.commit()
        # read once, four inputs: the kernel is given the statistics pass's chunks, kept
        assert len(reads) == 4 * chunks, f"{threads} threads: {reads}"
        soups.append(load_file(out / "model.safetensors")["w"])
    for checkpoint in [*tunes, base_checkpoint]:
        checkpoint.close()
    ck.assert_bit_equal(soups[0], soups[1], "model_stock on 1 and 2 threads")


def test_blocks_are_split_among_workers_and_come_back_in_order() -> None:
    """Each block of a range once, the last one shorter, the results in block order on one worker or three."""
    expected = [(0, 4), (4, 8), (8, 10)]
    assert in_blocks(10, 4, lambda begin, end: (begin, end)) == expected
    with compute_workers(3):
        assert in_blocks(10, 4, lambda begin, end: (current_part(), begin, end)) == [
            (part, *bounds) for part, bounds in enumerate(expected)]
        assert in_blocks(0, 4, lambda begin, end: (begin, end)) == []
