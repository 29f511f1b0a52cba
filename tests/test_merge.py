"""The merge: exact arithmetic, every format in one soup, loadable results.

Two references are used throughout: :func:`tests.checkpoints.reference_soup` (the
definition on whole tensors, written out in the tests; the streamed soup must equal
it *bit for bit*), and a float64 average computed here independently (the soup must
be within one ulp of its own dtype of it). The arithmetic tests run the methods'
kernels through the engine itself (:func:`_engine_soup`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import hub_soup
from hub_soup.errors import CheckpointFormatError, NonFiniteSoupError, RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.write import SoupWriter
from hub_soup.merging.engine import accumulation_dtype, merged_state_dict, output_metas, stream_merge
from hub_soup.merging.methods import MergeMethod, normalize_weights
from hub_soup.merging.methods.uniform import Uniform
from hub_soup.merging.methods.weighted import Weighted
from hub_soup.merging.plan import align
from tests import checkpoints as ck

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _simple_soup(ingredients: list[dict[str, torch.Tensor]], weights=None, dtype=None) -> dict[str, torch.Tensor]:
    """What the soup must hold, by the definition: floats averaged, the rest from the first."""
    normalised = normalize_weights(weights, len(ingredients))
    out = {}
    for key, first in ingredients[0].items():
        if first.is_floating_point():
            out[key] = ck.reference_soup([sd[key] for sd in ingredients], normalised, dtype)
        else:
            out[key] = first
    return out


def _method(weights: list[float] | None) -> MergeMethod:
    return Uniform() if weights is None else Weighted(weights=weights)


def _engine_soup(
    folder: Path, tensors: list[torch.Tensor], weights: list[float] | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The soup of one tensor per ingredient made by the engine (``uniform``, or ``weighted`` by ``weights``)."""
    folder.mkdir(exist_ok=True)
    paths = [ck.save_safetensors({"t": t}, folder / f"{i}.safetensors") for i, t in enumerate(tensors)]
    checkpoints = [open_checkpoint(p) for p in paths]
    try:
        return merged_state_dict(checkpoints, align(layouts_of(checkpoints)), _method(weights), dtype)["t"]
    finally:
        for c in checkpoints:
            c.close()


def _assert_soup(soup: dict, ingredients: list[dict], weights=None, dtype=None) -> None:
    """Bit-exact vs the simple path, within one ulp of the float64 average, integers from the first."""
    expected = _simple_soup(ingredients, weights, dtype)
    assert set(soup) == set(expected)
    raw_weights = weights or [1.0] * len(ingredients)
    for key, tensor in expected.items():
        ck.assert_bit_equal(soup[key], tensor, key)
        if ingredients[0][key].is_floating_point():
            terms = [sd[key] for sd in ingredients]
            ck.assert_is_average(soup[key], terms, raw_weights, tensor.dtype, key)
            if tensor.dtype == torch.float16:  # and within one fp16 ulp of a float32-accumulated average
                total = math.fsum(raw_weights)
                reference32 = sum(t.float() * (w / total) for t, w in zip(terms, raw_weights))
                ck.assert_within_ulp(soup[key], reference32, torch.float16, key)


# ---------------------------------------------------------------- weights and the arithmetic


def test_normalize_weights() -> None:
    assert normalize_weights(None, 4) == [0.25] * 4
    assert normalize_weights([1, 3], 2) == [0.25, 0.75]
    assert normalize_weights([0, 2], 2) == [0.0, 1.0]
    assert math.fsum(normalize_weights([0.1] * 10, 10)) == 1.0
    for bad in ([1, -1], [0, 0], [1, float("nan")], [1, float("inf")]):
        with pytest.raises(RecipeError, match="finite, non-negative"):
            normalize_weights(bad, 2)
    with pytest.raises(RecipeError, match="got 3 weights for 2 ingredients"):
        normalize_weights([1, 2, 3], 2)


def test_fp16_near_65504_does_not_overflow(tmp_path: Path) -> None:
    a = torch.tensor([65504, 65504, -65504, 65504, 60000, 1e-7], dtype=torch.float16)
    b = torch.tensor([65504, 65000, -65504, 1, 65504, 3e-7], dtype=torch.float16)
    assert torch.isinf(a + b).any()  # the naive fp16 sum overflows
    out = _engine_soup(tmp_path / "ab", [a, b])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert out[0].item() == 65504 and out[2].item() == -65504
    ck.assert_within_ulp(out, ck.fp64_reference([a, b], [1, 1]), torch.float16)
    # three thirds of 65504: in fp16 each third rounds up to 21840 and their sum, 65520, to inf
    c = torch.full((4,), 65504, dtype=torch.float16)
    third = (c * (1 / 3)).to(torch.float16)
    assert torch.isinf(third + third + third).all()
    out = _engine_soup(tmp_path / "ccc", [c, c, c])
    assert out.dtype == torch.float16 and (out == 65504).all()


def test_bf16_stays_bf16_within_one_ulp(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(1000, generator=g) * 10 ** torch.randint(-3, 4, (1000,), generator=g)).bfloat16()
               for _ in range(3)]
    out = _engine_soup(tmp_path, tensors, [0.2, 0.3, 0.5])
    assert out.dtype == torch.bfloat16
    ck.assert_is_average(out, tensors, [0.2, 0.3, 0.5], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_as_0dim_tensors_multiply_like_python_floats(dtype: torch.dtype) -> None:
    """Kernels multiply by 0-dim tensors (faster); the definition by Python floats: same bits."""
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(4099, generator=generator, dtype=torch.float64) * torch.exp2(
        torch.randint(-60, 60, (4099,), generator=generator).double())
    values = values.to(dtype)
    weights = [1 / 3, 1 / 7, 0.1, 2 / 3, 1e-8, 0.999999]
    for weight, scalar in zip(weights, Uniform().scalars(weights, values)):
        assert scalar.dtype == dtype and scalar.dim() == 0
        assert torch.equal(values.clone().mul_(weight).view(torch.uint8), values.clone().mul_(scalar).view(torch.uint8))


def test_equal_weights_sum_first_then_multiply_once(tmp_path: Path) -> None:
    """The default soup: ``(a + b + c) * w`` in float32, left to right, one multiplication;
    ``weighted`` with equal weights is the same soup, other weights multiply first."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5000, generator=g).bfloat16() for _ in range(3)]
    weights = normalize_weights(None, 3)
    a, b, c = (t.float() for t in tensors)
    expected = (((a + b) + c) * weights[0]).bfloat16()
    ck.assert_bit_equal(_engine_soup(tmp_path / "uniform", tensors), expected)
    ck.assert_bit_equal(_engine_soup(tmp_path / "equal", tensors, [2.0, 2.0, 2.0]), expected)
    multiplied_first = (a * weights[0] + b * weights[0] + c * weights[0]).bfloat16()
    assert not torch.equal(expected, multiplied_first)  # the two forms differ: the test tells them apart
    uneven = [0.2, 0.3, 0.5]
    ck.assert_bit_equal(_engine_soup(tmp_path / "uneven", tensors, uneven), (a * 0.2 + b * 0.3 + c * 0.5).bfloat16())


def test_equal_weights_near_float32_max_take_the_weighted_form_element_by_element(tmp_path: Path) -> None:
    """A sum that overflows float32 (masks filled with ``finfo.min``, huge values) falls back to
    ``w * a + w * b`` for those elements only; infinities and NaNs in the inputs still show."""
    big = torch.finfo(torch.float32).max
    a = torch.tensor([big, -big, big, 1.0, 3.0, math.inf, math.nan])
    b = torch.tensor([big, -big, big / 2, 2.0, -big, 1.0, 1.0])
    out = _engine_soup(tmp_path / "ab", [a, b])
    assert out[0].item() == big and out[1].item() == -big
    assert out[2].item() == ((a[2] * 0.5) + (b[2] * 0.5)).item() and math.isfinite(out[2].item())
    assert out[3].item() == 1.5 and out[4].item() == ((a[4] + b[4]) * 0.5).item()
    assert out[5].item() == math.inf and math.isnan(out[6].item())
    # bf16 shares float32's range: a bf16 mask of finfo(bf16).min averages to itself
    mask = torch.full((3,), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16)
    assert torch.equal(_engine_soup(tmp_path / "mask", [mask, mask, mask]), mask)


def test_accumulation_dtypes(tmp_path: Path) -> None:
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64
    # float64 keeps a difference float32 accumulation would lose
    a = torch.tensor([1 + 2**-40], dtype=torch.float64)
    b = torch.tensor([1 + 3 * 2**-40], dtype=torch.float64)
    assert _engine_soup(tmp_path / "f64", [a, b]).item() == 1 + 2**-39
    # --dtype float64 on float32 ingredients accumulates in float64
    one, tiny = torch.tensor([1.0]), torch.tensor([2.0**-30])
    assert _engine_soup(tmp_path / "to64", [one, tiny], dtype=torch.float64).item() == 0.5 + 2**-31
    assert _engine_soup(tmp_path / "f32", [one, tiny]).item() == 0.5  # float32 cannot hold it


# ---------------------------------------------------------------- streaming == simple, bit for bit


def _awkward_ingredients(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """Odd shapes, specials, mixed dtypes across ingredients, views and shared storage."""
    g = torch.Generator().manual_seed(42)
    out = []
    for i in range(n):
        base = torch.randn(200, generator=g)
        tied = torch.randn(6, 5, generator=g)
        specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, 3.4e38, -3.4e38, float("nan")])
        out.append({
            "odd": torch.randn(7, 13, 3, generator=g),
            "prime": torch.randn(1031, generator=g).half(),
            "scalar": torch.tensor(float(i) + 0.1),
            "empty": torch.empty(0, 7),
            "one": torch.randn(1, generator=g).bfloat16(),
            "f64": torch.randn(3, 3, generator=g, dtype=torch.float64),
            "mixed": torch.randn(9, generator=g).to(torch.float16 if i == 0 else torch.float32),
            "specials": specials if i == 0 else torch.randn(8, generator=g),
            "transposed": base[:120].view(10, 12).t(),  # non-contiguous
            "slice": base[130:197],  # storage offset, odd length
            "emb": tied,
            "head": tied,  # shares storage with emb
            "steps": torch.tensor(1000 + i),
            "mask": torch.tensor([True, False, i % 2 == 0]),
        })
    return out


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory):
    ingredients = _awkward_ingredients()
    folder = tmp_path_factory.mktemp("awkward")
    paths = []
    for i, sd in enumerate(ingredients):
        if i == 1:  # safetensors cannot hold views of one storage: store them as separate tensors
            path = ck.save_safetensors({k: v.contiguous().clone() for k, v in sd.items()}, folder / f"{i}.safetensors")
        else:
            path = folder / f"{i}.pt"
            torch.save(sd, path, _use_new_zipfile_serialization=i != 2)  # ingredient 2: legacy format
        paths.append(path)
    return ingredients, paths


def _stream(paths, out: Path, weights, dtype=None, chunk_elements=7) -> dict[str, torch.Tensor]:
    checkpoints = [open_checkpoint(p) for p in paths]
    try:
        plan = align(layouts_of(checkpoints))
        with SoupWriter(out, output_metas(plan, dtype), 10**9, overwrite=True) as writer:
            stream_merge(checkpoints, plan, _method(weights), writer, dtype=dtype, chunk_elements=chunk_elements)
            writer.commit()
    finally:
        for c in checkpoints:
            c.close()
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("chunk_elements", [1, 7, 64, 1 << 20])
def test_stream_merge_equals_simple_path_bit_for_bit(tmp_path: Path, awkward, chunk_elements: int) -> None:
    ingredients, paths = awkward
    soup = _stream(paths, tmp_path / "soup", [1, 2, 4], chunk_elements=chunk_elements)
    expected = _simple_soup(ingredients, [1, 2, 4])
    assert set(soup) == set(expected)
    for key in expected:
        ck.assert_bit_equal(soup[key], expected[key].contiguous(), key)
    assert soup["steps"].item() == 1000 and soup["mask"].tolist() == [True, False, True]
    assert torch.isinf(soup["specials"][2]) and torch.isnan(soup["specials"][7])
    assert soup["specials"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stream_merge_with_dtype_override(tmp_path: Path, awkward, dtype: torch.dtype) -> None:
    ingredients, paths = awkward
    if dtype == torch.float16:  # the mean of 3.4e38 and two small values is no float16: no soup, rather than inf
        with pytest.raises(NonFiniteSoupError, match=r"tensor specials \(8 elements\): 2 elements overflow float16 "
                           r"\(largest magnitude 1.133e\+38 before rounding; float16 holds at most 65504\)"):
            _stream(paths, tmp_path / "refused", None, dtype=dtype)
        assert not (tmp_path / "refused").exists()
        ingredients = [{k: v for k, v in sd.items() if k != "specials"} for sd in ingredients]
        paths = [tmp_path / f"{i}.pt" for i in range(len(ingredients))]
        for sd, path in zip(ingredients, paths):
            torch.save(sd, path)
    soup = _stream(paths, tmp_path / "soup", None, dtype=dtype)
    expected = _simple_soup(ingredients, None, dtype)
    for key in expected:
        ck.assert_bit_equal(soup[key], expected[key].contiguous(), key)
    assert soup["steps"].dtype == torch.int64 and soup["mask"].dtype == torch.bool  # never converted
    assert all(soup[k].dtype == dtype for k in ingredients[0] if ingredients[0][k].is_floating_point())


_SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None, database=None)
@given(
    shape=_SHAPES,
    count=st.integers(2, 4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    weights=st.lists(st.floats(0.01, 100), min_size=4, max_size=4),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_stream_equals_simple_property(tmp_path_factory, shape, count, dtype, weights, chunk, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    sds = [{"t": (torch.randn(shape, generator=g, dtype=torch.float64) * 1000).to(dtype)} for _ in range(count)]
    folder = tmp_path_factory.mktemp("prop")
    paths = [ck.save_safetensors(sd, folder / f"{i}.safetensors") for i, sd in enumerate(sds)]
    normalised = normalize_weights(weights[:count], count)
    soup = _stream(paths, folder / "soup", weights[:count], chunk_elements=chunk)
    ck.assert_bit_equal(soup["t"], ck.reference_soup([sd["t"] for sd in sds], normalised))


# ---------------------------------------------------------------- a RegNet soup from six formats


@pytest.fixture(scope="module")
def regnet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six fp16 RegNet fine-tunes of one init, each saved by a different tool."""
    root = tmp_path_factory.mktemp("regnet")
    models = [ck.timm_model(seed=i + 1, batches=100 * (i + 1)) for i in range(6)]
    raw = [ck.state_dict_of(m) for m in models]
    ema3 = ck.state_dict_of(ck.perturb_(ck.timm_model(seed=4, batches=400), seed=77, scale=0.01))
    paths = [
        ck.save_timm_folder(models[0], root / "timm-folder"),  # first: config.json travels to the soup
        ck.save_sharded_safetensors(raw[1], root / "hf-sharded", "20KB"),
        ck.save_pytorch_bin(raw[2], root / "bin-folder"),
        ck.save_timm_train(root / "train" / "model_best.pth.tar", raw[3], ema3),
        ck.save_compiled(raw[4], root / "compiled.pt"),
        ck.save_lightning(raw[5], root / "lightning" / "epoch=9-step=90.ckpt"),
    ]
    return {"raw": raw, "ema3": ema3, "paths": paths, "root": root}


def test_six_formats_average_exactly_and_load_strictly_in_timm(tmp_path: Path, regnet: dict) -> None:
    out = tmp_path / "soup"
    result = hub_soup.merge([str(p) for p in regnet["paths"]], out)
    ingredients = regnet["raw"][:3] + [regnet["ema3"]] + regnet["raw"][4:]  # EMA of the timm checkpoint
    soup = ck.load_soup(out)
    _assert_soup(soup, ingredients)
    assert result.weights == pytest.approx([1 / 6] * 6)
    assert result.stats.averaged == sum(t.is_floating_point() for t in ingredients[0].values())
    assert result.similarity is not None and result.warnings == []

    # BatchNorm running statistics are averaged too, num_batches_tracked is the first's int64
    first = ingredients[0]
    stats = [k for k in first if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 40  # 20 BatchNorms
    assert all(not torch.equal(soup[k], first[k]) for k in stats)
    counters = [k for k in first if k.endswith("num_batches_tracked")]
    assert counters and all(soup[k].dtype == torch.int64 and soup[k].item() == 100 for k in counters)

    # the soup folder: weights, the first's config, a card and the recipe
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "hub-soup.yaml", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == json.loads((regnet["paths"][0] / "config.json").read_text())
    assert "model-soup" in (out / "README.md").read_text()
    recipe = hub_soup.load_recipe(out / "hub-soup.yaml")
    assert [i.ref for i in recipe.ingredients] == [str(p) for p in regnet["paths"]]

    # loads strictly in timm, from the file and from the folder with its config.json
    model = timm.create_model(
        ck.ARCH, pretrained=True, num_classes=ck.NUM_CLASSES, **ck.REGNET_ARGS,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": ck.NUM_CLASSES},
    )
    loaded = model.state_dict()
    for key, tensor in soup.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key
    folder_model = timm.create_model(f"local-dir:{out}", pretrained=True).half().eval()
    folder_model.load_state_dict(soup, strict=True)
    with torch.no_grad():
        logits = folder_model.float()(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, ck.NUM_CLASSES) and torch.isfinite(logits).all()


def test_weighted_soup_without_ema_and_with_dtype(tmp_path: Path, regnet: dict) -> None:
    paths = [str(p) for p in (regnet["paths"][0], regnet["paths"][3], regnet["paths"][5])]
    raw = regnet["raw"]
    # ema=False: the raw weights of the training checkpoint
    hub_soup.merge(paths, tmp_path / "raw", weights=[1, 2, 5], ema=False)
    _assert_soup(ck.load_soup(tmp_path / "raw"), [raw[0], raw[3], raw[5]], weights=[1, 2, 5])
    # dtype=float32: every floating tensor float32 (accumulated the same way), integers untouched
    hub_soup.merge(paths, tmp_path / "fp32", dtype="float32")
    soup = ck.load_soup(tmp_path / "fp32")
    _assert_soup(soup, [raw[0], regnet["ema3"], raw[5]], dtype=torch.float32)
    assert {t.dtype for t in soup.values()} == {torch.float32, torch.int64}
    # a Lightning checkpoint first: its model. prefix becomes the soup's convention
    hub_soup.merge([paths[2], paths[0]], tmp_path / "lightning-first")
    assert all(k.startswith("model.") for k in load_file(tmp_path / "lightning-first" / "model.safetensors"))


def test_pickled_module_refused_then_allowed(tmp_path: Path, regnet: dict) -> None:
    model = ck.timm_model(seed=9, batches=5)
    pickled = ck.save_whole_module(model, tmp_path / "whole" / "model.pth")
    first = str(regnet["paths"][0])
    with pytest.raises(hub_soup.HubSoupError, match="--allow-pickle"):
        hub_soup.merge([first, str(pickled)], tmp_path / "soup")
    ck.assert_no_output(tmp_path / "soup")
    hub_soup.merge([first, str(pickled)], tmp_path / "soup", allow_pickle=True)
    _assert_soup(ck.load_soup(tmp_path / "soup"), [regnet["raw"][0], ck.state_dict_of(model)])


def test_independent_trainings_are_flagged(tmp_path: Path) -> None:
    a = ck.save_safetensors(ck.state_dict_of(ck.timm_model(arch="test_resnet", init_seed=1)), tmp_path / "a.safetensors")
    b = ck.save_safetensors(ck.state_dict_of(ck.timm_model(arch="test_resnet", init_seed=2)), tmp_path / "b.safetensors")
    result = hub_soup.merge([str(a), str(b)], tmp_path / "soup")
    assert result.similarity.cosine[0][1] < 0.5
    assert result.warnings and "independent" in result.warnings[0]


def test_unwritable_dtype_aborts_without_leftovers(tmp_path: Path) -> None:
    """A failure while writing removes the temporary folder; nothing appears at the output."""
    for i in range(2):
        torch.save({"w": torch.randn(4), "z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / f"{i}.pt")
    with pytest.raises(CheckpointFormatError, match="complex64"):
        hub_soup.merge([str(tmp_path / "0.pt"), str(tmp_path / "1.pt")], tmp_path / "new" / "dir" / "soup")
    ck.assert_no_output(tmp_path / "new" / "dir" / "soup")
    assert not (tmp_path / "new").exists()  # the folders made for the output went too


# ---------------------------------------------------------------- transformers: sharded bf16, tied weights


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("llama")
    models = [ck.llama_model(seed=i + 1) for i in range(3)]
    paths = []
    for i, model in enumerate(models):
        model.save_pretrained(root / f"llama{i}", max_shard_size="200KB")
        assert (root / f"llama{i}" / "model.safetensors.index.json").is_file()
        paths.append(root / f"llama{i}")
    ck.save_tokenizer(paths[0])
    return {"paths": paths, "sds": [ck.state_dict_of(m) for m in models]}


def test_sharded_bf16_llamas_round_trip_through_from_pretrained(tmp_path: Path, llamas: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "soup"
    hub_soup.merge([str(p) for p in llamas["paths"]], out, max_shard_size="60KB")
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "hub-soup.yaml", "model.safetensors.index.json"} <= set(names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 60_000 or len(tensors) == 1
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total

    soup = ck.load_soup(out)
    sds = [{k: v for k, v in sd.items() if k != "lm_head.weight" or "lm_head.weight" in soup} for sd in llamas["sds"]]
    _assert_soup(soup, sds)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, soup[key]), key
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("soup is good")["input_ids"] == [2, 3, 4]


def test_dtype_override_updates_the_transformers_config(tmp_path: Path, llamas: dict) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup32"
    hub_soup.merge([str(p) for p in llamas["paths"][:2]], out, dtype="float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    _assert_soup(ck.load_soup(out), llamas["sds"][:2], dtype=torch.float32)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tied model saved by save_pretrained (lm_head dropped), another as pytorch_model.bin (both keys)."""
    root = tmp_path_factory.mktemp("tied")
    a, b = ck.llama_model(seed=1, tie=True), ck.llama_model(seed=2, tie=True)
    a.save_pretrained(root / "safetensors")
    assert "lm_head.weight" not in load_file(root / "safetensors" / "model.safetensors")
    sd_b = b.state_dict()
    assert sd_b["lm_head.weight"].data_ptr() == sd_b["model.embed_tokens.weight"].data_ptr()
    ck.save_pytorch_bin(sd_b, root / "bin")
    b.config.save_pretrained(root / "bin")
    with open_checkpoint(root / "bin") as checkpoint:
        assert checkpoint.aliases == [("model.embed_tokens.weight", "lm_head.weight")]
    return {"paths": [root / "safetensors", root / "bin"], "sds": [ck.state_dict_of(a), ck.state_dict_of(b)]}


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["safetensors-first", "bin-first"])
def test_tied_weights_align_and_keep_the_first_convention(tmp_path: Path, tied: dict, order) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    hub_soup.merge([str(tied["paths"][i]) for i in order], out)
    soup = ck.load_soup(out)
    has_head = order[0] == 1  # the .bin keeps both keys, save_pretrained only the embedding
    assert ("lm_head.weight" in soup) == has_head
    embed = "model.embed_tokens.weight"
    sds = [tied["sds"][i] for i in order]
    expected = ck.reference_soup([sd[embed] for sd in sds], [0.5, 0.5])
    ck.assert_bit_equal(soup[embed], expected, embed)
    if has_head:
        ck.assert_bit_equal(soup["lm_head.weight"], expected, "lm_head.weight")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, expected)
