"""The vocabulary decision (torch-free, from tokenizer files) and its rows in the plan, streamed.

:func:`choose_vocabulary` is checked rule by rule against mergekit 0.1.5's (``build_union_tokenizer``,
``assign_embedding_sources``); the engine is checked on rows that are filled between rows read
(a token a model lacks in the middle of the vocabulary, a padding row), at chunk sizes that cut
rows anywhere: the streamed soup is the definition, bit for bit, and so is an ingredient scored
under the plan.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hub_soup.errors import RecipeError
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.merging.engine import ingredient_weights, merged_state_dict
from hub_soup.merging.methods import get_method
from hub_soup.merging.plan import Input, align
from hub_soup.merging.rows import Gather
from hub_soup.merging.vocab import (
    BASE,
    Fill,
    TokenizerChoice,
    TokenizerFiles,
    TokenSetting,
    choose_vocabulary,
    read_tokenizer,
    soup_tokenizer_files,
)
from hub_soup.merging.vocab_rows import ModelFiles, fill_rows, resized, token_keys, vocabulary_from, with_vocabulary
from tests import checkpoints as ck
from tests.method_checks import CUTS


def files(tokens: list[str], added: tuple[str, ...] = ()) -> TokenizerFiles:
    return TokenizerFiles({t: i for i, t in enumerate(tokens)}, {t: {"content": t, "special": True} for t in added})


def test_union_appends_plain_then_added_tokens_model_by_model() -> None:
    tokenizers = {
        0: files(["a", "b", "c", "<x>"], added=("<x>",)),
        1: files(["a", "c", "d", "<y>", "<x>"], added=("<y>", "<x>")),
        BASE: files(["a", "b", "c"]),
    }
    sizes = {0: 4, 1: 5, BASE: 3}
    labels = {0: "one", 1: "two", BASE: "base"}
    vocabulary = choose_vocabulary(tokenizers, sizes, labels, TokenizerChoice("union"))
    assert vocabulary.origin == BASE
    assert vocabulary.tokens(tokenizers[BASE]) == {"a": 0, "b": 1, "c": 2, "d": 3, "<x>": 4, "<y>": 5}
    assert vocabulary.rules == {"b": "base", "d": "donor two", "<x>": "average", "<y>": "donor two"}
    # each model's rows: its own where it has the token, else the fill (the same fill for every model)
    assert tuple(vocabulary.rows[0]) == (0, 1, 2, -1, 3, -2)
    assert vocabulary.fills[0] == (Fill(((1, 2),)), Fill(((1, 3),)))
    assert tuple(vocabulary.rows[1]) == (0, -1, 1, 2, 4, 3)
    assert vocabulary.fills[1] == (Fill(((BASE, 1),)),)
    assert tuple(vocabulary.rows[BASE]) == (0, 1, 2, -1, -2, -3)
    assert vocabulary.fills[BASE][1] == Fill(((0, 3), (1, 4)))  # <x>: the average of those that have it
    assert vocabulary.counts() == {"every model's own row": 2, "base": 1, "donor two": 2, "average": 1}


def test_ids_beyond_the_embeddings_are_not_the_models() -> None:
    """mergekit's stripped tokenizer: a token whose id is no row of the model's embeddings is not its token."""
    tokenizers = {0: files(["a", "b", "<pad>"], added=("<pad>",)), 1: files(["a", "b"])}
    vocabulary = choose_vocabulary(tokenizers, {0: 2, 1: 2}, {0: "one", 1: "two"}, TokenizerChoice("union"))
    assert vocabulary.tokens(tokenizers[0]) == {"a": 0, "b": 1}


def test_base_source_padding_and_overrides() -> None:
    tokenizers = {0: files(["a", "b", "<x>"]), 1: files(["a", "b"]), BASE: files(["a", "b"])}
    overrides = {"a": TokenSetting("one", force=True), "b": TokenSetting("zero")}
    choice = TokenizerChoice("one", overrides, pad_to_multiple_of=4)
    vocabulary = choose_vocabulary(tokenizers, {0: 3, 1: 2, BASE: 2}, {0: "one", 1: "two", BASE: "base"}, choice)
    assert vocabulary.tokens(tokenizers[0]) == {"a": 0, "b": 1, "<x>": 2} and vocabulary.size == 4 and vocabulary.padded == 1
    assert vocabulary.rules == {"a": "forced one", "b": "zero", "<x>": "donor one"}
    # forced: every model takes one's row of a, one too (its own, as a fill); b not forced: kept where had
    assert tuple(vocabulary.rows[0]) == (-1, 1, 2, -2) and vocabulary.fills[0] == (Fill(((0, 0),)), Fill(mean=True))
    assert tuple(vocabulary.rows[1]) == (-1, 1, -2, -3)
    assert vocabulary.fills[1] == (Fill(((0, 0),)), Fill(((0, 2),)), Fill(mean=True))


def test_a_source_that_names_no_model_is_refused() -> None:
    tokenizers = {0: files(["a"]), 1: files(["a", "b"])}
    with pytest.raises(RecipeError, match="'three' is none of the models merged"):
        choose_vocabulary(tokenizers, {0: 1, 1: 2}, {0: "one", 1: "two"}, TokenizerChoice("three"))
    with pytest.raises(RecipeError, match="one has no token 'b'"):
        choose_vocabulary(tokenizers, {0: 1, 1: 2}, {0: "one", 1: "two"},
                          TokenizerChoice("union", {"b": TokenSetting("one")}))


def test_read_tokenizer_of_a_unigram_model_with_added_tokens(tmp_path: Path) -> None:
    data = {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0], ["b", -2.0]]},
            "added_tokens": [{"id": 3, "content": "<x>", "special": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<y>": 4}))
    read = read_tokenizer([tmp_path / "tokenizer.json", tmp_path / "added_tokens.json"], "m")
    assert read.vocab == {"<unk>": 0, "a": 1, "b": 2, "<x>": 3, "<y>": 4}
    assert set(read.added) == {"<x>", "<y>"}


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"chunk{c[0]}")
def test_filled_rows_stream_as_their_definition(tmp_path: Path, cut: tuple[int, int]) -> None:
    """Model one's vocabulary (5 tokens, padded to 8 rows); model two lacks token ``c`` (id 2 of one's):
    its row there is one's (the donor's), between rows it reads; padding rows each model's mean."""
    generator = torch.Generator().manual_seed(5)
    one = {"model.embed_tokens.weight": torch.randn(5, 7, generator=generator),
           "model.norm.weight": torch.randn(7, generator=generator), "lm_head.weight": torch.randn(5, 7, generator=generator)}
    two = {"model.embed_tokens.weight": torch.randn(4, 7, generator=generator),
           "model.norm.weight": torch.randn(7, generator=generator), "lm_head.weight": torch.randn(4, 7, generator=generator)}
    one = {k: v.to(torch.bfloat16) for k, v in one.items()}
    two = {k: v.to(torch.bfloat16) for k, v in two.items()}
    tokenizers = {0: files(["a", "b", "c", "d", "e"]), 1: files(["e", "a", "b", "d"])}
    vocabulary = choose_vocabulary(tokenizers, {0: 5, 1: 4}, {0: "one", 1: "two"},
                                   TokenizerChoice("one", pad_to_multiple_of=4))
    paths = [ck.save_safetensors(s, tmp_path / f"in{i}.safetensors") for i, s in enumerate((one, two))]
    opened = [open_checkpoint(p) for p in paths]
    try:
        layouts = [resized(layout, vocabulary.sizes[i], vocabulary.size) for i, layout in enumerate(layouts_of(opened))]
        plan = align(layouts)
        plan = fill_rows(with_vocabulary(plan, vocabulary, token_keys(opened[0].metas, 5)), opened, None)
        soup = merged_state_dict(opened, plan, get_method("uniform")(), chunk_elements=cut[0], block_elements=cut[1])
        scored = ingredient_weights(opened[1], plan, 1).state_dict()
    finally:
        for checkpoint in opened:
            checkpoint.close()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = one[key].double(), two[key].double()
        permuted_b = torch.stack([b[1], b[2], a[2], b[3], b[0]]).to(torch.bfloat16)
        mean_a = a.mean(0).to(torch.bfloat16)
        mean_b = permuted_b.double().mean(0).to(torch.bfloat16)
        rows_a = torch.cat([one[key], mean_a.expand(3, -1)])
        rows_b = torch.cat([permuted_b, mean_b.expand(3, -1)])
        ck.assert_bit_equal(scored[key], rows_b, key)
        ck.assert_bit_equal(soup[key], ((rows_a.double() + rows_b.double()) / 2).to(torch.bfloat16), key)


def test_the_soup_tokenizer_drops_added_tokens_beyond_the_embeddings(tmp_path: Path) -> None:
    """A model whose tokenizer adds ``<extra>`` at id 2 with 2 embedding rows: the union's ``<x>`` takes row 2,
    and the soup's tokenizer encodes it there, ``<extra>`` gone from tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = Tokenizer(WordLevel({"a": 0, "b": 1}, unk_token="a"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens(["<extra>"])
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"2": {"content": "<extra>", "special": True}}}))
    paths = [tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json"]
    tokenizers = {0: read_tokenizer(paths, "one"), 1: files(["a", "b", "<x>"], added=("<x>",))}
    vocabulary = choose_vocabulary(tokenizers, {0: 2, 1: 3}, {0: "one", 1: "two"}, TokenizerChoice("union"))
    soup_tokenizer = soup_tokenizer_files(paths, vocabulary, "one")
    written = soup_tokenizer.files
    assert soup_tokenizer.tokens == vocabulary.tokens(tokenizers[0]) == {"a": 0, "b": 1, "<x>": 2}
    soup = Tokenizer.from_str(str(written["tokenizer.json"]))
    assert soup.encode("b <x> a").ids == [1, 2, 0] and soup.token_to_id("<extra>") is None
    assert json.loads(str(written["tokenizer_config.json"]))["added_tokens_decoder"] == {
        "2": {"content": "<x>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True}}


def test_embeddings_of_different_rows_name_the_option_when_aligned_from_headers() -> None:
    """Aligned from safetensors headers (before any download, no config read yet): the embeddings' row counts
    differ, and the hint names --tokenizer-source and its choices."""
    from hub_soup.errors import AlignmentError
    from hub_soup.io.safetensors_io import TensorMeta
    from hub_soup.merging.plan import Layout

    def layout(rows: int) -> Layout:
        return Layout(f"m{rows}", {"model.embed_tokens.weight": TensorMeta(torch.bfloat16, (rows, 8)),
                                   "lm_head.weight": TensorMeta(torch.bfloat16, (rows, 8))})

    with pytest.raises(AlignmentError, match="shape mismatch at model.embed_tokens.weight") as raised:
        align([layout(12), layout(14)])
    assert raised.value.hint is not None and "--tokenizer-source" in raised.value.hint and "union" in raised.value.hint


def _spans_row_by_row(rows: tuple[int, ...], start: int, count: int, row_numel: int) -> list[tuple[int, int, bool]]:
    """Input.spans' definition, one row at a time: where each element of the selection is, merged when contiguous."""
    spans: list[tuple[int, int, bool]] = []
    for element in range(start, start + count):
        row, within = divmod(element, row_numel)
        filled = rows[row] < 0
        at = (-1 - rows[row] if filled else rows[row]) * row_numel + within
        if spans and spans[-1][2] == filled and spans[-1][0] + spans[-1][1] == at:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1, filled)
        else:
            spans.append((at, 1, filled))
    return spans


def test_gathered_rows_are_runs_read_where_row_by_row_reads_them() -> None:
    """A selection kept as runs (stored rows counting up, fills counting down, repeated padding fills) is the
    same sequence, and any element range of it is read from the same spans as row by row."""
    rng = random.Random(0)
    for _ in range(500):
        rows: list[int] = []
        while len(rows) < 30:
            first = rng.randint(0, 40)
            rows += rng.choice([list(range(first, first + rng.randint(1, 6))), [-1 - rng.randint(0, 4)] * 2,
                                [-1 - j for j in range(first % 4, first % 4 + 3)]])
        selection = tuple(rows)
        gather = Gather.of(range(3), selection)
        assert tuple(gather) == (0, 1, 2, *selection) and len(gather) == 3 + len(selection)
        assert [gather[i] for i in range(len(gather))] == list(gather) and gather == Gather.of(list(gather))
        assert len(gather.starts) < len(gather)  # runs, not rows
        row_numel = rng.randint(1, 4)
        start = rng.randint(0, len(gather) * row_numel - 1)
        count = rng.randint(1, len(gather) * row_numel - start)
        assert Input(0, "x", rows=gather).spans(start, count, row_numel) == _spans_row_by_row(
            tuple(gather), start, count, row_numel)


def test_fine_tunes_sharing_a_tokenizer_read_it_once(tmp_path: Path) -> None:
    """Tokenizer files of the same content are read once (one object), a fine-tune's that adds tokens holds the
    first's strings: the vocabulary is the one each read alone gives."""
    base = ["<s>", *(f"w{i}" for i in range(50))]
    folders = {}
    for name, tokens in {"one": base, "two": base, "chat": [*base, "<|im_start|>"]}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        folders[name] = ModelFiles(name, {"vocab_size": len(tokens)}, [folder / "vocab.json"])
    models = {0: folders["chat"], 1: folders["one"], 2: folders["two"]}
    vocabulary = vocabulary_from(models, TokenizerChoice("union"), ["chat", "one", "two"])
    alone = choose_vocabulary({i: read_tokenizer(m.files, m.label) for i, m in models.items()},
                              {i: len(read_tokenizer(m.files, m.label).vocab) for i, m in models.items()},
                              {0: "chat", 1: "one", 2: "two"}, TokenizerChoice("union"))
    assert vocabulary == alone and vocabulary.count == 52 and vocabulary.rules == {"<|im_start|>": "donor chat"}
    assert tuple(vocabulary.rows[1]) == (*range(51), -1) and len(vocabulary.rows[1].starts) == 2
    chat = read_tokenizer(folders["chat"].files, "chat")
    shared = read_tokenizer(folders["one"].files, "one").sharing(chat)
    assert shared.vocab == read_tokenizer(folders["one"].files, "one").vocab
    assert all(a is b for a, b in zip(shared.vocab, chat.vocab))  # the same strings, not equal copies
