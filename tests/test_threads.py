"""The thread count is one decision (``hub_soup/threads.py``), not torch's default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.threads import THREADS_ENV, eval_threads, merge_threads, torch_threads

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
    monkeypatch.setenv(THREADS_ENV, "5")
    assert eval_threads() == 5 and merge_threads() == 5


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
