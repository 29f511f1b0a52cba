"""The float64 reference of mergekit's methods (tests/mergekit_reference.py) satisfies the identities its definitions imply.

The reference is what hub-soup's mergekit methods will be checked against, so it is
checked here first, without mergekit: each method on inputs whose answer is known from
the definition alone. (Its agreement with mergekit's own code is what the opt-in
``benchmarks/mergekit_oracle.py`` measures, in mergekit's environment.)
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import mergekit_reference as ref

F64 = torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(26)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64) * scale


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool(torch.allclose(a, b, rtol=tol, atol=tol))


def test_the_twenty_methods_of_mergekit_0_1_5() -> None:
    assert sorted(ref.METHODS) == sorted([
        "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
        "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock",
        "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl",
    ])
    assert ref.RANDOM_METHODS <= set(ref.METHODS)


def test_results_are_float64_whatever_the_inputs(gen: torch.Generator) -> None:
    x = randn(gen, 4, 5).to(torch.bfloat16)
    assert ref.linear([x, x], weight=[1, 1]).dtype == F64
    assert ref.task_arithmetic([x], x, weight=1).dtype == F64


# --------------------------------------------------------------------------------------------- interpolation


def test_linear_of_identical_tensors_is_that_tensor(gen: torch.Generator) -> None:
    x = randn(gen, 6, 7)
    assert close(ref.linear([x, x, x], weight=[0.5, 0.3, 0.9]), x)
    # without normalize it is the weighted sum
    assert close(ref.linear([x, x], weight=[0.5, 0.25], normalize=False), 0.75 * x)
    with pytest.raises(ValueError, match="sum to 0"):
        ref.linear([x, x], weight=[1, -1])
    with pytest.raises(ValueError, match="ignores a base"):
        ref.linear([x], x, weight=1)


def test_slerp_endpoints_and_the_midpoint_of_orthogonal_unit_vectors(gen: torch.Generator) -> None:
    a, b = randn(gen, 3, 8), randn(gen, 3, 8)
    assert close(ref.slerp([b], a, t=0.0), a)
    assert close(ref.slerp([b], a, t=1.0), b)
    u = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    v = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    mid = ref.slerp([v], u, t=0.5)
    assert math.isclose(float(torch.linalg.vector_norm(mid)), 1.0, rel_tol=1e-12)
    assert close(mid, (u + v) / math.sqrt(2))
    # nearly parallel tensors interpolate linearly (mergekit's guard)
    assert close(ref.slerp([2 * a], a, t=0.25), 1.25 * a)


def test_nuslerp_weights_pick_the_direction_and_a_base_makes_it_slerp_of_task_vectors(gen: torch.Generator) -> None:
    base, a, b = randn(gen, 4, 6), randn(gen, 4, 6), randn(gen, 4, 6)
    assert close(ref.nuslerp([a, b], weight=[1, 0]), a)
    assert close(ref.nuslerp([a, b], weight=[0, 2]), b)
    with_base = ref.nuslerp([a, b], base, weight=[1, 3])
    assert close(with_base, base + ref.slerp([b - base], a - base, t=0.75))
    # row by row: every row of the result is the SLERP of those rows
    rows = ref.nuslerp([a, b], weight=[1, 1], nuslerp_flatten=False)
    assert close(rows[2], ref.slerp([b[2]], a[2], t=0.5))
    columns = ref.nuslerp([a, b], weight=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert close(columns[:, 1], ref.slerp([b[:, 1]], a[:, 1], t=0.5))


def test_multislerp_of_identical_tensors_keeps_them(gen: torch.Generator) -> None:
    base, x = randn(gen, 5, 5), randn(gen, 5, 5)
    assert close(ref.multislerp([x], base, weight=[0.3]), x)
    assert close(ref.multislerp([x, x, x], base, weight=[1, 2, 3]), x, tol=1e-6)  # eps enters as in mergekit
    u = torch.tensor([1.0, 0.0], dtype=F64)
    v = torch.tensor([0.0, 1.0], dtype=F64)
    assert math.isclose(float(torch.linalg.vector_norm(ref.multislerp([u, v], weight=[1, 1]))), 1.0, rel_tol=1e-6)


def test_karcher_of_identical_tensors_is_that_tensor(gen: torch.Generator) -> None:
    x = randn(gen, 7, 3)
    assert close(ref.karcher([x, x, x]), x)
    assert close(ref.karcher([x]), x)
    # two orthogonal directions of equal norm: the mean direction is the bisector, the norm kept
    u = torch.tensor([2.0, 0.0], dtype=F64)
    v = torch.tensor([0.0, 2.0], dtype=F64)
    assert close(ref.karcher([u, v], tol=1e-12, max_iter=50), torch.tensor([math.sqrt(2)] * 2, dtype=F64), 1e-9)


def test_passthrough_returns_its_one_input(gen: torch.Generator) -> None:
    x = randn(gen, 2, 9)
    assert torch.equal(ref.passthrough([x]), x)
    assert close(ref.passthrough([x], scale=0.5), 0.5 * x)
    with pytest.raises(ValueError, match="exactly 1"):
        ref.passthrough([x, x])


# --------------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_of_one_model_at_lambda_1_is_the_model(gen: torch.Generator) -> None:
    base, x = randn(gen, 6, 4), randn(gen, 6, 4)
    assert close(ref.task_arithmetic([x], base, weight=1.0), x)
    assert close(ref.task_arithmetic([x, x], base, weight=[0.4, 0.6], lambda_=2.0), base + 2 * (x - base))
    assert close(ref.task_arithmetic([x, x], base, weight=[1.0, 3.0], normalize=True), x)


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_at_density_1_with_one_model_is_task_arithmetic(gen: torch.Generator, normalize: bool) -> None:
    base, x = randn(gen, 8, 8), randn(gen, 8, 8)
    expected = ref.task_arithmetic([x], base, weight=0.7, normalize=normalize, lambda_=0.9)
    assert close(ref.ties([x], base, weight=0.7, density=1.0, normalize=normalize, lambda_=0.9), expected)


def test_ties_trims_to_the_top_magnitudes_and_elects_the_sign_of_the_sum() -> None:
    base = torch.zeros(4, dtype=F64)
    a = torch.tensor([4.0, -1.0, 2.0, 3.0], dtype=F64)
    b = torch.tensor([-1.0, 2.0, -5.0, 1.0], dtype=F64)
    # density 0.5: a keeps [4, ., ., 3], b keeps [., 2, -5, .]; signs: +, +, -, +; disjoint mean
    assert torch.equal(ref.ties([a, b], base, weight=1.0, density=0.5), torch.tensor([4.0, 2.0, -5.0, 3.0], dtype=F64))
    # breadcrumbs at density 1 trims nothing (gamma too is without effect): task arithmetic
    assert close(ref.breadcrumbs([a, b], base, weight=[1, 1], gamma=0.25), a + b)


def test_rank_ties_are_all_kept_and_marked_undecided() -> None:
    delta = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5], dtype=F64)
    keep, undecided = ref.magnitude_keep(delta, 0.4)  # k = 2: 3 and one of the two 2s
    assert keep.tolist() == [False, True, True, True, False]
    assert undecided.tolist() == [False, False, True, True, False]
    keep, undecided = ref.outlier_keep(torch.arange(1.0, 11.0, dtype=F64), 0.5, 0.2)  # drop top 2, bottom 3
    assert keep.tolist() == [False] * 3 + [True] * 5 + [False] * 2
    assert not undecided.any()


def test_dare_keeps_density_of_each_task_vector_rescaled_by_1_over_density(gen: torch.Generator) -> None:
    base, x = randn(gen, 200, 100), randn(gen, 200, 100)
    delta = x - base
    out = ref.dare_linear([x], base, weight=1.0, density=0.3, generator=gen) - base
    kept = out != 0
    assert abs(ref.bernoulli_z(int(kept.sum()), kept.numel(), 0.3)) < 5
    assert close(out[kept], delta[kept] / 0.3)
    # the same masks, no rescale: the kept elements as they are; mergekit's L1 rescale matches the norm
    masks = [kept]
    assert close(ref.dare_linear([x], base, weight=1.0, density=0.3, masks=masks, rescale=False) - base, delta * kept)
    l1 = ref.dare_linear([x], base, weight=1.0, density=0.3, masks=masks, rescale_by="l1") - base
    assert math.isclose(float(l1.abs().sum()), float(delta.abs().sum()), rel_tol=1e-12)
    # dare_ties of one model is dare_linear of it (every kept element agrees with itself)
    assert close(ref.dare_ties([x], base, weight=1.0, density=0.3, masks=masks), out + base)
    with pytest.raises(ValueError, match="masks or a torch.Generator"):
        ref.dare_ties([x], base, weight=1.0, density=0.3)


def test_della_keep_probabilities_span_density_plus_minus_epsilon_by_rank(gen: torch.Generator) -> None:
    delta = randn(gen, 3, 101)
    p = ref.della_keep_probabilities(delta, 0.6, 0.1)
    assert p is not None
    row = p[1]
    assert math.isclose(float(row.min()), 0.5) and math.isclose(float(row.max()), 0.7)
    assert math.isclose(float(row.mean()), 0.6, rel_tol=1e-12)
    assert int(row.argmax()) == int(delta[1].abs().argmax())  # the largest magnitude is the likeliest kept
    assert ref.della_keep_probabilities(delta, 1.0, 0.1) is None
    with pytest.raises(ValueError, match="epsilon"):
        ref.della_keep_probabilities(delta, 0.95, 0.1)
    base = torch.zeros_like(delta)
    out = ref.della_linear([delta], base, weight=1.0, density=0.6, epsilon=0.1, generator=gen)
    kept = out != 0
    assert abs(ref.poisson_binomial_z(kept, p)) < 5
    assert close(out[kept], delta[kept] / p[kept])


# --------------------------------------------------------------------------------------------- the others


def test_model_stock_of_two_identical_fine_tunes_is_that_fine_tune(gen: torch.Generator) -> None:
    base, x = randn(gen, 5, 6), randn(gen, 5, 6)
    assert close(ref.model_stock([x, x], base), x)
    assert close(ref.model_stock([x, x], base, filter_wise=True), x)
    # opposite task vectors: cos -1, t = -2 / 0 is singular: the base
    assert close(ref.model_stock([x, 2 * base - x], base), base)
    # a negative cosine: the formula's t < 0 goes past the base; hub-soup's clamp keeps the base
    y = base + torch.tensor([1.0, 0.0], dtype=F64).repeat(15).reshape(5, 6)
    z = base + torch.tensor([-0.5, 1.0], dtype=F64).repeat(15).reshape(5, 6)
    assert not close(ref.model_stock([y, z], base), base)
    assert close(ref.model_stock([y, z], base, clamp_t_at_zero=True), base)


def test_sce_of_identical_task_vectors_is_that_model(gen: torch.Generator) -> None:
    base, x = randn(gen, 6, 6), randn(gen, 6, 6)
    assert close(ref.sce([x, x, x], base), x)
    assert close(ref.sce([x, x], base, select_topk=0.5), base)  # identical vectors: no variance, nothing selected


def test_nearswap_takes_the_other_value_only_near_the_base() -> None:
    base = torch.tensor([0.0, 0.0, 0.0], dtype=F64)
    other = torch.tensor([0.05, 0.5, -2.0], dtype=F64)
    assert torch.equal(ref.nearswap([other], base, t=0.0), base)
    assert close(ref.nearswap([other], base, t=0.1), torch.tensor([0.05, 0.1, -0.1], dtype=F64))


def test_ram_averages_the_contributing_task_vectors() -> None:
    base = torch.zeros(3, dtype=F64)
    a = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    b = torch.tensor([3.0, 0.0, 1e-6], dtype=F64)  # 1e-6 is below epsilon: it does not contribute
    assert torch.equal(ref.ram([a, b], base), torch.tensor([2.0, 2.0, 0.0], dtype=F64))
    # ramplus_tl: a has 1 shared and 1 unique position: rho 1, lambda 1 + 0.1 * min(1, 0.2)
    plus = ref.ramplus_tl([a, b], base)
    assert close(plus, torch.tensor([2.0, 2.0 * 1.02, 0.0], dtype=F64))


def test_arcee_fusion_of_a_model_equal_to_its_base_is_the_base(gen: torch.Generator) -> None:
    base = randn(gen, 4, 16)
    assert torch.equal(ref.arcee_fusion([base.clone()], base), base)
    x = base + randn(gen, 4, 16, scale=0.1)
    fused = ref.arcee_fusion([x], base)
    changed = fused != base
    assert changed.any() and torch.equal(fused[changed], x[changed])


# --------------------------------------------------------------------------------------------- parameters

GRADIENT = [0, 0.5, 0.3, 0.7, 1]
FILTERED = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def test_a_gradient_is_read_at_layer_i_of_n_over_n_minus_1() -> None:
    assert ref.layer_t(0, 4) == 0 and ref.layer_t(3, 4) == 1 and ref.layer_t(None, None) == 0
    assert ref.layer_t(0, 1) == 1  # a slice of one layer reads the end (mergekit's planner)
    name = "model.layers.{}.self_attn.q_proj.weight"
    values = [ref.resolve_parameter(GRADIENT, name.format(i), i, 4) for i in range(4)]
    assert values == pytest.approx([0.0, 0.5 * 2 / 3 + 0.3 / 3, 0.3 / 3 + 0.7 * 2 / 3, 1.0], abs=1e-15)
    assert ref.resolve_parameter(GRADIENT, "model.embed_tokens.weight") == 0.0  # outside the layers: t = 0
    assert ref.resolve_parameter([True, False, True], "x", 1, 3, value_type=bool) is False  # discrete: floor
    assert ref.resolve_parameter("1e-3", "x") == 1e-3


def test_a_filter_list_takes_the_first_matching_filter_then_the_default() -> None:
    assert ref.resolve_parameter(FILTERED, "model.layers.1.self_attn.k_proj.weight", 1, 5) == pytest.approx(0.5)
    assert ref.resolve_parameter(FILTERED, "model.layers.1.mlp.up_proj.weight", 1, 5) == pytest.approx(0.5)
    assert ref.resolve_parameter(FILTERED, "model.layers.3.mlp.up_proj.weight", 3, 5) == pytest.approx(0.3)
    assert ref.resolve_parameter(FILTERED, "model.layers.3.input_layernorm.weight", 3, 5) == 0.5
    first = [{"filter": "attn", "value": 1}, {"filter": "self_attn", "value": 2}]
    assert ref.resolve_parameter(first, "model.layers.0.self_attn.o_proj.weight", 0, 4) == 1.0
    assert ref.resolve_parameter([{"filter": "mlp", "value": 1}], "model.norm.weight") is None
    assert ref.resolve_parameter([], "x") is None
    assert ref.resolve_parameter({"filter": "*", "value": 3}, "lm_head.weight") == 3.0


def test_precedence_is_source_then_slice_then_global_and_a_miss_falls_through() -> None:
    source = {"weight": [{"filter": "self_attn", "value": 1.0}]}
    piece = {"weight": [0.2, 0.6]}
    top = {"weight": 0.5, "lambda": 0.9}
    attn, mlp = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert ref.resolve_scopes("weight", [source, piece, top], attn, 1, 2) == 1.0
    assert ref.resolve_scopes("weight", [source, piece, top], mlp, 1, 2) == pytest.approx(0.6)
    assert ref.resolve_scopes("weight", [source, None, top], mlp, 1, 2) == 0.5
    assert ref.resolve_scopes("lambda", [piece, top], mlp, 1, 2) == 0.9
    assert ref.resolve_scopes("normalize", [piece, top], mlp, default=True, value_type=bool) is True
    with pytest.raises(ValueError, match="missing required parameter t"):
        ref.resolve_scopes("t", [piece, top], mlp)
