"""The cost of a soup of different vocabularies: a ``union`` soup against the plain merge of the same models.

    python benchmarks/vocab_union.py                          # 1.5b, N = 3, 9 alternating rounds
    python benchmarks/vocab_union.py --size tiny --rounds 1   # a smoke run of the script (seconds)

The ingredients are run.py's fine-tunes ``ing1`` .. ``ingN`` (generated when missing), seen through
folders of their own under ``_work/vocab/SIZE`` (links to their weights and config, and a word-level
tokenizer of their whole vocabulary, as benchmarks/greedy_memory.py makes them). ``ing1-chat`` is
``ing1`` as a chat fine-tune saves itself: two tokens added (``<|im_start|>``, ``<|im_end|>``, special),
its embeddings two rows longer (the new rows random, written into its own copy of the shard that holds
them; the other shards linked) and ``vocab_size`` to match. Two merges, each timed as run.py times a
merge (``/usr/bin/time -v``: wall time and peak RSS; peak RssAnon sampled every 20 ms), the page cache
warm, each after a ``sync`` (the previous soup written back), in alternating rounds (this machine's
speed drifts): the plain soup of ``ing1 .. ingN`` and the ``--tokenizer-source union`` soup of ``ing1-chat, ing2 .. ingN``, whose token-indexed rows are gathered
by token and the two new tokens' rows filled from the one model that has them. The issue's bound: the
union soup within 10% of the plain merge's time, at the same flat memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import run  # benchmarks/run.py: generation and measuring
from greedy_memory import ingredient_views

ADDED = ["<|im_start|>", "<|im_end|>"]
BOUND = 1.10  # the union soup's time over the plain merge's


def chat_variant(view: Path, target: Path) -> Path:
    """``view``'s model with :data:`ADDED` tokens: embeddings two rows longer in a copy of their shard."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if (target / "tokenizer.json").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    index = json.loads((view / "model.safetensors.index.json").read_text())
    key = "model.embed_tokens.weight"
    shard = index["weight_map"][key]
    for path in view.iterdir():  # the weights and their index; the config and tokenizer files are its own
        if (path.suffix == ".safetensors" and path.name != shard) or path.name in (
            "model.safetensors.index.json", "generation_config.json"
        ):
            (target / path.name).symlink_to(path.resolve())
    with safe_open(str(view / shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    embed = tensors[key]
    extra = torch.randn(len(ADDED), embed.shape[1], generator=torch.Generator().manual_seed(0)) * 0.02
    tensors[key] = torch.cat([embed, extra.to(embed.dtype)])
    save_file(tensors, str(target / shard), metadata={"format": "pt"})
    config = json.loads((view / "config.json").read_text())
    config["vocab_size"] += len(ADDED)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(view)
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    tokenizer.save_pretrained(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.5b", choices=list(run.SIZES))
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    run.PYTHON = Path(sys.executable)
    run.generate(args.size, args.n + 1)
    work = run.WORK / "vocab"
    views = ingredient_views(run.MODELS, args.size, range(1, args.n + 1), work)
    chat = chat_variant(views[0], work / args.size / "ing1-chat")
    every = [*views, chat]
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat",
                    *(str(f.resolve()) for d in every for f in d.glob("*.safetensors"))], check=True)
    hub_soup = [sys.executable, "-m", "hub_soup.cli", "-q", "merge"]
    cases = {  # each its own output folder, so each run replaces a soup of its own kind
        "plain": [*hub_soup, *map(str, views), "-o", str(work / "plain"), "--overwrite"],
        "union": [*hub_soup, str(chat), *map(str, views[1:]), "--tokenizer-source", "union", "-o",
                  str(work / "union"), "--overwrite"],
    }
    bare = run.measure_output([sys.executable, "-c", "import os, torch; os._exit(0)"], {})
    found: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, cmd in cases.items():
            subprocess.run(["sync"], check=True)  # the last soup's 3 GB written back first: not in the next's time
            found[name].append(run.measure_output(cmd, {}))
    ingredient = sum(f.stat().st_size for f in run.weight_files(run.ingredient_dirs(args.size, 2)[1]))
    print(f"| {args.size} x {args.n} | wall s (each round) | median s | working MiB (RSS) | x one ingredient |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, results in found.items():
        walls = [r["wall_s"] for r in results]
        medians[name] = statistics.median(walls)
        working = max(r["peak_rss"] for r in results) - bare["peak_rss"]
        print(f"| {name} | {' / '.join(f'{w:.1f}' for w in walls)} | {medians[name]:.1f} | {working >> 20} | "
              f"{working / ingredient:.3f} |")
    ratio = medians["union"] / medians["plain"]
    print(f"\nunion / plain: {ratio:.3f}x (bound {BOUND}x)")
    if ratio > BOUND:
        sys.exit(f"the union soup took {ratio:.3f}x the plain merge's time: above the {BOUND}x bound")


if __name__ == "__main__":
    main()
