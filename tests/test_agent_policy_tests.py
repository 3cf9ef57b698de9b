"""Policy tests at the cell (`policy-tests: enforce | warn | off`): the repository's PolicyTest
documents, which `asgctl test` runs in CI, run again by every agent on each new head.

With `enforce` a head whose tests fail is refused like an invalid one (Ready=False,
PolicyTestsFailed, the failures in the status); with `warn` it is applied and the failures
are reported; with `off` they are not run.  The decisions are pure (`decide`, `settle`,
`build_status`) and tested as tables; one agent end to end, with a real git daemon and a real
network namespace, shows `enforce` keeping the old rules in the kernel and `warn` applying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.agent.conditions import (
    FALSE,
    POLICY_TESTS_FAILED,
    READY,
    RECONCILIATION_SUCCEEDED,
    REFUSALS,
    STALLED,
    TRUE,
)
from reconciler.agent.config import AgentConfig, ConfigError, build_config
from reconciler.agent.core import PolicyTestReport
from reconciler.agent.cycle import Target, decide, settle
from reconciler.agent.state import AgentState
from reconciler.agent.status import MAX_FINDINGS, build_status
from reconciler.core.model import Location, PolicySet, PolicyTest
from reconciler.core.policytest import CaseResult, run_tests
from reconciler.status.document import parse_status
from reconciler.status.write import dump_status
from tests.agentkit import (  # noqa: F401 - fixtures
    ORG,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    git_server,
    kernel,
    policy_repo,
    read_status,
    ready,
    sg,
)
from tests.conftest import require_netns
from tests.test_agent_cycle import (
    APPLIED_SHA,
    BEFORE,
    CFG,
    HEAD_SHA,
    OLD,
    _facts,
    _obs,
    _policy,
    _result,
    compile_plan,
)

BASE = {"source": "git://x/y.git", "containers": "/s.json", "cell": "c1"}


def _case(port: int, expect: str = "allow", line: int = 3) -> PolicyTest:
    """`space-a` reaches 198.19.0.1:<port>: the globally bound group of `_policy` decides."""
    return PolicyTest(
        f"web-db[{port}]",
        None,
        "space-a",
        "running",
        "tcp",
        "198.19.0.1",
        port,
        expect,  # type: ignore[arg-type]
        location=Location("tests/web.yaml", line),
    )


def _tested(*cases: PolicyTest) -> PolicySet:
    """The head: the applied rules and one more port, with these PolicyTest cases."""
    return replace(_policy(1, 2, 3, 4, 5), tests=cases)


PASSING = _tested(_case(1), _case(9, "deny", 5))
FAILING = _tested(_case(1), _case(9, "allow", 5))  # port 9 is not allowed: one failure


def never_run(policy: PolicySet) -> tuple[CaseResult, ...]:
    raise AssertionError("policy tests run with policy-tests: off")


# -- settings ----------------------------------------------------------------------------------


def test_the_mode_is_a_setting_with_warn_as_default_and_shown_in_status() -> None:
    assert build_config(BASE, {}).policy_tests == "warn"
    assert build_config({**BASE, "policy-tests": "enforce"}, {}).policy_tests == "enforce"
    # The flag (click passes it as policy_tests) overrides the file.
    cfg = build_config({**BASE, "policy-tests": "enforce"}, {"policy_tests": "off"})
    assert cfg.policy_tests == "off" and cfg.public()["policyTests"] == "off"
    with pytest.raises(ConfigError, match="policy-tests: one of enforce, warn, off, got 'strict'"):
        build_config({**BASE, "policy-tests": "strict"}, {})


# -- the gate, by mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "policy", "reason", "failed"),
    [
        ("enforce", FAILING, POLICY_TESTS_FAILED, 1),
        ("enforce", PASSING, None, 0),
        ("warn", FAILING, None, 1),
        ("warn", PASSING, None, 0),
        ("off", FAILING, None, None),
    ],
    ids=["enforce-failing", "enforce-passing", "warn-failing", "warn-passing", "off"],
)
def test_each_mode_decides_whether_a_head_with_failing_tests_is_applied(
    mode: str, policy: PolicySet, reason: str | None, failed: int | None
) -> None:
    cfg = replace(CFG, policy_tests=mode)
    d = decide(
        BEFORE, _obs(_facts(policy)), cfg, compile_plan, never_run if mode == "off" else run_tests
    )
    head = d.state.head
    assert head is not None
    if failed is None:
        assert head.tests is None  # off: not run, not reported
    else:
        assert head.tests is not None
        assert (head.tests.mode, head.tests.tests, len(head.tests.failures)) == (mode, 2, failed)
    if reason is None:
        assert head.verdict is None and d.target == Target(HEAD_SHA, policy)
    else:
        assert head.verdict is not None and head.verdict.reason == reason in REFUSALS
        assert d.target == Target(APPLIED_SHA, OLD)  # refused: the applied rules stay
    logged = [x.record for x in d.logs if x.record.get("event") == "policy-tests-failed"]
    assert len(logged) == (1 if failed else 0)
    if failed:
        assert logged[0]["mode"] == mode and logged[0]["failed"] == 1
        assert logged[0]["revision"] == CFG.revision(HEAD_SHA)


def test_a_failure_names_the_test_by_its_repository_path_and_line() -> None:
    cfg = replace(CFG, policy_tests="enforce")
    head = decide(BEFORE, _obs(_facts(FAILING)), cfg, compile_plan).state.head
    assert head is not None and head.verdict is not None and head.tests is not None
    expected = (
        "policies/tests/web.yaml:5:1: PolicyTest/web-db[9]: expected allow, got deny: "
        "space-a (space, running) -> 198.19.0.1:9/tcp"
    )
    assert [str(f) for f in head.verdict.findings] == [expected]
    assert head.verdict.message == f"1 of 2 policy tests fails: {expected}"
    assert head.tests.passed == 1


def test_tests_run_once_per_head_not_once_per_cycle() -> None:
    calls: list[PolicySet] = []

    def counting(policy: PolicySet) -> tuple[CaseResult, ...]:
        calls.append(policy)
        return run_tests(policy)

    first = decide(BEFORE, _obs(_facts(FAILING)), CFG, compile_plan, counting)
    assert calls == [FAILING]
    # The next cycles (no new head fetched) keep the verdict and its report.
    again = decide(first.state, _obs(), CFG, compile_plan, counting)
    assert calls == [FAILING] and again.state.head == first.state.head
    assert again.logs == ()


def test_tests_of_a_head_refused_before_them_are_never_run() -> None:
    """A rewound head's files are not even parsed; its tests are not run either."""
    d = decide(BEFORE, _obs(_facts(FAILING, descends=False)), CFG, compile_plan, never_run)
    assert d.state.head is not None and d.state.head.tests is None


def test_a_head_refused_by_the_mass_revoke_gate_still_reports_its_tests() -> None:
    cut = replace(_policy(), tests=(_case(2, "deny"),))  # passes; the gate refuses the cut
    head = decide(BEFORE, _obs(_facts(cut)), CFG, compile_plan).state.head
    assert head is not None and head.verdict is not None
    assert head.tests == PolicyTestReport("warn", 1, ())


# -- what the cell reports -----------------------------------------------------------------------


def _settled(mode: str, policy: PolicySet) -> AgentState:
    d = decide(BEFORE, _obs(_facts(policy)), replace(CFG, policy_tests=mode), compile_plan)
    return settle(d, _result(), CFG, applied_at="t1", elapsed=0.1).state


def _conds(st: AgentState) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in st.conditions}


def status_of(st: AgentState, cfg: AgentConfig = CFG) -> dict[str, Any]:
    """The status document of `st`, checked against the status schema."""
    doc = build_status(
        st,
        cell="c1",
        settings=cfg.public(),
        agent={},
        revision=cfg.revision,
        containers_path="/s.json",
        now="t9",
    )
    # What the agent writes passes the schema `asgctl plan` and `asgctl status` read it by.
    assert parse_status(dump_status(doc), "status/c1").header["cell"] == "c1"
    return doc


def test_enforce_refuses_a_failing_head_and_stalls_until_the_next_push() -> None:
    st = _settled("enforce", FAILING)
    assert st.applied is not None and st.applied.sha == APPLIED_SHA
    assert _conds(st)[READY] == (FALSE, POLICY_TESTS_FAILED)
    assert _conds(st)[STALLED] == (TRUE, POLICY_TESTS_FAILED)
    doc = status_of(st)
    assert doc["refused"]["reason"] == POLICY_TESTS_FAILED
    assert doc["refused"]["findings"][0].startswith("policies/tests/web.yaml:5:1: PolicyTest/")
    assert doc["policyTests"] == {
        "revision": CFG.revision(HEAD_SHA),
        "mode": "enforce",
        "tests": 2,
        "passed": 1,
        "failed": 1,
        "failures": doc["refused"]["findings"],
    }


def test_warn_applies_a_failing_head_and_reports_the_failures() -> None:
    st = _settled("warn", FAILING)
    assert st.applied is not None and st.applied.sha == HEAD_SHA
    assert _conds(st)[READY] == (TRUE, RECONCILIATION_SUCCEEDED)
    doc = status_of(st)
    assert "refused" not in doc
    assert (doc["policyTests"]["mode"], doc["policyTests"]["failed"]) == ("warn", 1)
    assert doc["policyTests"]["failures"][0].startswith("policies/tests/web.yaml:5:1: ")


def test_off_reports_no_tests() -> None:
    assert "policyTests" not in status_of(_settled("off", FAILING))


def test_thousands_of_failures_keep_the_status_small() -> None:
    many = _tested(*(_case(1000 + i, line=i + 1) for i in range(MAX_FINDINGS + 50)))
    doc = status_of(_settled("enforce", many))
    for listed in (doc["refused"]["findings"], doc["policyTests"]["failures"]):
        assert len(listed) == MAX_FINDINGS + 1 and listed[-1] == "... and 50 more"
    assert doc["policyTests"]["failed"] == MAX_FINDINGS + 50


def test_untrusted_test_names_cannot_forge_lines_in_the_status() -> None:
    """A PR author names the tests: a newline in a name must not start a new status line."""
    forged = replace(_case(9), name="x\nReady: True")
    doc = status_of(_settled("enforce", _tested(forged)))
    assert all("\n" not in line for line in doc["policyTests"]["failures"])
    assert "x\\nReady: True" in doc["policyTests"]["failures"][0]


# -- end to end: a real git daemon, real agents, real namespaces ----------------------------------


def _echo_repo(ip: str, *ports: int) -> dict[str, str]:
    """echo open on `ports`, and a PolicyTest saying echo:8080 must stay closed."""
    rules = [f'{{protocol: tcp, destination: {ip}, ports: "{p}"}}' for p in ports]
    return {
        "sg.yaml": sg("echo", rules),
        "tests/echo.yaml": f"""\
            kind: PolicyTest
            name: echo-closed
            cases:
              - {{space: {SPACE}, to: "{ip}:80", expect: allow}}
              - {{space: {SPACE}, to: "{ip}:8080", expect: deny}}
            """,
    }


@pytest.mark.netns
@pytest.mark.requires("git")
def test_enforce_keeps_the_old_rules_in_the_kernel_and_warn_applies_and_reports(
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    echo = ServiceSpec("echo", tcp_ports=(80, 8080))
    web = ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)
    labs = {mode: make_lab([web], [echo], conntrack=False) for mode in ("enforce", "warn")}
    ip = labs["enforce"].services["echo"].ipv4
    assert labs["warn"].services["echo"].ipv4 == ip  # one policy serves both cells
    good = policy_repo.commit("echo:80, tested", _echo_repo(ip, 80))
    cells = {
        mode: agents(
            f"cell-{mode}",
            source=policy_repo.url,
            containers=str(lab.write_store()),
            netns=lab.cell,
            **{"policy-tests": mode},
        )
        for mode, lab in labs.items()
    }
    for a in cells.values():
        res = a.once()
        assert res.returncode == 0, res.stderr
        assert read_status(policy_repo.bare, a.name)["policyTests"]["failed"] == 0  # type: ignore[index]
    old_rules = dict(kernel(labs["enforce"].cell).chains)

    # A change that opens echo:8080, which the repository's own test says must stay closed.
    bad = policy_repo.commit("open echo:8080", _echo_repo(ip, 80, 8080))
    failure = (
        f"policies/tests/echo.yaml:5:5: PolicyTest/echo-closed[1]: expected deny, got allow: "
        f"{SPACE} (space, running) -> {ip}:8080/tcp"
    )

    enforce, lab = cells["enforce"], labs["enforce"]
    assert enforce.once().returncode == 1
    doc = read_status(policy_repo.bare, enforce.name)
    assert doc is not None
    assert (ready(doc)["status"], ready(doc)["reason"]) == ("False", POLICY_TESTS_FAILED)
    assert doc["lastAppliedRevision"] == f"main@sha1:{good}"
    assert doc["refused"]["revision"] == f"main@sha1:{bad}"
    assert doc["refused"]["findings"] == [failure]
    assert doc["policyTests"]["failures"] == [failure]
    assert dict(kernel(lab.cell).chains) == old_rules
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED

    warn, lab = cells["warn"], labs["warn"]
    assert warn.once().returncode == 0
    doc = read_status(policy_repo.bare, warn.name)
    assert doc is not None
    assert (ready(doc)["status"], ready(doc)["reason"]) == ("True", RECONCILIATION_SUCCEEDED)
    assert doc["lastAppliedRevision"] == f"main@sha1:{bad}" and "refused" not in doc
    assert doc["policyTests"] == {
        "revision": f"main@sha1:{bad}",
        "mode": "warn",
        "tests": 2,
        "passed": 1,
        "failed": 1,
        "failures": [failure],
    }
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    logged = [r for r in warn.log_records("err") if r.get("event") == "policy-tests-failed"]
    assert [(r["revision"], r["failures"]) for r in logged] == [(f"main@sha1:{bad}", [failure])]
