"""The flow: a recipe in, a soup out, stage by stage (see :mod:`hub_soup.pipeline`)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path

from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from hub_soup.eval.backends import launched_backend
from hub_soup.ingredients import opened_ingredients
from hub_soup.pipeline.gate import gate, push
from hub_soup.pipeline.pin import pin_recipe
from hub_soup.pipeline.preflight import check_output_named, check_trusted, device_for, preflight
from hub_soup.pipeline.resolving import resolve_models
from hub_soup.pipeline.scoring import score
from hub_soup.pipeline.writing import write_soup
from hub_soup.recipe import Recipe
from hub_soup.report import SoupResult
from hub_soup.soups import choose_kind
from hub_soup.threads import eval_threads, torch_threads

logger = logging.getLogger(__name__)


def run(recipe: Recipe, *, token: str | bool | None = None, trust_remote_code: bool = False) -> SoupResult | None:
    """Make the soup a recipe describes; see :mod:`hub_soup.pipeline` for the stages.

    Returns what was made; None in the processes of a launch other than the main one
    (they score their share and write nothing, like accelerate's ``on_main_process``).

    Args:
        recipe: a validated recipe (from flags, YAML or Python).
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the logged-in one. Never stored.
        trust_remote_code: allow the code the recipe names (``eval.function``) to be
            imported and run, and transformers models with custom code to be built.
            A recipe cannot grant itself this: it came with someone's soup.
    """
    check_trusted(recipe.code_refs(), trust_remote_code)
    check_output_named(recipe)
    device = device_for(recipe.device)
    backend = launched_backend(device)  # every process of a launch joins here, before any work
    writes = backend.rank == 0
    with speaking(writes), torch_threads(eval_threads()):  # merges inside take their own (hub_soup.threads)
        preflight(recipe, token, sweep=writes)
        recipe, resolved = resolve_models(recipe, token)
        kind = choose_kind(recipe, resolved, token)
        folder: AbstractContextManager[Path | None] = output_folder(recipe) if writes else nullcontext()
        with opened_ingredients(
            kind.opens(), allow_pickle=recipe.allow_pickle, ema=recipe.ema, token=token,
            before_download=lambda local: kind.check_before_download(local, token),
        ) as opened, folder as output:
            soup = kind.prepare(opened, backend, device)
            with ExitStack() as scoring:  # the scored model stays until the soup is written (it may be read back)
                report = score(recipe, kind, soup, trust_remote_code, scoring) if recipe.eval is not None else None
                if output is None:
                    return None  # a process of a launch that scored its share: the main one writes
                pinned = pin_recipe(kind.pinned(), kind.models, output if recipe.output.path is not None else None)
                result = write_soup(recipe, kind, soup, report, pinned, output)
            if recipe.push is not None:
                gate(recipe, result, soup.plan.has_batchnorm)
                result.push = push(recipe, result, token)
    if recipe.output.path is None:
        result.output = None
    return result


@contextmanager
def speaking(main: bool) -> Iterator[None]:
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


@contextmanager
def output_folder(recipe: Recipe) -> Iterator[Path]:
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
