"""Read NFLOG from the kernel: a small netlink client of our own, and a pure parser.

No maintained Python library speaks nfnetlink_log (python-nflog and nflog-bindings are
unmaintained C bindings to libnetfilter_log), and the protocol is small: one socket of
family AF_NETLINK, protocol NETLINK_NETFILTER; a config message binds a group and sets the
copy range; each logged packet arrives as one NFULNL_MSG_PACKET message of netlink
attributes (linux/netfilter/nfnetlink_log.h).  The parser (`parse_messages`,
`parse_packet`) is pure and takes bytes, so it is tested on bytes captured from a kernel.

Losses are counted, never guessed: the instance is configured with sequence numbers
(NFULNL_CFG_F_SEQ), so a gap between two packets' NFULA_SEQ is exactly the number the kernel
could not queue to us (socket buffer full) before the next one that arrived (the instance
numbers from 0 when we bind it); ENOBUFS on receive says the same without a count, and is
read past.

The socket is opened inside the namespace whose FORWARD hook logs (`--netns` in the lab):
a socket keeps its namespace for life, so only the opening runs there
(`backends.kernel.nsthread.run_in_netns`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNETLINK_V0 = 0

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001

NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12
NLA_TYPE_MASK = 0x3FFF

COPY_RANGE = 128
"""Bytes of each packet copied to us: an IPv6 header, a few extension headers and the
transport header's ports fit; the payload never leaves the kernel."""
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, handled apart)
_NLA = struct.Struct("=HH")
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
_PORTED = frozenset({6, 17, 132})
_IPV6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options


class NflogError(OSError):
    """The kernel refused to bind the group (taken by another listener, no permission)."""


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """One NFULNL_MSG_PACKET: its address family, prefix, copied bytes and metadata."""

    family: int
    group: int
    prefix: bytes
    payload: bytes
    seq: int | None = None
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What a flow is keyed on, read from the copied IP and transport headers."""

    family: int
    source: str
    destination: str
    protocol: int
    port: int | None

    @property
    def protocol_name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The attributes in data[offset:end] by type (the first of each); a truncated or
    mis-sized attribute ends the walk (what came before it is kept)."""
    out: dict[int, bytes] = {}
    while offset + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > end:
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[offset + _NLA.size : offset + length])
        offset += _align(length)
    return out


def parse_messages(data: bytes) -> tuple[list[LoggedPacket], list[int]]:
    """The logged packets in one datagram from the socket, and the errno of every
    NLMSG_ERROR in it (0 is an ACK).  Malformed messages end the walk: a datagram is
    the kernel's, but a parser that trusts lengths is how a bug becomes a crash."""
    packets: list[LoggedPacket] = []
    errors: list[int] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        body = offset + _NLMSG.size
        if kind == NLMSG_ERROR and length >= _NLMSG.size + 4:
            (code,) = struct.unpack_from("=i", data, body)
            errors.append(-code)
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and length >= _NLMSG.size + 4:
            family, _version = data[body], data[body + 1]
            (group,) = struct.unpack_from("!H", data, body + 2)
            attrs = _attributes(data, body + _NFGEN.size, offset + length)
            packets.append(_packet(family, group, attrs))
        offset += _align(length)
    return packets, errors


def _packet(family: int, group: int, attrs: dict[int, bytes]) -> LoggedPacket:
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0]
    seq_raw = attrs.get(NFULA_SEQ)
    seq = struct.unpack("!I", seq_raw)[0] if seq_raw is not None and len(seq_raw) == 4 else None
    ts_raw = attrs.get(NFULA_TIMESTAMP)
    stamp = None
    if ts_raw is not None and len(ts_raw) == 16:
        sec, usec = struct.unpack("!QQ", ts_raw)
        stamp = sec + usec / 1e6
    return LoggedPacket(family, group, prefix, attrs.get(NFULA_PAYLOAD, b""), seq, stamp)


def parse_packet(payload: bytes) -> PacketHeader | None:
    """Addresses, protocol and destination port of an IPv4 or IPv6 packet's first bytes;
    None when they are not a whole IP header.  The port is None for ICMP, for protocols
    without ports, for a non-first fragment and when the transport header was cut off."""
    if len(payload) < 1:
        return None
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            return None
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20 or len(payload) < ihl:
            return None
        protocol = payload[9]
        src, dst = payload[12:16], payload[16:20]
        fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        start = None if fragment else ihl
        return _header(4, src, dst, protocol, payload, start)
    if version == 6:
        if len(payload) < 40:
            return None
        protocol = payload[6]
        src, dst = payload[8:24], payload[24:40]
        offset: int | None = 40
        for _ in range(8):  # a bounded walk over extension headers
            if offset is None or (protocol not in _IPV6_EXT and protocol != 44):
                break
            if len(payload) < offset + 8:
                offset = None
                break
            if protocol == 44:  # fragment: only the first carries the transport header
                frag = struct.unpack_from("!H", payload, offset + 2)[0] >> 3
                protocol = payload[offset]
                offset = offset + 8 if frag == 0 else None
            else:
                protocol, size = payload[offset], (payload[offset + 1] + 1) * 8
                offset += size
        return _header(6, src, dst, protocol, payload, offset)
    return None


def _header(
    family: int, src: bytes, dst: bytes, protocol: int, payload: bytes, start: int | None
) -> PacketHeader:
    port = None
    if start is not None and protocol in _PORTED and len(payload) >= start + 4:
        port = struct.unpack_from("!H", payload, start + 2)[0]
    return PacketHeader(
        family,
        str(ipaddress.ip_address(src)),
        str(ipaddress.ip_address(dst)),
        protocol,
        port,
    )


def _config_message(group: int, *attrs: tuple[int, bytes], seq: int = 1) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)[:2] + struct.pack("!H", group)
    for kind, value in attrs:
        size = _NLA.size + len(value)
        body += _NLA.pack(size, kind) + value + b"\0" * (_align(size) - size)
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    header = _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return header + body


def bind_messages(group: int, buffer: int = 65536, qthresh: int = 64) -> list[bytes]:
    """What binds `group` and configures it: packet copy of COPY_RANGE bytes, sequence
    numbers, batches of up to `qthresh` packets (flushed after 0.1 s) in kernel buffers of
    `buffer` bytes."""
    return [
        _config_message(group, (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), seq=1),
        _config_message(
            group, (NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET)), seq=2
        ),
        _config_message(group, (NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)), seq=3),
        _config_message(group, (NFULA_CFG_QTHRESH, struct.pack("!I", qthresh)), seq=4),
        _config_message(group, (NFULA_CFG_TIMEOUT, struct.pack("!I", 10)), seq=5),
        _config_message(group, (NFULA_CFG_NLBUFSIZ, struct.pack("!I", buffer)), seq=6),
    ]


RCVBUF = 4 * 1024 * 1024
"""The socket's receive buffer: what the kernel may queue to us while we are busy."""


class NflogSocket:
    """One bound NFLOG group.  `receive` returns what arrived (or nothing after `timeout`),
    `lost` the packets the kernel could not queue to us since the last call."""

    def __init__(self, group: int, netns: str | None = None, rcvbuf: int = RCVBUF) -> None:
        self.group = group
        if netns:
            from reconciler.backends.kernel.nsthread import run_in_netns

            self.sock = run_in_netns(netns, _open_socket, rcvbuf)
        else:
            self.sock = _open_socket(rcvbuf)
        self._next_seq: int | None = 0  # an instance numbers its packets from 0 when bound
        self._lost = 0
        try:
            self._configure()
        except BaseException:
            self.sock.close()
            raise

    def _configure(self) -> None:
        self.sock.settimeout(2.0)
        for message in bind_messages(self.group):
            self.sock.send(message)
            errors: list[int] = []
            while not errors:  # packets already flowing before the ACK are let go
                _, errors = parse_messages(self.sock.recv(65536))
            if errors[0]:
                raise NflogError(errors[0], f"NFLOG group {self.group}: {os.strerror(errors[0])}")

    def receive(self, timeout: float) -> list[LoggedPacket]:
        """Packets of one datagram (possibly several batched messages); [] after `timeout`."""
        self.sock.settimeout(timeout)
        for _ in range(2):
            try:
                data = self.sock.recv(1 << 20)
                break
            except TimeoutError:
                return []
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped some: the next packet's sequence number says how many.
        else:
            return []
        packets, _ = parse_messages(data)
        for p in packets:
            if p.seq is not None:
                if self._next_seq is not None and p.seq != self._next_seq:
                    self._lost += (p.seq - self._next_seq) & 0xFFFFFFFF
                self._next_seq = (p.seq + 1) & 0xFFFFFFFF
        return packets

    def lost(self) -> int:
        out, self._lost = self._lost, 0
        return out

    def close(self) -> None:
        try:
            self.sock.settimeout(0.5)
            self.sock.send(
                _config_message(self.group, (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])))
            )
        except OSError:
            pass
        self.sock.close()


def _open_socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    return sock
