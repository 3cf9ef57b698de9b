"""The agent keeps a name's set by itself (issue 15, items 2-4): a real `asgctl agent`
process, a real git daemon, a lab cell and dnsmasq.  The provider moves the service;
nothing is edited in git and nothing restarts, and the container follows within the TTL
and a refresh; the status branch shows each name's current addresses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from asgctl_lab.dns import LabDns
from asgctl_lab.gitserver import git
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends.kernel.nsthread import run_in_netns
from reconciler.fqdn.dns import QTYPE_A, Client
from reconciler.status.document import parse_status
from tests.agentkit import (  # noqa: F401 - fixtures
    ORG,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    git_server,
    policy_repo,
    read_status,
    wait_for,
)
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

DB = "db.lab.example"
WEB = ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)
OTHER = ContainerSpec("other", app_id="app-other", space_id=SPACE, org_id=ORG)
POLICY = f"""
kind: Destination
name: db
protocol: tcp
ports: 5432
fqdns: {DB}
---
kind: EgressPolicy
name: web-db
source: {{type: app, id: app-web}}
destination: db
"""


def lab_with_dns(make_lab: Callable[..., Lab]) -> tuple[Lab, LabDns]:
    """web and other, two databases, and dnsmasq serving the name at db1 (TTL 2 s)."""
    require_netns()
    services = [
        ServiceSpec("db1", tcp_ports=(5432,)),
        ServiceSpec("db2", tcp_ports=(5432,)),
        ServiceSpec("dns"),
    ]
    lab = make_lab([WEB, OTHER], services)
    assert lab.workdir is not None
    dns = LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir, ttl=2)
    dns.start({DB: [lab.services["db1"].ipv4]})
    return lab, dns


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_provider_moves_the_service_and_the_container_follows(
    backend: str,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    lab, dns = lab_with_dns(make_lab)
    db1, db2 = lab.services["db1"].ipv4, lab.services["db2"].ipv4
    try:
        policy_repo.commit("payments reaches the card API by name", {"db.yaml": POLICY})
        agents(
            "cell-a",
            source=policy_repo.url,
            containers=str(lab.write_store()),
            netns=lab.cell,
            backend=backend,
            fqdn_resolvers=[dns.address],
            fqdn_min_ttl=1,
            fqdn_max_ttl=2,
        ).start()

        def shown(address: str) -> Callable[[], bool]:
            def check() -> bool:
                doc = read_status(policy_repo.bare, "cell-a") or {}
                return any(n["addresses"] == [address] for n in doc.get("names", []))

            return check

        wait_for(shown(db1), 20, what="status lists db1 for the name")
        wait_for(
            lambda: lab.probe_tcp("web", "db1", 5432).outcome is Outcome.CONNECTED,
            5,
            what="web reaches db.lab.example",
        )
        assert lab.probe_tcp("other", "db1", 5432).outcome is Outcome.REJECTED
        assert lab.probe_tcp("web", "db2", 5432).outcome is Outcome.REJECTED

        dns.set_record(DB, [db2])  # the provider moves it: no commit, no restart
        wait_for(
            lambda: lab.probe_tcp("web", "db2", 5432).outcome is Outcome.CONNECTED,
            10,
            what="the new address works within the TTL and a refresh",
        )
        wait_for(
            lambda: lab.probe_tcp("web", "db1", 5432).outcome is Outcome.REJECTED,
            10,
            what="the old address is rejected after its TTL",
        )
        wait_for(shown(db2), 10, what="status lists db2")
        doc = read_status(policy_repo.bare, "cell-a") or {}
        (entry,) = [n for n in doc["names"] if n["family"] == 4]
        assert entry["fqdn"] == DB and entry["count"] == 1
        # The document with its names holds to the status schema every reader applies.
        text = git(
            "--git-dir", str(policy_repo.bare), "show", "refs/heads/status/cell-a:status.yaml"
        )
        assert parse_status(text, "status/cell-a").header["names"] == doc["names"]
    finally:
        dns.stop()


def test_agent_settings_refuse_a_bad_resolver(tmp_path: Path) -> None:
    from reconciler.agent.config import ConfigError, build_config

    base = {"source": "git://127.0.0.1/x", "containers": "/x", "cell": "c"}
    with pytest.raises(ConfigError, match="fqdn-resolvers"):
        build_config({**base, "fqdn-resolvers": ["dns.example"]}, {})
    with pytest.raises(ConfigError, match="fqdn-min-ttl must be at least 1 and at most"):
        build_config({**base, "fqdn-min-ttl": 100, "fqdn-max-ttl": 10}, {})
    cfg = build_config({**base, "fqdn-resolvers": "[fd00::53]:5353", "fqdn-max-ips": 16}, {})
    assert cfg.fqdn_settings().resolvers == ("[fd00::53]:5353",)
    assert cfg.fqdn_settings().max_ips == 16


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_agent_learns_from_the_answer_the_container_receives(
    backend: str,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    """`fqdn-intercept` (on by default): the agent's own resolution asks only every 300 s
    here (fqdn-min-ttl 600), so when the provider moves the service, only the answer the
    container itself receives can open the new address -- and it does, on the first
    connect.  The status shows FqdnDnsHold=True."""
    lab, dns = lab_with_dns(make_lab)
    db2 = lab.services["db2"].ipv4
    resolver = (
        "---\nkind: Destination\nname: dns\nprotocol: udp\nports: 53\n"
        f"ips: {dns.address}\n---\nkind: EgressPolicy\nname: dns\n"
        "source: {type: default}\ndestination: dns\n"
    )
    try:
        policy_repo.commit("card API by name", {"db.yaml": POLICY + resolver})
        agents(
            "cell-a",
            source=policy_repo.url,
            containers=str(lab.write_store()),
            netns=lab.cell,
            backend=backend,
            fqdn_resolvers=[dns.address],
            fqdn_min_ttl=600,
            fqdn_max_ttl=3600,
        ).start()

        def hold_true() -> bool:
            doc = read_status(policy_repo.bare, "cell-a") or {}
            return any(
                c.get("type") == "FqdnDnsHold" and c.get("status") == "True"
                for c in doc.get("conditions") or []
            )

        wait_for(hold_true, 20, what="status shows FqdnDnsHold=True")
        wait_for(
            lambda: lab.probe_tcp("web", "db1", 5432).outcome is Outcome.CONNECTED,
            10,
            what="web reaches db1 (the agent's own first resolution)",
        )
        dns.set_record(DB, [db2])  # the agent will not ask again for 300 s
        assert lab.probe_tcp("web", "db2", 5432).outcome is Outcome.REJECTED
        client = Client(dns.address, 53, 2.0)
        answer = run_in_netns(lab.containers["web"].netns, client.query, DB, QTYPE_A)
        assert answer.addresses == (db2,)
        assert lab.probe_tcp("web", "db2", 5432).outcome is Outcome.CONNECTED, "at once"
        # The other container resolves it too, and is still rejected.
        run_in_netns(lab.containers["other"].netns, client.query, DB, QTYPE_A)
        assert lab.probe_tcp("other", "db2", 5432).outcome is Outcome.REJECTED
    finally:
        dns.stop()
