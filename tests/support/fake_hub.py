"""A small HTTP server that speaks the part of the Hub's API that uploads and downloads use.

huggingface_hub talks to it for real (HF_ENDPOINT points at it): creating a
repo and a branch (from a starting point; deleting one), the preupload check, the Git LFS batch API and the PUT of
each large file, the check of a README's front matter, then the commit (NDJSON: small files inline in base64, large
ones by sha256). It keeps what it receives, by branch (with each branch's commit messages),
so a test can compare every file of a repo with the folder that was pushed; the
tree listing (of a folder) and ``resolve`` of small files work on those branches. The xet protocol (huggingface_hub's
default when hf_xet is installed) is not spoken: clients run with
HF_HUB_DISABLE_XET=1 and use the LFS path, which is huggingface_hub's own
fallback.

Downloads: :meth:`FakeHub.serve_folder` publishes a local folder as a repo at a
commit (files are read from disk when asked, so a 13 GB model costs no memory).
The server answers the repo info (``/api/models/{repo}/revision/{rev}``, with
siblings and sha), the tree listing, and ``resolve`` like the real Hub: small
files directly, LFS files (``*.safetensors``) with a 302 to a CDN-like path,
``HEAD`` with X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size and Location,
``GET`` with ``Range`` (206 partial content). ``FakeHub.faults`` injects
failures: a status for the next matching request, or a connection dropped in
the middle of a body.

From a script: ``python tests/support/fake_hub.py --serve DIR [--port N] [--store DIR2]``
serves every ``DIR/org/name`` folder as the repo ``org/name`` and prints the
URL and token; ``--store`` keeps uploaded LFS objects as files named by sha256
in DIR2 instead of in memory, ``--discard-uploads`` checks their sha256 and
keeps nothing (a run at scale: the commit still records each shard's sha256).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml


@dataclass
class FakeRepo:
    private: bool | None
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commit_messages: list[str] = field(default_factory=list)
    branch_commits: dict[str, list[str]] = field(default_factory=dict)  # branch -> messages
    deleted_branches: list[str] = field(default_factory=list)
    lfs_oids: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its LFS object
    # branch -> its commits, newest first, as (commit id, title); a new repo's main has the
    # Hub's initial commit. A commit that names another parentCommit than the head is refused.
    history: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: {"main": [("0" * 40, "initial commit")]}
    )


@dataclass(frozen=True)
class ServedFile:
    """One file of a served repo: where it is on disk, its size and ids."""

    path: Path
    size: int
    sha256: str
    git_oid: str

    @property
    def lfs(self) -> bool:
        return self.path.name.endswith((".safetensors", ".bin"))


@dataclass
class ServedRepo:
    """A local folder published as a repo at one commit, under its branch names."""

    commit: str
    files: dict[str, ServedFile]
    branches: set[str]


@dataclass
class Fault:
    """A failure for the next request whose path contains ``path_part`` (method ``method``).

    ``status`` answers that status instead (with ``headers``, e.g. ``Retry-After``);
    with ``after_handling`` the request is carried out first and only its reply is
    lost (a commit that landed although the client saw an error). ``drop_after``
    (bytes) sends the headers and that many bytes of the body, then drops the connection.
    """

    path_part: str
    status: int | None = None
    drop_after: int | None = None
    method: str = "GET"
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    after_handling: bool = False


@dataclass
class FakeHub:
    """What the server has received; ``refuse_commits_with`` makes commits fail with that status."""

    url: str = ""
    token: str = "hf_fake_token"
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    # The LFS objects each repo holds: as on the real Hub, an upload is skipped only
    # when the same repo has the object already.
    repo_objects: dict[str, set[str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)
    validated_cards: list[dict[str, Any]] = field(default_factory=list)
    refuse_commits_with: int | None = None
    served: dict[str, ServedRepo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    store: Path | None = None
    discard_uploads: bool = False  # check each LFS upload's sha256, keep no bytes
    ranges_served: int = 0
    cdn_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Publish every file at the top of ``folder`` as ``repo_id`` at a new commit; return it."""
        files = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            sha256, git = hashlib.sha256(), hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    sha256.update(chunk)
                    git.update(chunk)
            files[path.name] = ServedFile(
                path, path.stat().st_size, sha256.hexdigest(), git.hexdigest()
            )
        listing = json.dumps(sorted((n, f.git_oid) for n, f in files.items())).encode()
        commit = hashlib.sha1(repo_id.encode() + listing).hexdigest()
        self.served[repo_id] = ServedRepo(commit, files, {branch})
        return commit

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path_part in path and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"), "create_branch"),
    ("DELETE", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>.+)"), "delete_branch"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)"), "preupload"),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})"), "lfs_upload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>.+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)"), "repo_commits"),
    (
        "GET",
        re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<folder>.+))?"),
        "repo_tree",
    ),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<name>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<name>.+)"), "resolve"),
    ("GET", re.compile(r"/cdn/(?P<oid>[0-9a-f]{64})"), "cdn"),
    ("HEAD", re.compile(r"/cdn/(?P<oid>[0-9a-f]{64})"), "cdn"),
]
# Paths anyone may read (the CDN's URLs are signed on the real Hub).
_PUBLIC = re.compile(r"/cdn/.*|/lfs-upload/.*")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def start_fake_hub(port: int = 0) -> tuple[ThreadingHTTPServer, FakeHub]:
    """Start the server on ``port`` (0: a free local port), in a daemon thread."""
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_GET(self) -> None:
            self._route("GET")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def _route(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            hub.requests.append(f"{method} {path}")
            if method == "PUT" and (hub.store is not None or hub.discard_uploads):
                return self._store_upload(path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = hub.take_fault(method, path)
            if fault is not None and fault.status is not None and not fault.after_handling:
                return self._reply(
                    fault.status, {"error": "fault injected by the test"}, fault.headers
                )
            self.fault = fault
            public = _PUBLIC.fullmatch(path)
            if not public and self.headers.get("Authorization") != f"Bearer {hub.token}":
                hub.unauthorized.append(path)
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(path)
                if route_method == method and match:
                    return getattr(self, name)(body, **match.groupdict())
            self._reply(404, {"error": f"fake hub: no route for {method} {path}"})

        def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            fault = getattr(self, "fault", None)
            if fault is not None and fault.after_handling and fault.status is not None:
                self.fault = None  # the request was carried out; its reply is lost
                status, payload = fault.status, {"error": "fault injected by the test"}
                headers = fault.headers
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _served(self, repo: str, rev: str) -> ServedRepo | None:
            served = hub.served.get(repo)
            if served is None:
                self._reply(
                    404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                )
                return None
            if rev.replace("%2F", "/") not in served.branches and rev != served.commit:
                self._reply(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                return None
            return served

        def repo_info(self, body: bytes, repo: str, rev: str = "main") -> None:
            if repo in hub.repos and repo not in hub.served:  # an uploaded repo: its branch head
                history = hub.repos[repo].history.get(unquote(rev))
                if history is None:
                    return self._reply(
                        404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
                    )
                info = {"id": repo, "modelId": repo, "sha": history[0][0]}
                # huggingface_hub < 0.25 requires these too.
                info |= {"private": bool(hub.repos[repo].private), "downloads": 0, "likes": 0}
                return self._reply(200, {**info, "tags": []})
            served = self._served(repo, rev)
            if served is not None:
                siblings = [{"rfilename": name} for name in served.files]
                self._reply(
                    200, {"id": repo, "modelId": repo, "sha": served.commit, "siblings": siblings}
                )

        def repo_commits(self, body: bytes, repo: str, rev: str) -> None:
            history = hub.repos[repo].history.get(unquote(rev))
            if history is None:
                return self._reply(
                    404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
                )
            commits = [
                {
                    "id": oid,
                    "title": title,
                    "message": "",
                    "authors": [{"user": "test"}],
                    "date": "2026-01-01T00:00:00.000Z",
                }
                for oid, title in history
            ]
            self._reply(200, commits)

        def _branch(self, repo: str, rev: str) -> dict[str, bytes] | None:
            """The files of an uploaded repo's branch (404 and None when there is none)."""
            branch = hub.repos[repo].branches.get(unquote(rev))
            if branch is None:
                self._reply(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return branch

        def _branch_tree(self, repo: str, rev: str, folder: str | None) -> None:
            """The files directly in ``folder`` of an uploaded repo's branch (not recursive)."""
            files = self._branch(repo, rev)
            if files is None:
                return
            prefix = f"{unquote(folder)}/" if folder else ""
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                for name, data in sorted(files.items())
                if name.startswith(prefix) and "/" not in name[len(prefix) :]
            ]
            if prefix and not any(name.startswith(prefix) for name in files):
                return self._reply(
                    404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
                )
            self._reply(200, entries)

        def _branch_file(self, repo: str, rev: str, name: str) -> None:
            """A small file of an uploaded repo's branch, as ``resolve`` gives it."""
            files = self._branch(repo, rev)
            if files is None:
                return
            data = files.get(unquote(name))
            commit = _git_oid(json.dumps(sorted(files)).encode() + unquote(rev).encode())
            if data is None:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
                return self._reply(404, {"error": "Entry not found"}, headers)
            self.send_response(200)
            for header, value in {
                "Content-Length": str(len(data)),
                "X-Repo-Commit": commit,
                "ETag": f'"{_git_oid(data)}"',
            }.items():
                self.send_header(header, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def repo_tree(self, body: bytes, repo: str, rev: str, folder: str | None) -> None:
            if repo not in hub.served and repo in hub.repos:
                return self._branch_tree(repo, rev, folder)
            served = self._served(repo, rev)
            if served is None:
                return
            entries = []
            for name, f in served.files.items():
                entry: dict[str, Any] = {"type": "file", "path": name, "size": f.size}
                entry["oid"] = f.git_oid
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                entries.append(entry)
            self._reply(200, entries)

        def resolve(self, body: bytes, repo: str, rev: str, name: str) -> None:
            if repo not in hub.served and repo in hub.repos:
                return self._branch_file(repo, rev, name)
            served = self._served(repo, rev)
            if served is None:
                return
            served_file = served.files.get(name)
            if served_file is None:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": served.commit}
                return self._reply(404, {"error": "Entry not found"}, headers)
            headers = {"X-Repo-Commit": served.commit}
            if not served_file.lfs:
                headers["ETag"] = f'"{served_file.git_oid}"'
                return self._send_file(served_file, headers)
            # As the real Hub: LFS files redirect to the CDN; the 302 says what it links to.
            headers.update(
                {
                    "ETag": f'"{served_file.git_oid}"',
                    "X-Linked-Etag": f'"{served_file.sha256}"',
                    "X-Linked-Size": str(served_file.size),
                    # Another host name, as the real CDN: clients follow it as a CDN.
                    "Location": f"{hub.cdn_url}/cdn/{served_file.sha256}",
                }
            )
            self._reply(302, {}, headers)

        def cdn(self, body: bytes, oid: str) -> None:
            for served in hub.served.values():
                for served_file in served.files.values():
                    if served_file.sha256 == oid:
                        return self._send_file(served_file, {"ETag": f'"{oid}"'})
            self._reply(404, {"error": "no such object"})

        def _send_file(self, served_file: ServedFile, headers: dict[str, str]) -> None:
            """The file, or the byte range asked for (206), from disk in pieces."""
            start, stop, status = 0, served_file.size, 200
            asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if asked:
                start = int(asked.group(1))
                stop = min(served_file.size, int(asked.group(2)) + 1 if asked.group(2) else stop)
                if start >= served_file.size:
                    return self._reply(416, {"error": "range not satisfiable"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{served_file.size}"
                with hub.lock:
                    hub.ranges_served += 1
            self.send_response(status)
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            for header, value in headers.items():
                self.send_header(header, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            drop_after = self.fault.drop_after if self.fault else None
            with open(served_file.path, "rb") as handle:
                handle.seek(start)
                left = stop - start
                while left:
                    chunk = handle.read(min(left, 1 << 20))
                    if drop_after is not None and len(chunk) > drop_after:
                        self.wfile.write(chunk[:drop_after])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # SHUT_RDWR: the client sees a dropped read
                        return
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def _upload_repo(self) -> str:
            """The repo an LFS PUT is for, from the query of the URL ``lfs_batch`` gave."""
            query = self.path.partition("?")[2]
            return query.removeprefix("repo=") if query.startswith("repo=") else ""

        def _store_upload(self, path: str) -> None:
            """An LFS PUT checked against its sha256, kept as a file in ``hub.store`` (or
            dropped, with ``hub.discard_uploads``)."""
            oid = path.rsplit("/", 1)[-1]
            left = int(self.headers.get("Content-Length") or 0)
            temporary = Path(os.devnull)
            if hub.store is not None:
                temporary = hub.store / f"{oid}.{threading.get_ident()}.part"
            digest = hashlib.sha256()
            with open(temporary, "wb") as handle:
                while left:
                    chunk = self.rfile.read(min(left, 1 << 22))
                    if not chunk:
                        break
                    digest.update(chunk)
                    handle.write(chunk)
                    left -= len(chunk)
            if digest.hexdigest() != oid:
                if hub.store is not None:
                    temporary.unlink()
                return self._reply(400, {"error": "sha256 mismatch"})
            if hub.store is not None:
                os.replace(temporary, hub.store / oid)
            hub.lfs_objects[oid] = b""  # the bytes are in hub.store / oid
            hub.repo_objects.setdefault(self._upload_repo(), set()).add(oid)
            self._reply(200, {})

        def create_repo(self, body: bytes) -> None:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            if repo_id in hub.repos:
                return self._reply(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                )
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
            branch = unquote(branch)
            if branch in branches:
                return self._reply(409, {"error": "Reference already exists"})
            starting_point = json.loads(body or b"{}").get("startingPoint") or "main"
            branches[branch] = dict(branches[starting_point])
            history = hub.repos[repo].history
            history[branch] = list(history.get(starting_point, history["main"]))
            self._reply(200, {})

        def delete_branch(self, body: bytes, repo: str, branch: str) -> None:
            branch = unquote(branch)
            if hub.repos[repo].branches.pop(branch, None) is None:
                return self._reply(404, {"error": "Invalid rev id"})
            hub.repos[repo].deleted_branches.append(branch)
            hub.repos[repo].history.pop(branch, None)
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
            # As the real Hub: an object the repo holds already gets no upload action.
            held = hub.repo_objects.get(repo, set())
            actions = [
                {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] in held
                else {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}?repo={repo}"}},
                }
                for o in objects
            ]
            self._reply(200, {"transfer": "basic", "objects": actions})

        def lfs_upload(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._reply(400, {"error": "sha256 mismatch"})
            hub.lfs_objects[oid] = body
            hub.repo_objects.setdefault(self._upload_repo(), set()).add(oid)
            self._reply(200, {})

        def commit(self, body: bytes, repo: str, rev: str) -> None:
            if hub.refuse_commits_with is not None:
                return self._reply(
                    hub.refuse_commits_with, {"error": "commits refused by the test"}
                )
            branch = unquote(rev)
            history = hub.repos[repo].history.setdefault(branch, [("0" * 40, "initial commit")])
            header = json.loads(body.decode().splitlines()[0])["value"]
            if header.get("parentCommit") not in (None, history[0][0]):
                return self._reply(
                    412, {"error": "A commit has happened since. Please refresh and try again."}
                )
            files = hub.repos[repo].branches.setdefault(branch, {})
            for line in body.decode().splitlines():
                entry = json.loads(line)
                value = entry["value"]
                if entry["key"] == "header":
                    hub.repos[repo].commit_messages.append(value["summary"])
                    hub.repos[repo].branch_commits.setdefault(branch, []).append(value["summary"])
                elif entry["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif entry["key"] == "lfsFile":
                    files[value["path"]] = hub.lfs_objects[value["oid"]]
                    hub.repos[repo].lfs_oids[value["path"]] = value["oid"]
            oid = hashlib.sha1(body + history[0][0].encode()).hexdigest()
            history.insert(0, (oid, header["summary"]))
            self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    hub.cdn_url = f"http://localhost:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hub


def main() -> None:
    """``--serve DIR``: serve every ``DIR/org/name`` folder as the repo ``org/name``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", type=Path, required=True, help="folder of org/name repos")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--store", type=Path, help="keep uploaded LFS objects here, as files")
    parser.add_argument(
        "--discard-uploads", action="store_true", help="check uploads' sha256, keep no bytes"
    )
    arguments = parser.parse_args()
    _server, hub = start_fake_hub(arguments.port)
    hub.store, hub.discard_uploads = arguments.store, arguments.discard_uploads
    for org in sorted(p for p in arguments.serve.iterdir() if p.is_dir()):
        for repo in sorted(p for p in org.iterdir() if p.is_dir()):
            commit = hub.serve_folder(f"{org.name}/{repo.name}", repo)
            print(f"serving {org.name}/{repo.name} at {commit}", flush=True)
    print(f"HF_ENDPOINT={hub.url} HF_TOKEN={hub.token}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
