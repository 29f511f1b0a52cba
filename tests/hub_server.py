"""A small Hugging Face Hub-compatible HTTP server for the test suite.

The real ``huggingface_hub`` client (never a mock) talks to this server over HTTP on 127.0.0.1,
so tests exercise exactly the code path a user's run takes: preupload, LFS batch + PUT + verify,
ndjson commits, ``HEAD``/``GET`` on ``/resolve`` with the Hub's headers, ``Range`` resumes, and the
error headers (``X-Error-Code``) that ``hf_raise_for_status`` turns into typed exceptions.

The module deliberately imports nothing from ``huggingface_hub``: the client reads ``HF_ENDPOINT``
when it is imported, so the server must be started (and its port known) before that happens.

Metadata (repos, refs, commits, trees) lives in memory; file contents are stored on disk under
``root/objects/<sha256>``, shared by every repo (content addressed, like LFS storage).
See ``/work/shared/HUB_API.md`` for the endpoints the client calls and their shapes.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Patterns of the .gitattributes every new repo starts with on the Hub: preupload sends matches to LFS.
_DEFAULT_LFS_PATTERNS = """
    *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz
    *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar
    *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*
""".split()  # noqa: SIM905 (one compact block reads better than 35 quoted items)
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _DEFAULT_LFS_PATTERNS)

_URL_SEGMENT_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_TYPE_TO_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends anything bigger to LFS, whatever its content
_MAX_BODY_BYTES = 256 * 1024 * 1024  # test payloads are small: anything bigger is a bug, refuse it
_SOCKET_TIMEOUT_S = 30.0  # a handler thread never waits longer than this on a silent client
_STREAM_CHUNK = 64 * 1024
_INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # exact text the client special-cases


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error": ...}`` plus ``X-Error-*`` headers,
    which is what ``hf_raise_for_status`` reads to pick the exception class."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid`` and ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _truthy(value: str | None) -> bool:
    """Query flags arrive as ``1``, ``true`` or ``True`` depending on the caller."""
    return value is not None and value.lower() in ("1", "true")


@dataclass(frozen=True)
class Blob:
    """One file version in a tree. ``git_oid`` is the git id of what git stores: the content itself for
    regular files, the LFS pointer file for LFS files (the Hub reports it as ``oid``/``blobId``)."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str

    @property
    def etag(self) -> str:
        """The Hub's ETag: sha256 for LFS files (also the download cache's blob name), git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    """An immutable commit; ``tree`` maps every file path to its blob and is never mutated."""

    oid: str
    title: str
    message: str
    parents: tuple[str, ...]
    tree: Mapping[str, Blob]
    author: str
    date: str


@dataclass
class Repo:
    """A repository. ``refs`` maps full ref names (``refs/heads/main``, ``refs/pr/1``) to commit oids."""

    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    next_discussion: int = 1
    gated_granted: set[str] | None = None  # None: not gated

    def resolve(self, revision: str) -> Commit | None:
        """Branch name, full ref (``refs/pr/1``) or full commit oid -> commit, like the Hub."""
        ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
        oid = self.refs.get(ref) or (revision if revision in self.commits else None)
        return self.commits[oid] if oid is not None else None

    def history(self, commit: Commit) -> list[Commit]:
        """``commit`` and its first-parent ancestors, newest first."""
        history = [commit]
        while history[-1].parents:
            history.append(self.commits[history[-1].parents[0]])
        return history

    def url(self, endpoint: str) -> str:
        return f"{endpoint}/{_TYPE_TO_URL_PREFIX[self.repo_type]}{self.repo_id}"


@dataclass
class _Fault:
    """A fault armed by a test: answer ``status``, or (``cut_after`` set) truncate the body and hang up."""

    method: str
    pattern: re.Pattern[str]
    remaining: int
    status: int = 500
    cut_after: int | None = None


@dataclass(frozen=True)
class _Token:
    user: str
    write: bool


@dataclass
class _Request:
    """A parsed request. ``segments`` are unquoted one by one, so ``refs%2Fpr%2F1`` stays one segment."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message  # case-insensitive: the client sends `authorization` in lower case
    body: bytes
    token: _Token | None

    def arg(self, name: str) -> str | None:
        return self.query.get(name, [None])[0]

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "Expected a JSON object")
        return data


@dataclass
class _Reply:
    """A response: a small in-memory body, or a byte range of a stored object streamed from disk."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    offset: int = 0
    length: int = 0

    @property
    def content_length(self) -> int:
        return len(self.body) if self.file is None else self.length

    def chunks(self) -> Iterator[bytes]:
        if self.file is None:
            yield self.body
            return
        with self.file.open("rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0 and (chunk := f.read(min(_STREAM_CHUNK, left))):
                left -= len(chunk)
                yield chunk


def _json_reply(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Reply:
    return _Reply(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())


class HubServer:
    """A Hub-compatible server on ``127.0.0.1:<free port>``, with fault injection for tests.

    Usage::

        hub = HubServer(tmp_path).start()
        hub.add_token("hf_alice", "alice")
        os.environ["HF_ENDPOINT"] = hub.endpoint  # before importing huggingface_hub
        ...
        hub.stop()
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._upload_tickets: dict[str, tuple[str, int]] = {}  # LFS "presigned" PUT urls -> (sha256, size)
        self._commit_counter = 0
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path without query) of every request

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        """Bind a free port now (so ``endpoint`` is known before the client is imported) and serve."""
        self._httpd = _HTTPServer(self)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and hang up kept-alive connections, so no handler thread outlives the server."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # the client closed it already
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=_SOCKET_TIMEOUT_S)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------- test knobs
    def add_token(self, token: str, user: str, write: bool = True) -> None:
        """Accept ``Authorization: Bearer <token>`` as ``user``; ``write=False`` models a read token."""
        with self._lock:
            self._tokens[token] = _Token(user, write)

    def add_gated(self, repo_id: str, repo_type: str = "model", granted: Iterable[str] = ()) -> None:
        """Gate an existing repo (KeyError if missing): file downloads need its owner or a ``granted``
        user; metadata stays readable, as on the Hub."""
        with self._lock:
            self._repos[(repo_type, repo_id)].gated_granted = set(granted)

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests with this method whose unquoted path (no query) matches
        ``path_regex`` (``re.search``) with ``status``. The client itself retries 429/5xx (sleeping 1 s,
        2 s, ...) on preupload, LFS batch/PUT/verify and paginated GETs, not on the commit POST."""
        self._arm(_Fault(method.upper(), re.compile(path_regex), times, status=status))

    def cut_next_download(self, path_regex: str, after_bytes: int, times: int = 1) -> None:
        """For the next ``times`` matching GETs, send the headers (full ``Content-Length``) and only
        ``after_bytes`` bytes of the body, then close the socket. Faults fire in the order armed, so
        ``cut(p, n)`` then ``cut(p, 0, times=5)`` also defeats the client's 5 in-call resumes."""
        self._arm(_Fault("GET", re.compile(path_regex), times, cut_after=after_bytes))

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _arm(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # ------------------------------------------------------------------------------------ introspection
    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict[str, Any]]:
        """History of ``revision`` following first parents, newest first (KeyError if unknown)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            head = repo.resolve(revision)
            if head is None:
                raise KeyError(revision)
            return [{"oid": c.oid, "title": c.title, "parents": list(c.parents)} for c in repo.history(head)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Current file contents at ``revision`` (KeyError if unknown)."""
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return {path: self._object_path(blob.sha256).read_bytes() for path, blob in commit.tree.items()}

    # ------------------------------------------------------------------------------------------ storage
    def _object_path(self, sha256: str) -> Path:
        return self._objects / sha256

    def _store(self, data: bytes) -> str:
        """Write content-addressed bytes atomically, so concurrent uploads of one object are harmless."""
        sha256 = hashlib.sha256(data).hexdigest()
        target = self._object_path(sha256)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self._objects, prefix=".upload-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return sha256

    def _has_object(self, sha256: str, size: int | None) -> bool:
        path = self._object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _regular_blob(self, data: bytes) -> Blob:
        return Blob(self._store(data), len(data), lfs=False, git_oid=git_blob_oid(data))

    def _lfs_blob(self, sha256: str, size: int | None) -> Blob:
        """``size`` is None when the client copies an LFS file: take it from storage."""
        size = self._object_path(sha256).stat().st_size if size is None else size
        return Blob(sha256, size, lfs=True, git_oid=git_blob_oid(_lfs_pointer(sha256, size)))

    # -------------------------------------------------------------------------------------- repo state
    def _new_commit(
        self, repo: Repo, parent: Commit | None, title: str, message: str, *, tree: Mapping[str, Blob], author: str
    ) -> Commit:
        """Record a commit (lock held). Its oid is a sha1 over a per-server counter, parent and tree:
        real-looking, deterministic for a given sequence of operations, unique even for equal content."""
        self._commit_counter += 1
        parents = (parent.oid,) if parent is not None else ()
        listing = "".join(f"{path}\0{blob.git_oid}\n" for path, blob in sorted(tree.items()))
        oid = hashlib.sha1(f"{self._commit_counter}\n{parents}\n{title}\n{message}\n{listing}".encode()).hexdigest()
        commit = Commit(oid, title, message, parents, dict(tree), author, _now_iso())
        repo.commits[oid] = commit
        return commit

    def _token(self, authorization: str | None) -> _Token | None:
        """Anonymous -> None; a known token -> its user; anything else -> 401 on every endpoint, like the Hub."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            found = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise HubError(401, _INVALID_TOKEN_MESSAGE)
        return found

    def _readable(self, repo_type: str, repo_id: str, token: _Token | None) -> Repo:
        """The Hub hides private repos behind the same answer as missing ones: 401 when anonymous (so the
        client suggests logging in), 404 when authenticated; both carry ``RepoNotFound``. Lock held."""
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (token is None or token.user != repo.owner)):
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str, token: _Token | None) -> Repo:
        """Writes need the owner's write token. Lock held."""
        repo = self._readable(repo_type, repo_id, token)
        if token is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if token.user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        if not token.write:
            raise HubError(403, "You have read access but not the required permissions for this operation")
        return repo

    @staticmethod
    def _check_gate(repo: Repo, token: _Token | None) -> None:
        user = token.user if token is not None else None
        if repo.gated_granted is None or user == repo.owner or user in repo.gated_granted:
            return
        message = (
            f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must have access to it and be"
            " authenticated to access it. Please log in."
        )
        raise HubError(401 if user is None else 403, message, "GatedRepo")

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _is_lfs_path(self, tree: Mapping[str, Blob], path: str) -> bool:
        """Whether ``.gitattributes`` in ``tree`` routes ``path`` to LFS. As in git, a pattern without
        ``/`` matches the basename, otherwise the whole path."""
        attributes = tree.get(".gitattributes")
        if attributes is None:
            return False
        basename = path.rsplit("/", 1)[-1]
        for line in self._object_path(attributes.sha256).read_text().splitlines():
            pattern, *attrs = line.split() or [""]
            if "filter=lfs" in attrs and fnmatch.fnmatchcase(path if "/" in pattern else basename, pattern):
                return True
        return False

    # ----------------------------------------------------------------------------------------- handlers
    def _create_repo(self, request: _Request) -> _Reply:
        token, body = request.token, request.json()
        if token is None or not token.write:
            raise HubError(401 if token is None else 403, "You need a write token to create a repository")
        repo_type = body.get("type") or "model"
        if repo_type not in _TYPE_TO_URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{body.get('organization') or token.user}/{body['name']}"
        private = bool(body.get("private")) or body.get("visibility") == "private"
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:  # with exist_ok=True the client reads `url` from this 409 body
                error = {"error": f"You already created this {repo_type} repo", "url": existing.url(self.endpoint)}
                return _json_reply(error, 409)
            repo = Repo(repo_type, repo_id, owner=token.user, private=private, created_at=_now_iso())
            tree = {".gitattributes": self._regular_blob(DEFAULT_GITATTRIBUTES.encode())}
            repo.refs["refs/heads/main"] = self._new_commit(
                repo, None, "initial commit", "", tree=tree, author=token.user
            ).oid
            self._repos[(repo_type, repo_id)] = repo
        return _json_reply({"url": repo.url(self.endpoint), "name": repo_id})

    def _delete_repo(self, request: _Request) -> _Reply:
        body = request.json()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or (request.token.user if request.token else "")
        with self._lock:
            self._writable(repo_type, f"{namespace}/{body['name']}", request.token)
            del self._repos[(repo_type, f"{namespace}/{body['name']}")]
        return _Reply(200)

    def _repo_info(self, repo: Repo, revision: str, blobs: bool) -> _Reply:
        commit = self._commit_of(repo, revision)
        siblings = []
        for path, blob in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info = {
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False if repo.gated_granted is None else "manual",
            "disabled": False,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "siblings": siblings,
        }
        return _json_reply(info)

    @staticmethod
    def _entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any] | None:
        """The tree API's description of ``path`` (file or directory) at ``commit``, None if absent.
        ``expand`` adds the last commit that changed it (HfFileSystem asks for it)."""
        oid = _entry_oid(commit.tree, path)
        if oid is None:
            return None
        blob = commit.tree.get(path)
        entry: dict[str, Any]
        if blob is None:
            entry = {"type": "directory", "path": path, "oid": oid, "size": 0}
        else:
            entry = {"type": "file", "path": path, "oid": oid, "size": blob.size}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        if expand:
            last = commit
            while last.parents and _entry_oid(repo.commits[last.parents[0]].tree, path) == oid:
                last = repo.commits[last.parents[0]]
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _tree(self, repo: Repo, revision: str, base: str, recursive: bool, expand: bool) -> _Reply:
        commit = self._commit_of(repo, revision)
        prefix = f"{base}/" if base else ""
        if base and (base in commit.tree or not any(p.startswith(prefix) for p in commit.tree)):
            message = f"{base} is not a directory at {revision}"
            raise HubError(404, message, "EntryNotFound", {"X-Repo-Commit": commit.oid})
        dirs: set[str] = set()
        files: list[str] = []
        for path in commit.tree:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            deepest_dir = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            dirs.update(prefix + "/".join(parts[:depth]) for depth in range(1, deepest_dir + 1))
            if recursive or len(parts) == 1:
                files.append(path)
        return _json_reply([self._entry(repo, commit, path, expand) for path in sorted(dirs) + sorted(files)])

    def _paths_info(self, repo: Repo, revision: str, form_body: bytes) -> _Reply:
        """The client posts a form (``paths`` repeated, ``expand``); absent paths are left out."""
        form = parse_qs(form_body.decode())
        commit = self._commit_of(repo, revision)
        expand = _truthy(form.get("expand", [None])[0])
        entries = (self._entry(repo, commit, path.strip("/"), expand) for path in form.get("paths", []))
        return _json_reply([entry for entry in entries if entry is not None])

    def _preupload(self, repo: Repo, revision: str, body: dict[str, Any]) -> _Reply:
        """Tell the client how to upload each file, and the current remote ``oid`` (sha256 for LFS,
        git sha1 otherwise) so that the client itself drops unchanged files from the commit."""
        tree = self._commit_of(repo, revision).tree
        files = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size > 0 and (size > _LFS_SIZE_THRESHOLD or b"\0" in sample or self._is_lfs_path(tree, path))
            remote = tree.get(path)
            oid = None if remote is None else remote.etag
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _json_reply({"files": files})

    def _commit(self, repo: Repo, revision: str, request: _Request) -> _Reply:
        """Apply an ndjson commit on top of the branch (or PR ref) head, atomically: any error leaves
        the repo untouched. With ``create_pr`` the commit goes to a new ``refs/pr/N`` instead."""
        assert request.token is not None  # checked by _writable
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "A commit header with a summary is required")
        # Regular contents are stored before taking the lock: content addressed, so harmless on failure.
        regular = {
            line["value"]["path"]: self._regular_blob(base64.b64decode(line["value"]["content"]))
            for line in lines
            if line.get("key") == "file"
        }
        ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
        with self._lock:
            if ref not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo.commits[repo.refs[ref]]
            if header.get("parentCommit") not in (None, parent.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(parent.tree)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    tree[value["path"]] = regular[value["path"]]
                elif key == "lfsFile":
                    if not self._has_object(value["oid"], value.get("size")):
                        raise HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    tree[value["path"]] = self._lfs_blob(value["oid"], value.get("size"))
                elif key in ("deletedFile", "deletedFolder"):
                    path = value["path"].strip("/")
                    doomed = [p for p in tree if p == path or (key == "deletedFolder" and p.startswith(f"{path}/"))]
                    if not doomed:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                elif key != "header":
                    raise HubError(400, f"Unsupported commit operation: {key}")
            title, message = header["summary"], header.get("description") or ""
            commit = self._new_commit(repo, parent, title, message, tree=tree, author=request.token.user)
            url = repo.url(self.endpoint)
            reply: dict[str, Any] = {"commitOid": commit.oid, "commitUrl": f"{url}/commit/{commit.oid}"}
            if _truthy(request.arg("create_pr")):
                ref = f"refs/pr/{repo.next_discussion}"
                reply["pullRequestUrl"] = f"{url}/discussions/{repo.next_discussion}"
                repo.next_discussion += 1
            repo.refs[ref] = commit.oid
        return _json_reply(reply)

    def _create_branch(self, repo: Repo, branch: str, body: dict[str, Any]) -> _Reply:
        with self._lock:
            ref = f"refs/heads/{branch}"
            if ref in repo.refs:
                raise HubError(409, f"Reference {ref} already exists")
            repo.refs[ref] = self._commit_of(repo, body.get("startingPoint") or "main").oid
        return _Reply(200)

    def _lfs_batch(self, repo: Repo, body: dict[str, Any]) -> _Reply:
        """Basic transfers only (multipart happens only when the server sends ``chunk_size``). PUT urls
        carry a random ticket, like presigned S3 urls, because the client sends no credentials there."""
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if not self._has_object(oid, size):  # without `actions` the client skips the object
                ticket = secrets.token_urlsafe(16)
                with self._lock:
                    self._upload_tickets[ticket] = (oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                    "verify": {"href": f"{repo.url(self.endpoint)}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        return _json_reply({"transfer": "basic", "objects": objects}, headers=lfs_json)

    def _lfs_upload(self, ticket: str, data: bytes) -> _Reply:
        with self._lock:
            expected = self._upload_tickets.get(ticket)
        if expected is None:
            raise HubError(404, "Unknown upload url")
        if (hashlib.sha256(data).hexdigest(), len(data)) != expected:
            raise HubError(400, "Uploaded content does not match the announced oid and size")
        self._store(data)
        return _Reply(200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, body: dict[str, Any]) -> _Reply:
        if not self._has_object(body["oid"], int(body["size"])):
            raise HubError(404, f"Object {body['oid']} was not uploaded")
        return _Reply(200)

    def _resolve(self, repo: Repo, revision: str, path: str, range_header: str | None) -> _Reply:
        """Serve a file without redirects, with what ``hf_hub_download`` needs: ``X-Repo-Commit``, an
        ETag (``X-Linked-*`` take precedence for LFS), the size, and ``Range`` to resume."""
        commit = self._commit_of(repo, revision)
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        byte_range = _parse_range(range_header, blob.size)
        if byte_range is None:
            return _Reply(200, headers, file=self._object_path(blob.sha256), length=blob.size)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return _Reply(206, headers, file=self._object_path(blob.sha256), offset=start, length=end - start + 1)

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, request: _Request) -> _Reply:
        method = request.method
        match request.segments:
            case ["api", "whoami-v2"] if method == "GET":
                if request.token is None:
                    raise HubError(401, "You must be authenticated")
                role = "write" if request.token.write else "read"
                auth = {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}
                return _json_reply({"type": "user", "name": request.token.user, "orgs": [], "auth": auth})
            case ["api", "validate-yaml"] if method == "POST":
                return _json_reply({"errors": [], "warnings": []})
            case ["api", "repos", "create"] if method == "POST":
                return self._create_repo(request)
            case ["api", "repos", "delete"] if method == "DELETE":
                return self._delete_repo(request)
            case ["api", ("models" | "datasets" | "spaces") as kind, namespace, name, *rest]:
                return self._route_repo_api(request, _URL_SEGMENT_TO_TYPE[kind], f"{namespace}/{name}", rest)
            case ["lfs-upload", ticket] if method == "PUT":
                return self._lfs_upload(ticket, request.body)
            case [("datasets" | "spaces") as kind, namespace, name, *rest]:
                return self._route_repo_files(request, _URL_SEGMENT_TO_TYPE[kind], namespace, name, rest)
            case [namespace, name, *rest]:
                return self._route_repo_files(request, "model", namespace, name, rest)
        raise HubError(404, f"No route for {method} /{'/'.join(request.segments)}")

    def _route_repo_api(self, request: _Request, repo_type: str, repo_id: str, rest: list[str]) -> _Reply:
        """``/api/{type}s/{repo_id}/...``: metadata reads, preupload, commit, branches."""
        method, token = request.method, request.token
        if rest and rest[0].startswith("xet-"):
            raise HubError(501, "Xet storage is not supported by this test server: set HF_HUB_DISABLE_XET=1")
        if method == "GET":
            with self._lock:
                repo = self._readable(repo_type, repo_id, token)
                match rest:
                    case []:
                        return self._repo_info(repo, "main", _truthy(request.arg("blobs")))
                    case ["revision", *revision] if revision:
                        return self._repo_info(repo, "/".join(revision), _truthy(request.arg("blobs")))
                    case ["tree", revision, *path]:
                        recursive, expand = _truthy(request.arg("recursive")), _truthy(request.arg("expand"))
                        return self._tree(repo, revision, "/".join(path).strip("/"), recursive, expand)
                    case ["refs"]:
                        return self._refs(repo, _truthy(request.arg("include_prs")))
                    case ["commits", revision]:
                        return self._list_commits(repo, revision)
        elif method == "POST":
            match rest:
                case ["paths-info", revision]:
                    with self._lock:
                        return self._paths_info(self._readable(repo_type, repo_id, token), revision, request.body)
                case ["preupload", revision]:
                    with self._lock:
                        return self._preupload(self._writable(repo_type, repo_id, token), revision, request.json())
                case ["commit", revision]:
                    with self._lock:
                        repo = self._writable(repo_type, repo_id, token)
                    return self._commit(repo, revision, request)  # stores blobs, then takes the lock
                case ["branch", branch]:
                    with self._lock:
                        repo = self._writable(repo_type, repo_id, token)
                    return self._create_branch(repo, branch, request.json())
        raise HubError(404, f"No route for {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _route_repo_files(
        self, request: _Request, repo_type: str, namespace: str, name: str, rest: list[str]
    ) -> _Reply:
        """``/{prefix}{repo_id}/resolve/...`` downloads and ``/{prefix}{repo_id}.git/info/lfs/...`` uploads."""
        method, token = request.method, request.token
        git_url = name.endswith(".git")
        match rest:
            case ["info", "lfs", "objects", ("batch" | "verify") as action] if git_url and method == "POST":
                with self._lock:
                    repo = self._writable(repo_type, f"{namespace}/{name.removesuffix('.git')}", token)
                return self._lfs_batch(repo, request.json()) if action == "batch" else self._lfs_verify(request.json())
            case ["resolve", revision, *path] if method in ("GET", "HEAD") and path:
                with self._lock:
                    repo = self._readable(repo_type, f"{namespace}/{name}", token)
                    self._check_gate(repo, token)
                    return self._resolve(repo, revision, "/".join(path), request.headers.get("Range"))
        raise HubError(404, f"No route for {method} /{namespace}/{name}/{'/'.join(rest)}")

    @staticmethod
    def _refs(repo: Repo, include_prs: bool) -> _Reply:
        def infos(prefix: str) -> list[dict[str, str]]:
            return [
                {"name": ref.removeprefix("refs/heads/"), "ref": ref, "targetCommit": oid}
                for ref, oid in sorted(repo.refs.items())
                if ref.startswith(prefix)
            ]

        refs: dict[str, Any] = {"branches": infos("refs/heads/"), "converts": [], "tags": []}
        if include_prs:
            refs["pullRequests"] = infos("refs/pr/")
        return _json_reply(refs)

    def _list_commits(self, repo: Repo, revision: str) -> _Reply:
        return _json_reply(
            [
                {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
                for c in repo.history(self._commit_of(repo, revision))
            ]
        )


def _entry_oid(tree: Mapping[str, Blob], path: str) -> str | None:
    """Git oid of a file, or a stable oid for a directory (sha1 over its listing); None if absent."""
    blob = tree.get(path)
    if blob is not None:
        return blob.git_oid
    prefix = f"{path}/" if path else ""
    listing = "".join(f"{p}\0{b.git_oid}\n" for p, b in sorted(tree.items()) if p.startswith(prefix))
    return hashlib.sha1(f"tree\n{listing}".encode()).hexdigest() if listing else None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range -> inclusive (start, end); None serves the whole file (no header, or
    one we do not parse); 416 when it starts past the end (the client reads that as 'complete')."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or not (match[1] or match[2]):
        return None
    if match[1]:
        start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
    else:
        start, end = max(size - int(match[2]), 0), size - 1
    if start >= size or start > end:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


class _HTTPServer(ThreadingHTTPServer):
    """Threaded server bound to a free loopback port, knowing its :class:`HubServer`."""

    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-response (aborted or partial reads) is normal; report anything else."""
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Parses one request, applies armed faults, and writes the server's :class:`_Reply`.

    Speaks HTTP/1.1 keep-alive because the client pools connections; every response therefore
    carries an exact ``Content-Length``."""

    protocol_version = "HTTP/1.1"
    timeout = _SOCKET_TIMEOUT_S  # set on the socket by StreamRequestHandler.setup
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging on stderr; tests read ``HubServer.requests`` instead."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _handle(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        # Split first, then unquote each segment: a revision like `refs%2Fpr%2F1` is one segment.
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        path = "/" + "/".join(segments)
        hub.requests.append((self.command, path))
        cut_after: int | None = None
        try:
            body = self._read_body()
            fault = hub._take_fault(self.command, path)
            if fault is not None and fault.cut_after is None:
                raise HubError(fault.status, f"Injected failure ({fault.status}) for {self.command} {path}")
            cut_after = fault.cut_after if fault is not None else None
            token = hub._token(self.headers.get("Authorization"))
            reply = hub._route(_Request(self.command, segments, parse_qs(url.query), self.headers, body, token))
        except HubError as err:
            reply = _json_reply({"error": err.message}, err.status, {**err.headers, "X-Error-Message": err.message})
            if err.code is not None:
                reply.headers["X-Error-Code"] = err.code
        except (KeyError, ValueError) as err:  # a payload missing a field or with a bad value
            reply = _json_reply({"error": f"Malformed request: {err!r}"}, 400)
        self._send(reply, cut_after)

    def _read_body(self) -> bytes:
        """Read the whole body (Content-Length, or chunked as httpx streams some uploads), bounded by
        ``_MAX_BODY_BYTES``; the socket timeout bounds the wait."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            length = int(self.headers.get("Content-Length") or 0)
            self._check_body_size(length)
            return self.rfile.read(length)
        parts: list[bytes] = []
        total = 0
        while size := int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
            total += size
            self._check_body_size(total)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # CRLF closing the chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _check_body_size(self, size: int) -> None:
        if size > _MAX_BODY_BYTES:
            self.close_connection = True  # the unread rest of the body makes the connection unusable
            raise HubError(413, "Request body too large")

    def _send(self, reply: _Reply, cut_after: int | None) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(reply.content_length))
        self.end_headers()
        if self.command == "HEAD":
            return
        budget = reply.content_length if cut_after is None else min(cut_after, reply.content_length)
        for chunk in reply.chunks():
            if budget <= 0:
                break
            self.wfile.write(chunk[:budget])
            budget -= len(chunk)
        if cut_after is not None:
            self.close_connection = True  # the client sees EOF before Content-Length: a cut download
