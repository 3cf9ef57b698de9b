"""The agent's pure core: settings, gates, conditions, history, change logs, status, metrics.

No git, no kernel: these are the decisions that keep a fleet safe, checked as functions of
plain values.
"""

from __future__ import annotations

import pytest

from reconciler.agent.config import (
    AgentConfig,
    ConfigError,
    build_config,
    file_gate_settings,
    parse_duration,
    parse_share,
    redact_url,
)
from reconciler.agent.core import (
    CycleView,
    Problem,
    Refusal,
    add_history,
    ancestry_verdict,
    container_changes,
    cycle_conditions,
    merge_conditions,
    revoke_verdict,
    signature_verdict,
    validation_verdict,
)
from reconciler.agent.loop import next_delay
from reconciler.agent.metrics import Metrics
from reconciler.agent.state import AgentState, Applied, Head, from_persisted, to_persisted
from reconciler.agent.status import build_status, fingerprint
from reconciler.agent.verify import SignatureCheck, parse_trailers, trailer_true
from reconciler.core.cellplan import DEFAULT_GATE, GateSettings
from reconciler.core.compile import compile_cell
from reconciler.core.gate import RevokeCount, revoke_count
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup
from reconciler.policy.findings import Finding
from reconciler.status.document import Condition, containers_from_status
from reconciler.status.write import dump_status

BASE = {"source": "git://x/y.git", "containers": "/s.json", "cell": "c1"}


# -- settings ------------------------------------------------------------------------------


def test_durations_and_shares() -> None:
    assert parse_duration("60s", "k") == 60
    assert parse_duration("1.5m", "k") == 90
    assert parse_duration("250ms", "k") == 0.25
    assert parse_duration(3, "k") == 3
    assert parse_share("10%", "k") == pytest.approx(0.1)
    assert parse_share(0.5, "k") == 0.5
    for bad in ("soon", "-1s", True):
        with pytest.raises(ConfigError):
            parse_duration(bad, "k")
    with pytest.raises(ConfigError):
        parse_share("150%", "k")


def test_flags_override_the_file_and_file_overrides_defaults() -> None:
    cfg = build_config(
        {**BASE, "interval": "30s", "jitter": "5%", "allow-rewind": True},
        {"interval": "2s", "jitter": None, "allow_rewind": None},
    )
    assert cfg.interval == 2 and cfg.jitter == pytest.approx(0.05) and cfg.allow_rewind
    assert cfg.fetch_depth == 1 and cfg.mass_revoke_threshold == 0.5
    assert cfg.status_branch == "status/c1"


def test_config_mistakes_are_errors_not_silence() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'alow-rewind'"):
        build_config({**BASE, "alow-rewind": True}, {})
    with pytest.raises(ConfigError, match="source: required"):
        build_config({"containers": "/s"}, {})
    with pytest.raises(ConfigError, match="allowed-signers"):
        build_config({**BASE, "verify": "signed"}, {})
    with pytest.raises(ConfigError, match="status branch"):
        build_config({**BASE, "branch": "status/c2"}, {})
    with pytest.raises(ConfigError, match="cell"):
        build_config({**BASE, "cell": "../x"}, {})
    with pytest.raises(ConfigError, match="backend: 'nft' is not one of iptables, libiptc"):
        build_config({**BASE, "backend": "nft"}, {})
    with pytest.raises(ConfigError, match="variant: 'legacyy'"):
        build_config({**BASE, "variant": "legacyy"}, {})


def test_the_mass_revoke_floor_is_a_whole_number_from_the_file_or_the_flag() -> None:
    assert build_config(BASE, {}).mass_revoke_min == 100
    cfg = build_config({**BASE, "mass-revoke-min": 20}, {"mass_revoke_min": 0})
    assert cfg.mass_revoke_min == 0  # the flag wins, and 0 (no floor) is allowed
    assert cfg.gate == GateSettings(0.5, 0, "Asgctl-Allow-Mass-Revoke")
    for bad in (-1, "ten", "100", 1.5, True):
        with pytest.raises(ConfigError, match=r"^mass-revoke-min: expected a whole number >= 0"):
            build_config({**BASE, "mass-revoke-min": bad}, {})
    with pytest.raises(ConfigError, match="mass-revoke-trailer: a trailer key"):
        build_config({**BASE, "mass-revoke-trailer": "Allow\nMass-Revoke"}, {})


def test_status_shows_the_gate_settings_the_plan_judges_with() -> None:
    cfg = build_config({**BASE, "mass-revoke-min": 7, "mass-revoke-trailer": "Ok-Revoke"}, {})
    shown = cfg.public()
    assert (shown["massRevokeThreshold"], shown["massRevokeMin"]) == (0.5, 7)
    assert shown["massRevokeTrailer"] == "Ok-Revoke"


def test_an_agent_config_file_gives_the_plan_its_gate_settings() -> None:
    assert file_gate_settings({}) == DEFAULT_GATE
    values = {"mass-revoke-threshold": "30%", "mass-revoke-min": 5, "mass-revoke-trailer": "X-Ok"}
    assert file_gate_settings(values) == GateSettings(0.3, 5, "X-Ok")
    with pytest.raises(ConfigError, match="mass-revoke-min"):
        file_gate_settings({"mass-revoke-min": -3})
    with pytest.raises(ConfigError, match="mass-revoke-threshold"):
        file_gate_settings({"mass-revoke-threshold": "150%"})


def test_urls_lose_their_credentials_in_status() -> None:
    assert redact_url("https://bot:s3cret@git.example/p.git") == "https://***@git.example/p.git"
    assert redact_url("git://127.0.0.1:9/p.git") == "git://127.0.0.1:9/p.git"
    cfg = build_config({**BASE, "source": "https://u:p@h/r.git"}, {})
    assert "p@" not in str(cfg.public())


def test_retry_backs_off_exponentially_up_to_the_cap() -> None:
    cfg = AgentConfig(
        "s",
        "c",
        "/x",
        interval=60,
        jitter=0.1,
        retry_base=2,
        retry_cap=0,  # cap = interval
    )
    assert next_delay(cfg, 0, 0.0) == 60
    assert next_delay(cfg, 0, 0.999) == pytest.approx(65.994)
    assert [next_delay(cfg, n, 0.0) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


# -- gates ---------------------------------------------------------------------------------


def test_trailers_are_read_from_the_last_paragraph_only() -> None:
    msg = "Open everything\n\nBody text.\n\nAsgctl-Allow-Mass-Revoke: true\nSigned-off-by: A <a@x>"
    assert parse_trailers(msg)["asgctl-allow-mass-revoke"] == ["true"]
    assert trailer_true(msg, "Asgctl-Allow-Mass-Revoke")
    assert not trailer_true("Asgctl-Allow-Mass-Revoke: true", "Asgctl-Allow-Mass-Revoke")
    assert not trailer_true("x\n\nAsgctl-Allow-Mass-Revoke: no", "Asgctl-Allow-Mass-Revoke")
    assert not trailer_true(
        "x\n\nsays Asgctl-Allow-Mass-Revoke: true in prose", "Asgctl-Allow-Mass-Revoke"
    )


def test_signature_and_ancestry_gates() -> None:
    assert signature_verdict(None) is None
    assert signature_verdict(SignatureCheck(True, "Succeeded", "ok")) is None
    v = signature_verdict(SignatureCheck(False, "UnsignedCommit", "not signed"))
    assert v is not None and v.reason == "UnsignedCommit"
    assert ancestry_verdict(None, "b" * 40, None, False) is None
    assert ancestry_verdict("a" * 40, "b" * 40, True, False) is None
    assert ancestry_verdict("a" * 40, "b" * 40, False, True) is None
    v = ancestry_verdict("a" * 40, "b" * 40, False, False)
    assert v is not None and v.reason == "HistoryRewritten" and "aaaaaaaaaaaa" in v.message


def test_validation_gate_keeps_every_finding_with_its_line() -> None:
    findings = (
        Finding("sg.yaml", 4, 7, "error", "SecurityGroup", "web", "rules[0].ports", "bad"),
        Finding("sg.yaml", 9, 1, "warning", "", "", "", "meh"),
    )
    v = validation_verdict(findings)
    assert v is not None and v.reason == "ValidationFailed"
    assert "sg.yaml:4:7" in v.message and len(v.findings) == 2
    assert validation_verdict(findings[1:]) is None  # warnings alone never block


def _rule(dest: str, port: int) -> Rule:
    return Rule("tcp", (AddressRange.parse(dest),), (PortRange(port, port),))


def _policy(*dests: str) -> PolicySet:
    rules = tuple(_rule(d, 443) for d in dests)
    return PolicySet(security_groups=(SecurityGroup("web", rules, running_default=True),))


CONTAINERS = (
    Container("c1", "198.18.0.2", "app-1", "space-a", "org"),
    Container("c2", "198.18.0.6", "app-2", "space-a", "org"),
)


def test_mass_revoke_counts_access_per_container_and_honours_the_override() -> None:
    """Was: pairs by rule digest, 50% alone.  Now (core/gate.py): packets lost net of the
    same container's gains, over the share *and* the floor, or the cell emptied."""
    old = compile_cell(_policy("198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4"), CONTAINERS)
    half = compile_cell(_policy("198.19.0.1", "198.19.0.2"), CONTAINERS)
    most = compile_cell(_policy("198.19.0.1"), CONTAINERS)
    none = compile_cell(_policy(), CONTAINERS)
    assert revoke_count(old, half) == RevokeCount(4, 8, 4, 0, 2, False)
    assert revoke_count(old, most).share == 0.75
    no_floor = GateSettings(0.5, 0, "Asgctl-Allow-Mass-Revoke")
    assert revoke_verdict(revoke_count(old, half), no_floor, False) is None  # not *more* than
    v = revoke_verdict(revoke_count(old, most), no_floor, False)
    assert v is not None and v.reason == "MassRevokeBlocked" and "6 of the cell's 8" in v.message
    assert revoke_verdict(revoke_count(old, most), no_floor, True) is None
    assert revoke_verdict(revoke_count(old, most), DEFAULT_GATE, False) is None  # 6 < 100
    v = revoke_verdict(revoke_count(old, none), DEFAULT_GATE, False)  # emptied: floor or not
    assert v is not None and "all of the cell's access" in v.message
    assert revoke_verdict(revoke_count(None, most), no_floor, False) is None  # nothing to lose


# -- conditions and history ----------------------------------------------------------------


def _types(conds: list[tuple[str, str, str, str]]) -> dict[str, tuple[str, str]]:
    return {t: (s, r) for t, s, r, _ in conds}


def test_conditions_for_success_transient_failure_and_refusal() -> None:
    ok = _types(cycle_conditions(CycleView(False, "main@sha1:a", "main@sha1:a")))
    assert ok["Ready"] == ("True", "ReconciliationSucceeded")
    assert ok["Stalled"][0] == "False" and ok["Reconciling"][0] == "False"
    assert ok["SourceVerified"] == ("Unknown", "VerificationDisabled")
    assert ok["Drifted"] == ("False", "NoDrift")

    down = cycle_conditions(
        CycleView(True, "main@sha1:a", "main@sha1:a", source_error=Problem("GitUnreachable", "x"))
    )
    t = _types(down)
    assert t["Ready"] == ("False", "GitUnreachable")
    assert t["Reconciling"] == ("True", "ProgressingWithRetry")
    assert t["Stalled"][0] == "False"
    assert "still enforcing main@sha1:a" in down[0][3]

    refused = _types(
        cycle_conditions(
            CycleView(
                True,
                "main@sha1:a",
                "main@sha1:b",
                refusal=Refusal("UntrustedSignature", "no"),
                signature=SignatureCheck(False, "UntrustedSignature", "no"),
            )
        )
    )
    assert refused["Ready"] == ("False", "UntrustedSignature")
    assert refused["Stalled"] == ("True", "UntrustedSignature")
    assert refused["SourceVerified"] == ("False", "UntrustedSignature")

    drift = _types(cycle_conditions(CycleView(False, "a", "a", drift=("ipv4 X: rule-missing",))))
    assert drift["Drifted"] == ("True", "DriftCorrected") and drift["Ready"][0] == "True"


def test_drift_left_alone_says_so_and_why() -> None:
    """Report-only (--no-heal-drift) drift is named drift, not repaired, and not a change."""
    found = ("ipv4 X: rule-missing (1 rule)",)
    refused = Problem("EnforcementFailed", "ipv4: refused")

    def drifted(view: CycleView) -> tuple[str, str, str]:
        c = next(c for c in cycle_conditions(view) if c[0] == "Drifted")
        return c[1], c[2], c[3]

    assert drifted(CycleView(False, "a", "a", drift=found)) == (
        "True",
        "DriftCorrected",
        "ipv4 X: rule-missing (1 rule)",
    )
    left = CycleView(False, "a", "a", drift=found, drift_repaired=False, heal_drift=False)
    assert drifted(left) == (
        "True",
        "DriftDetected",
        "ipv4 X: rule-missing (1 rule); not repaired (report-only)",
    )
    failed = CycleView(False, "a", "a", enforce_error=refused, drift=found, drift_repaired=False)
    assert drifted(failed)[2].endswith("; not repaired (the repair failed)")


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = merge_conditions((), [("Ready", "True", "A", "")], "t1")
    same = merge_conditions(first, [("Ready", "True", "B", "m")], "t2")
    flipped = merge_conditions(same, [("Ready", "False", "C", "")], "t3")
    assert first[0].last_transition == "t1"
    assert same[0] == Condition("Ready", "True", "B", "m", "t1")
    assert flipped[0].last_transition == "t3"


def test_history_aggregates_repeats_and_keeps_five_runs() -> None:
    h = add_history((), "r1", "d1", "ok", "t1", 0.1)
    h = add_history(h, "r1", "d1", "ok", "t2", 0.2)
    assert len(h) == 1 and h[0].total == 2 and h[0].first_reconciled == "t1"
    assert h[0].last_reconciled == "t2"
    for i in range(10):
        h = add_history(h, f"r{i + 2}", "d", "ok", f"t{i + 3}", 0.1)
    assert len(h) == 5 and h[0].revision == "r11"


# -- change logs ---------------------------------------------------------------------------


def test_only_containers_whose_rules_change_are_logged() -> None:
    before = compile_cell(_policy("198.19.0.1"), CONTAINERS)
    assert container_changes(before, before, cell="c", revision="r") == []
    more = (*CONTAINERS, Container("c3", "198.18.0.10", "app-3", "space-b", "org"))
    after = compile_cell(_policy("198.19.0.1"), more)
    records = container_changes(before, after, cell="c", revision="r")
    assert [(r["handle"], r["change"]) for r in records] == [("c3", "added")]
    assert records[0]["groups_added"] == ["SecurityGroup/web"] and records[0]["rules_added"] == 1

    bound = PolicySet(
        security_groups=(
            SecurityGroup("web", (_rule("198.19.0.1", 443),), running_default=True),
            SecurityGroup("db", (_rule("198.19.9.9", 5432),), running_spaces=("space-a",)),
        )
    )
    changed = container_changes(before, compile_cell(bound, CONTAINERS), cell="c", revision="r")
    assert {r["handle"] for r in changed} == {"c1", "c2"}
    assert all(r["groups_added"] == ["SecurityGroup/db"] for r in changed)
    assert all(r["change"] == "updated" and r["revision"] == "r" for r in changed)


# -- status document -----------------------------------------------------------------------


def _state() -> AgentState:
    policy = _policy("198.19.0.1")
    plan = compile_cell(policy, CONTAINERS, "c1")
    applied = Applied("a" * 40, plan.digest(), "t0", CONTAINERS, policy, plan)
    conds = merge_conditions((), cycle_conditions(CycleView(False, "main@sha1:a", None)), "t0")
    return AgentState(
        applied=applied,
        head=Head("a" * 40),
        attempted="a" * 40,
        inventory=CONTAINERS,
        conditions=conds,
        history=add_history((), "main@sha1:a", plan.digest(), "ok", "t0", 0.1),
        timings={"total": 0.5, "fetch": 0.1},
    )


def _doc(st: AgentState, now: str = "t9") -> dict:
    return build_status(
        st,
        cell="c1",
        settings={"url": "git://x"},
        agent={"version": "0"},
        revision=lambda sha: f"main@sha1:{sha}",
        containers_path="/s.json",
        now=now,
    )


def test_status_document_follows_the_inventory_contract() -> None:
    doc = _doc(_state())
    assert doc["lastAppliedRevision"] == "main@sha1:" + "a" * 40
    assert list(doc["timings"]) == ["fetch", "total"]
    assert doc["counts"]["containers"] == 2 and doc["counts"]["cfEquivalentRules"] > 0
    # asgctl plan reads these containers back through the status-branch contract.
    assert containers_from_status(dump_status(doc), "status/c1") == CONTAINERS
    assert doc["containers"][0]["sources"] == ["SecurityGroup/web"]


def test_refused_revisions_carry_their_findings() -> None:
    f = Finding("policies/sg.yaml", 3, 5, "error", "SecurityGroup", "web", "rules[0].ports", "bad")
    st = _state()
    st = AgentState(
        **{**st.__dict__, "head": Head("b" * 40, "oops", None, Refusal("X", "m", (f,)))}
    )
    doc = _doc(st)
    assert doc["refused"]["findings"] == [
        "policies/sg.yaml:3:5: SecurityGroup/web: rules[0].ports: bad"
    ]


def test_fingerprint_ignores_timestamps_but_not_content() -> None:
    st = _state()
    a, b = _doc(st, "t1"), _doc(st, "t2")
    b["lastSyncTime"] = "later"
    b["history"][0]["totalReconciliations"] = 7
    assert fingerprint(a) == fingerprint(b)
    c = _doc(st)
    c["conditions"][0]["status"] = "False"
    assert fingerprint(a) != fingerprint(c)


def test_state_survives_a_round_trip_without_the_policy() -> None:
    st = _state()
    back = from_persisted(to_persisted(st))
    assert back.applied is not None and back.applied.sha == "a" * 40
    assert back.applied.inventory == CONTAINERS and back.applied.policy is None
    assert back.conditions == st.conditions and back.history == st.history
    assert from_persisted({"version": 99}) == AgentState()


def test_metrics_text_exposition() -> None:
    m = Metrics("c1")
    m.observe_timings({"total": 0.25, "enforce": 0.125})
    m.observe_timings({"total": 0.75})
    m.inc("asgctl_agent_sync_failures_total", reason="GitUnreachable")
    m.replace_info("asgctl_agent_applied_revision_info", revision="main@sha1:a", digest="d")
    m.replace_info("asgctl_agent_applied_revision_info", revision="main@sha1:b", digest="e")
    text = m.render()
    assert "# TYPE asgctl_agent_sync_duration_seconds summary" in text
    assert 'asgctl_agent_sync_duration_seconds_sum{cell="c1",phase="total"} 1' in text
    assert 'asgctl_agent_sync_duration_seconds_count{cell="c1",phase="total"} 2' in text
    assert 'asgctl_agent_sync_failures_total{cell="c1",reason="GitUnreachable"} 1' in text
    assert 'revision="main@sha1:b"' in text and 'revision="main@sha1:a"' not in text
    assert text.endswith("\n")


def test_the_sample_config_and_units_agree_with_the_code() -> None:
    from pathlib import Path

    from reconciler.agent.config import load_file

    root = Path(__file__).resolve().parent.parent / "deploy"
    cfg = build_config(load_file(str(root / "agent.yaml")), {"cell": "c9", "once": True})
    assert cfg.cell == "c9" and cfg.once and cfg.interval == 60 and cfg.heartbeat == 600
    assert cfg.metrics_listen == "127.0.0.1:9465" and cfg.verify == "none"
    # Every setting is there to be found, set or commented out, and every backend is named.
    import re

    from reconciler.agent.config import _KEYS
    from reconciler.backends import BACKENDS

    text = (root / "agent.yaml").read_text()
    listed = set(re.findall(r"^#? ?([a-z][a-z-]*):", text, re.M))
    assert set(_KEYS) - listed == set(), "settings missing from deploy/agent.yaml"
    backend_line = next(x for x in text.splitlines() if x.startswith("backend:"))
    assert all(b in backend_line for b in BACKENDS), backend_line
    units = root / "systemd"
    assert "--once" in (units / "asgctl-agent-once.service").read_text()
    assert "asgctl agent --config" in (units / "asgctl-agent.service").read_text()
