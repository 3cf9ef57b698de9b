"""Grants by name with real packets (issue 15, items 2-4), on every backend.

A lab cell with two containers, three database services and a real DNS server (dnsmasq)
in the outside world.  The agent's resolver (`FqdnService`) asks dnsmasq from the cell's
namespace and fills the name's kernel set; the rules converged from the plan allow only
the destination's protocol and port to what is in it.

The first-connection guarantee for a container's own lookup (the DNS answer interception)
is tests/test_fqdn_intercept_traffic.py's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from asgctl_lab.dns import LabDns
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends import Backend, Runner, converge
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, Destination, EgressPolicy, PolicySet, PortRange
from reconciler.fqdn.dns import Client
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.service import FqdnService
from tests.dnskit import QTYPE_A, record, response
from tests.fqdnkit import VARIANTS, add_addresses, open_dataplane, require, spray_from_resolver

DB = "db.lab.example"
S3 = "*.s3.lab.example"
TTL = 2
CONTAINERS = (
    ContainerSpec("web", app_id="app-web", space_id="space-prod", ipv6=True),
    ContainerSpec("other", app_id="app-other", space_id="space-prod"),
)
SERVICES = (
    ServiceSpec("db1", tcp_ports=(5432, 5433), ipv6=True),
    ServiceSpec("db2", tcp_ports=(5432,)),
    ServiceSpec("evil", tcp_ports=(5432,)),
    ServiceSpec("dns"),
    ServiceSpec("rr", tcp_ports=(5432,)),
)
RR = "rr.lab.example"
RR_NET = "198.19.200.0/28"
"""Sixteen more addresses of the `rr` service: one name, sixteen A records (round robin)."""
RR_ADDRESSES = [f"198.19.200.{i}" for i in range(16)]


def policy() -> PolicySet:
    port = (PortRange(5432, 5432),)
    return PolicySet(
        destinations=(
            Destination("db", "tcp", (), port, fqdns=(DB, RR)),
            Destination("s3", "tcp", (), port, fqdns=(S3,)),
        ),
        egress_policies=(
            EgressPolicy("web-db", "app", "app-web", "db"),
            EgressPolicy("web-s3", "app", "app-web", "s3"),
        ),
    )


def plan_for(lab: Lab) -> CellPlan:
    inventory = [
        Container(s.handle, lab.containers[s.name].ipv4, s.app_id, s.space_id) for s in CONTAINERS
    ]
    web6 = lab.containers["web"].ipv6 or ""
    inventory.append(Container("web-v6", web6, "app-web", "space-prod"))
    return compile_cell(policy(), inventory, "lab")


@dataclass
class Cell:
    lab: Lab
    backend: Backend
    dns: LabDns
    fqdn: FqdnService
    plan: CellPlan

    def addr(self, service: str) -> str:
        return self.lab.services[service].ipv4

    def allowed(
        self, container: str, service: str, port: int = 5432, *, ipv6: bool = False
    ) -> bool:
        result = self.lab.probe_tcp(container, service, port, ipv6=ipv6)
        assert result.outcome in (Outcome.CONNECTED, Outcome.REJECTED), str(result)
        return result.outcome is Outcome.CONNECTED

    def members(self, family: int = 4) -> set[str]:
        return set(self.members_or_none(family) or {})

    def members_or_none(self, family: int = 4) -> dict[str, int] | None:
        """The name's set of one family as the kernel holds it; None when there is none."""
        (set_name,) = {
            r.set_name for r in self.plan.names if r.item.fqdn == DB and r.version == family
        }
        return self.fqdn.writer.members(set_name)

    def refresh_now(self) -> None:
        """Ask every name at once (as if its refresh were due): the schedule itself is
        the keeper's, tested without a clock in test_fqdn_keeper."""
        self.fqdn.refresh(everything=True)


@pytest.fixture(scope="module", params=VARIANTS)
def cell(request: pytest.FixtureRequest, _stale_labs_reaped: None) -> Iterator[Cell]:
    require(request.param)
    lab = Lab(CONTAINERS, SERVICES).start()
    dns: LabDns | None = None
    try:
        assert lab.workdir is not None
        dns = LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir, TTL)
        add_addresses(lab, "rr", RR_ADDRESSES, RR_NET)
        db1 = lab.services["db1"]
        dns.start({DB: [db1.ipv4, db1.ipv6 or ""], RR: RR_ADDRESSES})
        runner = Runner.in_netns(lab.cell)
        backend, writer = open_dataplane(request.param, runner)
        plan = plan_for(lab)
        result = converge(backend, plan)
        assert result.ok, result.to_dict()
        settings = FqdnSettings(min_ttl=1, max_ttl=TTL)
        fqdn = FqdnService(writer, settings, netns=lab.cell, clients=[Client(dns.address, 53, 1.0)])
        yield Cell(lab, backend, dns, fqdn, plan)
    finally:
        if dns is not None:
            dns.stop()
        lab.teardown()


def test_a_name_is_enforced_from_the_agents_own_resolution(cell: Cell) -> None:
    # Before the agent has resolved the name, its set is empty: nothing by name passes.
    assert not cell.allowed("web", "db1")
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    assert cell.members() == {cell.addr("db1")}
    assert cell.members(6) == {cell.lab.services["db1"].ipv6}
    assert cell.allowed("web", "db1"), "allowed db.lab.example:5432 after resolution"
    # A name never widens beyond its destination's protocol and ports...
    assert not cell.allowed("web", "db1", 5433)
    # ...nor to a container not granted the name.
    assert not cell.allowed("other", "db1")
    # The name's AAAA answer fills its IPv6 set: the same grant over IPv6.
    assert cell.allowed("web", "db1", ipv6=True), "allowed over IPv6 after resolution"
    assert not cell.allowed("web", "db1", 5433, ipv6=True)
    # A wildcard is never resolved ahead: empty, so nothing, never everything.
    assert not cell.allowed("web", "evil")
    status = {(s["fqdn"], s["family"]): s for s in cell.fqdn.status()}
    assert status[(DB, 4)]["addresses"] == [cell.addr("db1")]
    assert status[(S3, 4)]["count"] == 0 and "wildcard" in str(status[(S3, 4)]["note"])


def test_when_the_record_moves_the_new_address_works_and_the_old_one_lapses(cell: Cell) -> None:
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    assert cell.allowed("web", "db1")
    cell.dns.set_record(DB, [cell.addr("db2")])
    cell.refresh_now()
    assert cell.allowed("web", "db2"), "the new address works after one refresh"
    # The old address is kept until its TTL (containers may still be connecting to it)...
    time.sleep(TTL + 0.5)  # ...and the kernel drops it then, with nobody renewing it.
    cell.refresh_now()  # the resolver renews the new address only
    assert cell.members() == {cell.addr("db2")}
    assert not cell.allowed("web", "db1"), "the old address is rejected after its TTL"
    assert cell.allowed("web", "db2")
    cell.dns.set_record(DB, [cell.addr("db1")])


def test_a_resolver_outage_keeps_the_last_addresses_until_their_ttl(cell: Cell) -> None:
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    assert cell.allowed("web", "db1")
    cell.dns.stop()
    try:
        cell.refresh_now()  # fails: nothing is written, nothing removed
        assert cell.fqdn.metrics.failures >= 1
        assert cell.allowed("web", "db1"), "kept while its TTL runs"
        time.sleep(TTL + 0.5)
        assert cell.members() == set()
        assert not cell.allowed("web", "db1"), "gone after its TTL"
    finally:
        cell.dns.start(cell.dns.records)
    cell.refresh_now()
    assert cell.allowed("web", "db1")


def test_unsolicited_forged_answers_add_nothing(cell: Cell) -> None:
    """A forger in the outside world sprays answers naming its own address at the cell,
    from the DNS server's own address and port: none is a reply to a query of ours."""
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    before = cell.members()
    evil = cell.addr("evil")
    cell_side = cell.lab.services["dns"].gateway4
    forged = response(1234, DB, QTYPE_A, [record(DB, QTYPE_A, 3600, evil)])
    spray_from_resolver(cell.lab, cell.dns, forged, cell_side, range(32768, 32768 + 2000))
    cell.refresh_now()
    assert evil not in cell.members()
    assert cell.members() == before
    assert not cell.allowed("web", "evil")


def test_a_round_robin_name_of_16_addresses_works_50_times_in_a_row(cell: Cell) -> None:
    """Whichever of the sixteen addresses a container was told, it connects: the agent
    holds every address of the answer, not one per rule."""
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    (set_name,) = {r.set_name for r in cell.plan.names if r.item.fqdn == RR and r.version == 4}
    assert set(cell.fqdn.writer.members(set_name) or {}) == set(RR_ADDRESSES)
    for i in range(50):
        target = RR_ADDRESSES[(i * 7) % 16]
        outcome = cell.lab.probe_tcp("web", target, 5432).outcome
        assert outcome is Outcome.CONNECTED, (i, target, outcome)
    assert cell.lab.probe_tcp("other", RR_ADDRESSES[0], 5432).outcome is Outcome.REJECTED


def test_a_cycle_that_converges_again_leaves_the_addresses_and_reports_no_drift(
    cell: Cell,
) -> None:
    """The agent converges every cycle: a name's elements are state the resolver keeps,
    never drift the dataplane repairs away."""
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    before = cell.members()
    assert before
    result = converge(cell.backend, cell.plan, cell.plan)
    assert result.ok, result.to_dict()
    assert all(f.in_sync for f in result.families), result.to_dict()
    assert cell.members() == before
    assert cell.allowed("web", "db1")


def test_a_name_no_plan_uses_loses_its_set(cell: Cell) -> None:
    """When the policy stops naming the host, its rules go with the ruleset and its set with
    them (an ipset once nothing references it; an nft set in the same transaction)."""
    cell.fqdn.want(cell.plan)
    cell.refresh_now()
    without = compile_cell(PolicySet(), [Container("web", cell.lab.containers["web"].ipv4)], "lab")
    try:
        assert converge(cell.backend, without, cell.plan).ok
        cell.fqdn.want(without)
        assert cell.members_or_none() is None
        assert not cell.allowed("web", "db1")
    finally:
        assert converge(cell.backend, cell.plan, without).ok
        cell.fqdn.want(cell.plan)
