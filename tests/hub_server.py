"""A fake Hugging Face Hub on 127.0.0.1 speaking the endpoints snapshot_download uses.

- GET /api/models/<repo>/revision/<rev>        repo info: commit sha and siblings (?blobs=true: size, blobId, lfs sha256)
- GET /api/models/<repo>/tree/<rev>            recursive file listing
- HEAD|GET /<repo>/resolve/<rev>/<file>        file metadata headers / content, with Range support

Errors carry the X-Error-Code / X-Error-Message headers huggingface_hub classifies them by.
Faults for tests: `fail` answers 500 to a file's GET, `drop_once` cuts a file's first GET
after the given number of bytes, `corrupt` serves a file with its first byte flipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REQUEST_TIMEOUT_S = 10
LIFETIME_S = 120

INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # files stored with git-lfs (the Hub records their sha256)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    granted_tokens: set[str] = field(default_factory=set)
    declared_sizes: dict[str, int] = field(default_factory=dict)  # sizes announced instead of the real ones
    no_checksum: set[str] = field(default_factory=set)  # listed without blobId, or an LFS entry without sha256

    def size(self, name: str) -> int:
        return self.declared_sizes.get(name, len(self.files[name]))

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest() if name in self.lfs else git_blob_id(self.files[name])

    def sibling(self, name: str) -> dict:
        entry = {"rfilename": name, "size": self.size(name), "blobId": git_blob_id(self.files[name])}
        if name in self.lfs:
            entry["lfs"] = {"sha256": self.etag(name), "size": self.size(name), "pointerSize": 134}
        if name in self.no_checksum:
            del (entry["lfs"] if name in self.lfs else entry)["sha256" if name in self.lfs else "blobId"]
        return entry

    def tree_entry(self, name: str) -> dict:
        entry = {"type": "file", "path": name, "size": self.size(name), "oid": git_blob_id(self.files[name])}
        if name in self.lfs:
            entry["lfs"] = {"oid": self.etag(name), "size": self.size(name), "pointerSize": 134}
        return entry


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Serve `repos` in a background thread; use as a context manager. The server also shuts
    itself down after LIFETIME_S so a stuck test cannot keep it alive."""

    def __init__(self, repos: dict[str, FakeRepo], valid_tokens: set[str] = frozenset()):
        self.repos = repos
        self.valid_tokens = set(valid_tokens)
        self.fail: set[str] = set()
        self.drop_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._deadline = threading.Timer(LIFETIME_S, self._server.shutdown)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    def record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    def downloads(self) -> list[str]:
        """Files whose content was requested (GET on resolve), in order."""
        with self._lock:
            return [path.split("/resolve/", 1)[1].split("/", 1)[1]
                    for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()


_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)")
_TREE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = REQUEST_TIMEOUT_S

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._route(send_body=False)

        def do_GET(self) -> None:
            self._route(send_body=True)

        def _route(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.record(self.command, path, self.headers.get("Range"))
            token = self.headers.get("Authorization", "").removeprefix("Bearer ") or None
            if token is not None and token not in hub.valid_tokens:
                return self._error(401, None, INVALID_TOKEN)
            for pattern, serve in ((_INFO, self._info), (_TREE, self._tree), (_RESOLVE, self._resolve)):
                if match := pattern.fullmatch(path):
                    repo = hub.repos.get(match["repo"])
                    if repo is None:
                        return self._error(404, "RepoNotFound", "Repository not found")
                    if match["rev"] not in ("main", repo.commit):
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
                    return serve(repo, match, token, send_body)
            self._error(404, None, "Not found")

        def _info(self, repo: FakeRepo, match: re.Match, token: str | None, send_body: bool) -> None:
            # Sizes and checksums only when asked for (?blobs=true), as the Hub does.
            blobs = "blobs=true" in urlsplit(self.path).query.lower()
            info = {"id": match["repo"], "sha": repo.commit, "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [repo.sibling(name) if blobs else {"rfilename": name} for name in repo.files]}
            self._json(info)

        def _tree(self, repo: FakeRepo, match: re.Match, token: str | None, send_body: bool) -> None:
            prefix = f"{match['path']}/" if match["path"] else ""
            names = [name for name in repo.files if name.startswith(prefix)]
            folders = sorted({name.rsplit("/", 1)[0] for name in names if "/" in name})
            self._json([{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
                       + [repo.tree_entry(name) for name in names])

        def _resolve(self, repo: FakeRepo, match: re.Match, token: str | None, send_body: bool) -> None:
            name = match["path"]
            if repo.gated and token is None:
                return self._error(401, "GatedRepo", f"Access to model {match['repo']} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            if repo.gated and token not in repo.granted_tokens:
                return self._error(403, "GatedRepo", f"Access to model {match['repo']} is restricted and you are "
                                   "not in the authorized list.")
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist", commit=repo.commit)
            if send_body and name in hub.fail:
                return self._error(500, None, "Internal Error")
            content = repo.files[name]
            if name in hub.corrupt:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            start = 0
            status = 200
            if send_body and (requested := _RANGE.fullmatch(self.headers.get("Range", ""))):
                start, status = int(requested[1]), 206
            body = content[start:]
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{repo.etag(name)}"')
            if name in repo.lfs:
                self.send_header("X-Linked-Etag", f'"{repo.etag(name)}"')
                self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not send_body:
                return
            if name in hub.drop_once and start == 0:
                self.wfile.write(body[: hub.drop_once.pop(name)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

        def _json(self, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code is not None:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

    return Handler
