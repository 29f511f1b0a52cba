"""Verifying a published merge: its recipe found, its ingredients resolved, the merge rebuilt and compared.

The rebuild is the pipeline's own (resolve, choose the kind, open with the early checks,
prepare, the kind's output), streamed into a :class:`~hub_soup.verification.compare.ComparingSink`
instead of a writer, so what is checked is exactly what ``hub-soup run`` would have written.
Every check that needs no weights runs first: the recipe is found and read, every revision
resolved, the ingredients' headers aligned, and the tensors the rebuild will write (keys,
shapes, dtypes) compared with the published headers, so a merge that cannot match, or cannot
be rebuilt, is said in seconds, before any weights are downloaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import hf_hub_download

from hub_soup.errors import HubSoupError, RecipeError
from hub_soup.eval.backends import launched_backend
from hub_soup.eval.spec import EvalSpec
from hub_soup.hub.errors import hub_errors
from hub_soup.hub.fetch import remote_layout
from hub_soup.hub.resolve import ResolvedRef, resolve_ref
from hub_soup.ingredients import Models, local_files, opened_ingredients
from hub_soup.io.read import Checkpoint, open_checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.io.write import MERGEKIT_CONFIG, RECIPE_FILENAME
from hub_soup.merging.engine import Weights, saved_weights
from hub_soup.merging.plan import MergePlan
from hub_soup.pipeline.preflight import check_eval, check_trusted, device_for
from hub_soup.pipeline.resolving import resolve_models
from hub_soup.pipeline.scoring import score, scores_of
from hub_soup.recipe import Recipe, parse_recipe, validated
from hub_soup.soups import Soup, SoupKind, choose_kind
from hub_soup.soups.full import Full
from hub_soup.verification.compare import ComparingSink, InputScale
from hub_soup.verification.evidence import check_pr_target, open_pr, reproduce_command
from hub_soup.verification.report import Role, Score, VerifyReport

logger = logging.getLogger(__name__)

#: Where a merge's recipe is looked for, in order: hub-soup's pinned recipe, mergekit's config, the card.
RECIPE_FILES = (RECIPE_FILENAME, MERGEKIT_CONFIG, "README.md")
# A fenced YAML block of a card (mergekit writes its config under "## Configuration" so).
_YAML_BLOCK = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The chunk buffer the published tensors are read into at first (it grows to the engine's largest chunk).
_FIRST_BUFFER = 1 << 20


class _HeadersDiffer(Exception):
    """The rebuilt merge's tensors (keys, shapes, dtypes) are not the published ones: said before any download."""


def verify(
    ref: str, *, tolerance_ulp: int = 2, eval: dict[str, Any] | None = None, create_pr: bool = False,
    token: str | bool | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
) -> VerifyReport:
    """Whether the merge at ``ref`` (``org/name[@rev]`` or a folder) is what its recipe makes.

    Never raises for what the merge, its recipe or its ingredients are: a recipe or an ingredient
    that cannot be found, read or rebuilt is the verdict ``cannot-verify``, with the reason.

    Args:
        tolerance_ulp: the most units in the last place a floating element may differ by and the merge
            still count as reproduced (rounding: another dtype's arithmetic, another order).
        eval: a recipe's ``eval`` section (``{"task": "image-classification", "data": ..., "split": ...}``): the
            published merge is then scored beside each ingredient and the base, in one model, as a soup is.
            Its errors (data missing, code not trusted) are raised, before any weights are downloaded.
        create_pr: open a pull request on the merge's repo adding the verdict (and the scores) to its card
            (:mod:`~hub_soup.verification.evidence`), unless it cannot be verified.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the logged-in one.
        trust_remote_code: allow the code ``eval`` names to run, and custom model code in configs.
        allow_pickle: load ingredients' pickles that execute code. The published recipe's own
            ``allow_pickle`` is never followed: it is the merge author's word, not the user's.
    """
    report = VerifyReport(ref=ref, tolerance_ulp=tolerance_ulp)
    spec = _evaluation(eval, trust_remote_code, token)
    try:
        published = resolve_ref(ref, token=token)
    except HubSoupError as exc:
        return _cannot_verify(report, exc)
    if create_pr:
        check_pr_target(published)  # a mistake of the command's, before any work: not a verdict
    try:
        _verify(report, published, token, spec, trust_remote_code, allow_pickle)
    except _HeadersDiffer:
        report.verdict = "differs"
    except HubSoupError as exc:
        return _cannot_verify(report, exc)
    logger.info("%s", report.headline())
    if create_pr:
        report.pr_url = open_pr(report, published, reproduce_command(report, eval), token)
    return report


def _cannot_verify(report: VerifyReport, exc: HubSoupError) -> VerifyReport:
    report.verdict, report.reason = "cannot-verify", exc.message + (f" ({exc.hint})" if exc.hint else "")
    logger.info("%s", report.headline())
    return report


def _evaluation(eval: dict[str, Any] | None, trust_remote_code: bool, token: str | bool | None) -> EvalSpec | None:
    """The evaluation asked for, validated as a recipe's ``eval`` section and checked as ``run`` checks it: its
    code trusted, its data there (relative paths from the working directory)."""
    if eval is None:
        return None
    spec = validated(EvalSpec, eval, "eval")
    check_trusted(spec.code_refs(), trust_remote_code)
    check_eval(spec, Path(), token)
    return spec


def _verify(
    report: VerifyReport, published: ResolvedRef, token: str | bool | None, evaluation: EvalSpec | None, trust: bool,
    allow_pickle: bool,
) -> None:
    report.published = published.pinned
    recipe, report.recipe_file = find_recipe(published, token)
    # who computed the weights: hub-soup pins its hub-soup.yaml; a mergekit config alone says mergekit did
    report.dialect = "hub-soup" if report.recipe_file == RECIPE_FILENAME else "mergekit"
    report.recipe_dtype = recipe.dtype
    recipe, resolved = resolve_models(rebuildable(recipe, allow_pickle), token)
    report.ingredients = [ref.pinned for ref in resolved]
    report.unpinned = [ref.label for ref in resolved if ref.kind != "local" and not _COMMIT.match(ref.revision or "")]
    kind = choose_kind(recipe, resolved, token)
    headers = published_headers(published, token)

    def before_download(local: Models[Checkpoint | None]) -> None:
        kind.check_before_download(local, token)
        rebuilt = kind.early_metas(local, token)
        if rebuilt is not None and headers is not None:
            compare_headers(rebuilt, headers, report)

    device = device_for(recipe.device)
    with opened_ingredients(kind.opens(), allow_pickle=recipe.allow_pickle, ema=recipe.ema, token=token,
                            before_download=before_download) as opened:
        soup = kind.prepare(opened, launched_backend(device), device)
        count = len(soup.checkpoints)
        made = kind.output(soup, list(range(count)), soup.method.weights_for(count), None)
        if headers is not None:
            compare_headers(made.metas, headers, report)
        with opened_published(published, token) as checkpoint:
            compare_headers(made.metas, checkpoint.metas, report)
            sink = ComparingSink(checkpoint, report.tolerance_ulp, _FIRST_BUFFER, input_scale(kind, soup, made.plan))
            made.write(sink)
            sink.finish()
            if evaluation is not None:
                scored = recipe.with_fields(eval=evaluation)
                score_published(report, scored, kind, soup, saved_weights(checkpoint, made.metas), trust)
    report.tensors, report.max_ulp = sink.tensors, sink.max_ulp
    report.differences = sorted(sink.differences, key=lambda d: (-d.beyond, -d.max_ulp, -d.differing))
    report.judged_by = "inputs" if any(d.judged_by == "inputs" for d in report.differences) else "result"
    if not report.differences:
        report.verdict = "bit-for-bit"
    elif not any(d.beyond for d in report.differences):
        report.verdict, report.reason = "within-ulp", rounding_reason(report)
    else:
        report.verdict = "differs"


def input_scale(kind: SoupKind[Any], soup: Soup, plan: MergePlan) -> InputScale | None:
    """The rebuild's inputs element by element, where they are: a full soup's tensors are each made of the same
    elements of their inputs (the engine's plan, with ``soup``'s checkpoints and base). An adapter soup's are
    not (a delta is a product of low-rank factors; a concatenated-rank adapter stacks them): ``None``, so its
    elements are judged against their own value alone."""
    return InputScale(soup.checkpoints, soup.base, plan) if isinstance(kind, Full) else None


def score_published(
    report: VerifyReport, recipe: Recipe, kind: SoupKind[Any], soup: Soup, published: Weights, trust: bool
) -> None:
    """Score the published merge beside each ingredient and the base (one model, as a soup is scored), and say
    whether it beats the best ingredient."""
    with ExitStack() as stack:
        scored = score(recipe, kind, soup, trust, stack, merged=published)
    roles: dict[str | None, Role] = {"soup": "merge", scored.base_name: "base"}
    report.scores = [
        Score(report.published or report.ref if model == "soup" else model, roles.get(model, "ingredient"),
              metric.dataset or one.dataset, metric.split or one.split, metric.name, value)
        for model, one in scores_of(scored) for metric, value in one.measurements()
    ]
    comparison = scored.comparison
    merged, best = comparison.soup, comparison.best
    said = "worse than" if comparison.soup_is_worse else "better than" if merged.better_than(best) else "as good as"
    report.comparison = (
        f"the merge ({merged}) is {said} its best ingredient {comparison.best_label} ({best}) on {merged.split}: "
        f"{merged.difference(best)}, {merged.primary.direction} is better"
    )


def find_recipe(published: ResolvedRef, token: str | bool | None) -> tuple[Recipe, str]:
    """The recipe a merge carries (the first of :data:`RECIPE_FILES` it has; in a card, the first fenced
    YAML block that is a mergekit config), and the file it was found in; local paths read from the folder.

    Raises:
        RecipeError: the merge carries no recipe, or one hub-soup cannot read (named with its line).
    """
    for name in RECIPE_FILES:
        text = _read_small_file(published, name, token)
        if text is not None and name == "README.md":
            text = card_config(text)
        if text is None:
            continue
        recipe = parse_recipe(text, f"{published.label}:{name}")
        if published.kind == "local" and published.path is not None:
            recipe = recipe.relative_to(published.path)
        logger.info("recipe: %s of %s", name, published.label)
        return recipe, name
    raise RecipeError(
        f"{published.label}: no recipe found: neither {RECIPE_FILENAME}, {MERGEKIT_CONFIG}, nor a mergekit config "
        "(a ```yaml block with merge_method) in its README.md",
        hint="only a merge that publishes the recipe that made it can be verified",
    )


def card_config(card: str) -> str | None:
    """The first fenced YAML block of a card that is a mergekit config (top-level ``merge_method``), or None."""
    for block in _YAML_BLOCK.findall(card):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and "merge_method" in data:
            return str(block)
    return None


def _read_small_file(published: ResolvedRef, name: str, token: str | bool | None) -> str | None:
    """A recipe or card file of the merge (a few kB; the Hub's at its pinned commit), or None if it has none."""
    if published.kind == "local":
        assert published.path is not None
        path = published.path / name
        return path.read_text() if path.is_file() else None
    if name not in published.files:
        return None
    assert published.repo_id is not None
    with hub_errors(published.repo_id, published.sha, action=f"download {name} of"):
        return Path(hf_hub_download(published.repo_id, name, revision=published.sha, token=token)).read_text()


def rebuildable(recipe: Recipe, allow_pickle: bool) -> Recipe:
    """The recipe without what only its run needed (its evaluation, its push): what made the weights;
    pickles that execute code loaded only if the user (``allow_pickle``), not the recipe, says so.

    Raises:
        RecipeError: a greedy soup or one with recalibrated BatchNorm statistics, whose weights depend on
            an evaluation (not rebuilt yet).
    """
    if recipe.greedy or recipe.recalibrate_bn:
        what = "a greedy soup" if recipe.greedy else "recalibrated BatchNorm statistics"
        raise RecipeError(
            f"the recipe makes {what}: its weights depend on an evaluation, which verify does not rerun yet",
            hint="verify a merge whose recipe has no greedy or recalibrate_bn",
        )
    return recipe.with_fields(eval=None, push=None, ensemble_reference=False, allow_pickle=allow_pickle)


def published_headers(published: ResolvedRef, token: str | bool | None) -> dict[str, TensorMeta] | None:
    """The published merge's tensors from its headers (over HTTP for a Hub one); None when its format cannot
    tell before the download."""
    if published.kind == "local":
        assert published.path is not None
        with open_checkpoint(published.path, label=published.label, ema=False) as checkpoint:
            return dict(checkpoint.metas)
    layout = remote_layout(published, token)
    return dict(layout.metas) if layout is not None else None


@contextmanager
def opened_published(published: ResolvedRef, token: str | bool | None) -> Iterator[Checkpoint]:
    """The published merge opened as it is (its weights downloaded, for a Hub one)."""
    path, sidecars = local_files(published, token)
    with open_checkpoint(path, label=published.label, ema=False, sidecars=sidecars) as checkpoint:
        yield checkpoint


def compare_headers(rebuilt: dict[str, TensorMeta], published: dict[str, TensorMeta], report: VerifyReport) -> None:
    """Record keys on one side only and tensors of another dtype or shape.

    Raises:
        _HeadersDiffer: there is any (the verdict is then ``differs``, and nothing more is read).
    """
    report.only_published = [key for key in published if key not in rebuilt]
    report.only_rebuilt = [key for key in rebuilt if key not in published]
    report.mismatched = [
        f"{key}: the recipe makes {_said(meta)}, the published merge has {_said(published[key])}"
        for key, meta in rebuilt.items() if key in published and meta != published[key]
    ]
    if report.only_published or report.only_rebuilt or report.mismatched:
        report.tensors = len(rebuilt)
        raise _HeadersDiffer


def _said(meta: TensorMeta) -> str:
    return f"{str(meta.dtype).removeprefix('torch.')} {list(meta.shape)}"


def rounding_reason(report: VerifyReport) -> str | None:
    """Why a rebuild differs from the published merge by a few ulp, where it is known."""
    if report.dialect != "mergekit":
        return None
    said = "; where the terms cancel, those roundings of the terms are many ulp of the result" if (
        report.judged_by == "inputs") else ""
    if report.recipe_dtype in ("bfloat16", "float16"):
        return (f"the recipe is a mergekit config: mergekit computes in the config's dtype ({report.recipe_dtype}), "
                f"rounding after every operation, where hub-soup computes in float32 and rounds once{said}")
    return f"the recipe is a mergekit config: mergekit rounds its arithmetic in another order than hub-soup{said}"
