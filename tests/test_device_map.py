"""Models bigger than one device: the scored model placed by accelerate (``--device-map``), offloaded.

On a CPU-only machine a ``max_memory`` smaller than the model forces accelerate to offload modules to
disk: the streamed sink must then write each candidate into the offload files the hooks read before
every forward, so scores, choices and the written soup are those of the model on one device. The
ingredients are test_streamed_eval's tiny Llama (untied) and Qwen2 (tied embeddings) models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hub_soup
from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import open_checkpoint
from hub_soup.pipeline import SoupResult
from hub_soup.recipe import Recipe, load_recipe
from tests import checkpoints as ck
from tests.test_streamed_eval import Kit

# well below one tiny model (~90 kB in bf16): the first modules fit on the CPU, the rest go to disk
SMALL = {"cpu": "30KB"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return Kit(tmp_path_factory.mktemp(request.param), request.param)


def _recipe(kit: Kit, output: Path, **placement: object) -> Recipe:
    """A greedy soup of three ingredients (the third strays: greedy leaves it out), scored as ``placement`` says."""
    return Recipe.from_refs(
        [str(f) for f in kit.folders[:3]], greedy=True, output={"path": str(output)},
        eval={"task": "causal-lm", "data": str(kit.data), **placement},
    )


def test_an_offloaded_greedy_soup_is_the_one_device_greedy_soup(kit: Kit, tmp_path: Path) -> None:
    offload = tmp_path / "offload"
    plain = hub_soup.run(_recipe(kit, tmp_path / "plain"))
    placed = hub_soup.run(
        _recipe(kit, tmp_path / "placed", device_map="auto", max_memory=SMALL, offload_folder=str(offload))
    )
    assert isinstance(plain, SoupResult) and isinstance(placed, SoupResult)
    assert plain.report is not None and placed.report is not None
    assert placed.kept == plain.kept == [True, True, False]
    assert [s.value for s in placed.report.ingredient_scores] == [s.value for s in plain.report.ingredient_scores]
    assert [s.soup_score.value for s in placed.report.steps] == [s.soup_score.value for s in plain.report.steps]
    assert placed.report.soup_score.value == plain.report.soup_score.value
    written, expected = load_file(tmp_path / "placed" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert written.keys() == expected.keys()
    for key, tensor in written.items():
        ck.assert_bit_equal(tensor, expected[key], key)
    assert list(offload.iterdir()) == []  # the offloaded weights went with the model


def test_an_offloaded_bn_network_recalibrates_as_on_one_device(tmp_path: Path) -> None:
    """The quickstart's greedy soup of timm BatchNorm classifiers, every candidate recalibrated, with the model
    (1.5 MB in float32) split between the CPU and disk: the statistics recomputed through the hooks are those
    of one device, so the steps, the choice and the written bits are too."""
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert recipe.eval is not None and recipe.recalibrate_bn
    offload = tmp_path / "offload"
    placement = {"device_map": "auto", "max_memory": {"cpu": "1MB"}, "offload_folder": str(offload)}
    reference = open_checkpoint(recipe.base_dir / recipe.ingredients[0].ref)
    with Evaluator(recipe.eval.model_copy(update=placement), reference) as placed_evaluator:
        placed_modules = placed_evaluator.model.hf_device_map
        assert {"cpu", "disk"} <= set(placed_modules.values()), placed_modules  # BN layers on either side
    reference.close()
    results = {}
    for name, eval_fields in (("plain", {}), ("placed", placement)):
        results[name] = hub_soup.run(recipe.model_copy(update={
            "output": recipe.output.model_copy(update={"path": str(tmp_path / name)}),
            "eval": recipe.eval.model_copy(update=eval_fields),
        }))
    plain, placed = results["plain"], results["placed"]
    assert isinstance(plain, SoupResult) and isinstance(placed, SoupResult)
    assert plain.report is not None and placed.report is not None
    assert placed.kept == plain.kept and sum(plain.kept) >= 2
    assert [s.soup_score for s in placed.report.steps] == [s.soup_score for s in plain.report.steps]
    assert placed.report.test_scores == plain.report.test_scores
    written, expected = load_file(tmp_path / "placed" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert written.keys() == expected.keys()
    for key, tensor in written.items():
        ck.assert_bit_equal(tensor, expected[key], key)
    assert list(offload.iterdir()) == []


def test_the_sink_writes_where_the_offloaded_forward_reads(kit: Kit, tmp_path: Path) -> None:
    """Modules really are on disk (meta in the model, .dat files beside it) and every ingredient, streamed
    in turn, scores what it scores on one device; ties stay ties; closing removes the offload files."""
    offload = tmp_path / "offload"
    reference = open_checkpoint(kit.folders[0])
    spec = EvalSpec(task="causal-lm", data=str(kit.data))
    placed_spec = spec.model_copy(update={"device_map": "auto", "max_memory": SMALL, "offload_folder": str(offload)})
    checkpoints = [open_checkpoint(f) for f in kit.folders[:3]]
    with Evaluator(spec, reference, dtype=torch.bfloat16) as plain, \
            Evaluator(placed_spec, reference, dtype=torch.bfloat16) as placed:
        model = placed.model
        devices = set(model.hf_device_map.values())
        assert "disk" in devices and "cpu" in devices, model.hf_device_map
        assert any(p.is_meta for p in model.parameters())
        (folder,) = offload.iterdir()
        assert any(folder.glob("*.dat"))
        for checkpoint in reversed(checkpoints):  # the last one streamed must win everywhere
            state_dict = checkpoint.state_dict()
            assert placed.score_state_dict(state_dict).value == plain.score_state_dict(state_dict).value
        if kit.kind == "qwen2":
            assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(offload.iterdir()) == []
    for checkpoint in [reference, *checkpoints]:
        checkpoint.close()


def test_bad_placement_values_are_refused(kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if kit.kind != "llama":
        pytest.skip("one model kind is enough")
    out = tmp_path / "soup"
    args = ["merge", *map(str, kit.folders[:2]), "-o", str(out), "--eval-task", "causal-lm", "--eval-data", str(kit.data)]
    cases = [
        (["--device-map", "auto", "--max-memory", "cpu:30KB"], "write KEY=VALUE"),
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "not a size: 'lots'"),
        (["--device-map", "auto", "--max-memory", "tpu=1GB"], "'tpu' is not a device"),
        (["--device-map", "everywhere"], "'everywhere' is not a device map"),
        (["--max-memory", "cpu=1GB"], "only with device_map"),
        (["--device-map", "auto", "--device", "cuda"], "use only one"),
        (["--device-map", "auto", "--max-memory", "cpu=30KB"], "--offload-folder"),  # disk, and nowhere to put it
    ]
    for flags, message in cases:
        assert _exit_code([*args, *flags]) == EXIT_BAD_INPUT, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
        assert err.count("error") == 1, err  # one message
        ck.assert_no_output(out)
    assert main([*args, "--device-map", "auto", "--max-memory", "cpu=30KB", "--offload-folder", str(tmp_path / "o")]) == 0
    assert (out / "model.safetensors").is_file() and list((tmp_path / "o").iterdir()) == []


def _exit_code(argv: list[str]) -> int:
    """The CLI's exit status, whether ``main`` returns it or argparse exits (a flag it cannot parse)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
