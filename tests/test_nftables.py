"""The nftables backend: what it renders means what CF means, and what it does to a kernel.

The pure half walks the rendered table with the test's own small nft interpreter and checks
it against Cloud Foundry's semantics on random policies (the same three-way check the
iptables renderer gets in test_properties), and checks the set arithmetic, the read-back
parser and the delta's ordering.  The kernel half runs in fresh lab namespaces: every kind
of drift nft allows is made by hand, reported, left alone in report-only mode and repaired;
iptables (legacy and nft) and other nft tables are shown untouched byte for byte.  The tests
shared with the iptables backends (apply, read-back, no-op, failed transactions, traffic)
run in test_dataplane and test_traffic, parametrised over every backend.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgctl_lab.netns import Lab
from reconciler.backends import contract as rec
from reconciler.backends import converge
from reconciler.backends.errors import ReadError
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.backends.nftables.delta import (
    ELEMENT_EXTRA,
    ELEMENT_MISSING,
    OBJECT_EXTRA,
    SET_EXTRA,
    SET_MISSING,
    TABLE_DORMANT,
    compute_nft_delta,
)
from reconciler.backends.nftables.parse import NftState, parse_listing
from reconciler.backends.nftables.render import (
    ADDRESS_TYPES,
    NftRuleset,
    RenderMemo,
    base_chain,
    dispatch_map,
    element_json,
    element_text,
    render_cell,
)
from reconciler.core.cellplan import ID_LEN, LOG_ID_LEN, CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.explain import find_container
from reconciler.core.packetspace import disjoint_boxes
from tests.cases import RecordingRunner, edge_plan
from tests.iptables_eval import Packet
from tests.test_dataplane import (
    CONTAINERS,
    _rule,
    small_plan,
    small_policy,
)
from tests.test_properties import _edges, cf_allows, containers, packets, policies

# -- an interpreter for the rendered state -------------------------------------------------


def _field(typ: str, text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if typ in ADDRESS_TYPES:
        return int(ipaddress.ip_address(lo)), int(ipaddress.ip_address(hi if sep else lo))
    return int(lo), int(hi if sep else lo)


def _in_set(ruleset: NftRuleset, name: str, key: tuple[int, ...]) -> str | None:
    """The element's verdict (maps) or "" (sets) when `key` is in the set, else None."""
    s = ruleset.sets[name]
    for element in s.elements or ():
        fields, _, verdict = element.partition(" : ")
        box = [_field(t, f) for t, f in zip(s.keys, fields.split(" . "), strict=True)]
        if all(lo <= k <= hi for (lo, hi), k in zip(box, key, strict=True)):
            return verdict
    return None


def _value(pkt: Packet, left: dict[str, Any]) -> int | None:
    if "meta" in left:
        assert left["meta"] == {"key": "l4proto"}
        return {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}[pkt.protocol]
    p = left["payload"]
    proto, name = p["protocol"], p["field"]
    if proto in ("ip", "ip6"):
        addr = pkt.src if name == "saddr" else pkt.dst
        assert name in ("saddr", "daddr")
        return int(ipaddress.ip_address(addr))
    if proto == "th" or proto in ("tcp", "udp"):
        assert name == "dport"
        if proto != "th" and proto != pkt.protocol:
            return None
        return pkt.port if pkt.protocol in ("tcp", "udp") else None
    if proto in ("icmp", "icmpv6"):
        if pkt.protocol != proto:
            return None
        return pkt.icmp_type if name == "type" else pkt.icmp_code
    raise AssertionError(f"unknown payload {p}")


def _matches_value(version: int, value: int, right: Any) -> bool:
    if isinstance(right, int):
        return value == right
    if isinstance(right, str):
        return value == int(ipaddress.ip_address(right))
    if "range" in right:
        lo, hi = right["range"]
        conv = (lambda x: int(ipaddress.ip_address(x))) if isinstance(lo, str) else int
        return conv(lo) <= value <= conv(hi)
    if "prefix" in right:
        net = ipaddress.ip_network(f"{right['prefix']['addr']}/{right['prefix']['len']}")
        return int(net.network_address) <= value <= int(net.broadcast_address)
    if "set" in right:
        return any(_matches_value(version, value, x) for x in right["set"])
    raise AssertionError(f"unknown right-hand side {right}")


def nft_verdict(ruleset: NftRuleset, pkt: Packet, chain: str | None = None) -> str:
    """ACCEPT, REJECT or DROP for the first packet of a new connection, or RETURN."""
    chain = chain or base_chain(ruleset.family)
    version = ruleset.family
    for rule in ruleset.chains[chain]:
        for expr in json.loads(rule)["expr"]:
            (kind, arg), *_ = expr.items()
            if kind == "match":
                left, right = arg["left"], arg["right"]
                if left == {"ct": {"key": "state"}}:
                    mask = sum(right) if isinstance(right, list) else right
                    if not mask & 8:  # the packet is NEW
                        break
                    continue
                if isinstance(right, str) and right.startswith("@"):
                    parts = left.get("concat", [left])
                    key = tuple(_value(pkt, p) for p in parts)
                    if None in key or _in_set(ruleset, right[1:], key) is None:  # type: ignore[arg-type]
                        break
                    continue
                value = _value(pkt, left)
                if value is None or not _matches_value(version, value, right):
                    break
            elif kind in ("limit", "log"):
                continue
            elif kind in ("accept", "drop", "reject"):
                return kind.upper()
            elif kind in ("jump", "goto"):
                result = nft_verdict(ruleset, pkt, arg["target"])
                if kind == "goto" or result != "RETURN":
                    return result
                break
            elif kind == "vmap":
                target = _in_set(ruleset, arg["data"][1:], (_value(pkt, arg["key"]),))  # type: ignore[arg-type]
                if target is None:
                    break
                verb, _, name = target.partition(" ")
                assert verb == "goto"
                return nft_verdict(ruleset, pkt, name)
            else:
                raise AssertionError(f"the interpreter does not know {kind}")
    return "RETURN"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), inventory=containers(), data=st.data())
def test_rendered_table_and_cf_semantics_agree(policy, inventory, data):  # type: ignore[no-untyped-def]
    plan = compile_cell(policy, inventory)
    rendered = {fam: render_cell(plan, fam) for fam in (4, 6)}
    edges = _edges(policy)
    for c in inventory:
        cp = find_container(plan, handle=c.handle)
        assert cp is not None
        for _ in range(8):
            ep = data.draw(packets(c.version, edges))
            expected = cf_allows(policy, c, ep)
            pkt = Packet(c.ip, ep.address_text, ep.protocol, ep.port, ep.icmp_type, ep.icmp_code)
            assert nft_verdict(rendered[c.version], pkt) == ("ACCEPT" if expected else "REJECT")


# -- set arithmetic and element text ---------------------------------------------------------

_ranges = st.tuples(st.integers(0, 12), st.integers(0, 12)).map(lambda t: (min(t), max(t)))


@settings(max_examples=150, deadline=None)
@given(boxes=st.lists(st.tuples(_ranges, _ranges, _ranges), max_size=8))
def test_disjoint_boxes_cover_the_union_without_overlap(boxes):  # type: ignore[no-untyped-def]
    cover = disjoint_boxes(boxes)

    def inside(box, point) -> bool:  # type: ignore[no-untyped-def]
        return all(lo <= p <= hi for (lo, hi), p in zip(box, point, strict=True))

    grid = [(x, y, z) for x in range(13) for y in range(0, 13, 4) for z in range(0, 13, 3)]
    for point in grid:
        want = any(inside(b, point) for b in boxes)
        hits = sum(inside(b, point) for b in cover)
        assert hits == (1 if want else 0), (point, cover)
    assert disjoint_boxes(reversed(boxes)) == cover  # order does not matter


def test_disjoint_boxes_merges_neighbours() -> None:
    assert disjoint_boxes([((0, 4),), ((5, 9),), ((20, 20),)]) == [((0, 9),), ((20, 20),)]
    # Two port lists on adjacent addresses become one element.
    boxes = [((1, 1), (6, 6), (80, 80)), ((2, 2), (6, 6), (80, 80))]
    assert disjoint_boxes(boxes) == [((1, 2), (6, 6), (80, 80))]


@pytest.mark.parametrize(
    ("keys", "box"),
    [
        (("ipv4_addr",), ((0, 2**32 - 1),)),
        (("ipv4_addr", "inet_proto", "inet_service"), ((5, 9), (6, 6), (0, 65535))),
        (("ipv6_addr", "icmpv6_type", "icmpv6_code"), ((1, 1), (128, 128), (0, 255))),
    ],
)
def test_element_text_and_json_round_trip(keys: tuple[str, ...], box) -> None:  # type: ignore[no-untyped-def]
    from reconciler.backends.nftables.parse import _key_text

    text = element_text(keys, box)
    assert _key_text(keys, element_json(keys, text)) == text


def test_rendered_names_and_strings_carry_only_ids() -> None:
    """Nothing a policy author wrote reaches nft: names, comments and prefixes are hex ids."""
    hex_id = f"[0-9a-f]{{{ID_LEN}}}"  # nft names hold 256 characters: whole ids
    name = re.compile(rf"^(forward[46]|containers[46]|[cg][46]-{hex_id}(-[api])?)$")
    comment = re.compile(rf"^asg:(est|dispatch|invalid|deny-log|reject|[gr]:{hex_id})$")
    prefix = re.compile(rf"^ASG (OK|DENY) [0-9a-f]{{{LOG_ID_LEN}}} $")
    for family in (4, 6):
        rs = render_cell(edge_plan(), family)
        assert all(name.match(n) for n in [*rs.chains, *rs.sets])
        for rules in rs.chains.values():
            for rule in rules:
                body = json.loads(rule)
                assert comment.match(body["comment"])
                for m in re.finditer(r'"prefix":"([^"]*)"', rule):
                    assert prefix.match(m.group(1))


def test_render_is_deterministic_and_memoised_by_group_id() -> None:
    memo = RenderMemo()  # a backend's, kept by its render cache
    a, b = render_cell(edge_plan(), 4, memo), render_cell(edge_plan(), 4, memo)
    assert a == b and a.text() == b.text() and a == render_cell(edge_plan(), 4)
    shared = set(a.sets) & set(b.sets)
    assert all(a.sets[n] is b.sets[n] for n in shared if n != dispatch_map(4))


# -- read-back parser --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        '{"something": []}',
        '{"nftables": [{"rule": {"family": "inet", "table": "asgctl", "chain": "c4-x",'
        ' "expr": []}}]}',  # a rule for a chain that was not listed
        '{"nftables": [{"set": "odd"}]}',
    ],
)
def test_parser_refuses_ambiguous_output(text: str) -> None:
    with pytest.raises(ReadError):
        parse_listing(text, 4)


def test_parser_keeps_only_our_table_and_family() -> None:
    rs = render_cell(edge_plan(), 4)
    entries: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
    entries.append({"table": {"family": "inet", "name": "asgctl", "handle": 1}})
    entries.append({"table": {"family": "ip", "name": "filter", "handle": 2}})
    entries.append({"chain": {"family": "ip", "table": "filter", "name": "FORWARD"}})
    entries.append({"chain": {"family": "inet", "table": "asgctl", "name": "c6-" + "0" * 16}})
    for name, rules in rs.chains.items():
        entries.append({"chain": {"family": "inet", "table": "asgctl", "name": name}})
        for i, rule in enumerate(rules):
            body = {"family": "inet", "table": "asgctl", "chain": name, "handle": i}
            entries.append({"rule": {**body, **json.loads(rule)}})
    state = parse_listing(json.dumps({"nftables": entries}), 4)
    assert dict(state.chains) == rs.chains
    assert state.other_slice == 1 and state.table
    assert state.sets == {}


# -- the delta, without a kernel -----------------------------------------------------------


def _as_observed(rs: NftRuleset, *, elements: bool = True) -> NftState:
    sets = {n: s if elements or s.data else replace(s, elements=None) for n, s in rs.sets.items()}
    return NftState(
        rs.family,
        rs.chains,
        table=True,
        base_hooks=rs.base_hooks,
        sets=sets,
        elements_read=elements,
    )


def test_delta_is_empty_when_the_kernel_matches() -> None:
    for family in (4, 6):
        rs = render_cell(edge_plan(), family)
        assert compute_nft_delta(rs, _as_observed(rs), rs).empty
        assert compute_nft_delta(rs, _as_observed(rs, elements=False), None).empty


def test_delta_creates_before_referencing_and_deletes_last() -> None:
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    old, new = render_cell(a, 4), render_cell(b, 4)
    delta = compute_nft_delta(new, _as_observed(old), old)
    ops = [json.loads(op) for op in delta.ops]
    verbs = [(verb, kind) for op in ops for verb, body in op.items() for kind in body]
    added_sets = [i for i, (v, k) in enumerate(verbs) if (v, k) == ("add", "set")]
    rules = [i for i, (v, k) in enumerate(verbs) if (v, k) == ("add", "rule")]
    flushes = [i for i, (v, k) in enumerate(verbs) if v == "flush"]
    deletes = [i for i, (v, _) in enumerate(verbs) if v == "delete"]
    assert added_sets and rules and flushes and deletes
    assert max(added_sets) < min(rules)  # a set exists before a rule refers to it
    assert max(flushes) < min(deletes)  # references go before what they refer to
    assert deletes == list(range(len(ops) - len(deletes), len(ops)))  # removals come last
    assert all(n not in old.sets for n in delta.written if n.startswith("g4-"))  # new sets only
    assert not any(v == "add" and k == "element" for v, k in verbs)  # no container came


def test_terse_read_takes_unread_elements_as_planned() -> None:
    rs = render_cell(edge_plan(), 4)
    observed = _as_observed(rs, elements=False)
    assert all(s.elements is None for s in observed.sets.values() if not s.data)
    assert compute_nft_delta(rs, observed, rs).empty


# -- in a namespace ------------------------------------------------------------------------


@dataclass
class NftHost:
    """A fresh, bare lab namespace and handy ways to tamper with its nftables state."""

    netns: str
    runner: RecordingRunner

    def backend(self, **kw: Any) -> NftablesBackend:
        return NftablesBackend.open("auto", self.runner, **kw)

    def run(self, *argv: str, stdin: str | None = None) -> str:
        res = self.runner.run(list(argv), stdin)
        assert res.returncode == 0, f"{argv}: {res.stderr}"
        return res.stdout

    def nft(self, *commands: dict[str, Any]) -> None:
        self.run("nft", "-j", "-f", "-", stdin=json.dumps({"nftables": list(commands)}))

    def rules(self, chain: str) -> list[dict[str, Any]]:
        listing = json.loads(self.run("nft", "-j", "-n", "list", "table", "inet", "asgctl"))
        return [
            x["rule"] for x in listing["nftables"] if "rule" in x and x["rule"]["chain"] == chain
        ]

    def everything(self) -> str:
        """Every nft table and both iptables variants' filter tables (timestamps removed)."""
        out = [self.run("nft", "list", "ruleset")]
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            out.append(self.run(tool))
        return "\n".join(x for t in out for x in t.splitlines() if not x.startswith("#"))


@pytest.fixture
def nft_host(make_lab: Callable[..., Lab]) -> NftHost:
    netns = make_lab(conntrack=False).cell
    return NftHost(netns, RecordingRunner(("ip", "netns", "exec", netns)))


def assert_matches(host: NftHost, plan: CellPlan) -> None:
    backend = host.backend()
    for family in (4, 6):
        want, have = render_cell(plan, family), backend.read(family)
        assert dict(have.chains) == want.chains
        assert dict(have.sets) == dict(want.sets)
        assert dict(have.base_hooks) == dict(want.base_hooks)


T = {"family": "inet", "table": "asgctl"}


def _container(plan: CellPlan) -> str:
    """The IPv4 container chain with the most rules."""
    chains = render_cell(plan, 4).chains
    return max((n for n in chains if n.startswith("c4-")), key=lambda n: (len(chains[n]), n))


def _group_set(plan: CellPlan) -> str:
    sets = render_cell(plan, 4).sets
    return next(n for n in sorted(sets) if n.endswith("-p") and len(sets[n].elements or ()) >= 2)


def _delete_rule(h: NftHost, chain: str, index: int) -> dict[str, Any]:
    rule = h.rules(chain)[index]
    h.nft({"delete": {"rule": {**T, "chain": chain, "handle": rule["handle"]}}})
    return rule


def _d_rule_deleted(h: NftHost, p: CellPlan) -> tuple[str, str]:
    _delete_rule(h, _container(p), 1)
    return _container(p), rec.RULE_MISSING


def _d_rule_added(h: NftHost, p: CellPlan) -> tuple[str, str]:
    chain = _container(p)
    handle = h.rules(chain)[2]["handle"]
    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    accept = [{"match": {"op": "==", "left": daddr, "right": "198.18.99.1"}}, {"accept": None}]
    h.nft({"insert": {"rule": {**T, "chain": chain, "handle": handle, "expr": accept}}})
    return chain, rec.RULE_EXTRA


def _d_reordered(h: NftHost, p: CellPlan) -> tuple[str, str]:
    chain = _container(p)
    rule = _delete_rule(h, chain, 1)
    body = {**T, "chain": chain, "expr": rule["expr"], "comment": rule["comment"]}
    h.nft({"add": {"rule": body}})  # appended at the end
    return chain, rec.RULES_REORDERED


def _d_rule_changed(h: NftHost, p: CellPlan) -> tuple[str, str]:
    chain = _container(p)
    rule = h.rules(chain)[1]
    expr = [*rule["expr"][:-1], {"drop": None}]
    body = {**T, "chain": chain, "handle": rule["handle"], "expr": expr, "comment": rule["comment"]}
    h.nft({"replace": {"rule": body}})
    return chain, rec.RULE_CHANGED


def _d_chain_flushed(h: NftHost, p: CellPlan) -> tuple[str, str]:
    h.nft({"flush": {"chain": {**T, "name": _container(p)}}})
    return _container(p), rec.RULE_MISSING


def _d_chain_deleted(h: NftHost, p: CellPlan) -> tuple[str, str]:
    chain = _container(p)
    ip = next(c.container.ip for c in p.containers if chain.endswith(c.chain_id))
    h.nft(
        {"delete": {"element": {**T, "name": "containers4", "elem": [ip]}}},
        {"delete": {"chain": {**T, "name": chain}}},
    )
    return chain, rec.CHAIN_MISSING


def _d_chain_extra(h: NftHost, p: CellPlan) -> tuple[str, str]:
    name = "c4-" + "0" * 16
    h.nft(
        {"add": {"chain": {**T, "name": name}}},
        {"add": {"rule": {**T, "chain": name, "expr": [{"accept": None}]}}},
    )
    return name, rec.CHAIN_EXTRA


def _d_hook_removed(h: NftHost, p: CellPlan) -> tuple[str, str]:
    h.nft({"delete": {"chain": {**T, "name": "forward4"}}})
    return "forward4", rec.HOOK_MISSING


def _d_hook_changed(h: NftHost, p: CellPlan) -> tuple[str, str]:
    h.run("nft", "chain inet asgctl forward4 { policy drop; }")
    return "forward4", rec.HOOK_CHANGED


def _d_element_missing(h: NftHost, p: CellPlan) -> tuple[str, str]:
    s = render_cell(p, 4).sets[_group_set(p)]
    first = sorted(s.elements or ())[0]
    h.nft({"delete": {"element": {**T, "name": s.name, "elem": [element_json(s.keys, first)]}}})
    return s.name, ELEMENT_MISSING


def _d_element_extra(h: NftHost, p: CellPlan) -> tuple[str, str]:
    name = _group_set(p)
    elem = {"concat": ["198.18.77.7", 6, 9]}
    h.nft({"add": {"element": {**T, "name": name, "elem": [elem]}}})
    return name, ELEMENT_EXTRA


def _d_dispatch_missing(h: NftHost, p: CellPlan) -> tuple[str, str]:
    ip = next(c.container.ip for c in p.containers if c.container.version == 4)
    h.nft({"delete": {"element": {**T, "name": "containers4", "elem": [ip]}}})
    return "containers4", ELEMENT_MISSING


def _d_set_extra(h: NftHost, p: CellPlan) -> tuple[str, str]:
    name = "g4-" + "0" * 16 + "-a"
    h.nft({"add": {"set": {**T, "name": name, "type": "ipv4_addr", "flags": ["interval"]}}})
    return name, SET_EXTRA


def _d_set_deleted(h: NftHost, p: CellPlan) -> tuple[str, str]:
    name = _group_set(p)
    users = [c for c, rules in render_cell(p, 4).chains.items() if any(name in r for r in rules)]
    h.nft(*[{"flush": {"chain": {**T, "name": c}}} for c in users])
    h.nft({"delete": {"set": {**T, "name": name}}})
    return name, SET_MISSING


def _d_object_extra(h: NftHost, p: CellPlan) -> tuple[str, str]:
    h.nft({"add": {"counter": {**T, "name": "evil"}}})
    return "counter evil", OBJECT_EXTRA


def _d_dormant(h: NftHost, p: CellPlan) -> tuple[str, str]:
    h.run("nft", "add table inet asgctl { flags dormant; }")
    return "table", TABLE_DORMANT


NFT_DRIFTS: dict[str, Callable[[NftHost, CellPlan], tuple[str, str]]] = {
    "rule-deleted": _d_rule_deleted,
    "rule-added": _d_rule_added,
    "reordered": _d_reordered,
    "rule-changed": _d_rule_changed,
    "chain-flushed": _d_chain_flushed,
    "chain-deleted": _d_chain_deleted,
    "chain-extra": _d_chain_extra,
    "hook-removed": _d_hook_removed,
    "hook-changed": _d_hook_changed,
    "element-missing": _d_element_missing,
    "element-extra": _d_element_extra,
    "dispatch-missing": _d_dispatch_missing,
    "set-extra": _d_set_extra,
    "set-deleted": _d_set_deleted,
    "object-extra": _d_object_extra,
    "dormant": _d_dormant,
}


@pytest.mark.parametrize("kind", sorted(NFT_DRIFTS))
def test_drift_is_reported_and_repaired(nft_host: NftHost, kind: str) -> None:
    h = nft_host
    plan = edge_plan()
    assert converge(h.backend(), plan).ok
    h.run("iptables-nft", "-w", "-A", "FORWARD", "-s", "198.18.200.9/32", "-j", "ACCEPT")
    obj, what = NFT_DRIFTS[kind](h, plan)
    tampered = h.everything()

    report = converge(h.backend(), plan, plan, mode="report-only")
    assert report.ok and not report.in_sync
    assert (obj, what) in {(d.chain, d.what) for d in report.drift}, report.to_dict()
    assert report.changes == ()
    assert h.everything() == tampered  # report-only repaired nothing

    backend = h.backend()
    sent_before = len(h.runner.calls)
    result = converge(backend, plan, plan)
    assert result.ok, result.to_dict()
    assert (obj, what) in {(d.chain, d.what) for d in result.drift}
    assert all(d.repair for d in result.drift)
    transactions = [c for c in h.runner.calls[sent_before:] if c[:3] == ("nft", "-j", "-f")]
    assert len(transactions) == sum(f.sent for f in result.families) == 1
    assert_matches(h, plan)
    foreign = h.run("iptables-nft-save", "-t", "filter")
    assert "-A FORWARD -s 198.18.200.9/32 -j ACCEPT" in foreign  # never touched
    assert converge(h.backend(), plan, plan).in_sync


def test_drift_details_name_the_rules_and_elements(nft_host: NftHost) -> None:
    plan = small_plan()
    assert converge(nft_host.backend(), plan).ok
    rs = render_cell(plan, 4)
    chain = next(n for n in sorted(rs.chains) if n.startswith("c4-"))
    _delete_rule(nft_host, chain, 1)
    (drift,) = converge(nft_host.backend(), plan, plan).drift
    assert drift == rec.Drift(4, chain, rec.RULE_MISSING, (rs.chains[chain][1],), (), True)


def test_without_self_heal_drift_is_left_but_plan_changes_apply(nft_host: NftHost) -> None:
    h = nft_host
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(h.backend(), a).ok
    h.nft({"delete": {"chain": {**T, "name": "forward6"}}})  # drift the change does not touch
    result = converge(h.backend(), b, a, heal_drift=False)
    assert result.ok, result.to_dict()
    assert (6, rec.HOOK_MISSING, False) in {(d.family, d.what, d.repair) for d in result.drift}
    assert "forward6" not in h.backend().read(6).chains  # left alone
    assert dict(h.backend().read(4).chains) == render_cell(b, 4).chains  # change applied


def test_without_last_plan_differences_are_changes_not_drift(nft_host: NftHost) -> None:
    plan = small_plan()
    assert converge(nft_host.backend(), plan).ok
    nft_host.nft({"delete": {"chain": {**T, "name": "forward4"}}})
    result = converge(nft_host.backend(), plan)
    assert result.drift == ()
    assert [(c.chain, c.what) for c in result.changes] == [("forward4", rec.HOOK_ADDED)]
    assert_matches(nft_host, plan)


def test_other_tables_and_iptables_are_never_touched(nft_host: NftHost) -> None:
    """A foreign nft table on the same hook, iptables-nft and iptables-legacy rules: all stay
    byte for byte through adding, changing and removing everything of ours."""
    h = nft_host
    h.run(
        "nft",
        "-f",
        "-",
        stdin="table inet other {\n set s { type ipv4_addr; elements = { 198.18.200.5 } }\n"
        " chain guard { type filter hook forward priority 0; policy accept;\n"
        "  ip saddr @s drop\n }\n}\n",
    )
    h.run("iptables-nft", "-w", "-A", "FORWARD", "-d", "198.18.200.2/32", "-j", "DROP")
    h.run("iptables-legacy", "-w", "-A", "FORWARD", "-d", "198.18.200.3/32", "-j", "DROP")
    h.run("ip6tables-legacy", "-w", "-A", "FORWARD", "-d", "fd00:18::99/128", "-j", "DROP")

    def foreign() -> str:
        lines = h.everything().splitlines()
        start = lines.index("table inet asgctl {") if "table inet asgctl {" in lines else -1
        if start < 0:
            return "\n".join(lines)
        end = lines.index("}", start)
        return "\n".join(lines[:start] + lines[end + 1 :])

    before = foreign()
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    empty = compile_cell(small_policy(), (), "t")
    for plan, last in ((a, None), (b, a), (b, b), (empty, b)):
        result = converge(h.backend(), plan, last)
        assert result.ok, result.to_dict()
        assert foreign() == before
        assert_matches(h, plan)
    assert "asgctl" not in h.run("nft", "list", "tables")  # nothing of ours is left


def test_a_removed_chain_still_referenced_is_flushed_not_deleted(nft_host: NftHost) -> None:
    h = nft_host
    a = small_plan()
    b = small_plan(containers=CONTAINERS[1:])  # c1 leaves
    assert converge(h.backend(), a).ok
    gone = next(n for n in render_cell(a, 4).chains if n not in render_cell(b, 4).chains)
    # Someone's chain in our table jumps to it; with self-heal off, theirs stays.
    h.nft(
        {"add": {"chain": {**T, "name": "theirs"}}},
        {"add": {"rule": {**T, "chain": "theirs", "expr": [{"jump": {"target": gone}}]}}},
    )
    result = converge(h.backend(), b, a, heal_drift=False)
    assert result.ok, result.to_dict()
    assert gone in result.families[0].delta.orphaned
    assert h.backend().read(4).chains[gone] == ()
    # With self-heal, their chain is drift: removed, and ours with it.
    result = converge(h.backend(), b, b)
    assert result.ok and "theirs" in {d.chain for d in result.drift}
    assert_matches(h, b)


def test_terse_reads_skip_elements_and_verify_reads_what_was_written(nft_host: NftHost) -> None:
    h = nft_host
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(h.backend(read_elements=False), a).ok
    start = len(h.runner.calls)
    result = converge(h.backend(read_elements=False), b, a)
    assert result.ok, result.to_dict()
    calls = h.runner.calls[start:]
    assert ("nft", "-j", "-n", "list", "table", "inet", "asgctl") not in calls
    new_sets = [n for n in result.families[0].delta.written if n.startswith("g4-")]
    assert new_sets
    for name in new_sets:  # verify read each written set's elements back
        assert ("nft", "-j", "-n", "list", "set", "inet", "asgctl", name) in calls
    # A removed element is invisible to a terse read and found by a full one.
    _d_element_missing(h, b)
    assert converge(h.backend(read_elements=False), b, b, mode="report-only").in_sync
    full = converge(h.backend(), b, b, mode="report-only")
    assert ELEMENT_MISSING in {d.what for d in full.drift}
    # The dispatch map is read in full either way: a lost container entry is always found.
    _d_dispatch_missing(h, b)
    terse = converge(h.backend(read_elements=False), b, b)
    assert ("containers4", ELEMENT_MISSING) in {(d.chain, d.what) for d in terse.drift}


def test_an_unreadable_listing_is_an_error_not_an_empty_table(nft_host: NftHost) -> None:
    plan = small_plan()
    assert converge(nft_host.backend(), plan).ok
    broken = NftablesBackend(RecordingRunner(("ip", "netns", "exec", "no-such-netns-asg")))
    with pytest.raises(ReadError):
        broken.read(4)


def test_auto_depth_reads_terse_once_the_table_is_large(nft_host: NftHost) -> None:
    h = nft_host
    plan = small_plan()
    assert converge(h.backend(), plan).ok
    full = ("nft", "-j", "-n", "list", "table", "inet", "asgctl")
    terse = ("nft", "-j", "-n", "-t", "list", "ruleset")
    big = replace(h.backend(), auto_limit=1, remember=False)  # "large" from one element on
    start = len(h.runner.calls)
    for _ in range(3):
        big.read(4)
    assert h.runner.calls[start:][0] == full  # the first read of a family is a full one
    assert [c for c in h.runner.calls[start:] if c[0] == "nft"][1:] == [
        terse,
        ("nft", "-j", "-n", "list", "map", "inet", "asgctl", "containers4"),
    ] * 2
    small = replace(h.backend(), remember=False)  # a small table is read in full every time
    assert small.full_read_due(4)
    small.read(4)
    assert small.full_read_due(4)
    due = replace(h.backend(), auto_limit=1, audit_seconds=0.0, remember=False)
    due.read(4)
    assert due.full_read_due(4)


def test_one_listing_per_cycle_and_never_an_old_one(nft_host: NftHost) -> None:
    """Without the generation shortcut, IPv6 reuses the listing IPv4 just took (after its
    transaction, by its verify); a new cycle always lists afresh, so drift made between two
    cycles of one backend is seen."""
    h = nft_host
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    backend = h.backend(remember=False)
    assert converge(backend, a).ok
    listing = ("nft", "-j", "-n", "list", "table", "inet", "asgctl")
    start = len(h.runner.calls)
    result = converge(backend, b, a)
    assert result.ok and result.families[0].sent and not result.families[1].sent
    calls = [c for c in h.runner.calls[start:] if c[0] == "nft"]
    assert calls == [listing, ("nft", "-j", "-f", "-"), listing]  # read, apply, verify (v4)
    h.nft({"delete": {"chain": {**T, "name": "forward6"}}})  # at once, with the same backend
    again = converge(backend, b, b)
    assert (6, rec.HOOK_MISSING) in {(d.family, d.what) for d in again.drift}
    assert_matches(h, b)


def test_generation_id_spares_listings_and_sees_any_change(nft_host: NftHost) -> None:
    """Once the kernel has printed our shapes back, cycles list nothing: the state read (or
    written) at the current generation id is the kernel's.  Any other transaction, by any
    program in any table, makes the next read list again."""
    h = nft_host
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    backend = h.backend()
    assert converge(backend, a).ok
    start = len(h.runner.calls)
    result = converge(backend, b, a)
    assert result.ok and result.families[0].sent
    assert h.runner.calls[start:] == [("nft", "-j", "-f", "-")]  # the transaction alone
    start = len(h.runner.calls)
    assert converge(backend, b, b).in_sync
    assert h.runner.calls[start:] == []  # nothing listed, nothing sent
    assert_matches(h, b)  # and what was remembered is what the kernel holds
    h.run("iptables-nft", "-w", "-A", "INPUT", "-j", "ACCEPT")  # another table, another tool
    start = len(h.runner.calls)
    assert converge(backend, b, b).in_sync
    assert ("nft", "-j", "-n", "list", "table", "inet", "asgctl") in h.runner.calls[start:]
    _d_chain_flushed(h, b)
    result = converge(backend, b, b)
    assert (_container(b), rec.RULE_MISSING) in {(d.chain, d.what) for d in result.drift}
    assert_matches(h, b)


def test_one_backend_removes_everything_and_stays_in_sync(nft_host: NftHost) -> None:
    """The table both families share is gone for both once the last of it is deleted."""
    backend = nft_host.backend()
    plan, empty = small_plan(), compile_cell(small_policy(), (), "t")
    assert converge(backend, plan).ok
    assert converge(backend, plan, plan).in_sync
    result = converge(backend, empty, plan)
    assert result.ok, result.to_dict()
    assert "asgctl" not in nft_host.run("nft", "list", "tables")
    again = converge(backend, empty, empty)
    assert again.ok and again.in_sync, again.to_dict()
    assert converge(backend, plan, empty).ok
    assert_matches(nft_host, plan)
