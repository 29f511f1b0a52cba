"""Benchmark `hub-soup merge` against the read floor, mergekit and a naive script, side by side.

    .venv/bin/python benchmarks/run.py                       # the real sizes (0.5b, 1.5b; N = 3, 8): long
    .venv/bin/python benchmarks/run.py --sizes tiny --n 3    # a smoke run of the script itself (seconds)

One run generates the ingredients if missing (offline: a Llama-style causal LM
with random weights, bf16, saved sharded by transformers' ``save_pretrained``,
plus N-1 slightly perturbed copies written shard by shard without loading a
model), then measures each tool under ``/usr/bin/time -v`` (wall time, peak
RSS), with the page cache warm (inputs read just before, when they fit in RAM)
and cold (``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root). Every
figure carries its thread setting. Results are appended to
``benchmarks/_work/results.jsonl`` and rendered into ``benchmarks/RESULTS.md``
from all results recorded so far (the latest measurement of each cell wins).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
MODELS = WORK / "models"
OUTPUTS = WORK / "out"
RESULTS_JSONL = WORK / "results.jsonl"
RESULTS_MD = HERE / "RESULTS.md"
# sections of RESULTS.md that other scripts write (methods.py) or that are written from their tables
# (greedy_memory.py's): a re-render keeps them as they are
KEPT_SECTIONS = ("## Merge methods:", "## Evaluated soups:")
PYTHON = REPO / ".venv" / "bin" / "python"
HUB_SOUP = REPO / ".venv" / "bin" / "hub-soup"
# mergekit's own environment: MERGEKIT_ENV names one that has it installed (its bin/mergekit-yaml); otherwise a
# side venv made here on first use (see mergekit_python).
MK_VENV = Path(os.environ.get("MERGEKIT_ENV", WORK / "mk"))
MERGEKIT_VERSION = "0.1.5"
TIME = "/usr/bin/time"

# Llama-style causal LMs with Qwen2.5-0.5B / -1.5B dimensions (tied embeddings, GQA).
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, shard="100KB"),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, shard="500MB"),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, shard="1GB"),
}
MAX_N = 8
# Plain reads of the inputs; the fastest of them in a cache state is the floor.
FLOOR_TOOLS = ("cat", "py-read", "py-direct")


# ----------------------------------------------------------------------------- generation


def ingredient_dirs(size: str, n: int) -> list[Path]:
    return [MODELS / size / f"ing{i}" for i in range(n)]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def input_bytes(size: str, n: int) -> int:
    return sum(f.stat().st_size for d in ingredient_dirs(size, n) for f in weight_files(d))


def generate(size: str, count: int) -> None:
    """Base model (ing0) via save_pretrained, then perturbed copies ing1.. written shard by shard."""
    base = MODELS / size / "ing0"
    if not (base / "config.json").exists():
        log(f"generating {size} base model with random weights (save_pretrained) ...")
        subprocess.run([str(PYTHON), __file__, "_generate_base", size, str(base)], check=True)
    for i in range(1, count):
        target = MODELS / size / f"ing{i}"
        if (target / ".complete").exists():
            continue
        log(f"writing perturbed copy {target.name} of {size} ...")
        subprocess.run([str(PYTHON), __file__, "_perturb", str(base), str(target), str(i)], check=True)


def _generate_base(size: str, out: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(SIZES[size])
    shard = spec.pop("shard")
    config = LlamaConfig(**spec, tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    log(f"{size}: {params / 1e9:.3f}B parameters")
    model.save_pretrained(out, max_shard_size=shard)


def _perturb(base: str, target: str, seed: str) -> None:
    """Copy ``base`` with every floating tensor + small noise, one 4M-element piece at a time.

    The header of each shard is reused as is (same names, dtypes, shapes, offsets):
    only the data changes, so a copy costs one read and one write of the shard.
    """
    import struct

    import torch

    base_dir, target_dir = Path(base), Path(target)
    tmp = target_dir.with_name(target_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(int(seed))
    pool = torch.randn(1 << 24, generator=generator) * 2e-3
    piece = 1 << 22
    position = 0
    for path in sorted(base_dir.iterdir()):
        if not path.name.endswith(".safetensors"):
            shutil.copyfile(path, tmp / path.name)
            continue
        with path.open("rb") as src, (tmp / path.name).open("wb") as dst:
            (length,) = struct.unpack("<Q", src.read(8))
            raw = src.read(length)
            dst.write(struct.pack("<Q", length) + raw)
            header = json.loads(raw)
            header.pop("__metadata__", None)
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                data = bytearray(src.read(end - begin))
                if entry["dtype"] not in ("BF16", "F16", "F32") or not data:
                    dst.write(data)
                    continue
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[entry["dtype"]]
                tensor = torch.frombuffer(data, dtype=dtype)
                for start in range(0, tensor.numel(), piece):
                    part = tensor[start : start + piece]
                    if position + part.numel() > pool.numel():
                        position = 0
                    part.copy_(part.float() + pool[position : position + part.numel()])
                    position += part.numel() * 7 % 4099 + 1  # a different noise slice for each piece
                dst.write(data)
    (tmp / ".complete").touch()
    shutil.rmtree(target_dir, ignore_errors=True)
    tmp.rename(target_dir)


# ----------------------------------------------------------------------------- tools


def mergekit_python() -> Path | None:
    """mergekit's python: the environment ``MERGEKIT_ENV`` names, where it has ``mergekit-yaml``; else a side venv
    that reuses the main venv's torch/transformers (no second torch), made on first use.

    The side venv's own site-packages come first, the main venv's are appended by a
    .pth file, so pip installs only what the main venv lacks.
    """
    py = MK_VENV / "bin" / "python"
    if (MK_VENV / "bin" / "mergekit-yaml").exists():
        return py
    if "MERGEKIT_ENV" in os.environ:  # named, not ours to install into
        log(f"MERGEKIT_ENV={MK_VENV} has no bin/mergekit-yaml; skipping mergekit")
        return None
    log(f"installing mergekit {MERGEKIT_VERSION} into {MK_VENV} ...")
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    try:
        subprocess.run([str(base_python), "-m", "venv", str(MK_VENV)], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        main_site = subprocess.run([str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "zz_hub_soup_main_venv.pth").write_text(main_site + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    except subprocess.CalledProcessError as exc:
        log(f"mergekit could not be installed ({exc}); skipping it")
        return None
    return py


def mergekit_command(size: str, n: int, out: Path, threads: int) -> list[str]:
    config = WORK / f"mergekit-{size}-{n}.yaml"
    models = "\n".join(f"  - model: {d}\n    parameters:\n      weight: 1.0" for d in ingredient_dirs(size, n))
    # fp32 arithmetic, bf16 output: the same soup hub-soup computes.
    config.write_text(f"merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n{models}\n")
    return [str(MK_VENV / "bin" / "mergekit-yaml"), str(config), str(out), "--quiet", "-j", str(threads)]


def tool_commands(tool: str, size: str, n: int, threads: int | None) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one measurement."""
    out = OUTPUTS / f"{tool}-{size}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    dirs = [str(d) for d in ingredient_dirs(size, n)]
    files = [str(f) for d in ingredient_dirs(size, n) for f in weight_files(d)]
    env: dict[str, str] = {}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["HUB_SOUP_THREADS"] = str(threads)
    if tool == "cat":
        return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], env
    if tool == "py-read":
        return [str(PYTHON), "-S", __file__, "_read", *files], env
    if tool == "py-direct":
        return [str(PYTHON), "-S", __file__, "_read_direct", *files], env
    if tool == "hub-soup":
        return [str(HUB_SOUP), "-q", "merge", *dirs, "-o", str(out)], env
    if tool == "mergekit":
        return mergekit_command(size, n, out, threads or 2), env
    if tool == "naive":
        return [str(PYTHON), str(HERE / "naive_merge.py"), str(out), *dirs], env
    if tool == "import-torch":
        py = str(MK_VENV / "bin" / "python") if size == "mk-env" else str(PYTHON)
        # Ends like hub-soup does (os._exit, no interpreter teardown, which touches ~90 MiB more).
        return [py, "-c", "import os, torch; os._exit(0)"], env
    raise ValueError(tool)


def _read(*paths: str, flags: int = 0) -> None:
    """The read floor in Python: every input byte through one reused, page-aligned 8 MiB buffer."""
    view = memoryview(mmap.mmap(-1, 8 << 20))
    for path in paths:
        fd = os.open(path, os.O_RDONLY | flags)
        while os.readv(fd, [view]):
            pass
        os.close(fd)


def _read_direct(*paths: str) -> None:
    """The same with ``O_DIRECT``: from a cold disk, the page cache's CPU cost left out (hub-soup reads so too)."""
    _read(*paths, flags=os.O_DIRECT)


# ----------------------------------------------------------------------------- measuring


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_up(size: str, n: int) -> None:
    files = [str(f) for d in ingredient_dirs(size, n) for f in weight_files(d)]
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def anon_rss(pids: list[int]) -> int:
    """Anonymous resident memory (RssAnon: heap, buffers; no library or page-cache pages) of ``pids``."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall time and peak RSS of ``cmd`` under /usr/bin/time -v, and its peak RssAnon sampled every 20 ms.

    Peak RSS (what the issue asks for) also counts the pages of shared libraries a
    process maps, which vary with the page cache; RssAnon is the process's own memory.
    """
    result = measure_output(cmd, env)
    inner = re.search(r"wrote .* in ([\d.]+)s", result.pop("stdout"))
    return {**result, "merge_loop_s": float(inner.group(1)) if inner else None}


def measure_output(cmd: list[str], env: dict[str, str]) -> dict:
    """:func:`measure`'s wall time, peak RSS and peak RssAnon, and what ``cmd`` printed (``stdout``)."""
    full_env = {**os.environ, **env}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([TIME, "-v", *cmd], stdout=out, stderr=err, text=True, env=full_env)
        peak_anon = 0
        while proc.poll() is None:
            peak_anon = max(peak_anon, anon_rss(descendants(proc.pid)))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return {"wall_s": round(wall, 3), "peak_rss": rss_kb * 1024, "peak_anon": peak_anon, "stdout": stdout}


def record(result: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    with RESULTS_JSONL.open("a") as f:
        f.write(json.dumps(result) + "\n")


def load_results() -> list[dict]:
    """Every result recorded here; on a checkout without ``_work`` (ignored by git), the committed results.json,
    so that a re-render never drops what was measured elsewhere."""
    if not RESULTS_JSONL.exists():
        committed = HERE / "results.json"
        return json.loads(committed.read_text()) if committed.exists() else []
    return [json.loads(line) for line in RESULTS_JSONL.read_text().splitlines() if line.strip()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


PRIMERS = {
    # After the page cache is dropped, each tool's own code and libraries are read back in
    # (untimed): "cold" means cold *inputs*, as for a user's second merge of new models.
    "hub-soup": lambda: [str(PYTHON), "-c", "import hub_soup.cli, hub_soup.pipeline"],
    "naive": lambda: [str(PYTHON), "-c", "import torch, safetensors.torch, huggingface_hub"],
    "mergekit": lambda: [str(MK_VENV / "bin" / "python"), "-c", "import mergekit.scripts.run_yaml, mergekit.merge"],
}


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(limit: float = 600) -> None:
    """Other people share this machine: wait (up to ``limit`` s) until its CPUs are nearly idle."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > 0.1 and time.monotonic() < deadline:
        busy = cpu_busy(5)
    if busy > 0.1:
        log(f"machine still {busy:.0%} busy after waiting {limit:.0f} s; measuring anyway")


def prepare(tool: str, size: str, n: int, state: str) -> None:
    wait_for_quiet()
    subprocess.run(["sync"], check=True)
    if state == "cold":
        drop_caches()
        if tool in PRIMERS:
            subprocess.run(PRIMERS[tool](), check=True, capture_output=True)
    else:
        warm_up(size, n)


def run_case(size: str, n: int, tools: list[str], states: list[str], threads: list[int], repeat: int) -> None:
    """Every tool and setting once per round, rounds repeated: disk speed drifts, so runs are paired."""
    total = input_bytes(size, n)
    one = input_bytes(size, 1)
    fits = total < 0.6 * mem_total()
    for state in states:
        if state == "warm" and not fits:
            log(f"{size} x {n}: inputs ({total / 1e9:.1f} GB) do not fit in RAM: no warm measurement")
            continue
        cells: list[tuple[str, int | None]] = []
        for tool in tools:
            if tool == "py-direct" and state == "warm":
                continue  # O_DIRECT reads the disk even when the page cache holds the data
            if tool in FLOOR_TOOLS:
                cells.append((tool, None))
            elif tool == "naive":
                if 5 * one > 0.8 * mem_total():
                    log(f"naive {size} x {n}: would not fit in RAM, skipped")
                else:
                    cells.append((tool, threads[-1]))
            elif tool != "mergekit" or mergekit_python() is not None:
                cells += [(tool, t) for t in threads]
        for rep in range(repeat):
            for tool, setting in cells:
                cmd, env = tool_commands(tool, size, n, setting)
                prepare(tool, size, n, state)
                figures = measure(cmd, env)
                result = {
                    "size": size, "n": n, "tool": tool, "cache": state,
                    "threads": setting, "input_bytes": total, "ingredient_bytes": one,
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"), "repeat": rep, **figures,
                }
                record(result)
                log(f"{size} x {n} {state:4} {tool:9} threads={setting}: {figures['wall_s']:.2f} s "
                    f"({total / figures['wall_s'] / 1e9:.2f} GB/s), peak RSS {figures['peak_rss'] / 2**20:.0f} MiB")
                shutil.rmtree(OUTPUTS / f"{tool}-{size}-{n}", ignore_errors=True)


def baselines(states: list[str]) -> None:
    """Peak RSS of a bare ``import torch`` in each environment and cache state: subtracted to get working memory.

    Shared-library pages count in RSS, and how many get mapped depends on what is
    in the page cache, so the baseline is taken in each cache state, the cold one
    after the same drop-and-prime as the tools (``import torch`` read back in).
    """
    for env_name in ("main", "mk-env"):
        if env_name == "mk-env" and not (MK_VENV / "bin" / "python").exists():
            continue
        for state in states:
            samples = []
            for _ in range(3):
                cmd, env = tool_commands("import-torch", env_name, 0, None)
                if state == "cold":
                    drop_caches()
                    subprocess.run(cmd, check=True, env={**os.environ, **env})  # prime, like the tools
                samples.append(measure(cmd, env))
            record({"size": env_name, "n": 0, "tool": "import-torch", "cache": state, "threads": None,
                    "input_bytes": 0, "ingredient_bytes": 0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "repeat": 0, "wall_s": statistics.median(s["wall_s"] for s in samples),
                    "peak_rss": int(statistics.median(s["peak_rss"] for s in samples)),
                    "peak_anon": int(statistics.median(s["peak_anon"] for s in samples)), "merge_loop_s": None})


# ----------------------------------------------------------------------------- report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    torch_version = subprocess.run([str(PYTHON), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    disk = shutil.disk_usage(WORK)
    return (f"{cpu}, {os.cpu_count()} cores (KVM guest), {mem_total() / 2**30:.0f} GiB RAM, no GPU, "
            f"ext4 on a virtio disk ({disk.total / 2**30:.0f} GiB), Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch_version}, mergekit {MERGEKIT_VERSION}")


def latest(results: list[dict]) -> dict[tuple, list[dict]]:
    """Group by cell; a newer run of a cell replaces all of its older samples."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["size"], r["n"], r["tool"], r["cache"], r["threads"])
        if r["repeat"] == 0:
            cells[key] = []
        cells.setdefault(key, []).append(r)
    return cells


def best(samples: list[dict]) -> dict:
    return min(samples, key=lambda r: r["wall_s"])


def paired_floor_ratio(cells: dict[tuple, list[dict]], case: tuple, tool: str, setting: int | None) -> float | None:
    """Median over rounds of tool time / that round's floor (disk speed drifts between rounds)."""
    floors: dict[int, float] = {}
    for k, samples in cells.items():
        if (k[0], k[1], k[3]) == case and k[2] in FLOOR_TOOLS:
            for r in samples:
                floors[r["repeat"]] = min(floors.get(r["repeat"], math.inf), r["wall_s"])
    ratios = [r["wall_s"] / floors[r["repeat"]] for r in cells.get((case[0], case[1], tool, case[2], setting), [])
              if r["repeat"] in floors]
    return statistics.median(ratios) if ratios else None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def excess(samples: list[dict], field: str, baseline: int | None) -> int | None:
    """The worst run's ``field`` minus ``baseline``; ``None`` where a run or the baseline lacks it."""
    values = [s.get(field) for s in samples]
    if baseline is None or None in values:
        return None
    return max(values) - baseline


def render(results: list[dict]) -> str:
    cells = latest(results)
    base = {(k[0], k[3]): best(v)["peak_rss"] for k, v in cells.items() if k[2] == "import-torch"}
    base_anon = {(k[0], k[3]): best(v).get("peak_anon") for k, v in cells.items() if k[2] == "import-torch"}
    order = {"cat": 0, "py-read": 1, "py-direct": 2, "hub-soup": 3, "mergekit": 4, "naive": 5}
    size_order = {s: i for i, s in enumerate(SIZES)}
    rows = sorted((k for k in cells if k[2] in order),
                  key=lambda k: (size_order.get(k[0], 9), k[1], k[3] != "warm", order[k[2]], k[4] or 0))
    floors: dict[tuple, float] = {}
    for k in rows:
        if k[2] in FLOOR_TOOLS:
            case = (k[0], k[1], k[3])
            floors[case] = min(floors.get(case, 1e18), best(cells[k])["wall_s"])
    lines = [
        "| model x N | input | cache | tool | threads | wall s | all runs | input GB/s | x floor "
        "| peak RSS MiB | working MiB | working / ingredient | peak anon MiB | anon working / ingredient |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in rows:
        samples = cells[k]
        r = best(samples)
        floor = floors.get((k[0], k[1], k[3]))
        env_key = ("mk-env" if k[2] == "mergekit" else "main", k[3])
        plain_read = k[2] in FLOOR_TOOLS
        peak = max(x["peak_rss"] for x in samples)  # memory: the worst run
        working = None if plain_read else excess(samples, "peak_rss", base.get(env_key, 0))
        anon = excess(samples, "peak_anon", 0)
        anon_working = None if plain_read else excess(samples, "peak_anon", base_anon.get(env_key))
        wall = f"{r['wall_s']:.2f}"
        if r.get("merge_loop_s"):
            wall += f" (loop {r['merge_loop_s']:.1f})"
        cols = [
            f"{k[0]} x {k[1]}", f"{r['input_bytes'] / 1e9:.2f} GB", k[3], k[2],
            "-" if k[4] is None else str(k[4]), wall,
            ", ".join(f"{s['wall_s']:.1f}" for s in samples),
            f"{r['input_bytes'] / r['wall_s'] / 1e9:.2f}",
            fmt(r["wall_s"] / floor if floor else None, ".2f"),
            f"{peak / 2**20:.0f}",
            fmt(None if working is None else working / 2**20, ".0f"),
            fmt(None if working is None else working / r["ingredient_bytes"], ".3f"),
            fmt(None if anon is None else anon / 2**20, ".0f"),
            fmt(None if anon_working is None else anon_working / r["ingredient_bytes"], ".3f"),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    lines += [
        "", "### Targets", "",
        "| model x N | cache | hub-soup best (threads) | mergekit best (threads) | mergekit / hub-soup (target >= 3) "
        "| hub-soup best / floor best | hub-soup (1 thread) / floor, median of paired rounds "
        "| hub-soup working / ingredient, peak RSS (anon) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = sorted({(k[0], k[1], k[3]) for k in rows}, key=lambda c: (size_order.get(c[0], 9), c[1], c[2] != "warm"))
    for case in cases:
        hs = [dict(best(cells[k]), t=k[4]) for k in rows if (k[0], k[1], k[3]) == case and k[2] == "hub-soup"]
        mk = [dict(best(cells[k]), t=k[4]) for k in rows if (k[0], k[1], k[3]) == case and k[2] == "mergekit"]
        if not hs:
            continue
        h = min(hs, key=lambda r: r["wall_s"])
        m = min(mk, key=lambda r: r["wall_s"]) if mk else None
        floor = floors.get(case)
        hs_all = [x for k in rows if (k[0], k[1], k[3]) == case and k[2] == "hub-soup" for x in cells[k]]
        working = excess(hs_all, "peak_rss", base.get(("main", case[2]), 0))
        anon_working = excess(hs_all, "peak_anon", base_anon.get(("main", case[2])))
        cols = [
            f"{case[0]} x {case[1]}", case[2], f"{h['wall_s']:.2f} s ({h['t']})",
            f"{m['wall_s']:.2f} s ({m['t']})" if m else "not run",
            fmt(m["wall_s"] / h["wall_s"] if m else None, ".1f", "x"),
            fmt(h["wall_s"] / floor if floor else None, ".2f", "x"),
            fmt(paired_floor_ratio(cells, case, "hub-soup", 1), ".2f", "x"),
            f"{working / h['ingredient_bytes']:.3f} ({fmt(None if anon_working is None else anon_working / h['ingredient_bytes'], '.3f')})",
        ]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    lines += [f"- bare `python -c \"import os, torch; os._exit(0)\"` ({name} env, {state}): peak RSS {rss / 2**20:.0f} MiB, "
              f"peak anon {fmt(None if base_anon.get((name, state)) is None else base_anon[(name, state)] / 2**20, '.0f')} MiB, "
              "subtracted from the same env and cache state to give working memory"
              for (name, state), rss in sorted(base.items())]
    return "\n".join(lines) + "\n"


def write_report(notes: str, measured: bool = True) -> None:
    """Render RESULTS.md from every recorded result, ``notes`` and the sections other scripts keep there.

    ``measured``: results were recorded on this machine just now, so the Machine line is this machine's;
    a re-render (``--report-only``) keeps the line of the machine that measured them."""
    results = load_results()
    old = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    recorded = re.search(r"^Machine: (.*)\.$", old, re.MULTILINE)
    body = [
        "# Benchmarks: hub-soup merge vs the read floor, mergekit and a naive script",
        "",
        "Generated by `benchmarks/run.py` (see `benchmarks/README.md`); numbers from `benchmarks/results.json`.",
        "",
        f"Machine: {machine() if measured or recorded is None else recorded.group(1)}.",
        "",
        "Columns: `threads` is the torch intra-op thread count of that figure (`OMP_NUM_THREADS`, "
        "hub-soup's `HUB_SOUP_THREADS`, mergekit's `-j`; `-` for the plain read). `x floor` is wall time over "
        "the fastest plain read of the same bytes in the same cache state (`cat`, a Python read loop, or from a cold "
        "cache the same loop with `O_DIRECT`). "
        "`working` = peak RSS minus the peak RSS of a bare `import torch` (ended with `os._exit`, as hub-soup ends) "
        "in the same environment and cache state; `peak anon` is the process tree's peak RssAnon, sampled every 20 ms. "
        "`cache`: `warm` = inputs read just before (in the page cache), `cold` = `sync; echo 3 > "
        "/proc/sys/vm/drop_caches` just before. hub-soup's `(loop X)` is its own merge-loop time "
        "(the rest is start-up, mostly `import torch`, and writing side files).",
        "",
        render(results),
        notes,
    ]
    kept = [section for section in re.split(r"\n(?=## )", old) if section.startswith(KEPT_SECTIONS)]
    RESULTS_MD.write_text("\n".join(body).rstrip("\n") + "".join("\n\n" + k.rstrip("\n") for k in kept) + "\n")
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {RESULTS_MD}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.5b", help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--n", default="3,8", help="comma list of ingredient counts (<= 8)")
    parser.add_argument("--tools", default="cat,py-read,py-direct,hub-soup,mergekit,naive")
    parser.add_argument("--cache", default="warm,cold", help="warm, cold or both")
    parser.add_argument("--threads", default="1,2", help="torch thread settings to measure (naive: the last)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell (the table shows the fastest, lists all)")
    parser.add_argument("--report-only", action="store_true", help="re-render RESULTS.md from recorded results")
    parser.add_argument("--generate-only", action="store_true", help="write the ingredients, measure nothing")
    parser.add_argument("--baselines-only", action="store_true", help="measure the bare `import torch` baselines only")
    parser.add_argument("--notes", type=Path, default=HERE / "NOTES.md", help="markdown appended to RESULTS.md")
    args = parser.parse_args()
    notes = args.notes.read_text() if args.notes.exists() else ""
    if args.report_only:
        write_report(notes, measured=False)
        return
    if "cold" in args.cache and os.geteuid() != 0:
        sys.exit("cold-cache runs drop the page cache: run as root, or pass --cache warm")
    if not Path(TIME).exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "time"], check=True)
    sizes = args.sizes.split(",")
    counts = [int(n) for n in args.n.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    tools = args.tools.split(",")
    for size in sizes:
        generate(size, max(counts))
    if args.generate_only:
        return
    if "mergekit" in tools:
        mergekit_python()
    baselines(args.cache.split(","))
    if args.baselines_only:
        write_report(notes)
        return
    for size in sizes:
        for n in counts:
            run_case(size, n, tools, args.cache.split(","), threads, args.repeat)
            write_report(notes)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        commands = {"_generate_base": _generate_base, "_perturb": _perturb, "_read": _read, "_read_direct": _read_direct}
        commands[sys.argv[1]](*sys.argv[2:])
    else:
        main()
