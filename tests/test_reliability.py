"""Reliability and security: untrusted files, faults mid-run, secrets never leaked."""

from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hub_soup.cli import _terminate, main
from hub_soup.errors import CheckpointFormatError
from hub_soup.io.write import SoupWriter
from tests.hub_fixtures import TEST_USER
from tests.hub_models import timm_folder, unique, upload
from tests.hub_server import HubServer
from tests.read_everything import read_everything

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits" / "ingredients"
REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


class _WritesMarker:
    """Unpickling this runs code: it creates a marker file (a stand-in for anything worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (self.marker,))  # type: ignore[return-value]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_in_a_pickle_never_runs_without_allow_pickle(
    tmp_path: Path, zip_format: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    state = {"weight": torch.ones(2), "payload": _WritesMarker(marker)}
    torch.save({"state_dict": state}, evil, _use_new_zipfile_serialization=zip_format)
    good = tmp_path / "good.safetensors"
    save_file({"weight": torch.ones(2)}, good)

    for command in (["merge", str(evil), str(good), "-o", str(tmp_path / "soup")], ["inspect", str(evil)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "runs code when loaded" in err and "--allow-pickle" in err
        assert not marker.exists()
    assert not (tmp_path / "soup").exists()

    # the flag really is the only thing standing between the file and its code
    main(["merge", str(evil), str(good), "-o", str(tmp_path / "soup"), "--allow-pickle"])
    assert marker.exists()


@functools.cache
def _seed_files() -> dict[str, bytes]:
    """A small valid safetensors file and torch zip checkpoint, the starting points of mutation."""
    tmp_path = Path(tempfile.mkdtemp(prefix="hub-soup-seeds-"))
    save_file({"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.zeros(0), "c": torch.tensor(3)},
              tmp_path / "seed.safetensors")
    torch.save({"state_dict": {"w": torch.ones(3, 2)}}, tmp_path / "seed.pt")
    return {".safetensors": (tmp_path / "seed.safetensors").read_bytes(), ".pt": (tmp_path / "seed.pt").read_bytes()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoints_only_raise_format_errors(tmp_path: Path, data: st.DataObject) -> None:
    seeds = _seed_files()
    suffix = data.draw(st.sampled_from(sorted(seeds)))
    raw = bytearray(seeds[suffix])
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / f"mutant{suffix}"
    path.write_bytes(bytes(raw))
    try:
        read_everything(path)
    except CheckpointFormatError:
        pass


@pytest.mark.parametrize("case", sorted(REGRESSIONS.glob("*")), ids=lambda p: p.name)
def test_hostile_files_are_refused_cleanly(case: Path, tmp_path: Path) -> None:
    """``tests/fuzz_regressions/``: hostile inputs, and any crash the fuzzers ever find."""
    path = tmp_path / case.name
    path.write_bytes(case.read_bytes())
    with pytest.raises(CheckpointFormatError):
        read_everything(path)


def test_atheris_fuzzes_the_readers_for_a_bounded_time(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this Python")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for suffix, data in _seed_files().items():
        (corpus / f"seed{suffix}").write_bytes(data)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fuzz_readers.py"), "-max_total_time=15", "-runs=20000",
         f"-artifact_prefix={tmp_path}/crash-", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    crashes = list(tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, (
        f"a crash was found: copy {crashes} into tests/fuzz_regressions/\n{done.stderr[-3000:]}"
    )


def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../outside.safetensors"}}')
    assert main(["inspect", str(folder)]) == 2
    assert "must be plain file names" in capsys.readouterr().err


def _big_pair(tmp_path: Path) -> list[str]:
    """Two 96 MB ingredients: big enough that a merge is still running when we strike."""
    refs = []
    for i in range(2):
        path = tmp_path / f"big{i}.safetensors"
        save_file({f"layer{j}.weight": torch.full((1024, 4096), float(i + j)) for j in range(6)}, path)
        refs.append(str(path))
    return refs


def _start_merge(refs: list[str], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hub_soup.cli", "--quiet", "merge", *refs, "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _wait_for_partial(out: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert process.poll() is None, "the merge ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.001)


def _hidden(folder: Path) -> list[str]:
    """The hidden folders a run writes beside its output (``.soup.partial-*``, ``.soup.old-*``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def test_sigkill_mid_merge_leaves_no_output_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    refs, out = _big_pair(tmp_path), tmp_path / "soup"
    process = _start_merge(refs, out)
    _wait_for_partial(out, process)
    process.kill()
    process.wait()
    assert not out.exists()
    assert main(["--quiet", "merge", *refs, "-o", str(out)]) == 0
    assert out.is_dir() and not _hidden(tmp_path)


def test_a_run_sweeps_its_own_leftovers_and_no_other_soups(tmp_path: Path) -> None:
    """Leftover names are matched literally: `soup[1]` finds its own, `s*` never takes `soup`'s set-aside soup."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id whose run can never come back
    refs = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")]
    own = tmp_path / f".soup[1].partial-{gone.pid}-abc"
    own.mkdir()
    others = tmp_path / f".soup.old-{gone.pid}-abc"
    others.mkdir()
    (others / "model.safetensors").write_bytes(b"soup's own")
    for name in ("soup[1]", "s*"):
        assert main(["--quiet", "merge", *refs, "-o", str(tmp_path / name)]) == 0
    assert not own.exists()
    assert (others / "model.safetensors").read_bytes() == b"soup's own"


def test_sigterm_mid_merge_removes_the_partial_soup(tmp_path: Path) -> None:
    """A real SIGTERM from outside, the instant the partial folder appears (the earliest moment a poll can see)."""
    refs, out = _big_pair(tmp_path), tmp_path / "soup"
    process = _start_merge(refs, out)
    _wait_for_partial(out, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert b"interrupted; nothing was kept" in err
    assert not out.exists() and not _hidden(tmp_path)


def test_sigterm_while_starting_leaves_nothing(tmp_path: Path) -> None:
    """Struck before the handler is installed (the default action ends it) or just after: nothing either way."""
    refs, out = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")], tmp_path / "soup"
    process = _start_merge(refs, out)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (-signal.SIGTERM, 130), err
    assert not out.exists() and not _hidden(tmp_path)


@pytest.fixture
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM in this process unwinds like Ctrl-C, as the console script sets it up."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_at(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, when: Callable[..., bool],
                before: bool = False) -> list[bool]:
    """Send this process a real SIGTERM once, just after (or before) the first ``owner.name`` call ``when`` picks.

    In the main thread ``os.kill`` runs the handler at once, so the ``KeyboardInterrupt``
    comes out of the patched call itself: the narrowest window there is (right after
    ``mkdir`` returns, before the caller's next line). In the writer thread the
    signal reaches the main thread wherever it is then. No timing is involved.
    """
    struck: list[bool] = []
    original = getattr(owner, name)

    def strike(*args: object) -> None:
        if not struck and when(*args):
            struck.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    def patched(*args: object, **kwargs: object) -> object:
        if before:
            strike(*args)
        result = original(*args, **kwargs)
        if not before:
            strike(*args)
        return result

    monkeypatch.setattr(owner, name, patched)
    return struck


def _soup(folder: Path) -> tuple[list[str], bytes]:
    return sorted(p.name for p in folder.iterdir()), (folder / "model.safetensors").read_bytes()


OLD_SOUP = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-ls0.1")]
NEW_SOUP = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")]
#: moment -> (what to patch, which call, strike before the call instead of after it)
MOMENTS: dict[str, tuple[object, str, Callable[..., bool], bool]] = {
    "first parent made": (os, "mkdir", lambda path, *_: Path(path).name == "a", False),
    "partial folder made": (os, "mkdir", lambda path, *_: Path(path).name.startswith(".soup.partial-"), False),
    "first bytes written": (SoupWriter, "write", lambda *_: True, False),
    "side file written": (SoupWriter, "add_file", lambda *_: True, False),
    "commit begun": (SoupWriter, "commit", lambda *_: True, True),
    "old soup set aside": (os, "replace", lambda src, *_: Path(src).name == "soup", False),
    "new soup in place": (os, "replace", lambda src, *_: Path(src).name.startswith(".soup.partial-"), False),
}


@pytest.mark.parametrize(
    ("moment", "overwrite", "left"),
    [
        ("first parent made", False, None),
        ("partial folder made", False, None),
        ("partial folder made", True, "old"),
        ("first bytes written", False, None),
        ("side file written", True, "old"),
        ("commit begun", True, "old"),
        ("old soup set aside", True, "old"),
        ("new soup in place", True, "new"),
        ("new soup in place", False, "new"),
    ],
)
@pytest.mark.usefixtures("sigterm_unwinds")
def test_sigterm_at_any_moment_keeps_the_old_soup_or_the_new_one_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    moment: str, overwrite: bool, left: str | None,
) -> None:
    """Each moment of a run's life on disk, struck by a real SIGTERM: a whole soup or none, never a hidden folder."""
    out = tmp_path / "a" / "b" / "soup"
    new = None
    if left == "new":
        assert main(["--quiet", "merge", *NEW_SOUP, "-o", str(tmp_path / "reference")]) == 0
        new = _soup(tmp_path / "reference")
    if overwrite:
        assert main(["--quiet", "merge", *OLD_SOUP, "-o", str(out)]) == 0
        old = _soup(out)
    owner, name, when, before = MOMENTS[moment]
    struck = _sigterm_at(monkeypatch, owner, name, when, before)
    code = main(["--quiet", "merge", *NEW_SOUP, "-o", str(out)] + (["--overwrite"] if overwrite else []))
    monkeypatch.undo()
    assert struck, f"the run never reached {moment!r}"
    err = capsys.readouterr().err
    assert code == 130, err
    # what the interrupt left is what the last line says
    assert err.endswith(f"interrupted; the soup was written to {out} and kept\n" if left == "new"
                        else "interrupted; nothing was kept\n"), err
    if left is None:
        assert not out.exists() and not (tmp_path / "a").exists()
    else:
        assert _soup(out) == (old if left == "old" else new)
        assert not _hidden(out.parent)


#: moment -> (what to patch, which call): the steps of replacing the current folder's contents (``-o .``)
SWAP_MOMENTS: dict[str, tuple[object, str, Callable[..., bool]]] = {
    "first old file set aside": (os, "replace", lambda src, *_: Path(src).parent.name == "soup"),
    "old files all set aside": (os, "replace", lambda src, *_: Path(src).name.startswith(".soup.swap-")),
    "first new file moved in": (os, "replace", lambda src, *_: Path(src).parent.name.startswith(".soup.partial-")),
    "new soup in place": (os, "rmdir", lambda path, *_: Path(path).name.startswith(".soup.partial-")),
}


@pytest.mark.parametrize(("moment", "left"), [
    ("first old file set aside", "old"),
    ("old files all set aside", "old"),
    ("first new file moved in", "old"),
    ("new soup in place", "new"),
])
@pytest.mark.usefixtures("sigterm_unwinds")
def test_sigterm_while_swapping_the_current_folder_keeps_the_old_soup_or_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], moment: str, left: str,
) -> None:
    """``-o . --overwrite`` moves files one by one: struck at each step, the folder holds one whole soup."""
    out = tmp_path / "soup"
    assert main(["--quiet", "merge", *NEW_SOUP, "-o", str(tmp_path / "reference")]) == 0
    assert main(["--quiet", "merge", *OLD_SOUP, "-o", str(out)]) == 0
    old, new = _soup(out), _soup(tmp_path / "reference")
    monkeypatch.chdir(out)
    struck = _sigterm_at(monkeypatch, *SWAP_MOMENTS[moment])
    code = main(["--quiet", "merge", *NEW_SOUP, "-o", ".", "--overwrite"])
    monkeypatch.undo()
    assert struck, f"the run never reached {moment!r}"
    err = capsys.readouterr().err
    assert code == 130, err
    assert ("and kept" in err) == (left == "new"), err
    assert _soup(out) == (old if left == "old" else new) and not _hidden(tmp_path)


_KILL_AFTER_SETTING_ASIDE = """
import os, signal, sys
from pathlib import Path
out, real = Path(sys.argv.pop(1)), os.replace
def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if Path(src) == out:  # the old soup was just set aside: die before the new one is in place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from hub_soup.cli import console_main
console_main()
"""


def test_sigkill_mid_overwrite_keeps_the_old_soup_for_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "soup"
    assert main(["--quiet", "merge", *OLD_SOUP, "-o", str(out)]) == 0
    old = _soup(out)
    done = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_SETTING_ASIDE, str(out), "--quiet", "merge", *NEW_SOUP, "-o", str(out),
         "--overwrite"],
        capture_output=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists() and _hidden(tmp_path)  # the old soup aside, the new one in its partial folder
    # the next run finds the old soup back in place before it decides anything: refused without --overwrite
    assert main(["--quiet", "merge", *NEW_SOUP, "-o", str(out)]) == 2
    assert _soup(out) == old and not _hidden(tmp_path)


_KILL_MID_SWAP = """
import os, signal, sys
from pathlib import Path
folder, real = sys.argv.pop(1), os.replace
def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if Path(src).parent.name.startswith(folder):  # the first file moved out of that folder: die there
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from hub_soup.cli import console_main
console_main()
"""


@pytest.mark.parametrize("folder", ["soup", ".soup.partial-"], ids=["setting-old-files-aside", "moving-new-files-in"])
def test_sigkill_mid_swap_of_the_current_folder_keeps_the_old_soup_for_the_next_run(tmp_path: Path, folder: str) -> None:
    out = tmp_path / "soup"
    assert main(["--quiet", "merge", *OLD_SOUP, "-o", str(out)]) == 0
    old = _soup(out)
    done = subprocess.run(
        [sys.executable, "-c", _KILL_MID_SWAP, folder, "--quiet", "merge", *NEW_SOUP, "-o", ".", "--overwrite"],
        capture_output=True, timeout=120, cwd=out, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _hidden(tmp_path)  # the old soup's files, some or all, aside
    # the next run finds the old soup back in place before it decides anything: refused without --overwrite
    assert main(["--quiet", "merge", *NEW_SOUP, "-o", str(out)]) == 2
    assert _soup(out) == old and not _hidden(tmp_path)


def test_overwrite_keeps_the_previous_soup_when_the_new_one_fails(tmp_path: Path) -> None:
    refs, out = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")], tmp_path / "soup"
    assert main(["--quiet", "merge", *refs, "-o", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["--quiet", "merge", refs[0], str(broken), "-o", str(out), "--overwrite"]) == 2
    assert (out / "model.safetensors").read_bytes() == before


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_disk_full_is_a_clear_error_and_keeps_nothing(tmp_path: Path) -> None:
    refs, out = [str(DIGITS / "ft-lr0.01"), str(DIGITS / "ft-lr0.02-shift")], tmp_path / "soup"
    done = subprocess.run(
        [sys.executable, "-m", "hub_soup.cli", "--quiet", "merge", *refs, "-o", str(out)],
        capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120, check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "no space left for" in done.stderr and "nothing was kept" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".soup.partial-*"))


SECRET = "hf_SeCrEt0123456789abcdefghij"


def test_the_token_never_appears_in_anything_a_run_produces(
    hub: HubServer, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_token(SECRET, TEST_USER)
    api = HfApi(token=SECRET)
    repos = [f"{TEST_USER}/{unique(f'secret{i}')}" for i in (1, 2)]
    for i, repo in enumerate(repos):
        upload(api, timm_folder(tmp_path / f"f{i}", seed=30 + i), repo, private=True)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    soup_repo = f"{TEST_USER}/{unique('secret-soup')}"
    out = tmp_path / "soup"
    assert main(["merge", *repos, "--push", soup_repo, "--private", "--token", SECRET, "-o", str(out)]) == 0
    assert main(["merge", *repos, "--token", SECRET, "-o", str(tmp_path / "x"), "--dump-recipe"]) == 0
    # failures too: a revoked token, a push refused half-way
    monkeypatch.setenv("HF_TOKEN", SECRET + "revoked")
    assert main(["merge", *repos, "--push", soup_repo, "-o", str(tmp_path / "y")]) == 1
    monkeypatch.delenv("HF_TOKEN")
    hub.fail_next("POST", rf"/api/models/{soup_repo}/commit/", status=500)
    assert main(["merge", *repos, "--push", soup_repo, "--token", SECRET, "-o", str(tmp_path / "z"),
                 "--commit-message", "again", "--overwrite"]) == 1

    captured = capfd.readouterr()
    produced = [captured.out, captured.err, summary.read_text()]
    produced += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    produced += [data.decode(errors="replace") for data in hub.files(soup_repo).values()]
    assert all(SECRET not in text for text in produced)
    assert "rejected your token" in captured.err
