"""Name-set element writes over netlink, on a socket kept open: the interception's path.

The DNS interception holds an answer until its addresses are in the kernel, so the write is
on the answer's latency path: no process may start there (`ipset restore` or `nft -f` costs
milliseconds; measured in bench/results/fqdn.md).  One socket per writer, opened once in the
cell's namespace; each write is one request the kernel acknowledges before we return, so
an address is in the set before the answer is released.

ipset (NFNL_SUBSYS_IPSET, linux/netfilter/ipset/ip_set.h): one IPSET_CMD_ADD per address
with its timeout; without NLM_F_EXCL the kernel treats an address already there as
`-exist` does and renews its timeout.
nf_tables (NFNL_SUBSYS_NFTABLES): one batch of add (no EXCL: an address already there is
kept), delete, add with the timeout -- the same transaction `kernelsets.NftWriter` gives
`nft`, which renews a timeout on every kernel, atomically.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel import nfnetlink as nl
from reconciler.fqdn.kernelsets import Write

NFNL_SUBSYS_IPSET = 6
IPSET_CMD_ADD = 9
IPSET_PROTOCOL = 6
"""The oldest protocol every kernel with `hash:net` timeouts accepts (IPSET_PROTOCOL_MIN)."""
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_DATA = 7
IPSET_ATTR_IP = 1
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2
IPSET_ATTR_TIMEOUT = 6
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_DATA_VALUE = 1
RCVBUF = 256 * 1024
TIMEOUT = 2.0
"""Seconds to wait for the kernel's acknowledgement (it answers in microseconds)."""


def _string(kind: int, text: str) -> bytes:
    return nl.attr(kind, text.encode("ascii") + b"\0")


def ipset_add(seq: int, set_name: str, address: str, timeout: int) -> bytes:
    """IPSET_CMD_ADD of one address with its timeout (seconds), renewing it if there."""
    ip = ipaddress.ip_address(address)
    kind = IPSET_ATTR_IPADDR_IPV4 if ip.version == 4 else IPSET_ATTR_IPADDR_IPV6
    data = nl.nested(
        IPSET_ATTR_DATA,
        nl.nested(IPSET_ATTR_IP, nl.attr(kind | nl.NLA_F_NET_BYTEORDER, ip.packed)),
        nl.attr(IPSET_ATTR_TIMEOUT | nl.NLA_F_NET_BYTEORDER, struct.pack("!I", max(1, timeout))),
    )
    return nl.message(
        (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_ADD,
        nl.NLM_F_REQUEST | nl.NLM_F_ACK,
        seq,
        NFPROTO_IPV4 if ip.version == 4 else NFPROTO_IPV6,
        0,
        nl.attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL])),
        _string(IPSET_ATTR_SETNAME, set_name),
        data,
    )


def _elements(addresses: Iterable[tuple[str, int | None]]) -> bytes:
    out = []
    for address, timeout in addresses:
        key = nl.nested(
            NFTA_SET_ELEM_KEY, nl.attr(NFTA_DATA_VALUE, ipaddress.ip_address(address).packed)
        )
        extra = b""
        if timeout is not None:
            extra = nl.attr(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", max(1, timeout) * 1000))
        out.append(nl.nested(NFTA_LIST_ELEM, key, extra))
    return nl.nested(NFTA_SET_ELEM_LIST_ELEMENTS, *out)


def nft_batch(
    seq: int, table: str, writes: Iterable[Write], family: int = NFPROTO_INET
) -> tuple[bytes, list[int], list[int]]:
    """One nf_tables batch renewing every address of `writes`: the bytes, the sequence
    numbers acknowledged, and the batch's own two (begin, end)."""
    parts: list[bytes] = []
    acked: list[int] = []
    begin = seq
    parts.append(nl.message(NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST, begin, 0, NFNL_SUBSYS_NFTABLES))
    seq += 1
    for w in writes:
        if not w.elements:
            continue
        head = (
            _string(NFTA_SET_ELEM_LIST_TABLE, table),
            _string(NFTA_SET_ELEM_LIST_SET, w.set_name),
        )
        keys = _elements((a, None) for a, _ in w.elements)
        steps = (
            (NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE, keys),
            (NFT_MSG_DELSETELEM, 0, keys),
            (NFT_MSG_NEWSETELEM, nl.NLM_F_CREATE | nl.NLM_F_EXCL, _elements(w.elements)),
        )
        for kind, flags, elements in steps:
            parts.append(
                nl.message(
                    (NFNL_SUBSYS_NFTABLES << 8) | kind,
                    nl.NLM_F_REQUEST | nl.NLM_F_ACK | flags,
                    seq,
                    family,
                    0,
                    *head,
                    elements,
                )
            )
            acked.append(seq)
            seq += 1
    parts.append(nl.message(NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), acked, [begin, seq]


class NetlinkSets:
    """A kept-open writer of name-set elements for one backend (`ipset` or `nftables`)."""

    def __init__(self, kind: str, netns: str | None = None, table: str = "asgctl") -> None:
        if kind not in ("ipset", "nftables"):
            raise ValueError(f"unknown set kind {kind!r}")
        self.kind = kind
        self.table = table
        self.sock: socket.socket = nl.open_socket(RCVBUF, netns)
        self.sock.settimeout(TIMEOUT)
        self._seq = 1

    def _next(self, n: int) -> int:
        seq = self._seq
        self._seq = (self._seq + n) & 0x7FFFFFFF or 1
        return seq

    def write(self, writes: Iterable[Write]) -> None:
        """Every element of `writes` in the kernel, acknowledged, before this returns;
        DataplaneError when the kernel refuses (a set that does not exist, say)."""
        todo = [w for w in writes if w.elements]
        if not todo:
            return
        try:
            if self.kind == "ipset":
                count = sum(len(w.elements) for w in todo)
                seq = self._next(count)
                msgs = [
                    ipset_add(seq + i, w.set_name, a, t)
                    for i, (w, (a, t)) in enumerate((w, e) for w in todo for e in w.elements)
                ]
                nl.request(self.sock, b"".join(msgs), range(seq, seq + count), "ipset add")
            else:
                n = 2 + 3 * len(todo)
                payload, acked, frame = nft_batch(self._next(n), self.table, todo)
                nl.request(self.sock, payload, acked, "nft set element update", frame)
        except OSError as exc:
            raise DataplaneError(f"the kernel refused the name set update: {exc}") from exc

    def close(self) -> None:
        self.sock.close()
