"""The compiled loops (``hub_soup/native``): built here with the machine's C compiler, they must compute what the
torch path computes, element for element; only sums (a row's divergence, a dot product) may differ in their
last bits.

Each comparison runs both paths on the same bfloat16 rows: special values (signed zeros, subnormals, the largest
finite values, equal elements), widths of 1 to 1000 elements, rows coded and rows beyond the codes. Where no C
compiler is found the compiled loops cannot be tested. The soup is the definition's either way
(``tests/test_method_rows.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hub_soup import native
from hub_soup.merging.methods import MergedTensor, arcee_fusion, get_method, order
from hub_soup.merging.methods.angles import Gram
from hub_soup.merging.methods.order import OrderStatistics

BF16 = torch.bfloat16


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> object:
    """The compiled arcee_fusion loops, built afresh for the test (the process's cache of them emptied)."""
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler on this machine: the compiled loops are not built")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    library = native.library("arcee_fusion", vector_math=True)
    assert library is not None, "a C compiler is here, yet the loops were not built (see hub_soup.native's log)"
    return library


def _torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """arcee_fusion computed with torch alone from here on in this test."""
    monkeypatch.setattr(native, "_loaded", {"arcee_fusion": None})


def _rows(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a fine-tune of ``rows`` x ``width`` bfloat16 elements, with the values rounding likes to hide."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    tuned = base + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 0.05
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, 1e-30, 2.0 ** -126])
    flat_base, flat_tuned = base.view(-1), tuned.view(-1)
    positions = torch.randperm(flat_base.numel(), generator=generator)[: 2 * special.numel()]
    flat_base[positions[: special.numel()]] = special.double()
    flat_tuned[positions[special.numel() :]] = special.double()
    flat_tuned[positions[:3]] = flat_base[positions[:3]]  # unchanged elements: importance 0
    return base.to(BF16).reshape(-1), tuned.to(BF16).reshape(-1)


def _first_pass(method: arcee_fusion.ArceeFusion, tensor: MergedTensor, tuned: torch.Tensor, base: torch.Tensor
                ) -> arcee_fusion.Fusion:
    statistics = method.start_statistics(tensor)
    return method.observe(statistics, [tuned], base)


@pytest.mark.parametrize(("rows", "width", "coded_rows"), [(300, 1, 120), (40, 1000, 40), (64, 37, 10), (9, 64, 0)])
def test_first_pass_codes_and_counts_are_the_torch_paths(
    compiled: object, monkeypatch: pytest.MonkeyPatch, rows: int, width: int, coded_rows: int
) -> None:
    """Each divergence within float64 rounding of the torch path's, and from them every code and the histogram
    exactly what torch computes (the codes of rows beyond the kept ones counted all the same)."""
    monkeypatch.setattr(arcee_fusion, "CODED", coded_rows * width)
    base, tuned = _rows(rows, width, seed=rows + width)
    tensor = MergedTensor("w", rows * width, torch.float64, (rows, width))
    native_pass = _first_pass(get_method("arcee_fusion")(), tensor, tuned, base)
    _torch_path(monkeypatch)
    torch_pass = _first_pass(get_method("arcee_fusion")(), tensor, tuned, base)

    x, b = tuned.double().view(rows, width), base.double().view(rows, width)
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    terms = p * torch.log(p / q)
    scale = terms.abs().sum(-1, keepdim=True) + 1e-300
    assert ((native_pass.divergence - torch_pass.divergence).abs() <= 1e-13 * scale).all()

    importance = (x - b).abs() * native_pass.divergence
    codes = torch.empty(rows * width, dtype=torch.int16)
    OrderStatistics.code(importance, codes)
    assert torch.equal(native_pass.codes, codes[: coded_rows * width])
    counted = OrderStatistics([0]).tally_codes(codes)[0]
    assert torch.equal(native_pass.quantiles._counts[0], counted)


@pytest.mark.parametrize("gather", [None, 0])
@pytest.mark.parametrize("coded_rows", [120, 0, 47])
def test_the_quantiles_are_the_sorted_importances(
    compiled: object, monkeypatch: pytest.MonkeyPatch, coded_rows: int, gather: int | None
) -> None:
    """Every pass compiled, a tensor fed in chunks of rows: the three quantiles are exactly the sorted
    importances' elements at their ranks (the importances from the divergences the first pass found), whether
    the later passes pick by the kept codes, recompute, or both, and whether they gather keys or count digits."""
    monkeypatch.setattr(arcee_fusion, "CODED", coded_rows * 30)
    if gather is not None:
        monkeypatch.setattr(order, "GATHER", gather)
    rows, width = 120, 30
    base, tuned = _rows(rows, width, seed=coded_rows)
    method = get_method("arcee_fusion")()
    tensor = MergedTensor("w", rows * width, torch.float64, (rows, width))
    statistics = method.start_statistics(tensor)
    while not statistics.quantiles.done:
        for start in range(0, rows * width, 13 * width):
            end = min(start + 13 * width, rows * width)
            statistics = method.observe(statistics, [tuned[start:end]], base[start:end])
        statistics = method.finish_statistics(statistics, tensor)
    importance = (tuned.double() - base.double()).abs().view(rows, width) * statistics.divergence
    ordered = importance.reshape(-1).sort().values
    ranks = [int(q * (rows * width - 1)) for q in arcee_fusion.QUANTILES]
    assert statistics.quantiles.values == [float(ordered[rank]) for rank in ranks]


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.9, 1.0])
def test_the_kernel_is_the_torch_paths_bit_for_bit(compiled: object, monkeypatch: pytest.MonkeyPatch,
                                                   quantile: float) -> None:
    """``b + (x - b) [importance >= threshold]`` in float64 from the same statistics: the same bits, signed zeros,
    subnormals and the largest values included, keeping none, some or all of the changes."""
    rows, width = 50, 40
    base, tuned = _rows(rows, width, seed=3)
    method = get_method("arcee_fusion")()
    tensor = MergedTensor("w", rows * width, torch.float64, (rows, width))
    statistics = _first_pass(method, tensor, tuned, base)
    importance = (tuned.double() - base.double()).abs().view(rows, width) * statistics.divergence
    statistics.threshold = float(importance.reshape(-1).sort().values[int(quantile * (rows * width - 1))])
    soups = []
    for path in ("native", "torch"):
        if path == "torch":
            _torch_path(monkeypatch)
        acc = torch.empty(rows * width, dtype=torch.float64)
        for start in range(0, rows * width, 7 * width):  # blocks of whole rows, from an offset in the tensor
            end = min(start + 7 * width, rows * width)
            method.kernel(acc[start:end], [tuned[start:end]], scratch=torch.empty(end - start, dtype=torch.float64),
                          base=base[start:end], statistics=statistics, offset=start)
        soups.append(acc.view(torch.int64))
    assert torch.equal(soups[0], soups[1])


@pytest.mark.parametrize("with_origin", [True, False])
@pytest.mark.parametrize(("count", "length"), [(1, 5), (3, 2048), (4, 7001), (2, 300_001)])
def test_the_gram_is_the_torch_paths_to_float64_rounding(
    compiled: object, monkeypatch: pytest.MonkeyPatch, count: int, length: int, with_origin: bool
) -> None:
    """Dot products of bfloat16 task vectors (or the vectors themselves) over pieces, spans and their remainders:
    within float64 rounding of the torch path's (the same products, summed in another order)."""
    generator = torch.Generator().manual_seed(count * length)
    origin = torch.randn(length, generator=generator).to(BF16)
    vectors = [(origin.float() + 0.01 * torch.randn(length, generator=generator)).to(BF16) for _ in range(count)]
    method = get_method("model_stock")()
    native_gram = Gram(count, method.workspace).add(vectors, origin if with_origin else None)
    _torch_path(monkeypatch)
    monkeypatch.setitem(native._loaded, "gram", None)
    torch_gram = Gram(count, method.workspace).add(vectors, origin if with_origin else None)
    wide = [v.double() - (origin.double() if with_origin else 0.0) for v in vectors]
    for i in range(count):
        for j in range(i, count):
            scale = float((wide[i].abs() * wide[j].abs()).sum())
            assert abs(native_gram.dot(i, j) - torch_gram.dot(i, j)) <= 1e-13 * scale, (i, j)


def test_without_a_usable_compiler_torch_computes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that is not there, or ``HUB_SOUP_NATIVE=0``: no library, no error, nothing left in the cache."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.library("arcee_fusion") is None
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.library("arcee_fusion") is None
    assert not (tmp_path / "cache").exists()


def test_a_failed_build_leaves_no_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that answers ``--version`` and then fails to compile leaves torch computing and no library,
    whole or half-written, behind."""
    compiler = tmp_path / "failing-cc"
    compiler.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "failing-cc 1.0" && exit 0\necho "error: no" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    monkeypatch.setenv("CC", str(compiler))
    assert native.library("arcee_fusion") is None
    assert [path.name for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []
