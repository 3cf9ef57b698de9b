"""Shadow parity: does asgctl's plan allow each container exactly what CF's chains allow it?

Before asgctl takes over a cell, an operator needs proof, container by container, that the
switch changes no verdict.  CF's side comes from the kernel (`backends/iptables/cfparse`
walks silk's netout chains and the vxlan-policy-agent's ASG chains into `CfSide`s); ours is
the compiled cell plan: the container's groups' rules, minus the cell's deny networks, which
the render puts before them.  Both are sets of packets in `core/packetspace` boxes, brought to
one canonical form, so "the same" means the same packets, however either side wrote them.

Only what leaves by the underlay is compared, and so packets to the cell's own containers are
left out on both sides: they leave through the container's host interface, and the c2c policy
chains (`vpa--*`, `overlay--*`) decide them, never an ASG.

Pure: a plan, a policy and CF's sides in, a `ParityReport` out.  Everything shown of the
kernel's text passes `escape.visible` (a chain or comment is anyone's text).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from reconciler.core.cellplan import CellPlan, ContainerPlan, PlanRule, Provenance, content_id
from reconciler.core.compile import container_sources, enforcement_for
from reconciler.core.model import AddressRange, PolicySet, RuleItem
from reconciler.core.packetspace import (
    ANY_BYTE,
    ANY_PORT,
    ANY_PROTOCOL,
    Box,
    canonical,
    intersect,
    item_space,
    subtract,
)
from reconciler.escape import visible

RESULTS = ("same", "different", "unknown", "no-cf-chain")
"""A container's result: the same packets; different packets; CF's chains hold a rule the
reader cannot judge for it; CF has no netout chain for its address."""


@dataclass(frozen=True, slots=True)
class CfGrant:
    """Packets one of CF's rules accepts for a container (what no earlier rule decided).

    `rule` is shown with `str()` (the reader's rule object: formatted only when a
    difference is reported, not for each of a cell's 150,000 grants)."""

    rule: object
    box: Box


@dataclass(frozen=True, slots=True)
class CfUnread:
    """A rule of CF's reached by a container's undecided packets, which could not be judged."""

    rule: str
    reason: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class CfSide:
    """What CF's chains allow one source address: the rules' grants, what is undetermined,
    and notes (a connection-rate limit, a second underlay that allows other packets)."""

    address: str
    interfaces: tuple[str, ...]
    grants: tuple[CfGrant, ...]
    unread: tuple[CfUnread, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Piece:
    """A set of packets only one side allows, and the rules that allow it on that side."""

    box: Box
    by: tuple[str, ...]

    def to_dict(self, width: int | None = None) -> dict[str, Any]:
        return box_dict(self.box) | {"by": [_cut(x, width) for x in self.by]}


@dataclass(frozen=True)
class ContainerParity:
    """One container's comparison."""

    handle: str
    ip: str
    workload: str
    app_id: str
    app: str
    space_id: str
    space: str
    result: str
    cf_only: tuple[Piece, ...] = ()
    asgctl_only: tuple[Piece, ...] = ()
    cf_only_total: int = 0
    asgctl_only_total: int = 0
    unread: tuple[CfUnread, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self, limit: int | None = None, width: int | None = None) -> dict[str, Any]:
        n = limit
        return {
            "handle": visible(self.handle),
            "ip": self.ip,
            "workload": visible(self.workload),
            "app_id": visible(self.app_id),
            "app": visible(self.app),
            "space_id": visible(self.space_id),
            "space": visible(self.space),
            "result": self.result,
            "only_cf_allows": [p.to_dict(width) for p in self.cf_only[:n]],
            "only_cf_allows_total": self.cf_only_total,
            "only_asgctl_allows": [p.to_dict(width) for p in self.asgctl_only[:n]],
            "only_asgctl_allows_total": self.asgctl_only_total,
            "cf_rules_not_understood": [
                {"rule": _cut(u.rule, width), "reason": _cut(u.reason, width)}
                for u in self.unread[:n]
            ],
            "notes": [_cut(x, width) for x in self.notes[:n]],
        }


@dataclass(frozen=True)
class ParityReport:
    """Every container of the cell, and CF's chains that no container of the store owns."""

    containers: tuple[ContainerParity, ...]
    orphans: tuple[str, ...] = ()

    def count(self, result: str) -> int:
        return sum(1 for c in self.containers if c.result == result)

    @property
    def same(self) -> bool:
        """Parity proven: every container the same, and no CF chain left unexplained."""
        return not self.orphans and all(c.result == "same" for c in self.containers)

    @property
    def exit_code(self) -> int:
        return 0 if self.same else 3

    def counts(self) -> dict[str, int]:
        out = {r: self.count(r) for r in RESULTS}
        out["containers"] = len(self.containers)
        out["cf_chains_without_container"] = len(self.orphans)
        return out

    def to_dict(
        self, limit: int | None = None, containers: int | None = None, width: int | None = None
    ) -> dict[str, Any]:
        """The report as JSON data; `limit` caps the pieces per container, `containers` the
        containers listed (the differing first) and `width` the characters of a rule's text
        (the kernel's comments are anyone's), so a status document stays bounded; the
        totals always count everything."""
        listed = sorted(self.containers, key=lambda c: (c.result == "same", c.handle))
        return {
            "parity": "same" if self.same else "different",
            "counts": self.counts(),
            "containers": [c.to_dict(limit, width) for c in listed[:containers]],
            "cf_chains_without_container": [visible(x) for x in self.orphans[:containers]],
        }

    def text(self, limit: int = 50) -> str:
        """For a terminal: a summary line, then each container that differs, then the rest."""
        c = self.counts()
        head = (
            f"{c['containers']} containers: {c['same']} same, {c['different']} different, "
            f"{c['unknown']} not judged, {c['no-cf-chain']} without a CF chain; "
            f"{c['cf_chains_without_container']} CF chains without a container"
        )
        lines = [("PARITY " if self.same else "NO PARITY ") + head]
        for o in self.orphans:
            lines.append(f"ORPHAN CF chain with no container in the store: {o}")
        order = sorted(self.containers, key=lambda x: (x.result == "same", x.handle))
        for cp in order:
            lines.extend(_container_text(cp, limit))
        return "\n".join(visible(x) for x in lines) + "\n"


def _cut(text: str, width: int | None) -> str:
    """`text` shown safely (`escape.visible`), cut to `width` characters when given."""
    shown = visible(text)
    if width is None or len(shown) <= width:
        return shown
    return shown[: max(0, width - 3)] + "..."


def _container_text(c: ContainerParity, limit: int) -> list[str]:
    who = f"{c.handle} (app {c.app or c.app_id or '-'}, space {c.space or c.space_id or '-'}"
    who += f", {c.workload}, {c.ip})"
    label = {"same": "SAME", "different": "DIFFERENT", "unknown": "NOT JUDGED"}
    lines = [f"{label.get(c.result, 'NO CF CHAIN')} {who}"]
    if c.result == "no-cf-chain":
        lines.append("  CF's FORWARD has no jump to a netout chain for this address")
    for title, pieces, total in (
        ("only CF allows", c.cf_only, c.cf_only_total),
        ("only asgctl allows", c.asgctl_only, c.asgctl_only_total),
    ):
        for p in pieces[:limit]:
            lines.append(f"  {title}: {describe_box(p.box)}")
            lines.extend(
                f"    {'by CF rule' if title == 'only CF allows' else 'by'} {b}" for b in p.by
            )
        if total > min(limit, len(pieces)):
            lines.append(f"  ... {total - min(limit, len(pieces))} more that {title[5:]}")
    for u in c.unread[:limit]:
        lines.append(f"  CF rule not understood ({u.reason}): {u.rule}")
        lines.append(f"    it decides {', '.join(describe_box(b) for b in u.boxes[:3])} ...")
    lines.extend(f"  note: {n}" for n in c.notes[:limit])
    return lines


# -- the comparison -------------------------------------------------------------------------


class _Sets:
    """Canonical forms, computed once per distinct set of boxes: the containers of a space
    hold the same rules on both sides, and the sweep is the comparison's main cost."""

    def __init__(self, local: Mapping[int, Sequence[int]]) -> None:
        self.local = local
        self.memo: dict[frozenset[Box], tuple[Box, ...]] = {}

    def of(self, boxes: frozenset[Box], family: int) -> tuple[Box, ...]:
        found = self.memo.get(boxes)
        if found is None:
            found = _beyond_the_cell(canonical(boxes), self.local.get(family, ()))
            self.memo[boxes] = found
        return found


def same_set_key(boxes: Iterable[Box]) -> tuple[Box, ...]:
    """Equal for equal sets of packets: the canonical form (for callers outside a compare)."""
    return canonical(boxes)


def compare(
    policy: PolicySet, plan: CellPlan, cf: Mapping[str, CfSide], *, keep: int = 100
) -> ParityReport:
    """Compare each container of `plan` with CF's side for its address.

    `cf` maps an address (as the store writes it, normalised) to CF's side; addresses CF has
    and the plan has not are the orphans.  `keep` bounds the pieces kept per side and
    container (each traced to its rules); the totals count them all.
    """
    groups = plan.group_by_id
    local: dict[int, list[int]] = {}
    for cp in plan.containers:
        local.setdefault(cp.container.version, []).append(
            int(ipaddress.ip_address(cp.container.ip))
        )
    for addrs in local.values():
        addrs.sort()
    sets = _Sets(local)
    ours: dict[tuple[tuple[str, ...], str, int, bool], list[tuple[PlanRule, Box]]] = {}
    out = []
    for cp in plan.containers:
        c = cp.container
        key = (cp.groups, c.workload, c.version, cp.audit)
        if key not in ours:
            ours[key] = asgctl_space(plan, cp, groups, policy)
        out.append(_one(policy, cp, cf.get(c.ip), ours[key], sets, keep))
    known = {cp.container.ip for cp in plan.containers}
    orphans = tuple(sorted(a for a in cf if a not in known))
    return ParityReport(tuple(out), orphans)


def _one(
    policy: PolicySet,
    cp: ContainerPlan,
    side: CfSide | None,
    ours: list[tuple[PlanRule, Box]],
    sets: _Sets,
    keep: int,
) -> ContainerParity:
    c = cp.container
    d = policy.directory
    base = ContainerParity(
        handle=c.handle,
        ip=c.ip,
        workload=c.workload,
        app_id=c.app_id,
        app=d.app_path(c.app_id) if c.app_id else "",
        space_id=c.space_id,
        space=d.space_path(c.space_id) if c.space_id else "",
        result="no-cf-chain",
    )
    if side is None:
        return base
    if side.unread:
        return replace(base, result="unknown", unread=side.unread, notes=side.notes)
    raw_mine = frozenset(box for _, box in ours)
    raw_theirs = frozenset(g.box for g in side.grants)
    if raw_mine == raw_theirs:  # the same boxes: the same packets, without a sweep
        return replace(base, result="same", notes=side.notes)
    mine = sets.of(raw_mine, c.version)
    theirs = sets.of(raw_theirs, c.version)
    if mine == theirs:
        return replace(base, result="same", notes=side.notes)
    cf_only = canonical(p for b in theirs for p in subtract(b, mine))
    our_only = canonical(p for b in mine for p in subtract(b, theirs))
    granted = {s.provenance for s in container_sources(policy, c)}
    return replace(
        base,
        result="different",
        cf_only=tuple(Piece(b, _cf_rules(side, b)) for b in cf_only[:keep]),
        asgctl_only=tuple(Piece(b, _our_rules(ours, b, granted)) for b in our_only[:keep]),
        cf_only_total=len(cf_only),
        asgctl_only_total=len(our_only),
        notes=side.notes,
    )


def asgctl_space(
    plan: CellPlan,
    cp: ContainerPlan,
    groups: Mapping[str, Any] | None = None,
    policy: PolicySet | None = None,
) -> list[tuple[PlanRule, Box]]:
    """What the plan allows a container, rule by rule: its groups' rules, minus the cell's
    deny networks for its workload (rendered before every group); for a container in audit
    mode, every packet but the deny networks' (its chain accepts what no rule allows), under
    the Enforcement document that audits it."""
    groups = plan.group_by_id if groups is None else groups
    family = cp.container.version
    deny = []
    for net in plan.settings.deny(cp.container.workload, family):
        r = AddressRange.parse(net)
        deny.append(Box(family, ANY_PROTOCOL, (r.first, r.last)))
    out: list[tuple[PlanRule, Box]] = []
    rules = [rule for gid in cp.groups for rule in groups[gid].rules]
    if cp.audit:
        rules.append(_audit_rule(cp, family, policy))
    for rule in rules:
        for box in item_space(rule.item):
            out.extend((rule, piece) for piece in (subtract(box, deny) if deny else [box]))
    return out


def _audit_rule(cp: ContainerPlan, family: int, policy: PolicySet | None) -> PlanRule:
    """The audited chain's last word as a rule: every packet of the family, from the
    Enforcement document that decides the container's mode."""
    c = cp.container
    decided = enforcement_for(policy, c.space_id, c.app_id) if policy is not None else None
    name = decided.name if decided is not None else "(audit)"
    where = decided.location.short if decided is not None and decided.location else ""
    item = RuleItem("all", AddressRange.whole(family))
    return PlanRule(
        content_id("audit " + item.key()), item, (Provenance("Enforcement", name, None, where),)
    )


def _beyond_the_cell(space: Sequence[Box], local: Sequence[int]) -> tuple[Box, ...]:
    """`space` without the cell's own container addresses, canonical again.  Cut after the
    union is canonical (fewer boxes), each box only by the addresses inside it (bisection)."""
    out: list[Box] = []
    for box in space:
        lo = bisect.bisect_left(local, box.addresses[0])
        hi = bisect.bisect_right(local, box.addresses[1])
        if lo == hi:
            out.append(box)
        else:
            cut = [Box(box.family, ANY_PROTOCOL, (a, a)) for a in local[lo:hi]]
            out.extend(subtract(box, cut))
    return canonical(out)


def _meets(a: Box, b: Box) -> bool:
    return intersect(a, b) is not None


def _cf_rules(side: CfSide, piece: Box, most: int = 3) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for g in side.grants:
        if _meets(piece, g.box):
            found.setdefault(str(g.rule), None)
            if len(found) >= most:
                break
    return tuple(found)


def _our_rules(
    ours: Sequence[tuple[PlanRule, Box]], piece: Box, granted: set[Any], most: int = 3
) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for rule, box in ours:
        if not _meets(piece, box):
            continue
        sources = [s for s in rule.sources if s in granted] or list(rule.sources)
        for s in sources:
            found.setdefault(f"rule {rule.id[:12]} from {s}", None)
        if len(found) >= most:
            break
    return tuple(found)[: 3 * most]


# -- showing packets ------------------------------------------------------------------------

_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


def _span(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _addresses(box: Box) -> str:
    make = ipaddress.IPv4Address if box.family == 4 else ipaddress.IPv6Address
    first, last = make(box.addresses[0]), make(box.addresses[1])
    nets = list(ipaddress.summarize_address_range(first, last))
    if len(nets) == 1:
        return str(nets[0])
    return f"{first}-{last}"


def box_dict(box: Box) -> dict[str, Any]:
    """A box as JSON: protocol, destination, ports, ICMP type and code, and the text."""
    out: dict[str, Any] = {"family": box.family, "destination": _addresses(box)}
    p = box.protocols
    out["protocol"] = (
        "all" if p == ANY_PROTOCOL else _NAMES.get(p[0], _span(p)) if p[0] == p[1] else _span(p)
    )
    if box.ports != ANY_PORT:
        out["ports"] = _span(box.ports)
    if box.types != ANY_BYTE:
        out["icmp_type"] = _span(box.types)
    if box.codes != ANY_BYTE:
        out["icmp_code"] = _span(box.codes)
    out["text"] = describe_box(box)
    return out


def describe_box(box: Box) -> str:
    """`tcp 10.0.0.0/24 ports 443`, `icmp 10.0.0.1 type 8 code 0`, `all 0.0.0.0/0`."""
    p = box.protocols
    if p == ANY_PROTOCOL:
        proto = "all"
    elif p[0] == p[1]:
        proto = _NAMES.get(p[0], f"protocol {p[0]}")
    else:
        proto = f"protocols {p[0]}-{p[1]}"
    text = f"{proto} {_addresses(box)}"
    if box.ports != ANY_PORT:
        text += f" port{'s' if box.ports[0] != box.ports[1] else ''} {_span(box.ports)}"
    if box.types != ANY_BYTE:
        text += f" type {_span(box.types)}"
    if box.codes != ANY_BYTE:
        text += f" code {_span(box.codes)}"
    return text
