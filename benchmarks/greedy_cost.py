"""What a greedy soup costs, in evaluations of one model (recipes/quickstart.yaml, small timm models).

    .venv/bin/python benchmarks/greedy_cost.py [--recipe recipes/quickstart.yaml] [--repeat 3]

Measures, in one process with torch threads as noted:
  - one evaluation: ``Evaluator.score_state_dict`` of one ingredient on the held-out split
    (the data is loaded once, before timing, as the pipeline does);
  - the greedy loop: ``greedy_soup`` with the recipe's options (BN recalibration, test split);
  - the same greedy loop without the test split and ensemble, the part that selection needs;
and, as a separate process, the whole ``hub-soup run RECIPE`` (start-up, data loading, writing).
Prints a markdown table; benchmarks/run.py's report includes the last one saved.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hub_soup.align import align
from hub_soup.evaluate import Evaluator
from hub_soup.greedy import greedy_soup
from hub_soup.pipeline import layouts_of
from hub_soup.read import open_checkpoint
from hub_soup.recipe import load_recipe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
merge = importlib.import_module("hub_soup.merge")  # the package's `merge` function shadows the module


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    assert recipe.eval is not None and recipe.greedy, "needs a greedy recipe with eval"
    checkpoints = [open_checkpoint(REPO / i.ref) for i in recipe.ingredients]
    plan = align(layouts_of(checkpoints), recipe.exclude)
    labels = [c.label for c in checkpoints]
    n = len(checkpoints)
    start = time.perf_counter()
    evaluator = Evaluator(recipe.eval, checkpoints[0])
    test_evaluator = Evaluator(recipe.eval, checkpoints[0], split=recipe.eval.test_split) if recipe.eval.test_split else None
    load_seconds = time.perf_counter() - start
    average_keys = {t.key for t in plan.tensors if t.average}

    def load(i: int) -> dict[str, torch.Tensor]:
        return merge.aligned_state_dict(checkpoints[i], plan, i)

    state = load(0)
    evaluator.score_state_dict(state)  # warm-up: first model build, first forward
    one_eval, _ = timed(lambda: evaluator.score_state_dict(state), args.repeat)
    greedy_selection, report = timed(
        lambda: greedy_soup(labels, load, evaluator, average_keys=average_keys,
                            recalibrate_bn_batches=recipe.recalibrate_bn), args.repeat)
    greedy_full, _ = timed(
        lambda: greedy_soup(labels, load, evaluator, average_keys=average_keys,
                            recalibrate_bn_batches=recipe.recalibrate_bn, test_evaluator=test_evaluator,
                            ensemble=recipe.ensemble_reference), args.repeat)
    out = HERE / "_work" / "out" / "greedy-quickstart"
    cli_times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        subprocess.run([str(REPO / ".venv" / "bin" / "hub-soup"), "-q", "run", str(args.recipe), "-o", str(out),
                        "--overwrite"], check=True, capture_output=True)
        cli_times.append(time.perf_counter() - start)
    cli = statistics.median(cli_times)
    threads = torch.get_num_threads()
    examples = evaluator.examples
    rows = [
        ("one evaluation of one model (val split)", one_eval),
        (f"N = {n} evaluations (N x the line above)", n * one_eval),
        ("greedy selection loop (BN recalibration of every candidate)", greedy_selection),
        ("greedy loop as the pipeline runs it (+ test split, ensemble yardstick)", greedy_full),
        ("loading and preprocessing the eval data (val + test), once", load_seconds),
        ("whole `hub-soup run` (process start, import, data, greedy, write)", cli),
    ]
    print(f"Greedy soup cost: {args.recipe.relative_to(REPO)} ({n} ingredients, {examples} val examples, "
          f"torch threads {threads}, median of {args.repeat})\n")
    print("| what | seconds | in evaluations of one model |")
    print("|---|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.2f} | {seconds / one_eval:.1f} |")
    kept = sum(report.kept)
    print(f"\nThe greedy soup kept {kept} of {n} ingredients.")


if __name__ == "__main__":
    sys.exit(main())
