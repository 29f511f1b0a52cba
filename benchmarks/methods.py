"""Merge methods side by side with mergekit: time and memory of every mergekit method, precision of two.

    .venv/bin/python benchmarks/methods.py                           # 0.5b and 1.5b, every method
    .venv/bin/python benchmarks/methods.py --methods ties,della      # some of them
    .venv/bin/python benchmarks/methods.py --sizes tiny              # a smoke run of the script itself
    MERGEKIT_ENV=/path/to/venv .venv/bin/python benchmarks/methods.py    # mergekit from its own environment

The models are run.py's benchmark models: ``ing0`` is the base, ``ing1..3`` its
perturbed copies, the fine-tunes (generated if missing). Each method is one mergekit
config (:data:`CONFIGS`: the base ``ing0`` where the method takes one, the fine-tunes
it merges, weights 1 and each method's usual parameters, each tool's defaults otherwise),
run by hub-soup (``hub-soup run CONFIG``) and by mergekit (``mergekit-yaml CONFIG``),
both with the page cache warm, under ``/usr/bin/time``; mergekit in its default
arithmetic (the tensors' own dtype, bf16) and with ``dtype: float32``, each with ``-j 1``
and ``-j 2``; its best time is the one compared. ``slerp``, ``nearswap`` and
``arcee_fusion`` merge the base and one fine-tune, ``nuslerp`` two fine-tunes (with the
base), and ``passthrough`` copies one model (a one-model config: it merges nothing, its
time is a copy's).

Precision (``task_arithmetic`` and ``ties``; the other methods' are the oracle's,
``benchmarks/mergekit_oracle.py``): every output tensor against the method's definition
computed here in float64 from the inputs (TIES's threshold by ``kthvalue`` on the whole
tensor) and rounded to bf16; the share of elements more than one bf16 ulp away is reported.
TIES elements whose magnitude equals the threshold (kept by hub-soup, an arbitrary
subset kept by mergekit's ``argsort``) or whose elected sign rests on a vote sum that
is 0 up to float32 rounding are left out of the count, and counted separately.

Results go to ``benchmarks/_work/methods.jsonl`` and into the "Merge methods" section
of ``benchmarks/RESULTS.md`` (rewritten in place).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # the benchmark models, the tools' environments and the measuring

RESULTS_JSONL = run.WORK / "methods.jsonl"
SECTION = "## Merge methods: hub-soup and mergekit side by side"
DENSITY = 0.5
FINE_TUNES = 3


# method: (fine-tunes merged, from ing1; with the base ing0; the config's parameters; each model's parameters)
CONFIGS: dict[str, tuple[int, bool, dict[str, float], dict[str, float]]] = {
    "linear": (FINE_TUNES, False, {}, {"weight": 1.0}),
    "slerp": (1, True, {"t": 0.5}, {}),
    "nuslerp": (2, True, {}, {"weight": 1.0}),
    "multislerp": (FINE_TUNES, True, {}, {"weight": 1.0}),
    "karcher": (FINE_TUNES, False, {}, {}),
    "task_arithmetic": (FINE_TUNES, True, {}, {"weight": 1.0}),
    "ties": (FINE_TUNES, True, {}, {"weight": 1.0, "density": DENSITY}),
    "dare_ties": (FINE_TUNES, True, {}, {"weight": 1.0, "density": DENSITY}),
    "dare_linear": (FINE_TUNES, True, {}, {"weight": 1.0, "density": DENSITY}),
    "breadcrumbs": (FINE_TUNES, True, {"density": 0.9, "gamma": 0.01}, {"weight": 1.0}),
    "breadcrumbs_ties": (FINE_TUNES, True, {"density": 0.9, "gamma": 0.01}, {"weight": 1.0}),
    "della": (FINE_TUNES, True, {"density": DENSITY, "epsilon": 0.1}, {"weight": 1.0}),
    "della_linear": (FINE_TUNES, True, {"density": DENSITY, "epsilon": 0.1}, {"weight": 1.0}),
    "sce": (FINE_TUNES, True, {"select_topk": DENSITY}, {}),
    "model_stock": (FINE_TUNES, True, {}, {}),
    "nearswap": (1, True, {"t": 0.5}, {}),
    "arcee_fusion": (1, True, {}, {}),
    "passthrough": (1, False, {}, {}),
    "ram": (FINE_TUNES, True, {}, {}),
    "ramplus_tl": (FINE_TUNES, True, {}, {}),
}
PRECISION = ("task_arithmetic", "ties")  # the methods whose definition this script computes


def config(method: str, size: str, dtype: str | None) -> Path:
    """The mergekit config of ``method`` on ``size``'s models, computing in ``dtype`` (``None``: bf16, mergekit's
    default: the tensors' own), written out in bf16."""
    count, with_base, parameters, own = CONFIGS[method]
    dirs = run.ingredient_dirs(size, FINE_TUNES + 1)
    lines = [f"merge_method: {method}"]
    if with_base:
        lines.append(f"base_model: {dirs[0]}")
    lines += [f"dtype: {dtype}", "out_dtype: bfloat16"] if dtype else ["dtype: bfloat16"]
    if parameters:
        lines += ["parameters:", *(f"  {k}: {v}" for k, v in parameters.items())]
    lines.append("models:")
    for d in dirs[1 : 1 + count]:
        lines.append(f"  - model: {d}")
        if own:
            lines += ["    parameters:", *(f"      {k}: {v}" for k, v in own.items())]
    path = run.WORK / f"mergekit-{method}-{size}-{dtype or 'bf16'}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def hub_soup_command(method: str, size: str, out: Path) -> list[str]:
    return [str(run.HUB_SOUP), "-q", "run", str(config(method, size, None)), "-o", str(out)]


def mergekit_command(method: str, size: str, out: Path, dtype: str | None, threads: int) -> list[str]:
    return [str(run.MK_VENV / "bin" / "mergekit-yaml"), str(config(method, size, dtype)), str(out), "--quiet", "-j",
            str(threads)]


# ----------------------------------------------------------------------------- precision


def definition(method: str, parts: list, base):  # -> (float64 soup, elements left out of the count)
    """The method's soup in float64 on whole tensors, and the elements where the definition itself is undecided.

    TIES's thresholds come from each whole task vector (``kthvalue``); the rest is elementwise, so it runs
    over slices of the flattened tensors, which keeps a 1.5B model's embedding (233M elements) in a few GB.
    """
    import torch

    if method == "task_arithmetic":
        b = base.double()
        return b + sum(p.double() - b for p in parts), torch.zeros(b.shape, dtype=torch.bool)
    thresholds = []
    for part in parts:
        k = int(DENSITY * part.numel())
        magnitude = (part.double() - base.double()).abs().reshape(-1)
        thresholds.append(torch.kthvalue(magnitude, part.numel() - k + 1).values.item() if k else float("inf"))
        del magnitude
    soup = torch.empty(base.numel(), dtype=torch.float64)
    undecided = torch.empty(base.numel(), dtype=torch.bool)
    step = 1 << 24
    for start in range(0, base.numel(), step):
        b = base.reshape(-1)[start:start + step].double()
        deltas = [p.reshape(-1)[start:start + step].double() - b for p in parts]
        ties = torch.zeros(b.shape, dtype=torch.bool)
        trimmed = []
        for delta, threshold in zip(deltas, thresholds):
            magnitude = delta.abs()
            ties |= magnitude == threshold
            trimmed.append(delta * (magnitude >= threshold))
        stacked = torch.stack(trimmed)
        votes = stacked.sum(0)
        ties |= votes.abs() <= 8 * torch.finfo(torch.float32).eps * stacked.abs().sum(0)
        agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0).double()
        divisor = agree.double().sum(0)
        divisor[divisor == 0] = 1
        soup[start:start + step] = b + (stacked * agree).sum(0) / divisor
        undecided[start:start + step] = ties & (stacked != 0).any(0)
    return soup.reshape(base.shape), undecided.reshape(base.shape)


def off_by_more_than_an_ulp(out, expected):  # -> bool tensor
    """Elements of ``out`` more than one bf16 ulp (at the float64 ``expected``) from it."""
    import torch

    exponent = torch.floor(torch.log2(expected.abs().clamp_min(2.0**-126)))  # subnormals: the smallest spacing
    return (out.double() - expected).abs() > 2.0 ** (exponent - 7)  # bf16: 8 significant bits


def precision(method: str, size: str, outputs: dict[str, Path]) -> dict[str, dict]:
    """Per output folder: elements compared, off by more than one bf16 ulp, and left out (definition undecided)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        return {k: f for f in sorted(folder.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}  # noqa: SIM118

    dirs = run.ingredient_dirs(size, FINE_TUNES + 1)
    sources = [tensors(d) for d in dirs]
    found = {name: tensors(folder) for name, folder in outputs.items()}
    counts = {name: {"elements": 0, "off": 0, "undecided": 0} for name in outputs}
    for key, path in sources[0].items():
        base = safe_open(path, "pt").get_tensor(key)
        if not base.is_floating_point():
            continue
        parts = [safe_open(s[key], "pt").get_tensor(key) for s in sources[1:]]
        expected, undecided = definition(method, parts, base)
        for name, files in found.items():
            out = safe_open(files[key], "pt").get_tensor(key)
            off = off_by_more_than_an_ulp(out, expected) & ~undecided
            counts[name]["elements"] += out.numel()
            counts[name]["off"] += int(off.sum())
            counts[name]["undecided"] += int(undecided.sum())
    return counts


# ----------------------------------------------------------------------------- running


def case(size: str, method: str, repeat: int, mergekit: list[tuple[str | None, int]]) -> dict:
    run.generate(size, FINE_TUNES + 1)
    run.warm_up(size, FINE_TUNES + 1)
    outputs, timings = {}, {}
    settings: list[tuple[str, str | None, int | None]] = [("hub-soup", None, None)]  # its own choice (threads.py)
    settings += [("mergekit", d, j) for d, j in mergekit]
    for _ in range(repeat):  # alternating: the VM's speed drifts
        for tool, dtype, threads in settings:
            name = tool if tool == "hub-soup" else f"mergekit {dtype or 'bf16'} -j{threads}"
            out = run.OUTPUTS / f"{method}-{size}-{name.replace(' ', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            command = (hub_soup_command(method, size, out) if tool == "hub-soup"
                       else mergekit_command(method, size, out, dtype, threads))
            run.log(f"{size} {method}: {name}")
            result = run.measure(command, {"OMP_NUM_THREADS": str(threads)} if threads else {})
            previous = timings.get(name)
            if previous is None or result["wall_s"] < previous["wall_s"]:
                timings[name] = result
            outputs[name] = out
    compared = {}
    for name, folder in outputs.items():  # one output per arithmetic (threads do not change mergekit's bits)
        compared.setdefault(name.rsplit(" -j", 1)[0], (name, folder))
    compared = dict(compared.values())
    counts = {}
    if method in PRECISION:
        run.log(f"{size} {method}: precision against float64")
        counts = precision(method, size, compared)
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    baseline = run.measure(run.tool_commands("import-torch", size, 0, 1)[0], {})["peak_rss"]
    theirs = run.measure(run.tool_commands("import-torch", "mk-env", 0, 1)[0], {})["peak_rss"] if mergekit else baseline
    return {"size": size, "method": method, "timings": timings, "precision": counts, "import_torch_rss": baseline,
            "import_torch_rss_mergekit": theirs,
            "input_bytes": run.input_bytes(size, FINE_TUNES + 1), "when": time.strftime("%Y-%m-%d %H:%M")}


def latest_of_each_tool(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (size, method): hub-soup's latest measurement, and mergekit's latest (a ``--mergekit none`` run
    re-measures hub-soup alone, after a change to it, against mergekit's figures of an earlier run)."""
    combined: dict[tuple[str, str], dict] = {}
    for r in results:
        key = (r["size"], r["method"])
        ours = {k: v for k, v in r["timings"].items() if k == "hub-soup"}
        theirs = {k: v for k, v in r["timings"].items() if k != "hub-soup"}
        previous = combined.get(key)
        if previous is not None and not theirs:  # keep mergekit's, from the earlier run
            theirs = {k: v for k, v in previous["timings"].items() if k != "hub-soup"}
            precision = {k: v for k, v in previous["precision"].items() if k != "hub-soup"}
            mine = {k: v for k, v in r["precision"].items() if k == "hub-soup"}
            r = {**r, "timings": {**ours, **theirs}, "precision": {**precision, **mine},
                 "mergekit_when": previous.get("mergekit_when", previous["when"])}
        combined[key] = r
    return combined


def render(results: list[dict]) -> str:
    latest = latest_of_each_tool(results)
    lines = [
        SECTION, "",
        (f"Three fine-tunes and their base (run.py's models: `ing0` the base, `ing1..3` the fine-tunes), bf16, page "
         f"cache warm; one mergekit config per method, run by both tools (`benchmarks/methods.py`'s CONFIGS: TIES, "
         f"DARE and DELLA at density {DENSITY}, weights 1, slerp / nearswap / arcee_fusion the base and one "
         "fine-tune, nuslerp two, passthrough a copy of one model), each tool's defaults otherwise. mergekit "
         f"{run.MERGEKIT_VERSION} in its default arithmetic (bf16) and with `dtype: float32` (its `-j` as noted); "
         "hub-soup with its own thread choice (`hub_soup/threads.py`: one thread, the compute-bound methods (della, "
         "della_linear, arcee_fusion, model_stock, ramplus_tl) split among workers on both CPUs; before 2026-12-07 13:40 this "
         "script set one thread for every method, and the rows not re-measured since are of one thread). "
         "Working memory: peak RSS minus a bare `import torch` (measured in the same run, "
         "in each tool's environment); "
         "per one ingredient: over one model's weight bytes. "
         "Precision (task_arithmetic and ties; `-` for the others, whose precision is the oracle's, "
         "`benchmarks/MERGEKIT_ORACLE.md`): elements more than one bf16 ulp from the method's float64 definition (see "
         "`benchmarks/methods.py`); TIES elements at the magnitude threshold or with a sign vote of 0 up to rounding "
         "are left out (`undecided`)."), "",
        ("| model | method | hub-soup s | mergekit best s (setting) | mergekit / hub-soup | hub-soup MiB | "
         "hub-soup / one ingredient | mergekit MiB | > 1 ulp: hub-soup | > 1 ulp: mergekit bf16 | "
         "> 1 ulp: mergekit fp32 | undecided |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, method), r in sorted(latest.items()):
        t = r["timings"]
        ours = t["hub-soup"]
        name, best = min(((k, v) for k, v in t.items() if k != "hub-soup"), key=lambda kv: kv[1]["wall_s"])
        found = {k.rsplit(" -j", 1)[0]: v for k, v in r["precision"].items()}
        ours_counts = r["precision"].get("hub-soup")
        undecided = f"{100 * ours_counts['undecided'] / ours_counts['elements']:.3f}%" if ours_counts else "-"
        ingredient = r["input_bytes"] / (FINE_TUNES + 1)
        lines.append(
            f"| {size} | {method} | {ours['wall_s']:.1f} | {best['wall_s']:.1f} ({name.removeprefix('mergekit ')}) | "
            f"{best['wall_s'] / ours['wall_s']:.1f}x | {_mib(ours['peak_rss'], r)} | "
            f"{(ours['peak_rss'] - r['import_torch_rss']) / ingredient:.3f}x | "
            f"{_mib(best['peak_rss'], r, 'import_torch_rss_mergekit')} | "
            f"{_share(found, 'hub-soup')} | {_share(found, 'mergekit bf16')} | {_share(found, 'mergekit float32')} | "
            f"{undecided} |"
        )
    earlier = sorted({f"{size} {method}: {r['mergekit_when']}" for (size, method), r in latest.items() if "mergekit_when" in r})
    if earlier:
        lines += ["", "hub-soup re-measured alone after a change; mergekit's figures (time and precision) from an earlier "
                  "run of the same script: " + "; ".join(earlier) + "."]
    lines += ["", f"Measured {max(r['when'] for r in latest.values())} on {run.machine()}.", ""]
    return "\n".join(lines)


def _mib(rss: int, result: dict, baseline: str = "import_torch_rss") -> str:
    """Working memory: ``rss`` less a bare ``import torch`` in the same environment (mergekit's own, where it has one;
    records from before it was measured have the main one's)."""
    return f"{(rss - result.get(baseline, result['import_torch_rss'])) / 2**20:,.0f}"


def _share(precision: dict[str, dict], name: str) -> str:
    if name not in precision:
        return "-"
    counts = precision[name]
    return f"{100 * counts['off'] / counts['elements']:.3f}% ({counts['off']:,})"


def write_section(text: str) -> None:
    report = run.RESULTS_MD.read_text() if run.RESULTS_MD.exists() else ""
    if SECTION in report:
        before, _, after = report.partition(SECTION)
        rest = re.search(r"\n## ", after)
        report = before + text + (after[rest.start() + 1:] if rest else "")
    else:
        report = report.rstrip("\n") + "\n\n" + text
    run.RESULTS_MD.write_text(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.5b")
    parser.add_argument("--methods", default=",".join(CONFIGS),
                        help="comma-separated, of: " + ", ".join(CONFIGS) + " (default: all)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of every setting; the best counts")
    parser.add_argument("--mergekit", default="bf16:1,bf16:2,float32:1,float32:2",
                        help="mergekit settings, ARITHMETIC:THREADS (its -j), comma-separated; none: hub-soup "
                        "alone, against mergekit's latest recorded figures")
    args = parser.parse_args()
    mergekit = [] if args.mergekit == "none" else [
        (None if a == "bf16" else a, int(j)) for a, j in (s.split(":") for s in args.mergekit.split(","))
    ]
    if mergekit and run.mergekit_python() is None:
        sys.exit("mergekit is needed for the side-by-side (see run.mergekit_python)")
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            result = case(size, method, args.repeat, mergekit)
            run.WORK.mkdir(parents=True, exist_ok=True)
            with RESULTS_JSONL.open("a") as f:
                f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in RESULTS_JSONL.read_text().splitlines() if line.strip()]
    measured = [r for r in results if r["size"] != "tiny"]
    if measured:  # a smoke run (tiny) is printed, never recorded
        write_section(render(measured))
    print(render([r for r in results if r["size"] in args.sizes.split(",")]))


if __name__ == "__main__":
    main()
