"""The soup's card says what is true of the soup: how to load it, from where, and what its method did."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.hub.resolve import ResolvedRef
from hub_soup.merging.methods import get_method, method_names
from hub_soup.report import AdapterCard
from tests.cards import card_of
from tests.hub_models import llama_folder


def _hub(repo: str) -> ResolvedRef:
    return ResolvedRef(ref=repo, kind="hub", repo_id=repo, sha="a" * 40)


def _card(config: dict | None, repo_id: str | None = "org/soup", method: str = "uniform", **parameters: object) -> str:
    """The card of a soup of two Hub ingredients (and a base, for a method that needs one)."""
    return card_of(
        [_hub("org/a"), _hub("org/b")], [0.5, 0.5], base=_hub("org/base") if get_method(method).needs_base else None,
        method=method, parameters=parameters, repo_id=repo_id, name="soup", config=config,
    ).text


def _snippet(card: str) -> str:
    """The Python code of the card's "How to use" section."""
    usage = card.split("## How to use", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    ("architecture", "auto"),
    [
        ("LlamaForCausalLM", "AutoModelForCausalLM"),
        ("BertForMaskedLM", "AutoModelForMaskedLM"),
        ("BertForSequenceClassification", "AutoModelForSequenceClassification"),
        ("BertForTokenClassification", "AutoModelForTokenClassification"),
        ("BertForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ("ViTForImageClassification", "AutoModelForImageClassification"),
    ],
)
def test_the_snippet_loads_a_transformers_soup_with_the_auto_class_of_its_head(architecture: str, auto: str) -> None:
    snippet = _snippet(_card({"model_type": "x", "architectures": [architecture]}))
    assert snippet == f"from transformers import {auto}\n\nmodel = {auto}.from_pretrained('org/soup')\n"
    assert hasattr(transformers, auto)


def test_a_head_the_card_does_not_know_says_so() -> None:
    snippet = _snippet(_card({"model_type": "bert", "architectures": ["BertModel"]}))
    assert "model = AutoModel.from_pretrained('org/soup')  # or the Auto class of its task" in snippet


def test_an_adapter_soups_base_is_loaded_with_the_head_of_the_adapters_task() -> None:
    """PEFT's ``task_type`` (CAUSAL_LM) says which head the adapters were trained with: the base gets it."""
    card = card_of(
        [_hub("org/lora-a"), _hub("org/lora-b")], [0.5, 0.5], base=_hub("org/base"), name="lora-soup",
        adapter=AdapterCard(merged=False, summary="An exact soup.", task_type="CAUSAL_LM"),
    )
    assert card.data.pipeline_tag == "text-generation"
    assert _snippet(card.text).splitlines()[1:] == [
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained('org/base', revision='{'a' * 40}')",
        "model = PeftModel.from_pretrained(base, './lora-soup')  # this folder, from the one that holds it",
    ]


def test_an_adapter_soups_local_base_is_named_as_the_recipe_names_it(tmp_path: Path) -> None:
    """No ``'path/to/base'`` placeholder when the base is known: a local one as the recipe wrote it, said to be
    a folder where the soup was made (a card names no absolute path of the maker's machine)."""
    base = ResolvedRef(ref="models/base", kind="local", path=tmp_path / "models" / "base")
    card = card_of(
        [_hub("org/lora-a"), _hub("org/lora-b")], [0.5, 0.5], base=base, repo_id="org/soup", name="lora-soup",
        adapter=AdapterCard(merged=False, summary="An exact soup.", task_type="CAUSAL_LM"),
    )
    line = next(line for line in _snippet(card.text).splitlines() if line.startswith("base = "))
    assert line == ("base = AutoModelForCausalLM.from_pretrained('models/base')  "
                    "# the base: a local folder where the soup was made")
    assert "path/to" not in card.text and str(tmp_path) not in card.text


def test_a_local_causal_lm_soups_snippet_loads_it_with_its_lm_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run as the card says, from the folder that holds the soup: the soup, LM head and all, not a bare model."""
    words = ["the", "soup", "is", "good"]
    llamas = [llama_folder(tmp_path / f"llama{i}", seed=i, words=words) for i in range(2)]
    soup = tmp_path / "soups" / "llm-soup"
    assert main(["--quiet", "merge", *map(str, llamas), "-o", str(soup)]) == 0
    card = (soup / "README.md").read_text()
    assert "path/to" not in card
    snippet = _snippet(card)
    assert "AutoModelForCausalLM.from_pretrained('./llm-soup')  # this folder, from the one that holds it" in snippet
    monkeypatch.chdir(soup.parent)
    scope: dict[str, object] = {}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a reader runs it
    model = scope["model"]
    assert isinstance(model, transformers.LlamaForCausalLM)
    written = load_file(soup / "model.safetensors")
    state = model.state_dict()
    assert written and all(torch.equal(state[key], value) for key, value in written.items())
    assert os.path.samefile(Path.cwd() / "llm-soup", soup)


def test_a_local_timm_soup_is_loaded_from_its_folder(tmp_path: Path) -> None:
    timm_config = {"architecture": "resnet18", "num_classes": 10}
    assert _snippet(_card(timm_config, repo_id=None)).splitlines()[-1] == (
        "model = timm.create_model('local-dir:./soup', pretrained=True)  # this folder, from the one that holds it"
    )
    assert "timm.create_model('hf-hub:org/soup', pretrained=True)\n" in _snippet(_card(timm_config))


@pytest.mark.parametrize("method", [m for m in method_names() if "normalize" in get_method(m).Parameters.model_fields])
def test_the_card_says_normalize_divided_only_when_it_did(method: str) -> None:
    """Each method with a ``normalize`` parameter says what it divided by when normalize was on, and says
    nothing of a division when it was off (the parameters list says ``normalize: False``)."""
    first = {
        on: next(line for line in _card(None, method=method, normalize=on).splitlines() if line.startswith("A merge"))
        for on in (False, True)
    }
    assert "normaliz" not in first[False] and "divided by the sum of" not in first[False], first[False]
    lambda_ = ", scaled by lambda" if "lambda_" in get_method(method).Parameters.model_fields else ""
    assert re.search(rf", divided by the sum of (the|their) weights \(normalize\){lambda_}", first[True])
    assert "{divided}" not in first[True]


def test_every_method_that_normalizes_names_its_divisor() -> None:
    for name in method_names():
        method = get_method(name)
        normalizes = "normalize" in method.Parameters.model_fields
        assert (method.divisor is not None) == normalizes == ("{divided}" in (method.summary or "")), name


RESCALING = [m for m in method_names() if "{rescaled}" in (get_method(m).summary or "")]


def test_every_dare_method_says_whether_it_rescaled() -> None:
    assert {"dare_linear", "dare_ties"} <= set(RESCALING)


@pytest.mark.parametrize("method", RESCALING)
def test_the_card_says_dare_rescaled_only_when_it_did(method: str) -> None:
    first = {
        on: next(line for line in _card(None, method=method, rescale=on).splitlines() if line.startswith("A merge"))
        for on in (False, True)
    }
    assert "divided by density" not in first[False] and "the kept ones not rescaled" in first[False], first[False]
    assert "the kept ones divided by density (rescale)" in first[True] and "{rescaled}" not in first[True]
