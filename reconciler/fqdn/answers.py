"""Which DNS answers to a container teach us addresses, decided purely (docs/fqdn.md).

The interception sees two streams: copies of the queries containers send to the trusted
resolvers (NFLOG, no hold), and the resolvers' answers to containers, held in the kernel
(NFQUEUE) until we give a verdict.  An answer teaches something only when it is the reply
to a query the container itself sent: same container address and port, same resolver
address and port, same transport, same transaction id and exactly the same question.  So a
forger must know all of that (as it must to fool the container's own stub resolver), and
an answer nobody asked for -- or a second answer to one query -- adds nothing.

Then, for each of that container's grants by name that `NameItem.matches` the question
(exact, or one label under a wildcard), the answer's addresses (CNAMEs followed by
`dns.parse_response`, same bounds as the agent's own client) go to the name's set.  A name
the container is not granted adds nothing.

Everything here is bounded: the query table holds at most `per_container` queries per
container and `limit` in all (the oldest go first, counted), each for `ttl` seconds.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from reconciler.backends.kernel.packets import TCP, Segment
from reconciler.core.cellplan import CellPlan
from reconciler.core.model import NameItem
from reconciler.fqdn.dns import QCLASS_IN, QTYPE_A, QTYPE_AAAA, DnsError, read_name

QUERY_TTL = 10.0
"""Seconds a query waits for its answer (stub resolvers give up after about 5 s)."""
PER_CONTAINER = 256
LIMIT = 65536


@dataclass(frozen=True, slots=True)
class Flow:
    """The query's direction: container (address, port) -> resolver (address, port)."""

    protocol: int
    container: str
    cport: int
    resolver: str
    rport: int


@dataclass(frozen=True, slots=True)
class Question:
    txid: int
    qname: str
    qtype: int


def dns_message(segment: Segment) -> bytes | None:
    """The DNS message a segment carries: UDP's data; for TCP, the first length-prefixed
    message when the segment holds all of it (a message split over segments is not read:
    the answer is released unlearned, docs/fqdn.md)."""
    if segment.protocol != TCP:
        return segment.data or None
    if len(segment.data) < 2:
        return None
    (size,) = struct.unpack_from("!H", segment.data)
    if size < 12 or len(segment.data) < 2 + size:
        return None
    return segment.data[2 : 2 + size]


def question(message: bytes, *, response: bool) -> Question | None:
    """The transaction id and the one question of a standard query (`response` False) or of
    its response (True); None for anything else (other opcodes, several questions, a name
    we cannot read)."""
    if len(message) < 12:
        return None
    txid, flags, qd = struct.unpack_from("!HHH", message)
    if bool(flags & 0x8000) != response or (flags >> 11) & 0xF or qd != 1:
        return None
    try:
        name, pos = read_name(message, 12)
    except DnsError:
        return None
    if pos + 4 > len(message):
        return None
    qtype, qclass = struct.unpack_from("!HH", message, pos)
    if qclass != QCLASS_IN or qtype not in (QTYPE_A, QTYPE_AAAA):
        return None
    return Question(txid, name, qtype)


@dataclass
class QueryTable:
    """Queries waiting for their answer, bounded per container and in all."""

    ttl: float = QUERY_TTL
    per_container: int = PER_CONTAINER
    limit: int = LIMIT
    evicted: int = 0
    _queries: OrderedDict[tuple[Flow, Question], float] = field(default_factory=OrderedDict)
    _per: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._queries)

    def _drop(self, key: tuple[Flow, Question]) -> None:
        del self._queries[key]
        left = self._per[key[0].container] - 1
        if left:
            self._per[key[0].container] = left
        else:
            del self._per[key[0].container]

    def expire(self, now: float) -> None:
        while self._queries:
            key, expires = next(iter(self._queries.items()))
            if expires > now:
                break
            self._drop(key)

    def add(self, flow: Flow, q: Question, now: float) -> None:
        """Remember a query (a retry of the same query just renews it)."""
        self.expire(now)
        key = (flow, q)
        if key in self._queries:
            self._queries.move_to_end(key)
            self._queries[key] = now + self.ttl
            return
        if self._per.get(flow.container, 0) >= self.per_container:
            oldest = next(k for k in self._queries if k[0].container == flow.container)
            self._drop(oldest)
            self.evicted += 1
        if len(self._queries) >= self.limit:
            self._drop(next(iter(self._queries)))
            self.evicted += 1
        self._queries[key] = now + self.ttl
        self._per[flow.container] = self._per.get(flow.container, 0) + 1

    def take(self, flow: Flow, q: Question, now: float) -> bool:
        """Whether an answer on `flow` to `q` replies to a query we saw (and is the first to
        do so: the query is used up)."""
        self.expire(now)
        key = (flow, q)
        if key not in self._queries:
            return False
        self._drop(key)
        return True


@dataclass(frozen=True, slots=True)
class Grants:
    """What the applied plan grants by name, by container address: the interception's view."""

    by_container: dict[str, tuple[NameItem, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, plan: CellPlan) -> Grants:
        by_id = plan.name_by_id
        out: dict[str, dict[str, NameItem]] = {}
        for cp in plan.containers:
            for rule_id in cp.names:
                item = by_id[rule_id].item
                ip = str(ipaddress.ip_address(cp.container.ip))
                out.setdefault(ip, {}).setdefault(item.fqdn, item)
        return cls({ip: tuple(items.values()) for ip, items in out.items()})

    def names_for(self, container: str, qname: str) -> tuple[str, ...]:
        """The granted names (exact or wildcard) an answer to `container` for `qname` fills."""
        return tuple(
            sorted(i.fqdn for i in self.by_container.get(container, ()) if i.matches(qname))
        )

    def containers(self) -> Iterable[str]:
        return self.by_container.keys()
