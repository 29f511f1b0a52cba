"""What ``hub-soup verify`` found: the verdict, the evidence behind it, and how it is shown.

Plain data (no torch), so the command line, ``--json``, the step summary and the card's pull
request all render one value. The verdict is one of four words, each with its exit code:
``bit-for-bit`` and ``within-ulp`` (0: reproduced), ``differs`` (4) and ``cannot-verify`` (2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hub_soup.errors import EXIT_BAD_INPUT, EXIT_OK

#: The exit code of a merge whose weights are not what its recipe makes.
EXIT_DIFFERS = 4

Verdict = Literal["bit-for-bit", "within-ulp", "differs", "cannot-verify"]
Role = Literal["merge", "ingredient", "base"]  # what a scored model is to the merge
# What the tolerance's ulps are of: each element's rebuilt value, or the larger of it and its inputs' magnitude.
Scale = Literal["result", "inputs"]
EXIT_CODES: dict[Verdict, int] = {
    "bit-for-bit": EXIT_OK, "within-ulp": EXIT_OK, "differs": EXIT_DIFFERS, "cannot-verify": EXIT_BAD_INPUT,
}
#: How many differing tensors the report names (the largest differences first).
SHOWN = 10


@dataclass
class TensorDifference:
    """One tensor whose rebuilt and published elements are not the same bits.

    Attributes:
        elements: the tensor's element count.
        differing: how many elements differ.
        beyond: how many differ by more than the tolerance, judged by :attr:`judged_by` (for an integer or bool
            tensor, every differing one).
        max_ulp: the largest difference in units in the last place of ``dtype`` (for an integer or bool
            tensor, the largest difference of values), of the elements' own values.
        floating: a floating tensor (only those may differ within a tolerance).
        beyond_own: how many differ by more than the tolerance in ulp of their own rebuilt value.
        judged_by: ``inputs`` where those were judged again against their inputs' scale (the tolerance in ulp
            of the larger of the rebuilt value and the largest of the element's inputs); ``result`` where none
            was beyond its own value's tolerance, or the tensor's inputs are not known element by element.
    """

    key: str
    dtype: str
    elements: int
    differing: int
    beyond: int
    max_ulp: int
    floating: bool = True
    beyond_own: int = 0
    judged_by: Scale = "result"


@dataclass
class Score:
    """One model's value of one metric on one split of the evaluation (``--eval-task``): a row of the table."""

    model: str
    role: Role
    dataset: str
    split: str
    metric: str
    value: float


@dataclass
class VerifyReport:
    """A verification of one published merge.

    Attributes:
        ref: the merge as given (``org/name[@rev]`` or a folder).
        published: the merge pinned (``org/name@sha``), or the folder.
        recipe_file: where its recipe was found (``hub-soup.yaml``, ``mergekit_config.yml``, ``README.md``).
        dialect: ``hub-soup`` or ``mergekit``.
        recipe_dtype: the dtype the recipe names, if any (a mergekit config's arithmetic dtype).
        ingredients: every ingredient (and the base) as resolved, pinned.
        unpinned: those the recipe does not pin, resolved to today's commit.
        tolerance_ulp: the most ulps a floating element may differ by and the merge count as reproduced.
        judged_by: what those ulps were of: ``result``, each element's own value; ``inputs``, for some elements
            (beyond the tolerance of their own value) the larger of it and their inputs' scale.
        max_ulp: the largest difference by dtype, over every compared tensor.
        differences: every tensor that differs, largest first.
        only_published, only_rebuilt: keys on one side only.
        mismatched: tensors whose dtype or shape differ, said in words.
        reason: why the weights differ within the tolerance, or why the merge cannot be verified.
        scores: with ``--eval-task``, the merge's, each ingredient's and the base's scores.
        comparison: with ``--eval-task``, whether the merge beats its best ingredient, and by how much.
        pr_url: with ``--create-pr``, the pull request that carries the evidence.
    """

    ref: str
    verdict: Verdict = "cannot-verify"
    published: str | None = None
    recipe_file: str | None = None
    dialect: str | None = None
    recipe_dtype: str | None = None
    ingredients: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    tolerance_ulp: int = 2
    judged_by: Scale = "result"
    tensors: int = 0
    max_ulp: dict[str, int] = field(default_factory=dict)
    differences: list[TensorDifference] = field(default_factory=list)
    only_published: list[str] = field(default_factory=list)
    only_rebuilt: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reason: str | None = None
    scores: list[Score] = field(default_factory=list)
    comparison: str | None = None
    pr_url: str | None = None

    @property
    def exit_code(self) -> int:
        """0 reproduced (either form), 4 differs, 2 cannot verify."""
        return EXIT_CODES[self.verdict]

    @property
    def reproduced(self) -> bool:
        return self.verdict in ("bit-for-bit", "within-ulp")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data (``--json``), with its exit code and one-line verdict."""
        return asdict(self) | {"exit_code": self.exit_code, "summary": self.headline()}

    def headline(self) -> str:
        """The verdict in one line."""
        if self.verdict == "bit-for-bit":
            return f"reproduced bit for bit: all {self.tensors} tensors are the recipe's, to the last bit"
        if self.verdict == "within-ulp":
            worst = ", ".join(f"{dtype} {ulp} ulp" for dtype, ulp in sorted(self.max_ulp.items()) if ulp)
            if self.judged_by == "inputs":
                return (f"reproduced within {self.tolerance_ulp} ulp of the inputs' scale (largest difference: {worst} "
                        "of the result)")
            return f"reproduced within {self.tolerance_ulp} ulp (largest difference: {worst})"
        if self.verdict == "differs":
            return "differs: the published weights are not what the recipe makes"
        return f"cannot verify: {self.reason}"

    def text(self) -> str:
        """The report as the command prints it."""
        lines = [f"{self.published or self.ref}: {self.headline()}"]
        if self.recipe_file is not None:
            lines.append(f"  recipe: {self.recipe_file} ({self.dialect})")
        lines += [f"  ingredient: {ref}" for ref in self.ingredients]
        if self.unpinned:
            lines.append(
                f"  not pinned by the recipe, so resolved to today's commits: {', '.join(self.unpinned)}; the "
                "verdict is only as good as that (a later commit of an ingredient makes another merge)"
            )
        if self.verdict == "within-ulp" and self.reason:
            lines.append(f"  why: {self.reason}")
        if self.judged_by == "inputs":
            lines.append(f"  tolerance: {self.inputs_rule()}")
        if self.verdict == "differs":
            lines += self._difference_lines()
        lines += self.score_lines()
        if self.pr_url:
            lines.append(f"  pull request: {self.pr_url}")
        return "\n".join(lines)

    def markdown(self, heading: str = "## hub-soup verify") -> str:
        """The report as Markdown: the step summary in GitHub Actions, and the section of the card a pull request
        adds (``heading`` is its first line)."""
        lines = [heading, "", f"**{self.headline()}**", ""]
        if self.recipe_file is not None:
            lines += [f"Merge `{self.published}`, rebuilt from its `{self.recipe_file}` ({self.dialect} recipe):", ""]
        if self.ingredients:
            lines += ["| ingredient (and base) | commit |", "|---|---|"]
            lines += [f"| `{ref.rsplit('@', 1)[0]}` | `{ref.rsplit('@', 1)[1][:12] if '@' in ref else 'local'}` |"
                      for ref in self.ingredients]
            lines.append("")
        if self.unpinned:
            lines += [f"Not pinned by the recipe, so resolved to the commits of the day: {', '.join(self.unpinned)}.", ""]
        if self.verdict == "within-ulp" and self.reason:
            lines += [f"Why: {self.reason}.", ""]
        if self.judged_by == "inputs":
            lines += [f"Tolerance: {self.inputs_rule()}.", ""]
        if self.verdict == "differs":
            lines += [f"- {line.strip()}" for line in self._difference_lines()] + [""]
        if self.scores:
            lines += ["| model | role | split | metric | value |", "|---|---|---|---|---|"]
            lines += [f"| `{s.model}` | {s.role} | {s.split} | {s.metric} | {s.value:.4f} |" for s in self.scores]
            lines.append("")
        if self.comparison:
            lines += [self.comparison[0].upper() + self.comparison[1:] + ".", ""]
        return "\n".join(lines)

    def inputs_rule(self) -> str:
        """The inputs' scale rule in words (said wherever it judged)."""
        return (f"an element counts as reproduced when it is within {self.tolerance_ulp} ulp of the larger of its "
                "rebuilt value and its inputs' largest magnitude there (each ingredient's and the base's value): "
                "arithmetic in a low precision rounds each term it adds in ulps of that term, which are many ulp "
                "of a result where the terms cancel")

    def _difference_lines(self) -> list[str]:
        lines = [f"  only in the published merge: {key}" for key in self.only_published[:SHOWN]]
        lines += [f"  missing from the published merge: {key}" for key in self.only_rebuilt[:SHOWN]]
        for side, keys in (("published", self.only_published), ("rebuilt", self.only_rebuilt)):
            if len(keys) > SHOWN:
                lines.append(f"  ... and {len(keys) - SHOWN} more keys only in the {side} merge")
        lines += [f"  {line}" for line in self.mismatched[:SHOWN]]
        for d in self.differences[:SHOWN]:
            if d.floating and d.judged_by == "inputs":
                lines.append(f"  {d.key}: {d.beyond:,} of {d.elements:,} elements differ by more than "
                             f"{self.tolerance_ulp} ulp of their inputs' scale ({d.beyond_own:,} by more than "
                             f"{self.tolerance_ulp} ulp of their own value, by up to {d.max_ulp} ulp; {d.dtype}; "
                             f"{d.differing:,} differ at all)")
            elif d.floating:
                lines.append(f"  {d.key}: {d.beyond:,} of {d.elements:,} elements differ by more than "
                             f"{self.tolerance_ulp} ulp, by up to {d.max_ulp} ulp ({d.dtype}; {d.differing:,} differ "
                             "at all)")
            else:
                lines.append(f"  {d.key}: {d.differing:,} of {d.elements:,} elements differ, by up to {d.max_ulp} "
                             f"({d.dtype})")
        if len(self.differences) > SHOWN:
            lines.append(f"  ... and {len(self.differences) - SHOWN} more tensors differ")
        return lines

    def score_lines(self) -> list[str]:
        """The evaluation table and what it says, when there was one."""
        if not self.scores:
            return []
        width = max(len(s.model) for s in self.scores)
        lines = ["", f"  {'model':<{width}}  {'role':<10}  split       metric       value"]
        lines += [f"  {s.model:<{width}}  {s.role:<10}  {s.split:<10}  {s.metric:<12} {s.value:.4f}"
                  for s in self.scores]
        if self.comparison:
            lines += ["", f"  {self.comparison}"]
        return lines
