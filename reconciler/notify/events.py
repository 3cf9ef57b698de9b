"""What a cell's status says, as a notice to send: pure, from a schema-checked status header.

A cell's commit status lives on the revision it is about:

* a head the agent refused (`refused:`) -> `failure` on that head, with the refusal's reason;
* `Ready=False` (enforcement failed, the source is unreachable...) -> `failure` on the
  revision it last attempted (else observed, else applied);
* `Ready=True` with the head applied -> `success` on the applied revision;
* anything else (`Ready=Unknown`, reconciling, waiting for a wave or a window, a head not yet
  applied while the old one holds) -> `pending` on the head it has seen.

Everything here comes from a status branch, so: the cell is the branch name held to
`branch.CELL_NAME`; a revision is used only as `<branch>@sha1:<40 lowercase hex>`, and a
status naming anything else (`HEAD`, `../x`, a short SHA) is skipped with a message rather
than posted; reasons and messages are read through `clip` (control characters escaped, cut
before they are escaped, so a 10 MB message costs nothing).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from reconciler.agent.conditions import FALSE, PROGRESSING, READY, TRUE
from reconciler.agent.source import clip
from reconciler.escape import md
from reconciler.status.branch import CELL_NAME
from reconciler.status.document import condition

SUCCESS = "success"
FAILURE = "failure"
PENDING = "pending"
STATES = (SUCCESS, FAILURE, PENDING)
"""GitHub's commit status states that a cell's status maps to (GitHub also has `error`)."""

REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}@sha1:([0-9a-f]{40})$")
"""Flux's revision spelling as the agent writes it; the SHA-1 is the only part posted."""
DESCRIPTION_CHARS = 140
"""GitHub shows a commit status's description on one line; longer ones are refused."""
REASON_CHARS = 64
MESSAGE_CHARS = 1000
TIME_CHARS = 40
_REVISION_FIELDS = ("lastAppliedRevision", "observedRevision", "lastAttemptedRevision")


@dataclass(frozen=True)
class Notice:
    """One cell's state as it is sent: every field already safe to show and bounded."""

    cell: str
    sha: str
    revision: str
    state: str
    ready: str
    reason: str
    message: str
    reported_at: str

    @property
    def context(self) -> str:
        """The commit status's context, one per cell: `asgctl/<cell>`."""
        return f"asgctl/{self.cell}"

    @property
    def fingerprint(self) -> str:
        """What makes a notice new: the revision, the state, Ready and its reason -- not the
        message (a count or a time in it would otherwise notify every interval)."""
        key = "\0".join((self.sha, self.state, self.ready, self.reason))
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def description(self) -> str:
        """GitHub's description: `<reason>: <message>`, at most 140 characters."""
        text = f"{self.reason}: {self.message}" if self.message else self.reason
        return clip(text, DESCRIPTION_CHARS)

    def text(self) -> str:
        """One line for a chat tool, as inline markdown (`escape.md`): no mention, link or
        markup a status branch wrote survives as markup."""
        what = {SUCCESS: "enforces", FAILURE: "failed on", PENDING: "is waiting on"}[self.state]
        line = f"asgctl: cell {self.cell} {what} {self.sha[:12]}: {self.reason}"
        if self.message:
            line += f" - {self.message[:300]}"
        return md(line)

    def payload(self, *, source: str, branch: str, now: str) -> dict[str, Any]:
        """The generic webhook's JSON body."""
        return {
            "event": "cell-status",
            "cell": self.cell,
            "state": self.state,
            "revision": self.revision,
            "sha": self.sha,
            "ready": {"status": self.ready, "reason": self.reason, "message": self.message},
            "reportedAt": self.reported_at,
            "time": now,
            "source": source,
            "branch": branch,
            "text": self.text(),
        }


@dataclass(frozen=True)
class Skipped:
    """A status branch that cannot be notified, and why (already escaped)."""

    cell: str
    why: str


def _sha(revision: str) -> str:
    m = REVISION.match(revision)
    return m.group(1) if m else ""


def notice_of(cell: str, header: dict[str, Any]) -> Notice | Skipped | None:
    """The notice for `cell` (its branch name) from its schema-checked status header; None
    when the cell has seen no revision yet, Skipped when the branch breaks a rule."""
    if not CELL_NAME.match(cell):
        return Skipped(clip(cell, 80), f"cell name must match {CELL_NAME.pattern}")
    revisions: dict[str, str] = {}
    for field in _REVISION_FIELDS:
        value = str(header.get(field) or "")
        if value and not _sha(value):
            return Skipped(cell, f"{field}: {clip(value, 80)} is not <branch>@sha1:<40 hex>")
        revisions[field] = value
    refused = header.get("refused") or {}
    refused_rev = str(refused.get("revision") or "")
    if refused_rev and not _sha(refused_rev):
        return Skipped(
            cell, f"refused.revision: {clip(refused_rev, 80)} is not <branch>@sha1:<40 hex>"
        )
    ready = condition(header, READY)
    applied = revisions["lastAppliedRevision"]
    observed = revisions["observedRevision"]
    attempted = revisions["lastAttemptedRevision"]
    reason, message = ready.reason, ready.message
    if refused_rev:
        state, revision = FAILURE, refused_rev
        reason = str(refused.get("reason") or reason)
        message = str(refused.get("message") or "")
    elif ready.status == FALSE and ready.reason != PROGRESSING:
        state, revision = FAILURE, attempted or observed or applied
    elif ready.status == TRUE and applied and observed in ("", applied):
        state, revision = SUCCESS, applied
    else:
        state, revision = PENDING, observed or attempted or applied
    if not revision:
        return None
    return Notice(
        cell=cell,
        sha=_sha(revision),
        revision=revision,
        state=state,
        ready=ready.status if ready.status in (TRUE, FALSE) else "Unknown",
        reason=clip(reason, REASON_CHARS) or "Unknown",
        message=clip(message, MESSAGE_CHARS),
        reported_at=clip(str(header.get("reportedAt") or ""), TIME_CHARS),
    )
