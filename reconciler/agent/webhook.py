"""`asgctl agent --listen-webhook ADDR`: a signed push notification makes the agent sync now.

Flux's notification-controller Receiver, for one agent: GitHub (or anything holding the
shared secret) POSTs to `/hook` after a push, and the agent fetches at once instead of at
the end of its interval.  The request only says "look now"; what is applied is still only
what the agent fetches and verifies itself, so the webhook can never choose a revision.

* Authenticity: `X-Hub-Signature-256` (GitHub) or `X-Asgctl-Signature-256` (generic), each
  `sha256=<HMAC-SHA256 of the body>`, compared in constant time (`reconciler.hmacsig`).  A
  wrong or missing signature is 401 and triggers nothing.
* Events: GitHub's `ping` is answered 200 and triggers nothing; a `push` triggers only when
  its `ref` is the agent's branch (status branches are pushes too: without this, every
  agent's status push would make every other agent sync); other GitHub events are ignored.
  A request without `X-GitHub-Event` (the generic form) triggers.
* Budgets: the body must state its length (411 otherwise) and be at most `MAX_BODY_BYTES`
  (413, not read); a client gets `REQUEST_TIMEOUT` seconds to send it; the server answers
  one request at a time, so a flood costs one thread.
* Rate: at most one triggered sync per `min_interval` (`SyncTrigger`): a trigger inside the
  window is coalesced into one sync at its end (202), and further ones while that is pending
  are answered 429 with `Retry-After`.  A push is never lost, and a flood is one sync per
  window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from reconciler.agent.httpserve import BackgroundServer
from reconciler.hmacsig import GITHUB_SIGNATURE_HEADER, SIGNATURE_HEADER, verify
from reconciler.sources import jsonsafe

PATH = "/hook"
MAX_BODY_BYTES = 1024 * 1024
"""A push event with its 20 commits is tens of KB; anything bigger is not read."""
REQUEST_TIMEOUT = 5.0
"""Where the secret is read from when `webhook-secret-file` is not set."""


class SyncTrigger:
    """At most one sync per `min_interval`; one more, coalesced, at the window's end.

    `request()` answers (HTTP status, what happened, seconds to retry after).  `fire` is the
    agent's "sync now" (it only queues an event), called from the request's thread or from
    the timer of a coalesced trigger.
    """

    def __init__(
        self,
        fire: Callable[[], None],
        min_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fire = fire
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._timer: threading.Timer | None = None
        self.fired = 0

    def request(self) -> tuple[int, str, float]:
        with self._lock:
            now = self._clock()
            if self._last is None or now - self._last >= self.min_interval:
                if self._timer is not None:  # a pending coalesced sync: this one covers it
                    self._timer.cancel()
                    self._timer = None
                self._last = now
                self.fired += 1
                self._fire()
                return 202, "sync triggered", 0.0
            wait = self._last + self.min_interval - now
            if self._timer is not None:
                return 429, "a sync is already queued", wait
            self._timer = threading.Timer(wait, self._deferred)
            self._timer.daemon = True
            self._timer.start()
            return 202, f"coalesced: sync in {wait:.1f}s", 0.0

    def _deferred(self) -> None:
        with self._lock:
            if self._timer is None:
                return
            self._timer = None
            self._last = self._clock()
            self.fired += 1
            self._fire()

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def _ref_of(body: bytes) -> str | None:
    """A push event's `ref`, None when the body is not a JSON object with a string ref."""
    try:
        doc = jsonsafe.loads(body, "push event")
    except ValueError:
        return None
    ref = doc.get("ref") if isinstance(doc, dict) else None
    return ref if isinstance(ref, str) else None


def judge(
    secret: bytes, branch: str, headers: Mapping[str, str], body: bytes
) -> tuple[int, str, bool]:
    """(status, outcome, trigger?) for a complete, size-checked request: the signature first,
    and nothing of the body is looked at before it matches."""
    signature = headers.get(GITHUB_SIGNATURE_HEADER) or headers.get(SIGNATURE_HEADER)
    if not verify(secret, body, signature):
        return 401, "signature missing or wrong", False
    event = headers.get("X-GitHub-Event")
    if event is None:
        return 202, "generic", True
    if event == "ping":
        return 200, "pong", False
    if event != "push":
        return 202, "ignored: not a push", False
    ref = _ref_of(body)
    if ref is None:
        return 400, "push without a ref", False
    if ref != f"refs/heads/{branch}":
        return 202, "ignored: push to another branch", False
    return 202, "push", True


class WebhookServer(BackgroundServer):
    """The receiver on its own daemon thread; `log` gets one record per request."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        secret: bytes,
        branch: str,
        trigger: SyncTrigger,
        log: Callable[[dict[str, Any]], None],
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT

            def _answer(self, status: int, text: str, retry_after: float = 0.0) -> None:
                body = (text + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                if retry_after > 0:
                    self.send_header("Retry-After", str(max(1, round(retry_after + 0.5))))
                if status >= 400:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _record(self, status: int, outcome: str) -> None:
                log(
                    {
                        "event": "webhook",
                        "status": status,
                        "outcome": outcome,
                        "peer": str(self.client_address[0]),
                    }
                )

            def _body(self, length: int) -> bytes | None:
                """The body, read within REQUEST_TIMEOUT in all (not per packet: a client
                sending a byte at a time cannot hold the receiver)."""
                deadline = time.monotonic() + REQUEST_TIMEOUT
                chunks: list[bytes] = []
                left = length
                try:
                    while left > 0 and time.monotonic() < deadline:
                        chunk = self.rfile.read1(min(left, 65536))
                        if not chunk:
                            break
                        chunks.append(chunk)
                        left -= len(chunk)
                except OSError:
                    pass
                if left > 0:
                    self.close_connection = True
                    return None
                return b"".join(chunks)

            def do_POST(self) -> None:
                if self.path.split("?", 1)[0] != PATH:
                    self._record(404, "no such path")
                    self._answer(404, "not found")
                    return
                length = self.headers.get("Content-Length")
                if length is None:
                    self._record(411, "no length")
                    self._answer(411, "length required")
                    return
                if not length.isdigit() or len(length) > 12:
                    self._record(400, "bad length")
                    self._answer(400, "bad Content-Length")
                    return
                if int(length) > MAX_BODY_BYTES:
                    self._record(413, "too large")
                    self._answer(413, f"body over {MAX_BODY_BYTES} bytes")
                    return
                body = self._body(int(length))
                if body is None:
                    self._record(400, "short or slow body")
                    self._answer(400, "body shorter than Content-Length, or too slow")
                    return
                wanted = ("X-GitHub-Event", GITHUB_SIGNATURE_HEADER, SIGNATURE_HEADER)
                headers = {k: v for k in wanted if (v := self.headers.get(k)) is not None}
                status, outcome, fire = judge(secret, branch, headers, body)
                retry_after = 0.0
                if fire:
                    status, said, retry_after = trigger.request()
                    outcome = f"{outcome}: {said}"
                self._record(status, outcome)
                self._answer(status, outcome, retry_after)

            def do_GET(self) -> None:
                self._answer(405, "POST only")

            def log_message(self, *args: object) -> None:  # our own records, not stderr text
                return

        super().__init__(host, port, Handler, name="webhook")
        self.trigger = trigger

    def stop(self) -> None:
        self.trigger.stop()
        super().stop()


def serve(
    listen: str,
    secret_file: str | None,
    *,
    branch: str,
    min_interval: float,
    fire: Callable[[], None],
    log: Callable[[dict[str, Any]], None],
) -> WebhookServer:
    """The agent's receiver on `listen` (HOST:PORT), started."""
    from reconciler.agent.config import parse_listen
    from reconciler.hmacsig import WEBHOOK_SECRET_ENV, load_secret

    host, port = parse_listen(listen, "listen-webhook")
    secret = load_secret(secret_file, WEBHOOK_SECRET_ENV)
    server = WebhookServer(
        host,
        port,
        secret=secret,
        branch=branch,
        trigger=SyncTrigger(fire, min_interval),
        log=log,
    )
    server.start()
    return server
