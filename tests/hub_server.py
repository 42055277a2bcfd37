"""A stand-in for the few Hugging Face Hub HTTP endpoints that `create_repo`, `create_branch`,
`upload_folder`/`create_commit`, `list_repo_files` and `hf_hub_download` call, served on 127.0.0.1, so
`phi2sum push` and the checkpoint upload/download of `train.hub_checkpoints` run end to end with no network.

It answers every preupload with "regular" (files travel base64-encoded inside the commit, no LFS/Xet)
and keeps what each commit sends in memory: `hub.repos["user/name"]["branches"]["main"]["README.md"]`.
Anything it does not implement gets a 404 and is recorded in `hub.unhandled`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO_ACTION = re.compile(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)")
REPO_INFO = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/.+)?")
TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?")
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.unhandled: list[str] = []
        self.fail: dict[str, int] = {}  # route name ("create", "preupload", "commit") -> HTTP status
        self.fail_next: dict[str, int] = {}  # the same, for the next such request only
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict | list | bytes, dict]:
        """(status, JSON reply or file bytes, extra headers) for one request."""
        if method == "POST" and path == "/api/repos/create":
            if "create" in self.fail:
                return self.fail["create"], {"error": "You don't have the rights to create a model here"}, {}
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            private = req.get("private", req.get("visibility") == "private")
            self.repos.setdefault(repo_id, {"private": private, "branches": {"main": {}}, "commits": []})
            return 200, {"url": f"{self.url}/{repo_id}"}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        m = REPO_ACTION.fullmatch(path)
        if method == "POST" and m:
            repo_id, action, rev = m.group(1), m.group(2), unquote(m.group(3))
            if action in self.fail or action in self.fail_next:
                status = self.fail.get(action) or self.fail_next.pop(action)
                return status, {"error": f"{action} refused"}, {}
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if action == "branch":
                if rev in repo["branches"]:
                    return 409, {"error": "branch exists"}, {}
                repo["branches"][rev] = dict(repo["branches"]["main"])
                return 200, {}, {}
            if rev not in repo["branches"]:
                return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}, {}
            lines = [json.loads(x) for x in body.splitlines() if x.strip()]
            files = repo["branches"][rev]
            for line in lines:
                if line["key"] == "file":
                    content = base64.b64decode(line["value"]["content"])
                    files[line["value"]["path"]] = content
                elif line["key"] == "deletedFile":
                    files.pop(line["value"]["path"], None)
                elif line["key"] == "deletedFolder":
                    folder = line["value"]["path"].rstrip("/") + "/"
                    for name in [n for n in files if n.startswith(folder)]:
                        del files[name]
                elif line["key"] != "header":  # lfsFile etc.: this stand-in only speaks "regular"
                    return 400, {"error": f"stand-in cannot handle {line['key']}"}, {}
            repo["commits"].append({"revision": rev, "summary": lines[0]["value"]["summary"]})
            oid = f"{len(repo['commits']):040x}"
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None}, {}
        m = TREE.fullmatch(path)
        if method == "GET" and m:  # list_repo_tree / list_repo_files: every file under the path, one page
            repo, rev, under = self.repos.get(m.group(1)), unquote(m.group(2)), unquote(m.group(3) or "")
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if rev not in repo["branches"]:
                return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
            prefix = under.rstrip("/") + "/" if under else ""
            return 200, [{"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                         for name, content in sorted(repo["branches"][rev].items()) if name.startswith(prefix)], {}
        m = RESOLVE.fullmatch(path)
        if method in ("GET", "HEAD") and m:  # hf_hub_download: HEAD for the metadata, then GET for the bytes
            repo, rev, name = self.repos.get(m.group(1)), unquote(m.group(2)), unquote(m.group(3))
            if repo is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if rev not in repo["branches"]:
                return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
            content = repo["branches"][rev].get(name)
            if content is None:
                return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
            return 200, content, {"ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                                  "X-Repo-Commit": f"{len(repo['commits']):040x}"}
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub 2.x's optional lookup
            return 404, {"error": "not served here"}, {}
        m = REPO_INFO.fullmatch(path)
        if method == "GET" and m and m.group(1) in self.repos:
            return 200, {"id": m.group(1), "sha": "0" * 40, "private": self.repos[m.group(1)]["private"]}, {}
        if method == "GET" and m:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        self.unhandled.append(f"{method} {path}")
        return 404, {"error": "not implemented by the stand-in"}, {}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                out += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self):
        hub: FakeHub = self.server.hub
        path = urlsplit(self.path).path
        body = self._body()
        hub.requests.append((self.command, path, self.headers.get("Authorization")))
        status, reply, headers = hub.handle(self.command, path, body)
        raw = isinstance(reply, bytes)
        data = reply if raw else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = _serve
