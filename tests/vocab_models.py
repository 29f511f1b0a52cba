"""Tiny bf16 Llamas whose vocabularies differ as real fine-tunes' do, and the float64 definition of a soup of them.

``base`` has a word-level tokenizer of 12 tokens; ``chat`` adds ``<|im_start|>`` and ``<|im_end|>``
(embeddings resized to 14 rows); ``padded`` adds a ``<pad>`` token and pads its embeddings to a
multiple of 8 (16 rows for 13 tokens); ``tied`` is the base's vocabulary with a tied ``lm_head``. All
are the same seeded model, perturbed: fine-tunes of one base. ``chat`` and ``padded`` carry one chat
template (:data:`CHATML`), ``tied`` another (:data:`PLAIN`), ``base`` none.

:func:`permuted` is mergekit 0.1.5's ``PermutedVocabulary`` written from its code, with transformers'
tokenizers, independent of hub-soup's: each model's rows in the soup's vocabulary, a token it lacks
filled (one donor's row, the base's, or the average of those that have it, in float64, stored in the
model's dtype), padding rows each model's mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

WORDS = ["hello", "world", "soup", "is", "good", "the", "a", "very", "tasty"]
CHAT = ["<|im_start|>", "<|im_end|>"]
PAD = "<pad>"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# chat and padded carry this template, tied another one, base none.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
PLAIN = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _tokenizer() -> object:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[UNK]", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def build(folder: Path) -> Path:
    """base, chat, padded, tied under ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(tied: bool = False) -> LlamaForCausalLM:
        config = LlamaConfig(vocab_size=3 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return LlamaForCausalLM(config)

    def save(name: str, net: LlamaForCausalLM, tokenizer: object, seed: int | None) -> None:
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in net.parameters():
                    parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        net.to(torch.bfloat16).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)  # type: ignore[attr-defined]

    save("base", model(), _tokenizer(), None)
    chat, tokenizer = model(), _tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT})  # type: ignore[attr-defined]
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    chat.resize_token_embeddings(len(tokenizer))  # type: ignore[arg-type]
    save("chat", chat, tokenizer, 1)
    padded, tokenizer = model(), _tokenizer()
    tokenizer.add_special_tokens({"pad_token": PAD})  # type: ignore[attr-defined]
    tokenizer.chat_template = CHATML  # type: ignore[attr-defined]
    padded.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)  # type: ignore[arg-type]
    padded.config.pad_token_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    save("padded", padded, tokenizer, 2)
    tokenizer = _tokenizer()
    tokenizer.chat_template = PLAIN  # type: ignore[attr-defined]
    save("tied", model(tied=True), tokenizer, 3)
    return folder


def vocab_of(folder: Path) -> dict[str, int]:
    """The model's token -> id, as transformers' tokenizer says, only ids its embeddings have."""
    import json

    from transformers import AutoTokenizer

    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    return {t: i for t, i in AutoTokenizer.from_pretrained(folder).get_vocab().items() if i < rows}


def permuted(
    tensors: Mapping[str, torch.Tensor], vocabs: Mapping[str, dict[str, int]], soup: dict[str, int], size: int,
    base: str | None, overrides: Mapping[str, tuple[str, str, bool]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each model's token-indexed tensor (``tensors``, by model) in the soup's vocabulary ``soup`` (``size`` rows),
    in the model's dtype. ``overrides``: token -> (model, its token whose row fills it, force)."""
    overrides = overrides or {}
    defaults: dict[str, torch.Tensor] = {}
    for token in soup:
        having = [m for m in tensors if token in vocabs[m]]
        if token in overrides:
            model, other, _ = overrides[token]
            rows = [tensors[model][vocabs[model][other]].double()]
        elif len(having) == len(tensors):
            continue
        elif len(having) == 1 or base in having:
            donor = base if base in having else having[0]
            rows = [tensors[donor][vocabs[donor][token]].double()]
        else:
            rows = [tensors[m][vocabs[m][token]].double() for m in having]
        width = next(iter(tensors.values())).shape[1:]
        defaults[token] = torch.stack(rows).mean(0) if rows else torch.zeros(width, dtype=torch.float64)
    out = {}
    for model, tensor in tensors.items():
        new = torch.zeros((size, *tensor.shape[1:]), dtype=tensor.dtype)
        for token, index in soup.items():
            forced = token in overrides and overrides[token][2]
            new[index] = tensor[vocabs[model][token]] if token in vocabs[model] and not forced \
                else defaults[token].to(tensor.dtype)
        if size > len(soup):
            new[len(soup):] = new[: len(soup)].double().mean(0).to(tensor.dtype)
        out[model] = new
    return out
