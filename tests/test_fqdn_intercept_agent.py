"""The agent's side of the interception (`fqdn.agent.AgentNames`): when it runs, what its
condition and metrics say, and that it follows containers and names (issue 15, item 2).

Real kernel, real dnsmasq, a real converged ruleset; the agent's loop is
tests/test_fqdn_agent.py's (a real `asgctl agent` process), this drives `AgentNames` as the
loop does, so the drop and down paths can be made to happen.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from asgctl_lab.dns import LabDns, LabDnsError, lookup
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.nsenter import netns_exec_argv
from asgctl_lab.probe import Outcome
from reconciler.agent.metrics import Metrics
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
from reconciler.fqdn.agent import AgentNames
from reconciler.fqdn.dns import QTYPE_A, Client
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.nfqueue import NfqueueSocket
from tests.fqdnkit import open_dataplane, require

DB = "db.lab.example"
QUEUE = 5354
WEB = ContainerSpec("web", app_id="app-web", space_id="s")
LATE = ContainerSpec("late", app_id="app-web", space_id="s")


def policy(resolver: str, names: bool = True) -> PolicySet:
    dns = (AddressRange.parse(resolver),)
    destinations = [Destination("dns", "udp", dns, (PortRange(53, 53),))]
    policies = [EgressPolicy("dns", "default", None, "dns")]
    if names:
        destinations.append(Destination("db", "tcp", (), (PortRange(5432, 5432),), fqdns=(DB,)))
        policies.append(EgressPolicy("web-db", "app", "app-web", "db"))
    return PolicySet(destinations=tuple(destinations), egress_policies=tuple(policies))


@dataclass
class Agent:
    lab: Lab
    dns: LabDns
    backend: Backend
    names: AgentNames
    backend_kind: str = "iptables"

    def plan(self, containers: tuple[str, ...] = ("web",), names: bool = True) -> CellPlan:
        inventory = [Container(c, self.lab.containers[c].ipv4, "app-web", "s") for c in containers]
        plan = compile_cell(policy(self.dns.address, names), inventory, "lab")
        assert converge(self.backend, plan).ok
        return plan

    def resolve(self, container: str) -> tuple[str, ...]:
        return lookup(self.lab.containers[container].netns, self.dns.address, DB)

    def condition(self) -> dict[str, str]:
        hold = self.names.hold_condition()
        assert hold is not None and hold["type"] == "FqdnDnsHold"
        return hold


@pytest.fixture(params=["iptables", "nftables"])
def agent(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Iterator[Agent]:
    variant = "legacy" if request.param == "iptables" else "nftables"
    require(variant)
    lab = make_lab([WEB, LATE], [ServiceSpec("dns"), ServiceSpec("db", tcp_ports=(5432,))])
    assert lab.workdir is not None
    dns = LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir, 2)
    dns.start({DB: [lab.services["db"].ipv4]})
    # The agent's own resolution asks every 300 s at the most: what passes, it learned from
    # the container's answer.
    settings = FqdnSettings(
        min_ttl=600, max_ttl=3600, resolvers=(dns.address,), intercept_queue=QUEUE
    )
    names = AgentNames(settings, request.param, lab.cell, intercept=True, variant="legacy")
    backend, _ = open_dataplane(variant, Runner.in_netns(lab.cell))
    try:
        yield Agent(lab, dns, backend, names, request.param)
    finally:
        names.stop()  # the hold stays (fail closed); the lab's namespaces go with it
        dns.stop()


def test_it_starts_with_the_first_name_follows_new_containers_and_stops_without_names(
    agent: Agent,
) -> None:
    agent.names.start()
    agent.names.follow(agent.plan(names=False))
    assert agent.names.interceptor is None and agent.names.hold_condition() is None
    agent.names.follow(agent.plan())
    assert agent.names.interceptor is not None
    assert agent.condition()["status"] == "True"
    agent.resolve("web")
    assert agent.lab.probe_tcp("web", "db", 5432).outcome is Outcome.CONNECTED
    # A container that arrives under unchanged names is followed too.
    # Someone flushes the hold's chain: the next cycle writes it again.
    agent.lab.cell_exec(["iptables-nft" if agent.backend_kind == "nftables" else "iptables-legacy",
                         "-t", "mangle", "-F", "ASG-DNSQ"], check=True)  # fmt: skip
    agent.names.follow(agent.plan(("web", "late")))
    assert agent.names.hold_repairs == 1
    agent.names.follow(agent.plan(("web", "late")))
    assert agent.names.hold_repairs == 1, "in place: nothing written"
    agent.resolve("late")
    assert agent.lab.probe_tcp("late", "db", 5432).outcome is Outcome.CONNECTED
    metrics = Metrics("lab")
    agent.names.update_metrics(metrics)
    assert metrics.get("asgctl_agent_fqdn_dns_answers_total", result="learned") == 2
    assert metrics.get("asgctl_agent_fqdn_dns_dropped_total", reason="queue-full") == 0
    assert metrics.get("asgctl_agent_fqdn_dns_verdict_seconds_count") == 2
    assert "# TYPE asgctl_agent_fqdn_dns_verdict_seconds histogram" in metrics.render()
    # The policy stops naming hosts: the interception and its hold go.
    agent.names.follow(agent.plan(names=False))
    assert agent.names.interceptor is None
    saved = agent.lab.cell_exec(["iptables-legacy-save", "-t", "mangle"]).stdout
    saved += agent.lab.cell_exec(["iptables-nft-save", "-t", "mangle"]).stdout
    assert "ASG-DNSQ" not in saved


def test_answers_the_kernel_drops_turn_the_condition_false(agent: Agent) -> None:
    """The verdict thread is held up (here: the resolver state's lock is taken, as a long
    write would) while a container sends more queries than the queue holds: the kernel drops
    the answers past it, and the next report says so; then the condition recovers."""
    agent.names.start()
    agent.names.follow(agent.plan())
    assert agent.condition()["status"] == "True"
    service = agent.names.service
    assert service is not None
    blast = (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.connect(('{agent.dns.address}',53))\n"
        "q=bytes.fromhex('000001000001000000000000026462036c6162076578616d706c650000010001')\n"
        "for i in range(1600):\n"  # paced: dnsmasq's own socket buffer must not drop them
        "    s.send(i.to_bytes(2,'big')+q[2:]); time.sleep(0.0005)\n"
    )
    with service._lock:  # the thread blocks in its first learn
        done = subprocess.run(
            netns_exec_argv(agent.lab.containers["web"].netns, [sys.executable, "-c", blast]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert agent.names.interceptor is not None
        waited = 0
        while not sum(agent.names.interceptor.queue_drops() or (0, 0)) and waited < 50:
            time.sleep(0.1)
            waited += 1
    hold = agent.condition()
    assert (hold["status"], hold["reason"]) == ("False", "AnswersDropped"), hold
    assert agent.condition()["status"] == "True", "no new drops since the last report"


def test_a_queue_taken_by_another_reader_is_reported_and_retried(agent: Agent) -> None:
    taken = NfqueueSocket(QUEUE, agent.lab.cell)
    try:
        agent.names.start()
        agent.names.follow(agent.plan())
        hold = agent.condition()
        assert (hold["status"], hold["reason"]) == ("False", "InterceptionDown"), hold
        assert "NFQUEUE" in hold["message"]
    finally:
        taken.close()
    agent.names.follow(agent.plan())  # the next cycle tries again
    assert agent.condition()["status"] == "True"
    agent.resolve("web")
    assert agent.lab.probe_tcp("web", "db", 5432).outcome is Outcome.CONNECTED


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_cell_local_resolver_is_held_for_containers_never_for_the_cell_itself(
    backend: str, make_lab: Callable[..., Lab]
) -> None:
    """A resolver on the cell: on a Diego cell, bosh-dns binds 169.254.0.2 on the VM itself
    (cloudfoundry/bosh-dns-release jobs/bosh-dns/spec@90d2d3fc:36-38) and makes itself the
    VM's own nameserver (`override_nameserver`, default true, :74-76), so the cell's own
    processes ask it too.  Its answers to containers leave through POSTROUTING and are held
    and learned like forwarded ones; its answers to the cell's own processes are never held,
    so they keep working while no agent runs."""
    variant = "legacy" if backend == "iptables" else "nftables"
    require(variant)
    lab = make_lab([WEB], [ServiceSpec("db", tcp_ports=(5432,))])
    assert lab.workdir is not None
    local = lab.containers["web"].gateway4  # an address of the cell itself
    workdir = lab.workdir / "cell-dns"
    workdir.mkdir()
    dns = LabDns(lab.cell, local, workdir, 2).start({DB: [lab.services["db"].ipv4]})
    settings = FqdnSettings(min_ttl=600, max_ttl=3600, resolvers=(local,), intercept_queue=QUEUE)
    names = AgentNames(settings, backend, lab.cell, intercept=True, variant="legacy")
    dataplane, _ = open_dataplane(variant, Runner.in_netns(lab.cell))
    agent = Agent(lab, dns, dataplane, names)
    try:
        names.start()
        names.follow(agent.plan())
        assert lookup(lab.containers["web"].netns, local, DB) == (lab.services["db"].ipv4,)
        assert lab.probe_tcp("web", "db", 5432).outcome is Outcome.CONNECTED, "learned"
        assert names.interceptor is not None and names.interceptor.metrics.learned == 1
        names.stop()  # the agent is down; its hold stays
        client = Client(local, 53, 1.0)
        answer = run_in_netns(lab.cell, client.query, DB, QTYPE_A)
        assert answer.addresses == (lab.services["db"].ipv4,), "the cell's own lookup works"
        with pytest.raises(LabDnsError):  # a container's is held, and dropped: fail closed
            lookup(lab.containers["web"].netns, local, DB)
    finally:
        names.stop()
        dns.stop()


def test_a_failing_verdict_thread_turns_the_condition_false(agent: Agent) -> None:
    """The thread survives any failure of one read (it counts it, binds its sockets again
    and carries on), and the next report says so.  Here its query socket is closed under
    it; afterwards a container's answer is learned again."""
    agent.names.start()
    agent.names.follow(agent.plan())
    assert agent.condition()["status"] == "True"
    interceptor = agent.names.interceptor
    assert interceptor is not None and interceptor._log is not None
    interceptor._log.sock.close()
    for _ in range(100):
        if interceptor.metrics.errors:
            break
        time.sleep(0.05)
    hold = agent.condition()
    assert (hold["status"], hold["reason"]) == ("False", "InterceptionFailing"), hold
    for _ in range(100):  # bound again
        if interceptor._log is not None and interceptor._log.sock.fileno() >= 0:
            break
        time.sleep(0.05)
    agent.resolve("web")
    assert agent.lab.probe_tcp("web", "db", 5432).outcome is Outcome.CONNECTED
    assert agent.condition()["status"] == "True"
