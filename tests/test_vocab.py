"""Ingredients with different vocabularies: rows aligned by token, the soup's tokenizer written.

Tiny bf16 Llamas (tests/vocab_models.py): ``chat`` adds two chat markers, ``padded`` a pad token and
pads its embeddings to a multiple of 8, ``tied`` ties its ``lm_head``. Each soup's ``embed_tokens``
and ``lm_head`` equal the float64 definition (each model's rows permuted into the soup's vocabulary as
mergekit 0.1.5 permutes them, merged by the method's reference, rounded once to bf16), bit for bit;
its tokenizer encodes every added token to its row, and transformers loads it and generates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_soup.cli import main
from tests import mergekit_reference as R
from tests.vocab_models import CHAT, CHATML, EMBED, HEAD, PAD, PLAIN, WORDS, build, permuted, vocab_of

BASE_TOKENS = ["[UNK]", "<s>", "</s>", *WORDS]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("vocab"))


def run(models: Path, tmp_path: Path, text: str, *more: str) -> Path:
    """``hub-soup run`` of the recipe (or mergekit config) ``text``, written beside links to the models."""
    for name in ("base", "chat", "padded", "tied"):
        (tmp_path / name).symlink_to(models / name)
    (tmp_path / "recipe.yml").write_text(text)
    out = tmp_path / "soup"
    assert main(["run", str(tmp_path / "recipe.yml"), "-o", str(out), *more]) == 0
    return out


def soup_vocab(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(out).get_vocab())


def check_rows(
    models: Path, out: Path, names: list[str], merge: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor],
    base: str | None = None, overrides: Mapping[str, tuple[str, str, bool]] | None = None,
) -> None:
    """The soup's token-indexed tensors are ``merge`` of the models' rows permuted into its vocabulary (float64,
    rounded once); its other tensors are ``merge`` of the models' own."""
    soup = load_file(out / "model.safetensors")
    vocab = soup_vocab(out)
    every = [*names, *([base] if base else [])]
    weights = {n: load_file(models / n / "model.safetensors") for n in every}
    vocabs = {n: vocab_of(models / n) for n in every}
    for key in (EMBED, HEAD):
        tensors = {n: weights[n].get(key, weights[n][EMBED]) for n in every}  # a tied head is its embeddings
        rows = permuted(tensors, vocabs, vocab, soup[key].shape[0], base, overrides)
        expected = merge([rows[n].double() for n in names], rows[base].double() if base else None)
        assert torch.equal(soup[key], expected.to(torch.bfloat16)), key
    key = "model.layers.0.mlp.up_proj.weight"
    expected = merge([weights[n][key].double() for n in names], weights[base][key].double() if base else None)
    assert torch.equal(soup[key], expected.to(torch.bfloat16))


def check_loads(out: Path, added: list[str]) -> None:
    """The soup's tokenizer encodes each added token to its row, its config's vocab_size is its rows, and
    transformers loads it and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    config = json.loads((out / "config.json").read_text())
    rows = load_file(out / "model.safetensors")[EMBED].shape[0]
    assert config["vocab_size"] == rows >= len(vocab)
    for token in added:
        assert tokenizer.encode(f"hello {token} soup", add_special_tokens=False) == [
            vocab["hello"], vocab[token], vocab["soup"]]
    assert config["eos_token_id"] == vocab["</s>"] and config["bos_token_id"] == vocab["<s>"]
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer(f"hello {added[0] if added else 'soup'} world", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


def linear(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    return R.linear(tensors, weight=1.0)


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    return R.task_arithmetic(tensors, base, weight=1.0)


def test_union_of_chat_padded_and_tied(models: Path, tmp_path: Path) -> None:
    names = ["chat", "padded", "tied"]
    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}, {ref: tied}]\n"
              "tokenizer: {source: union}\n")
    assert soup_vocab(out) == {t: i for i, t in enumerate([*BASE_TOKENS, *CHAT, PAD])}
    check_rows(models, out, names, linear)
    check_loads(out, [*CHAT, PAD])


def test_base_vocabulary_padded_to_a_multiple(models: Path, tmp_path: Path) -> None:
    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}]\nmethod: task_arithmetic\n"
              "base: {ref: base}\ntokenizer: {source: base, pad_to_multiple_of: 8}\n")
    assert soup_vocab(out) == {t: i for i, t in enumerate(BASE_TOKENS)}
    assert load_file(out / "model.safetensors")[EMBED].shape[0] == 16
    check_rows(models, out, ["chat", "padded"], task_arithmetic, base="base")
    check_loads(out, [])


def test_a_named_vocabulary(models: Path, tmp_path: Path) -> None:
    out = run(models, tmp_path, "ingredients: [{ref: padded}, {ref: chat}]\ntokenizer: {source: chat}\n")
    assert soup_vocab(out) == vocab_of(models / "chat")
    check_rows(models, out, ["padded", "chat"], linear)
    check_loads(out, CHAT)
    pinned = (out / "hub-soup.yaml").read_text()
    again = tmp_path / "again"
    assert main(["run", str(out / "hub-soup.yaml"), "-o", str(again)]) == 0, pinned
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert "tokenizer" in pinned and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_merge_flag_and_no_source(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = [str(models / "chat"), str(models / "padded")]
    assert main(["merge", *refs, "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "vocab_size" in err and "--tokenizer-source" in err and "union" in err and "Traceback" not in err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "soup"
    assert main(["merge", *refs, "--tokenizer-source", "union", "-o", str(out)]) == 0
    check_rows(models, out, ["chat", "padded"], linear)
    check_loads(out, [*CHAT, PAD])


def test_mergekit_union(models: Path, tmp_path: Path) -> None:
    out = run(models, tmp_path, "models:\n  - model: chat\n  - model: padded\nmerge_method: task_arithmetic\n"
              "base_model: base\nparameters:\n  weight: 1.0\ntokenizer_source: union\n")
    assert soup_vocab(out) == {t: i for i, t in enumerate([*BASE_TOKENS, *CHAT, PAD])}
    check_rows(models, out, ["chat", "padded"], task_arithmetic, base="base")
    check_loads(out, [*CHAT, PAD])


def test_mergekit_token_overrides(models: Path, tmp_path: Path) -> None:
    out = run(models, tmp_path, "models:\n  - model: chat\n  - model: padded\nmerge_method: task_arithmetic\n"
              "base_model: base\nparameters:\n  weight: 1.0\ntokenizer:\n  source: union\n  tokens:\n"
              "    <|im_end|>:\n      source: {kind: model_token, model: base, token: </s>}\n"
              "    hello:\n      source: chat\n      force: true\n")
    overrides = {"<|im_end|>": ("base", "</s>", False), "hello": ("chat", "hello", True)}
    check_rows(models, out, ["chat", "padded"], task_arithmetic, base="base", overrides=overrides)
    card = (out / "README.md").read_text()
    assert "## Vocabulary" in card and "The soup's is `union` (15 tokens, 15 rows)" in card
    assert "| forced chat | 1 |" in card and "| source base | 1 |" in card and "| donor padded | 1 |" in card
    assert "| every model's own row | 11 |" in card  # <|im_start|> is chat's, through the base's </s>


def test_card_lists_averaged_and_padding_rows(models: Path, tmp_path: Path) -> None:
    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}, {ref: tied}]\n"
              "tokenizer: {source: union, pad_to_multiple_of: 8}\n")
    card = (out / "README.md").read_text()
    assert "`union` (15 tokens, 16 rows)" in card and "1 padding row (`pad_to_multiple_of`)" in card
    assert "| donor chat | 2 |" in card and "| donor padded | 1 |" in card


@pytest.mark.parametrize(("given", "expected"), [("auto", CHATML), ("tied", PLAIN), (PLAIN + "!", PLAIN + "!")])
def test_chat_template(models: Path, tmp_path: Path, given: str, expected: str) -> None:
    from transformers import AutoTokenizer

    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}, {ref: tied}]\n"
              f"tokenizer: {{source: union}}\nchat_template: {json.dumps(given)}\n")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == expected
    said = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert "hello" in said


def test_chat_template_of_a_model_without_one(models: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base").symlink_to(models / "base")
    (tmp_path / "chat").symlink_to(models / "chat")
    (tmp_path / "recipe.yml").write_text("ingredients: [{ref: chat}]\nmethod: task_arithmetic\nbase: {ref: base}\n"
                                         "tokenizer: {source: base}\nchat_template: base\n")
    assert main(["run", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "soup")]) == 2
    assert "chat_template: base has no chat template" in capsys.readouterr().err


def test_run_flag_chooses_the_vocabulary_and_scoring_is_refused(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}]\n", "--tokenizer-source", "chat")
    assert soup_vocab(out) == vocab_of(models / "chat")
    check_rows(models, out, ["chat", "padded"], linear)
    (tmp_path / "text.txt").write_text("hello world\n")
    argv = ["run", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "scored"), "--tokenizer-source", "union",
            "--eval-task", "causal-lm", "--eval-data", str(tmp_path / "text.txt")]
    assert main(argv) == 2
    assert "a soup whose vocabulary is chosen is not scored yet" in capsys.readouterr().err
