"""A DNS responder for tests: real UDP/TCP sockets on loopback, answers built by hand.

It can answer truthfully, lie (a forged reply from another port, a wrong id, a different
question) and truncate, so the client's checks are tested against real datagrams.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.fqdn.dns import QCLASS_IN, QTYPE_A, QTYPE_AAAA, QTYPE_CNAME, encode_name


def record(owner: str, rtype: int, ttl: int, value: str) -> bytes:
    if rtype == QTYPE_A:
        rdata = socket.inet_pton(socket.AF_INET, value)
    elif rtype == QTYPE_AAAA:
        rdata = socket.inet_pton(socket.AF_INET6, value)
    else:
        rdata = encode_name(value)
    return encode_name(owner) + struct.pack("!HHIH", rtype, QCLASS_IN, ttl, len(rdata)) + rdata


def response(
    txid: int,
    qname: str,
    qtype: int,
    records: list[bytes],
    *,
    rcode: int = 0,
    tc: bool = False,
    qd_name: str | None = None,
) -> bytes:
    flags = 0x8180 | rcode | (0x0200 if tc else 0)
    header = struct.pack("!HHHHHH", txid, flags, 1, len(records), 0, 0)
    question = encode_name(qd_name or qname) + struct.pack("!HH", qtype, QCLASS_IN)
    return header + question + b"".join(records)


def parse_query(data: bytes) -> tuple[int, str, int]:
    txid = struct.unpack("!H", data[:2])[0]
    pos, labels = 12, []
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]].decode())
        pos += 1 + data[pos]
    qtype = struct.unpack("!H", data[pos + 1 : pos + 3])[0]
    return txid, ".".join(labels), qtype


Zone = dict[tuple[str, int], list[bytes]]
"""(name, qtype) -> answer records."""


@dataclass
class Responder:
    """Answers queries on 127.0.0.1 (UDP and TCP, one port) from `zone`.

    `before` runs first for each UDP query with (sock, client address, txid, qname, qtype):
    the place for a forger to send its datagrams ahead of the real answer; `silent` makes
    the real answer never come; `truncate` sets TC on UDP answers."""

    zone: Zone = field(default_factory=dict)
    before: Callable[[socket.socket, tuple[str, int], int, str, int], None] | None = None
    silent: bool = False
    truncate: bool = False
    port: int = 0
    queries: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", self.port))
        self.tcp.listen()
        self._stop = False
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def answer(self, txid: int, qname: str, qtype: int, tc: bool = False) -> bytes:
        records = self.zone.get((qname, qtype))
        if records is None:
            return response(txid, qname, qtype, [], rcode=3)
        return response(txid, qname, qtype, [] if tc else records, tc=tc)

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            txid, qname, qtype = parse_query(data)
            self.queries.append((qname, qtype))
            if self.before is not None:
                self.before(self.udp, peer, txid, qname, qtype)
            if not self.silent:
                self.udp.sendto(self.answer(txid, qname, qtype, self.truncate), peer)

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                size = struct.unpack("!H", conn.recv(2))[0]
                data = conn.recv(size)
                txid, qname, qtype = parse_query(data)
                msg = self.answer(txid, qname, qtype)
                conn.sendall(struct.pack("!H", len(msg)) + msg)

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()


__all__ = ["QTYPE_A", "QTYPE_AAAA", "QTYPE_CNAME", "Responder", "record", "response"]
