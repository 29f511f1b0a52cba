"""Memory and time of evaluated soups (greedy) against a plain merge of the same ingredients.

    .venv/bin/python benchmarks/greedy_memory.py                          # 0.5b and 1.5b, N = 3 (and 8 if there)
    .venv/bin/python benchmarks/greedy_memory.py --sizes tiny --n 3       # a smoke run of the script (seconds)
    .venv/bin/python benchmarks/greedy_memory.py --models DIR --sizes 0.5b --n 3 8

The ingredients are benchmarks/run.py's perturbed copies ``ing1`` .. ``ingN`` of a random model
(``--models``, default ``benchmarks/_work/models``), read only. ``run.py --n 8`` writes ``ing0..ing7``; N = 8
here needs ``ing8`` too: ``cd benchmarks && python -c "import run; run.generate('0.5b', 9)"``.
run.py saves no tokenizer, so each is seen through a folder of its own under ``_work/greedy``:
links to its weight files and config, and a word-level tokenizer of the model's vocabulary
written there (``t0``, ``t1``... are token ids). The eval data is ``--texts`` texts of ``--words``
tokens sampled from the plain soup of the N copies, the ``merge`` run's output (a ``datasets``
folder, split ``validation``). These random models are near uniform (perplexity ~1e5 of a 151,936-word
vocabulary), so which copies greedy keeps on such texts is noise: it kept one or two of three here.
Greedy's cost grows with what it keeps (each candidate merges every kept ingredient again), so a
second greedy run, ``greedy-all``, is scored by task ``custom`` with :func:`closeness`, minus the
distance of one small weight to the plain soup's: each copy added moves a candidate towards the
soup, so it keeps all N, greedy's most expensive case, as with fine-tunes that all help.

For each size and N, four processes, each under ``/usr/bin/time -v`` (peak RSS) with its peak
RssAnon sampled every 20 ms, the page cache warm (inputs read just before):
  - ``bare``: ``import torch`` and exit, the baseline working memory is measured from;
  - ``merge``: ``hub_soup.run`` of the plain uniform soup (what ``hub-soup merge`` runs);
  - ``greedy``: ``hub_soup.run`` of the greedy soup scored by task causal-lm (perplexity);
  - ``greedy-all``: the same greedy soup scored by :func:`closeness` (keeps all N).
The three runs are timed inside the process around ``hub_soup.run``; in the greedy run, the time
spent in ``Evaluator.score`` (forward passes) and in building the evaluators (reading and
tokenizing the data) is added up, so "beyond evaluations" is the rest: streaming models into the
model instance, merging candidates, writing. Results go to ``_work/greedy_memory.jsonl``; the
table is printed (markdown), for benchmarks/RESULTS.md's greedy section.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from run import measure_output  # benchmarks/run.py: this script's folder is first on sys.path

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = WORK / "greedy_memory.jsonl"


def ingredient_views(models: Path, size: str, indices: Sequence[int], work: Path) -> list[Path]:
    """Folders ``work/SIZE/ingI`` holding links to the weights and config of ``models/SIZE/ingI``, and a tokenizer."""
    views = []
    for i in indices:
        source = models / size / f"ing{i}"
        if not (source / "config.json").is_file():
            raise SystemExit(f"{source}: no such ingredient; generate it with benchmarks/run.py's generate(size, N + 1)")
        view = work / size / f"ing{i}"
        view.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.suffix in (".safetensors", ".json") and not (view / path.name).exists():
                (view / path.name).symlink_to(path.resolve())
        if not (view / "tokenizer.json").exists():
            vocab_size = json.loads((source / "config.json").read_text())["vocab_size"]
            write_tokenizer(view, vocab_size)
        views.append(view)
    return views


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer over the model's whole vocabulary (``t0``, ``t1``...; pad and eos in it)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t1", eos_token="t2").save_pretrained(
        folder
    )


def eval_data(work: Path, origin: Path, name: str, texts: int, words: int) -> Path:
    """``texts`` texts of ``words`` tokens sampled from the model in ``origin`` (top-50 sampling, seed 0),
    cached as ``work/texts-NAME-TxW``."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    folder = work / f"texts-{name}-{texts}x{words}"
    if not folder.exists():
        model = AutoModelForCausalLM.from_pretrained(origin, dtype=torch.bfloat16).eval()
        torch.manual_seed(0)
        starts = torch.randint(3, model.config.vocab_size, (texts, 1))
        with torch.inference_mode():
            ids = model.generate(starts, do_sample=True, top_k=50, max_new_tokens=words - 1, min_new_tokens=words - 1,
                                 attention_mask=torch.ones_like(starts), pad_token_id=1)
        rows = [" ".join(f"t{i}" for i in row.tolist()) for row in ids]
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(folder))
    return folder


PROBE = "model.layers.0.self_attn.k_proj.weight"
PROBE_ENV = "GREEDY_MEMORY_PROBE"  # the safetensors file holding the plain soup's PROBE, for closeness


@functools.cache
def _soup_probe() -> torch.Tensor:
    """The plain soup's ``PROBE`` in float32, read once per process from the file ``PROBE_ENV`` names."""
    from safetensors.torch import load_file

    return load_file(os.environ[PROBE_ENV])[PROBE].float()


def closeness(model) -> float:  # type: ignore[no-untyped-def]
    """Minus the distance of the model's ``PROBE`` weight to the plain soup's (task ``custom``, higher is better).

    The copies are one model plus independent noise, so a soup of k of N is at an expected squared distance
    proportional to 1/k - 1/N from the soup of all N: every copy added helps, and greedy keeps them all
    (over the probe's 10^5 elements the expectation is all but certain).
    """
    return -float((model.get_parameter(PROBE).float() - _soup_probe()).norm())


def save_probe(soup: Path, target: Path) -> None:
    """Copy the plain soup's ``PROBE`` tensor from its shards into ``target``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(soup.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            if PROBE in f.keys():  # noqa: SIM118  (safe_open has keys(), no __contains__)
                save_file({PROBE: f.get_tensor(PROBE)}, str(target))
                return
    raise SystemExit(f"{soup}: no tensor {PROBE}")


def _driver(kind: str, spec_json: str) -> None:
    """In the measured process: one ``hub_soup.run``, timed, its evaluations timed apart; prints JSON."""
    spec = json.loads(spec_json)
    import torch  # noqa: F401  (before the clock: the baseline process imports it too)

    import hub_soup
    from hub_soup.eval import evaluate

    spent = {"score_s": 0.0, "scores": 0, "setup_s": 0.0}
    score, init = evaluate.Evaluator.score, evaluate.Evaluator.__init__

    def timed_score(self, model):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return score(self, model)
        finally:
            spent["score_s"] += time.perf_counter() - start
            spent["scores"] += 1

    def timed_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            init(self, *args, **kwargs)
        finally:
            spent["setup_s"] += time.perf_counter() - start

    evaluate.Evaluator.score, evaluate.Evaluator.__init__ = timed_score, timed_init  # type: ignore[method-assign]
    fields = {"output": {"path": spec["out"], "overwrite": True}}
    if kind == "greedy":
        fields |= {"greedy": True, "eval": {"task": "causal-lm", "data": spec["data"], "batch_size": spec["batch"]}}
    elif kind == "greedy-all":
        fields |= {"greedy": True, "eval": {"task": "custom", "function": f"{__file__}:closeness"}}
    if kind != "merge":  # imported before the clock: seconds of imports, in neither evaluations nor merging
        import datasets  # noqa: F401
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401  (lazy modules, loaded)
    recipe = hub_soup.Recipe.from_refs(spec["refs"], **fields)
    start = time.perf_counter()
    result = hub_soup.run(recipe, trust_remote_code=kind == "greedy-all")  # closeness is this file's code
    seconds = time.perf_counter() - start
    assert result is not None
    print(json.dumps({"run_s": seconds, "merge_s": result.stats.seconds, "kept": sum(result.kept), **spent}))
    sys.stdout.flush()
    os._exit(0)  # as hub-soup ends: no teardown in the numbers


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """run.py's peak RSS, peak RssAnon and wall time of ``cmd`` (``env`` added), and the JSON it printed last."""
    result = measure_output(cmd, env or {})
    printed = [line for line in result.pop("stdout").splitlines() if line.startswith("{")]
    return {**result, **(json.loads(printed[-1]) if printed else {})}


def warm_up(folders: list[Path]) -> None:
    """Read the ingredients' weights once, so they are in the page cache."""
    files = [str(f.resolve()) for d in folders for f in d.glob("*.safetensors")]
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)


def run_case(args: argparse.Namespace, size: str, n: int) -> dict:
    work = WORK / "greedy"
    folders = ingredient_views(args.models, size, range(1, n + 1), work)  # the perturbed copies ing1..ingN
    ingredient = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    out = work / "out" / f"{size}-x{n}"
    spec = {"refs": [str(f) for f in folders], "out": str(out), "batch": args.batch}
    python = sys.executable
    row: dict = {"size": size, "n": n, "ingredient_bytes": ingredient, "texts": args.texts, "words": args.words,
                 "batch": args.batch, "threads": os.environ.get("OMP_NUM_THREADS") or "default"}
    warm_up(folders)
    row["bare"] = measure([python, "-c", "import os, torch; os._exit(0)"])
    warm_up(folders)
    row["merge"] = measure([python, __file__, "_driver", "merge", json.dumps(spec)])
    spec["data"] = str(eval_data(work, out, f"{size}-x{n}", args.texts, args.words))
    probe = work / f"probe-{size}-x{n}.safetensors"
    save_probe(out, probe)
    warm_up(folders)
    row["greedy"] = measure([python, __file__, "_driver", "greedy", json.dumps(spec)])
    warm_up(folders)
    row["greedy-all"] = measure([python, __file__, "_driver", "greedy-all", json.dumps(spec)], {PROBE_ENV: str(probe)})
    shutil.rmtree(out, ignore_errors=True)
    return row


def render(rows: list[dict]) -> str:
    header = (
        "| model x N | ingredient | tool | wall s | in run s | evaluations (s) | eval setup s | beyond evaluations s "
        "| beyond / merge | peak RSS MiB | working MiB | working / ingredient | peak anon MiB | kept |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = 1 << 20
    for row in rows:
        bare = row["bare"]["peak_rss"]
        merge_run = row["merge"]["run_s"]
        for kind in ("merge", "greedy", "greedy-all"):
            if kind not in row:  # recorded before greedy-all was measured
                continue
            m = row[kind]
            working = m["peak_rss"] - bare
            beyond = m["run_s"] - m["score_s"] - m["setup_s"]
            lines.append(
                f"| {row['size']} x {row['n']} | {row['ingredient_bytes'] / 1e9:.2f} GB | {kind} | {m['wall_s']:.1f} "
                f"| {m['run_s']:.1f} | {m['scores']} ({m['score_s']:.1f}) | {m['setup_s']:.1f} | {beyond:.1f} "
                f"| {beyond / merge_run:.2f} | {m['peak_rss'] / mib:.0f} | {working / mib:.0f} "
                f"| {working / row['ingredient_bytes']:.2f} | {m['peak_anon'] / mib:.0f} | {m.get('kept', '-')} |"
            )
    bare_lines = {f"{r['bare']['peak_rss'] / mib:.0f} MiB" for r in rows}
    lines.append("")
    lines.append(f"bare `import torch` peak RSS: {', '.join(sorted(bare_lines))}; machine: {platform.machine()}, "
                 f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_driver":
        _driver(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=WORK / "models", help="run.py's models folder (read only)")
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "1.5b"])
    parser.add_argument("--n", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--texts", type=int, default=16, help="eval texts")
    parser.add_argument("--words", type=int, default=32, help="words (tokens) per text")
    parser.add_argument("--batch", type=int, default=4, help="eval batch size")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        for n in args.n:
            if not (args.models / size / f"ing{n}" / "config.json").is_file():
                print(f"skipping {size} x {n}: {args.models / size / f'ing{n}'} does not exist", file=sys.stderr)
                continue
            row = run_case(args, size, n)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(render([row]).split("\n\n")[0], file=sys.stderr)
    print(render(rows))


if __name__ == "__main__":
    main()
