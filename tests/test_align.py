"""hub_soup.merging.plan: one canonical key set, or a precise refusal before any averaging."""

from __future__ import annotations

import pytest
import torch

from hub_soup.errors import AlignmentError
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.plan import Layout, align
from tests import checkpoints as ck

F16, F32, I64 = torch.float16, torch.float32, torch.int64


def _layout(label: str, spec: dict[str, tuple], aliases=()) -> Layout:
    return Layout(label, {k: TensorMeta(dtype, tuple(shape)) for k, (dtype, shape) in spec.items()}, tuple(aliases))


NET = {
    "stem.conv.weight": (F16, (8, 3, 3, 3)),
    "stem.bn.weight": (F16, (8,)),
    "stem.bn.running_mean": (F16, (8,)),
    "stem.bn.running_var": (F16, (8,)),
    "stem.bn.num_batches_tracked": (I64, ()),
    "head.fc.weight": (F16, (10, 8)),
    "head.fc.bias": (F16, (10,)),
}


def test_same_layout_plans_every_key_in_order() -> None:
    plan = align([_layout("a", NET), _layout("b", NET), _layout("c", NET)])
    assert [t.key for t in plan.tensors] == list(NET)
    assert all(t.sources == (t.key,) * 3 for t in plan.tensors)
    # every floating tensor, BatchNorm buffers included, is averaged; integers are copied
    assert [t.key for t in plan.tensors if t.average] == [k for k in NET if k != "stem.bn.num_batches_tracked"]
    assert plan.copied == ["stem.bn.num_batches_tracked"]
    assert plan.excluded == [] and plan.notes == []


def test_first_ingredient_sets_order_and_other_orders_are_fine() -> None:
    reordered = dict(reversed(list(NET.items())))
    plan = align([_layout("a", NET), _layout("b", reordered)])
    assert [t.key for t in plan.tensors] == list(NET)
    plan = align([_layout("b", reordered), _layout("a", NET)])
    assert [t.key for t in plan.tensors] == list(reordered)


def test_shape_mismatch_in_the_head_names_key_shapes_files_and_exclude() -> None:
    other = dict(NET, **{"head.fc.weight": (F16, (5, 8)), "head.fc.bias": (F16, (5,))})
    with pytest.raises(AlignmentError) as caught:
        align([_layout("ft-cifar10/model.safetensors", NET), _layout("ft-flowers5.pth.tar", other)])
    error = caught.value
    assert "head.fc.weight" in error.message
    assert "float16[10, 8]" in error.message and "float16[5, 8]" in error.message
    assert "ft-cifar10/model.safetensors" in error.message and "ft-flowers5.pth.tar" in error.message
    assert "num_classes" in error.hint and "--exclude 'head.fc.*'" in error.hint
    # following the hint works: the soup keeps the first ingredient's head
    plan = align([_layout("a", NET), _layout("b", other)], exclude=["head.fc.*"])
    assert plan.excluded == ["head.fc.weight", "head.fc.bias"]
    assert {t.key for t in plan.tensors if not t.average} == {"head.fc.weight", "head.fc.bias", "stem.bn.num_batches_tracked"}


def test_shape_mismatch_in_the_body_says_different_architectures() -> None:
    other = dict(NET, **{"stem.conv.weight": (F16, (16, 3, 3, 3))})
    with pytest.raises(AlignmentError) as caught:
        align([_layout("a", NET), _layout("b", other)])
    assert "stem.conv.weight" in caught.value.message and "float16[16, 3, 3, 3]" in caught.value.message
    assert "different architectures" in caught.value.hint and "--exclude" not in caught.value.hint


def test_missing_and_extra_keys() -> None:
    fewer = {k: v for k, v in NET.items() if not k.startswith("stem.bn")}
    with pytest.raises(AlignmentError) as caught:
        align([_layout("big", NET), _layout("small", fewer)])
    assert "4 keys of big are missing in small" in caught.value.message
    assert "'stem.bn.weight'" in caught.value.message
    assert "different architectures" in caught.value.hint and "hub-soup inspect" in caught.value.hint
    with pytest.raises(AlignmentError) as caught:
        align([_layout("small", fewer), _layout("big", NET)])
    assert "4 keys of big are not in small" in caught.value.message


def test_only_head_keys_differing_hints_at_exclude() -> None:
    headless = {k: v for k, v in NET.items() if not k.startswith("head")}
    with pytest.raises(AlignmentError) as caught:
        align([_layout("a", NET), _layout("b", headless)])
    assert "--exclude" in caught.value.hint
    plan = align([_layout("a", NET), _layout("b", headless)], exclude=["head.*"])
    assert [t.key for t in plan.tensors] == list(NET)


def test_float_vs_integer_dtype_is_refused_but_float_widths_mix() -> None:
    ints = dict(NET, **{"stem.bn.running_mean": (I64, (8,))})
    with pytest.raises(AlignmentError, match="dtype mismatch at stem.bn.running_mean: float16\\[8\\] in a vs int64\\[8\\] in b"):
        align([_layout("a", NET), _layout("b", ints)])
    fp32 = {k: ((F32 if d == F16 else d), s) for k, (d, s) in NET.items()}
    plan = align([_layout("a", NET), _layout("b", fp32)])
    assert all(t.meta.dtype in (F16, I64) for t in plan.tensors)  # the first ingredient's dtypes


@pytest.mark.parametrize("prefixed_first", [False, True])
def test_whole_model_prefix_is_mapped(prefixed_first: bool) -> None:
    """A Lightning checkpoint names every key ``model.``; a soup still aligns, in the first's names."""
    prefixed = {"model." + k: v for k, v in NET.items()}
    layouts = [_layout("plain", NET), _layout("lightning", prefixed)]
    if prefixed_first:
        layouts.reverse()
    plan = align(layouts)
    first = prefixed if prefixed_first else NET
    assert [t.key for t in plan.tensors] == list(first)
    for t in plan.tensors:
        plain = t.key.removeprefix("model.")
        assert t.sources == ((t.key, plain) if prefixed_first else (t.key, "model." + t.key))
    assert any("'model.'" in note for note in plan.notes)


TIED = {
    "model.embed_tokens.weight": (F16, (64, 16)),
    "model.norm.weight": (F16, (16,)),
}
TIED_BOTH = dict(TIED, **{"lm_head.weight": (F16, (64, 16))})


def test_tied_weights_saved_once_or_twice_align_both_ways() -> None:
    once = _layout("safetensors (lm_head dropped)", TIED)
    twice = _layout("pytorch_model.bin", TIED_BOTH, aliases=[("model.embed_tokens.weight", "lm_head.weight")])
    plan = align([once, twice])  # first's convention: no lm_head in the soup
    assert [t.key for t in plan.tensors] == list(TIED)
    assert plan.tensors[0].sources == ("model.embed_tokens.weight", "model.embed_tokens.weight")
    plan = align([twice, once])  # first's convention: both keys, lm_head read from the embedding
    assert [t.key for t in plan.tensors] == list(TIED_BOTH)
    assert plan.tensors[-1].sources == ("lm_head.weight", "model.embed_tokens.weight")
    assert any("tied" in note for note in plan.notes)


def test_untied_lm_head_is_not_mistaken_for_a_tie() -> None:
    """Without a saved tie (an untied model has both keys), a missing lm_head is a real mismatch."""
    with pytest.raises(AlignmentError, match="lm_head.weight"):
        align([_layout("untied", TIED_BOTH), _layout("other", TIED)])


# ---------------------------------------------------------------- real models


def _timm_layout(label: str, **kwargs) -> Layout:
    model = ck.timm_model(**kwargs)
    return Layout(label, {k: TensorMeta(v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()})


def test_resnet_vs_regnet_is_refused_as_different_architectures() -> None:
    with pytest.raises(AlignmentError) as caught:
        align([_timm_layout("resnet", arch="test_resnet"), _timm_layout("regnet")])
    assert "resnet" in caught.value.message and "regnet" in caught.value.message
    assert "different architectures" in caught.value.hint


def test_regnet_with_other_num_classes() -> None:
    ten, five = _timm_layout("regnet-10"), _timm_layout("regnet-5", num_classes=5)
    with pytest.raises(AlignmentError) as caught:
        align([ten, five])
    assert "head.fc.weight" in caught.value.message
    assert "float16[10, 56]" in caught.value.message and "float16[5, 56]" in caught.value.message
    assert "--exclude 'head.fc.*'" in caught.value.hint
    plan = align([ten, five], exclude=["head.fc.*"])
    assert plan.excluded == ["head.fc.weight", "head.fc.bias"]
    # every BatchNorm buffer is averaged, every num_batches_tracked copied
    assert {t.key for t in plan.tensors if t.key.endswith("running_var") and t.average} == {
        k for k in ten.metas if k.endswith("running_var")
    }
    assert all(not t.average and t.meta.dtype == I64 for t in plan.tensors if t.key.endswith("num_batches_tracked"))


# ---------------------------------------------------------------- the base model's role


def test_the_base_has_its_own_role_and_is_named_as_the_base() -> None:
    prefixed = {f"model.{k}": v for k, v in NET.items()}
    plan = align([_layout("a", NET), _layout("b", NET)], base=_layout("pretrained", prefixed))
    assert plan.base == "pretrained"
    assert all(t.sources == (t.key, t.key) for t in plan.tensors)  # the base is not an ingredient
    for t in plan.tensors:  # read through its own key mapping, for averaged tensors only
        assert t.base_source == (f"model.{t.key}" if t.average else None)
    assert "the base pretrained: read keys with prefix 'model.' as ''" in plan.notes
    assert align([_layout("a", NET), _layout("b", NET)]).base is None  # positional use: no base
    assert all(t.base_source is None for t in align([_layout("a", NET), _layout("b", NET)], ()).tensors)


def test_a_base_that_does_not_fit_is_refused_naming_the_base() -> None:
    smaller = {**NET, "stem.conv.weight": (F16, (4, 3, 3, 3))}
    with pytest.raises(AlignmentError, match=r"shape mismatch at stem.conv.weight: .* in the base pretrained"):
        align([_layout("a", NET), _layout("b", NET)], base=_layout("pretrained", smaller))
    headless = {k: v for k, v in NET.items() if not k.startswith("head.")}
    with pytest.raises(AlignmentError, match="keys of a are missing in the base pretrained"):
        align([_layout("a", NET), _layout("b", NET)], base=_layout("pretrained", headless))
    plan = align([_layout("a", NET), _layout("b", NET)], ["head.*"], base=_layout("pretrained", headless))
    assert [t.base_source for t in plan.tensors if t.key.startswith("head.")] == [None, None]  # excluded: not read
