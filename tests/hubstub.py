"""A local stand-in for a Hugging Face-API hub (the Hugging Face hub, a mirror, AtomGit): the
few endpoints `huggingface_hub.snapshot_download` calls, served from directories on disk."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


class StubHub:
    """repos: repo id -> directory; modes: repo id -> "ok", "gated", "cut" (the connection
    dies half way through the largest file) or "xet" (files say they are in Xet storage, whose
    token route this hub lacks: only a client with Xet off downloads them).
    branches: repo id -> the one branch it is served at (AtomGit's may be master: main is then
    a 404), which /api/models/{id} reports as `default_branch` unless the repo id is in
    `silent` (a client then tries main, then master)."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.modes: dict[str, str] = {}
        self.branches: dict[str, str] = {}
        self.silent: set[str] = set()
        self.requests: list[str] = []
        self.tokens: list[str] = []  # the Authorization header of each request ("" = none)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                hub.answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StubHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(
        self,
        repo_id: str,
        directory: Path,
        mode: str = "ok",
        branch: str = "main",
        reports_branch: bool = True,
    ) -> None:
        self.repos[repo_id] = Path(directory)
        self.modes[repo_id] = mode
        self.branches[repo_id] = branch
        if not reports_branch:
            self.silent.add(repo_id)

    # --- answers ---------------------------------------------------------------------------

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = request.path.split("?")[0]
        self.requests.append(f"{request.command} {path}")
        self.tokens.append(request.headers.get("Authorization", ""))
        info = re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)
        tree = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        model = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
        found = info or tree or resolve or model
        repo = found.group(1) if found else None
        if repo not in self.repos:
            return self.error(request, 404, "RepoNotFound", "Repository not found")
        if self.modes[repo] == "gated":
            return self.error(request, 401, "GatedRepo", "Access to this model is restricted")
        if not model and found.group(2) not in (self.branches[repo], SHA):
            return self.error(request, 404, "RevisionNotFound", "Invalid rev id")
        files = {
            p.relative_to(self.repos[repo]).as_posix(): p
            for p in sorted(self.repos[repo].rglob("*"))
            if p.is_file()
        }
        if tree:
            entries = [
                {
                    "type": "file",
                    "path": name,
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                }
                for name, p in files.items()
            ]
            return self.send(request, 200, json.dumps(entries).encode(), "application/json", body)
        if info or model:
            payload = {
                "id": repo,
                "modelId": repo,
                "sha": SHA,
                "private": False,
                "siblings": [{"rfilename": name} for name in files],
            }
            if model and repo not in self.silent:
                payload["default_branch"] = self.branches[repo]
            return self.send(request, 200, json.dumps(payload).encode(), "application/json", body)
        name = resolve.group(3)
        if name not in files:
            return self.error(request, 404, "EntryNotFound", f"{name} not found")
        data = files[name].read_bytes()
        largest = max(files, key=lambda n: files[n].stat().st_size)
        cut = self.modes[repo] == "cut" and name == largest and body
        xet = {
            "X-Xet-Hash": hashlib.sha256(data).hexdigest(),
            "X-Xet-Refresh-Route": f"{self.url}/api/models/{repo}/xet-read-token/{SHA}",
        }
        extra = xet if self.modes[repo] == "xet" else {}
        self.send(request, 200, data, "application/octet-stream", body, cut=cut, headers=extra)

    @staticmethod
    def error(request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        request.send_response(status)
        request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", message)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command == "GET":
            request.wfile.write(data)

    @staticmethod
    def send(
        request: BaseHTTPRequestHandler,
        status: int,
        data: bytes,
        kind: str,
        body: bool,
        cut: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", SHA)
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.end_headers()
        if body:
            request.wfile.write(data[: len(data) // 2] if cut else data)
            if cut:
                request.wfile.flush()
                request.close_connection = True
                request.connection.shutdown(2)
