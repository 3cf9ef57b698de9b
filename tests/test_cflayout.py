"""CF's per-container layout: the benchmark's baseline, and what `cf_equivalent_rules` counts.

The rendered layout and the compiler's count are computed independently (text deduplicated
as CF deduplicates it, against keys per item and port range), so holding them equal over the
example and edge repositories checks both.  The kernel must accept the layout as it is.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from asgctl_lab.netns import Lab
from reconciler.backends.iptables.cflayout import render_asg_sync, render_cf, rule_count
from reconciler.core.cellplan import CF_CONTAINER_FIXED_LINES, CellPlan
from reconciler.core.compile import cf_equivalent_rules, compile_cell
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup
from tests.cases import CASES
from tests.cases import load_case as case


@pytest.mark.parametrize("name", sorted(CASES))
def test_layout_has_exactly_the_cf_equivalent_rule_count(name: str) -> None:
    policy, containers = case(name)
    plan = compile_cell(policy, containers, name)
    rendered = sum(rule_count(render_cf(plan, family)) for family in (4, 6))
    assert rendered == plan.cf_equivalent_rules == cf_equivalent_rules(policy, containers)
    assert plan.cf_equivalent_rules > plan.installed_rules


def _rule(proto: str, dest: str, ports: str = "", log: bool = False) -> Rule:
    parts = (p.partition("-") for p in ports.split(",")) if ports else ()
    rng = tuple(PortRange(int(a), int(b or a)) for a, _, b in parts)
    return Rule(proto, (AddressRange.parse(dest),), rng, log=log)


def one_container(*groups: tuple[Rule, ...]) -> CellPlan:
    policy = PolicySet(
        security_groups=tuple(
            SecurityGroup(f"g{i}", rules, running_spaces=("space-a",))
            for i, rules in enumerate(groups)
        )
    )
    return compile_cell(policy, [Container("h", "198.18.0.2", space_id="space-a")], "t")


def asg_lines(plan: CellPlan) -> list[str]:
    return [
        x for x in render_cf(plan, 4).splitlines() if x.startswith("-A asg-") and "-m iprange" in x
    ]


def test_one_rule_per_port_range_and_repeats_dropped_as_cf_does() -> None:
    # "80,443" is two CF rules; the second ASG's 443 repeats one of them, its 8000-8100 not.
    plan = one_container(
        (_rule("tcp", "198.19.1.1", "80,443"),),
        (_rule("tcp", "198.19.1.1", "443,8000-8100"),),
    )
    lines = asg_lines(plan)
    assert [x.split("--dport ")[1].split()[0] for x in lines] == ["80:80", "443:443", "8000:8100"]
    assert plan.cf_equivalent_rules == CF_CONTAINER_FIXED_LINES + 3


def test_log_rules_go_to_the_containers_log_chain() -> None:
    plan = one_container((_rule("udp", "198.19.8.8", "53", log=True), _rule("all", "198.19.9.9")))
    text = render_cf(plan, 4)
    (chain_id,) = {cp.chain_id for cp in plan.containers}
    log_chain = f"netout--{chain_id[:12]}--log"
    assert f"-g {log_chain}" in text
    assert sum(1 for x in text.splitlines() if x.startswith(f"-A {log_chain} ")) == 2
    assert plan.cf_equivalent_rules == rule_count(text) == CF_CONTAINER_FIXED_LINES + 2


def test_chain_names_and_prefixes_carry_hashes_never_handles() -> None:
    hostile = 'x" -j ACCEPT; evil'
    policy = PolicySet(
        security_groups=(SecurityGroup("g", (_rule("tcp", "198.19.1.1", "443"),), True),)
    )
    plan = compile_cell(policy, [Container(hostile, "198.18.0.2")], "t")
    text = render_cf(plan, 4)
    assert "evil" not in text and hostile not in text
    assert all(len(x.split()[0]) <= 29 for x in text.splitlines() if x.startswith(":"))


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_the_kernel_accepts_the_layout(variant: str, make_lab: Callable[..., Lab]) -> None:
    policy, containers = case("edge")
    plan = compile_cell(policy, containers, "edge")
    cell = make_lab(conntrack=False).cell
    for family, tool in ((4, "iptables"), (6, "ip6tables")):
        text = render_cf(plan, family)
        if not text:
            continue
        restore = subprocess.run(
            ["ip", "netns", "exec", cell, f"{tool}-{variant}-restore", "--noflush"],
            input=text,
            capture_output=True,
            text=True,
        )
        assert restore.returncode == 0, restore.stderr
        saved = subprocess.run(
            ["ip", "netns", "exec", cell, f"{tool}-{variant}-save", "-t", "filter"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert rule_count(saved) == rule_count(text)


def test_an_asg_sync_rewrites_only_the_asg_and_log_chains_with_render_cfs_lines() -> None:
    """What the VPA's ASG poll changes (render_asg_sync): each container's `asg-` chain and
    its log chain, redeclared (so flushed) and refilled; never FORWARD or `netout--<c>`."""
    plan = one_container((_rule("tcp", "198.19.1.1", "443", log=True),))
    full = render_cf(plan, 4).splitlines()
    (asg,) = [ln.split()[0][1:] for ln in full if ln.startswith(":asg-")]
    (log,) = [ln.split()[0][1:] for ln in full if ln.startswith(":netout--") and "--log " in ln]
    lines = render_asg_sync(plan, 4).splitlines()
    assert lines == [
        "*filter",
        f":{asg} - [0:0]",
        f":{log} - [0:0]",
        *[ln for ln in full if ln.startswith((f"-A {asg} ", f"-A {log} "))],
        "COMMIT",
    ]
    assert any("-g " + log in ln for ln in lines)  # the logged rule, and its chain with it
    assert render_asg_sync(plan, 6) == ""  # no IPv6 container: nothing to write
