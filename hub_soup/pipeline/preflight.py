"""The checks that can fail on the user's input, run before anything is resolved or downloaded.

Code the recipe names runs only with ``trust_remote_code``; the output folder is none of the
inputs (an output that is an input is said so before it is said not to be a soup) and may be
written; the push token may write to the repo; the eval data exist and the GPUs the recipe names
are this machine's. So a mistake costs seconds, not a download. Every process of a launch checks,
so a bad input stops each of them with the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from hub_soup.errors import RecipeError, UntrustedCodeError
from hub_soup.eval.data import check_data
from hub_soup.eval.spec import EvalSpec
from hub_soup.hub.push import check_push_access
from hub_soup.ingredients import check_apart
from hub_soup.io.write import check_destination
from hub_soup.recipe import BASES, Recipe

logger = logging.getLogger(__name__)


def preflight(recipe: Recipe, token: str | bool | None, *, sweep: bool) -> None:
    """The output, the push token and the eval section checked; ``sweep``: this process may clear the
    output's leftovers (the main one of a launch)."""
    if recipe.output.path is not None:
        check_output_apart(Path(recipe.output.path), recipe)
        check_destination(Path(recipe.output.path), recipe.output.overwrite, sweep=sweep)
    if recipe.push is not None:
        check_push_access(recipe.push, token)
    if recipe.eval is not None:
        check_eval(recipe.eval, recipe.base_dir, token)


def check_output_named(recipe: Recipe) -> None:
    """Refuse a recipe that says nowhere where its soup goes."""
    if recipe.output.path is None and recipe.push is None:
        raise RecipeError(
            "no output: pass -o OUT_DIR (or --push org/name)",
            hint="a recipe says where the soup goes with output.path or push.repo_id",
        )


def check_trusted(code: Sequence[tuple[str, str]], trust_remote_code: bool) -> None:
    """Refuse, before any work, the code a recipe names (``(field, value)``: :meth:`Recipe.code_refs`) unless the
    caller trusts it."""
    if code and not trust_remote_code:
        field, value = code[0]
        raise UntrustedCodeError(
            f"the recipe's {field} names code to run ({value}); refusing to run it without --trust-remote-code",
            hint=UntrustedCodeError.HINT,
        )


def check_output_apart(output: Path, recipe: Recipe) -> None:
    """Refuse an output that is an input, contains one or lies inside one (symlinks resolved).

    With ``overwrite`` such an output would replace an ingredient's files (or a LoRA adapter's
    applied to one, the eval data, or the Hugging Face cache that Hub ingredients live in) with the soup.
    """
    inputs = [(f"the ingredient {i.ref}", recipe.base_dir / Path(i.ref).expanduser()) for i in recipe.ingredients]
    for name in BASES:
        if (base := getattr(recipe, name)) is not None:
            inputs.append((f"the base {base.ref}", recipe.base_dir / Path(base.ref).expanduser()))
    models = [*recipe.ingredients, *(m for m in (recipe.base, recipe.adapter_base) if m is not None)]
    inputs += [(f"the LoRA adapter {m.lora.ref}", recipe.base_dir / Path(m.lora.ref).expanduser())
               for m in models if m.lora is not None]
    if recipe.eval is not None:
        inputs += recipe.eval.inputs()
    check_apart(output, inputs, cache=True)


def device_for(name: str) -> torch.device:
    """The recipe's ``device`` on this machine: ``auto`` picks CUDA when present; ``cuda`` or ``cuda:N``
    without CUDA falls back to the CPU with a warning (a recipe pinned on a GPU machine still runs
    elsewhere, slower); a GPU index this machine lacks is an error (:func:`cuda_device`).

    Raises:
        RecipeError: ``cuda:N`` with N at least the number of CUDA devices.
    """
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name != "auto":
            logger.warning("--device %s: no CUDA device is available; accumulating on the CPU", name)
        return torch.device("cpu")
    return cuda_device("cuda" if name == "auto" else name, torch.cuda.device_count())


def cuda_device(name: str, count: int) -> torch.device:
    """``name`` (``cuda`` or ``cuda:N``) on a machine with ``count`` CUDA devices. Checked here, before
    anything is downloaded: torch takes ``torch.device("cuda:5")`` on any machine and fails only at the
    first tensor put there, deep in a merge.

    Raises:
        RecipeError: N is not below ``count``, naming the devices there are.
    """
    device = torch.device(name)
    if device.index is not None and device.index >= count:
        use = _either(["cuda", *(f"cuda:{index}" for index in range(count))] if count else ["cpu"])
        raise RecipeError(
            f"--device {name}: this machine has {_cuda_devices(count)}", hint=f"use {use} (--device, a recipe's device)"
        )
    return device


def check_eval(spec: EvalSpec, base: Path, token: str | bool | None) -> None:
    """What the eval section names, checked on this machine before anything is downloaded: the GPUs of its
    placement (:func:`check_eval_devices`) and its data (:func:`~hub_soup.eval.data.check_data`; relative
    paths from ``base``)."""
    check_eval_devices(spec, cuda_device_count())
    check_data(spec, base, token)


def check_eval_devices(spec: EvalSpec, count: int) -> None:
    """Refuse, before anything is downloaded, a GPU that ``eval.max_memory`` or ``eval.device_map`` names and
    this machine (with ``count`` CUDA devices) lacks: accelerate would only warn ("Device 0 is not available")
    and torch fail at the first weight put there. Unlike ``--device cuda``, a placement has no CPU to fall
    back on that keeps its meaning (the sizes and modules given are those of that GPU).

    Raises:
        RecipeError: naming the entry, and the devices there are.
    """
    for key, size in (spec.max_memory or {}).items():
        if key.isdigit() and int(key) >= count:
            use = _either([*(f"{index}=SIZE" for index in range(count)), "cpu=SIZE"])
            raise RecipeError(
                f"--max-memory {key}={size}: this machine has {_cuda_devices(count)}",
                hint=f"use {use} (--max-memory, eval.max_memory)",
            )
    for module, device in (spec.device_map.items() if isinstance(spec.device_map, dict) else ()):
        index = _gpu_index(device)
        if index is not None and index >= count:
            use = _either([*(f"cuda:{index}" for index in range(count)), "cpu", "disk"])
            raise RecipeError(
                f"--device-map {module or repr(module)}={device}: this machine has {_cuda_devices(count)}",
                hint=f"place it on {use} (--device-map, eval.device_map)",
            )


def cuda_device_count() -> int:
    """The CUDA devices of this machine (0 without CUDA, or without a driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_index(device: int | str) -> int | None:
    """The CUDA device a device map entry names (``cuda`` is the first), None for cpu, mps and disk."""
    if isinstance(device, int) or device.isdigit():
        return int(device)
    return 0 if device == "cuda" else int(device[5:]) if device.startswith("cuda:") else None


def _cuda_devices(count: int) -> str:
    """This machine's CUDA devices in words: ``no CUDA device``, ``2 CUDA devices (cuda:0, cuda:1)``."""
    if not count:
        return "no CUDA device"
    return f"{count} CUDA device{'s' if count != 1 else ''} ({', '.join(f'cuda:{index}' for index in range(count))})"


def _either(choices: Sequence[str]) -> str:
    """``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
