"""The one code path from a :class:`~hub_soup.recipe.Recipe` to a soup on disk (and on the Hub).

Stages run in order and data only flows down: resolve -> (remote headers and
configs -> align early) -> fetch -> read -> align -> side files -> [evaluate] ->
merge/write -> card -> gate -> push. Every check that can fail on the user's
input runs before the expensive stages: code the recipe names (only with
``trust_remote_code``), the output folder (never an input), the push token, the
alignment and the configs (from headers over HTTP when possible), so a mistake
costs seconds, not a download. A soup that is pushed without an output folder is
staged in a temporary one, so the same command can run again and again.

Ingredients that are PEFT LoRA adapters (:mod:`hub_soup.adapters`) take one branch
at each stage that must differ: right after resolving, their configs are read and
checked and the base they name is resolved and pinned as the recipe's base; the
early checks compare their headers with each other and the base; the soup is their
deltas' weighted mean, scored as the base with it merged in, and written as an
adapter or (``merge_into_base``) as the base streamed with it merged in. The stages
around (output, card, gate, push) are the same.

Started by ``accelerate launch`` among K processes (see
:func:`~hub_soup.eval.backends.launched_backend`), every process runs the same
stages up to the evaluation: it checks, opens the ingredients, makes every
candidate soup and scores its share of the eval data, and the gathered outputs
give every process the same scores and choices. Only the main process (rank 0)
then writes the soup and its card and pushes; the others return without writing
and, meanwhile, log nothing but errors.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import constants
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from hub_soup.adapters import config as adapter_config
from hub_soup.adapters.config import AdapterConfig
from hub_soup.adapters.lora import check_base_fits, plan_adapters
from hub_soup.adapters.soup import ADAPTER_STEM, AdapterOutput, AdapterSoup
from hub_soup.errors import (
    AdapterError,
    HubSoupError,
    IndependentIngredientsError,
    RecipeError,
    UntrustedCodeError,
    WorseSoupError,
)
from hub_soup.eval.backends import Backend, launched_backend
from hub_soup.eval.data import check_data
from hub_soup.eval.evaluate import Evaluator, eval_dtype
from hub_soup.eval.greedy import Base, GreedyReport, Loader, SoupMaker, greedy_soup, score_soup
from hub_soup.eval.score import ModelScore
from hub_soup.hub import card as card_stage
from hub_soup.hub.push import PushResult, check_push_access, push_soup
from hub_soup.hub.resolve import ResolvedRef, resolve_ref
from hub_soup.ingredients import (
    Models,
    check_apart,
    early_layouts,
    layout_of,
    layouts_of,
    opened_ingredients,
    remote_config,
)
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.io.sizes import parse_size
from hub_soup.io.write import RECIPE_FILENAME, SoupWriter, check_destination
from hub_soup.merging.engine import (
    MergeStats,
    Weights,
    base_weights,
    ingredient_weights,
    output_metas,
    soup_weights,
    state_dict_weights,
    stream_merge,
    write_weights,
)
from hub_soup.merging.methods import MergeMethod, get_method
from hub_soup.merging.plan import MergePlan, align
from hub_soup.merging.side_files import SideFiles, check_configs, choose_side_files
from hub_soup.merging.similarity import SHARED_INIT_COSINE, GramAccumulator, Similarity, weight_similarity
from hub_soup.recipe import EvalSpec, ModelRef, Recipe
from hub_soup.threads import eval_threads, torch_threads

logger = logging.getLogger(__name__)

# Elements of each tensor the shared-initialization check reads during a merge.
SIMILARITY_SAMPLE = 1 << 16

INDEPENDENT_WARNING = (
    "ingredients {pairs} look like independent trainings (weight cosine similarity {cos:.2f} < "
    f"{SHARED_INIT_COSINE}): "
    "averaging models that do not share an initialization usually collapses; see `hub-soup diagnose`"
)


@dataclass
class SoupResult:
    """Everything a run did, for the CLI summary, the step summary and Python callers."""

    output: Path | None  # None when the soup was staged for a push and removed after it
    ingredients: list[ResolvedRef]
    base: ResolvedRef | None  # the recipe's base model, for methods that need one
    kept: list[bool]
    weights: list[float]  # as the method used them (normalised by an average), one per kept ingredient
    plan: MergePlan
    stats: MergeStats
    similarity: Similarity | None
    pinned_recipe: Recipe
    scores: list[ModelScore] = field(default_factory=list)
    adapter: AdapterOutput | None = None  # a LoRA adapter soup written as an adapter (not --merge-into-base)
    of_adapters: bool = False  # the ingredients were LoRA adapters (written as an adapter, or merged into their base)
    report: GreedyReport | None = None  # ingredient scores, greedy steps, the evaluated soup
    push: PushResult | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def combined(self) -> str:
        """What the method did to the soup's floating tensors, in the closing line's and the step summary's
        words: ``averaged`` (uniform, weighted) or ``merged by task_arithmetic``, as the card tells them apart;
        an adapter soup's tensors are its adapters' deltas combined."""
        if self.of_adapters:
            return "combined from the adapters' deltas" if self.adapter is not None else "with the adapters' deltas merged in"
        method = get_method(self.pinned_recipe.method)
        return "averaged" if method.summary is None else f"merged by {method.name}"


def run(recipe: Recipe, *, token: str | bool | None = None, trust_remote_code: bool = False) -> SoupResult | None:
    """Make the soup a recipe describes; see the module docstring for the stages.

    Returns what was made; None in the processes of a launch other than the main one
    (they score their share and write nothing, like accelerate's ``on_main_process``).

    Args:
        recipe: a validated recipe (from flags, YAML or Python).
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the logged-in one. Never stored.
        trust_remote_code: allow the code the recipe names (``eval.function``) to be
            imported and run, and transformers models with custom code to be built.
            A recipe cannot grant itself this: it came with someone's soup.
    """
    check_trusted(recipe, trust_remote_code)
    if recipe.output.path is None and recipe.push is None:
        raise RecipeError(
            "no output: pass -o OUT_DIR (or --push org/name)",
            hint="a recipe says where the soup goes with output.path or push.repo_id",
        )
    device = device_for(recipe.device)
    backend = launched_backend(device)  # every process of a launch joins here, before any work
    writes = backend.rank == 0
    with _speaking(writes), torch_threads(eval_threads()):  # merges inside take their own (hub_soup.threads)
        # every process checks, so a bad input stops each of them with the same message; an output that
        # is an input is said so before it is said not to be a soup
        if recipe.output.path is not None:
            check_output_apart(Path(recipe.output.path), recipe)
            check_destination(Path(recipe.output.path), recipe.output.overwrite, sweep=writes)
        if recipe.push is not None:
            check_push_access(recipe.push, token)
        if recipe.eval is not None:
            check_eval(recipe.eval, recipe.base_dir, token)
        resolved = Models[ModelRef](list(recipe.ingredients), recipe.base).map(
            lambda m: resolve_ref(m.ref, m.revision, token=token, base=recipe.base_dir)
        )
        for ref in resolved:
            logger.info("resolved %s -> %s", ref.ref, ref.pinned)
        recipe, resolved = without_listed_base(recipe, resolved)
        adapters = adapter_config.read_adapters(resolved.ingredients, token)  # configs only, no weights
        recipe, resolved = _adapter_base(recipe, resolved, adapters, token)
        if adapters is not None and recipe.output.path is not None and recipe.adapter_base is not None:
            check_output_apart(Path(recipe.output.path), recipe)  # the base the adapters name, too
        opened = _needed(recipe, resolved, adapters)
        folder: AbstractContextManager[Path | None] = _output_folder(recipe) if writes else nullcontext()
        with opened_ingredients(  # the base, if any: opened, checked and closed like an ingredient
            opened, allow_pickle=recipe.allow_pickle, ema=recipe.ema, token=token,
            before_download=lambda local: (
                _align_early(resolved, local, recipe, token) if adapters is None
                else _check_adapters_early(resolved, local, adapters, token)
            ),
        ) as checkpoints, folder as output:
            result = _make_soup(
                recipe, resolved, checkpoints, output, token, trust_remote_code, backend, device, adapters
            )
    if result is not None and recipe.output.path is None:
        result.output = None
    return result


def without_listed_base(recipe: Recipe, resolved: Models[ResolvedRef]) -> tuple[Recipe, Models[ResolvedRef]]:
    """The recipe and its resolved models with every ingredient that is the base left out.

    mergekit's configs, and the habits of its users, list ``base_model`` among ``models``, and mergekit
    leaves it out of the task vectors (its task vector would be zero). Kept, it would count as a
    fine-tune: a zero task vector halves a normalised task arithmetic and pulls Model Stock towards the
    base. So an ingredient that resolves to the base (the same Hub repo and commit, or the same local
    file or folder) is not an ingredient, and the soup (its pinned recipe and card too) is bit for bit
    the soup of the same command without it listed.

    Raises:
        RecipeError: fewer ingredients are left than the method merges.
    """
    method = get_method(recipe.method)
    base = resolved.base
    if base is None:
        return recipe, resolved
    listed = [i for i, ref in enumerate(resolved.ingredients) if same_model(ref, base)]
    if not listed:
        return recipe, resolved
    names = ", ".join(repr(recipe.ingredients[i].ref) for i in listed)
    kept = [i for i in range(len(resolved.ingredients)) if i not in listed]
    if len(kept) < method.min_ingredients:
        raise RecipeError(
            f"ingredient {names} is the base ({base.pinned}), which is not an ingredient of a soup (as mergekit "
            f"leaves base_model out of the task vectors); that leaves {len(kept)}, and method {method.name} "
            f"needs at least {method.min_ingredients}",
            hint=f"list at least {method.min_ingredients} fine-tunes of the base besides it",
        )
    logger.info("%s %s the base (%s): left out of the ingredients, as mergekit leaves base_model out of the task "
                "vectors", names, "is" if len(listed) == 1 else "are", base.pinned)
    return recipe.with_ingredients(kept), Models([resolved.ingredients[i] for i in kept], base)


def same_model(a: ResolvedRef, b: ResolvedRef) -> bool:
    """Whether two resolved refs are the same bytes: one Hub repo at one commit (and weights file), or one
    local file or folder (symlinks resolved)."""
    if a.kind == "local" or b.kind == "local":
        return a.path is not None and b.path is not None and a.path.resolve() == b.path.resolve()
    return (a.repo_id, a.sha, a.filename) == (b.repo_id, b.sha, b.filename)


def _adapter_base(
    recipe: Recipe, resolved: Models[ResolvedRef], adapters: list[AdapterConfig] | None, token: str | bool | None
) -> tuple[Recipe, Models[ResolvedRef]]:
    """The recipe and its resolved models, the adapter case settled: the base the adapters name resolved and
    pinned as the recipe's base (or the user's ``base`` checked against it), each adapter naming its weights file.

    Full models keep the rules of methods: a base only for a method that uses one, and no adapter outputs.
    """
    given = {"max_rank": recipe.output.max_rank, "merge_into_base": recipe.output.merge_into_base,
             "adapter_base": recipe.adapter_base}
    adapter_only = [name for name, value in given.items() if value]
    if adapters is None:
        if adapter_only:
            raise RecipeError(
                f"{adapter_only[0]} is for soups of LoRA adapters; the ingredients are full models",
                hint=f"drop --{adapter_only[0].replace('_', '-')}",
            )
        return recipe, resolved
    if recipe.method not in ("uniform", "weighted"):
        raise AdapterError(
            f"method {recipe.method}: an adapter soup is the uniform or weighted mean of the adapters' deltas",
            hint="drop --method (or use --weights for a weighted soup)",
        )
    if recipe.exclude:
        raise AdapterError(
            f"exclude ({', '.join(recipe.exclude)}): an adapter soup combines every tensor of its adapters",
            hint="drop --exclude; to leave an adapter's module out, train it without that target module",
        )
    if recipe.recalibrate_bn and not recipe.output.merge_into_base:
        raise AdapterError(
            "recalibrate_bn: recomputed BatchNorm statistics cannot be written into an adapter",
            hint="add --merge-into-base to write the full model, or drop --recalibrate-bn",
        )
    refs = [adapter_config.with_adapter_weights(ref) for ref in resolved.ingredients]
    if recipe.adapter_base is not None:
        given_base = resolve_ref(recipe.adapter_base.ref, recipe.adapter_base.revision, token=token,
                                 base=recipe.base_dir)
        adapter_config.check_base(adapters, given_base)
        return recipe, Models(refs, given_base)
    named = adapters[0]
    try:
        base = resolve_ref(named.base, named.revision, token=token)
    except HubSoupError as exc:
        raise adapter_config.base_error(adapters, exc) from None
    logger.info("resolved the adapters' base %s -> %s", named.base, base.pinned)
    pinned_ref = str(base.path) if base.kind == "local" else named.base  # a local base as found from here
    recipe = recipe.model_copy(update={"adapter_base": ModelRef(ref=pinned_ref, revision=named.revision)})
    return recipe, Models(refs, base)


def _needed(
    recipe: Recipe, resolved: Models[ResolvedRef], adapters: list[AdapterConfig] | None
) -> Models[ResolvedRef]:
    """The models to open: all, except a Hub base of an adapter soup that is neither scored nor merged into
    (its weights are not needed; a local one is opened, reading its headers, to check that the adapters fit)."""
    base = resolved.base
    if adapters is None or recipe.output.merge_into_base or recipe.eval is not None or (base and base.kind == "local"):
        return resolved
    return Models(resolved.ingredients)


def _check_adapters_early(
    resolved: Models[ResolvedRef], local: Models[Checkpoint | None], adapters: list[AdapterConfig],
    token: str | bool | None,
) -> None:
    """The adapters' modules and shapes, and that they fit the base, from safetensors headers before any
    weights are downloaded (Hub refs over HTTP); the rest is checked once they are opened."""
    layouts = early_layouts(resolved, local, token)
    if layouts is None or layouts.base is None:
        return  # a pickle, or offline: checked after opening
    plan = plan_adapters(adapters, layouts.ingredients)
    check_base_fits(plan, layouts.base, layouts.ingredients[0].label)
    logger.info("the adapters' configs and headers agree, and fit the base %s", layouts.base.label)


@contextmanager
def _speaking(main: bool) -> Iterator[None]:
    """The main process logs and shows progress bars; the other processes of a launch log only
    errors, since the same lines K times tell no one more (errors stay: one process may fail alone)."""
    if main:
        yield
        return
    log = logging.getLogger("hub_soup")
    level, bars_off = log.level, are_progress_bars_disabled()
    log.setLevel(logging.ERROR)
    disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(level)
        if not bars_off:
            enable_progress_bars()


def check_trusted(recipe: Recipe, trust_remote_code: bool) -> None:
    """Refuse, before any work, a recipe that names code unless the caller trusts it."""
    code = recipe.code_refs()
    if code and not trust_remote_code:
        field, value = code[0]
        raise UntrustedCodeError(
            f"the recipe's {field} names code to run ({value}); refusing to run it without --trust-remote-code",
            hint=UntrustedCodeError.HINT,
        )


def check_output_apart(output: Path, recipe: Recipe) -> None:
    """Refuse an output that is an input, contains one or lies inside one (symlinks resolved).

    With ``overwrite`` such an output would replace an ingredient's files (or the
    eval data, or the Hugging Face cache that Hub ingredients live in) with the soup.
    """
    inputs = [(f"the ingredient {i.ref}", recipe.base_dir / Path(i.ref).expanduser()) for i in recipe.ingredients]
    for base in (recipe.base, recipe.adapter_base):
        if base is not None:
            inputs.append((f"the base {base.ref}", recipe.base_dir / Path(base.ref).expanduser()))
    if recipe.eval is not None and recipe.eval.data is not None:
        inputs.append((f"the eval data {recipe.eval.data}", Path(recipe.eval.data).expanduser()))
    if recipe.eval is not None and recipe.eval.include_path is not None:
        inputs.append((f"the task YAMLs {recipe.eval.include_path}", Path(recipe.eval.include_path).expanduser()))
    check_apart(output, inputs, cache=True)


@contextmanager
def _output_folder(recipe: Recipe) -> Iterator[Path]:
    """The recipe's output folder, or, for a push without one, a folder staged for the push and removed after it."""
    if recipe.output.path is not None:
        yield Path(recipe.output.path)
        return
    assert recipe.push is not None
    logger.info(
        "no -o given: the soup is staged in a temporary folder and removed after the push (pass -o DIR to keep a copy)"
    )
    with tempfile.TemporaryDirectory(prefix="hub-soup-") as stage:
        yield Path(stage) / recipe.push.repo_id.split("/")[-1]


def _align_early(
    resolved: Models[ResolvedRef], local: Models[Checkpoint | None], recipe: Recipe, token: str | bool | None
) -> None:
    """Align from safetensors headers, and compare configs, over HTTP before any weights are downloaded.

    ``local`` are the models already opened when they are local (headers only), None for each Hub one;
    a recipe ``base`` is aligned in its role, its config not compared (a base may carry another head).
    """
    if all(r.kind == "local" for r in resolved) or constants.is_offline_mode():
        return  # local (and cached) files are checked right after opening, which reads headers only
    layouts = early_layouts(resolved, local, token)
    if layouts is not None:  # tensor shapes first: their message names the tensor and the fix
        align(layouts.ingredients, recipe.exclude, base=layouts.base)
    check_configs([
        (ref.label, checkpoint.config if checkpoint is not None else remote_config(ref, token))
        for ref, checkpoint in zip(resolved.ingredients, local.ingredients)
    ])
    logger.info("headers and configs agree across %d ingredients%s; downloading", len(resolved.ingredients),
                " and the base" if resolved.base is not None else "")


@dataclass
class _Soup:
    """How the soup is made and of what: everything the stages after alignment share."""

    checkpoints: list[Checkpoint]  # the ingredients, in recipe order
    base: Checkpoint | None
    plan: MergePlan
    method: MergeMethod
    dtype: torch.dtype | None  # the recipe's output dtype of floating tensors (None: each tensor's own)
    metas: dict[str, TensorMeta]  # the soup's tensors, as written
    device: torch.device
    side_files: SideFiles
    reference: Checkpoint  # the ingredient whose config the soup carries: models are built from it
    backend: Backend  # where models are scored: this process alone, or its share of a launch
    adapters: AdapterSoup | None = None  # LoRA ingredients: the soup is of their deltas (``base`` is their base)


def _prepare(
    recipe: Recipe, checkpoints: list[Checkpoint], base: Checkpoint | None, backend: Backend, device: torch.device,
    adapters: list[AdapterConfig] | None = None, base_sha: str | None = None,
) -> _Soup:
    """Align the opened checkpoints (the base in its role), check their configs, and choose the side files.

    LoRA ingredients (``adapters``: their configs) take their own branch; ``base_sha`` pins their base."""
    if adapters is not None:
        return _prepare_adapters(recipe, adapters, checkpoints, base, backend, device, base_sha)
    plan = align(layouts_of(checkpoints), recipe.exclude, base=layout_of(base) if base is not None else None)
    for note in plan.notes:
        logger.info(note)
    check_configs([(c.label, c.config) for c in checkpoints])
    side_files = choose_side_files(checkpoints)
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    return _Soup(
        checkpoints=checkpoints, base=base, plan=plan, method=recipe.merge_method(), dtype=dtype,
        metas=output_metas(plan, dtype), device=backend.device_for(device), side_files=side_files,
        reference=checkpoints[side_files.config_source or 0], backend=backend,
    )


def _prepare_adapters(
    recipe: Recipe, configs: list[AdapterConfig], checkpoints: list[Checkpoint], base: Checkpoint | None,
    backend: Backend, device: torch.device, base_sha: str | None,
) -> _Soup:
    """LoRA ingredients: their modules, ranks and scalings, checked against each other and the base (when it is
    opened); side files are the base's (config, tokenizer) for a merged model, the adapters' tokenizer for an adapter."""
    plan = plan_adapters(configs, layouts_of(checkpoints))
    base_plan = None
    if base is not None:
        check_base_fits(plan, layout_of(base), checkpoints[0].label)
        base_plan = align([layout_of(base)])
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    merged = recipe.output.merge_into_base
    # an adapter carries no model config (PEFT reads the base's); a merged model carries the base's
    side_files = choose_side_files([base, *checkpoints]) if merged and base is not None else choose_side_files(
        checkpoints, config=False
    )
    adapter_soup = AdapterSoup(
        configs=configs, adapters=checkpoints, plan=plan, base=base, base_plan=base_plan, base_revision=base_sha, max_rank=recipe.output.max_rank, merge_into_base=merged, dtype=dtype,
        device=backend.device_for(device),
    )
    return _Soup(
        checkpoints=checkpoints, base=base, plan=base_plan or MergePlan([]), method=recipe.merge_method(), dtype=dtype,
        metas=output_metas(base_plan, dtype) if base_plan is not None else {}, device=backend.device_for(device),
        side_files=side_files, reference=base or checkpoints[0], backend=backend, adapters=adapter_soup,
    )


def _make_soup(
    recipe: Recipe, models: Models[ResolvedRef], opened: Models[Checkpoint], output: Path | None,
    token: str | bool | None, trust_remote_code: bool, backend: Backend, device: torch.device,
    adapters: list[AdapterConfig] | None = None,
) -> SoupResult | None:
    """Align, [evaluate], write the soup with its card, then gate and push: the stages after opening.

    ``output`` is None in the processes of a launch that do not write: they stop after scoring.
    """
    resolved, resolved_base = models.ingredients, models.base
    # an adapter soup written as an adapter, unscored, never opens a Hub base
    checkpoints, base = opened.ingredients, opened.base
    soup = _prepare(recipe, checkpoints, base, backend, device, adapters, resolved_base.sha if resolved_base else None)
    with ExitStack() as scoring:  # the scored model stays until the soup is written (it may be read back)
        report = _evaluate(recipe, soup, trust_remote_code, scoring) if recipe.eval is not None else None
        if output is None:
            return None
        kept = report.kept if report is not None else [True] * len(checkpoints)
        weights = _kept_weights(recipe, soup.method, checkpoints, kept)
        warnings: list[str] = []
        if report is not None and report.comparison.soup_is_worse:
            warnings.append(report.comparison.message())
            logger.warning(warnings[-1])
        if report is not None and report.below_base_warning is not None:  # warned, not gated (see _gate)
            warnings.append(report.below_base_warning)
            logger.warning(warnings[-1])
        pinned = pin_recipe(recipe, models, output if recipe.output.path is not None else None)
        pinned_yaml = pinned.to_yaml()
        scores = _card_scores(report) if report is not None else []
        members = [i for i, k in enumerate(kept) if k]
        adapter = soup.adapters.output(members, weights) if soup.adapters and not soup.adapters.merge_into_base else None
        config = _soup_config(soup.reference, recipe.dtype) if adapter is None else None
        plan = adapter.plan(len(members)) if adapter is not None else soup.plan
        metas, shards = (adapter.metas, None) if adapter is not None else (soup.metas, recipe.output.max_shard_size)
        with SoupWriter(  # PEFT reads one adapter file: an adapter is never sharded
            output, metas, parse_size(shards) if shards else sum(m.nbytes for m in metas.values()) + 1,
            recipe.output.overwrite, stem=ADAPTER_STEM if adapter is not None else "model",
        ) as writer:
            if adapter is not None:
                stats, similarity = write_weights(state_dict_weights(adapter.tensors), plan, metas, writer), None
                writer.add_file(adapter_config.ADAPTER_CONFIG, json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
            elif soup.adapters is not None:  # --merge-into-base: the scored soup, or the streamed one
                stats = (soup.adapters.stream(members, weights, writer) if report is None
                         else write_weights(report.soup, plan, metas, writer))
                similarity = None
            else:
                stats, similarity = _write_tensors(writer, soup, report)
            independent = _independence_warning(similarity) if similarity is not None else None
            if independent is not None:
                warnings.append(independent)
                logger.warning(independent)
            _add_side_files(writer, soup.side_files, config)
            card = card_stage.build_card(
                repo_id=recipe.push.repo_id if recipe.push else None,
                name=Path(os.path.abspath(output)).name,  # -o . has a name too
                ingredients=resolved,
                base=resolved_base,
                weights=weights,
                kept=kept,
                config=config,
                recipe_yaml=pinned_yaml,
                license=recipe.push.license if recipe.push else None,
                tags=recipe.push.tags if recipe.push else (),
                scores=scores,
                method=_method_title(recipe),
                merge_method=soup.method,
                bn_recalibrated=report is not None and report.bn_recalibrated,
                plan=plan,
                dtype=recipe.dtype,
                warnings=warnings,
                rebuild_pushes=recipe.push is not None,
                adapter=_adapter_card(soup.adapters, adapter, sum(kept)) if soup.adapters is not None else None,
            )
            writer.add_file(RECIPE_FILENAME, pinned_yaml)
            writer.add_file("README.md", str(card))
            writer.commit()
    result = SoupResult(
        output=output, ingredients=resolved, base=resolved_base, kept=kept, weights=weights, plan=plan,
        stats=stats, similarity=similarity, pinned_recipe=pinned, scores=scores, report=report, warnings=warnings,
        adapter=adapter, of_adapters=soup.adapters is not None,
    )
    if recipe.push is not None:
        _gate(recipe, report, independent, output, soup.plan.has_batchnorm)
        names = ", ".join(r.label for r, k in zip(resolved, kept) if k)
        result.push = push_soup(output, recipe.push, token, f"hub-soup: {_method_title(recipe)} soup of {names}")
    return result


def _adapter_card(soup: AdapterSoup, adapter: AdapterOutput | None, count: int) -> card_stage.AdapterCard:
    """What the card says of an adapter soup: an exact (or reduced) adapter, or the base with the delta merged in."""
    task_type = soup.configs[0].raw.get("task_type")  # the adapters agree on it (SHARED_FIELDS)
    if adapter is None:
        return card_stage.AdapterCard(merged=True, task_type=task_type, summary=(
            f"The base model with the weighted mean of {count} LoRA adapters' weight deltas merged in "
            "(base + sum_i w_i * s_i * B_i @ A_i, PEFT's scaling s_i = lora_alpha / r, or / sqrt(r) with rsLoRA): "
            "the base's tensors streamed, each adapted weight's delta added in float32, each tensor stored in its "
            "own dtype, heads saved with the adapters (modules_to_save) averaged."
        ))
    exact = (
        f"An exact soup of {count} LoRA adapters in concatenated-rank form ({adapter.ranks}, the sum of their "
        "ranks): A is the adapters' lora_A stacked, B their lora_B side by side, each scaled by its weight and "
        "PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA), and the soup's own scaling is 1, so loaded "
        "with PEFT it adds exactly the weighted mean of the adapters' deltas to the base."
    )
    if adapter.reduction is not None:
        exact = (
            f"A soup of {count} LoRA adapters: the weighted mean of their deltas (PEFT's scaling lora_alpha / r, "
            f"or / sqrt(r) with rsLoRA, folded in), reduced per module to {adapter.ranks} by a truncated SVD "
            f"(B = U diag(S), A = V^T). {adapter.reduction.describe()}."
        )
    return card_stage.AdapterCard(merged=False, summary=exact, task_type=task_type)


def _method_title(recipe: Recipe) -> str:
    """How the card, the score table and the commit name the soup's method: ``greedy`` for a greedy
    uniform soup, ``greedy model_stock`` when greedy chose the ingredients another method combined."""
    if not recipe.greedy:
        return recipe.method
    return "greedy" if recipe.method == "uniform" else f"greedy {recipe.method}"


def _kept_weights(
    recipe: Recipe, method: MergeMethod, checkpoints: Sequence[Checkpoint], kept: Sequence[bool]
) -> list[float]:
    """The weight of each kept ingredient, as the method used it (normalised by an average; a greedy soup
    weighs what it kept equally), logged."""
    weights = [1 / sum(kept)] * len(kept) if recipe.greedy else method.weights_for(len(kept))
    logger.info("weights: %s", ", ".join(f"{c.label}={w:.4f}" for c, w, k in zip(checkpoints, weights, kept) if k))
    return [w for w, k in zip(weights, kept) if k]


def _write_tensors(writer: SoupWriter, soup: _Soup, report: GreedyReport | None) -> tuple[MergeStats, Similarity]:
    """Write the soup's tensors: the scored soup as it was scored (read back from the model that holds it, or
    merged again; BN statistics recalibrated or not), or, unscored, the streamed merge, with the
    shared-initialization check riding along its reads."""
    if report is not None:
        stats = write_weights(report.soup, soup.plan, soup.metas, writer)
        return stats, weight_similarity(soup.checkpoints, soup.plan, sample_per_tensor=SIMILARITY_SAMPLE)
    gram = GramAccumulator(len(soup.checkpoints), SIMILARITY_SAMPLE)
    stats = stream_merge(
        soup.checkpoints, soup.plan, soup.method, writer, soup.dtype, base=soup.base, device=soup.device, gram=gram
    )
    return stats, gram.similarity([c.label for c in soup.checkpoints])


def _independence_warning(similarity: Similarity) -> str | None:
    pairs = similarity.independent_pairs()
    if not pairs:
        return None
    worst = min(similarity.cosine[i][j] for i, j in pairs)
    return INDEPENDENT_WARNING.format(pairs=", ".join(f"{i}&{j}" for i, j in pairs), cos=worst)


def _gate(
    recipe: Recipe, report: GreedyReport | None, independent: str | None, output: Path, has_bn: bool
) -> None:
    """Refuse to publish a soup that is worse than its best ingredient (with an eval) or, without
    one, whose ingredients look independent: both usually mean a collapsed soup. ``force`` pushes.

    A soup below its base (methods with one) is only warned about: a soup at least as good as
    its best ingredient is what the gate promises, and a fine-tune is better than its base on
    the task it was tuned for, so such a soup is below its best ingredient as well unless the
    eval measures something the fine-tunes gave up (a task negation forgets on purpose)."""
    assert recipe.push is not None
    if recipe.force:
        return
    kept = (
        f"the soup was written to {output}"
        if recipe.output.path is not None
        else "nothing was kept (pass -o DIR to keep the soup and look at it)"
    )
    if report is not None and report.comparison.soup_is_worse:
        raise WorseSoupError(
            f"not pushing to {recipe.push.repo_id}: {report.comparison.message()}; {kept}",
            hint="try greedy: true (--greedy) to keep only ingredients that help"
            + (", or recalibrate_bn (--recalibrate-bn N) for BatchNorm networks" if has_bn else "")
            + "; --force pushes it anyway",
        )
    if report is None and independent is not None:
        raise IndependentIngredientsError(
            f"not pushing to {recipe.push.repo_id}: {independent}; {kept}",
            hint="score the soup with --eval-task/--eval-data (a soup that scores well is pushed), check the "
            "ingredients with `hub-soup inspect`, or pass --force to push it anyway (its card says so)",
        )


def _add_side_files(writer: SoupWriter, side_files: SideFiles, config: dict[str, Any] | None) -> None:
    for name, path in side_files.paths.items():
        if name == "config.json" and config is not None:
            writer.add_file("config.json", json.dumps(config, indent=2) + "\n")
        else:
            writer.add_file(name, path)


def _evaluate(recipe: Recipe, soup: _Soup, trust_remote_code: bool, stack: ExitStack) -> GreedyReport:
    """Score every ingredient, the base of a method that has one, and the soup (greedy or not), with
    optional BN recalibration.

    One model is built, from the reference ingredient's config, in the eval dtype
    (:func:`~hub_soup.eval.evaluate.eval_dtype`) on the device, and every model scored (on
    the test split too) is streamed into that one instance: ingredients (and the base) from
    their files, soups from the streamed engine (in the dtypes written), so what is scored,
    and then written, is what the streamed merge writes, and memory stays near one model. Greedy chooses the
    ingredients; the recipe's method (Model Stock, with its base) combines each candidate set.

    The evaluators (the model, and its offload folder) go when ``stack`` closes: after the soup is
    written, since the report's soup may be read back from the model that holds it.
    """
    assert recipe.eval is not None
    dtype = eval_dtype(recipe.eval.dtype, soup.metas, soup.device)
    options: dict[str, Any] = {
        "device": soup.device, "trust_remote_code": trust_remote_code, "backend": soup.backend, "dtype": dtype,
    }
    evaluator = stack.enter_context(Evaluator(recipe.eval, soup.reference, **options))
    test_evaluator = (  # scores in the evaluator's model: one model in memory for both splits
        stack.enter_context(
            Evaluator(recipe.eval, soup.reference, split=recipe.eval.test_split, model_of=evaluator, **options)
        )
        if recipe.eval.test_split
        else None
    )
    return _scored(recipe, soup, evaluator, test_evaluator)


def _scored(recipe: Recipe, soup: _Soup, evaluator: Evaluator, test_evaluator: Evaluator | None) -> GreedyReport:
    """:func:`_evaluate`'s scores, with its evaluators."""
    labels = [c.label for c in soup.checkpoints]
    # each adapter, and each candidate soup, is scored as the base with its delta merged in
    load, soup_of, base = soup.adapters.scorers(soup.method) if soup.adapters is not None else _scorers(soup)
    options: dict[str, Any] = {
        "recalibrate_bn_batches": recipe.recalibrate_bn,
        "test_evaluator": test_evaluator,
        "ensemble": recipe.ensemble_reference,
        "base": base,
    }
    if recipe.greedy:
        # an average of one ingredient in its own dtypes is that ingredient: greedy's first step is judged already
        alone_is_soup = soup.adapters is None and soup.method.averages and all(
            soup_of([i]).metas == load(i).metas for i in range(len(labels))
        )
        return greedy_soup(
            labels, load, evaluator, soup_of=soup_of, method=_method_title(recipe), alone_is_soup=alone_is_soup,
            **options,
        )
    return score_soup(labels, load, soup_of(range(len(labels))), evaluator, method=recipe.method, **options)



def _scorers(soup: _Soup) -> tuple[Loader, SoupMaker, Base | None]:
    """What evaluation scores of full models: each ingredient as saved, the recipe's soup of any subset of them
    (greedy's), and the base of a method that has one, each streamed from the files."""
    checkpoints, plan = soup.checkpoints, soup.plan

    def soup_of(members: Sequence[int]) -> Weights:
        """The recipe's soup of the ingredients at ``members`` (in recipe order), as if only they were listed."""
        chosen = [checkpoints[i] for i in members]  # greedy's subsets: its methods take no weights
        return soup_weights(chosen, plan.select(members), soup.method, soup.dtype, base=soup.base, device=soup.device)

    base = None
    if soup.base is not None:
        base_checkpoint = soup.base
        base = Base(base_checkpoint.label, lambda: base_weights(base_checkpoint, checkpoints[0], plan))
    return lambda i: ingredient_weights(checkpoints[i], plan, i), soup_of, base


def _card_scores(report: GreedyReport) -> list[ModelScore]:
    """The soup's, each ingredient's and the base's scores, held-out split first, then the test split."""
    base = report.base_name or ""  # a base's scores exist only with its name
    scores = [ModelScore("soup", report.soup_score)]
    scores += [ModelScore(label, s) for label, s in zip(report.labels, report.ingredient_scores)]
    scores += [ModelScore(base, report.base_score)] if report.base_score is not None else []
    # like with like: the soup's BN statistics were recalibrated
    saved = [*zip(report.labels, report.ingredient_scores_as_saved or []), (base, report.base_score_as_saved)]
    scores += [ModelScore(f"{label} (BN statistics as saved)", s) for label, s in saved if s is not None]
    scores += [ModelScore(name, s) for name, s in (report.test_scores or {}).items()]
    scores += [ModelScore(base, report.base_test_score)] if report.base_test_score is not None else []
    return scores


def _soup_config(reference: Checkpoint, dtype: str | None) -> dict[str, Any] | None:
    """The config.json the soup carries, its dtype field updated when ``--dtype`` changes it."""
    config = reference.config
    if config is not None and dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
    return config


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


R = TypeVar("R", bound=ModelRef)  # an ingredient or the base


def pin_recipe(recipe: Recipe, resolved: Models[ResolvedRef], soup: Path | None = None) -> Recipe:
    """The recipe the soup carries: every Hub ingredient (and the base) pinned to the commit it resolved to.

    Local paths are written relative to the soup folder ``soup`` (absolute when the
    soup is not kept: :meth:`~hub_soup.recipe.Recipe.with_paths_for`), so the recipe
    rebuilds from wherever the folder is read. The
    output path is left out: a rebuild goes where its runner says (``-o``), or to
    the Hub. Run-time switches (``overwrite``) are reset too, so the same soup
    always carries the same recipe file (and a re-push changes nothing).
    """
    located = recipe.with_paths_for(soup, [ref.kind == "local" for ref in resolved])

    def pinned(model: R, ref: ResolvedRef) -> R:
        if ref.kind == "local":
            return model
        return model.model_copy(update={"ref": ref.ref.removeprefix("hf-hub:").rsplit("@", 1)[0], "revision": ref.sha})

    ingredients = [pinned(i, r) for i, r in zip(located.ingredients, resolved.ingredients)]
    output = recipe.output.model_copy(update={"path": None, "overwrite": False})
    update: dict[str, Any] = {"ingredients": ingredients, "output": output, "parameters": recipe.pinned_parameters()}
    if resolved.base is not None:  # a method's base, or LoRA adapters' (never both: theirs is a method without one)
        field = "adapter_base" if located.adapter_base is not None else "base"
        base = getattr(located, field)
        update[field] = pinned(base, resolved.base)
    return located.model_copy(update=update)
