"""A soup of full models: every tensor of each ingredient, merged by the recipe's method (with its base
if it uses one).

Early, from safetensors headers and configs over HTTP, the ingredients (and the base, in its
role) are aligned and their configs compared, so a mismatch costs seconds, not a download.
Scored candidates are the engine's soups of any subset of the ingredients; the soup written is
the scored one as it was scored, or, unscored, the streamed merge with the shared-initialization
check riding along its reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants

from hub_soup.errors import RecipeError
from hub_soup.eval.backends import Backend
from hub_soup.eval.greedy import Base, GreedyReport
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.ingredients import Models, early_layouts, layout_of, layouts_of, remote_config, remote_side_files
from hub_soup.io import files as files_module
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import (
    MergeStats,
    Sink,
    Weights,
    base_weights,
    ingredient_weights,
    output_metas,
    soup_weights,
    stream_merge,
    write_weights,
)
from hub_soup.merging.plan import BASE, Layout, MergePlan, align
from hub_soup.merging.side_files import check_configs, check_vocab_sizes, choose_side_files
from hub_soup.merging.similarity import GramAccumulator, Similarity, weight_similarity
from hub_soup.merging.templates import choose_template, with_template
from hub_soup.merging.vocab import (
    TOKENIZER_FILES,
    TokenizerFiles,
    Vocabulary,
    read_tokenizer,
    soup_token_ids,
    soup_tokenizer_files,
    special_token_ids,
)
from hub_soup.merging.vocab_rows import (
    ModelFiles,
    fill_rows,
    own_rows,
    resized,
    token_keys,
    vocabulary_from,
    vocabulary_of,
    with_vocabulary,
)
from hub_soup.recipe import Recipe
from hub_soup.soups.kind import Output, Scorers, Soup, SoupKind, side_file_contents, soup_config
from hub_soup.soups.settings import resolve_settings, stacked_config

logger = logging.getLogger(__name__)

# Elements of each tensor the shared-initialization check reads during a merge.
SIMILARITY_SAMPLE = 1 << 16


class Full(SoupKind[Soup]):
    """Full models, merged by the recipe's method.

    Raises:
        RecipeError: the recipe sets what only a soup of LoRA adapters uses.
    """

    def __init__(self, recipe: Recipe, models: Models[ResolvedRef]) -> None:
        adapter_only = {"max_rank": recipe.output.max_rank, "merge_into_base": recipe.output.merge_into_base,
                        "adapter_base": recipe.adapter_base}
        given = [name for name, value in adapter_only.items() if value]
        if given:
            raise RecipeError(
                f"{given[0]} is for soups of LoRA adapters; the ingredients are full models",
                hint=f"drop --{given[0].replace('_', '-')}",
            )
        super().__init__(recipe, models)
        self._early_vocabulary: Vocabulary | None = None  # chosen before the download, reused after it

    def check_before_download(self, local: Models[Checkpoint | None], token: str | bool | None) -> None:
        """Align from safetensors headers, and compare configs, over HTTP; the base is aligned in its role, its
        config not compared (a base may carry another head). With a vocabulary to choose, choose it from the
        tokenizer files, fetched alone, and align the rest: a bad choice costs seconds. Local (and cached)
        files alone are checked right after opening, which reads headers only."""
        if all(ref.kind == "local" for ref in self.models) or constants.is_offline_mode():
            return
        by_token = self.recipe.tokenizer is not None
        layouts = early_layouts(self.models, local, token)
        vocabulary = self._early_vocabulary = self.early_vocabulary(local, token) if by_token else None
        if layouts is not None and (vocabulary is not None or not by_token):  # shapes first (pickles: after download)
            resized_layouts = in_vocabulary(layouts, vocabulary)
            align(resized_layouts.ingredients, self.recipe.exclude, base=resized_layouts.base)  # hint names the option
        configs = [
            (ref.label, checkpoint.config if checkpoint is not None else remote_config(ref, token))
            for ref, checkpoint in zip(self.models.ingredients, local.ingredients)
        ]
        if not by_token:
            check_vocab_sizes(configs)
        check_configs(configs, by_token=by_token)
        logger.info("headers and configs agree across %d ingredients%s; downloading", len(self.models.ingredients),
                    " and the base" if self.models.base is not None else "")

    def early_vocabulary(self, local: Models[Checkpoint | None], token: str | bool | None) -> Vocabulary | None:
        """The soup's vocabulary before any weights are downloaded: from each model's config and tokenizer files
        (a Hub model's fetched alone); None where a local model is not opened yet."""
        assert self.recipe.tokenizer is not None
        pairs = {**dict(enumerate(zip(self.models.ingredients, local.ingredients))),
                 **({BASE: (self.models.base, local.base)} if self.models.base is not None else {})}
        if any(ref.kind == "local" and checkpoint is None for ref, checkpoint in pairs.values()):
            return None
        models = {
            index: ModelFiles(checkpoint.label, checkpoint.config, checkpoint.sidecars) if checkpoint is not None
            else ModelFiles(ref.label, remote_config(ref, token), remote_side_files(ref, TOKENIZER_FILES, token))
            for index, (ref, checkpoint) in pairs.items()
        }
        return vocabulary_from(models, self.recipe.tokenizer.choice(), [i.ref for i in self.recipe.ingredients])

    def early_metas(self, local: Models[Checkpoint | None], token: str | bool | None) -> dict[str, TensorMeta] | None:
        """The soup's tensors as written, from the models' headers (over HTTP for Hub ones): aligned as
        :meth:`prepare` aligns the opened models, the recipe's slices and dtype applied."""
        layouts = early_layouts(self.models, local, token)
        if layouts is None:
            return None
        plan = resolve_settings(self.recipe, align(layouts.ingredients, self.recipe.exclude, base=layouts.base))
        return output_metas(plan, getattr(torch, self.recipe.dtype) if self.recipe.dtype else None)

    def prepare(self, opened: Models[Checkpoint], backend: Backend, device: torch.device) -> Soup:
        """Align the ingredients (the base in its role), check their configs, and choose the side files."""
        checkpoints, base = opened.ingredients, opened.base
        configs = [(c.label, c.config) for c in checkpoints]
        layouts, base_layout = layouts_of(checkpoints), layout_of(base) if base is not None else None
        vocabulary = None
        if self.recipe.tokenizer is not None:
            names = [i.ref for i in self.recipe.ingredients]
            # the files it was chosen from before the download are these models' at their pinned commits
            vocabulary = self._early_vocabulary or vocabulary_of(checkpoints, base, self.recipe.tokenizer.choice(), names)
            resized_layouts = in_vocabulary(Models(layouts, base_layout), vocabulary)
            layouts, base_layout = resized_layouts.ingredients, resized_layouts.base
        else:
            check_vocab_sizes(configs)
        plan = align(layouts, self.recipe.exclude, base=base_layout)
        for note in plan.notes:
            logger.info(note)
        check_configs(configs, by_token=vocabulary is not None)
        aligned, plan = plan, resolve_settings(self.recipe, plan)
        own_plans = None
        if vocabulary is not None:
            keys = token_keys(checkpoints[0].metas, vocabulary.sizes[0])
            plan = fill_rows(with_vocabulary(plan, vocabulary, keys), checkpoints, base)
            own_plans = {i: own_rows(aligned, keys, size) for i, size in vocabulary.sizes.items()}
            logger.info("vocabulary (%s): %d tokens, %d rows", vocabulary.source, vocabulary.count, vocabulary.size)
        chosen = choose_side_files(checkpoints)
        template = None
        if self.recipe.chat_template is not None:
            files = {i.ref: c.sidecars for i, c in zip(self.recipe.ingredients, checkpoints)}
            template = choose_template(self.recipe.chat_template, files | ({"base": base.sidecars} if base else {}))
        dtype = getattr(torch, self.recipe.dtype) if self.recipe.dtype else None
        return Soup(
            checkpoints=checkpoints, base=base, plan=plan, method=self.recipe.merge_method(), dtype=dtype,
            metas=output_metas(plan, dtype), device=backend.device_for(device), side_files=chosen,
            reference=checkpoints[chosen.config_source or 0], backend=backend,
            ingredients_plan=aligned if self.recipe.slices else None, vocabulary=vocabulary, chat_template=template,
            own_plans=own_plans,
        )

    def scorers(self, soup: Soup) -> Scorers:
        """Each ingredient as saved, the recipe's soup of any subset of them (greedy's), and the base of a method
        that has one, each streamed from the files. With a chosen vocabulary, every candidate is in the soup's
        vocabulary, each kept ingredient's rows as the whole soup gives them (a token only a left-out ingredient
        has keeps the fill it gives), and is scored as the soup is written (its config, its tokenizer), each
        ingredient (and the base) in a model of its own."""
        checkpoints, plan = soup.checkpoints, soup.plan
        shared = soup.ingredients_plan or plan  # each ingredient (and the base) as saved, stacked layers or not

        def own(index: int) -> MergePlan:
            return soup.own_plans[index] if soup.own_plans is not None else shared

        def soup_of(members: Sequence[int]) -> Weights:
            """The recipe's soup of the ingredients at ``members`` (in recipe order), as if only they were listed."""
            chosen = [checkpoints[i] for i in members]  # greedy's subsets: its methods take no weights
            return soup_weights(chosen, plan.select(members), soup.method, soup.dtype, base=soup.base,
                                device=soup.device)

        def load(index: int) -> Weights:
            return ingredient_weights(checkpoints[index], own(index), index)

        base = None
        if soup.base is not None:
            base_checkpoint = soup.base
            base = Base(base_checkpoint.label, lambda: base_weights(base_checkpoint, checkpoints[0], own(BASE)))
        # an average of one ingredient in its own dtypes (and model) is that ingredient: greedy's first step is
        # judged already
        own_models = soup.own_plans is not None
        alone_is_soup = self.recipe.greedy and soup.method.averages and not own_models and all(
            soup_of([i]).metas == load(i).metas for i in range(len(checkpoints))
        )
        stacked = soup.reference.config  # a fresh copy
        stacked_config(stacked, self.recipe)
        files = self.side_files(soup)[1] if own_models or stacked != soup.reference.config else None
        return Scorers(load, soup_of, base, alone_is_soup, soup_files=files, own_models=own_models)

    def output(
        self, soup: Soup, members: Sequence[int], weights: Sequence[float], report: GreedyReport | None
    ) -> Output:
        """The soup's tensors (written by :func:`write_tensors`) and its side files, config.json in its dtype."""
        config, files = self.side_files(soup)
        return Output(
            metas=soup.metas, plan=soup.plan, write=lambda writer: write_tensors(writer, soup, report),
            files=files, config=config, vocabulary=soup.vocabulary,
            combined="averaged" if soup.method.summary is None else f"merged by {soup.method.name}",
        )

    def side_files(self, soup: Soup) -> tuple[dict[str, Any] | None, dict[str, str | Path]]:
        """The soup's config.json and its side files as written (a path, or a file's text), by name: config.json
        in its dtype (its layer count where slices stack layers), its vocabulary's tokenizer, its chat template."""
        config = soup_config(soup.reference, self.recipe.dtype)
        stacked_config(config, self.recipe)
        files = side_file_contents(soup.side_files, config)
        if soup.vocabulary is not None:
            config, files = vocabulary_files(soup, config, files)
        if soup.chat_template is not None:
            files = with_template(files, soup.chat_template)
        return config, files


def vocabulary_files(
    soup: Soup, config: dict[str, Any] | None, files: dict[str, str | Path]
) -> tuple[dict[str, Any] | None, dict[str, str | Path]]:
    """The soup's config.json and tokenizer files in its chosen vocabulary: the tokenizer of the model it is
    built on, with the tokens it adds; ``vocab_size`` and special token ids those of the soup's rows."""
    vocabulary = soup.vocabulary
    assert vocabulary is not None
    origin = soup.base if vocabulary.origin == BASE else soup.checkpoints[vocabulary.origin]
    assert origin is not None
    files = {name: f for name, f in files.items() if files_module.sidecar_group(name) != "tokenizer"}
    generation = json.loads(Path(files["generation_config.json"]).read_text()) if "generation_config.json" in files else None
    wanted = special_token_ids(config or {}) | special_token_ids(generation or {})
    # the reference's tokens of those ids: read alone, before, as two vocabularies of 150K tokens are not held at
    # once (from the origin's tokenizer, read for the soup's, where the reference is the origin)
    named = None if soup.reference is origin else _names(
        read_tokenizer(soup.reference.sidecars, soup.reference.label), wanted)
    tokenizer = soup_tokenizer_files(origin.sidecars, vocabulary, origin.label)
    by_id = named if named is not None else _names(tokenizer.origin, wanted)
    files.update(tokenizer.files)
    if config is not None:
        config = {**soup_token_ids(config, by_id, tokenizer.tokens), "vocab_size": vocabulary.size}
        files["config.json"] = json.dumps(config, indent=2) + "\n"
    if generation is not None:
        files["generation_config.json"] = json.dumps(soup_token_ids(generation, by_id, tokenizer.tokens), indent=2) + "\n"
    return config, files


def _names(tokenizer: TokenizerFiles, ids: set[int]) -> dict[int, str]:
    """The tokens of ``ids`` in ``tokenizer``."""
    return {index: token for token, index in tokenizer.vocab.items() if index in ids}


def write_tensors(writer: Sink, soup: Soup, report: GreedyReport | None) -> tuple[MergeStats, Similarity]:
    """Write the soup's tensors: the scored soup as it was scored (read back from the model that holds it, or
    merged again; BN statistics recalibrated or not), or, unscored, the streamed merge, with the
    shared-initialization check riding along its reads (with slices, in a sampled pass of its own over the
    ingredients' own tensors: a stacked layer is one model's, and compares none)."""
    if report is not None or soup.ingredients_plan is not None:  # stacked layers: the ingredients' own tensors
        stats = (write_weights(report.soup, soup.plan, soup.metas, writer) if report is not None else stream_merge(
            soup.checkpoints, soup.plan, soup.method, writer, soup.dtype, base=soup.base, device=soup.device))
        own = soup.ingredients_plan or soup.plan  # a stacked layer is one model's: it compares none
        return stats, weight_similarity(soup.checkpoints, own, sample_per_tensor=SIMILARITY_SAMPLE)
    gram = GramAccumulator(len(soup.checkpoints), SIMILARITY_SAMPLE)
    stats = stream_merge(
        soup.checkpoints, soup.plan, soup.method, writer, soup.dtype, base=soup.base, device=soup.device, gram=gram
    )
    return stats, gram.similarity([c.label for c in soup.checkpoints])


def in_vocabulary(layouts: Models[Layout], vocabulary: Vocabulary | None) -> Models[Layout]:
    """Every model's layout with its token-indexed tensors as the soup's (:func:`~hub_soup.merging.vocab_rows.resized`): what alignment
    compares; ``layouts`` as they are without a vocabulary to choose."""
    if vocabulary is None:
        return layouts
    return Models([resized(layout, vocabulary.sizes[i], vocabulary.size) for i, layout in enumerate(layouts.ingredients)],
                  resized(layouts.base, vocabulary.sizes[BASE], vocabulary.size) if layouts.base is not None else None)
