"""A stand-in for the Hugging Face Hub on 127.0.0.1: just the routes `HfApi.create_repo`, `repo_info`,
`list_repo_files` and `upload_folder`/`create_commit` call (huggingface_hub 2.x with HF_HUB_DISABLE_XET=1).

Routes, as huggingface_hub's hf_api.py, _commit_api.py and lfs.py send them:
  POST /api/repos/create                                  {name, organization, type, visibility, sdk}
  GET  /api/{models,spaces,datasets}/NS/NAME[/revision/REV]          repo_info
  GET  /api/{type}s/NS/NAME/tree/REV[/PATH]?recursive=...            list_repo_files
  POST /api/validate-yaml                                  README.md header check
  POST /api/{type}s/NS/NAME/preupload/REV                  which files go through LFS
  POST /[spaces/|datasets/]NS/NAME.git/info/lfs/objects/batch        LFS batch: where to PUT
  PUT  /_lfs/OID, POST /_lfs/verify                        the LFS upload itself and its check
  POST /api/{type}s/NS/NAME/commit/REV                     NDJSON: header, file (base64), lfsFile, deletedFile
Anything else answers 404. Committed files are written under `root/<type>s/NS/NAME/`, so a test can compare
bytes; every request and every create payload is recorded.

Failure modes for tests: `foreign` namespaces belong to someone else (create, preupload, LFS batch and commit
answer 403; repos seeded there with `seed_repo` exist for repo_info), and `fail_commits` = "500" (an internal
error) or "reset" (the connection is dropped without an answer) on every commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

TYPES = {"models": "model", "spaces": "space", "datasets": "dataset"}
URL_PREFIX = {"model": "", "space": "spaces/", "dataset": "datasets/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".jpg", ".jpeg", ".png", ".webp", ".zip", ".gz")
LFS_MIN_BYTES = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.repo_type}/{self.repo_id}/{len(self.commits)}".encode()).hexdigest()


class HubServer:
    """`with HubServer(tmp) as hub:` then set HF_ENDPOINT=hub.endpoint for the client process."""

    def __init__(self, root: Path, *, user: str = "tester", token: str | None = None,
                 foreign: tuple[str, ...] = (), fail_commits: str | None = None) -> None:
        if fail_commits not in (None, "500", "reset"):
            raise ValueError(f"fail_commits must be None, '500' or 'reset', got {fail_commits!r}")
        self.root = Path(root)
        self.user = user
        self.token = token  # when set, any other bearer token gets 401
        self.foreign = set(foreign)
        self.fail_commits = fail_commits
        self.repos: dict[tuple[str, str], Repo] = {}
        self.created: list[dict] = []  # create payloads, in order
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.tokens_seen: set[str] = set()
        self.lock = threading.RLock()  # reply() takes it too, also from inside a locked block
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- what tests read --------------------------------------------------------------------------

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def files(self, repo_type: str, repo_id: str) -> dict[str, bytes]:
        """Every committed file of a repo, path -> bytes (`.gitattributes` included)."""
        folder = self.repo_dir(repo_type, repo_id)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def seed_repo(self, repo_type: str, repo_id: str, sdk: str | None = None) -> None:
        """A repo that already exists (e.g. someone else's)."""
        self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=False, sdk=sdk)
        self.repo_dir(repo_type, repo_id).mkdir(parents=True, exist_ok=True)

    # -- the routes -------------------------------------------------------------------------------

    def route(self, h: _Handler) -> None:
        parts = [unquote(p) for p in urlsplit(h.path).path.strip("/").split("/")]
        method = h.command
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self.create(h)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            h.read_body()
            return h.reply(200, {"errors": [], "warnings": []})
        if method == "PUT" and len(parts) == 2 and parts[0] == "_lfs":
            return self.lfs_put(h, parts[1])
        if method == "POST" and parts == ["_lfs", "verify"]:
            return self.lfs_verify(h)
        if parts[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            repo_path = parts[:-4]
            repo_type = "model"
            if repo_path and repo_path[0] in TYPES:
                repo_type = TYPES[repo_path.pop(0)]
            if len(repo_path) == 2 and repo_path[1].endswith(".git"):
                return self.lfs_batch(h, repo_type, f"{repo_path[0]}/{repo_path[1][:-4]}")
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in TYPES:
            repo_type, repo_id, rest = TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            if method == "GET" and (rest == [] or rest[:1] == ["revision"]):
                return self.info(h, repo_type, repo_id)
            if method == "GET" and rest[:1] == ["tree"]:
                return self.tree(h, repo_type, repo_id, "/".join(rest[2:]))
            if method == "POST" and rest[:1] == ["preupload"]:
                return self.preupload(h, repo_type, repo_id)
            if method == "POST" and rest[:1] == ["commit"]:
                return self.commit(h, repo_type, repo_id)
        h.read_body()
        h.reply(404, {"error": f"no route {method} {h.path}"})

    def _authorized(self, h: _Handler, answer: bool = True) -> bool:
        """Whether the request carries an acceptable bearer token; if not and `answer`, a 401 is sent."""
        auth = h.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token:
            self.tokens_seen.add(token)
        if token is None or (self.token is not None and token != self.token):
            if not answer:
                return False
            h.reply(401, {"error": "Invalid credentials in Authorization header"},
                    {"X-Error-Message": "Invalid credentials in Authorization header"})
            return False
        return True

    def _writable(self, h: _Handler, repo_type: str, repo_id: str) -> Repo | None:
        """The repo, if it exists and this user may write to it; otherwise the error is answered."""
        if not self._authorized(h):
            return None
        namespace = repo_id.split("/")[0]
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            h.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if namespace in self.foreign:
            message = f"You don't have the rights to write to {repo_id}"
            h.reply(403, {"error": message}, {"X-Error-Message": message})
            return None
        return repo

    def create(self, h: _Handler) -> None:
        payload = json.loads(h.read_body())
        if not self._authorized(h):
            return
        with self.lock:
            self.created.append(payload)
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or self.user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if namespace in self.foreign:
            message = f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"'
            return h.reply(403, {"error": message}, {"X-Error-Message": message})
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return h.reply(409, {"error": f"You already created this {repo_type} repo", "url": url})
            private = payload.get("visibility") == "private" or payload.get("private") is True
            self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=private, sdk=payload.get("sdk"))
            folder = self.repo_dir(repo_type, repo_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".gitattributes").write_text(GITATTRIBUTES)  # as the Hub's initial commit
        h.reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def info(self, h: _Handler, repo_type: str, repo_id: str) -> None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized(h, answer=False)):
            return h.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        body = {"id": repo_id, "private": repo.private, "sha": repo.sha, "siblings": [
            {"rfilename": name} for name in self.files(repo_type, repo_id)]}
        if repo.sdk:
            body["sdk"] = repo.sdk
        h.reply(200, body)

    def tree(self, h: _Handler, repo_type: str, repo_id: str, under: str) -> None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized(h, answer=False)):
            return h.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        recursive = parse_qs(urlsplit(h.path).query).get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        entries, folders = [], set()
        for name, data in self.files(repo_type, repo_id).items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        h.reply(200, entries)

    def preupload(self, h: _Handler, repo_type: str, repo_id: str) -> None:
        payload = json.loads(h.read_body())
        if self._writable(h, repo_type, repo_id) is None:
            return
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            binary = b"\0" in sample or item["path"].lower().endswith(LFS_SUFFIXES)
            mode = "lfs" if binary or item["size"] >= LFS_MIN_BYTES else "regular"
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": None})
        h.reply(200, {"files": files, "commitOid": self.repos[(repo_type, repo_id)].sha})

    def lfs_batch(self, h: _Handler, repo_type: str, repo_id: str) -> None:
        payload = json.loads(h.read_body())
        if self._writable(h, repo_type, repo_id) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self._lfs_path(obj["oid"]).exists():  # already stored: no actions, nothing to upload
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.endpoint}/_lfs/verify"}}
            objects.append(entry)
        h.reply(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_path(self, oid: str) -> Path:
        return self.root / "_lfs" / oid

    def lfs_put(self, h: _Handler, oid: str) -> None:
        data = h.read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            return h.reply(400, {"error": "sha256 of the body does not match the object id"})
        path = self._lfs_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{oid}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        h.reply(200, {})

    def lfs_verify(self, h: _Handler) -> None:
        payload = json.loads(h.read_body())
        path = self._lfs_path(payload["oid"])
        if not path.exists() or path.stat().st_size != payload["size"]:
            return h.reply(404, {"error": "object not found"})
        h.reply(200, {})

    def commit(self, h: _Handler, repo_type: str, repo_id: str) -> None:
        lines = [json.loads(line) for line in h.read_body().splitlines() if line.strip()]
        if self.fail_commits == "reset":
            return h.reset()
        if self.fail_commits == "500":
            return h.reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        repo = self._writable(h, repo_type, repo_id)
        if repo is None:
            return
        writes: dict[str, bytes] = {}
        deletes: list[str] = []
        header = {}
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "")
            if ".." in Path(path).parts or path.startswith("/"):
                return h.reply(400, {"error": f"invalid path {path!r}"})
            if key == "header":
                header = value
            elif key == "file":
                writes[path] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self._lfs_path(value["oid"])
                if not blob.exists():
                    return h.reply(422, {"error": f"LFS object {value['oid']} of {path} was never uploaded"})
                writes[path] = blob.read_bytes()
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(path)
            else:
                return h.reply(400, {"error": f"unknown commit key {key!r}"})
        folder = self.repo_dir(repo_type, repo_id)
        with self.lock:
            for path in deletes:
                target = folder / path
                if not target.exists():
                    return h.reply(404, {"error": "A file with this name doesn't exist"}, {"X-Error-Code": "EntryNotFound"})
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            for path, data in writes.items():
                target = folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            repo.commits.append({"summary": header.get("summary"), "files": sorted(writes), "deleted": deletes,
                                 "time": time.time()})
            sha = repo.sha
        h.reply(200, {"success": True, "commitOid": sha,
                      "commitUrl": f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"})


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    def log_message(self, format, *args) -> None:  # quiet: tests read `hub.requests` instead
        pass

    def read_body(self) -> bytes:
        if getattr(self, "_body", None) is not None:
            return self._body
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def reply(self, status: int, body, headers: dict | None = None, content_type: str = "application/json") -> None:
        data = json.dumps(body).encode()
        with self.hub.lock:
            self.hub.requests.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def reset(self) -> None:
        """Drop the connection with a TCP reset and no answer, as a network failure would."""
        with self.hub.lock:
            self.hub.requests.append((self.command, urlsplit(self.path).path, 0))
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # the socket was reset on purpose
            pass

    def _dispatch(self) -> None:
        self._body = None
        self.hub.route(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch


def _handler(hub: HubServer) -> type[_Handler]:
    return type("HubHandler", (_Handler,), {"hub": hub})


if __name__ == "__main__":  # a server to try `push` by hand: HF_ENDPOINT=<printed> HF_HUB_DISABLE_XET=1 python -m trainer push ...
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, HubServer(Path(sys.argv[1] if len(sys.argv) > 1 else tmp)) as hub:
        print(f"HF_ENDPOINT={hub.endpoint}  (files under {hub.root}; Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
