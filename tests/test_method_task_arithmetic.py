"""``task_arithmetic``: base + lambda * sum_i w_i (theta_i - theta_base), as mergekit spells it.

The reference is the formula itself, in float64 on whole tensors, written here and not
taken from the library; the soup must be within one ulp of it in the output dtype. The
ingredients look like fine-tunes (task vectors small next to the weights), as task
arithmetic assumes, plus an element whose soup cancels to almost nothing.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import AlignmentError, RecipeError
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import merged_state_dict, output_metas, stream_merge
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import align
from hub_soup.recipe import parse_recipe
from tests import checkpoints as ck
from tests.cards import card_of

SHAPES = {"odd": (7, 13, 3), "prime": (1031,), "wide": (3, 700), "scalar": (), "head.bias": (5,)}


def _task_arithmetic(
    parts: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float, normalize: bool = False
) -> torch.Tensor:
    """The definition, in float64: ``base + lam * sum w_i (p_i - base)`` (``/ sum w`` with normalize)."""
    summed = sum(w * (p.double() - base.double()) for p, w in zip(parts, weights))
    if normalize:
        summed = summed / math.fsum(weights)
    return base.double() + lam * summed


def _fine_tunes(dtype: torch.dtype, seed: int, count: int = 3) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """``count`` fine-tunes of a base: values of magnitude 0.5-1.5, task vectors about 0.01, and an integer."""
    generator = torch.Generator().manual_seed(seed)
    base = {}
    for key, shape in SHAPES.items():
        magnitude = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
        base[key] = (sign * magnitude).to(dtype)
    base["steps"] = torch.tensor(3)
    tunes = []
    for i in range(count):
        tune = {k: (v.double() + 0.01 * torch.randn(v.shape, generator=generator, dtype=torch.float64)).to(dtype)
                for k, v in base.items() if v.is_floating_point()}
        tune["steps"] = torch.tensor(100 + i)
        tunes.append(tune)
    return tunes, base


def _open(tmp_path: Path, states: Sequence[dict[str, torch.Tensor]]) -> list:
    return [open_checkpoint(ck.save_safetensors(s, tmp_path / f"{i}.safetensors")) for i, s in enumerate(states)]


# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_each_element_is_within_one_ulp_of_the_float64_definition(
    tmp_path: Path, dtype: torch.dtype, normalize: bool
) -> None:
    tunes, base = _fine_tunes(dtype, seed=3)
    weights, lam = [1.0, 0.5, 2.0], 0.7
    opened = _open(tmp_path, [*tunes, base])
    checkpoints, base_checkpoint = opened[:3], opened[3]
    try:
        plan = align(layouts_of(checkpoints), ["head.*"], base=layouts_of([base_checkpoint])[0])
        method = get_method("task_arithmetic")({"lambda": lam, "normalize": normalize}, weights)
        soup = merged_state_dict(checkpoints, plan, method, base=base_checkpoint, chunk_elements=1000,
                                 block_elements=128)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    for key in ("odd", "prime", "wide", "scalar"):
        expected = _task_arithmetic([t[key] for t in tunes], base[key], weights, lam, normalize)
        ck.assert_within_ulp(soup[key], expected, dtype, key)
    # --exclude keys and integers are the first ingredient's, bit for bit (not the base's)
    ck.assert_bit_equal(soup["head.bias"], tunes[0]["head.bias"], "head.bias")
    ck.assert_bit_equal(soup["steps"], tunes[0]["steps"], "steps")


def test_a_soup_that_cancels_to_almost_nothing_is_still_within_one_ulp(tmp_path: Path) -> None:
    """An element of the 0.5B benchmark models: ``base + sum_i (p_i - base)`` cancels from 3e-3 to -6.8e-9.

    Rounding the 3e-3 terms to float32 costs 3% of that result, eight bf16 ulps; the
    definition (and the soup) is the second fine-tune's value, exactly.
    """
    base = {"w": torch.tensor([0.0029754638671875, 0.5], dtype=torch.bfloat16)}
    values = ([0.002044677734375, 0.51], [-6.752088665962219e-09, 0.49], [0.00390625, 0.5])
    tunes = [{"w": torch.tensor(v, dtype=torch.bfloat16)} for v in values]
    opened = _open(tmp_path, [*tunes, base])
    try:
        plan = align(layouts_of(opened[:3]), [], base=layouts_of([opened[3]])[0])
        soup = merged_state_dict(opened[:3], plan, get_method("task_arithmetic")({}, None), base=opened[3])
    finally:
        for checkpoint in opened:
            checkpoint.close()
    expected = _task_arithmetic([t["w"] for t in tunes], base["w"], [1.0, 1.0, 1.0], 1.0)
    assert expected[0].item() == tunes[1]["w"][0].double().item()
    ck.assert_within_ulp(soup["w"], expected, torch.bfloat16, "w")


def test_weights_are_used_as_given_default_to_one_and_lambda_defaults_to_one() -> None:
    method_class = get_method("task_arithmetic")
    assert method_class.needs_base and method_class.uses_weights
    assert method_class([], [1.0, 3.0]).weights == [1.0, 3.0]  # not normalised to sum to one
    default = method_class()
    assert default.weights is None and default.weights_for(3) == [1.0, 1.0, 1.0]
    assert default.parameters.model_dump(by_alias=True) == {"lambda": 1.0, "normalize": False}  # mergekit's defaults
    assert method_class({"normalize": True}, [1.0, 3.0]).coefficients(2) == [0.25, 0.75]  # type: ignore[attr-defined]
    # uniform and weighted still normalise
    assert get_method("weighted")(None, [1.0, 3.0]).weights == [0.25, 0.75]


def test_the_streamed_soup_is_the_scored_soup_bit_for_bit(tmp_path: Path) -> None:
    tunes, base = _fine_tunes(torch.bfloat16, seed=5, count=2)
    opened = _open(tmp_path, [*tunes, base])
    checkpoints, base_checkpoint = opened[:2], opened[2]
    method = get_method("task_arithmetic")({"lambda": 0.5}, [1.0, 0.25])
    try:
        plan = align(layouts_of(checkpoints), base=layouts_of([base_checkpoint])[0])
        for chunk, block in ((7, 3), (1 << 16, 1 << 17)):
            scored = merged_state_dict(checkpoints, plan, method, base=base_checkpoint, chunk_elements=chunk,
                                       block_elements=block)
            with SoupWriter(tmp_path / f"soup-{chunk}", output_metas(plan, None), 10**9) as writer:
                stream_merge(checkpoints, plan, method, writer, base=base_checkpoint, chunk_elements=chunk,
                             block_elements=block)
                writer.commit()
            streamed = load_file(tmp_path / f"soup-{chunk}" / "model.safetensors")
            assert scored.keys() == streamed.keys()
            for key, tensor in scored.items():
                ck.assert_bit_equal(tensor, streamed[key], f"{key} (chunk {chunk})")
    finally:
        for checkpoint in opened:
            checkpoint.close()


# ---------------------------------------------------------------- end to end


def _save(tmp_path: Path, count: int = 2) -> tuple[list[Path], Path, list[dict[str, torch.Tensor]], dict]:
    tunes, base = _fine_tunes(torch.float32, seed=11, count=count)
    paths = [ck.save_safetensors(t, tmp_path / f"ft{i}.safetensors") for i, t in enumerate(tunes)]
    return paths, ck.save_safetensors(base, tmp_path / "base.safetensors"), tunes, base


def _assert_task_arithmetic(soup: dict[str, torch.Tensor], tunes: list, base: dict, weights: list, lam: float) -> None:
    for key, start in base.items():
        if start.is_floating_point():
            ck.assert_within_ulp(soup[key], _task_arithmetic([t[key] for t in tunes], start, weights, lam), start.dtype, key)
        else:
            ck.assert_bit_equal(soup[key], tunes[0][key], key)


def test_the_cli_merges_by_task_arithmetic_and_the_card_says_so(tmp_path: Path, capsys) -> None:
    paths, base_path, tunes, base = _save(tmp_path)
    out = tmp_path / "soup"
    code = main(["merge", *map(str, paths), "--method", "task_arithmetic", "--base", str(base_path),
                 "--lambda", "0.5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    _assert_task_arithmetic(ck.load_soup(out), tunes, base, [1.0, 1.0], 0.5)
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["method"] == "task_arithmetic" and recipe["parameters"] == {"lambda": 0.5, "normalize": False}
    assert recipe["base"]["ref"].endswith("base.safetensors")
    card = (out / "README.md").read_text()
    assert "by task arithmetic" in card and "https://arxiv.org/abs/2212.04089" in card
    assert "weight average" not in card and "averaged" not in card
    assert "- `lambda`: `0.5`" in card and "- `normalize`: `False`" in card
    assert "| 1.0000 | yes |" in card and "Base model" in card


def test_a_yaml_recipe_with_weights_gives_the_same_arithmetic(tmp_path: Path) -> None:
    paths, base_path, tunes, base = _save(tmp_path, count=3)
    refs = "".join(f"\n  - {{ref: {p}, weight: {w}}}" for p, w in zip(paths, (1.0, 0.25, 2.0)))
    recipe = parse_recipe(f"ingredients:{refs}\n" + textwrap.dedent(f"""\
        method: task_arithmetic
        parameters: {{lambda: 0.8}}
        base: {{ref: {base_path}}}
        output: {{path: {tmp_path / 'soup'}}}
    """))
    result = hub_soup.run(recipe)
    _assert_task_arithmetic(ck.load_soup(tmp_path / "soup"), tunes, base, [1.0, 0.25, 2.0], 0.8)
    assert result.weights == [1.0, 0.25, 2.0]  # as given: not normalised
    assert "| 0.2500 | yes |" in (tmp_path / "soup" / "README.md").read_text()


def test_the_card_lists_the_base_among_base_model() -> None:
    def hub(repo: str) -> ResolvedRef:
        return ResolvedRef(ref=repo, kind="hub", repo_id=repo, sha="a" * 40)

    card = card_of(
        [hub("org/a"), hub("org/b")], [1.0, 1.0], base=hub("org/base"), method="task_arithmetic",
        parameters={"lambda": 0.5}, repo_id="org/soup",
    )
    assert card.data.base_model == ["org/base", "org/a", "org/b"]
    assert "Editing Models with Task Arithmetic" in card.text and "`lambda`: `0.5`" in card.text


def test_a_base_that_does_not_align_stops_with_the_key_named(tmp_path: Path) -> None:
    paths, _, _, base = _save(tmp_path)
    transposed = dict(base, wide=torch.zeros(700, 3))
    missing = {k: v for k, v in base.items() if k != "odd"}
    for name, bad, message in (("transposed", transposed, r"shape mismatch at wide: .* in the base "),
                               ("missing", missing, r"missing in the base .*'odd'")):
        bad_path = ck.save_safetensors(bad, tmp_path / f"{name}-base.safetensors")
        recipe = parse_recipe(
            f"ingredients: [{{ref: {paths[0]}}}, {{ref: {paths[1]}}}]\nmethod: task_arithmetic\n"
            f"base: {{ref: {bad_path}}}\noutput: {{path: {tmp_path / 'soup'}}}\n"
        )
        with pytest.raises(AlignmentError, match=message):
            hub_soup.run(recipe)
        ck.assert_no_output(tmp_path / "soup")


def test_method_parameters_are_refused_by_methods_that_take_none(tmp_path: Path, capsys) -> None:
    code = main(["merge", "a", "b", "--lambda", "0.5", "-o", str(tmp_path / "soup")])
    err = capsys.readouterr().err
    assert code != 0 and "parameters.lambda: method uniform takes no lambda (--lambda)" in err
    code = main(["merge", "a", "b", "--method", "task_arithmetic", "--base", "c", "--t", "0.5", "--dump-recipe"])
    assert code != 0 and "parameters.t: method task_arithmetic takes no t" in capsys.readouterr().err
    code = main(["merge", "a", "b", "--method", "task_arithmetic", "-o", str(tmp_path / "soup")])
    assert code != 0 and "needs a base" in capsys.readouterr().err


# ---------------------------------------------------------------- task negation (negative weights)


@pytest.mark.parametrize("second", ["base", "fine-tune"])
def test_a_negative_weight_subtracts_a_task_vector(tmp_path: Path, second: str, capsys) -> None:
    """Ilharco et al.'s forgetting by negation, ``--weights -1 1`` on the command line (argparse takes
    ``-1`` as a value): with the base as the second ingredient (a zero task vector) the soup is
    ``base - lambda * (ft - base)``; with a second fine-tune it also adds that one's task vector."""
    paths, base_path, tunes, base = _save(tmp_path)
    refs = [paths[0], base_path if second == "base" else paths[1]]
    out = tmp_path / "soup"
    code = main(["merge", *map(str, refs), "--method", "task_arithmetic", "--base", str(base_path),
                 "--weights", "-1", "1", "--lambda", "0.5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    soup = ck.load_soup(out)
    for key, start in base.items():
        if not start.is_floating_point():
            continue
        forget = start.double() - 0.5 * (tunes[0][key].double() - start.double())  # the formula, written here
        expected = forget if second == "base" else forget + 0.5 * (tunes[1][key].double() - start.double())
        ck.assert_within_ulp(soup[key], expected, start.dtype, key)
    assert yaml.safe_load((out / "hub-soup.yaml").read_text())["ingredients"][0]["weight"] == -1.0
    assert "| -1.0000 | yes |" in (out / "README.md").read_text()
    assert "merged by task_arithmetic, " in capsys.readouterr().out


def test_methods_that_average_refuse_a_negative_weight_naming_it() -> None:
    with pytest.raises(RecipeError, match=r"^ingredients\.1\.weight: -2 is negative, and method weighted averages"):
        hub_soup.Recipe.from_refs(["a", "b"], [1, -2], output={"path": "o"})
    with pytest.raises(RecipeError, match=r"^r\.yaml:5: ingredients\.1\.weight: -0\.5 is negative.*use method .*task_arithmetic"):
        parse_recipe("ingredients:\n  - ref: a\n    weight: 1\n  - ref: b\n    weight: -0.5\nmethod: weighted\n", "r.yaml")
    negated = parse_recipe("ingredients:\n  - {ref: a, weight: -1}\n  - {ref: b}\nmethod: task_arithmetic\nbase: {ref: c}\n")
    assert negated.weights == [-1.0, 1.0]
