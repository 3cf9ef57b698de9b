"""The packet space: which packets a rule allows, answered once for every reader.

Pinned three ways: by a table of Cloud Foundry's edge cases (ICMP type and code -1, icmp vs
icmpv6, protocol all, tcp without ports); against the tests' own iptables interpreter walking
the rendered rule; and against the answers compile, explain, diff and the nft render gave
before issue 18 moved them here (`_before_*` below, kept as they were), wherever those
answers agreed with the dataplane.  `contains` over a grid holding every boundary is the
ground truth for `covers` and `subtract`.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.backends.iptables.render import render_text
from reconciler.core.compile import (
    bindings_for,
    compile_cell,
    container_sources,
    group_bindings,
    policy_bindings,
)
from reconciler.core.endpoint import Endpoint, parse_endpoint
from reconciler.core.model import (
    AddressRange,
    Container,
    EgressPolicy,
    PolicySet,
    PortRange,
    Rule,
    RuleItem,
    SecurityGroup,
)
from reconciler.core.packetspace import (
    ANY_BYTE,
    ANY_PORT,
    PROTOCOL_NUMBERS,
    Box,
    contains,
    covers,
    disjoint_boxes,
    item_space,
    rule_space,
    subtract,
)
from tests.iptables_eval import Packet, parse_restore, verdict
from tests.test_properties import APPS, SPACES, _addr, policies, rules

# -- the edge cases, as a table ----------------------------------------------------------------


def _item(protocol: str, dest: str, ports: str = "", icmp: tuple[int, int] | None = None):  # type: ignore[no-untyped-def]
    port_ranges = tuple(
        PortRange(int(lo), int(hi or lo))
        for lo, _, hi in (p.partition("-") for p in ports.split(",") if p)
    )
    t, c = icmp if icmp is not None else (None, None)
    return RuleItem(protocol, AddressRange.parse(dest), port_ranges, t, c)


EDGES = [
    # protocol all: every protocol, port, type and code, on its addresses only
    (_item("all", "10.0.0.0/24"), "10.0.0.9:443/tcp", True),
    (_item("all", "10.0.0.0/24"), "10.0.0.9/icmp", True),
    (_item("all", "10.0.0.0/24"), "10.0.1.9:443/tcp", False),
    # tcp and udp: their own protocol and ports; no ports means every port
    (_item("tcp", "10.0.0.1", "80-90"), "10.0.0.1:90/tcp", True),
    (_item("tcp", "10.0.0.1", "80-90"), "10.0.0.1:91/tcp", False),
    (_item("tcp", "10.0.0.1", "80-90"), "10.0.0.1:85/udp", False),
    (_item("tcp", "10.0.0.1"), "10.0.0.1:65535/tcp", True),
    (_item("udp", "10.0.0.1", "53,54"), "10.0.0.1:54/udp", True),
    # ICMP type -1: any type, and then any code, whatever the code says
    (_item("icmp", "10.0.0.1", icmp=(-1, -1)), "10.0.0.1/icmp type 3 code 1", True),
    (_item("icmp", "10.0.0.1", icmp=(-1, 5)), "10.0.0.1/icmp type 3 code 1", True),
    # code -1: any code of its type only
    (_item("icmp", "10.0.0.1", icmp=(3, -1)), "10.0.0.1/icmp type 3 code 13", True),
    (_item("icmp", "10.0.0.1", icmp=(3, -1)), "10.0.0.1/icmp type 8 code 0", False),
    (_item("icmp", "10.0.0.1", icmp=(3, 1)), "10.0.0.1/icmp type 3 code 1", True),
    (_item("icmp", "10.0.0.1", icmp=(3, 1)), "10.0.0.1/icmp type 3 code 4", False),
    # icmp is IPv4's, icmpv6 IPv6's: neither takes the other, nor tcp
    (_item("icmpv6", "fd00::/64", icmp=(128, -1)), "fd00::1/icmpv6 type 128 code 0", True),
    (_item("icmpv6", "fd00::/64", icmp=(128, -1)), "fd00::1/icmpv6 type 129 code 0", False),
    (_item("icmp", "10.0.0.1", icmp=(-1, -1)), "10.0.0.1:80/tcp", False),
    (_item("tcp", "fd00::/64", "1-65535"), "fd00::1/icmpv6 type 128 code 0", False),
]


def _endpoint(text: str) -> Endpoint:
    head, _, icmp = text.partition(" type ")
    if not icmp:
        return parse_endpoint(head)
    t, _, c = icmp.partition(" code ")
    return parse_endpoint(head, int(t), int(c))


@pytest.mark.parametrize(("item", "packet", "allowed"), EDGES, ids=[e[1] for e in EDGES])
def test_what_a_rule_allows(item: RuleItem, packet: str, allowed: bool) -> None:
    """CF's meanings (cf-asg.md: -1 = any; ports required for tcp/udp, Destinations default
    to every port): the same answer from the packet space, explain and the rendered rule."""
    ep = _endpoint(packet)
    assert contains(item_space(item), ep) is allowed
    assert _iptables_allows(Rule(item.protocol, (item.destination,), *_fields(item)), ep) is (
        allowed
    )


def test_icmp_of_the_other_family_is_matched_by_protocol_number_alone() -> None:
    """icmp towards IPv6 (refused by validation) is whatever IPv6 packet carries protocol 1,
    as a bare `-p icmp` matches it; never ICMPv6."""
    (box,) = item_space(_item("icmp", "fd00::/64", icmp=(8, 0)))
    assert box == Box(6, (1, 1), box.addresses, ANY_PORT, ANY_BYTE, ANY_BYTE)
    assert not contains([box], Endpoint(6, box.addresses[0], "icmpv6", None, 8, 0))


def test_an_unknown_detail_is_held_only_by_a_box_taking_every_value() -> None:
    """A tcp endpoint without a port (explain was asked about a protocol, not a port)."""
    ep = Endpoint(4, int(ipaddress.IPv4Address("10.0.0.1")), "tcp")
    assert contains(item_space(_item("tcp", "10.0.0.1")), ep)
    assert not contains(item_space(_item("tcp", "10.0.0.1", "1-65535")), ep)
    assert contains(item_space(_item("all", "10.0.0.1")), ep)


def test_covers_takes_the_union_of_the_covering_rule() -> None:
    """Ports 53,54 allow all that 53-54 does; two adjacent destinations, one range across."""
    assert covers(
        item_space(_item("udp", "10.0.0.1", "53,54")), item_space(_item("udp", "10.0.0.1", "53-54"))
    )
    split = Rule(
        "tcp",
        (AddressRange.parse("10.0.0.0-10.0.0.4"), AddressRange.parse("10.0.0.5-10.0.0.9")),
        (PortRange(443, 443),),
    )
    across = Rule("tcp", (AddressRange.parse("10.0.0.3-10.0.0.6"),), (PortRange(443, 443),))
    assert covers(rule_space(split), rule_space(across))
    assert not covers(rule_space(across), rule_space(split))


def test_icmp_type_any_covers_every_code_whatever_its_code_says() -> None:
    any_type = _item("icmp", "10.0.0.0/24", icmp=(-1, 0))
    assert covers(item_space(any_type), item_space(_item("icmp", "10.0.0.1", icmp=(3, 1))))
    assert covers(item_space(any_type), item_space(_item("icmp", "10.0.0.1", icmp=(-1, -1))))
    assert not covers(item_space(_item("icmp", "10.0.0.0/24", icmp=(3, -1))), item_space(any_type))


# -- against the rendered dataplane ------------------------------------------------------------


def _fields(item: RuleItem) -> tuple:  # type: ignore[type-arg]
    return (item.ports, item.icmp_type, item.icmp_code)


def _iptables_allows(rule: Rule, ep: Endpoint) -> bool:
    """The rule rendered for a container that has only it, walked by tests/iptables_eval."""
    version = rule.destinations[0].version
    ip = "198.18.0.2" if version == 4 else "fd00:18::2"
    policy = PolicySet((SecurityGroup("g", (rule,), running_default=True),))
    plan = compile_cell(policy, [Container("c0", ip, "app-1", "space-a")])
    chains = parse_restore(render_text(plan, version))
    pkt = Packet(ip, ep.address_text, ep.protocol, ep.port, ep.icmp_type, ep.icmp_code)
    return verdict(chains, pkt) == "ACCEPT"


@st.composite
def endpoints(draw, version: int) -> Endpoint:  # type: ignore[no-untyped-def]
    """Packets at and beside the boundaries the `rules` strategy draws (ports 1-21, offsets
    0-15, ICMP types 0, 3, 8 and codes 0, 1), plus values no rule names."""
    address = _addr(version, draw(st.integers(0, 17)))
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp" if version == 4 else "icmpv6"]))
    if protocol in ("tcp", "udp"):
        return Endpoint(
            version, address, protocol, port=draw(st.sampled_from([1, 2, 11, 20, 21, 22, 65535]))
        )
    return Endpoint(
        version,
        address,
        protocol,
        None,
        draw(st.sampled_from([0, 3, 8, 9])),
        draw(st.sampled_from([0, 1, 2])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules(), data=st.data())
def test_the_space_agrees_with_the_rendered_iptables_rule(rule: Rule, data: st.DataObject) -> None:
    space = [box for item in rule.items() for box in item_space(item)]
    for _ in range(10):
        ep = data.draw(endpoints(rule.destinations[0].version))
        assert contains(space, ep) == _iptables_allows(rule, ep)


# -- covers and subtract, against membership on a grid -----------------------------------------


def _grid(version: int) -> list[Endpoint]:
    """Every cell the `rules` strategy can draw a boundary through, for one family."""
    icmp = "icmp" if version == 4 else "icmpv6"
    out = []
    for offset in range(18):
        address = _addr(version, offset)
        for protocol in ("tcp", "udp"):
            out += [
                Endpoint(version, address, protocol, port) for port in (0, *range(1, 23), 65535)
            ]
        out += [
            Endpoint(version, address, icmp, None, t, c) for t in (0, 3, 8, 9) for c in (0, 1, 2)
        ]
        # The other family's ICMP: a protocol number only `all` holds here (a packet of a
        # protocol the space has no name for would be held by no piece of a cut `all`).
        out.append(Endpoint(version, address, "icmpv6" if version == 4 else "icmp"))
    return out


GRIDS = {4: _grid(4), 6: _grid(6)}


@st.composite
def item_lists(draw, version: int) -> list[RuleItem]:  # type: ignore[no-untyped-def]
    found = [i for r in draw(st.lists(rules(), min_size=1, max_size=4)) for i in r.items()]
    return [i for i in found if i.version == version] or [
        RuleItem("all", AddressRange(version, _addr(version, 3), _addr(version, 9)))
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([4, 6]), data=st.data())
def test_covers_and_subtract_are_exact(version: int, data: st.DataObject) -> None:
    mine = data.draw(item_lists(version))
    theirs = data.draw(item_lists(version))
    a = [b for i in mine for b in item_space(i)]
    others = [b for i in theirs for b in item_space(i)]
    grid = GRIDS[version]
    assert covers(others, a) == all(contains(others, p) for p in grid if contains(a, p))
    for box in a:
        pieces = subtract(box, others)
        for p in grid:
            want = contains([box], p) and not contains(others, p)
            assert sum(contains([piece], p) for piece in pieces) == (1 if want else 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([4, 6]), data=st.data())
def test_the_diffs_subtraction_keeps_each_rules_protocol_and_type(
    version: int, data: st.DataObject
) -> None:
    """Cut along addresses and ports only: every packet of `box` that no other allows is in
    one piece, and each piece is `box` narrowed in addresses and ports, nothing else."""
    box = data.draw(item_lists(version))[0]
    others = [b for i in data.draw(item_lists(version)) for b in item_space(i)]
    for whole in item_space(box):
        pieces = subtract(whole, others, ("addresses", "ports"))
        for piece in pieces:
            assert (piece.family, piece.protocols, piece.types, piece.codes) == (
                whole.family,
                whole.protocols,
                whole.types,
                whole.codes,
            )
        for p in GRIDS[version]:
            if contains([whole], p) and not contains(others, p):
                assert sum(contains([piece], p) for piece in pieces) == 1


# -- the answers before issue 18 ---------------------------------------------------------------
# Kept as they were in model.RuleItem.covers, explain.item_allows, diff._atoms/_cuts/_subtract
# and render/nft._item_boxes, to show where the one answer is theirs.


def _before_covers(a: RuleItem, b: RuleItem) -> bool:
    d, e = a.destination, b.destination
    if not (d.version == e.version and d.first <= e.first and e.last <= d.last):
        return False
    if a.protocol != "all" and a.protocol != b.protocol:
        return False
    if a.protocol in ("tcp", "udp"):
        return all(any(p.first <= q.first and q.last <= p.last for p in a.ports) for q in b.ports)
    if a.protocol in ("icmp", "icmpv6"):
        return a.icmp_type in (-1, b.icmp_type) and a.icmp_code in (-1, b.icmp_code)
    return True


def _before_allows(item: RuleItem, ep: Endpoint) -> bool:
    if not item.destination.contains(ep.version, ep.address):
        return False
    if item.protocol == "all":
        return True
    if item.protocol != ep.protocol:
        return False
    if item.protocol in ("tcp", "udp"):
        if not item.ports:
            return True
        return ep.port is not None and any(p.first <= ep.port <= p.last for p in item.ports)
    if item.icmp_type is None or item.icmp_type < 0:
        return True
    if item.icmp_type != ep.icmp_type:
        return False
    return item.icmp_code is None or item.icmp_code < 0 or item.icmp_code == ep.icmp_code


def _before_item_boxes(item: RuleItem) -> tuple[str, list[tuple[tuple[int, int], ...]]]:
    d = item.destination
    addr = (d.first, d.last)
    if item.protocol == "all":
        return "a", [(addr,)]
    number = PROTOCOL_NUMBERS[item.protocol]
    if item.protocol in ("tcp", "udp"):
        ports = [(p.first, p.last) for p in item.ports] or [(0, 65535)]
        return "p", [(addr, (number, number), port) for port in ports]
    if (item.protocol == "icmp") != (d.version == 4):
        return "p", [(addr, (number, number), (0, 65535))]
    typ = -1 if item.icmp_type is None else item.icmp_type
    code = -1 if item.icmp_code is None else item.icmp_code
    types = (0, 255) if typ < 0 else (typ, typ)
    codes = (0, 255) if typ < 0 or code < 0 else (code, code)
    return "i", [(addr, types, codes)]


def _before_subtract(a: RuleItem, theirs: list[RuleItem]) -> set[tuple[int, int, int, int]]:
    """The old diff's residue of `a`, as (first, last address, first, last port) boxes."""

    def atoms(i: RuleItem) -> list[tuple]:  # type: ignore[type-arg]
        d = i.destination
        t, c = (
            (-1 if i.icmp_type is None else i.icmp_type),
            (-1 if i.icmp_code is None else i.icmp_code),
        )
        ports = (
            [(p.first, p.last) for p in i.ports] or [(1, 65535)]
            if i.protocol in ("tcp", "udp")
            else [(0, 0)]
        )
        return [(i.protocol, t, c, d.version, d.first, d.last, lo, hi) for lo, hi in ports]

    def cuts(p: tuple, b: tuple) -> tuple | None:  # type: ignore[type-arg]
        if p[3] != b[3]:
            return None
        if b[0] == "all":
            return (*p[:4], b[4], b[5], p[6], p[7])
        if p[0] != b[0]:
            return None
        if p[0] in ("icmp", "icmpv6") and (b[1] not in (-1, p[1]) or b[2] not in (-1, p[2])):
            return None
        return b

    out = set()
    others = [x for i in theirs for x in atoms(i)]
    for atom in atoms(a):
        pieces = [atom]
        for other in others:
            nxt = []
            for p in pieces:
                b = cuts(p, other)
                lo, hi = (max(p[4], b[4]), min(p[5], b[5])) if b else (1, 0)
                plo, phi = (max(p[6], b[6]), min(p[7], b[7])) if b else (1, 0)
                if b is None or lo > hi or plo > phi:
                    nxt.append(p)
                    continue
                if p[4] < lo:
                    nxt.append((*p[:4], p[4], lo - 1, p[6], p[7]))
                if hi < p[5]:
                    nxt.append((*p[:4], hi + 1, p[5], p[6], p[7]))
                if p[6] < plo:
                    nxt.append((*p[:4], lo, hi, p[6], plo - 1))
                if phi < p[7]:
                    nxt.append((*p[:4], lo, hi, phi + 1, p[7]))
            pieces = nxt
        out |= {p[4:] for p in pieces}
    return out


def _validated(item: RuleItem) -> bool:
    """Shaped as validation leaves a rule: ports for tcp/udp, the family's own ICMP.  ICMP
    type -1 with a code other than -1 is where the old readers disagreed among themselves
    (explain: any code; covers and the diff: that code only) and is tested on its own."""
    if item.protocol in ("tcp", "udp"):
        return bool(item.ports)
    if item.protocol in ("icmp", "icmpv6"):
        native = (item.protocol == "icmp") == (item.version == 4)
        return native and not (item.icmp_type == -1 and item.icmp_code != -1)
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([4, 6]), data=st.data())
def test_the_one_answer_is_the_answer_each_reader_gave_before(
    version: int, data: st.DataObject
) -> None:
    mine = [i for i in data.draw(item_lists(version)) if _validated(i)]
    theirs = [i for i in data.draw(item_lists(version)) if _validated(i)]
    for a, b in itertools.product(mine, theirs):
        # covers: the old check was per single port range; where it said yes, so does this
        if _before_covers(b, a):
            assert covers(item_space(b), item_space(a))
    for a in mine:
        # explain
        for p in GRIDS[version]:
            assert contains(item_space(a), p) == _before_allows(a, p)
        # nft: the same set elements
        kind, boxes = _before_item_boxes(a)
        from reconciler.backends.nftables.render import _item_boxes

        new_kind, new_boxes = _item_boxes(a)
        assert (new_kind, disjoint_boxes(new_boxes)) == (kind, disjoint_boxes(boxes))
        # diff: the same residue, addresses by ports
        residue = {
            (*piece.addresses, *(piece.ports if a.protocol in ("tcp", "udp") else (0, 0)))
            for box in item_space(a)
            for piece in subtract(
                box, [x for i in theirs for x in item_space(i)], ("addresses", "ports")
            )
        }
        assert disjoint_boxes(residue_boxes(residue)) == disjoint_boxes(
            residue_boxes(_before_subtract(a, theirs))
        )


def residue_boxes(residue: set[tuple[int, int, int, int]]) -> list[tuple[tuple[int, int], ...]]:
    return [((lo, hi), (plo, phi)) for lo, hi, plo, phi in residue]


# -- bindings -----------------------------------------------------------------------------------


def test_a_container_gets_the_keys_of_its_own_lifecycle_space_and_app() -> None:
    assert bindings_for("staging", "space-a", "app-1") == (
        ("global", "staging"),
        ("default", "staging"),
        ("space-group", "staging", "space-a"),
        ("space-policy", "staging", "space-a"),
        ("app-policy", "staging", "app-1"),
    )
    # no space (CF writes none for some system containers): only what needs none
    assert bindings_for("running", "", "app-1") == (
        ("global", "running"),
        ("default", "running"),
        ("app-policy", "running", "app-1"),
    )


def test_documents_are_bound_by_the_keys_containers_are_given() -> None:
    sg = SecurityGroup("g", (), staging_default=True, running_spaces=("space-a",))
    assert group_bindings(sg) == (("global", "staging"), ("space-group", "running", "space-a"))
    ep = EgressPolicy("p", "space", "space-b", "d", app_lifecycle="running")
    assert policy_bindings(ep) == (("space-policy", "running", "space-b"),)
    assert policy_bindings(EgressPolicy("q", "default", None, "d")) == (
        ("default", "running"),
        ("default", "staging"),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies(),
    workload=st.sampled_from(["app", "task", "staging", "other"]),
    space=st.sampled_from([*SPACES, ""]),
    app=st.sampled_from([*APPS, ""]),
)
def test_a_container_gets_exactly_the_documents_cf_binds_to_it(
    policy: PolicySet, workload: str, space: str, app: str
) -> None:
    """Read from the spec (cf-asg.md: a space's rules are its bound ASGs and the global
    defaults; egress policies by app, space or default, per app_lifecycle), not from compile."""
    c = Container("c0", "198.18.0.2", app, space, workload=workload)
    lifecycle = c.lifecycle
    want_groups = {
        sg.name
        for sg in policy.security_groups
        if (
            lifecycle == "running"
            and (sg.running_default or (space and space in sg.running_spaces))
        )
        or (
            lifecycle == "staging"
            and (sg.staging_default or (space and space in sg.staging_spaces))
        )
    }
    want_policies = {
        ep.name
        for ep in policy.egress_policies
        if lifecycle
        and ep.applies_to(lifecycle)
        and (
            ep.source_type == "default"
            or (ep.source_type == "app" and app and ep.source_id == app)
            or (ep.source_type == "space" and space and ep.source_id == space)
        )
    }
    got = container_sources(policy, c)
    assert {s.provenance.name for s in got if s.provenance.kind == "SecurityGroup"} == {
        g for g in want_groups if next(x for x in policy.security_groups if x.name == g).rules
    }
    assert {s.provenance.name for s in got if s.provenance.kind == "EgressPolicy"} == want_policies
