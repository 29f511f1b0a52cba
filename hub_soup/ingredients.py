"""A soup's models, opened: the ingredients and an optional base, as one value.

Library code that the pipeline, ``hub-soup inspect``, ``hub-soup diagnose``, the tests and
the benchmarks share: open local models and fetch and open Hub ones (each closed when the
``with`` block is left), what alignment needs of them (:func:`layouts_of`), their layouts
before any weights are downloaded (:func:`early_layouts`, headers over HTTP), and the check
that an output folder is none of them.

:class:`Models` keeps a base apart from the ingredients, so no stage finds the base by
counting: a base is not an ingredient (it has its own role in alignment, scoring and the
card), and a list with the base last made every stage know that convention.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from huggingface_hub import constants, hf_hub_download

from hub_soup.adapters.applied import apply_lora, lora_plan
from hub_soup.adapters.config import AdapterConfig, read_config
from hub_soup.errors import OutputOverlapsInputError
from hub_soup.hub.errors import hub_errors
from hub_soup.hub.fetch import fetch, remote_layout
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.io.read import Checkpoint, open_checkpoint
from hub_soup.merging.plan import Layout

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Models(Generic[T]):
    """A soup's models, of any stage (refs, resolved refs, checkpoints, layouts): its ingredients in
    recipe order, and its base (a method's, or the model LoRA adapters were trained on), if any."""

    ingredients: list[T]
    base: T | None = None

    def __iter__(self) -> Iterator[T]:
        """Every model: the ingredients, then the base."""
        yield from self.ingredients
        if self.base is not None:
            yield self.base

    def map(self, convert: Callable[[T], U]) -> Models[U]:
        """The same models, each converted (the base keeps its role)."""
        return Models([convert(m) for m in self.ingredients], convert(self.base) if self.base is not None else None)


@contextmanager
def opened_ingredients(
    models: Models[ResolvedRef],
    *,
    allow_pickle: bool,
    ema: bool,
    token: str | bool | None,
    before_download: Callable[[Models[Checkpoint | None]], None] | None = None,
) -> Iterator[Models[Checkpoint]]:
    """Open the local models, then fetch and open the Hub ones; every one opened is closed on
    leaving the ``with`` block, or at once when opening another fails.

    ``before_download`` sees the local ones (None in place of each Hub one) before any model is
    downloaded: the early checks use them, so no local file is opened (a pickle loaded) twice.
    A model with a LoRA adapter applied (mergekit's ``model+lora``) is read with it merged in
    (:class:`~hub_soup.adapters.applied.LoraApplied`); the adapters, small, are fetched first, and
    each is checked to fit its model (a Hub one's headers) before any model is downloaded.
    """
    with ExitStack() as stack:

        def opened(ref: ResolvedRef) -> Checkpoint:
            """One model or adapter, fetched first when it is on the Hub."""
            path, sidecars = local_files(ref, token)
            checkpoint = open_checkpoint(path, label=ref.label, allow_pickle=allow_pickle, ema=ema,
                                         sidecars=sidecars, weights=ref.filename if ref.kind == "local" else None)
            return _noted(stack.enter_context(checkpoint))

        def adapter_of(ref: ResolvedRef) -> tuple[Checkpoint, AdapterConfig] | None:
            """The LoRA adapter applied to a model (mergekit's model+lora), opened, and its config."""
            return None if ref.lora is None else (opened(ref.lora), read_config(ref.lora, token))

        def with_lora(ref: ResolvedRef, adapter: tuple[Checkpoint, AdapterConfig] | None) -> Checkpoint:
            """The model, read with its adapter applied (if any)."""
            model = opened(replace(ref, lora=None))
            return model if adapter is None else apply_lora(model, *adapter, ref.label)

        adapters = models.map(adapter_of)  # small: all of them before any model is downloaded
        pairs = Models(list(zip(models.ingredients, adapters.ingredients)),
                       (models.base, adapters.base) if models.base is not None else None)
        local = pairs.map(lambda pair: with_lora(*pair) if pair[0].kind == "local" else None)
        if before_download is not None:
            before_download(local)
        for ref, adapter in pairs:  # an adapter fits its Hub model's headers, before the model is downloaded
            if adapter is not None and ref.kind != "local" and not constants.is_offline_mode():
                layout = remote_layout(replace(ref, lora=None), token)
                if layout is not None:
                    lora_plan(*adapter, layout)
        yield Models(
            [c if c is not None else with_lora(*pair) for pair, c in zip(pairs.ingredients, local.ingredients)],
            None if pairs.base is None else local.base if local.base is not None else with_lora(*pairs.base),
        )


def local_files(ref: ResolvedRef, token: str | bool | None) -> tuple[Path, list[Path] | None]:
    """Where a model's weights are on this machine, and its side files when they were fetched (a local
    folder's are found beside its weights): a Hub model is downloaded first, through the HF cache."""
    if ref.kind == "local":
        assert ref.path is not None
        return ref.path, None
    fetched = fetch(ref, token)
    return fetched.weights, fetched.sidecars


def _noted(checkpoint: Checkpoint) -> Checkpoint:
    for note in checkpoint.notes:
        logger.info("%s: %s", checkpoint.label, note)
    return checkpoint


def layout_of(checkpoint: Checkpoint) -> Layout:
    """What alignment needs of an opened checkpoint. A transformers model whose config ties its output
    embeddings (``tie_word_embeddings``) saves no ``lm_head.weight``: it is read as its input embeddings,
    so a tied ingredient aligns with untied ones."""
    aliases = tuple(checkpoint.aliases)
    config = checkpoint.config or {}
    if config.get("tie_word_embeddings") and TIED_HEAD not in checkpoint.metas:
        embeddings = [k for k in checkpoint.metas if k.endswith("embed_tokens.weight")]
        if len(embeddings) == 1:
            aliases = (*aliases, (embeddings[0], TIED_HEAD))
    return Layout(checkpoint.label, checkpoint.metas, aliases)


# The output embeddings of a transformers causal LM, left out of its files when tied to the input ones.
TIED_HEAD = "lm_head.weight"


def layouts_of(checkpoints: Sequence[Checkpoint]) -> list[Layout]:
    """What alignment needs of opened checkpoints."""
    return [layout_of(c) for c in checkpoints]


def early_layouts(
    resolved: Models[ResolvedRef], local: Models[Checkpoint | None], token: str | bool | None
) -> Models[Layout] | None:
    """Every model's layout before any weights are downloaded: a local one's from its opened headers
    (``local``, as :func:`opened_ingredients` gives it to ``before_download``; a base that is not opened
    counts as not local), a Hub one's from its safetensors headers over HTTP. None when one can only be
    read after download (pickled weights, or offline)."""
    offline = constants.is_offline_mode()

    def layout(ref: ResolvedRef, checkpoint: Checkpoint | None) -> Layout | None:
        if checkpoint is not None:
            return layout_of(checkpoint)
        return None if ref.kind == "local" or offline else remote_layout(ref, token)

    ingredients: list[Layout] = []
    for ref, checkpoint in zip(resolved.ingredients, local.ingredients):
        if (found := layout(ref, checkpoint)) is None:
            return None
        ingredients.append(found)
    if resolved.base is None:
        return Models(ingredients)
    base = layout(resolved.base, local.base)
    return Models(ingredients, base) if base is not None else None


def remote_side_files(ref: ResolvedRef, names: Sequence[str], token: str | bool | None) -> list[Path]:
    """Those of a Hub model's side files ``names`` it has (tokenizer files: a few kB to a few MB), fetched alone
    through the cache the download then reuses."""
    assert ref.repo_id is not None
    with hub_errors(ref.repo_id, ref.sha, action="download the side files of"):
        return [Path(hf_hub_download(ref.repo_id, name, revision=ref.sha, token=token))
                for name in names if name in ref.files]


def remote_config(ref: ResolvedRef, token: str | bool | None) -> dict[str, Any] | None:
    """A Hub model's config.json (a few kB, through the cache the download then reuses)."""
    if "config.json" not in ref.files:
        return None
    assert ref.repo_id is not None
    with hub_errors(ref.repo_id, ref.sha, action="download the config of"):
        path = hf_hub_download(ref.repo_id, "config.json", revision=ref.sha, token=token)
    return json.loads(Path(path).read_text())


def check_apart(output: Path, inputs: Iterable[tuple[str, Path]], *, cache: bool = False) -> None:
    """Refuse an output that is an input, contains one or lies inside one (symlinks resolved).

    With ``overwrite`` such an output would replace an input's files with the soup. ``inputs`` are
    ``(what, path)``, ``what`` as the message names it (``the ingredient a``); ``cache`` adds the
    Hugging Face cache that Hub models live in, even before it exists.

    Raises:
        OutputOverlapsInputError: naming the input and how the output overlaps it.
    """
    target = output.resolve()
    held_inputs = [(what, path, _paths_held(path)) for what, path in inputs]
    if cache:
        folder = Path(constants.HF_HUB_CACHE)
        held_inputs.append(("the Hugging Face cache (HF_HUB_CACHE)", folder, iter([folder.resolve()])))
    for what, path, held_paths in held_inputs:
        for held in held_paths:
            if target == held:
                relation = f"is {what}"
            elif held.is_relative_to(target):
                relation = f"contains {what}" + ("" if held == path.resolve() else f" ({held})")
            elif target.is_relative_to(held):
                relation = f"lies inside {what}"
            else:
                continue
            raise OutputOverlapsInputError(
                f"the output {output} {relation}: writing the soup there would destroy an input",
                hint="choose an -o outside every ingredient, the eval data and the Hugging Face cache",
            )


def _paths_held(path: Path) -> Iterator[Path]:
    """Where an input's bytes live: the path, and what its top-level files link to (a Hub snapshot's blobs)."""
    if not path.exists():
        return
    yield path.resolve()
    if path.is_dir():
        yield from (p.resolve() for p in path.iterdir() if p.is_symlink())
    elif path.name.endswith(".index.json"):  # shards live beside their index
        yield path.parent.resolve()
