"""Checkpoint formats are one registry: the built-in ones chosen and sniffed by it, and a format an installed
package declares under the entry-point group ``hub_soup.formats`` used like them, for a local file, a folder
and a Hub repo; a file no format reads is refused naming every known one.

The plugin is ``tests/npz_format.py`` (numpy's ``.npz``), written as a distribution of its own into a folder
that is put on ``sys.path`` (in this process) or on the CLI's ``PYTHONPATH``: a real distribution's metadata,
nothing installed into the test environment.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hub_soup import open_checkpoint
from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT, CheckpointFormatError
from hub_soup.hub.fetch import choose_weights
from hub_soup.io import formats
from hub_soup.io.formats import format_names, get_format
from hub_soup.registry import FORMATS_GROUP
from tests.hub_fixtures import TEST_USER
from tests.hub_models import unique, upload
from tests.hub_server import HubServer
from tests.test_plugins import write_distribution

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCE = Path(__file__).with_name("npz_format.py")
ONNX_HEAD = b"\x08\x07\x12\x07pytorch\x1a\x032.0" + bytes(64)


def _install_npz(site: Path) -> None:
    """``tests/npz_format.py`` as the distribution ``toy_npz_format`` in ``site``, its format declared by entry point."""
    write_distribution(site, "toy_npz_format", PLUGIN_SOURCE.read_text(), f"[{FORMATS_GROUP}]\nnpz = toy_npz_format:Npz\n")


@pytest.fixture
def npz_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The plugin installed on ``sys.path``, and the formats' registry as a run starts (it reads the entry points
    on first use); afterwards the registry is restored and the plugin's module forgotten."""
    site = tmp_path / "site"
    site.mkdir()
    _install_npz(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(formats, "FORMATS", formats.FORMATS.copy())
    yield
    sys.modules.pop("toy_npz_format", None)


def _save_npz(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A small model's tensors saved with ``np.savez`` (dotted names, as a state_dict has them); returns them."""
    generator = np.random.default_rng(seed)
    arrays = {
        "fc.weight": (1 + 0.01 * generator.standard_normal((4, 3))).astype(np.float32),
        "fc.bias": generator.standard_normal(4).astype(np.float16),
        "steps": np.array(7, dtype=np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def _assert_equal(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert list(checkpoint.metas) == list(expected)
    for name, tensor in expected.items():
        assert checkpoint.metas[name].dtype == tensor.dtype and torch.equal(checkpoint.read(name), tensor), name


# ---------------------------------------------------------------- the built-in formats


def test_the_built_in_formats_are_listed_without_importing_torch() -> None:
    code = ("import sys\nfrom hub_soup.io.formats import format_names\n"
            "print(' '.join(format_names()), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["safetensors", "torch", "False"]


def test_a_safetensors_file_whose_length_looks_like_a_pickle_opens_as_safetensors(tmp_path: Path) -> None:
    """A header of 640 bytes starts the file with ``80 02``, a pickle's protocol 2 opcode: both formats recognise
    it, and the one that claims the name reads it, chunk by chunk."""
    tensors = {f"t{i:03d}": torch.full((2,), float(i)) for i in range(11)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    head = path.read_bytes()[:9]
    assert head[:2] == b"\x80\x02" and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] == 640
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format == "safetensors"
        _assert_equal(checkpoint, tensors)


@pytest.mark.parametrize(("files", "chosen"), [
    (["model.safetensors", "pytorch_model.bin", "config.json"], ["model.safetensors"]),
    (["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
      "sub/pytorch_model-00003-of-00003.bin", "model.pth"],
     ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
    (["weights.pth", "open_clip.safetensors", "flax_model.msgpack"], ["open_clip.safetensors"]),
    (["checkpoint.pth.tar", "README.md"], ["checkpoint.pth.tar"]),
])
def test_a_repo_fetches_its_most_preferred_format_only(files: list[str], chosen: list[str]) -> None:
    assert choose_weights(files, None, "org/name") == chosen


def test_a_repo_without_weights_names_the_known_formats() -> None:
    with pytest.raises(CheckpointFormatError, match="org/name: no weights found") as caught:
        choose_weights(["config.json", "model.onnx"], None, "org/name")
    assert "safetensors: .safetensors; torch: .bin, .pt" in str(caught.value)


def test_an_unknown_format_name_is_refused_listing_the_known_ones() -> None:
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format 'onnx'") as caught:
        get_format("onnx")
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert caught.value.hint is not None and "choose one of: safetensors, torch" in caught.value.hint


# ---------------------------------------------------------------- a format from an installed package


@pytest.mark.usefixtures("npz_installed")
def test_a_plugins_format_opens_its_files(tmp_path: Path) -> None:
    assert format_names()[-1] == "npz" and "toy_npz_format" not in sys.modules  # named, not imported
    expected = _save_npz(tmp_path / "weights.npz", seed=0)
    with open_checkpoint(tmp_path / "weights.npz") as checkpoint:
        assert checkpoint.format == "npz"
        _assert_equal(checkpoint, expected)
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as checkpoint:  # the folder's weights file is the one the plugin claims
        assert checkpoint.format == "npz" and [p.name for p in checkpoint.sidecars] == ["config.json"]
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")  # torch's zip magic too: the name decides
    with open_checkpoint(tmp_path / "zip.pt") as checkpoint:
        assert checkpoint.format == "torch-pickle"
    assert choose_weights(["model.safetensors", "weights.npz"], None, "org/name") == ["model.safetensors"]


@pytest.mark.usefixtures("npz_installed")
def test_a_file_no_format_reads_is_refused_naming_the_plugins_format_too(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(ONNX_HEAD)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(tmp_path / "model.onnx")
    assert "not a checkpoint: neither safetensors, a torch file nor a numpy .npz archive" in caught.value.message
    assert caught.value.hint is not None and "npz: .npz" in caught.value.hint


@pytest.mark.usefixtures("npz_installed")
def test_a_hub_repo_in_the_plugins_format_is_fetched_and_merged(hub: HubServer, hub_token: str, tmp_path: Path) -> None:
    api = HfApi(token=hub_token)
    repos, states = [], []
    for seed in (1, 2):
        folder = tmp_path / f"ft{seed}"
        states.append(_save_npz(folder / "weights.npz", seed))
        (folder / "notes.onnx").write_bytes(ONNX_HEAD)  # not a weights file of any format: never downloaded
        repos.append(f"{TEST_USER}/{unique('npz')}")
        upload(api, folder, repos[-1])
    assert main(["--quiet", "merge", *repos, "-o", str(tmp_path / "soup")]) == 0
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    expected = ((states[0]["fc.weight"].double() + states[1]["fc.weight"].double()) / 2).float()
    assert torch.equal(soup["fc.weight"], expected) and torch.equal(soup["steps"], states[0]["steps"])
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert any(path.endswith("/weights.npz") for path in downloads)
    assert not any(path.endswith(".onnx") for path in downloads)


# ---------------------------------------------------------------- the CLI, with and without the plugin


def _hub_soup(*args: str, site: Path | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``hub-soup ARGS`` in a fresh process, with the plugin's distribution installed where ``site`` is given."""
    path = os.pathsep.join([*([str(site)] if site else []), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "hub_soup.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300, check=False)


def test_the_cli_merges_the_plugins_files_and_refuses_unknown_ones_listing_the_known(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _install_npz(site)
    states = [_save_npz(tmp_path / f"{name}.npz", seed) for seed, name in enumerate("ab")]
    (tmp_path / "model.onnx").write_bytes(ONNX_HEAD)

    done = _hub_soup("merge", "a.npz", "b.npz", "-o", "soup", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    soup = load_file(tmp_path / "soup" / "model.safetensors")
    assert torch.equal(soup["fc.bias"], ((states[0]["fc.bias"].float() + states[1]["fc.bias"].float()) / 2).half())

    for site_or_none, listed in ((site, "npz: .npz"), (None, "torch: .bin")):
        done = _hub_soup("inspect", "model.onnx", site=site_or_none, cwd=tmp_path)
        assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr
        assert "model.onnx: not a checkpoint" in done.stderr and listed in done.stderr
        assert ("npz" in done.stderr) == (site_or_none is not None), done.stderr
