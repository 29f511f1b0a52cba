"""Every row of docs/BAD_INPUTS.md is a test: the bad input, its exit code and its message.

The table in the docs is the contract; this module builds each case by its id,
runs the CLI as a user would, and checks the exit code, the message, that
nothing was written and that nothing was pushed. A row without a case here, or
a case without a row, fails too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from hub_soup.cli import main
from tests.hub_fixtures import TEST_TOKEN, TEST_USER
from tests.hub_models import bert_folder, llama_folder, lora_folder, timm_folder, unique, upload
from tests.hub_server import HubServer
from tests.test_plugins import write_distribution

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BAD_INPUTS.md"
A = str(ROOT / "examples" / "digits" / "ingredients" / "ft-lr0.01")
B = str(ROOT / "examples" / "digits" / "ingredients" / "ft-lr0.02-shift")


def _rows() -> list[tuple[str, int, str]]:
    """(id, exit code, message fragment) of each table row."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            rows.append((cells[0].strip("`"), int(cells[3]), cells[4].strip("`")))
    return rows


Case = Callable[[Path, HubServer], list[str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        CASES[name] = build
        return build

    return register


def _out(tmp: Path) -> str:
    return str(tmp / "soup")


@case("config-as-weights")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", f"{A}/config.json", B, "-o", _out(tmp)]


@case("text-file")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "notes.pt").write_text("these are my notes, not weights\n")
    return ["merge", A, str(tmp / "notes.pt"), "-o", _out(tmp)]


@case("empty-folder")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "empty").mkdir()
    return ["merge", A, str(tmp / "empty"), "-o", _out(tmp)]


@case("other-architecture")
def _(tmp: Path, hub: HubServer) -> list[str]:
    model = timm.create_model("test_convnext", pretrained=False, num_classes=10, in_chans=1)
    save_file(model.state_dict(), tmp / "convnext.safetensors")
    return ["merge", A, str(tmp / "convnext.safetensors"), "-o", _out(tmp)]


@case("other-num-classes")
def _(tmp: Path, hub: HubServer) -> list[str]:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7, in_chans=1)
    save_file(model.state_dict(), tmp / "seven.safetensors")
    return ["merge", A, str(tmp / "seven.safetensors"), "-o", _out(tmp)]


@case("truncated-safetensors")
def _(tmp: Path, hub: HubServer) -> list[str]:
    data = (Path(B) / "model.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return ["merge", A, str(tmp / "cut.safetensors"), "-o", _out(tmp)]


@case("truncated-bin")
def _(tmp: Path, hub: HubServer) -> list[str]:
    torch.save({"w": torch.ones(1000)}, tmp / "full.bin")
    data = (tmp / "full.bin").read_bytes()
    (tmp / "cut.bin").write_bytes(data[: len(data) // 2])
    return ["merge", str(tmp / "full.bin"), str(tmp / "cut.bin"), "-o", _out(tmp)]


@case("corrupt-header")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "bad.safetensors").write_bytes(b"\x06\x00\x00\x00\x00\x00\x00\x00{\xff\xfe}  ")
    return ["merge", A, str(tmp / "bad.safetensors"), "-o", _out(tmp)]


@case("pickled-module")
def _(tmp: Path, hub: HubServer) -> list[str]:
    torch.save(torch.nn.Linear(2, 2), tmp / "model.pt")
    return ["merge", str(tmp / "model.pt"), str(tmp / "model.pt"), "-o", _out(tmp)]


@case("index-escapes-folder")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "m").mkdir()
    (tmp / "m" / "model.safetensors.index.json").write_text('{"weight_map": {"w": "/etc/passwd"}}')
    return ["merge", A, str(tmp / "m"), "-o", _out(tmp)]


@case("missing-path")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, "./no/such/checkpoint", "-o", _out(tmp)]


@case("unparseable-ref")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, "Not A Model!", "-o", _out(tmp)]


@case("one-ingredient")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, "-o", _out(tmp)]


@case("weights-count")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--weights", "1", "-o", _out(tmp)]


@case("negative-weight")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--weights", "-1", "1", "-o", _out(tmp)]  # argparse takes "-1" as a value


@case("recipe-negative-weight")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "r.yaml").write_text(
        f"ingredients:\n  - ref: {A}\n    weight: 1\n  - ref: {B}\n    weight: -2\nmethod: weighted\n"
        f"output: {{path: {_out(tmp)}}}\n"
    )
    return ["run", str(tmp / "r.yaml")]


def _copy_of_a(tmp: Path) -> str:
    """Ingredient A copied, so a regression destroys the copy and not the example."""
    return str(shutil.copytree(A, tmp / "dir" / "a"))


@case("output-is-ingredient")
def _(tmp: Path, hub: HubServer) -> list[str]:
    a = _copy_of_a(tmp)
    return ["merge", a, B, "-o", a, "--overwrite"]


@case("output-contains-ingredient")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", _copy_of_a(tmp), B, "-o", str(tmp / "dir"), "--overwrite"]


@case("output-inside-ingredient")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", _copy_of_a(tmp), B, "-o", str(tmp / "dir" / "a" / "soup")]


@case("nan-weight")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--weights", "nan", "1", "-o", _out(tmp)]


def _mergekit(tmp: Path, method: str, rest: str) -> list[str]:
    """``run`` of a mergekit config of the two digits models (the first the base), ``rest`` after its lines 1-5."""
    head = f"models:\n  - model: {A}\n  - model: {B}\nmerge_method: {method}\nbase_model: {A}\n"
    (tmp / "config.yml").write_text(head + rest)
    return ["run", str(tmp / "config.yml"), "-o", _out(tmp)]


@case("mergekit-unknown-key")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return _mergekit(tmp, "model_stock", "merge_methd: ties\n")


@case("mergekit-tokenizer-source")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return _mergekit(tmp, "model_stock", "tokenizer_source: [union]\n")


@case("mergekit-bad-gradient")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return _mergekit(tmp, "slerp", "parameters:\n  t: [0, {filter: mlp}]\n")


@case("vocab-mismatch")
def _(tmp: Path, hub: HubServer) -> list[str]:
    chat = llama_folder(tmp / "chat", seed=1, words=["the", "soup", "is", "good", "<|im_start|>", "<|im_end|>"])
    return ["merge", str(llama_folder(tmp / "plain", seed=2, words=["the", "soup", "is", "good"])), str(chat),
            "-o", _out(tmp)]


@case("vocab-ensemble")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "texts.jsonl").write_text('{"text": "the soup is good"}\n')
    return ["merge", A, B, "--tokenizer-source", "union", "--eval-task", "causal-lm", "--eval-data",
            str(tmp / "texts.jsonl"), "--ensemble-reference", "-o", _out(tmp)]


@case("architecture-mismatch")
def _(tmp: Path, hub: HubServer) -> list[str]:
    two, four = bert_folder(tmp / "bert2", seed=1), bert_folder(tmp / "bert4", seed=2)
    config = json.loads((four / "config.json").read_text())
    (four / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    return ["merge", str(two), str(four), "-o", _out(tmp)]


@case("untrusted-eval-function")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "f.py").write_text("raise SystemExit('this code must not run')\ndef score(model):\n    return 1.0\n")
    return ["merge", A, B, "--eval-task", "custom", "--eval-function", f"{tmp / 'f.py'}:score",
            "-o", _out(tmp)]


@case("output-exists")
def _(tmp: Path, hub: HubServer) -> list[str]:
    Path(_out(tmp)).mkdir()
    return ["merge", A, B, "-o", _out(tmp)]


@case("no-output")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B]


@case("bad-push-repo")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--push", "just-a-name", "-o", _out(tmp)]


@case("method-needs-base")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--method", "task_arithmetic", "-o", _out(tmp)]


@case("diagnose-bad-eval-flag")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["diagnose", A, B, "--eval-task", "image-classification", "--eval-data", str(tmp), "--eval-batch-size", "0"]


def _llamas(tmp: Path) -> list[str]:
    """Two tiny causal LMs with a tokenizer: what an lm-eval case needs to get as far as the harness."""
    return [str(llama_folder(tmp / f"llama{i}", seed=i, words=["the", "soup", "is", "good"])) for i in range(2)]


def _loras(tmp: Path, **changes: object) -> list[str]:
    """Two PEFT LoRA adapters of one tiny Llama; ``changes`` edit the second one's adapter_config.json."""
    base = llama_folder(tmp / "base", seed=0, words=["the", "soup", "is", "good"])
    folders = [lora_folder(base, tmp / f"lora{i}", seed=i + 1, r=4, alpha=8) for i in range(2)]
    config = folders[1] / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return [str(f) for f in folders]


@case("unknown-device")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--device", "gpu", "-o", _out(tmp)]


@case("eval-dtype-device-cannot-run")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "fft.py").write_text(
        "import torch\n"
        "def score(model):\n"
        "    return float(torch.fft.rfft(model.lm_head.weight, dim=-1).abs().mean())\n"
    )
    return ["merge", *_llamas(tmp), "--eval-task", "custom", "--eval-function",
            f"{tmp / 'fft.py'}:score", "--trust-remote-code", "--eval-dtype", "bfloat16", "-o", _out(tmp)]


@case("eval-data-missing")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-task", "causal-lm", "--eval-data", "./no_such_dir", "-o", _out(tmp)]


@case("eval-data-not-a-data-file")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-task", "causal-lm", "--eval-data", f"{A}/model.safetensors", "-o", _out(tmp)]


def _texts(tmp: Path) -> str:
    """A JSON-lines file of texts: eval data a causal-lm case reads."""
    (tmp / "val.jsonl").write_text('{"text": "the soup is good"}\n{"text": "good soup"}\n')
    return str(tmp / "val.jsonl")


@case("eval-data-file-second-split")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-task", "causal-lm", "--eval-data", _texts(tmp), "--test-eval", "test",
            "-o", _out(tmp)]


def _without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU index that this machine lacks: on a machine without CUDA, any index")


@case("max-memory-no-gpu")
def _(tmp: Path, hub: HubServer) -> list[str]:
    _without_cuda()
    return ["merge", A, B, "--eval-task", "causal-lm", "--eval-data", _texts(tmp), "--device-map", "auto",
            "--max-memory", "0=1GB", "-o", _out(tmp)]


@case("device-map-no-gpu")
def _(tmp: Path, hub: HubServer) -> list[str]:
    _without_cuda()
    return ["merge", A, B, "--eval-task", "causal-lm", "--eval-data", _texts(tmp),
            "--device-map", "model=0,lm_head=cpu", "-o", _out(tmp)]


@case("diagnose-eval-data-missing")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["diagnose", A, B, "--eval-task", "causal-lm", "--eval-data", "./no_such_dir"]


@case("adapter-other-base")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", *_loras(tmp, base_model_name_or_path="org/another-base"), "-o", _out(tmp)]


@case("adapter-dora")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", *_loras(tmp, use_dora=True), "-o", _out(tmp)]


@case("adapter-and-full-model")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", _loras(tmp)[0], str(tmp / "base"), "-o", _out(tmp)]


@case("adapter-other-method")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", *_loras(tmp), "--method", "ties", "--base", str(tmp / "base"), "-o", _out(tmp)]


@case("max-rank-of-full-models")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--max-rank", "8", "-o", _out(tmp)]


@case("max-rank-and-merge-into-base")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--max-rank", "8", "--merge-into-base", "-o", _out(tmp)]


@case("base-for-an-average")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--base", A, "-o", _out(tmp)]


@case("adapter-base-as-base")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", *_loras(tmp), "--base", str(tmp / "base"), "-o", _out(tmp)]


@case("adapter-base-for-full-models")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--adapter-base", A, "-o", _out(tmp)]


@case("lm-eval-unknown-task")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", *_llamas(tmp), "--eval-task", "lm-eval", "--eval-tasks", "no_such_task", "-o", _out(tmp)]


@case("lm-eval-with-data")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-task", "lm-eval", "--eval-tasks", "arc_easy", "--eval-data", str(tmp), "-o", _out(tmp)]


@case("lm-eval-untrusted-yamls")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "mine.yaml").write_text("task: mine\ndoc_to_text: \"{{ cycler.__init__.__globals__ }}\"\n")
    return ["merge", A, B, "--eval-task", "lm-eval", "--eval-tasks", "mine", "--include-path", str(tmp / "tasks"),
            "-o", _out(tmp)]


@case("lm-eval-ensemble")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-task", "lm-eval", "--eval-tasks", "arc_easy", "--ensemble-reference", "-o", _out(tmp)]


@case("recipe-unknown-key")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "r.yaml").write_text(f"ingredients: [{{ref: {A}}}, {{ref: {B}}}]\noutput: {{path: {_out(tmp)}}}\nmethd: uniform\n")
    return ["run", str(tmp / "r.yaml")]


@case("recipe-not-yaml")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "r.yaml").write_text("ingredients: [unclosed\n")
    return ["run", str(tmp / "r.yaml")]


@case("recipe-missing")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["run", str(tmp / "nowhere.yaml")]


@case("validate-unknown-key")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "good.yaml").write_text(f"ingredients: [{{ref: {A}}}, {{ref: {B}}}]\noutput: {{path: {_out(tmp)}}}\n")
    (tmp / "r.yaml").write_text(f"ingredients: [{{ref: {A}}}, {{ref: {B}}}]\noutput: {{path: {_out(tmp)}}}\nmethd: uniform\n")
    return ["validate", str(tmp / "good.yaml"), str(tmp / "r.yaml")]


@case("missing-repo")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, f"{TEST_USER}/no-such-model", "-o", _out(tmp)]


def _hub_pair(tmp: Path, private: bool = False) -> tuple[str, str]:
    api = HfApi(token=TEST_TOKEN)
    repos = (f"{TEST_USER}/{unique('bad-a')}", f"{TEST_USER}/{unique('bad-b')}")
    for i, repo in enumerate(repos):
        upload(api, timm_folder(tmp / f"h{i}", seed=40 + i), repo, private=private)
    return repos


@case("missing-revision")
def _(tmp: Path, hub: HubServer) -> list[str]:
    a, b = _hub_pair(tmp)
    return ["merge", f"{a}@v9.9", b, "-o", _out(tmp)]


@case("private-without-token")
def _(tmp: Path, hub: HubServer) -> list[str]:
    a, b = _hub_pair(tmp, private=True)
    return ["merge", a, b, "-o", _out(tmp)]


@case("bad-token")
def _(tmp: Path, hub: HubServer) -> list[str]:
    a, b = _hub_pair(tmp)
    return ["merge", a, b, "--push", f"{TEST_USER}/{unique('never')}", "--token", "hf_wrong", "-o", _out(tmp)]


@case("overwrite-not-a-soup")
def _(tmp: Path, hub: HubServer) -> list[str]:
    (tmp / "soup" / "sub").mkdir(parents=True)
    (tmp / "soup" / "notes.txt").write_text("mine")
    return ["merge", A, B, "-o", _out(tmp), "--overwrite"]


@case("float16-overflow")
def _(tmp: Path, hub: HubServer) -> list[str]:
    for name, value in (("a", 1e5), ("b", 2e5)):
        save_file({"w": torch.full((2,), value, dtype=torch.bfloat16)}, tmp / f"{name}.safetensors")
    return ["merge", str(tmp / "a.safetensors"), str(tmp / "b.safetensors"), "--dtype", "float16", "-o", _out(tmp)]


@case("gated-repo")
def _(tmp: Path, hub: HubServer) -> list[str]:
    a, b = _hub_pair(tmp)
    hub.add_gated(a)
    return ["merge", a, b, "-o", _out(tmp)]


@case("weights-then-refs")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", "--weights", "1", "2", A, B, "-o", _out(tmp)]


@case("misspelt-option")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--mehtod", "uniform", "-o", _out(tmp)]


@case("greedy-without-eval")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--greedy", "-o", _out(tmp)]


@case("eval-option-without-task")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--eval-data", str(ROOT / "examples" / "digits" / "data"), "-o", _out(tmp)]


@case("unknown-method")
def _(tmp: Path, hub: HubServer) -> list[str]:
    return ["merge", A, B, "--method", "median", "-o", _out(tmp)]


# Rows run in a process of their own, with the environment they name.
SUBPROCESS_ROWS = {"network-down", "eval-data-unreachable", "offline-typo", "lm-eval-offline-task", "eval-data-missing-offline",
                   "plugin-does-not-load"}


def test_every_row_has_a_case_and_every_case_a_row() -> None:
    assert {row[0] for row in _rows()} == set(CASES) | SUBPROCESS_ROWS


@pytest.mark.parametrize(("name", "code", "message"), [r for r in _rows() if r[0] not in SUBPROCESS_ROWS],
                         ids=lambda v: str(v))
def test_bad_input(
    name: str, code: int, message: str, hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = CASES[name](tmp_path, hub)
    existed = Path(_out(tmp_path)).exists()
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own refusals (a flag's value checked by its type) exit from inside
        status = exc.code
    assert status == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert Path(_out(tmp_path)).exists() == existed  # nothing written (an existing output is left alone)
    assert not list(tmp_path.glob(".soup.partial-*"))
    if (tmp_path / "dir" / "a").exists():  # the copied ingredient an output tried to be, hold or sit in
        assert sorted(p.name for p in (tmp_path / "dir" / "a").iterdir()) == sorted(p.name for p in Path(A).iterdir())
        assert all((tmp_path / "dir" / "a" / p.name).read_bytes() == p.read_bytes() for p in Path(A).iterdir())


def test_network_down(tmp_path: Path) -> None:
    """The Hub unreachable (a closed loopback port): retried, then one clear line; exit 1."""
    row = next(r for r in _rows() if r[0] == "network-down")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", A, f"{TEST_USER}/anything", "-o", _out(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == row[1]
    assert row[2] in done.stderr and "Traceback" not in done.stderr
    assert not Path(_out(tmp_path)).exists()


def test_eval_data_unreachable(tmp_path: Path) -> None:
    """A Hub dataset as eval data, the Hub unreachable (a closed loopback port): one line, exit 1, nothing written."""
    row = next(r for r in _rows() if r[0] == "eval-data-unreachable")
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", A, B, "--eval-task", "image-classification",
         "--eval-data", f"{TEST_USER}/no-such-data", "-o", _out(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == row[1], done.stderr
    assert row[2] in done.stderr and "Traceback" not in done.stderr
    assert not Path(_out(tmp_path)).exists() and not list(tmp_path.glob(".soup.partial-*"))


def test_plugin_does_not_load(tmp_path: Path) -> None:
    """An installed distribution's entry point naming a module that is not there: listed as a method (listing
    imports nothing), and refused, naming the distribution, when it is used."""
    row = next(r for r in _rows() if r[0] == "plugin-does-not-load")
    write_distribution(tmp_path, "hub_soup_broken_plugin", None,
                       "[hub_soup.methods]\nbroken = hub_soup_broken_plugin:Broken\n", name="hub-soup-broken-plugin")
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", A, B, "--method", "broken", "-o", _out(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
        timeout=120, check=False,
    )
    assert done.returncode == row[1], done.stderr
    assert row[2] in done.stderr and "Traceback" not in done.stderr and "hint: reinstall" in done.stderr
    assert not Path(_out(tmp_path)).exists()


def test_offline_typo(tmp_path: Path) -> None:
    """A mistyped local path that looks like a Hub id, with HF_HUB_OFFLINE=1: said at once, never retried."""
    row = next(r for r in _rows() if r[0] == "offline-typo")
    shutil.copytree(A, tmp_path / "myorg" / "my-finetune")
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", "myorg/my-finetun", B, "-o", _out(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=120,
        check=False,
    )
    assert done.returncode == row[1]
    assert row[2] in done.stderr and "Traceback" not in done.stderr and "retrying" not in done.stderr
    assert not Path(_out(tmp_path)).exists()


def test_lm_eval_offline_task(tmp_path: Path) -> None:
    """A built-in harness task whose dataset is on the Hub, with HF_HUB_OFFLINE=1: which task needed the
    network, and how to give it local data instead; nothing written."""
    row = next(r for r in _rows() if r[0] == "lm-eval-offline-task")
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", *_llamas(tmp_path), "--eval-task", "lm-eval",
         "--eval-tasks", "arc_easy", "-o", _out(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240, check=False,
    )
    assert done.returncode == row[1], done.stderr
    assert row[2] in done.stderr and "include_path" in done.stderr and "Traceback" not in done.stderr
    assert not Path(_out(tmp_path)).exists() and not list(tmp_path.glob(".soup.partial-*"))


def test_eval_data_missing_offline(tmp_path: Path) -> None:
    """A missing eval data path with HF_HUB_OFFLINE=1 is a missing path, not a Hub dataset datasets cannot reach."""
    row = next(r for r in _rows() if r[0] == "eval-data-missing-offline")
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "merge", A, B, "--eval-task", "causal-lm",
         "--eval-data", "./no_such_dir", "-o", _out(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=120,
        check=False,
    )
    assert done.returncode == row[1], done.stderr
    assert row[2] in done.stderr and "Traceback" not in done.stderr
    assert not Path(_out(tmp_path)).exists()
