"""A local stand-in for a Hugging Face-API hub (the Hugging Face hub, a mirror, AtomGit): the
few endpoints `huggingface_hub.snapshot_download` calls, served from directories on disk, and
the few that its `create_repo`, `create_branch` and `upload_folder` call (without Xet: the LFS
batch answers the basic transfer), which write what they commit to a directory it then serves."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

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
        # the upload side: what was written, and by whom
        self.write_token: str | None = None  # set: writes need "Bearer <it>", else 401
        self.heads: dict[str, str] = {}  # repo id -> its head commit (SHA until one is made)
        self.refs: dict[str, set[str]] = {}  # repo id -> branches made beside its own (one tree)
        self.created: list[dict] = []  # the payload of each repository creation
        self.commits: list[dict] = []  # repo, revision, summary, files (added), deleted, token
        self.lfs_batches: list[dict] = []  # repo, the transfers offered, the oids asked about
        self.lfs: dict[str, bytes] = {}  # sha256 -> content of each LFS object received
        self.store = tempfile.TemporaryDirectory(prefix="hubstub-")
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                hub.answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.answer(self, body=True)

            def do_POST(self) -> None:  # noqa: N802
                hub.receive(self)

            def do_PUT(self) -> None:  # noqa: N802
                hub.receive(self)

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
        self.store.cleanup()

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
        known = (self.branches[repo], SHA, self.heads.get(repo), *self.refs.get(repo, ()))
        if not model and found.group(2) not in known:
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
                "sha": self.heads.get(repo, SHA),
                "private": False,
                "siblings": [
                    {"rfilename": name, **blob(p.read_bytes())} for name, p in files.items()
                ],
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
        head = self.heads.get(repo, SHA)
        self.send(
            request,
            200,
            data,
            "application/octet-stream",
            body,
            cut=cut,
            headers=extra,
            commit=head,
        )

    @staticmethod
    def error(
        request: BaseHTTPRequestHandler,
        status: int,
        code: str,
        message: str,
        extra: dict | None = None,
    ) -> None:
        data = json.dumps({"error": message, **(extra or {})}).encode()
        request.send_response(status)
        request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", message)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command != "HEAD":
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
        commit: str = SHA,
    ) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Repo-Commit", commit)
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.end_headers()
        if body:
            request.wfile.write(data[: len(data) // 2] if cut else data)
            if cut:
                request.wfile.flush()
                request.close_connection = True
                request.connection.shutdown(2)

    # --- the upload side ------------------------------------------------------------------

    def receive(self, request: BaseHTTPRequestHandler) -> None:
        """POST and PUT: create a repository or a branch, say how each file goes up (preupload),
        hand out LFS upload addresses (basic transfer, never Xet), take LFS objects, commit."""
        path = request.path.split("?")[0]
        self.requests.append(f"{request.command} {path}")
        token = request.headers.get("Authorization", "")
        self.tokens.append(token)
        data = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if path == "/api/validate-yaml":
            return self.reply(request, 200, {"errors": [], "warnings": []})
        lfs_put = re.fullmatch(r"/lfs-objects/([0-9a-f]{64})", path)
        if lfs_put:  # a storage address: the batch answer handed it out, no token needed
            if hashlib.sha256(data).hexdigest() != lfs_put.group(1):
                return self.error(request, 400, "BadRequest", "content does not match its oid")
            self.lfs[lfs_put.group(1)] = data
            return self.reply(request, 200, {})
        if self.write_token is not None and token != f"Bearer {self.write_token}":
            return self.error(
                request, 401, "Unauthorized", "Invalid credentials in Authorization header"
            )
        if path == "/api/repos/create":
            return self.create(request, json.loads(data))
        batch = re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path)
        write = re.fullmatch(r"/api/models/(.+?)/(preupload|commit|branch)/([^/]+)", path)
        repo = (batch or write).group(1) if (batch or write) else None
        if repo not in self.repos:
            return self.error(request, 404, "RepoNotFound", "Repository not found")
        if self.modes[repo] == "readonly":
            return self.error(
                request, 403, "Forbidden", "You have no write access to this repository"
            )
        if batch:
            return self.lfs_batch(request, repo, json.loads(data))
        kind, revision = write.group(2), unquote(write.group(3))
        branches = {self.branches[repo], *self.refs.setdefault(repo, set())}
        if kind == "branch":
            if revision in branches:
                return self.error(request, 409, "Conflict", "Reference already exists")
            self.refs[repo].add(revision)
            return self.reply(request, 200, {})
        if revision not in branches:
            return self.error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if kind == "preupload":
            return self.preupload(request, repo, json.loads(data))
        return self.commit(request, repo, revision, data, token)

    def create(self, request: BaseHTTPRequestHandler, payload: dict) -> None:
        self.created.append(payload)
        repo = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo}"
        if repo in self.repos:
            return self.error(
                request, 409, "Conflict", "You already created this model repo", {"url": url}
            )
        directory = Path(self.store.name) / repo
        directory.mkdir(parents=True)
        self.add(repo, directory)
        return self.reply(request, 200, {"url": url, "name": repo})

    def preupload(self, request: BaseHTTPRequestHandler, repo: str, payload: dict) -> None:
        """Regular or LFS (binary or over 10 MB, as the Hugging Face hub decides) for each file,
        with the oid of the file already there, so that an unchanged file is left out."""
        answers = []
        for file in payload["files"]:
            lfs = is_lfs(base64.b64decode(file["sample"]), file["size"])
            there = self.repos[repo] / file["path"]
            oid = None
            if there.is_file():
                content = there.read_bytes()
                oid = hashlib.sha256(content).hexdigest() if lfs else git_hash(content)
            answers.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self.reply(request, 200, {"files": answers})

    def lfs_batch(self, request: BaseHTTPRequestHandler, repo: str, payload: dict) -> None:
        self.lfs_batches.append(
            {
                "repo": repo,
                "transfers": payload.get("transfers", []),
                "oids": [o["oid"] for o in payload["objects"]],
            }
        )
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs:  # already stored: no actions, nothing to send
                href = f"{self.url}/lfs-objects/{item['oid']}"
                answer["actions"] = {"upload": {"href": href}}
            objects.append(answer)
        return self.reply(request, 200, {"transfer": "basic", "objects": objects})

    def commit(
        self, request: BaseHTTPRequestHandler, repo: str, revision: str, data: bytes, token: str
    ) -> None:
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        root = self.repos[repo]
        writes: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                writes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self.error(
                        request, 422, "UnprocessableEntity", f"LFS object {value['oid']} not found"
                    )
                writes[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        for name, content in writes.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        for name in deleted:
            (root / name).unlink(missing_ok=True)
        previous = self.heads.get(repo, SHA)
        head = hashlib.sha1(previous.encode() + data).hexdigest()
        self.heads[repo] = head
        self.commits.append(
            {
                "repo": repo,
                "revision": revision,
                "summary": header.get("summary", ""),
                "files": sorted(writes),
                "deleted": deleted,
                "token": token,
            }
        )
        return self.reply(
            request,
            200,
            {
                "commitUrl": f"{self.url}/{repo}/commit/{head}",
                "commitOid": head,
                "pullRequestUrl": None,
            },
        )

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def is_lfs(sample: bytes, size: int) -> bool:
    """Whether the Hugging Face hub keeps a file in LFS: binary (a NUL in its first 512 bytes)
    or over 10 MB."""
    return b"\0" in sample[:512] or size > 10_000_000


def git_hash(content: bytes) -> str:
    """git's blob id of a file's content (the oid the hub gives a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def blob(content: bytes) -> dict:
    """A file's entry in the revision info with `blobs=true`: size, blob id, LFS details."""
    entry: dict = {"size": len(content), "blobId": git_hash(content)}
    if is_lfs(content, len(content)):
        sha256 = hashlib.sha256(content).hexdigest()
        entry["lfs"] = {"sha256": sha256, "size": len(content), "pointerSize": 134}
    return entry
