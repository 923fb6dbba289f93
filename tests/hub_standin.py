"""A stand-in Hugging Face hub on loopback, serving what `diffusion-lsp pull` and huggingface_hub
request (as read in huggingface_hub 2.4's hf_api.model_info and file_download):

- `GET /api/models/{org}/{name}/revision/{rev}?blobs=true`: JSON with `id`, `sha` and `siblings`
  (`rfilename`, `size`, `blobId`, and `lfs: {size, sha256, pointerSize}` for LFS files);
  an unknown repo answers 404 with `X-Error-Code: RepoNotFound`, like the hub.
- `GET|HEAD /{org}/{name}/resolve/{rev}/{file}`: the bytes, with `ETag` (sha256 for LFS files,
  the git blob id otherwise), `X-Repo-Commit`, `Content-Length`, `Accept-Ranges`, and for LFS
  files `X-Linked-Etag` / `X-Linked-Size`; `Range: bytes=N-` answers 206 with `Content-Range`.

Faults to inject: `gated` repo ids answer 403 `GatedRepo`; `cut_after[file] = n` sends the
first n bytes of the next GET of that file and drops the connection; `corrupt[file] = bytes`
serves other bytes than the metadata describes.
Every request is logged in `requests` as (method, path, Range header).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin")  # what real repos keep in LFS (.gitattributes)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
            f"size {len(data)}\n").encode()


@dataclass
class StandInRepo:
    commit: str
    files: dict[str, bytes]

    def is_lfs(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        if not self.is_lfs(path):
            return {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
        pointer = lfs_pointer(data)
        return {"rfilename": path, "size": len(data), "blobId": git_blob_id(pointer),
                "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "pointerSize": len(pointer)}}


@dataclass
class StandInHub:
    repos: dict[str, StandInRepo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)  # repo ids that answer 403 GatedRepo
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""

    def add_repo(self, repo_id: str, directory: Path, extra: dict[str, bytes] | None = None
                 ) -> StandInRepo:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        files.update(extra or {})
        commit = hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
        self.repos[repo_id] = StandInRepo(commit, files)
        return self.repos[repo_id]

    def resolve_requests(self, file: str | None = None) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests
                if "/resolve/" in r[1] and (file is None or r[1].endswith("/" + file))]

    def start(self) -> StandInHub:
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-file (an interrupted pull) is expected, not an error."""

    def handle_error(self, request, client_address) -> None:
        pass


API_PATH = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
RESOLVE_PATH = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler_for(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, status: int, headers: dict[str, str], payload: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if payload:
                self.wfile.write(payload)

        def _not_found(self, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(404, {"X-Error-Code": code, "Content-Type": "application/json",
                             "Content-Length": str(len(body))}, body)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if any(path.startswith(f"/api/models/{r}") or path.startswith(f"/{r}/")
                   for r in hub.gated):
                denied = json.dumps({"error": "Access to this model is restricted"}).encode()
                return self._send(403, {"X-Error-Code": "GatedRepo",
                                        "Content-Length": str(len(denied))}, denied)
            if match := API_PATH.match(path):
                repo = hub.repos.get(match.group(1))
                if repo is None:
                    return self._not_found("RepoNotFound")
                info = {"id": match.group(1), "modelId": match.group(1), "sha": repo.commit,
                        "private": False,
                        "siblings": [repo.sibling(p) for p in repo.files]}
                payload = json.dumps(info).encode()
                return self._send(200, {"Content-Type": "application/json",
                                        "Content-Length": str(len(payload))}, payload)
            if match := RESOLVE_PATH.match(path):
                return self._file(match.group(1), match.group(3), body)
            return self._not_found("EntryNotFound")

        def _file(self, repo_id: str, name: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._not_found("RepoNotFound")
            if name not in repo.files:
                return self._send(404, {"X-Error-Code": "EntryNotFound",
                                        "X-Repo-Commit": repo.commit, "Content-Length": "0"})
            data = hub.corrupt.get(name, repo.files[name])
            headers = {"ETag": f'"{repo.etag(name)}"', "X-Repo-Commit": repo.commit,
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if repo.is_lfs(name):
                headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
                headers["X-Linked-Size"] = str(len(repo.files[name]))
            start, status = 0, 200
            if (wanted := re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))):
                start, status = int(wanted.group(1)), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            part = data[start:]
            headers["Content-Length"] = str(len(part))
            if not body:
                return self._send(status, headers)
            cut = hub.cut_after.pop(name, None) if self.command == "GET" else None
            if cut is not None:
                self._send(status, headers, part[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            return self._send(status, headers, part)

    return Handler
