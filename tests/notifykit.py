"""Stand-ins for what `asgctl notify` talks to, as real HTTP servers on 127.0.0.1.

`FakeGitHub` answers `POST /repos/{owner}/{repo}/statuses/{sha}` as GitHub documents it
(docs.github.com/rest/commits/statuses, "Create a commit status": 201 with the status
object; 401 `{"message": "Bad credentials"}`; 422 `{"message": "Validation Failed"}`; rate
limits as 403/429 with `retry-after` or `x-ratelimit-remaining: 0`), and can be scripted to
answer a sequence of failures first.  `SignedReceiver` is a chat bridge that checks the
HMAC itself, with `hmac`/`hashlib` (not the code under test).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Scripted:
    """An answer to give: status, extra headers, JSON body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    raw: bytes | None = None
    """Bytes to answer instead of `body` (a hostile or broken server)."""


class _Server:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.script: list[Scripted] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                seen = Seen("POST", self.path, dict(self.headers.items()), body)
                server.seen.append(seen)
                status, headers, doc = server.answer(seen)
                data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        if self.script:
            s = self.script.pop(0)
            return s.status, s.headers, s.raw if s.raw is not None else s.body or {}
        return self.ok(seen)

    def ok(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        return 200, {}, {}

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeGitHub(_Server):
    """GitHub's commit status endpoint; `seen` holds every request as received."""

    def ok(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        doc = seen.json
        sha = seen.path.rsplit("/", 1)[-1]
        return (
            201,
            {"Location": f"{self.url}{seen.path}"},
            {
                "url": f"{self.url}{seen.path}",
                "id": len(self.seen),
                "node_id": "SC_kwDO",
                "state": doc.get("state"),
                "description": doc.get("description"),
                "target_url": doc.get("target_url"),
                "context": doc.get("context", "default"),
                "created_at": "2026-12-06T06:00:00Z",
                "updated_at": "2026-12-06T06:00:00Z",
                "creator": {"login": "asgctl-bot"},
                "sha": sha,
            },
        )

    def statuses(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(sha, body) of each request."""
        for s in self.seen:
            yield s.path.rsplit("/", 1)[-1], s.json


class SignedReceiver(_Server):
    """A webhook receiver: 200 when the signature matches the body, 401 otherwise."""

    def __init__(self, secret: bytes) -> None:
        super().__init__()
        self.secret = secret
        self.verified: list[dict[str, Any]] = []

    def ok(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        expected = "sha256=" + hmac.new(self.secret, seen.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(seen.headers.get("X-Asgctl-Signature-256", ""), expected):
            return 401, {}, {"message": "bad signature"}
        self.verified.append(seen.json)
        return 200, {}, {"ok": True}

    def body_sizes(self) -> list[int]:
        return [len(s.body) for s in self.seen]
