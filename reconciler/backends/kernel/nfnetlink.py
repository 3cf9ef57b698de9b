"""nfnetlink framing: the one netlink code of ours, shared by every reader and writer.

NFLOG (`reconciler.flows.nflog`), NFQUEUE (`reconciler.fqdn.nfqueue`) and the name-set
element writes (`reconciler.fqdn.netlinksets`: ipset's and nf_tables' set messages) speak
the same protocol: AF_NETLINK datagrams of netlink messages (linux/netlink.h), each with an
nfgenmsg header (family, version, resource id) and netlink attributes.  Encoding and the
walk over a datagram are pure and bounded (a length that runs past its container ends the
walk; nothing trusts a length), so they are tested on bytes.

A socket keeps the namespace it was opened in for life: `open_socket(netns=...)` opens it
inside the namespace whose hooks it serves (`backends.kernel.nsthread.run_in_netns`), and
only the opening runs there.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NFNETLINK_V0 = 0
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF
SO_RCVBUFFORCE = 33

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, handled apart)
NLA = struct.Struct("=HH")  # len, type


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno and what was asked)."""


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    size = NLA.size + len(value)
    return NLA.pack(size, kind) + value + b"\0" * (align(size) - size)


def nested(kind: int, *attrs: bytes) -> bytes:
    """An attribute holding attributes (NLA_F_NESTED set, as the kernel's strict parsers want)."""
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def attributes(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The attributes in data[offset:end] by type (the first of each, flags masked off); a
    truncated or mis-sized attribute ends the walk (what came before it is kept)."""
    end = len(data) if end is None else end
    out: dict[int, bytes] = {}
    while offset + NLA.size <= end:
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size or offset + length > end:
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[offset + NLA.size : offset + length])
        offset += align(length)
    return out


def message(
    kind: int, flags: int, seq: int, family: int, res_id: int, *attrs: bytes, version: int = 0
) -> bytes:
    """One nfnetlink message: netlink header, nfgenmsg (res_id big endian), attributes."""
    body = bytes([family, version]) + struct.pack("!H", res_id) + b"".join(attrs)
    return NLMSG.pack(NLMSG.size + len(body), kind, flags, seq, 0) + body


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a datagram: its type, flags, sequence number and what follows the
    netlink header (`body`)."""

    kind: int
    flags: int
    seq: int
    body: bytes

    @property
    def error(self) -> int | None:
        """For NLMSG_ERROR: the errno (0 is an ACK); None for any other message."""
        if self.kind != NLMSG_ERROR or len(self.body) < 4:
            return None
        code: int = struct.unpack_from("=i", self.body)[0]
        return -code

    @property
    def nfgen(self) -> tuple[int, int, dict[int, bytes]] | None:
        """(family, resource id, attributes) of an nfnetlink message; None if too short."""
        if len(self.body) < NFGEN.size:
            return None
        (res_id,) = struct.unpack_from("!H", self.body, 2)
        return self.body[0], res_id, attributes(self.body, NFGEN.size)


def messages(data: bytes) -> list[Message]:
    """The messages of one datagram.  A malformed message ends the walk: a datagram is the
    kernel's, but a parser that trusts lengths is how a bug becomes a crash."""
    out: list[Message] = []
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, flags, seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            break
        out.append(Message(kind, flags, seq, data[offset + NLMSG.size : offset + length]))
        offset += align(length)
    return out


def open_socket(rcvbuf: int, netns: str | None = None) -> socket.socket:
    """A NETLINK_NETFILTER socket with a receive buffer of `rcvbuf` bytes, in `netns`."""
    if netns:
        from reconciler.backends.kernel.nsthread import run_in_netns

        return run_in_netns(netns, _open, rcvbuf)
    return _open(rcvbuf)


def _open(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root may exceed rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    return sock


def request(
    sock: socket.socket,
    payload: bytes,
    seqs: Iterable[int],
    what: str,
    framing: Iterable[int] = (),
) -> None:
    """Send `payload` (one message or a batch) and wait for the ACK of every sequence number
    in `seqs` (each sent with NLM_F_ACK); NetlinkError with the first error.  An error on a
    `framing` message (a batch's begin or end, never acknowledged when it succeeds) ends the
    wait at once.  Other messages arriving meanwhile (packets of a bound group) are let go:
    only configuration and writes use this, under the socket's timeout."""
    waiting = set(seqs)
    frame = set(framing)
    sock.send(payload)
    first = 0
    while waiting:
        for m in messages(sock.recv(65536)):
            code = m.error
            if code is None:
                continue
            if m.seq in frame and code:
                raise NetlinkError(code, f"{what}: {os.strerror(code)}")
            if m.seq not in waiting:
                continue
            waiting.discard(m.seq)
            first = first or code
    if first:
        raise NetlinkError(first, f"{what}: {os.strerror(first)}")
