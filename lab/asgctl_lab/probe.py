"""Probes: can this container reach that address, and if not, *how* was it stopped?

The end-to-end tests need more than reachable/unreachable.  Cloud Foundry's ASG rules end in
REJECT, so a denied connection must fail fast with an ICMP error, while a DROP (or a packet
lost on the way) only ever times out; telling the two apart is how a test proves that the
reconciler installed *its* verdict and not some accident.  So every probe returns a
`ProbeResult` with an `Outcome` and, when an ICMP error came back, its type, code and sender
(read from the socket error queue, IP_RECVERR), which also separates a TCP RST from an ICMP
port-unreachable although both surface as ECONNREFUSED.

All probes create their socket inside the container's namespace (see `nsenter`) and then run
in the caller's process, with short timeouts, so a test can afford dozens of them.  Targets
must be lab addresses (198.18.0.0/15, fd00::/8) or loopback: the lab never sends traffic
anywhere else.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from enum import StrEnum

from asgctl_lab.nsenter import socket_in
from reconciler.fqdn.dns import QTYPE_A, build_query

LAB_NETWORKS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8"))

# Not exported by Python's socket module on 3.11; values from linux/in.h, linux/in6.h and
# linux/errqueue.h.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3

# ICMP types that carry an error about a packet we sent (the offending header is quoted).
_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
_ICMP6_ERRORS = frozenset({1, 2, 3, 4})
# Request type -> the type its reply has (both quote the identifier and sequence number).
_ICMP4_REPLIES = {8: 0, 13: 14, 15: 16, 17: 18}
_ICMP6_REPLIES = {128: 129}
ICMP_ECHO_REQUEST = 8
ICMP6_ECHO_REQUEST = 128

_ident = itertools.count((os.getpid() * 7919) & 0xFFFF)


class Outcome(StrEnum):
    """How a probe ended."""

    CONNECTED = "connected"  # TCP handshake completed
    REPLIED = "replied"  # a UDP datagram or ICMP reply came back
    REFUSED = "refused"  # TCP RST: nothing listening, or REJECT --reject-with tcp-reset
    REJECTED = "rejected"  # an ICMP error came back: a REJECT rule, or a closed UDP port
    TIMEOUT = "timeout"  # nothing came back: DROP, or lost
    ERROR = "error"  # failed locally (no route, no address of that family, ...)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe, with enough detail to explain it in a failure message."""

    outcome: Outcome
    protocol: str
    target: str
    elapsed: float
    errno: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_from: str | None = None

    @property
    def reached(self) -> bool:
        """The destination answered (the firewall let the packet through)."""
        return self.outcome in (Outcome.CONNECTED, Outcome.REPLIED)

    def __str__(self) -> str:
        parts = [f"{self.protocol} {self.target}: {self.outcome.value} in {self.elapsed:.3f}s"]
        if self.icmp_type is not None:
            parts.append(f"icmp {self.icmp_type}/{self.icmp_code} from {self.icmp_from}")
        if self.errno is not None:
            parts.append(errno.errorcode.get(self.errno, str(self.errno)))
        return ", ".join(parts)


def check_lab_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse `host` and refuse anything outside the lab ranges and loopback."""
    addr = ipaddress.ip_address(host)
    if not (addr.is_loopback or any(addr in net for net in LAB_NETWORKS)):
        raise ValueError(f"{host} is outside the lab ranges 198.18.0.0/15 and fd00::/8")
    return addr


def _family(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _target(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"


def _enable_recverr(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)


def _read_icmp_error(sock: socket.socket) -> tuple[int, int, str] | None:
    """(type, code, sender) of the ICMP error queued on `sock`, if one is."""
    sock.setblocking(False)
    try:
        _, ancdata, _, _ = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
    except OSError:
        return None
    for level, kind, data in ancdata:
        if (level, kind) not in (
            (socket.IPPROTO_IP, _IP_RECVERR),
            (socket.IPPROTO_IPV6, _IPV6_RECVERR),
        ) or len(data) < 16:
            continue
        _errno, origin, icmp_type, icmp_code = struct.unpack_from("=IBBB", data)
        if origin not in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
            continue
        offender = data[16:]
        sender = "?"
        if len(offender) >= 8 and struct.unpack_from("=H", offender)[0] == socket.AF_INET:
            sender = str(ipaddress.IPv4Address(offender[4:8]))
        elif len(offender) >= 24 and struct.unpack_from("=H", offender)[0] == socket.AF_INET6:
            sender = str(ipaddress.IPv6Address(offender[8:24]))
        return icmp_type, icmp_code, sender
    return None


def _failure(
    sock: socket.socket, exc: OSError, protocol: str, target: str, elapsed: float
) -> ProbeResult:
    icmp = _read_icmp_error(sock)
    if icmp is not None:
        return ProbeResult(Outcome.REJECTED, protocol, target, elapsed, exc.errno, *icmp)
    if protocol == "tcp" and exc.errno == errno.ECONNREFUSED:
        return ProbeResult(Outcome.REFUSED, protocol, target, elapsed, exc.errno)
    return ProbeResult(Outcome.ERROR, protocol, target, elapsed, exc.errno)


def probe_tcp(netns: str, host: str, port: int, *, timeout: float = 1.0) -> ProbeResult:
    """Open (and close) one TCP connection from `netns` to host:port."""
    addr = check_lab_address(host)
    family = _family(addr)
    target = _target(addr, port)
    sock = socket_in(netns, family, socket.SOCK_STREAM)
    try:
        _enable_recverr(sock, family)
        sock.settimeout(timeout)
        start = time.monotonic()
        try:
            sock.connect((str(addr), port))
        except TimeoutError:
            return ProbeResult(Outcome.TIMEOUT, "tcp", target, time.monotonic() - start)
        except OSError as exc:
            return _failure(sock, exc, "tcp", target, time.monotonic() - start)
        return ProbeResult(Outcome.CONNECTED, "tcp", target, time.monotonic() - start)
    finally:
        sock.close()


def probe_udp(
    netns: str, host: str, port: int, *, timeout: float = 1.0, payload: bytes | None = None
) -> ProbeResult:
    """Send one datagram from `netns` to host:port and wait for any reply or ICMP error.

    To port 53 the datagram is a DNS question (for `probe.lab.example`): the lab's DNS server
    is a real one, which answers DNS messages only (an echo server answers it too)."""
    if payload is None:
        payload = (
            build_query(secrets.randbits(16), "probe.lab.example", QTYPE_A)
            if port == 53
            else b"asgt-probe\n"
        )
    addr = check_lab_address(host)
    family = _family(addr)
    target = _target(addr, port)
    sock = socket_in(netns, family, socket.SOCK_DGRAM)
    try:
        _enable_recverr(sock, family)
        sock.settimeout(timeout)
        start = time.monotonic()
        try:
            sock.connect((str(addr), port))
            sock.send(payload)
            sock.recv(65536)
        except TimeoutError:
            return ProbeResult(Outcome.TIMEOUT, "udp", target, time.monotonic() - start)
        except OSError as exc:
            return _failure(sock, exc, "udp", target, time.monotonic() - start)
        return ProbeResult(Outcome.REPLIED, "udp", target, time.monotonic() - start)
    finally:
        sock.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(
    netns: str,
    host: str,
    *,
    icmp_type: int | None = None,
    icmp_code: int = 0,
    timeout: float = 1.0,
) -> ProbeResult:
    """Send one ICMP (or ICMPv6) message of `icmp_type`/`icmp_code` and classify the answer.

    The default type is an echo request.  Cloud Foundry's ICMP rules filter by type and code,
    so the type is a parameter.  For request types with a known reply type (echo, timestamp,
    ...) only that reply with our identifier counts; for any other type, any non-error ICMP
    message from the target does.  Uses a raw socket (we are root), because unprivileged
    ping sockets are disabled by default in new namespaces (net.ipv4.ping_group_range).
    """
    addr = check_lab_address(host)
    v4 = addr.version == 4
    protocol = "icmp" if v4 else "icmpv6"
    if icmp_type is None:
        icmp_type = ICMP_ECHO_REQUEST if v4 else ICMP6_ECHO_REQUEST
    replies, errors = (_ICMP4_REPLIES, _ICMP4_ERRORS) if v4 else (_ICMP6_REPLIES, _ICMP6_ERRORS)
    expected = replies.get(icmp_type)
    ident, seq = next(_ident) & 0xFFFF, 1
    body = struct.pack("!HH", ident, seq) + (b"\0" * 12 if icmp_type == 13 else b"asgt-ping")
    packet = struct.pack("!BBH", icmp_type, icmp_code, 0) + body
    if v4:  # the kernel fills in ICMPv6 checksums itself (they cover a pseudo-header)
        packet = packet[:2] + struct.pack("!H", _checksum(packet)) + packet[4:]
    proto = socket.IPPROTO_ICMP if v4 else socket.IPPROTO_ICMPV6
    sock = socket_in(netns, _family(addr), socket.SOCK_RAW, proto)
    target = str(addr)
    try:
        start = time.monotonic()
        deadline = start + timeout
        try:
            sock.sendto(packet, (target, 0))
        except OSError as exc:
            return ProbeResult(Outcome.ERROR, protocol, target, 0.0, exc.errno)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, sender = sock.recvfrom(65536)
            except TimeoutError:
                break
            if v4:  # raw IPv4 sockets see the IP header, IPv6 ones do not
                data = data[(data[0] & 0x0F) * 4 :]
            if len(data) < 8:
                continue
            rtype, rcode = data[0], data[1]
            src = ipaddress.ip_address(sender[0])
            if rtype in errors:
                if _quotes_our_probe(data[8:], addr, ident):
                    return ProbeResult(
                        Outcome.REJECTED,
                        protocol,
                        target,
                        time.monotonic() - start,
                        None,
                        rtype,
                        rcode,
                        str(src),
                    )
                continue
            if src != addr or rtype == icmp_type:
                continue
            if expected is None or (
                rtype == expected and struct.unpack_from("!H", data, 4)[0] == ident
            ):
                return ProbeResult(Outcome.REPLIED, protocol, target, time.monotonic() - start)
        return ProbeResult(Outcome.TIMEOUT, protocol, target, time.monotonic() - start)
    finally:
        sock.close()


def _quotes_our_probe(
    quoted: bytes, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, ident: int
) -> bool:
    """Whether an ICMP error quotes the packet we sent (destination and identifier match)."""
    if addr.version == 4:
        if len(quoted) < 20:
            return False
        ihl = (quoted[0] & 0x0F) * 4
        inner = quoted[ihl:]
        return (
            quoted[9] == socket.IPPROTO_ICMP
            and ipaddress.IPv4Address(quoted[16:20]) == addr
            and len(inner) >= 6
            and struct.unpack_from("!H", inner, 4)[0] == ident
        )
    if len(quoted) < 46:
        return False
    return (
        quoted[6] == socket.IPPROTO_ICMPV6
        and ipaddress.IPv6Address(quoted[24:40]) == addr
        and struct.unpack_from("!H", quoted, 44)[0] == ident
    )


class HeldConnection:
    """A long-lived TCP connection from a container to an echo service.

    The reconciler promises to change rules without disconnecting anything, so a test opens
    one of these before a change and calls `check()` after it: the connection must still
    carry data both ways.  Each check sends a fresh numbered line and waits for that line to
    come back, skipping any late echo of an earlier check, so one slow check does not make
    every later one fail.
    """

    def __init__(self, netns: str, host: str, port: int, *, timeout: float = 1.0) -> None:
        addr = check_lab_address(host)
        self.netns = netns
        self.target = _target(addr, port)
        self._sock: socket.socket | None = socket_in(netns, _family(addr), socket.SOCK_STREAM)
        self._count = 0
        self._pending = b""
        try:
            self._sock.settimeout(timeout)
            self._sock.connect((str(addr), port))
        except OSError:
            self.close()
            raise
        self.local = self._sock.getsockname()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def check(self, *, timeout: float = 1.0) -> bool:
        """Send one line and read its echo; False on any failure or timeout."""
        if self._sock is None:
            return False
        self._count += 1
        line = f"asgt-lab held {self._count}\n".encode()
        deadline = time.monotonic() + timeout
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(line)
            while True:
                head, sep, rest = self._pending.partition(b"\n")
                if sep:
                    self._pending = rest
                    if head + sep == line:
                        return True
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
                if not chunk:
                    return False
                self._pending += chunk
        except OSError:
            return False

    def close(self) -> None:
        """Close the socket (idempotent).  Open sockets keep their namespace alive."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> HeldConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"HeldConnection({self.netns} -> {self.target}, {state})"
