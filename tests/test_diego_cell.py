"""The lab's cells are Diego cells: an underlay (`eth0`) and an overlay (`silk-vtep`), and with
`--cf-layout` CF's own chains; real packets show who decides what.

- Container to container, on one cell and across cells over the VXLAN overlay, is decided by
  the overlay policy alone: with the network policy frontend -> backend:8080, the frontend
  reaches every backend and the blog none, whether the ASGs deny or allow everything; and
  without CF's chains the overlay lets everything through, whatever the ASGs say.
- ASGs decide underlay egress (out through `eth0`), with CF's chains in place.

What the lab mimics, pinned against cloudfoundry/silk-release (path@commit:line):
- silk's vtep: a VXLAN device `silk-vtep`, VNI 1, port 4789, group-based policy on, holding
  the cell's lease address with the overlay's prefix, MAC ee:ee:<lease address>
  (src/code.cloudfoundry.org/silk/daemon/vtep/factory.go@85ad715:37-93 CreateVTEP: the link
  with GBP :38-61, the lease address with the overlay's mask :75-91; name, VNI and port from
  jobs/silk-daemon/templates/client-config.json.erb@146c487:36, :41, :48 and
  jobs/silk-daemon/spec@0e3671c:35-37, handed to the vtep's Config by
  silk/daemon/vtep/config_creator.go@e82eab3:86, :91, :93;
  the MAC is the lease's, src/code.cloudfoundry.org/silk/controller/leaser/
  lease_controller.go@95a5a1a:172-185 tryAcquireLease, made by GenerateForVTEP, ee:ee then
  the IPv4 address: cloudfoundry/silk/lib/hardware_address_generator.go@0a589a2:10-12); per
  other cell a route to its lease via its vtep address, a permanent ARP entry and an FDB entry
  naming its underlay address (silk/daemon/vtep/converger.go@85ad715:26-100 Converge,
  :169-202 addRoute: Dst the lease, Gw its first address, :204-234 addNeighs: ARP :206-212,
  FDB :213-220);
- silk-cni's `overlay--<handle>` chain, jumped to from FORWARD: accept leaving over the vtep
  only when marked, accept RELATED,ESTABLISHED to the container, reject the rest to it
  (src/code.cloudfoundry.org/cni-wrapper-plugin/netrules/netout.go@17a1c64:128-141 in
  defaultNetOutRules; src/code.cloudfoundry.org/lib/rules/rules.go@0a8b534:329-336
  NewOverlayAllowEgress, :338-344 NewOverlayRelatedEstablishedRule, :311-317
  NewOverlayDefaultRejectRule);
- the vxlan-policy-agent's `vpa--<time>` chain, inserted at FORWARD position 1: MARK each
  local container of a policy's source app with the app's tag, ACCEPT to a local container
  of a destination app on the policy's port when the packet carries the source's tag
  (src/code.cloudfoundry.org/vxlan-policy-agent/planner/planner_linux.go@25ea819:303-326
  getContainerPolicies picks the sources and destinations, :382-439 planIPTableRules: MARK
  :384-389, ACCEPT :403-411; lib/rules/rules.go@0a8b534:108-113 NewMarkSetRule, :74-82
  NewMarkAllowRule; vxlan-policy-agent/enforcer/enforcer.go@01b6775:64-71 NewPolicyChain,
  :258 BulkInsert at 1); the tag crosses cells in the VXLAN GBP header.

Backends: with CF's chains, asgctl enforces with iptables-legacy and iptables-nft (the same
variant as CF's chains, as an agent's `--variant auto` picks); without them, with
iptables-nft and nftables (`--cf-layout` refuses nftables: silk's netout chains would judge
again what asgctl's table accepted).

Addresses: the overlay is 198.18.0.0/17, standing in for CF's 10.255.0.0/16 (tests use only
198.18.0.0/15).  Each real-packet lab has a state root of its own and is always torn down.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgctl_lab import platform
from asgctl_lab.nsenter import list_netns
from asgctl_lab.probe import Outcome, ProbeResult, probe_tcp, probe_udp
from reconciler.backends import Runner, converge
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.iptables.cflayout import NetworkPolicy, render_diego
from reconciler.backends.kernel.underlay import detect_underlay
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.cli import main as cli
from reconciler.core.cellplan import CellSettings
from reconciler.core.compile import compile_cell
from reconciler.core.model import PolicySet, SecurityGroup
from tests.test_lab_platform import POLICIES, asgctl, require_lab
from tests.test_traffic import rule

PORT = platform.BACKEND_PORT
DNS = "198.19.53.53"

# -- the address plan and CF's chains (pure) -------------------------------------------------


def test_each_cell_has_an_eth0_underlay_and_a_silk_vtep_overlay() -> None:
    spec = platform.default_spec(3)
    net = platform.plan_network("asgl00aa", spec)
    overlay = platform.OVERLAY_V4
    assert overlay.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
    for i, (cell, cn) in enumerate(net.cells.items()):
        lease = ipaddress.ip_network(cn.subnet)
        assert lease.prefixlen == 24 and lease.subnet_of(overlay)
        assert cn.vtep_ip == str(lease.network_address)  # the lease's first address
        assert cn.vtep_mac == "ee:ee:" + ":".join(
            f"{b:02x}" for b in ipaddress.ip_address(cn.vtep_ip).packed
        )
        assert ipaddress.ip_address(cn.uplink_ip) not in overlay  # the underlay is not
        script = net.scripts[cn.netns]
        assert f"addr add {cn.uplink_ip}/30 dev eth0" in script
        assert f"route add default via {cn.core_ip}" in script
        (vtep,) = [c for c in script if c.startswith("link add silk-vtep")]
        assert f"id 1 local {cn.uplink_ip} dev eth0 dstport 4789 nolearning gbp" in vtep
        assert f"addr add {cn.vtep_ip}/17 dev silk-vtep scope link" in script
        others = [o for o in net.cells.values() if o is not cn]
        for o in others:
            assert f"route add {o.subnet} via {o.vtep_ip} dev silk-vtep src {cn.vtep_ip}" in script
            assert (
                f"neigh add {o.vtep_ip} lladdr {o.vtep_mac} dev silk-vtep nud permanent" in script
            )
            assert (
                f"fdb add {o.vtep_mac} dev silk-vtep dst {o.uplink_ip} self permanent"
                in net.fdb[cn.netns]
            )
        assert len(net.fdb[cn.netns]) == len(others), (i, cell)
        for c in spec.containers:
            if c.cell == cell:
                assert ipaddress.ip_address(net.containers[c.name].ip) in lease


def _plan_and_policies(cell: str):  # type: ignore[no-untyped-def]
    spec = platform.default_spec(2)
    net = platform.plan_network("asgl00aa", spec)
    apps = {c.app for c in spec.containers} | {"payments/prod/frontend"}
    guids = platform.resolve_guids(POLICIES, sorted(apps))
    containers = platform.cell_containers(spec, net, guids, cell)
    plan = compile_cell(PolicySet(), containers, cell, CellSettings(("eth0",), ("eth0",)))
    return plan, platform.network_policies(spec, guids), net, guids


def test_the_vpa_chain_marks_sources_and_accepts_tagged_packets_first_in_forward() -> None:
    plan, policies, net, _guids = _plan_and_policies("cell-1")
    text = render_diego(plan, policies, vtep="silk-vtep", stamp=1700000000)
    assert text == render_diego(plan, policies, vtep="silk-vtep", stamp=1700000000)
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    frontend, backend = net.containers["frontend-0"].ip, net.containers["backend-0"].ip
    vpa = [ln for ln in lines if ln.startswith("-A vpa--1700000000 ")]
    assert vpa == [
        f"-A vpa--1700000000 -s {frontend}/32 -j MARK --set-xmark 0x0001",
        f"-A vpa--1700000000 -d {backend}/32 -p tcp -m tcp --dport {PORT}"
        " -m mark --mark 0x0001 -j ACCEPT",
    ]
    assert "-I FORWARD 1 -j vpa--1700000000" in lines
    # On cell-2 only the destination is local: no MARK rule, the tag comes over the overlay.
    plan2, _, net2, _ = _plan_and_policies("cell-2")
    vpa2 = [ln for ln in render_diego(plan2, policies, vtep="silk-vtep", stamp=1).splitlines()]
    assert [ln for ln in vpa2 if ln.startswith("-A vpa--1 ")] == [
        f"-A vpa--1 -d {net2.containers['backend-1'].ip}/32 -p tcp -m tcp --dport {PORT}"
        " -m mark --mark 0x0001 -j ACCEPT"
    ]


def test_silk_overlay_chain_per_container_after_its_netout_jump() -> None:
    plan, policies, _net, _ = _plan_and_policies("cell-1")
    lines = render_diego(plan, policies, vtep="silk-vtep", stamp=1).splitlines()
    forward = [ln for ln in lines if ln.startswith(("-A FORWARD", "-I FORWARD"))]
    n = len(plan.containers)
    assert [ln.split(" -j ")[1].split("--")[0] for ln in forward] == (
        ["netout"] * n + ["overlay"] * n + ["vpa"]
    )
    assert all(" -o eth0 " in ln for ln in forward[:n])  # ASGs: underlay egress only
    for cp in plan.containers:
        ip = f"{cp.container.ip}/32"
        chain = f"overlay--{cp.chain_id[:16]}"
        assert [ln for ln in lines if ln.startswith(f"-A {chain} ")] == [
            f"-A {chain} -s {ip} -o silk-vtep -m mark ! --mark 0x0 -j ACCEPT",
            f"-A {chain} -d {ip} -m state --state RELATED,ESTABLISHED -j ACCEPT",
            f"-A {chain} -d {ip} -j REJECT --reject-with icmp-port-unreachable",
        ]


def test_network_policies_and_tags_are_checked() -> None:
    with pytest.raises(ValueError, match="tcp or udp"):
        NetworkPolicy("a", "b", "icmp", 1, 1)
    with pytest.raises(ValueError, match="ports"):
        NetworkPolicy("a", "b", "tcp", 9, 8)
    with pytest.raises(ValueError, match="org/space/app"):
        platform.LabNetworkPolicy("frontend", "payments/prod/backend", 8080)


def test_cf_layout_with_an_nftables_agent_is_refused_before_anything_is_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(platform, "unavailable_reason", lambda: None)
    monkeypatch.setenv(platform.STATE_ENV, str(tmp_path))
    result = CliRunner().invoke(
        cli, ["lab", "up", "--name", "x", "--cf-layout", "--backend", "nftables"]
    )
    assert result.exit_code == 1
    assert "--cf-layout installs CF's iptables chains" in result.output
    assert not (tmp_path / "x").exists()


# -- real packets ----------------------------------------------------------------------------

EVERYTHING = (rule("all", "0.0.0.0-255.255.255.255"),)


def asg_policy(info: platform.LabInfo, allow: bool) -> PolicySet:
    """One ASG bound to every space of the lab, running and staging: everything, or nothing."""
    spaces = tuple(sorted({g.space_id for g in info.guids.values()}))
    rules = EVERYTHING if allow else ()
    return PolicySet(
        security_groups=(
            SecurityGroup("fleet", rules, running_spaces=spaces, staging_spaces=spaces),
        )
    )


@dataclass
class DiegoLab:
    info: platform.LabInfo
    variant: str
    """The iptables variant asgctl enforces with, or `nftables` for that backend."""

    def converge(self, allow: bool) -> None:
        """What each cell's agent would do for this policy (without git in between)."""
        for cell in self.info.cells:
            runner = Runner.in_netns(self.info.cell_netns(cell))
            backend = (
                NftablesBackend.open("auto", runner)
                if self.variant == "nftables"
                else IptablesBackend.open(self.variant, runner)
            )
            containers = platform.cell_containers(
                self.info.spec, self.info.net, self.info.guids, cell
            )
            plan = compile_cell(
                asg_policy(self.info, allow), containers, cell, CellSettings(("eth0",), ("eth0",))
            )
            result = converge(backend, plan)
            assert result.ok, result.to_dict()

    def c2c(self, src: str, dst: str) -> ProbeResult:
        net = self.info.net.containers
        return probe_tcp(net[src].netns, net[dst].ip, PORT, timeout=2.0)

    def vtep_packets(self, cell: str) -> int:
        out = subprocess.run(
            ["ip", "-n", self.info.cell_netns(cell), "-s", "-j", "link", "show", "silk-vtep"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])


def _up(name: str, root: Path, cf_layout: str | None) -> Iterator[platform.LabInfo]:
    require_lab()
    old = os.environ.get(platform.STATE_ENV)
    os.environ[platform.STATE_ENV] = str(root)
    try:
        info = platform.up(name, platform.default_spec(2), policies=POLICIES, cf_layout=cf_layout)
        try:
            yield info
        finally:
            platform.down(name)
            assert not [n for n in list_netns() if n.startswith(f"{info.lab_id}-")]
    finally:
        if old is None:
            os.environ.pop(platform.STATE_ENV, None)
        else:
            os.environ[platform.STATE_ENV] = old


@pytest.fixture(scope="module", params=["legacy", "nft"])
def diego(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DiegoLab]:
    root = tmp_path_factory.mktemp("diego-labs")
    yield from (DiegoLab(info, request.param) for info in _up("diego", root, request.param))


def assert_rejected_by(result: ProbeResult, address: str) -> None:
    """Rejected at once by a cell (ICMP port unreachable from `address`), not silence."""
    assert result.outcome is Outcome.REJECTED, str(result)
    assert result.icmp_from == address, str(result)


@pytest.mark.netns
@pytest.mark.parametrize("allow", [False, True], ids=["asg-denies-all", "asg-allows-all"])
def test_container_to_container_is_the_overlay_policys_alone(diego: DiegoLab, allow: bool) -> None:
    diego.converge(allow)
    net = diego.info.net
    before = diego.vtep_packets("cell-2")
    # The network policy lets the frontend in, on its own cell and across the overlay.
    assert diego.c2c("frontend-0", "backend-0").reached
    assert diego.c2c("frontend-0", "backend-1").reached
    assert diego.vtep_packets("cell-2") > before  # it did go through silk-vtep
    # The blog has no network policy: the destination's cell rejects it, there too.
    blog_gateway = net.containers["blog-0"].gateway
    assert_rejected_by(diego.c2c("blog-0", "backend-0"), blog_gateway)
    assert_rejected_by(diego.c2c("blog-0", "backend-1"), net.cells["cell-2"].vtep_ip)
    # One backend may not call another: the policy names the frontend as its source.
    assert not diego.c2c("backend-1", "backend-0").reached


@pytest.mark.netns
def test_asgs_decide_underlay_egress_with_cfs_chains_in_place(diego: DiegoLab) -> None:
    net = diego.info.net.containers
    diego.converge(allow=False)
    for name in ("frontend-0", "backend-1", "blog-0"):
        assert_rejected_by(probe_udp(net[name].netns, DNS, 53, timeout=2.0), net[name].gateway)
    assert diego.c2c("frontend-0", "backend-1").reached
    diego.converge(allow=True)
    for name in ("frontend-0", "backend-1", "blog-0"):
        assert probe_udp(net[name].netns, DNS, 53, timeout=2.0).reached
    assert not diego.c2c("blog-0", "backend-1").reached
    # asgctl's hooks are on the underlay only, above CF's own FORWARD entries.
    tool = f"iptables-{diego.variant}"
    forward = subprocess.run(
        ["ip", "netns", "exec", diego.info.cell_netns("cell-1"), tool, "-S", "FORWARD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    hooks = [ln for ln in forward if "asg:forward" in ln]
    assert hooks and all(" -o eth0 " in ln for ln in hooks)
    vpa = next(i for i, ln in enumerate(forward) if "-j vpa--" in ln)
    assert max(forward.index(h) for h in hooks) < vpa


@pytest.fixture(scope="module", params=["nft", "nftables"])
def plain(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DiegoLab]:
    """A lab without CF's chains, enforced by asgctl's iptables-nft or nftables backend."""
    root = tmp_path_factory.mktemp("plain-labs")
    yield from (DiegoLab(info, request.param) for info in _up("plain", root, None))


@pytest.mark.netns
def test_the_agent_finds_eth0_as_the_cells_underlay(plain: DiegoLab) -> None:
    for cell in plain.info.cells:
        found = detect_underlay(Runner.in_netns(plain.info.cell_netns(cell)))
        assert found == {4: ("eth0",), 6: ("eth0",)}


@pytest.mark.netns
def test_without_cfs_chains_the_overlay_is_open_and_asgs_still_do_not_touch_it(
    plain: DiegoLab,
) -> None:
    net = plain.info.net.containers
    plain.converge(allow=False)
    before = plain.vtep_packets("cell-1")
    assert plain.c2c("blog-0", "backend-1").reached  # no overlay policy, no ASG: open
    assert plain.c2c("frontend-0", "backend-1").reached
    assert plain.c2c("blog-0", "backend-0").reached
    assert plain.vtep_packets("cell-1") > before
    assert_rejected_by(probe_udp(net["blog-0"].netns, DNS, 53), net["blog-0"].gateway)
    assert_rejected_by(probe_tcp(net["backend-1"].netns, DNS, 53), net["backend-1"].gateway)
    plain.converge(allow=True)
    assert probe_udp(net["blog-0"].netns, DNS, 53).reached
    assert plain.c2c("blog-0", "backend-1").reached


@pytest.mark.netns
def test_lab_up_cf_layout_twice_and_down_leaves_no_device(tmp_path: Path) -> None:
    require_lab()
    env = {**os.environ, platform.STATE_ENV: str(tmp_path / "labs")}

    def host_vxlans() -> list[str]:
        out = subprocess.run(
            ["ip", "-j", "link", "show", "type", "vxlan"], capture_output=True, text=True
        ).stdout
        return sorted(link["ifname"] for link in json.loads(out or "[]"))

    vxlans = host_vxlans()
    try:
        for _ in (1, 2):
            up = asgctl("lab", "up", "--name", "cf", "--cf-layout", "--no-agents", env=env)
            assert up.returncode == 0, up.stderr
            doc = json.loads((tmp_path / "labs" / "cf" / "lab.json").read_text())
            assert doc["cf_layout"] in ("legacy", "nft")
            for cell in ("cell-1", "cell-2"):
                ns = f"{doc['id']}-{cell}"
                links = subprocess.run(
                    ["ip", "-n", ns, "-j", "-d", "link", "show", "silk-vtep"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                (vtep,) = json.loads(links)
                assert vtep["linkinfo"]["info_kind"] == "vxlan"
                assert vtep["linkinfo"]["info_data"]["id"] == 1
                forward = subprocess.run(
                    ["ip", "netns", "exec", ns, f"iptables-{doc['cf_layout']}", "-S", "FORWARD"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.splitlines()
                assert forward[1].startswith("-A FORWARD -j vpa--"), forward
            assert host_vxlans() == vxlans  # nothing of the lab in the host's namespace
            for _ in (1, 2):
                assert asgctl("lab", "down", "--name", "cf", env=env).returncode == 0
            assert not [n for n in list_netns() if n.startswith(f"{doc['id']}-")]
            assert host_vxlans() == vxlans
    finally:
        asgctl("lab", "down", "--name", "cf", env=env)
