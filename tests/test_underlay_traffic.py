"""Real packets: ASGs judge only what a container sends out through the cell's underlay.

Pinned against cloudfoundry/silk-release (file@commit:line):
- silk sends a container's packet to its ASG chain only when it leaves through the underlay:
  `FORWARD -s <ip> -o <underlay> -j netout--<handle>`, one jump per underlay interface
  (src/code.cloudfoundry.org/lib/rules/rules.go@0a8b534:50, NewNetOutJumpConditions),
  appended to FORWARD (cni-wrapper-plugin/netrules/common.go@7ed0ad5:11, initChains) by
  defaultNetOutRules (cni-wrapper-plugin/netrules/netout.go@17a1c64:121-127);
- traffic between containers is the network policies': the vxlan-policy-agent inserts its
  `vpa--<time>` chain first in FORWARD (vxlan-policy-agent/enforcer/enforcer.go@01b6775:64-71
  NewPolicyChain, :258 `enforce`: BulkInsert at 1) and each container gets
  `-j overlay--<handle>` (netout.go@17a1c64:128-134, defaultNetOutRules);
- deny networks reject before every ASG accept: `always` for every container, `running` for
  `app` and `task`, `staging` for `staging` (cni-wrapper-plugin/netrules/
  netout_chain.go@0fc76f3:58 IPTablesRules, :85 denyNetworksRules, :92 and :98);
- the outbound connection limit: new TCP connections, hashlimit above rate/sec after a burst,
  per container, destination address and port (lib/rules/rules.go@0a8b534:293-301,
  NewNetOutConnRateLimitRule; netout_chain.go@0fc76f3:107 rateLimitRule), off by default
  with burst 1000 and 100/s (jobs/silk-cni/spec@0ceeb54:155-166, outbound_connections).

One lab cell per backend (iptables-legacy, iptables-nft, nftables).  The cell's default routes
leave through its two service veths (ECMP), so the underlay is found as the agent finds it on
a Diego cell, and has two interfaces; `peer` is another app's container on the same cell,
listening, reached through its own veth: never the underlay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends import Backend, Runner, converge
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.kernel.underlay import detect_underlay
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.core.cellplan import CellPlan, CellSettings, DenyNetworks, RateLimit
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, PolicySet, SecurityGroup
from tests.conftest import require_netns
from tests.test_traffic import assert_rejected_by_cell, rule

VARIANTS = ("legacy", "nft", "nftables")
CONTAINERS = (
    ContainerSpec("web", app_id="app-web", space_id="space-prod", ipv6=True),
    ContainerSpec("stager", app_id="app-web", space_id="space-prod", workload="staging"),
    ContainerSpec(
        "peer", app_id="app-peer", space_id="space-other", ipv6=True, tcp_ports=(8080, 8081)
    ),
)
SERVICES = (
    ServiceSpec("echo", tcp_ports=(80, 443), ipv6=True),
    ServiceSpec("far", tcp_ports=(443,)),
)
SPACES = ("space-prod", "space-other")


def only_services(lab: Lab) -> PolicySet:
    """ASGs as cf-deployment's defaults are to a container network: everything the cell
    reaches outside (here: echo on port 80) and nothing of the containers' own range."""
    echo4, echo6 = lab.services["echo"].ipv4, lab.services["echo"].ipv6 or ""
    rules = (rule("tcp", echo4, "80"), rule("tcp", echo6, "80"))
    return PolicySet(
        security_groups=(
            SecurityGroup("public", rules, running_spaces=SPACES, staging_spaces=SPACES),
        )
    )


def allow_all() -> PolicySet:
    everything = (
        rule("all", "0.0.0.0-255.255.255.255"),
        rule("all", "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    )
    return PolicySet(
        security_groups=(
            SecurityGroup("all", everything, running_spaces=SPACES, staging_spaces=SPACES),
        )
    )


def inventory(lab: Lab) -> list[Container]:
    out = [
        Container(s.handle, lab.containers[s.name].ipv4, s.app_id, s.space_id, workload=s.workload)
        for s in CONTAINERS
    ]
    for spec in CONTAINERS:
        if spec.ipv6:
            ep = lab.containers[spec.name]
            out.append(Container(f"{spec.handle}-v6", ep.ipv6 or "", spec.app_id, spec.space_id))
    return out


@dataclass
class Cell:
    lab: Lab
    backend: Backend
    variant: str
    underlay: dict[int, tuple[str, ...]]

    def converge(self, policy: PolicySet, **settings: object) -> CellPlan:
        base = CellSettings(self.underlay[4], self.underlay[6])
        plan = compile_cell(policy, inventory(self.lab), "lab", replace(base, **settings))  # type: ignore[arg-type]
        result = converge(self.backend, plan)
        assert result.ok, result.to_dict()
        return plan


@pytest.fixture(scope="module", params=VARIANTS)
def cell(request: pytest.FixtureRequest, _stale_labs_reaped: None) -> Iterator[Cell]:
    require_netns()
    lab = Lab(CONTAINERS, SERVICES).start()
    try:
        runner = Runner.in_netns(lab.cell)
        backend: Backend
        if request.param == "nftables":
            backend = NftablesBackend.open("auto", runner)
        else:
            backend = IptablesBackend.open(request.param, runner)
        yield Cell(lab, backend, request.param, detect_underlay(runner))
    finally:
        lab.teardown()


def test_the_underlay_is_found_by_the_cells_default_routes(cell: Cell) -> None:
    # Both service veths carry the IPv4 default route (ECMP); only echo has IPv6.
    assert cell.underlay[4] == cell.lab.underlay
    assert cell.underlay[6] == (cell.lab.services["echo"].cell_ifname,)
    assert not set(cell.underlay[4]) & {e.cell_ifname for e in cell.lab.containers.values()}


@pytest.mark.parametrize("ipv6", [False, True], ids=["v4", "v6"])
def test_container_to_container_is_untouched_while_underlay_egress_is_judged(
    cell: Cell, ipv6: bool
) -> None:
    lab = cell.lab
    cell.converge(only_services(lab))
    # No ASG allows the peer's address, yet the peer answers: not underlay egress.
    assert lab.probe_tcp("web", "peer", 8080, ipv6=ipv6).reached
    assert lab.probe_tcp("stager", "peer", 8081).reached
    # Out through the underlay, the ASGs decide, on every underlay interface.
    assert lab.probe_tcp("web", "echo", 80, ipv6=ipv6).reached
    assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "echo", 443, ipv6=ipv6), ipv6)
    if not ipv6:  # far is reached through the second underlay interface
        assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "far", 443), False)


def _overlay_policy_stand_in(cell: Cell, port: int) -> None:
    """What silk's own FORWARD rules do for container-to-container traffic, reduced to one
    rule after ours: the network policy, which rejects `port` to the peer."""
    lab = cell.lab
    peer_if = lab.containers["peer"].cell_ifname
    if cell.variant == "nftables":
        script = (
            "table inet silkstandin {\n chain forward {\n"
            "  type filter hook forward priority filter; policy accept;\n"
            f'  oifname "{peer_if}" tcp dport {port} reject with tcp reset\n }}\n}}\n'
        )
        lab.cell_exec(["nft", "-f", "-"], input=script, check=True)
        return
    spec = ["-o", peer_if, "-p", "tcp", "--dport", str(port)]
    for tool in (f"iptables-{cell.variant}", f"ip6tables-{cell.variant}"):
        argv = [tool, "-A", "FORWARD", *spec, "-j", "REJECT", "--reject-with", "tcp-reset"]
        lab.cell_exec(argv, check=True)


def test_an_allow_all_asg_does_not_get_between_silk_and_overlay_traffic(cell: Cell) -> None:
    lab = cell.lab
    cell.converge(allow_all())
    _overlay_policy_stand_in(cell, 8081)
    # Our hook stays first in FORWARD; an accept there for this packet would have ended the
    # table before the network policy said no.
    assert lab.probe_tcp("web", "peer", 8081).outcome is Outcome.REFUSED
    assert lab.probe_tcp("web", "peer", 8081, ipv6=True).outcome is Outcome.REFUSED
    assert lab.probe_tcp("web", "peer", 8080).reached
    assert lab.probe_tcp("web", "far", 443).reached


def test_deny_networks_beat_an_allow_all_asg_by_lifecycle(cell: Cell) -> None:
    lab = cell.lab
    echo4, far4 = lab.services["echo"].ipv4, lab.services["far"].ipv4
    echo6 = lab.services["echo"].ipv6 or ""
    peer4 = lab.containers["peer"].ipv4
    deny = DenyNetworks(
        always=(f"{far4}/32", f"{peer4}/32"),
        running=(str(ipaddress.ip_network(f"{echo4}/30", strict=False)), f"{echo6}/128"),
    )
    cell.converge(allow_all(), deny_networks=deny)
    # `always`: every container; `running`: apps and tasks, not staging.
    assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "far", 443), False)
    assert_rejected_by_cell(lab, "stager", lab.probe_tcp("stager", "far", 443), False)
    assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "echo", 80), False)
    assert_rejected_by_cell(lab, "web", lab.probe_tcp("web", "echo", 80, ipv6=True), True)
    assert lab.probe_tcp("stager", "echo", 80).reached
    # A deny network judges underlay egress only, as silk's sits in the netout chain.
    assert lab.probe_tcp("web", "peer", 8080).reached
    # Without them the same ASG allows it all again.
    cell.converge(allow_all())
    assert lab.probe_tcp("web", "far", 443).reached
    assert lab.probe_tcp("web", "echo", 80).reached


def test_the_connection_limit_rejects_beyond_the_burst(cell: Cell) -> None:
    lab = cell.lab
    burst = 3
    plan = cell.converge(allow_all(), outbound=RateLimit(limit=True, burst=burst, rate_per_sec=1))
    results = [lab.probe_tcp("web", "echo", 443) for _ in range(12)]
    assert all(r.reached for r in results[:burst]), [str(r) for r in results]
    rejected = [r for r in results[burst:] if not r.reached]
    assert rejected, [str(r) for r in results]
    for r in rejected:
        assert_rejected_by_cell(lab, "web", r, False)
    # The buckets the packets filled are the kernel's state, not drift from the plan.
    again = converge(cell.backend, plan, plan)
    assert again.ok and again.in_sync and again.drift == (), again.to_dict()
    # Per destination port: another port has its own bucket; containers' traffic has none.
    assert lab.probe_tcp("web", "echo", 80).reached
    assert all(lab.probe_tcp("web", "peer", 8080).reached for _ in range(8))
    # Off (the default), nothing is limited.
    cell.converge(allow_all())
    assert all(lab.probe_tcp("web", "echo", 443).reached for _ in range(8))


def test_rendered_hooks_match_only_the_underlay(cell: Cell) -> None:
    """What the kernel holds: one FORWARD hook per underlay interface, first, each `-o`."""
    plan = cell.converge(only_services(cell.lab))
    if cell.variant == "nftables":
        listing = cell.lab.cell_exec(["nft", "list", "chain", "inet", "asgctl", "forward4"])
        dispatch = [x for x in listing.stdout.splitlines() if "vmap @containers4" in x]
        assert len(dispatch) == 1, listing.stdout
        quoted = ", ".join(f'"{n}"' for n in cell.underlay[4])
        assert f"oifname {{ {quoted} }} ip saddr vmap" in dispatch[0], dispatch
        return
    lines = cell.lab.cell_exec([f"iptables-{cell.variant}", "-S", "FORWARD"]).stdout.splitlines()
    hooks = [x for x in lines if "asg:forward" in x]
    assert hooks == [
        f'-A FORWARD -o {n} -m comment --comment "asg:forward" -j ASG-FORWARD'
        for n in cell.underlay[4]
    ]
    assert lines[1 : 1 + len(hooks)] == hooks
    assert plan.settings.underlay4 == cell.underlay[4]
