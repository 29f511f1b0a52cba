"""The streaming merge (what the CLI runs) equals the in-memory reference bit for bit.

``stream_merge`` reads every tensor in chunks into one reused buffer and may be
tuned for speed (chunk size, threads, read-ahead, write-behind);
:func:`tests.checkpoints.reference_soup` is the whole-tensor definition, written out
in the tests. Whatever the tuning, the soup's bytes must be the
same: odd shapes, 0-dim and empty tensors, non-contiguous and shared storages
(from torch pickles), every floating dtype, integer buffers, ``--dtype``
overrides, uneven weights and chunk sizes that cut tensors anywhere.
No timing here: speed is measured by ``benchmarks/run.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_soup.errors import NonFiniteSoupError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import Checkpoint, open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import output_metas, stream_merge
from hub_soup.merging.methods import MergeMethod, normalize_weights
from hub_soup.merging.methods.uniform import Uniform
from hub_soup.merging.methods.weighted import Weighted
from hub_soup.merging.plan import MergePlan, align
from tests.checkpoints import reference_soup
from tests.page_cache import cached_fraction_of, evict_or_skip

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHAPES = ((), (0,), (3, 0, 2), (1,), (7,), (13, 17), (5, 3, 11), (1000,), (33, 65), (2, 3, 5, 7))


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Awkward values: wide magnitudes, exact ties, subnormals, signed zeros and infinities."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    scale = torch.exp2(torch.randint(-20, 12, (numel,), generator=generator).double())
    values = torch.randn(numel, generator=generator, dtype=torch.float64) * scale
    if numel >= 8:
        finfo = torch.finfo(dtype)
        values[0], values[1], values[2] = -0.0, finfo.tiny / 4, finfo.max / 2  # fp16 sum would overflow
        values[3], values[4], values[5] = 1.0, -1.0 / 3.0, 2.0**-24
        if seed % 3 == 0:
            values[6] = math.inf
    return values.to(dtype).reshape(shape)


def _ingredients(count: int, dtypes: tuple[torch.dtype, ...], seed: int) -> list[dict[str, torch.Tensor]]:
    """State dicts with one tensor per (shape, dtype), plus integer and bool buffers."""
    states = []
    for i in range(count):
        state: dict[str, torch.Tensor] = {}
        for s, shape in enumerate(SHAPES):
            for dtype in dtypes:
                name = f"t{s}.{str(dtype).removeprefix('torch.')}"
                state[name] = _values(shape, dtype, seed * 1000 + i * 100 + s)
        state["bn.num_batches_tracked"] = torch.tensor(100 + i)
        state["position_ids"] = torch.arange(11, dtype=torch.int32) + i
        state["mask"] = torch.tensor([True, False, bool(i % 2)])
        states.append(state)
    return states


def _save(states: list[dict[str, torch.Tensor]], folder: Path, fmt: str) -> list[Path]:
    paths = []
    for i, state in enumerate(states):
        if fmt == "safetensors":
            path = folder / f"ing{i}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, path)
        else:
            path = folder / f"ing{i}.pt"
            torch.save(state, path)
        paths.append(path)
    return paths


def _reference(checkpoints: list[Checkpoint], plan: MergePlan, weights: list[float], dtype: torch.dtype | None):
    """The soup by definition: whole tensors through ``reference_soup``."""
    out = {}
    metas = output_metas(plan, dtype)
    for t in plan.tensors:
        if t.average:
            whole = [c.read(k).contiguous() for c, k in zip(checkpoints, t.sources)]
            out[t.key] = reference_soup(whole, weights, dtype)
        else:  # integers, bools and excluded keys: the first ingredient's (floats in --dtype)
            out[t.key] = checkpoints[0].read(t.sources[0]).to(metas[t.key].dtype)
        assert out[t.key].dtype == metas[t.key].dtype
    return out


def _method(weights: list[float] | None) -> MergeMethod:
    return Uniform() if weights is None else Weighted(weights=weights)


def _merge(paths: list[Path], out: Path, weights: list[float] | None, dtype: torch.dtype | None, chunk: int,
           max_shard: int = 10**9, exclude: tuple[str, ...] = (),
           **options: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    checkpoints = [open_checkpoint(p) for p in paths]
    try:
        plan = align(layouts_of(checkpoints), exclude)
        normalized = normalize_weights(weights, len(checkpoints))
        with SoupWriter(out, output_metas(plan, dtype), max_shard) as writer:
            stats = stream_merge(
                checkpoints, plan, _method(weights), writer, dtype=dtype, chunk_elements=chunk, **options
            )
            writer.commit()
        assert stats.bytes_written == sum(m.nbytes for m in output_metas(plan, dtype).values())
        expected = _reference(checkpoints, plan, normalized, dtype)
    finally:
        for c in checkpoints:
            c.close()
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)  # in an order of its own: take the file's
        got.update({key: tensors[key] for key in _stored_order(shard)})
    return got, expected


def _stored_order(shard: Path) -> list[str]:
    """The tensors of a safetensors file in the order their bytes lie in it."""
    with open(shard, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda key: header[key]["data_offsets"])


def _assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)  # every tensor, written in the plan's order
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        if want.dtype.is_floating_point:
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(have), nan), key
            have, want = have[~nan], want[~nan]
        # Compare bytes: torch.equal would call -0.0 == 0.0.
        assert torch.equal(have.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8)), key


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5]], ids=["equal", "uneven"])
@pytest.mark.parametrize("chunk", [1, 5, 64, 999, 1 << 20])
def test_every_dtype_and_shape_any_chunk(tmp_path: Path, chunk: int, weights: list[float] | None) -> None:
    """Equal weights sum first (float32 ingredients near float32's maximum take the weighted form
    element by element: see ``_values``); uneven weights multiply first."""
    states = _ingredients(3, FLOATS, seed=chunk)
    paths = _save(states, tmp_path, "safetensors")
    got, expected = _merge(paths, tmp_path / "soup", weights, None, chunk)
    _assert_bit_identical(got, expected)
    assert torch.equal(got["bn.num_batches_tracked"], states[0]["bn.num_batches_tracked"])
    assert torch.equal(got["position_ids"], states[0]["position_ids"])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("chunk", [7, 4096])
def test_dtype_override(tmp_path: Path, dtype: torch.dtype, chunk: int) -> None:
    states = _ingredients(2, (torch.float16, torch.bfloat16, torch.float32), seed=3)
    if dtype == torch.float16:  # bfloat16's and float32's maximum / 2 are no float16: no soup, rather than inf
        (tmp_path / "wide").mkdir()
        paths = _save(states, tmp_path / "wide", "safetensors")  # the first tensor merged: float32's first
        with pytest.raises(NonFiniteSoupError, match=r"tensor t5.float32 \(221 elements\): 1 element overflows "
                           r"float16 \(largest magnitude 1.701e\+38 before rounding; float16 holds at most 65504\)"):
            _merge(paths, tmp_path / "refused", [1.0, 3.0], dtype, chunk)
        assert not (tmp_path / "refused").exists()
        states = [{key: _within(value, dtype) for key, value in state.items()} for state in states]
    paths = _save(states, tmp_path, "safetensors")
    got, expected = _merge(paths, tmp_path / "soup", [1.0, 3.0], dtype, chunk)
    _assert_bit_identical(got, expected)


def _within(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` with every finite one beyond half of ``dtype``'s maximum brought down to it (infinities kept)."""
    if not values.is_floating_point():
        return values
    limit = torch.finfo(dtype).max / 2
    return values.clamp(-limit, limit).where(values.isfinite(), values)


@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]], ids=["equal", "uneven"])
@pytest.mark.parametrize(
    ("read_ahead", "threads", "write_behind", "block"), [(0, 1, 1, 37), (1, 1, 4, 5), (3, 2, 2, 1), (4, 1, 1, 16)]
)
def test_read_ahead_threads_blocks_and_write_behind_do_not_change_a_bit(
    tmp_path: Path, read_ahead: int, threads: int, write_behind: int, block: int, weights: list[float] | None
) -> None:
    """Synchronous reads, one slot, several slots; one or two torch threads; one or more write slots;
    arithmetic blocks that divide the chunk or not."""
    paths = _save(_ingredients(3, FLOATS, seed=5), tmp_path, "safetensors")
    before = torch.get_num_threads()
    got, expected = _merge(paths, tmp_path / "soup", weights, None, 37, read_ahead=read_ahead,
                           threads=threads, write_behind=write_behind, block_elements=block)
    _assert_bit_identical(got, expected)
    assert torch.get_num_threads() == before  # the merge restores the caller's setting


@pytest.mark.parametrize(("read_ahead", "chunk", "given"), [(0, 999, [0.5, 0.3, 0.2]), (2, 1 << 20, None)])
def test_ingredients_read_around_the_page_cache_do_not_change_a_bit(
    tmp_path: Path, read_ahead: int, chunk: int, given: list[float] | None
) -> None:
    """From a cold disk the chunks are read with O_DIRECT (views a page into the read slots), and leave no pages behind."""
    paths = _save(_ingredients(3, FLOATS, seed=11), tmp_path, "safetensors")
    checkpoints = [open_checkpoint(p) for p in paths]
    try:
        plan = align(layouts_of(checkpoints))
        evict_or_skip(paths)  # after the headers were read (their read-ahead takes in small files whole)
        weights = normalize_weights(given, 3)
        with SoupWriter(tmp_path / "soup", output_metas(plan, None), 10**9) as writer:
            stream_merge(checkpoints, plan, _method(given), writer, chunk_elements=chunk, read_ahead=read_ahead)
            writer.commit()
        for path in paths:
            assert cached_fraction_of(path) < 0.5, path.name
        expected = _reference(checkpoints, plan, weights, None)
    finally:
        for c in checkpoints:
            c.close()
    shard = tmp_path / "soup" / "model.safetensors"
    _assert_bit_identical({key: load_file(shard)[key] for key in _stored_order(shard)}, expected)


def test_excluded_keys_are_copied_and_converted(tmp_path: Path) -> None:
    paths = _save(_ingredients(3, (torch.float16, torch.float32), seed=9), tmp_path, "safetensors")
    got, expected = _merge(paths, tmp_path / "soup", None, torch.bfloat16, 64, exclude=("t5.*", "t8.*"))
    _assert_bit_identical(got, expected)
    first = load_file(paths[0])
    assert torch.equal(got["t5.float32"], first["t5.float32"].to(torch.bfloat16))


def test_a_read_error_in_the_reader_threads_reaches_the_caller(tmp_path: Path) -> None:
    """A file cut short after its header was checked: the error surfaces, no reader thread is left."""
    import threading

    from hub_soup.errors import CheckpointFormatError

    states = [{"w": _values((512, 256), torch.float32, i)} for i in range(3)]
    paths = _save(states, tmp_path, "safetensors")
    checkpoints = [open_checkpoint(p) for p in paths]
    with open(paths[2], "r+b") as f:
        f.truncate(paths[2].stat().st_size - 4096)
    threads_before = threading.active_count()
    try:
        plan = align(layouts_of(checkpoints))
        with (
            pytest.raises(CheckpointFormatError, match="truncated"),
            SoupWriter(tmp_path / "soup", output_metas(plan, None), 10**9) as writer,
        ):
            stream_merge(checkpoints, plan, Uniform(), writer, chunk_elements=1000, read_ahead=4)
    finally:
        for c in checkpoints:
            c.close()
    assert threading.active_count() == threads_before
    assert not (tmp_path / "soup").exists()


def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path: Path) -> None:
    """The disk fills up mid-merge (the writer thread's write fails): the caller gets the error, no thread is left."""
    import threading

    class FullDisk:
        def __init__(self) -> None:
            self.writes = 0

        def begin(self, key: str) -> None:
            pass

        def write(self, chunk: torch.Tensor) -> None:
            self.writes += 1
            if self.writes == 3:
                raise OSError(28, "No space left on device")

    paths = _save([{"w": _values((512, 256), torch.float32, i)} for i in range(3)], tmp_path, "safetensors")
    checkpoints = [open_checkpoint(p) for p in paths]
    threads_before = threading.active_count()
    try:
        plan = align(layouts_of(checkpoints))
        writer = FullDisk()
        with pytest.raises(OSError, match="No space left"):
            stream_merge(checkpoints, plan, Uniform(), writer, chunk_elements=1000)  # type: ignore[arg-type]
    finally:
        for c in checkpoints:
            c.close()
    assert writer.writes == 3  # nothing written after the failure
    assert threading.active_count() == threads_before


def test_similarity_fed_by_the_merge_equals_its_own_pass(tmp_path: Path) -> None:
    """The shared-initialization check the merge feeds from its chunks = the separate pass over the same sample."""
    from hub_soup.merging.similarity import GramAccumulator, weight_similarity

    generator = torch.Generator().manual_seed(0)

    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    base = {f"layer{j}.w": normal((40 + j, 33)).bfloat16() for j in range(5)} | {"bias": normal((33,))}
    states = [{k: (v.float() + 0.1 * i * normal(v.shape)).to(v.dtype) for k, v in base.items()} for i in range(3)]
    states.append({k: normal(v.shape).to(v.dtype) for k, v in base.items()})  # an independent training
    paths = _save(states, tmp_path, "safetensors")
    checkpoints = [open_checkpoint(p) for p in paths]
    try:
        plan = align(layouts_of(checkpoints))
        gram = GramAccumulator(len(checkpoints), sample_per_tensor=500)
        with SoupWriter(tmp_path / "soup", output_metas(plan, None), 10**9) as writer:
            stream_merge(checkpoints, plan, Uniform(), writer, chunk_elements=77, gram=gram)
        streamed = gram.similarity([c.label for c in checkpoints])
        separate = weight_similarity(checkpoints, plan, sample_per_tensor=500)
    finally:
        for c in checkpoints:
            c.close()
    for mine, theirs in zip(streamed.cosine + streamed.relative_distance, separate.cosine + separate.relative_distance):
        assert mine == pytest.approx(theirs, rel=1e-9, abs=1e-12)  # float64 sums in other blocks
    assert streamed.independent_pairs() == separate.independent_pairs() == [(0, 3), (1, 3), (2, 3)]


@pytest.mark.parametrize("count", [1, 2, 8])
def test_ingredient_counts_and_uneven_weights(tmp_path: Path, count: int) -> None:
    paths = _save(_ingredients(count, (torch.bfloat16, torch.float32), seed=count), tmp_path, "safetensors")
    weights = [1.0 / (i + 3) for i in range(count)]  # not exactly representable, do not sum to 1
    got, expected = _merge(paths, tmp_path / "soup", weights, None, 333)
    _assert_bit_identical(got, expected)


def test_chunks_cut_across_shards_and_tensors(tmp_path: Path) -> None:
    """Many small tensors, a tiny shard limit (many output shards) and a chunk smaller than most tensors."""
    states = [{f"layer{j}.w": _values((j + 1, 3), torch.bfloat16, 7 * i + j) for j in range(40)} for i in range(4)]
    paths = _save(states, tmp_path, "safetensors")
    got, expected = _merge(paths, tmp_path / "soup", None, None, 10, max_shard=200)
    assert len(list((tmp_path / "soup").glob("*.safetensors"))) > 1
    _assert_bit_identical(got, expected)


def test_non_contiguous_and_shared_storages(tmp_path: Path) -> None:
    """Torch pickles keep views: transposed, strided, offset views and tied weights of one storage."""
    states = []
    for i in range(3):
        base = _values((24, 40), torch.float32, 50 + i)
        half = _values((16, 9), torch.float16, 60 + i)
        states.append({
            "embed.weight": base,
            "lm_head.weight": base,  # tied: same storage, same view
            "transposed": base.t(),
            "strided": base[::3, 1::4],
            "offset_view": base.view(-1)[37:37 + 101],
            "half.t": half.t(),
            "half.rows": half[2:11],
            "scalar": base[5, 7],
            "empty": base[:, :0],
        })
    paths = _save(states, tmp_path, "pt")
    got, expected = _merge(paths, tmp_path / "soup", [0.5, 0.25, 0.25], None, 13)
    _assert_bit_identical(got, expected)
    for key in ("transposed", "strided", "offset_view"):  # the views' values, not their storages, are averaged
        manual = reference_soup([s[key].contiguous() for s in states], [0.5, 0.25, 0.25])
        assert torch.equal(got[key].view(torch.uint8), manual.contiguous().view(torch.uint8))


def test_sharded_folders_in_and_out(tmp_path: Path) -> None:
    """save_pretrained-style sharded ingredients (index + shards), merged into shards."""
    from huggingface_hub import save_torch_state_dict

    folders = []
    for i, state in enumerate(_ingredients(3, (torch.bfloat16, torch.float16), seed=11)):
        folder = tmp_path / f"ing{i}"
        folder.mkdir()
        save_torch_state_dict(state, folder, max_shard_size=3000)
        folders.append(folder)
    assert (folders[0] / "model.safetensors.index.json").exists()
    got, expected = _merge(folders, tmp_path / "soup", None, None, 100, max_shard=4000)
    _assert_bit_identical(got, expected)


def test_fast_path_matches_plain_loop_on_a_real_model(tmp_path: Path) -> None:
    """A small transformers model: the soup equals averaging its state_dicts by hand."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=301, tie_word_embeddings=True)
    folders = []
    for i in range(3):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp_path / f"ing{i}", max_shard_size="40KB")
        folders.append(tmp_path / f"ing{i}")
    got, expected = _merge(folders, tmp_path / "soup", None, None, 1 << 12)
    _assert_bit_identical(got, expected)
