"""The soup's model card: Hub metadata that links it to its ingredients, and a readable body.

Built with huggingface_hub's ``ModelCard``/``ModelCardData`` so the Hub shows the
soup in each ingredient's model tree (``base_model`` + ``base_model_relation:
merge``) and its scores in the evaluation widget (``model-index``). The card is
a view of the run's result (:class:`~hub_soup.report.SoupResult`: the pinned recipe and
ingredients, the plan, the scores), with no timestamps, so pushing the same soup twice
changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hub_soup.hub.library import HEAD_TAGS, detect_library
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.merging.engine import kernel_dtype
from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.plan import MergePlan
from hub_soup.report import score_rows

if TYPE_CHECKING:
    from hub_soup.merging.vocab import Vocabulary
    from hub_soup.report import SoupResult

logger = logging.getLogger(__name__)


# The transformers Auto class that loads a model of a pipeline tag with its head: ``AutoModel`` loads the
# bare model (a causal LM without its LM head), so the card's snippet names the one of the soup's tag. A head
# ``ForX`` is loaded by ``AutoModelForX``; the tags a PEFT task_type gives beyond those heads are added.
AUTO_CLASSES = {tag: f"AutoModel{head}" for head, tag in HEAD_TAGS} | {
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "feature-extraction": "AutoModel",
}


# The pipeline tag of a PEFT adapter's ``task_type``: with it, the card loads the base with its head.
PEFT_TASK_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def agreed_license(ingredients: Sequence[ResolvedRef], override: str | None) -> str | None:
    """The license every Hub ingredient shares; warns and returns ``None`` when they differ."""
    if override:
        return override
    licenses = {r.license for r in ingredients if r.kind != "local"}
    if len(licenses) == 1:
        return next(iter(licenses))
    if len(licenses) > 1:
        logger.warning(
            "the ingredients have different licenses (%s): the card names none; set one with --license "
            "after checking they allow it",
            ", ".join(sorted(str(x) for x in licenses)),
        )
    return None


def _repos(ref: ResolvedRef) -> list[str]:
    """The Hub repos a model of the soup comes from: its own and, where a LoRA adapter was applied to it
    (mergekit's ``model+lora``), the adapter's, as mergekit's cards list them."""
    return [r.repo_id for r in (ref, ref.lora) if r is not None and r.repo_id]


def build_card(result: SoupResult, *, config: dict[str, Any] | None) -> ModelCard:
    """The card of the soup a run made: a view of its result, like the CLI's closing lines and the step summary.

    Read from ``result``: where the soup will live (the pinned recipe's push repo, used in the loading
    snippet, else the output folder's name), its license and tags; every ingredient, pinned, with its weight and
    whether it went in (a greedy soup drops some); the base, listed first among ``base_model`` (the model
    tree shows the soup under it too, as mergekit's cards do), and each LoRA adapter applied to a model beside it; the method, described in its own words and
    paper when it has a ``summary``, with its parameters; the plan, so the card says what was averaged, how,
    and what was copied, in the recipe's ``dtype``; the scores (the model-index holds the soup's, every metric
    of each, the primary first, a metric of one of several eval sets under that set's name and split); the
    warnings (a soup pushed with ``force`` carries why it was held back); the pinned recipe, shown so the soup
    can be rebuilt. A soup of LoRA adapters (``adapter_card``) has their base alone as ``base_model`` (they
    are listed in the body and the recipe), and says how their deltas were combined.

    Args:
        config: the soup's ``config.json`` (decides timm vs transformers instructions), which only the card reads.
    """
    recipe = result.pinned_recipe
    repo_id = recipe.push.repo_id if recipe.push is not None else None
    adapter, ingredients, kept, scores = result.adapter_card, result.ingredients, result.kept, result.scores
    assert result.output is not None  # the card is written into the soup's folder
    name = repo_id or Path(os.path.abspath(result.output)).name  # -o . has a name too
    library, pipeline_tag = detect_library(config)
    library = library or next((r.library for r in ingredients if r.library), None)
    pipeline_tag = pipeline_tag or next((r.pipeline_tag for r in ingredients if r.pipeline_tag), None)
    if adapter is not None and adapter.task_type is not None:
        pipeline_tag = pipeline_tag or PEFT_TASK_TAGS.get(adapter.task_type)
    if adapter is not None and not adapter.merged:
        library = "peft"
    soup_scores = [s.score for s in scores if s.model == "soup"]
    own_tags = ["merge", "model-soup", "hub-soup", *(["lora"] if adapter is not None else []),
                *(["mergekit"] if recipe.mergekit_config is not None else [])]
    tags = recipe.push.tags if recipe.push is not None else []
    parents = [(result.base, True)] if adapter is not None else [(result.base, True), *zip(ingredients, kept)]
    data = ModelCardData(
        base_model=[repo for r, k in parents if k and r is not None for repo in _repos(r)] or None,
        base_model_relation="adapter" if adapter is not None and not adapter.merged else "merge",
        library_name=library,
        pipeline_tag=pipeline_tag,
        license=agreed_license(ingredients, recipe.push.license if recipe.push is not None else None),
        tags=[*own_tags, *(t for t in tags if t not in own_tags)],
        model_name=name.split("/")[-1] if soup_scores else None,
        eval_results=[
            EvalResult(
                task_type=pipeline_tag or "other",
                dataset_type=metric.dataset or s.dataset,
                dataset_name=metric.dataset or s.dataset,
                dataset_split=metric.split or s.split,
                metric_type=metric.measure,
                metric_value=round(value, 6),
            )
            for s in soup_scores
            for metric, value in s.measurements()
        ]
        or None,
    )
    if adapter is not None:
        first = adapter.summary
    else:
        done = arithmetic(result.plan, recipe.dtype, result.method)
        first = _what_it_is(result.method_title, result.method, sum(kept)) + (f" {done}" if done else "")
    lines = [
        f"# {name.split('/')[-1]}",
        "",
        first
        + (
            " The soup's BatchNorm running statistics were then recomputed on unlabelled evaluation "
            "inputs (as torch.optim.swa_utils.update_bn does), because that scored higher."
            if result.bn_recalibrated
            else ""
        ),
        "",
        "## Ingredients",
        "",
        "| # | model | commit | weight | in the soup |" + (" score |" if len(scores) > 1 else ""),
        "|---|---|---|---|---|" + ("---|" if len(scores) > 1 else ""),
    ]
    weight_of = iter(result.weights)
    for i, (ref, used) in enumerate(zip(ingredients, kept)):
        where, sha = _model_cell(ref)
        weight = f"{next(weight_of):.4f}" if used else "-"
        row = f"| {i} | {where} | {sha} | {weight} | {'yes' if used else 'no'} |"
        if len(scores) > 1:
            match = next((s.score for s in scores if s.model == ref.label), None)
            row += f" {match.value:.4f} |" if match else " |"
        lines.append(row)
    if result.base is not None:
        where, sha = _model_cell(result.base)
        used_by = f", used by the {result.method.name} method" if result.method.takes_base() else ""
        lines += ["", f"Base model ({result.base_role}{used_by}): {where} at {sha}"]
    if result.vocabulary is not None:
        left_out = [ref.label for ref, used in zip(ingredients, kept) if not used]
        lines += ["", "## Vocabulary", "", *vocabulary_lines(result.vocabulary, left_out, scored=bool(scores))]
    parameters = result.method.parameters.model_dump(mode="json", by_alias=True)
    if parameters:
        lines += ["", "## Parameters", "", *(f"- `{key}`: `{value}`" for key, value in parameters.items())]
    if scores:
        lines += ["", "## Evaluation", "", "| model | split | metric | value |", "|---|---|---|---|"]
        lines += score_rows(scores)
    if result.warnings:
        lines += ["", "## Warnings", "", "hub-soup warned about this soup when it was made:", ""]
        lines += [f"- {warning}" for warning in result.warnings]
    rebuild = "`hub-soup run hub-soup.yaml -o rebuilt`" + (
        " (add `--no-push` to keep it local: the recipe pushes)" if recipe.push is not None else ""
    )
    usage = (
        _peft_usage(result.base, pipeline_tag, repo_id, name) if adapter is not None and not adapter.merged
        else _usage(library, pipeline_tag, repo_id, name)
    )
    lines += ["", "## How to use", "", *usage, "", "## Recipe", "",
              f"Rebuild this soup bit for bit, from its folder, with {rebuild}:", "", "```yaml",
              recipe.to_yaml().rstrip(), "```", ""]
    if recipe.mergekit_config is not None:  # mergekit's cards carry their config so: the Hub's users look for it there
        lines += ["## Configuration", "", ("The following YAML configuration (mergekit's format, read by hub-soup; "
                  "also in `mergekit_config.yml`) was used to produce this model:"), "", "```yaml",
                  recipe.mergekit_config.rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _model_cell(ref: ResolvedRef) -> tuple[str, str]:
    """How the card names a model (a link to its Hub page, or its local label) and its commit; a model with a
    LoRA adapter applied (mergekit's model+lora) is named with the adapter's, after a ``+``."""
    own = replace(ref, lora=None)
    where = f"[{own.repo_id}](https://huggingface.co/{own.repo_id})" if own.repo_id else f"`{own.label}`"
    sha = f"`{own.sha[:12]}`" if own.sha else "local"
    if ref.lora is None:
        return where, sha
    lora_where, lora_sha = _model_cell(ref.lora)
    return f"{where} + LoRA {lora_where}", f"{sha} + {lora_sha}"


def _what_it_is(method: str, merge_method: MergeMethod, count: int) -> str:
    """The card's first sentence: a weight average (the model soup), or what the method says it did."""
    made_with = "made with [hub-soup](https://github.com/hub-soup/hub-soup)"
    if merge_method.summary is None:
        return (
            f"A model soup: the {method} weight average of {count} fine-tuned models "
            f"([Wortsman et al., 2022](https://arxiv.org/abs/2203.05482)), {made_with}."
        )
    title = merge_method.title or merge_method.name
    paper = f" ({merge_method.paper})" if merge_method.paper else ""
    chosen = " (chosen by greedy selection on held-out scores)" if method.startswith("greedy") else ""
    return (
        f"A merge of {_count(count, 'fine-tuned model')}{chosen} by {title}{paper}, {made_with}: "
        f"{merge_method.card_summary()}"
    )


def arithmetic(plan: MergePlan, dtype: str | None, method: MergeMethod) -> str:
    """What the merge did to each kind of tensor, true for this plan, ``--dtype`` and method.

    A method with a card ``summary`` merged its tensors (it is not an average); the dtype
    they were computed in is the engine's own rule (:func:`hub_soup.merging.engine.kernel_dtype`);
    excluded floating tensors are copied (and cast to ``--dtype``); integer and bool tensors are
    copied unchanged.
    """
    merged = method.summary is not None
    averaged = [t for t in plan.tensors if t.average]
    excluded = [t for t in plan.tensors if not t.average and t.meta.dtype.is_floating_point]
    integers = [t for t in plan.tensors if not t.meta.dtype.is_floating_point]
    sentences = []
    if averaged:
        out = getattr(torch, dtype) if dtype else None
        wide = {kernel_dtype(method, t.meta.dtype, out or t.meta.dtype) == torch.float64 for t in averaged}
        accumulated = " (float64 ones in float64)" if wide == {True, False} else ""
        where = "float64" if wide == {True} else "float32"
        stored = f"stored as {dtype}" if dtype else "each stored in its own dtype"
        sentences.append(
            f"{_count(len(averaged), 'floating tensor')}"
            + (", BatchNorm running statistics included," if plan.has_batchnorm else "")
            + f" {'was' if len(averaged) == 1 else 'were'} {'merged' if merged else 'averaged'} in {where}"
            + f"{accumulated} and {stored}."
        )
    if excluded:
        sentences.append(
            f"{_count(len(excluded), 'floating tensor')} left out of the {'merge' if merged else 'average'} (`--exclude`) "
            + f"{'was' if len(excluded) == 1 else 'were'} taken from the first ingredient"
            + (f" (cast to {dtype})." if dtype else " unchanged.")
        )
    if integers:
        sentences.append(
            f"{_count(len(integers), 'integer or bool tensor')} "
            + f"{'was' if len(integers) == 1 else 'were'} taken from the first ingredient unchanged."
        )
    return " ".join(sentences)


def vocabulary_lines(vocabulary: Vocabulary, left_out: Sequence[str] = (), *, scored: bool = False) -> list[str]:
    """What the card says of a soup whose ingredients' vocabularies differ: the vocabulary chosen, how many
    tokens each rule filled, each token filled with an average or a zero row; ``scored``: how models of
    different tokenizers were scored; ``left_out``: the ingredients greedy left out, whose rows may still
    fill tokens."""
    chosen = (f"The ingredients' vocabularies differ. The soup's is `{vocabulary.source}` "
              f"({_count(vocabulary.count, 'token')}, {_count(vocabulary.size, 'row')}): each model's token-indexed "
              "tensors (embeddings, `lm_head`) were aligned by token string into it, a token a model lacks filled as "
              "mergekit 0.1.5 fills it, then merged.")
    lines = [
        chosen,
        "",
        "| rows | how many |",
        "|---|---|",
        *(f"| {rule} | {count} |" for rule, count in vocabulary.counts().items()),
    ]
    made = [f"`{token}` ({rule})" for token, rule in vocabulary.rules.items() if rule in ("average", "zero")]
    if made:
        lines += ["", "Filled with an average or a zero row: " + ", ".join(made) + "."]
    if vocabulary.padded:
        lines += ["", f"{_count(vocabulary.padded, 'padding row')} (`pad_to_multiple_of`): each model's mean row."]
    if scored:
        lines += ["", ("Each ingredient was scored in a model of its own, the eval texts tokenized by its own "
                       "tokenizer, and the soup in its vocabulary, by its tokenizer. A per-token metric (perplexity) "
                       "counts each tokenizer's tokens: where two tokenizers split a text differently (a chat marker "
                       "one token to one, several to the other), the scores compare tokenizations as well as weights.")]
    if left_out:
        lines += ["", (f"Greedy selection left out {', '.join(left_out)}; the vocabulary, and the row a token a "
                       "model lacks takes, are still those chosen from every ingredient's tokenizer: a token only a "
                       "left-out ingredient has keeps that ingredient's row.")]
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _auto_class(pipeline_tag: str | None) -> tuple[str, str | None]:
    """The Auto class that loads a model of ``pipeline_tag`` with its head, and a note for the snippet
    when the tag names none (``AutoModel``: the bare model)."""
    if pipeline_tag in AUTO_CLASSES:
        return AUTO_CLASSES[pipeline_tag], None
    return "AutoModel", "or the Auto class of its task"


def _soup_location(repo_id: str | None, name: str) -> tuple[str, str | None]:
    """Where the snippet loads the soup from, and a note on what that is: the Hub repo, or, for a soup
    not pushed, this card's own folder, by its name, as seen from the folder that holds it."""
    if repo_id:
        return repo_id, None
    return f"./{name}", "this folder, from the one that holds it"


def _comment(*notes: str | None) -> str:
    """The notes as one trailing Python comment (nothing without any)."""
    said = [note for note in notes if note]
    return f"  # {'; '.join(said)}" if said else ""


def _peft_usage(base: ResolvedRef | None, pipeline_tag: str | None, repo_id: str | None, name: str) -> list[str]:
    """How to load an adapter soup: on its base, with PEFT."""
    if base is not None and base.repo_id:
        where, at = base.repo_id, None
    else:  # a local base is named as the recipe names it, from where the soup was made
        where = base.ref if base is not None else "path/to/base"
        at = "the base: a local folder where the soup was made" if base is not None else None
    revision = f", revision='{base.sha}'" if base is not None and base.repo_id and base.sha else ""
    auto, other = _auto_class(pipeline_tag)
    soup, local = _soup_location(repo_id, name)
    return [
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f"base = {auto}.from_pretrained('{where}'{revision}){_comment(at, other)}",
        f"model = PeftModel.from_pretrained(base, '{soup}'){_comment(local)}",
        "```",
    ]


def _usage(library: str | None, pipeline_tag: str | None, repo_id: str | None, name: str) -> list[str]:
    """How to load the soup: from its Hub repo, or, for a soup not pushed, from its folder."""
    where, local = _soup_location(repo_id, name)
    if library == "timm":
        prefix = "hf-hub:" if repo_id else "local-dir:"
        load = f"model = timm.create_model('{prefix}{where}', pretrained=True){_comment(local)}"
        return ["```python", "import timm", "", load, "```"]
    if library == "transformers":
        auto, other = _auto_class(pipeline_tag)
        return [
            "```python",
            f"from transformers import {auto}",
            "",
            f"model = {auto}.from_pretrained('{where}'){_comment(local, other)}",
            "```",
        ]
    return ["```python", "from safetensors.torch import load_file", "", "state_dict = load_file('model.safetensors')", "```"]
