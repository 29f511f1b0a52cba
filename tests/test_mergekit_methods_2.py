"""mergekit 0.1.5's sparsifying and consensus methods (``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
``della_linear``, ``sce``, ``ram``, ``ramplus_tl``, ``model_stock`` with ``filter_wise``) against the float64
reference of their definitions (tests/mergekit_reference.py).

Every soup is merged both ways (in memory and streamed, with chunks and blocks that cut the tensors
anywhere, bit for bit equal) from tiny bf16 checkpoints, per-ingredient parameters given as the plan gives
them (per-input lists in a tensor's parameters). Deterministic methods are within one bf16 ulp of the
reference (leaving out the elements the reference calls undecided: rank ties at a selection's edge, votes
that cancel); DELLA's random masks are checked by their law.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import MergePlan
from tests import checkpoints as ck
from tests import mergekit_reference as ref
from tests.method_checks import CUTS, at_cuts, merge_both_ways, odd_tensors
from tests.test_method_ties import _key, _lowbias32

StateDict = dict[str, torch.Tensor]
BF16 = torch.bfloat16


def _models(seed: int, count: int, scale: float = 0.05) -> tuple[StateDict, list[StateDict]]:
    """A bf16 base and ``count`` fine-tunes of it (the base plus noise), with tensors no cut divides."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: v.to(BF16) for k, v in odd_tensors(generator).items()}
    tunes = [{k: (v.double() + torch.randn(v.shape, generator=generator, dtype=torch.float64) * scale).to(BF16)
              for k, v in base.items()} for _ in range(count)]
    return base, tunes


def _merge(tmp_path: Path, name: str, base: StateDict, tunes: Sequence[StateDict], parameters: Mapping[str, Any],
           per_tensor: Mapping[str, Any] | None = None, cut: tuple[int, int] = CUTS[0]) -> StateDict:
    """The soup of ``tunes`` on ``base`` by method ``name``, ``per_tensor`` given to every tensor by the plan."""
    method = get_method(name)(dict(parameters))

    def planned(plan: MergePlan) -> MergePlan:
        return plan.with_parameters(lambda t: per_tensor)

    return merge_both_ways(tmp_path, list(tunes), method, base, cut, planned if per_tensor else None)


def _assert_within_ulp(out: torch.Tensor, expected: torch.Tensor, undecided: torch.Tensor, key: str) -> None:
    far = ref.more_than_one_ulp(out, expected) & ~undecided
    assert not far.any(), f"{key}: {int(far.sum())} elements more than 1 ulp from the definition"


# ---------------------------------------------------------------- breadcrumbs


BREADCRUMBS = [
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, None),
    ("breadcrumbs", {"normalize": True, "lambda": 0.7},
     {"density": [0.5, 0.8, 0.3], "gamma": [0.1, 0.01, 0.6], "weight": [1.0, 0.5, -0.7]}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.02}, None),
    ("breadcrumbs_ties", {"normalize": True},
     {"density": [0.4, 0.9, 0.7], "gamma": [0.2, 0.0, 0.1], "weight": [1.0, 2.0, 0.5]}),
]


# breadcrumbs_ties selects as breadcrumbs does (the same statistics passes), then elects signs element by element
@pytest.mark.parametrize(("name", "parameters", "per_tensor", "cut"), at_cuts(BREADCRUMBS))
def test_breadcrumbs_is_its_definition(tmp_path: Path, name: str, parameters: dict[str, Any],
                                       per_tensor: dict[str, Any] | None, cut: tuple[int, int]) -> None:
    """The window of magnitudes (outliers and the smallest dropped) of each task vector, summed or elected."""
    base, tunes = _models(1, 3)
    soup = _merge(tmp_path, name, base, tunes, parameters, per_tensor, cut)
    given = {**parameters, **(per_tensor or {})}
    weights = given.get("weight", 1.0)
    densities = ref._per_model(given.get("density", 1.0), 3, "density")
    gammas = ref._per_model(given.get("gamma", 0.01), 3, "gamma")
    for key, b in base.items():
        parts = [t[key] for t in tunes]
        expected = ref.METHODS[name](parts, b, weight=weights, density=densities, gamma=gammas,
                                     lambda_=given.get("lambda", 1.0), normalize=given.get("normalize", False))
        deltas = [p.double() - b.double() for p in parts]
        undecided = torch.zeros(b.shape, dtype=torch.bool)
        for delta, d, g in zip(deltas, densities, gammas):
            undecided |= ref.outlier_keep(delta, d, g)[1]
        if name == "breadcrumbs_ties":
            undecided |= ref.vote_undecided(deltas, ref._per_model(weights, 3, "weight"))
        _assert_within_ulp(soup[key], expected, undecided, key)
    wide = soup["wide"].double() - base["wide"].double()
    assert 0 < int((wide == 0).sum()) < wide.numel()  # something trimmed, something kept


def test_breadcrumbs_keeps_every_element_tied_with_a_window_end(tmp_path: Path) -> None:
    """Equal magnitudes at an end of the window are all kept (the reference's rank ties), exactly."""
    base = {"w": torch.zeros(10, dtype=BF16)}
    tune = {"w": torch.tensor([1, 2, 3, 3, 5, 6, 7, 8, 8, -9], dtype=BF16)}
    soup = _merge(tmp_path, "breadcrumbs", base, [tune], {"density": 0.5, "gamma": 0.2})
    # ascending ranks [3, 8) of 1 2 3 3 5 6 7 8 8 9: each end ties (3 at rank 2, 8 at rank 8), and both are kept
    assert soup["w"].tolist() == [0, 0, 3, 3, 5, 6, 7, 8, 8, 0]


def test_breadcrumbs_defaults_trim_nothing_and_refuse_l1_rescale() -> None:
    method = get_method("breadcrumbs")({})
    assert method.parameters.density == 1 and method.parameters.gamma == 0.01  # type: ignore[attr-defined]
    assert not method.parameters.normalize  # type: ignore[attr-defined]
    assert get_method("breadcrumbs_ties").ingredient_parameters == ("density", "gamma")
    with pytest.raises(ValidationError, match="rescale"):
        get_method("breadcrumbs_ties")({"rescale": True})


# ---------------------------------------------------------------- ram, ramplus_tl


def _sparse_tunes(seed: int, count: int) -> tuple[StateDict, list[StateDict]]:
    """Fine-tunes that each change about half the elements, so some elements are changed by one, some by
    several, some by none (and a few by less than epsilon)."""
    base, tunes = _models(seed, count, scale=0.05)
    generator = torch.Generator().manual_seed(seed + 100)
    for tune in tunes:
        for key, value in tune.items():
            keep = torch.rand(value.shape, generator=generator) < 0.5
            tiny = (base[key].double() + 4e-6).to(BF16)  # a change at most epsilon (or none, in bf16)
            tune[key] = torch.where(keep, value, tiny if key == "prime" else base[key])
    return base, tunes


RAM = [
    ("ram", {}, 3),
    ("ram", {"epsilon": 0.02}, 2),
    ("ram", {}, 1),
    ("ramplus_tl", {}, 3),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.9, "epsilon": 1e-3}, 2),
]


@pytest.mark.parametrize(("name", "parameters", "count", "cut"), at_cuts(RAM, every=(0, 4)))
def test_ram_is_mergekits_definition(tmp_path: Path, name: str, parameters: dict[str, Any], count: int,
                                     cut: tuple[int, int]) -> None:
    """The mean over the fine-tunes that changed an element (RAM+: unique changes scaled by lambda_i)."""
    base, tunes = _sparse_tunes(3, count)
    soup = _merge(tmp_path, name, base, tunes, parameters, None, cut)
    for key, b in base.items():
        expected = ref.METHODS[name]([t[key] for t in tunes], b, **parameters)
        _assert_within_ulp(soup[key], expected, torch.zeros(b.shape, dtype=torch.bool), key)
    if name == "ramplus_tl" and count == 3:  # unique changes were scaled: the soup is not plain ram's
        plain = _merge(tmp_path / "plain", "ram", base, tunes, {}, None, cut)
        assert not torch.equal(plain["wide"], soup["wide"])


# ---------------------------------------------------------------- della, della_linear


def della_kept(seed: int, key: str, ingredient: int, probabilities: torch.Tensor) -> torch.Tensor:
    """DELLA's mask as documented: DARE's hash of (seed, tensor, ingredient, element), its top 24 bits below
    ``round(p * 2**24)`` with ``p`` the element's own keep probability."""
    with np.errstate(over="ignore"):
        index = np.arange(probabilities.numel(), dtype=np.uint32)
        hashed = _lowbias32(_lowbias32(index ^ _key(seed, key, -1)) ^ _key(seed, key, ingredient))
    limits = torch.round(probabilities.reshape(-1) * (1 << 24)).numpy()
    return torch.from_numpy((hashed >> np.uint32(8)).astype(np.float64) < limits).reshape(probabilities.shape)


def _at_least_1d(tensor: torch.Tensor) -> torch.Tensor:
    """The reference ranks rows of 1-D and larger tensors: a 0-dim one is a row of one."""
    return tensor.reshape(1) if tensor.dim() == 0 else tensor


DELLA = [
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}, None),
    ("della", {"seed": 1},
     {"density": [0.4, 0.7, 0.5], "epsilon": [0.1, 0.2, 0.05], "weight": [1.0, 0.5, 2.0]}),
    ("della_linear", {"density": 0.6, "lambda": 0.8}, {"weight": [1.0, -0.5, 0.75]}),
    ("della_linear", {"normalize": True, "rescale": False},
     {"density": [0.3, 0.6, 1.0], "epsilon": [0.25, 0.15, 0.15], "weight": [0.5, 1.5, 1.0]}),
]


@pytest.mark.parametrize(("name", "parameters", "per_tensor", "cut"), at_cuts(DELLA, every=(0, 2)))
def test_della_is_its_definition_with_the_documented_masks(tmp_path: Path, name: str, parameters: dict[str, Any],
                                                          per_tensor: dict[str, Any] | None,
                                                          cut: tuple[int, int]) -> None:
    """With the masks the documented hash draws from the reference's per-row keep probabilities, the soup is the
    reference's (each kept element divided by its own probability), within one ulp, whatever the cuts."""
    base, tunes = _models(4, 3)
    soup = _merge(tmp_path, name, base, tunes, parameters, per_tensor, cut)
    given = {**parameters, **(per_tensor or {})}
    weights = ref._per_model(given.get("weight", 1.0), 3, "weight")
    densities = ref._per_model(given.get("density", 1.0), 3, "density")
    epsilons = ref._per_model(given.get("epsilon", 0.15), 3, "epsilon")
    for key, b in base.items():
        b1, parts = _at_least_1d(b), [_at_least_1d(t[key]) for t in tunes]
        deltas = [p.double() - b1.double() for p in parts]
        masks = [torch.ones(b1.shape, dtype=torch.bool) if d >= 1 else
                 della_kept(given.get("seed", 0), key, i, ref.della_keep_probabilities(delta, d, e))
                 for i, (delta, d, e) in enumerate(zip(deltas, densities, epsilons))]
        expected = ref.METHODS[name](
            parts, b1, weight=weights, density=densities, epsilon=epsilons, lambda_=given.get("lambda", 1.0),
            masks=masks, **{k: given[k] for k in ("normalize", "rescale") if k in given},
        )
        undecided = torch.zeros(b1.shape, dtype=torch.bool)
        if name == "della":
            kept = [torch.where(m, d / (ref.della_keep_probabilities(d, s, e) if s < 1 else 1), 0)
                    for m, d, s, e in zip(masks, deltas, densities, epsilons)]
            undecided = ref.vote_undecided(kept, weights)
        _assert_within_ulp(soup[key].reshape(b1.shape), expected, undecided, key)


def test_della_keeps_by_its_law_and_rescales_each_kept_element_exactly(tmp_path: Path) -> None:
    """One task vector, weight 1: the elements kept (those the soup moves off the base) follow the per-row
    probabilities (z-scores per row and overall), the higher ranks kept more; each kept element is
    ``base + delta / p`` rounded once."""
    generator = torch.Generator().manual_seed(5)
    shapes = {"w": (40, 300), "v": (2000,), "c": (6, 50, 4)}
    base = {k: torch.randn(s, generator=generator).to(BF16) for k, s in shapes.items()}
    tune = {k: (v.double() + 0.05 * torch.randn(v.shape, generator=generator, dtype=torch.float64)).to(BF16)
            for k, v in base.items()}
    density, epsilon = 0.5, 0.2
    soup = _merge(tmp_path, "della_linear", base, [tune], {"density": density, "epsilon": epsilon, "seed": 7},
                  None, CUTS[1])
    for key, b in base.items():
        delta = tune[key].double() - b.double()
        moved = delta != 0
        kept = (soup[key] != b) & moved
        p = ref.della_keep_probabilities(delta, density, epsilon)
        assert abs(ref.poisson_binomial_z(kept[moved], p[moved])) < 4, key
        if key == "w":
            for row in range(shapes["w"][0]):
                assert abs(ref.poisson_binomial_z(kept[row][moved[row]], p[row][moved[row]])) < 4.5, row
            high, low = p > density + epsilon / 2, p < density - epsilon / 2
            assert kept[high & moved].double().mean() > kept[low & moved].double().mean() + 0.2
        expected = ref.della_linear([tune[key]], b, weight=1.0, density=density, epsilon=epsilon, masks=[kept])
        _assert_within_ulp(soup[key], expected, torch.zeros(b.shape, dtype=torch.bool), key)
        assert torch.equal(soup[key][~moved], b[~moved])


def test_della_is_reproducible_by_seed_alone(tmp_path: Path) -> None:
    """The same seed gives the same soup whatever the chunks; another seed another soup."""
    base, tunes = _models(6, 2)
    parameters = {"density": 0.5, "epsilon": 0.1, "seed": 11}
    first = _merge(tmp_path / "a", "della", base, tunes, parameters, None, CUTS[0])
    again = _merge(tmp_path / "b", "della", base, tunes, parameters, None, CUTS[3])
    other = _merge(tmp_path / "c", "della", base, tunes, {**parameters, "seed": 12}, None, CUTS[0])
    for key in base:
        ck.assert_bit_equal(first[key], again[key], key)
    assert not torch.equal(first["wide"], other["wide"])


def test_della_refuses_probabilities_outside_0_1() -> None:
    with pytest.raises(ValidationError, match="density"):
        get_method("della")({"density": 0.9, "epsilon": 0.15})
    with pytest.raises(RecipeError, match="density"):
        get_method("della_linear")({"density": 0.5}, None, [{"density": 0.1}, {}])
    assert get_method("della")({}).parameters.normalize  # type: ignore[attr-defined]
    assert not get_method("della_linear")({}).parameters.normalize  # type: ignore[attr-defined]


# ---------------------------------------------------------------- sce


@pytest.mark.parametrize(("select_topk", "cut"), at_cuts([(1.0,), (0.5,), (0.1,), (0.0,)], every=(2,)))
def test_sce_is_its_definition(tmp_path: Path, select_topk: float, cut: tuple[int, int]) -> None:
    """Variance selection, squared-norm weights, sign election, the agreeing entries' weighted mean."""
    base, tunes = _sparse_tunes(8, 3)
    soup = _merge(tmp_path, "sce", base, tunes, {"select_topk": select_topk}, None, cut)
    for key, b in base.items():
        parts = [t[key] for t in tunes]
        expected = ref.sce(parts, b, select_topk=select_topk)
        tau = torch.stack([p.double() - b.double() for p in parts])
        keep, undecided = ref.sce_select(tau, select_topk)
        undecided |= ref.vote_undecided(list(tau * keep), [1.0] * 3)
        _assert_within_ulp(soup[key], expected, undecided, key)
    if 0 < select_topk < 1:
        plain = _merge(tmp_path / "all", "sce", base, tunes, {}, None, cut)
        assert not torch.equal(plain["wide"], soup["wide"])
    if select_topk == 0:
        for key, b in base.items():
            ck.assert_bit_equal(soup[key], b, key)


# ---------------------------------------------------------------- model_stock filter_wise


@pytest.mark.parametrize("cut", at_cuts([()]))
def test_model_stock_filter_wise_takes_an_angle_per_row(tmp_path: Path, cut: tuple[int, int],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """t from each row's mean cosine (rows: vectors along the last axis), clamped at 0 where the cosine is not
    positive (hub-soup's deliberate difference, warned once per tensor); per tensor without filter_wise."""
    base, (shared, *tunes) = _models(9, 4)
    for tune in tunes:  # task vectors with a common part: mostly positive cosines
        for key, value in tune.items():
            tune[key] = (value.double() + shared[key].double() - base[key].double()).to(BF16)
    for tune in tunes:  # one row every task vector leaves alone, another where two point opposite ways
        tune["wide"][0] = base["wide"][0]
    tunes[1]["wide"][1] = (2 * base["wide"][1].double() - tunes[0]["wide"][1].double()).to(BF16)
    tunes[2]["wide"][1] = base["wide"][1]
    soup = _merge(tmp_path, "model_stock", base, tunes, {"filter_wise": True}, None, cut)
    per_tensor = _merge(tmp_path / "tensor", "model_stock", base, tunes, {}, None, cut)
    for key, b in base.items():
        expected = ref.model_stock([t[key] for t in tunes], b, filter_wise=True, clamp_t_at_zero=True)
        _assert_within_ulp(soup[key], expected, torch.zeros(b.shape, dtype=torch.bool), key)
    ck.assert_bit_equal(soup["wide"][:2], base["wide"][:2], "frozen and clamped rows")
    assert not torch.equal(soup["odd"], per_tensor["odd"])
    assert "wide: 1 of 3 rows" in caplog.text
    method = get_method("model_stock")({"filter_wise": True})
    assert method.row_elements((3, 700)) == 700 and get_method("model_stock")({}).row_elements((3, 700)) == 1
    assert "per row" in (method.card_summary() or "")
