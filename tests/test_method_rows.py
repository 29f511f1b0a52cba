"""Methods that work on whole rows stream: the engine hands them chunks and blocks of whole rows, never a tensor.

DELLA's ranks, ``model_stock``'s ``filter_wise`` angles, ``nuslerp``'s per-vector angles and
``arcee_fusion``'s softmaxes each need whole rows; the engine cuts their tensors at rows
(:meth:`~hub_soup.merging.methods.MergeMethod.row_elements`), so their working memory is a
chunk of rows, as every method's is. A real merge with small chunks records every block each
kernel and every chunk each statistics pass is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from hub_soup import native
from hub_soup.merging.engine import whole_rows
from hub_soup.merging.methods import MergedTensor, MergeMethod, arcee_fusion, get_method, order
from hub_soup.merging.methods.order import PASSES, OrderStatistics
from tests import mergekit_reference as ref
from tests.method_checks import merge_both_ways

BF16 = torch.bfloat16
SHAPES = {"wide": (40, 50), "cube": (12, 7, 5), "vector": (300,)}
CHUNK, BLOCK = 160, 120

ROWS = [  # method, parameters, weights, ingredients, with a base, the row of each shape
    ("della_linear", {"density": 0.5, "epsilon": 0.2}, [1.0, 0.5], 2, True, {"wide": 50, "cube": 35, "vector": 300}),
    ("model_stock", {"filter_wise": True}, None, 3, True, {"wide": 50, "cube": 5, "vector": 300}),
    ("nuslerp", {"nuslerp_flatten": False}, [1.0, 2.0], 2, True, {"wide": 50, "cube": 5, "vector": 300}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [1.0, 2.0], 2, False,
     {"wide": 50, "cube": 35, "vector": 1}),
    ("arcee_fusion", {}, None, 1, True, {"wide": 50, "cube": 5, "vector": 300}),
]


def _recording(cls: type[MergeMethod]) -> type[MergeMethod]:
    """``cls`` noting the size and offset of every block its kernel is given, and of every chunk observed."""

    class Recording(cls):  # type: ignore[valid-type,misc]
        blocks: ClassVar[list[tuple[str, int, int]]] = []
        observed: ClassVar[list[tuple[str, int]]] = []

        def start_statistics(self, tensor: MergedTensor) -> Any:
            self.current = tensor.key
            return super().start_statistics(tensor)

        def observe(self, statistics: Any, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Any:
            self.observed.append((self.current, parts[0].numel()))
            return super().observe(statistics, parts, base)

        def kernel(self, acc: torch.Tensor, parts: Sequence[torch.Tensor], **options: Any) -> None:
            self.blocks.append((self.current, acc.numel(), options["offset"]))
            super().kernel(acc, parts, **options)

    return Recording


@pytest.mark.parametrize(("name", "parameters", "weights", "count", "with_base", "rows"), ROWS,
                         ids=[f"{r[0]}-{'-'.join(r[1]) or 'plain'}" for r in ROWS])
def test_a_row_method_is_given_chunks_and_blocks_of_whole_rows(
    tmp_path: Path, name: str, parameters: dict[str, Any], weights: list[float] | None, count: int, with_base: bool,
    rows: dict[str, int],
) -> None:
    """Every block a kernel is given (and every chunk a statistics pass observes) is whole rows starting at a row,
    at most a chunk's worth of them (one row, where a row is longer): never a whole matrix."""
    generator = torch.Generator().manual_seed(3)
    states = [{k: torch.randn(s, generator=generator, dtype=torch.float64).to(BF16) for k, s in SHAPES.items()}
              for _ in range(count + 1)]
    method = _recording(get_method(name))(parameters, weights)
    method.blocks.clear()
    method.observed.clear()
    merge_both_ways(tmp_path, states[1:], method, states[0] if with_base else None, (CHUNK, BLOCK))
    assert {key for key, _, _ in method.blocks} == set(SHAPES)
    for key, size, offset in method.blocks:
        row = rows[key]
        assert size % row == 0 and offset % row == 0, (key, size, offset)
        assert size <= whole_rows(BLOCK, row), (key, size)
    for key, size in method.observed:
        assert size % rows[key] == 0 and size <= whole_rows(CHUNK, rows[key]), (key, size)
    largest = max(size for key, size, _ in method.blocks if key == "wide")
    assert largest < 40 * 50 // 10  # a few rows of the matrix, not the matrix


@pytest.mark.parametrize("by_codes", [False, True])
@pytest.mark.parametrize("gather", [order.GATHER, 40, 0])
def test_order_statistics_are_the_sorted_elements_at_their_ranks(
    gather: int, by_codes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Radix selection over the ordered bits gives the exact element at each rank, whatever the signs (zeros of
    both signs, tiny negatives, repeats), streamed in chunks, in four passes at most; ranks among non-negative
    values only (every odd trial: the selection by raw bits) beside negative ones. Whether the keys near the
    ranks are gathered and sorted after one pass (the default), after a few, or never (all four counted).
    ``by_codes``: the first pass writes each value's code and counts the codes (the non-negative trials'
    codes of their raw bits), and each later pass is given only the values its candidates name."""
    monkeypatch.setattr(order, "GATHER", gather)
    generator = torch.Generator().manual_seed(5)
    for trial in range(12):
        n = int(torch.randint(1, 3000, (1,), generator=generator))
        values = torch.randn(n, generator=generator, dtype=torch.float64) * 10.0 ** (trial - 6)
        values[: n // 3] = 0.0
        values[n // 3 : n // 2] = -0.0
        values[::7] *= 1e-300
        unsigned = by_codes and trial % 2 == 1
        if unsigned:
            values = values.abs()
        ranks = [int(q * (n - 1)) for q in (0.25, 0.5, 0.75)] + [0, n - 1]
        if trial % 2:
            ranks = [r for r in ranks if float(values.sort().values[r]) >= 0] or [n - 1]
        statistics = OrderStatistics(ranks)
        codes = torch.empty(n, dtype=torch.int16)
        for step in range(PASSES):
            if statistics.done:
                break
            for begin in range(0, n, 333):
                chunk = values[begin : begin + 333]
                if not by_codes:
                    statistics.observe(chunk)
                elif step == 0:
                    statistics.code(chunk, codes[begin : begin + 333], unsigned=unsigned)
                    statistics.add(statistics.tally_codes(codes[begin : begin + 333]))
                else:
                    picked = chunk[torch.from_numpy(statistics.candidates(codes[begin : begin + 333]))]
                    statistics.add(statistics.tally(picked, unsigned=unsigned))
            statistics.finish_pass()
        assert statistics.done
        ordered = values.sort().values
        assert statistics.values == [float(ordered[r]) for r in ranks], trial


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("coded", "gather"), [(None, None), (0, None), (101 * 64, None), (None, 0), (101 * 64, 0)])
def test_arcee_fusion_of_a_tensor_many_chunks_long_is_its_definition(
    tmp_path: Path, coded: int | None, gather: int | None, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact quantiles over a tensor read in 200 chunks of rows: the soup is the definition's, kept elements
    the fine-tune's and dropped ones the base's. Whether the later passes pick their elements by the first
    pass's codes (every element coded, the default), recompute every importance (none coded), or both (the
    first 101 rows coded: a chunk of two rows split between them), whether the second pass gathers the keys or
    all four passes count, and with the compiled loops (where this machine builds them: tests/test_native.py)
    or torch alone."""
    if not compiled:
        monkeypatch.setattr(native, "_loaded", {"arcee_fusion": None})
    if coded is not None:
        monkeypatch.setattr(arcee_fusion, "CODED", coded)
    if gather is not None:
        monkeypatch.setattr(order, "GATHER", gather)
    generator = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(400, 64, generator=generator, dtype=torch.float64).to(BF16)}
    tuned = {"w": (base["w"].double() + torch.randn(400, 64, generator=generator, dtype=torch.float64) * 0.3).to(BF16)}
    soup = merge_both_ways(tmp_path, [tuned], get_method("arcee_fusion")(), base, (128, 64))["w"]
    expected = ref.arcee_fusion([tuned["w"]], base["w"]).to(BF16)
    assert torch.equal(soup, expected)