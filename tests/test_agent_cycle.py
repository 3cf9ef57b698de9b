"""The agent cycle's decisions as tables: what was observed and the state before -> what is
decided, and what the dataplane did -> the next state.

No git, no kernel, no clock: `decide`, `next_need`, `judge_head` and `settle` are pure, so
each gate, each reason to wait and each outcome is one row here.  The agent that gathers the
observations and carries out the decisions is tested end to end in test_agent_loop.py and
test_agent_e2e.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.agent.conditions import (
    DATAPLANE_UNAVAILABLE,
    DRIFT_CORRECTED,
    DRIFTED,
    ENFORCEMENT_FAILED,
    FALSE,
    HISTORY_REWRITTEN,
    MALFORMED_COMMIT,
    MASS_REVOKE_BLOCKED,
    PLAN_REFUSED,
    PROGRESSING,
    PROGRESSING_WITH_RETRY,
    READY,
    RECONCILIATION_SUCCEEDED,
    RECONCILING,
    REFUSALS,
    STALLED,
    TRUE,
    UNDERLAY_UNKNOWN,
    UNSIGNED_COMMIT,
    UNTRUSTED_SIGNATURE,
    VALIDATION_FAILED,
    VERIFICATION_FAILED,
)
from reconciler.agent.config import AgentConfig, build_config
from reconciler.agent.core import Problem, condition
from reconciler.agent.cycle import (
    INVENTORY,
    SYNC,
    Converge,
    Decision,
    HeadFacts,
    HeadTrust,
    Need,
    Observation,
    Target,
    decide,
    inventory_unchanged,
    judge_head,
    next_need,
    settle,
)
from reconciler.agent.source import CommitInfo
from reconciler.agent.state import DRIFT_LOG_LIMIT, AgentState, Applied, Head
from reconciler.agent.verify import SignatureCheck, SignatureVerifier
from reconciler.backends import ConvergeResult, Drift, FamilyResult
from reconciler.backends.iptables.delta import IptablesDelta as Delta
from reconciler.core.cellplan import CellPlan, CellSettings, PlanError
from reconciler.core.compile import compile_cell
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup
from reconciler.policy.findings import Finding
from reconciler.policy.validate import Result
from reconciler.sources.cellstore import Rejection, StoreReading
from reconciler.status.document import Condition

CELL = "c1"
CFG = build_config({"source": "git://x/y.git", "containers": "/s.json", "cell": CELL}, {})
SIGNED = replace(CFG, verify="signed")
FLOOR_6 = replace(CFG, mass_revoke_min=6)
FLOOR_0 = replace(CFG, mass_revoke_min=0)
NOW = "2026-01-01T00:00:00.000Z"
APPLIED_SHA = "a" * 40
HEAD_SHA = "b" * 40
TRAILER = CFG.mass_revoke_trailer
SETTINGS = CFG.cell_settings()

INVENTORY_OF_TWO = (
    Container("c0", "198.18.0.2", "app-web", "space-a", "org-a", "", "app"),
    Container("c1", "198.18.0.3", "app-web", "space-a", "org-a", "", "app"),
)


def _policy(*ports: int) -> PolicySet:
    """One globally bound group allowing tcp to 198.19.0.1 on each port."""
    rules = tuple(
        Rule("tcp", (AddressRange.parse("198.19.0.1"),), (PortRange(p, p),)) for p in ports
    )
    return PolicySet(security_groups=(SecurityGroup("web", rules, running_default=True),))


def compile_plan(
    policy: PolicySet, inventory: tuple[Container, ...], settings: CellSettings
) -> CellPlan:
    return compile_cell(policy, inventory, CELL, settings)


def must_not_compile(
    policy: PolicySet, inventory: tuple[Container, ...], settings: CellSettings
) -> CellPlan:
    raise AssertionError("compiled although nothing moved")


OLD = _policy(1, 2, 3, 4)
OLD_PLAN = compile_plan(OLD, INVENTORY_OF_TWO, SETTINGS)
APPLIED = Applied(APPLIED_SHA, OLD_PLAN.digest(), "t0", INVENTORY_OF_TWO, OLD, OLD_PLAN)
BEFORE = AgentState(applied=APPLIED, inventory=INVENTORY_OF_TWO)
READING = StoreReading(INVENTORY_OF_TWO)


def _commit(message: str = "change", signed: bool = False) -> CommitInfo:
    return CommitInfo(HEAD_SHA, message, "a <a@x>", 0, signed)


def _facts(
    policy: PolicySet | None = None,
    *,
    message: str = "change",
    signature: SignatureCheck | None = None,
    descends: bool | None = True,
    findings: tuple[Finding, ...] = (),
) -> HeadFacts:
    """A head read as far as every gate needs."""
    return HeadFacts(
        HEAD_SHA,
        commit=_commit(message, signature is not None),
        trust=HeadTrust(signature, descends),
        revision=Result(policy if policy is not None else OLD, findings),
        cache_intact=True if findings else None,
    )


def _obs(
    head: HeadFacts | None = None,
    *,
    trigger: Any = SYNC,
    applied: Applied | None = APPLIED,
    reading: StoreReading | None = READING,
    inventory_error: str | None = None,
    source_error: Problem | None = None,
    underlay_error: str | None = None,
) -> Observation:
    return Observation(
        trigger=trigger,
        now=NOW,
        reading=reading,
        inventory_error=inventory_error,
        applied=applied,
        settings=SETTINGS,
        underlay_error=underlay_error,
        source_error=source_error,
        head=head,
    )


ERROR = Finding("sg.yaml", 3, 5, "error", "SecurityGroup", "web", "rules[0].ports", "bad port")
TRUSTED = SignatureCheck(True, "Succeeded", "signed by ops", "ops")
UNSIGNED = SignatureCheck(False, UNSIGNED_COMMIT, "commit bbbbbbbbbbbb is not signed")
UNTRUSTED = SignatureCheck(False, UNTRUSTED_SIGNATURE, "signed, but not by a trusted key")


# -- which facts are read, in which order ----------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "need"),
    [
        (HeadFacts(HEAD_SHA), Need.COMMIT),
        (HeadFacts(HEAD_SHA, malformed="oversized"), None),
        (HeadFacts(HEAD_SHA, commit=_commit()), Need.TRUST),
        # A bad signature or a rewind ends the reading: the files are never parsed.
        (HeadFacts(HEAD_SHA, commit=_commit(), trust=HeadTrust(UNSIGNED, True)), None),
        (HeadFacts(HEAD_SHA, commit=_commit(), trust=HeadTrust(None, False)), None),
        (
            HeadFacts(HEAD_SHA, commit=_commit(), trust=HeadTrust(TRUSTED, True)),
            Need.REVISION,
        ),
        # A head that fails validation makes the agent check its cache before blaming it.
        (replace(_facts(findings=(ERROR,)), cache_intact=None), Need.CACHE_CHECK),
        (_facts(findings=(ERROR,)), None),
        (_facts(), None),
    ],
    ids=[
        "commit-first",
        "malformed-stops",
        "then-provenance",
        "unsigned-stops",
        "rewind-stops",
        "then-revision",
        "invalid-checks-cache",
        "invalid-cache-ok",
        "complete",
    ],
)
def test_the_gates_ask_for_one_fact_at_a_time(facts: HeadFacts, need: Need | None) -> None:
    assert next_need(facts, APPLIED_SHA, allow_rewind=False) is need


def test_a_rewind_is_read_on_when_rewinds_are_allowed() -> None:
    facts = HeadFacts(HEAD_SHA, commit=_commit(), trust=HeadTrust(None, False))
    assert next_need(facts, APPLIED_SHA, allow_rewind=True) is Need.REVISION


# -- the gates, in order ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "cfg", "reason"),
    [
        (HeadFacts(HEAD_SHA, malformed="a NUL in the header"), CFG, MALFORMED_COMMIT),
        (_facts(signature=UNSIGNED), SIGNED, UNSIGNED_COMMIT),
        (_facts(signature=UNTRUSTED), SIGNED, UNTRUSTED_SIGNATURE),
        (_facts(descends=False), CFG, HISTORY_REWRITTEN),
        (_facts(descends=False), replace(CFG, allow_rewind=True), None),
        (_facts(findings=(ERROR,)), CFG, VALIDATION_FAILED),
        (_facts(findings=(replace(ERROR, severity="warning"),)), CFG, None),
        # 6 of 8 (container, rule) pairs go: over 50%, and over a floor of 6 (core/gate.py)
        (_facts(_policy(1)), FLOOR_6, MASS_REVOKE_BLOCKED),
        (_facts(_policy(1), message=f"Cut\n\n{TRAILER}: true"), FLOOR_6, None),
        (_facts(_policy(1)), CFG, None),  # the same 6 pairs: under the default floor of 100
        (_facts(_policy()), CFG, MASS_REVOKE_BLOCKED),  # all access to nothing: floor or not
        (_facts(_policy(2, 3, 4, 5)), FLOOR_0, None),  # 1 swapped for 5: nothing taken away
        (_facts(_policy(1, 2)), FLOOR_0, None),  # half: not more than the 50% threshold
        (_facts(_policy(1, 2, 3, 4, 5), signature=TRUSTED), SIGNED, None),
    ],
    ids=[
        "malformed",
        "unsigned",
        "untrusted",
        "rewound",
        "rewind-allowed",
        "invalid",
        "warnings-only",
        "mass-revoke",
        "mass-revoke-override",
        "under-the-floor",
        "all-to-nothing",
        "port-swap",
        "revoke-at-threshold",
        "signed-and-growing",
    ],
)
def test_each_gate_decides_whether_a_head_is_applied(
    facts: HeadFacts, cfg: AgentConfig, reason: str | None
) -> None:
    d = decide(BEFORE, _obs(facts), cfg, compile_plan)
    head = d.state.head
    assert head is not None and head.sha == HEAD_SHA and d.state.attempted == HEAD_SHA
    if reason is None:
        assert head.verdict is None and head.policy is facts.revision.policy  # type: ignore[union-attr]
        assert d.target == Target(HEAD_SHA, head.policy)
    else:
        assert head.verdict is not None and head.verdict.reason == reason
        assert reason in REFUSALS
        # Refused: the applied revision stays the one enforced.
        assert d.target == Target(APPLIED_SHA, OLD)
    assert d.converge is not None and d.problem is None and d.waiting is None


def test_a_malformed_commit_is_the_signature_verdict_only_when_signatures_are_checked() -> None:
    facts = HeadFacts(HEAD_SHA, malformed="a NUL in the header")
    off = decide(BEFORE, _obs(facts), CFG, compile_plan).state.head
    on = decide(BEFORE, _obs(facts), SIGNED, compile_plan).state.head
    assert off is not None and off.signature is None and off.subject == ""
    assert on is not None and on.signature == SignatureCheck(
        False, MALFORMED_COMMIT, "a NUL in the header"
    )


def test_findings_name_repository_paths() -> None:
    head = decide(BEFORE, _obs(_facts(findings=(ERROR,))), CFG, compile_plan).state.head
    assert head is not None and head.verdict is not None
    assert [f.file for f in head.verdict.findings] == ["policies/sg.yaml"]
    top = replace(CFG, policies_path=".")
    head = decide(BEFORE, _obs(_facts(findings=(ERROR,))), top, compile_plan).state.head
    assert head is not None and head.verdict is not None
    assert [f.file for f in head.verdict.findings] == ["sg.yaml"]


def test_a_head_whose_plan_cannot_be_built_is_refused() -> None:
    new = _policy(1, 2, 3, 4, 5)

    def refuse_new(p: PolicySet, inv: tuple[Container, ...], s: CellSettings) -> CellPlan:
        if p is new:
            raise PlanError("two contents under one id")
        return compile_plan(p, inv, s)

    d = decide(BEFORE, _obs(_facts(new)), CFG, refuse_new)
    assert d.state.head is not None and d.state.head.verdict is not None
    assert d.state.head.verdict.reason == PLAN_REFUSED
    assert d.target == Target(APPLIED_SHA, OLD)


def test_without_an_applied_revision_there_is_nothing_to_revoke() -> None:
    first = AgentState(inventory=INVENTORY_OF_TWO)
    d = decide(first, _obs(_facts(_policy(1)), applied=None), CFG, compile_plan)
    assert d.state.head is not None and d.state.head.verdict is None
    assert d.converge is not None and d.converge.last is None


def test_judging_a_head_that_was_not_read_far_enough_is_a_bug() -> None:
    with pytest.raises(ValueError, match="commit and trust"):
        judge_head(
            HeadFacts(HEAD_SHA, commit=_commit()),
            applied=APPLIED,
            inventory=INVENTORY_OF_TWO,
            settings=SETTINGS,
            cfg=CFG,
            compile=compile_plan,
        )


# -- what to enforce, or why nothing is ------------------------------------------------------


def test_nothing_applied_yet_waits_and_says_why() -> None:
    empty = AgentState()
    d = decide(empty, _obs(applied=None), CFG, must_not_compile)
    assert (d.target, d.converge, d.waiting) == (None, None, "no revision applied yet")
    down = Problem("GitUnreachable", "connection refused")
    d = decide(empty, _obs(applied=None, source_error=down), CFG, must_not_compile)
    assert d.waiting == "no revision applied yet (GitUnreachable)"
    assert d.state.source_error == down


def test_no_valid_metadata_yet_waits() -> None:
    st = AgentState(applied=APPLIED)
    d = decide(
        st, _obs(reading=None, inventory_error="store.json:1:1: not JSON"), CFG, must_not_compile
    )
    assert d.converge is None and d.target == Target(APPLIED_SHA, OLD)
    assert d.waiting == "no valid container metadata yet (store.json:1:1: not JSON)"


def test_an_unknown_underlay_converges_nothing() -> None:
    d = decide(BEFORE, _obs(underlay_error="no default route"), CFG, compile_plan)
    assert d.converge is None and d.problem == Problem(UNDERLAY_UNKNOWN, "no default route")


def test_an_idle_cycle_reuses_the_applied_plan_without_compiling() -> None:
    d = decide(BEFORE, _obs(), CFG, must_not_compile)
    assert d.converge == Converge(OLD_PLAN, OLD_PLAN, heal_drift=True, defer_install_verify=True)
    once = decide(BEFORE, _obs(), replace(CFG, once=True, heal_drift=False), must_not_compile)
    assert once.converge == Converge(
        OLD_PLAN, OLD_PLAN, heal_drift=False, defer_install_verify=False
    )


def test_new_containers_recompile_the_applied_revision() -> None:
    three = (*INVENTORY_OF_TWO, Container("c2", "198.18.0.4", "app-web", "space-a", "org-a"))
    d = decide(BEFORE, _obs(reading=StoreReading(three)), CFG, compile_plan)
    assert d.converge is not None and d.converge.last is OLD_PLAN
    assert len(d.converge.plan.containers) == 3
    assert d.state.inventory == three and d.state.inventory_at == NOW


def test_the_applied_revision_meeting_a_name_clash_keeps_what_is_installed() -> None:
    def clash(p: PolicySet, inv: tuple[Container, ...], s: CellSettings) -> CellPlan:
        raise PlanError("two contents under one id")

    three = (*INVENTORY_OF_TWO, Container("c2", "198.18.0.4", "app-web", "space-a", "org-a"))
    d = decide(BEFORE, _obs(reading=StoreReading(three)), CFG, clash)
    assert d.converge is None and d.problem == Problem(PLAN_REFUSED, "two contents under one id")


def test_an_inventory_cycle_keeps_the_last_syncs_head_and_source_error() -> None:
    down = Problem("GitUnreachable", "connection refused")
    refused = Head(HEAD_SHA, "s", None, None)
    st = replace(BEFORE, head=refused, attempted=HEAD_SHA, source_error=down)
    d = decide(st, _obs(trigger=INVENTORY), CFG, must_not_compile)
    assert (d.state.head, d.state.attempted, d.state.source_error) == (refused, HEAD_SHA, down)
    # A sync that fetched clears it.
    assert decide(st, _obs(), CFG, must_not_compile).state.source_error is None


@pytest.mark.parametrize(
    ("prev", "reading", "error", "unchanged"),
    [
        (BEFORE, StoreReading(INVENTORY_OF_TWO), None, True),
        (BEFORE, StoreReading(INVENTORY_OF_TWO[:1]), None, False),
        (replace(BEFORE, inventory_error="bad"), StoreReading(INVENTORY_OF_TWO), None, False),
        (replace(BEFORE, inventory_error="bad"), None, "bad", True),
        (replace(BEFORE, inventory_error="bad"), None, "worse", False),
        (
            BEFORE,
            StoreReading(INVENTORY_OF_TWO, (Rejection("skipped", "h", "", "no ip"),)),
            None,
            False,
        ),
    ],
    ids=["same", "fewer", "recovered", "same-error", "other-error", "new-rejection"],
)
def test_an_inventory_notification_without_a_change_does_nothing(
    prev: AgentState, reading: StoreReading | None, error: str | None, unchanged: bool
) -> None:
    assert inventory_unchanged(prev, reading, error) is unchanged


def test_entries_not_used_as_written_are_logged_once() -> None:
    skipped = Rejection("skipped", "h9", "", "no ip")
    reading = StoreReading(INVENTORY_OF_TWO, (skipped,))
    d = decide(BEFORE, _obs(reading=reading), CFG, must_not_compile)
    assert [dict(x.record) for x in d.logs] == [
        {"event": "inventory-entry-rejected", "cell": CELL, **skipped.to_dict()}
    ]
    assert decide(d.state, _obs(reading=reading), CFG, must_not_compile).logs == ()
    # Unusable metadata keeps the last good inventory and its rejections.
    bad = decide(d.state, _obs(reading=None, inventory_error="bad"), CFG, must_not_compile)
    assert bad.state.inventory == INVENTORY_OF_TWO and bad.state.inventory_rejected == (skipped,)


# -- settling what the dataplane did ----------------------------------------------------------


def _result(*families: FamilyResult) -> ConvergeResult:
    return ConvergeResult("memory", "apply", families or (FamilyResult(4, Delta(4)),))


def _settle(d: Decision, done: ConvergeResult | Problem | None) -> AgentState:
    return settle(d, done, CFG, applied_at="t1", elapsed=0.5).state


def _conds(st: AgentState) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in st.conditions}


def test_a_new_head_converged_becomes_the_applied_revision_and_logs_its_changes() -> None:
    d = decide(BEFORE, _obs(_facts(_policy(1, 2, 3, 4, 5))), CFG, compile_plan)
    assert d.converge is not None
    out = settle(d, _result(), CFG, applied_at="t1", elapsed=0.5)
    a = out.state.applied
    assert a is not None and (a.sha, a.at, a.plan) == (HEAD_SHA, "t1", d.converge.plan)
    changes = [x for x in out.logs if x.stream == "out"]
    assert [(x.record["handle"], x.record["rules_added"]) for x in changes] == [
        ("c0", 1),
        ("c1", 1),
    ]
    assert _conds(out.state)[READY] == (TRUE, RECONCILIATION_SUCCEEDED)
    assert out.state.failures == 0 and out.state.last_success == NOW
    assert out.state.enforce_error is None
    assert out.state.history[0].revision == CFG.revision(HEAD_SHA)
    assert [x.record["event"] for x in out.logs if x.stream == "err"] == ["ready-changed"]


def test_an_idle_cycle_keeps_the_applied_time_and_logs_nothing() -> None:
    ready = Condition(READY, TRUE, RECONCILIATION_SUCCEEDED, "", "t0")
    st = replace(BEFORE, conditions=(ready,))
    out = settle(
        decide(st, _obs(), CFG, must_not_compile), _result(), CFG, applied_at="t1", elapsed=0.1
    )
    assert out.state.applied is not None and out.state.applied.at == "t0"
    assert out.logs == ()


@pytest.mark.parametrize(
    ("done", "reason"),
    [
        (Problem(DATAPLANE_UNAVAILABLE, "no iptables"), DATAPLANE_UNAVAILABLE),
        (_result(FamilyResult(4, Delta(4), error="restore failed")), ENFORCEMENT_FAILED),
    ],
    ids=["unavailable", "failed"],
)
def test_a_dataplane_failure_is_retried_and_keeps_the_applied_revision(
    done: ConvergeResult | Problem, reason: str
) -> None:
    d = decide(replace(BEFORE, failures=2), _obs(_facts(_policy(1, 2, 3, 4, 5))), CFG, compile_plan)
    out = settle(d, done, CFG, applied_at="t1", elapsed=0.5)
    assert out.state.applied is not None and out.state.applied.sha == APPLIED_SHA
    conds = _conds(out.state)
    assert conds[READY] == (FALSE, reason)
    assert conds[RECONCILING] == (TRUE, PROGRESSING_WITH_RETRY)
    assert conds[STALLED][0] == FALSE
    assert out.state.failures == 3 and out.state.enforce_error == (
        done if isinstance(done, Problem) else Problem(ENFORCEMENT_FAILED, "ipv4: restore failed")
    )


def test_a_refusal_stalls_without_counting_as_a_failure_to_retry() -> None:
    d = decide(replace(BEFORE, failures=2), _obs(_facts(descends=False)), CFG, compile_plan)
    st = _settle(d, _result())
    assert _conds(st)[READY] == (FALSE, HISTORY_REWRITTEN)
    assert _conds(st)[STALLED] == (TRUE, HISTORY_REWRITTEN)
    assert st.failures == 0


def test_an_inventory_cycle_never_clears_the_back_off_of_a_source_still_down() -> None:
    down = Problem("GitUnreachable", "connection refused")
    st = replace(BEFORE, failures=3, source_error=down)
    assert (
        _settle(decide(st, _obs(trigger=INVENTORY), CFG, must_not_compile), _result()).failures == 3
    )
    failed = Problem(DATAPLANE_UNAVAILABLE, "x")
    assert _settle(decide(st, _obs(trigger=INVENTORY), CFG, must_not_compile), failed).failures == 4
    ok = replace(BEFORE, failures=3)
    assert (
        _settle(decide(ok, _obs(trigger=INVENTORY), CFG, must_not_compile), _result()).failures == 0
    )


def test_waiting_is_progressing_not_failing() -> None:
    st = _settle(decide(AgentState(), _obs(applied=None), CFG, must_not_compile), None)
    assert _conds(st)[READY] == (FALSE, PROGRESSING)
    assert _conds(st)[RECONCILING] == (TRUE, PROGRESSING)
    assert st.failures == 0 and st.history == ()


def test_the_drift_log_keeps_the_newest_entries_up_to_its_limit() -> None:
    drift = tuple(Drift(4, f"ASG-G-{i:02d}", "rule added") for i in range(DRIFT_LOG_LIMIT + 3))
    done = _result(FamilyResult(4, Delta(4, ops=("x",), drift=drift), sent=True))
    st = _settle(decide(BEFORE, _obs(), CFG, must_not_compile), done)
    assert len(st.drift_log) == DRIFT_LOG_LIMIT
    assert st.drift_log[0]["chain"] == f"ASG-G-{DRIFT_LOG_LIMIT + 2:02d}"  # newest first
    assert st.drift_corrections == DRIFT_LOG_LIMIT + 3
    assert _conds(st)[DRIFTED] == (TRUE, DRIFT_CORRECTED)


def test_foreign_chains_are_logged_when_they_appear_or_change_only() -> None:
    def foreign(*names: str) -> ConvergeResult:
        return _result(FamilyResult(4, Delta(4, foreign=names)))

    def logged(st: AgentState, done: ConvergeResult) -> tuple[AgentState, list[dict[str, Any]]]:
        out = settle(
            decide(st, _obs(), CFG, must_not_compile), done, CFG, applied_at="t", elapsed=0
        )
        return out.state, [
            dict(x.record) for x in out.logs if x.record["event"] == "foreign-chains"
        ]

    st, first = logged(BEFORE, foreign("ASG-HOST"))
    assert [x["chains"] for x in first] == [["ipv4 ASG-HOST"]]
    st, again = logged(st, foreign("ASG-HOST"))
    assert again == []
    st, more = logged(st, foreign("ASG-HOST", "ASG-OTHER"))
    assert [x["chains"] for x in more] == [["ipv4 ASG-HOST", "ipv4 ASG-OTHER"]]


def test_a_result_for_a_cycle_that_did_not_converge_is_a_bug() -> None:
    d = decide(AgentState(), _obs(applied=None), CFG, must_not_compile)
    with pytest.raises(ValueError, match="decided not to converge"):
        settle(d, _result(), CFG, applied_at="t", elapsed=0)


def test_the_conditions_are_listed_in_condition_type_order() -> None:
    from reconciler.agent.conditions import CONDITION_TYPES

    st = _settle(decide(BEFORE, _obs(), CFG, must_not_compile), _result())
    assert tuple(c.type for c in st.conditions) == CONDITION_TYPES
    assert condition(st.conditions, READY) is st.conditions[0]


def test_the_verifiers_refusals_are_the_reasons_named_here(tmp_path: Path) -> None:
    """The verifier spells its reasons itself; they must be the ones REFUSALS lists."""
    verifier = SignatureVerifier(str(tmp_path / "no-such-signers"), None, tmp_path)
    unsigned = verifier.verify(tmp_path, HEAD_SHA, signed=False)
    unreadable = verifier.verify(tmp_path, HEAD_SHA, signed=True)
    assert (unsigned.reason, unreadable.reason) == (UNSIGNED_COMMIT, VERIFICATION_FAILED)
    assert {unsigned.reason, unreadable.reason} <= set(REFUSALS)
