"""`asgctl test`: the allow/deny assertions a policy repo keeps about itself (kind PolicyTest).

A policy that validates clean can still revoke everyone; tests say what must stay true
("backend reaches MySQL", "marketing does not reach the card API") and run in CI before the
plan.  Each case is checked against the compiled plan, not the YAML: a synthetic container of
the case's app (in its directory space) or of its space (with no app) is compiled exactly as
the agent would compile it, and `explain` answers, so a failure shows the deciding rules and
the file:line that granted them.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from reconciler.core.compile import compile_cell
from reconciler.core.endpoint import Endpoint
from reconciler.core.explain import Decision, explain
from reconciler.core.model import Container, Location, PolicySet, PolicyTest
from reconciler.escape import log_text, visible
from reconciler.policy.findings import Finding

_IPV4 = "198.18.0.2"
_IPV6 = "fd00:18::2"


@dataclass(frozen=True)
class CaseResult:
    """One case: who, where to, what was expected, and the decision with its reasons."""

    test: PolicyTest
    subject: str
    endpoint: Endpoint
    decision: Decision

    @property
    def passed(self) -> bool:
        return self.decision.allowed == (self.test.expect == "allow")

    @property
    def got(self) -> str:
        return "allow" if self.decision.allowed else "deny"


def endpoint_of(test: PolicyTest) -> Endpoint:
    """The case's `to`, already checked by validation (which parsed it with parse_endpoint):
    an address, or a host name (then the case asks about the container's grants by name)."""
    try:
        ip = ipaddress.ip_address(test.address)
    except ValueError:
        version = {"icmp": 4, "icmpv6": 6}.get(test.protocol, 0)
        return Endpoint(
            version, 0, test.protocol, test.port, test.icmp_type, test.icmp_code, test.address
        )
    return Endpoint(ip.version, int(ip), test.protocol, test.port, test.icmp_type, test.icmp_code)


def synthetic_container(policy: PolicySet, test: PolicyTest, version: int) -> Container:
    """The container a case is about: an app's in its directory space, or a space's, no app."""
    d = policy.directory
    app = test.app or ""
    space = test.space or ""
    if app:
        known_app = d.app(app)
        space = known_app.space_guid if known_app else ""
    known_space = d.space(space)
    org = known_space.org_guid if known_space else ""
    return Container(
        handle="policy-test",
        ip=_IPV4 if version == 4 else _IPV6,
        app_id=app,
        space_id=space,
        org_id=org,
        workload="staging" if test.lifecycle == "staging" else "app",
    )


def subject_of(policy: PolicySet, test: PolicyTest) -> str:
    d = policy.directory
    if test.app:
        return f"{d.app_path(test.app)} ({test.lifecycle})"
    return f"{d.space_path(test.space or '')} (space, {test.lifecycle})"


def run_tests(policy: PolicySet) -> tuple[CaseResult, ...]:
    """Every PolicyTest case of the policy set, in file order."""
    out = []
    for test in policy.tests:
        ep = endpoint_of(test)
        container = synthetic_container(policy, test, ep.version or 4)
        plan = compile_cell(policy, [container], "policy-test")
        decision = explain(policy, plan, plan.containers[0], ep)
        out.append(CaseResult(test, subject_of(policy, test), ep, decision))
    return tuple(out)


def failure_finding(result: CaseResult, prefix: str = "") -> Finding:
    """A failed case as a finding at its test's file:line (`prefix`: the policy folder's
    path in the repository), for GitHub annotations and the agent's status alike."""
    r = result
    loc = r.test.location or Location(r.test.name, 1)
    return Finding.at(
        Location(prefix + loc.file, loc.line, loc.col),
        f"expected {r.test.expect}, got {r.got}: {r.subject} -> {r.endpoint}",
        kind="PolicyTest",
        name=r.test.name,
    )


def _where(result: CaseResult, prefix: str) -> str:
    loc = result.test.location
    return f"{prefix}{loc.file}:{loc.line}" if loc else result.test.name


def _headline(result: CaseResult) -> str:
    return (
        f"{result.test.name}: {result.subject} -> {result.endpoint}: "
        f"expected {result.test.expect}, got {result.got}"
    )


def _counts(results: tuple[CaseResult, ...]) -> tuple[int, int, int]:
    passed = sum(1 for r in results if r.passed)
    return len(results), passed, len(results) - passed


def render_results(
    results: tuple[CaseResult, ...], fmt: str = "text", prefix: str = "", verbose: bool = False
) -> str:
    """conftest's shape: a FAIL line per failure with its reasons, then `N tests, ...`."""
    total, passed, failed = _counts(results)
    if fmt == "json":
        doc = {
            "tests": total,
            "passed": passed,
            "failures": failed,
            "results": [
                {
                    "name": r.test.name,
                    "location": _where(r, prefix),
                    "subject": r.subject,
                    "to": str(r.endpoint),
                    "expect": r.test.expect,
                    "got": r.got,
                    "passed": r.passed,
                    "decision": r.decision.to_dict(),
                }
                for r in results
            ],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "github":
        lines = [failure_finding(r, prefix).github() for r in results if not r.passed]
        lines.append(_summary(total, passed, failed))
        return "\n".join(lines) + "\n"
    lines = []
    for r in results:
        if r.passed and not verbose:
            continue
        status = "PASS" if r.passed else "FAIL"
        lines.append(visible(f"{status} - {_where(r, prefix)} - {_headline(r)}"))
        if not r.passed:
            who = r.subject
            for line in r.decision.text(who).splitlines()[1:]:
                lines.append(visible(line))
    if lines:
        lines.append("")
    lines.append(_summary(total, passed, failed))
    return log_text("\n".join(lines) + "\n")


def _summary(total: int, passed: int, failed: int) -> str:
    return (
        f"{total} test{'s' * (total != 1)}, {passed} passed, {failed} failure{'s' * (failed != 1)}"
    )
