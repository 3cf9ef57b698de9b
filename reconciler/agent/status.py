"""The status document and how it reaches the cell's `status/<cell>` branch.

The document (`build_status`, pure) borrows Flux's vocabulary -- conditions, observed /
attempted / applied revisions, history -- and carries what an operator asks of a cell: which
revision it enforces and since when, what it refused and why (validation findings with
file:line), how long each phase took, how many rules it installs against how many Cloud
Foundry would, what drifted, and which containers got which groups.  Its `containers:` list
follows the status-branch contract of `reconciler.status`, so `asgctl plan` can use
the fleet's status branches as its inventory.

Writing the branch (`reconciler.status.write.StatusWriter`: a new root commit holding only
`status.yaml`, force-pushed to exactly `refs/heads/status/<cell>`) is the status-branch
contract's own; this module decides what to write and when.

Pushing (`StatusPusher`) runs on its own thread: enforcement never waits for the git server.
It pushes when the document's meaningful content changes (not its timestamps), as a
heartbeat at a slower rate otherwise, merges bursts (`min_interval`), and retries failures
with capped exponential back-off, stretched by a random part of itself (`RETRY_JITTER`): cells
whose pushes failed together -- a status server restarting, its connection limit reached --
must not all come back in the same second and fail together again.  A retry always pushes the
newest document, never the one that failed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.agent.conditions import SOURCE_CHANGED
from reconciler.agent.core import backoff, container_grants
from reconciler.agent.source import clip
from reconciler.agent.sourceid import moved
from reconciler.agent.state import AgentState
from reconciler.core.cellplan import CellPlan
from reconciler.status.document import API_VERSION, KIND
from reconciler.status.write import StatusPushError, StatusWriter, commit_message, dump_status

PHASES = ("fetch", "verify", "load", "render", "enforce", "cleanup", "total")
VOLATILE = ("reportedAt", "lastSyncTime", "lastSuccessTime", "timings")
VOLATILE_HISTORY = ("lastReconciled", "totalReconciliations", "lastReconciledDuration")
MAX_FINDINGS = 100
"""Findings of a refused revision listed in the status (the first, in order; then a count)."""


def bounded(findings: Sequence[object]) -> list[str]:
    """Findings for the status: the first MAX_FINDINGS, each cut to 500 characters, then a
    count of the rest (a refused revision may carry thousands, and the status must stay
    small)."""
    out = [clip(str(f), 500) for f in findings[:MAX_FINDINGS]]
    if len(findings) > MAX_FINDINGS:
        out.append(f"... and {len(findings) - MAX_FINDINGS} more")
    return out


def container_entries(plan: CellPlan | None) -> list[dict[str, Any]]:
    """The contract's container list, plus each container's chain, groups and their sources."""
    out = []
    for grant in container_grants(plan):
        cp = grant.container
        c = cp.container
        out.append(
            {
                "handle": c.handle,
                "ip": c.ip,
                "app_id": c.app_id,
                "space_id": c.space_id,
                "org_id": c.org_id,
                # The status-branch reader takes an empty workload for "app": a container
                # bound to nothing (no workload in its metadata) is written as "none", which,
                # like every workload but app, task and staging, binds nothing when read back.
                "workload": c.workload or "none",
                "chain": cp.chain_id,
                "groups": list(cp.groups),
                "sources": sorted(grant.sources),
                # Only for audited containers: a cell without audit keeps its document.
                **({"mode": "audit"} if cp.audit else {}),
            }
        )
    return out


def build_status(
    state: AgentState,
    *,
    cell: str,
    settings: Mapping[str, Any],
    agent: Mapping[str, Any],
    revision: Callable[[str], str],
    containers_path: str,
    now: str,
) -> dict[str, Any]:
    """The status document for `state` (pure; `now` stamps `reportedAt`)."""
    applied = state.applied
    head = state.head
    plan = applied.plan if applied is not None else None
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "cell": cell,
        "reportedAt": now,
        "agent": dict(agent),
        "source": dict(settings),
        "observedRevision": revision(head.sha) if head else "",
        "lastAttemptedRevision": revision(state.attempted) if state.attempted else "",
        "lastAppliedRevision": revision(applied.sha) if applied else "",
        "lastAppliedDigest": applied.digest if applied else "",
        "lastAppliedTime": applied.at if applied else "",
        "lastSyncTime": state.last_sync,
        "lastSuccessTime": state.last_success,
        "conditions": [c.to_dict() for c in state.conditions],
    }
    if head is not None and head.verdict is not None:
        # Commit texts are cut and escaped where they are read (source.clip).
        doc["refused"] = {
            "revision": revision(head.sha),
            "subject": head.subject,
            "reason": head.verdict.reason,
            "message": head.verdict.message,
            "findings": bounded(head.verdict.findings),
        }
    if head is not None and head.tests is not None:
        report = head.tests
        doc["policyTests"] = {
            "revision": revision(head.sha),
            "mode": report.mode,
            "tests": report.tests,
            "passed": report.passed,
            "failed": len(report.failures),
            "failures": bounded(report.failures),
        }
    change = state.source_change
    if change is not None:
        doc["sourceChange"] = {
            "reason": SOURCE_CHANGED,
            "from": change.old.to_dict(),
            "to": change.new.to_dict(),
            "detectedAt": change.at,
            "enforcedRevision": revision(change.revision) if change.revision else "",
            # Until a revision of the new source is applied, the cell enforces the old one's.
            "pending": applied is not None and moved(applied.source, change.new),
        }
    order = {phase: i for i, phase in enumerate(PHASES)}
    doc["timings"] = {
        k: round(v, 4)
        for k, v in sorted(state.timings.items(), key=lambda kv: order.get(kv[0], 99))
    }
    doc["counts"] = {
        "containers": len(plan.containers) if plan else 0,
        "groups": len(plan.groups) if plan else 0,
        "chains": plan.chains if plan else 0,
        "installedRules": plan.installed_rules if plan else 0,
        "cfEquivalentRules": plan.cf_equivalent_rules if plan else 0,
    }
    doc["drift"] = {"corrections": state.drift_corrections, "recent": list(state.drift_log)}
    doc["inventory"] = {
        "path": containers_path,
        "containers": len(state.inventory) if state.inventory is not None else None,
        "updatedAt": state.inventory_at,
        "error": state.inventory_error or "",
        "rejected": [r.to_dict() for r in state.inventory_rejected],
    }
    doc["containers"] = container_entries(plan)
    doc["history"] = [h.to_dict() for h in state.history]
    return doc


def fingerprint(doc: Mapping[str, Any]) -> str:
    """A digest of what the document *says*; timestamps and counters of repeats left out.

    Two documents with the same fingerprint need not both be pushed: only the heartbeat
    carries the fresher timestamps.
    """
    stable = copy.deepcopy(dict(doc))
    for key in VOLATILE:
        stable.pop(key, None)
    for entry in stable.get("history") or ():
        for key in VOLATILE_HISTORY:
            entry.pop(key, None)
    flows = stable.get("flows")
    if isinstance(flows, dict):  # packet counters move all the time; the heartbeat has them
        flows.pop("counters", None)
    text = json.dumps(stable, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PushResult:
    ok: bool
    error: str = ""
    seconds: float = 0.0


RETRY_JITTER = 0.5
"""A failed push waits its back-off times 1 to 1.5 (uniform), on the pusher's own random."""


def retry_wait(failures: int, base: float, cap: float, rand: float) -> float:
    """A failed push's back-off stretched by `rand` (0 <= rand < 1) times RETRY_JITTER of it."""
    return backoff(failures, base, cap) * (1 + RETRY_JITTER * rand)


class StatusPusher:
    """Pushes the latest document from its own thread; see the module docstring."""

    def __init__(
        self,
        writer: StatusWriter,
        *,
        heartbeat: float,
        min_interval: float = 1.0,
        retry_base: float = 2.0,
        retry_cap: float = 60.0,
        on_result: Callable[[PushResult], None] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.writer = writer
        self.rand = rand
        self.heartbeat = heartbeat
        self.min_interval = min_interval
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.on_result = on_result
        self._cv = threading.Condition()
        self._doc: dict[str, Any] | None = None
        self._fp: str | None = None
        self._pushed_fp: str | None = None
        self._last_push = float("-inf")
        self._last_attempt = float("-inf")
        self._failures = 0
        self._retry_wait = 0.0
        self._stop = False
        self._busy = False
        self._thread: threading.Thread | None = None

    def offer(self, doc: Mapping[str, Any]) -> None:
        """The newest document; replaces any not yet pushed."""
        with self._cv:
            self._doc = dict(doc)
            self._fp = fingerprint(doc)
            self._cv.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="status-pusher", daemon=True)
        self._thread.start()

    def _due(self, now: float) -> float | None:
        """Seconds until the next push should happen (0 = now), None = nothing to do."""
        if self._doc is None:
            return None
        if self._failures:
            return max(0.0, self._last_attempt + self._retry_wait - now)
        if self._fp != self._pushed_fp:
            return max(0.0, self._last_push + self.min_interval - now)
        return max(0.0, self._last_push + self.heartbeat - now)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop:
                    wait = self._due(time.monotonic())
                    if wait == 0:
                        break
                    self._cv.wait(wait)
                if self._stop:
                    return
                doc, fp = self._doc, self._fp
                self._busy = True
            assert doc is not None
            result = self._push(doc)
            with self._cv:
                self._busy = False
                self._last_attempt = time.monotonic()
                if result.ok:
                    self._pushed_fp = fp
                    self._last_push = self._last_attempt
                    self._failures = 0
                else:
                    self._failures += 1
                    self._retry_wait = self.retry_after(self._failures)
                self._cv.notify_all()

    def retry_after(self, failures: int) -> float:
        """Seconds from a failed attempt to the next, after `failures` in a row."""
        return retry_wait(failures, self.retry_base, self.retry_cap, self.rand())

    def _push(self, doc: dict[str, Any]) -> PushResult:
        t0 = time.perf_counter()
        stamped = {**doc, "reportedAt": iso(time.time())}
        try:
            self.writer.push(dump_status(stamped), commit_message(stamped))
            result = PushResult(True, "", time.perf_counter() - t0)
        except (StatusPushError, OSError) as exc:
            result = PushResult(False, str(exc), time.perf_counter() - t0)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def push_now(self) -> PushResult:
        """Push the latest document synchronously (for `--once`), whatever changed."""
        with self._cv:
            while self._busy:
                self._cv.wait(1.0)
            doc, fp = self._doc, self._fp
        if doc is None:
            return PushResult(True)
        result = self._push(doc)
        if result.ok:
            with self._cv:
                self._pushed_fp = fp
                self._last_push = time.monotonic()
                self._failures = 0
        return result

    def flush(self, timeout: float) -> bool:
        """Wait until the latest document is pushed (or `timeout`); True when it was."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._fp != self._pushed_fp or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            # A push stuck on an unresponsive server must not hold up the exit: the thread
            # is a daemon, and the next run pushes the newest status anyway.
            self._thread.join(timeout=2.0)


def iso(t: float) -> str:
    """UTC, millisecond precision: enough to measure commit-to-applied on one host."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
