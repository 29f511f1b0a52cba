"""``hub-soup merge`` and ``hub-soup inspect`` on local checkpoints, through ``hub_soup.cli.main``.

Every bad input must give one readable message (naming the key, the shapes, the
files and a hint), a non-zero exit code, and leave no output folder behind, not
even a hidden temporary one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT
from hub_soup.merging.methods import normalize_weights
from tests import checkpoints as ck

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits" / "ingredients"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp16 RegNet fine-tunes in several formats, plus the misfits the error cases need."""
    root = tmp_path_factory.mktemp("zoo")
    models = [ck.timm_model(seed=i + 1, batches=10 * (i + 1)) for i in range(3)]
    raw = [ck.state_dict_of(m) for m in models]
    ema2 = ck.state_dict_of(ck.perturb_(ck.timm_model(seed=3, batches=30), seed=33, scale=0.01))
    z = {
        "root": root,
        "raw": raw,
        "ema2": ema2,
        "timm": ck.save_timm_folder(models[0], root / "a-timm"),
        "bin": ck.save_pytorch_bin(raw[1], root / "b-bin"),
        "train": ck.save_timm_train(root / "c-train" / "model_best.pth.tar", raw[2], ema2),
        "resnet": ck.save_safetensors(ck.state_dict_of(ck.timm_model(seed=1, arch="test_resnet")), root / "resnet.safetensors"),
        "five": ck.save_safetensors(ck.state_dict_of(ck.timm_model(seed=5, num_classes=5)), root / "five-classes.safetensors"),
        "whole": ck.save_whole_module(ck.timm_model(seed=4, batches=40), root / "whole" / "model.pth"),
    }
    return z


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- merge


def test_merge_prints_normalised_weights_and_a_summary(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "soup"
    code, stdout, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out, "--weights", "1", "3")
    assert code == 0, stderr
    assert re.search(r"weights: .*a-timm=0\.2500, .*b-bin=0\.7500", stderr), stderr
    summary = [line for line in stdout.splitlines() if line.startswith("soup: ")]
    assert len(summary) == 1, stdout
    n_tensors = len(zoo["raw"][0])
    n_float = sum(t.is_floating_point() for t in zoo["raw"][0].values())
    assert f"soup: {n_tensors} tensors ({n_float} averaged, {n_tensors - n_float} copied from the first)" in summary[0]
    assert summary[0].endswith(f"-> {out}")

    soup = load_file(out / "model.safetensors")
    weights = normalize_weights([1, 3], 2)
    for key, first in zoo["raw"][0].items():
        expected = ck.reference_soup([first, zoo["raw"][1][key]], weights) if first.is_floating_point() else first
        ck.assert_bit_equal(soup[key], expected, key)

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "hub-soup.yaml", "model.safetensors"]
    assert (out / "config.json").read_bytes() != b"" and json.loads((out / "config.json").read_text())["architecture"] == ck.ARCH
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["method"] == "weighted" and [i["weight"] for i in recipe["ingredients"]] == [1.0, 3.0]
    assert "overwrite" not in recipe.get("output", {})
    card = (out / "README.md").read_text()
    assert "0.2500" in card and "0.7500" in card and "timm" in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # strict load from the soup folder
    assert model.num_classes == ck.NUM_CLASSES


def test_ema_default_and_no_ema(tmp_path: Path, zoo: dict, capsys) -> None:
    for flags, second, note in (
        ([], zoo["ema2"], "used the checkpoint's 'state_dict_ema' entry"),
        (["--no-ema"], zoo["raw"][2], "raw weights; it also holds EMA weights in 'state_dict_ema'"),
    ):
        out = tmp_path / ("raw" if flags else "ema")
        code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["train"], "-o", out, *flags)
        assert code == 0, stderr
        assert note in stderr  # the log says which weights of the training checkpoint were used
        soup = load_file(out / "model.safetensors")
        for key, first in zoo["raw"][0].items():
            if first.is_floating_point():
                ck.assert_bit_equal(soup[key], ck.reference_soup([first, second[key]], [0.5, 0.5]), key)


def test_dtype_overrides_floating_tensors_only(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out, "--dtype", "float32")
    assert code == 0, stderr
    soup = load_file(out / "model.safetensors")
    for key, first in zoo["raw"][0].items():
        if first.is_floating_point():
            expected = ck.reference_soup([first, zoo["raw"][1][key]], [0.5, 0.5], torch.float32)
            ck.assert_bit_equal(soup[key], expected, key)
        else:
            assert soup[key].dtype == torch.int64 and soup[key].item() == 10, key


def test_dtype_also_converts_excluded_tensors(tmp_path: Path, zoo: dict, capsys) -> None:
    """Excluded keys come from the first ingredient, but in the soup's one float dtype."""
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out, "--dtype", "float32", "--exclude", "head.*")
    assert code == 0, stderr
    soup = load_file(out / "model.safetensors")
    excluded = [k for k in soup if k.startswith("head.")]
    assert excluded
    for key in excluded:
        ck.assert_bit_equal(soup[key], zoo["raw"][0][key].to(torch.float32), key)
    assert {t.dtype for t in soup.values() if t.is_floating_point()} == {torch.float32}


def test_max_shard_size_writes_a_valid_index(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], zoo["train"], "-o", out, "--max-shard-size", "10KB")
    assert code == 0, stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 4 and set(index["weight_map"].values()) == set(shards)
    soup = ck.load_soup(out)
    assert set(index["weight_map"]) == set(soup) == set(zoo["raw"][0])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in soup.values())
    model = ck.timm_model()
    model.load_state_dict(soup, strict=True)


def test_extreme_values_through_the_cli(tmp_path: Path, capsys) -> None:
    """fp16 near its maximum, bf16 and fp64 through the streamed path."""
    big = torch.full((5,), 65504, dtype=torch.float16)
    precise = torch.tensor([1 + 2**-40], dtype=torch.float64)
    sds = [
        {"big": big, "bf": torch.tensor([1.0, 3.0], dtype=torch.bfloat16), "f64": precise, "n": torch.tensor(i)}
        for i in range(3)
    ]
    sds[1]["f64"] = torch.tensor([1 + 3 * 2**-40], dtype=torch.float64)
    sds[2]["f64"] = torch.tensor([1 + 5 * 2**-40], dtype=torch.float64)
    paths = [ck.save_safetensors(sd, tmp_path / f"{i}.safetensors") for i, sd in enumerate(sds)]
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup")
    assert code == 0, stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    assert soup["big"].dtype == torch.float16 and (soup["big"] == 65504).all()
    assert soup["bf"].dtype == torch.bfloat16 and soup["bf"].tolist() == [1.0, 3.0]
    assert soup["f64"].dtype == torch.float64 and soup["f64"].item() == 1 + 3 * 2**-40
    assert soup["n"].item() == 0


def _bf16_pair(folder: Path) -> list[Path]:
    """Two bf16 checkpoints holding 1e5 and 2e5 in ``w`` (bf16 holds them; float16's maximum is 65504)."""
    return [
        ck.save_safetensors({"w": torch.full((3, 4), value, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.bfloat16)},
                            folder / f"{i}.safetensors")
        for i, value in enumerate((1e5, 2e5))
    ]


def test_a_dtype_that_cannot_hold_the_soup_stops_it_before_anything_is_written(tmp_path: Path, capsys) -> None:
    paths = _bf16_pair(tmp_path)
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup", "--dtype", "float16")
    assert code == EXIT_BAD_INPUT, stderr
    assert "tensor w (12 elements): 12 elements overflow float16 (largest magnitude 1.498e+05 before rounding; " \
           "float16 holds at most 65504)" in stderr  # bf16(1e5) = 99840, bf16(2e5) = 199680: their mean is 149760
    assert "hint: write the soup in a dtype that holds them (--dtype bfloat16 or float32)" in stderr
    assert "lambda" not in stderr  # an average's scale is not the user's to choose
    assert "Traceback" not in stderr and sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup", "--dtype", "float32")
    assert code == 0, stderr
    assert (load_file(tmp_path / "soup" / "model.safetensors")["w"] == 149760).all()


def test_a_tensor_copied_into_a_narrower_dtype_is_checked_too(tmp_path: Path, capsys) -> None:
    paths = _bf16_pair(tmp_path)
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup", "--dtype", "float16", "--exclude", "w")
    assert code == EXIT_BAD_INPUT, stderr
    assert "tensor w (12 elements): 12 elements overflow float16 (largest magnitude 9.984e+04 before" in stderr
    assert not (tmp_path / "soup").exists()


def test_task_arithmetic_beyond_its_dtype_stops_and_says_how_to_scale_it(tmp_path: Path, capsys) -> None:
    base = torch.arange(64, dtype=torch.float16) / 64 - 0.5  # the task vectors below are exact in float16
    paths = [ck.save_safetensors({"w": base + step}, tmp_path / f"{name}.safetensors")
             for name, step in (("base", 0), ("ft0", 0.5), ("ft1", 0.25))]
    argv = ["merge", *paths[1:], "--base", paths[0], "--method", "task_arithmetic", "-o", tmp_path / "soup"]
    code, _, stderr = _run(capsys, *argv, "--lambda", "1e5")  # base + 1e5 * (0.5 + 0.25): 75000 +- 0.5
    assert code == EXIT_BAD_INPUT, stderr
    assert "tensor w (64 elements): 64 elements overflow float16 (largest magnitude 7.5e+04 before rounding; " \
           "float16 holds at most 65504)" in stderr
    assert "hint: write the soup in a dtype that holds them (--dtype bfloat16 or float32), or scale the soup down " \
           "(a smaller lambda" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "soup").exists() and _hidden(tmp_path) == []
    code, _, stderr = _run(capsys, *argv, "--lambda", "2")
    assert code == 0, stderr


@pytest.mark.parametrize("greedy", [False, True], ids=["scored", "greedy"])
def test_a_scored_soup_that_overflows_stops_before_it_is_scored(tmp_path: Path, capsys, greedy: bool) -> None:
    """The soup streamed into the eval model is checked as the written one is: it stops, and the eval never sees it."""
    folders = []
    for name in ("ft-lr0.01", "ft-lr0.02-shift"):
        folder = Path(shutil.copytree(DIGITS / name, tmp_path / name))
        tensors = load_file(folder / "model.safetensors")
        tensors["fc.bias"] = tensors["fc.bias"].float() * 1e6  # float32 holds it, the soup's float16 does not
        ck.save_safetensors(tensors, folder / "model.safetensors")
        folders.append(folder)
    (tmp_path / "f.py").write_text(
        "import torch\n"
        "def score(model):\n"
        "    assert torch.isfinite(model.fc.bias).all(), 'the eval saw an overflowed soup'\n"
        "    return 1.0\n"
    )
    code, _, stderr = _run(capsys, "merge", *folders, "--dtype", "float16", "--eval-task", "custom", "--eval-function",
                           f"{tmp_path / 'f.py'}:score", "--trust-remote-code", "-o", tmp_path / "soup",
                           *(["--greedy"] if greedy else []))
    assert code == EXIT_BAD_INPUT, stderr
    assert "tensor fc.bias (10 elements): " in stderr and "overflow float16" in stderr and "65504" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "soup").exists() and _hidden(tmp_path) == []


def test_inf_and_nan_an_ingredient_holds_are_carried_with_a_warning(tmp_path: Path, capsys) -> None:
    """A masked buffer may hold inf: not the soup's doing, so not refused (and not only in the ingredient's dtype)."""
    masked = torch.zeros(6, dtype=torch.bfloat16)
    masked[1], masked[4] = float("-inf"), float("nan")
    paths = [ck.save_safetensors({"mask": m}, tmp_path / f"{i}.safetensors")
             for i, m in enumerate((masked, torch.ones(6, dtype=torch.bfloat16)))]
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup", "--dtype", "float16")
    assert code == 0, stderr
    assert f"mask: inf or nan in 2 elements of the soup, carried over from {paths[0]}" in stderr
    soup = load_file(tmp_path / "soup" / "model.safetensors")["mask"]
    assert soup.dtype == torch.float16 and soup[1] == float("-inf") and soup[4].isnan() and soup.isfinite().sum() == 4


def test_soup_carries_the_first_ingredients_tokenizer(tmp_path: Path, capsys) -> None:
    folders = []
    for i in range(2):
        folder = tmp_path / f"lm{i}"
        ck.save_safetensors({"w": torch.randn(4, 4)}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32", "seed": i}))
        ck.save_tokenizer(folder)
        folders.append(folder)
    (folders[1] / "tokenizer.json").write_text("{}")  # a different tokenizer in the second: not used
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", *folders, "-o", out)
    assert code == 0, stderr
    assert (out / "tokenizer.json").read_bytes() == (folders[0] / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert {"README.md", "hub-soup.yaml", "model.safetensors"} <= {p.name for p in out.iterdir()}


def _hidden(folder: Path) -> list[str]:
    """The hidden folders a run writes beside its output (``.soup.partial-*``, ``.soup.old-*``, ``.soup.swap-*``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_overwrite_replaces_a_soup_and_nothing_else(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.csv").write_text("1,2\n")
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out)
    assert code == EXIT_BAD_INPUT  # README: an existing output is the user's input to fix
    assert "already exists" in stderr and "--overwrite" in stderr
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out, "--overwrite")
    assert code == EXIT_BAD_INPUT, stderr
    assert f"refusing to overwrite {out}: it is not a soup (no hub-soup.yaml)" in stderr
    assert "--overwrite would delete notes.txt, sub/" in stderr and "Traceback" not in stderr
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "data.csv").read_text() == "1,2\n"
    assert _hidden(tmp_path) == []

    soup = tmp_path / "soup"
    assert _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", soup)[0] == 0
    first = (soup / "model.safetensors").read_bytes()
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["train"], "-o", soup, "--overwrite")
    assert code == 0, stderr  # a soup hub-soup wrote is replaced
    assert (soup / "model.safetensors").read_bytes() != first and _hidden(tmp_path) == []
    (soup / "notes.txt").write_text("written into a soup")  # a soup with more in it is not only a soup
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", soup, "--overwrite")
    assert code == EXIT_BAD_INPUT and "it holds more than a soup, and --overwrite would delete notes.txt" in stderr
    assert (soup / "notes.txt").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", empty, "--overwrite")
    assert code == 0, stderr
    assert (empty / "model.safetensors").is_file() and _hidden(tmp_path) == []


def test_overwrite_names_the_first_entries_and_counts_the_rest(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a", "b", "c", "d", "e", "f", "g", "hub-soup.yaml", "model.safetensors"):
        (out / name).write_text(name)
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", out, "--overwrite")
    assert code == EXIT_BAD_INPUT
    assert "would delete a, b, c, d, e and 2 more" in stderr  # the soup's own files are not the user's
    assert len(list(out.iterdir())) == 9


def test_overwrite_of_the_current_folder_swaps_its_contents(
    tmp_path: Path, zoo: dict, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o .``: the folder the shell stands in stays (same inode), its contents become the soup."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", ".", "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["README.md", "config.json", "hub-soup.yaml",
                                                            "model.safetensors"]
    first = Path("model.safetensors").read_bytes()
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["train"], "-o", ".", "--overwrite")
    assert code == 0, stderr
    assert Path("model.safetensors").read_bytes() != first
    assert here.stat().st_ino == inode and Path.cwd().stat().st_ino == inode and _hidden(tmp_path) == []
    assert "# here" in Path("README.md").read_text()  # the card is named after the folder, not ""
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", ".")
    assert code == EXIT_BAD_INPUT and "already exists" in stderr
    Path("notes.txt").write_text("mine")
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["bin"], "-o", ".", "--overwrite")
    assert code == EXIT_BAD_INPUT and "would delete notes.txt" in stderr and "Traceback" not in stderr
    assert Path("notes.txt").read_text() == "mine" and Path("model.safetensors").is_file()


def test_pickled_module_needs_allow_pickle(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["whole"], "-o", out)
    assert code == EXIT_BAD_INPUT
    assert "--allow-pickle" in stderr and "model.pth" in stderr and "RegNet" in stderr
    ck.assert_no_output(out)
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["whole"], "-o", out, "--allow-pickle")
    assert code == 0, stderr
    whole = ck.state_dict_of(torch.load(zoo["whole"], weights_only=False))
    soup = load_file(out / "model.safetensors")
    for key, first in zoo["raw"][0].items():
        if first.is_floating_point():
            ck.assert_bit_equal(soup[key], ck.reference_soup([first, whole[key]], [0.5, 0.5]), key)


# ---------------------------------------------------------------- bad inputs


def _bad_inputs(zoo: dict, tmp: Path) -> dict:
    """Each case: (refs, extra flags, exit code, words that must appear in stderr)."""
    timm_dir = zoo["timm"]
    text = tmp / "notes.txt"
    text.write_text("these are not weights\n" * 10)
    corrupt_st = tmp / "corrupt.safetensors"
    data = bytearray((timm_dir / "model.safetensors").read_bytes())
    data[10:40] = b"\xff" * 30
    corrupt_st.write_bytes(bytes(data))
    corrupt_bin = tmp / "corrupt.bin"
    data = bytearray((zoo["bin"] / "pytorch_model.bin").read_bytes())
    data[30:] = bytes(b ^ 0x5A for b in data[30:])
    corrupt_bin.write_bytes(bytes(data))
    truncated_st = tmp / "truncated.safetensors"
    truncated_st.write_bytes((timm_dir / "model.safetensors").read_bytes())
    ck.truncate(truncated_st, 0.7)
    truncated_bin = tmp / "truncated" / "pytorch_model.bin"
    truncated_bin.parent.mkdir()
    truncated_bin.write_bytes((zoo["bin"] / "pytorch_model.bin").read_bytes())
    ck.truncate(truncated_bin, 0.7)
    onnx = tmp / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0" + bytes(100))
    empty = tmp / "empty-folder"
    empty.mkdir()
    return {
        "config.json as weights": ([timm_dir / "config.json", timm_dir], [], EXIT_BAD_INPUT,
                                   ["config.json", "not a checkpoint", "hint:"]),
        "text file": ([timm_dir, text], [], EXIT_BAD_INPUT, ["notes.txt", "not a checkpoint"]),
        "resnet vs regnet": ([zoo["resnet"], timm_dir], [], EXIT_BAD_INPUT,
                             ["cannot align", "resnet.safetensors", "a-timm", "different architectures"]),
        "different num_classes": ([timm_dir, zoo["five"]], [], EXIT_BAD_INPUT,
                                  [re.compile(r"shape mismatch at head\.fc\.(weight|bias): "
                                              r"float16\[10(, 56)?\] in \S*a-timm vs float16\[5(, 56)?\] in \S*five-classes"),
                                   "num_classes", "--exclude 'head.fc.*'"]),
        "corrupt safetensors": ([timm_dir, corrupt_st], [], EXIT_BAD_INPUT, ["corrupt.safetensors", "hint:"]),
        "corrupt bin": ([timm_dir, corrupt_bin], [], EXIT_BAD_INPUT, ["corrupt.bin", "corrupt"]),
        "truncated safetensors": ([timm_dir, truncated_st], [], EXIT_BAD_INPUT, ["truncated.safetensors", "truncated"]),
        "truncated bin": ([timm_dir, truncated_bin.parent], [], EXIT_BAD_INPUT, ["pytorch_model.bin", "truncated"]),
        "unknown format": ([timm_dir, onnx], [], EXIT_BAD_INPUT, ["model.onnx", "not a checkpoint", ".safetensors"]),
        "folder without weights": ([timm_dir, empty], [], EXIT_BAD_INPUT, ["empty-folder", "no weights found"]),
        "missing path": ([timm_dir, tmp / "nowhere" / "model.safetensors"], [], EXIT_BAD_INPUT,
                         ["nowhere", "no such local path"]),
        "weights count": ([timm_dir, zoo["bin"]], ["--weights", "1", "2", "3"], EXIT_BAD_INPUT, ["3 weights for 2"]),
        "negative weight": ([timm_dir, zoo["bin"]], ["--weights", "1", "-1"], EXIT_BAD_INPUT, ["weight"]),
        "a single ingredient": ([timm_dir], [], EXIT_BAD_INPUT, ["ingredients"]),
    }


BAD = ["config.json as weights", "text file", "resnet vs regnet", "different num_classes", "corrupt safetensors",
       "corrupt bin", "truncated safetensors", "truncated bin", "unknown format", "folder without weights",
       "missing path", "weights count", "negative weight", "a single ingredient"]


@pytest.fixture(scope="module")
def bad_inputs(zoo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _bad_inputs(zoo, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_cleanly(tmp_path: Path, bad_inputs: dict, case: str, capsys) -> None:
    refs, flags, expected_code, words = bad_inputs[case]
    out = tmp_path / "out" / "soup"
    code, stdout, stderr = _run(capsys, "merge", *refs, "-o", out, *flags)
    assert code == expected_code, (code, stderr)
    assert "hub-soup: error:" in stderr and "Traceback" not in stderr, stderr
    for word in words:
        found = word.search(stderr) if isinstance(word, re.Pattern) else word in stderr
        assert found, f"{case}: {word!r} not in {stderr!r}"
    assert "soup: " not in stdout
    ck.assert_no_output(out)


def test_following_the_exclude_hint_works(tmp_path: Path, zoo: dict, capsys) -> None:
    out = tmp_path / "soup"
    code, _, stderr = _run(capsys, "merge", zoo["timm"], zoo["five"], "-o", out, "--exclude", "head.fc.*")
    assert code == 0, stderr
    soup = load_file(out / "model.safetensors")
    for key in ("head.fc.weight", "head.fc.bias"):
        ck.assert_bit_equal(soup[key], zoo["raw"][0][key], key)
    five = load_file(zoo["five"])
    key = "stem.conv.weight"
    ck.assert_bit_equal(soup[key], ck.reference_soup([zoo["raw"][0][key], five[key]], [0.5, 0.5]), key)


# ---------------------------------------------------------------- inspect


def test_inspect_reports_formats_alignment_and_similarity(zoo: dict, capsys) -> None:
    code, stdout, stderr = _run(capsys, "inspect", zoo["timm"], zoo["bin"], zoo["train"])
    assert code == 0, stderr
    assert [line.split()[-1] for line in stdout.splitlines() if line.strip().startswith("format:")] == [
        "safetensors", "pytorch", "torch-pickle"]
    assert "used the checkpoint's 'state_dict_ema' entry" in stdout
    assert "stripped DDP's 'module.' prefix" in stdout
    n_tensors = len(zoo["raw"][0])
    assert f"alignment: ok, {n_tensors} tensors" in stdout
    assert "weight similarity (cosine above the diagonal" in stdout
    cosines = _cosines(stdout)
    assert len(cosines) == 3 and all(c > 0.9 for c in cosines), stdout
    assert "shared initialization: likely" in stdout


def test_inspect_flags_independent_trainings(tmp_path: Path, capsys) -> None:
    paths = [
        ck.save_safetensors(ck.state_dict_of(ck.timm_model(seed=1, init_seed=s)), tmp_path / f"init{s}.safetensors")
        for s in (10, 20)
    ]
    code, stdout, stderr = _run(capsys, "inspect", *paths)
    assert code == 0, stderr
    (cosine,) = _cosines(stdout)
    assert cosine < 0.5
    assert "shared initialization: NO" in stdout
    code, _, stderr = _run(capsys, "merge", *paths, "-o", tmp_path / "soup")
    assert code == 0 and "independent trainings" in stderr  # merged, but with a warning


def test_inspect_shows_why_alignment_fails(zoo: dict, capsys) -> None:
    code, stdout, _ = _run(capsys, "inspect", zoo["timm"], zoo["five"])
    assert code == EXIT_BAD_INPUT
    assert re.search(r"alignment: FAILS: shape mismatch at head\.fc\.(weight|bias)", stdout), stdout


def _cosines(stdout: str) -> list[float]:
    """The cosines above the diagonal of the similarity table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("weight similarity"))
    rows = [line for line in lines[start + 2 :] if line.startswith("[")]
    values = []
    for i, row in enumerate(rows):
        cells = row.split()[-len(rows) :]
        values += [float(c) for c in cells[i + 1 :]]
    return values
