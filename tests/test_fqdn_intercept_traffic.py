"""The first connection by name, with real packets, on every backend (issue 15, item 2).

A lab cell with containers, services and a real DNS server (dnsmasq) in the outside world.
The containers resolve names themselves, through the cell, as a stub resolver does; the
agent's interception (`fqdn.intercept`) holds each answer in the kernel (NFQUEUE), learns
its addresses, and releases it.  The agent's own resolution is switched off here (its
`FqdnService` has no resolver to ask), and the name's set is emptied before each lookup:
so a connection that succeeds can only have been allowed by the answer the container
itself just received -- which is the guarantee under test.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from asgctl_lab.dns import LabDns, lookup
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends import Backend, Runner, converge
from reconciler.backends.kernel.nsthread import run_in_netns
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import (
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
)
from reconciler.fqdn.dns import (
    QTYPE_A,
    QTYPE_AAAA,
    Answer,
    Client,
    DnsError,
    build_query,
    parse_response,
)
from reconciler.fqdn.hold import DnsHold, variant_for
from reconciler.fqdn.intercept import Interceptor
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.nfqueue import NfqueueSocket, drops
from reconciler.fqdn.service import FqdnService
from tests.dnskit import record, response
from tests.fqdnkit import VARIANTS, add_addresses, open_dataplane, require, spray_from_resolver

DB = "db.lab.example"
RR = "rr.lab.example"
S3 = "*.s3.lab.example"
S3_HOST = "b.s3.lab.example"
S3_DEEP = "a.b.s3.lab.example"
TTL = 2
QUEUE = 5353
CONTAINERS = (
    ContainerSpec("web", app_id="app-web", space_id="space-prod", ipv6=True),
    ContainerSpec("other", app_id="app-other", space_id="space-prod"),
)
SERVICES = (
    ServiceSpec("db1", tcp_ports=(5432, 5433), ipv6=True),
    ServiceSpec("db2", tcp_ports=(5432,)),
    ServiceSpec("evil", tcp_ports=(5432,)),
    ServiceSpec("dns", ipv6=True),
    ServiceSpec("rr", tcp_ports=(5432,)),
)
RR_NET = "198.19.200.0/28"
RR_ADDRESSES = [f"198.19.200.{i}" for i in range(16)]


def policy(*resolvers: str) -> PolicySet:
    """web is granted the names; every container may ask the lab's resolvers (DNS itself
    is governed by ASGs, as on CF)."""
    port = (PortRange(5432, 5432),)
    dns = tuple(AddressRange.parse(r) for r in resolvers)
    return PolicySet(
        destinations=(
            Destination("db", "tcp", (), port, fqdns=(DB, RR)),
            Destination("s3", "tcp", (), port, fqdns=(S3,)),
            Destination("dns", "udp", dns, (PortRange(53, 53),)),
            Destination("dns-tcp", "tcp", dns, (PortRange(53, 53),)),
        ),
        egress_policies=(
            EgressPolicy("web-db", "app", "app-web", "db"),
            EgressPolicy("web-s3", "app", "app-web", "s3"),
            EgressPolicy("dns", "default", None, "dns"),
            EgressPolicy("dns-tcp", "default", None, "dns-tcp"),
        ),
    )


def plan_for(lab: Lab) -> CellPlan:
    inventory = [
        Container(s.handle, lab.containers[s.name].ipv4, s.app_id, s.space_id) for s in CONTAINERS
    ]
    web6 = lab.containers["web"].ipv6 or ""
    inventory.append(Container("web-v6", web6, "app-web", "space-prod"))
    dns = lab.services["dns"]
    return compile_cell(policy(dns.ipv4, dns.ipv6 or ""), inventory, "lab")


@dataclass
class Cell:
    lab: Lab
    variant: str
    backend: Backend
    dns: LabDns
    fqdn: FqdnService
    intercept: Interceptor
    plan: CellPlan
    dns6: LabDns
    """A second dnsmasq, on the DNS service's IPv6 address (same records)."""

    def addr(self, service: str) -> str:
        return self.lab.services[service].ipv4

    def resolve(self, container: str, name: str, qtype: int = QTYPE_A) -> Answer:
        """The container's own lookup, from its namespace, through the cell."""
        client = Client(self.dns.address, 53, 1.0)
        return run_in_netns(self.lab.containers[container].netns, client.query, name, qtype)

    def connect(self, container: str, address: str, port: int = 5432) -> Outcome:
        result = self.lab.probe_tcp(container, address, port)
        assert result.outcome in (Outcome.CONNECTED, Outcome.REJECTED), str(result)
        return result.outcome

    def set_name(self, fqdn: str, family: int = 4) -> str:
        (name,) = {
            r.set_name for r in self.plan.names if r.item.fqdn == fqdn and r.version == family
        }
        return name

    def members(self, fqdn: str, family: int = 4) -> set[str]:
        return set(self.fqdn.writer.members(self.set_name(fqdn, family)) or {})

    def empty(self, fqdn: str, family: int = 4) -> None:
        """Empty a name's set: what is there afterwards, an answer just put there."""
        name = self.set_name(fqdn, family)
        if self.variant == "nftables":
            argv = ["nft", "flush", "set", "inet", "asgctl", name]
        else:
            argv = ["ipset", "flush", name]
        self.lab.cell_exec(argv, check=True)
        assert self.members(fqdn, family) == set()


@pytest.fixture(scope="module", params=VARIANTS)
def cell(request: pytest.FixtureRequest, _stale_labs_reaped: None) -> Iterator[Cell]:
    require(request.param)
    lab = Lab(CONTAINERS, SERVICES).start()
    dns: LabDns | None = None
    dns6: LabDns | None = None
    intercept: Interceptor | None = None
    try:
        assert lab.workdir is not None
        service = lab.services["dns"]
        dns = LabDns(service.netns, service.ipv4, lab.workdir, TTL)
        (lab.workdir / "dns6").mkdir()
        dns6 = LabDns(service.netns, service.ipv6 or "", lab.workdir / "dns6", TTL)
        add_addresses(lab, "rr", RR_ADDRESSES, RR_NET)
        db1 = lab.services["db1"]
        records = {
            DB: [db1.ipv4, db1.ipv6 or ""],
            RR: RR_ADDRESSES,
            S3_HOST: [lab.services["db2"].ipv4],
            S3_DEEP: [lab.services["evil"].ipv4],
        }
        dns.start(records)
        dns6.start(records)
        runner = Runner.in_netns(lab.cell)
        backend, writer = open_dataplane(request.param, runner)
        plan = plan_for(lab)
        assert converge(backend, plan).ok
        settings = FqdnSettings(min_ttl=1, max_ttl=TTL)
        # No resolver of its own: every address in a set comes from an intercepted answer.
        fqdn = FqdnService(writer, settings, netns=lab.cell, clients=[])
        fqdn.want(plan)
        variant = variant_for(request.param, request.param)
        hold = DnsHold(runner, variant, QUEUE)
        sets_kind = "nftables" if request.param == "nftables" else "ipset"
        resolvers = [(dns.address, 53), (dns6.address, 53)]
        intercept = Interceptor(fqdn, hold, sets_kind, resolvers, netns=lab.cell)
        intercept.follow(plan)
        intercept.start()
        yield Cell(lab, request.param, backend, dns, fqdn, intercept, plan, dns6)
    finally:
        if intercept is not None:
            intercept.stop(remove=True)
        for server in (dns, dns6):
            if server is not None:
                server.stop()
        lab.teardown()


def test_a_container_connects_at_once_to_what_it_resolved_50_times_in_a_row(cell: Cell) -> None:
    """(a) The rotating sixteen-address name (dnsmasq rotates its records on every query):
    each time, the set is emptied, the container resolves and connects at once to the first
    address it was told, as a client does."""
    firsts = []
    for i in range(50):
        cell.empty(RR)
        told = lookup(cell.lab.containers["web"].netns, cell.dns.address, RR)
        assert set(told) == set(RR_ADDRESSES)
        assert cell.connect("web", told[0]) is Outcome.CONNECTED, (i, told[0])
        firsts.append(told[0])
    assert len(set(firsts)) == 16, "every address came first at some lookup"
    assert cell.intercept.metrics.learned >= 50
    # Without a lookup of its own, the other container is not let through by the set.
    assert cell.connect("other", RR_ADDRESSES[0]) is Outcome.REJECTED


def test_the_exact_name_over_both_families_and_never_beyond_its_port(cell: Cell) -> None:
    cell.empty(DB)
    cell.empty(DB, 6)
    assert cell.connect("web", cell.addr("db1")) is Outcome.REJECTED  # nothing learned yet
    assert cell.resolve("web", DB).addresses == (cell.addr("db1"),)
    assert cell.connect("web", cell.addr("db1")) is Outcome.CONNECTED
    assert cell.connect("web", cell.addr("db1"), 5433) is Outcome.REJECTED
    db1_v6 = cell.lab.services["db1"].ipv6
    assert cell.resolve("web", DB, QTYPE_AAAA).addresses == (db1_v6,)
    assert cell.members(DB, 6) == {db1_v6}
    ipv6 = cell.lab.probe_tcp("web", "db1", 5432, ipv6=True).outcome
    assert ipv6 is Outcome.CONNECTED


def test_a_container_not_granted_the_name_resolves_it_but_is_rejected(cell: Cell) -> None:
    """(b) Its answer adds nothing: the set stays empty, and its connect is rejected."""
    cell.empty(DB)
    before = cell.intercept.metrics.not_granted
    assert cell.resolve("other", DB).addresses == (cell.addr("db1"),)
    assert cell.members(DB) == set()
    assert cell.intercept.metrics.not_granted == before + 1
    assert cell.connect("other", cell.addr("db1")) is Outcome.REJECTED


def test_when_the_record_moves_the_new_address_works_at_once_the_old_one_lapses(
    cell: Cell,
) -> None:
    """(c)"""
    cell.empty(DB)
    cell.resolve("web", DB)
    assert cell.connect("web", cell.addr("db1")) is Outcome.CONNECTED
    cell.dns.set_record(DB, [cell.addr("db2")])
    try:
        assert cell.resolve("web", DB).addresses == (cell.addr("db2"),)
        assert cell.connect("web", cell.addr("db2")) is Outcome.CONNECTED, "at once"
        time.sleep(TTL + 0.5)  # nobody renews db1: the kernel drops it at its TTL
        cell.resolve("web", DB)
        assert cell.members(DB) == {cell.addr("db2")}
        assert cell.connect("web", cell.addr("db1")) is Outcome.REJECTED, "after its TTL"
        assert cell.connect("web", cell.addr("db2")) is Outcome.CONNECTED
    finally:
        db1 = cell.lab.services["db1"]
        cell.dns.set_record(DB, [db1.ipv4, db1.ipv6 or ""])


def test_an_unsolicited_forged_answer_adds_nothing(cell: Cell) -> None:
    """(d) The container has a live flow to the resolver (its port is open in conntrack,
    so the forged datagram is held like a real answer); a forger spoofing the resolver's
    address and port sends it an answer naming its own address, for every transaction
    id.  None replies to a query the container sent: nothing is learned."""
    cell.empty(DB)
    web = cell.lab.containers["web"]
    evil = cell.addr("evil")

    def open_flow() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((web.ipv4, 0))
        s.connect((cell.dns.address, 53))
        s.send(
            struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
            + b"\x05other\x03lab\x07example\x00\x00\x01\x00\x01"
        )
        s.settimeout(1.0)
        s.recv(512)  # the real answer (NXDOMAIN): the flow is ESTABLISHED both ways
        return s

    sock = run_in_netns(web.netns, open_flow)
    try:
        port = sock.getsockname()[1]
        before = cell.intercept.metrics.unsolicited
        forged = response(0, DB, QTYPE_A, [record(DB, QTYPE_A, 3600, evil)])
        spray_from_resolver(
            cell.lab, cell.dns, forged, web.ipv4, range(port, port + 1), range(0, 65536, 128)
        )
        deadline = time.monotonic() + 5
        while cell.intercept.metrics.unsolicited < before + 512 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cell.intercept.metrics.unsolicited >= before + 512, "every forgery was held"
    finally:
        sock.close()
    assert cell.members(DB) == set()
    assert cell.connect("web", evil) is Outcome.REJECTED


def test_a_wildcard_grant_works_on_the_first_connection(cell: Cell) -> None:
    """(f) `*.s3.lab.example` grants exactly one more label: b.s3 works at once, a.b.s3
    (two labels) teaches nothing."""
    assert cell.resolve("web", S3_HOST).addresses == (cell.addr("db2"),)
    assert cell.members(S3) == {cell.addr("db2")}
    assert cell.connect("web", cell.addr("db2")) is Outcome.CONNECTED
    assert cell.resolve("web", S3_DEEP).addresses == (cell.addr("evil"),)
    assert cell.addr("evil") not in cell.members(S3)
    assert cell.connect("web", cell.addr("evil")) is Outcome.REJECTED
    status = {(s["fqdn"], s["family"]): s for s in cell.fqdn.status()}
    assert status[(S3, 4)]["addresses"] == [cell.addr("db2")]


def test_with_the_agent_down_or_stuck_answers_are_dropped_and_counted(cell: Cell) -> None:
    """(e) Fail closed: no reader, no answer (the kernel drops it; our rule's counter
    says it was held); a reader that does not read fills the queue, and the kernel counts
    what it dropped past it."""
    cell.empty(DB)
    cell.intercept.stop()
    try:
        held = cell.intercept.hold.held()
        with pytest.raises(DnsError):
            cell.resolve("web", DB)
        assert cell.intercept.hold.held() > held, "the answer reached the hold"
        assert cell.members(DB) == set()
        assert cell.connect("web", cell.addr("db1")) is Outcome.REJECTED
        stuck = NfqueueSocket(QUEUE, cell.lab.cell, maxlen=1)
        try:
            for _ in range(3):
                with pytest.raises(DnsError):
                    cell.resolve("web", DB)
            counters = drops(cell.lab.cell, QUEUE)
            assert counters is not None and counters.queue_dropped >= 1
        finally:
            stuck.close()
    finally:
        cell.intercept.start()
    assert cell.resolve("web", DB).addresses == (cell.addr("db1"),)
    assert cell.connect("web", cell.addr("db1")) is Outcome.CONNECTED


def test_the_hold_is_ours_alone_and_goes_with_asgctl_uninstall(cell: Cell) -> None:
    """Our two chains carry the ownership marker; a converge of the ruleset leaves them;
    `asgctl uninstall` deletes exactly them and their jumps, nothing else in the table (left
    without an agent, the hold would drop every answer to the containers)."""
    tool = "iptables-nft-save" if cell.variant in ("nft", "nftables") else "iptables-legacy-save"
    restore = tool.replace("-save", "-restore")
    cell.lab.cell_exec(
        [restore, "--noflush"],
        input='*mangle\n-A POSTROUTING -m comment --comment "host rule" -j ACCEPT\nCOMMIT\n',
        check=True,
    )
    assert converge(cell.backend, cell.plan, cell.plan).ok
    saved = cell.lab.cell_exec([tool, "-t", "mangle"], check=True).stdout
    assert '-A ASG-DNSQ -m comment --comment "asg:owned"' in saved
    cell.intercept.stop()
    backend = "nftables" if cell.variant == "nftables" else "iptables"
    variant = "legacy" if cell.variant == "libiptc" else cell.variant
    argv = [str(Path(sys.executable).parent / "asgctl"), "uninstall", "--backend", backend]
    if backend == "iptables":
        argv += ["--variant", variant]
    try:
        done = cell.lab.cell_exec(argv, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "removed the DNS interception's hold" in done.stderr
        saved = cell.lab.cell_exec([tool, "-t", "mangle"], check=True).stdout
        assert "ASG-DNS" not in saved and "asg:dns" not in saved
        assert '-A POSTROUTING -m comment --comment "host rule" -j ACCEPT' in saved
        # Without the hold, answers reach the containers again, agent or not.
        assert cell.resolve("web", DB).addresses == (cell.addr("db1"),)
    finally:
        assert converge(cell.backend, cell.plan).ok
        cell.intercept.start()
    # Installed again, our jump goes before the host's ACCEPT (which would end mangle's
    # traversal before our chain saw an answer).
    saved = cell.lab.cell_exec([tool, "-t", "mangle"], check=True).stdout.splitlines()
    hooks = [line for line in saved if line.startswith("-A POSTROUTING ")]
    assert hooks[0] == '-A POSTROUTING -m comment --comment "asg:dnsq" -j ASG-DNSQ', hooks
    cell.empty(DB)
    assert cell.resolve("web", DB).addresses == (cell.addr("db1"),)
    assert cell.connect("web", cell.addr("db1")) is Outcome.CONNECTED


def test_an_ipv6_resolver_and_an_answer_over_tcp_are_held_and_learned(cell: Cell) -> None:
    """The hold is per family (ip6tables' mangle for an IPv6 resolver), and an answer over
    TCP is read from the segment that carries it; the connection's other segments are
    released without counting as answers."""
    cell.empty(DB)
    cell.empty(DB, 6)
    web = cell.lab.containers["web"]
    db1 = cell.lab.services["db1"]
    told = lookup(web.netns, cell.dns6.address, DB, ipv6=True)
    assert told == (db1.ipv6,)
    assert cell.lab.probe_tcp("web", "db1", 5432, ipv6=True).outcome is Outcome.CONNECTED
    assert lookup(web.netns, cell.dns6.address, DB) == (db1.ipv4,)  # A over IPv6
    assert cell.connect("web", db1.ipv4) is Outcome.CONNECTED
    cell.empty(DB)
    answers = cell.intercept.metrics.answers

    def over_tcp() -> bytes:
        query = build_query(4242, DB, QTYPE_A)
        with socket.create_connection((cell.dns.address, 53), timeout=2) as s:
            s.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            return s.recv(size, socket.MSG_WAITALL)

    reply = run_in_netns(web.netns, over_tcp)
    assert parse_response(reply, 4242, DB, QTYPE_A)[0].addresses == (db1.ipv4,)
    assert cell.connect("web", db1.ipv4) is Outcome.CONNECTED, "learned from the TCP answer"
    assert cell.intercept.metrics.answers == answers + 1, "one answer, whatever the segments"
