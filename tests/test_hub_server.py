"""Tests of the loopback Hub (``tests/hub_server.py``) through the real ``huggingface_hub`` client.

These pin down the client behaviours the rest of the suite relies on: which exception class each
server answer becomes, that the client skips unchanged files, and how interrupted downloads resume.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_fixtures import TEST_USER
from tests.hub_server import HubServer, git_blob_oid

TEXT = b"soup notes\n"
WEIGHTS = bytes(range(256)) * 64  # 16 KiB with NUL bytes: preupload routes it to LFS


def _new_repo(api: HfApi, repo_type: str = "model", private: bool = False) -> str:
    return api.create_repo(f"repo-{uuid.uuid4().hex[:12]}", repo_type=repo_type, private=private).repo_id


def _upload_sample(api: HfApi, repo_id: str, tmp_path: Path, weights: bytes = WEIGHTS) -> str:
    folder = tmp_path / "upload"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_bytes(TEXT)
    (folder / "model.safetensors").write_bytes(weights)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add files").oid


@pytest.fixture
def api(hub_token: str) -> HfApi:
    return HfApi(token=hub_token)


def test_upload_then_download_roundtrip(hub: HubServer, api: HfApi, hub_token: str, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    assert repo_id.startswith(f"{TEST_USER}/")
    # bytes no other test uploads: the server keeps LFS objects across repos, and one it has is not sent again
    weights = WEIGHTS + repo_id.encode()
    hub.requests.clear()
    commit_oid = _upload_sample(api, repo_id, tmp_path, weights)

    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in hub.requests)
    files = hub.files(repo_id)
    assert set(files) == {".gitattributes", "notes.txt", "model.safetensors"}
    assert files["notes.txt"] == TEXT and files["model.safetensors"] == weights
    assert b"*.safetensors filter=lfs" in files[".gitattributes"]
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    history = hub.commits(repo_id)
    assert [c["title"] for c in history] == ["add files", "initial commit"]
    assert history[0]["oid"] == commit_oid and history[0]["parents"] == [history[1]["oid"]]

    info = api.model_info(repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert siblings["model.safetensors"].lfs is not None and siblings["model.safetensors"].lfs.size == len(weights)
    assert siblings["notes.txt"].lfs is None and siblings["notes.txt"].blob_id == git_blob_oid(TEXT)

    text_meta = get_hf_file_metadata(hf_hub_url(repo_id, "notes.txt"), token=hub_token)
    lfs_meta = get_hf_file_metadata(hf_hub_url(repo_id, "model.safetensors"), token=hub_token)
    assert info.sha == text_meta.commit_hash == commit_oid
    assert text_meta.etag == git_blob_oid(TEXT) and text_meta.size == len(TEXT)
    assert lfs_meta.etag == siblings["model.safetensors"].lfs.sha256 and lfs_meta.size == len(weights)

    cache = tmp_path / "cache"
    assert Path(hf_hub_download(repo_id, "model.safetensors", cache_dir=cache)).read_bytes() == weights
    snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "snapshot-cache"))
    assert snapshot.name == commit_oid
    assert (snapshot / "notes.txt").read_bytes() == TEXT
    assert (snapshot / "model.safetensors").read_bytes() == weights


def test_pinned_sha_and_unchanged_push(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    first = _upload_sample(api, repo_id, tmp_path)

    # Same content again: preupload returns the remote oids, the client drops every file, no commit.
    _upload_sample(api, repo_id, tmp_path / "again")
    assert hub.commits(repo_id)[0]["oid"] == first

    second = api.upload_file(path_or_fileobj=b"v2\n", path_in_repo="notes.txt", repo_id=repo_id).oid
    assert second != first
    assert [c.commit_id for c in api.list_repo_commits(repo_id)] == [c["oid"] for c in hub.commits(repo_id)]
    (notes,) = api.get_paths_info(repo_id, ["notes.txt", "absent.txt"], revision=first)
    assert notes.blob_id == git_blob_oid(TEXT)
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    assert tree["notes.txt"].blob_id == git_blob_oid(b"v2\n") and tree["model.safetensors"].lfs is not None
    cache = tmp_path / "cache"
    assert Path(hf_hub_download(repo_id, "notes.txt", revision=first, cache_dir=cache)).read_bytes() == TEXT
    assert Path(hf_hub_download(repo_id, "notes.txt", cache_dir=cache)).read_bytes() == b"v2\n"

    # A stale parent commit is refused (412) and changes nothing.
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="stale", parent_commit=first)
    assert excinfo.value.response.status_code == 412
    assert hub.commits(repo_id)[0]["oid"] == second


def test_create_pr_and_branch_leave_main_unchanged(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    main_oid = _upload_sample(api, repo_id, tmp_path)

    commit = api.upload_file(path_or_fileobj=b"proposal\n", path_in_repo="notes.txt", repo_id=repo_id, create_pr=True)
    assert commit.pr_num == 1 and commit.pr_revision == "refs/pr/1"
    assert commit.pr_url is not None and commit.pr_url.endswith(f"{repo_id}/discussions/1")
    assert hub.commits(repo_id)[0]["oid"] == main_oid
    assert hub.files(repo_id)["notes.txt"] == TEXT
    assert hub.commits(repo_id, revision="refs/pr/1")[0]["parents"] == [main_oid]

    downloaded = hf_hub_download(repo_id, "notes.txt", revision="refs/pr/1", cache_dir=tmp_path / "cache")
    assert Path(downloaded).read_bytes() == b"proposal\n"
    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev\n", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    assert "dev.txt" in hub.files(repo_id, revision="dev") and "dev.txt" not in hub.files(repo_id)
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"]
    assert {b.name: b.target_commit for b in refs.branches}["main"] == main_oid


def test_private_repo_and_bad_tokens(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api, private=True)
    assert api.model_info(repo_id).private is True

    # Anonymous: 401 + RepoNotFound, so the client cannot tell private from missing (like the Hub).
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(token=False).model_info(repo_id)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", token=False, cache_dir=tmp_path)

    # Another user's valid token: 404 + RepoNotFound.
    hub.add_token("hf_someone_else", "someone-else")
    with pytest.raises(RepositoryNotFoundError) as stranger:
        HfApi(token="hf_someone_else").model_info(repo_id)
    assert stranger.value.response.status_code == 404

    # Unknown token: a plain 401 on every endpoint, *not* mapped to RepositoryNotFoundError.
    with pytest.raises(HfHubHTTPError) as bad:
        HfApi(token="hf_not_a_token").model_info(repo_id)
    assert bad.value.response.status_code == 401 and not isinstance(bad.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as bad_download:
        hf_hub_download(repo_id, ".gitattributes", token="hf_not_a_token", cache_dir=tmp_path)
    assert bad_download.value.response.status_code == 401

    # Writes need a token: anonymous commit is a 401.
    with pytest.raises(HfHubHTTPError) as anonymous_write:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=_new_repo(api))
    assert anonymous_write.value.response.status_code == 401


def test_missing_repo_revision_and_entry(api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{TEST_USER}/does-not-exist-{uuid.uuid4().hex}")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="0" * 40, cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path)
    assert not api.file_exists(repo_id, "missing.txt") and api.file_exists(repo_id, ".gitattributes")


def test_gated_repo(hub: HubServer, api: HfApi, hub_token: str, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    hub.add_gated(repo_id)
    hub.add_token("hf_gated_stranger", "gated-stranger")
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, ".gitattributes", token="hf_gated_stranger", cache_dir=tmp_path)
    assert HfApi(token="hf_gated_stranger").model_info(repo_id).gated == "manual"  # metadata stays readable
    assert Path(hf_hub_download(repo_id, ".gitattributes", token=hub_token, cache_dir=tmp_path)).is_file()


def test_server_error_during_commit_changes_nothing(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    before = hub.commits(repo_id)
    # The commit POST is not retried by the client: one injected 500 is enough to fail the upload.
    hub.fail_next("POST", rf"^/api/models/{repo_id}/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        _upload_sample(api, repo_id, tmp_path)
    assert excinfo.value.response.status_code == 500
    assert hub.commits(repo_id) == before
    assert set(hub.files(repo_id)) == {".gitattributes"}

    _upload_sample(api, repo_id, tmp_path / "retry")  # LFS object already stored: the batch skips its PUT
    assert set(hub.files(repo_id)) == {".gitattributes", "notes.txt", "model.safetensors"}


def test_cut_download_is_resumed_within_the_call(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    _upload_sample(api, repo_id, tmp_path)
    hub.requests.clear()
    hub.cut_next_download(r"/resolve/.*/model\.safetensors$", after_bytes=len(WEIGHTS) // 2)

    path = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path / "cache")

    assert Path(path).read_bytes() == WEIGHTS
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) == 2  # the cut one, then a `Range: bytes=<half>-` request answered with 206


def test_download_cut_on_every_retry_fails_then_succeeds(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    repo_id = _new_repo(api)
    _upload_sample(api, repo_id, tmp_path)
    pattern = r"/resolve/.*/model\.safetensors$"
    # http_get resumes in-call up to 5 times (1 s apart) while no byte arrives: cut all of them.
    hub.cut_next_download(pattern, after_bytes=len(WEIGHTS) // 2)
    hub.cut_next_download(pattern, after_bytes=0, times=5)
    cache = tmp_path / "cache"

    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(repo_id, "model.safetensors", cache_dir=cache)
    assert not list(cache.rglob("*.safetensors"))

    assert Path(hf_hub_download(repo_id, "model.safetensors", cache_dir=cache)).read_bytes() == WEIGHTS


def test_datasets_loads_parquet_splits(api: HfApi, hub_token: str, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    repo_id = _new_repo(api, repo_type="dataset", private=True)
    folder = tmp_path / "data-upload"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3], "y": ["a", "b", "c"]}), folder / "data/train-00000-of-00001.parquet")
    pq.write_table(pa.table({"x": [9], "y": ["z"]}), folder / "data/validation-00000-of-00001.parquet")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)

    train = datasets.load_dataset(repo_id, split="train", token=hub_token, cache_dir=str(tmp_path / "ds-cache"))
    assert train.to_dict() == {"x": [1, 2, 3], "y": ["a", "b", "c"]}
    validation = datasets.load_dataset(repo_id, split="validation", token=hub_token, streaming=True)
    assert list(validation) == [{"x": 9, "y": "z"}]
