"""``hub-soup verify``: published merges rebuilt from the recipe they carry and compared, through the loopback Hub.

Ingredients are tiny safetensors folders (a shared start, perturbed); merges are pushed by
hub-soup itself, or written as mergekit writes them (weights computed in bf16 arithmetic by a
small reference of mergekit's ``linear`` here, ``mergekit_config.yml``, a card with the YAML
block), then changed by one element or one tensor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, try_to_load_from_cache
from safetensors.torch import load_file, save_file

import hub_soup
from hub_soup.cli import main
from hub_soup.verification.compare import ulp_distance
from tests import checkpoints as ck
from tests.hub_fixtures import TEST_TOKEN, TEST_USER
from tests.hub_models import unique, upload
from tests.hub_server import HubServer

SHAPES = {"embed.weight": (32, 16), "layers.0.weight": (16, 16), "layers.0.bias": (16,), "head.weight": (8, 16)}
# mergekit's linear weights: exact in bf16, so what differs is only where the arithmetic rounds
WEIGHTS = (0.25, 0.75)
MERGEKIT_CONFIG = """\
models:
  - model: {a}
    parameters:
      weight: 0.25
  - model: {b}
    parameters:
      weight: 0.75
merge_method: linear
dtype: bfloat16
"""
CARD = """\
---
base_model: [{a}, {b}]
library_name: transformers
tags: [mergekit, merge]
---
# merged

This is a merge of pre-trained language models created using mergekit.

## Configuration

The following YAML configuration was used to produce this model:

```yaml
{config}```
"""


def tiny_folder(path: Path, seed: int, dtype: torch.dtype) -> Path:
    """A shared start (seed 0) perturbed by ``seed``, saved as ``model.safetensors`` in ``dtype``. Every value is
    in [1, 2.1): bf16 arithmetic that cancels (values of both signs near 0) differs by more than a few ulp."""
    start = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {key: (1 + torch.rand(shape, generator=start) + 0.05 * torch.rand(shape, generator=noise)).to(dtype)
               for key, shape in SHAPES.items()}
    save_file(tensors, path / "model.safetensors")
    return path


def mergekit_linear(tensors: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """mergekit 0.1.5's ``linear`` as it computes, in the tensors' own dtype (bf16): each product rounded,
    the sum rounded, the quotient rounded."""
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return (w * stacked).sum(dim=0) / w.sum(dim=0)


@pytest.fixture(scope="module")
def api() -> HfApi:
    return HfApi(token=TEST_TOKEN)


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory: pytest.TempPathFactory, api: HfApi) -> tuple[str, str, Path, Path]:
    """Two bf16 fine-tunes on the Hub: (repo a, repo b, folder a, folder b)."""
    root = tmp_path_factory.mktemp("ingredients")
    folders = [tiny_folder(root / f"ft{i}", i, torch.bfloat16) for i in (1, 2)]
    repos = [f"{TEST_USER}/{unique(f'verify-ft{i}')}" for i in (1, 2)]
    for folder, repo in zip(folders, repos):
        upload(api, folder, repo)
    return repos[0], repos[1], folders[0], folders[1]


def mergekit_folder(folder: Path, ingredients: tuple[str, str, Path, Path]) -> Path:
    """The folder mergekit writes for a linear merge of the two ingredients, its weights computed in bf16."""
    repo_a, repo_b, folder_a, folder_b = ingredients
    folder.mkdir(parents=True)
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    save_file({key: mergekit_linear([a[key], b[key]], WEIGHTS) for key in a}, folder / "model.safetensors")
    config = MERGEKIT_CONFIG.format(a=repo_a, b=repo_b)
    (folder / "mergekit_config.yml").write_text(config)
    (folder / "README.md").write_text(CARD.format(a=repo_a, b=repo_b, config=config))
    return folder


@pytest.fixture(scope="module")
def mergekit_merge(tmp_path_factory: pytest.TempPathFactory, ingredients: tuple[str, str, Path, Path]) -> Path:
    """The folder mergekit writes for a linear merge of the two, its weights computed in bf16 arithmetic."""
    return mergekit_folder(tmp_path_factory.mktemp("mergekit") / "merged", ingredients)


@pytest.fixture(scope="module")
def cancelling_merge(tmp_path_factory: pytest.TempPathFactory, api: HfApi) -> Path:
    """A mergekit linear merge (0.25 a + 0.75 b, in bf16) of two bf16 ingredients on the Hub whose terms cancel:
    b is -a / 3 made 5% to 15% smaller, so the result is a tenth of the terms or less, and mergekit's rounding
    of ``0.75 * b`` (up to half an ulp of that term) is up to a few ulp of the result, as a real one's is."""
    root = tmp_path_factory.mktemp("cancelling")
    start, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(3)
    a = {key: 1 + torch.rand(shape, generator=start) for key, shape in SHAPES.items()}
    b = {key: -value / 3 * (0.85 + 0.1 * torch.rand(value.shape, generator=noise)) for key, value in a.items()}
    folders, repos = [root / "a", root / "b"], [f"{TEST_USER}/{unique(f'verify-cancel-{n}')}" for n in "ab"]
    for tensors, folder, repo in zip((a, b), folders, repos):
        folder.mkdir()
        save_file({key: value.to(torch.bfloat16) for key, value in tensors.items()}, folder / "model.safetensors")
        upload(api, folder, repo)
    return mergekit_folder(root / "merged", (repos[0], repos[1], folders[0], folders[1]))


def verify_json(ref: str, *more: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["--quiet", "verify", ref, "--json", "--token", TEST_TOKEN, *more])
    return code, json.loads(capsys.readouterr().out)


def published_repo(api: HfApi, folder: Path) -> str:
    repo = f"{TEST_USER}/{unique('verify-merge')}"
    upload(api, folder, repo)
    return repo


def changed(merge: Path, tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """A copy of the merge folder whose weights ``change`` edited in place."""
    folder = tmp_path / "merged"
    shutil.copytree(merge, folder)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_ulp_distance_counts_the_floats_between() -> None:
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    next_up = torch.nextafter(one, torch.tensor([2.0], dtype=torch.bfloat16))
    assert ulp_distance(one, next_up).item() == 1
    # across zero: the floats on both sides count
    tiny = torch.tensor([1e-45, -1e-45], dtype=torch.float32)
    assert ulp_distance(tiny[:1], tiny[1:]).item() == 2
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])).item() == 0
    assert ulp_distance(torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)).item() > 0
    eight = torch.tensor([1.0, 1.0], dtype=torch.float8_e4m3fn)  # one byte: 1.0 and the float after it
    assert ulp_distance(eight[:1], (eight.view(torch.int8) + torch.tensor([0, 1], dtype=torch.int8)).view(
        torch.float8_e4m3fn)[1:]).item() == 1


def test_ulp_at_is_the_spacing_of_the_dtype_there() -> None:
    from hub_soup.verification.compare import ulp_at

    magnitudes = torch.tensor([1.0, 1.99, 2.0, 0.75, 0.0, 1e-40], dtype=torch.float64)
    assert ulp_at(magnitudes, torch.bfloat16).tolist() == [2.0**-7, 2.0**-7, 2.0**-6, 2.0**-8, 2.0**-133, 2.0**-133]
    assert ulp_at(magnitudes[:1], torch.float32).item() == 2.0**-23
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # what the next float after each value is
        values = torch.tensor([0.3, 1.0, 700.0], dtype=dtype)
        after = torch.nextafter(values, torch.full_like(values, float("inf")))
        assert ulp_at(values.double(), dtype).tolist() == (after.double() - values.double()).tolist()


def test_the_inputs_scale_reads_rows_as_the_engine_does(tmp_path: Path) -> None:
    """Rows gathered out of order (another vocabulary's), and the base: each element's inputs are the very values
    it was merged from, read through the plan's own read path."""
    from contextlib import ExitStack
    from dataclasses import replace

    from hub_soup.io.read import open_checkpoint
    from hub_soup.merging.plan import Layout, align
    from hub_soup.verification.compare import InputScale

    tensors = [{"embed.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(n))} for n in range(3)]
    for n, state in enumerate(tensors):
        save_file(state, tmp_path / f"m{n}.safetensors")
    rows = (5, 0, 3, 1)
    at = torch.tensor([0, 3, 7, 15])
    with ExitStack() as stack:
        a, b, base = (stack.enter_context(open_checkpoint(tmp_path / f"m{n}.safetensors")) for n in range(3))
        plan = align([Layout("a", a.metas), Layout("b", b.metas)], base=Layout("base", base.metas))
        tensor = plan.tensors[0].gathered([range(1, 5), rows])
        assert tensor.base_input is not None
        plan.tensors[0] = replace(tensor, base_input=replace(tensor.base_input, rows=(2, 2, 4, 0)))
        largest = InputScale([a, b], base, plan).largest("embed.weight", 0, 16, at)
    first, second, third = (t["embed.weight"] for t in tensors)
    expected = torch.stack([first[1:5].reshape(-1), second[list(rows)].reshape(-1), third[[2, 2, 4, 0]].reshape(-1)])
    assert torch.equal(largest, expected.abs().amax(dim=0)[at].double())


def test_a_soup_pushed_by_hub_soup_verifies_bit_for_bit(
    ingredients: tuple[str, str, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo_a, repo_b, _, _ = ingredients
    soup = f"{TEST_USER}/{unique('verify-soup')}"
    assert main(["--quiet", "merge", repo_a, repo_b, "--weights", "1", "3", "--push", soup, "--token", TEST_TOKEN]) == 0
    capsys.readouterr()
    code, report = verify_json(soup, capsys=capsys)
    assert code == 0, report
    assert report["verdict"] == "bit-for-bit"
    assert report["recipe_file"] == "hub-soup.yaml" and report["dialect"] == "hub-soup"
    assert report["tensors"] == len(SHAPES) and report["unpinned"] == []
    assert all("@" in ref and len(ref.rsplit("@", 1)[1]) == 40 for ref in report["ingredients"])
    # the same from Python
    assert hub_soup.verify(soup, token=TEST_TOKEN).verdict == "bit-for-bit"


def test_a_mergekit_merge_in_bf16_verifies_within_2_ulp_and_says_why(
    api: HfApi, mergekit_merge: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    repo = published_repo(api, mergekit_merge)
    code, report = verify_json(repo, capsys=capsys)
    assert code == 0, json.dumps({k: report[k] for k in ("differences", "max_ulp", "mismatched")})
    assert report["verdict"] == "within-ulp", report
    assert report["recipe_file"] == "mergekit_config.yml" and report["dialect"] == "mergekit"
    assert 0 < report["max_ulp"]["bfloat16"] <= 2
    assert "mergekit computes in the config's dtype (bfloat16)" in report["reason"]
    # the recipe's refs name no revision: resolved to today's, and the report says so
    assert len(report["unpinned"]) == 2
    main(["--quiet", "verify", repo, "--token", TEST_TOKEN])
    said = capsys.readouterr().out
    assert "reproduced within 2 ulp" in said and "why: the recipe is a mergekit config" in said
    assert "today's commits" in said
    written = summary.read_text()  # GitHub Actions' step summary
    assert "**reproduced within 2 ulp" in written and "Why: the recipe is a mergekit config" in written
    assert f"| `{report['ingredients'][0].rsplit('@', 1)[0]}` |" in written
    # stricter than its rounding: the same merge differs
    code, report = verify_json(repo, "--tolerance-ulp", "0", capsys=capsys)
    assert code == 4 and report["verdict"] == "differs"


def test_the_card_alone_carries_a_mergekit_recipe(mergekit_merge: Path, tmp_path: Path) -> None:
    folder = tmp_path / "merged"
    shutil.copytree(mergekit_merge, folder)
    (folder / "mergekit_config.yml").unlink()
    report = hub_soup.verify(str(folder), token=TEST_TOKEN)
    assert report.recipe_file == "README.md" and report.verdict == "within-ulp", report.text()


def test_one_element_changed_differs_naming_the_tensor(
    api: HfApi, mergekit_merge: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["layers.0.weight"][3, 5] += 1.0

    repo = published_repo(api, changed(mergekit_merge, tmp_path, change))
    code, report = verify_json(repo, capsys=capsys)
    assert code == 4 and report["verdict"] == "differs"
    first = report["differences"][0]
    assert first["key"] == "layers.0.weight" and first["beyond"] == 1 and first["max_ulp"] > 2
    main(["--quiet", "verify", repo, "--token", TEST_TOKEN])
    assert "layers.0.weight: 1 of 256 elements differ by more than 2 ulp" in capsys.readouterr().out


def test_cancelling_terms_in_bf16_verify_within_the_inputs_scale(
    api: HfApi, cancelling_merge: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mergekit's bf16 rounding is in ulps of the terms it adds: where they cancel, it is many ulps of the sum
    (more than the tolerance of the result's own value), and still within 2 ulp of the inputs' scale."""
    published = load_file(cancelling_merge / "model.safetensors")["layers.0.weight"]
    inputs = [load_file(cancelling_merge.parent / name / "model.safetensors")["layers.0.weight"] for name in "ab"]
    exact = (WEIGHTS[0] * inputs[0].double() + WEIGHTS[1] * inputs[1].double()).to(torch.bfloat16)
    assert int(ulp_distance(published, exact).max()) > 2  # beyond 2 ulp of the result: today's rule fails it
    assert float(exact.double().abs().max()) < 0.1 * float(inputs[0].double().abs().min())  # the terms cancel

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    repo = published_repo(api, cancelling_merge)
    code, report = verify_json(repo, capsys=capsys)
    assert code == 0, json.dumps({k: report[k] for k in ("differences", "max_ulp", "mismatched")})
    assert report["verdict"] == "within-ulp" and report["judged_by"] == "inputs"
    assert report["max_ulp"]["bfloat16"] > 2
    assert all(d["beyond"] == 0 and d["judged_by"] == "inputs" for d in report["differences"])
    assert any(d["beyond_own"] > 0 for d in report["differences"])
    assert "mergekit computes in the config's dtype (bfloat16)" in report["reason"]
    assert "reproduced within 2 ulp of the inputs' scale" in report["summary"]
    main(["--quiet", "verify", repo, "--token", TEST_TOKEN])
    said = capsys.readouterr().out
    assert "reproduced within 2 ulp of the inputs' scale" in said and "why: the recipe is a mergekit config" in said
    assert "tolerance: an element counts as reproduced when it is within 2 ulp of the larger of" in said
    written = summary.read_text()  # what the step summary, and a pull request's card section, say
    assert "**reproduced within 2 ulp of the inputs' scale" in written and "Tolerance: an element counts" in written

    def change(tensors: dict[str, torch.Tensor]) -> None:  # by 0.25: about 32 ulp of the inputs' scale there
        tensors["layers.0.weight"][3, 5] += 0.25

    repo = published_repo(api, changed(cancelling_merge, tmp_path, change))
    code, report = verify_json(repo, capsys=capsys)
    assert code == 4 and report["verdict"] == "differs"
    first = report["differences"][0]
    assert first["key"] == "layers.0.weight" and first["beyond"] == 1 and first["judged_by"] == "inputs"
    assert all(d["beyond"] == 0 for d in report["differences"][1:])
    main(["--quiet", "verify", repo, "--token", TEST_TOKEN])
    assert "layers.0.weight: 1 of 256 elements differ by more than 2 ulp of their inputs' scale" in (
        capsys.readouterr().out)


def test_one_tensor_missing_differs_from_the_headers(
    api: HfApi, mergekit_merge: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = published_repo(api, changed(mergekit_merge, tmp_path, lambda tensors: tensors.pop("head.weight")))
    code, report = verify_json(repo, capsys=capsys)
    assert code == 4 and report["verdict"] == "differs"
    assert report["only_rebuilt"] == ["head.weight"] and report["only_published"] == []
    # said from the headers: the published weights were never downloaded
    assert not isinstance(try_to_load_from_cache(repo, "model.safetensors"), str)
    main(["--quiet", "verify", repo, "--token", TEST_TOKEN])
    assert "missing from the published merge: head.weight" in capsys.readouterr().out


def test_a_revision_the_hub_no_longer_has_cannot_verify_before_any_download(
    hub: HubServer, api: HfApi, ingredients: tuple[str, str, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_a, repo_b, _, _ = ingredients
    out = tmp_path / "soup"
    assert main(["--quiet", "merge", repo_a, repo_b, "-o", str(out), "--token", TEST_TOKEN]) == 0
    recipe = yaml.safe_load((out / "hub-soup.yaml").read_text())
    recipe["ingredients"][1]["revision"] = "0" * 40  # a commit the Hub does not have
    (out / "hub-soup.yaml").write_text(yaml.safe_dump(recipe))
    repo = published_repo(api, out)
    capsys.readouterr()
    seen = len(hub.requests)
    code, report = verify_json(repo, capsys=capsys)
    assert code == 2 and report["verdict"] == "cannot-verify"
    assert repo_b in report["reason"]
    assert not [path for _, path in hub.requests[seen:] if path.endswith(".safetensors")]


DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
DIGITS_EVAL = ["--eval-task", "image-classification", "--eval-data", str(DIGITS / "data"), "--eval-split", "val"]


@pytest.fixture(scope="module")
def digits_soup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A uniform soup of two of the digits fine-tunes, written by hub-soup with its pinned recipe."""
    out = tmp_path_factory.mktemp("digits") / "soup"
    ingredients = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())[:2]
    assert main(["--quiet", "merge", *ingredients, "-o", str(out)]) == 0
    return out


def test_eval_task_scores_the_merge_beside_its_ingredients(
    digits_soup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hub_soup.eval.evaluate import Evaluator
    from hub_soup.eval.spec import EvalSpec
    from hub_soup.io.read import open_checkpoint

    code, report = verify_json(str(digits_soup), *DIGITS_EVAL, capsys=capsys)
    assert code == 0 and report["verdict"] == "bit-for-bit"
    accuracy = {s["model"]: s["value"] for s in report["scores"] if s["metric"] == "accuracy"}
    merged = next(s for s in report["scores"] if s["role"] == "merge" and s["metric"] == "accuracy")
    with open_checkpoint(digits_soup) as soup:  # the published merge scored on its own
        spec = EvalSpec(task="image-classification", data=str(DIGITS / "data"), split="val")
        assert merged["value"] == Evaluator(spec, soup).score_state_dict(soup.state_dict()).value
    assert [s["role"] for s in report["scores"] if s["metric"] == "accuracy"] == ["merge", "ingredient", "ingredient"]
    assert len(accuracy) == 3 and "its best ingredient" in report["comparison"]
    main(["--quiet", "verify", str(digits_soup), *DIGITS_EVAL])
    printed = capsys.readouterr().out
    for name in sorted(p.name for p in (DIGITS / "ingredients").iterdir())[:2]:
        assert any(name in line and "accuracy" in line for line in printed.splitlines())
    assert "its best ingredient" in printed


def test_create_pr_opens_one_pr_whose_card_has_the_scores(
    api: HfApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import ModelCard, hf_hub_download

    from hub_soup.cli import build_parser
    from hub_soup.cli.options import eval_spec_from_args

    repo = f"{TEST_USER}/{unique('verify-digits')}"
    ingredients = sorted(str(p) for p in (DIGITS / "ingredients").iterdir())[:2]
    assert main(["--quiet", "merge", *ingredients, "--push", repo, "--token", TEST_TOKEN]) == 0
    card_before = Path(hf_hub_download(repo, "README.md")).read_text()
    capsys.readouterr()
    code, report = verify_json(repo, *DIGITS_EVAL, "--create-pr", capsys=capsys)
    assert code == 0 and report["verdict"] == "bit-for-bit"
    assert report["pr_url"].endswith("/discussions/1")
    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert [ref.ref for ref in refs.pull_requests or []] == ["refs/pr/1"]
    assert Path(hf_hub_download(repo, "README.md", revision="main", force_download=True)).read_text() == card_before

    card = ModelCard.load(hf_hub_download(repo, "README.md", revision="refs/pr/1"))
    merged = {s["metric"]: s["value"] for s in report["scores"] if s["role"] == "merge"}
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("val", metric): round(value, 6) for metric, value in merged.items()}
    assert "reproduced bit for bit" in card.text and "its best ingredient" in card.text
    sha = report["published"].rsplit("@", 1)[1]
    command = next(line for line in card.text.splitlines() if line.startswith("hub-soup verify "))
    assert command.startswith(f"hub-soup verify {repo}@{sha} --eval-task image-classification")
    # the command gives the same evaluation back
    args = build_parser().parse_args(command.split()[1:])
    assert args.ref == f"{repo}@{sha}" and eval_spec_from_args(args) == eval_spec_from_args(
        build_parser().parse_args(["verify", repo, *DIGITS_EVAL]))
    # verified again from the card the pull request made: its section is replaced, not repeated
    code, report = verify_json(f"{repo}@refs/pr/1", *DIGITS_EVAL, "--create-pr", capsys=capsys)
    assert code == 0, report
    card = ModelCard.load(hf_hub_download(repo, "README.md", revision="refs/pr/2"))
    assert card.text.count("## Verification (hub-soup verify)") == 1


def test_create_pr_needs_a_hub_repo(digits_soup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quiet", "verify", str(digits_soup), "--create-pr"]) == 2
    assert "is a local folder, not a Hub repo" in capsys.readouterr().err


def test_the_action_verifies_a_merge_given_as_verify(digits_soup: Path, tmp_path: Path) -> None:
    """The composite action's own step script, run by bash as a runner would: ``verify:`` instead of ``recipe:``."""
    import os
    import subprocess
    import sys

    action = yaml.safe_load((Path(__file__).resolve().parent.parent / "action.yml").read_text())
    step = next(s for s in action["runs"]["steps"] if s.get("id") == "soup")
    for given, code in (({"VERIFY": str(digits_soup)}, 0), ({"VERIFY": str(digits_soup), "RECIPE": "r.yaml"}, 2)):
        outputs, summary = tmp_path / f"outputs-{len(given)}", tmp_path / f"summary-{len(given)}.md"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RECIPE": "",
               "EXTRA_ARGS": "--json", "CI": "true", "GITHUB_OUTPUT": str(outputs),
               "GITHUB_STEP_SUMMARY": str(summary), **given}
        done = subprocess.run(["bash", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=240,
                              check=False)
        assert done.returncode == code, done.stderr
        assert outputs.read_text() == f"exit-code={code}\n"
        if code == 0:
            assert json.loads(done.stdout)["verdict"] == "bit-for-bit"
            assert "**reproduced bit for bit" in summary.read_text()
        else:
            assert "give one of recipe: (build a soup) and verify:" in done.stderr


def test_a_recipe_never_allows_pickles_for_the_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A published recipe saying ``allow_pickle: true`` is its author's word: verify loads an ingredient's
    code-executing pickle only with the user's own --allow-pickle."""
    first = ck.save_timm_folder(ck.timm_model(seed=1, batches=2), tmp_path / "first")
    pickled = ck.save_whole_module(ck.timm_model(seed=2, batches=2), tmp_path / "whole" / "model.pth")
    hub_soup.merge([str(first), str(pickled)], tmp_path / "soup", allow_pickle=True)
    assert yaml.safe_load((tmp_path / "soup" / "hub-soup.yaml").read_text())["allow_pickle"] is True
    code, report = verify_json(str(tmp_path / "soup"), capsys=capsys)
    assert code == 2 and report["verdict"] == "cannot-verify" and "--allow-pickle" in report["reason"]
    code, report = verify_json(str(tmp_path / "soup"), "--allow-pickle", capsys=capsys)
    assert code == 0 and report["verdict"] == "bit-for-bit", report


def test_eval_task_lm_eval_scores_the_merge_beside_its_ingredients(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--eval-task lm-eval``: the harness scores the published merge beside each ingredient, in one model; the
    merge's numbers are the harness's own for a fresh model of the published weights."""
    from tests.hub_models import llama_folder
    from tests.test_lm_eval import TASK, WORDS, harness_numbers, write_task

    folders = [llama_folder(tmp_path / f"llama{i}", seed=i + 1, words=WORDS) for i in range(2)]
    tasks = write_task(tmp_path / "tasks")
    soup = tmp_path / "soup"
    assert main(["--quiet", "merge", *map(str, folders), "-o", str(soup)]) == 0
    capsys.readouterr()
    evaluation = ["--eval-task", "lm-eval", "--eval-tasks", TASK, "--include-path", str(tasks), "--trust-remote-code"]
    code, report = verify_json(str(soup), *evaluation, capsys=capsys)
    assert code == 0 and report["verdict"] == "bit-for-bit", report
    merged = {s["metric"].removeprefix(f"{TASK}/"): s["value"] for s in report["scores"] if s["role"] == "merge"}
    assert merged == harness_numbers(soup, tasks)
    accuracy = [s for s in report["scores"] if s["metric"] == f"{TASK}/acc"]
    assert [s["role"] for s in accuracy] == ["merge", "ingredient", "ingredient"]
    assert [s["model"] for s in accuracy[1:]] == [str(folder) for folder in folders], accuracy
    assert "its best ingredient" in report["comparison"]
    assert main(["--quiet", "verify", str(soup), *evaluation]) == 0
    printed = capsys.readouterr().out.splitlines()
    for folder in folders:
        assert any(str(folder) in line and f"{TASK}/acc" in line for line in printed), printed
