"""Which packets a rule allows: one answer, for validation, explain, the diff and the nft render.

A rule item (one protocol, one destination range, its ports or ICMP type and code) allows a
set of packets.  That set is written here once, as a few *boxes*: products of integer ranges
over the axes a packet is judged on (see `Box`).  Everything that asks about packets asks
these boxes: explain (does this rule take that packet: `contains`), validation's redundant
rule warning (does one rule allow all another does: `covers`), the CI plan's access diff
(what one revision allows that the other does not: `subtract`), and the nft render (the set
elements it installs: `item_space`, and `disjoint_boxes` for sets that must not overlap).

The Cloud Foundry meanings are decided here, and only here:

* protocol `all` is every protocol, every port, every ICMP type and code;
* tcp or udp without ports is every port (0-65535), as `-p tcp` without `--dport` is;
  validated policy always has ports (Destinations default to 1-65535);
* ICMP type -1 is any type and then any code, whatever the code says (the iptables render
  writes no `--icmp-type` for it); code -1 is any code of the given type;
* ICMP is `icmp` (protocol 1) in IPv4 and `icmpv6` (protocol 58) in IPv6.  The other
  flavour towards a family (refused by validation) is matched by protocol number alone,
  any type, as a bare `-p icmp` would;
* a packet detail that is not known (`None`: a port for a tcp endpoint that gave none) is
  held only by a box that takes every value of it.

Pure and allocation-light: boxes are tuples, so the render of a million-rule cell and the
fleet-wide CI plan pay little for asking here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # model imports this module: the types are only named here
    from reconciler.core.endpoint import Endpoint
    from reconciler.core.model import Rule, RuleItem

Range = tuple[int, int]

PROTOCOL_NUMBERS: dict[str, int] = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
ANY_PROTOCOL: Range = (0, 255)
ANY_PORT: Range = (0, 65535)
ANY_BYTE: Range = (0, 255)  # an ICMP type or code

AXES: tuple[str, ...] = ("protocols", "addresses", "ports", "types", "codes")


class Box(NamedTuple):
    """A product of ranges: every packet of `family` whose fields all lie in them.

    `ports` are destination ports (tcp and udp); `types` and `codes` are ICMP's.  An axis
    that means nothing to a box's protocols is full (`ANY_PORT`, `ANY_BYTE`), so a box of
    protocol `all` is full on every axis but the addresses.
    """

    family: int
    protocols: Range
    addresses: Range
    ports: Range = ANY_PORT
    types: Range = ANY_BYTE
    codes: Range = ANY_BYTE


def icmp_protocol(family: int) -> str:
    """The ICMP of an IP family: `icmp` for 4, `icmpv6` for 6."""
    return "icmp" if family == 4 else "icmpv6"


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with overlapping and adjacent ranges joined: one canonical form per union."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def item_space(item: RuleItem) -> tuple[Box, ...]:
    """The packets one rule item allows, as disjoint boxes (one per merged port range).

    Whether new connections are logged (`item.log`) changes no packet's fate, so it is not
    part of the space.
    """
    d = item.destination
    return _boxes(item, d.version, (d.first, d.last))


def rule_space(rule: Rule) -> tuple[Box, ...]:
    """The packets a rule allows: its items' spaces, without building the items."""
    return tuple(
        box for d in rule.destinations for box in _boxes(rule, d.version, (d.first, d.last))
    )


def _boxes(rule: Rule | RuleItem, family: int, addresses: Range) -> tuple[Box, ...]:
    """The boxes of a rule's match towards one destination range of one family."""
    protocol = rule.protocol
    if protocol == "all":
        return (_box((family, ANY_PROTOCOL, addresses, ANY_PORT, ANY_BYTE, ANY_BYTE)),)
    number = PROTOCOL_NUMBERS[protocol]
    protocols = (number, number)
    if protocol in ("tcp", "udp"):
        ports = rule.ports
        if len(ports) == 1:
            only = (ports[0].first, ports[0].last)
            return (_box((family, protocols, addresses, only, ANY_BYTE, ANY_BYTE)),)
        merged = merge_ranges((p.first, p.last) for p in ports) or [ANY_PORT]
        return tuple(_box((family, protocols, addresses, r, ANY_BYTE, ANY_BYTE)) for r in merged)
    typ = -1 if rule.icmp_type is None else rule.icmp_type
    # Any type (and so any code); or the other family's ICMP, matched by protocol number.
    if typ < 0 or protocol != icmp_protocol(family):
        return (_box((family, protocols, addresses, ANY_PORT, ANY_BYTE, ANY_BYTE)),)
    code = -1 if rule.icmp_code is None else rule.icmp_code
    codes = ANY_BYTE if code < 0 else (code, code)
    return (_box((family, protocols, addresses, ANY_PORT, (typ, typ), codes)),)


def _box(fields: tuple[int, Range, Range, Range, Range, Range]) -> Box:
    """A Box from its fields, without NamedTuple's keyword handling: the render builds one
    per rule of a cell."""
    return tuple.__new__(Box, fields)


def _holds(r: Range, value: int | None, full: Range) -> bool:
    if value is None:
        return r == full
    return r[0] <= value <= r[1]


def contains(space: Iterable[Box], packet: Endpoint) -> bool:
    """Is the first packet of a connection to `packet` in `space`?"""
    number = PROTOCOL_NUMBERS.get(packet.protocol)
    for box in space:
        if box.family != packet.version:
            continue
        if not box.addresses[0] <= packet.address <= box.addresses[1]:
            continue
        if not _holds(box.protocols, number, ANY_PROTOCOL):
            continue
        if (
            _holds(box.ports, packet.port, ANY_PORT)
            and _holds(box.types, packet.icmp_type, ANY_BYTE)
            and _holds(box.codes, packet.icmp_code, ANY_BYTE)
        ):
            return True
    return False


def _box_covers(a: Box, b: Box) -> bool:
    """Does `a` hold every packet of `b`?  (Unrolled: validation asks it of many pairs.)"""
    return (
        a.family == b.family
        and a.addresses[0] <= b.addresses[0]
        and b.addresses[1] <= a.addresses[1]
        and a.protocols[0] <= b.protocols[0]
        and b.protocols[1] <= a.protocols[1]
        and a.ports[0] <= b.ports[0]
        and b.ports[1] <= a.ports[1]
        and a.types[0] <= b.types[0]
        and b.types[1] <= a.types[1]
        and a.codes[0] <= b.codes[0]
        and b.codes[1] <= a.codes[1]
    )


def _meet(a: Box, b: Box) -> bool:
    """Do two boxes share a packet?"""
    return (
        a.family == b.family
        and a.addresses[0] <= b.addresses[1]
        and b.addresses[0] <= a.addresses[1]
        and a.protocols[0] <= b.protocols[1]
        and b.protocols[0] <= a.protocols[1]
        and a.ports[0] <= b.ports[1]
        and b.ports[0] <= a.ports[1]
        and a.types[0] <= b.types[1]
        and b.types[0] <= a.types[1]
        and a.codes[0] <= b.codes[1]
        and b.codes[0] <= a.codes[1]
    )


def intersect(a: Box, b: Box) -> Box | None:
    """The packets two boxes share, as one box, or None when they share none.

    What a rule reached under a jump's condition matches: the jump's box and the rule's
    (`backends/iptables/cfparse` walks CF's chains this way)."""
    if not _meet(a, b):
        return None
    return Box(
        a.family,
        (max(a.protocols[0], b.protocols[0]), min(a.protocols[1], b.protocols[1])),
        (max(a.addresses[0], b.addresses[0]), min(a.addresses[1], b.addresses[1])),
        (max(a.ports[0], b.ports[0]), min(a.ports[1], b.ports[1])),
        (max(a.types[0], b.types[0]), min(a.types[1], b.types[1])),
        (max(a.codes[0], b.codes[0]), min(a.codes[1], b.codes[1])),
    )


def canonical(space: Iterable[Box]) -> tuple[Box, ...]:
    """One form per set of packets: equal unions give equal tuples, whatever boxes made
    them (the sweep of `disjoint_boxes`, over the family first).  Two allow sets are the
    same set exactly when their canonical forms are equal."""
    cover = disjoint_boxes(((b.family, b.family), *_ranges(b)) for b in space)
    return tuple(sorted(Box(fam[0], *rest) for fam, *rest in cover))


def covers(space: Sequence[Box], other: Iterable[Box]) -> bool:
    """Is every packet of `other` also in `space` (possibly held by several of its boxes)?"""
    for box in other:
        if any(_box_covers(a, box) for a in space):
            continue
        touching = [a for a in space if _meet(a, box)]
        # None of them holds it whole: one alone cannot cover it, several together may.
        if len(touching) < 2 or subtract(box, touching):
            return False
    return True


def subtract(box: Box, others: Iterable[Box], along: Sequence[str] = AXES) -> list[Box]:
    """`box` minus every packet of `others`, as disjoint boxes.

    `along` names the axes it may cut: another box holding only part of a piece on any other
    axis leaves that piece whole.  The access diff cuts along addresses and ports only, so
    each piece it reports keeps its rule's own protocol and ICMP type (a reviewer reads
    "lost icmp 10.0.0.0/24", not a list of the 255 types that remain); with every axis the
    answer is exact.
    """
    cut = [AXES.index(a) for a in along]
    kept = [i for i in range(len(AXES)) if i not in cut]
    pieces = [box]
    for other in others:
        if other.family != box.family:
            continue
        lo, hi = other.addresses
        nxt: list[Box] = []
        for piece in pieces:
            if piece.addresses[1] < lo or hi < piece.addresses[0]:
                nxt.append(piece)  # no address in common: the usual case, decided at once
            else:
                nxt.extend(_minus(piece, other, cut, kept))
        pieces = nxt
        if not pieces:
            break
    return pieces


def _ranges(box: Box) -> list[Range]:
    return [box.protocols, box.addresses, box.ports, box.types, box.codes]


def _minus(piece: Box, other: Box, cut: list[int], kept: list[int]) -> list[Box]:
    """`piece` minus `other` (same family), cutting only along the axes `cut` (indices into
    AXES)."""
    mine, theirs = _ranges(piece), _ranges(other)
    for i in kept:  # `other` must hold all of the piece on every axis not cut
        if not (theirs[i][0] <= mine[i][0] and mine[i][1] <= theirs[i][1]):
            return [piece]
    common: list[Range] = []
    for i in cut:
        lo, hi = max(mine[i][0], theirs[i][0]), min(mine[i][1], theirs[i][1])
        if lo > hi:
            return [piece]  # disjoint
        common.append((lo, hi))
    out: list[Box] = []
    for i, (lo, hi) in zip(cut, common, strict=True):
        first, last = mine[i]
        if first < lo:
            mine[i] = (first, lo - 1)
            out.append(Box(piece.family, *mine))
        if hi < last:
            mine[i] = (hi + 1, last)
            out.append(Box(piece.family, *mine))
        mine[i] = (lo, hi)
    return out


def disjoint_boxes(boxes: Iterable[tuple[Range, ...]]) -> list[tuple[Range, ...]]:
    """A canonical cover of the union of `boxes` by boxes that do not overlap.

    Boxes here are bare tuples of ranges, of any one dimension (the nft render projects
    `Box`es onto its set keys).  nft refuses overlapping elements in an interval set (the
    kernel's pipapo backend refuses an element whose start or end lies inside another),
    while two ASG rules may well overlap.  Membership is all a set answers, so the union is
    what counts: sweep the first axis, cover each stretch of it by the canonical cover of the
    remaining axes of the boxes active there, and join neighbouring stretches whose covers
    are equal.
    """
    unique = set(boxes)
    if not unique:
        return []
    if len(unique) == 1:
        return list(unique)
    if len(next(iter(unique))) == 1:
        return [(r,) for r in merge_ranges(b[0] for b in unique)]
    events: dict[int, list[tuple[int, tuple[Range, ...]]]] = {}
    for box in unique:
        (lo, hi), rest = box[0], box[1:]
        events.setdefault(lo, []).append((1, rest))
        events.setdefault(hi + 1, []).append((-1, rest))
    active: Counter[tuple[Range, ...]] = Counter()
    memo: dict[frozenset[tuple[Range, ...]], tuple[tuple[Range, ...], ...]] = {}
    stretches: list[tuple[int, int, tuple[tuple[Range, ...], ...]]] = []
    points = sorted(events)
    for i, point in enumerate(points):
        for delta, rest in events[point]:
            active[rest] += delta
            if not active[rest]:
                del active[rest]
        if not active or i + 1 == len(points):
            continue
        end = points[i + 1] - 1
        key = frozenset(active)
        cover = memo.get(key)
        if cover is None:
            cover = memo[key] = tuple(disjoint_boxes(key)) if len(key) > 1 else tuple(key)
        if stretches and stretches[-1][1] + 1 == point and stretches[-1][2] == cover:
            stretches[-1] = (stretches[-1][0], end, cover)
        else:
            stretches.append((point, end, cover))
    return [((lo, hi), *rest) for lo, hi, cover in stretches for rest in cover]
