"""The thread count is one decision (``hub_soup/threads.py``), not torch's default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import output_metas, stream_merge
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import align
from hub_soup.threads import THREADS_ENV, eval_threads, merge_threads, torch_threads
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
    ("della_linear", {"density": 0.5, "epsilon": 0.2}, 2), ("arcee_fusion", {}, 1),
])
def test_a_compute_bound_method_gives_the_same_bits_on_any_number_of_threads(
    method: str, parameters: dict[str, float], count: int, tmp_path: Path
) -> None:
    """The soup of a method merged on every CPU is the one-thread soup, bit for bit: its sorts, hashes and per-row
    reductions do not depend on how the work is split (blocks large enough for torch to split them)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(256, 1024, generator=generator).to(torch.bfloat16)
    paths = [ck.save_safetensors({"w": (base.float() + torch.randn(256, 1024, generator=generator) * 0.1
                                        ).to(torch.bfloat16)}, tmp_path / f"ft{i}.safetensors") for i in range(count)]
    tunes = [open_checkpoint(p) for p in paths]
    base_checkpoint = open_checkpoint(ck.save_safetensors({"w": base}, tmp_path / "base.safetensors"))
    plan = align(layouts_of(tunes), base=layouts_of([base_checkpoint])[0])
    soups = []
    for threads in (1, 2):
        out = tmp_path / f"soup-{threads}"
        with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
            stream_merge(tunes, plan, get_method(method)(parameters), writer, base=base_checkpoint, threads=threads)
            writer.commit()
        soups.append(load_file(out / "model.safetensors")["w"])
    for checkpoint in [*tunes, base_checkpoint]:
        checkpoint.close()
    ck.assert_bit_equal(soups[0], soups[1], f"{method} on 1 and 2 threads")


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
