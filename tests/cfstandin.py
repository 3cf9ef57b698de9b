"""A stand-in Cloud Controller (v3) and UAA on 127.0.0.1, for `asgctl cf sync` tests and bench.

It is a real HTTP server (stdlib `http.server`, HTTP/1.1 keep-alive, optionally TLS) that
answers as the real ones do, so the client under test is exercised end to end -- nothing of
ours is mocked.  The shapes follow cloud_controller_ng's v3 docs (commit in brackets):

* `GET /` is the global root: `links.uaa` / `links.login` hold the UAA's URL
  (docs/v3/source/includes/api_resources/_root.erb:127-132 [72f2de6]).
* Lists are paginated: `pagination.{total_results,total_pages,first,last,next,previous}` with
  `{"href": ...?page=N&per_page=M}` links and `previous`/`next` null at the ends
  (docs/v3/source/includes/concepts/_pagination.md.erb:9-22, :44-53 [3622d7d]); `per_page` is
  1..5000, default 50 (resources/security_groups/_list.md.erb:38 [36850ad]).  `max_per_page`
  grants less than asked, as a server configured with a smaller page does.
* Orgs are `{guid, name, ...}` (api_resources/_organizations.erb:2-13 [7827ff4]); a space
  names its org in `relationships.organization.data.guid` (resources/spaces/_object.md.erb:16
  [2eba3fd]); an app its space in `relationships.space.data.guid`
  (resources/apps/_object.md.erb:19 [0278a44]); a security group carries `rules`,
  `globally_enabled` and `relationships.{running,staging}_spaces.data[].guid`
  (api_resources/_security_groups.erb:7-35 [4a53314]).
* Errors are v3 error lists (`{"errors": [{"code", "title", "detail"}]}`,
  concepts/_errors.md.erb); an unknown or expired token is 401 `CF-InvalidAuthToken`.
* A 429 carries `Retry-After` (middleware/mixins/too_many_requests.rb:4-10 [f708371]).
* The UAA's `POST /oauth/token` takes `grant_type=client_credentials` with the client in HTTP
  Basic auth and answers `{access_token, token_type: "bearer", expires_in}` (cloudfoundry/uaa
  docs/UAA-APIs.rst, "OAuth2 Token Endpoint" [942f505]).

Faults are queued per path (`fail`), tokens can be revoked after N uses (`revoke_after`), and
every request is recorded (`requests`) so a test can see what the client sent.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CLIENT_ID = "asgctl-sync"
CLIENT_SECRET = "s3cr3t-Value-never-printed"
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 5000
STAMP = "2026-01-01T00:00:00Z"


@dataclass
class Fault:
    """Answer the next `times` requests whose path starts with `path` with this instead."""

    path: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int = 1


def _guid(kind: str, n: int) -> str:
    """A deterministic UUID-shaped GUID, so generated foundations are the same every run."""
    return str(uuid.UUID(int=(hash_kind(kind) << 96) | n))


def hash_kind(kind: str) -> int:
    return {"org": 1, "space": 2, "app": 3, "sg": 4, "quota": 5}[kind]


class StandIn:
    """The foundation (orgs, spaces, apps, groups as CC resources) and the server answering for it.

    Orgs, spaces and apps are kept as (guid, name, parent) tuples and made into resources page
    by page, so a 200,000-app foundation stays small.
    """

    def __init__(
        self,
        *,
        max_per_page: int = MAX_PER_PAGE,
        token_lifetime: int = 3600,
        uaa_link: str = "uaa",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.max_per_page = max_per_page
        self.token_lifetime = token_lifetime
        self.uaa_link = uaa_link
        self.tls = tls
        self.orgs: list[tuple[str, Any]] = []
        self.spaces: list[tuple[str, Any, str]] = []
        self.apps: list[tuple[str, Any, str]] = []
        self.groups: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.tokens: dict[str, int] = {}  # token -> uses left
        self.revoke_after: int | None = None
        self.issued = 0
        self.overrides: dict[str, Any] = {}  # path -> JSON (or raw bytes) served as is
        self.frozen: dict[tuple[str, int, int], bytes] = {}  # (kind, page, per_page) -> body
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the foundation -------------------------------------------------------------------

    def add_org(self, name: Any, guid: str | None = None) -> str:
        guid = guid or _guid("org", len(self.orgs) + 1)
        self.orgs.append((guid, name))
        return guid

    def add_space(self, org: str, name: Any, guid: str | None = None) -> str:
        guid = guid or _guid("space", len(self.spaces) + 1)
        self.spaces.append((guid, name, org))
        return guid

    def add_app(self, space: str, name: Any, guid: str | None = None) -> str:
        guid = guid or _guid("app", len(self.apps) + 1)
        self.apps.append((guid, name, space))
        return guid

    def add_group(
        self,
        name: Any,
        rules: list[Any],
        *,
        running: list[str] = (),  # type: ignore[assignment]
        staging: list[str] = (),  # type: ignore[assignment]
        globally_enabled: dict[str, bool] | None = None,
        guid: str | None = None,
    ) -> dict[str, Any]:
        guid = guid or _guid("sg", len(self.groups) + 1)
        group = {
            "guid": guid,
            "created_at": STAMP,
            "updated_at": STAMP,
            "name": name,
            "globally_enabled": globally_enabled or {"running": False, "staging": False},
            "rules": rules,
            "relationships": {
                "staging_spaces": {"data": [{"guid": g} for g in staging]},
                "running_spaces": {"data": [{"guid": g} for g in running]},
            },
            "links": {"self": {"href": f"{self.url}/v3/security_groups/{guid}"}},
        }
        self.groups.append(group)
        return group

    def group(self, name: str) -> dict[str, Any]:
        return next(g for g in self.groups if g["name"] == name)

    def unbind(self, name: str, lifecycle: str, space: str) -> None:
        """`cf unbind-security-group`: drop the space from the group's relationship."""
        data = self.group(name)["relationships"][f"{lifecycle}_spaces"]["data"]
        data[:] = [d for d in data if d["guid"] != space]

    def fail(self, path: str, status: int, times: int = 1, **headers: str) -> None:
        body = json.dumps(
            {"errors": [{"code": 10001, "title": "CF-Stand-in", "detail": f"injected {status}"}]}
        ).encode()
        self.faults.append(Fault(path, status, dict(headers), body, times))

    def token_requests(self) -> int:
        return sum(1 for m, p, _ in self.requests if m == "POST" and p.endswith("/oauth/token"))

    # -- resources ------------------------------------------------------------------------

    def _org(self, item: tuple[str, Any]) -> dict[str, Any]:
        guid, name = item
        return {
            "guid": guid,
            "created_at": STAMP,
            "updated_at": STAMP,
            "name": name,
            "suspended": False,
            "relationships": {"quota": {"data": {"guid": _guid("quota", 1)}}},
            "metadata": {"labels": {}, "annotations": {}},
            "links": {"self": {"href": f"{self.url}/v3/organizations/{guid}"}},
        }

    def _space(self, item: tuple[str, Any, str]) -> dict[str, Any]:
        guid, name, org = item
        return {
            "guid": guid,
            "created_at": STAMP,
            "updated_at": STAMP,
            "name": name,
            "relationships": {"organization": {"data": {"guid": org}}, "quota": {"data": None}},
            "metadata": {"labels": {}, "annotations": {}},
            "links": {
                "self": {"href": f"{self.url}/v3/spaces/{guid}"},
                "organization": {"href": f"{self.url}/v3/organizations/{org}"},
            },
        }

    def _app(self, item: tuple[str, Any, str]) -> dict[str, Any]:
        guid, name, space = item
        return {
            "guid": guid,
            "name": name,
            "state": "STARTED",
            "created_at": STAMP,
            "updated_at": STAMP,
            "lifecycle": {"type": "buildpack", "data": {"buildpacks": [], "stack": "cflinuxfs4"}},
            "relationships": {"space": {"data": {"guid": space}}},
            "metadata": {"labels": {}, "annotations": {}},
            "links": {
                "self": {"href": f"{self.url}/v3/apps/{guid}"},
                "space": {"href": f"{self.url}/v3/spaces/{space}"},
            },
        }

    def _listing(self, kind: str) -> tuple[list[Any], Any]:
        if kind == "organizations":
            return self.orgs, self._org
        if kind == "spaces":
            return self.spaces, self._space
        if kind == "apps":
            return self.apps, self._app
        return self.groups, lambda g: g

    def page(self, kind: str, page: int, per_page: int) -> dict[str, Any]:
        items, make = self._listing(kind)
        total = len(items)
        pages = max(1, -(-total // per_page))

        def link(n: int) -> dict[str, str]:
            return {"href": f"{self.url}/v3/{kind}?page={n}&per_page={per_page}"}

        start = (page - 1) * per_page
        return {
            "pagination": {
                "total_results": total,
                "total_pages": pages,
                "first": link(1),
                "last": link(pages),
                "next": link(page + 1) if page < pages else None,
                "previous": link(page - 1) if page > 1 else None,
            },
            "resources": [make(i) for i in items[start : start + per_page]],
        }

    def freeze(self, per_page: int = MAX_PER_PAGE) -> None:
        """Serialise every page of every listing now, so serving one is a write (the bench:
        the stand-in's own work must not be what the sync's wall time measures)."""
        for kind in ("organizations", "spaces", "apps", "security_groups"):
            items, _ = self._listing(kind)
            for page in range(1, max(1, -(-len(items) // per_page)) + 1):
                body = json.dumps(self.page(kind, page, per_page)).encode()
                self.frozen[(kind, page, per_page)] = body

    # -- server ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def start(self) -> StandIn:
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


@contextmanager
def running(standin: StandIn) -> Iterator[StandIn]:
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: StandIn

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode())

    def _error(self, status: int, title: str, detail: str, code: int = 10000) -> None:
        self._json(status, {"errors": [{"code": code, "title": title, "detail": detail}]})

    def _fault(self, path: str) -> bool:
        with self.owner._lock:
            for fault in self.owner.faults:
                if fault.times > 0 and path.startswith(fault.path):
                    fault.times -= 1
                    break
            else:
                return False
        self._send(fault.status, fault.body, fault.headers)
        return True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        path = urlsplit(self.path).path
        self.owner.requests.append(("POST", self.path, dict(self.headers)))
        if self._fault(path):
            return
        if path != f"/{self.owner.uaa_link}/oauth/token":
            self._error(404, "CF-NotFound", "Unknown request")
            return
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        form = parse_qs(body)
        if self.headers.get("Authorization") != f"Basic {expected}":
            self._json(401, {"error": "unauthorized", "error_description": "Bad credentials"})
            return
        if form.get("grant_type") != ["client_credentials"]:
            self._json(400, {"error": "unsupported_grant_type"})
            return
        with self.owner._lock:
            self.owner.issued += 1
            token = f"tok{self.owner.issued}.{uuid.uuid4().hex}"
            self.owner.tokens[token] = self.owner.revoke_after or -1
        self._json(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.owner.token_lifetime,
                "scope": "cloud_controller.admin_read_only",
                "jti": uuid.uuid4().hex,
            },
        )

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        self.owner.requests.append(("GET", self.path, dict(self.headers)))
        if self._fault(path):
            return
        base = self.owner.url
        if path == "/":
            links: dict[str, Any] = {
                "self": {"href": base},
                "cloud_controller_v3": {"href": f"{base}/v3", "meta": {"version": "3.180.0"}},
            }
            links[self.owner.uaa_link] = {"href": f"{base}/{self.owner.uaa_link}"}
            self._json(200, {"links": links})
            return
        if path in self.owner.overrides:
            body = self.owner.overrides[path]
            if isinstance(body, bytes):
                self._send(200, body)
            else:
                self._json(200, body)
            return
        auth = self.headers.get("Authorization", "")
        token = auth[len("bearer ") :] if auth.lower().startswith("bearer ") else ""
        with self.owner._lock:
            uses = self.owner.tokens.get(token)
            valid = uses is not None and uses != 0
            if valid and uses is not None and uses > 0:
                self.owner.tokens[token] = uses - 1
        if not valid:
            self._error(401, "CF-InvalidAuthToken", "Invalid Auth Token", 1000)
            return
        kind = path.removeprefix("/v3/")
        if kind not in ("organizations", "spaces", "apps", "security_groups"):
            self._error(404, "CF-ResourceNotFound", "Unknown request", 10010)
            return
        query = parse_qs(parts.query)
        try:
            page = int(query.get("page", ["1"])[0])
            per_page = int(query.get("per_page", [str(DEFAULT_PER_PAGE)])[0])
        except ValueError:
            self._error(400, "CF-BadQueryParameter", "page and per_page must be integers", 10005)
            return
        if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
            self._error(400, "CF-BadQueryParameter", "Per page must be between 1 and 5000", 10005)
            return
        per_page = min(per_page, self.owner.max_per_page)
        frozen = self.owner.frozen.get((kind, page, per_page))
        if frozen is not None:
            self._send(200, frozen)
            return
        self._json(200, self.owner.page(kind, page, per_page))


def foundation(
    standin: StandIn, orgs: int, spaces: int, apps: int, groups: int, rules_per_group: int = 5
) -> None:
    """A generated foundation: spaces spread over orgs, apps over spaces, each group bound to
    a few spaces; names like CF's (org-17, space-3, app-12)."""
    org_guids = [standin.add_org(f"org-{o}") for o in range(orgs)]
    space_guids = [
        standin.add_space(org_guids[s % orgs], f"space-{s // orgs}") for s in range(spaces)
    ]
    for a in range(apps):
        standin.add_app(space_guids[a % spaces], f"app-{a // spaces}")
    for g in range(groups):
        rules = [
            {
                "protocol": "tcp",
                "destination": f"198.18.{(g * rules_per_group + r) // 250 % 250}.{r % 250 + 1}",
                "ports": "443",
            }
            for r in range(rules_per_group)
        ]
        bound = [space_guids[(g * 7 + k) % spaces] for k in range(3)]
        standin.add_group(
            f"asg-{g:05d}",
            rules,
            running=bound,
            staging=bound[:1],
            globally_enabled={"running": g == 0, "staging": g == 0},
        )


def main(argv: list[str]) -> None:
    """`python -m tests.cfstandin ORGS SPACES APPS GROUPS`: serve a generated foundation over
    plain http until stdin closes; prints the URL on the first line (for the benchmark)."""
    orgs, spaces, apps, groups = (int(a) for a in argv[:4])
    standin = StandIn()
    with running(standin):
        foundation(standin, orgs, spaces, apps, groups)
        standin.freeze()
        print(standin.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1:])
