"""Render a cell plan as nftables state: one `inet` table, verdict-map dispatch, shared sets.

Layout (one table, `inet asgctl`, holding both families; every name carries its family, so
each IP family is a disjoint slice of the table that converges on its own)::

    chain forward4  type filter hook forward priority filter - 1; policy accept
        ct state established,related accept
        oifname "eth0" ip saddr vmap @containers4   # underlay egress only; one hash lookup,
                                                    # any number of containers
    map containers4 { ipv4_addr : verdict }         # container address : goto c4-<chain id>
    chain c4-<chain id>                             # one per container
        ct state invalid drop
        ct state new update @rate4 { ip saddr . ip daddr . tcp dport limit rate over R/second
            burst B packets } reject                # outbound_connections.limit only
        ip daddr @d4-running reject                 # deny_networks of the container's workload
        ip daddr @g4-<group>-a accept                                  # protocol all
        ip daddr . meta l4proto . th dport @g4-<group>-p accept        # tcp/udp and ports
        ip daddr . icmp type . icmp code @g4-<group>-i accept          # icmp type/code
        jump g4-<group>                                                # a logging group
        limit rate 1/second log prefix "ASG DENY <chain id> "
        reject with icmpx port-unreachable
    set g4-<group>-{a,p,i} { flags interval }       # one group = the rules of one partition,
                                                    # shared by every container that has it
    chain g4-<group>                                # logging groups only: rule by rule, so
                                                    # each logs its own id on new connections
    set d4-{always,running,staging} { flags interval }  # CF's deny_networks, by workload
    set rate4 { ipv4_addr . ipv4_addr . inet_service; flags timeout }  # buckets, per
                                                    # container, destination and port

Only what a container sends out through the cell's underlay is judged (the `oifname` match,
silk's `-o <underlay>`): traffic to another container on the cell, or over the overlay, is
CF's network policies' business and passes this table untouched.

A new connection from a container therefore costs one map lookup plus a few set lookups per
group the container has, whatever the number of rules on the cell.  Group sets are named by
the group's content id (all 128 bits: nft names hold 256 characters), so a changed group is
a new set and an unchanged one is never rewritten: the only element deltas in normal
operation are the dispatch maps'.  The name is not trusted as content: the delta compares
a set's elements with those the last plan wrote under that name.

Why priority `filter - 1`, and why reject rather than merely not accept: in nftables an
`accept` ends only the base chain it is in; the packet still traverses every other base chain
on the forward hook (iptables-nft's `ip filter FORWARD`, iptables-legacy's, other programs'
tables), and any of them may still drop it.  A `drop` or `reject` is final.  So our chain
accepts what the plan allows (which lets other firewalls have their say, as they should) and
rejects everything else a container sends, which no rule elsewhere can undo.  Running just
before the filter priority makes our reject, with its log line, the verdict a denied
container sees, even where a later foreign rule would have dropped it silently; established
traffic is accepted at once, so held connections never reach a chain that is being rewritten.

Every rule is rendered in the exact JSON form `nft -j -n list` prints (which nft also accepts
as input), so read-back compares as strings; set elements compare as canonical text built
from integers.  Nothing a policy author wrote reaches nft: names and comments carry hex ids
from the plan, addresses are re-printed from integers, ports, protocols and ICMP values are
integers, and the whole transaction is JSON, so there is no syntax to inject into.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.core.cellplan import (
    CellPlan,
    CellSettings,
    ContainerPlan,
    FlowLog,
    NameRule,
    PlanRule,
    RateLimit,
    RuleGroup,
    check_interface_name,
    deny_class,
    log_id,
    name_set,
)
from reconciler.core.model import AddressRange, RuleItem, address_text
from reconciler.core.packetspace import (
    ANY_BYTE,
    ANY_PORT,
    ANY_PROTOCOL,
    PROTOCOL_NUMBERS,
    Range,
    disjoint_boxes,
    icmp_protocol,
    item_space,
)
from reconciler.flows.record import ALLOW, DENY, RATE_ID, WOULD_DENY, log_prefix

NFT_FAMILY = "inet"
TABLE = "asgctl"
PRIORITY = -1  # filter - 1: just before iptables' filter FORWARD (priority 0)
Box = tuple[Range, ...]  # a set element's fields, as ranges
ADDRESS_TYPES = frozenset({"ipv4_addr", "ipv6_addr"})
KERNEL_LOG = FlowLog()
_CT_INVALID, _CT_ESTABLISHED, _CT_RELATED, _CT_NEW = 1, 2, 4, 8
_ICMPX_PORT_UNREACHABLE = 1


def base_chain(family: int) -> str:
    return f"forward{family}"


def dispatch_map(family: int) -> str:
    return f"containers{family}"


def container_chain(family: int, chain_id: str) -> str:
    return f"c{family}-{chain_id}"


def group_chain(family: int, group_id: str) -> str:
    return f"g{family}-{group_id}"


def group_set(family: int, group_id: str, kind: str) -> str:
    """`a`: destinations for protocol all; `p`: address . protocol . port; `i`: ICMP."""
    return f"g{family}-{group_id}-{kind}"


def deny_set(family: int, workload: str) -> str:
    """The deny networks of a workload's class (`always`, `running`, `staging`)."""
    return f"d{family}-{deny_class(workload)}"


def rate_set(family: int) -> str:
    """The connection-limit buckets of every container of the family (keyed by source)."""
    return f"rate{family}"


def rate_log_chain(family: int) -> str:
    return f"ratelog{family}"


def family_of(name: str) -> int:
    """Which family's slice an object of our table belongs to, by name.

    Objects whose name is none of ours (someone else added them) belong to the IPv4 slice, so
    exactly one family reports and removes them.
    """
    if name in (base_chain(6), dispatch_map(6), rate_set(6), rate_log_chain(6)):
        return 6
    if name.startswith(("c6-", "g6-", "d6-", name_set(6, ""))):
        return 6
    return 4


# -- the desired state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaseHook:
    """How a base chain hooks into the kernel (what `nft -j list` prints for it)."""

    type: str = "filter"
    hook: str = "forward"
    prio: int = PRIORITY
    policy: str = "accept"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "hook": self.hook, "prio": self.prio, "policy": self.policy}

    def __str__(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.prio}; policy {self.policy}"


@dataclass(frozen=True, slots=True)
class NftSet:
    """A named set or verdict map: its key types, flags and elements as canonical text.

    An element's text is built from integers (`198.19.0.1-198.19.0.5 . 6 . 80-90`; a map
    element adds ` : goto <chain>`), so the kernel's way of printing it (prefix or range,
    names or numbers) never makes equal elements differ.  `elements` is None when they were
    not read (a terse read-back): unknown, not empty.
    """

    name: str
    keys: tuple[str, ...]
    flags: tuple[str, ...] = ()
    data: str = ""
    elements: frozenset[str] | None = frozenset()
    timeout: int = 0
    """Seconds an element lives (sets flagged `timeout`): the connection-limit buckets,
    whose elements packets add, not the plan, so they are never compared or written."""

    @property
    def header(self) -> tuple[tuple[str, ...], tuple[str, ...], str, int]:
        return (self.keys, self.flags, self.data, self.timeout)

    def describe(self) -> str:
        kind = "map" if self.data else "set"
        keys = " . ".join(self.keys) + (f" : {self.data}" if self.data else "")
        flags = f"; flags {','.join(self.flags)}" if self.flags else ""
        return f"{kind} {self.name} {{ type {keys}{flags} }}"


@dataclass(frozen=True)
class NftRuleset:
    """One family's slice of our table: chains (rules as canonical JSON), sets and maps.

    `chains` holds every chain, base chains included, and `base_hooks` says which of them
    are base chains and how they hook in.
    """

    family: int
    chains: Mapping[str, tuple[str, ...]]
    base_hooks: Mapping[str, BaseHook] = field(default_factory=dict)
    sets: Mapping[str, NftSet] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.chains and not self.sets

    @property
    def rule_count(self) -> int:
        """Rules plus set elements: what the kernel holds of this slice."""
        elements = sum(len(s.elements or ()) for s in self.sets.values())
        return sum(len(r) for r in self.chains.values()) + elements

    @property
    def installed_rules(self) -> int:
        """What the agent reports as installed: every rule and every set element (a group's
        rules live as elements of its sets, so the rule count alone would say little)."""
        return self.rule_count

    def text(self) -> str:
        """The transaction that creates this slice in an empty table (`nft -j -f -` input)."""
        return transaction_text(creation_commands(self))


def canonical_rule(expr: Sequence[Any], comment: str | None) -> str:
    """A rule as one string: how desired and read-back rules are compared and reported."""
    body: dict[str, Any] = {"expr": list(expr)}
    if comment is not None:
        body["comment"] = comment
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def rule_body(rule: str) -> dict[str, Any]:
    """The `expr` (and `comment`) of a canonical rule, for an `add rule` command."""
    body: dict[str, Any] = json.loads(rule)
    return body


def rule_comment(rule: str) -> str:
    """The id comment of a canonical rule ("" without one): pairs a changed rule with its
    original when drift is classified."""
    try:
        comment = json.loads(rule).get("comment", "")
    except (ValueError, AttributeError):
        return ""
    return comment if isinstance(comment, str) else ""


# -- expressions, in the form `nft -j -n list` prints them -----------------------------------


def _payload(protocol: str, field_name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field_name}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _ct_state(mask: int | list[int]) -> dict[str, Any]:
    return _match({"ct": {"key": "state"}}, mask, "in")


ACCEPT: dict[str, Any] = {"accept": None}


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _address_value(dest: AddressRange) -> Any:
    """An address match's right-hand side as nft prints it: address, prefix or range."""
    if dest.first == dest.last:
        return dest.first_address
    prefix = dest.prefix_length()
    if prefix is not None:
        return {"prefix": {"addr": dest.first_address, "len": prefix}}
    return {"range": [dest.first_address, dest.last_address]}


def _number_value(lo: int, hi: int) -> Any:
    return lo if lo == hi else {"range": [lo, hi]}


def _log_rule_matches(item: RuleItem) -> list[dict[str, Any]]:
    """The match part of one logging rule (log groups are rendered rule by rule)."""
    dest = item.destination
    ip = _ip(dest.version)
    out: list[dict[str, Any]] = []
    if not (dest.first == 0 and dest.last == (1 << dest.bits) - 1):
        out.append(_match(_payload(ip, "daddr"), _address_value(dest)))
    space = item_space(item)
    first = space[0]
    if first.protocols == ANY_PROTOCOL:
        return out
    proto = item.protocol
    ports = [box.ports for box in space]
    if first.types != ANY_BYTE:  # one ICMP type (of the family's own ICMP: packetspace)
        out.append(_match(_payload(proto, "type"), first.types[0]))
        if first.codes != ANY_BYTE:
            out.append(_match(_payload(proto, "code"), first.codes[0]))
    elif ports == [ANY_PORT]:
        out.append(_match({"meta": {"key": "l4proto"}}, first.protocols[0]))
    elif len(ports) == 1:
        out.append(_match(_payload(proto, "dport"), _number_value(*ports[0])))
    else:
        out.append(_match(_payload(proto, "dport"), {"set": [_number_value(*p) for p in ports]}))
    return out


# -- groups ---------------------------------------------------------------------------------


def _set_keys(family: int, kind: str) -> tuple[str, ...]:
    addr = "ipv4_addr" if family == 4 else "ipv6_addr"
    if kind == "a":
        return (addr,)
    if kind == "p":
        return (addr, "inet_proto", "inet_service")
    icmp = "icmp" if family == 4 else "icmpv6"
    return (addr, f"{icmp}_type", f"{icmp}_code")


def _set_match(family: int, kind: str, name: str) -> dict[str, Any]:
    ip = _ip(family)
    daddr = _payload(ip, "daddr")
    if kind == "a":
        left: Any = daddr
    elif kind == "p":
        left = {"concat": [daddr, {"meta": {"key": "l4proto"}}, _payload("th", "dport")]}
    else:
        icmp = "icmp" if family == 4 else "icmpv6"
        left = {"concat": [daddr, _payload(icmp, "type"), _payload(icmp, "code")]}
    return _match(left, "@" + name)


def _item_boxes(item: RuleItem) -> tuple[str, list[Box]]:
    """Which set of its group an item goes to, and the boxes it adds there: its packet space
    (packetspace.item_space) projected onto that set's keys."""
    space = item_space(item)
    first = space[0]  # an item's boxes differ in their ports only
    if first.protocols == ANY_PROTOCOL:
        return "a", [(first.addresses,)]
    if first.protocols[0] == PROTOCOL_NUMBERS[icmp_protocol(first.family)]:
        return "i", [(first.addresses, first.types, first.codes)]
    return "p", [(box.addresses, box.protocols, box.ports) for box in space]


def element_text(keys: Sequence[str], box: Box) -> str:
    """The canonical text of one element: its fields as integers re-printed, ` . `-joined."""
    parts = []
    for typ, (lo, hi) in zip(keys, box, strict=True):
        if typ in ADDRESS_TYPES:
            version = 4 if typ == "ipv4_addr" else 6
            text = address_text(version, lo)
            parts.append(text if lo == hi else f"{text}-{address_text(version, hi)}")
        else:
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return " . ".join(parts)


@dataclass(frozen=True, slots=True)
class RenderedGroup:
    """A group as nft objects: its sets, its chain (logging groups), and the rules a
    container chain uses to reach it."""

    sets: tuple[NftSet, ...]
    chain: tuple[str, ...] | None
    entry: tuple[str, ...]


_ContainerKey = tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...], FlowLog, bool]


class RenderMemo:
    """What renders of one backend share: groups by content digest, container chains by what
    they are made of.  Not global state: a backend owns one (`rendercache.RenderCache`), and
    `render_cell` alone starts afresh, so the renderer stays a function of its inputs.

    A group renders the same forever (its digest covers family, id, each rule's id and
    match: all it renders from), so a cell of a million rules is rendered once, not on every
    cycle; never by id alone: a group whose id collides with a cached one's is a different
    group.  Most containers keep their chain from one plan to the next.
    """

    def __init__(self, max_groups: int = 200_000, max_chains: int = 65_536) -> None:
        self.max_groups = max_groups
        self.max_chains = max_chains
        self._groups: dict[tuple[str, FlowLog], RenderedGroup] = {}
        self._chains: dict[_ContainerKey, tuple[str, ...]] = {}

    def group(self, group: RuleGroup, flow: FlowLog = KERNEL_LOG) -> RenderedGroup:
        key = (group.digest, flow)  # a logging group's chain renders its log target
        hit = self._groups.get(key)
        if hit is not None:
            return hit
        out = _render_group(group, flow)
        if len(self._groups) >= self.max_groups:
            self._groups.clear()
        self._groups[key] = out
        return out

    def container(
        self,
        chain_id: str,
        head: tuple[str, ...],
        entries: tuple[tuple[str, ...], ...],
        flow: FlowLog = KERNEL_LOG,
        audit: bool = False,
    ) -> tuple[str, ...]:
        key: _ContainerKey = (chain_id, head, entries, flow, audit)
        hit = self._chains.get(key)
        if hit is not None:
            return hit
        out = _container_rules_of(chain_id, head, entries, flow, audit)
        if len(self._chains) >= self.max_chains:
            self._chains.clear()
        self._chains[key] = out
        return out


def _render_group(group: RuleGroup, flow: FlowLog) -> RenderedGroup:
    family = group.version
    comment = "asg:g:" + group.id
    if group.has_log:
        name = group_chain(family, group.id)
        rules: list[str] = []
        for rule in group.rules:
            rules.extend(_log_rules(rule, flow))
        entry = canonical_rule([{"jump": {"target": name}}], comment)
        return RenderedGroup((), tuple(rules), (entry,))
    boxes: dict[str, list[Box]] = {"a": [], "p": [], "i": []}
    for rule in group.rules:
        kind, found = _item_boxes(rule.item)
        boxes[kind].extend(found)
    sets = []
    entries = []
    for kind in ("a", "p", "i"):
        if not boxes[kind]:
            continue
        name = group_set(family, group.id, kind)
        keys = _set_keys(family, kind)
        elements = frozenset(element_text(keys, b) for b in disjoint_boxes(boxes[kind]))
        sets.append(NftSet(name, keys, ("interval",), "", elements))
        entries.append(canonical_rule([_set_match(family, kind, name), ACCEPT], comment))
    return RenderedGroup(tuple(sets), None, tuple(entries))


def log_statement(flow: FlowLog, prefix: str) -> dict[str, Any]:
    """`log prefix ...`, with `group N` in `nflog` mode, as `nft -j list` prints it; the
    prefix follows `reconciler.flows.record`'s scheme."""
    if flow.mode == "nflog":
        return {"log": {"prefix": prefix, "group": flow.group}}
    return {"log": {"prefix": prefix}}


def _log_limit(flow: FlowLog) -> dict[str, Any]:
    """The kernel log gets silk's 1/s; NFLOG the cell's flow rate (bursting as much)."""
    if flow.mode == "nflog":
        return {"limit": {"rate": flow.rate, "burst": flow.rate, "per": "second"}}
    return {"limit": {"rate": 1, "burst": 5, "per": "second"}}


def _log_rules(rule: PlanRule, flow: FlowLog) -> list[str]:
    """LOG on new connections, then ACCEPT, as the iptables backend does: two rules, so an
    untracked packet is accepted without being logged as a new connection."""
    matches = _log_rule_matches(rule.item)
    comment = "asg:r:" + rule.id
    log = log_statement(flow, log_prefix(ALLOW, log_id(rule.id)))
    return [
        canonical_rule([*matches, _ct_state(_CT_NEW), log], comment),
        canonical_rule([*matches, ACCEPT], comment),
    ]


# -- containers and the cell ----------------------------------------------------------------


def _invalid_rule() -> str:
    return canonical_rule([_ct_state(_CT_INVALID), {"drop": None}], "asg:invalid")


def _established_rule() -> str:
    return canonical_rule([_ct_state([_CT_ESTABLISHED, _CT_RELATED]), ACCEPT], "asg:est")


def _dispatch_rule(family: int, underlay: tuple[str, ...]) -> str:
    """Dispatch by source, for what leaves through the underlay only: one `oifname` match,
    an interface name or an anonymous set of them (silk's `-o <underlay>`; see
    backends/iptables/render.py hook_rule).  No underlay known: every forwarded packet is judged."""
    vmap = {"vmap": {"key": _payload(_ip(family), "saddr"), "data": "@" + dispatch_map(family)}}
    names = [check_interface_name(n) for n in dict.fromkeys(underlay)]
    if not names:
        return canonical_rule([vmap], "asg:dispatch")
    right: Any = names[0] if len(names) == 1 else {"set": names}
    return canonical_rule([_match({"meta": {"key": "oifname"}}, right), vmap], "asg:dispatch")


def _reject_expr() -> dict[str, Any]:
    return {"reject": {"type": "icmpx", "expr": _ICMPX_PORT_UNREACHABLE}}


def _deny_rule(family: int, workload: str) -> str:
    match = _match(_payload(_ip(family), "daddr"), "@" + deny_set(family, workload))
    return canonical_rule([match, _reject_expr()], "asg:deny")


def _deny_networks_set(family: int, workload: str, networks: tuple[str, ...]) -> NftSet:
    """A workload class's deny networks as an interval set (overlaps merged, as nft needs)."""
    keys = ("ipv4_addr",) if family == 4 else ("ipv6_addr",)
    boxes = [((r.first, r.last),) for r in (AddressRange.parse(n) for n in networks)]
    elements = frozenset(element_text(keys, b) for b in disjoint_boxes(boxes))
    return NftSet(deny_set(family, workload), keys, ("interval",), "", elements)


def _rate_rule(family: int, rate: RateLimit) -> str:
    """silk's NewNetOutConnRateLimitRule in nft: a bucket per container (source), destination
    address and TCP port in one set, over `rate` after `burst` new connections rejected."""
    ip = _ip(family)
    update = {
        "set": {
            "op": "update",
            "elem": {
                "concat": [
                    _payload(ip, "saddr"),
                    _payload(ip, "daddr"),
                    _payload("tcp", "dport"),
                ]
            },
            "set": "@" + rate_set(family),
            "stmt": [
                {
                    "limit": {
                        "rate": rate.rate_per_sec,
                        "burst": rate.burst,
                        "per": "second",
                        "inv": True,
                    }
                }
            ],
        }
    }
    verdict = {"jump": {"target": rate_log_chain(family)}} if rate.logging else _reject_expr()
    return canonical_rule([_ct_state(_CT_NEW), update, verdict], "asg:rate")


def _rate_set(family: int, rate: RateLimit) -> NftSet:
    addr = "ipv4_addr" if family == 4 else "ipv6_addr"
    return NftSet(
        rate_set(family),
        (addr, addr, "inet_service"),
        ("timeout",),
        "",
        frozenset(),
        timeout=rate.expire_ms // 1000,
    )


def _rate_log_rules(flow: FlowLog) -> tuple[str, ...]:
    log = canonical_rule(
        [_log_limit(flow), log_statement(flow, log_prefix(DENY, RATE_ID))],
        "asg:rate-log",
    )
    return (log, canonical_rule([_reject_expr()], "asg:reject"))


def _deny_rules(chain_id: str, flow: FlowLog, audit: bool = False) -> tuple[str, str]:
    """The chain's last word on what no rule allowed: logged and rejected; in audit mode
    logged as would-deny (`ASG AUDIT`) and accepted.  The deny networks' rule comes before
    the groups, so audit never reaches a deny network."""
    if audit:
        log = canonical_rule(
            [_log_limit(flow), log_statement(flow, log_prefix(WOULD_DENY, log_id(chain_id)))],
            "asg:audit-log",
        )
        return log, canonical_rule([ACCEPT], "asg:audit")
    log = canonical_rule(
        [_log_limit(flow), log_statement(flow, log_prefix(DENY, log_id(chain_id)))],
        "asg:deny-log",
    )
    reject = canonical_rule([_reject_expr()], "asg:reject")
    return log, reject


def _name_entry(
    cp: ContainerPlan, plan: CellPlan, sets: dict[str, NftSet]
) -> tuple[tuple[str, ...], ...]:
    """A container's grants by name (after its groups), adding each name's set to `sets`.

    A name's set is flagged `timeout`: its elements are put there by the agent from DNS
    answers, each with the record's TTL, never by the plan, so they are state and not drift
    (`parse._parse_set`), and they change without the chain changing."""
    if not cp.names:
        return ()
    by_id = plan.name_by_id
    rules = []
    for nid in cp.names:
        rule = by_id[nid]
        addr = "ipv4_addr" if rule.version == 4 else "ipv6_addr"
        sets.setdefault(rule.set_name, NftSet(rule.set_name, (addr,), ("timeout",)))
        rules.append(name_rule(rule))
    return (tuple(rules),)


def name_rule(rule: NameRule) -> str:
    """A grant by name: the destination's protocol and ports, to an address in the name's
    set.  The protocol and port matches are those of a logging rule for the same item to
    every address (`_log_rule_matches` leaves out a daddr match that covers everything)."""
    full = rule.item.anywhere(rule.version)
    daddr = _match(_payload(_ip(rule.version), "daddr"), "@" + rule.set_name)
    return canonical_rule([daddr, *_log_rule_matches(full), ACCEPT], "asg:n:" + rule.id)


def _container_head(cp: ContainerPlan, settings: CellSettings, family: int) -> tuple[str, ...]:
    """What a container chain checks before its groups: the connection limit, then the deny
    networks of its workload (silk's order: netout_chain.go, IPTablesRules)."""
    head = []
    if settings.outbound.limit:
        head.append(_rate_rule(family, settings.outbound))
    if settings.deny(cp.container.workload, family):
        head.append(_deny_rule(family, cp.container.workload))
    return tuple(head)


def _container_rules_of(
    chain_id: str,
    head: tuple[str, ...],
    entries: tuple[tuple[str, ...], ...],
    flow: FlowLog = KERNEL_LOG,
    audit: bool = False,
) -> tuple[str, ...]:
    """A container chain (`RenderMemo.container` keeps them from one plan to the next)."""
    rules = [_invalid_rule(), *head]
    for entry in entries:
        rules.extend(entry)
    rules.extend(_deny_rules(chain_id, flow, audit))
    return tuple(rules)


def render_cell(plan: CellPlan, family: int, memo: RenderMemo | None = None) -> NftRuleset:
    """One family's slice of the table for a cell plan (empty when it has no containers).

    `memo` carries group and container renders over from earlier plans (a backend's
    `RenderCache`); without one, everything is rendered afresh.
    """
    return _render_cell(plan, family, memo or RenderMemo())


def _render_cell(plan: CellPlan, family: int, memo: RenderMemo) -> NftRuleset:
    containers = [c for c in plan.containers if c.container.version == family]
    if not containers:
        return NftRuleset(family, {})
    by_id = {g.id: g for g in plan.groups if g.version == family}
    used = sorted({gid for cp in containers for gid in cp.groups})
    settings = plan.settings
    groups = {gid: memo.group(by_id[gid], settings.flow_log) for gid in used}
    chains: dict[str, tuple[str, ...]] = {}
    sets: dict[str, NftSet] = {}
    for gid in used:
        rendered = groups[gid]
        if rendered.chain is not None:
            chains[group_chain(family, gid)] = rendered.chain
        for s in rendered.sets:
            sets[s.name] = s
    if settings.outbound.limit:
        sets[rate_set(family)] = _rate_set(family, settings.outbound)
        if settings.outbound.logging:
            chains[rate_log_chain(family)] = _rate_log_rules(settings.flow_log)
    elements = set()
    seen: set[int] = set()
    for cp in sorted(containers, key=lambda cp: (cp.container.ip, cp.chain_id)):
        name = container_chain(family, cp.chain_id)
        deny = settings.deny(cp.container.workload, family)
        if deny and deny_set(family, cp.container.workload) not in sets:
            denied = _deny_networks_set(family, cp.container.workload, deny)
            sets[denied.name] = denied
        named = _name_entry(cp, plan, sets)
        entries = (*(groups[g].entry for g in cp.groups), *named)
        head = _container_head(cp, settings, family)
        chains[name] = memo.container(
            cp.chain_id, head, tuple(entries), settings.flow_log, cp.audit
        )
        address = int(ipaddress.ip_address(cp.container.ip))
        if address in seen:  # two containers, one address: the first wins, as in iptables
            continue
        seen.add(address)
        elements.add(f"{address_text(family, address)} : goto {name}")
    keys = ("ipv4_addr",) if family == 4 else ("ipv6_addr",)
    dispatch = dispatch_map(family)
    sets[dispatch] = NftSet(dispatch, keys, (), "verdict", frozenset(elements))
    chains[base_chain(family)] = (
        _established_rule(),
        _dispatch_rule(family, settings.underlay(family)),
    )
    return NftRuleset(family, chains, base_hooks={base_chain(family): BaseHook()}, sets=sets)


# -- JSON commands ------------------------------------------------------------------------


def _ref(**extra: Any) -> dict[str, Any]:
    return {"family": NFT_FAMILY, "table": TABLE, **extra}


def table_command(verb: str = "add") -> dict[str, Any]:
    return {verb: {"table": {"family": NFT_FAMILY, "name": TABLE}}}


def chain_command(verb: str, name: str, hook: BaseHook | None = None) -> dict[str, Any]:
    body = _ref(name=name)
    if hook is not None and verb == "add":
        body.update(hook.to_json())
    return {verb: {"chain": body}}


def rule_command(chain: str, rule: str) -> dict[str, Any]:
    return {"add": {"rule": _ref(chain=chain, **rule_body(rule))}}


def set_command(verb: str, s: NftSet, with_elements: bool = True) -> dict[str, Any]:
    kind = "map" if s.data else "set"
    body = _ref(name=s.name)
    if verb == "add":
        body["type"] = s.keys[0] if len(s.keys) == 1 else list(s.keys)
        if s.data:
            body["map"] = s.data
        if s.flags:
            body["flags"] = list(s.flags)
        if s.timeout:
            body["timeout"] = s.timeout
        if with_elements and s.elements:
            body["elem"] = [element_json(s.keys, e) for e in sorted(s.elements)]
    return {verb: {kind: body}}


def element_command(verb: str, s: NftSet, elements: Iterable[str]) -> dict[str, Any]:
    """Add or delete elements (a map element is deleted by its key alone)."""
    values = [element_json(s.keys, e, key_only=verb == "delete") for e in sorted(elements)]
    return {verb: {"element": _ref(name=s.name, elem=values)}}


def object_command(verb: str, kind: str, name: str) -> dict[str, Any]:
    return {verb: {kind: _ref(name=name)}}


def element_json(keys: Sequence[str], text: str, *, key_only: bool = False) -> Any:
    """An element's canonical text back as nft JSON (what `add`/`delete element` take)."""
    if text.startswith("json:"):
        raw = json.loads(text[5:])
        return raw[0] if key_only and isinstance(raw, list) and len(raw) == 2 else raw
    key_text, _, verdict = text.partition(" : ")
    fields = key_text.split(" . ")
    values: list[Any] = []
    for typ, part in zip(keys, fields, strict=True):
        lo, sep, hi = part.partition("-")
        if typ in ADDRESS_TYPES:
            values.append({"range": [lo, hi]} if sep else lo)
        else:
            values.append({"range": [int(lo), int(hi)]} if sep else int(lo))
    key: Any = values[0] if len(values) == 1 else {"concat": values}
    if not verdict or key_only:
        return key
    kind, _, target = verdict.partition(" ")
    return [key, {kind: {"target": target}} if target else {kind: None}]


def transaction_text(commands: Sequence[Mapping[str, Any] | str]) -> str:
    """`nft -j -f -` input: one command per line, so a failing one is easy to find."""
    if not commands:
        return ""
    lines = [c if isinstance(c, str) else json.dumps(c, separators=(",", ":")) for c in commands]
    return '{"nftables": [\n' + ",\n".join(lines) + "\n]}\n"


def chain_order(name: str) -> tuple[int, str]:
    """Fill order: logging groups (and the rate log), then containers, then base chains
    (targets first)."""
    if name.startswith(("g4-", "g6-", "ratelog")):
        return (0, name)
    if name.startswith(("c4-", "c6-")):
        return (1, name)
    return (2, name)


def creation_commands(ruleset: NftRuleset) -> list[dict[str, Any]]:
    """Everything of a slice, created in an order valid at every step: table, chains (empty),
    sets and maps, rules, base chains last."""
    if ruleset.empty:
        return []
    cmds = [table_command()]
    regular = sorted(n for n in ruleset.chains if n not in ruleset.base_hooks)
    cmds.extend(chain_command("add", n) for n in regular)
    cmds.extend(set_command("add", ruleset.sets[n]) for n in sorted(ruleset.sets))
    for name in sorted(regular, key=chain_order):
        cmds.extend(rule_command(name, r) for r in ruleset.chains[name])
    for name in sorted(ruleset.base_hooks):
        cmds.append(chain_command("add", name, ruleset.base_hooks[name]))
        cmds.extend(rule_command(name, r) for r in ruleset.chains[name])
    return cmds
