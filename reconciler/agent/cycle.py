"""One agent cycle as values: observe -> decide -> enforce -> settle -> report.

The agent (`reconciler.agent.loop`) does the I/O at both ends; everything between is here and
pure, so each gate and each outcome is tested as a table of observations and states:

* **observe** (agent): read the container metadata, fetch the branch, restore the applied
  revision from the cache after a restart, find the underlay, and gather the facts about a
  new head.  Which facts, in which order, is decided here (`next_need`): a head's policy
  files are only parsed once its signature and ancestry passed, and the cache is only
  checked (`git fsck`) when a head failed validation.
* **decide** (`decide`): the inventory to use, the gates in order (`judge_head`), the
  revision to enforce, and either why nothing is converged (waiting, a refusal of the plan,
  an unknown underlay) or the one action for the dataplane (`Converge`), plus the log lines.
* **enforce** (agent): carry out `Converge` through the dataplane.
* **settle** (`settle`): from what the dataplane did, the next `AgentState` -- applied
  revision, drift log, conditions, back-off count, history -- and the log lines to write.
* **report** (agent): write the logs, save the state, update the metrics, offer the status.

Compiling is pure and deterministic, and the agent remembers its last plan; `decide` gets it
as a function (`Compile`) so the mass-revoke gate and the plan to enforce share one memo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

from reconciler.agent.conditions import (
    ENFORCEMENT_FAILED,
    MALFORMED_COMMIT,
    MASS_REVOKE_BLOCKED,
    PLAN_REFUSED,
    READY,
    ROLLOUT_PAUSED,
    SOURCE_CHANGED,
    TRUE,
    UNDERLAY_UNKNOWN,
)
from reconciler.agent.config import AgentConfig
from reconciler.agent.core import (
    CycleView,
    PolicyTestReport,
    Problem,
    Refusal,
    add_history,
    ancestry_verdict,
    condition,
    container_changes,
    cycle_conditions,
    merge_conditions,
    policy_test_verdict,
    revoke_verdict,
    signature_verdict,
    validation_verdict,
)
from reconciler.agent.rollout import FleetReports, Soaking, rollout_hold, unpaused
from reconciler.agent.source import CommitInfo
from reconciler.agent.sourceid import SourceChange, SourceRef, moved
from reconciler.agent.state import DRIFT_LOG_LIMIT, AgentState, Applied, Head
from reconciler.agent.verify import SignatureCheck, trailer_true
from reconciler.core.cellplan import CellPlan, CellSettings, PlanError
from reconciler.core.gate import revoke_count
from reconciler.core.model import Container, PolicySet
from reconciler.core.policytest import CaseResult, failure_finding, run_tests
from reconciler.policy.findings import Finding
from reconciler.policy.validate import Result
from reconciler.sources.cellstore import StoreReading

if TYPE_CHECKING:
    from reconciler.backends import ConvergeResult

Trigger = Literal["sync", "inventory"]
SYNC: Final = "sync"
"""On the interval, at start, on SIGHUP: fetch the branch, judge a new head, converge."""
INVENTORY: Final = "inventory"
"""The metadata file changed: no fetch; converge the revision already enforced."""

Compile = Callable[[PolicySet, tuple[Container, ...], CellSettings], CellPlan]
"""compile_cell for this cell (raises PlanError): pure, so a memo of it changes nothing."""

RunTests = Callable[[PolicySet], tuple[CaseResult, ...]]
"""run_tests (`asgctl test`'s): pure too; the agent runs it once per head, never on `off`."""


@dataclass(frozen=True, slots=True)
class Log:
    """One JSON log line the cycle asks for: container changes go to stdout (they are the
    record of what the cell enforces), events for operators to stderr."""

    record: Mapping[str, Any]
    stream: Literal["out", "err"] = "err"


# -- observing a new head ------------------------------------------------------------------


class Need(Enum):
    """The next fact about a new head the gates need, in the order they are judged."""

    COMMIT = "commit"
    """The commit object: subject, message (trailers), whether it is signed."""
    TRUST = "trust"
    """Its signature (when verification is on) and whether it descends from the applied one."""
    REVISION = "revision"
    """Its policy files, loaded and validated."""
    CACHE_CHECK = "cache-check"
    """A failed validation: is the commit bad, or the cache damaged (`git fsck`)?"""


@dataclass(frozen=True, slots=True)
class HeadTrust:
    """Who signed a head and where it stands in history: read together, judged together."""

    signature: SignatureCheck | None
    """None when verification is off."""
    descends: bool | None
    """None when nothing was applied yet, or the head is the applied revision."""


@dataclass(frozen=True)
class HeadFacts:
    """What the agent read about a fetched head that differs from the last one judged."""

    sha: str
    commit: CommitInfo | None = None
    malformed: str | None = None
    """Why the commit object itself was refused (already cut and escaped), when it was."""
    trust: HeadTrust | None = None
    revision: Result | None = None
    cache_intact: bool | None = None
    """Checked after a failed validation; a damaged cache ends the cycle as a source error
    before any decision, so only True is ever decided on."""


def next_need(facts: HeadFacts, applied_sha: str | None, allow_rewind: bool) -> Need | None:
    """The fact to gather next about a head, or None when the gates can judge it.

    The first gate that fails ends the gathering: the policy files of an unsigned or rewound
    head are never parsed (whoever can push chose their content).
    """
    if facts.commit is None and facts.malformed is None:
        return Need.COMMIT
    if facts.malformed is not None:
        return None
    if facts.trust is None:
        return Need.TRUST
    if _trust_verdict(facts.sha, facts.trust, applied_sha, allow_rewind) is not None:
        return None
    if facts.revision is None:
        return Need.REVISION
    if facts.cache_intact is None and validation_verdict(facts.revision.findings) is not None:
        return Need.CACHE_CHECK
    return None


def _trust_verdict(
    sha: str, trust: HeadTrust, applied_sha: str | None, allow_rewind: bool
) -> Refusal | None:
    return signature_verdict(trust.signature) or ancestry_verdict(
        applied_sha, sha, trust.descends, allow_rewind
    )


def repo_path(finding: Finding, policies_path: str) -> Finding:
    """Findings name files relative to the policy folder; status shows repository paths."""
    prefix = policies_path.strip("/")
    if prefix in ("", "."):
        return finding
    return replace(finding, file=f"{prefix}/{finding.file}")


def policy_tests(
    policy: PolicySet, cfg: AgentConfig, run: RunTests
) -> PolicyTestReport | Refusal | None:
    """The head's PolicyTests under `cfg.policy_tests` (None: `off`, not run), failures named
    by repository path; a Refusal when a case's plan cannot be built (PlanRefused)."""
    if cfg.policy_tests == "off":
        return None
    try:
        results = run(policy)
    except PlanError as exc:  # two contents under one name: the head's plan cannot be built
        return Refusal(PLAN_REFUSED, str(exc))
    failures = tuple(
        repo_path(failure_finding(r), cfg.policies_path) for r in results if not r.passed
    )
    return PolicyTestReport(cfg.policy_tests, len(results), failures)


def current_source(cfg: AgentConfig) -> SourceRef:
    """The configured source, as the state records where a revision came from."""
    return SourceRef.of(cfg.source, cfg.branch)


def unknown_baseline_verdict(
    applied: Applied | None, cfg: AgentConfig, message: str
) -> Refusal | None:
    """A head from a new source while the revision the cell enforces, from the old one,
    cannot be read (neither cache holds it): what the head takes away cannot be measured,
    so it waits for the mass-revoke trailer, as a mass revoke would.  A source change is
    never a way around the gate."""
    if applied is None or applied.policy is not None:
        return None
    if not moved(applied.source, current_source(cfg)):
        return None
    if trailer_true(message, cfg.mass_revoke_trailer):
        return None
    old = applied.source.url if applied.source is not None else "the previous source"
    return Refusal(
        MASS_REVOKE_BLOCKED,
        f"the revision the cell enforces ({applied.sha[:12]}, from {old}) cannot be read "
        "to measure what this head of the new source takes away; not applied without the "
        f"commit trailer '{cfg.mass_revoke_trailer}: true'",
    )


def judge_head(
    facts: HeadFacts,
    *,
    applied: Applied | None,
    inventory: tuple[Container, ...] | None,
    settings: CellSettings,
    cfg: AgentConfig,
    compile: Compile,
    tests: RunTests = run_tests,
) -> Head:
    """Put a new head through every gate, in order; the first that fails decides.

    Malformed commit, signature, ancestry, validation, its PolicyTests (`policy-tests`:
    refused on a failure with `enforce`, reported with `warn`), then -- against the applied
    revision over the current inventory -- a plan that cannot be built and the mass-revoke
    gate.  ValueError when `facts` stop short of what `next_need` asks for (a bug, not an
    input).
    """
    sha = facts.sha
    if facts.malformed is not None:
        # Refused like a bad signature (it is looked at before one): Stalled, the applied
        # revision stays enforced, and the next push to the branch is judged.
        refused = SignatureCheck(False, MALFORMED_COMMIT, facts.malformed)
        return Head(
            sha,
            "",
            refused if cfg.verify == "signed" else None,
            Refusal(MALFORMED_COMMIT, facts.malformed),
        )
    commit, trust = facts.commit, facts.trust
    if commit is None or trust is None:
        raise ValueError(f"head {sha[:12]}: judged before its commit and trust were read")
    subject, check = commit.subject, trust.signature
    applied_sha = applied.sha if applied is not None else None
    verdict = _trust_verdict(sha, trust, applied_sha, cfg.allow_rewind)
    if verdict is not None:
        return Head(sha, subject, check, verdict)
    revision = facts.revision
    if revision is None:
        raise ValueError(f"head {sha[:12]}: judged before its policy files were loaded")
    findings = tuple(repo_path(f, cfg.policies_path) for f in revision.findings)
    verdict = validation_verdict(findings)
    if verdict is not None:
        return Head(sha, subject, check, verdict)
    report = policy_tests(revision.policy, cfg, tests)
    if isinstance(report, Refusal):
        return Head(sha, subject, check, report)
    verdict = policy_test_verdict(report)
    if verdict is not None:
        return Head(sha, subject, check, verdict, tests=report)
    verdict = unknown_baseline_verdict(applied, cfg, commit.message)
    if verdict is not None:
        return Head(sha, subject, check, verdict, tests=report)
    if applied is not None and applied.policy is not None and inventory is not None:
        old = compile(applied.policy, inventory, settings)
        try:
            new = compile(revision.policy, inventory, settings)
        except PlanError as exc:  # two contents under one name: apply neither
            return Head(sha, subject, check, Refusal(PLAN_REFUSED, str(exc)), tests=report)
        override = trailer_true(commit.message, cfg.mass_revoke_trailer)
        verdict = revoke_verdict(revoke_count(old, new), cfg.gate, override)
        if verdict is not None:
            return Head(sha, subject, check, verdict, tests=report)
    emergency = trailer_true(commit.message, cfg.emergency_trailer)
    return Head(sha, subject, check, None, revision.policy, tests=report, emergency=emergency)


# -- the observation and the decision ------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """Everything one cycle read from the world, before anything is decided."""

    trigger: Trigger
    now: str
    """When the cycle started (ISO 8601, UTC)."""
    reading: StoreReading | None
    """The container metadata judged entry by entry; None when unusable as a whole."""
    inventory_error: str | None
    applied: Applied | None
    """The state's applied revision, its policy and plan loaded again after a restart."""
    settings: CellSettings
    """The cell's settings with the underlay found (or as configured when it was not)."""
    underlay_error: str | None = None
    source_error: Problem | None = None
    """This sync's fetch (or reading of the new head) failed; None on an inventory cycle."""
    head: HeadFacts | None = None
    """A fetched head other than the last one judged."""
    pinned: HeadFacts | None = None
    """The revision the head pins the fleet to (`pinned_sha`), read like a head when it is
    not the one judged last."""
    fleet: FleetReports | None = None
    """The other cells' status branches, read on a sync when the head's waves need them."""
    at: float = 0.0
    """`now` in seconds since the epoch (this agent's clock: soaks and change windows)."""


@dataclass(frozen=True)
class Target:
    """The revision to enforce: an accepted head, else what was applied before."""

    sha: str
    policy: PolicySet


@dataclass(frozen=True)
class Converge:
    """The one action on the dataplane: bring the kernel to `plan`.

    `last` (the applied plan) tells a change from drift; `heal_drift` False reports drift
    without repairing it; `defer_install_verify` leaves an install's read-back to the next
    cycle's read (a `--once` run has none, so it reads back at once).
    """

    plan: CellPlan
    last: CellPlan | None
    heal_drift: bool
    defer_install_verify: bool


@dataclass(frozen=True)
class Decision:
    """What a cycle decided before touching the dataplane."""

    trigger: Trigger
    now: str
    state: AgentState
    """The previous state with this cycle's inventory, head, attempt and source error."""
    target: Target | None = None
    waiting: str | None = None
    """Why there is nothing to enforce yet (no revision, no valid metadata)."""
    problem: Problem | None = None
    """Why the target is not converged this cycle (UnderlayUnknown, PlanRefused)."""
    converge: Converge | None = None
    logs: tuple[Log, ...] = ()
    hold: Problem | None = None
    """Why an accepted head is not applied this cycle (`reconciler.agent.rollout`)."""


def inventory_unchanged(prev: AgentState, reading: StoreReading | None, error: str | None) -> bool:
    """The metadata says what it said last cycle (a touch, a rewrite of the same data).

    An inventory cycle that finds this does nothing at all."""
    if reading is None:
        return error == prev.inventory_error
    return (
        reading.containers == prev.inventory
        and prev.inventory_error is None
        and reading.rejected == prev.inventory_rejected
    )


def take_inventory(prev: AgentState, obs: Observation, cell: str) -> tuple[AgentState, list[Log]]:
    """The state with this cycle's metadata; a log line per entry newly not used as written.

    Metadata unusable as a whole keeps the last good inventory (and its rejections).
    """
    reading = obs.reading
    if reading is None:
        return replace(prev, inventory_error=obs.inventory_error), []
    st = prev
    if reading.containers != prev.inventory:
        st = replace(st, inventory=reading.containers, inventory_at=obs.now)
    seen = set(prev.inventory_rejected)
    logs = [
        Log({"event": "inventory-entry-rejected", "cell": cell, **r.to_dict()})
        for r in reading.rejected
        if r not in seen
    ]
    return replace(st, inventory_error=None, inventory_rejected=reading.rejected), logs


def note_source(st: AgentState, cfg: AgentConfig, now: str) -> tuple[AgentState, Log | None]:
    """The state with the configured source checked against the one the applied revision
    came from, and a log line when it is newly seen to differ.

    A state from before sources were kept takes the configured one (an upgrade is not a
    move).  A new source is a fresh start: the last attempt (of the old source) is
    forgotten, and its first head is judged without an ancestry check unless it holds the
    applied commit -- but the applied revision stays, because the kernel still enforces it
    and the mass-revoke gate measures the new head against it.  Going back to the source
    the applied revision came from, before the new one was ever applied, is a change too.
    """
    current = current_source(cfg)
    a = st.applied
    if a is not None and a.source is None:
        a = replace(a, source=current)
        st = replace(st, applied=a)
    last = st.source_change
    if last is not None and last.new == current:
        return st, None
    if last is not None:
        old: SourceRef = last.new
    elif a is not None and a.source is not None and a.source != current:
        old = a.source
    else:
        return st, None
    change = SourceChange(old, current, now, a.sha if a is not None else "")
    pending = a is not None and moved(a.source, current)
    message = (
        f"the configured source is {current.url} ({current.branch}), was {old.url} "
        f"({old.branch}): "
        + (
            f"still enforcing {cfg.revision(a.sha)} from the old source; the new source's "
            "first head is judged against it (mass revoke), not as a rewind"
            if pending and a is not None
            else "the revision enforced already comes from the configured source"
        )
    )
    log = Log(
        {
            "event": "source-changed",
            "cell": cfg.cell,
            "reason": SOURCE_CHANGED,
            "from": old.to_dict(),
            "to": current.to_dict(),
            "enforced": cfg.revision(a.sha) if a is not None else "",
            "message": message,
        }
    )
    return replace(st, source_change=change, attempted=None, head=None), log


def choose_target(head: Head | None, applied: Applied | None) -> Target | None:
    """An accepted head, else the revision applied before (once its policy is loaded)."""
    if head is not None and head.verdict is None and head.policy is not None:
        return Target(head.sha, head.policy)
    if applied is not None and applied.policy is not None:
        return Target(applied.sha, applied.policy)
    return None


def pinned_sha(head: Head | None, applied: Applied | None) -> str | None:
    """The revision an accepted head's Rollout pins the fleet to (`pause: {revision: X}`),
    when this cell must move to it: it is neither the head nor the revision enforced."""
    if head is None or head.verdict is not None or head.policy is None:
        return None
    rollout = head.policy.rollout
    if rollout is None or rollout.pinned is None or rollout.pinned == head.sha:
        return None
    if applied is not None and applied.sha == rollout.pinned:
        return None  # there already: the head's pause holds it there
    return rollout.pinned


def held_back(
    head: Head | None,
    st: AgentState,
    obs: Observation,
    cfg: AgentConfig,
    pin: str | None = None,
) -> tuple[Problem | None, Soaking]:
    """Why an accepted head (or, with `pin`, the pinned revision judged like one) waits for
    its turn (the Rollouts of the applied revision and of the candidate:
    `reconciler.agent.rollout`), and the soak seen so far.  A cell with nothing applied
    takes the candidate at once: holding it back would leave its containers with no rules
    of ours at all, which is no safer.  A pinned revision is not held by its own pause (the
    head's pin is the word), but by the waves and windows like any other."""
    applied = st.applied
    if pin is not None:
        pinned_to = f"rollouts are pinned to {cfg.revision(pin)}"
        if head is None:
            why = f"{pinned_to}, which is not in the history fetched"
            return Problem(ROLLOUT_PAUSED, why), st.soaking
        if head.verdict is not None:
            refused = head.verdict
            why = f"{pinned_to}, which this cell refuses ({refused.reason}: {refused.message})"
            return Problem(ROLLOUT_PAUSED, why), st.soaking
    if head is None or head.verdict is not None or head.policy is None:
        return None, st.soaking
    if applied is None or applied.sha == head.sha:
        return None, Soaking()  # nothing pending: nothing to soak
    if obs.trigger != SYNC:  # reads no status branch: the last sync's verdict stands
        return st.hold, st.soaking
    return rollout_hold(
        cell=cfg.cell,
        head_sha=head.sha,
        revision=cfg.revision(head.sha),
        applied=applied.policy.rollout if applied.policy is not None else None,
        head=unpaused(head.policy.rollout) if pin is not None else head.policy.rollout,
        fleet=obs.fleet,
        soaking=st.soaking,
        now=obs.at,
        emergency=head.emergency,
        trailer=cfg.emergency_trailer,
    )


def decide(
    prev: AgentState,
    obs: Observation,
    cfg: AgentConfig,
    compile: Compile,
    tests: RunTests = run_tests,
) -> Decision:
    """The cycle's decision: a pure function of the observation, the state and the config.

    A head is judged (and its PolicyTests run through `tests`) only in the cycle that
    fetched it; later cycles keep the verdict."""
    st, logs = take_inventory(prev, obs, cfg.cell)
    st, changed = note_source(replace(st, applied=obs.applied), cfg, obs.now)
    logs.extend([changed] if changed is not None else [])
    head, attempted = st.head, st.attempted
    judge = partial(
        judge_head,
        applied=obs.applied,
        inventory=st.inventory,
        settings=obs.settings,
        cfg=cfg,
        compile=compile,
        tests=tests,
    )  # a head and a pinned revision go through the same gates
    if obs.head is not None:
        head = judge(obs.head)
        attempted = obs.head.sha
        if head.tests is not None and head.tests.failures:
            logs.append(
                Log(
                    {
                        "event": "policy-tests-failed",
                        "cell": cfg.cell,
                        "revision": cfg.revision(head.sha),
                        **head.tests.to_log(),
                    }
                )
            )
    # An inventory cycle does not fetch: the last sync's verdict on the source stands.
    source_error = obs.source_error if obs.trigger == SYNC else st.source_error
    st = replace(st, head=head, attempted=attempted, source_error=source_error)
    pin = pinned_sha(head, st.applied)
    pinned = st.pinned if st.pinned is not None and st.pinned.sha == pin else None
    if pin is not None and obs.pinned is not None and obs.pinned.sha == pin:
        pinned = judge(obs.pinned)
    candidate = head if pin is None else pinned
    hold, soaking = held_back(candidate, replace(st, pinned=pinned), obs, cfg, pin)
    st = replace(st, pinned=pinned, hold=hold, soaking=soaking)
    made = Decision(obs.trigger, obs.now, st, logs=tuple(logs), hold=hold)

    target = choose_target(None if hold is not None else candidate, st.applied)
    if target is None:
        why = "" if source_error is None else f" ({source_error.reason})"
        return replace(made, waiting=f"no revision applied yet{why}")
    made = replace(made, target=target)
    if st.inventory is None:
        return replace(made, waiting=f"no valid container metadata yet ({st.inventory_error})")
    problem = None if obs.underlay_error is None else Problem(UNDERLAY_UNKNOWN, obs.underlay_error)
    applied = st.applied
    if (
        applied is not None
        and applied.plan is not None
        and applied.sha == target.sha
        and applied.inventory == st.inventory
        and obs.underlay_error is None
        and applied.plan.settings == obs.settings
    ):
        plan = applied.plan  # nothing moved: the idle cycle only checks the kernel
    else:
        try:
            plan = compile(target.policy, st.inventory, obs.settings)
        except PlanError as exc:  # two contents under one name: keep what is installed
            problem = Problem(PLAN_REFUSED, str(exc))
    if problem is not None:  # what is installed stays: better than judging the wrong traffic
        return replace(made, problem=problem)
    return replace(
        made,
        converge=Converge(
            plan,
            applied.plan if applied is not None else None,
            heal_drift=cfg.heal_drift,
            defer_install_verify=not cfg.once,
        ),
    )


# -- settling what was done ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The next state and the log lines the report step writes, in order."""

    state: AgentState
    logs: tuple[Log, ...] = ()


def foreign_chains(
    before: tuple[tuple[int, str], ...], result: ConvergeResult, cell: str
) -> tuple[tuple[tuple[int, str], ...], Log | None]:
    """The chains with our name prefix that we did not create (the host's own `ASG-...`
    chains), which the dataplane leaves alone, and a log line when they appear or change
    (not every cycle).  A plan that needs one of their names fails the cycle instead
    (OwnershipError, reported as EnforcementFailed)."""
    foreign = tuple((f.family, n) for f in result.families for n in f.delta.foreign)
    if foreign == before or not foreign:
        return foreign, None
    return foreign, Log(
        {
            "event": "foreign-chains",
            "cell": cell,
            "chains": [f"ipv{family} {name}" for family, name in foreign],
            "message": "chains with asgctl's name prefix but not its ownership marker, "
            "not created by the last plan applied: someone else's, left alone",
        }
    )


def ready_transition(before: AgentState, after: AgentState, cell: str) -> Log | None:
    """A log line when Ready changes status or reason; None otherwise (silence when idle)."""
    old = condition(before.conditions, READY)
    new = condition(after.conditions, READY)
    if new is None or (old is not None and (old.status, old.reason) == (new.status, new.reason)):
        return None
    record: dict[str, Any] = {
        "event": "ready-changed",
        "cell": cell,
        "status": new.status,
        "reason": new.reason,
        "message": new.message,
    }
    if after.head is not None and after.head.verdict is not None:
        record["findings"] = [str(f) for f in after.head.verdict.findings[:20]]
    return Log(record)


def settle(
    decision: Decision,
    done: ConvergeResult | Problem | None,
    cfg: AgentConfig,
    *,
    applied_at: str,
    elapsed: float,
) -> Outcome:
    """The next state from the decision and what enforcing it did (`done`: the dataplane's
    result, the Problem that kept it from running, or None when nothing was to converge).

    `applied_at` stamps a revision newly applied; `elapsed` is the cycle's duration so far,
    for the history.
    """
    st = decision.state
    now = decision.now
    applied = st.applied
    enforce_error = decision.problem
    drift_log = list(st.drift_log)
    corrections = st.drift_corrections
    drift_notes: tuple[str, ...] = ()
    drift_repaired = True
    logs: list[Log] = []
    if isinstance(done, Problem):
        enforce_error = done
    elif done is not None:
        action, target, inventory = decision.converge, decision.target, st.inventory
        if action is None or target is None or inventory is None:
            raise ValueError("a dataplane result for a cycle that decided not to converge")
        foreign, note = foreign_chains(st.foreign_chains, done, cfg.cell)
        logs.extend([note] if note is not None else [])
        st = replace(st, backend=done.backend, foreign_chains=foreign)
        for fam in done.families:
            for d in fam.delta.drift:
                repaired = fam.sent and d.repair and fam.error is None
                drift_repaired = drift_repaired and repaired
                corrections += 1 if repaired else 0
                drift_log.insert(
                    0,
                    {
                        "time": now,
                        "family": d.family,
                        "chain": d.chain,
                        "what": d.what,
                        "repaired": repaired,
                    },
                )
        drift_notes = tuple(str(d) for d in done.drift)
        plan = action.plan
        if done.ok:
            changed = (
                applied is None or applied.sha != target.sha or applied.digest != plan.digest()
            )
            if changed or applied is None or applied.plan is None:
                logs.extend(
                    Log(record, "out")
                    for record in container_changes(
                        applied.plan if applied is not None else None,
                        plan,
                        cell=cfg.cell,
                        revision=cfg.revision(target.sha),
                        directory=target.policy.directory,
                    )
                )
            head = st.head
            from_head = head is not None and head.verdict is None and head.sha == target.sha
            applied = Applied(
                target.sha,
                plan.digest(),
                applied_at if changed or applied is None else applied.at,
                inventory,
                target.policy,
                plan,
                # A head is the configured source's; the old revision again, its own source's.
                current_source(cfg) if from_head or applied is None else applied.source,
            )
        else:
            errors = [f"ipv{f.family}: {f.error}" for f in done.families if f.error]
            enforce_error = Problem(ENFORCEMENT_FAILED, "; ".join(errors))

    head, source_error = st.head, st.source_error
    view = CycleView(
        verify_enabled=cfg.verify == "signed",
        applied_revision=cfg.revision(applied.sha) if applied else None,
        head_revision=cfg.revision(head.sha) if head else None,
        source_error=source_error,
        refusal=head.verdict if head is not None else None,
        signature=head.signature if head is not None else None,
        enforce_error=enforce_error,
        inventory_error=st.inventory_error,
        inventory_rejected=len(st.inventory_rejected),
        waiting_for=decision.waiting,
        drift=drift_notes,
        drift_repaired=drift_repaired,
        heal_drift=cfg.heal_drift,
        hold=st.hold,
    )
    conditions = merge_conditions(st.conditions, cycle_conditions(view), now)
    ready = condition(conditions, READY)
    if decision.trigger == SYNC:
        failures = st.failures + 1 if source_error or enforce_error else 0
    else:  # only a sync can show the source has recovered
        failures = st.failures + 1 if enforce_error else st.failures if source_error else 0
    after = replace(
        st,
        applied=applied,
        conditions=conditions,
        drift_corrections=corrections,
        drift_log=tuple(drift_log[:DRIFT_LOG_LIMIT]),
        failures=failures,
        last_sync=now,
        last_success=now if ready and ready.status == TRUE else st.last_success,
        enforce_error=enforce_error,
    )
    if applied is not None and ready is not None:
        after = replace(
            after,
            history=add_history(
                after.history,
                cfg.revision(applied.sha),
                applied.digest,
                ready.reason,
                now,
                elapsed,
            ),
        )
    transition = ready_transition(decision.state, after, cfg.cell)
    return Outcome(after, (*logs, *([transition] if transition is not None else [])))


def restored_applied(applied: Applied, policy: PolicySet, plan: CellPlan) -> Applied:
    """The applied revision after a restart, its policy loaded again from the cache.

    A plan compiled otherwise than what was applied (an upgrade that renamed chains, such as
    the move to 128-bit ids) is not the last plan: the kernel holds the old version's chains,
    so there is nothing to tell drift from change, and every difference is a change.
    """
    if applied.digest and plan.digest() != applied.digest:
        return replace(applied, policy=policy, plan=None)
    return replace(applied, policy=policy, plan=plan)
