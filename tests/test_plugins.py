"""Plugins: an installed package's merge method and eval task are names ``merge``, ``run``, ``validate`` and
``schema`` know, read from its distribution's entry points without importing it.

The example plugin (``examples/plugin/``) is installed by pip, offline, into a folder of its own that the CLI's
processes get on their ``PYTHONPATH``: a real distribution's metadata, and nothing installed into the test
environment. The registry itself is tested in this process with small distributions written into a temporary
folder on ``sys.path``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hub_soup.errors import EXIT_BAD_INPUT, RecipeError
from hub_soup.eval import tasks
from hub_soup.merging import methods
from hub_soup.merging.methods import get_method, method_names
from hub_soup.merging.methods.uniform import Uniform
from hub_soup.recipe import Recipe, recipe_schema
from hub_soup.registry import METHODS_GROUP, TASKS_GROUP

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin"
DIGITS = ROOT / "examples" / "digits"
INGREDIENTS = sorted((DIGITS / "ingredients").iterdir())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install examples/plugin`` into a folder of its own (offline, with this environment's setuptools),
    from a copy, so that building it writes nothing into the worktree."""
    work = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN, work / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = work / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (target / "hub_soup_median_plugin-0.1.dist-info" / "entry_points.txt").is_file()
    return target


def _environment(site: Path | None) -> dict[str, str]:
    """This environment, with the plugin's folder (when given) and this worktree on ``PYTHONPATH``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*([str(site)] if site else []), str(ROOT)])}


def _hub_soup(*args: str, site: Path | None) -> subprocess.CompletedProcess[str]:
    """``hub-soup ARGS`` in a fresh process, with the plugin installed where ``site`` is given."""
    return subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", *args], capture_output=True, text=True, env=_environment(site),
        timeout=300, check=False,
    )


def _modules_after(*args: str, site: Path) -> set[str]:
    """The top-level packages imported by ``hub-soup ARGS`` in a fresh process, with the plugin installed (read from
    ``sys.modules``: ``-X importtime`` does not report what ``importlib.import_module`` imports)."""
    code = ("import sys\nfrom hub_soup.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\nfinally:\n"
            "    print('\\n' + ' '.join(sorted({name.split('.')[0] for name in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_environment(site),
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.splitlines()[-1].split())


def _median_by_hand(refs: Sequence[Path]) -> dict[str, torch.Tensor]:
    """numpy's median of the ingredients' floating tensors in float64, rounded once to their dtype."""
    states = [load_file(ref / "model.safetensors") for ref in refs]
    return {
        key: torch.from_numpy(np.median(np.stack([s[key].double().numpy() for s in states]), axis=0)).to(tensor.dtype)
        for key, tensor in states[0].items() if tensor.is_floating_point()
    }


def _assert_median_soup(folder: Path, refs: Sequence[Path]) -> None:
    soup = {key: value for path in folder.glob("*.safetensors") for key, value in load_file(path).items()}
    expected = _median_by_hand(refs)
    assert expected and expected.keys() <= soup.keys()
    wrong = [key for key, tensor in expected.items() if not torch.equal(soup[key], tensor)]
    assert not wrong, f"not the float64 median rounded once: {wrong[:5]}"


# ---------------------------------------------------------------- the example plugin, installed


@pytest.mark.parametrize("count", [3, 4], ids=["odd", "even"])
def test_merge_with_the_plugins_median(site: Path, tmp_path: Path, count: int) -> None:
    refs = INGREDIENTS[:count]
    done = _hub_soup("merge", *map(str, refs), "--method", "median", "-o", str(tmp_path / "soup"), site=site)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_median_soup(tmp_path / "soup", refs)
    if count % 2 == 0:  # the mean of the two middle values, not torch.median's lower one: the test can tell
        states = [load_file(ref / "model.safetensors") for ref in refs]
        lower = {key: torch.stack([s[key] for s in states]).median(dim=0).values for key in _median_by_hand(refs)}
        assert any(not torch.equal(lower[key], value) for key, value in _median_by_hand(refs).items())


def _recipe(folder: Path, method: str = "median", task: str = "image-top2") -> Path:
    """A recipe of three digits ingredients with ``method``, scored by ``task`` on 64 val images."""
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "ingredients": [{"ref": str(ref)} for ref in INGREDIENTS[:3]],
        "method": method,
        "eval": {"task": task, "data": str(DIGITS / "data"), "split": "val", "limit": 64},
        "output": {"path": str(folder / "soup")},
    }))
    return recipe


def test_a_recipe_with_the_plugins_method_and_task_validates_and_runs(site: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    done = _hub_soup("validate", str(recipe), site=site)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _hub_soup("run", str(recipe), site=site)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top2_accuracy" in done.stdout + done.stderr
    _assert_median_soup(tmp_path / "soup", INGREDIENTS[:3])
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "| soup | val | top2_accuracy |" in card and "by element-wise median" in card


def test_schema_lists_the_plugins_names_and_imports_no_plugin(site: Path) -> None:
    done = _hub_soup("schema", site=site)
    assert done.returncode == 0, done.stderr[-3000:]
    schema = json.loads(done.stdout)
    assert "median" in schema["properties"]["method"]["enum"]
    assert "image-top2" in schema["$defs"]["EvalSpec"]["properties"]["task"]["enum"]
    imported = _modules_after("schema", site=site)
    assert "hub_soup" in imported and not {"hub_soup_median_plugin", "torch"} & imported
    assert not {"hub_soup_median_plugin", "torch"} & _modules_after("merge", "--help", site=site)


def test_validate_imports_the_method_it_checks_and_no_torch(site: Path, tmp_path: Path) -> None:
    imported = _modules_after("validate", str(_recipe(tmp_path)), site=site)
    assert "hub_soup_median_plugin" in imported and "torch" not in imported


def test_without_the_plugin_its_names_are_bad_input_listing_the_known_ones(tmp_path: Path) -> None:
    done = _hub_soup("merge", *map(str, INGREDIENTS[:3]), "--method", "median", "-o", str(tmp_path / "out"), site=None)
    assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr
    assert "invalid choice: 'median'" in done.stderr and "uniform" in done.stderr
    assert not (tmp_path / "out").exists()
    done = _hub_soup("validate", str(_recipe(tmp_path)), site=None)
    assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr
    assert "unknown merge method 'median'" in done.stderr and "choose one of: " in done.stderr
    assert "uniform" in done.stderr
    done = _hub_soup("validate", str(_recipe(tmp_path, method="uniform")), site=None)
    assert done.returncode == EXIT_BAD_INPUT and "unknown eval task 'image-top2'" in done.stderr
    assert not (tmp_path / "soup").exists()


# ---------------------------------------------------------------- the registry, in this process


@pytest.fixture
def distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for distributions a test writes (:func:`_distribution`), and the methods' and
    tasks' registries as a run starts (they read the entry points on first use); afterwards the registries are
    restored and the modules imported from the folder are forgotten."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_REGISTRY", methods._REGISTRY.copy())
    monkeypatch.setattr(tasks, "_TASKS", tasks._TASKS.copy())
    yield tmp_path
    for name in [name for name in sys.modules if name.startswith("toy_plugin")]:
        del sys.modules[name]


def write_distribution(site: Path, module: str, source: str | None, entry_points: str, name: str | None = None) -> None:
    """An installed distribution ``name`` (default: ``module``) in ``site``: its one module (none when ``source``
    is None: a broken installation) and its ``entry_points.txt``."""
    if source is not None:
        (site / f"{module}.py").write_text(source)
    info = site / f"{name or module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name or module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


TOY = """
from hub_soup.merging.methods import MergeMethod, register_method


class Toy(MergeMethod):
    name = "toy-plugin"


@register_method  # a plugin may also register itself: imported through its entry point, that adds nothing
class Registered(MergeMethod):
    name = "toy-registered"


class Misnamed(MergeMethod):
    name = "something-else"


class NotAMethod:
    name = "toy-not-a-method"
"""


def test_a_plugins_names_are_known_before_its_module_is_imported(distributions: Path) -> None:
    write_distribution(distributions, "toy_plugin", TOY, f"[{METHODS_GROUP}]\ntoy-plugin = toy_plugin:Toy\n")
    assert method_names()[-1] == "toy-plugin" and "toy_plugin" not in sys.modules
    toy = get_method("toy-plugin")
    assert toy.__name__ == "Toy" and sys.modules["toy_plugin"].Toy is toy


def test_a_plugin_that_registers_itself_is_one_entry(distributions: Path) -> None:
    write_distribution(distributions, "toy_plugin", TOY, f"[{METHODS_GROUP}]\ntoy-registered = toy_plugin:Registered\n")
    assert "toy-registered" in method_names()
    assert get_method("toy-registered").__name__ == "Registered"
    assert method_names().count("toy-registered") == 1


@pytest.mark.parametrize(("entry", "message"), [
    ("toy-misnamed = toy_plugin:Misnamed", "(toy_plugin:Misnamed, from toy_plugin) is called 'something-else'"),
    ("toy-not-a-method = toy_plugin:NotAMethod", "is not a MergeMethod subclass"),
    ("toy-missing = toy_plugin:Missing", "(toy_plugin:Missing, from toy_plugin) does not load: AttributeError"),
    ("toy-broken = toy_plugin_broken:Toy", "does not load: ModuleNotFoundError"),
])
def test_a_plugin_that_does_not_load_is_bad_input_naming_it(distributions: Path, entry: str, message: str) -> None:
    write_distribution(distributions, "toy_plugin", TOY, f"[{METHODS_GROUP}]\n{entry}\n")
    name = entry.split(" = ")[0]
    assert name in method_names()  # listed all the same: listing imports nothing
    with pytest.raises(RecipeError, match=re.escape(message)) as caught:
        get_method(name)
    assert caught.value.exit_code == EXIT_BAD_INPUT and caught.value.hint is not None


def test_a_plugin_cannot_take_a_built_in_name(distributions: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_distribution(distributions, "toy_plugin", TOY, f"[{METHODS_GROUP}]\nuniform = toy_plugin:Toy\n")
    with caplog.at_level(logging.WARNING, logger="hub_soup.registry"):
        assert method_names().count("uniform") == 1
    assert get_method("uniform") is Uniform and "toy_plugin" not in sys.modules
    assert "merge method 'uniform' from toy_plugin (toy_plugin:Toy) is ignored: the name is taken" in caplog.text


TOY_TASK = """
from pydantic import Field

from hub_soup.eval.metrics import ACCURACY
from hub_soup.eval.spec import EvalSpec
from hub_soup.eval.tasks import EvalTask


class ToySpec(EvalSpec):
    needs_data = False
    toy_level: int = Field(1, ge=1, description="how hard the toy is")


class Toy(EvalTask):
    name = "toy-task"
    Spec = ToySpec
    primary = ACCURACY
"""


def test_a_plugins_task_declares_fields_of_its_own(distributions: Path) -> None:
    """A plugin's task declares its eval fields as the built-in ones do; the schema lists its name without
    importing it, and then lets the section have fields it does not list."""
    write_distribution(distributions, "toy_plugin", TOY_TASK, f"[{TASKS_GROUP}]\ntoy-task = toy_plugin:Toy\n")
    schema = recipe_schema()["$defs"]["EvalSpec"]
    assert "toy-task" in schema["properties"]["task"]["enum"] and "toy_plugin" not in sys.modules
    assert "toy_level" not in schema["properties"] and "additionalProperties" not in schema
    recipe = Recipe.from_refs(["a", "b"], eval={"task": "toy-task", "toy_level": 3})
    assert recipe.eval is not None and type(recipe.eval).__name__ == "ToySpec" and recipe.eval.model_dump()["toy_level"] == 3
    with pytest.raises(RecipeError, match="eval.toy_level: Input should be greater than or equal to 1"):
        Recipe.from_refs(["a", "b"], eval={"task": "toy-task", "toy_level": 0})
    with pytest.raises(RecipeError, match="eval: toy_level: only task: toy-task takes it"):
        Recipe.from_refs(["a", "b"], eval={"task": "causal-lm", "data": "d", "toy_level": 3})
