"""``hf soup``: hub-soup run as an extension of huggingface_hub's ``hf`` CLI, through the real ``hf``.

``hf extensions install OWNER/hf-soup`` (huggingface_hub >= 1.5) makes a venv in
``~/.local/share/hf/extensions/hf-soup/venv``, pip-installs the repository into it,
and writes ``manifest.json`` beside it naming the venv's ``hf-soup`` console script.
``hf soup ARGS`` then finds that manifest and runs ``[executable_path, *ARGS]`` as a
child process with the environment unchanged. The fixture below lays out exactly that
in a temporary HOME (installing from GitHub needs the network), and every test runs the
venv's real ``hf`` in a subprocess, keeping the test Hub's settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hub_soup import cli
from hub_soup.errors import EXIT_BAD_INPUT

extensions = pytest.importorskip(
    "huggingface_hub.cli.extensions", reason="huggingface_hub < 1.5: `hf` has no extensions"
)

BIN = Path(sys.executable).parent  # the venv's bin/, where pip put `hf`, `hub-soup` and `hf-soup`
ROOT = Path(__file__).resolve().parent.parent
INGREDIENTS = [ROOT / "examples" / "digits" / "ingredients" / name for name in ("ft-lr0.01", "ft-lr0.02-shift")]
SHA = "0123456789abcdef0123456789abcdef01234567"
TIMEOUT = 240  # seconds per process: generous, a loaded machine imports torch slowly; nothing waits on time


def _script(name: str) -> Path:
    path = BIN / name
    assert path.is_file(), f"{path} missing: `pip install -e .` installs the [project.scripts] of pyproject.toml"
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME in which ``hf extensions install OWNER/hf-soup`` has run.

    The same files in the same places: ``hf-soup/venv/bin/hf-soup`` is the console script
    pip writes (a copy of this venv's, so its ``#!`` names this venv's python instead of a
    fresh venv's with hub-soup installed in it), ``manifest.json`` is what
    ``ExtensionManifest.save`` writes (sorted keys, ``executable_path`` resolved), and
    ``.latest_commit`` is the update-check cache install leaves.
    """
    home = tmp_path_factory.mktemp("home")
    extension_dir = home / extensions.EXTENSIONS_ROOT.relative_to("~") / "hf-soup"
    executable = extension_dir / "venv" / "bin" / "hf-soup"
    executable.parent.mkdir(parents=True)
    shutil.copy2(_script("hf-soup"), executable)
    manifest = {
        "commit_sha": SHA,
        "description": "Trustworthy model soups (weight averaging) for the Hugging Face Hub, timm and transformers",
        "executable_path": str(executable.resolve()),
        "installed_at": datetime.now(timezone.utc).isoformat(),
        "owner": "hub-soup",
        "repo": "hf-soup",
        "repo_id": "hub-soup/hf-soup",
        "short_name": "soup",
        "type": "python",
    }
    (extension_dir / extensions.MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (extension_dir / ".latest_commit").write_text(SHA)
    return home


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    """The test session's environment (loopback Hub, HF_HOME, no update checks) with HOME moved to ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), USERPROFILE=str(home), HF_HUB_DISABLE_UPDATE_CHECK="1", NO_COLOR="1")
    return env


def _run(command: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _hf(*args: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run([_script("hf"), *args], env, cwd)


# ---------------------------------------------------------------- hf finds the extension


def test_hub_soup_knows_where_hf_installs_extensions() -> None:
    assert cli.HF_EXTENSIONS_ROOT == str(extensions.EXTENSIONS_ROOT)


def test_hf_lists_the_installed_extension(home: Path, env: dict[str, str], tmp_path: Path) -> None:
    listed = _hf("extensions", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["hf", "soup", "hub-soup/hf-soup", "python", SHA[:7]] in [row[:5] for row in rows], listed.stdout

    top = _hf("--help", env=env, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    commands = top.stdout.split("Extension commands:")[1]
    assert "soup" in commands and "[extension hub-soup/hf-soup]" in commands, top.stdout


# ---------------------------------------------------------------- help and errors name `hf soup`


@pytest.mark.parametrize(
    "args, usage",
    [
        (["soup", "--help"], "usage: hf soup [-h] "),
        (["soup", "merge", "--help"], "usage: hf soup merge "),
        (["extensions", "exec", "soup", "--help"], "usage: hf soup [-h] "),
    ],
)
def test_hf_soup_help(env: dict[str, str], tmp_path: Path, args: list[str], usage: str) -> None:
    done = _hf(*args, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout
    if args[-1] == "--help" and "merge" not in args:
        for command in ("merge", "run", "inspect", "diagnose", "schema", "validate"):
            assert f"    {command} " in done.stdout, done.stdout
    assert "hub-soup [" not in done.stdout and "hf-soup" not in done.stdout


def test_hf_soup_merge_makes_the_same_soup_as_hub_soup(env: dict[str, str], tmp_path: Path) -> None:
    via_hf, direct = tmp_path / "via-hf", tmp_path / "direct"
    done = _hf("soup", "merge", *INGREDIENTS, "-o", via_hf, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"-> {via_hf}"), done.stdout
    logged = [line for line in done.stderr.splitlines() if line.startswith(("hf soup: ", "hub-soup: ", "hf-soup: "))]
    assert logged and all(line.startswith("hf soup: ") for line in logged), done.stderr
    assert any(line.startswith("hf soup: weights: ") for line in logged), done.stderr

    reference = _run([_script("hub-soup"), "merge", *INGREDIENTS, "-o", direct], env, tmp_path)
    assert reference.returncode == 0, reference.stderr
    assert "hub-soup: weights: " in reference.stderr and "hf soup" not in reference.stderr

    assert (via_hf / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    assert (via_hf / "config.json").read_bytes() == (direct / "config.json").read_bytes()
    soup, first = load_file(via_hf / "model.safetensors"), load_file(INGREDIENTS[0] / "model.safetensors")
    assert {k: v.dtype for k, v in soup.items()} == {k: v.dtype for k, v in first.items()}


def test_hf_soup_bad_input_names_hf_soup(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "soup"
    done = _hf("soup", "merge", INGREDIENTS[0], tmp_path / "nowhere", "-o", out, env=env, cwd=tmp_path)
    assert done.returncode == EXIT_BAD_INPUT == 2, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("hf soup: error: "), done.stderr
    assert "nowhere" in errors[0] and "no such local path" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and "hub-soup:" not in done.stderr
    assert not out.exists()


def test_the_readme_registration_of_a_pip_install_works(tmp_path: Path) -> None:
    """README, "`hf soup`": the shell lines that register a pip-installed hf-soup, run as written."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL) if "extensions/hf-soup" in b]
    assert len(blocks) == 1, "README: the `hf soup` section's bash block is gone"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), HF_HUB_DISABLE_UPDATE_CHECK="1", NO_COLOR="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `command -v hf-soup` finds this venv's
    script = textwrap.dedent(blocks[0])
    registered = _run(["bash", "-euo", "pipefail", "-c", script], env, tmp_path)
    assert registered.returncode == 0, registered.stderr
    assert "local_install/hf-soup" in registered.stdout, registered.stdout  # its `hf extensions list`

    helped = _hf("soup", "--help", env=env, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: hf soup [-h]"), helped.stdout


# ---------------------------------------------------------------- the other ways in keep their names


@pytest.mark.parametrize(
    "command, name",
    [
        (["hub-soup"], "hub-soup"),
        (["hf-soup"], "hf-soup"),  # on PATH, not through `hf`
        ([sys.executable, "-m", "hub_soup.cli"], "hub-soup"),
    ],
)
def test_other_entry_points_name_themselves(env: dict[str, str], tmp_path: Path, command: list[str], name: str) -> None:
    if not Path(command[0]).is_absolute():
        command = [str(_script(command[0])), *command[1:]]
    helped = _run([*command, "--help"], env, tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {name} [-h]"), helped.stdout

    failed = _run([*command, "merge", INGREDIENTS[0], tmp_path / "nowhere", "-o", tmp_path / "soup"], env, tmp_path)
    assert failed.returncode == EXIT_BAD_INPUT, failed.stderr
    assert f"\n{name}: error: " in f"\n{failed.stderr}", failed.stderr


def test_program_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    installed = tmp_path / ".local" / "share" / "hf" / "extensions" / "hf-soup" / "venv" / "bin"
    assert cli.program_name(str(installed / "hf-soup")) == "hf soup"
    assert cli.program_name(str(installed / "hf-soup.exe")) == "hf soup"
    assert cli.program_name(str(tmp_path / "venv" / "bin" / "hf-soup")) == "hf-soup"
    assert cli.program_name("hf-soup") == "hf-soup"
    assert cli.program_name(str(installed / "hub-soup")) == "hub-soup"
    assert cli.program_name(str(ROOT / "hub_soup" / "cli" / "__main__.py")) == "hub-soup"  # python -m hub_soup.cli
    assert cli.program_name("") == "hub-soup"
    assert cli.program_name() == "hub-soup"  # in-process under pytest: argv[0] is pytest's
