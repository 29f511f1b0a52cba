"""The evidence given back: a pull request on the merge's repo adding what ``verify`` found to its card.

The card gets the merge's scores in its model-index (the results the Hub shows beside the
model, replacing earlier results of the same dataset, split and metric) and a section with the
verdict, the ingredients at their commits, the score table and the command that reproduces the
check, between markers, so a later verification replaces the section instead of adding another.
A pull request, not a commit: the evidence is a community contribution for the owner to accept.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download

from hub_soup.cli.options import EVAL_FLAGS
from hub_soup.errors import RecipeError
from hub_soup.hub.errors import hub_errors
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.verification.report import VerifyReport

BEGIN, END = "<!-- hub-soup verify -->", "<!-- /hub-soup verify -->"
_SECTION = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
# Evaluation fields that place the model on one machine's devices: no part of how to reproduce a score.
_PLACEMENT = ("device_map", "max_memory", "offload_folder")


def check_pr_target(published: ResolvedRef) -> str:
    """The Hub repo a pull request goes to.

    Raises:
        RecipeError: the merge is a local folder (a pull request needs a Hub repo).
    """
    if published.kind == "local" or published.repo_id is None:
        raise RecipeError(f"--create-pr: {published.label} is a local folder, not a Hub repo",
                          hint="verify the merge by its Hub id (org/name) to open a pull request on it")
    return published.repo_id


def reproduce_command(report: VerifyReport, eval: Mapping[str, Any] | None) -> str:
    """The ``hub-soup verify`` command that checks the same merge, at its commit, the same way."""
    words = ["hub-soup", "verify", report.published or report.ref]
    if report.tolerance_ulp != 2:
        words += ["--tolerance-ulp", str(report.tolerance_ulp)]
    eval = eval or {}
    if "task" in eval:
        words += ["--eval-task", eval["task"]]
    for field, _, flag in EVAL_FLAGS:
        value = eval.get(field)
        if value is None or field in _PLACEMENT:
            continue
        if field == "higher_is_better":
            words += [] if value else [flag]
        else:
            words += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def open_pr(report: VerifyReport, published: ResolvedRef, command: str, token: str | bool | None) -> str:
    """Open the pull request on the merge's repo (its card read at the verified commit); its URL."""
    repo_id = check_pr_target(published)
    card = _card(published, token)
    data = card.data
    assert isinstance(data, ModelCardData)  # a model card's
    name = data.model_name or repo_id.split("/")[-1]
    merged = [s for s in report.scores if s.role == "merge"]
    task = data.pipeline_tag or "other"
    new = [
        EvalResult(task_type=task, dataset_type=s.dataset, dataset_name=s.dataset, dataset_split=s.split,
                   metric_type=s.metric.removeprefix(f"{s.dataset}/"), metric_value=round(s.value, 6))
        for s in merged
    ]
    replaced = {(r.dataset_type, r.dataset_split, r.metric_type) for r in new}
    kept = [r for r in data.eval_results or [] if (r.dataset_type, r.dataset_split, r.metric_type) not in replaced]
    if new:
        data.eval_results, data.model_name = [*kept, *new], name
    section = "\n".join([BEGIN, report.markdown("## Verification (hub-soup verify)"), "Reproduce the check:", "",
                         f"```bash\n{command}\n```", END])
    text = card.text
    card.text = _SECTION.sub(lambda _: section, text) if _SECTION.search(text) else f"{text.rstrip()}\n\n{section}\n"
    added = "that verdict to the card" + (", and the merge's scores to its model-index" if new else "")
    found = f"**{report.headline()}**"
    description = "\n\n".join([
        f"`hub-soup verify` rebuilt this merge from the recipe it publishes and compared it with its weights: {found}.",
        f"This pull request adds {added}. To check it yourself:",
        f"```bash\n{command}\n```",
    ])
    with hub_errors(repo_id, action="open a pull request on"):
        info = HfApi().create_commit(
            repo_id, [CommitOperationAdd("README.md", str(card).encode())], token=token, create_pr=True,
            commit_message=f"hub-soup verify: {report.verdict}", commit_description=description,
        )
    assert info.pr_url is not None
    return info.pr_url


def _card(published: ResolvedRef, token: str | bool | None) -> ModelCard:
    """The merge's card at the verified commit (an empty one if it has none)."""
    if "README.md" not in published.files:
        return ModelCard("---\n---\n")
    assert published.repo_id is not None
    with hub_errors(published.repo_id, published.sha, action="download the card of"):
        return ModelCard.load(hf_hub_download(published.repo_id, "README.md", revision=published.sha, token=token))
