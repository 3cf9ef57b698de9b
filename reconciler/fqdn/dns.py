"""A small DNS client: one A or AAAA question, its answer with the CNAME chain followed.

Our own rather than a library: the agent needs one question type, strict checks on what
counts as the answer, and bounds on everything it parses (a hostile or broken resolver
must cost at most one message's worth of work and add nothing it did not answer).  The
standard library's `socket` suffices; dnspython would add a dependency for a tenth of it.

What is an answer to our query (RFC 5452's checks, the ones a forged reply must beat):
* it arrives on our connected socket (the kernel drops datagrams from any other address
  or port), and it comes from the server we asked (checked again on `recvfrom`);
* its transaction id is ours (16 random bits from `secrets`, a fresh source port per query);
* it is a response (QR), with exactly our one question (name, type, class IN) echoed;
* only records on the chain from our name count: A/AAAA (of the type asked) owned by the
  name or by a CNAME target reached from it; other records in the message add nothing.
A datagram failing any check is ignored (counted) and we keep waiting for the real answer
until the deadline, so a forged reply cannot even deny the answer.  Truncated answers are
asked again over TCP.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

QTYPE_A = 1
QTYPE_CNAME = 5
QTYPE_AAAA = 28
QCLASS_IN = 1
MAX_CNAME_HOPS = 8
"""A longer chain is refused (resolvers themselves stop around 8-16)."""
MAX_POINTER_JUMPS = 32
MAX_MESSAGE = 65535
UDP_PAYLOAD = 1232
"""The EDNS-free UDP answer we read at most 512 bytes of by the RFC; we accept up to the
DNS flag day's 1232 in case a resolver sends more, and go to TCP on truncation."""


class DnsError(Exception):
    """No usable answer: the message says why (timeout, refused, malformed, ...)."""


class NotOurs(DnsError):
    """A message that is not the reply to our query (wrong id, question, flags, source)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The addresses a name has for one type, and for how long they may be kept.

    `ttl` is the smallest TTL along the chain (a CNAME that expires sooner expires the
    addresses it led to).  `nxdomain` answers carry no addresses."""

    qname: str
    qtype: int
    addresses: tuple[str, ...]
    ttl: int
    chain: tuple[str, ...] = ()
    rcode: int = 0


@dataclass
class ClientStats:
    """What the client saw that was not an answer: the forged-answer alarm."""

    ignored: int = 0
    truncated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def ignore(self, why: str) -> None:
        self.ignored += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1


def encode_name(name: str) -> bytes:
    """A validated host name in wire form (the policy's validation has bounded it)."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise DnsError(f"{name!r} has an empty or over-long label")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise DnsError(f"{name!r} is longer than 255 octets")
    return bytes(out)


def build_query(txid: int, qname: str, qtype: int) -> bytes:
    """A standard query with recursion desired, one question, no EDNS."""
    header = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0)
    return header + encode_name(qname) + struct.pack("!HH", qtype, QCLASS_IN)


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) name at `offset`, lower-cased, and the offset after it.

    Pointers must point backwards and are followed at most MAX_POINTER_JUMPS times, so a
    message cannot make us loop; names are bounded to 255 octets."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    total = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsError("name runs past the message")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("pointer runs past the message")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise DnsError("name pointer does not point backwards")
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise DnsError("too many name pointers")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if length & 0xC0:
            raise DnsError("unknown label type")
        pos += 1
        if length == 0:
            break
        if pos + length > len(data):
            raise DnsError("label runs past the message")
        total += length + 1
        if total > 255:
            raise DnsError("name longer than 255 octets")
        labels.append(data[pos : pos + length].decode("ascii", "replace").lower())
        pos += length
    return ".".join(labels), (end if end is not None else pos)


def parse_response(data: bytes, txid: int, qname: str, qtype: int) -> tuple[Answer, bool]:
    """The answer in `data` to our query, and whether it was truncated (TC).

    Raises NotOurs when it is not the reply to this query, DnsError when it is but says
    nothing usable (a server failure, a malformed message)."""
    if len(data) < 12:
        raise NotOurs("shorter than a header")
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != txid:
        raise NotOurs("wrong transaction id")
    if not flags & 0x8000:
        raise NotOurs("not a response")
    if (flags >> 11) & 0xF != 0:
        raise NotOurs("not a standard query's response")
    if qd != 1:
        raise NotOurs("not exactly one question")
    try:
        name, pos = read_name(data, 12)
    except DnsError as exc:
        raise NotOurs(f"unreadable question: {exc}") from None
    if pos + 4 > len(data):
        raise NotOurs("question runs past the message")
    rtype, rclass = struct.unpack("!HH", data[pos : pos + 4])
    if name != qname.lower().rstrip(".") or rtype != qtype or rclass != QCLASS_IN:
        raise NotOurs("a different question")
    pos += 4
    truncated = bool(flags & 0x0200)
    rcode = flags & 0xF
    want = qname.lower().rstrip(".")
    if rcode == 3:  # NXDOMAIN: the name has no addresses (for now)
        return Answer(want, qtype, (), 0, (), rcode), truncated
    if rcode != 0:
        raise DnsError(f"server answered rcode {rcode}")
    records: list[tuple[str, int, int, bytes, int]] = []  # owner, type, ttl, rdata, rdata pos
    for _ in range(an):
        owner, pos = read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsError("record runs past the message")
        rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        if pos + rdlen > len(data):
            raise DnsError("record data runs past the message")
        if rclass == QCLASS_IN:
            records.append((owner, rtype, min(ttl, 0x7FFFFFFF), data[pos : pos + rdlen], pos))
        pos += rdlen
    return _follow(data, want, qtype, records), truncated


def _follow(
    data: bytes, qname: str, qtype: int, records: list[tuple[str, int, int, bytes, int]]
) -> Answer:
    """The addresses on the chain from `qname`: CNAMEs followed at most MAX_CNAME_HOPS."""
    current = qname
    chain = [qname]
    ttl: int | None = None
    for _ in range(MAX_CNAME_HOPS + 1):
        found = [r for r in records if r[0] == current and r[1] == qtype]
        if found:
            addresses = []
            for _owner, _type, rttl, rdata, _pos in found:
                size = 4 if qtype == QTYPE_A else 16
                if len(rdata) != size:
                    raise DnsError("address record of the wrong length")
                addresses.append(str(ipaddress.ip_address(rdata)))
                ttl = rttl if ttl is None else min(ttl, rttl)
            return Answer(qname, qtype, tuple(sorted(set(addresses))), ttl or 0, tuple(chain))
        cname = [r for r in records if r[0] == current and r[1] == QTYPE_CNAME]
        if not cname:
            break
        _owner, _type, rttl, _rdata, rpos = cname[0]
        ttl = rttl if ttl is None else min(ttl, rttl)
        current, _ = read_name(data, rpos)
        chain.append(current)
    else:
        raise DnsError(f"CNAME chain longer than {MAX_CNAME_HOPS}")
    return Answer(qname, qtype, (), ttl or 0, tuple(chain))


@dataclass
class Client:
    """Asks one server (address, port) with a deadline per question."""

    server: str
    port: int = 53
    timeout: float = 2.0
    stats: ClientStats = field(default_factory=ClientStats)

    def query(self, qname: str, qtype: int) -> Answer:
        txid = secrets.randbits(16)
        message = build_query(txid, qname, qtype)
        answer, truncated = self._udp(message, txid, qname, qtype)
        if truncated:
            self.stats.truncated += 1
            answer, _ = self._tcp(message, txid, qname, qtype)
        return answer

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.server else socket.AF_INET

    def _udp(self, message: bytes, txid: int, qname: str, qtype: int) -> tuple[Answer, bool]:
        deadline = time.monotonic() + self.timeout
        with socket.socket(self._family(), socket.SOCK_DGRAM) as sock:
            sock.connect((self.server, self.port))  # the kernel now drops other sources
            peer = sock.getpeername()[:2]
            sock.send(message)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DnsError(f"no answer from {self.server} within {self.timeout:g} s")
                sock.settimeout(left)
                try:
                    data, source = sock.recvfrom(UDP_PAYLOAD)
                except TimeoutError:
                    continue
                except ConnectionRefusedError:
                    raise DnsError(f"{self.server}:{self.port} refused (no DNS server)") from None
                if tuple(source[:2]) != tuple(peer):
                    self.stats.ignore("wrong source")
                    continue
                try:
                    return parse_response(data, txid, qname, qtype)
                except NotOurs as exc:
                    self.stats.ignore(str(exc))

    def _tcp(self, message: bytes, txid: int, qname: str, qtype: int) -> tuple[Answer, bool]:
        with socket.create_connection((self.server, self.port), timeout=self.timeout) as sock:
            sock.sendall(struct.pack("!H", len(message)) + message)
            size = struct.unpack("!H", _recv_exact(sock, 2))[0]
            data = _recv_exact(sock, size)
        try:
            return parse_response(data, txid, qname, qtype)
        except NotOurs as exc:
            self.stats.ignore(str(exc))
            raise DnsError(f"TCP answer from {self.server} is not ours: {exc}") from None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise DnsError("connection closed mid-message")
        out += chunk
    return bytes(out)


def resolv_conf_servers(text: str) -> tuple[str, ...]:
    """The `nameserver` lines of a resolv.conf, in order, valid addresses only."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return tuple(dict.fromkeys(out))
