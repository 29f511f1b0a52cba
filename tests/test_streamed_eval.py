"""Streamed evaluated soups on tiny random language models: every model scored is streamed into one
model instance, in the eval dtype, and the numbers are the ones an in-memory greedy soup and plain
transformers give.

The ingredients are tiny Llama (untied embeddings) and Qwen2 (tied embeddings, attention biases)
models, saved by transformers in bfloat16: one random model with sharp next-token distributions,
which wrote the texts they are scored on, perturbed once per ingredient, one ingredient far more
(greedy should leave it out); averaging the others takes noise away, so soups of them score better.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT
from hub_soup.eval.evaluate import eval_dtype
from hub_soup.ingredients import layouts_of
from hub_soup.io.read import open_checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.engine import merged_state_dict
from hub_soup.merging.methods.uniform import Uniform
from hub_soup.merging.plan import align
from hub_soup.pipeline import SoupResult
from hub_soup.recipe import Recipe
from tests import checkpoints as ck

SPECIAL = ["[UNK]", "[PAD]", "[EOS]"]
WORDS = list(string.ascii_letters + string.digits)[:61]  # with SPECIAL: the models' 64 token ids
SCALES = (0.004, 0.004, 0.03, 0.004)  # the third ingredient strays far from the others


def _tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer of WORDS, with pad and eos tokens. transformers 5 reads it beside a
    Qwen2 config as Qwen2's byte-level BPE (no merges): one-character words are read the same way by both."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    ).save_pretrained(folder)


def _model(kind: str, seed: int | None) -> Any:
    """A tiny random model of ``kind`` (the same init for every seed, its final norm sharpened so that its
    next-token distributions are peaked), perturbed by ``seed`` (None: not at all), in bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    with torch.no_grad():
        model.model.norm.weight.mul_(8)
    if seed is not None:
        ck.perturb_(model, seed, scale=SCALES[seed])
    return model.to(torch.bfloat16).eval()


def _texts(kind: str, count: int = 12) -> list[str]:
    """Texts of 6 to 12 words sampled from the unperturbed model, word by word."""
    model, generator = _model(kind, None).float(), torch.Generator().manual_seed(0)
    texts = []
    with torch.inference_mode():
        for _ in range(count):
            ids = torch.randint(len(SPECIAL), 64, (1, 1), generator=generator)
            for _ in range(int(torch.randint(5, 12, (1,), generator=generator))):
                logits = model(ids).logits[0, -1]
                logits[: len(SPECIAL)] = -math.inf
                ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], 1)
            texts.append(" ".join((SPECIAL + WORDS)[i] for i in ids[0].tolist()))
    return texts


class Kit:
    """Ingredient folders of one kind and the texts they are scored on."""

    def __init__(self, root: Path, kind: str) -> None:
        import datasets

        self.kind = kind
        self.folders = []
        for seed in range(len(SCALES)):
            folder = root / f"{kind}-{seed}"
            _model(kind, seed).save_pretrained(folder)
            _tokenizer(folder)
            self.folders.append(folder)
        self.texts = _texts(kind)
        self.data = root / f"{kind}-texts"
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": self.texts})}).save_to_disk(self.data)

    def recipe(self, output: Path, members: Sequence[int] | None = None, **fields: Any) -> Recipe:
        eval_spec = {"task": "causal-lm", "data": str(self.data), "batch_size": 64, **fields.pop("eval", {})}
        folders = [self.folders[i] for i in members] if members is not None else self.folders
        return Recipe.from_refs([str(f) for f in folders], eval=eval_spec, output={"path": str(output)}, **fields)

    def perplexity(self, model: Any) -> float:
        """Perplexity of every token after each text's first, in one padded batch, as plain transformers computes it."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.folders[0])
        batch = tokenizer(self.texts, padding=True, return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            logits = model(**batch).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        kept = log_probs.double().exp()[batch["attention_mask"][:, 1:].bool()]
        return math.exp(-kept.log().mean().item())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return Kit(tmp_path_factory.mktemp(request.param), request.param)


def _in_memory_greedy(kit: Kit, dtype: torch.dtype) -> tuple[list[bool], list[float], list[float]]:
    """Greedy as it was done before streaming: whole state dicts in memory, each loaded into a model
    that transformers built (``from_pretrained``, in ``dtype``) with ``load_state_dict``; candidate
    soups made by the engine into memory. Returns what was kept, the ingredients' and the steps' scores."""
    from transformers import AutoModelForCausalLM

    checkpoints = [open_checkpoint(f) for f in kit.folders]
    plan = align(layouts_of(checkpoints))
    model = AutoModelForCausalLM.from_pretrained(kit.folders[0], dtype=dtype).eval()

    def score(state_dict: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state_dict, strict=False)  # tied: lm_head.weight is not saved
        return kit.perplexity(model)

    def soup(members: Sequence[int]) -> dict[str, torch.Tensor]:
        return merged_state_dict([checkpoints[i] for i in members], plan.select(members), Uniform())

    alone = [score(c.state_dict()) for c in checkpoints]
    kept, steps, best = [False] * len(alone), [], math.inf
    for i in sorted(range(len(alone)), key=lambda i: alone[i]):
        steps.append(score(soup([j for j in range(len(alone)) if kept[j] or j == i])))
        if steps[-1] <= best:
            kept[i], best = True, steps[-1]
    for c in checkpoints:
        c.close()
    return kept, alone, steps


@pytest.mark.parametrize("requested", [None, "float32"])
def test_streamed_greedy_is_the_in_memory_greedy(kit: Kit, requested: str | None, tmp_path: Path) -> None:
    out = tmp_path / "soup"
    result = hub_soup.run(kit.recipe(out, greedy=True, eval={"dtype": requested}))
    assert isinstance(result, SoupResult) and result.report is not None
    report = result.report
    dtype = torch.float32 if requested else torch.bfloat16  # by default, bf16 ingredients are scored in bf16
    kept, alone, steps = _in_memory_greedy(kit, dtype)
    assert report.kept == kept and not kept[2] and sum(kept) >= 2
    assert [s.value for s in report.ingredient_scores] == alone
    assert [s.soup_score.value for s in report.steps] == steps
    assert report.soup_score.value == min(steps)


def test_the_written_soup_scores_what_was_reported(kit: Kit, tmp_path: Path) -> None:
    """The soup on disk, loaded by transformers in the dtype it was scored in (its own, bf16), has the
    reported perplexity exactly; tied embeddings stay tied and the soup is the in-memory soup of the kept."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    result = hub_soup.run(kit.recipe(out, greedy=True))
    assert result is not None and result.report is not None
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert kit.perplexity(written) == result.report.soup_score.value
    tied = kit.kind == "qwen2"
    files = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in files) != tied
    assert (written.lm_head.weight.data_ptr() == written.model.embed_tokens.weight.data_ptr()) == tied
    members = [i for i, k in enumerate(result.kept) if k]
    checkpoints = [open_checkpoint(kit.folders[i]) for i in members]
    expected = merged_state_dict(checkpoints, align(layouts_of(checkpoints)), Uniform())
    assert files.keys() == expected.keys()
    for key, tensor in files.items():
        ck.assert_bit_equal(tensor, expected[key], key)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The engine's merges, by number of ingredients: each candidate soup, and a soup merged again to be written."""
    from hub_soup.merging import engine

    calls: list[int] = []
    merge = engine.stream_merge

    def counted(checkpoints: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(checkpoints))
        return merge(checkpoints, *args, **kwargs)

    monkeypatch.setattr(engine, "stream_merge", counted)
    return calls


@pytest.mark.parametrize("requested", [None, "float32"])
def test_a_soup_the_model_holds_is_written_from_it(
    kit: Kit, requested: str | None, merges: list[int], tmp_path: Path
) -> None:
    """Greedy of two close ingredients keeps both, so the model scored holds the soup last: in bf16 (the
    soup's dtype) it is read back from there, not merged again; in float32 it is merged again. The first
    step, the best ingredient alone, is neither merged nor scored again. Either way the file is the
    engine's soup of the kept ones, bit for bit, with the perplexity reported."""
    from transformers import AutoModelForCausalLM

    out, members = tmp_path / "soup", [1, 3]
    result = hub_soup.run(kit.recipe(out, members, greedy=True, eval={"dtype": requested}))
    assert result is not None and result.report is not None and result.kept == [True, True]
    assert merges == ([2] if requested is None else [2, 2])
    checkpoints = [open_checkpoint(kit.folders[i]) for i in members]
    expected = merged_state_dict(checkpoints, align(layouts_of(checkpoints)), Uniform())
    files = load_file(out / "model.safetensors")
    assert files.keys() == expected.keys()
    for key, tensor in files.items():
        ck.assert_bit_equal(tensor, expected[key], key)
    dtype = torch.float32 if requested else torch.bfloat16
    assert kit.perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()) == result.report.soup_score.value


def test_a_plain_scored_soup_is_streamed_too(kit: Kit, merges: list[int], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    result = hub_soup.run(kit.recipe(out))
    assert result is not None and result.report is not None and result.kept == [True] * len(kit.folders)
    assert merges == [len(kit.folders)]  # scored, then written from the model that holds it
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert kit.perplexity(written) == result.report.soup_score.value
    for folder, score in zip(kit.folders, result.report.ingredient_scores):
        assert kit.perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()) == score.value


def test_the_eval_dtype_is_the_soups_unless_asked() -> None:
    cpu = torch.device("cpu")
    weights = {"w": TensorMeta(torch.bfloat16, (1000,)), "norm": TensorMeta(torch.float32, (10,)),
               "ids": TensorMeta(torch.int64, (5000,))}
    assert eval_dtype(None, weights, cpu) == torch.bfloat16  # the dtype most floating elements are in
    assert eval_dtype(None, {"w": TensorMeta(torch.float16, (4,))}, cpu) == torch.float32  # fp16 on the CPU
    assert eval_dtype("float16", {"w": TensorMeta(torch.float16, (4,))}, cpu) == torch.float16  # asked for
    assert eval_dtype("float64", weights, cpu) == torch.float64
    assert eval_dtype(None, {"ids": TensorMeta(torch.int64, (4,))}, cpu) == torch.float32


def test_an_eval_dtype_the_device_cannot_run_is_refused(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CPUs have no bfloat16 FFT: a score that needs one stops with one line saying what to do, nothing written."""
    if kit.kind != "llama":
        pytest.skip("one model kind is enough")
    function = tmp_path / "spectrum.py"
    function.write_text(
        "import torch\n"
        "def score(model):\n"
        "    return float(torch.fft.rfft(model.lm_head.weight, dim=-1).abs().mean())\n"
    )
    out = tmp_path / "soup"
    args = ["merge", *map(str, kit.folders[:2]), "-o", str(out), "--eval-task", "custom",
            "--eval-function", f"{function}:score", "--trust-remote-code"]
    assert main([*args, "--eval-dtype", "bfloat16"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "cannot be scored in bfloat16 on cpu" in err and "Unsupported dtype BFloat16" in err
    assert "--eval-dtype float32" in err and "Traceback" not in err
    ck.assert_no_output(out)
    assert main([*args, "--eval-dtype", "float32"]) == 0  # what the message says to do works
    assert (out / "model.safetensors").is_file()


def test_a_stacked_soup_is_scored_as_written(kit: Kit, tmp_path: Path) -> None:
    """Slices that stack layers (3 of models of 2): the soup is scored in a model built from its config as
    written (its layer count, its per-layer lists), with the perplexity the written soup has in transformers;
    the ingredients are scored as saved, in their own architecture, and do not look independent."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    slices = [{"sources": [{"model": 0, "layer_range": [0, 2]}]}, {"sources": [{"model": 1, "layer_range": [1, 2]}]}]
    result = hub_soup.run(kit.recipe(out, [0, 1], method="passthrough", slices=slices))
    assert result is not None and result.report is not None
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert written.config.num_hidden_layers == len(written.model.layers) == 3
    assert kit.perplexity(written) == result.report.soup_score.value
    first = AutoModelForCausalLM.from_pretrained(kit.folders[0], dtype=torch.bfloat16).eval()
    assert kit.perplexity(first) == result.report.ingredient_scores[0].value
    assert not any("independent" in w for w in result.warnings)
