"""Three independent readings of the same policy must agree on every packet.

For random policies, inventories and packets: (1) the rendered iptables rules walked by the
test's own interpreter, (2) `explain` over the compiled plan, and (3) a direct reading of
Cloud Foundry's semantics written here from the spec, not from the compiler.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.backends.iptables.render import render_text
from reconciler.core.compile import (
    cf_equivalent_rules,
    compile_cell,
    profile_of,
    profile_signature,
    signature_comparer,
)
from reconciler.core.endpoint import Endpoint
from reconciler.core.explain import explain, find_container
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
from tests.iptables_eval import Packet, parse_restore, verdict

V4 = int(ipaddress.IPv4Address("198.19.0.0"))
V6 = int(ipaddress.IPv6Address("fd00:19::"))
SPACES = ["space-a", "space-b", "space-c"]
APPS = ["app-1", "app-2", "app-3"]


def _addr(version: int, offset: int) -> int:
    return (V4 if version == 4 else V6) + offset


@st.composite
def address_ranges(draw, version: int) -> AddressRange:
    kind = draw(st.sampled_from(["one", "cidr", "range"]))
    if kind == "one":
        a = _addr(version, draw(st.integers(0, 15)))
        return AddressRange(version, a, a)
    if kind == "cidr":
        size = 2 ** draw(st.integers(1, 3))
        start = _addr(version, draw(st.integers(0, 15 // size)) * size)
        return AddressRange(version, start, start + size - 1)
    lo = draw(st.integers(0, 15))
    hi = draw(st.integers(lo, 15))
    return AddressRange(version, _addr(version, lo), _addr(version, hi))


@st.composite
def rules(draw) -> Rule:
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "all"]))
    if protocol == "icmp":
        version = 4
    elif protocol == "icmpv6":
        version = 6
    else:
        version = draw(st.sampled_from([4, 4, 6]))
    dests = tuple(draw(st.lists(address_ranges(version), min_size=1, max_size=3)))
    ports: tuple[PortRange, ...] = ()
    icmp_type = icmp_code = None
    if protocol in ("tcp", "udp"):
        if draw(st.booleans()):
            lo = draw(st.integers(1, 20))
            ports = (PortRange(lo, draw(st.integers(lo + 1, 21))),)
        else:
            ports = tuple(
                PortRange(p, p)
                for p in sorted(draw(st.sets(st.integers(1, 20), min_size=1, max_size=17)))
            )
    elif protocol in ("icmp", "icmpv6"):
        icmp_type = draw(st.sampled_from([-1, 0, 3, 8]))
        icmp_code = draw(st.sampled_from([-1, 0, 1]))
    return Rule(protocol, dests, ports, icmp_type, icmp_code, draw(st.booleans()))


@st.composite
def policies(draw) -> PolicySet:
    groups = []
    for i in range(draw(st.integers(0, 4))):
        groups.append(
            SecurityGroup(
                name=f"sg{i}",
                rules=tuple(draw(st.lists(rules(), max_size=4))),
                running_default=draw(st.booleans()),
                staging_default=draw(st.booleans()),
                running_spaces=tuple(draw(st.sets(st.sampled_from(SPACES), max_size=2))),
                staging_spaces=tuple(draw(st.sets(st.sampled_from(SPACES), max_size=2))),
            )
        )
    dests, eps = [], []
    for i in range(draw(st.integers(0, 3))):
        r = draw(rules())
        dests.append(
            Destination(f"d{i}", r.protocol, r.destinations, r.ports, r.icmp_type, r.icmp_code)
        )
        stype = draw(st.sampled_from(["app", "space", "default"]))
        sid = {"app": draw(st.sampled_from(APPS)), "space": draw(st.sampled_from(SPACES))}.get(
            stype
        )
        eps.append(
            EgressPolicy(
                f"p{i}", stype, sid, f"d{i}", draw(st.sampled_from(["running", "staging", "all"]))
            )
        )
    return PolicySet(tuple(groups), tuple(dests), tuple(eps))


@st.composite
def containers(draw) -> list[Container]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        version = draw(st.sampled_from([4, 4, 6]))
        ip = f"198.18.0.{i + 2}" if version == 4 else f"fd00:18::{i + 2}"
        out.append(
            Container(
                handle=f"c{i}",
                ip=ip,
                app_id=draw(st.sampled_from([*APPS, ""])),
                space_id=draw(st.sampled_from([*SPACES, ""])),
                workload=draw(st.sampled_from(["app", "task", "staging"])),
            )
        )
    return out


def _edges(policy: PolicySet) -> tuple[set[int], set[int]]:
    """Address offsets and ports at and beside every boundary: where off-by-ones hide."""
    rules_ = [r for g in policy.security_groups for r in g.rules] + [
        d.as_rule() for d in policy.destinations
    ]
    offsets, ports = {0, 17}, {1, 22}
    for r in rules_:
        for d in r.destinations:
            base = V4 if d.version == 4 else V6
            offsets |= {d.first - base - 1, d.first - base, d.last - base, d.last - base + 1}
        for p in r.ports:
            ports |= {p.first - 1, p.first, p.last, p.last + 1}
    return {o for o in offsets if 0 <= o <= 17}, {p for p in ports if 1 <= p <= 65535}


@st.composite
def packets(draw, version: int, edges: tuple[set[int], set[int]]) -> Endpoint:
    offsets, ports = edges
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp" if version == 4 else "icmpv6"]))
    address = _addr(version, draw(st.sampled_from(sorted(offsets))))
    if protocol in ("tcp", "udp"):
        return Endpoint(version, address, protocol, port=draw(st.sampled_from(sorted(ports))))
    return Endpoint(
        version,
        address,
        protocol,
        icmp_type=draw(st.sampled_from([0, 3, 8])),
        icmp_code=draw(st.sampled_from([0, 1])),
    )


def cf_allows(policy: PolicySet, c: Container, ep: Endpoint) -> bool:
    """Cloud Foundry's semantics, read straight from the spec."""
    lifecycle = "staging" if c.workload == "staging" else "running"
    granted: list[Rule] = []
    for sg in policy.security_groups:
        default = sg.staging_default if lifecycle == "staging" else sg.running_default
        spaces = sg.staging_spaces if lifecycle == "staging" else sg.running_spaces
        if default or (c.space_id and c.space_id in spaces):
            granted.extend(sg.rules)
    dests = {d.name: d for d in policy.destinations}
    for ep_policy in policy.egress_policies:
        if ep_policy.app_lifecycle not in ("all", lifecycle):
            continue
        if (
            ep_policy.source_type == "default"
            or (ep_policy.source_type == "app" and ep_policy.source_id == c.app_id)
            or (ep_policy.source_type == "space" and ep_policy.source_id == c.space_id)
        ):
            d = dests[ep_policy.destination]
            granted.append(Rule(d.protocol, d.ips, d.ports, d.icmp_type, d.icmp_code))
    for rule in granted:
        if not any(
            r.version == ep.version and r.first <= ep.address <= r.last for r in rule.destinations
        ):
            continue
        if rule.protocol == "all":
            return True
        if rule.protocol != ep.protocol:
            continue
        if rule.protocol in ("tcp", "udp"):
            if any(p.first <= ep.port <= p.last for p in rule.ports):
                return True
            continue
        if rule.icmp_type == -1:
            return True
        if rule.icmp_type == ep.icmp_type and rule.icmp_code in (-1, ep.icmp_code):
            return True
    return False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), inventory=containers(), data=st.data())
def test_rendered_rules_explain_and_cf_semantics_agree(policy, inventory, data):
    plan = compile_cell(policy, inventory)
    rendered = {fam: parse_restore(render_text(plan, fam)) for fam in (4, 6)}
    edges = _edges(policy)
    for c in inventory:
        cp = find_container(plan, handle=c.handle)
        for _ in range(8):
            ep = data.draw(packets(c.version, edges))
            expected = cf_allows(policy, c, ep)
            assert explain(policy, plan, cp, ep).allowed == expected
            pkt = Packet(c.ip, ep.address_text, ep.protocol, ep.port, ep.icmp_type, ep.icmp_code)
            assert verdict(rendered[c.version], pkt) == ("ACCEPT" if expected else "REJECT")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=policies(), head=policies(), inventory=containers())
def test_the_plans_signature_comparer_agrees_with_comparing_the_signatures(base, head, inventory):
    """The CI plan skips a cell when every profile's rule items are equal at base and head;
    it compares item numbers instead of the items, which must decide exactly the same."""
    same = signature_comparer(base, head)
    for p in {profile_of(c) for c in inventory}:
        assert same(p) == (profile_signature(base, p) == profile_signature(head, p))
    assert same_as_itself(head, inventory)
    # The count of CF's lines is per container, looked up per profile.
    assert compile_cell(head, inventory).cf_equivalent_rules == cf_equivalent_rules(head, inventory)


def same_as_itself(policy: PolicySet, inventory: list[Container]) -> bool:
    same = signature_comparer(policy, policy)
    return all(same(profile_of(c)) for c in inventory)
