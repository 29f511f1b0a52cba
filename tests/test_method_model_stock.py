"""``model_stock`` against the paper's formula (Jang et al. 2024, arXiv:2403.19522), in float64 on whole tensors."""

from __future__ import annotations

import logging
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


def model_stock_by_hand(fine_tunes: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The paper's soup in float64: ``t = N cos / (1 + (N - 1) cos)``, cos the mean pairwise cosine
    (``t = 0`` where ``cos <= 0``: hub-soup's clamp, where the formula leaves [0, 1])."""
    w0 = base.double()
    moved = [(w.double() - w0).reshape(-1) for w in fine_tunes]
    n = len(moved)
    norms = [float(m.norm()) for m in moved]
    cosines = [  # a zero task vector has no angle: cosine 0 (as mergekit's clamped norms make it)
        float(moved[i] @ moved[j]) / (norms[i] * norms[j]) if norms[i] * norms[j] else 0.0
        for i in range(n) for j in range(i + 1, n)
    ]
    cosine = sum(cosines) / len(cosines)
    t = n * cosine / (1 + (n - 1) * cosine) if cosine > 0 else 0.0
    mean = sum(w.double() for w in fine_tunes) / n
    return t * mean + (1 - t) * w0


def _fine_tunes(dtype: torch.dtype, count: int = 3, seed: int = 0) -> tuple[list[dict], dict]:
    """A base and ``count`` fine-tunes of it: a shared move plus each one's own (positive cosines)."""
    generator = torch.Generator().manual_seed(seed)
    base = odd_tensors(generator)
    shared = odd_tensors(generator, 0.05)
    tunes = []
    for _ in range(count):
        own = odd_tensors(generator, 0.05)
        tunes.append({k: v + shared[k] + own[k] for k, v in base.items()})
    cast = lambda state: {k: v.to(dtype) for k, v in state.items()}
    return [cast(s) for s in tunes], cast(base)


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_element_is_within_one_ulp_of_the_papers_formula(
    tmp_path: Path, dtype: torch.dtype, cut: tuple[int, int]
) -> None:
    tunes, base = _fine_tunes(dtype, seed=DTYPES.index(dtype))
    soup = merge_both_ways(tmp_path, tunes, get_method("model_stock")(), base, cut)
    for key in base:
        ck.assert_within_ulp(soup[key], model_stock_by_hand([s[key] for s in tunes], base[key]), dtype, key)


def test_two_identical_fine_tunes_come_back_exactly(tmp_path: Path) -> None:
    """Identical task vectors: cos = 1, t = 1, the soup is their mean: the fine-tune itself."""
    tunes, base = _fine_tunes(torch.bfloat16, count=1)
    soup = merge_both_ways(tmp_path, [tunes[0], tunes[0]], get_method("model_stock")(), base)
    for key, tensor in tunes[0].items():
        ck.assert_bit_equal(soup[key], tensor, key)


def test_opposite_task_vectors_give_the_base_and_a_warning_naming_the_tensor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(37, 5, generator=generator), "b": torch.randn(29, generator=generator)}
    away = {"w": base["w"] + 0.25, "b": base["b"] + 0.125 * torch.randn(29, generator=generator)}
    back = {"w": base["w"] - 0.25, "b": 2 * base["b"] - away["b"]}  # b: opposite; w: opposite where exact
    caplog.set_level(logging.WARNING, logger="hub_soup")
    soup = merge_both_ways(tmp_path, [away, back], get_method("model_stock")(), base, (16, 8))
    for key, tensor in base.items():
        ck.assert_bit_equal(soup[key], tensor, key)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("hub_soup")]
    assert any("b:" in m and "t clamped to 0" in m for m in warned), warned
    assert any("w:" in m and "t clamped to 0" in m for m in warned), warned


def test_a_fine_tune_that_left_a_tensor_alone_is_warned_about_and_a_frozen_tensor_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    generator = torch.Generator().manual_seed(4)
    base = {"moved": torch.randn(50, generator=generator), "frozen": torch.randn(9, generator=generator)}
    tunes = [{"moved": base["moved"] + 0.1 * torch.randn(50, generator=generator), "frozen": base["frozen"]}
             for _ in range(2)] + [dict(base)]
    caplog.set_level(logging.WARNING, logger="hub_soup")
    soup = merge_both_ways(tmp_path, tunes, get_method("model_stock")(), base)
    ck.assert_bit_equal(soup["frozen"], base["frozen"], "frozen")
    moved = [(t["moved"].double() - base["moved"].double()) for t in tunes[:2]]
    cosine = float(moved[0] @ moved[1]) / float(moved[0].norm() * moved[1].norm()) / 3  # pairs with the third: 0
    expected = base["moved"].double() + 3 * cosine / (1 + 2 * cosine) * sum(moved) / 3
    if cosine > 0:
        ck.assert_within_ulp(soup["moved"], expected, torch.float32, "moved")
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("hub_soup")]
    assert any("moved:" in m and "1 of 3 fine-tunes" in m for m in warned) and not any("frozen" in m for m in warned)


def test_through_a_yaml_recipe_and_run(tmp_path: Path) -> None:
    tunes, base = _fine_tunes(torch.float32, count=2, seed=9)
    for i, state in enumerate(tunes):
        ck.save_safetensors(state, tmp_path / f"ft{i}.safetensors")
    ck.save_safetensors(base, tmp_path / "base.safetensors")
    recipe = parse_recipe(textwrap.dedent(f"""
        ingredients: [{{ref: {tmp_path}/ft0.safetensors}}, {{ref: {tmp_path}/ft1.safetensors}}]
        method: model_stock
        base: {{ref: {tmp_path}/base.safetensors}}
        output: {{path: {tmp_path}/soup}}
    """))
    result = hub_soup.run(recipe)
    soup = ck.load_soup(tmp_path / "soup")
    for key in base:
        ck.assert_within_ulp(soup[key], model_stock_by_hand([s[key] for s in tunes], base[key]), torch.float32, key)
    assert parse_recipe(result.pinned_recipe.to_yaml()).method == "model_stock"


def test_recipes_without_a_base_are_refused_and_filter_wise_is_taken() -> None:
    with pytest.raises(RecipeError, match="method: model_stock needs a base"):
        parse_recipe("ingredients: [{ref: a}, {ref: b}]\nmethod: model_stock\n")
    assert parse_recipe("ingredients: [{ref: a}, {ref: b}]\nmethod: model_stock\nbase: {ref: c}\n"
                        "parameters: {filter_wise: true}\n").parameters == {"filter_wise": True}
    assert parse_recipe("ingredients: [{ref: a}, {ref: b}]\nmethod: model_stock\nbase: {ref: c}\n"
                        "parameters: {filter_wise: false}\n").parameters == {"filter_wise": False}
