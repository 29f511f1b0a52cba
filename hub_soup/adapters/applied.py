"""A model with a LoRA adapter applied (mergekit's ``model+lora``), read as one checkpoint.

mergekit 0.1.5 merges the adapter into the model with PEFT's ``merge_and_unload`` before it
merges anything: each target weight becomes ``W + s * B @ A`` (PEFT's scaling ``s = lora_alpha
/ r``, rsLoRA's ``/ sqrt(r)``; the delta transposed for embeddings and ``fan_in_fan_out``
layers), stored in the model's dtype, and a tensor the adapter saves whole (``modules_to_save``,
trained biases) replaces the model's. :class:`LoraApplied` reads those bytes without writing the
merged model anywhere: a read of a target weight's elements reads the model's, adds the delta of
the rows they lie in (from the factors, small and held in float64) and rounds once to the
model's dtype. Alignment, the early checks, the engine's streamed reads and scoring then see an
ordinary checkpoint with the model's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from hub_soup.adapters.config import AdapterConfig
from hub_soup.adapters.lora import AdapterPlan, base_key_of_full, check_base_fits, delta_elements, plan_adapters
from hub_soup.io.read import Checkpoint
from hub_soup.merging.plan import Layout


@dataclass(frozen=True)
class Change:
    """What the adapter does to one of the model's tensors: replaces it by a tensor it saves whole
    (``replace``, its saved key), adds ``left @ right`` (the delta, its scaling folded in, float64), or both."""

    replace: str | None
    left: torch.Tensor | None
    right: torch.Tensor | None


@dataclass
class LoraApplied(Checkpoint):
    """A model's checkpoint whose reads give the model with its LoRA adapter merged in (see the module).

    It closes nothing of its own: the model's and the adapter's checkpoints are closed by whoever
    opened them.

    Attributes:
        adapter: the adapter's opened weights (PEFT's keys).
        changes: what the adapter changes, by the model's key; every other tensor reads as the model's.
    """

    adapter: Checkpoint | None = None
    changes: dict[str, Change] = field(default_factory=dict, repr=False)

    def read_into(self, key: str, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start+count)`` of ``key`` with the adapter applied, in ``buffer`` (see
        :meth:`Checkpoint.read_into`): only the delta's rows those elements lie in are computed."""
        change = self.changes.get(key)
        if change is None:
            return super().read_into(key, start, count, buffer)
        dtype = self.metas[key].dtype
        if change.replace is not None:
            assert self.adapter is not None
            saved = self.adapter.metas[change.replace].dtype
            staging = torch.empty(count * saved.itemsize, dtype=torch.uint8)  # the adapter's dtype may be wider
            values = self.adapter.read_into(change.replace, start, count, staging)
        else:
            values = super().read_into(key, start, count, buffer)
        adapted = _adapted(change, values, start, dtype)  # a new tensor: values may lie in buffer
        out = buffer[: count * dtype.itemsize].view(dtype)
        out.copy_(adapted)
        return out

    def read(self, key: str) -> torch.Tensor:
        """One whole tensor with the adapter applied."""
        change = self.changes.get(key)
        if change is None:
            return super().read(key)
        meta = self.metas[key]
        if change.replace is not None:
            assert self.adapter is not None
            values = self.adapter.read(change.replace)
        else:
            values = super().read(key)
        return _adapted(change, values.reshape(-1), 0, meta.dtype).view(meta.shape)


def _adapted(change: Change, values: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (elements ``offset...`` of a tensor, flattened) with ``change``'s delta added in float64,
    rounded once to ``dtype``."""
    if change.left is None or change.right is None:
        return values.to(dtype)
    delta = delta_elements(change.left, change.right, offset, values.numel())
    return (values.to(torch.float64) + delta).to(dtype)


def lora_plan(adapter: Checkpoint, config: AdapterConfig, model: Layout) -> AdapterPlan:
    """The adapter's modules, rank and scaling, checked to fit ``model`` (a Hub model's layout from its headers,
    before its weights are downloaded, or an opened one's).

    Raises:
        AdapterError: the adapter's tensors are not a plain LoRA's, or name modules (or shapes) the model
            does not have, naming them.
    """
    plan = plan_adapters([config], [Layout(adapter.label, adapter.metas, tuple(adapter.aliases))])
    check_base_fits(plan, model, adapter.label, check="apply it to the model it was trained on")
    return plan


def apply_lora(model: Checkpoint, adapter: Checkpoint, config: AdapterConfig, label: str) -> LoraApplied:
    """``model`` read with ``adapter`` (its ``adapter_config.json``: ``config``) merged in, labelled ``label``.

    Raises:
        AdapterError: as :func:`lora_plan`.
    """
    plan = lora_plan(adapter, config, Layout(model.label, model.metas))
    changes: dict[str, Change] = {}
    for module in plan.modules:
        scaling = plan.scalings[0][module.name]
        b, a = adapter.read(module.b_key).double() * scaling, adapter.read(module.a_key).double()
        left, right = plan.oriented(module, b, a)
        changes[module.base_key] = Change(None, left.contiguous(), right.contiguous())
    for key in plan.full:
        target = base_key_of_full(key)
        added = changes.get(target)
        changes[target] = Change(key, added.left if added else None, added.right if added else None)
    copied = {f.name: getattr(model, f.name) for f in fields(Checkpoint)}
    return LoraApplied(**copied | {"label": label}, adapter=adapter, changes=changes)
