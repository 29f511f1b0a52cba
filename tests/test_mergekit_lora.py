"""mergekit's ``model+lora``: a PEFT LoRA adapter applied to a model before merging, as mergekit 0.1.5 does it
(PEFT's ``merge_and_unload``: each target weight plus ``lora_alpha / r * B @ A``, in the model's dtype), read
chunk by chunk without the merged model ever being written. The adapter is a real one: PEFT's
``get_peft_model`` on the corpus's tiny bf16 Llama, its factors random (B nonzero), saved by ``save_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from hub_soup.adapters.applied import apply_lora
from hub_soup.adapters.config import AdapterConfig
from hub_soup.cli import main
from hub_soup.io.read import open_checkpoint
from tests import mergekit_reference as R
from tests.hub_fixtures import TEST_USER
from tests.hub_models import lora_folder, unique, upload
from tests.hub_server import HubServer
from tests.test_mergekit_configs import CONFIGS, MODELS, build_models, expected_soup, run_config, weights

ADAPTER = "lora_a"  # the corpus's adapter of model_a (tests/mergekit_configs/README.md)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus's models, and ``lora_a``: a LoRA adapter of model_a (q_proj, v_proj; r 4, alpha 8)."""
    folder = build_models(tmp_path_factory.mktemp("mergekit-lora"))
    lora_folder(folder / "model_a", folder / ADAPTER, seed=7, r=4, alpha=8)
    return folder


def merged_definition(model: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """``model`` with ``adapter`` merged in by the definition: ``W + lora_alpha / r * B @ A`` in float64, stored
    in the model's dtype (as mergekit stores the merged model before merging it: PEFT in the model's dtype)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    scaling = config["lora_alpha"] / config["r"]
    merged = dict(model)
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            b = factors[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            merged[target] = (model[target].double() + scaling * (b.double() @ a.double())).to(model[target].dtype)
    return merged


def test_a_lora_source_runs_as_mergekit_defines_it(models: Path, tmp_path: Path) -> None:
    out = run_config(models, "linear_lora", tmp_path)
    config = yaml.safe_load((CONFIGS / "linear_lora.yml").read_text())
    inputs = {model: weights(models / model) for model in MODELS}
    inputs["model_a+lora_a"] = merged_definition(inputs["model_a"], models / ADAPTER)
    soup = weights(out)
    expected = expected_soup(config, inputs, sorted(soup))
    for key, tensor in soup.items():
        far = R.more_than_one_ulp(tensor, expected[key].to(torch.bfloat16))
        assert not far.any(), f"{key}: {int(far.sum())} elements more than one bf16 ulp from the definition"
    key = "model.layers.2.self_attn.q_proj.weight"  # the adapter changed what it targets
    without = (inputs["model_a"][key].double() + inputs["model_b"][key].double()) / 2
    assert R.more_than_one_ulp(soup[key], without).float().mean() > 0.5
    pinned = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert pinned["ingredients"][0]["lora"] == {"ref": "../lora_a"}  # read from the soup's folder
    again = tmp_path / "again"
    assert main(["run", str(out / "hub-soup.yaml"), "-o", str(again)]) == 0
    assert all(torch.equal(tensor, weights(again)[key]) for key, tensor in soup.items())


def test_peft_merge_and_unload_gives_the_same_ingredient(models: Path) -> None:
    """The adapted checkpoint, read whole or in chunks that cut rows, is PEFT's merged model within one ulp,
    and the definition's (float64, rounded once) within one ulp too."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(models / "model_a", dtype=torch.bfloat16)
    peft_merged = PeftModel.from_pretrained(model, models / ADAPTER).merge_and_unload().state_dict()
    definition = merged_definition(weights(models / "model_a"), models / ADAPTER)
    config = AdapterConfig(ADAPTER, json.loads((models / ADAPTER / "adapter_config.json").read_text()))
    with open_checkpoint(models / "model_a") as checkpoint, \
            open_checkpoint(models / ADAPTER, weights="adapter_model.safetensors") as adapter:
        applied = apply_lora(checkpoint, adapter, config, "model_a+lora_a")
        assert applied.metas == checkpoint.metas and applied.label == "model_a+lora_a"
        changed = 0
        for key, meta in applied.metas.items():
            whole = applied.read(key)
            assert whole.dtype == meta.dtype and tuple(whole.shape) == tuple(meta.shape)
            buffer, chunks = torch.empty(1000 * meta.dtype.itemsize, dtype=torch.uint8), []
            for start in range(0, meta.numel, 999):  # chunks that start and end inside rows
                count = min(999, meta.numel - start)
                chunks.append(applied.read_into(key, start, count, buffer).clone())
            assert torch.equal(torch.cat(chunks), whole.reshape(-1)), key
            assert not R.more_than_one_ulp(whole, peft_merged[key]).any(), key
            assert not R.more_than_one_ulp(whole, definition[key]).any(), key
            changed += not torch.equal(whole, checkpoint.read(key))
        assert changed == 2 * 4  # q_proj and v_proj of 4 layers


def test_hub_lora_is_pinned_with_its_model(models: Path, hub: HubServer, hub_token: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Model and adapter on the Hub: both resolved and pinned to their commits; ``convert`` prints the adapter as
    the ingredient's ``lora``, and the pinned recipe rebuilds the soup bit for bit."""
    api = HfApi(token=hub_token)
    repos = {name: f"{TEST_USER}/{unique(name.replace('_', '-'))}" for name in ("model_a", "model_b", ADAPTER)}
    shas = {name: upload(api, models / name, repo) for name, repo in repos.items()}
    config = tmp_path / "config.yml"
    config.write_text((CONFIGS / "linear_lora.yml").read_text().replace(
        "model_a+lora_a", f"{repos['model_a']}+{repos[ADAPTER]}").replace("model_b", repos["model_b"]))
    assert main(["convert", str(config)]) == 0
    native = yaml.safe_load(capsys.readouterr().out)
    assert native["ingredients"][0] == {"ref": repos["model_a"], "lora": {"ref": repos[ADAPTER]},
                                        "parameters": {"weight": 1.0}}
    out = tmp_path / "soup"
    assert main(["run", str(config), "-o", str(out)]) == 0
    pinned = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert pinned["ingredients"][0]["ref"] == repos["model_a"]
    assert pinned["ingredients"][0]["revision"] == shas["model_a"]
    assert pinned["ingredients"][0]["lora"] == {"ref": repos[ADAPTER], "revision": shas[ADAPTER]}
    card = (out / "README.md").read_text()  # the card names the adapter and its commit beside the model's
    assert (f"[{repos['model_a']}](https://huggingface.co/{repos['model_a']}) + LoRA "
            f"[{repos[ADAPTER]}](https://huggingface.co/{repos[ADAPTER]}) | `{shas['model_a'][:12]}` + "
            f"`{shas[ADAPTER][:12]}`") in card
    metadata = yaml.safe_load(card.split("---")[1])  # the model tree: the adapter beside its model, as mergekit's
    assert metadata["base_model"] == [repos["model_a"], repos[ADAPTER], repos["model_b"]]
    (tmp_path / "local").mkdir()
    local = run_config(models, "linear_lora", tmp_path / "local")  # the same config on local paths
    soup = weights(out)
    assert all(torch.equal(tensor, weights(local)[key]) for key, tensor in soup.items())  # the same soup
    again = tmp_path / "again"
    assert main(["run", str(out / "hub-soup.yaml"), "-o", str(again)]) == 0
    assert all(torch.equal(tensor, weights(again)[key]) for key, tensor in soup.items())


def _ulp(values: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at each value's binade (8 significant bits)."""
    return 2.0 ** (torch.floor(torch.log2(values.abs().clamp_min(2.0**-126))) - 7)


def _renamed_targets(adapter: Path, folder: Path) -> Path:
    """``adapter`` with its factors saved for modules the model does not have (q_proj named qkv_proj)."""
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({key.replace("q_proj", "qkv_proj"): t for key, t in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(("model", "said"), [
    ("model_a+tester/no-such-lora", "tester/no-such-lora"),
    ("model_a+./missing_lora", "'./missing_lora': no such local path"),
    ("model_a+model_b", "model_b: is applied as a LoRA adapter (model+lora) but has no adapter_config.json"),
    ("model_a+wrong_targets", ("the adapter wrong_targets does not fit the base model_a: the base has no "
                               "'model.layers.0.self_attn.qkv_proj.weight', 'model.layers.1.self_attn.qkv_proj.weight', "
                               "'model.layers.2.self_attn.qkv_proj.weight' and 1 more")),
    ("model_a+dora", "dora: DoRA (use_dora: true) rescales each weight"),
    ("model_a+lora_a+lora_a", "models.0.model: 'model_a+lora_a+lora_a' is not a model or a model+lora"),
])
def test_bad_lora_sources_stop_with_exit_2(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           model: str, said: str) -> None:
    _renamed_targets(models / ADAPTER, tmp_path / "wrong_targets")
    lora_folder(models / "model_a", tmp_path / "dora", seed=3, r=4, alpha=8, dora=True)
    config = tmp_path / "config.yml"
    config.write_text((CONFIGS / "linear_lora.yml").read_text().replace("model_a+lora_a", model))
    for name in MODELS:
        (tmp_path / name).symlink_to(models / name)
    assert main(["run", str(config), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_does_not_fit_its_hub_model_stops_before_the_download(
    models: Path, hub: HubServer, hub_token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    api = HfApi(token=hub_token)
    model, wrong = f"{TEST_USER}/{unique('model-a')}", f"{TEST_USER}/{unique('wrong-targets')}"
    upload(api, models / "model_a", model)
    upload(api, _renamed_targets(models / ADAPTER, tmp_path / "wrong"), wrong)
    config = tmp_path / "config.yml"
    config.write_text((CONFIGS / "linear_lora.yml").read_text().replace("model_a+lora_a", f"{model}+{wrong}")
                      .replace("model_b", str(models / "model_b")))
    assert main(["run", str(config), "-o", str(tmp_path / "out")]) == 2
    assert "does not fit the base" in capsys.readouterr().err
    cached = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}"
    assert not list(cached.glob("snapshots/*/model.safetensors"))  # its headers were read over HTTP, nothing more


def test_a_base_with_a_lora_is_the_base_it_makes(models: Path, tmp_path: Path) -> None:
    """``base_model: base+lora_a`` (listed among the models too, as published configs do): the task vectors are
    taken from the base with the adapter merged in."""
    text = ("models:\n  - model: base+lora_a\n  - model: model_a\n    parameters:\n      weight: 0.7\n"
            "  - model: model_b\n    parameters:\n      weight: 0.4\nmerge_method: task_arithmetic\n"
            "base_model: base+lora_a\ndtype: bfloat16\n")
    (tmp_path / "base_lora.yml").write_text(text)
    for model in models.iterdir():
        (tmp_path / model.name).symlink_to(model)
    assert main(["run", str(tmp_path / "base_lora.yml"), "-o", str(tmp_path / "soup")]) == 0
    soup = weights(tmp_path / "soup")
    inputs = {model: weights(models / model) for model in MODELS}
    inputs["base+lora_a"] = merged_definition(inputs["base"], models / ADAPTER)
    expected = expected_soup(yaml.safe_load(text), inputs, sorted(soup))
    for key, tensor in soup.items():
        far = R.more_than_one_ulp(tensor, expected[key].to(torch.bfloat16))
        # where 0.7 (a - base) + 0.4 (b - base) cancels base (its weight -0.1) to about 0, float64's own rounding of
        # the terms (2**-53 of them, in any order) is more than a bfloat16 ulp of the result
        terms = sum(inputs[model][key].double().abs() for model in ("base+lora_a", "model_a", "model_b"))
        rounding = (tensor.double() - expected[key]).abs() <= 2.0 ** -50 * terms
        assert not (far & ~rounding).any(), key
    pinned = yaml.safe_load((tmp_path / "soup" / "hub-soup.yaml").read_text())
    assert pinned["base"]["lora"] == {"ref": "../lora_a"} and len(pinned["ingredients"]) == 2


def test_an_embedding_lora_and_a_saved_head_are_applied_as_peft_applies_them(models: Path, tmp_path: Path) -> None:
    """A LoRA on the embedding (its delta transposed) and a head in ``modules_to_save`` (saved whole, replacing the
    model's): the adapted reads, in chunks, are the float64 definition rounded once (within one ulp), and PEFT's
    merge_and_unload within its own roundings (it rounds the delta to bf16 before adding it in bf16)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(models / "model_a", dtype=torch.bfloat16), LoraConfig(
        r=2, lora_alpha=6, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_((0.1 * torch.randn(parameter.shape, generator=generator)).to(parameter.dtype))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = LlamaForCausalLM.from_pretrained(models / "model_a", dtype=torch.bfloat16)
    peft_merged = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    saved, original = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), weights(models / "model_a")
    deltas = {}  # the definition: scaling lora_alpha / r = 3, the embedding's delta transposed
    for key, a in saved.items():
        if ".lora_" in key and ("lora_A" in key or "embedding_A" in key):
            b = saved[key.replace("lora_A", "lora_B").replace("embedding_A", "embedding_B")].double()
            delta = 3 * (b @ a.double())
            target = key.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
            deltas[target] = delta.T if "embedding" in key else delta
    head = saved["base_model.model.lm_head.weight"]  # modules_to_save: saved whole under the module's name
    config = AdapterConfig("adapter", json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    with open_checkpoint(models / "model_a") as checkpoint, \
            open_checkpoint(tmp_path / "adapter", weights="adapter_model.safetensors") as adapter:
        applied = apply_lora(checkpoint, adapter, config, "model_a+adapter")
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(applied.changes)
        for key, meta in applied.metas.items():
            buffer = torch.empty(meta.numel * meta.dtype.itemsize, dtype=torch.uint8)
            chunks = [applied.read_into(key, start, min(333, meta.numel - start), buffer).clone()
                      for start in range(0, meta.numel, 333)]
            ours = torch.cat(chunks).view(meta.shape)
            delta = deltas.get(key, torch.zeros(meta.shape, dtype=torch.float64))
            exact = head.double() if key == "lm_head.weight" else original[key].double() + delta
            assert not R.more_than_one_ulp(ours, exact).any(), key
            # PEFT's own roundings: the delta to bf16 (half an ulp of it, one where float32 flips it), the sum
            assert ((ours.double() - peft_merged[key].double()).abs() <= _ulp(exact) + _ulp(delta)).all(), key
        assert len(deltas) == 5 and not torch.equal(applied.read("lm_head.weight"), checkpoint.read("lm_head.weight"))


def test_an_applied_adapter_is_an_input_and_adapters_take_none(models: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The output is never the adapter applied to a model (with --overwrite it would be replaced by the soup);
    and a soup of LoRA adapters takes no adapter applied to one of them."""
    shutil.copy(CONFIGS / "linear_lora.yml", tmp_path / "linear_lora.yml")
    for model in models.iterdir():
        (tmp_path / model.name).symlink_to(model)
    assert main(["run", str(tmp_path / "linear_lora.yml"), "-o", str(tmp_path / ADAPTER), "--overwrite"]) == 2
    assert f"the output {tmp_path / ADAPTER} is the LoRA adapter lora_a" in capsys.readouterr().err
    recipe = tmp_path / "adapters.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [{"ref": ADAPTER, "lora": {"ref": ADAPTER}}, {"ref": ADAPTER}]}))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "lora_a: a LoRA adapter applied to an adapter" in capsys.readouterr().err
