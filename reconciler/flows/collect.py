"""The agent's flow collector: NFLOG packets -> aggregates per window -> JSON records.

Three parts, so that a flood can neither grow memory nor reach the agent loop:

* `FlowContext` -- an immutable snapshot of what the applied plan says (containers by log
  id and address, `log: true` rules by log id with their group and provenance, names from
  the Directory).  The loop hands a new one over after every cycle (`Collector.set_context`:
  one reference assignment); the reader never calls into the loop.
* `Aggregator` -- pure: packets in, `FlowRecord`s out per window.  At most `max_aggregates`
  distinct keys per window; a packet of a further key is dropped and counted.
* `Collector` -- the reader thread (socket -> aggregator) and the writer thread (records ->
  `<state-dir>/flows/flows.jsonl`, rotated by size, and stdout if asked), joined by a queue
  of at most `QUEUE_WINDOWS` windows: when the disk is slower than the kernel, whole
  windows are dropped and counted, never queued without bound.  The kernel's side is
  bounded by the NFLOG rate limit in the rules (`FlowLog.rate`) and the socket buffer; what
  it could not queue to us is counted from NFLOG sequence gaps (`nflog.NflogSocket.lost`).

Counters go to the agent's Prometheus registry with bounded label sets: denied flows per
app and space for the first `top` (app, space) pairs seen, the rest under `other` (a counter
whose label set changed with a moving top-N would reset), and hits per rule group, likewise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from reconciler.core.cellplan import CellPlan, ContainerPlan, PlanRule, log_id
from reconciler.core.model import Directory
from reconciler.flows.nflog import LoggedPacket, NflogError, NflogSocket, parse_packet
from reconciler.flows.record import (
    ALLOW,
    DENY,
    RATE_ID,
    RATE_LIMIT,
    VERDICTS,
    FlowRecord,
    RuleRef,
    iso,
    parse_prefix,
)

QUEUE_WINDOWS = 4
OTHER = "other"
DROP_REASONS = ("kernel", "aggregate-cap", "queue", "unparsed")


@dataclass(frozen=True, slots=True)
class Owner:
    """Who a container is, as a record names it."""

    handle: str
    ip: str
    app: str = ""
    app_id: str = ""
    space: str = ""
    space_id: str = ""
    org: str = ""
    org_id: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class FlowContext:
    """What the applied plan says, indexed the way the reader looks things up."""

    cell: str
    by_log_id: dict[str, Owner] = field(default_factory=dict)
    by_ip: dict[str, Owner] = field(default_factory=dict)
    rules: dict[str, tuple[tuple[str, PlanRule], ...]] = field(default_factory=dict)
    """A rule's log id -> (group id, rule) for every group holding it."""
    logged_rules: tuple[PlanRule, ...] = ()

    @classmethod
    def build(cls, cell: str, plan: CellPlan | None, directory: Directory | None) -> FlowContext:
        if plan is None:
            return cls(cell)
        d = directory or Directory()
        by_log: dict[str, Owner] = {}
        by_ip: dict[str, Owner] = {}
        for cp in plan.containers:
            owner = _owner(cp, d)
            by_log.setdefault(log_id(cp.chain_id), owner)
            by_ip.setdefault(_normal_ip(cp.container.ip), owner)
        rules: dict[str, list[tuple[str, PlanRule]]] = {}
        logged: dict[str, PlanRule] = {}
        for g in plan.groups:
            for r in g.rules:
                if r.item.log:
                    rules.setdefault(log_id(r.id), []).append((g.id, r))
                    logged.setdefault(r.id, r)
        return cls(
            cell,
            by_log,
            by_ip,
            {k: tuple(v) for k, v in rules.items()},
            tuple(logged.values()),
        )


def _normal_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def _owner(cp: ContainerPlan, d: Directory) -> Owner:
    c = cp.container
    app = d.app_path(c.app_id) if c.app_id and d.knows_app(c.app_id) else c.app_id
    space = d.space_path(c.space_id) if c.space_id and d.knows_space(c.space_id) else c.space_id
    org = c.org_id
    if c.space_id and d.knows_space(c.space_id):
        org = space.split("/", 1)[0]
    return Owner(
        c.handle, _normal_ip(c.ip), app, c.app_id, space, c.space_id, org, c.org_id, cp.groups
    )


AggregateKey = tuple[str, str, int | None, str, str, str]


@dataclass(slots=True)
class _Aggregate:
    first: float
    last: float
    count: int
    owner: Owner | None
    source: str
    rule: RuleRef | None
    reason: str


@dataclass
class Drops:
    """Packets not recorded, by reason (`DROP_REASONS`)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n


class Aggregator:
    """Packets of one window by (container, destination, port, protocol, verdict, rule)."""

    def __init__(self, max_aggregates: int) -> None:
        self.max_aggregates = max_aggregates
        self._window: dict[AggregateKey, _Aggregate] = {}
        self.drops = Drops()
        self.packets: dict[str, int] = dict.fromkeys(VERDICTS, 0)

    def __len__(self) -> int:
        return len(self._window)

    def add(self, packet: LoggedPacket, ctx: FlowContext, now: float) -> str | None:
        """Count one packet; its verdict, or None when it was dropped."""
        prefix = parse_prefix(packet.prefix)
        header = parse_packet(packet.payload)
        if prefix is None or header is None:
            self.drops.add("unparsed")
            return None
        owner = ctx.by_ip.get(header.source)
        rule: RuleRef | None = None
        reason = ""
        if prefix.verdict == ALLOW:
            rule = _rule_ref(ctx, prefix.id, owner)
        elif prefix.id == RATE_ID:
            reason = RATE_LIMIT
        else:  # the prefix names the container chain that logged: it wins over the address
            owner = ctx.by_log_id.get(prefix.id, owner)
        key: AggregateKey = (
            owner.handle if owner else "",
            header.destination,
            header.port,
            header.protocol_name,
            prefix.verdict,
            rule.id if rule else (f"?{prefix.id}" if prefix.verdict == ALLOW else ""),
        )
        stamp = packet.timestamp or now
        agg = self._window.get(key)
        if agg is None:
            if len(self._window) >= self.max_aggregates:
                self.drops.add("aggregate-cap")
                return None
            agg = _Aggregate(stamp, stamp, 0, owner, header.source, rule, reason)
            self._window[key] = agg
        agg.count += 1
        agg.first, agg.last = min(agg.first, stamp), max(agg.last, stamp)
        self.packets[prefix.verdict] += 1
        return prefix.verdict

    def flush(self, cell: str) -> list[FlowRecord]:
        """The window's records (oldest first), and a new, empty window."""
        window, self._window = self._window, {}
        out = []
        for (handle, dest, port, proto, verdict, _), agg in window.items():
            o = agg.owner
            out.append(
                FlowRecord(
                    time=agg.first,
                    end=agg.last,
                    cell=cell,
                    container=handle,
                    source=agg.source,
                    destination=dest,
                    port=port,
                    protocol=proto,
                    verdict=verdict,
                    count=agg.count,
                    app=o.app if o else "",
                    app_id=o.app_id if o else "",
                    space=o.space if o else "",
                    space_id=o.space_id if o else "",
                    org=o.org if o else "",
                    org_id=o.org_id if o else "",
                    rule=agg.rule,
                    reason=agg.reason,
                )
            )
        out.sort(key=lambda r: (r.time, r.container, r.destination))
        return out


def _rule_ref(ctx: FlowContext, rule_log_id: str, owner: Owner | None) -> RuleRef | None:
    """The rule a `log: true` prefix names, in the group the source container jumps to
    (a rule's id is its match: the same rule can sit in several groups)."""
    found = ctx.rules.get(rule_log_id, ())
    if not found:
        return None
    mine = [(g, r) for g, r in found if owner is not None and g in owner.groups]
    group, rule = (mine or list(found))[0]
    return RuleRef(rule.id, group, tuple(str(s) for s in rule.sources))


class BoundedLabels:
    """The first `top` label values seen keep their own series; the rest count as `other`."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._seen: set[tuple[str, ...]] = set()

    def admit(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if labels in self._seen:
            return labels
        if len(self._seen) < self.top:
            self._seen.add(labels)
            return labels
        return tuple(OTHER for _ in labels)


class RotatingWriter:
    """Appends lines to `path`; before a write would pass `max_bytes`, the file becomes
    `path.1` (`path.1` becomes `path.2`, and so on up to `keep`; the oldest goes)."""

    def __init__(self, path: Path, max_bytes: int, keep: int = 2) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            with contextlib.suppress(FileNotFoundError):
                os.replace(newer, older)


class HitBook:
    """When each `log: true` rule last matched, and since when it has been in the plan:
    kept in `<state-dir>/flows/hits.json` so "unused for N days" survives restarts."""

    MAX = 100_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, float] = {}
        self.since: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            doc = json.loads(path.read_text())
            self.last = {str(k): float(v) for k, v in dict(doc.get("last", {})).items()}
            self.since = {str(k): float(v) for k, v in dict(doc.get("since", {})).items()}

    def present(self, rule_ids: list[str], now: float) -> None:
        """The rules the plan now holds: new ones start their clock, gone ones are forgotten."""
        keep = set(rule_ids)
        self.since = {k: v for k, v in self.since.items() if k in keep}
        self.last = {k: v for k, v in self.last.items() if k in keep}
        for rid in rule_ids[: self.MAX]:
            self.since.setdefault(rid, now)

    def hit(self, rule_id: str, at: float) -> None:
        if rule_id in self.since:
            self.last[rule_id] = max(at, self.last.get(rule_id, 0.0))

    def unused(self, older_than: float, now: float) -> list[tuple[str, float]]:
        """(rule id, since when) of rules with no hit for `older_than` seconds."""
        out = []
        for rid, since in self.since.items():
            seen = self.last.get(rid, since)
            if now - seen >= older_than:
                out.append((rid, seen))
        return sorted(out)

    def save(self) -> None:
        from reconciler.atomicfile import atomic_write_text

        with contextlib.suppress(OSError):
            atomic_write_text(self.path, json.dumps({"last": self.last, "since": self.since}))


@dataclass(frozen=True)
class CollectorSettings:
    cell: str
    state_dir: Path
    group: int
    netns: str | None = None
    window: float = 10.0
    max_aggregates: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    stdout: bool = False
    unused_after: float = 7 * 86400.0
    top: int = 20
    group_top: int = 200


class Collector:
    """The reader and writer threads (see the module docstring)."""

    def __init__(
        self,
        settings: CollectorSettings,
        inc: Callable[..., None] | None = None,
        out: TextIO | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._inc = inc or (lambda *a, **k: None)
        self.out = out or sys.stdout
        self._log = log or (lambda record: None)
        self.clock = clock
        self.dir = settings.state_dir / "flows"
        self.writer = RotatingWriter(self.dir / "flows.jsonl", settings.max_bytes)
        self.hits = HitBook(self.dir / "hits.json")
        self.aggregator = Aggregator(settings.max_aggregates)
        self.context = FlowContext(settings.cell)
        self._queue: queue.Queue[list[FlowRecord] | None] = queue.Queue(QUEUE_WINDOWS)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.records = 0
        self.error = ""
        self._reported: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._apps = BoundedLabels(settings.top)
        self._groups = BoundedLabels(settings.group_top)
        self.bound = threading.Event()
        self._given: tuple[CellPlan | None, Directory | None] | None = None

    # -- the loop's side -------------------------------------------------------------------

    def set_context(self, plan: CellPlan | None, directory: Directory | None) -> None:
        """After every cycle; rebuilt only when the plan or the directory is another object
        (an idle cycle hands over the same ones: no work per cycle at any scale)."""
        if self._given is not None and self._given[0] is plan and self._given[1] is directory:
            return
        self._given = (plan, directory)
        ctx = FlowContext.build(self.settings.cell, plan, directory)
        with self._lock:
            self.context = ctx
            self.hits.present([r.id for r in ctx.logged_rules], self.clock())

    def status(self) -> dict[str, Any]:
        """What status shows: counters, the last error, and rules unused for N days."""
        with self._lock:
            ctx = self.context
            unused = self.hits.unused(self.settings.unused_after, self.clock())
            drops = dict(self.aggregator.drops.counts)
            packets = dict(self.aggregator.packets)
            records = self.records
        by_id = {r.id: r for r in ctx.logged_rules}
        groups = {r.id: g for found in ctx.rules.values() for g, r in found}
        return {
            "group": self.settings.group,
            "error": self.error,
            "counters": {"packets": packets, "records": records, "drops": drops},
            "unusedAfterSeconds": self.settings.unused_after,
            "unusedRules": [
                {
                    "id": rid,
                    "group": groups.get(rid, ""),
                    "lastHit": iso(seen),
                    "sources": [str(s) for s in by_id[rid].sources] if rid in by_id else [],
                }
                for rid, seen in unused[:100]
            ],
            "unusedRulesTotal": len(unused),
        }

    def unused(self) -> list[tuple[str, float]]:
        """(rule id, last hit or since) of `log: true` rules with no flow for unused-after
        (under the lock: the writer thread records hits)."""
        with self._lock:
            return self.hits.unused(self.settings.unused_after, self.clock())

    def start(self) -> None:
        # Every counter series exists from the start, at 0: a dashboard shows "no drops" rather
        # than "no data", and rate() sees the first drop (a series born at 5 has no increase).
        for reason in DROP_REASONS:
            self._inc("asgctl_agent_flow_drops_total", 0, reason=reason)
        for verdict in VERDICTS:
            self._inc("asgctl_agent_flow_packets_total", 0, verdict=verdict)
        self._inc("asgctl_agent_flow_records_total", 0)
        for target, name in ((self._read_loop, "flows-reader"), (self._write_loop, "flows-writer")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    # -- the reader ------------------------------------------------------------------------

    def _open(self) -> NflogSocket | None:
        try:
            sock = NflogSocket(self.settings.group, self.settings.netns)
        except (NflogError, OSError) as exc:
            message = f"NFLOG group {self.settings.group}: {exc}"
            if message != self.error:
                self._log({"event": "flows-unavailable", "error": message})
            self.error = message
            return None
        self.error = ""
        self.bound.set()
        return sock

    def _read_loop(self) -> None:
        sock = None
        window_end = self.clock() + self.settings.window
        while not self._stop.is_set():
            if sock is None:
                sock = self._open()
                if sock is None:
                    self._stop.wait(5.0)
                    continue
            now = self.clock()
            if now >= window_end:
                self._close_window(sock)
                window_end = now + self.settings.window
                continue
            try:
                packets = sock.receive(min(0.5, window_end - now))
                ctx = self.context
                now = self.clock()
                with self._lock:
                    for p in packets:
                        self.aggregator.add(p, ctx, now)
            except Exception as exc:  # a bug or a socket error: read again, never stop reading
                self.error = f"{type(exc).__name__}: {exc}"
                self._log({"event": "flows-read-failed", "error": self.error})
                sock.close()
                sock = None
                self._stop.wait(1.0)
                continue
        if sock is not None:
            self._close_window(sock)
            sock.close()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1.0)

    def _close_window(self, sock: NflogSocket) -> None:
        with self._lock:
            self.aggregator.drops.add("kernel", sock.lost())
            records = self.aggregator.flush(self.settings.cell)
            packets = dict(self.aggregator.packets)
            drops = dict(self.aggregator.drops.counts)
        if records:
            try:
                self._queue.put_nowait(records)
            except queue.Full:
                with self._lock:
                    self.aggregator.drops.add("queue", sum(r.count for r in records))
                    drops = dict(self.aggregator.drops.counts)
        self._export(packets, drops)

    def _export(self, packets: dict[str, int], drops: dict[str, int]) -> None:
        """Totals as counters: the difference since the last export."""
        for reason, total in drops.items():
            delta = total - self._reported.get(reason, 0)
            if delta:
                self._inc("asgctl_agent_flow_drops_total", delta, reason=reason)
                self._reported[reason] = total
        for verdict, total in packets.items():
            key = "packets:" + verdict
            delta = total - self._reported.get(key, 0)
            if delta:
                self._inc("asgctl_agent_flow_packets_total", delta, verdict=verdict)
                self._reported[key] = total

    # -- the writer ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                batch = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set() and not any(t.is_alive() for t in self._threads[:1]):
                    return
                continue
            if batch is None:
                return
            self._write(batch)

    def _write(self, batch: list[FlowRecord]) -> None:
        lines = [r.to_json() for r in batch]
        try:
            self.writer.write(lines)
        except OSError as exc:
            self._log({"event": "flows-write-failed", "error": str(exc)})
        if self.settings.stdout:
            with contextlib.suppress(OSError, ValueError):
                self.out.write("".join(f'{{"event":"flow",{line[1:]}\n' for line in lines))
                self.out.flush()
        with self._lock:
            self.records += len(batch)
            for r in batch:
                if r.rule is not None:
                    self.hits.hit(r.rule.id, r.end)
            self.hits.save()
        self._inc("asgctl_agent_flow_records_total", len(batch))
        for r in batch:
            if r.verdict == DENY:
                app, space = self._apps.admit((r.app or "unknown", r.space or "unknown"))
                self._inc("asgctl_agent_flow_denied_total", r.count, app=app, space=space)
            if r.rule is not None:
                (group,) = self._groups.admit((r.rule.group,))
                self._inc("asgctl_agent_flow_rule_group_hits_total", r.count, group=group)
