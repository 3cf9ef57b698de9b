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
import os
import socket
import struct
from dataclasses import dataclass

from reconciler.backends.kernel import nfnetlink as nl
from reconciler.backends.kernel.packets import PROTOCOL_NAMES, PacketHeader, parse_packet

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

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

COPY_RANGE = 128
"""Bytes of each packet copied to us: an IPv6 header, a few extension headers and the
transport header's ports fit; the payload never leaves the kernel."""
__all__ = ["PROTOCOL_NAMES", "LoggedPacket", "NflogSocket", "PacketHeader", "parse_packet"]


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


def parse_messages(data: bytes, group: int | None = None) -> tuple[list[LoggedPacket], list[int]]:
    """The logged packets in one datagram from the socket, and the errno of every
    NLMSG_ERROR in it (0 is an ACK); malformed messages end the walk (`nfnetlink.messages`).
    With `group`, packets of other groups (a second instance on the same socket) are left
    out."""
    packets: list[LoggedPacket] = []
    errors: list[int] = []
    for m in nl.messages(data):
        code = m.error
        if code is not None:
            errors.append(code)
        elif m.kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            head = m.nfgen
            if head is not None and (group is None or head[1] == group):
                packets.append(_packet(*head))
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


def _config_message(group: int, *attrs: tuple[int, bytes], seq: int = 1) -> bytes:
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    encoded = (nl.attr(k, v) for k, v in attrs)
    return nl.message(kind, flags, seq, socket.AF_UNSPEC, group, *encoded)


def bind_messages(
    group: int,
    buffer: int = 65536,
    qthresh: int = 64,
    copy_range: int = COPY_RANGE,
    flush_ticks: int = 10,
) -> list[bytes]:
    """What binds `group` and configures it: packet copy of `copy_range` bytes, sequence
    numbers, batches of up to `qthresh` packets (flushed after `flush_ticks` hundredths of
    a second) in kernel buffers of `buffer` bytes.  `qthresh=1` sends every packet as it is
    logged: the DNS interception reads a query before its answer can exist."""
    return [
        _config_message(group, (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), seq=1),
        _config_message(
            group, (NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET)), seq=2
        ),
        _config_message(group, (NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)), seq=3),
        _config_message(group, (NFULA_CFG_QTHRESH, struct.pack("!I", qthresh)), seq=4),
        _config_message(group, (NFULA_CFG_TIMEOUT, struct.pack("!I", flush_ticks)), seq=5),
        _config_message(group, (NFULA_CFG_NLBUFSIZ, struct.pack("!I", buffer)), seq=6),
    ]


RCVBUF = 4 * 1024 * 1024
"""The socket's receive buffer: what the kernel may queue to us while we are busy."""


class NflogSocket:
    """One bound NFLOG group.  `receive` returns what arrived (or nothing after `timeout`),
    `lost` the packets the kernel could not queue to us since the last call."""

    def __init__(
        self,
        group: int,
        netns: str | None = None,
        rcvbuf: int = RCVBUF,
        *,
        copy_range: int = COPY_RANGE,
        qthresh: int = 64,
        flush_ticks: int = 10,
    ) -> None:
        self.group = group
        self._bind = bind_messages(group, 65536, qthresh, copy_range, flush_ticks)
        self.sock = nl.open_socket(rcvbuf, netns)
        self._next_seq: int | None = 0  # an instance numbers its packets from 0 when bound
        self._lost = 0
        try:
            self._configure()
        except BaseException:
            self.sock.close()
            raise

    def _configure(self) -> None:
        self.sock.settimeout(2.0)
        for message in self._bind:
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
            except (TimeoutError, BlockingIOError):  # a timeout of 0: nothing waiting
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
