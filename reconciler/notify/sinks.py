"""Where notices go: GitHub's commit statuses, and a generic signed webhook.

Both are the operator's choice, given on the command line or in the environment, never read
from a status branch: a hostile branch names neither the repository, nor the API, nor the
URL, and the SHA a status is posted on is checked again here to be 40 hex digits, so it is
one path segment that cannot climb (`../`) to another endpoint.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reconciler.hmacsig import SIGNATURE_HEADER, sign
from reconciler.notify.events import Notice
from reconciler.notify.http import Retry, post_json

GITHUB_API = "https://api.github.com"
API_VERSION = "2022-11-28"
_REPO = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
USER_AGENT = "asgctl-notify"


class SinkError(ValueError):
    """A sink's settings cannot be used; the message names the setting."""


def check_http_url(url: str, setting: str) -> str:
    """An http(s) URL with a host, no credentials in it, no fragment; trailing `/` dropped."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SinkError(f"{setting}: expected an http(s) URL with a host")
    if parts.username or parts.password:
        raise SinkError(f"{setting}: credentials do not belong in the URL (use the env var)")
    if parts.fragment:
        raise SinkError(f"{setting}: no #fragment")
    return url.rstrip("/")


def shown_url(url: str) -> str:
    """`scheme://host[:port]` only: a chat tool's webhook URL is often itself the secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _checked_sha(sha: str) -> str:
    if not _SHA1.match(sha):  # events.REVISION already holds to this; never trust one check
        raise ValueError(f"not a 40-hex commit: {sha[:80]!r}")
    return sha


@dataclass(frozen=True)
class GitHubStatuses:
    """`POST {api}/repos/{owner}/{repo}/statuses/{sha}` with a bearer token."""

    repo: str
    token: str = field(repr=False)
    api: str = GITHUB_API
    target_url: str = ""
    """A link for each status; `{cell}` and `{sha}` are filled in (cell names are held to
    `branch.CELL_NAME`, SHAs to 40 hex), e.g. the cell's dashboard."""

    def __post_init__(self) -> None:
        if not _REPO.match(self.repo) or any(p in (".", "..") for p in self.repo.split("/")):
            raise SinkError(f"--repo: expected OWNER/NAME, got {self.repo[:100]!r}")
        if not self.token:
            raise SinkError("GitHub token: empty (set GITHUB_TOKEN)")
        object.__setattr__(self, "api", check_http_url(self.api, "--github-api"))
        if self.target_url:
            check_http_url(
                self.target_url.replace("{cell}", "c").replace("{sha}", "0"), "--target-url"
            )

    @property
    def name(self) -> str:
        return f"GitHub {shown_url(self.api)}"

    def url_for(self, sha: str) -> str:
        owner, name = self.repo.split("/")
        path = "/".join(urllib.parse.quote(p, safe="") for p in (owner, name))
        return f"{self.api}/repos/{path}/statuses/{_checked_sha(sha)}"

    def body(self, notice: Notice) -> dict[str, str]:
        """The fields GitHub documents: state, target_url, description, context."""
        out = {
            "state": notice.state,
            "description": notice.description,
            "context": notice.context,
        }
        if self.target_url:
            out["target_url"] = self.target_url.replace(
                "{cell}", urllib.parse.quote(notice.cell, safe="")
            ).replace("{sha}", _checked_sha(notice.sha))
        return out

    def send(
        self,
        notice: Notice,
        *,
        retry: Retry,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        post_json(
            self.url_for(notice.sha),
            json.dumps(self.body(notice)).encode(),
            {
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": USER_AGENT,
            },
            what=self.name,
            retry=retry,
            sleep=sleep,
            clock=clock,
        )


@dataclass(frozen=True)
class Webhook:
    """A JSON POST per notice, signed `X-Asgctl-Signature-256: sha256=<hex>` (HMAC-SHA256 of
    the exact body with the shared secret, GitHub's convention), for chat tools and bridges."""

    url: str = field(repr=False)
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_http_url(self.url, "--webhook"))
        if not self.secret:
            raise SinkError("webhook secret: empty")

    @property
    def name(self) -> str:
        return f"webhook {shown_url(self.url)}"

    def body(self, notice: Notice, *, source: str, branch: str, now: str) -> bytes:
        doc: dict[str, Any] = notice.payload(source=source, branch=branch, now=now)
        return json.dumps(doc, ensure_ascii=True, sort_keys=True).encode()

    def send(
        self,
        notice: Notice,
        *,
        source: str,
        branch: str,
        now: str,
        retry: Retry,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        body = self.body(notice, source=source, branch=branch, now=now)
        post_json(
            self.url,
            body,
            {
                SIGNATURE_HEADER: sign(self.secret, body),
                "X-Asgctl-Event": "cell-status",
                "X-Asgctl-Delivery": notice.fingerprint,
                "User-Agent": USER_AGENT,
            },
            what=self.name,
            retry=retry,
            sleep=sleep,
            clock=clock,
        )
