"""A small HTTP server that speaks the part of the Hub's API that uploads use.

huggingface_hub talks to it for real (HF_ENDPOINT points at it): creating a
repo and a branch, the preupload check, the Git LFS batch API and the PUT of
each large file, the check of a README's front matter, then the commit (NDJSON: small files inline in base64, large
ones by sha256). It keeps what it receives, so a test can compare every file
of a repo with the folder that was pushed. The xet protocol (huggingface_hub's
default when hf_xet is installed) is not spoken: clients run with
HF_HUB_DISABLE_XET=1 and use the LFS path, which is huggingface_hub's own
fallback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


@dataclass
class FakeRepo:
    private: bool | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commit_messages: list[str] = field(default_factory=list)


@dataclass
class FakeHub:
    """What the server has received; ``refuse_commits_with`` makes commits fail with that status."""

    url: str = ""
    token: str = "hf_fake_token"
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)
    validated_cards: list[dict[str, Any]] = field(default_factory=list)
    refuse_commits_with: int | None = None


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"), "create_branch"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)"), "preupload"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>.+)"), "commit"),
]


def start_fake_hub() -> tuple[ThreadingHTTPServer, FakeHub]:
    """Start the server on a free local port, in a daemon thread."""
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_GET(self) -> None:
            self._route("GET")

        def _route(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            hub.requests.append(f"{method} {path}")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if method != "PUT" and self.headers.get("Authorization") != f"Bearer {hub.token}":
                hub.unauthorized.append(path)
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(path)
                if route_method == method and match:
                    return getattr(self, name)(body, **match.groupdict())
            self._reply(404, {"error": f"fake hub: no route for {method} {path}"})

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def create_repo(self, body: bytes) -> None:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo"})
            private = request.get("visibility") == "private" if "visibility" in request else None
            hub.repos[repo_id] = FakeRepo(private=private)
            self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def validate_yaml(self, body: bytes) -> None:
            # The Hub checks a README's front matter before a commit that adds it.
            content = json.loads(body)["content"]
            match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
            metadata = yaml.safe_load(match.group(1)) if match else None
            if not isinstance(metadata, dict):
                return self._reply(
                    400, {"errors": [{"message": "no YAML mapping in front matter"}]}
                )
            hub.validated_cards.append(metadata)
            self._reply(200, {"warnings": []})

        def create_branch(self, body: bytes, repo: str, branch: str) -> None:
            branches = hub.repos[repo].branches
            if branch in branches:
                return self._reply(409, {"error": "Reference already exists"})
            branches[branch] = dict(branches["main"])
            self._reply(200, {})

        def preupload(self, body: bytes, repo: str, rev: str) -> None:
            files = json.loads(body)["files"]
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                    "shouldIgnore": False,
                }
                for f in files
            ]
            self._reply(200, {"files": modes})

        def lfs_batch(self, body: bytes, repo: str) -> None:
            objects = json.loads(body)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}},
                }
                for o in objects
            ]
            self._reply(200, {"transfer": "basic", "objects": actions})

        def lfs_upload(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._reply(400, {"error": "sha256 mismatch"})
            hub.lfs_objects[oid] = body
            self._reply(200, {})

        def commit(self, body: bytes, repo: str, rev: str) -> None:
            if hub.refuse_commits_with is not None:
                return self._reply(
                    hub.refuse_commits_with, {"error": "commits refused by the test"}
                )
            files = hub.repos[repo].branches.setdefault(rev.replace("%2F", "/"), {})
            for line in body.decode().splitlines():
                entry = json.loads(line)
                value = entry["value"]
                if entry["key"] == "header":
                    hub.repos[repo].commit_messages.append(value["summary"])
                elif entry["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif entry["key"] == "lfsFile":
                    files[value["path"]] = hub.lfs_objects[value["oid"]]
            oid = hashlib.sha1(body).hexdigest()
            self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hub
