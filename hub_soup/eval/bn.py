"""BatchNorm recalibration: recompute a soup's running statistics on unlabelled eval inputs.

Averaged running statistics are not the statistics of the averaged network;
re-estimating them is what makes many BatchNorm soups work (as
``torch.optim.swa_utils.update_bn`` does after stochastic weight averaging).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hub_soup.eval.data import Inputs


def recalibrate_bn(model: nn.Module, batches: Iterable[Inputs]) -> bool:
    """Recompute BatchNorm running statistics on ``batches``, as ``torch.optim.swa_utils.update_bn`` does.

    This calls ``update_bn`` itself (stats reset, cumulative average with
    ``momentum=None``, momenta and train/eval mode restored), without autograd,
    feeding keyword inputs (transformers batches) through a small adapter.

    Returns:
        False (and leaves the model untouched) if it has no BatchNorm layer.
    """
    if not has_batchnorm(model):
        return False
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches, _KeywordInputs(model))
    return True


def has_batchnorm(model: nn.Module) -> bool:
    """True if any module is a BatchNorm layer (what ``update_bn`` recalibrates)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def batchnorm_buffers(model: nn.Module, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``like`` with the model's BatchNorm buffers copied in, each in ``like``'s dtype (what would be saved)."""
    return {**like, **saved_batchnorm(model, {key: tensor.dtype for key, tensor in like.items()})}


def saved_batchnorm(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The model's BatchNorm buffers as they would be saved: those ``dtypes`` names, on the CPU, each in
    its dtype there; the model's own are set to those values, so the model scores what would be saved
    (float32 statistics of a float16 soup are rounded to float16)."""
    saved = {}
    for key, buffer in _batchnorm_named_buffers(model):
        if key in dtypes:
            saved[key] = buffer.detach().to("cpu", dtypes[key], copy=True)
            buffer.copy_(saved[key])
    return saved


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's BatchNorm buffers, to put back with :func:`restore_batchnorm`."""
    return {key: buffer.detach().clone() for key, buffer in _batchnorm_named_buffers(model)}


def restore_batchnorm(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put back BatchNorm buffers saved by :func:`batchnorm_state`."""
    for key, buffer in _batchnorm_named_buffers(model):
        buffer.copy_(state[key])


def _batchnorm_named_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                yield (f"{name}.{buffer_name}" if name else buffer_name), buffer


class _KeywordInputs(nn.Module):
    """Lets ``update_bn``, which calls ``model(batch)``, run models that take keyword tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # update_bn restores the mode it finds on the module it is given

    def forward(self, inputs: Inputs) -> Any:
        return self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
