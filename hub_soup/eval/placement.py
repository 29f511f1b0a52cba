"""Models bigger than one device: the scored model placed by accelerate, and where each weight then lives.

With ``eval.device_map`` the evaluator's one model is built on the meta device
(``init_empty_weights``), its modules placed by ``infer_auto_device_map`` (whole
blocks: the model's ``_no_split_modules``) within ``eval.max_memory``, and
dispatched with ``dispatch_model``, as ``from_pretrained(device_map=...)`` does.
No weights are loaded: every candidate is streamed in afterwards. A module
placed on a device gets empty tensors there; one offloaded to the CPU (beside a
GPU) gets them in the CPU state dict its hook loads from; one offloaded to disk
gets a ``.dat`` file in accelerate's offload format, in a temporary folder inside
``eval.offload_folder`` that is removed when the model is released.

:func:`weight_storage` then tells the streaming sink where each state-dict key's
values are read from by the forward pass: the model's own tensor, or the copy in
the offloaded weights map (``AlignDevicesHook.weights_map``: the CPU dict, or a
writable memmap of the disk file the hook reads before every forward).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hub_soup.errors import EvalError
from hub_soup.io.sizes import parse_size

if TYPE_CHECKING:
    from hub_soup.eval.spec import EvalSpec

# what released models still hold on disk: each finalizer removes its model's offload folder
_OFFLOAD_FOLDERS: weakref.WeakKeyDictionary[nn.Module, weakref.finalize[Any, Any]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Placement:
    """How the scored model is spread over devices: the recipe's ``eval.device_map``, ``max_memory`` and
    ``offload_folder``, as transformers' ``from_pretrained`` and accelerate take them."""

    device_map: str | Mapping[str, int | str]
    max_memory: Mapping[str, int | str] | None = None
    offload_folder: Path | None = None

    @classmethod
    def of(cls, spec: EvalSpec) -> Placement | None:
        """The placement ``spec`` asks for; ``None``: the model goes whole on the evaluator's device."""
        if spec.device_map is None:
            return None
        folder = Path(spec.offload_folder).expanduser() if spec.offload_folder is not None else None
        return cls(spec.device_map, spec.max_memory, folder)

    def device_map_of(self, model: nn.Module, dtype: torch.dtype) -> dict[str, int | str]:
        """The module -> device map for ``model`` (on the meta device): the recipe's own, or accelerate's for a
        named one (``auto``, ``balanced`` and ``balanced_low_0`` balance the GPUs first, as transformers does)."""
        if not isinstance(self.device_map, str):
            return {module: _device(device) for module, device in self.device_map.items()}
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory

        max_memory: dict[int | str, int] | None = (
            {_device(device): parse_size(size) for device, size in self.max_memory.items()}
            if self.max_memory is not None else None
        )
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if self.device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                low_zero=self.device_map == "balanced_low_0",
            )
        return dict(infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype))

    def dispatch(self, model: nn.Module, dtype: torch.dtype, label: str) -> nn.Module:
        """``model`` (built under ``init_empty_weights``) with empty weights where the device map puts them,
        dispatched with accelerate's hooks; ``model.hf_device_map`` is the map, as transformers sets it.

        Raises:
            EvalError: the map offloads to disk without an offload folder, or leaves a module unplaced.
        """
        from accelerate import dispatch_model
        from accelerate.utils import find_tied_parameters, retie_parameters

        device_map = self.device_map_of(model, dtype)
        main = _main_device(device_map)
        offloaded = {"disk"} if main in ("cpu", "mps") else {"cpu", "disk"}
        disk = [module for module, device in device_map.items() if device == "disk"]
        if disk and self.offload_folder is None:
            raise EvalError(
                f"{label}: the device map puts {len(disk)} modules on disk (e.g. {disk[0]!r}) and no offload "
                "folder is given",
                hint="pass --offload-folder DIR (eval.offload_folder), or more --max-memory",
            )
        tied = find_tied_parameters(model)
        cpu_weights: dict[str, torch.Tensor] = {}
        index: dict[str, dict[str, Any]] = {}
        folder = None
        if disk:
            assert self.offload_folder is not None
            self.offload_folder.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="hub-soup-offload-", dir=self.offload_folder))
            _OFFLOAD_FOLDERS[model] = weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
        made: dict[int, torch.Tensor] = {}  # tied parameters are made once
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_meta:
                continue
            device = _placed(key, device_map, label)
            if device in offloaded:
                if device == "cpu":
                    cpu_weights[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
                else:
                    assert folder is not None
                    index[key] = _disk_weight(folder, key, tensor)
                continue
            if id(tensor) not in made:
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=_torch_device(device))
                made[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
            _set_tensor(model, key, made[id(tensor)])
        retie_parameters(model, tied)
        if folder is not None:
            (folder / "index.json").write_text(json.dumps(index))
        model = dispatch_model(
            model, device_map, main_device=main, state_dict=cpu_weights or None,
            offload_dir=str(folder) if folder is not None else None, offload_index=index or None, force_hooks=True,
        )
        model.hf_device_map = device_map  # type: ignore[assignment]
        return model


def input_device(model: nn.Module) -> torch.device | None:
    """Where a dispatched model takes its inputs and gives its outputs: the main device its hooks run offloaded
    modules on (``None``: not dispatched). Not ``model.device``, the first parameter's, which is ``meta``
    when that parameter is offloaded."""
    device_map = getattr(model, "hf_device_map", None)
    return _torch_device(_main_device(device_map)) if device_map else None


def _main_device(device_map: Mapping[str, int | str]) -> int | str:
    """The first device the map puts modules on that is not an offload target (the CPU when all are)."""
    on_devices = [device for device in device_map.values() if device not in ("cpu", "disk")]
    return on_devices[0] if on_devices else "cpu"


def release(model: nn.Module) -> None:
    """Remove what ``model``'s placement keeps on disk (its offload folder), now rather than when it is collected."""
    finalizer = _OFFLOAD_FOLDERS.pop(model, None)
    if finalizer is not None:
        finalizer()


def weight_storage(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Where each state-dict key's values are read from by the forward pass, as writable tensors.

    A key whose module accelerate offloaded is a meta tensor in the model: its values live in the hook's
    weights map instead, the CPU dict (the tensor itself) or the disk offload's ``.dat`` file (a memmap
    of it, opened for writing: the hook reads the same file before each forward). Every other key is the
    model's own tensor.
    """
    own = model.state_dict(keep_vars=True)
    if not any(tensor.is_meta for tensor in own.values()):
        return {key: [tensor.detach()] for key, tensor in own.items()}
    loaders = _weights_loaders(model)
    storage: dict[str, list[torch.Tensor]] = {}
    for key, tensor in own.items():
        if not tensor.is_meta:
            storage[key] = [tensor.detach()]
            continue
        found = [_stored(loader, key) for loader in loaders if key in loader.state_dict or key in loader.index]
        if not found:
            raise EvalError(f"{key} is offloaded by accelerate, but no weights map of the model holds it")
        storage[key] = found
    return storage


def _weights_loaders(model: nn.Module) -> list[Any]:
    """The ``OffloadedWeightsLoader`` behind every offloading hook of ``model`` (usually one)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    loaders: dict[int, Any] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(one, AlignDevicesHook) and one.offload and isinstance(one.weights_map, PrefixedDataset):
                loader = one.weights_map.dataset
                if isinstance(loader, OffloadedWeightsLoader):
                    loaders[id(loader)] = loader
    return list(loaders.values())


def _stored(loader: Any, key: str) -> torch.Tensor:
    """``key``'s tensor in ``loader``: its CPU tensor, or its disk file as a writable memmap in its dtype."""
    if key in loader.state_dict:
        return loader.state_dict[key]
    info = loader.index[key]
    dtype = getattr(torch, info["dtype"])
    shape = tuple(info["shape"]) or (1,)  # accelerate saves 0-dim tensors as 1-element files
    array = np.memmap(Path(loader.save_folder) / f"{key}.dat", dtype=_NUMPY_STAND_INS.get(dtype, info["dtype"]),
                      mode="r+", shape=shape)
    return torch.from_numpy(array).view(dtype)


# numpy has no bfloat16: accelerate writes its bits as int16 (offload_weight), and so do we
_NUMPY_STAND_INS: dict[torch.dtype, Any] = {torch.bfloat16: np.int16}


def _disk_weight(folder: Path, key: str, tensor: torch.Tensor) -> dict[str, Any]:
    """A zero-filled ``.dat`` file for ``key`` in accelerate's disk offload format, and its index entry."""
    name = str(tensor.dtype).removeprefix("torch.")
    np_dtype = _NUMPY_STAND_INS.get(tensor.dtype) or torch.empty(0, dtype=tensor.dtype).numpy().dtype
    np.memmap(folder / f"{key}.dat", dtype=np_dtype, mode="w+", shape=tuple(tensor.shape) or (1,)).flush()
    return {"dtype": name, "shape": list(tensor.shape)}


def _placed(key: str, device_map: Mapping[str, int | str], label: str) -> int | str:
    """The device of the module ``key`` belongs to: its longest prefix in the map."""
    for module in sorted(device_map, key=len, reverse=True):
        if module == "" or key == module or key.startswith(f"{module}."):
            return device_map[module]
    raise EvalError(
        f"{label}: the device map places no module holding {key}",
        hint="give every module a device in --device-map (\"\": cpu places the whole model)",
    )


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` of ``model``."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        module._parameters[name] = value  # type: ignore[assignment]
    else:
        module._buffers[name] = value


def _device(device: int | str) -> int | str:
    """A device as accelerate takes it: GPU indices as ints."""
    return int(device) if isinstance(device, str) and device.isdigit() else device


def _torch_device(device: int | str) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def placed_build(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` run under accelerate's ``init_empty_weights``: parameters on the meta device, buffers real.

    Weights transformers ties are tied again afterwards: under ``init_empty_weights`` every parameter
    set on a module is made anew, so a tie made there (``lm_head.weight = embed_tokens.weight``) is lost.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    return model
