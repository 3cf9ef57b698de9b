"""Read Cloud Foundry's own egress chains from `iptables-save -t filter` output, and work out
what each container may open: its allow set, walked as the kernel walks the rules.

This is the CF side of `asgctl cf compare` and of the agent's shadow mode.  It follows CF's
rule text as silk and the vxlan-policy-agent write it (cloudfoundry/silk-release, lib/rules/
rules.go: NewNetOutJumpConditions, NewNetOutWithPortsRule, NewNetOutICMPRule, NewNetOutRule,
the `-g` log variants, NewInputRejectRule, NewNetOutInvalidRule,
NewNetOutRelatedEstablishedRule, NewNetOutConnRateLimitRule, NewNetOutDefaultRejectRule;
cni-wrapper-plugin/netrules/netout_chain.go IPTablesRules; vxlan-policy-agent/enforcer/
enforcer.go NewASGChain), as `iptables-save` prints it back: `-p tcp -m iprange --dst-range
a-b -m tcp --dport x:y`, `-d cidr`, `-m multiport --dports`, `-m icmp --icmp-type t[/c]`,
`-m state`/`-m conntrack`, `-j ACCEPT|REJECT|DROP|RETURN|LOG`, `-j`/`-g` to a chain.

The walk is iptables' own, for the first packet of a connection (state NEW) sent by one
container out of one underlay interface, starting at the top of FORWARD: rules in order, the
first that decides wins, a `-j` returns, a `-g` returns to the caller's caller.  Per
container, a rule's source address (`-s`), out interface (`-o`) and mark are either true or
false; its destination, protocol, ports and ICMP type and code are a set of packets, written
as the boxes of `core/packetspace` (the one packet algebra).  So:

* an ACCEPT allows what it matches minus what earlier rules already decided (REJECT before
  ACCEPT of overlapping packets: only the remainder is allowed);
* rules that never see a NEW packet (RELATED,ESTABLISHED accept, INVALID drop) and targets
  that decide nothing (LOG, NFLOG) are passed over;
* silk's connection-rate limit (`-m hashlimit --hashlimit-above`) only takes packets over the
  rate: noted, not counted as a deny;
* any rule this module does not understand, reached by packets not yet decided, makes those
  packets *undetermined*: reported with the rule, never silently counted as allow or deny.

Pure: text in, sets out.  Reading the kernel is `read_filter_table` (an edge, through the
one Runner).
"""

from __future__ import annotations

import gc
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel.runner import Runner
from reconciler.core.packetspace import (
    ANY_BYTE,
    ANY_PORT,
    ANY_PROTOCOL,
    Box,
    Range,
    intersect,
    subtract,
)
from reconciler.core.parity import CfGrant, CfSide, CfUnread, same_set_key

NETOUT_PREFIX = "netout--"
"""silk's per-container egress chain (cni-wrapper-plugin/netrules: prefixNetOut)."""
BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
MAX_DEPTH = 32
"""Deeper jumps than this are refused (iptables itself refuses loops)."""

_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "all": -1}
_NON_DECIDING = frozenset({"LOG", "NFLOG", "ULOG"})
_VERDICTS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN"})
_CHAIN_DECL = re.compile(r"^:(\S+) (\S+) \[\d+:\d+\]$")


class CfParseError(ValueError):
    """The save output is not an `iptables-save` filter table: nothing can be judged."""


_SPACES = {
    4: Box(4, ANY_PROTOCOL, (0, (1 << 32) - 1)),
    6: Box(6, ANY_PROTOCOL, (0, (1 << 128) - 1)),
}


def family_space(family: int) -> Box:
    """Every packet of a family: the walk starts from it."""
    return _SPACES[family]


class CfRule(NamedTuple):
    """One rule of CF's table, where it stands: `-A <chain> <text>`, the `number`-th (from 1).
    (A named tuple: a cell's save holds 150,000 of them.)"""

    chain: str
    number: int
    text: str

    def __str__(self) -> str:
        return f"{self.chain} rule {self.number}: -A {self.chain} {self.text}"


@dataclass(frozen=True)
class FilterTable:
    """One family's filter table as saved: builtin policies and every chain's rules."""

    family: int
    policies: Mapping[str, str]
    chains: Mapping[str, tuple[CfRule, ...]]


def parse_save(text: str, family: int) -> FilterTable:
    """The `*filter` table of `iptables-save` output; other tables are skipped.

    Only the frame is checked here (chain declarations, `-A` lines, COMMIT); what a rule
    means is decided when a walk reaches it, so a rule nobody's packets meet costs nothing.
    """
    policies: dict[str, str] = {}
    chains: dict[str, list[CfRule]] = {}
    in_filter = seen_filter = False
    for number, line in enumerate(text.splitlines(), 1):
        if in_filter and line.startswith("-A "):  # most lines: checked first
            chain, _, rest = line[3:].partition(" ")
            rules = chains.get(chain)
            if rules is None:
                raise CfParseError(f"line {number}: rule in undeclared chain {chain!r}")
            rules.append(CfRule(chain, len(rules) + 1, rest))
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            in_filter = line == "*filter"
            seen_filter = seen_filter or in_filter
            continue
        if not in_filter:
            continue
        if line == "COMMIT":
            in_filter = False
            continue
        if line.startswith(":"):
            m = _CHAIN_DECL.match(line)
            if m is None:
                raise CfParseError(f"line {number}: not a chain declaration: {line[:80]!r}")
            chains.setdefault(m.group(1), [])
            if m.group(2) != "-":
                policies[m.group(1)] = m.group(2)
            continue
        raise CfParseError(f"line {number}: not an iptables-save line: {line[:80]!r}")
    if not seen_filter:
        raise CfParseError("no *filter table in the saved rules")
    return FilterTable(family, policies, {k: tuple(v) for k, v in chains.items()})


# -- what one rule says ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cidr:
    """An address condition (`-s`, `-d`, `--src-range`): a range, maybe negated."""

    first: int
    last: int
    negated: bool = False

    def holds(self, address: int) -> bool:
        return (self.first <= address <= self.last) != self.negated


@dataclass(frozen=True)
class Analysis:
    """What a rule means to a NEW packet, or why that cannot be told (`unknown`).

    `boxes` are the destination-side packets it matches (already the family's space when the
    rule says nothing of them); `sources`, `out`, `mark` are the per-container conditions.
    """

    target: str = ""
    goto: bool = False
    boxes: tuple[Box, ...] = ()
    sources: tuple[Cidr, ...] = ()
    out: tuple[tuple[str, bool], ...] = ()
    mark: tuple[int, int, bool] | None = None
    set_mark: tuple[int, int] | None = None
    never_new: bool = False
    rate_limited: bool = False
    passive: bool = False
    unknown: str = ""
    plain: bool = field(init=False, default=False)
    """An ACCEPT of its boxes and nothing else to judge: most of a cell's rules."""

    def __post_init__(self) -> None:
        plain = self.target == "ACCEPT" and not (
            self.sources
            or self.out
            or self.mark
            or self.never_new
            or self.rate_limited
            or self.passive
            or self.unknown
        )
        object.__setattr__(self, "plain", plain)


def _split(text: str) -> list[str]:
    """iptables-save quotes only comments and log prefixes: most lines split on spaces."""
    if '"' not in text and "\\" not in text and "'" not in text:
        return text.split()
    return shlex.split(text)


def _v4(text: str) -> int | None:
    """A dotted quad as an int, without ipaddress's objects (150,000 rules are read); None
    when it is not one, and ipaddress decides."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not part.isdigit() or len(part) > 3 or int(part) > 255:
            return None
        value = value << 8 | int(part)
    return value


def _addr(text: str, family: int) -> tuple[int, int]:
    if family == 4:
        host, _, bits = text.partition("/")
        value = _v4(host)
        if value is not None and (not bits or (bits.isdigit() and int(bits) <= 32)):
            size = 1 << (32 - int(bits or 32))
            first = value & ~(size - 1)
            return first, first + size - 1
    net = ipaddress.ip_network(text, strict=False)
    if net.version != family:
        raise ValueError(f"{text} is not IPv{family}")
    return int(net.network_address), int(net.broadcast_address)


def _range(text: str, family: int) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if family == 4 and sep:
        a4, b4 = _v4(lo), _v4(hi)
        if a4 is not None and b4 is not None and a4 <= b4:
            return a4, b4
    a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi if sep else lo)
    if a.version != family or b.version != family or int(a) > int(b):
        raise ValueError(f"{text} is not an IPv{family} range")
    return int(a), int(b)


def _ports(text: str) -> list[Range]:
    out = []
    for part in text.split(","):
        lo, sep, hi = part.partition(":")
        first, last = int(lo or 0), int(hi or 65535) if sep else int(lo)
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"port range {part}")
        out.append((first, last))
    return out


def _complement(ranges: Sequence[Range], full: Range) -> list[Range]:
    out, at = [], full[0]
    for lo, hi in sorted(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    if at <= full[1]:
        out.append((at, full[1]))
    return out


def _icmp(text: str) -> tuple[Range, Range]:
    """`8`, `8/0`, `any`: types and codes as the kernel's icmp match holds them (a bare type
    is every code; `8/255` is code 255 only, as silk writes ICMP code -1)."""
    if text == "any":
        return ANY_BYTE, ANY_BYTE
    typ, sep, code = text.partition("/")
    t = int(typ)
    if not 0 <= t <= 255:
        raise ValueError(f"icmp type {text}")
    if not sep:
        return (t, t), ANY_BYTE
    c = int(code)
    if not 0 <= c <= 255:
        raise ValueError(f"icmp code {text}")
    return (t, t), (c, c)


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF


_SILK_ACCEPT = re.compile(
    r"-p (tcp|udp) -m iprange --dst-range ([0-9.]+)-([0-9.]+) -m \1 --dport (\d+)(?::(\d+))? "
    r"-j ACCEPT"
)
"""The rule silk writes most (NewNetOutWithPortsRule) as iptables-save prints it back: read
without splitting (a cell holds 150,000 of them).  Anything else takes the general path."""


def analyse(text: str, family: int) -> Analysis:
    """Read one rule's text (`-A <chain>` removed).  Never raises: what it cannot read comes
    back as `unknown`, with the reason."""
    m = _SILK_ACCEPT.fullmatch(text) if family == 4 else None
    if m is not None:
        first, last = _v4(m.group(2)), _v4(m.group(3))
        lo = int(m.group(4))
        hi = int(m.group(5)) if m.group(5) else lo
        if first is not None and last is not None and first <= last and lo <= hi <= 65535:
            number = _PROTOCOLS[m.group(1)]
            box = Box(4, (number, number), (first, last), (lo, hi))
            return Analysis(target="ACCEPT", boxes=(box,))
    try:
        tokens = _split(text)
    except ValueError as exc:
        return Analysis(unknown=f"cannot split the rule: {exc}")
    try:
        found = _analyse(tokens, family)
    except (ValueError, IndexError) as exc:
        found = Analysis(unknown=f"cannot read the rule: {exc}")
    if found.unknown:
        # Which containers it concerns can still be told, when its `-s` is readable: a rule
        # for another container's address never reaches this one's packets.
        return Analysis(
            target=found.target, sources=_sources_only(tokens, family), unknown=found.unknown
        )
    return found


def _sources_only(tokens: list[str], family: int) -> tuple[Cidr, ...]:
    out = []
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            break
        if tok in ("-s", "--source"):
            try:
                first, last = _addr(tokens[i + 1], family)
            except ValueError:
                return ()
            out.append(Cidr(first, last, i > 0 and tokens[i - 1] == "!"))
    return tuple(out)


def _analyse(tokens: list[str], family: int) -> Analysis:
    target, goto, args = "", False, []
    for i, tok in enumerate(tokens):
        if tok in ("-j", "--jump", "-g", "--goto"):
            target, goto, args = tokens[i + 1], tok in ("-g", "--goto"), tokens[i + 2 :]
            tokens = tokens[:i]
            break
    if not target:
        return Analysis(passive=True)  # no target: counts packets, decides nothing
    if target in _NON_DECIDING:
        return Analysis(target=target, passive=True)
    protocols: list[Range] = [ANY_PROTOCOL]
    addresses: list[Range] = [family_space(family).addresses]
    ports: list[Range] = [ANY_PORT]
    types, codes = [ANY_BYTE], [ANY_BYTE]
    sources: list[Cidr] = []
    out: list[tuple[str, bool]] = []
    mark: tuple[int, int, bool] | None = None
    never_new = rate_limited = False
    negate = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        step = 2
        if tok in ("-p", "--protocol"):
            number = _PROTOCOLS.get(value)
            if number is None:
                number = int(value) if value.isdigit() else -2
            if number == -2:
                return Analysis(target=target, unknown=f"protocol {value!r}")
            chosen = [ANY_PROTOCOL] if number in (-1, 0) else [(number, number)]  # 0: all
            protocols = _complement(chosen, ANY_PROTOCOL) if negate else chosen
        elif tok in ("-d", "--destination", "--dst-range"):
            first, last = (_range if tok == "--dst-range" else _addr)(value, family)
            full = family_space(family).addresses
            addresses = _complement([(first, last)], full) if negate else [(first, last)]
        elif tok in ("-s", "--source", "--src-range"):
            first, last = (_range if tok == "--src-range" else _addr)(value, family)
            sources.append(Cidr(first, last, negate))
        elif tok in ("-o", "--out-interface"):
            out.append((value, negate))
        elif tok in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            chosen = _ports(value)
            ports = _complement(chosen, ANY_PORT) if negate else chosen
        elif tok in ("--icmp-type", "--icmpv6-type"):
            t, c = _icmp(value)
            if negate:
                return Analysis(target=target, unknown="a negated ICMP type")
            types, codes = [t], [c]
        elif tok in ("--state", "--ctstate"):
            if ("NEW" in value.split(",")) == negate:
                never_new = True
        elif tok == "--mark":
            v, m = _mark(value)
            mark = (v, m, negate)
        elif tok == "--hashlimit-above":
            rate_limited = True
        elif tok in _HASHLIMIT_DETAILS or tok == "--comment":
            pass
        elif tok == "-m":
            if value not in _MODULES:
                return Analysis(target=target, unknown=f"match module {value!r}")
        else:
            return Analysis(target=target, unknown=f"option {tok!r}")
        negate = False
        i += step
    if target not in _VERDICTS and target.startswith("-"):
        return Analysis(target=target, unknown=f"target {target!r}")
    boxes = tuple(
        Box(family, p, a, pt, t, c)
        for p in protocols
        for a in addresses
        for pt in (ports if _has_ports(p) else [ANY_PORT])
        for t, c in zip(types, codes, strict=True)
    )
    set_mark = None
    if target == "MARK":
        set_mark = _set_mark(args)
        if set_mark is None:
            return Analysis(target=target, unknown="MARK without --set-mark or --set-xmark")
    return Analysis(
        target=target,
        goto=goto,
        boxes=boxes,
        set_mark=set_mark,
        sources=tuple(sources),
        out=tuple(out),
        mark=mark,
        never_new=never_new,
        rate_limited=rate_limited,
    )


_MODULES = frozenset(
    {"tcp", "udp", "icmp", "icmp6", "iprange", "multiport", "state", "conntrack", "comment"}
    | {"mark", "hashlimit"}
)
_HASHLIMIT_DETAILS = frozenset(
    {
        "--hashlimit-burst",
        "--hashlimit-mode",
        "--hashlimit-name",
        "--hashlimit-htable-expire",
        "--hashlimit-srcmask",
        "--hashlimit-dstmask",
    }
)


def _has_ports(protocols: Range) -> bool:
    return protocols[0] == protocols[1] and protocols[0] in (6, 17)


def _set_mark(args: list[str]) -> tuple[int, int] | None:
    for i, tok in enumerate(args[:-1]):
        if tok in ("--set-xmark", "--set-mark"):
            return _mark(args[i + 1])
    return None


# -- the walk -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotUnderstood:
    """A rule reached by packets still undecided, which this reader cannot judge."""

    rule: CfRule
    reason: str
    boxes: tuple[Box, ...]


@dataclass
class Walk:
    """One container's walk through the table, for one out interface."""

    accepted: list[CfGrant] = field(default_factory=list)
    unknown: list[NotUnderstood] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    decided: list[Box] = field(default_factory=list)
    mark: int | None = 0


class _Walker:
    def __init__(self, table: FilterTable) -> None:
        self.table = table
        self.top = family_space(table.family)
        self.cache: dict[str, Analysis] = {}
        self.index: dict[
            str, tuple[list[tuple[CfRule, Analysis]], list[int], dict[int, list[int]]]
        ] = {}

    def analysis(self, rule: CfRule) -> Analysis:
        """By text: every container of a space holds the same rule texts."""
        found = self.cache.get(rule.text)
        if found is None:
            found = self.cache[rule.text] = analyse(rule.text, self.table.family)
        return found

    def rules(self, name: str, address: int) -> list[tuple[CfRule, Analysis]]:
        """The rules of `name` that can concern `address`, in order: those without a
        single-host source, and those for this host.  FORWARD holds a jump per container
        (several per interface, and the overlay's): each container meets its own only."""
        index = self.index.get(name)
        if index is None:
            general: list[int] = []
            by_host: dict[int, list[int]] = {}
            pairs = [(r, self.analysis(r)) for r in self.table.chains.get(name, ())]
            for i, (_, a) in enumerate(pairs):
                src = a.sources[0] if len(a.sources) == 1 else None
                if src is not None and not src.negated and src.first == src.last:
                    by_host.setdefault(src.first, []).append(i)
                else:
                    general.append(i)
            index = self.index[name] = (pairs, general, by_host)
        pairs, general, by_host = index
        own = by_host.get(address)
        if not own:
            return [pairs[i] for i in general]
        return [pairs[i] for i in sorted(general + own)]

    def walk(self, address: int, out: str | None) -> Walk:
        state = Walk()
        top = [self.top]
        self._chain("FORWARD", top, [], state, address, out, 0)
        if not _all_gone(top, state.decided):
            rest = subtract(self.top, [*state.decided, *(a.box for a in state.accepted)])
            if rest and self.table.policies.get("FORWARD", "ACCEPT") == "ACCEPT":
                rule = CfRule("FORWARD", 0, "(the end of FORWARD: its policy ACCEPT)")
                state.accepted.extend(CfGrant(rule, box) for box in rest)
        return state

    def _chain(
        self,
        name: str,
        reach: list[Box],
        gone: list[Box],
        state: Walk,
        address: int,
        out: str | None,
        depth: int,
    ) -> None:
        """Walk `name` for the packets `reach`.

        `state.decided` holds the packets a REJECT or DROP took (and those set aside as
        undetermined): no later ACCEPT allows them.  Packets already accepted need no such
        list: an allow set is a union, and a later REJECT of them changes nothing.  `gone`
        are packets that left a calling chain by RETURN or `-g`, so they never reach this
        chain's rules; the chain adds its own to the list for the rest of itself."""
        if depth > MAX_DEPTH:
            raise CfParseError(f"jumps nested deeper than {MAX_DEPTH} at chain {name!r}")
        mine = list(gone)
        whole = len(reach) == 1 and reach[0] == self.top
        for rule, a in self.rules(name, address):
            if a.plain and whole and not mine and not state.decided:
                state.accepted.extend(CfGrant(rule, b) for b in a.boxes)  # nothing to cut
                continue
            if a.passive or a.never_new:
                continue
            if not all(c.holds(address) for c in a.sources):
                continue  # another container's rule (also when the rest is unreadable)
            reason = a.unknown
            user_chain = a.target not in _VERDICTS and a.target != "MARK"
            if not reason and user_chain and a.target not in self.table.chains:
                reason = f"target {a.target!r}"
            applies = self._out(a.out, out)
            if not reason and applies is None:
                reason = "-o, and the container's jump names no interface"
            if not reason and a.mark is not None and state.mark is None:
                reason = "a mark that an earlier rule set for only some packets"
            if reason:
                self._unknown(rule, reason, reach, mine, state)
                if _all_gone(reach, [*state.decided, *mine]):
                    return
                continue
            if not applies:
                continue
            if a.mark is not None and state.mark is not None:
                value, mask, negated = a.mark
                if ((state.mark & mask) == value) == negated:
                    continue
            if a.rate_limited:
                state.notes.append(
                    f"connection rate limit (takes only packets over the rate): {rule}"
                )
                continue
            if a.target == "MARK":
                whole = a.boxes == (self.top,) and reach == [self.top] and not mine
                if whole and state.mark is not None and a.set_mark is not None:
                    value, mask = a.set_mark
                    state.mark = (state.mark & ~mask) ^ value
                else:
                    state.mark = None
                continue
            if whole:  # the usual case: nothing narrowed the packets on the way here
                match = list(a.boxes)
            else:
                match = [m for r in reach for b in a.boxes if (m := intersect(r, b)) is not None]
            if not match:
                continue
            if a.target == "ACCEPT":
                if not state.decided and not mine:
                    state.accepted.extend(CfGrant(rule, m) for m in match)
                    continue
                blocked = [*state.decided, *mine]
                state.accepted.extend(CfGrant(rule, p) for m in match for p in subtract(m, blocked))
                continue
            if a.target in ("DROP", "REJECT"):  # not what left this chain by RETURN or -g
                state.decided.extend(p for m in match for p in subtract(m, mine))
            elif a.target == "RETURN":
                mine.extend(match)
            else:  # a user chain
                self._chain(a.target, match, mine, state, address, out, depth + 1)
                if a.goto:
                    mine.extend(match)
            if _all_gone(reach, [*state.decided, *mine]):
                return

    @staticmethod
    def _out(conds: tuple[tuple[str, bool], ...], out: str | None) -> bool | None:
        for name, negated in conds:
            if out is None:
                return None
            hit = out.startswith(name[:-1]) if name.endswith("+") else out == name
            if hit == negated:
                return False
        return True

    @staticmethod
    def _unknown(rule: CfRule, reason: str, reach: list[Box], mine: list[Box], state: Walk) -> None:
        """Packets that reach a rule we cannot read are undetermined: set aside, reported,
        and no later rule decides them."""
        done = [*state.decided, *mine, *(x.box for x in state.accepted)]
        live = tuple(p for r in reach for p in subtract(r, done))
        if live:
            state.unknown.append(NotUnderstood(rule, reason, live))
            state.decided.extend(live)


def _all_gone(reach: list[Box], gone: list[Box]) -> bool:
    """Has every packet of `reach` been taken by `gone`?  (Usually one full REJECT.)"""
    return all(not subtract(r, gone) for r in reach)


# -- containers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CfJump:
    """silk's `-A FORWARD -s <ip> [-o <underlay>] -j netout--<handle>`."""

    rule: CfRule
    address: int
    out: str | None
    chain: str


def netout_jumps(table: FilterTable) -> tuple[CfJump, ...]:
    """Every FORWARD jump to a `netout--` chain for one source host: how CF ties a chain to
    a container (its IP), whatever the chain's name says."""
    found = []
    for rule in table.chains.get("FORWARD", ()):
        a = analyse(rule.text, table.family)
        if a.unknown or not a.target.startswith(NETOUT_PREFIX) or len(a.sources) != 1:
            continue
        src = a.sources[0]
        if src.negated or src.first != src.last:
            continue
        outs = [name for name, negated in a.out if not negated]
        found.append(CfJump(rule, src.first, outs[0] if outs else None, a.target))
    return tuple(found)


def allow_sets(table: FilterTable, addresses: Iterable[str] | None = None) -> dict[str, CfSide]:
    """The allow set CF's table gives each source address with a netout jump, keyed by the
    address as text (normalised, as the store's addresses are); `addresses` narrows it.

    A container with jumps for several underlay interfaces is walked for each; its grants
    are the first interface's, and another that allows other packets is named in a note."""
    jumps: dict[int, list[str | None]] = {}
    for j in netout_jumps(table):
        found = jumps.setdefault(j.address, [])
        if j.out not in found:
            found.append(j.out)
    make = ipaddress.IPv4Address if table.family == 4 else ipaddress.IPv6Address
    wanted = None
    if addresses is not None:
        wanted = {int(ipaddress.ip_address(a)) for a in addresses}
    walker = _Walker(table)
    result: dict[str, CfSide] = {}
    for address, outs in jumps.items():
        if wanted is not None and address not in wanted:
            continue
        first = walker.walk(address, outs[0])
        notes = list(dict.fromkeys(first.notes))
        for other in outs[1:]:
            again = walker.walk(address, other).accepted
            if {a.box for a in again} != {a.box for a in first.accepted} and same_set_key(
                a.box for a in again
            ) != same_set_key(a.box for a in first.accepted):
                notes.append(f"CF allows other packets out of {other} than out of {outs[0]}")
        result[str(make(address))] = CfSide(
            address=str(make(address)),
            interfaces=tuple(o or "*" for o in outs),
            grants=tuple(first.accepted),
            unread=tuple(CfUnread(str(u.rule), u.reason, u.boxes) for u in first.unknown),
            notes=tuple(notes),
        )
    return result


def read_filter_table(runner: Runner, family: int, variant: str = "auto") -> FilterTable:
    """CF's filter table from the kernel (`iptables-<variant>-save -t filter`).

    `auto`: the variant whose table holds silk's `netout--` chains; if both or neither do,
    the one that answers (both with chains is an error: CF writes with one)."""
    tool = "iptables" if family == 4 else "ip6tables"
    variants = ("legacy", "nft") if variant == "auto" else (variant,)
    tables: dict[str, FilterTable] = {}
    texts: dict[str, str] = {}
    errors = []
    for v in variants:
        try:
            res = runner.run([f"{tool}-{v}-save", "-t", "filter"])
        except DataplaneError as exc:
            errors.append(str(exc))
            continue
        incompatible = any(  # iptables-nft-save's "# Table `filter' is incompatible", exit 0
            x.startswith("# Table") and "incompatible" in x for x in res.stdout.splitlines()[:5]
        )
        if res.returncode != 0 or incompatible:
            errors.append(f"{tool}-{v}-save: {(res.stderr or res.stdout).strip()[:200]}")
            continue
        texts[v] = res.stdout
    # Parse the variant that holds silk's chains; the other, only when it holds them too
    # (that is refused) or when neither does (the one that answered first, to judge on).
    with_text = [v for v, text in texts.items() if f":{NETOUT_PREFIX}" in text]
    for v in with_text or list(texts)[:1]:
        tables[v] = parse_save(texts[v], family)
    if not tables:
        raise DataplaneError("; ".join(errors) or f"no {tool}-save answered")
    with_cf = [v for v, t in tables.items() if netout_jumps(t)]
    if len(with_cf) > 1:
        raise DataplaneError(
            f"CF's netout chains are in both {tool}-legacy and {tool}-nft; pick one with --variant"
        )
    return tables[with_cf[0] if with_cf else next(iter(tables))]


def read_cf_sides(
    runner: Runner, families: Iterable[int], variant: str = "auto"
) -> dict[str, CfSide]:
    """CF's allow set per source address, for each family asked, read from the kernel.

    The saved table (150,000 rules on a large cell) lives until the walk ends: it is taken
    out of the cyclic collector's view meanwhile, as the CI plan does with its fleet, so
    full collections do not rescan it (a fifth of the command's time)."""
    sides: dict[str, CfSide] = {}
    try:
        for family in sorted(set(families)):
            table = read_filter_table(runner, family, variant)
            gc.freeze()
            sides.update(allow_sets(table))
    finally:
        gc.unfreeze()  # a long-lived caller (the agent) gets its collector back
    return sides
