"""A plan that says more: per-tensor parameters, rows gathered by index, layers taken from other layers,
and methods that need each tensor whole, all as plan data read by the one streamed engine.

Every soup here is merged both ways (in memory and streamed to a file, with chunks and blocks that cut
rows and tensors anywhere) and compared with its float64 definition on whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from hub_soup.errors import NonFiniteSoupError, RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import ingredient_weights, output_metas, stream_merge
from hub_soup.merging.methods import MergedTensor, MergeMethod, get_method
from hub_soup.merging.plan import (
    BASE,
    Input,
    Layout,
    MergePlan,
    TensorPlan,
    align,
    gradient,
    gradient_position,
    layer_of,
    relayer,
    resolve_setting,
    restack,
)
from tests import checkpoints as ck
from tests.method_checks import CUTS, merge_both_ways
from tests.test_method_slerp import slerp_by_hand

StateDict = dict[str, torch.Tensor]
LAYERS = 4
# Shapes no chunk or block size divides; rows of 13 * 3 and 700 elements.
SHAPES = {"self_attn.q_proj.weight": (7, 13, 3), "mlp.up_proj.weight": (3, 700), "input_layernorm.weight": (31,)}

# mergekit's most copied gradient-SLERP setting: a gradient per filter, a default for the rest.
T_SETTING = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def _model(generator: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> StateDict:
    """A small Llama-like state dict: embeddings, ``LAYERS`` layers, a final norm and a head."""
    tensors = {"model.embed_tokens.weight": torch.randn(5, 6, generator=generator)}
    for layer in range(LAYERS):
        for name, shape in SHAPES.items():
            tensors[f"model.layers.{layer}.{name}"] = torch.randn(shape, generator=generator)
    tensors["model.norm.weight"] = torch.randn(6, generator=generator)
    tensors["lm_head.weight"] = torch.randn(5, 6, generator=generator)
    return {key: value.to(dtype) for key, value in tensors.items()}


def _pair(seed: int, dtype: torch.dtype = torch.bfloat16) -> list[StateDict]:
    generator = torch.Generator().manual_seed(seed)
    return [_model(generator, dtype) for _ in range(2)]


def _position(tensor: TensorPlan) -> float:
    layer = layer_of(tensor.key)
    return gradient_position(layer, LAYERS) if layer is not None else 0.0


# ---------------------------------------------------------------- settings


def test_gradients_and_filters_resolve_as_mergekit_evaluates_them() -> None:
    """mergekit's ``evaluate_setting``: a list of numbers spread over [0, 1], linear between neighbours; the
    first filter that is a substring of the name; a layer of a slice of one stands at 1."""
    assert [gradient_position(i, 4) for i in range(4)] == [0, 1 / 3, 2 / 3, 1] and gradient_position(0, 1) == 1
    assert gradient([0, 0.5, 0.3, 0.7, 1], 1 / 3) == pytest.approx(0.5 + (0.3 - 0.5) / 3)
    assert gradient([0, 0.5, 0.3, 0.7, 1], 2 / 3) == pytest.approx(0.3 + (0.7 - 0.3) * 2 / 3)
    assert gradient([0.2, 0.8], 1.0) == 0.8 and gradient([0.4], 0.7) == 0.4
    assert resolve_setting(T_SETTING, "model.layers.2.self_attn.q_proj.weight", 2 / 3) == pytest.approx(0.3 + 0.4 * 2 / 3)
    assert resolve_setting(T_SETTING, "model.layers.1.mlp.up_proj.weight", 1 / 3) == pytest.approx(0.5 + 0.2 / 3)
    assert resolve_setting(T_SETTING, "model.norm.weight", 0.0) == 0.5
    assert resolve_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None
    assert resolve_setting([{"filter": "*", "value": 0.25}], "anything", 0.3) == 0.25
    assert resolve_setting(0.7, "anything", 0.3) == 0.7


def test_layer_keys_name_their_layer_and_move_to_another() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12 and layer_of("transformer.h.3.attn.c_attn.bias") == 3
    assert layer_of("blocks.7.norm1.weight") == 7 and layer_of("model.embed_tokens.weight") is None
    assert relayer("model.layers.12.mlp.up_proj.weight", 4) == "model.layers.4.mlp.up_proj.weight"
    assert relayer("lm_head.weight", 4) == "lm_head.weight"


# ---------------------------------------------------------------- per-tensor parameters


@pytest.mark.parametrize("cut", CUTS[:3], ids=lambda c: f"chunk{c[0]}")
def test_slerp_takes_each_layers_t_from_the_plan(tmp_path: Path, cut: tuple[int, int]) -> None:
    """Gradient SLERP: each tensor's ``t`` resolved into the plan from a filtered gradient over the layers;
    every tensor is within one ulp of the definition at its own ``t``."""
    a, b = _pair(1)
    seen: dict[str, float] = {}

    def planned(plan: MergePlan) -> MergePlan:
        def t_of(tensor: TensorPlan) -> dict[str, Any]:
            seen[tensor.key] = resolve_setting(T_SETTING, tensor.key, _position(tensor))
            return {"t": seen[tensor.key]}

        return plan.with_parameters(t_of)

    soup = merge_both_ways(tmp_path, [a, b], get_method("slerp")({"t": 0.5}), cut=cut, planned=planned)
    assert seen["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.5 - 0.2 / 3)
    assert seen["model.layers.3.mlp.up_proj.weight"] == 0 and seen["model.embed_tokens.weight"] == 0.5
    for key in a:
        ck.assert_within_ulp(soup[key], slerp_by_hand(seen[key], a[key], b[key]), torch.bfloat16, key)
    ck.assert_bit_equal(soup["model.layers.3.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])
    ck.assert_bit_equal(soup["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


PER_TENSOR = [
    # (method, the merge's parameters and weights, one tensor's own, the same merge with those as its own)
    ("task_arithmetic", ({"lambda": 1.0}, None, None), {"lambda": 0.6}, ({"lambda": 0.6}, None, None)),
    ("ties", ({"density": 0.9}, None, None), {"density": [0.5, 0.8]},
     ({"density": 0.9}, None, [{"density": 0.5}, {"density": 0.8}])),
    ("ties", ({}, [1.0, 1.0], [{"density": 0.3}, {}]), {"density": 0.6, "weight": [2.0, 0.5]},
     ({"density": 0.6}, [2.0, 0.5], [{"density": 0.3}, {}])),
    ("dare_ties", ({"density": 0.7, "seed": 3}, None, None), {"density": 0.4}, ({"density": 0.4, "seed": 3}, None, None)),
    ("weighted", ({}, [1.0, 1.0], None), {"weight": [1.0, 3.0]}, ({}, [1.0, 3.0], None)),
]


@pytest.mark.parametrize(("name", "merge", "own", "same"), PER_TENSOR, ids=[p[0] for p in PER_TENSOR])
def test_a_tensors_own_parameters_make_what_a_merge_with_them_makes(
    tmp_path: Path, name: str, merge: tuple[Any, ...], own: dict[str, Any], same: tuple[Any, ...]
) -> None:
    """A tensor given its own parameters in the plan is, bit for bit, that tensor of a merge whose recipe gives
    those parameters; every other tensor is the plain merge's."""
    method_class = get_method(name)
    a, b = _pair(2, torch.float32)
    generator = torch.Generator().manual_seed(9)
    base = {k: (v + 0.1 * torch.randn(v.shape, generator=generator)).to(v.dtype) for k, v in a.items()}
    base = base if method_class.needs_base else None
    key = "model.layers.2.mlp.up_proj.weight"

    def planned(plan: MergePlan) -> MergePlan:
        return plan.with_parameters(lambda t: own if t.key == key else None)

    soup = merge_both_ways(tmp_path / "own", [a, b], method_class(*merge), base, CUTS[1], planned)
    plain = merge_both_ways(tmp_path / "plain", [a, b], method_class(*merge), base, CUTS[1])
    given = merge_both_ways(tmp_path / "given", [a, b], method_class(*same), base, CUTS[1])
    assert not torch.equal(plain[key], given[key])
    for k in a:
        ck.assert_bit_equal(soup[k], (given if k == key else plain)[k], k)


def test_a_tensors_parameters_are_checked_as_a_recipes_are(tmp_path: Path) -> None:
    ties = get_method("ties")({"density": 0.5})
    assert ties.for_tensor({}) is ties
    assert ties.for_tensor({"density": 0.4}) is ties.for_tensor({"density": 0.4})  # made once per merge
    with pytest.raises(RecipeError, match="density"):
        ties.for_tensor({"density": 1.5})
    with pytest.raises(RecipeError, match="takes no per-ingredient lambda"):
        ties.for_tensor({"lambda": [0.5, 1.0]})
    with pytest.raises(RecipeError, match="takes no weights"):
        get_method("slerp")({"t": 0.5}).for_tensor({"weight": [1.0, 2.0]})
    with pytest.raises(RecipeError, match="extra|not permitted"):
        ties.for_tensor({"densty": 0.5})

    key = "model.layers.1.mlp.up_proj.weight"  # the merge stops before it reads, naming the tensor
    with pytest.raises(RecipeError, match=rf"^{key}: density: Extra inputs are not permitted"):
        merge_both_ways(tmp_path, _pair(7), get_method("uniform")(),
                        planned=lambda plan: plan.with_parameters(lambda t: {"density": 2.0} if t.key == key else None))


def test_select_keeps_the_per_input_values_of_the_inputs_it_keeps() -> None:
    meta = TensorMeta(torch.float32, (3,))
    plan = MergePlan([TensorPlan.aligned("w", meta, ["w", "x", "y"], True, "w")], base="the base")
    plan = plan.with_parameters(lambda t: {"density": [0.1, 0.2, 0.3], "lambda": 0.5})
    (chosen,) = plan.select([2, 0]).tensors
    assert chosen.inputs == (Input(0, "y"), Input(1, "w")) and chosen.base_input == Input(BASE, "w")
    assert chosen.parameters == {"density": [0.3, 0.1], "lambda": 0.5}
    (with_base,) = plan.with_base_as_ingredient().tensors
    assert with_base.sources == ("w", "x", "y", "w") and with_base.inputs[-1].ingredient == 3
    assert with_base.base_input is None


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
def test_rows_gathered_or_sliced_from_each_input(tmp_path: Path, cut: tuple[int, int]) -> None:
    """An output tensor made of rows of its inputs (an embedding in another vocabulary's order; rows of a
    3-d tensor; a slice): the streamed soup is the average of exactly those rows, and an ingredient scored
    under the plan is its own tensor with those rows."""
    a, b = _pair(3, torch.float32)
    rows = {
        "model.embed_tokens.weight": ((2, 0, 1), range(1, 4)),
        "model.layers.1.self_attn.q_proj.weight": ((6, 0, 3, 3), (5, 4, 3, 2)),
        "model.layers.2.mlp.up_proj.weight": (range(1, 3), (0, 2)),
    }

    def planned(plan: MergePlan) -> MergePlan:
        return MergePlan([t.gathered(rows[t.key]) if t.key in rows else t for t in plan.tensors])

    soup = merge_both_ways(tmp_path, [a, b], get_method("uniform")(), cut=cut, planned=planned)
    for key, (mine, theirs) in rows.items():
        expected = (a[key][list(mine)] + b[key][list(theirs)]) * 0.5
        assert soup[key].shape == expected.shape
        ck.assert_bit_equal(soup[key], expected, key)
    ck.assert_bit_equal(soup["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) * 0.5)

    path = ck.save_safetensors(b, tmp_path / "b.safetensors")
    with open_checkpoint(path) as checkpoint:
        plan = planned(align(layouts_of([checkpoint, checkpoint])))
        scored = ingredient_weights(checkpoint, plan, 1).state_dict()
    for key, (_, theirs) in rows.items():
        ck.assert_bit_equal(scored[key], b[key][list(theirs)], key)


def test_rows_of_different_numbers_are_refused() -> None:
    tensor = TensorPlan.aligned("e", TensorMeta(torch.float32, (5, 2)), ["e", "e"], True)
    with pytest.raises(ValueError, match="differ in number"):
        tensor.gathered([(0, 1), (0, 1, 2)])
    assert tensor.gathered([(0, 1, 2), range(2, 5)]).meta.shape == (3, 2)


# ---------------------------------------------------------------- layers


def test_layers_taken_from_other_layers_of_other_models(tmp_path: Path) -> None:
    """Layer stacking: five output layers from four-layer models, each a layer of one model (passthrough) or
    the merge of two models' same layer; tensors outside the layers are merged as planned."""
    a, b = _pair(4)
    layers = [[(1, 2)], [(0, 0)], [(0, 1), (1, 1)], [(1, 3)], [(0, 3)]]
    soup = merge_both_ways(tmp_path, [a, b], get_method("uniform")(), planned=lambda plan: restack(plan, layers))
    models = (a, b)
    for output, sources in enumerate(layers):
        for name in SHAPES:
            key = f"model.layers.{output}.{name}"
            read = [models[i][f"model.layers.{layer}.{name}"] for i, layer in sources]
            expected = read[0] if len(read) == 1 else ((read[0].float() + read[1].float()) * 0.5).to(torch.bfloat16)
            ck.assert_bit_equal(soup[key], expected, key)
    assert len([k for k in soup if k.startswith("model.layers.")]) == len(layers) * len(SHAPES)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        ck.assert_bit_equal(soup[key], ((a[key].float() + b[key].float()) * 0.5).to(torch.bfloat16), key)
    in_order = [layer_of(k) for k in soup if layer_of(k) is not None]  # the layers in output order, then the rest
    assert in_order == sorted(in_order) and list(soup)[-1] == "model.norm.weight"


def test_a_stacked_plan_names_each_inputs_source_layer() -> None:
    layout = Layout("m", {k: TensorMeta(v.dtype, tuple(v.shape)) for k, v in _pair(5)[0].items()})
    plan = restack(align([layout, layout]), [[(1, 3)], [(0, 2), (1, 0)]])
    (copied,) = [t for t in plan.tensors if t.key == "model.layers.0.mlp.up_proj.weight"]
    assert not copied.average and copied.inputs == (Input(1, "model.layers.3.mlp.up_proj.weight", layer=3),)
    (merged,) = [t for t in plan.tensors if t.key == "model.layers.1.mlp.up_proj.weight"]
    assert merged.average and [(i.ingredient, i.key, i.layer) for i in merged.inputs] == [
        (0, "model.layers.2.mlp.up_proj.weight", 2), (1, "model.layers.0.mlp.up_proj.weight", 0)]
    assert plan.ingredients == 2


# ---------------------------------------------------------------- whole-tensor methods


class RowTopHalf(MergeMethod):
    """A method whose definition needs whole rows: the average, with the smaller half (by magnitude) of each
    row's elements set to 0 (a rank by magnitude per row, as DELLA's or TIES's by row would need)."""

    name = "row-top-half"
    whole_tensor = True
    float64_kernel = True
    calls = 0

    def merge_tensor(self, parts: Sequence[torch.Tensor], base: torch.Tensor | None, tensor: MergedTensor
                     ) -> torch.Tensor:
        type(self).calls += 1
        assert tensor.dtype == torch.float64 and base is None
        mean = torch.stack([p.to(tensor.dtype) for p in parts]).mean(0)
        rows = mean.reshape(mean.shape[0], -1) if mean.dim() else mean.reshape(1, 1)
        keep = rows.abs().argsort(dim=1, descending=True, stable=True)[:, : math.ceil(rows.shape[1] / 2)]
        kept = torch.zeros_like(rows).scatter_(1, keep, rows.gather(1, keep))
        return kept.reshape(mean.shape)


def _row_top_half_by_hand(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The definition, element by element in Python floats."""
    values = [p.double() for p in parts]
    mean = sum(values) / len(values)
    flat = mean.reshape(mean.shape[0], -1) if mean.dim() else mean.reshape(1, 1)
    out = torch.zeros_like(flat)
    for r, row in enumerate(flat.tolist()):
        order = sorted(range(len(row)), key=lambda i: -abs(row[i]))
        for i in order[: math.ceil(len(row) / 2)]:
            out[r, i] = row[i]
    return out.reshape(mean.shape)


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
def test_a_whole_tensor_method_is_given_each_tensor_whole(tmp_path: Path, cut: tuple[int, int]) -> None:
    """The engine reads every input of a merged tensor in full, calls ``merge_tensor`` once per tensor, and
    writes its result rounded once: the definition on whole tensors, whatever the chunks; rows gathered
    and per-tensor parameters reach it as they reach a kernel."""
    a, b = _pair(6)
    a["scalar"], b["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(-0.5, dtype=torch.bfloat16)
    rows = ((4, 1, 0), (0, 2, 3))

    def planned(plan: MergePlan) -> MergePlan:
        return MergePlan([t.gathered(rows) if t.key == "lm_head.weight" else t for t in plan.tensors])

    RowTopHalf.calls = 0
    soup = merge_both_ways(tmp_path, [a, b], RowTopHalf(), cut=cut, planned=planned)
    assert RowTopHalf.calls == 2 * len(a)  # once per tensor, for each of the two soups
    for key in a:
        parts = [a[key], b[key]] if key != "lm_head.weight" else [a[key][list(rows[0])], b[key][list(rows[1])]]
        ck.assert_bit_equal(soup[key], _row_top_half_by_hand(parts).to(torch.bfloat16), key)
    assert int((soup["model.layers.0.mlp.up_proj.weight"] == 0).sum()) >= 3 * 350


def test_a_whole_tensor_methods_overflow_stops_the_merge(tmp_path: Path) -> None:
    """What a whole-tensor method makes is checked as a kernel's blocks are: a value fp16 cannot hold stops
    the merge before anything is written."""
    big = {"w": torch.full((4, 3), 6e4, dtype=torch.float32)}
    paths = [ck.save_safetensors(big, tmp_path / f"{i}.safetensors") for i in range(2)]

    class Doubling(RowTopHalf):
        def merge_tensor(self, parts: Sequence[torch.Tensor], base: torch.Tensor | None, tensor: MergedTensor
                         ) -> torch.Tensor:
            return parts[0].double() + parts[1].double()

    opened = [open_checkpoint(p) for p in paths]
    try:
        plan = align(layouts_of(opened))
        with pytest.raises(NonFiniteSoupError, match="overflow"), \
                SoupWriter(tmp_path / "soup", output_metas(plan, torch.float16), 10**9) as writer:
            stream_merge(opened, plan, Doubling(), writer, torch.float16)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    ck.assert_no_output(tmp_path / "soup")
