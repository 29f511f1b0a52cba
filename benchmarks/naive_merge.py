"""The naive soup script people write: load each state_dict whole, average in fp32, save.

    python benchmarks/naive_merge.py OUT_DIR INGREDIENT_DIR [INGREDIENT_DIR ...]

It keeps a running fp32 sum (never all state_dicts at once, which would not fit
for 1.5B x 8), so its peak memory is about: the fp32 sum (2x one bf16
ingredient) + one loaded ingredient (1x) + the bf16 copy made for saving (1x)
+ temporaries. Used by benchmarks/run.py as a reference point; not part of hub-soup.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


def main(out: Path, folders: list[Path]) -> None:
    weight = 1.0 / len(folders)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder in folders:
        state = load_state_dict(folder)
        for key, tensor in state.items():
            if key not in total:
                dtypes[key] = tensor.dtype
                total[key] = tensor.float() * weight
            else:
                total[key] += tensor.float() * weight
        del state
    soup = {key: tensor.to(dtypes[key]) for key, tensor in total.items()}
    del total
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(soup, out, max_shard_size="5GB")
    shutil.copyfile(folders[0] / "config.json", out / "config.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
