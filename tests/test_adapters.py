"""LoRA adapter soups: real PEFT adapters of tiny Llama and BERT bases, souped exactly.

Adapters are made by PEFT itself (``get_peft_model``, random ``A`` and ``B`` so the deltas are
not zero, ``save_pretrained``) and the soups are loaded back by PEFT. Expected values come from
the formula ``base + sum_i w_i * s_i * B_i @ A_i`` computed here in float64 from the adapters'
files, never from hub-soup's own functions.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, LlamaForCausalLM

import hub_soup
from hub_soup.cli import main
from tests.hub_fixtures import TEST_USER
from tests.hub_models import bert_folder, llama_folder, lora_folder, unique, upload
from tests.hub_server import HubServer

WORDS = ["the", "soup", "is", "good", "bad", "very", "not"]
IDS = torch.tensor([[3, 4, 5, 6, 7, 3, 8, 9]])
PREFIX = "base_model.model."


def _is_bert(base: Path) -> bool:
    return json.loads((base / "config.json").read_text())["model_type"] == "bert"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A tiny Llama base and three adapters: rank 4 (alpha 8, v_proj at rank 2 and alpha 16), rank 8 with
    rsLoRA (alpha 4), and another rank 4 (alpha 16)."""
    root = tmp_path_factory.mktemp("llama-loras")
    base = llama_folder(root / "base", seed=0, words=WORDS)
    a = lora_folder(base, root / "lora-a", 1, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})
    b = lora_folder(base, root / "lora-b", 2, r=8, alpha=4, rslora=True)
    c = lora_folder(base, root / "lora-c", 3, r=4, alpha=16)
    return base, a, b, c


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny BERT classifier base and two adapters (rank 4 and 8) that also train its head (modules_to_save)."""
    root = tmp_path_factory.mktemp("bert-loras")
    base = bert_folder(root / "base", seed=0)
    return base, lora_folder(base, root / "lora-a", 4, r=4, alpha=8), lora_folder(base, root / "lora-b", 5, r=8, alpha=8)


def deltas(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An adapter's deltas by base weight (``s * B @ A`` in float64, PEFT's scaling from its config) and its full
    tensors by base key (the head)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out, full = {}, {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")].double()
            alpha = next((v for k, v in config["alpha_pattern"].items() if module.endswith(k)), config["lora_alpha"])
            rank = value.shape[0]
            out[f"{module}.weight"] = alpha / (math.sqrt(rank) if config["use_rslora"] else rank) * b @ value.double()
        elif ".lora_" not in key:
            full[key.removeprefix(PREFIX)] = value.double()
    return out, full


def expected_model(base: Path, adapters: list[Path], weights: list[float]) -> torch.nn.Module:
    """The base with ``sum_i w_i dW_i`` added (w normalised to sum to 1) and the heads averaged, from the formula."""
    bert = _is_bert(base)
    model = (BertForSequenceClassification if bert else LlamaForCausalLM).from_pretrained(base).eval()
    state = {k: v.double() for k, v in model.state_dict().items()}
    total = sum(weights)
    heads: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights):
        delta, full = deltas(adapter)
        for key, value in delta.items():
            state[key] += weight / total * value
        for key, value in full.items():
            heads[key] = heads.get(key, torch.zeros_like(value)) + weight / total * value
    state.update(heads)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def on_base(base: Path, soup: Path) -> torch.nn.Module:
    bert = _is_bert(base)
    return PeftModel.from_pretrained((BertForSequenceClassification if bert else LlamaForCausalLM).from_pretrained(base),
                                     soup).eval()


def test_exact_soup_loads_in_peft_and_equals_the_base_plus_the_weighted_mean_delta(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, a, b, _ = llama
    soup = tmp_path / "soup"
    assert main(["merge", str(a), str(b), "--weights", "1", "3", "-o", str(soup)]) == 0
    assert sorted(p.name for p in soup.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "hub-soup.yaml"
    ]
    config = json.loads((soup / "adapter_config.json").read_text())
    # q_proj: 4 + 8; v_proj: 2 + 8, in rank_pattern; every module's own scaling is 1
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)
    assert set(config["rank_pattern"].values()) == {10} and config["alpha_pattern"] == config["rank_pattern"]
    assert config["base_model_name_or_path"] == str(base)
    got, want = outputs(on_base(base, soup)), outputs(expected_model(base, [a, b], [1, 3]))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert (got - outputs(LlamaForCausalLM.from_pretrained(base).eval())).abs().max() > 1e-2  # the deltas count
    card = (soup / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "library_name: peft" in card and "exact soup of 2 LoRA" in card
    assert "combined from the adapters' deltas" in capsys.readouterr().out

    pinned = yaml.safe_load((soup / "hub-soup.yaml").read_text())
    assert (soup / pinned["adapter_base"]["ref"]).resolve() == base.resolve()  # the base the adapters named, pinned
    rebuilt = tmp_path / "rebuilt"
    assert main(["run", str(soup / "hub-soup.yaml"), "-o", str(rebuilt)]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "hub-soup.yaml"):
        assert (rebuilt / name).read_bytes() == (soup / name).read_bytes()


def test_a_given_adapter_base_is_pinned_as_adapter_base_and_the_soup_rebuilds_from_it(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--adapter-base`` names another copy of the adapters' base: the pinned recipe records it in its own field
    (``base`` is a method's, and stays out), ``validate`` accepts that recipe, and ``run`` rebuilds the soup."""
    base, a, b, _ = llama
    copy = Path(shutil.copytree(base, tmp_path / "models" / "base-copy"))
    soup = tmp_path / "soups" / "soup"
    assert main(["merge", str(a), str(b), "--adapter-base", str(copy), "-o", str(soup)]) == 0
    pinned = yaml.safe_load((soup / "hub-soup.yaml").read_text())
    assert "base" not in pinned and (soup / pinned["adapter_base"]["ref"]).resolve() == copy.resolve()
    assert main(["validate", str(soup / "hub-soup.yaml")]) == 0
    rebuilt = tmp_path / "rebuilt"
    assert main(["run", str(soup / "hub-soup.yaml"), "-o", str(rebuilt)]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "hub-soup.yaml"):
        assert (rebuilt / name).read_bytes() == (soup / name).read_bytes()
    capsys.readouterr()

    assert main(["merge", str(a), str(b), "--base", str(copy), "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "a base is given but method uniform uses none" in err and "--adapter-base" in err.split("hint:", 1)[1]
    assert not (tmp_path / "s").exists()


def test_averaging_lora_a_and_lora_b_separately_is_measurably_wrong(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    """The trap: for two rank-4 adapters the mean of the products is not the product of the means."""
    base, _, _, c = llama
    d = lora_folder(base, tmp_path / "lora-d", 9, r=4, alpha=16)
    soup = tmp_path / "soup"
    assert main(["merge", str(c), str(d), "-o", str(soup)]) == 0
    written = load_file(soup / "adapter_model.safetensors")
    (dc, _), (dd, _) = deltas(c), deltas(d)
    key = "model.layers.0.self_attn.q_proj"
    exact = (dc[f"{key}.weight"] + dd[f"{key}.weight"]) / 2
    ours = written[f"{PREFIX}{key}.lora_B.weight"].double() @ written[f"{PREFIX}{key}.lora_A.weight"].double()
    tensors = [load_file(p / "adapter_model.safetensors") for p in (c, d)]
    mean_a = sum(t[f"{PREFIX}{key}.lora_A.weight"].double() for t in tensors) / 2
    mean_b = sum(t[f"{PREFIX}{key}.lora_B.weight"].double() for t in tensors) / 2
    naive = 16 / 4 * mean_b @ mean_a
    assert (ours - exact).norm() / exact.norm() < 1e-6
    assert (naive - exact).norm() / exact.norm() > 0.5  # 68% here


def test_merge_into_base_equals_peft_merge_and_unload_of_the_exact_soup(
    bert: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, a, b = bert
    exact, merged = tmp_path / "exact", tmp_path / "merged"
    assert main(["merge", str(a), str(b), "-o", str(exact)]) == 0
    assert main(["merge", str(a), str(b), "--merge-into-base", "-o", str(merged)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in merged.iterdir()}
    ours = load_file(merged / "model.safetensors")
    peft_merged = on_base(base, exact).merge_and_unload().state_dict()
    assert set(ours) == set(peft_merged)
    for key, value in peft_merged.items():
        assert ours[key].dtype == value.dtype
        assert torch.allclose(ours[key], value, atol=1e-6, rtol=0), key
    heads = [load_file(p / "adapter_model.safetensors")[f"{PREFIX}classifier.weight"] for p in (a, b)]
    assert torch.allclose(ours["classifier.weight"], (heads[0] + heads[1]) / 2, atol=1e-7)
    got = BertForSequenceClassification.from_pretrained(merged).eval()
    want = expected_model(base, [a, b], [1, 1])
    assert (outputs(got) - outputs(want)).abs().max() < 1e-5
    card = (merged / "README.md").read_text()
    assert "base_model_relation: merge" in card and "library_name: transformers" in card


def test_max_rank_reports_the_reconstruction_error_and_is_exact_at_the_total_rank(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, a, b, _ = llama
    caplog.set_level("INFO", logger="hub_soup")
    assert main(["merge", str(a), str(b), "--max-rank", "3", "-o", str(tmp_path / "r3")]) == 0
    line = next(r.getMessage() for r in caplog.records if "--max-rank 3" in r.getMessage())
    overall, worst = (float(x) for x in re.findall(r"([0-9.e-]+) overall, worst ([0-9.e-]+)", line)[0])
    assert 0.05 < overall <= worst < 1
    assert "reconstruction error" in (tmp_path / "r3" / "README.md").read_text()
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert (config["r"], config["rank_pattern"]) == (3, {})
    reduced, want = outputs(on_base(base, tmp_path / "r3")), outputs(expected_model(base, [a, b], [1, 1]))
    assert (reduced - want).abs().max() > 1e-4

    caplog.clear()
    assert main(["merge", str(a), str(b), "--max-rank", "64", "-o", str(tmp_path / "r64")]) == 0
    line = next(r.getMessage() for r in caplog.records if "--max-rank 64" in r.getMessage())
    assert float(re.findall(r"([0-9.e-]+) overall", line)[0]) < 1e-6
    assert (outputs(on_base(base, tmp_path / "r64")) - want).abs().max() < 1e-5


def test_recipe_and_python_api_make_the_same_soup_as_the_cli(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    base, a, b, c = llama
    assert main(["merge", str(a), str(b), str(c), "--merge-into-base", "-o", str(tmp_path / "cli")]) == 0
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "ingredients": [{"ref": str(p)} for p in (a, b, c)], "output": {"path": "recipe", "merge_into_base": True},
    }))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    result = hub_soup.merge([str(a), str(b), str(c)], tmp_path / "api", merge_into_base=True)
    assert result is not None and result.base is not None and result.base.path == base.resolve()
    cli = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert (tmp_path / "recipe" / "model.safetensors").read_bytes() == cli
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == cli


def test_greedy_scores_each_adapter_and_each_candidate_on_the_base(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    base, a, b, c = llama
    texts = ["the soup is good", "the soup is very good", "the soup is not bad", "soup is good", "the soup"]
    data = tmp_path / "texts"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(data))
    out = tmp_path / "soup"
    argv = ["merge", str(a), str(b), str(c), "--greedy", "--eval-task", "causal-lm", "--eval-data", str(data), "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(str(p) in printed for p in (a, b, c)) and f"base ({base})" in printed  # each alone, and the base
    card = (out / "README.md").read_text()
    assert "perplexity" in card
    kept = [p for p in (a, b, c) if re.search(rf"`{re.escape(str(p))}` \| local \| [0-9.]+ \| yes", card)]
    assert kept  # the written adapter is the soup greedy kept, scored as the base with its delta
    got, want = outputs(on_base(base, out)), outputs(expected_model(base, kept, [1] * len(kept)))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert recipe["greedy"] is True and len(recipe["ingredients"]) == 3


def test_dora_mixed_ingredients_and_full_model_flags_are_refused(
    llama: tuple[Path, Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, a, _, _ = llama
    dora = lora_folder(base, tmp_path / "dora", 7, r=4, alpha=8, dora=True)
    assert main(["merge", str(a), str(dora), "-o", str(tmp_path / "s")]) == 2
    assert "DoRA (use_dora: true)" in capsys.readouterr().err
    assert main(["merge", str(a), str(base), "-o", str(tmp_path / "s")]) == 2
    assert "is a LoRA adapter (adapter_config.json) and" in capsys.readouterr().err
    assert main(["merge", str(base), str(base), "--max-rank", "4", "-o", str(tmp_path / "s")]) == 2
    assert "max_rank is for soups of LoRA adapters" in capsys.readouterr().err
    assert main(["merge", str(a), str(a), "--exclude", "*v_proj*", "-o", str(tmp_path / "s")]) == 2
    assert "an adapter soup combines every tensor of its adapters" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def _on_hub(api: HfApi, adapter: Path, tmp: Path, base_repo: str) -> str:
    """``adapter`` uploaded with its config naming ``base_repo``, as an adapter trained on the Hub base names it."""
    folder = tmp / unique(adapter.name)
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_repo}))
    repo = f"{TEST_USER}/{folder.name}"
    upload(api, folder, repo)
    return repo


def test_hub_adapters_pin_their_base_and_never_download_its_weights(
    llama: tuple[Path, Path, Path, Path], hub: HubServer, hub_token: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, a, b, _ = llama
    api = HfApi(token=hub_token)
    base_repo = f"{TEST_USER}/{unique('llama-base')}"
    sha = upload(api, base, base_repo)
    repos = [_on_hub(api, adapter, tmp_path, base_repo) for adapter in (a, b)]
    out = tmp_path / "soup"
    hub.requests.clear()
    assert main(["merge", *repos, "-o", str(out)]) == 0
    cached = Path(constants.HF_HUB_CACHE) / f"models--{base_repo.replace('/', '--')}"
    assert not list(cached.glob("snapshots/*/model.safetensors"))  # its header was read over HTTP, nothing downloaded
    assert not list(Path(constants.HF_HUB_CACHE).glob("models--*/snapshots/*/adapter_model.safetensors"))[2:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (base_repo, sha)
    card = (out / "README.md").read_text()
    assert f"base_model:\n- {base_repo}\n" in card and all(repo in card for repo in repos)  # the base alone
    # the base loaded with the head the adapters were trained on (their task_type: CAUSAL_LM), not bare
    assert f"base = AutoModelForCausalLM.from_pretrained('{base_repo}', revision='{sha}')" in card
    assert yaml.safe_load((out / "hub-soup.yaml").read_text())["adapter_base"] == {"ref": base_repo, "revision": sha}
    got, want = outputs(on_base(base, out)), outputs(expected_model(base, [a, b], [1, 1]))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()

    other = f"{TEST_USER}/{unique('not-the-base')}"
    api.create_repo(other)
    assert main(["merge", *repos, "--adapter-base", other, "-o", str(tmp_path / "other")]) == 2
    assert f"the base {other} is not the base the adapters were trained on" in capsys.readouterr().err
    assert main(["merge", *repos, "--adapter-base", str(base), "-o", str(tmp_path / "local")]) == 0  # a local copy
    assert (tmp_path / "local" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_an_adapter_of_another_base_stops_before_any_download(
    llama: tuple[Path, Path, Path, Path], hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, a, b, _ = llama
    api = HfApi(token=hub_token)
    ours, other = f"{TEST_USER}/{unique('llama-base')}", f"{TEST_USER}/{unique('other-base')}"
    repos = [_on_hub(api, a, tmp_path, ours), _on_hub(api, b, tmp_path, other)]
    hub.requests.clear()
    assert main(["merge", *repos, "-o", str(tmp_path / "soup")]) == 2
    err = capsys.readouterr().err
    assert f"base_model_name_or_path is '{ours}' in" in err and f"'{other}' in" in err
    downloads = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert downloads and all(p.endswith("/adapter_config.json") for p in downloads)  # configs only: no weights
    assert not (tmp_path / "soup").exists()
