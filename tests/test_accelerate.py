"""Many processes through accelerate: real ``accelerate launch`` runs of two processes on the CPU (gloo).

Two processes must make the soup one process makes, byte for byte, with the same scores and the same
kept ingredients; only rank 0 writes and pushes (to the loopback Hub) and prints; a bad input, or a
failure on one rank while the other waits for it, stops every process instead of hanging.

On the CPU, ``accelerate launch`` starts several processes only with ``--multi_gpu`` (its torchrun
launcher; ``--cpu`` alone starts one process); hub-soup then talks gloo, since the recipe's device is
the CPU. ``HF_HOME`` is the suite's temporary one, so no accelerate config of the user's is read.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from hub_soup.cli import main
from hub_soup.eval.backends import launched_backend
from hub_soup.eval.backends.accelerate import AccelerateBackend
from hub_soup.eval.backends.local import LocalBackend
from hub_soup.eval.data import Inputs
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import open_checkpoint
from tests.hub_fixtures import TEST_USER
from tests.hub_models import unique
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())
BIN = Path(sys.executable).parent  # accelerate's and hub-soup's console scripts, installed beside python
# 150 examples in batches of 64: rank 0 scores 2 batches (128 examples), rank 1 one (22)
EVAL = ["--eval-task", "image-classification", "--eval-data", str(DIGITS / "data"), "--eval-split", "val",
        "--eval-limit", "150", "--eval-batch-size", "64"]
# a launch that takes longer has hung (each takes 15-60 s here); below the tests' own timeouts
LAUNCH_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(target: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[tuple[str, str]]]:
    """``accelerate launch`` two processes of ``target`` (``-m module ...`` or a script and its arguments);
    returns the launcher's result and each rank's (stdout, stderr), which ``--tee`` keeps apart."""
    logs = tmp_path / "logs"
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "--log_dir", str(logs), "--tee", "3", *target,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's hub_soup, as pytest imports it
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun's agent stops its workers (each in a session of its own) on SIGTERM
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    launched = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    ranks = []
    for rank in range(2):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        ranks.append(((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()))
    return launched, ranks


def _failed_ranks(launched: subprocess.CompletedProcess[str]) -> set[int]:
    """The ranks torchrun's agent reports as failed (non-zero exit or stopped by a signal)."""
    return {int(rank) for rank in re.findall(r"rank\s+: (\d+) \(local_rank", launched.stderr)}


@pytest.mark.timeout(200)
def test_two_processes_make_the_soup_one_process_makes(
    hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = f"{TEST_USER}/{unique('accelerate')}"
    args = ["merge", *INGREDIENTS, "--greedy", "--recalibrate-bn", "1", *EVAL, "--push", repo, "--token", hub_token]
    asked = len(hub.requests)
    launched, ranks = _launch(["-m", "hub_soup", *args, "-o", str(tmp_path / "two" / "soup")], tmp_path)
    assert launched.returncode == 0, launched.stderr
    (out0, err0), (out1, err1) = ranks
    assert (out1, err1) == ("", "")  # rank 1 scored its share and said nothing
    assert "greedy soup, scored on" in out0 and "pushed:" in out0 and "resolved" in err0
    requests = hub.requests[asked:]
    assert requests.count(("POST", "/api/repos/create")) == 1  # rank 0 alone pushed
    assert requests.count(("POST", f"/api/models/{repo}/commit/main")) == 1
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["soup"]  # no folder of rank 1's beside it

    # one process, alone, as many threads per process as the launched ones (torchrun's OMP_NUM_THREADS=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(["--quiet", *args, "-o", str(tmp_path / "one" / "soup")]) == 0
    finally:
        torch.set_num_threads(threads)
    alone = capsys.readouterr().out
    table = [line for line in alone.splitlines() if not line.startswith(("soup:", "no changes:"))]
    assert table == [line for line in out0.splitlines() if not line.startswith(("soup:", "pushed:"))]
    assert "soup of 3 of 4 ingredients" in alone  # greedy chose (one ingredient left out): the same choices above
    assert "no changes: the Hub already has this soup at" in alone  # the bytes rank 0 pushed, all of them
    for name in ("model.safetensors", "README.md", "hub-soup.yaml", "config.json"):
        assert (tmp_path / "one" / "soup" / name).read_bytes() == (tmp_path / "two" / "soup" / name).read_bytes()


@pytest.mark.timeout(200)
def test_a_bad_input_stops_every_process(tmp_path: Path) -> None:
    """The console script under the launcher: each process checks, so each stops with the message."""
    (tmp_path / "soup").mkdir()
    launched, ranks = _launch([str(BIN / "hub-soup"), "merge", *INGREDIENTS[:2], "-o", str(tmp_path / "soup")],
                              tmp_path)
    assert launched.returncode != 0 and _failed_ranks(launched) == {0, 1}
    message = f"hub-soup: error: {tmp_path / 'soup'} already exists; refusing to overwrite it"
    assert message in ranks[0][1] and "Traceback" not in ranks[0][1]
    # rank 1 says the same, unless the launcher, seeing rank 0 fail, stopped it first
    assert message in ranks[1][1] or "hub-soup: interrupted; nothing was kept" in ranks[1][1]
    assert list((tmp_path / "soup").iterdir()) == []


@pytest.mark.timeout(200)
def test_a_process_that_fails_alone_does_not_leave_the_other_waiting(tmp_path: Path) -> None:
    """Rank 1's forward pass fails while rank 0 waits for its outputs: the launcher stops rank 0 and fails."""
    launched, ranks = _launch([str(ROOT / "tests" / "one_rank_fails.py"), str(tmp_path / "soup")], tmp_path)
    assert launched.returncode != 0 and _failed_ranks(launched) == {0, 1}
    assert "EvalError: rank 1 cannot score its share" in ranks[1][1]
    assert not (tmp_path / "soup").exists()


# -- the backend itself, in processes that torch.multiprocessing starts (no launcher) -----------------


def _spec(limit: int, batch_size: int) -> EvalSpec:
    return EvalSpec(task="image-classification", data=str(DIGITS / "data"), split="val", limit=limit,
                    batch_size=batch_size)


def _gather_on_rank(rank: int, port: int, results: str) -> None:
    """What ``accelerate launch`` would set for this process, then each split's outputs gathered."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    backend = launched_backend(torch.device("cpu"))
    assert isinstance(backend, AccelerateBackend) and (backend.rank, backend.world_size) == (rank, 2)
    checkpoint = open_checkpoint(INGREDIENTS[0])
    found = {}
    # 100 examples in 7 batches of 16 (4 and 3 for the ranks, uneven); 20 in one batch (none for rank 1)
    for limit, batch_size in ((100, 16), (20, 64)):
        evaluator = Evaluator(_spec(limit, batch_size), checkpoint, backend=backend)
        forward, seen = evaluator.task.forward, []

        def counted(model: nn.Module, inputs: Inputs, forward=forward, seen=seen) -> torch.Tensor:
            seen.append(len(inputs))
            return forward(model, inputs)

        evaluator.task.forward = counted  # type: ignore[method-assign]
        model = evaluator.model_with(checkpoint.state_dict())
        gathered = evaluator.predict(model)
        scored_here = sum(seen)
        evaluator.backend = LocalBackend()  # this process alone: every batch, in data order
        found[limit] = {"scored here": scored_here, "equal": torch.equal(gathered, evaluator.predict(model))}
    torch.save(found, f"{results}/{rank}.pt")


@pytest.mark.timeout(200)
def test_the_gather_puts_uneven_and_empty_shares_back_in_data_order(tmp_path: Path) -> None:
    mp.spawn(_gather_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    found = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert [f[100]["scored here"] for f in found] == [64, 36] and [f[20]["scored here"] for f in found] == [20, 0]
    assert all(f[limit]["equal"] for f in found for limit in (100, 20))


def test_one_process_is_local_whatever_launched_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch`` of one process sets no WORLD_SIZE (and torchrun sets 1): no process group."""
    for world in (None, "1"):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        backend = launched_backend(torch.device("cpu"))
        assert (type(backend).__name__, backend.rank, backend.world_size) == ("LocalBackend", 0, 1)
    assert not torch.distributed.is_initialized()
