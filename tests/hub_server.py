"""A loopback stand-in for the Hugging Face Hub, for tests that push to and pull from "the Hub".

``LocalHub`` runs a real HTTP server on 127.0.0.1 (standard library only: ``http.server.ThreadingHTTPServer``
in a daemon thread) that speaks enough of the Hub's HTTP API for the *real* ``huggingface_hub`` client
(checked against v2.4.0) and ``transformers`` to create repos, commit files, and download them again::

    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("test-user/tiny")
        api.upload_folder(repo_id="test-user/tiny", folder_path=some_dir)
        path = hf_hub_download("test-user/tiny", "config.json", endpoint=hub.endpoint, cache_dir=tmp)
        assert hub.files("test-user/tiny")["config.json"] == Path(some_dir, "config.json").read_bytes()

Pointing the client at the server
---------------------------------
Passing ``endpoint=hub.endpoint`` works for ``HfApi(...)``, ``hf_hub_download`` and ``snapshot_download``, but
many code paths take no endpoint argument and read module state that ``huggingface_hub`` computes *at import
time* from ``HF_ENDPOINT`` (``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, the module-level
``huggingface_hub.hf_api.api`` singleton behind ``huggingface_hub.upload_file``/``create_repo``/..., and the lazily
created ``transformers.utils.hub._hf_api`` behind ``push_to_hub``/``from_pretrained``). Setting ``HF_ENDPOINT``
after import changes none of them. The pytest fixture ``local_hub`` in ``tests/conftest_hub.py`` patches all of
them (and the cache/token/offline settings); see ``docs/hub_server.md`` for the list.

Protocol notes
--------------
* Every file is answered ``"uploadMode": "regular"`` by ``/preupload``, so file contents travel base64-encoded
  inside the NDJSON ``/commit`` call and neither Git LFS nor Xet is ever involved (also for multi-MB weights).
  ``preupload`` returns the git blob oid of the file already at that path, so the client skips unchanged files
  exactly as it does against the real Hub.
* Repos are stored in memory. Every commit gets a new 40-hex sha; branches, tags and ``refs/pr/N`` refs point at
  commits; any old commit sha stays resolvable. A new repo starts, as on the Hub, with one "initial commit" holding
  a ``.gitattributes`` file.
* Repo ids must be namespaced (``owner/name``); ``create_repo("name")`` creates ``{hub.user}/name``.
* Writes need ``Authorization: Bearer <hub.token>`` (401 otherwise) unless the hub was built with ``token=None``.
  Private repos look nonexistent (404 ``RepoNotFound``) to requests without the token.
* Errors use the Hub's conventions (``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``, JSON body
  ``{"error": ...}``) so the client raises its usual typed exceptions.

Failure injection
-----------------
``hub.fail_next("commit", status=500)`` makes the next commit call answer 500 (``drop=True``: close the connection
without answering; ``after_apply=True``: perform the operation first, then fail, i.e. a lost response). Route kinds
are listed in ``ROUTE_KINDS``. Beware that the client retries some calls by itself (``http_backoff``: 408/429/5xx
and connection errors, 5 retries, 1 s, 2 s, 4 s... waits): preupload, tree listing, the HEAD of a download when
nothing is cached, and -- with ``hf_xet`` installed -- the commit call of ``upload_folder``. ``create_repo`` and the
commit call of ``create_commit``/``upload_file``/transformers' ``push_to_hub`` are not retried. ``hub.requests`` records every request, ``hub.unhandled`` every
request no route matched, ``hub.errors`` every exception raised inside the server (a bug in this module).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["ROUTE_KINDS", "Commit", "HubError", "LocalHub", "RequestRecord", "git_blob_oid"]

# URL segment after /api/ -> repo type, and repo type -> prefix of its web/resolve URLs.
API_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

ROUTE_KINDS = frozenset(
    {
        "whoami",  # GET  /api/whoami-v2
        "create",  # POST /api/repos/create
        "delete",  # DELETE /api/repos/delete
        "validate-yaml",  # POST /api/validate-yaml
        "info",  # GET  /api/{type}s/{repo}[/revision/{rev}]
        "tree",  # GET  /api/{type}s/{repo}/tree/{rev}[/{path}]
        "paths-info",  # POST /api/{type}s/{repo}/paths-info/{rev}
        "refs",  # GET  /api/{type}s/{repo}/refs
        "commits",  # GET  /api/{type}s/{repo}/commits/{rev}
        "preupload",  # POST /api/{type}s/{repo}/preupload/{rev}
        "commit",  # POST /api/{type}s/{repo}/commit/{rev}
        "branch",  # POST|DELETE /api/{type}s/{repo}/branch/{branch}
        "tag",  # POST /api/{type}s/{repo}/tag/{rev}
        "discussions",  # POST /api/{type}s/{repo}/discussions, GET .../discussions/{num} (pull requests only)
        "resolve",  # HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}
        "agent-harnesses",  # GET /api/agent-harnesses (fetched by huggingface_hub to build its User-Agent)
    }
)

# What a new repo on the Hub starts with (abridged).
INITIAL_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid``/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """Current time in the Hub's format, e.g. 2024-05-01T12:00:00.123Z."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repo's files (``files`` must not be mutated)."""

    oid: str
    title: str
    message: str
    parent: str | None
    date: str
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class RequestRecord:
    """One request seen by the server. ``status`` is None when the connection was dropped on purpose."""

    method: str
    path: str
    kind: str | None
    status: int | None


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # full ref name ("refs/heads/main") -> commit oid
    pull_requests: dict[int, dict] = field(default_factory=dict)  # num -> {"title", "description", "createdAt"}

    def open_pull_request(self, title: str, description: str = "") -> str:
        """Open a PR against main: a new ``refs/pr/N`` ref at main's head. Returns the ref."""
        num = len(self.pull_requests) + 1
        self.pull_requests[num] = {"title": title, "description": description, "createdAt": _now()}
        self.refs[f"refs/pr/{num}"] = self.refs["refs/heads/main"]
        return f"refs/pr/{num}"


@dataclass
class _Failure:
    kind: str
    status: int
    remaining: int
    drop: bool
    after_apply: bool
    method: str | None


class HubError(Exception):
    """An HTTP error answer, in the Hub's format (JSON ``{"error": message}`` plus ``X-Error-Code``)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class LocalHub:
    """In-memory Hugging Face Hub served over HTTP on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(self, *, token: str | None = "hf_test", user: str = "test-user"):
        self.token = token
        self.user = user
        self.requests: list[RequestRecord] = []
        self.unhandled: list[str] = []
        self.errors: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---------------------------------------------------------------- failure injection

    def fail_next(
        self,
        kind: str,
        status: int = 500,
        count: int = 1,
        *,
        drop: bool = False,
        after_apply: bool = False,
        method: str | None = None,
    ) -> None:
        """Make the next ``count`` requests of route ``kind`` (one of ``ROUTE_KINDS``) fail.

        The failing request answers ``status`` with a JSON error body, or with ``drop=True`` the server closes the
        connection without answering. With ``after_apply=True`` the request is carried out first (e.g. the commit
        is recorded) and only the answer fails. ``method`` restricts the failure to one HTTP method (e.g. "GET" to
        fail a download but not the HEAD that precedes it).
        """
        if kind not in ROUTE_KINDS:
            raise ValueError(f"unknown route kind {kind!r}; expected one of {sorted(ROUTE_KINDS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._failures.append(_Failure(kind, status, count, drop, after_apply, method and method.upper()))

    @property
    def pending_failures(self) -> int:
        """How many injected failures have not been triggered yet."""
        with self._lock:
            return sum(f.remaining for f in self._failures)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _take_failure(self, kind: str, method: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.kind == kind and failure.method in (None, method):
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                    return failure
        return None

    # ---------------------------------------------------------------- direct (server-side) access for tests

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo directly (no HTTP), with the same initial commit as over HTTP."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = _Repo(repo_type, repo_id, private, _now())
            self._repos[(repo_type, repo_id)] = repo
            self._apply_commit(repo, "refs/heads/main", "initial commit", "", {".gitattributes": INITIAL_GITATTRIBUTES})

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str],
        *,
        message: str = "Commit from test",
        deletions: Iterable[str] = (),
        revision: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit files directly (no HTTP) to branch ``revision``; returns the new commit oid."""
        adds = {path: data.encode() if isinstance(data, str) else bytes(data) for path, data in files.items()}
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            ref = f"refs/heads/{revision}"
            if ref not in repo.refs:
                raise ValueError(f"no branch {revision!r} in {repo_id}")
            return self._apply_commit(repo, ref, message, "", adds, deleted_files=deletions).oid

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot of the repo at ``revision`` (branch, tag, ``refs/pr/N`` or commit sha): path -> content."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """History of ``revision``, newest first (like ``HfApi.list_repo_commits``)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return self._history(repo, self._resolve(repo, revision))

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """All refs of the repo: full ref name ("refs/heads/main", "refs/tags/v1", "refs/pr/1") -> commit oid."""
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id).refs)

    # ---------------------------------------------------------------- repo state (call with self._lock held)

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on this LocalHub")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        """Branch, tag, PR ref, full or unique-prefix commit sha -> commit oid."""
        for ref in (f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.refs[ref]
        if _HEX_RE.match(revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history(self, repo: _Repo, oid: str | None) -> list[Commit]:
        history = []
        while oid is not None:
            commit = repo.commits[oid]
            history.append(commit)
            oid = commit.parent
        return history

    def _apply_commit(
        self,
        repo: _Repo,
        ref: str,
        title: str,
        message: str,
        adds: Mapping[str, bytes],
        deleted_files: Iterable[str] = (),
        deleted_folders: Iterable[str] = (),
        base: str | None = None,
    ) -> Commit:
        """Record a commit on top of ``base`` (default: what ``ref`` points at) and move ``ref`` to it."""
        parent = base if base is not None else repo.refs.get(ref)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted_files:
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            doomed = [path for path in files if path.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            for path in doomed:
                del files[path]
        for path, data in adds.items():
            files[_check_path(path)] = data
        fingerprint = json.dumps(
            [parent, title, message, sorted((p, git_blob_oid(d)) for p, d in files.items()), next(self._counter)]
        )
        commit = Commit(hashlib.sha1(fingerprint.encode()).hexdigest(), title, message, parent, _now(), files)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _list_entries(files: Mapping[str, bytes], root: str, recursive: bool) -> list[dict]:
    """Tree entries under folder ``root`` ("" = repo root), files and folders, like GET /tree."""
    prefix = root.rstrip("/") + "/" if root else ""
    entries: dict[str, dict] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :].split("/")
        depth = len(rest) if recursive else 1
        for i in range(1, min(depth, len(rest) - 1) + 1):  # folders on the way
            folder = prefix + "/".join(rest[:i])
            if folder not in entries:
                entries[folder] = _folder_entry(files, folder)
        if recursive or len(rest) == 1:
            entries[path] = _file_entry(path, data)
    return sorted(entries.values(), key=lambda e: e["path"])


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}


def _folder_entry(files: Mapping[str, bytes], folder: str) -> dict:
    content = sorted((p, git_blob_oid(d)) for p, d in files.items() if p.startswith(folder + "/"))
    return {
        "type": "directory",
        "oid": hashlib.sha1(json.dumps(content).encode()).hexdigest(),
        "size": 0,
        "path": folder,
    }


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the per-server subclass
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    # ---------------------------------------------------------------- plumbing

    def _handle(self) -> None:
        hub = self.hub
        body = self._read_body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # Split before unquoting: revisions arrive quoted with safe="" ("refs%2Fpr%2F1").
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        kind, route = self._route(segments)
        if route is None:
            hub.unhandled.append(f"{self.command} {self.path}")
            response = _Response.json({"error": f"LocalHub: no route for {self.command} {url.path}"}, 404)
            kind = None
        else:
            failure = hub._take_failure(kind, self.command)
            if failure is not None and not failure.after_apply:
                return self._fail(failure, url.path)
            response = self._run(route, body)
            if failure is not None:
                return self._fail(failure, url.path)
        hub.requests.append(RequestRecord(self.command, url.path, kind, response.status))
        self._send(response)

    def _run(self, route: Any, body: bytes) -> _Response:
        try:
            return route(body)
        except HubError as err:
            return _Response.json({"error": err.message}, err.status, {"X-Error-Code": err.code or "", **err.headers})
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            return _Response.json({"error": "LocalHub internal error:\n" + traceback.format_exc()}, 500)

    def _fail(self, failure: _Failure, path: str) -> None:
        if failure.drop:
            self.hub.requests.append(RequestRecord(self.command, path, failure.kind, None))
            self.close_connection = True  # answer nothing; socketserver closes the socket
            return
        self.hub.requests.append(RequestRecord(self.command, path, failure.kind, failure.status))
        message = f"LocalHub: injected failure (HTTP {failure.status}) on '{failure.kind}'"
        self._send(_Response.json({"error": message}, failure.status))

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        headers = {k: v for k, v in response.headers.items() if v}
        headers.setdefault("Content-Length", str(len(response.body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def _has_token(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_token(self) -> None:
        if not self._has_token():
            raise HubError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        """The repo if it exists and this request may see it (call with the hub lock held)."""
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._has_token()):
            raise _repo_not_found(repo_id)
        return repo

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.hub.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # ---------------------------------------------------------------- routing

    def _route(self, seg: list[str]) -> tuple[str, Any]:
        """(kind, callable taking the request body) for this request, or (None, None)."""
        method = self.command
        if seg[:1] == ["api"]:
            rest = seg[1:]
            simple = {
                ("GET", "whoami-v2"): ("whoami", self._whoami),
                ("GET", "agent-harnesses"): ("agent-harnesses", self._agent_harnesses),
                ("POST", "validate-yaml"): ("validate-yaml", self._validate_yaml),
                ("POST", "repos/create"): ("create", self._create_repo),
                ("DELETE", "repos/delete"): ("delete", self._delete_repo),
            }
            if (method, "/".join(rest)) in simple:
                return simple[(method, "/".join(rest))]
            if len(rest) >= 3 and rest[0] in API_REPO_TYPES:
                repo_type, repo_id, action, args = API_REPO_TYPES[rest[0]], "/".join(rest[1:3]), rest[3:4], rest[4:]

                def bind(route, *args):  # -> callable taking the request body
                    return functools.partial(route, repo_type, repo_id, *args)

                if method == "GET" and not action:
                    return "info", bind(self._info, None)
                if method == "GET" and action == ["revision"] and len(args) == 1:
                    return "info", bind(self._info, args[0])
                if method == "GET" and action == ["tree"] and args:
                    return "tree", bind(self._tree, args[0], "/".join(args[1:]))
                if method == "GET" and action == ["refs"] and not args:
                    return "refs", bind(self._refs)
                if method == "GET" and action == ["commits"] and len(args) == 1:
                    return "commits", bind(self._list_commits, args[0])
                if method == "POST" and action == ["paths-info"] and len(args) == 1:
                    return "paths-info", bind(self._paths_info, args[0])
                if method == "POST" and action == ["preupload"] and len(args) == 1:
                    return "preupload", bind(self._preupload, args[0])
                if method == "POST" and action == ["commit"] and len(args) == 1:
                    return "commit", bind(self._commit, args[0])
                if method in ("POST", "DELETE") and action == ["branch"] and len(args) == 1:
                    return "branch", bind(self._branch, args[0])
                if method == "POST" and action == ["tag"] and len(args) == 1:
                    return "tag", bind(self._tag, args[0])
                if method == "POST" and action == ["discussions"] and not args:
                    return "discussions", bind(self._open_pull_request)
                if method == "GET" and action == ["discussions"] and len(args) == 1 and args[0].isdigit():
                    return "discussions", bind(self._pull_request, int(args[0]))
            return None, None
        # Web/resolve URLs: /[datasets/|spaces/]{owner}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if seg[:1] in (["datasets"], ["spaces"]):
            repo_type, seg = API_REPO_TYPES[seg[0]], seg[1:]
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return "resolve", functools.partial(
                self._resolve_file, repo_type, "/".join(seg[:2]), seg[3], "/".join(seg[4:])
            )
        return None, None

    # ---------------------------------------------------------------- routes

    def _whoami(self, body: bytes) -> _Response:
        self._require_token()
        return _Response.json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "LocalHub Test User",
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _agent_harnesses(self, body: bytes) -> _Response:
        return _Response.json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, body: bytes) -> _Response:
        self._json_body(body)
        return _Response.json({"warnings": [], "errors": []})

    def _create_repo(self, body: bytes) -> _Response:
        self._require_token()
        payload = self._json_body(body)
        name, owner = payload.get("name"), payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Unsupported repo type {repo_type!r}")
        if not (isinstance(name, str) and _NAME_RE.match(name) and _NAME_RE.match(owner)):
            raise HubError(400, f"Invalid repo name: {owner}/{name}")
        repo_id = f"{owner}/{name}"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                return _Response.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        return _Response.json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _delete_repo(self, body: bytes) -> _Response:
        self._require_token()
        payload = self._json_body(body)
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        with self.hub._lock:
            self._repo(payload.get("type") or "model", repo_id)
            del self.hub._repos[(payload.get("type") or "model", repo_id)]
        return _Response()

    def _info(self, repo_type: str, repo_id: str, revision: str | None, body: bytes) -> _Response:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision or "main")]
        with_blobs = self._flag("blobs")
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_oid(data)} if with_blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(d) for d in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _Response.json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, body: bytes) -> _Response:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        if path and not any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
            raise HubError(404, f"Folder not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        return _Response.json(_list_entries(commit.files, path, self._flag("recursive")))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        entries = []
        for path in parse_qs(body.decode()).get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                entries.append(_folder_entry(commit.files, path))
        return _Response.json(entries)

    def _refs(self, repo_type: str, repo_id: str, body: bytes) -> _Response:
        with self.hub._lock:
            refs = dict(self._repo(repo_type, repo_id).refs)

        def group(prefix: str) -> list[dict]:
            return [
                {"name": ref[len(prefix) :], "ref": ref, "targetCommit": oid}
                for ref, oid in sorted(refs.items())
                if ref.startswith(prefix)
            ]

        answer = {"branches": group("refs/heads/"), "tags": group("refs/tags/"), "converts": []}
        if self._flag("include_prs"):
            answer["pullRequests"] = [
                {"name": ref, "ref": ref, "targetCommit": oid}
                for ref, oid in sorted(refs.items())
                if _PR_REF_RE.match(ref)
            ]
        return _Response.json(answer)

    def _list_commits(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            history = self.hub._history(repo, self.hub._resolve(repo, revision))
        authors = [{"user": self.hub.user}]
        return _Response.json(
            [{"id": c.oid, "title": c.title, "message": c.message, "authors": authors, "date": c.date} for c in history]
        )

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        self._require_token()
        payload = self._json_body(body)
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        answers = []
        for entry in payload.get("files", []):
            answer = {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False}
            if entry["path"] in commit.files:
                answer["oid"] = git_blob_oid(commit.files[entry["path"]])
            answers.append(answer)
        return _Response.json({"files": answers, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        self._require_token()
        header: dict = {}
        adds: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = self._json_body(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    adds[value["path"]] = base64.b64decode(content, validate=True)
                else:
                    adds[value["path"]] = content.encode()
            elif key == "deletedFile":
                deleted_files.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            elif key == "lfsFile":
                raise HubError(400, "LocalHub does not implement LFS/Xet uploads (preupload answers 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "Commit summary (header line) is missing")

        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            base = self.hub._resolve(repo, revision)
            if self._flag("create_pr"):
                ref = repo.open_pull_request(header["summary"], header.get("description", ""))
            elif f"refs/heads/{revision}" in repo.refs:
                ref = f"refs/heads/{revision}"
            elif _PR_REF_RE.match(revision):
                ref = revision
            else:
                raise HubError(400, f"Cannot commit to {revision!r}: not a branch")
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = self.hub._apply_commit(
                repo,
                ref,
                header["summary"],
                header.get("description", ""),
                adds,
                deleted_files,
                deleted_folders,
                base=base,
            )
            url = self._repo_url(repo)
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{url}/commit/{commit.oid}", "hookOutput": ""}
        if pr := _PR_REF_RE.match(ref):
            answer["pullRequestUrl"] = f"{url}/discussions/{pr.group(1)}"
        return _Response.json(answer)

    def _branch(self, repo_type: str, repo_id: str, branch: str, body: bytes) -> _Response:
        self._require_token()
        ref = f"refs/heads/{branch}"
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            if self.command == "DELETE":
                if branch == "main" or ref not in repo.refs:
                    raise HubError(400 if branch == "main" else 404, f"Cannot delete branch {branch!r}")
                del repo.refs[ref]
                return _Response()
            if branch.startswith("refs/") or not _NAME_RE.match(branch.replace("/", "-")):
                raise HubError(400, f"Invalid branch name {branch!r}")
            if ref in repo.refs:
                raise HubError(409, "Reference already exists")
            repo.refs[ref] = self.hub._resolve(repo, self._json_body(body).get("startingPoint") or "main")
        return _Response()

    def _tag(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> _Response:
        self._require_token()
        tag = self._json_body(body).get("tag")
        if not isinstance(tag, str) or not _NAME_RE.match(tag):
            raise HubError(400, f"Invalid tag name {tag!r}")
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            if f"refs/tags/{tag}" in repo.refs:
                raise HubError(409, "Tag already exists")
            repo.refs[f"refs/tags/{tag}"] = self.hub._resolve(repo, revision)
        return _Response()

    def _open_pull_request(self, repo_type: str, repo_id: str, body: bytes) -> _Response:
        self._require_token()
        payload = self._json_body(body)
        if not payload.get("pullRequest"):
            raise HubError(400, "LocalHub only implements discussions that are pull requests")
        with self.hub._lock:
            ref = self._repo(repo_type, repo_id).open_pull_request(
                payload.get("title", ""), payload.get("description", "")
            )
        return _Response.json({"num": int(ref.rsplit("/", 1)[1]), "pullRequest": True})

    def _pull_request(self, repo_type: str, repo_id: str, num: int, body: bytes) -> _Response:
        with self.hub._lock:
            pr = self._repo(repo_type, repo_id).pull_requests.get(num)
        if pr is None:
            raise HubError(404, f"Discussion {num} not found")
        return _Response.json(
            {
                "num": num,
                "title": pr["title"],
                "author": {"name": self.hub.user},
                "createdAt": pr["createdAt"],
                "status": "open",
                "repo": {"name": repo_id, "type": repo_type},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str, body: bytes) -> _Response:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, start, end = 200, 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            if start >= len(data) and len(data) > 0:
                raise HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{max(end - 1, start)}/{len(data)}"
        # For HEAD, Content-Length must announce the full size even though no body is sent.
        headers["Content-Length"] = str(end - start)
        return _Response(status, data[start:end] if self.command == "GET" else b"", headers)
