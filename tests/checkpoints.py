"""Real checkpoints in every format people have, built offline, for the soup engine's tests.

Ingredients of one soup share an initialization (``init_seed``) and differ by a
small seeded perturbation of every floating tensor, buffers included, like
fine-tunes of one pretrained model. Each writer saves a *clean* state_dict the
way one tool does (safetensors, ``save_pretrained`` shards, ``pytorch_model.bin``,
timm's train script, ``torch.compile``, Lightning), so every test can state the
tensors it expects under clean keys.

Results are checked with the official ``safetensors`` library, never with
hub-soup's own reader, so a reader bug cannot hide a writer bug.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

ARCH = "regnetx_002"  # a real RegNet: grouped convs, BatchNorm everywhere
# ... shrunk through timm's cfg overlay (recorded in config.json's model_args by save_for_hf):
# 28k parameters in 122 tensors instead of 2.7M, so six ingredients build in well under a second.
REGNET_ARGS = {"depth": 5, "w0": 16, "wa": 8, "wm": 1.5, "group_size": 8, "stem_width": 16}
NUM_CLASSES = 10

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------- models


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Shift every floating tensor (parameters and BatchNorm buffers) a little, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                noise = scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.copy_((tensor.float() + noise).to(tensor.dtype))
    return model


def timm_model(
    seed: int | None = None,
    *,
    arch: str = ARCH,
    init_seed: int = 0,
    num_classes: int = NUM_CLASSES,
    dtype: torch.dtype = torch.float16,
    batches: int | None = None,
) -> torch.nn.Module:
    """A timm model from a seeded init, perturbed by ``seed``, cast to ``dtype``.

    ``batches`` sets every BatchNorm's ``num_batches_tracked`` (int64), so tests
    can tell which ingredient an integer buffer came from.
    """
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        extra = REGNET_ARGS if arch == ARCH else {}
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **extra)
    if seed is not None:
        perturb_(model, seed)
    model = model.to(dtype).eval()
    if batches is not None:
        for name, buffer in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buffer.fill_(batches)
    return model


def state_dict_of(model: torch.nn.Module) -> StateDict:
    """A detached copy of the model's state_dict (no storage shared with the model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- writers (one per tool)


def save_safetensors(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """One ``.safetensors`` file, as ``safetensors.torch.save_file`` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sd), str(path), metadata={"format": "pt"})
    return path


def save_timm_folder(model: torch.nn.Module, folder: Path) -> Path:
    """A timm Hub folder: ``config.json`` + ``model.safetensors`` (``timm.models.save_for_hf``)."""
    from timm.models import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def save_sharded_safetensors(sd: Mapping[str, torch.Tensor], folder: Path, max_shard_size: str = "20KB") -> Path:
    """HF sharded safetensors: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(dict(sd), folder, max_shard_size=max_shard_size)
    assert (folder / "model.safetensors.index.json").is_file(), "expected several shards; lower max_shard_size"
    return folder


def save_pytorch_bin(sd: Mapping[str, torch.Tensor], folder: Path) -> Path:
    """A ``pytorch_model.bin`` (torch zip pickle of the state_dict) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(sd), folder / "pytorch_model.bin")
    return folder


def save_pytorch_sharded(sd: Mapping[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    """Old transformers' sharded pickles: ``pytorch_model-0000i-of-0000n.bin`` + index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def save_timm_train(
    path: Path, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor], *, ddp: bool = True
) -> Path:
    """A ``.pth.tar`` as timm's train.py ``CheckpointSaver`` writes it (argparse args included).

    ``ddp`` adds the ``module.`` prefix of a DistributedDataParallel-wrapped model.
    """
    prefix = "module." if ddp else ""
    save_state = {
        "epoch": 7,
        "arch": ARCH,
        "state_dict": {prefix + k: v for k, v in raw.items()},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "version": 2,
        "args": argparse.Namespace(model=ARCH, lr=0.1, epochs=10, model_ema=True, aa=None, mean=(0.5, 0.5)),
        "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        "state_dict_ema": {prefix + k: v for k, v in ema.items()},
        "metric": 71.25,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(save_state, path)
    return path


def save_compiled(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """The state_dict of a ``torch.compile``d model: every key behind ``_orig_mod.``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, path)
    return path


def save_lightning(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """A Lightning ``.ckpt``: the LightningModule holds the net as ``self.model``."""
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.9)}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": []}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.01, "arch": ARCH},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def save_legacy_pickle(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """torch < 1.6's non-zip format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(sd), path, _use_new_zipfile_serialization=False)
    return path


def save_whole_module(model: torch.nn.Module, path: Path) -> Path:
    """``torch.save(model)``: a pickle that needs the model's code to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file short: keep a fraction of it (float) or a number of bytes (int)."""
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:size])
    return path


# ---------------------------------------------------------------- transformers


def llama_config(*, tie: bool = False, vocab_size: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )


def llama_model(seed: int | None = None, *, tie: bool = False, init_seed: int = 0, dtype=torch.bfloat16):
    """A tiny LlamaForCausalLM (~100k parameters) from a seeded init, perturbed by ``seed``.

    Its weights are initialised with std 0.02, so fine-tunes move them by a tenth of that.
    """
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(llama_config(tie=tie))
    if seed is not None:
        perturb_(model, seed, scale=0.002)
    return model.to(dtype).eval()


def save_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "soup", "is", "good"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- reading results independently


def load_soup(folder: Path) -> StateDict:
    """Every tensor of a soup folder, read with the official safetensors library."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(folder / shard))
    return out


def fp64_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The exact weighted average, computed in float64 independently of hub-soup."""
    total = math.fsum(weights)
    return sum(t.double() * (w / total) for t, w in zip(tensors, weights))


def reference_soup(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The soup of whole tensors by the definition, written out here independently of the engine.

    Accumulated in float32 (float64 when the first tensor or ``dtype`` is float64) and stored
    in ``dtype`` (default: the first tensor's). Equal weights: ``(t0 + t1 + ...) * w``, where that
    sum stays finite, ``w * t0 + w * t1 + ...`` where it does not; other weights:
    ``w0 * t0 + w1 * t1 + ...``. Every op is one elementwise, once-rounded torch op.
    """
    out = dtype or tensors[0].dtype
    acc = torch.float64 if torch.float64 in (tensors[0].dtype, out) else torch.float32
    terms = [t.to(acc) for t in tensors]
    multiplied = terms[0] * weights[0]
    for term, weight in zip(terms[1:], weights[1:]):
        multiplied = multiplied + term * weight
    if any(w != weights[0] for w in weights):
        return multiplied.to(out)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return torch.where(torch.isfinite(total), total * weights[0], multiplied).to(out)


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``reference`` (float64)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]
    _, exponent = torch.frexp(reference.double())
    spacing = torch.pow(2.0, (exponent - 1 - mantissa_bits).double())
    smallest = info.smallest_normal * 2.0**-mantissa_bits  # the subnormal spacing
    spacing = torch.clamp(spacing, min=smallest)
    return torch.where(reference == 0, torch.full_like(spacing, smallest), spacing)


def assert_within_ulp(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, key: str = "") -> None:
    """``actual`` is ``reference`` correctly rounded to ``dtype``, give or take one ulp."""
    assert actual.dtype == dtype, f"{key}: dtype {actual.dtype}, expected {dtype}"
    error = (actual.double() - reference.double()).abs()
    bound = ulp(reference, dtype)
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{key}: off by {worst:.2f} ulp of {dtype}"


def assert_is_average(
    actual: torch.Tensor, terms: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype, key: str = ""
) -> None:
    """``actual`` is the weighted average accumulated in float32 (float64 for float64) and stored in ``dtype``.

    Allowed error: one ulp of ``dtype`` at the exact (float64) average, plus the
    accumulator's rounding of each term: ``2 n eps(acc) sum|w_i x_i|``. The second
    part only matters where terms cancel (an average near 0 of values far from 0).
    """
    assert actual.dtype == dtype, f"{key}: dtype {actual.dtype}, expected {dtype}"
    reference = fp64_reference(terms, weights)
    scale = fp64_reference([t.abs() for t in terms], weights)
    acc = torch.float64 if dtype == torch.float64 or any(t.dtype == torch.float64 for t in terms) else torch.float32
    bound = ulp(reference, dtype) + 2 * len(terms) * torch.finfo(acc).eps * scale
    error = (actual.double() - reference).abs()
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{key}: off the {acc}-accumulated average by {worst:.2f} of the allowed error"


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, key: str = "") -> None:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == same NaN)."""
    assert actual.dtype == expected.dtype, f"{key}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.contiguous().reshape(-1).view(torch.uint8)
    b = expected.contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        where = (actual.reshape(-1) != expected.reshape(-1)).nonzero()
        first = where[0].item() if where.numel() else "?"
        raise AssertionError(f"{key}: not bit-identical (first difference at flat index {first})")


def assert_no_output(output: Path) -> None:
    """Neither the soup folder nor any hidden temporary folder of it was left behind."""
    assert not output.exists(), f"{output} was created"
    if output.parent.exists():
        leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
        assert not leftovers, f"temporary folders left behind: {leftovers}"
