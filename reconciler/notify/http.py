"""One JSON POST with GitHub's rules for retrying, and errors that say what to do.

GitHub documents (docs.github.com, "Rate limits for the REST API"): a 403 or 429 with
`retry-after` means wait that many seconds; with `x-ratelimit-remaining: 0`, wait until
`x-ratelimit-reset` (epoch seconds); a 429 with neither, wait at least a minute, longer each
time.  A 5xx or a connection that fails is retried with capped exponential back-off.  What
cannot get better by waiting stops at once: 401 (the token is refused), 403 without a rate
limit (the token may not do this), 404 (no such repository, or the token cannot see it);
and a 4xx about the request itself (422: no such commit) is that notice's problem alone.

Redirects are never followed: urllib would send the `Authorization` header on to wherever a
redirect points.  A wait longer than `Retry.max_wait` is not slept: the notice is left for
the next run.  The body of an answer is read up to 64 KB and only its `message` is shown,
escaped and cut; no request header (the token) is ever part of an error.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime

from reconciler.agent.core import backoff
from reconciler.agent.source import clip
from reconciler.sources import jsonsafe

MAX_ANSWER_BYTES = 64 * 1024
FATAL = "fatal"
"""Nothing else will get through either (bad token, no such repository, unreachable)."""
REJECTED = "rejected"
"""This request is refused for what it says (e.g. 422); retrying it cannot help."""
TRANSIENT = "transient"
"""Retries ran out or the wait is too long; the next run tries again."""


class DeliveryError(Exception):
    """A POST that did not succeed: `kind` is FATAL, REJECTED or TRANSIENT."""

    def __init__(self, kind: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class Retry:
    """How hard to try: attempts per request, back-off base and cap, the longest single wait
    worth sleeping (longer: left for the next run), and the minimum wait after a bare 429."""

    attempts: int = 5
    base: float = 1.0
    cap: float = 30.0
    max_wait: float = 120.0
    rate_limit_floor: float = 60.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class Answer:
    """A successful answer: its status and (the start of) its body."""

    status: int
    body: bytes


def _message(body: bytes) -> str:
    """The `message` of a JSON error body (GitHub's shape), else the start of the text."""
    text = body.decode("utf-8", "replace")
    try:
        doc = jsonsafe.loads(text, "answer")
    except ValueError:
        return clip(text.strip(), 200)
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return clip(doc["message"], 200)
    return clip(text.strip(), 200)


def _number(headers: Message, name: str) -> float | None:
    value = (headers.get(name) or "").strip()
    try:
        return float(value) if value else None
    except ValueError:
        return None


def rate_limit_wait(
    status: int, headers: Message, failures: int, retry: Retry, now: float
) -> float | None:
    """Seconds to wait before retrying a 403/429 that is a rate limit; None when it is not one."""
    after = (headers.get("Retry-After") or "").strip()
    if after:
        if after.isdigit():
            return float(after)
        try:
            return max(0.0, parsedate_to_datetime(after).timestamp() - now)
        except (TypeError, ValueError):
            pass
    if (headers.get("x-ratelimit-remaining") or "").strip() == "0":
        reset = _number(headers, "x-ratelimit-reset")
        return max(0.0, reset - now) if reset is not None else retry.rate_limit_floor
    if status == 429:
        return max(retry.rate_limit_floor, backoff(failures, retry.base, retry.cap))
    return None


def post_json(
    url: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    what: str,
    timeout: float = 30.0,
    retry: Retry = Retry(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Answer:
    """POST `payload` (JSON) to `url`; the answer, or DeliveryError (see the module docstring).

    `what` names the target in messages (e.g. `GitHub https://api.github.com`), never the URL
    itself, which may carry a secret (a chat tool's incoming-webhook URL).
    """
    last = ""
    for attempt in range(1, retry.attempts + 1):
        request = urllib.request.Request(url, data=payload, method="POST")
        request.add_header("Content-Type", "application/json")
        for name, value in headers.items():
            request.add_header(name, value)
        wait: float | None
        try:
            with _OPENER.open(request, timeout=timeout) as resp:
                return Answer(resp.status, resp.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            status = exc.code
            body = exc.read(MAX_ANSWER_BYTES) if exc.fp is not None else b""
            said = _message(body)
            last = f"{status} {said}".strip()
            if 300 <= status < 400:
                raise DeliveryError(
                    FATAL, f"{what} answered a redirect ({status}); not followed", status
                ) from None
            if status in (403, 429):
                wait = rate_limit_wait(status, exc.headers, attempt, retry, clock())
                if wait is None:
                    raise DeliveryError(
                        FATAL, f"{what}: 403 forbidden ({said}): the token may not do this", status
                    ) from None
            elif status == 401:
                raise DeliveryError(
                    FATAL, f"{what}: 401 unauthorized ({said}): the token was refused", status
                ) from None
            elif status == 404:
                raise DeliveryError(
                    FATAL,
                    f"{what}: 404 not found ({said}): no such repository or path, "
                    "or the token cannot see it",
                    status,
                ) from None
            elif status >= 500:
                wait = backoff(attempt, retry.base, retry.cap)
            else:
                raise DeliveryError(REJECTED, f"{what}: {last}", status) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            last = f"unreachable: {clip(str(reason), 200)}"
            wait = backoff(attempt, retry.base, retry.cap)
        if attempt == retry.attempts:
            break
        if wait > retry.max_wait:
            raise DeliveryError(
                TRANSIENT, f"{what}: {last}; asked to wait {wait:.0f}s, left for the next run"
            )
        sleep(wait)
    if last.startswith("unreachable"):
        raise DeliveryError(FATAL, f"{what}: {last} (after {retry.attempts} attempts)")
    raise DeliveryError(TRANSIENT, f"{what}: {last} (after {retry.attempts} attempts)")
