"""mergekit 0.1.5's interpolation methods and its own small ones, through the real engine.

``linear``, ``nuslerp``, ``multislerp``, ``karcher``, ``nearswap``, ``passthrough`` and ``arcee_fusion``:
every soup is merged both ways (in memory and streamed, with chunks and blocks that cut every tensor)
and compared with its float64 definition in :mod:`tests.mergekit_reference`, rounded once to bf16: within
one bf16 ulp on every element. Per-model parameters reach a method as a tensor's per-input lists in the
plan, as a mergekit config's reader gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import MergeMethod, get_method
from hub_soup.merging.plan import MergePlan
from tests import checkpoints as ck
from tests import mergekit_reference as ref
from tests.method_checks import CUTS, merge_both_ways

StateDict = dict[str, torch.Tensor]
BF16 = torch.bfloat16
# Shapes no chunk or block size divides: rows of 13 * 3 and 700 elements, a vector, a 0-dim tensor.
SHAPES = {"odd": (7, 13, 3), "wide": (3, 700), "prime": (1031,), "scalar": ()}


def models(seed: int, count: int, *, shared: float = 0.0, shapes: Mapping[str, tuple[int, ...]] = SHAPES,
           scale: float = 1.0) -> list[StateDict]:
    """``count`` bf16 models: each tensor ``shared * common + own`` (``shared`` sets how alike they are)."""
    generator = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(s, generator=generator, dtype=torch.float64) for k, s in shapes.items()}
    return [
        {k: ((shared * common[k] + torch.randn(s, generator=generator, dtype=torch.float64)) * scale).to(BF16)
         for k, s in shapes.items()}
        for _ in range(count)
    ]


def per_input(values: Mapping[str, Sequence[Any]]) -> Callable[[MergePlan], MergePlan]:
    """The plan with every merged tensor given ``values`` (per-input lists): a config's per-model parameters."""
    return lambda plan: plan.with_parameters(lambda tensor: dict(values))


def check(tmp_path: Path, method: MergeMethod, states: Sequence[StateDict], definition: Callable[..., torch.Tensor],
          base: StateDict | None = None, planned: Callable[[MergePlan], MergePlan] | None = None,
          cuts: Sequence[tuple[int, int]] = (CUTS[0], CUTS[-1])) -> StateDict:
    """The soup merged both ways at every cut, the same bits at each, within one bf16 ulp of ``definition``
    (called with each tensor's inputs and base) on every element; the soup, for further checks. By default
    at the smallest chunks (7, in blocks of 3: every tensor split, mid-row, chunks larger than blocks) and the
    engine's own (no tensor split, blocks larger than chunks): the middle cuts tell these methods nothing new."""
    soups = [merge_both_ways(tmp_path / f"cut{n}", states, method, base, cut, planned) for n, cut in enumerate(cuts)]
    for key in states[0]:
        for soup in soups[1:]:
            ck.assert_bit_equal(soup[key], soups[0][key], key)
        expected = definition([s[key] for s in states], None if base is None else base[key])
        ck.assert_within_ulp(soups[0][key], expected, BF16, key)
    return soups[0]


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize(("weights", "normalize"), [([0.5, 0.3, 0.2], True), ([2.0, 1.0, 1.0], True),
                                                    ([1.0, -0.5, 0.25], False), ([3.0, -1.0, 1.0], True)])
def test_linear_is_the_weighted_sum_divided_by_the_weights_sum(
    tmp_path: Path, weights: list[float], normalize: bool
) -> None:
    """mergekit's ``linear``: ``normalize`` (default true) divides by the weights' sum; a weight may be negative."""
    parameters = {} if normalize else {"normalize": False}
    method = get_method("linear")(parameters, weights)
    check(tmp_path, method, models(1, 3, shared=1.0),
          lambda xs, _: ref.linear(xs, weight=weights, normalize=normalize))


def test_linear_takes_each_tensors_weights_and_normalize_from_the_plan(tmp_path: Path) -> None:
    """Per-model weights resolved per tensor (a gradient, a filter) reach the kernel as the plan's lists."""
    own = {"odd": ([1.0, 3.0], True), "wide": ([1.0, -2.0], False)}

    def planned(plan: MergePlan) -> MergePlan:
        return plan.with_parameters(
            lambda t: {"weight": own[t.key][0], "normalize": own[t.key][1]} if t.key in own else None)

    def definition(xs: list[torch.Tensor], _: None) -> torch.Tensor:
        key = next((k for k, (w, n) in own.items() if xs[0].shape == SHAPES[k]), None)
        weight, normalize = own[key] if key else ([1.0, 1.0], True)
        return ref.linear(xs, weight=weight, normalize=normalize)

    check(tmp_path, get_method("linear")({}, [1.0, 1.0]), models(2, 2), definition, planned=planned, cuts=CUTS[:2])


def test_linear_refuses_weights_that_normalize_would_divide_by_zero() -> None:
    with pytest.raises(RecipeError, match="sum to 0"):
        get_method("linear")({}, [1.0, -1.0])
    assert get_method("linear")({"normalize": False}, [1.0, -1.0]).weights == [1.0, -1.0]
    with pytest.raises(RecipeError, match="sum to 0"):
        get_method("linear")({}, [1.0, 1.0]).for_tensor({"weight": [2.0, -2.0]})
    summary = get_method("linear")({}, [1.0, 2.0]).card_summary()
    assert summary is not None and "divided by the sum of the weights" in summary


# ---------------------------------------------------------------- passthrough


def test_passthrough_copies_its_one_input_or_scales_it(tmp_path: Path) -> None:
    """No scale: the input bit for bit; a per-input scale from the plan (a filter's value): times it, rounded once."""
    (x,) = models(3, 1)
    soup = check(tmp_path / "plain", get_method("passthrough")(), [x], lambda xs, _: ref.passthrough(xs))
    for key in x:
        ck.assert_bit_equal(soup[key], x[key], key)
    check(tmp_path / "scaled", get_method("passthrough")(), [x], lambda xs, _: ref.passthrough(xs, scale=0.3),
          planned=per_input({"scale": [0.3]}))


def test_passthrough_takes_one_input_per_tensor(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="exactly 1"):
        merge_both_ways(tmp_path, models(4, 2), get_method("passthrough")())


# ---------------------------------------------------------------- nearswap


@pytest.mark.parametrize("t", [0.0, 1e-7, 1e-4, 0.05, 0.5, 3.0])
def test_nearswap_takes_the_other_value_near_the_base_and_steps_t_elsewhere(tmp_path: Path, t: float) -> None:
    base, other = models(5, 2, shared=8.0, scale=0.05)  # near each other: some elements within t, some not
    soup = check(tmp_path, get_method("nearswap")({"t": t}), [other], lambda xs, b: ref.nearswap(xs, b, t=t), base)
    near = (base["wide"].double() - other["wide"].double()).abs() <= t
    assert near.any() or t < 0.01
    ck.assert_bit_equal(soup["wide"][near], other["wide"][near], "wide, near")
    if t == 0:  # nothing is near: the base's values
        ck.assert_bit_equal(soup["wide"], base["wide"], "wide, t = 0")


# ---------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_keeps_the_important_changes_by_exact_quantiles(tmp_path: Path) -> None:
    """Importance by row (softmax over the last axis), a threshold over the whole tensor: every element the
    definition keeps carries the fine-tune's value, every other the base's, whatever the chunks."""
    base, tuned = models(6, 2, shared=4.0, scale=0.5)
    soup = check(tmp_path, get_method("arcee_fusion")(), [tuned], lambda xs, b: ref.arcee_fusion(xs, b), base)
    importance = ref.arcee_fusion_importance(tuned["odd"].double(), base["odd"].double())
    kept = importance >= ref.arcee_fusion_threshold(importance)
    assert 0 < int(kept.sum()) < kept.numel()
    ck.assert_bit_equal(soup["odd"][kept], tuned["odd"][kept], "odd, kept")
    ck.assert_bit_equal(soup["odd"][~kept], base["odd"][~kept], "odd, dropped")
    summary = get_method("arcee_fusion")().card_summary()
    assert summary is not None and "exact quantiles" in summary


def test_arcee_fusion_of_float64_models_keeps_what_the_definition_keeps(tmp_path: Path) -> None:
    """Float64 inputs are computed on as read (no widened copy between), and a tensor's later passes are given
    the chunks its first read: the passes leave them as they were, and the soup is the definition's selection."""
    base, tuned = ({k: v.double() for k, v in state.items()} for state in models(6, 2, shared=4.0, scale=0.5))
    for n, cut in enumerate((CUTS[0], CUTS[-1])):
        soup = merge_both_ways(tmp_path / f"cut{n}", [tuned], get_method("arcee_fusion")(), base, cut)
        for key in ("odd", "wide"):
            importance = ref.arcee_fusion_importance(tuned[key], base[key])
            kept = importance >= ref.arcee_fusion_threshold(importance)
            assert 0 < int(kept.sum()) < kept.numel()
            ck.assert_bit_equal(soup[key], torch.where(kept, tuned[key], base[key]), f"{key} (chunk {cut[0]})")


# ---------------------------------------------------------------- nuslerp

NUSLERP = [
    ({}, [0.5, 0.5], True),
    ({}, [1.0, 3.0], False),
    ({"nuslerp_flatten": False}, [0.7, 0.3], False),
    ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [0.7, 0.3], False),
    ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [1.0, 2.0], True),
]


@pytest.mark.parametrize(("parameters", "weights", "with_base"), NUSLERP, ids=lambda p: str(p))
def test_nuslerp_interpolates_the_whole_tensor_or_each_vector(
    tmp_path: Path, parameters: dict[str, bool], weights: list[float], with_base: bool
) -> None:
    """SLERP at ``t = w1 / (w0 + w1)``, of task vectors with a base; one angle per tensor (streamed), or per
    vector along the last axis, or along the first with ``nuslerp_row_wise`` (mergekit's code: columns)."""
    *states, base = models(7, 3, shared=2.0)
    method = get_method("nuslerp")(parameters, weights)
    assert (method.row_elements((3, 700)) > 1) == (not parameters.get("nuslerp_flatten", True))
    check(tmp_path, method, states, lambda xs, b: ref.nuslerp(xs, b, weight=weights, **parameters),
          base if with_base else None)


def test_nuslerp_row_wise_takes_the_columns_of_a_matrix(tmp_path: Path) -> None:
    """mergekit's ``nuslerp_row_wise: true`` interpolates the vectors along the first axis: each column of the
    soup is the SLERP of the inputs' columns (each row, without it)."""
    a, b = models(8, 2, shapes={"wide": (3, 700)})
    for row_wise in (False, True):
        method = get_method("nuslerp")({"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}, [1.0, 1.0])
        soup = merge_both_ways(tmp_path / str(row_wise), [a, b], method)["wide"]
        pick = (lambda x: x[:, 5]) if row_wise else (lambda x: x[1])
        expected = ref.slerp([pick(b["wide"])], pick(a["wide"]), t=0.5, dot_threshold=1.0)
        ck.assert_within_ulp(pick(soup), expected, BF16, f"row_wise {row_wise}")


def test_nuslerp_takes_each_tensors_weights_from_the_plan(tmp_path: Path) -> None:
    states = models(9, 2, shared=1.0)
    check(tmp_path, get_method("nuslerp")({}, [1.0, 1.0]), states,
          lambda xs, _: ref.nuslerp(xs, weight=[1.0, 4.0]), planned=per_input({"weight": [1.0, 4.0]}), cuts=CUTS[:2])
    soup = merge_both_ways(tmp_path / "ends", states, get_method("nuslerp")({}, [1.0, 0.0]))
    for key in states[0]:
        ck.assert_bit_equal(soup[key], states[0][key], key)


# ---------------------------------------------------------------- multislerp

MULTISLERP = [
    ({}, [1.0, 1.0, 0.5], True),
    ({}, [0.2, 0.3, 0.5], False),
    ({"normalize_weights": False}, [0.4, 0.4, 0.4], True),
    ({}, [1.0, 2.0], False),
]


@pytest.mark.parametrize(("parameters", "weights", "with_base"), MULTISLERP, ids=lambda p: str(p))
def test_multislerp_runs_on_the_gram_matrix_and_streams(
    tmp_path: Path, parameters: dict[str, bool], weights: list[float], with_base: bool
) -> None:
    """The whole computation on the inputs' dot products (one statistics pass), the soup streamed: within one
    ulp of mergekit's computation on whole float64 tensors."""
    *states, base = models(10, len(weights) + 1, shared=1.5)
    check(tmp_path, get_method("multislerp")(parameters, weights), states,
          lambda xs, b: ref.multislerp(xs, b, weight=weights, **parameters), base if with_base else None)


def test_multislerp_of_antipodal_models(tmp_path: Path) -> None:
    """Two opposite models of equal weight: their weighted sum (mergekit's fallback); three: refused, naming the
    tensor."""
    (x,) = models(11, 1, shapes={"w": (4, 5)})
    minus = {"w": -x["w"]}
    soup = merge_both_ways(tmp_path / "two", [x, minus], get_method("multislerp")({}, [1.0, 1.0]))
    ck.assert_within_ulp(soup["w"], ref.multislerp([x["w"], minus["w"]], weight=[1.0, 1.0]), BF16)
    with pytest.raises(RecipeError, match="^multislerp: w: the weighted mean"):
        merge_both_ways(tmp_path / "three", [x, minus, x, minus], get_method("multislerp")({}, [1.0] * 4))
    with pytest.raises(RecipeError, match="^multislerp: w: the weights .* sum to 0"):
        merge_both_ways(tmp_path / "zero", [x, minus], get_method("multislerp")({}, [1.0, -1.0]))


# ---------------------------------------------------------------- karcher


@pytest.mark.parametrize(("count", "parameters", "shared"), [(3, {}, 1.0), (3, {"max_iter": 20, "tol": 1e-7}, 0.3),
                                                             (4, {"max_iter": 2}, 0.5), (2, {}, 3.0)])
def test_karcher_iterates_on_the_gram_matrix_and_streams(
    tmp_path: Path, count: int, parameters: dict[str, Any], shared: float
) -> None:
    """The iteration on the models' dot products (one statistics pass), the soup streamed: within one ulp of the
    iteration on whole float64 tensors, however many steps it takes."""
    states = models(12, count, shared=shared)
    check(tmp_path, get_method("karcher")(parameters), states, lambda xs, _: ref.karcher(xs, **parameters))


def test_karcher_leaves_out_the_direction_of_a_zero_model(tmp_path: Path) -> None:
    """A model of norm at most ``tol`` has no direction, but counts in the norm (a third of it here)."""
    a, b = models(13, 2, shared=1.0)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    soup = check(tmp_path, get_method("karcher")(), [a, zero, b], lambda xs, _: ref.karcher(xs), cuts=CUTS[:2])
    ck.assert_within_ulp(soup["wide"], ref.karcher([a["wide"], b["wide"]]) * 2 / 3, BF16, "a third less norm")


# ---------------------------------------------------------------- from the command line

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
FINE_TUNES = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())[:2]


@pytest.mark.parametrize("argv", [
    [*FINE_TUNES, "--method", "karcher"],
    [*FINE_TUNES, "--method", "linear", "--weights", "3", "-1"],
    [*FINE_TUNES, "--method", "nuslerp", "--weights", "1", "2"],
    [*FINE_TUNES, "--method", "multislerp", "--weights", "1", "2"],
    [FINE_TUNES[0], "--method", "nearswap", "--base", str(DIGITS / "base"), "--t", "0.001"],
    [FINE_TUNES[0], "--method", "arcee_fusion", "--base", str(DIGITS / "base")],
    [FINE_TUNES[0], "--method", "passthrough"],
], ids=lambda argv: argv[argv.index("--method") + 1])
def test_each_method_makes_a_soup_from_the_command_line(tmp_path: Path, argv: list[str]) -> None:
    """A recipe names the method and its parameters as mergekit does; the soup's card says what it did."""
    from hub_soup.cli import main

    assert main(["merge", *argv, "-o", str(tmp_path / "soup")]) == 0
    method = get_method(argv[argv.index("--method") + 1])
    assert method.title is not None and method.title in (tmp_path / "soup" / "README.md").read_text()


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_a_recipe_may_give_an_optional_base(method: str) -> None:
    """nuslerp and multislerp take a base where one is given (their task vectors), and work without one."""
    from hub_soup.recipe import parse_recipe

    text = f"ingredients:\n  - {{ref: a, weight: 1}}\n  - {{ref: b, weight: 2}}\nmethod: {method}\noutput: {{path: o}}\n"
    assert parse_recipe(text).base is None
    assert parse_recipe(text + "base: {ref: c}\n").base is not None
