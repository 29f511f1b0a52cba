"""Merge methods behind one interface: the registry, recipes that name them, and one engine for every soup.

The soup that is scored (in memory, for evaluation, greedy and diagnose) must be the soup
that is streamed to disk bit for bit, for every method and dtype. A new method is one class
registered in one place: the toy method here is defined once, inside a fixture that also
restores the registry.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file

import hub_soup
from hub_soup.errors import RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging import methods
from hub_soup.merging.engine import merged_state_dict, output_metas, stream_merge
from hub_soup.merging.methods import MergedTensor, MergeMethod, NoParameters, get_method, method_names, register_method
from hub_soup.merging.plan import align
from hub_soup.recipe import Recipe, parse_recipe
from hub_soup.recipe import method_names as recipe_method_names
from tests import checkpoints as ck

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
DIGITS_INGREDIENTS = sorted((DIGITS / "ingredients").iterdir())
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOY = "toy-task-vectors"


@pytest.fixture
def toy() -> Iterator[type[MergeMethod]]:
    """A task-arithmetic-like method, registered for one test: the registry is restored afterwards."""
    with _toy_registered() as method:
        yield method


@contextmanager
def _toy_registered() -> Iterator[type[MergeMethod]]:
    """The toy method registered inside the block, on a copy of the registry that the block's end drops."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(methods, "_REGISTRY", methods._REGISTRY.copy())
        yield _register_toy()


def _register_toy() -> type[MergeMethod]:
    @register_method
    class TaskVectors(MergeMethod):
        """``base + scale * mean(p - base) / m``, ``m`` the largest ``|p - base|`` of the whole tensor."""

        name = TOY
        needs_base = True

        class Parameters(NoParameters):
            scale: float = Field(1.0, gt=0)

        def start_statistics(self, tensor: MergedTensor) -> float:
            return 0.0

        def observe(self, statistics: float, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> float:
            assert base is not None
            moved = [float((p.double() - base.double()).abs().max()) for p in parts if p.numel()]
            return max([statistics, *moved])

        def kernel(
            self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
            base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
        ) -> None:
            assert base is not None
            acc.zero_()
            for part in parts:
                scratch.copy_(part)
                scratch.sub_(base)
                acc.add_(scratch)
            acc.mul_(self.parameters.scale / (len(parts) * (statistics or 1.0)))  # type: ignore[attr-defined]
            scratch.copy_(base)
            acc.add_(scratch)

    return TaskVectors


def _toy_by_hand(parts: Sequence[torch.Tensor], base: torch.Tensor, scale: float) -> torch.Tensor:
    """The toy method's soup in float64, on whole tensors."""
    moved = [p.double() - base.double() for p in parts]
    largest = max(float(m.abs().max()) for m in moved) or 1.0
    return base.double() + scale * sum(moved) / len(moved) / largest


# ---------------------------------------------------------------- the registry


def test_the_registry_knows_the_built_in_methods_and_refuses_unknown_and_duplicate_names() -> None:
    built_in = {"dare_linear", "dare_ties", "model_stock", "slerp", "task_arithmetic", "ties", "uniform", "weighted"}
    assert built_in <= set(method_names()) and recipe_method_names() == method_names()
    assert not get_method("uniform").uses_weights and get_method("weighted").uses_weights
    with pytest.raises(RecipeError, match="unknown merge method 'dela'") as caught:
        get_method("dela")  # a typo of della, a built-in one
    assert caught.value.hint is not None and "uniform, weighted" in caught.value.hint
    with pytest.raises(ValueError, match="'uniform' is registered already"):
        register_method(type("Again", (MergeMethod,), {"name": "uniform"}))
    assert built_in <= set(method_names()) and method_names().count("uniform") == 1


def test_a_registered_method_is_a_recipe_choice_until_its_registration_ends() -> None:
    with _toy_registered() as toy:
        assert TOY in method_names() and TOY in recipe_method_names()
        assert toy().statistics_passes(torch.float32) == 1
        assert get_method("uniform")().statistics_passes(torch.float32) == 0
    assert TOY not in method_names() and TOY not in recipe_method_names()
    with pytest.raises(RecipeError, match=f"unknown merge method '{TOY}'"):
        get_method(TOY)


# ---------------------------------------------------------------- scored == streamed, bit for bit


def _ingredients(dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor]]:
    """Three ingredients and a base: sizes that no chunk or block size divides, 0-dim and empty tensors (few
    elements: the 7-element chunks take a pass of the engine's loop each)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"odd": (7, 13, 3), "prime": (257,), "scalar": (), "empty": (0, 5), "wide": (3, 131)}
    states = []
    for i in range(4):
        state = {k: (torch.randn(s, generator=generator, dtype=torch.float64) * 3).to(dtype) for k, s in shapes.items()}
        state["steps"] = torch.tensor(10 + i)
        states.append(state)
    return states


# The parameters each method is merged with: TIES and DARE trim, so their statistics passes and masks run.
PARAMETERS: dict[str, dict[str, Any]] = {
    TOY: {"scale": 0.7}, "ties": {"density": 0.4}, "dare_linear": {"density": 0.4, "seed": 1},
    "dare_ties": {"density": 0.6},
}


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.float64], ids=["own", "to-f16", "to-f64"])
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["uniform", "weighted", "task_arithmetic", "ties", "dare_linear", "dare_ties", TOY])
def test_the_scored_soup_is_the_streamed_soup_bit_for_bit(
    tmp_path: Path, toy: type[MergeMethod], name: str, dtype: torch.dtype, out_dtype: torch.dtype | None
) -> None:
    states = _ingredients(dtype, seed=FLOATS.index(dtype))
    paths = [ck.save_safetensors(s, tmp_path / f"{i}.safetensors") for i, s in enumerate(states)]
    opened = [open_checkpoint(p) for p in paths]
    checkpoints, base = opened[:3], opened[3]
    method_class = get_method(name)
    method = method_class(PARAMETERS.get(name), [1.0, 2.0, 4.5] if method_class.uses_weights else None)
    options: dict[str, Any] = {"base": base} if method.needs_base else {}
    plan = align(layouts_of(checkpoints), base=layouts_of([base])[0] if method.needs_base else None)
    try:
        for chunk, block in ((7, 3), (64, 64), (200, 32), (1 << 16, 1 << 17)):
            scored = merged_state_dict(
                checkpoints, plan, method, out_dtype, chunk_elements=chunk, block_elements=block, **options
            )
            out = tmp_path / f"soup-{chunk}"
            with SoupWriter(out, output_metas(plan, out_dtype), 10**9) as writer:
                stream_merge(checkpoints, plan, method, writer, out_dtype, chunk_elements=chunk, block_elements=block,
                             **options)
                writer.commit()
            streamed = load_file(out / "model.safetensors")
            assert scored.keys() == streamed.keys()
            for key, tensor in scored.items():
                ck.assert_bit_equal(tensor, streamed[key], f"{key} (chunk {chunk})")
            if name == TOY:  # the statistics pass saw the whole tensor, whatever the chunks
                for key in ("odd", "prime", "wide"):
                    expected = _toy_by_hand([s[key] for s in states[:3]], states[3][key], 0.7)
                    torch.testing.assert_close(scored[key].double(), expected.to(out_dtype or dtype).double())
    finally:
        for checkpoint in opened:
            checkpoint.close()


# ---------------------------------------------------------------- recipes


def _recipe(text: str) -> Recipe:
    return parse_recipe(textwrap.dedent(text), "toy.yaml")


def test_the_toy_method_through_a_recipe_and_run(tmp_path: Path, toy: type[MergeMethod]) -> None:
    generator = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(40, 30, generator=generator), "b": torch.randn(30, generator=generator)}
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    for i, state in enumerate(states):
        ck.save_safetensors(state, tmp_path / f"ft{i}.safetensors")
    ck.save_safetensors(base, tmp_path / "base.safetensors")
    recipe = _recipe(f"""
        ingredients: [{{ref: {tmp_path}/ft0.safetensors}}, {{ref: {tmp_path}/ft1.safetensors}}]
        method: {TOY}
        parameters: {{scale: 0.5}}
        base: {{ref: {tmp_path}/base.safetensors}}
        output: {{path: {tmp_path}/soup}}
    """)
    result = hub_soup.run(recipe)
    soup = ck.load_soup(tmp_path / "soup")
    for key, start in base.items():
        expected = _toy_by_hand([s[key] for s in states], start, 0.5)
        torch.testing.assert_close(soup[key].double(), expected, rtol=1e-6, atol=1e-6)
    assert result.base is not None and result.base.label.endswith("base.safetensors")
    pinned = parse_recipe(result.pinned_recipe.to_yaml())
    assert pinned.base is not None and pinned.parameters == {"scale": 0.5} and pinned.method == TOY


def test_bad_parameters_and_a_missing_or_needless_base_are_refused(toy: type[MergeMethod]) -> None:
    with pytest.raises(RecipeError, match=r"toy.yaml:5: parameters.scale: Input should be greater than 0"):  # its line
        _recipe(f"""
            ingredients: [{{ref: a}}, {{ref: b}}]
            method: {TOY}
            parameters:
              scale: -1
            base: {{ref: c}}
        """)
    with pytest.raises(RecipeError, match=r"parameters.shift: Extra inputs are not permitted"):
        _recipe("ingredients: [{ref: a}, {ref: b}]\nparameters: {shift: 1}\n")
    with pytest.raises(RecipeError, match=f"method: {TOY} needs a base: the model the ingredients were fine-tuned"):
        _recipe(f"ingredients: [{{ref: a}}, {{ref: b}}]\nmethod: {TOY}\n")


def test_weight_and_greedy_rules_come_from_what_the_method_declares(toy: type[MergeMethod]) -> None:
    with pytest.raises(RecipeError, match=f"weights are given but method {TOY} takes none; set method: .*weighted"):
        _recipe(f"ingredients: [{{ref: a, weight: 1}}, {{ref: b, weight: 2}}]\nmethod: {TOY}\nbase: {{ref: c}}\n")
    with pytest.raises(RecipeError, match="method: weighted needs a weight on every ingredient"):
        _recipe("ingredients: [{ref: a, weight: 1}, {ref: b}]\nmethod: weighted\n")
    eval_section = "eval: {task: image-classification, data: d}\ngreedy: true\n"
    with pytest.raises(RecipeError, match="greedy soups weigh the kept ingredients equally"):
        _recipe("ingredients: [{ref: a, weight: 1}, {ref: b, weight: 2}]\nmethod: weighted\n" + eval_section)
    assert _recipe(f"ingredients: [{{ref: a}}, {{ref: b}}]\nmethod: {TOY}\nbase: {{ref: c}}\n" + eval_section).greedy


# ---------------------------------------------------------------- end to end: evaluated == streamed


@pytest.mark.parametrize(
    "method", ["method: uniform", "method: weighted", "method: weighted\ngreedy: true"],
    ids=["uniform", "weighted", "greedy-uniform"],
)
def test_a_recipe_writes_the_same_soup_with_evaluation_on_and_off(tmp_path: Path, method: str) -> None:
    """With evaluation on, the scored soup is written; off, the streamed one: the same tensors."""
    greedy = "greedy" in method
    weights = not greedy and "weighted" in method
    refs = "\n".join(
        f"  - {{ref: {path}" + (f", weight: {1 + i / 3}}}" if weights else "}") for i, path in enumerate(DIGITS_INGREDIENTS)
    )
    if greedy:
        method = "method: uniform\ngreedy: true"
    body = f"ingredients:\n{refs}\n{method}\ndtype: bfloat16\n"
    evaluation = f"eval: {{task: image-classification, data: {DIGITS / 'data'}, split: val, limit: 64}}\n"
    scored = hub_soup.run(parse_recipe(body + evaluation + f"output: {{path: {tmp_path / 'scored'}}}\n"))
    assert scored.report is not None and (not greedy or not all(scored.kept))  # greedy dropped one at least
    kept = [p for p, k in zip(DIGITS_INGREDIENTS, scored.kept) if k]
    a = ck.load_soup(tmp_path / "scored")
    if greedy and len(kept) == 1:  # the soup of one ingredient is that ingredient, in the soup's dtype
        b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ck.load_soup(kept[0]).items()}
    else:  # the streamed soup of the same recipe, or of the ingredients greedy kept
        if greedy:
            body = "ingredients:\n" + "\n".join(f"  - {{ref: {p}}}" for p in kept) + "\ndtype: bfloat16\n"
        hub_soup.run(parse_recipe(body + f"output: {{path: {tmp_path / 'streamed'}}}\n"))
        b = ck.load_soup(tmp_path / "streamed")
    assert a.keys() == b.keys() and math.prod(a["fc.weight"].shape) > 0
    for key in a:
        ck.assert_bit_equal(a[key], b[key], key)
