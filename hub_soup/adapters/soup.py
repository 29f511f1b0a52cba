"""An adapter soup's candidates, for scoring, and its two outputs.

:class:`AdapterSoup` is what the adapter soup kinds (:mod:`hub_soup.soups.adapter`) need of LoRA ingredients
once they are opened:
candidate soups streamed as the base with their delta merged in (what evaluation and
greedy score), the exact adapter (or its ``--max-rank`` reduction) to write, or the base
with the delta merged in, streamed by the engine like any soup (``--merge-into-base``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hub_soup.adapters.config import AdapterConfig
from hub_soup.adapters.lora import (
    AdapterPlan,
    AddDeltas,
    Factors,
    Reduction,
    adapter_tensors,
    full_average,
    reduce_rank,
    soup_config,
    soup_factors,
)
from hub_soup.eval.greedy import Base, Loader, SoupMaker
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import MergeStats, Sink, Weights, ingredient_weights, soup_weights, stream_merge
from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.plan import MergePlan, TensorPlan

logger = logging.getLogger(__name__)

ADAPTER_STEM = "adapter_model"  # PEFT's name of an adapter's weights: adapter_model.safetensors


@dataclass(frozen=True)
class AdapterOutput:
    """The soup as a PEFT adapter: its tensors, its ``adapter_config.json``, and what ``--max-rank`` cost."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, object]
    reduction: Reduction | None
    ranks: str  # the soup's ranks in words (``rank 12``, ``ranks 10-12``)

    @property
    def metas(self) -> dict[str, TensorMeta]:
        return {key: TensorMeta(t.dtype, tuple(t.shape)) for key, t in self.tensors.items()}

    def plan(self, count: int) -> MergePlan:
        """The written tensors as a plan (each made of all ``count`` kept adapters), for the closing summary."""
        return MergePlan([TensorPlan.aligned(key, meta, (key,) * count, True) for key, meta in self.metas.items()])


@dataclass
class AdapterSoup:
    """LoRA adapters of one base, checked to fit together (and the base, when it is opened).

    Attributes:
        configs, adapters: each adapter's config and opened weights, in recipe order.
        plan: their modules, ranks and scalings.
        base, base_plan: the base model and its tensors (None when the soup is written as an adapter
            and nothing is scored: its weights are then never downloaded).
        base_revision: the commit the base was pinned to (None for a local base), for the soup's config.
        max_rank: reduce each delta to this rank (``--max-rank``).
    """

    configs: list[AdapterConfig]
    adapters: list[Checkpoint]
    plan: AdapterPlan
    base: Checkpoint | None
    base_plan: MergePlan | None
    base_revision: str | None
    max_rank: int | None
    dtype: torch.dtype | None
    device: torch.device

    def candidate(self, members: Sequence[int], weights: Sequence[float]) -> tuple[Factors, Reduction | None]:
        """The factors of the soup of ``members``: exact, or reduced to ``max_rank`` when the soup is an adapter."""
        factors = soup_factors(self.adapters, self.plan, members, weights)
        if self.max_rank is None:
            return factors, None
        return reduce_rank(factors, self.max_rank)

    def _deltas(self, members: Sequence[int], weights: Sequence[float]) -> AddDeltas:
        factors, _ = self.candidate(members, weights)
        return AddDeltas(self.plan, factors, full_average(self.adapters, self.plan, members, weights), self.device)

    def merged(self, members: Sequence[int], weights: Sequence[float]) -> Weights:
        """The base with the soup of ``members`` merged in, streamed by the engine (into the model scored)."""
        assert self.base is not None and self.base_plan is not None
        return soup_weights(
            [self.base], self.base_plan, self._deltas(members, weights), self.dtype, device=self.device
        )

    def stream(self, members: Sequence[int], weights: Sequence[float], sink: Sink) -> MergeStats:
        """``--merge-into-base``: the base's tensors streamed through the engine, the soup's deltas added."""
        assert self.base is not None and self.base_plan is not None
        return stream_merge(
            [self.base], self.base_plan, self._deltas(members, weights), sink, self.dtype, device=self.device
        )

    def output(self, members: Sequence[int], weights: Sequence[float]) -> AdapterOutput:
        """The soup of ``members`` as an adapter: concatenated-rank (exact) or reduced, with its config."""
        factors, reduction = self.candidate(members, weights)
        if reduction is not None:
            logger.info(reduction.describe())
        full = full_average(self.adapters, self.plan, members, weights)
        ranks = sorted({a.shape[0] for _, a in factors.values()})
        return AdapterOutput(
            tensors=adapter_tensors(self.plan, factors, full, self.dtype),
            config=soup_config(self.configs[0], factors, self.base_revision),
            reduction=reduction,
            ranks=f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}",
        )

    def scorers(self, method: MergeMethod) -> tuple[Loader, SoupMaker, Base]:
        """What evaluation scores: each adapter alone (the base plus its delta), the soup of any subset
        (weighted as the recipe says when all are in it, equally otherwise: greedy's candidates), and the base."""
        count = len(self.adapters)
        base, base_plan = self.base, self.base_plan
        assert base is not None and base_plan is not None

        def soup_of(members: Sequence[int]) -> Weights:
            weights = method.weights_for(count) if len(members) == count else [1 / len(members)] * len(members)
            return self.merged(members, weights)

        return (
            lambda i: self.merged([i], [1.0]),
            soup_of,
            Base(base.label, lambda: ingredient_weights(base, base_plan, 0)),
        )
