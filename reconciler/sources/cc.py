"""The Cloud Controller v3 API and its UAA, read the way the cf CLI reads them.

`asgctl cf sync` is the only caller: it lists orgs, spaces, apps and security groups.  What
this module holds to, and why:

* Auth is a UAA client's `client_credentials` grant: the UAA is found from the API's root
  document (`GET /`, `links.uaa`, else `links.login`), the token is sent as
  `Authorization: bearer ...`, fetched again shortly before `expires_in` runs out, and once
  more when the Cloud Controller answers 401 (a token revoked or expired early).  UAA gives
  client_credentials no refresh token, so "refresh" is a new grant, as the cf CLI does it.
* The secret and the token never appear in anything this module says: every message is
  built by us and passed through `_redact`, and the server's own words are clipped and
  escaped before they are quoted.
* The network is not trusted even when the Cloud Controller is: bodies are capped
  (`MAX_BODY_BYTES`), JSON goes through the one safe reader (`jsonsafe`), a listing is bounded
  in pages and resources and may not loop, and a `pagination.next` link must stay on the API's
  own origin and path (a link elsewhere would carry the bearer token to another host).
  Redirects are not followed, for the same reason.
* 429 and 5xx are retried with exponential back-off, honouring `Retry-After` (Cloud
  Controller's rate limiter sends it: cloud_controller_ng middleware/mixins/
  too_many_requests.rb:4-10); a connection that fails is retried the same way, then reported
  as unreachable.  401 (after one new token), 403 and TLS failures are reported at once, each
  with what to do about it.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from reconciler.escape import visible
from reconciler.sources import jsonsafe

__all__ = [
    "MAX_BODY_BYTES",
    "PER_PAGE",
    "CCError",
    "Client",
    "Progress",
]

T = TypeVar("T")

PER_PAGE = 5000  # the largest page CC grants (docs/v3 .../security_groups/_list.md.erb:38)
MAX_BODY_BYTES = 64 * 1024 * 1024  # a page of 5,000 apps with all their fields is ~10 MiB
MAX_PAGES = 100_000  # per listing; 2,000,000 resources at 20 a page
MAX_RESOURCES = 2_000_000  # per listing: ten times the largest foundation we know of
LISTING_ATTEMPTS = 3  # passes over a listing that keeps changing while it is paged
MAX_ATTEMPTS = 6  # per request: 1 + 5 retries, ~1 minute of back-off before giving up
MAX_RETRY_AFTER = 120.0  # a server asking for more is not waited for: the sync fails instead
TOKEN_MARGIN = 30.0  # seconds before expiry at which a token is renewed, as the cf CLI does
TIMEOUT = 60.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_USER_AGENT = "asgctl-cf-sync"


class CCError(Exception):
    """Why reading Cloud Foundry failed, in words an operator can act on (never a secret)."""


@dataclass(frozen=True)
class Progress:
    """One page read: which listing, how far, for the terminal's progress line."""

    kind: str
    page: int
    total_pages: int | None
    resources: int
    total_results: int | None


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"


def _parse_url(url: str, what: str) -> tuple[_Origin, str, str]:
    """(origin, path, query) of an absolute http(s) URL; CCError if it is anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CCError(f"{what} {visible(url)!s} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CCError(f"{what} {visible(url)} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise CCError(f"{what} must not carry credentials in the URL")
    if parts.fragment:
        raise CCError(f"{what} {visible(url)} must not have a #fragment")
    origin = _Origin(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))
    return origin, parts.path, parts.query


def _clip(text: str, limit: int = 200) -> str:
    text = visible(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(value: str | None, now: Callable[[], float]) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())


class Client:
    """A Cloud Controller session: discovery, token, paginated listings.

    `sleep` and `wall` are the clock the back-off uses (`time.sleep`, `time.time`); `clock`
    (monotonic) judges token expiry.  `warn` receives the warnings (plain http, TLS checks
    off) as one line each.  One client holds at most one connection per origin, kept alive.
    """

    def __init__(
        self,
        api: str,
        client_id: str,
        client_secret: str,
        *,
        ca_cert: str | None = None,
        skip_ssl_validation: bool = False,
        timeout: float = TIMEOUT,
        max_body: int = MAX_BODY_BYTES,
        warn: Callable[[str], None] = lambda _m: None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not client_id:
            raise CCError("no UAA client id: give --client-id or set ASGCTL_CF_CLIENT_ID")
        if not client_secret:
            raise CCError("no UAA client secret: set ASGCTL_CF_CLIENT_SECRET")
        self._secret = client_secret
        self._client_id = client_id
        self._token: str | None = None
        self._expires_at = 0.0
        self._timeout = timeout
        self._max_body = max_body
        self._warn = warn
        self._sleep = sleep
        self._clock = clock
        self._wall = wall
        self._connections: dict[_Origin, http.client.HTTPConnection] = {}
        api = api.rstrip("/")
        self.api_origin, self._api_path, query = _parse_url(api, "--api")
        if query:
            raise CCError(f"--api {visible(api)} must not have a ?query")
        self.api = api
        self._uaa: str | None = None
        self._ssl = self._ssl_context(ca_cert, skip_ssl_validation)
        if self.api_origin.scheme == "http":
            warn(
                f"{self.api_origin} is plain http: the client secret, the token and what CF "
                "says travel unencrypted and unauthenticated; use it only for tests and labs"
            )

    # -- TLS ------------------------------------------------------------------------------

    def _ssl_context(self, ca_cert: str | None, skip: bool) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if ca_cert is not None:
            try:
                context.load_verify_locations(cafile=ca_cert)
            except (OSError, ssl.SSLError) as exc:
                raise CCError(f"--ca-cert {visible(ca_cert)}: cannot load it: {exc}") from None
        if skip:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._warn(
                "--skip-ssl-validation: the Cloud Controller's and UAA's certificates are not "
                "checked, so anyone on the path can read the token and feed the sync"
            )
        return context

    # -- plumbing -------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in (self._secret, self._token):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def _fail(self, message: str) -> CCError:
        return CCError(self._redact(message))

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self, origin: _Origin) -> http.client.HTTPConnection:
        connection = self._connections.get(origin)
        if connection is None:
            if origin.scheme == "https":
                connection = http.client.HTTPSConnection(
                    origin.host, origin.port, timeout=self._timeout, context=self._ssl
                )
            else:
                connection = http.client.HTTPConnection(
                    origin.host, origin.port, timeout=self._timeout
                )
            self._connections[origin] = connection
        return connection

    def _drop(self, origin: _Origin) -> None:
        connection = self._connections.pop(origin, None)
        if connection is not None:
            connection.close()

    def _once(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One exchange; OSError (including TLS errors) propagates to the retry loop."""
        origin, path, query = _parse_url(url, "URL")
        target = (path or "/") + (f"?{query}" if query else "")
        connection = self._connection(origin)
        try:
            connection.request(method, target, body=body, headers=dict(headers))
            response = connection.getresponse()
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self._max_body:
                raise self._fail(
                    f"{method} {_clip(url)}: the response is {int(length)} bytes, more than "
                    f"{self._max_body}"
                )
            data = response.read(self._max_body + 1)
            if len(data) > self._max_body:
                raise self._fail(
                    f"{method} {_clip(url)}: the response is larger than {self._max_body} bytes"
                )
            if response.will_close:
                self._drop(origin)
            return response.status, response.headers, data
        except BaseException:
            self._drop(origin)
            raise

    def _exchange(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """`_once` with retries: 429/5xx and connection failures back off and try again."""
        origin = _parse_url(url, "URL")[0]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            last = attempt == MAX_ATTEMPTS
            backoff = min(0.5 * 2 ** (attempt - 1), 30.0)
            try:
                status, reply_headers, data = self._once(method, url, headers, body)
            except ssl.SSLCertVerificationError as exc:
                raise self._fail(
                    f"TLS: the certificate of {origin} is not trusted ({exc.verify_message}); "
                    "give its CA with --ca-cert FILE (or, for a lab only, --skip-ssl-validation)"
                ) from None
            except ssl.SSLError as exc:
                raise self._fail(f"TLS with {origin} failed: {exc.reason or exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                if isinstance(exc, socket.gaierror) or last:
                    raise self._fail(
                        f"cannot reach {origin} ({_clip(str(reason))}); check --api and the network"
                    ) from None
                self._sleep(backoff)
                continue
            if status in _RETRY_STATUSES and not last:
                wait = _retry_after(reply_headers.get("Retry-After"), self._wall)
                if wait is not None and wait > MAX_RETRY_AFTER:
                    raise self._fail(
                        f"{method} {_clip(url)}: {status} with Retry-After {wait:.0f} s, longer "
                        f"than the {MAX_RETRY_AFTER:.0f} s the sync waits; try again later"
                    )
                self._sleep(backoff if wait is None else wait)
                continue
            return status, reply_headers, data
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, url: str, data: bytes, *, strict: bool = False) -> Any:
        try:
            return jsonsafe.loads(data, _clip(url, 120), reject_duplicate_keys=strict)
        except jsonsafe.JsonInputError as exc:
            raise self._fail(str(exc)) from None

    def _status_error(self, method: str, url: str, status: int, data: bytes) -> CCError:
        """A clear message for a response we cannot use, quoting CC's error title/detail."""
        said = ""
        try:
            doc = jsonsafe.loads(data, "response")
        except jsonsafe.JsonInputError:
            doc = None
        if isinstance(doc, Mapping):
            errors = doc.get("errors")
            first = errors[0] if isinstance(errors, list) and errors else doc
            if isinstance(first, Mapping):
                words = [
                    str(first[k])
                    for k in ("title", "detail", "error", "error_description")
                    if isinstance(first.get(k), str)
                ]
                said = f": {_clip(' - '.join(words))}" if words else ""
        where = f"{method} {_clip(url)}"
        if status == 401:
            return self._fail(
                f"{where}: 401 Unauthorized{said}; the Cloud Controller refused a fresh token "
                f"of UAA client {self._client_id!r} (is the client known to this foundation's UAA?)"
            )
        if status == 403:
            return self._fail(
                f"{where}: 403 Forbidden{said}; UAA client {self._client_id!r} may not read this: "
                "give it the cloud_controller.admin_read_only or cloud_controller.global_auditor "
                "authority"
            )
        if 300 <= status < 400:
            return self._fail(
                f"{where}: {status} redirect, not followed (it could carry the token)"
            )
        return self._fail(f"{where}: HTTP {status}{said}")

    # -- auth -----------------------------------------------------------------------------

    def uaa_url(self) -> str:
        """The UAA's URL from the API root (`links.uaa`, else `links.login`)."""
        if self._uaa is not None:
            return self._uaa
        url = f"{self.api}/"
        status, _, data = self._exchange("GET", url, {"Accept": "application/json"})
        if status != 200:
            raise self._status_error("GET", url, status, data)
        root = self._json(url, data)
        links = root.get("links") if isinstance(root, Mapping) else None
        for key in ("uaa", "login"):
            link = links.get(key) if isinstance(links, Mapping) else None
            href = link.get("href") if isinstance(link, Mapping) else None
            if isinstance(href, str) and href:
                origin = _parse_url(href, f"links.{key} of {self.api}/")[0]
                if origin.scheme == "http" and self.api_origin.scheme == "https":
                    raise self._fail(
                        f"links.{key} of {self.api}/ is plain http ({_clip(href)}): the client "
                        "secret would travel unencrypted; refusing"
                    )
                self._uaa = href.rstrip("/")
                return self._uaa
        raise self._fail(
            f"GET {url}: the root document names no UAA (links.uaa or links.login); "
            "is --api the Cloud Controller's URL?"
        )

    def _new_token(self) -> str:
        url = f"{self.uaa_url()}/oauth/token"
        basic = base64.b64encode(f"{self._client_id}:{self._secret}".encode()).decode("ascii")
        headers = {
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        body = urlencode({"grant_type": "client_credentials"}).encode()
        status, _, data = self._exchange("POST", url, headers, body)
        if status in (400, 401):
            raise self._fail(
                f"UAA at {self.uaa_url()} refused the client credentials of {self._client_id!r} "
                f"(HTTP {status}); check ASGCTL_CF_CLIENT_ID / --client-id and "
                "ASGCTL_CF_CLIENT_SECRET"
            )
        if status != 200:
            raise self._status_error("POST", url, status, data)
        doc = self._json(url, data)
        token = doc.get("access_token") if isinstance(doc, Mapping) else None
        kind = doc.get("token_type", "bearer") if isinstance(doc, Mapping) else None
        if (
            not isinstance(token, str)
            or not token
            or not token.isascii()
            or not token.isprintable()
        ):
            raise self._fail(f"POST {url}: the answer holds no usable access_token")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise self._fail(f"POST {url}: token_type {_clip(str(kind))!r} is not bearer")
        expires = doc.get("expires_in")
        lifetime = float(expires) if isinstance(expires, int) and expires > 0 else 600.0
        self._token = token
        self._expires_at = self._clock() + lifetime
        return token

    def _bearer(self) -> str:
        if self._token is None or self._clock() >= self._expires_at - TOKEN_MARGIN:
            return self._new_token()
        return self._token

    def get(self, url: str, *, strict: bool = False) -> Any:
        """GET a Cloud Controller URL as JSON, with a token (renewed once on 401)."""
        for renewed in (False, True):
            headers = {
                "Authorization": f"bearer {self._bearer()}",
                "Accept": "application/json",
                "User-Agent": _USER_AGENT,
            }
            status, _, data = self._exchange("GET", url, headers)
            if status == 401 and not renewed:
                self._token = None  # expired or revoked early: one new grant, then judge
                continue
            if status != 200:
                raise self._status_error("GET", url, status, data)
            return self._json(url, data, strict=strict)
        raise AssertionError("unreachable")

    # -- listings -------------------------------------------------------------------------

    def list_all(
        self,
        path: str,
        pick: Callable[[Mapping[str, Any]], T],
        *,
        strict: bool = False,
        progress: Callable[[Progress], None] = lambda _p: None,
    ) -> list[T]:
        """Every resource of a v3 listing (`/v3/apps`), each kept as `pick` makes it.

        Asks for `PER_PAGE` and follows `pagination.next` whatever page size the server
        grants (docs/v3/source/includes/concepts/_pagination.md.erb:9-22).  Pages are offsets,
        so a resource created or deleted while the listing is paged can shift another one
        past us unseen: every page must report the same `total_results` and the listing must
        hold that many distinct GUIDs, else it is read again from the start (up to
        `LISTING_ATTEMPTS` times) and then refused -- a sync must not write half a view.
        `strict` refuses duplicate JSON keys (for what becomes policy).
        """
        kind = path.rsplit("/", 1)[-1]
        for attempt in range(1, LISTING_ATTEMPTS + 1):
            out, changed = self._list_once(path, pick, strict, progress)
            if changed is None:
                return out
            if attempt == LISTING_ATTEMPTS:
                raise self._fail(
                    f"{kind} changed while it was read ({changed}), {LISTING_ATTEMPTS} times; "
                    "nothing was written, run the sync again"
                )
        raise AssertionError("unreachable")

    def _list_once(
        self,
        path: str,
        pick: Callable[[Mapping[str, Any]], T],
        strict: bool,
        progress: Callable[[Progress], None],
    ) -> tuple[list[T], str | None]:
        """One pass over a listing, and how it changed meanwhile (None if it did not)."""
        kind = path.rsplit("/", 1)[-1]
        base = f"{self.api}{path}"
        base_path = _parse_url(base, "URL")[1]
        url: str | None = f"{base}?{urlencode({'per_page': PER_PAGE})}"
        seen_urls: set[str] = set()
        guids: set[str] = set()
        out: list[T] = []
        totals: set[int | None] = set()
        page = 0
        while url is not None:
            page += 1
            if page > MAX_PAGES:
                raise self._fail(f"{kind}: more than {MAX_PAGES} pages; refusing to go on")
            seen_urls.add(url)
            doc = self.get(url, strict=strict)
            if not isinstance(doc, Mapping):
                raise self._fail(f"GET {_clip(url)}: not a v3 list (a JSON object)")
            resources = doc.get("resources")
            pagination = doc.get("pagination")
            if not isinstance(resources, list) or not isinstance(pagination, Mapping):
                raise self._fail(f"GET {_clip(url)}: not a v3 list (no resources / pagination)")
            for index, resource in enumerate(resources):
                if not isinstance(resource, Mapping):
                    raise self._fail(f"GET {_clip(url)}: resources[{index}] is not an object")
                guid = resource.get("guid")
                if not isinstance(guid, str):
                    raise self._fail(f"GET {_clip(url)}: resources[{index}] has no guid string")
                if guid in guids:
                    continue  # a page boundary moved under a concurrent change; judged below
                guids.add(guid)
                out.append(pick(resource))
            if len(guids) > MAX_RESOURCES:
                raise self._fail(f"{kind}: more than {MAX_RESOURCES} resources; refusing")
            total = pagination.get("total_results")
            total_results = total if isinstance(total, int) and total >= 0 else None
            totals.add(total_results)
            pages = pagination.get("total_pages")
            progress(
                Progress(
                    kind,
                    page,
                    pages if isinstance(pages, int) else None,
                    len(out),
                    total_results,
                )
            )
            url = self._next(pagination, base_path, url, seen_urls)
        counted = sorted(t for t in totals if t is not None)
        if len(totals) > 1:
            return out, f"its pages counted {', '.join(map(str, counted))}"
        if counted and counted[0] != len(guids):
            return out, f"{len(guids)} read, the Cloud Controller counts {counted[0]}"
        return out, None

    def _next(
        self, pagination: Mapping[str, Any], base_path: str, current: str, seen: set[str]
    ) -> str | None:
        link = pagination.get("next")
        if link is None:
            return None
        href = link.get("href") if isinstance(link, Mapping) else None
        if not isinstance(href, str):
            raise self._fail(f"GET {_clip(current)}: pagination.next has no href")
        origin, path, _ = _parse_url(href, "pagination.next")
        if origin != self.api_origin or path != base_path:
            raise self._fail(
                f"GET {_clip(current)}: pagination.next points at {_clip(href)}, not at "
                f"{self.api_origin}{base_path}; not followed (it would carry the token there)"
            )
        if href in seen:
            raise self._fail(f"GET {_clip(current)}: pagination.next loops back to {_clip(href)}")
        return href
