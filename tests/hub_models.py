"""Tiny real timm and transformers ingredients, built offline and uploaded to the loopback Hub.

Ingredients of one soup share an initialization (a seeded "pretrained" model)
and differ by a small seeded perturbation, like fine-tunes of one checkpoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import timm
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file
from timm.models import save_for_hf
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, LlamaConfig, LlamaForCausalLM

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "soup", "is", "the", "very", "not"]


def unique(name: str) -> str:
    """A repo name no other test uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Shift every floating tensor (parameters and BN buffers) a little, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
    return model


def timm_folder(path: Path, seed: int, arch: str = "test_resnet", num_classes: int = 10, init_seed: int = 0) -> Path:
    """A timm Hub folder (config.json + model.safetensors) of a perturbed shared init."""
    torch.manual_seed(init_seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    perturb_(model, seed)
    save_for_hf(model, path, safe_serialization="both" if seed % 2 else True)
    return path


def bert_folder(path: Path, seed: int, init_seed: int = 0) -> Path:
    """A tiny BertForSequenceClassification folder with its tokenizer, saved by transformers."""
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)})
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
    )
    torch.manual_seed(init_seed)
    model = BertForSequenceClassification(config)
    perturb_(model, seed, scale=0.005)  # BERT initialises with std 0.02: a fine-tune moves a fraction of that
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_folder(path: Path, seed: int, words: list[str], init_seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM folder (float32) with a word-level fast tokenizer over ``words`` (plus
    ``[UNK]``, ``[PAD]`` and ``</s>``, its eos token), saved by transformers."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "[PAD]", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=vocab["</s>"], pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(init_seed)
    model = LlamaForCausalLM(config)
    perturb_(model, seed, scale=0.01)  # Llama initialises with std 0.02: far enough apart to score differently
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lora_folder(
    base: Path, out: Path, seed: int, *, r: int, alpha: float, rslora: bool = False, dora: bool = False,
    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A PEFT LoRA adapter of ``base`` (Llama: q_proj, v_proj; BERT: query, value and its head) with random factors."""
    from peft import LoraConfig, TaskType, get_peft_model

    bert = config_of(base)["model_type"] == "bert"
    model = (BertForSequenceClassification if bert else LlamaForCausalLM).from_pretrained(base)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if bert else TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, use_rslora=rslora,
        use_dora=dora, target_modules=["query", "value"] if bert else ["q_proj", "v_proj"],
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # lora_A, lora_B (zero at init) and the head PEFT saves (modules_to_save)
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(out)
    return out


def upload(api: HfApi, folder: Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` and upload ``folder``; returns the commit SHA."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="upload").oid


def state_dict_of(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder's model.safetensors."""
    return load_file(folder / "model.safetensors")


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
