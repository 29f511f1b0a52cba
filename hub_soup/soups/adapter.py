"""Soups of PEFT LoRA adapters of one base: written as an adapter (:class:`Adapter`: exact, or reduced to
``max_rank``), or merged into their base (:class:`MergedIntoBase`: a full model).

The two kinds share all but what they write, so they share this file: the adapters' configs were
read (and checked to make one soup) when the kind was chosen; their base is the one the configs
name (or the recipe's ``adapter_base``, checked to be it), resolved here and recorded in the pinned
recipe as ``adapter_base``; before any download their headers are checked against each other and
the base's; every candidate is scored as the base with its delta merged in
(:class:`~hub_soup.adapters.soup.AdapterSoup`). They differ in whether an unscored soup opens a Hub
base, which side files they carry, what they write and what the card says: a few lines each.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hub_soup.adapters.config import ADAPTER_CONFIG, AdapterConfig, base_error, check_base, with_adapter_weights
from hub_soup.adapters.lora import check_base_fits, plan_adapters
from hub_soup.adapters.soup import ADAPTER_STEM, AdapterSoup
from hub_soup.errors import AdapterError, HubSoupError
from hub_soup.eval.backends import Backend
from hub_soup.eval.greedy import GreedyReport
from hub_soup.hub.resolve import ResolvedRef, resolve_ref
from hub_soup.ingredients import Models, check_apart, early_layouts, layout_of, layouts_of
from hub_soup.io.read import Checkpoint
from hub_soup.merging.engine import MergeStats, Sink, output_metas, state_dict_weights, write_weights
from hub_soup.merging.plan import MergePlan, align
from hub_soup.merging.side_files import SideFiles, choose_side_files
from hub_soup.merging.similarity import Similarity
from hub_soup.recipe import ModelRef, Recipe
from hub_soup.report import AdapterCard
from hub_soup.soups.kind import Output, Scorers, Soup, SoupKind, side_file_contents, soup_config

logger = logging.getLogger(__name__)

BASE_ROLE = "the model the adapters were trained on"


@dataclass
class LoraSoup(Soup):
    """An adapter soup's models, opened and checked: ``plan`` and ``metas`` are the base's (empty when the
    base is not opened), ``adapters`` their candidates and outputs."""

    adapters: AdapterSoup


class _Adapters(SoupKind[LoraSoup]):
    """LoRA adapters of one base, their configs read.

    Raises:
        AdapterError: a method other than an average, ``exclude``, or a rule of the kind broken.
        HubSoupError: the base cannot be resolved, or the recipe's ``adapter_base`` is not it.
    """

    def __init__(
        self, recipe: Recipe, ingredients: list[ResolvedRef], configs: list[AdapterConfig], token: str | bool | None
    ) -> None:
        self.refuse(recipe)
        refs = [with_adapter_weights(ref) for ref in ingredients]  # only the adapters' weights are fetched
        base, self.found = _base(recipe, configs, token)
        super().__init__(recipe, Models(refs, base))
        self.configs = configs

    def refuse(self, recipe: Recipe) -> None:
        """Refuse what a soup of adapters cannot do."""
        if recipe.method not in ("uniform", "weighted"):
            raise AdapterError(
                f"method {recipe.method}: an adapter soup is the uniform or weighted mean of the adapters' deltas",
                hint="drop --method (or use --weights for a weighted soup)",
            )
        applied = [model.ref for model in recipe.ingredients if model.lora is not None]
        if applied:
            raise AdapterError(
                f"{applied[0]}: a LoRA adapter applied to an adapter; an adapter soup combines adapters as they are",
                hint="drop its lora, or make the soup of full models (each with its adapter applied)",
            )
        if recipe.exclude:
            raise AdapterError(
                f"exclude ({', '.join(recipe.exclude)}): an adapter soup combines every tensor of its adapters",
                hint="drop --exclude; to leave an adapter's module out, train it without that target module",
            )

    def pinned(self) -> Recipe:
        """The recipe with the base the adapters' configs named, when the recipe named none, as ``adapter_base``."""
        return self.recipe if self.found is None else self.recipe.model_copy(update={"adapter_base": self.found})

    def check_before_download(self, local: Models[Checkpoint | None], token: str | bool | None) -> None:
        """The adapters' modules and shapes, and that they fit the base, from safetensors headers (Hub refs over
        HTTP); pickled weights, or offline Hub refs, are checked once they are opened."""
        layouts = early_layouts(self.models, local, token)
        if layouts is None or layouts.base is None:
            return
        plan = plan_adapters(self.configs, layouts.ingredients)
        check_base_fits(plan, layouts.base, layouts.ingredients[0].label)
        logger.info("the adapters' configs and headers agree, and fit the base %s", layouts.base.label)

    def prepare(self, opened: Models[Checkpoint], backend: Backend, device: torch.device) -> LoraSoup:
        """The adapters' modules, ranks and scalings, checked against each other and the base (when it is opened)."""
        checkpoints, base = opened.ingredients, opened.base
        plan = plan_adapters(self.configs, layouts_of(checkpoints))
        base_plan = None
        if base is not None:
            check_base_fits(plan, layout_of(base), checkpoints[0].label)
            base_plan = align([layout_of(base)])
        dtype = getattr(torch, self.recipe.dtype) if self.recipe.dtype else None
        placed = backend.device_for(device)
        assert self.models.base is not None
        adapters = AdapterSoup(
            configs=self.configs, adapters=checkpoints, plan=plan, base=base, base_plan=base_plan,
            base_revision=self.models.base.sha, max_rank=self.recipe.output.max_rank, dtype=dtype, device=placed,
        )
        return LoraSoup(
            checkpoints=checkpoints, base=base, plan=base_plan or MergePlan([]), method=self.recipe.merge_method(),
            dtype=dtype, metas=output_metas(base_plan, dtype) if base_plan is not None else {}, device=placed,
            side_files=self.chosen_side_files(checkpoints, base), reference=base or checkpoints[0], backend=backend,
            adapters=adapters,
        )

    @abstractmethod
    def chosen_side_files(self, adapters: list[Checkpoint], base: Checkpoint | None) -> SideFiles:
        """The side files the soup carries (config, tokenizer)."""

    def scorers(self, soup: LoraSoup) -> Scorers:
        """Each adapter, and each candidate soup, scored as the base with its delta merged in; the base beside."""
        load, soup_of, base = soup.adapters.scorers(soup.method)
        return Scorers(load, soup_of, base)

    @property
    def task_type(self) -> str | None:
        """The adapters' PEFT task_type (they agree on it): the card's pipeline tag."""
        return self.configs[0].raw.get("task_type")


class Adapter(_Adapters):
    """Written as an adapter: exact (their ranks concatenated), or each delta reduced to ``max_rank`` by a
    truncated SVD. Unscored, it never downloads the base's weights (a Hub base's headers are read)."""

    def refuse(self, recipe: Recipe) -> None:
        super().refuse(recipe)
        if recipe.recalibrate_bn:
            raise AdapterError(
                "recalibrate_bn: recomputed BatchNorm statistics cannot be written into an adapter",
                hint="add --merge-into-base to write the full model, or drop --recalibrate-bn",
            )

    def opens(self) -> Models[ResolvedRef]:
        """The base only when it is scored, or local (its headers read, to check that the adapters fit)."""
        base = self.models.base
        needed = self.recipe.eval is not None or (base is not None and base.kind == "local")
        return self.models if needed else Models(self.models.ingredients)

    def chosen_side_files(self, adapters: list[Checkpoint], base: Checkpoint | None) -> SideFiles:
        """The adapters' tokenizer: an adapter carries no model config (PEFT reads the base's)."""
        return choose_side_files(adapters, config=False)

    def output(
        self, soup: LoraSoup, members: Sequence[int], weights: Sequence[float], report: GreedyReport | None
    ) -> Output:
        """The soup of ``members`` as PEFT's adapter files (computed again: an adapter's candidate is scored
        merged into the base), with its ``adapter_config.json``."""
        adapter = soup.adapters.output(members, weights)
        plan = adapter.plan(len(members))

        def write(writer: Sink) -> tuple[MergeStats, Similarity | None]:
            return write_weights(state_dict_weights(adapter.tensors), plan, adapter.metas, writer), None

        if adapter.reduction is None:
            summary = (
                f"An exact soup of {len(members)} LoRA adapters in concatenated-rank form ({adapter.ranks}, the sum "
                "of their ranks): A is the adapters' lora_A stacked, B their lora_B side by side, each scaled by its "
                "weight and PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA), and the soup's own scaling is "
                "1, so loaded with PEFT it adds exactly the weighted mean of the adapters' deltas to the base."
            )
        else:
            summary = (
                f"A soup of {len(members)} LoRA adapters: the weighted mean of their deltas (PEFT's scaling "
                f"lora_alpha / r, or / sqrt(r) with rsLoRA, folded in), reduced per module to {adapter.ranks} by a "
                f"truncated SVD (B = U diag(S), A = V^T). {adapter.reduction.describe()}."
            )
        config = json.dumps(adapter.config, indent=2, sort_keys=True) + "\n"
        return Output(
            metas=adapter.metas, plan=plan, write=write,
            files={ADAPTER_CONFIG: config, **side_file_contents(soup.side_files, None)}, config=None,
            combined="combined from the adapters' deltas", base_role=BASE_ROLE,
            card=AdapterCard(merged=False, summary=summary, task_type=self.task_type),
            stem=ADAPTER_STEM, sharded=False,
        )


class MergedIntoBase(_Adapters):
    """Merged into the base (``merge_into_base``): the base's tensors streamed through the engine, the soup's
    delta added; a full model with the base's config and tokenizer."""

    def chosen_side_files(self, adapters: list[Checkpoint], base: Checkpoint | None) -> SideFiles:
        """The base's config and tokenizer (the adapters' where the base has none)."""
        assert base is not None  # always opened: it is what is written
        return choose_side_files([base, *adapters])

    def output(
        self, soup: LoraSoup, members: Sequence[int], weights: Sequence[float], report: GreedyReport | None
    ) -> Output:
        """The base with the soup of ``members`` merged in: the scored soup, or the streamed one."""

        def write(writer: Sink) -> tuple[MergeStats, Similarity | None]:
            if report is not None:
                return write_weights(report.soup, soup.plan, soup.metas, writer), None
            return soup.adapters.stream(members, weights, writer), None

        config = soup_config(soup.reference, self.recipe.dtype)
        summary = (
            f"The base model with the weighted mean of {len(members)} LoRA adapters' weight deltas merged in "
            "(base + sum_i w_i * s_i * B_i @ A_i, PEFT's scaling s_i = lora_alpha / r, or / sqrt(r) with rsLoRA): "
            "the base's tensors streamed, each adapted weight's delta added in float32, each tensor stored in its "
            "own dtype, heads saved with the adapters (modules_to_save) averaged."
        )
        return Output(
            metas=soup.metas, plan=soup.plan, write=write, files=side_file_contents(soup.side_files, config), config=config,
            combined="with the adapters' deltas merged in", base_role=BASE_ROLE,
            card=AdapterCard(merged=True, summary=summary, task_type=self.task_type),
        )


def _base(recipe: Recipe, configs: list[AdapterConfig], token: str | bool | None) -> tuple[ResolvedRef, ModelRef | None]:
    """The adapters' base, resolved, and what the pinned recipe records of it when the recipe named none: the
    recipe's ``adapter_base`` (checked to be the repo the configs name, or a local folder), else theirs."""
    given = recipe.adapter_base
    if given is not None:
        base = resolve_ref(given.ref, given.revision, token=token, base=recipe.base_dir)
        check_base(configs, base)
        return base, None
    named = configs[0]
    try:
        base = resolve_ref(named.base, named.revision, token=token)
    except HubSoupError as exc:
        raise base_error(configs, exc) from None
    logger.info("resolved the adapters' base %s -> %s", named.base, base.pinned)
    if base.path is not None and recipe.output.path is not None:  # an input the recipe did not name
        check_apart(Path(recipe.output.path), [(f"the base {base.path}", base.path)])
    found = str(base.path) if base.kind == "local" else named.base  # a local base as found from here
    return base, ModelRef(ref=found, revision=named.revision)
