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

import pytest
import torch
from pydantic import ValidationError

from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import MergePlan
from tests import mergekit_reference as ref
from tests.method_checks import CUTS, merge_both_ways, odd_tensors

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


@pytest.mark.parametrize(("name", "parameters", "per_tensor"), BREADCRUMBS)
@pytest.mark.parametrize("cut", CUTS[:3], ids=lambda c: f"chunk{c[0]}")
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


@pytest.mark.parametrize(("name", "parameters", "count"), RAM)
@pytest.mark.parametrize("cut", CUTS[:3], ids=lambda c: f"chunk{c[0]}")
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
