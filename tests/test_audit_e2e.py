"""Audit mode with real packets: a lab cell, a real agent, every backend.

A policy repo puts one space in audit (`kind: Enforcement`); the agent converges the lab
cell from it.  Then, from a container of that space, a connection no rule allows *connects*
and the agent's flow records say `would-deny`, naming app, space, destination and port; a
neighbour of another space making the same connection is still rejected; and a deny
network stays rejected for the audited container (audit replaces only its chain's last
word, after the deny networks: silk's order, cloudfoundry/silk-release
src/code.cloudfoundry.org/cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:58-83).
Waits are bounded waits on state, never timings.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends import Backend, Runner, converge
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.core.cellplan import CellPlan, CellSettings, DenyNetworks
from reconciler.core.compile import compile_cell
from reconciler.core.model import (
    AddressRange,
    Container,
    Enforcement,
    PolicySet,
    PortRange,
    Rule,
    SecurityGroup,
)
from tests.agentkit import (  # noqa: F401 - fixtures
    AgentProc,
    PolicyRepo,
    agents,
    applied,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    wait_for,
)
from tests.cases import case_plan, load_case
from tests.conftest import require_netns
from tests.test_dataplane import Host, assert_matches_plan, host  # noqa: F401 - fixture

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

ORG = "org-acme"
WEB = ContainerSpec("web", app_id="app-web", space_id="space-prod", org_id=ORG)
OTHER = ContainerSpec("other", app_id="app-other", space_id="space-dev", org_id=ORG)
ECHO = ServiceSpec("echo", tcp_ports=(80, 8080))
FAR = ServiceSpec("far", tcp_ports=(443,))
DIRECTORY = textwrap.dedent(
    f"""\
    kind: Directory
    orgs:
      - name: acme
        guid: {ORG}
        spaces:
          - name: prod
            guid: space-prod
            apps:
              - {{name: web, guid: app-web}}
          - name: dev
            guid: space-dev
            apps:
              - {{name: other, guid: app-other}}
    """
)
AUDIT = textwrap.dedent(
    """\
    kind: Enforcement
    name: prod-audit
    scope: {type: space, name: acme/prod}
    mode: audit
    """
)
# (agent backend, iptables variant): the two iptables variants and nftables, as the
# traffic tests run them (tests/test_traffic.py VARIANTS).
BACKENDS = [("iptables", "legacy"), ("iptables", "nft"), ("nftables", "auto")]


@pytest.fixture
def cell(make_lab: Callable[..., Lab]) -> Lab:
    require_netns()
    return make_lab([WEB, OTHER], [ECHO, FAR])


@pytest.mark.parametrize(
    ("backend", "variant"), BACKENDS, ids=[b[1] if b[0] == "iptables" else b[0] for b in BACKENDS]
)
def test_an_audited_container_reaches_what_no_rule_allows_and_it_is_recorded_as_would_deny(
    cell: Lab,
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    backend: str,
    variant: str,
) -> None:
    echo, far = cell.services["echo"].ipv4, cell.services["far"].ipv4
    rule = f'{{protocol: tcp, destination: {echo}, ports: "80"}}'
    sha = policy_repo.commit(
        "acme/prod in audit",
        {
            "directory.yaml": DIRECTORY,
            "sg.yaml": sg("echo-80", [rule]),
            "enforcement.yaml": AUDIT,
        },
    )
    agent = agents(
        f"audit-{variant}",
        source=policy_repo.url,
        containers=str(cell.write_store()),
        netns=cell.cell,
        backend=backend,
        variant=variant,
        flow_log="nflog",
        flow_log_window="1s",
        deny_networks={"running": [f"{far}/32"]},
    ).start()

    wait_for(applied(policy_repo.bare, agent.name, sha), 30, what="the agent applies the policy")

    # No rule allows echo:8080; web's space is audited: it connects.
    assert cell.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    # The neighbour in another space gets the same connection rejected by the cell.
    other = cell.probe_tcp("other", "echo", 8080)
    assert other.outcome is Outcome.REJECTED, str(other)
    assert other.icmp_from == cell.containers["other"].gateway4
    # A deny network stays rejected for the audited container.
    denied = cell.probe_tcp("web", "far", 443)
    assert denied.outcome is Outcome.REJECTED, str(denied)
    assert denied.icmp_from == cell.containers["web"].gateway4
    # What a rule allows is allowed, and not recorded as would-deny.
    assert cell.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED

    def would_deny() -> list[dict[str, Any]]:
        return [r for r in agent.flow_records() if r["verdict"] == "would-deny"]

    found = wait_for(
        lambda: [r for r in would_deny() if r["destination"] == echo and r["port"] == 8080],
        15,
        what="a would-deny record for echo:8080",
    )
    record = found[0]
    assert (record["app"], record["space"], record["org"]) == ("acme/prod/web", "acme/prod", "acme")
    assert (record["container"], record["source"]) == ("web", cell.containers["web"].ipv4)
    assert record["protocol"] == "tcp" and record["cell"] == agent.name and record["count"] >= 1
    # The neighbour's reject is a deny record, not a would-deny one.
    wait_for(
        lambda: [
            r
            for r in agent.flow_records()
            if r["verdict"] == "deny" and r["container"] == "other" and r["port"] == 8080
        ],
        15,
        what="a deny record for the neighbour",
    )
    would = would_deny()
    assert all(r["container"] == "web" for r in would)
    assert not any(r["destination"] == far for r in would)  # the deny network never audits
    assert not any(r["port"] == 80 for r in would)  # allowed by a rule: nothing would deny it
    # The audited chain reads back as rendered: never seen as drift.
    doc = read_status(policy_repo.bare, agent.name) or {}
    assert doc["drift"]["corrections"] == 0
    # And the status branch says which containers run in audit.
    modes = {c["handle"]: c.get("mode") for c in doc["containers"]}
    assert modes == {"web": "audit", "other": None}


def _plan(lab: Lab, mode: Literal["audit", "enforce"] | None) -> CellPlan:
    """web (acme/prod) and other (acme/dev), echo:80 allowed to both; `mode` for acme/prod
    (None: no Enforcement document); far is a deny network of running containers."""
    echo = AddressRange.parse(lab.services["echo"].ipv4)
    group = SecurityGroup(
        "echo-80", (Rule("tcp", (echo,), (PortRange(80, 80),)),), running_default=True
    )
    modes = (Enforcement("prod", "space", "space-prod", mode),) if mode else ()
    policy = PolicySet(security_groups=(group,), enforcements=modes)
    containers = [
        Container(s.handle or s.name, lab.containers[s.name].ipv4, s.app_id, s.space_id, s.org_id)
        for s in (WEB, OTHER)
    ]
    deny = DenyNetworks(running=(f"{lab.services['far'].ipv4}/32",))
    return compile_cell(policy, containers, "lab", CellSettings(deny_networks=deny))


@pytest.mark.parametrize("variant", ["legacy", "nft", "nftables"])
def test_a_space_moves_into_audit_and_back_in_place_on_every_backend(
    make_lab: Callable[..., Lab], variant: str
) -> None:
    """The dataplane's delta rewrites only the audited chains' tails, and each step is the
    verdict the plan says: rejected, then connected (would-deny), then rejected again."""
    require_netns()
    lab = make_lab([WEB, OTHER], [ECHO, FAR])
    runner = Runner.in_netns(lab.cell)
    backend: Backend = (
        NftablesBackend.open("auto", runner)
        if variant == "nftables"
        else IptablesBackend.open(variant, runner)
    )
    last = None
    for mode, web_8080 in (
        (None, Outcome.REJECTED),
        ("audit", Outcome.CONNECTED),
        ("enforce", Outcome.REJECTED),
    ):
        plan = _plan(lab, mode)
        result = converge(backend, plan, last)
        assert result.ok, result.to_dict()
        last = plan
        assert lab.probe_tcp("web", "echo", 8080).outcome is web_8080, mode
        assert lab.probe_tcp("other", "echo", 8080).outcome is Outcome.REJECTED, mode
        assert lab.probe_tcp("web", "far", 443).outcome is Outcome.REJECTED, mode
        assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED, mode
    # Nothing left over: converging the last plan again finds the kernel in sync.
    again = converge(backend, last, last)
    assert again.ok and again.in_sync and again.drift == ()


def test_the_audit_case_reads_back_exactly_on_every_dataplane_and_a_second_apply_sends_nothing(
    host: Host,  # noqa: F811 - the fixture
) -> None:
    """The audit goldens' plan (audited IPv4 and IPv6 chains beside an enforced one) through
    each dataplane, libiptc included: what the kernel holds afterwards is what was rendered,
    so an audited chain is never mistaken for drift; back to enforce, the same."""
    plan = case_plan("audit", "audit")
    backend = host.backend()
    assert converge(backend, plan).ok
    assert_matches_plan(host, plan)
    again = converge(host.backend(), plan, plan)
    assert again.ok and again.in_sync and again.drift == ()
    enforced = compile_cell(
        replace(load_case("audit")[0], enforcements=()), load_case("audit")[1], "audit"
    )
    assert not any(cp.audit for cp in enforced.containers)
    assert converge(host.backend(), enforced, plan).ok
    assert_matches_plan(host, enforced)
