"""hub_soup.io.read: every checkpoint format people have opens as the same clean tensors.

The ingredient is a real fp16 timm RegNet (BatchNorm buffers, int64
``num_batches_tracked``), saved the way each tool saves it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_soup import open_checkpoint
from hub_soup.errors import CheckpointFormatError, UnsafePickleError
from hub_soup.io.read import clean_keys
from tests import checkpoints as ck


@pytest.fixture(scope="module")
def regnet() -> dict:
    """One fp16 RegNet ingredient: the model, its raw weights and (different) EMA weights."""
    model = ck.timm_model(seed=1, batches=123)
    raw = ck.state_dict_of(model)
    ema = ck.state_dict_of(ck.perturb_(ck.timm_model(seed=1, batches=123), seed=99, scale=0.01))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    return {"model": model, "raw": raw, "ema": ema}


def _assert_same_tensors(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert set(checkpoint.metas) == set(expected)
    buffer = torch.empty(64 * 8, dtype=torch.uint8)
    for key, tensor in expected.items():
        meta = checkpoint.metas[key]
        assert (meta.dtype, meta.shape) == (tensor.dtype, tuple(tensor.shape)), key
        ck.assert_bit_equal(checkpoint.read(key).reshape(tensor.shape), tensor, key)
    # chunked reads (what the merge does) give the same elements
    for key in [k for k in expected if expected[k].numel() > 64][:3] + [k for k in expected if "num_batches" in k][:1]:
        flat = expected[key].reshape(-1)
        for start in range(0, flat.numel(), 61):
            count = min(61, flat.numel() - start)
            ck.assert_bit_equal(checkpoint.read_into(key, start, count, buffer), flat[start : start + count], key)


# (id, builder(tmp, regnet) -> path, expected format, which weights, extra check)
FORMATS: list[tuple[str, Callable[[Path, dict], Path], str, str]] = [
    ("safetensors", lambda d, r: ck.save_safetensors(r["raw"], d / "soup-in.safetensors"), "safetensors", "raw"),
    ("timm-folder", lambda d, r: ck.save_timm_folder(r["model"], d / "timm"), "safetensors", "raw"),
    ("hf-sharded", lambda d, r: ck.save_sharded_safetensors(r["raw"], d / "sharded", "20KB"), "safetensors-sharded", "raw"),
    ("pytorch_model.bin", lambda d, r: ck.save_pytorch_bin(r["raw"], d / "bin"), "pytorch", "raw"),
    ("pytorch-sharded", lambda d, r: ck.save_pytorch_sharded(r["raw"], d / "binshards", 3), "pytorch-sharded", "raw"),
    ("timm-train", lambda d, r: ck.save_timm_train(d / "model_best.pth.tar", r["raw"], r["ema"]), "torch-pickle", "ema"),
    ("torch.compile", lambda d, r: ck.save_compiled(r["raw"], d / "compiled.pt"), "torch-pickle", "raw"),
    ("legacy-pickle", lambda d, r: ck.save_legacy_pickle(r["raw"], d / "old.pth"), "torch-pickle", "raw"),
]


@pytest.mark.parametrize("builder,fmt,which", [f[1:] for f in FORMATS], ids=[f[0] for f in FORMATS])
def test_every_format_opens_as_the_same_clean_tensors(tmp_path: Path, regnet: dict, builder, fmt: str, which: str) -> None:
    path = builder(tmp_path, regnet)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format == fmt
        _assert_same_tensors(checkpoint, regnet[which])
        assert checkpoint.num_elements == sum(t.numel() for t in regnet[which].values())
        assert checkpoint.aliases == []  # a RegNet ties nothing


def test_timm_folder_carries_its_config(tmp_path: Path, regnet: dict) -> None:
    folder = ck.save_timm_folder(regnet["model"], tmp_path / "timm")
    (folder / "notes.txt").write_text("not a sidecar")
    with open_checkpoint(folder) as checkpoint:
        assert [p.name for p in checkpoint.sidecars] == ["config.json"]
        assert checkpoint.config["architecture"] == ck.ARCH
        assert checkpoint.config["num_classes"] == ck.NUM_CLASSES


def test_lightning_checkpoint_keeps_its_model_prefix(tmp_path: Path, regnet: dict) -> None:
    """The reader keeps the LightningModule's attribute name; alignment maps it (see test_align)."""
    path = ck.save_lightning(regnet["raw"], tmp_path / "epoch=3.ckpt")
    with open_checkpoint(path) as checkpoint:
        _assert_same_tensors(checkpoint, {"model." + k: v for k, v in regnet["raw"].items()})
        assert any("'state_dict'" in note for note in checkpoint.notes)


def test_timm_train_checkpoint_uses_ema_unless_told_not_to(tmp_path: Path, regnet: dict) -> None:
    path = ck.save_timm_train(tmp_path / "last.pth.tar", regnet["raw"], regnet["ema"])
    with open_checkpoint(path) as checkpoint:
        _assert_same_tensors(checkpoint, regnet["ema"])
        assert any("'state_dict_ema'" in n for n in checkpoint.notes)
        assert any("module." in n for n in checkpoint.notes)
    with open_checkpoint(path, ema=False) as checkpoint:
        _assert_same_tensors(checkpoint, regnet["raw"])
        assert any("raw weights" in n and "state_dict_ema" in n for n in checkpoint.notes), checkpoint.notes


def test_ema_entry_without_weights_falls_back_to_the_state_dict(tmp_path: Path, regnet: dict) -> None:
    """``{"ema": {"decay": ...}}`` is optimizer-side bookkeeping, not weights: use ``state_dict``."""
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": regnet["raw"], "ema": {"decay": 0.999, "updates": 10}}, path)
    with open_checkpoint(path) as checkpoint:
        _assert_same_tensors(checkpoint, regnet["raw"])
        assert any("'state_dict'" in n for n in checkpoint.notes)


def test_timm_train_checkpoint_without_ddp_prefix(tmp_path: Path, regnet: dict) -> None:
    path = ck.save_timm_train(tmp_path / "checkpoint-9.pth.tar", regnet["raw"], regnet["ema"], ddp=False)
    with open_checkpoint(path, ema=False) as checkpoint:
        _assert_same_tensors(checkpoint, regnet["raw"])


# ---------------------------------------------------------------- key cleaning


def test_clean_keys_rules() -> None:
    # DDP's module. only when every key has it (a real submodule may be called "module")
    assert clean_keys(["module.a", "module.b"], "x")[0] == {"a": "module.a", "b": "module.b"}
    assert clean_keys(["module.a", "b"], "x")[0] == {"module.a": "module.a", "b": "b"}
    assert clean_keys(["module.module.a", "module.b"], "x")[0] == {"module.a": "module.module.a", "b": "module.b"}
    # torch.compile's _orig_mod. wherever it appears
    mapping, notes = clean_keys(["_orig_mod.stem.w", "head._orig_mod.fc.w"], "x")
    assert mapping == {"stem.w": "_orig_mod.stem.w", "head.fc.w": "head._orig_mod.fc.w"}
    assert notes == ["stripped torch.compile's '_orig_mod.'"]
    # both at once (compile of a DDP model)
    assert list(clean_keys(["module._orig_mod.a"], "x")[0]) == ["a"]
    with pytest.raises(CheckpointFormatError, match="'_orig_mod.a' both clean to 'a'|'a' and '_orig_mod.a' both clean"):
        clean_keys(["a", "_orig_mod.a"], "ckpt")


# ---------------------------------------------------------------- pickles: views, ties, safety


def _views_state_dict() -> dict[str, torch.Tensor]:
    base = torch.arange(48, dtype=torch.float32) / 7
    embedding = torch.randn(5, 3)
    return {
        "whole": base[:24].view(4, 6),
        "transposed": base[:24].view(4, 6).t(),  # non-contiguous view of the same storage
        "offset_slice": base[30:37],  # storage_offset != 0
        "strided": base[::5],  # stride 5
        "emb.weight": embedding,
        "lm_head.weight": embedding,  # tied: same storage, same view
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "steps": torch.tensor(17),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_and_shared_storage_in_pickles(tmp_path: Path, legacy: bool) -> None:
    sd = _views_state_dict()
    path = tmp_path / "views.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.aliases == [("emb.weight", "lm_head.weight")]
        buffer = torch.empty(1024, dtype=torch.uint8)
        for key, tensor in sd.items():
            flat = tensor.contiguous().reshape(-1)
            for size in (1, 4, 7, 100):
                pieces = [checkpoint.read_into(key, s, min(size, flat.numel() - s), buffer).clone()
                          for s in range(0, flat.numel(), size)]
                got = torch.cat(pieces) if pieces else flat[:0]
                ck.assert_bit_equal(got, flat, f"{key} in chunks of {size}")


def test_whole_pickled_module_is_refused_then_allowed(tmp_path: Path) -> None:
    model = ck.timm_model(seed=3, arch="test_resnet", dtype=torch.float32)
    path = ck.save_whole_module(model, tmp_path / "model.pt")
    with pytest.raises(UnsafePickleError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "--allow-pickle" in message and "model.pt" in message
    assert "timm.models.resnet.ResNet" in message  # names the code it would run
    with open_checkpoint(path, allow_pickle=True) as checkpoint:
        _assert_same_tensors(checkpoint, ck.state_dict_of(model))
        assert any("allow-pickle" in n for n in checkpoint.notes)
        assert any("nn.Module" in n for n in checkpoint.notes)


def test_pickle_calling_os_system_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    with pytest.raises(UnsafePickleError, match="--allow-pickle"):
        open_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def _corrupt_pickle_stream(path: Path) -> None:
    """Overwrite opcodes inside the zip's data.pkl (stored uncompressed) with garbage."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pickled = archive.read(name)
    data = bytearray(path.read_bytes())
    at = data.find(pickled)
    assert at > 0
    data[at + 2 : at + 12] = b"\xff" * 10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_corrupt_pickle_is_corrupt_not_unsafe(tmp_path: Path, allow_pickle: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(4)}, path)
    _corrupt_pickle_stream(path)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path, allow_pickle=allow_pickle)
    assert not isinstance(caught.value, UnsafePickleError), str(caught.value)
    assert "corrupt" in str(caught.value) and "pytorch_model.bin" in str(caught.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_torch_files(tmp_path: Path, regnet: dict, legacy: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(regnet["raw"], path, _use_new_zipfile_serialization=not legacy)
    ck.truncate(path, 0.6)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "pytorch_model.bin" in message and ("truncated" in message or "corrupt" in message), message
    if not legacy:
        assert "truncated" in message


def test_truncated_safetensors(tmp_path: Path, regnet: dict) -> None:
    path = ck.truncate(ck.save_safetensors(regnet["raw"], tmp_path / "model.safetensors"), 0.9)
    with pytest.raises(CheckpointFormatError, match="truncated"):
        open_checkpoint(path)


# ---------------------------------------------------------------- wrong files and folders


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("config.json", json.dumps({"architecture": "regnetx_002", "num_classes": 10}), ["not a checkpoint"]),
        ("config2.json", '{"a": {"b": 1}, "c": [1, 2, 3]}', ["not a checkpoint"]),
        ("README.md", "# my model\n\nweights are elsewhere\n", ["not a checkpoint", "README.md"]),
        ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x032.0" + bytes(64), ["not a checkpoint"]),
        ("empty.bin", b"", ["not a checkpoint"]),
        ("weights.npz", "zip", ["corrupt", "cannot be read"]),  # a zip, but not torch's
    ],
)
def test_wrong_files_are_named_and_explained(tmp_path: Path, name: str, content, words: list[str]) -> None:
    path = tmp_path / name
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("arr_0.npy", b"\x93NUMPY" + bytes(100))
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert name in message
    for word in words:
        assert word in message, message


def test_pickle_without_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointFormatError, match="no tensors found; top-level keys: epoch, args"):
        open_checkpoint(tmp_path / "meta.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointFormatError, match="holds a list, not a state_dict"):
        open_checkpoint(tmp_path / "list.pt")


def test_non_tensor_entries_are_ignored_with_a_note(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2), "step": 3, "name": "x"}}, tmp_path / "a.pt")
    with open_checkpoint(tmp_path / "a.pt") as checkpoint:
        assert list(checkpoint.metas) == ["w"]
        assert "ignored 2 non-tensor entries" in checkpoint.notes


def test_folders(tmp_path: Path, regnet: dict) -> None:
    small = {"w": torch.ones(3)}
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="no weights found") as caught:
        open_checkpoint(only_config)
    assert "save_pretrained" in str(caught.value)

    several = tmp_path / "several"
    several.mkdir()
    torch.save(small, several / "a.pt")
    torch.save(small, several / "b.pt")
    with pytest.raises(CheckpointFormatError, match="several weights files.*a.pt, b.pt"):
        open_checkpoint(several)

    both = tmp_path / "both"  # a .pth and a .safetensors of one model: safetensors wins
    both.mkdir()
    torch.save({"w": torch.zeros(3)}, both / "model.pth")
    save_file(small, str(both / "weights.safetensors"))
    with open_checkpoint(both) as checkpoint:
        assert checkpoint.format == "safetensors" and torch.equal(checkpoint.read("w"), small["w"])

    with pytest.raises(CheckpointFormatError, match="no such file or folder"):
        open_checkpoint(tmp_path / "missing")


# ---------------------------------------------------------------- shard indexes


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "model-00002-of-00002.safetensors"))
    return folder


def _write_index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_reads_every_shard(tmp_path: Path) -> None:
    folder = _sharded(tmp_path)
    _write_index(folder, {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"})
    with open_checkpoint(folder) as checkpoint:
        assert checkpoint.format == "safetensors-sharded"
        assert list(checkpoint.metas) == ["b", "a"]  # the index's order
        assert torch.equal(checkpoint.read("a"), torch.ones(2))


@pytest.mark.parametrize(
    "target",
    ["../model-00001-of-00002.safetensors", "/etc/passwd", "sub/model-00001-of-00002.safetensors",
     "..", "", "..\\x.safetensors"],
)
def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path, target: str) -> None:
    folder = _sharded(tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    _write_index(folder, {"a": target, "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CheckpointFormatError, match="refuses shard") as caught:
        open_checkpoint(folder)
    assert "outside" in str(caught.value)


@pytest.mark.parametrize(
    "index,words",
    [
        ("not json", ["not a valid shard index"]),
        (json.dumps({"metadata": {}}), ["not a valid shard index"]),
        (json.dumps({"weight_map": ["a"]}), ["not a valid shard index"]),
        (json.dumps({"weight_map": {"a": 1}}), ["not a valid shard index"]),
        (json.dumps({"weight_map": {}}), ["not a valid shard index", "names no tensors"]),
        (json.dumps({"weight_map": {"a": "model-00003-of-00003.safetensors"}}), ["shard model-00003-of-00003.safetensors is missing"]),
        (json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}), ["not in their shard", "'a'"]),
    ],
)
def test_bad_indexes(tmp_path: Path, index: str, words: list[str]) -> None:
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(folder)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_sharded_checkpoint_of_a_wrapped_model(tmp_path: Path, regnet: dict, prefix: str) -> None:
    """The index names keys as saved (``module.stem...``); they clean like a single file's."""
    wrapped = {prefix + k: v for k, v in regnet["raw"].items()}
    folder = ck.save_sharded_safetensors(wrapped, tmp_path / "wrapped", "20KB")
    with open_checkpoint(folder) as checkpoint:
        _assert_same_tensors(checkpoint, regnet["raw"])
        assert len([n for n in checkpoint.notes if n.startswith("stripped")]) == 1, checkpoint.notes


def test_sharded_pickles_keep_their_ties(tmp_path: Path) -> None:
    embedding = torch.randn(6, 4)
    sd = {"module.emb.weight": embedding, "module.lm_head.weight": embedding, "module.norm.weight": torch.ones(4)}
    folder = tmp_path / "tied"
    folder.mkdir()
    torch.save({k: sd[k] for k in ("module.emb.weight", "module.lm_head.weight")}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"module.norm.weight": sd["module.norm.weight"]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"module.emb.weight": "pytorch_model-00001-of-00002.bin", "module.lm_head.weight":
                  "pytorch_model-00001-of-00002.bin", "module.norm.weight": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(folder) as checkpoint:
        assert checkpoint.format == "pytorch-sharded"
        assert list(checkpoint.metas) == ["emb.weight", "lm_head.weight", "norm.weight"]
        assert checkpoint.aliases == [("emb.weight", "lm_head.weight")]
