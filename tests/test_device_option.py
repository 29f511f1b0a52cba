"""``device`` / ``--device``: ``cpu``, ``cuda``, ``cuda:N`` and ``auto``, one rule for recipes, flags and the API.

A malformed value stops at parsing (exit 2, naming the flag or key, the value and the forms); a
``cuda:N`` on a machine without CUDA falls back to the CPU as ``cuda`` does, warning, and makes the
same soup; a GPU index past this machine's last is refused before anything is downloaded or written,
and so is one that an eval placement (``--max-memory``, ``--device-map``) names, which has no CPU to fall
back on. Both count checks are pure functions, tested here with real counts on any machine.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT, RecipeError
from hub_soup.eval.spec import EvalSpec
from hub_soup.pipeline import check_eval_devices, cuda_device, device_for
from hub_soup.recipe import check_device, load_recipe
from tests import checkpoints as ck

GOOD = ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:15", "auto"]
BAD = ["gpu", "cuda:x", "cuda:-1", "cuda:", "cuda:01", "cuda:1.0", "CUDA", "cuda 0", "", "cpu:0"]
FORMS = "use cpu, cuda, cuda:N or auto"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
with_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="counts this machine's CUDA devices")


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("device")
    return [ck.save_safetensors(ck.state_dict_of(ck.timm_model(seed=s)), root / f"ft{s}.safetensors") for s in (1, 2)]


def _exit_code(argv: list[str]) -> int:
    """The CLI's exit status, whether ``main`` returns it or argparse exits (a flag it cannot parse)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _recipe(tmp_path: Path, ingredients: list[Path], device: object) -> Path:
    path = tmp_path / "recipe.yaml"
    data = {"ingredients": [{"ref": str(p)} for p in ingredients], "device": device, "output": {"path": "soup"}}
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("value", GOOD)
def test_every_form_is_taken_by_the_flag_and_the_recipe(
    value: str, ingredients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_recipe(_recipe(tmp_path, ingredients, value)).device == value
    out = tmp_path / "soup"
    code = main(["merge", *map(str, ingredients), "-o", str(out), "--device", value, "--dump-recipe"])
    assert code == 0 and yaml.safe_load(capsys.readouterr().out).get("device", "cpu") == value  # cpu: the default
    assert not out.exists()  # --dump-recipe prints the recipe, makes nothing


@pytest.mark.parametrize("value", BAD)
def test_a_malformed_flag_is_an_argparse_error_naming_flag_value_and_forms(
    value: str, ingredients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soup"
    assert _exit_code(["merge", *map(str, ingredients), "-o", str(out), "--device", value]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"argument --device: {value!r} is not a device: {FORMS}" in err, err
    ck.assert_no_output(out)


@pytest.mark.parametrize("value", [*BAD, 0, None])
def test_a_malformed_recipe_key_names_the_line_the_key_the_value_and_the_forms(
    value: object, ingredients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _recipe(tmp_path, ingredients, value)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("device:"))
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{path}:{line}: device: {value!r} is not a device: {FORMS}" in err, err
    assert _exit_code(["run", str(path)]) == EXIT_BAD_INPUT
    ck.assert_no_output(tmp_path / "soup")


def test_the_python_api_refuses_a_malformed_device_before_any_work(ingredients: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"^device: 'cuda:x' is not a device: use cpu, cuda, cuda:N or auto"):
        hub_soup.merge([str(p) for p in ingredients], tmp_path / "soup", device="cuda:x")
    ck.assert_no_output(tmp_path / "soup")


def test_the_schema_describes_the_forms_the_recipe_takes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    device = json.loads(capsys.readouterr().out)["properties"]["device"]
    assert device["type"] == "string" and device["default"] == "cpu"
    assert all(form in device["description"] for form in ("cpu", "cuda", "cuda:N", "auto"))
    pattern = re.compile(device["pattern"])  # JSON Schema patterns are searched, not matched: anchored
    for value in GOOD:
        assert pattern.search(value) and check_device(value) == value
    for value in BAD:
        assert pattern.search(value) is None, value
        with pytest.raises(ValueError):
            check_device(value)


# ---------------------------------------------------------------- this machine's devices


@pytest.mark.parametrize(
    ("name", "count", "expected"),
    [("cuda", 1, "cuda"), ("cuda:0", 1, "cuda:0"), ("cuda:3", 4, "cuda:3"), ("cuda", 8, "cuda")],
)
def test_a_gpu_this_machine_has_is_that_gpu(name: str, count: int, expected: str) -> None:
    assert cuda_device(name, count) == torch.device(expected)


@pytest.mark.parametrize(
    ("name", "count", "there", "use"),
    [
        ("cuda:1", 1, "1 CUDA device (cuda:0)", "use cuda or cuda:0"),
        ("cuda:2", 2, "2 CUDA devices (cuda:0, cuda:1)", "use cuda, cuda:0 or cuda:1"),
        ("cuda:9", 3, "3 CUDA devices (cuda:0, cuda:1, cuda:2)", "use cuda, cuda:0, cuda:1 or cuda:2"),
        ("cuda:0", 0, "no CUDA device", "use cpu"),
    ],
)
def test_a_gpu_past_the_last_says_how_many_there_are_and_which_names_work(
    name: str, count: int, there: str, use: str
) -> None:
    with pytest.raises(RecipeError) as raised:
        cuda_device(name, count)
    assert raised.value.message == f"--device {name}: this machine has {there}"
    assert raised.value.hint is not None and raised.value.hint.startswith(use)
    assert raised.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize(
    ("placement", "count", "message", "use"),
    [
        ({"device_map": "auto", "max_memory": {0: "1GB"}}, 0, "--max-memory 0=1GB: this machine has no CUDA device",
         "use cpu=SIZE"),
        ({"device_map": "auto", "max_memory": {"cpu": "9GB", 2: "1GB"}}, 2,
         "--max-memory 2=1GB: this machine has 2 CUDA devices (cuda:0, cuda:1)", "use 0=SIZE, 1=SIZE or cpu=SIZE"),
        ({"device_map": {"model": 0, "lm_head": "cpu"}}, 0, "--device-map model=0: this machine has no CUDA device",
         "place it on cpu or disk"),
        ({"device_map": {"model": "cuda"}}, 0, "--device-map model=cuda: this machine has no CUDA device",
         "place it on cpu or disk"),
        ({"device_map": {"": "cuda:1"}}, 1, "--device-map ''=cuda:1: this machine has 1 CUDA device (cuda:0)",
         "place it on cuda:0, cpu or disk"),
    ],
)
def test_a_placement_on_a_gpu_this_machine_lacks_names_the_entry_and_the_devices_there_are(
    placement: dict, count: int, message: str, use: str
) -> None:
    with pytest.raises(RecipeError) as raised:
        check_eval_devices(EvalSpec(task="causal-lm", data="d", **placement), count)
    assert raised.value.message == message
    assert raised.value.hint is not None and raised.value.hint.startswith(use)
    assert raised.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.parametrize(
    "placement",
    [{"device_map": "auto", "max_memory": {0: "1GB", 1: "1GB", "cpu": "9GB"}},
     {"device_map": {"model": 1, "lm_head": "cuda:0", "norm": "cuda", "x": "cpu", "y": "disk", "z": "mps"}}],
)
def test_a_placement_on_gpus_this_machine_has_is_taken(placement: dict) -> None:
    check_eval_devices(EvalSpec(task="causal-lm", data="d", **placement), 2)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_without_cuda_a_cuda_device_falls_back_to_the_cpu_and_says_so(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub_soup")
    assert device_for(name) == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [
        f"--device {name}: no CUDA device is available; accumulating on the CPU"
    ]


@no_cuda
def test_without_cuda_auto_and_cpu_are_the_cpu_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hub_soup")
    assert device_for("auto") == device_for("cpu") == torch.device("cpu")
    assert caplog.records == []


@with_cuda
def test_with_cuda_an_index_past_the_last_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    count = torch.cuda.device_count()
    assert device_for(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    assert device_for("auto") == device_for("cuda") == torch.device("cuda")
    with pytest.raises(RecipeError, match=rf"^--device cuda:{count}: this machine has {count} CUDA device"):
        device_for(f"cuda:{count}")


@with_cuda
def test_with_cuda_a_merge_on_a_missing_gpu_stops_before_writing(
    ingredients: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soup"
    missing = f"cuda:{torch.cuda.device_count()}"
    assert main(["merge", *map(str, ingredients), "-o", str(out), "--device", missing]) == EXIT_BAD_INPUT
    assert f"--device {missing}: this machine has" in capsys.readouterr().err
    ck.assert_no_output(out)


# ---------------------------------------------------------------- the soup


@no_cuda
def test_a_cuda_0_merge_without_cuda_is_the_cpu_soup_bit_for_bit(
    ingredients: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hub_soup")
    refs = [str(p) for p in ingredients]
    assert main(["merge", *refs, "-o", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert main(["merge", *refs, "-o", str(tmp_path / "cuda0"), "--device", "cuda:0"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["--device cuda:0: no CUDA device is available; accumulating on the CPU"]
    hub_soup.merge(refs, tmp_path / "api", device="cuda:0")
    cpu = (tmp_path / "cpu" / "model.safetensors").read_bytes()
    assert (tmp_path / "cuda0" / "model.safetensors").read_bytes() == cpu
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == cpu
    # the pinned recipe keeps what was asked for: on a GPU machine it runs there
    assert yaml.safe_load((tmp_path / "cuda0" / "hub-soup.yaml").read_text())["device"] == "cuda:0"
