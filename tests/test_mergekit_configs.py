"""mergekit configs run as they are: ``hub-soup run CONFIG.yml`` on tiny bf16 Llamas of 4 layers, each soup
tensor compared with the float64 definition (tests/mergekit_reference.py) at the parameters mergekit's
resolution gives it, rounded once to bf16: within one bf16 ulp."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hub_soup.cli import main
from hub_soup.errors import RecipeError
from hub_soup.merging.methods import get_method, method_names
from hub_soup.recipe import load_recipe
from tests import mergekit_reference as R
from tests.checkpoints import perturb_

CONFIGS = Path(__file__).parent / "mergekit_configs"
LAYERS = 4
MODELS = {"base": None, "model_a": 1, "model_b": 2, "model_c": 3}
# every config but the LoRA one (its adapter is built and its soup checked in tests/test_mergekit_lora.py)
CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.yml") if p.stem != "linear_lora")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, model_a, model_b, model_c: tiny bf16 LlamaForCausalLM folders with 4 layers (fine-tunes: base perturbed)."""
    return build_models(tmp_path_factory.mktemp("mergekit"))


def build_models(folder: Path) -> Path:
    """The corpus's models (:data:`MODELS`) in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for name, seed in MODELS.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        if seed is not None:
            perturb_(model, seed, scale=0.002)
        model.to(torch.bfloat16).save_pretrained(folder / name)
    return folder


def run_config(models: Path, name: str, tmp_path: Path, *more: str) -> Path:
    shutil.copy(CONFIGS / f"{name}.yml", tmp_path / f"{name}.yml")
    for model in models.iterdir():  # the corpus's models, and any adapter built beside them
        (tmp_path / model.name).symlink_to(model)
    out = tmp_path / "soup"
    assert main(["run", str(tmp_path / f"{name}.yml"), "-o", str(out), *more]) == 0
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        found |= load_file(file)
    return found


def _layer(key: str) -> int | None:
    found = re.search(r"layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def _relayer(key: str, layer: int) -> str:
    return re.sub(r"layers\.\d+\.", f"layers.{layer}.", key, count=1)


def reference_parameters(method: str) -> dict[str, tuple[object, type]]:
    """The reference definition's keyword parameters (mergekit's names: ``lambda``), each its default
    (``R.MISSING``: required) and the type a YAML value is read as."""
    found = {}
    for name, parameter in inspect.signature(R.METHODS[method]).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or name == "clamp_t_at_zero":
            continue
        default = R.MISSING if parameter.default is inspect.Parameter.empty else parameter.default
        kind = type(default) if isinstance(default, (bool, int)) else float
        found["lambda" if name == "lambda_" else name] = (default, kind)
    return found


def expected_soup(config: dict, inputs: dict[str, dict[str, torch.Tensor]], out_keys: list[str]
                  ) -> dict[str, torch.Tensor]:
    """Each output tensor by the reference: mergekit's pieces (the models as one slice of every layer, or the
    slices), its positions and scopes (source > slice > global; shared ones from the slice on), a parameter
    per model where hub-soup's method declares it so (its ingredient_parameters, and weight)."""
    name = config["merge_method"]
    method = get_method(name)
    per_model = {*method.ingredient_parameters, *(("weight",) if method.uses_weights else ())}
    reference = R.METHODS[name]
    base_is_required = inspect.signature(reference).parameters["base"].default is inspect.Parameter.empty
    base = config.get("base_model")
    if "slices" in config:
        pieces = [(s.get("parameters") or {}, s["sources"]) for s in config["slices"]]
    else:
        pieces = [({}, [{"model": m["model"], "layer_range": [0, LAYERS], "parameters": m.get("parameters")}
                        for m in config["models"]])]
    if base is not None and base not in [s["model"] for _, s_ in pieces for s in s_]:
        pieces = [(p, [{"model": base, "layer_range": s[0]["layer_range"]}, *s]) for p, s in pieces]
    out_layers = [(piece, offset) for piece in pieces for offset in range(piece[1][0]["layer_range"][1]
                                                                          - piece[1][0]["layer_range"][0])]
    expected = {}
    for key in out_keys:
        layer = _layer(key)
        if layer is None:
            piece, offset, count = (pieces[0] if "embed" in key else pieces[-1]), None, None
        else:
            piece, offset = out_layers[layer]
            count = piece[1][0]["layer_range"][1] - piece[1][0]["layer_range"][0]
        scope, sources = piece

        def source_key(source: dict, key: str = key, offset: int | None = offset) -> str:
            return key if offset is None else _relayer(key, source["layer_range"][0] + offset)

        uses_base = method.needs_base or (method.optional_base and base is not None)
        if uses_base or (base_is_required and base is not None):  # the base in its role (SLERP's t = 0)
            anchor_source = next(s for s in sources if s["model"] == base)
            others = [s for s in sources if s["model"] != base]
        else:
            anchor_source, others = None, sorted(sources, key=lambda s: s["model"] != base)  # base first
        anchor = inputs[anchor_source["model"]][source_key(anchor_source)] if anchor_source else None
        tensors = [inputs[s["model"]][source_key(s)] for s in others]
        arguments = {}
        for parameter, (default, kind) in reference_parameters(name).items():
            if parameter in per_model:
                values = [R.resolve_scopes(parameter, [s.get("parameters"), scope, config.get("parameters")],
                                           source_key(s), offset, count, default=default, value_type=kind)
                          for s in others]
                if all(v is None for v in values):
                    continue
                value: object = values[0] if method.exact_ingredients == 1 else values  # passthrough: one input
            else:
                value = R.resolve_scopes(parameter, [scope, config.get("parameters")], key, offset, count,
                                         default=default, value_type=kind)
            arguments["lambda_" if parameter == "lambda" else parameter] = value
        if name == "model_stock":  # hub-soup's deliberate difference, named in the README and the card
            arguments["clamp_t_at_zero"] = True
        if len(tensors) + (anchor is not None) == 1 and name != "passthrough":
            expected[key] = tensors[0]  # one source: the layer copied
        else:
            expected[key] = reference(tensors, anchor, **arguments)
    return expected


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_runs_as_mergekit_defines_it(models: Path, tmp_path: Path, name: str) -> None:
    config = yaml.safe_load((CONFIGS / f"{name}.yml").read_text())
    if config["merge_method"] not in method_names():
        pytest.skip(f"method {config['merge_method']} is not registered yet")
    try:
        load_recipe(CONFIGS / f"{name}.yml")
    except RecipeError as exc:  # a parameter value the method does not take yet (model_stock's filter_wise)
        if "is not supported" not in exc.message:
            raise
        pytest.skip(f"method {config['merge_method']}: {exc.message.split(': ', 1)[1]}")
    if config["merge_method"] in R.RANDOM_METHODS:
        pytest.skip(f"method {config['merge_method']} draws masks: its soups are checked by their law "
                    "(dare_ties: test_dare_ties_with_the_base_listed)")
    out = run_config(models, name, tmp_path)
    soup = weights(out)
    inputs = {model: weights(models / model) for model in MODELS}
    expected = expected_soup(config, inputs, sorted(soup))
    for key, tensor in soup.items():
        assert tensor.shape == expected[key].shape, key
        far = R.more_than_one_ulp(tensor, expected[key].to(torch.float64).to(torch.bfloat16))
        assert not far.any(), f"{name} {key}: {int(far.sum())} elements more than one bf16 ulp from the definition"
    # the soup says what made it
    assert (out / "mergekit_config.yml").read_text() == (CONFIGS / f"{name}.yml").read_text()
    card = (out / "README.md").read_text()
    assert "mergekit" in card and "merge" in card and "```yaml" in card


def test_stacked_soup_loads_with_its_layer_count(models: Path, tmp_path: Path) -> None:
    if "passthrough" not in method_names():
        pytest.skip("method passthrough is not registered yet")
    from transformers import AutoModelForCausalLM

    out = run_config(models, "passthrough_stack", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert len(model.model.layers) == 6


def test_dare_ties_with_the_base_listed(models: Path, tmp_path: Path) -> None:
    """The base listed among the models is the base, not a fine-tune; each fine-tune's task vector is kept at
    about its density (the soup differs from the base where any of them is kept)."""
    out = run_config(models, "dare_ties_base_listed", tmp_path)
    pinned = yaml.safe_load((out / "hub-soup.yaml").read_text())
    assert [Path(i["ref"]).name for i in pinned["ingredients"]] == ["model_a", "model_b", "model_c"]
    soup, base = weights(out), weights(models / "base")
    key = "model.layers.1.mlp.up_proj.weight"
    changed = (soup[key] != base[key]).double().mean().item()
    assert 1 - 0.47**3 - 0.05 < changed < 1 - 0.47**3 + 0.05


def test_convert_prints_the_recipe_and_the_pinned_one_rebuilds(models: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``convert`` prints the native recipe (without the config's text: a recipe to edit makes another soup);
    the soup's pinned ``hub-soup.yaml`` remembers the config, and its rebuild (in a folder of the same name, as
    the card names it) writes every file byte for byte, ``mergekit_config.yml`` and the card among them. The
    models are named by absolute paths, as a Hub id names its model from anywhere (a relative path is written
    relative to the soup's folder in the pinned recipe, and the card names a local model as its recipe does)."""
    assert main(["convert", str(CONFIGS / "ties_int8_normalize.yml")]) == 0
    native = yaml.safe_load(capsys.readouterr().out)
    assert native["method"] == "ties" and native["ingredients"][1]["parameters"]["weight"] == [0, 0.3, 0.7, 1]
    assert "mergekit_config" not in native
    config = tmp_path / "absolute.yml"
    config.write_text(re.sub(r"(model: |base_model: )(\w+)", lambda m: m[1] + str(models / m[2]),
                             (CONFIGS / "ties_int8_normalize.yml").read_text()))
    out = tmp_path / "absolute" / "soup"
    assert main(["run", str(config), "-o", str(out)]) == 0
    pinned = out.rename(tmp_path / "absolute" / "first")
    assert main(["run", str(pinned / "hub-soup.yaml"), "-o", str(out)]) == 0
    files = sorted(p.name for p in pinned.iterdir())
    assert {"mergekit_config.yml", "README.md", "hub-soup.yaml"} <= set(files)
    assert sorted(p.name for p in out.iterdir()) == files
    for name in files:
        assert (out / name).read_bytes() == (pinned / name).read_bytes(), name


@pytest.mark.parametrize(("text", "line", "named"), [
    ("models:\n  - model: a\nmerge_method: ties\nbase_model: b\nmerge_methd: x\n", 5, "merge_methd"),
    ("models:\n  - model: a\n  - model: c\nmerge_method: ties\nbase_model: b\ntokenizer_source: [union]\n", 6,
     "tokenizer_source"),
    (("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 4]\n      - model: b\n        layer_range: [0, 4]\n"
      "merge_method: slerp\nbase_model: a\nparameters:\n  t: [0, {x: 1}]\n"), 10, "parameters.t"),
    ("models:\n  - model: a\n  - model: c\nmerge_method: ties\nbase_model: b\nparameters:\n  rescale_x: true\n", 7,
     "rescale_x"),
    # the listed base is left out: the third model is ingredient 1, its line the model's own
    (("models:\n  - model: b\n  - model: a\n  - model: c\n    parameters:\n      density: 2\n      weight: 1\n"
     "merge_method: ties\nbase_model: b\n"), 6, "density"),
    (("models:\n  - model: b\n  - model: a\n  - model: c\n    parameters:\n      weight: .nan\n"
     "merge_method: task_arithmetic\nbase_model: b\n"), 6, "weight"),
])
def test_bad_configs_name_the_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int,
                                           named: str) -> None:
    path = tmp_path / "config.yml"
    path.write_text(text)
    for command in ("validate", "run"):
        assert main([command, str(path), *(["-o", str(tmp_path / "out")] if command == "run" else [])]) == 2
        err = capsys.readouterr().err
        assert f"config.yml:{line}:" in err and named in err and "Traceback" not in err


def test_run_flags_add_to_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``run``'s evaluation and push flags fill the sections a mergekit config has not: checked as a recipe's."""
    shutil.copy(CONFIGS / "model_stock.yml", tmp_path / "model_stock.yml")
    assert main(["run", str(tmp_path / "model_stock.yml"), "-o", str(tmp_path / "out"), "--greedy"]) == 2
    assert "greedy: true needs an eval section" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "model_stock.yml"), "-o", str(tmp_path / "out"), "--push", "nope"]) == 2
    assert "push.repo_id: repo_id must look like 'org/name', got 'nope'" in capsys.readouterr().err
    # greedy chooses among whole models: a config of slices is scored as written, and the hint says so
    shutil.copy(CONFIGS / "passthrough_stack.yml", tmp_path / "stack.yml")
    assert main(["run", str(tmp_path / "stack.yml"), "-o", str(tmp_path / "out"), "--greedy",
                 "--eval-task", "causal-lm", "--eval-data", "texts"]) == 2
    err = capsys.readouterr().err
    assert "greedy: greedy soups try subsets of whole models" in err and "hint: drop --greedy" in err


def test_slices_stack_layers_and_the_soup_loads(models: Path, tmp_path: Path) -> None:
    """A native recipe's slices of one model each: every layer copied from its source, 6 layers from models of 4,
    the embeddings from the first slice's model and the head from the last's; config.json says 6 layers, and
    transformers loads the soup and generates."""
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "stack.yaml"
    recipe.write_text(yaml.safe_dump({
        "ingredients": [{"ref": str(models / "model_a")}, {"ref": str(models / "model_b")}],
        "slices": [{"sources": [{"model": 0, "layer_range": [0, 3]}]},
                   {"sources": [{"model": 1, "layer_range": [1, 4]}]}],
    }))
    out = tmp_path / "soup"
    assert main(["run", str(recipe), "-o", str(out)]) == 0
    soup, a, b = weights(out), weights(models / "model_a"), weights(models / "model_b")
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for key, tensor in soup.items():
        layer = _layer(key)
        if layer is None:
            expected = (a if "embed" in key else b)[key]
        else:
            model, source = sources[layer]
            expected = model[_relayer(key, source)]
        assert torch.equal(tensor, expected), key
    assert len({_layer(k) for k in soup} - {None}) == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_validate_says_a_config_is_mergekits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(CONFIGS / "task_arithmetic_slices.yml")]) == 0
    said = capsys.readouterr().out
    assert "ok (a mergekit config, 2 ingredients, task_arithmetic, 4 layers in 2 slices" in said


def test_a_slice_of_the_base_and_one_model_is_merged(models: Path, tmp_path: Path) -> None:
    """A slice of the base and one fine-tune, by a method whose soup of one task vector means something
    (task arithmetic): its layers are merged, not copied from the fine-tune, as mergekit merges every slice."""
    text = ("slices:\n  - sources:\n      - model: base\n        layer_range: [0, 4]\n      - model: model_a\n"
            "        layer_range: [0, 4]\nmerge_method: task_arithmetic\nbase_model: base\n"
            "parameters:\n  weight: [1, 0.5]\n  lambda: 0.5\ndtype: bfloat16\n")
    (tmp_path / "one.yml").write_text(text)
    for model in MODELS:
        (tmp_path / model).symlink_to(models / model)
    assert main(["run", str(tmp_path / "one.yml"), "-o", str(tmp_path / "soup")]) == 0
    soup = weights(tmp_path / "soup")
    expected = expected_soup(yaml.safe_load(text), {m: weights(models / m) for m in MODELS}, sorted(soup))
    for key, tensor in soup.items():
        far = R.more_than_one_ulp(tensor, expected[key].to(torch.bfloat16))
        assert not far.any(), key
    assert not torch.equal(soup["model.layers.1.mlp.up_proj.weight"],
                           weights(models / "model_a")["model.layers.1.mlp.up_proj.weight"])
