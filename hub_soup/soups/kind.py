"""What every kind of soup says of itself: the one interface the pipeline drives.

A kind (full models, LoRA adapters written as an adapter, LoRA adapters merged into
their base) is chosen once, after resolving, from what the ingredients are
(:func:`hub_soup.soups.choose_kind`). From then on the pipeline asks the kind, never
"is this an adapter?": what to open (:meth:`SoupKind.opens`), what to check from
headers before anything is downloaded, how the opened models become a :class:`Soup`
(aligned, checked, side files chosen), how candidates are scored (:class:`Scorers`),
and what is written of the kept ingredients (:class:`Output`: tensors, files, the
card's section and the closing line's words).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from hub_soup.eval.backends import Backend
from hub_soup.eval.greedy import Base, GreedyReport, Loader, SoupMaker
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.ingredients import Models
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import MergeStats, Sink
from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.plan import MergePlan
from hub_soup.merging.side_files import SideFiles
from hub_soup.merging.similarity import Similarity
from hub_soup.merging.vocab import Vocabulary
from hub_soup.recipe import Recipe
from hub_soup.report import AdapterCard


@dataclass
class Soup:
    """A soup's models, opened, aligned and checked: what scoring and writing share, whatever the kind.

    Attributes:
        checkpoints: the ingredients, in recipe order.
        base: the opened base (None without one, or when a kind does not open it).
        plan: the tensors of the model that is scored (for full soups, the one that is written too).
        metas: those tensors as written (and scored): the recipe's dtype applied.
        reference: the model whose config the soup carries: scored models are built from it.
        backend: where models are scored: this process alone, or its share of a launch.
        ingredients_plan: the ingredients' own tensors, where ``plan`` stacks layers of theirs (slices) into
            a soup of another shape: ingredients (and a base) are scored as they are saved, in their own
            architecture. ``None``: ``plan`` is theirs too.
        own_plans: each model's own tensors (an ingredient's index, or ``BASE``), where the soup's vocabulary
            is not theirs: each is scored as it is saved, in a model of its own (its config, its tokenizer).
    """

    checkpoints: list[Checkpoint]
    base: Checkpoint | None
    plan: MergePlan
    method: MergeMethod
    dtype: torch.dtype | None  # the recipe's output dtype of floating tensors (None: each tensor's own)
    metas: dict[str, TensorMeta]
    device: torch.device
    side_files: SideFiles
    reference: Checkpoint
    backend: Backend
    ingredients_plan: MergePlan | None = field(default=None, kw_only=True)
    chat_template: str | None = field(default=None, kw_only=True)  # the recipe's, chosen (None: the files' own)
    vocabulary: Vocabulary | None = field(default=None, kw_only=True)  # the soup's, where the ingredients' differ (rows aligned by token)
    own_plans: Mapping[int, MergePlan] | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Scorers:
    """What evaluation scores: each ingredient alone, the soup of any subset (greedy's candidates, in the
    dtypes written), the base beside them (None without one), whether an ingredient alone is its own
    soup (then greedy's first step is judged already), the side files of the soup's model where it is not the
    ingredients' (layers stacked by slices, a vocabulary chosen: the soup is scored as it is written, its config
    and tokenizer; None: theirs), and whether each ingredient (and the base) is scored in a model of its own,
    from its own config and tokenizer (their vocabularies differ), rather than in the soup's reference's."""

    load: Loader
    soup_of: SoupMaker
    base: Base | None = None
    alone_is_soup: bool = False
    soup_files: dict[str, str | Path] | None = None
    own_models: bool = False


@dataclass(frozen=True)
class Output:
    """What a kind writes of the soup of the kept ingredients, and what it says of it.

    Attributes:
        metas: the written tensors, in order.
        plan: the written tensors as a plan (what each is made of), for the closing summary.
        write: streams the tensors into the writer; returns what was written, and the ingredients'
            weight similarity when it was measured along the way.
        files: the side files (config, tokenizer) and the kind's own (``adapter_config.json``), by name.
        config: the ``config.json`` the soup carries, if any: the card tells its library from it.
        combined: what was done to the soup's floating tensors, in the closing line's words.
        base_role: what the base is to this soup, in the card's and the step summary's words.
        card: the card's section of a kind that is not a merge of full models (None: the method's own words).
        vocabulary: the soup's vocabulary, where the ingredients' differ (the card says where its rows came from).
        stem: the weights files' name (``model.safetensors``, PEFT's ``adapter_model.safetensors``).
        sharded: split into shards of ``max_shard_size`` (PEFT reads one adapter file: never sharded).
    """

    metas: dict[str, TensorMeta]
    plan: MergePlan
    write: Callable[[Sink], tuple[MergeStats, Similarity | None]]
    files: dict[str, str | Path]
    config: dict[str, Any] | None
    combined: str
    base_role: str = "the ingredients' common start"
    card: AdapterCard | None = None
    stem: str = "model"
    sharded: bool = True
    vocabulary: Vocabulary | None = None


S = TypeVar("S", bound=Soup)


class SoupKind(ABC, Generic[S]):
    """One kind of soup, chosen once for a run; its early checks ran when it was made.

    Attributes:
        recipe: the run's recipe (never rewritten: what a kind adds to it is in :meth:`pinned`).
        models: the resolved models it makes a soup of: its ingredients as opened, and its base.
    """

    def __init__(self, recipe: Recipe, models: Models[ResolvedRef]) -> None:
        self.recipe = recipe
        self.models = models

    def opens(self) -> Models[ResolvedRef]:
        """The models to open (and download): all of them, unless a kind needs less."""
        return self.models

    @abstractmethod
    def check_before_download(self, local: Models[Checkpoint | None], token: str | bool | None) -> None:
        """Check what headers and configs tell before any weights are downloaded: ``local`` holds the models
        opened so far (the local ones, headers only), None in place of each Hub one."""

    def early_metas(self, local: Models[Checkpoint | None], token: str | bool | None) -> dict[str, TensorMeta] | None:
        """The tensors the soup will have, as written, from headers before any weights are downloaded (``local``
        as in :meth:`check_before_download`); None when a kind (or a format) cannot tell before."""
        return None

    @abstractmethod
    def prepare(self, opened: Models[Checkpoint], backend: Backend, device: torch.device) -> S:
        """The opened models aligned, checked against each other, and their side files chosen."""

    @abstractmethod
    def scorers(self, soup: S) -> Scorers:
        """What evaluation scores, streamed from the soup's files."""

    @abstractmethod
    def output(
        self, soup: S, members: Sequence[int], weights: Sequence[float], report: GreedyReport | None
    ) -> Output:
        """What is written of the soup of ``members`` (weighted by ``weights``): the scored soup as it was
        scored when ``report`` holds it."""

    def pinned(self) -> Recipe:
        """The recipe the soup carries, before pinning: the run's, plus what the kind found out."""
        return self.recipe


def soup_config(reference: Checkpoint, dtype: str | None) -> dict[str, Any] | None:
    """The config.json a soup carries (the reference's), its dtype field updated when ``--dtype`` changes it."""
    config = reference.config
    if config is not None and dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
    return config


def side_file_contents(chosen: SideFiles, config: dict[str, Any] | None) -> dict[str, str | Path]:
    """The side files a soup carries, by name: ``config.json`` as the soup's ``config`` says."""
    return {
        name: json.dumps(config, indent=2) + "\n" if name == "config.json" and config is not None else path
        for name, path in chosen.paths.items()
    }
