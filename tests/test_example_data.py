"""Checks on the bundled digits example (examples/digits), which the README's first command merges.

The example only works offline if the committed folders are exactly what timm writes and
reads, if they really share one architecture and key set (else they cannot be souped), and
if the PNG image folders match the split that ``train.py`` used. These tests guard that
without retraining anything.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "digits"


def _load_train_module() -> ModuleType:
    """Import examples/digits/train.py (not a package) to reuse its split and eval path."""
    spec = importlib.util.spec_from_file_location("digits_train", EXAMPLE_DIR / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


train = _load_train_module()
INGREDIENT_DIRS = sorted(p for p in (EXAMPLE_DIR / "ingredients").iterdir() if p.is_dir())
MODEL_DIRS = [EXAMPLE_DIR / "base", *INGREDIENT_DIRS]


def _ids(dirs: list[Path]) -> list[str]:
    return [d.name for d in dirs]


def test_bundled_ingredients_are_the_recipes() -> None:
    assert [d.name for d in INGREDIENT_DIRS] == sorted(r.name for r in train.INGREDIENTS)


@pytest.mark.parametrize("folder", MODEL_DIRS, ids=_ids(MODEL_DIRS))
def test_folder_loads_strictly_into_its_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == train.ARCHITECTURE
    assert config["num_classes"] == 10
    assert config["model_args"]["in_chans"] == 1
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [1, train.IMG_SIZE, train.IMG_SIZE]
    assert len(pretrained_cfg["mean"]) == len(pretrained_cfg["std"]) == 1
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    result = model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("folder", MODEL_DIRS, ids=_ids(MODEL_DIRS))
def test_weights_are_fp16_with_int64_batch_counters(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    assert any(k.endswith("running_var") for k in state), "BatchNorm buffers must be saved"
    for key, tensor in state.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float16
        assert tensor.dtype == expected, key


def test_all_models_share_keys_and_shapes_but_not_bn_stats() -> None:
    states = {d.name: load_file(d / "model.safetensors") for d in MODEL_DIRS}
    reference = {k: v.shape for k, v in states["base"].items()}
    for name, state in states.items():
        assert {k: v.shape for k, v in state.items()} == reference, name
    # Fine-tuning ran BatchNorm in train mode, so each ingredient carries its own statistics.
    stats = [states[d.name]["bn1.running_var"] for d in INGREDIENT_DIRS]
    assert all(not torch.equal(stats[0], s) for s in stats[1:])


@pytest.mark.parametrize("split", ["val", "test"])
def test_image_folders_match_the_split(split: str) -> None:
    _, labels = train.digits_uint8()
    indices = train.split_indices()[split]
    root = train.DATA_DIR / split
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    for digit in range(10):
        expected = {train.image_file_name(int(i)) for i in indices if labels[i] == digit}
        files = sorted((root / str(digit)).iterdir())
        assert {p.name for p in files} == expected
        assert 30 <= len(files) <= 40
        with Image.open(files[0]) as img:
            assert (img.mode, img.size) == ("L", (8, 8))


def test_ingredient_val_accuracy_through_png_and_timm_transform() -> None:
    model = timm.create_model(f"local-dir:{INGREDIENT_DIRS[0]}", pretrained=True).eval()
    assert train.image_folder_accuracy(model, train.DATA_DIR / "val") > 0.8
