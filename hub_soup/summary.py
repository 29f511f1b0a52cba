"""A Markdown report of a run for GitHub Actions' job summary (``$GITHUB_STEP_SUMMARY``).

A view of the run's result (:class:`~hub_soup.report.SoupResult`), as the card is: the same
facts, shaped for a reviewer of a pull request that changed a recipe: what went in, what came
out, how it scored, where it landed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hub_soup.io.sizes import describe_size
from hub_soup.report import score_rows

if TYPE_CHECKING:  # a failed run writes its summary too, without importing the pipeline (and torch)
    from hub_soup.report import SoupResult


def markdown_summary(result: SoupResult) -> str:
    """The run as Markdown: ingredient table, scores, output and Hub link."""
    lines = ["## hub-soup", "", "| # | ingredient | commit | weight | in the soup |", "|---|---|---|---|---|"]
    weights = iter(result.weights)
    for i, (ref, kept) in enumerate(zip(result.ingredients, result.kept)):
        sha = f"`{ref.sha[:12]}`" if ref.sha else "local"
        weight = f"{next(weights):.4f}" if kept else "-"
        lines.append(f"| {i} | `{ref.repo_id or ref.path}` | {sha} | {weight} | {'yes' if kept else 'no'} |")
    if result.base is not None:
        sha = f"`{result.base.sha[:12]}`" if result.base.sha else "local"
        lines += ["", f"Base model ({result.base_role}): `{result.base.repo_id or result.base.path}` at {sha}"]
    if result.scores:
        lines += ["", "| model | split | metric | value |", "|---|---|---|---|"]
        lines += score_rows(result.scores)
    stats = result.stats
    where = f"`{result.output}`" if result.output is not None else "a temporary folder, removed after the push"
    lines += [
        "",
        (
            f"{stats.tensors} tensors ({stats.averaged} {result.combined}), {stats.elements:,} elements, "
            f"{describe_size(stats.bytes_written)} written to {where} in {stats.seconds:.1f}s."
        ),
    ]
    lines += [f"> **warning:** {w}" for w in result.warnings]
    if result.push is not None:
        url = result.push.pr_url or result.push.commit_url
        what = "Pull request" if result.push.pr_url else ("Commit" if result.push.changed else "Unchanged, already at")
        lines += ["", f"{what}: {url}"]
    return "\n".join(lines) + "\n"


def write_step_summary(text: str) -> None:
    """Append ``text`` to ``$GITHUB_STEP_SUMMARY`` when running inside GitHub Actions."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(text + "\n")
