"""Ingredients with different vocabularies: rows aligned by token, the soup's tokenizer written.

Tiny bf16 Llamas (tests/vocab_models.py): ``chat`` adds two chat markers, ``padded`` a pad token and
pads its embeddings to a multiple of 8, ``tied`` ties its ``lm_head``. Each soup's ``embed_tokens``
and ``lm_head`` equal the float64 definition (each model's rows permuted into the soup's vocabulary as
mergekit 0.1.5 permutes them, merged by the method's reference, rounded once to bf16), bit for bit;
its tokenizer encodes every added token to its row, and transformers loads it and generates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file

import hub_soup
from hub_soup.cli import main
from hub_soup.eval.greedy import GreedyReport
from hub_soup.recipe import load_recipe
from tests import mergekit_reference as R
from tests.hub_fixtures import TEST_USER
from tests.hub_models import unique, upload
from tests.hub_server import HubServer
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
    left_out: tuple[str, ...] = (),
) -> None:
    """The soup's token-indexed tensors are ``merge`` of the models' rows permuted into its vocabulary (float64,
    rounded once); its other tensors are ``merge`` of the models' own. ``left_out``: models greedy left out,
    whose rows still fill the tokens they alone have (the vocabulary and its fills are the whole soup's)."""
    soup = load_file(out / "model.safetensors")
    vocab = soup_vocab(out)
    every = [*names, *left_out, *([base] if base else [])]
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
    generation = json.loads((out / "generation_config.json").read_text())  # its ids moved as the config's
    assert generation["eos_token_id"] == vocab["</s>"] and generation["bos_token_id"] == vocab["<s>"]
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


def test_run_flag_chooses_the_vocabulary_and_the_soup_is_scored(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}]\n", "--tokenizer-source", "chat")
    assert soup_vocab(out) == vocab_of(models / "chat")
    check_rows(models, out, ["chat", "padded"], linear)
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello world <|im_start|> soup"}) + "\n")
    argv = ["run", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "scored"), "--tokenizer-source", "union",
            "--eval-task", "causal-lm", "--eval-data", str(tmp_path / "text.jsonl")]
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "uniform soup, scored on" in said and "(1 examples; perplexity, lower is better)" in said, said
    assert "soup of 2 of 2 ingredients: " in said


# Eval texts: the chat markers are one token to a tokenizer that has them, three [UNK]s to one that has not.
TEXTS = ["hello world soup is good", "the soup is very tasty", "<|im_start|> a soup <|im_end|> is good",
         "hello <pad> the world", "a very good soup is the tasty soup"]


def perplexity(folder: Path) -> float:
    """The perplexity of :data:`TEXTS` under the model saved in ``folder``, tokenized by its own tokenizer, as plain
    transformers computes it: every token after each text's first, in one batch padded on the right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        logits = model(**batch).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return math.exp(-log_probs.double()[batch["attention_mask"][:, 1:].bool()].mean().item())


def scored(models: Path, tmp_path: Path, recipe: str) -> tuple[Path, GreedyReport]:
    """``recipe`` (its ingredients named as :func:`run` links them) run with :data:`TEXTS` as causal-lm eval data,
    a test split too (the same texts: each model's test score is its held-out one)."""
    import datasets

    for name in ("base", "chat", "padded", "tied"):
        (tmp_path / name).symlink_to(models / name)
    split = datasets.Dataset.from_dict({"text": TEXTS})
    datasets.DatasetDict({"validation": split, "test": split}).save_to_disk(tmp_path / "texts")
    (tmp_path / "recipe.yml").write_text(recipe + "eval: {task: causal-lm, data: texts, test_split: test}\n"
                                         "output: {path: soup}\n")
    result = hub_soup.run(load_recipe(tmp_path / "recipe.yml"))
    assert result is not None and result.report is not None
    return tmp_path / "soup", result.report


def test_greedy_union_soup_scores_each_model_in_its_own(models: Path, tmp_path: Path) -> None:
    """Each ingredient is scored in its own model with its own tokenizer (14, 16 and 12 rows), every candidate
    in the soup's union vocabulary (15 rows) with the soup's tokenizer; the soup written is the one scored."""
    names = ["chat", "padded", "tied"]
    out, report = scored(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}, {ref: tied}]\n"
                         "tokenizer: {source: union}\ngreedy: true\n")
    assert [s.value for s in report.ingredient_scores] == [perplexity(models / n) for n in names]
    assert len(report.steps) == 3 and report.kept == [False, True, True]  # chat left out: its markers are its rows
    assert report.soup_score.value == perplexity(out)
    held_out = {"soup": report.soup_score, **dict(zip(names, report.ingredient_scores))}
    assert report.test_scores is not None
    assert {name: s.value for name, s in report.test_scores.items()} == {name: s.value for name, s in held_out.items()}
    assert soup_vocab(out) == {t: i for i, t in enumerate([*BASE_TOKENS, *CHAT, PAD])}
    kept = [n for n, k in zip(names, report.kept) if k]
    check_rows(models, out, kept, linear, left_out=tuple(n for n in names if n not in kept))
    check_loads(out, [*CHAT, PAD])
    card = (out / "README.md").read_text()
    assert "Each ingredient was scored in a model of its own" in card
    assert "Greedy selection left out chat; the vocabulary" in card


def test_plain_union_soup_scored_with_causal_lm(models: Path, tmp_path: Path) -> None:
    out, report = scored(models, tmp_path, "ingredients: [{ref: chat}, {ref: padded}]\nmethod: task_arithmetic\n"
                         "base: {ref: base}\nparameters: {weight: 1.0}\ntokenizer: {source: union}\n")
    assert [s.value for s in report.ingredient_scores] == [perplexity(models / "chat"), perplexity(models / "padded")]
    assert report.base_score is not None and report.base_score.value == perplexity(models / "base")
    assert report.soup_score.value == perplexity(out)
    check_rows(models, out, ["chat", "padded"], task_arithmetic, base="base")


@pytest.mark.parametrize("field", ["recalibrate_bn: 2", "ensemble_reference: true"])
def test_what_a_chosen_vocabulary_is_not_scored_with(models: Path, tmp_path: Path, field: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    (tmp_path / "recipe.yml").write_text("ingredients: [{ref: chat}, {ref: padded}]\ntokenizer: {source: union}\n"
                                         f"eval: {{task: causal-lm, data: val.jsonl}}\n{field}\n")
    assert main(["run", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "soup")]) == 2
    err = capsys.readouterr().err
    assert f"{field.split(':')[0]}: not with a chosen vocabulary (tokenizer)" in err and "Traceback" not in err


def test_hub_vocabulary_is_chosen_before_any_weights_are_downloaded(
    models: Path, hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Hub models: the vocabulary is chosen from their tokenizer files and configs, fetched alone, so an override
    naming a token its model lacks stops (exit 2, naming it) before any weights are downloaded; a good choice
    then merges the soup the local models make."""
    api = HfApi(token=hub_token)
    repos = {name: f"{TEST_USER}/{unique(f'vocab-{name}')}" for name in ("base", "chat", "padded")}
    for name, repo in repos.items():
        upload(api, models / name, repo)
    recipe = ("models:\n  - model: {chat}\n  - model: {padded}\nmerge_method: task_arithmetic\nbase_model: {base}\n"
              "parameters:\n  weight: 1.0\ntokenizer:\n  source: union\n  tokens:\n    <|im_end|>:\n"
              "      source: {{kind: model_token, model: {base}, token: {token}}}\n")
    bad = tmp_path / "bad.yml"
    bad.write_text(recipe.format(**repos, token="<nope>"))
    assert main(["run", str(bad), "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "has no token '<nope>'" in err and "Traceback" not in err
    for repo in repos.values():
        cached = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        assert list(cached.glob("snapshots/*/tokenizer.json"))  # the tokenizer files were read
        assert not list(cached.glob("snapshots/*/model.safetensors"))  # the weights never downloaded
    good = tmp_path / "good.yml"
    good.write_text(recipe.format(**repos, token="</s>"))
    assert main(["run", str(good), "-o", str(tmp_path / "soup")]) == 0
    check_rows(models, tmp_path / "soup", ["chat", "padded"], task_arithmetic, base="base",
               overrides={"<|im_end|>": ("base", "</s>", False)})
