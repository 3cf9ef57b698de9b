"""DNS answer interception: learn a name's addresses from the answers containers receive,
before they receive them (issue 15, item 2; the design is docs/fqdn.md).

One thread, two sockets: the NFLOG group copying containers' queries to the trusted
resolvers, and the NFQUEUE holding the resolvers' answers (`hold.DnsHold` writes the rules).
For each held answer the thread first reads every query copy already queued to it (the
kernel copies a query as it passes, so the copy is on our socket before the resolver even
has the query: it cannot lose that race), then decides (`answers`): a reply to a recorded
query, for a name the container is granted, puts its addresses into the name's set through
`FqdnService.learn` (the keeper's TTL clamp, fqdn-max-ips and refused addresses) over a
kept-open netlink socket (`netlinksets`), and only then is the answer released
(NF_ACCEPT).  No process starts on this path.  An answer that teaches nothing new -- every
address it gives is already in the name's set for `RENEW_AFTER_RELEASE` seconds more, the
common case of a name asked again -- is released first and its renewal written right after:
the container's connect needs the element for milliseconds, and it is there.

What is released without teaching anything: answers to no recorded query (unsolicited or
forged), answers we cannot parse, and answers for names the container is not granted; DNS
itself is governed by the container's ASGs, so we do not drop what is not ours to judge.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel.packets import TCP, parse_segment
from reconciler.core.cellplan import CellPlan
from reconciler.flows.nflog import NflogSocket
from reconciler.fqdn.answers import Flow, Grants, QueryTable, dns_message, question
from reconciler.fqdn.dns import QTYPE_A, DnsError, NotOurs, parse_response
from reconciler.fqdn.hold import QUERY_COPY, DnsHold
from reconciler.fqdn.netlinksets import NetlinkSets
from reconciler.fqdn.nfqueue import NF_ACCEPT, NfqueueSocket, QueuedPacket, drops
from reconciler.fqdn.service import FqdnService

VERDICT_RT_PRIORITY = 1
"""The verdict thread (this thread only) runs SCHED_RR at the lowest real-time priority: on
a busy cell a held answer's added latency was mostly the thread's wait for a CPU, not its
work (measured at load 13-16 on 2 cores: +2-5 ms p50 at nice 0 or -10, +0.3-0.5 ms as
SCHED_RR; bench/results/fqdn.md).  The thread blocks in `select` between answers and
sleeps after an error, and the kernel's real-time throttling (sched_rt_runtime_us) bounds
it in any case.  Where the agent may not (no CAP_SYS_NICE), it runs at normal priority."""
SWITCH_INTERVAL = 0.001
"""Seconds another Python thread of the agent may hold the GIL while the verdict thread
waits for it (CPython's default is 5 ms): set process-wide while the interception runs."""
RENEW_AFTER_RELEASE = 2.0
"""An answer whose addresses all stay in their sets at least this long is released before
its renewal is written (nft renews an element by delete and add in one transaction, whose
commit was the largest part of the nftables backend's p99: bench/results/fqdn.md)."""
VERDICT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
"""Seconds from reading a held answer to its verdict: the histogram's upper bounds."""


@dataclass
class InterceptMetrics:
    answers: int = 0
    learned: int = 0
    """Answers whose addresses went to at least one name's set."""
    unsolicited: int = 0
    unparsable: int = 0
    not_granted: int = 0
    write_errors: int = 0
    queries: int = 0
    queries_lost: int = 0
    """Query copies the kernel could not queue to us (NFLOG sequence gaps): their answers
    then teach nothing (unsolicited), and the container's connect is rejected until the
    agent's own resolution or a retried lookup."""
    verdict_buckets: list[int] = field(default_factory=lambda: [0] * len(VERDICT_BUCKETS))
    verdict_count: int = 0
    verdict_sum: float = 0.0
    errors: int = 0
    last_error: str = ""
    renewed_after_release: int = 0
    """Answers released before their renewal was written (nothing new in them)."""

    def observe(self, seconds: float) -> None:
        self.verdict_count += 1
        self.verdict_sum += seconds
        for i, bound in enumerate(VERDICT_BUCKETS):
            if seconds <= bound:
                self.verdict_buckets[i] += 1


class Interceptor:
    """Holds, checks and learns from DNS answers to the cell's containers."""

    def __init__(
        self,
        service: FqdnService,
        hold: DnsHold,
        sets_kind: str,
        resolvers: Sequence[tuple[str, int]],
        *,
        netns: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.hold = hold
        self.sets_kind = sets_kind
        self.resolvers = tuple(resolvers)
        self.netns = netns
        self.clock = clock
        self.queue = hold.queue
        self.metrics = InterceptMetrics()
        self.table = QueryTable()
        self.grants = Grants()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log: NflogSocket | None = None
        self._q: NfqueueSocket | None = None
        self._sets: NetlinkSets | None = None
        self._renewals: list[tuple[tuple[str, ...], int, tuple[str, ...], int]] = []
        """Renewals of answers already released (`learn(..., defer=True)`), written by
        `renew` once the verdicts of a batch are given."""

    def follow(self, plan: CellPlan) -> None:
        """The applied plan's grants by name (swapped whole: the thread reads one or the
        other, never half)."""
        self.grants = Grants.of(plan)

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Open the sockets, then write the rules (an answer held before anyone reads the
        queue would be dropped), then serve on a thread of its own."""
        self._stop.clear()
        self._open_readers()
        try:
            self._sets = NetlinkSets(self.sets_kind, self.netns)
            self.hold.install(self.resolvers)
        except BaseException:
            self._close()
            raise
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="fqdn-intercept", daemon=True)
        self._thread.start()

    def stop(self, *, remove: bool = False) -> None:
        """Stop reading (held answers are then dropped by the kernel: fail closed);
        `remove` also deletes the rules (the agent's uninstall)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()
        if remove:
            self.hold.remove()

    def _open_readers(self) -> None:
        """Bind the query copies' NFLOG group and the answers' queue (both or neither)."""
        log = NflogSocket(self.queue, self.netns, copy_range=QUERY_COPY, qthresh=1, flush_ticks=0)
        try:
            self._q = NfqueueSocket(self.queue, self.netns)
        except BaseException:
            log.close()
            raise
        self._log = log

    def _close_readers(self) -> None:
        for s in (self._log, self._q):
            if s is not None:
                s.close()
        self._log = self._q = None

    def _close(self) -> None:
        self._close_readers()
        if self._sets is not None:
            self._sets.close()
        self._sets = None

    def _run(self) -> None:
        try:  # answers wait in the kernel while this thread waits for a CPU
            policy = os.sched_param(VERDICT_RT_PRIORITY)
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_RR, policy)
        except OSError:
            pass
        while not self._stop.is_set():
            log, q = self._log, self._q
            if log is None or q is None:  # after a failure: bind again, as the flow reader does
                try:
                    self._open_readers()
                except Exception as exc:
                    self.metrics.errors += 1
                    self.metrics.last_error = f"could not bind again: {exc}"
                    self._stop.wait(1.0)
                continue
            try:
                ready, _, _ = select.select([log.sock, q.sock], [], [], 0.2)
                if log.sock in ready:
                    self._read_queries(0)
                if q.sock in ready:
                    for packet in q.receive(0):
                        self._read_queries(0)  # every query copied before this answer
                        q.verdict(packet.packet_id, self.decide(packet))
                    self.renew()
            except Exception as exc:  # never let the thread die: answers would be dropped
                self.metrics.errors += 1
                self.metrics.last_error = str(exc)
                # Held answers die with the queue's binding (the kernel drops them: their
                # lookups are retried); the next pass binds both sockets afresh.
                self._close_readers()
                self._stop.wait(0.05)

    def _read_queries(self, timeout: float) -> None:
        assert self._log is not None
        while True:
            packets = self._log.receive(timeout)
            self.metrics.queries_lost += self._log.lost()
            if not packets:
                return
            now = self.clock()
            for p in packets:
                self.note_query(p.payload, now)

    # -- decisions -----------------------------------------------------------------------

    def note_query(self, payload: bytes, now: float) -> None:
        """Record a copied query of a container (one whose address the plan knows)."""
        seg = parse_segment(payload)
        if seg is None or seg.source not in self.grants.by_container:
            return
        message = dns_message(seg)
        q = question(message, response=False) if message else None
        if q is None:
            return
        self.metrics.queries += 1
        flow = Flow(seg.protocol, seg.source, seg.sport, seg.destination, seg.dport)
        self.table.add(flow, q, now)

    def decide(self, packet: QueuedPacket) -> int:
        """The verdict for one held answer, after learning what it may teach."""
        started = time.perf_counter()
        try:
            self.learn(packet.payload, defer=True)
        except Exception as exc:  # one answer's failure releases it unlearned, nothing more
            self.metrics.errors += 1
            self.metrics.last_error = f"learning from an answer: {exc}"
        finally:
            self.metrics.observe(time.perf_counter() - started)
        return NF_ACCEPT

    def learn(self, payload: bytes, *, defer: bool = False) -> int:
        """Learn from one answer; returns how many names' sets it wrote.  With `defer`, an
        answer that teaches nothing new writes nothing yet: its renewal waits for `renew`."""
        seg = parse_segment(payload)
        if seg is not None and seg.protocol == TCP and not seg.data:
            return 0  # the connection's own segments (SYN-ACK, ACK, FIN): not answers
        self.metrics.answers += 1
        message = dns_message(seg) if seg is not None else None
        q = question(message, response=True) if message else None
        if seg is None or message is None or q is None:
            self.metrics.unparsable += 1
            return 0
        flow = Flow(seg.protocol, seg.destination, seg.dport, seg.source, seg.sport)
        names = self.grants.names_for(seg.destination, q.qname)
        if not names:  # queries of containers without grants by name are not even recorded
            self.table.take(flow, q, self.clock())
            self.metrics.not_granted += 1
            return 0
        if not self.table.take(flow, q, self.clock()):
            self.metrics.unsolicited += 1
            return 0
        try:
            answer, _truncated = parse_response(message, q.txid, q.qname, q.qtype)
        except (NotOurs, DnsError):
            self.metrics.unparsable += 1
            return 0
        if not answer.addresses:
            return 0
        family = 4 if q.qtype == QTYPE_A else 6
        if defer and all(
            self.service.holds(fqdn, family, answer.addresses, RENEW_AFTER_RELEASE)
            for fqdn in names
        ):
            self._renewals.append((names, family, answer.addresses, answer.ttl))
            return 0
        return self._teach(names, family, answer.addresses, answer.ttl)

    def renew(self) -> int:
        """Write the renewals of the answers released before them; returns how many
        answers' renewals were written."""
        pending, self._renewals = self._renewals, []
        for names, family, addresses, ttl in pending:
            self._teach(names, family, addresses, ttl)
        self.metrics.renewed_after_release += len(pending)
        return len(pending)

    def _teach(
        self, names: tuple[str, ...], family: int, addresses: tuple[str, ...], ttl: int
    ) -> int:
        """An answer's addresses into each granted name's set (the keeper's rules)."""
        written = 0
        for fqdn in names:
            try:
                write = self.service.learn(fqdn, family, addresses, ttl, writer=self._sets)
            except DataplaneError as exc:
                self.metrics.write_errors += 1
                self.metrics.last_error = str(exc)
                continue
            if write is not None and write.elements:
                written += 1
        if written:
            self.metrics.learned += 1
        return written

    def queue_drops(self) -> tuple[int, int] | None:
        """(queue_dropped, user_dropped) of our queue; None when nobody has it bound."""
        d = drops(self.netns, self.queue)
        return None if d is None else (d.queue_dropped, d.user_dropped)
