"""End to end: policies compiled, converged into a lab cell, and checked with real packets.

One lab cell per backend (iptables-legacy, iptables-nft, nftables) holds three containers (a
running app, dual-stack; the same app's staging container; an unrelated app) and two services.
Every allowed destination must answer, and every denied one must be REJECTED by the cell (an
ICMP error from the container's gateway, at once), never left to time out and never refused by
the service itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome, ProbeResult
from reconciler.backends import Backend, Runner, converge
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import (
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
    Rule,
    SecurityGroup,
)
from tests.conftest import require_netns

VARIANTS = ("legacy", "nft", "nftables")  # two iptables variants, and the nftables backend
CONTAINERS = (
    ContainerSpec("web", app_id="app-web", space_id="space-prod", ipv6=True),
    ContainerSpec("stager", app_id="app-web", space_id="space-prod", workload="staging"),
    ContainerSpec("other", app_id="app-other", space_id="space-other"),
)
SERVICES = (
    ServiceSpec(
        "echo", tcp_ports=(80, 443, 8000, 8080, 8081, 8443), udp_ports=(53, 5353), ipv6=True
    ),
    ServiceSpec("far", tcp_ports=(443, 8080), udp_ports=(53,)),
)


def _ports(text: str) -> tuple[PortRange, ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append(PortRange(int(lo), int(hi or lo)))
    return tuple(out)


def rule(proto: str, dest: str, ports: str = "", icmp: tuple[int, int] | None = None) -> Rule:
    return Rule(
        proto,
        (AddressRange.parse(dest),),
        _ports(ports) if ports else (),
        icmp[0] if icmp else None,
        icmp[1] if icmp else None,
    )


def policy(lab: Lab, extra: tuple[Rule, ...] = ()) -> PolicySet:
    """CF semantics on lab addresses: space ASGs by lifecycle, a running default, and an
    app egress policy for running containers only."""
    echo4, echo6 = lab.services["echo"].ipv4, lab.services["echo"].ipv6 or ""
    far4 = lab.services["far"].ipv4
    # echo .2 is inside, far .6 outside this range; it is no CIDR, so iprange matches it.
    span = AddressRange.parse(echo4)
    span_text = f"{echo4}-{ipaddress.IPv4Address(span.first + 3)}"
    running = (
        rule("tcp", echo4, "80,443"),
        rule("tcp", span_text, "8000-8080"),
        rule("udp", echo4, "53"),
        rule("icmp", echo4, icmp=(8, 0)),
        rule("tcp", echo6, "80"),
        rule("icmpv6", echo6, icmp=(128, -1)),
        *extra,
    )
    return PolicySet(
        security_groups=(
            SecurityGroup("prod-run", running, running_spaces=("space-prod",)),
            SecurityGroup(
                "prod-stage",
                (rule("tcp", echo4, "8443"), rule("icmp", echo4, icmp=(-1, -1))),
                staging_spaces=("space-prod",),
            ),
            SecurityGroup("dns", (rule("udp", echo4, "5353"),), running_default=True),
        ),
        destinations=(Destination("far-https", "tcp", (AddressRange.parse(far4),), _ports("443")),),
        egress_policies=(
            EgressPolicy("web-far", "app", "app-web", "far-https", app_lifecycle="running"),
        ),
    )


def inventory(lab: Lab) -> list[Container]:
    """The lab's store, plus the web container's IPv6 address as a container of its own."""
    out = [
        Container(s.handle, lab.containers[s.name].ipv4, s.app_id, s.space_id, workload=s.workload)
        for s in CONTAINERS
    ]
    web = CONTAINERS[0]
    out.append(Container("web-v6", lab.containers["web"].ipv6 or "", web.app_id, web.space_id))
    return out


def plan_for(lab: Lab, extra: tuple[Rule, ...] = ()) -> CellPlan:
    return compile_cell(policy(lab, extra), inventory(lab), "lab")


@dataclass
class Cell:
    lab: Lab
    backend: Backend


def start_cell(variant: str) -> tuple[Lab, Cell]:
    lab = Lab(CONTAINERS, SERVICES).start()
    runner = Runner.in_netns(lab.cell)
    backend: Backend
    if variant == "nftables":
        backend = NftablesBackend.open("auto", runner)
    else:
        backend = IptablesBackend.open(variant, runner)
    result = converge(backend, plan_for(lab))
    assert result.ok, result.to_dict()
    return lab, Cell(lab, backend)


@pytest.fixture(scope="module", params=VARIANTS)
def cell(request: pytest.FixtureRequest, _stale_labs_reaped: None) -> Iterator[Cell]:
    require_netns()
    lab, c = start_cell(request.param)
    try:
        yield c
    finally:
        lab.teardown()


# (container, protocol, service, port or (icmp type, code), ipv6, allowed, why)
CASES = [
    ("web", "tcp", "echo", 80, False, True, "port list"),
    ("web", "tcp", "echo", 443, False, True, "port list"),
    ("web", "tcp", "echo", 8000, False, True, "range start, address range"),
    ("web", "tcp", "echo", 8080, False, True, "range end, address range"),
    ("web", "tcp", "echo", 8081, False, False, "past the range end"),
    ("web", "tcp", "echo", 8443, False, False, "staging-only rule"),
    ("web", "tcp", "far", 8080, False, False, "outside the address range"),
    ("web", "tcp", "far", 443, False, True, "app egress policy, running"),
    ("web", "udp", "echo", 53, False, True, "udp rule"),
    ("web", "udp", "echo", 5353, False, True, "running default ASG"),
    ("web", "udp", "far", 53, False, False, "no udp rule for far"),
    ("web", "icmp", "echo", (8, 0), False, True, "icmp type 8 code 0"),
    ("web", "icmp", "echo", (8, 1), False, False, "code 1 is not code 0"),
    ("web", "icmp", "echo", (13, 0), False, False, "type 13 is not type 8"),
    ("web", "icmp", "far", (8, 0), False, False, "no icmp rule for far"),
    ("web", "tcp", "echo", 80, True, True, "IPv6 rule"),
    ("web", "tcp", "echo", 443, True, False, "IPv4 rule does not cover IPv6"),
    ("web", "udp", "echo", 53, True, False, "IPv4 rule does not cover IPv6"),
    ("web", "icmp", "echo", (128, 0), True, True, "icmpv6 type 128, any code"),
    ("stager", "tcp", "echo", 8443, False, True, "staging ASG"),
    ("stager", "tcp", "echo", 80, False, False, "running ASG is not staging"),
    ("stager", "udp", "echo", 5353, False, False, "running default is not staging"),
    ("stager", "tcp", "far", 443, False, False, "egress policy is running only"),
    ("stager", "icmp", "echo", (13, 0), False, True, "icmp any type"),
    ("other", "udp", "echo", 5353, False, True, "running default for every app"),
    ("other", "tcp", "echo", 80, False, False, "another space's ASG"),
    ("other", "tcp", "far", 443, False, False, "another app's egress policy"),
]


def probe(lab: Lab, container: str, proto: str, service: str, port, ipv6: bool) -> ProbeResult:  # type: ignore[no-untyped-def]
    if proto == "tcp":
        return lab.probe_tcp(container, service, port, ipv6=ipv6)
    if proto == "udp":
        return lab.probe_udp(container, service, port, ipv6=ipv6)
    icmp_type, code = port
    return lab.ping(container, service, ipv6=ipv6, icmp_type=icmp_type, icmp_code=code)


def assert_rejected_by_cell(lab: Lab, container: str, result: ProbeResult, ipv6: bool) -> None:
    """Denied means an immediate ICMP error from the cell, not silence or the service."""
    ep = lab.containers[container]
    assert result.outcome is Outcome.REJECTED, str(result)
    assert result.icmp_from == (ep.gateway6 if ipv6 else ep.gateway4), str(result)
    assert result.elapsed < 0.5, str(result)


@pytest.mark.parametrize(
    ("container", "proto", "service", "port", "ipv6", "allowed", "why"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-v{6 if c[4] else 4}" for c in CASES],
)
def test_allowed_connects_and_denied_is_rejected(
    cell: Cell, container, proto, service, port, ipv6, allowed, why
) -> None:  # type: ignore[no-untyped-def]
    result = probe(cell.lab, container, proto, service, port, ipv6)
    if allowed:
        assert result.reached, f"{why}: {result}"
    else:
        assert_rejected_by_cell(cell.lab, container, result, ipv6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_open_connection_survives_100_policy_changes(
    variant: str, _stale_labs_reaped: None
) -> None:
    require_netns()
    lab, c = start_cell(variant)
    try:
        held = [lab.hold_tcp("web", "echo", 80), lab.hold_tcp("web", "echo", 80, ipv6=True)]
        assert all(h.check() for h in held)
        echo4, echo6 = lab.services["echo"].ipv4, lab.services["echo"].ipv6 or ""
        last = plan_for(lab)
        for i in range(100):
            # Each change rewrites the chains this very connection traverses (web's groups
            # and container chains) without touching what allows it.
            extra = (rule("tcp", echo4, str(9000 + i)), rule("udp", echo6, str(9000 + i % 7)))
            plan = plan_for(lab, extra if i % 3 else extra[:1])
            result = converge(c.backend, plan, last)
            assert result.ok, result.to_dict()
            assert not result.in_sync and result.drift == ()
            broken = [h for h in held if not h.check()]
            assert not broken, f"change {i + 1}: {broken} stopped carrying data"
            last = plan
        # New connections still follow the plan.
        assert lab.probe_tcp("web", "echo", 80).reached
        assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "echo", 8081), False)
    finally:
        lab.teardown()
