"""Which source a revision came from: the policy repository and branch, as an identity.

The agent remembers the revision it applied, and a new head must descend from it: in the
same repository.  Pointed at another one (a move to a new git server), "does the head descend
from what we applied?" has no answer, and the old revision must not be mistaken for history
the new branch rewound.  So the applied revision carries the source it came from, and a cell
whose configured source differs starts afresh -- logged and reported -- while the rules the
kernel holds stay the baseline of the mass-revoke gate (`reconciler.agent.cycle`).

A source's identity is its URL normalised so that what does not change the repository does
not change the identity (`normalise_url`):

* credentials and an SSH user are dropped: a rotated token is the same source;
* scheme and host are lower-cased, a scheme's default port is dropped;
* `git+ssh://`, `ssh+git://` and scp-like `user@host:path` are `ssh://host/path`;
* trailing slashes and one `.git` suffix are dropped, doubled slashes collapsed;
* a local path is `file://` and the path with `.` and `..` resolved as text.

The scheme, host, port and path stay: `https://` and `ssh://` to one host are two sources
here, which is harmless, because a new source that does hold the applied commit (the same
repository, or a mirror of it) must still descend from it; only a source without the applied
commit starts without an ancestry check -- and not even then when the head it serves is, by
the old source's kept history, an ancestor of the applied commit (a mirror that is behind:
a rewind, docs/fleet.md).  Pure: no I/O.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.agent.config import redact_url

_DEFAULT_PORTS = {"http": "80", "https": "443", "ssh": "22", "git": "9418"}
_SSH_SCHEMES = ("git+ssh", "ssh+git")
MAX_URL_CHARS = 2048
"""A stored URL longer than this is not a URL the agent wrote: read as no source at all."""
MAX_BRANCH_CHARS = 256


def normalise_url(url: str) -> str:
    """The identity of a repository URL (see the module docstring); never raises."""
    text = url.strip()
    if "://" not in text:
        first_colon, first_slash = text.find(":"), text.find("/")
        if first_colon > 0 and (first_slash < 0 or first_colon < first_slash):
            # scp-like: [user@]host:path
            host_part, _, path = text.partition(":")
            text = f"ssh://{host_part}/{path.lstrip('/')}"
        else:
            text = f"file://{text}"
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme in _SSH_SCHEMES:
        scheme = "ssh"
    authority, slash, path = rest.partition("/")
    path = slash + path
    host = authority.rpartition("@")[2].lower()
    name, colon, port = host.rpartition(":")
    if colon and not host.endswith("]") and port == _DEFAULT_PORTS.get(scheme):
        host = name
    path = re.sub(r"/+", "/", path)
    if scheme == "file" and path:
        path = posixpath.normpath(path)
    path = path.rstrip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")].rstrip("/")
    return f"{scheme}://{host}{path}"


@dataclass(frozen=True, slots=True)
class SourceRef:
    """A policy branch of a repository: equal when the normalised URL and branch are.

    `url` is the configured URL with its credentials redacted (what status and logs show,
    and what the state file keeps); `key` is its identity.
    """

    key: str
    branch: str
    url: str = field(compare=False)

    @classmethod
    def of(cls, url: str, branch: str) -> SourceRef:
        shown = redact_url(url)
        return cls(normalise_url(shown), branch, shown)

    @property
    def cache_id(self) -> str:
        """What a fetch cache is tagged with, so it never serves two sources."""
        return f"{self.key}#{self.branch}"

    def to_dict(self) -> dict[str, str]:
        return {"url": self.url, "branch": self.branch}

    @classmethod
    def from_dict(cls, data: object) -> SourceRef | None:
        """A stored source, or None when it is missing or not what the agent writes.

        None reads as "the configured source" (a state file from before sources were kept):
        a damaged entry can make the agent check ancestry, never skip the check.
        """
        if not isinstance(data, Mapping):
            return None
        url, branch = data.get("url"), data.get("branch")
        if not isinstance(url, str) or not isinstance(branch, str):
            return None
        if not url.strip() or not branch or len(url) > MAX_URL_CHARS:
            return None
        if len(branch) > MAX_BRANCH_CHARS:
            return None
        return cls.of(url, branch)


def moved(applied_from: SourceRef | None, current: SourceRef) -> bool:
    """The applied revision came from another source than the configured one.

    None (not recorded) is the configured source: an upgrade is not a move."""
    return applied_from is not None and applied_from != current


@dataclass(frozen=True, slots=True)
class SourceChange:
    """The last time the configured source differed from the one the applied revision came
    from: what was enforced then, from where, and since when the new source is configured."""

    old: SourceRef
    new: SourceRef
    at: str
    revision: str
    """The sha the cell enforced when the change was seen ("" when nothing was applied)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.old.to_dict(),
            "to": self.new.to_dict(),
            "at": self.at,
            "revision": self.revision,
        }

    @classmethod
    def from_dict(cls, data: object) -> SourceChange | None:
        if not isinstance(data, Mapping):
            return None
        old, new = SourceRef.from_dict(data.get("from")), SourceRef.from_dict(data.get("to"))
        at, revision = data.get("at"), data.get("revision")
        if old is None or new is None or not isinstance(at, str):
            return None
        if not isinstance(revision, str) or not re.fullmatch(r"(?:[0-9a-f]{40,64})?", revision):
            return None
        return cls(old, new, at[:64], revision)
