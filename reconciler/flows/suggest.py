"""`asgctl suggest`: the smallest policy change that allows exactly the flows that were denied.

Input is flow records (`reconciler.flows.record`) with verdict `deny` or `would-deny` (audit
mode); output is, per app, `Destination` + `EgressPolicy` documents that would have let those
flows out and nothing else, each with a comment listing the flows it covers.  `propose` is
pure (records in, a `Proposal` out, in an order that depends on the records' content only),
`render_app` turns one app's part into a policy file; the command (`suggest_command`) only
reads files and writes the result.

Exactly the observed flows, and no more:

* A Destination is a product (protocol x addresses x ports).  Flows of one app are grouped by
  (protocol, the exact set of ports seen to an address): every address with the same port
  set shares one Destination, so each Destination allows only (address, port) pairs that were
  observed.  Adjacent addresses are written as one range or CIDR, contiguous ports as one
  range: the same set, written shorter.  This is the fewest Destinations in which each
  address keeps one port set; covering the flows with the fewest products in general is
  NP-hard (rectangle cover) and not attempted.
* Nothing is widened unless asked: `widen_v4` / `widen_v6` (`--widen-to /24`,
  `--widen-to6 /64`) put each address in its prefix first; a prefix then gets the ports seen
  to any address in it.  Ports are never widened.
* Only tcp and udp flows are proposed.  A record of an ICMP flow carries no ICMP type, and a
  Destination for it would allow every type; other IP protocols have no Destination protocol
  but `all`.  Both are reported as notes and left to a person, never written wider.
* The app is named by its GUID (`source: {type: app, id: GUID}`), which is what the cell
  matched the container on: a name is resolved through the policy repository's Directory at
  the revision the pull request lands in, and an app renamed (or a name reused) since the
  record was written would give the grant to another app.  The `org/space/app` name the
  record carried is in the comments and descriptions for the reviewer.
* `app_lifecycle: running`: records do not say whether the container was staging, and
  running is the narrower guess for what an app's own traffic is.
* No SecurityGroup form: an ASG binds to spaces, so any ASG rule would hand the flows to
  every app of the space, wider than observed.
* Given the repository the proposal is for (`--policies`), flows it already allows to the
  app -- records written before an earlier proposal was merged -- are left out, decided as
  `asgctl explain` decides on a compiled plan, and names it uses are not used again.

Records are untrusted (a `--file` may be anything): every field used is checked again here
(`read.check_record`, then an address, a GUID, a port), a bad record is an error naming its
`file:line` and the field, and the number of distinct flows held is bounded (`max_flows`).
Strings from a record reach the YAML only as values the one dumper quotes
(`importcf.dump_documents`), or in comments through `escape.visible` (one line, always).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.core.compile import compile_cell
from reconciler.core.endpoint import Endpoint
from reconciler.core.explain import explain
from reconciler.core.model import Container, PolicySet
from reconciler.escape import visible
from reconciler.flows.nflog import PROTOCOL_NAMES
from reconciler.flows.read import RecordError, check_record
from reconciler.flows.record import DENY, RATE_LIMIT, WOULD_DENY, iso
from reconciler.policy.grammar import MAX_DESTINATIONS_PER_RULE, MAX_PORT, MIN_PORT
from reconciler.policy.importcf import document_filenames, dump_documents

__all__ = [
    "MARKER",
    "AppProposal",
    "Flow",
    "Grant",
    "Options",
    "Proposal",
    "Seen",
    "SuggestError",
    "file_names",
    "parse_prefix_length",
    "propose",
    "render_app",
]

MARKER = "# Proposed by `asgctl suggest` from flow records: review it before merging."
PROPOSABLE = ("tcp", "udp")
LIFECYCLE = "running"
MAX_FLOWS = 100_000
"""Distinct (app, protocol, address, port) held at once: far above one policy's worth."""
MAX_CELLS = 8
"""Cells named per flow in a comment; more are said to be more."""
MAX_LISTED = 50
"""Flows listed in one Destination's comment; the rest are counted."""
MAX_ERRORS = 20
_GUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # directory.schema.json $defs.guid
_NAME_PART = re.compile(r"[^/\s]{1,255}")  # directory.schema.json $defs.name
_MAX_SLUG = 48
_PROTOCOL_NUMBER = re.compile(r"[0-9]{1,3}")  # what nflog.LoggedPacket writes for others
_PROBE_V4, _PROBE_V6 = "198.18.0.2", "fd00:18::2"
"""The container addresses a repository's grants are asked about with (as `asgctl test`'s
synthetic containers): grants are per app and space, never per source address."""
WIDEST = {4: 8, 6: 32}
"""The widest prefix `--widen-to` accepts per IP version: a policy wider than that is not a
suggestion from observed flows any more."""

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Span = tuple[int, int, int]
"""(IP version, first address, last address): an address or a prefix, as integers."""


class SuggestError(ValueError):
    """The records cannot give a proposal (too many flows, a bad option); says why."""


@dataclass(frozen=True)
class Options:
    """Which records count and how far addresses may be widened (None: not at all)."""

    verdicts: tuple[str, ...] = (DENY, WOULD_DENY)
    widen_v4: int | None = None
    widen_v6: int | None = None
    max_flows: int = MAX_FLOWS


@dataclass(frozen=True, order=True)
class Flow:
    """One observed flow of an app, as a Destination would have to allow it."""

    version: int
    address: int
    port: int
    protocol: str

    @property
    def ip(self) -> Address:
        return _ip(self.version, self.address)


@dataclass(frozen=True)
class Seen:
    """What the records say about one flow: packets, when, where and with which verdicts."""

    count: int
    first: float
    last: float
    cells: tuple[str, ...]
    more_cells: bool
    verdicts: tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    """One Destination and the EgressPolicy granting it, with the flows they cover."""

    destination: Mapping[str, Any]
    policy: Mapping[str, Any]
    flows: tuple[tuple[Flow, Seen], ...]


@dataclass(frozen=True)
class AppProposal:
    """Everything proposed for one app (by GUID), and the name the records gave it."""

    app_id: str
    app_name: str
    grants: tuple[Grant, ...]
    widened: str = ""
    """How addresses were widened (`IPv4 to /24`), "" when they are exactly the observed."""

    @property
    def shown(self) -> str:
        return self.app_name or self.app_id


@dataclass(frozen=True)
class Proposal:
    """Per app, in order of name then GUID; errors (any one: write nothing) and notes."""

    apps: tuple[AppProposal, ...]
    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    records: int = 0


def parse_prefix_length(text: str, version: int) -> int:
    """`/24` or `24` for `--widen-to` (IPv4) / `--widen-to6` (IPv6), at most as wide as
    `WIDEST` allows."""
    bits = 32 if version == 4 else 128
    body = text.strip().removeprefix("/")
    if not body.isdigit() or not WIDEST[version] <= int(body) <= bits:
        raise SuggestError(
            f"{text!r}: expected a prefix length /{WIDEST[version]} to /{bits} (IPv{version})"
        )
    return int(body)


class _Acc:
    """One flow's figures while the records are read (frozen into `Seen` at the end)."""

    __slots__ = ("cells", "count", "first", "last", "more_cells", "verdicts")

    def __init__(self, first: float, last: float) -> None:
        self.count = 0
        self.first, self.last = first, last
        self.cells: set[str] = set()
        self.more_cells = False
        self.verdicts: set[str] = set()

    def add(self, count: int, first: float, last: float, cell: str, verdict: str) -> None:
        self.count += count
        self.first, self.last = min(self.first, first), max(self.last, last)
        self.verdicts.add(verdict)
        if cell and cell not in self.cells:
            # The MAX_CELLS smallest names: the same set whatever order the records come in.
            self.cells.add(cell)
            if len(self.cells) > MAX_CELLS:
                self.cells.remove(max(self.cells))
                self.more_cells = True

    def frozen(self) -> Seen:
        return Seen(
            self.count,
            self.first,
            self.last,
            tuple(sorted(self.cells)),
            self.more_cells,
            tuple(v for v in (DENY, WOULD_DENY) if v in self.verdicts),
        )


def _ip(version: int, value: int) -> Address:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _app_name(value: Any) -> str:
    """The record's `org/space/app` if it is one the Directory could hold, else ""."""
    if not isinstance(value, str) or not value.isprintable() or value.count("/") != 2:
        return ""
    return value if all(_NAME_PART.fullmatch(p) for p in value.split("/")) else ""


def _address(text: str) -> Address:
    if len(text) > 45 or "%" in text:
        raise RecordError("field 'destination': expected an IP address")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RecordError("field 'destination': expected an IP address") from None


def propose(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    options: Options,
    policy: PolicySet | None = None,
) -> Proposal:
    """The grants that allow exactly the flows of `records` (each given with its `file:line`)
    whose verdict is in `options.verdicts`.

    With `policy` (the repository the proposal is for, validated): flows it already allows
    to their app are left out -- records written before an earlier proposal was merged --
    and no Destination or EgressPolicy name it uses is used again.

    Records of other verdicts are passed over; records that cannot become a grant (the
    connection limit's denies, a source that is no container, ICMP, other protocols, port 0)
    are counted in notes; a record that is not a flow record is an error.
    """
    flows: dict[tuple[str, Flow], _Acc] = {}
    names: dict[str, str] = {}
    placed: dict[str, tuple[str, str]] = {}
    errors: list[str] = []
    error_count = 0
    skipped: dict[str, int] = {}
    used = 0
    for where, raw in records:
        try:
            doc, start, end = check_record(raw)
            if doc["verdict"] not in options.verdicts:
                continue
            app_id = doc.get("app_id", "")
            if doc.get("reason", "") == RATE_LIMIT:
                _bump(skipped, "the connection limit (a grant does not lift it)")
                continue
            if not app_id:
                _bump(skipped, "a source that is no container of the cell's plan")
                continue
            if not _GUID.fullmatch(app_id):
                raise RecordError("field 'app_id': expected an app GUID (letters, digits, -_.)")
            address = _address(doc["destination"])
            protocol = doc["protocol"]
            if protocol not in PROPOSABLE:
                if protocol in ("icmp", "icmpv6"):
                    why = "records carry no ICMP type; a Destination would allow every type"
                elif protocol in PROTOCOL_NAMES.values() or _PROTOCOL_NUMBER.fullmatch(protocol):
                    why = "a Destination can say it only as protocol all"
                else:
                    raise RecordError("field 'protocol': expected a protocol name or number")
                _bump(skipped, f"protocol {protocol} ({why})")
                continue
            port = doc.get("port")
            if port is None:
                raise RecordError(f"field 'port': a {protocol} flow needs a port")
            if not MIN_PORT <= port <= MAX_PORT:
                _bump(skipped, f"port {port} (a Destination's ports are 1-65535)")
                continue
        except RecordError as exc:
            error_count += 1
            if len(errors) < MAX_ERRORS:
                errors.append(f"{visible(where)}: {visible(str(exc))}")
            continue
        used += 1
        name = _app_name(doc.get("app"))
        if name and (app_id not in names or (names[app_id] and name < names[app_id])):
            names[app_id] = name  # the smallest name seen: independent of record order
        names.setdefault(app_id, "")
        where_from = (doc.get("space_id", ""), doc.get("org_id", ""))
        if where_from[0] and (app_id not in placed or where_from < placed[app_id]):
            placed[app_id] = where_from  # the app's space and org, as the cell saw them
        key = (app_id, Flow(address.version, int(address), port, protocol))
        acc = flows.get(key)
        if acc is None:
            if len(flows) >= options.max_flows:
                raise SuggestError(
                    f"more than {options.max_flows} distinct flows: narrow the records "
                    "with --app or --since"
                )
            acc = flows[key] = _Acc(start, end)
        cell = visible(doc.get("cell", ""))[:128]
        acc.add(doc["count"], start, end, cell, doc["verdict"])
    if error_count > len(errors):
        errors.append(f"... and {error_count - len(errors)} more records that are not usable")
    by_app: dict[str, list[tuple[Flow, Seen]]] = {}
    for (app_id, flow), acc in flows.items():
        by_app.setdefault(app_id, []).append((flow, acc.frozen()))
    notes = [f"not proposed: {_n(n, 'record')} of {w}" for w, n in sorted(skipped.items())]
    taken: set[str] = set()
    if policy is not None:
        taken = {d.name for d in policy.destinations} | {p.name for p in policy.egress_policies}
        allowed = 0
        for app_id in sorted(by_app):
            space_id, org_id = placed.get(app_id, ("", ""))
            keep = _not_allowed(policy, app_id, space_id, org_id, by_app[app_id])
            allowed += len(by_app[app_id]) - len(keep)
            by_app[app_id] = keep
        if allowed:
            notes.append(
                f"not proposed: {_n(allowed, 'flow')} the policy already allows to its app"
            )
    widened = _widened(options)
    apps = [
        AppProposal(
            app_id, names[app_id], _grants(app_id, names[app_id], seen, options, taken), widened
        )
        for app_id, seen in by_app.items()
        if seen
    ]
    apps.sort(key=lambda a: (a.shown, a.app_id))
    return Proposal(tuple(apps), tuple(errors), tuple(notes), used)


def _not_allowed(
    policy: PolicySet, app_id: str, space_id: str, org_id: str, seen: list[tuple[Flow, Seen]]
) -> list[tuple[Flow, Seen]]:
    """The flows `policy` does not allow to a running container of the app, decided as
    `asgctl explain` decides (the compiled plan of a container of the app, in its Directory
    space when the Directory knows the app, else in the space its records named)."""
    known = policy.directory.app(app_id)
    if known is not None:
        space_id = known.space_guid
        space = policy.directory.space(space_id)
        org_id = space.org_guid if space is not None else org_id
    containers = [
        Container(f"suggest-v{v}", ip, app_id, space_id, org_id, "", "app")
        for v, ip in ((4, _PROBE_V4), (6, _PROBE_V6))
    ]
    plan = compile_cell(policy, containers, "suggest")
    by_version = {cp.container.version: cp for cp in plan.containers}
    return [
        (flow, stats)
        for flow, stats in seen
        if not explain(
            policy,
            plan,
            by_version[flow.version],
            Endpoint(flow.version, flow.address, flow.protocol, flow.port),
        ).allowed
    ]


def _widened(options: Options) -> str:
    return ", ".join(
        f"IPv{v} to /{n}" for v, n in ((4, options.widen_v4), (6, options.widen_v6)) if n
    )


def _bump(counter: dict[str, int], what: str) -> None:
    counter[what] = counter.get(what, 0) + 1


def _network(flow: Flow, options: Options) -> Span:
    """The flow's address, or its prefix when widening asks for one, as (version, first,
    last)."""
    bits = 32 if flow.version == 4 else 128
    length = options.widen_v4 if flow.version == 4 else options.widen_v6
    host = (1 << (bits - (bits if length is None else length))) - 1
    return (flow.version, flow.address & ~host, flow.address | host)


def _grants(
    app_id: str,
    name: str,
    seen: list[tuple[Flow, Seen]],
    options: Options,
    taken: set[str],
) -> tuple[Grant, ...]:
    """Per protocol, addresses (or prefixes) grouped by the exact set of ports seen to them."""
    ports_of: dict[tuple[str, Span], set[int]] = {}
    for flow, _ in seen:
        ports_of.setdefault((flow.protocol, _network(flow, options)), set()).add(flow.port)
    group_of = {where: (where[0], tuple(sorted(ports))) for where, ports in ports_of.items()}
    nets_of: dict[tuple[str, tuple[int, ...]], list[Span]] = {}
    for (_, net), key in group_of.items():
        nets_of.setdefault(key, []).append(net)
    flows_of: dict[tuple[str, tuple[int, ...]], list[tuple[Flow, Seen]]] = {}
    for flow, stats in seen:
        flows_of.setdefault(group_of[(flow.protocol, _network(flow, options))], []).append(
            (flow, stats)
        )
    widened = _widened(options)
    grants: list[Grant] = []
    for key in sorted(nets_of):
        protocol, ports = key
        nets = nets_of[key]
        flows = sorted(flows_of[key], key=lambda fs: fs[0])
        entries = _ip_entries(nets)
        port_entries = _port_entries(ports)
        base = f"{app_id}-{protocol}-{_slug(port_entries)}"
        chunks = [
            entries[i : i + MAX_DESTINATIONS_PER_RULE]
            for i in range(0, len(entries), MAX_DESTINATIONS_PER_RULE)
        ]
        starts = [(v, lo) for _, v, lo, _ in entries]
        in_chunk: list[list[tuple[Flow, Seen]]] = [[] for _ in chunks]
        for fs in flows:  # the entry holding the flow's address, and so its chunk
            at = bisect.bisect_right(starts, (fs[0].version, fs[0].address)) - 1
            in_chunk[at // MAX_DESTINATIONS_PER_RULE].append(fs)
        for n, chunk in enumerate(chunks, 1):
            dest_name = _unused(base if n == 1 else f"{base}-part{n}", taken)
            taken.add(dest_name)
            mine = tuple(in_chunk[n - 1])
            shown = name or app_id
            destination: dict[str, Any] = {
                "kind": "Destination",
                "name": dest_name,
                "description": f"{protocol} seen denied from {shown}",
                "protocol": protocol,
                "ips": [text for text, *_ in chunk],
                "ports": port_entries,
            }
            policy: dict[str, Any] = {
                "kind": "EgressPolicy",
                "name": dest_name,
                "description": f"{shown} ({app_id}): the flows it was denied"
                + (f", addresses widened ({widened})" if widened else ", and no more"),
                "source": {"type": "app", "id": app_id},
                "destination": dest_name,
                "app_lifecycle": LIFECYCLE,
            }
            grants.append(Grant(destination, policy, mine))
    return tuple(grants)


def _unused(name: str, taken: set[str]) -> str:
    """`name`, or `name-v2`, `-v3`... when the repository already uses it."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-v{n}"
    return candidate


def _ip_entries(nets: list[Span]) -> list[tuple[str, int, int, int]]:
    """The addresses of `nets` in as few `ips` entries as say exactly them -- an address, a
    CIDR, or an `a-b` range where adjacent ones join -- each with its (version, first, last)."""
    spans = sorted(nets)
    merged: list[list[int]] = []
    for version, lo, hi in spans:
        if merged and merged[-1][0] == version and lo <= merged[-1][2] + 1:
            merged[-1][2] = max(merged[-1][2], hi)
        else:
            merged.append([version, lo, hi])
    out: list[tuple[str, int, int, int]] = []
    for version, lo, hi in merged:
        size = hi - lo + 1
        if size == 1:
            text = str(_ip(version, lo))
        elif size & (size - 1) == 0 and lo % size == 0:
            bits = (32 if version == 4 else 128) - (size.bit_length() - 1)
            text = f"{_ip(version, lo)}/{bits}"
        else:
            text = f"{_ip(version, lo)}-{_ip(version, hi)}"
        out.append((text, version, lo, hi))
    return out


def _port_entries(ports: tuple[int, ...]) -> list[int | str]:
    """Sorted ports, each run of consecutive ones (all of them seen) as one `a-b` range."""
    out: list[int | str] = []
    run: list[int] = []
    for port in (*ports, -1):
        if run and port == run[-1] + 1:
            run.append(port)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [port]
    return out


def _slug(entries: list[int | str]) -> str:
    text = "_".join(str(e) for e in entries)
    if len(text) <= _MAX_SLUG:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{len(entries)}ports-{digest}"


def file_names(apps: Iterable[AppProposal]) -> list[str]:
    """One distinct, safe file name per app (`org_space_app.yaml`, else `<GUID>.yaml`):
    `importcf.document_filenames` keeps ASCII letters, digits and `-_.` only, so no name
    from a record can leave the output folder or collide with another app's file."""
    return document_filenames([a.shown for a in apps])


def render_app(app: AppProposal, schema_comment: str | None) -> str:
    """One app's policy file: a header, then each Destination (with the flows it covers in
    a comment) followed by its EgressPolicy."""
    total = sum(s.count for g in app.grants for _, s in g.flows)
    nflows = sum(len(g.flows) for g in app.grants)
    head = [MARKER]
    if schema_comment:
        head.append(schema_comment)
    head += [
        f"# For app {visible(app.shown)} (GUID {app.app_id}): {_n(nflows, 'flow')}, "
        f"{_n(total, 'packet')},",
        f"# allowed to the exact ports seen and to addresses widened {app.widened}."
        if app.widened
        else "# each allowed to exactly the address and port it was seen to.",
    ]
    parts = ["\n".join(head) + "\n"]
    for grant in app.grants:
        parts.append("---\n" + "".join(f"{line}\n" for line in _comment(grant)))
        parts.append(dump_documents([dict(grant.destination)], None))
        parts.append("---\n")
        parts.append(dump_documents([dict(grant.policy)], None))
    return "".join(parts)


def _comment(grant: Grant) -> list[str]:
    flows = grant.flows
    packets = sum(s.count for _, s in flows)
    first = min(s.first for _, s in flows)
    last = max(s.last for _, s in flows)
    lines = [
        f"# Covers {_n(len(flows), 'flow')} ({_n(packets, 'packet')}), "
        f"first seen {iso(first)}, last seen {iso(last)}:"
    ]
    for flow, seen in flows[:MAX_LISTED]:
        where = ", ".join(visible(c) for c in seen.cells) + (", ..." if seen.more_cells else "")
        target = f"[{flow.ip}]" if flow.version == 6 else str(flow.ip)
        lines.append(
            f"#   {flow.protocol} {target}:{flow.port} {'/'.join(seen.verdicts)} "
            f"x{seen.count} {iso(seen.first)}..{iso(seen.last)} cells: {where or '-'}"
        )
    if len(flows) > MAX_LISTED:
        rest = flows[MAX_LISTED:]
        lines.append(
            f"#   ... and {len(rest)} more ({_n(sum(s.count for _, s in rest), 'packet')})"
        )
    return lines


def _n(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")
