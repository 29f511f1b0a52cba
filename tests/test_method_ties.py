"""``ties``, ``dare_linear`` and ``dare_ties`` against their definitions, written here in float64 on whole tensors.

TIES (Yadav et al. 2023, arXiv:2306.01708) and DARE (Yu et al. 2024, arXiv:2311.03099),
as mergekit spells them: trim each task vector (the top ``density`` by magnitude, or
each element kept with probability ``density`` and rescaled by ``1 / density``), weigh
it, elect each element's sign by the weighted sum (ties, dare_ties), sum the agreeing
entries (over the sum of their weights with ``normalize``), scale by ``lambda``, add the
base. The magnitude threshold here comes from a whole-tensor sort; DARE's masks from
the documented hash, re-implemented here with numpy's unsigned integers.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method
from hub_soup.recipe import parse_recipe
from tests import checkpoints as ck
from tests.method_checks import CUTS, merge_both_ways, odd_tensors

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the definitions, by hand


def magnitude_kept(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: the ``k = int(density * numel)`` largest ``|delta|`` (every element equal to the k-th too)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    threshold = delta.abs().reshape(-1).sort(descending=True).values[k - 1]
    return delta.abs() >= threshold


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _key(seed: int, tensor: str, stream: int) -> np.uint32:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{stream}".encode(), digest_size=4).digest()
    return np.uint32(int.from_bytes(digest, "little"))


def random_kept(seed: int, tensor: str, ingredient: int, numel: int, density: float) -> torch.Tensor:
    """DARE's mask as documented: element ``j`` is kept when the top 24 bits of
    ``h(h(j ^ key(seed, tensor, -1)) ^ key(seed, tensor, i))`` fall below ``density * 2**24``."""
    with np.errstate(over="ignore"):
        index = np.arange(numel, dtype=np.uint32)
        hashed = _lowbias32(_lowbias32(index ^ _key(seed, tensor, -1)) ^ _key(seed, tensor, ingredient))
    return torch.from_numpy((hashed >> np.uint32(8)) < round(density * (1 << 24)))


def generalized_by_hand(
    parts: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], masks: Sequence[torch.Tensor],
    *, consensus: bool, normalize: bool, lam: float = 1.0, rescale: Sequence[float] | None = None,
) -> torch.Tensor:
    """The soup in float64 from the trimmed masks: mergekit's generalized task arithmetic.

    Elements whose vote sum is 0 up to float32 rounding (votes that cancel in real numbers, as 0.03125 / 0.3 and
    -0.09375 / 0.9 do) elect a sign by rounding alone; they are returned as NaN, undecided. (Where the sum is 0
    exactly, + is elected: ``test_ties_elects_signs_...`` checks that on exact numbers.)
    """
    b = base.double()
    deltas = torch.stack([
        (p.double() - b) * m / (rescale[i] if rescale else 1.0) * w
        for i, (p, m, w) in enumerate(zip(parts, masks, weights))
    ])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * b.dim())
    undecided = torch.zeros(b.shape, dtype=torch.bool)
    if consensus:
        votes = deltas.sum(0)
        undecided = votes.abs() <= 8 * torch.finfo(torch.float32).eps * deltas.abs().sum(0)
        elected = torch.where(votes >= 0, 1.0, -1.0).double()
        agree = deltas.sign() == elected
        mixed = (deltas * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        total = float(sum(weights))
        divisor = torch.tensor(total if abs(total) >= 1e-8 else 1.0, dtype=torch.float64)
    if normalize:
        mixed = mixed / divisor
    return (b + lam * mixed).masked_fill(undecided & (deltas != 0).any(0), float("nan"))


def ties_by_hand(parts, base, weights, densities, *, normalize=True, lam=1.0) -> torch.Tensor:
    masks = [magnitude_kept(p.double() - base.double(), d) for p, d in zip(parts, densities)]
    return generalized_by_hand(parts, base, weights, masks, consensus=True, normalize=normalize, lam=lam)


def dare_by_hand(parts, base, weights, densities, key, *, consensus, seed=0, normalize=False, lam=1.0):
    masks = [random_kept(seed, key, i, base.numel(), d).reshape(base.shape) if d < 1 else torch.ones(base.shape)
             for i, d in enumerate(densities)]
    return generalized_by_hand(parts, base, weights, masks, consensus=consensus, normalize=normalize, lam=lam,
                               rescale=densities)


def assert_near_definition(
    actual: torch.Tensor, expected: torch.Tensor, parts: Sequence[torch.Tensor], base: torch.Tensor,
    weights: Sequence[float], lam: float = 1.0, key: str = "",
) -> None:
    """Within one ulp of the definition in bf16 and fp16. In float32 the float32 kernel's own roundings (a few
    per term) are of float32's size too: allowed on top, ``8 eps32 (|base| + |lam| sum |w_i delta_i| / min w)``,
    which only matters where the soup is near 0 (a base near 0 moved by larger task vectors)."""
    decided = ~expected.isnan()
    assert float(decided.double().mean()) >= 0.97, f"{key}: too many undecided signs for the test to mean much"
    actual, expected = actual[decided], expected[decided]
    parts, base = [p[decided] for p in parts], base[decided]
    if actual.dtype != torch.float32:
        ck.assert_within_ulp(actual, expected, actual.dtype, key)
        return
    b = base.double()
    moved = sum(abs(w) * (p.double() - b).abs() for p, w in zip(parts, weights))
    scale = b.abs() + abs(lam) * moved / min(1.0, *map(abs, weights))
    bound = ck.ulp(expected, torch.float32) + 8 * torch.finfo(torch.float32).eps * scale
    error = (actual.double() - expected).abs()
    assert bool((error <= bound).all()), f"{key}: off by {float((error / bound).max()):.2f} of the bound"


def _fine_tunes(dtype: torch.dtype, count: int = 3, seed: int = 0) -> tuple[list[dict], dict]:
    """A base and ``count`` fine-tunes: task vectors of mixed signs, so that sign election has work to do."""
    generator = torch.Generator().manual_seed(seed)
    base = odd_tensors(generator)
    tunes = [{k: v + t for k, v, t in zip(base, base.values(), odd_tensors(generator, 0.05).values())}
             for _ in range(count)]
    cast = lambda state: {k: v.to(dtype) for k, v in state.items()}
    return [cast(s) for s in tunes], cast(base)


# ---------------------------------------------------------------- TIES


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_ties_is_within_one_ulp_of_its_definition_streamed_or_not(
    tmp_path: Path, dtype: torch.dtype, cut: tuple[int, int]
) -> None:
    tunes, base = _fine_tunes(dtype, seed=DTYPES.index(dtype))
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.7, 1.0]
    method = get_method("ties")({"lambda": 0.8}, weights, [{"density": d} for d in densities])
    soup = merge_both_ways(tmp_path, tunes, method, base, cut)
    for key in base:
        parts = [t[key] for t in tunes]
        expected = ties_by_hand(parts, base[key], weights, densities, lam=0.8)
        assert_near_definition(soup[key], expected, parts, base[key], weights, 0.8, key)


def test_ties_keeps_exactly_the_top_k_in_float64_and_without_normalize(tmp_path: Path) -> None:
    """float64 tensors take the four-pass threshold; distinct magnitudes leave no ties, so exactly k survive."""
    tunes, base = _fine_tunes(torch.float64, count=2, seed=4)
    method = get_method("ties")({"density": 0.25, "normalize": False}, [1.0, 1.0])
    only = merge_both_ways(tmp_path, tunes[:1] * 2, get_method("ties")({"density": 0.25}), base, CUTS[1])
    for key, start in base.items():
        k = int(0.25 * start.numel())
        assert int((only[key] != start).sum()) == k, key  # one task vector twice: its top k, nothing else
    soup = merge_both_ways(tmp_path, tunes, method, base, CUTS[2])
    for key in base:
        parts = [t[key] for t in tunes]
        expected = ties_by_hand(parts, base[key], [1.0, 1.0], [0.25, 0.25], normalize=False)
        assert_near_definition(soup[key], expected, parts, base[key], [1.0, 1.0], key=key)


def test_ties_elects_signs_and_averages_only_the_agreeing_entries() -> None:
    """Three hand-made task vectors on four elements: the example of the TIES paper's figure, in numbers."""
    base = torch.zeros(4)
    parts = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 0.0]), torch.tensor([-1.0, 1.0, 0.0, 0.0])]
    from hub_soup.merging.engine import _merge_chunks, _NonFinite

    method = get_method("ties")()
    soup, found = torch.empty(4), _NonFinite()
    _merge_chunks(method, [*parts, base], 3, [(torch.empty(4), torch.empty(4))], soup, None, 0, found)
    assert not found.any
    # element 0: votes 1 + 3 - 1 > 0, the agreeing 1 and 3 averaged; element 1: -2 + 1 + 1 = 0 elects +: 1 and 1;
    # element 2: 0.5 - 0.5 + 0 = 0 elects +: 0.5 alone (0 agrees with no sign); element 3: nobody moved.
    assert soup.tolist() == [2.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("name", ["ties", "dare_linear"])
def test_a_soup_that_cancels_to_almost_nothing_is_still_within_one_ulp(tmp_path: Path, name: str) -> None:
    """Values of the benchmark models: the three task vectors agree (all negative), and the soup, the mean
    of the fine-tunes, cancels to -2.3e-9 from terms of 3e-3, whose float32 rounding is 1% of it."""
    base = {"w": torch.tensor([0.0029754638671875, 0.5], dtype=torch.bfloat16)}
    values = ([0.002044677734375, 0.51], [-6.752088665962219e-09, 0.49], [-0.002044677734375, 0.5])
    tunes = [{"w": torch.tensor(v, dtype=torch.bfloat16)} for v in values]
    soup = merge_both_ways(tmp_path, tunes, get_method(name)({"normalize": True}), base, CUTS[0])
    parts, ones = [t["w"] for t in tunes], [1.0, 1.0, 1.0]
    expected = (ties_by_hand(parts, base["w"], ones, ones) if name == "ties"
                else dare_by_hand(parts, base["w"], ones, ones, "w", consensus=False, normalize=True))
    assert abs(expected[0].item() / (sum(v[0] for v in values) / 3) - 1) < 1e-9
    ck.assert_within_ulp(soup["w"], expected, torch.bfloat16, "w")


def test_a_density_that_keeps_nothing_leaves_the_base(tmp_path: Path) -> None:
    """``int(density * numel) = 0`` (a 0-dim tensor at density 0.5): mergekit stops there; hub-soup keeps the base's."""
    tunes, base = _fine_tunes(torch.float32, count=2, seed=6)
    soup = merge_both_ways(tmp_path, tunes, get_method("ties")({"density": 0.5}), base, CUTS[0])
    ck.assert_bit_equal(soup["scalar"], base["scalar"], "scalar")


# ---------------------------------------------------------------- DARE


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_dare_is_within_one_ulp_of_its_definition_and_the_same_for_every_cut(
    tmp_path: Path, dtype: torch.dtype, name: str
) -> None:
    tunes, base = _fine_tunes(dtype, seed=10 + DTYPES.index(dtype))
    weights, densities = [1.0, 0.5, 2.0], [0.3, 0.9, 1.0]
    method = get_method(name)({"seed": 7, "lambda": 0.5}, weights, [{"density": d} for d in densities])
    soups = [merge_both_ways(tmp_path / f"cut{i}", tunes, method, base, cut) for i, cut in enumerate(CUTS)]
    for key in base:
        for soup in soups[1:]:
            ck.assert_bit_equal(soup[key], soups[0][key], key)
        parts = [t[key] for t in tunes]
        expected = dare_by_hand(parts, base[key], weights, densities, key, consensus=name == "dare_ties", seed=7,
                                lam=0.5)
        scaled = [p.double() / d + base[key].double() * (1 - 1 / d) for p, d in zip(parts, densities)]  # rescaled moves
        assert_near_definition(soups[0][key], expected, scaled, base[key], weights, 0.5, key)


def test_dare_keeps_density_of_the_elements_and_the_seed_decides_which() -> None:
    from hub_soup.merging.methods import MergedTensor
    from hub_soup.merging.methods.sparsify import RandomMasks

    n = 1 << 18
    masks = RandomMasks(3, MergedTensor("model.layers.0.mlp.up_proj.weight", n, torch.float32))
    hashed, bits, tmp = (torch.empty(n, dtype=torch.int32) for _ in range(3))
    masks.element_hash_(hashed, tmp, 0)
    kept = [masks.keep_(torch.empty(n, dtype=torch.bool), hashed, bits, tmp, i, 0.1) for i in range(2)]
    for mask in kept:  # binomial: 4 standard deviations is 0.0023 here
        assert abs(float(mask.float().mean()) - 0.1) < 0.0025
    both = float((kept[0] & kept[1]).float().mean())
    assert abs(both - 0.01) < 0.001  # the ingredients' masks are independent
    other = RandomMasks(4, MergedTensor("model.layers.0.mlp.up_proj.weight", n, torch.float32))
    other.element_hash_(hashed, tmp, 0)
    reseeded = other.keep_(torch.empty(n, dtype=torch.bool), hashed, bits, tmp, 0, 0.1)
    assert abs(float((reseeded & kept[0]).float().mean()) - 0.01) < 0.001
    assert torch.equal(kept[0], random_kept(3, "model.layers.0.mlp.up_proj.weight", 0, n, 0.1))


def test_dare_indices_past_two_to_the_31_hash_as_their_unsigned_bits() -> None:
    from hub_soup.merging.methods import MergedTensor
    from hub_soup.merging.methods.sparsify import RandomMasks

    masks = RandomMasks(0, MergedTensor("big", (1 << 31) + 100, torch.float32))
    hashed, tmp = torch.empty(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)
    masks.element_hash_(hashed, tmp, (1 << 31) - 32)  # straddles 2**31
    with np.errstate(over="ignore"):
        index = np.arange((1 << 31) - 32, (1 << 31) + 32, dtype=np.uint32)
        expected = _lowbias32(index ^ _key(0, "big", -1))
    assert np.array_equal(hashed.numpy().view(np.uint32), expected)


# ---------------------------------------------------------------- recipes, the CLI, the card


def _save(tmp_path: Path, count: int = 3, dtype: torch.dtype = torch.bfloat16) -> tuple[list[Path], Path, list, dict]:
    tunes, base = _fine_tunes(dtype, count=count, seed=21)
    paths = [ck.save_safetensors(t, tmp_path / f"ft{i}.safetensors") for i, t in enumerate(tunes)]
    return paths, ck.save_safetensors(base, tmp_path / "base.safetensors"), tunes, base


def test_a_mergekit_style_recipe_with_per_ingredient_density_runs_and_pins_its_parameters(tmp_path: Path) -> None:
    paths, base_path, tunes, base = _save(tmp_path)
    recipe = parse_recipe(textwrap.dedent(f"""
        ingredients:
          - {{ref: {paths[0]}, weight: 1.0, density: 0.4}}
          - {{ref: {paths[1]}, weight: 0.5}}
          - {{ref: {paths[2]}, weight: 0.5, density: 0.9}}
        method: dare_ties
        base: {{ref: {base_path}}}
        parameters: {{density: 0.6, lambda: 0.9, int8_mask: true}}
        output: {{path: {tmp_path}/soup}}
    """))
    result = hub_soup.run(recipe)
    soup = ck.load_soup(tmp_path / "soup")
    for key in base:
        expected = dare_by_hand([t[key] for t in tunes], base[key], [1.0, 0.5, 0.5], [0.4, 0.6, 0.9], key,
                                consensus=True, lam=0.9)
        assert_near_definition(soup[key], expected, [t[key] for t in tunes], base[key], [1.0, 0.5, 0.5], 0.9, key)
    pinned = yaml.safe_load((tmp_path / "soup" / "hub-soup.yaml").read_text())
    assert pinned["parameters"] == {"lambda": 0.9, "density": 0.6, "int8_mask": True, "normalize": False,
                                    "rescale": True, "seed": 0}  # the default seed recorded: a rebuild is exact
    assert [i.get("density") for i in pinned["ingredients"]] == [0.4, None, 0.9]
    rebuilt = parse_recipe(result.pinned_recipe.to_yaml()).model_copy(update={"output": recipe.output.model_copy(
        update={"path": str(tmp_path / "again")})})
    hub_soup.run(rebuilt)
    for key, tensor in ck.load_soup(tmp_path / "again").items():
        ck.assert_bit_equal(tensor, soup[key], key)


def test_the_cli_takes_one_density_or_one_per_ref_and_the_card_names_the_method(tmp_path: Path, capsys) -> None:
    paths, base_path, tunes, base = _save(tmp_path)
    out = tmp_path / "soup"
    code = main(["merge", *map(str, paths), "--method", "ties", "--base", str(base_path),
                 "--density", "0.3", "0.5", "1", "--weights", "1", "1", "2", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    soup = ck.load_soup(out)
    for key in base:
        expected = ties_by_hand([t[key] for t in tunes], base[key], [1.0, 1.0, 2.0], [0.3, 0.5, 1.0])
        assert_near_definition(soup[key], expected, [t[key] for t in tunes], base[key], [1.0, 1.0, 2.0], key=key)
    card = (out / "README.md").read_text()
    assert "by TIES" in card and "https://arxiv.org/abs/2306.01708" in card
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model_relation"] == "merge"
    code = main(["merge", *map(str, paths), "--method", "dare_linear", "--base", str(base_path),
                 "--density", "0.5", "--seed", "3", "--dump-recipe"])
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and dumped["parameters"] == {"density": 0.5, "seed": 3}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: uniform\n", "ingredients.0.density: method uniform takes no per-ingredient density; methods that do"),
        ("method: ties\nbase: {ref: c}\nparameters: {rescale: true}\n", "rescale: true .* not supported for ties"),
        ("method: ties\nbase: {ref: c}\nparameters: {density: 0}\n", r"parameters.density: Input should be greater"),
        ("method: dare_ties\nbase: {ref: c}\nparameters: {seed: -1}\n", r"parameters.seed: Input should be greater"),
        ("method: dare_ties\n", "method: dare_ties needs a base"),
    ],
    ids=["density-on-uniform", "ties-rescale", "density-zero", "negative-seed", "no-base"],
)
def test_recipes_that_cannot_work_are_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe("ingredients: [{ref: a, density: 0.5}, {ref: b}]\n" + text)


def test_the_cli_refuses_density_for_a_method_without_it_and_a_count_that_fits_no_ref(tmp_path: Path, capsys) -> None:
    paths, base_path, _, _ = _save(tmp_path)
    assert main(["merge", *map(str, paths), "--density", "0.5", "-o", str(tmp_path / "o")]) == 2
    assert "method uniform takes no density (--density)" in capsys.readouterr().err
    assert main(["merge", *map(str, paths), "--method", "ties", "--base", str(base_path), "--density", "0.5", "0.5",
                 "-o", str(tmp_path / "o")]) == 2
    assert "got 2 densities for 3 refs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_tied_llama_merged_by_ties_loads_with_transformers(tmp_path: Path) -> None:
    """Real checkpoints: sharded bf16 Llamas with tied embeddings (no lm_head saved), merged by TIES."""
    from transformers import AutoModelForCausalLM

    base_model = ck.llama_model(tie=True)
    base_model.save_pretrained(tmp_path / "base")
    tunes = []
    for i in range(2):
        tune = ck.llama_model(seed=i + 1, tie=True)
        tune.save_pretrained(tmp_path / f"ft{i}", max_shard_size="100KB")
        tunes.append(ck.state_dict_of(tune))
    out = tmp_path / "soup"
    assert main(["merge", str(tmp_path / "ft0"), str(tmp_path / "ft1"), "--method", "ties", "--base",
                 str(tmp_path / "base"), "--density", "0.5", "-o", str(out)]) == 0
    soup = ck.load_soup(out)
    assert "lm_head.weight" not in soup
    base = ck.state_dict_of(base_model)
    for key, tensor in soup.items():
        expected = ties_by_hand([t[key] for t in tunes], base[key], [1.0, 1.0], [0.5, 0.5])
        assert_near_definition(tensor, expected, [t[key] for t in tunes], base[key], [1.0, 1.0], key=key)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, soup["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
