"""The cell's settings: underlay detection, the hooks' delta, agent settings, deny networks
in `explain`, and every change of settings converging on every backend (a lab cell).

The behaviour pinned here is cloudfoundry/silk-release's (file@commit:line):
- the underlay: a jump per interface, `-s <ip> -o <underlay> -j netout--<handle>`
  (src/code.cloudfoundry.org/lib/rules/rules.go@0a8b534:50, NewNetOutJumpConditions); silk
  finds the interfaces holding the underlay IPs unless `temporary_underlay_interface_names`
  names them (cni-wrapper-plugin/main.go@00cd892:111-119 in cmdAdd, passed on as
  HostInterfaceNames :158; lib/interfacelookup/interface_name_lookup.go@b9f210a:42-52
  GetNamesFromIPs, :20-40 GetNameFromIP);
- deny networks: `always` for all, `running` for app and task, `staging` for staging, each a
  REJECT before the ASG accepts, CIDRs normalised by net.ParseCIDR
  (cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:22 Validate, :85 denyNetworksRules);
- the connection limit: off by default, burst 1000, 100/s (jobs/silk-cni/spec@0ceeb54:155-166,
  outbound_connections); idle buckets expire after ceil(burst/rate) s
  (netout_chain.go@0fc76f3:124, rateLimitExpiryPeriod).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from reconciler.agent.config import ConfigError, build_config
from reconciler.backends import Runner, converge
from reconciler.backends import contract as rec
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.iptables.delta import compute_delta
from reconciler.backends.iptables.parse import HookCopy, OwnedState
from reconciler.backends.iptables.render import hook_rule, render_cell
from reconciler.backends.kernel.underlay import UnderlayError, default_route_devices
from reconciler.backends.nftables import render as nft
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.cli import main
from reconciler.core.cellplan import CellSettings, DenyNetworks, RateLimit
from reconciler.core.endpoint import parse_endpoint
from reconciler.core.explain import explain
from tests.cases import CASES, case_plan, load_case

BASE = {"source": "file:///x", "containers": "/x/store.json", "cell": "c1"}


def test_the_underlay_is_every_default_routes_interface_ecmp_included() -> None:
    routes = [
        {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []},
        {
            "dst": "default",
            "flags": [],
            "nexthops": [
                {"gateway": "192.0.2.9", "dev": "eth1", "weight": 1},
                {"gateway": "192.0.2.1", "dev": "eth0", "weight": 1},
            ],
        },
    ]
    assert default_route_devices(json.dumps(routes)) == ("eth0", "eth1")
    assert default_route_devices("[]") == ()
    assert default_route_devices("") == ()


@pytest.mark.parametrize("dev", ["eth0 -j ACCEPT", 'a"b', "x" * 16, "eth+"])
def test_a_default_route_device_name_that_could_not_be_an_interface_is_refused(dev) -> None:
    """The routing table is read, not trusted: its names are rendered into rules."""
    with pytest.raises(UnderlayError, match="not an interface name"):
        default_route_devices(json.dumps([{"dst": "default", "dev": dev}]))


def _plan(underlay: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    plan = case_plan("example", "t")
    return replace(plan, settings=CellSettings(underlay, underlay))


def test_one_hook_per_underlay_interface_first_in_forward_in_order() -> None:
    desired = render_cell(_plan(("eth0", "eth1")), 4)
    assert desired.hooks == (hook_rule("eth0"), hook_rule("eth1"))
    assert hook_rule("eth0") == (
        '-A FORWARD -o eth0 -m comment --comment "asg:forward" -j ASG-FORWARD'
    )
    delta = compute_delta(desired, OwnedState(4, {}))
    inserts = [op for op in delta.ops if op.startswith("-I FORWARD")]
    # Inserted last first at position 1: they end up first, in order.
    assert inserts == [h.replace("-A FORWARD", "-I FORWARD 1") for h in reversed(desired.hooks)]
    in_place = OwnedState(
        4, desired.chains, tuple(HookCopy(i, h) for i, h in enumerate(desired.hooks))
    )
    assert compute_delta(desired, in_place, desired).ops == ()


def test_a_changed_underlay_replaces_the_hooks_in_one_transaction() -> None:
    old = render_cell(_plan(("eth0",)), 4)
    new = render_cell(_plan(("bond0",)), 4)
    kernel = OwnedState(4, old.chains, (HookCopy(0, hook_rule("eth0")),))
    delta = compute_delta(new, kernel, old)
    assert f"-D {hook_rule('eth0')[3:]}" in delta.ops
    assert "-I FORWARD 1 " + hook_rule("bond0")[len("-A FORWARD ") :] in delta.ops
    assert [c.what for c in delta.changes] == [rec.HOOK_FIXED]


def test_a_hook_someone_moved_below_a_foreign_rule_is_drift_and_goes_back_first() -> None:
    desired = render_cell(_plan(("eth0", "eth1")), 4)
    moved = OwnedState(
        4, desired.chains, (HookCopy(0, desired.hooks[0]), HookCopy(2, desired.hooks[1]))
    )
    delta = compute_delta(desired, moved, desired)
    assert [d.what for d in delta.drift] == [rec.HOOK_MOVED]
    assert sum(op.startswith("-I FORWARD 1 ") for op in delta.ops) == 2


def test_agent_settings_take_cfs_keys_and_check_every_value() -> None:
    cfg = build_config(
        {
            **BASE,
            "underlay-interface": ["eth0", "eth0", "bond0.100"],
            "deny-networks": {"always": ["10.1.2.3/8"], "staging": ["fd00:1::1/32"]},
            "outbound-connections": {"limit": True, "burst": 5, "rate-per-sec": 2},
        },
        {},
    )
    assert cfg.underlay_interface == ("eth0", "bond0.100")
    assert cfg.deny_networks == DenyNetworks(("10.0.0.0/8",), (), ("fd00:1::/32",))
    assert cfg.outbound_connections == RateLimit(True, 5, 2, False)
    assert cfg.outbound_connections.expire_ms == 3000
    assert RateLimit() == RateLimit(False, 1000, 100, False)
    settings = cfg.cell_settings({4: ("ignored",), 6: ("ignored",)})
    assert settings.underlay4 == settings.underlay6 == ("eth0", "bond0.100")
    detected = build_config(BASE, {}).cell_settings({4: ("eth0",), 6: ("eth1",)})
    assert (detected.underlay4, detected.underlay6) == (("eth0",), ("eth1",))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"underlay-interface": "eth0 -j ACCEPT"}, "underlay-interface: 'eth0 -j ACCEPT' is not"),
        ({"underlay-interface": []}, "underlay-interface: expected an interface name"),
        ({"deny-networks": {"always": ["10.0.0.0"]}}, "deny-networks.always: '10.0.0.0' is not"),
        ({"deny-networks": {"always": ["10.0.0.0/33"]}}, "deny-networks.always"),
        ({"deny-networks": {"always": ["10.0.0.0/8 -j ACCEPT"]}}, "deny-networks.always"),
        ({"deny-networks": {"running": ['10.0.0.0/8"\n-A FORWARD']}}, "deny-networks.running"),
        ({"deny-networks": {"alway": []}}, "deny-networks.alway: unknown setting"),
        ({"deny-networks": ["10.0.0.0/8"]}, "deny-networks: expected a mapping"),
        ({"deny-networks": {"running": "10.0.0.0/8"}}, "deny-networks.running: expected a list"),
        ({"outbound-connections": {"burst": 0}}, "outbound-connections.burst"),
        ({"outbound-connections": {"rate-per-sec": True}}, "outbound-connections.rate-per-sec"),
        ({"outbound-connections": {"limit": "maybe"}}, "outbound-connections.limit"),
        ({"outbound-connections": {"rate_per_sec": 5}}, "outbound-connections.rate_per_sec"),
    ],
)
def test_bad_cell_settings_are_refused_naming_the_key(values, message) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        build_config({**BASE, **values}, {})


def test_deny_networks_by_workload_as_silk_gives_them() -> None:
    deny = DenyNetworks(("10.0.0.0/8",), ("172.16.0.0/12",), ("192.168.0.0/16",))
    assert deny.for_workload("app") == ("10.0.0.0/8", "172.16.0.0/12")
    assert deny.for_workload("task") == ("10.0.0.0/8", "172.16.0.0/12")
    assert deny.for_workload("staging") == ("10.0.0.0/8", "192.168.0.0/16")
    settings = CellSettings(deny_networks=DenyNetworks(("10.0.0.0/8", "fd00::/8")))
    assert settings.deny("app", 4) == ("10.0.0.0/8",)
    assert settings.deny("app", 6) == ("fd00::/8",)


def test_explain_names_the_deny_network_that_beats_the_asg() -> None:
    policy, _ = load_case("example")
    plan = case_plan("example", "t")
    cp = next(c for c in plan.containers if c.groups and c.container.version == 4)
    decision = None
    for group in cp.groups:
        for rule in plan.group_by_id[group].rules:
            d = rule.item.destination
            if d.version == 4 and rule.item.protocol in ("tcp", "udp") and rule.item.ports:
                port = rule.item.ports[0].first
                ep = parse_endpoint(f"{d.first_address}:{port}/{rule.item.protocol}", None, None)
                decision = explain(policy, plan, cp, ep)
                break
        if decision is not None:
            break
    assert decision is not None and decision.allowed
    network = f"{ipaddress.ip_address(decision.endpoint.address)}/32"
    denied_plan = replace(plan, settings=CellSettings(deny_networks=DenyNetworks((network,))))
    denied = explain(policy, denied_plan, cp, decision.endpoint)
    assert not denied.allowed
    assert f"deny_networks.always {network}" in denied.text()
    assert "would allow it" in denied.text()
    assert denied.to_dict()["deny_networks"] == [{"list": "always", "network": network}]


def test_explain_reads_the_cells_deny_networks_from_its_agent_config(tmp_path) -> None:
    policies, store = CASES["example"]
    base = ["explain", "--containers", str(store), "--policies", str(policies)]
    base += ["--container", "c-backend-1", "--to", "198.19.10.10:3306/tcp"]
    allowed = CliRunner().invoke(main, base)
    assert allowed.exit_code == 0, allowed.output
    config = tmp_path / "agent.yaml"
    config.write_text("deny-networks:\n  running: [198.19.10.0/24]\n")
    denied = CliRunner().invoke(main, [*base, "--agent-config", str(config)])
    assert denied.exit_code == 3, denied.output
    assert "deny_networks.running 198.19.10.0/24" in denied.output
    config.write_text("deny-networks:\n  running: [198.19.10.0/24x]\n")
    bad = CliRunner().invoke(main, [*base, "--agent-config", str(config)])
    assert bad.exit_code == 1 and "deny-networks.running" in bad.output, bad.output


def test_every_nft_object_of_the_settings_belongs_to_its_familys_slice() -> None:
    names6 = [nft.deny_set(6, "app"), nft.rate_set(6), nft.rate_log_chain(6)]
    names4 = [nft.deny_set(4, "staging"), nft.rate_set(4), nft.rate_log_chain(4)]
    assert [nft.family_of(n) for n in names6] == [6, 6, 6]
    assert [nft.family_of(n) for n in names4] == [4, 4, 4]


SETTINGS_OVER_TIME = (
    CellSettings(("eth0",), ("eth0",), DenyNetworks(("10.0.0.0/8",)), RateLimit(True, 5, 1)),
    CellSettings(
        ("eth0", "eth1"),
        ("eth1",),
        DenyNetworks(("10.0.0.0/8", "fd00::/8"), ("192.0.2.0/24",)),
        RateLimit(True, 10, 1, True),
    ),
    CellSettings(("eth1",), ("eth1",), DenyNetworks((), (), ("192.0.2.0/24",))),
    CellSettings(),
    CellSettings(("eth0",), ("eth0",), DenyNetworks(("10.0.0.0/8",)), RateLimit(True, 5, 1)),
)


@pytest.mark.parametrize("variant", ["legacy", "nft", "nftables"])
def test_every_change_of_the_cells_settings_converges_as_a_change_never_drift(
    make_lab, variant
) -> None:
    """A new underlay, deny list or limit rewrites hooks, chains and sets in one transaction
    each, reads back as rendered, and the next cycle finds nothing to do."""
    lab = make_lab()
    runner = Runner.in_netns(lab.cell)
    if variant == "nftables":
        backend = NftablesBackend.open("auto", runner)
    else:
        backend = IptablesBackend.open(variant, runner)
    plan = case_plan("example", "t")
    last = None
    for settings in SETTINGS_OVER_TIME:
        wanted = replace(plan, settings=settings)
        result = converge(backend, wanted, last)
        assert result.ok and result.drift == (), result.to_dict()
        again = converge(backend, wanted, wanted)
        assert again.in_sync and again.drift == (), again.to_dict()
        last = wanted


def test_a_restarted_agent_knows_its_plan_again_by_the_underlay_it_finds(
    make_lab, tmp_path
) -> None:
    """After a restart the applied revision is compiled again with the underlay read off the
    cell's default routes (not the configured none), so the plan is recognised by its digest
    as the one the kernel holds: no container is logged as newly added, and what differs in
    the kernel stays drift rather than a change."""
    import io

    from asgctl_lab.netns import ServiceSpec
    from reconciler.agent.core import condition
    from reconciler.agent.loop import SYNC, Agent
    from tests.agentkit import container, local_repo, sg, tcp_rules, write_store

    lab = make_lab([], [ServiceSpec("echo", tcp_ports=(80,))], conntrack=False)
    repo = local_repo(tmp_path)
    repo.commit("web", {"sg.yaml": sg("web", tcp_rules(2))})
    store = write_store(tmp_path / "store.json", [container("c0", 0), container("c1", 1)])
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "c1",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "netns": lab.cell,
            "status-push": False,
        },
        {},
    )
    first_out = io.StringIO()
    first = Agent(cfg, out=first_out, err=io.StringIO())
    st = first.cycle(SYNC)
    first.source.close()
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    assert st.applied is not None and st.applied.plan is not None
    found = st.applied.plan.settings.underlay4
    assert found, "the lab cell's default route names its underlay"
    assert [json.loads(x)["change"] for x in first_out.getvalue().splitlines()] == ["added"] * 2

    again_out = io.StringIO()
    again = Agent(cfg, out=again_out, err=io.StringIO())
    st = again.cycle(SYNC)
    again.source.close()
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    assert st.applied is not None and st.applied.plan is not None
    assert st.applied.plan.settings.underlay4 == found
    assert again_out.getvalue() == ""  # the restart changed no container's rules
