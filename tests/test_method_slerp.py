"""``slerp`` against the definition (Shoemake 1985), in float64 on whole tensors."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

import hub_soup
from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method
from hub_soup.recipe import parse_recipe
from tests import checkpoints as ck
from tests.method_checks import CUTS, merge_both_ways, odd_tensors

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def slerp_by_hand(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sin((1-t) W)/sin W * a + sin(t W)/sin W * b`` over the flattened tensors, in float64;
    linear where ``|cos W| > 0.9995`` (mergekit's threshold) or either is zero."""
    a, b = a.double(), b.double()
    norms = float(a.norm()) * float(b.norm())
    cosine = float((a * b).sum()) / norms if norms else 1.0
    if abs(cosine) > 0.9995:
        return (1 - t) * a + t * b
    omega = math.acos(cosine)
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


def _pair(dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor]]:
    """Two models: a common start plus a move each, at a wide angle on every tensor but the 0-dim one."""
    generator = torch.Generator().manual_seed(seed)
    start = odd_tensors(generator)
    return [{k: (v + odd_tensors(generator, 0.8)[k]).to(dtype) for k, v in start.items()} for _ in range(2)]


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_element_is_within_one_ulp_of_the_definition(tmp_path: Path, dtype: torch.dtype, cut: tuple[int, int]) -> None:
    a, b = _pair(dtype, DTYPES.index(dtype))
    soup = merge_both_ways(tmp_path, [a, b], get_method("slerp")({"t": 0.3}), cut=cut)
    for key in a:
        ck.assert_within_ulp(soup[key], slerp_by_hand(0.3, a[key], b[key]), dtype, key)
    assert not torch.allclose(soup["wide"].double(), 0.7 * a["wide"].double() + 0.3 * b["wide"].double(), rtol=1e-3)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_the_ends_come_back_bit_for_bit(tmp_path: Path, t: float) -> None:
    a, b = _pair(torch.bfloat16, 5)
    soup = merge_both_ways(tmp_path, [a, b], get_method("slerp")({"t": t}))
    for key, tensor in (b if t else a).items():
        ck.assert_bit_equal(soup[key], tensor, key)


def test_parallel_and_zero_tensors_take_the_linear_path(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(6)
    a = {"parallel": torch.randn(301, generator=generator), "zero": torch.zeros(17)}
    b = {"parallel": 4 * a["parallel"], "zero": torch.randn(17, generator=generator)}
    soup = merge_both_ways(tmp_path, [a, b], get_method("slerp")({"t": 0.25}), cut=(16, 8))
    for key, tensor in a.items():
        ck.assert_within_ulp(soup[key], 0.75 * tensor.double() + 0.25 * b[key].double(), torch.float32, key)


def test_through_a_yaml_recipe_and_run(tmp_path: Path) -> None:
    a, b = _pair(torch.float32, 8)
    ck.save_safetensors(a, tmp_path / "a.safetensors")
    ck.save_safetensors(b, tmp_path / "b.safetensors")
    recipe = parse_recipe(textwrap.dedent(f"""
        ingredients: [{{ref: {tmp_path}/a.safetensors}}, {{ref: {tmp_path}/b.safetensors}}]
        method: slerp
        parameters: {{t: 0.3}}
        output: {{path: {tmp_path}/soup}}
    """))
    result = hub_soup.run(recipe)
    soup = ck.load_soup(tmp_path / "soup")
    for key in a:
        ck.assert_within_ulp(soup[key], slerp_by_hand(0.3, a[key], b[key]), torch.float32, key)
    assert parse_recipe(result.pinned_recipe.to_yaml()).parameters == {"t": 0.3}
    card = (tmp_path / "soup" / "README.md").read_text()  # what it says is what the engine did: a float64 kernel
    assert "by spherical linear interpolation (SLERP)" in card and "were merged in float64" in card


def test_a_wrong_ingredient_count_a_bad_t_and_greedy_are_refused() -> None:
    with pytest.raises(RecipeError, match=r"slerp.yaml:2: method: slerp merges exactly 2 ingredients, the recipe lists 3"):
        parse_recipe("ingredients: [{ref: a}, {ref: b}, {ref: c}]\nmethod: slerp\nparameters: {t: 0.5}\n", "slerp.yaml")
    for bad in ("1.5", "-0.1"):
        with pytest.raises(RecipeError, match=r"parameters.t: Input should be (less|greater) than or equal to"):
            parse_recipe(f"ingredients: [{{ref: a}}, {{ref: b}}]\nmethod: slerp\nparameters: {{t: {bad}}}\n")
    with pytest.raises(RecipeError, match=r"parameters.t: Field required"):
        parse_recipe("ingredients: [{ref: a}, {ref: b}]\nmethod: slerp\n")
    with pytest.raises(RecipeError, match="greedy soups try subsets of the ingredients, method slerp merges exactly 2"):
        parse_recipe("ingredients: [{ref: a}, {ref: b}]\nmethod: slerp\nparameters: {t: 0.5}\ngreedy: true\n"
                     "eval: {task: image-classification, data: d}\n")
