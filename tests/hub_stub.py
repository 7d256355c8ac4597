"""A small stand-in for the Hugging Face Hub's upload API, on 127.0.0.1, for offline tests of `push_to_hub`.

It serves exactly what `huggingface_hub` (2.x, with `HF_HUB_DISABLE_XET=1`) sends for `create_repo`,
`create_branch` and `upload_folder` (whose legacy path is `create_commit`):

    POST /api/repos/create                                  create_repo (409 when it exists: exist_ok=True)
    POST /api/models/{repo}/branch/{branch}                 create_branch (409 when it exists, 400 for refs/...)
    POST /api/validate-yaml                                 the README.md metadata check
    POST /api/models/{repo}/preupload/{revision}            "regular" or "lfs" for each file
    POST /{repo}.git/info/lfs/objects/batch                 LFS batch API (basic transfer): where to PUT
    PUT  /lfs-objects/{oid}                                 the LFS upload itself (sha256 and size checked)
    POST /lfs-objects/{oid}/verify                          LFS verify
    POST /api/models/{repo}/commit/{revision}               the ndjson commit: header, file, lfsFile, deleted*
    GET  /api/models/{repo}[/revision/{revision}]           repo_info
    GET  /api/models/{repo}/tree/{revision}                 list_repo_files (what `delete_patterns` matches)

Every request is recorded (method, URL, headers, body) so a test can check what arrived and where the token went.
The API endpoints answer 401 without `Authorization: Bearer <token>`. The server is bounded: it stops itself after
`lifetime_s` seconds or `max_requests` requests, refuses bodies over `max_body_bytes`, and stops when the `with`
block ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pkl", ".png", ".jpg", ".gz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files from 10 MB up in LFS whatever their type

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)"), "create_branch"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)"), "list_tree"),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?"), "repo_info"),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs-objects/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
    ("POST", re.compile(r"/lfs-objects/(?P<oid>[0-9a-f]{64})/verify"), "lfs_verify"),
]
NO_AUTH_NEEDED = {"lfs_upload"}  # a pre-signed storage URL on the real Hub; every other endpoint needs the token


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    target: str  # path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


@dataclass
class StubRepo:
    """A repository: visibility, and each branch's files (path -> content)."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[str] = field(default_factory=list)  # commit summaries, oldest first


class HubStub:
    """The stand-in Hub. Use as `with HubStub(token) as hub:` and point `HF_ENDPOINT` at `hub.url`."""

    def __init__(
        self,
        token: str,
        lifetime_s: float = 600.0,
        max_requests: int = 500,
        max_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.token = token
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, StubRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    # --- lifecycle ---

    @property
    def url(self) -> str:
        assert self._server is not None, "the stub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        serve = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        self._threads = [serve, timer]
        serve.start()
        timer.start()
        return self

    def stop(self) -> None:
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._threads[1].cancel()

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- what tests read ---

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The files on a branch of a repository (path -> content)."""
        return dict(self.repos[repo_id].branches[branch])

    def token_locations(self, token: str) -> list[tuple[RecordedRequest, str]]:
        """Every place `token` appeared: `"authorization"`, `"url"`, `"body"` or `"header:<name>"`."""
        found = []
        for request in self.requests:
            if token in unquote(request.target):
                found.append((request, "url"))
            if token.encode() in request.body or base64.b64encode(token.encode()) in request.body:
                found.append((request, "body"))
            for name, value in request.headers:
                if token in value:
                    found.append((request, "authorization" if name.lower() == "authorization" else f"header:{name}"))
        return found

    # --- endpoints: each returns (status, JSON body) ---

    def create_repo(self, body: dict, **_) -> tuple[int, dict]:
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = StubRepo(private=body.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, body: dict, **_) -> tuple[int, dict]:
        content = body.get("content", "")
        if not content.startswith("---\n"):
            return 400, {"errors": [{"message": "README.md has no YAML metadata block"}]}
        return 200, {"errors": [], "warnings": []}

    def create_branch(self, body: dict, repo: str, branch: str) -> tuple[int, dict]:
        if branch.startswith("refs/"):  # the Hub's BadRequestError: refs/pr/N is made by opening a pull request
            return 400, {"error": f"Invalid reference for a branch: {branch}"}
        branches = self.repos[repo].branches
        if branch in branches:
            return 409, {"error": f"Reference {branch} already exists"}
        branches[branch] = dict(branches[body.get("startingPoint") or "main"])
        return 200, {}

    def preupload(self, body: dict, repo: str, revision: str) -> tuple[int, dict]:
        files = []
        for item in body["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files, "commitOid": "0" * 40}

    def lfs_batch(self, body: dict, repo: str) -> tuple[int, dict]:
        objects = []
        for obj in body["objects"]:
            href = f"{self.url}/lfs-objects/{obj['oid']}"
            actions = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": actions})
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, body: bytes, oid: str) -> tuple[int, dict]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 of the uploaded content does not match the oid"}
        self.lfs_objects[oid] = body
        return 200, {}

    def lfs_verify(self, body: dict, oid: str) -> tuple[int, dict]:
        stored = self.lfs_objects.get(oid)
        if stored is None or len(stored) != body.get("size"):
            return 404, {"error": f"LFS object {oid} was not uploaded"}
        return 200, {}

    def commit(self, body: bytes, repo: str, revision: str) -> tuple[int, dict]:
        branch = self.repos[repo].branches.get(revision)
        if branch is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        summary = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                branch[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 400, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}
                branch[value["path"]] = self.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                branch.pop(value["path"], None)
            else:
                return 400, {"error": f"unsupported commit operation {key!r}"}
        self.repos[repo].commits.append(summary)
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def list_tree(self, body: dict, repo: str, revision: str) -> tuple[int, list | dict]:
        files = self.repos[repo].branches.get(revision)
        if files is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        entries = [
            {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for path, content in sorted(files.items())
        ]
        return 200, entries

    def repo_info(self, body: dict, repo: str, revision: str | None = None) -> tuple[int, dict]:
        files = self.repos[repo].branches.get(revision or "main")
        if files is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        siblings = [{"rfilename": path} for path in sorted(files)]
        return 200, {"id": repo, "private": self.repos[repo].private, "sha": "0" * 40, "siblings": siblings}


def route(method: str, path: str) -> tuple[str, re.Match | None]:
    """The endpoint serving `method path`, and the path's match (None when no endpoint does)."""
    for route_method, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if route_method == method and match:
            return name, match
    return "", None


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub  # set on the subclass made by `HubStub.start`

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # quiet

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _read_body(self) -> bytes | None:
        """The request body (Content-Length or chunked); None when it is larger than the stub accepts."""
        limit = self.hub.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return None if length > limit else self.rfile.read(length)

    def _reply(self, status: int, payload: dict, error_code: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and "error" in payload:
            self.send_header("X-Error-Message", payload["error"])
        if error_code is not None:  # the Hub's X-Error-Code, which huggingface_hub turns into its error classes
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        hub = self.hub
        body = self._read_body()
        with hub._lock:
            hub.requests.append(RecordedRequest(self.command, self.path, list(self.headers.items()), body or b""))
            too_many = len(hub.requests) > hub.max_requests
        if too_many:
            threading.Thread(target=hub.stop, daemon=True).start()
            return self._reply(503, {"error": "the Hub stub's request budget is spent"})
        if body is None:
            return self._reply(413, {"error": "request body too large for the Hub stub"})
        path = urlsplit(self.path).path
        name, match = route(self.command, path)
        if match is None:
            return self._reply(404, {"error": f"the Hub stub does not serve {self.command} {path}"})
        if name not in NO_AUTH_NEEDED and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
        if "repo" in params and params["repo"] not in hub.repos:
            return self._reply(404, {"error": f"Repository {params['repo']} not found"}, "RepoNotFound")
        raw = name in ("lfs_upload", "commit")  # content and ndjson; the other endpoints take JSON
        parsed = body if raw else (json.loads(body) if body else {})
        with hub._lock:
            status, payload = getattr(hub, name)(parsed, **params)
        self._reply(status, payload)
