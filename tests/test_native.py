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
from hub_soup.errors import NonFiniteSoupError
from hub_soup.merging.methods import MergedTensor, MergeMethod, arcee_fusion, get_method, order
from hub_soup.merging.methods.angles import Gram
from hub_soup.merging.methods.order import OrderStatistics
from hub_soup.native import elementwise
from tests.method_checks import merge_both_ways

BF16 = torch.bfloat16


def _built(monkeypatch: pytest.MonkeyPatch, name: str, vector_math: bool = False) -> object:
    """The compiled loops of ``name``.c, built afresh for the test (the process's cache of them emptied)."""
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler on this machine: the compiled loops are not built")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    library = native.library(name, vector_math=vector_math)
    assert library is not None, "a C compiler is here, yet the loops were not built (see hub_soup.native's log)"
    return library


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> object:
    """The compiled arcee_fusion loops."""
    return _built(monkeypatch, "arcee_fusion", vector_math=True)


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


def _models(count: int, length: int, seed: int, largest: float = 3.0e38) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``count`` bfloat16 fine-tunes of a base, with signed zeros, subnormals, values of magnitude ``largest``
    (by default about the largest finite), elements equal to the base's and an inf."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(length, generator=generator, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, largest, -largest, 2.0 ** -126], dtype=torch.float64)
    tuned = []
    for _ in range(count):
        part = base + torch.randn(length, generator=generator, dtype=torch.float64) * 0.01
        positions = torch.randperm(length - 64, generator=generator)[:12] + 64
        part[positions[:7]] = special
        part[positions[7:]] = base[positions[7:]]
        part[:64] = -0.0  # every model -0.0 there: task vectors of signed zeros
        part[64] = float("inf") if not tuned else part[64]  # carried as inf or nan
        tuned.append(part.to(BF16))
    base[torch.randperm(length - 64, generator=generator)[:7] + 64] = special
    base[:64] = -0.0
    return tuned, base.to(BF16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same float64 values bit for bit, nan where the other is nan (whatever its payload)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int64), b[~nan].view(torch.int64))


def _both_paths(monkeypatch: pytest.MonkeyPatch, method: MergeMethod, parts: list[torch.Tensor],
                base: torch.Tensor | None, statistics: object = None, offset: int = 0) -> list[torch.Tensor]:
    """``method``'s kernel over ``parts`` as one block, compiled and then with torch alone."""
    soups = []
    for path in ("compiled", "torch"):
        if path == "torch":
            monkeypatch.setitem(native._loaded, "elementwise", None)
        acc = torch.full((parts[0].numel(),), float("nan"), dtype=torch.float64)
        method.kernel(acc, parts, scratch=torch.empty_like(acc), base=base, statistics=statistics, offset=offset)
        soups.append(acc)
    return soups


@pytest.fixture
def elementwise_loops(monkeypatch: pytest.MonkeyPatch) -> object:
    """The compiled elementwise loops."""
    return _built(monkeypatch, "elementwise")


@pytest.mark.parametrize(("name", "parameters", "weights", "count", "with_base"), [
    ("linear", {}, [1.0, 2.0, -0.5], 3, False),
    ("linear", {"normalize": False}, [0.3, 0.3, 0.4], 3, False),
    ("linear", {}, [0.7], 1, False),
    ("task_arithmetic", {}, None, 3, True),
    ("task_arithmetic", {"lambda": 0.7, "normalize": True}, [0.3, 1.0, 2.0], 3, True),
    ("task_arithmetic", {}, [0.5, 0.5], 2, True),  # coefficients summing to 1: no base term
    ("passthrough", {}, None, 1, False),
    ("passthrough", {"scale": 0.37}, None, 1, False),
    ("nearswap", {"t": 0.004}, None, 1, True),
    ("nearswap", {"t": 1e-6}, None, 1, True),
])
def test_elementwise_kernels_are_the_torch_paths_bit_for_bit(
    elementwise_loops: object, monkeypatch: pytest.MonkeyPatch, name: str, parameters: dict[str, object],
    weights: list[float] | None, count: int, with_base: bool,
) -> None:
    """linear's, task arithmetic's, passthrough's and nearswap's kernels on bfloat16 blocks (a span and a remainder
    long), compiled and with torch: the same float64 bits, signed zeros, subnormals and the largest values
    included."""
    parts, base = _models(count, 3001, seed=count)
    method = get_method(name)(parameters, weights=weights)
    compiled, torch_path = _both_paths(monkeypatch, method, parts, base if with_base else None)
    assert _same_bits(compiled, torch_path)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(("density", "rescale", "normalize", "lambda_"), [
    (0.5, True, False, 1.0), (0.3, False, True, 0.6), (0.9, True, True, 1.0), (1.0, True, False, 1.3),
    (1.0, False, True, 1.0),
])
def test_dare_is_the_torch_paths_bit_for_bit(
    elementwise_loops: object, monkeypatch: pytest.MonkeyPatch, name: str, density: float, rescale: bool,
    normalize: bool, lambda_: float,
) -> None:
    """DARE's kernel (masks, rescaling, sign election, normalising by the agreeing weights) compiled and with
    torch: the same bits, from an offset past 2**31 (indices hashed as their low 32 bits), with weights of both
    signs and one ingredient at its own density."""
    parts, base = _models(3, 2500, seed=int(density * 10))
    parameters = {"density": density, "rescale": rescale, "normalize": normalize, "lambda": lambda_, "seed": 5}
    method = get_method(name)(parameters, weights=[1.0, 0.5, -0.25], ingredients=[{}, {"density": 0.2}, {}])
    masks = method.start_statistics(MergedTensor("w", 1 << 32, torch.float64, (1 << 32,)))
    for offset in (0, (1 << 31) - 1000):
        compiled, torch_path = _both_paths(monkeypatch, method, parts, base, masks, offset)
        assert _same_bits(compiled, torch_path), offset
        monkeypatch.setattr(native, "_loaded", {})


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "normalize"), [(0.5, True), (0.9, False), (1.0, True)])
def test_magnitude_trimming_is_the_torch_paths_bit_for_bit(
    elementwise_loops: object, monkeypatch: pytest.MonkeyPatch, name: str, density: float, normalize: bool
) -> None:
    """TIES's and Breadcrumbs' kernels from the thresholds their statistics passes find (one ingredient keeping
    none of its task vector, one at its own density), compiled and with torch: the same bits."""
    parts, base = _models(3, 3000, seed=int(density * 10))
    parameters: dict[str, object] = {"density": density, "normalize": normalize}
    if name != "ties":
        parameters["gamma"] = 0.01
    method = get_method(name)(parameters, weights=[1.0, 0.5, -0.25],
                              ingredients=[{}, {"density": 0.0002}, {"density": 0.3}])
    tensor = MergedTensor("w", base.numel(), torch.float64, (base.numel(),))
    statistics = method.start_statistics(tensor)
    for _ in range(method.statistics_passes(torch.bfloat16)):
        statistics = method.finish_statistics(method.observe(statistics, parts, base), tensor)
        if method.passes_left(statistics) == 0:
            break
    compiled, torch_path = _both_paths(monkeypatch, method, parts, base, statistics)
    assert _same_bits(compiled, torch_path)


@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.02])
def test_ram_and_ramplus_are_the_torch_paths_bit_for_bit(
    elementwise_loops: object, monkeypatch: pytest.MonkeyPatch, epsilon: float
) -> None:
    """RAM's and RAM+'s kernels (contributions above epsilon, their mean, a unique change scaled by its
    ingredient's factor in a fused multiply-add as torch's ``addcmul_``) and RAM+'s counting pass, compiled and
    with torch: the same bits and the same counts."""
    parts, base = _models(3, 3001, seed=4)
    tensor = MergedTensor("w", base.numel(), torch.float64, (base.numel(),))
    counts = []
    for path in ("compiled", "torch"):
        if path == "torch":
            monkeypatch.setitem(native._loaded, "elementwise", None)
        counts.append(get_method("ramplus_tl")({"epsilon": epsilon}).observe(None, parts, base))
    assert counts[0] == counts[1]
    monkeypatch.setattr(native, "_loaded", {})
    for name in ("ram", "ramplus_tl"):
        method = get_method(name)({"epsilon": epsilon})
        factors = method.finish_statistics(counts[0], tensor) if name == "ramplus_tl" else None
        compiled, torch_path = _both_paths(monkeypatch, method, parts, base, factors)
        assert _same_bits(compiled, torch_path), name
        monkeypatch.setattr(native, "_loaded", {})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_narrowing_is_copy_s_bit_for_bit(elementwise_loops: object, dtype: torch.dtype) -> None:
    """Rounding to bfloat16 as ``copy_`` rounds, from float32 and from float64 (whose values round twice, through
    float32, as torch's do): every magnitude from subnormal to the largest finite, ties, signed zeros; and a
    block holding inf or nan is said to."""
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(20_000, generator=generator, dtype=torch.float64) * torch.logspace(-44, 38, 20_000,
                                                                                           dtype=torch.float64)
    ties = 1.0 + (2 * torch.arange(500, dtype=torch.float64) + 1) * 2.0 ** -8  # halfway between bfloat16 values
    values = torch.cat([values, ties, ties + 2.0 ** -40, -ties, torch.tensor([0.0, -0.0, 3.3e38, -3.3e38])])
    value = values.to(dtype)
    out = torch.empty(value.numel(), dtype=BF16)
    assert elementwise.narrow(out, value) is True
    assert torch.equal(out.view(torch.int16), value.to(BF16).view(torch.int16))
    for special in (float("inf"), float("nan")):
        value[77] = special
        assert elementwise.narrow(out, value) is False


@pytest.mark.parametrize(("name", "parameters", "weights"), [
    ("linear", {}, [1.0, 2.0, 0.5]), ("task_arithmetic", {"lambda": 0.8}, None),
    ("dare_ties", {"density": 0.4, "seed": 3}, None), ("dare_linear", {"density": 0.6, "seed": 3}, None),
])
def test_a_streamed_soup_is_the_same_compiled_or_not(
    elementwise_loops: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
    parameters: dict[str, object], weights: list[float] | None,
) -> None:
    """Whole merges through the engine (chunks, blocks, rounding to bfloat16): the same soup with the compiled
    loops as with torch alone; and values beyond bfloat16's range stop the merge either way."""
    method = get_method(name)
    soups = []
    for path in ("compiled", "torch", "overflowing"):
        if path == "torch":
            monkeypatch.setitem(native._loaded, "elementwise", None)
        elif path == "overflowing":
            monkeypatch.setattr(native, "_loaded", {})
        parts, base = _models(3, 64 * 50, seed=9, largest=3.0e38 if path == "overflowing" else 1e30)
        base[0] = parts[0][0] = -3.3e38 if path == "overflowing" else base[0]  # a change of 0 at the extreme
        states = [{"w": part.view(64, 50), "b": part[:50].clone()} for part in parts]
        base_state = {"w": base.view(64, 50), "b": base[:50].clone()} if name != "linear" else None
        (tmp_path / path).mkdir()
        if path == "overflowing":
            overflowing = method({**parameters, "normalize": False}, weights=[4.0, 4.0, 4.0])
            with pytest.raises(NonFiniteSoupError, match="overflows? bfloat16"):
                merge_both_ways(tmp_path / path, states, overflowing, base_state)
        else:
            soups.append(merge_both_ways(tmp_path / path, states, method(parameters, weights=weights), base_state))
    for key, tensor in soups[0].items():
        assert torch.equal(tensor.view(torch.int16), soups[1][key].view(torch.int16)), key


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
