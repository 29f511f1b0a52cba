"""Helpers for the merge methods' own tests: merge saved tensors both ways (in memory and streamed).

Small chunks and blocks force many of each on tiny tensors, so a statistics pass and a
kernel see every tensor in pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import merged_state_dict, output_metas, stream_merge
from hub_soup.merging.methods import MergeMethod
from hub_soup.merging.plan import MergePlan, align
from tests import checkpoints as ck

# (chunk_elements, block_elements): none divides the tensors' sizes; the last is the engine's default.
CUTS = ((7, 3), (64, 64), (1000, 128), (1 << 16, 1 << 17))


def at_cuts(cases: Sequence[tuple[Any, ...]], every: Sequence[int] = (0,)) -> list[Any]:
    """A test's parameter ``cases``, each with a cut (its last parameter): each case at ``CUTS[1]``, chunks and
    blocks of 64 that split every tensor but the 0-dim one; the cases at ``every`` (one per method) also at
    ``CUTS[0]`` and ``CUTS[2]`` (chunks smaller than blocks; chunks of 7 in blocks of 3, the slowest by far).
    Every method meets every cut and every case a splitting one, without the cost of every case at every cut."""
    return [pytest.param(*case, cut, id="-".join([*(str(v) for v in case if isinstance(v, (str, int, float))),
                                                  f"case{i}", f"chunk{cut[0]}"]))
            for i, case in enumerate(cases) for cut in (CUTS[:3] if i in every else CUTS[1:2])]

StateDict = dict[str, torch.Tensor]


def odd_tensors(generator: torch.Generator, scale: float = 1.0) -> StateDict:
    """Float64 tensors of sizes no chunk or block size divides, a 0-dim one included."""
    shapes = {"odd": (7, 13, 3), "prime": (1031,), "scalar": (), "wide": (3, 700)}
    return {k: torch.randn(s, generator=generator, dtype=torch.float64) * scale for k, s in shapes.items()}


def merge_both_ways(
    tmp_path: Path, states: Sequence[StateDict], method: MergeMethod, base: StateDict | None = None,
    cut: tuple[int, int] = CUTS[0], planned: Callable[[MergePlan], MergePlan] | None = None,
) -> StateDict:
    """The soup of ``states`` (the base's, where given) in memory, checked bit for bit against the streamed one;
    ``planned`` turns the aligned plan into the one merged (per-tensor parameters, rows, layers)."""
    paths = [ck.save_safetensors(s, tmp_path / f"in{i}.safetensors") for i, s in enumerate(states)]
    opened = [open_checkpoint(p) for p in paths]
    base_checkpoint = open_checkpoint(ck.save_safetensors(base, tmp_path / "base.safetensors")) if base else None
    options = {"chunk_elements": cut[0], "block_elements": cut[1], "base": base_checkpoint}
    try:
        plan = align(layouts_of(opened), base=layouts_of([base_checkpoint])[0] if base_checkpoint else None)
        if planned is not None:
            plan = planned(plan)
        scored = merged_state_dict(opened, plan, method, **options)
        out = tmp_path / f"soup-{cut[0]}"
        with SoupWriter(out, output_metas(plan, None), 10**9) as writer:
            stream_merge(opened, plan, method, writer, **options)
            writer.commit()
        streamed = load_file(out / "model.safetensors")
    finally:
        for checkpoint in [*opened, *([base_checkpoint] if base_checkpoint else [])]:
            checkpoint.close()
    assert scored.keys() == streamed.keys()
    for key, tensor in scored.items():
        ck.assert_bit_equal(tensor, streamed[key], f"{key} (chunk {cut[0]}, block {cut[1]})")
    return scored
