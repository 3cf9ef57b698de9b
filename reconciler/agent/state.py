"""What an agent knows between cycles, and the part of it that survives a restart.

`AgentState` is a frozen value: a cycle builds the next one, it never edits the current one,
so a cycle that dies half-way (an exception, SIGKILL) leaves the last consistent state behind.
The persisted subset (`state.json` in the state directory, written by rename) is what a
restarted or `--once` agent needs to keep its promises: the applied revision (rewinds are
measured against it) and the source it came from (`reconciler.agent.sourceid`: another
source is a fresh start, not a rewind), the inventory it was applied with (to tell the next
change from drift and to log only real changes), the last source change, the conditions'
transition times, history and drift counts.

The file is the agent's own, but it is read as untrusted all the same: whatever is damaged
is dropped, and a damaged source entry reads as the configured source, so it can make the
agent check ancestry, never skip the check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.agent.core import HistoryEntry, PolicyTestReport, Problem, Refusal
from reconciler.agent.rollout import Soaking
from reconciler.agent.sourceid import SourceChange, SourceRef
from reconciler.agent.verify import SignatureCheck
from reconciler.atomicfile import atomic_write_text
from reconciler.core.cellplan import CellPlan
from reconciler.core.model import Container, PolicySet
from reconciler.sources.cellstore import (
    InventoryError,
    Rejection,
    parse_store_document,
    store_document,
)
from reconciler.sources.gitio import FULL_SHA
from reconciler.status.document import Condition

STATE_VERSION = 1
"""An applied revision is a commit id; anything else in its place is not ours to pass to git."""
DRIFT_LOG_LIMIT = 10


@dataclass(frozen=True)
class Applied:
    """The revision the kernel holds: its plan, and the policy and inventory it came from.

    `policy` and `plan` are None after a restart until the revision is loaded again from the
    cache; the sha alone is enough to protect against rewinds.
    """

    sha: str
    digest: str
    at: str
    inventory: tuple[Container, ...]
    policy: PolicySet | None = None
    plan: CellPlan | None = None
    source: SourceRef | None = None
    """The source (repository URL, branch) the revision was fetched from; None in a state
    written before sources were kept, which is the configured one (an upgrade is not a move)."""


@dataclass(frozen=True)
class Head:
    """The branch head last fetched and what was decided about it."""

    sha: str
    subject: str = ""
    signature: SignatureCheck | None = None
    verdict: Refusal | None = None
    """Why it is not applied; None when it passed every gate."""
    policy: PolicySet | None = None
    emergency: bool = False
    """The commit carries the emergency trailer (`emergency-trailer: true`): change windows
    do not hold it back (`reconciler.agent.rollout`)."""
    tests: PolicyTestReport | None = None
    """Its PolicyTests' outcome; None when they were not run (`policy-tests: off`, or a gate
    before them refused the head)."""


@dataclass(frozen=True)
class AgentState:
    applied: Applied | None = None
    head: Head | None = None
    attempted: str | None = None
    inventory: tuple[Container, ...] | None = None
    inventory_error: str | None = None
    inventory_at: str = ""
    inventory_rejected: tuple[Rejection, ...] = ()
    """Entries of the last good store not used as written (read again each run, not saved)."""
    conditions: tuple[Condition, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    drift_corrections: int = 0
    drift_log: tuple[Mapping[str, Any], ...] = ()
    failures: int = 0
    """Consecutive cycles that failed for a transient reason (sets the retry back-off)."""
    last_sync: str = ""
    last_success: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)
    source_error: Problem | None = None
    enforce_error: Problem | None = None
    backend: str = ""
    foreign_chains: tuple[tuple[int, str], ...] = ()
    """(family, name) of the chains with our prefix that are not ours, as last logged (not
    saved: a restarted agent names them once again)."""
    pinned: Head | None = None
    """The revision the head's Rollout pins the fleet to, judged like a head, while the cell
    is not on it yet (`pause: {revision: ...}`)."""
    hold: Problem | None = None
    """Why the accepted head is not applied yet (its Rollout's waves, pause or windows)."""
    soaking: Soaking = field(default_factory=Soaking)
    """Since when this agent has seen each earlier-wave cell Ready on the head (saved: a
    `--once` agent measures a soak across runs)."""
    source_change: SourceChange | None = None
    """The last change of the configured source seen, for the status (saved)."""


def to_persisted(state: AgentState) -> dict[str, Any]:
    a = state.applied
    return {
        "version": STATE_VERSION,
        "applied": (
            {
                "sha": a.sha,
                "digest": a.digest,
                "at": a.at,
                "store": store_document(a.inventory),
                "source": a.source.to_dict() if a.source is not None else None,
            }
            if a is not None
            else None
        ),
        "attempted": state.attempted,
        "conditions": [c.to_dict() for c in state.conditions],
        "history": [h.to_dict() for h in state.history],
        "driftCorrections": state.drift_corrections,
        "driftLog": list(state.drift_log),
        "lastSuccess": state.last_success,
        "inventoryAt": state.inventory_at,
        "rolloutSoaking": state.soaking.to_dict(),
        "sourceChange": state.source_change.to_dict() if state.source_change else None,
    }


def from_persisted(data: Mapping[str, Any]) -> AgentState:
    """The state a previous run left; anything unreadable is dropped, never guessed."""
    if data.get("version") != STATE_VERSION:
        return AgentState()
    applied = None
    a = data.get("applied")
    if isinstance(a, dict) and isinstance(a.get("sha"), str) and FULL_SHA.fullmatch(a["sha"]):
        try:
            inventory = parse_store_document(a.get("store") or {}, "state.json")
        except InventoryError:
            inventory = ()
        applied = Applied(
            a["sha"],
            str(a.get("digest", "")),
            str(a.get("at", "")),
            inventory,
            source=SourceRef.from_dict(a.get("source")),
        )
    return AgentState(
        applied=applied,
        # The inventory the kernel holds rules for is the last good one until the file is read.
        inventory=applied.inventory if applied is not None else None,
        inventory_at=str(data.get("inventoryAt") or ""),
        attempted=data.get("attempted") if isinstance(data.get("attempted"), str) else None,
        conditions=tuple(Condition.from_dict(c) for c in data.get("conditions") or ()),
        history=tuple(HistoryEntry.from_dict(h) for h in data.get("history") or ()),
        drift_corrections=int(data.get("driftCorrections") or 0),
        drift_log=tuple(data.get("driftLog") or ()),
        last_success=str(data.get("lastSuccess") or ""),
        soaking=Soaking.from_dict(data.get("rolloutSoaking")),
        source_change=SourceChange.from_dict(data.get("sourceChange")),
    )


def load_state(path: str | os.PathLike[str]) -> AgentState:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return AgentState()
    if not isinstance(data, dict):
        return AgentState()
    try:
        return from_persisted(data)
    except (TypeError, ValueError, AttributeError):
        return AgentState()


def save_state(path: str | os.PathLike[str], state: AgentState) -> None:
    """Write by rename, so a crash leaves the old file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_persisted(state), indent=1, sort_keys=True) + "\n"
    atomic_write_text(target, text, fsync=True, prefix=".state.")
