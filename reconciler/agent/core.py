"""The agent's decisions, as pure functions of values the edges gathered.

Nothing here touches git, files, the kernel or the clock (times come in as arguments), so the
rules that keep a fleet safe are unit-tested directly:

* the gates a fetched head must pass before it is applied (`signature_verdict`,
  `ancestry_verdict`, `validation_verdict`, `policy_test_verdict`, `revoke_verdict`), each
  returning a `Refusal` that names the reason when the head must wait, or None when it
  passes (what the mass-revoke gate counts is defined once, in `reconciler.core.gate`,
  which the CI plan asks too);
* the Flux-style conditions a cycle leaves behind (`cycle_conditions`, `merge_conditions`),
  with `lastTransitionTime` moving only when a condition's status flips;
* the history of the last syncs (`add_history`), aggregated like Flux's: a sync that repeats
  the previous one only bumps its count, so an idle cell's history does not churn;
* which containers' rules really changed between two plans (`container_changes`), the only
  thing the agent logs on a normal cycle;
* how long to wait after consecutive transient failures (`backoff`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from reconciler.agent.conditions import (
    CONDITION_TYPES,
    DRIFT_CORRECTED,
    DRIFT_DETECTED,
    DRIFTED,
    FALSE,
    HISTORY_REWRITTEN,
    INVENTORY_INVALID,
    MASS_REVOKE_BLOCKED,
    NO_DRIFT,
    NOT_CHECKED,
    POLICY_TESTS_FAILED,
    PROGRESSING,
    PROGRESSING_WITH_RETRY,
    READY,
    RECONCILIATION_SUCCEEDED,
    RECONCILING,
    SOURCE_VERIFIED,
    STALLED,
    TRUE,
    UNKNOWN,
    VALIDATION_FAILED,
    VERIFICATION_DISABLED,
)
from reconciler.agent.verify import SignatureCheck
from reconciler.core.cellplan import CellPlan, ContainerPlan, GateSettings
from reconciler.core.gate import RevokeCount, judge
from reconciler.core.model import Directory
from reconciler.policy.findings import Finding
from reconciler.status.document import Condition

HISTORY_LIMIT = 5


@dataclass(frozen=True, slots=True)
class Problem:
    """A failure with the reason a condition carries and a message for humans."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a head is not applied: the condition reason and the message to report."""

    reason: str
    message: str
    findings: tuple[Finding, ...] = ()


# -- retries -------------------------------------------------------------------------------

# 2**1024 no longer converts to a float; any larger exponent only lands further past the cap.
_MAX_EXPONENT = 1023


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after `failures` consecutive failures: base * 2^(failures-1), capped.

    The exponent is bounded, so a source or status server that stays down for weeks never
    makes the wait overflow (the answer is then simply `cap`).
    """
    return min(cap, base * 2 ** min(failures - 1, _MAX_EXPONENT))


# -- what each container is granted --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerGrant:
    """One container of a plan, the rules its groups allow it (by the full SHA-256 of each
    rule's match, not by id: a rule whose id collides with another's is still another
    rule), and the documents (`kind/name`) those rules come from."""

    container: ContainerPlan
    rules: frozenset[str]
    sources: frozenset[str]

    @property
    def handle(self) -> str:
        return self.container.container.handle


def container_grants(plan: CellPlan | None) -> tuple[ContainerGrant, ...]:
    """Every container of `plan`, in plan order, with what its groups grant it.

    The one walk of plan groups behind the container-change log (`container_changes`) and
    the status document's `sources`.
    """
    if plan is None:
        return ()
    groups = plan.group_by_id
    out = []
    for cp in plan.containers:
        rules: set[str] = set()
        sources: set[str] = set()
        for gid in cp.groups:
            for rule in groups[gid].rules:
                rules.add(rule.digest)
                sources.update(f"{s.kind}/{s.name}" for s in rule.sources)
        out.append(ContainerGrant(cp, frozenset(rules), frozenset(sources)))
    return tuple(out)


# -- gates ---------------------------------------------------------------------------------


def signature_verdict(check: SignatureCheck | None) -> Refusal | None:
    """None when verification is off (`check` is None) or the signature is trusted."""
    if check is None or check.ok:
        return None
    return Refusal(check.reason, check.message)


def ancestry_verdict(
    applied: str | None, head: str, descends: bool | None, allow_rewind: bool
) -> Refusal | None:
    """A head that does not descend from the applied revision waits, unless rewinds are allowed.

    `descends` is None when nothing was applied yet (no history to protect).
    """
    if applied is None or descends is None or descends or allow_rewind or applied == head:
        return None
    return Refusal(
        HISTORY_REWRITTEN,
        f"head {head[:12]} does not descend from the applied revision {applied[:12]} "
        "(force-push or rewind); not applied (set allow-rewind to accept it)",
    )


def validation_verdict(findings: Sequence[Finding]) -> Refusal | None:
    """A revision with any error finding is never applied; the findings go to the status."""
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return None
    first = str(sorted(errors)[0])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Refusal(
        VALIDATION_FAILED,
        f"{len(errors)} validation error{'s' * (len(errors) != 1)}: {first}{more}",
        tuple(sorted(findings)),
    )


@dataclass(frozen=True, slots=True)
class PolicyTestReport:
    """What a head's PolicyTest cases said, under the `policy-tests` mode they were run in:
    how many ran, and each failure as a finding at its test's file:line."""

    mode: str
    tests: int
    failures: tuple[Finding, ...] = ()

    @property
    def passed(self) -> int:
        return self.tests - len(self.failures)

    def to_log(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tests": self.tests,
            "failed": len(self.failures),
            "failures": [str(f) for f in self.failures[:20]],
        }


def policy_test_verdict(report: PolicyTestReport | None) -> Refusal | None:
    """With `policy-tests: enforce`, a head with a failing case is refused like an invalid
    one (its failures are the findings); `warn` and `off` never refuse."""
    if report is None or report.mode != "enforce" or not report.failures:
        return None
    failed = len(report.failures)
    more = f" (and {failed - 1} more)" if failed > 1 else ""
    return Refusal(
        POLICY_TESTS_FAILED,
        f"{failed} of {report.tests} policy test{'s' * (report.tests != 1)} "
        f"fail{'s' * (failed == 1)}: {report.failures[0]}{more}",
        report.failures,
    )


def revoke_verdict(count: RevokeCount, settings: GateSettings, override: bool) -> Refusal | None:
    """A plan the mass-revoke gate holds back (`reconciler.core.gate.judge`) waits, unless
    the head commit carries the override trailer."""
    verdict = judge(count, settings)
    if verdict is None or override:
        return None
    return Refusal(MASS_REVOKE_BLOCKED, verdict.message)


# -- conditions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CycleView:
    """What the conditions depend on, after a cycle (every field plain data)."""

    verify_enabled: bool
    applied_revision: str | None
    head_revision: str | None
    source_error: Problem | None = None
    refusal: Refusal | None = None
    signature: SignatureCheck | None = None
    enforce_error: Problem | None = None
    inventory_error: str | None = None
    inventory_rejected: int = 0
    """Store entries not used as written (skipped, held or shared); the rest is enforced."""
    waiting_for: str | None = None
    """Why nothing could be enforced yet (no inventory, no revision), when that is the case."""
    drift: tuple[str, ...] = ()
    drift_repaired: bool = True
    heal_drift: bool = True
    """False in report-only mode (`--no-heal-drift`): drift is reported, never repaired."""
    hold: Problem | None = None
    """Why a valid head waits for its turn (`reconciler.agent.rollout`): Ready stays True."""


def cycle_conditions(view: CycleView) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) for every condition type, from one cycle's view, in
    the order of `CONDITION_TYPES`."""
    applied = view.applied_revision
    keeping = f"; still enforcing {applied}" if applied else "; nothing applied yet"
    ready: tuple[str, str, str]
    if view.enforce_error is not None:
        e = view.enforce_error
        ready = (FALSE, e.reason, e.message + keeping)
    elif view.source_error is not None:
        e = view.source_error
        ready = (FALSE, e.reason, e.message + keeping)
    elif view.refusal is not None:
        head = view.head_revision or "the head"
        ready = (FALSE, view.refusal.reason, f"{head}: {view.refusal.message}{keeping}")
    elif view.inventory_error is not None:
        ready = (FALSE, INVENTORY_INVALID, view.inventory_error + " (last good one kept)")
    elif view.waiting_for is not None:
        ready = (FALSE, PROGRESSING, view.waiting_for)
    elif view.hold is not None:  # healthy on the applied revision; the head waits its turn
        ready = (TRUE, view.hold.reason, view.hold.message + keeping)
    else:
        ready = (TRUE, RECONCILIATION_SUCCEEDED, f"Applied revision: {applied}")
        if view.inventory_rejected:
            # Not a failure (the rest of the cell converged), but never silent either.
            ready = (
                *ready[:2],
                f"{ready[2]}; {view.inventory_rejected} container metadata entries not used "
                "as written (see inventory.rejected)",
            )
    transient = view.enforce_error is not None or view.source_error is not None
    stalled = view.refusal is not None and not transient
    out: dict[str, tuple[str, str, str]] = {READY: ready}
    if transient:
        out[RECONCILING] = (TRUE, PROGRESSING_WITH_RETRY, ready[2])
    elif view.waiting_for is not None:
        out[RECONCILING] = (TRUE, PROGRESSING, view.waiting_for)
    elif view.hold is not None:
        out[RECONCILING] = (TRUE, view.hold.reason, view.hold.message)
    else:
        out[RECONCILING] = (FALSE, ready[1], "")
    if stalled:
        out[STALLED] = (TRUE, ready[1], ready[2])
    else:
        out[STALLED] = (FALSE, ready[1], "")
    if not view.verify_enabled:
        out[SOURCE_VERIFIED] = (
            UNKNOWN,
            VERIFICATION_DISABLED,
            "commit signatures are not checked",
        )
    elif view.signature is None:
        out[SOURCE_VERIFIED] = (UNKNOWN, NOT_CHECKED, "no head verified yet")
    else:
        s = view.signature
        out[SOURCE_VERIFIED] = (TRUE if s.ok else FALSE, s.reason, s.message)
    if view.drift:
        reason = DRIFT_CORRECTED if view.drift_repaired else DRIFT_DETECTED
        summary = "; ".join(view.drift[:3]) + (
            f"; and {len(view.drift) - 3} more" if len(view.drift) > 3 else ""
        )
        if not view.drift_repaired:  # say why, so it is not read as a change still to come
            why = "report-only" if not view.heal_drift else "the repair failed"
            summary += f"; not repaired ({why})"
        out[DRIFTED] = (TRUE, reason, summary)
    else:
        out[DRIFTED] = (FALSE, NO_DRIFT, "")
    return [(type_, *out[type_]) for type_ in CONDITION_TYPES]


def merge_conditions(
    previous: Iterable[Condition], new: Iterable[tuple[str, str, str, str]], now: str
) -> tuple[Condition, ...]:
    """New conditions; each keeps its lastTransitionTime unless its status changed."""
    before = {c.type: c for c in previous}
    out = []
    for type_, status, reason, message in new:
        old = before.get(type_)
        since = old.last_transition if old is not None and old.status == status else now
        out.append(Condition(type_, status, reason, message, since))
    return tuple(out)


def condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


# -- history -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One run of identical syncs (Flux's `history[]`): same revision, digest and outcome."""

    revision: str
    digest: str
    status: str
    first_reconciled: str
    last_reconciled: str
    total: int = 1
    last_duration: float = 0.0

    def key(self) -> tuple[str, str, str]:
        return (self.revision, self.digest, self.status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "digest": self.digest,
            "status": self.status,
            "firstReconciled": self.first_reconciled,
            "lastReconciled": self.last_reconciled,
            "totalReconciliations": self.total,
            "lastReconciledDuration": round(self.last_duration, 4),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HistoryEntry:
        return cls(
            str(d.get("revision", "")),
            str(d.get("digest", "")),
            str(d.get("status", "")),
            str(d.get("firstReconciled", "")),
            str(d.get("lastReconciled", "")),
            int(d.get("totalReconciliations", 1)),
            float(d.get("lastReconciledDuration", 0.0)),
        )


def add_history(
    history: Sequence[HistoryEntry],
    revision: str,
    digest: str,
    status: str,
    now: str,
    duration: float,
) -> tuple[HistoryEntry, ...]:
    """Newest first, at most HISTORY_LIMIT runs; a repeat of the newest run bumps its count."""
    if history and history[0].key() == (revision, digest, status):
        head = history[0]
        bumped = replace(head, last_reconciled=now, total=head.total + 1, last_duration=duration)
        return (bumped, *history[1:])
    entry = HistoryEntry(revision, digest, status, now, now, 1, duration)
    return (entry, *history)[:HISTORY_LIMIT]


# -- container changes ---------------------------------------------------------------------


def container_changes(
    old: CellPlan | None,
    new: CellPlan,
    *,
    cell: str,
    revision: str,
    directory: Directory | None = None,
) -> list[dict[str, Any]]:
    """One log record per container whose allowed rules really changed (or that came or went).

    Group chains may be renamed when the partition of a cell's rules shifts, without any
    container's access changing; comparing rules per container (by content digest, never by
    id alone) keeps those out of the log and every real change in it.
    """
    before = {g.handle: g for g in container_grants(old)}
    after = {g.handle: g for g in container_grants(new)}
    records = []
    none: frozenset[str] = frozenset()
    for handle in sorted(set(before) | set(after)):
        b, a = before.get(handle), after.get(handle)
        b_rules, b_src = (b.rules, b.sources) if b else (none, none)
        a_rules, a_src = (a.rules, a.sources) if a else (none, none)
        if b is not None and a is not None and b_rules == a_rules and b_src == a_src:
            continue
        c = (a or b).container.container  # type: ignore[union-attr]  # a or b: never both None
        change = "added" if b is None else "removed" if a is None else "updated"
        record: dict[str, Any] = {
            "event": "container-rules-changed",
            "cell": cell,
            "change": change,
            "handle": c.handle,
            "ip": c.ip,
            "workload": c.workload,
            "app_id": c.app_id,
            "space_id": c.space_id,
            "org_id": c.org_id,
        }
        if directory is not None:
            if c.app_id and directory.knows_app(c.app_id):
                record["app"] = directory.app_path(c.app_id)
            if c.space_id and directory.knows_space(c.space_id):
                record["space"] = directory.space_path(c.space_id)
        record.update(
            {
                "revision": revision,
                "groups_added": sorted(a_src - b_src),
                "groups_removed": sorted(b_src - a_src),
                "rules_added": len(a_rules - b_rules),
                "rules_removed": len(b_rules - a_rules),
            }
        )
        records.append(record)
    return records
