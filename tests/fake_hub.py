"""A local HTTP server that answers the Hub file API calls huggingface_hub makes to download a repo.

Serves: model info (``/api/models/{repo}[/revision/{rev}]``), the recursive tree listing
(``/api/models/{repo}/tree/{rev}``) and ``/{repo}/resolve/{rev}/{file}`` (HEAD + GET, with
``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``X-Linked-*`` for LFS files and Range
requests). Faults can be injected per file: a connection dropped mid-file once, or an
outage (dropped, then HTTP 503) until ``recover()``.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """One model repo: its files and which commit/branches point at them."""

    repo_id: str
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # served with a flipped byte

    def is_lfs(self, path: str) -> bool:
        """LFS files are the big binary ones, as on the Hub."""
        return path.endswith(LFS_SUFFIXES) or len(self.files[path]) > 1_000_000

    def etag(self, path: str) -> str:
        """sha256 for LFS files, the git blob id for the others (the Hub's convention)."""
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_sha1(data)

    def tree_entry(self, path: str) -> dict:
        """The tree listing entry of one file."""
        data = self.files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if self.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": len(pointer)}
        return entry


class FakeHub:
    """The server; use as a context manager. ``url`` is its endpoint (set HF_ENDPOINT to it)."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._drop_once: dict[str, int | None] = {}  # file -> bytes sent before the cut (None: half)
        self._outage: dict[str, bool] = {}  # file -> already dropped once
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ set-up
    def add_repo(self, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> FakeRepo:
        """Serve ``files`` as ``repo_id`` at ``commit`` (default: derived from the content), branch main."""
        if commit is None:
            h = hashlib.sha1(repo_id.encode())
            for name in sorted(files):
                h.update(name.encode() + hashlib.sha1(files[name]).digest())
            commit = h.hexdigest()
        repo = FakeRepo(repo_id, dict(files), commit, {"main": commit})
        self.repos[repo_id.lower()] = repo
        return repo

    @staticmethod
    def files_of(directory: Path) -> dict[str, bytes]:
        """The files of a local directory, as a repo's content."""
        return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    def drop_once(self, path: str, after: int | None = None) -> None:
        """The next GET of ``path`` sends ``after`` bytes (default: half), then closes the connection."""
        self._drop_once[path] = after

    def outage(self, path: str) -> None:
        """The next GET of ``path`` is cut mid-file; every later request for it gets 503 until ``recover``."""
        self._outage[path] = False

    def recover(self) -> None:
        """End all injected faults."""
        self._drop_once.clear()
        self._outage.clear()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of every GET of ``path`` so far (None: a full GET)."""
        return [rng for method, p, rng in self.log if method == "GET" and p.endswith("/" + path) and "/resolve/" in p]

    # ------------------------------------------------------------ server
    @property
    def url(self) -> str:
        """The endpoint, e.g. http://127.0.0.1:PORT."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # ------------------------------------------------------------ routing
    def _route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.fake._lock:
            self.fake.log.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m and not head:
            return self._info(m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if m and not head:
            return self._tree(m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3), head)
        self._error(404, "NotFound", "no such route")

    def _repo(self, repo_id: str, rev: str) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id.lower())
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if rev != repo.commit and rev not in repo.branches:
            self._error(404, "RevisionNotFound", "Invalid rev id", repo.commit)
            return None
        return repo

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        commit = repo.branches.get(rev, repo.commit)
        body = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        }
        self._json(body, commit)

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        dirs = sorted({"/".join(p.split("/")[:i]) for p in repo.files for i in range(1, p.count("/") + 1)})
        entries = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0} for d in dirs]
        entries += [repo.tree_entry(p) for p in sorted(repo.files)]
        self._json(entries, repo.commit)

    def _resolve(self, repo_id: str, rev: str, file: str, head: bool) -> None:
        repo = self._repo(repo_id, rev)
        if repo is None:
            return
        if file not in repo.files:
            return self._error(404, "EntryNotFound", "Entry not found", repo.commit)
        if file in self.fake._outage and self.fake._outage[file]:
            return self._error(503, None, "Service unavailable", repo.commit)
        data = repo.files[file]
        if file in repo.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m.group(1)) >= len(data):
                return self._error(416, None, "Range not satisfiable", repo.commit)
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            status = 206
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{repo.etag(file)}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if repo.is_lfs(file):
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-ETag", f'"{repo.etag(file)}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut: int | None = None
        with self.fake._lock:
            if file in self.fake._drop_once:
                cut = self.fake._drop_once.pop(file) or max(1, len(body) // 2)
            elif file in self.fake._outage and not self.fake._outage[file]:
                self.fake._outage[file] = True
                cut = max(1, len(body) // 2)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    # ------------------------------------------------------------ replies
    def _json(self, body: object, commit: str) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
