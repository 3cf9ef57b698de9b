"""Two cheap questions to the kernel that can spare a full `iptables-save` and its parse.

* nftables counts every committed transaction in a network namespace: its *generation id*
  (NFT_MSG_GETGEN over netlink, about 10 µs).  Equal ids mean nothing in any nftables table
  changed in between, which is what lets an iptables-nft backend trust a state it read
  before; `iptables-nft-save` of a 500k-rule cell costs hundreds of milliseconds.
* A legacy x_tables table reports its entry count (IPT_SO_GET_INFO).  An empty `filter`
  table (three built-in policies and the terminating entry) holds nothing of ours, so the
  read of a family without containers needs no `ip6tables-legacy-save` process.
* Legacy tables have no generation, but the kernel hands out the table itself
  (IPT_SO_GET_ENTRIES: what iptables-legacy-save fetches before it formats every rule as
  text).  Its bytes, packet and byte counters left out, are equal exactly when the rules are:
  a few times cheaper than the save and its parse, and exact.

Both answers come from sockets made inside the cell's network namespace: a socket keeps the
namespace it was created in, so only the short-lived thread that creates it enters the
namespace (setns(2) moves only the calling thread), and the caller never leaves its own.
Every failure is answered with None: the caller then reads the kernel in full, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from dataclasses import dataclass

from reconciler.backends.kernel.nsthread import libc, run_in_netns

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETGEN = 16
_NFT_MSG_NEWGEN = 15
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NFTA_GEN_ID = 1
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ATTR = struct.Struct("=HH")  # struct nlattr

# x_tables getsockopt: IPT_SO_GET_INFO / IP6T_SO_GET_INFO, at SOL_IP / SOL_IPV6.
_SO_GET_INFO = 64
_LEVEL = {4: socket.IPPROTO_IP, 6: socket.IPPROTO_IPV6}
_SO_GET_ENTRIES = 65
_GETINFO_SIZE = 84  # name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_NUM_ENTRIES_AT = 76
_TABLE_SIZE_AT = 80
_ENTRIES_AT = 40  # struct ipt_get_entries: name[32], size, then the entries, 8-aligned
# Per family, in struct ipt_entry / ip6t_entry: where next_offset is, where the counters are.
_NEXT_OFFSET_AT = {4: 90, 6: 142}
_COUNTERS_AT = {4: 96, 6: 152}
_COUNTERS_SIZE = 16
_NEXT = struct.Struct("=H")
EMPTY_FILTER_ENTRIES = 4
"""INPUT, FORWARD and OUTPUT policies plus the table's end: no rule and no user chain."""


def socket_in(netns: str | None, family: int, kind: int, proto: int) -> socket.socket:
    """A socket in network namespace `netns` (None: the caller's own)."""
    if netns is None:
        return socket.socket(family, kind, proto)
    return run_in_netns(netns, socket.socket, family, kind, proto)


CHUNK_ENTRIES = 64
"""Entries per chunk of a legacy table token: compared as raw bytes first, cut only if not."""


@dataclass(frozen=True, eq=False)
class TableLayout:
    """Where a legacy table's entries keep their counters, in chunks of whole entries: each
    chunk's span, a Struct that cuts it into the bytes between counters, and where each of
    those pieces starts."""

    size: int
    chunks: tuple[tuple[int, int, struct.Struct, tuple[int, ...]], ...]


class TableToken:
    """A legacy table as the kernel handed it out, equal to another exactly when their rules
    are (counters aside).

    Both are read along `layout`, the entry layout of the one remembered after a full read
    (`legacy_token(relayout=True)`), which compares as `remembered == newer`.  Chunks whose
    bytes are equal need nothing more; in the others only counters may differ: the newer
    table must hold the remembered one's pieces between counters, each where it was.  Equal
    bytes outside the remembered table's counters include every entry's length, so the
    layouts are the same and the comparison is exact.  Counters move only where packets go (a
    busy container's chain, a destination just reached), so most chunks of a large table
    compare as raw bytes; the remembered token cuts a chunk once, and a newer one is never
    cut (it is only searched, in C, allocating nothing).
    """

    __slots__ = ("_cuts", "layout", "raw")

    def __init__(self, layout: TableLayout, raw: bytes) -> None:
        self.layout = layout
        self.raw = raw
        self._cuts: dict[int, tuple[bytes, ...]] = {}

    def _cut(self, index: int) -> tuple[bytes, ...]:
        cut = self._cuts.get(index)
        if cut is None:
            lo, _, pieces, _ = self.layout.chunks[index]
            cut = self._cuts[index] = pieces.unpack_from(self.raw, lo)
        return cut

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TableToken) or other.layout is not self.layout:
            return False
        mine, theirs = self.raw, other.raw
        if mine == theirs:
            return True
        if len(mine) != len(theirs):
            return False
        view = memoryview(mine)
        holds = theirs.startswith
        for index, (lo, hi, _, starts) in enumerate(self.layout.chunks):
            if not holds(view[lo:hi], lo) and not all(map(holds, self._cut(index), starts)):
                return False
        return True

    def __hash__(self) -> int:
        return hash((id(self.layout), len(self.raw)))


def _layout(entries: memoryview, family: int) -> TableLayout | None:
    """The entry layout of a table (see TableLayout), or None if its entries do not add up."""
    size = len(entries)
    next_at, counters = _NEXT_OFFSET_AT[family], _COUNTERS_AT[family]
    starts, at = [], 0
    while at < size:
        if at + next_at + 2 > size:
            return None
        starts.append(at)
        step = _NEXT.unpack_from(entries, at + next_at)[0]
        if step <= 0:
            return None
        at += step
    if at != size:
        return None
    chunks = []
    for first in range(0, len(starts), CHUNK_ENTRIES):
        group = starts[first : first + CHUNK_ENTRIES]
        lo = group[0]
        hi = starts[first + CHUNK_ENTRIES] if first + CHUNK_ENTRIES < len(starts) else size
        formats, kept, pieces = [], lo, [lo]
        for start in group:
            formats.append(f"{start + counters - kept}s{_COUNTERS_SIZE}x")
            kept = start + counters + _COUNTERS_SIZE
            pieces.append(kept)
        formats.append(f"{hi - kept}s")
        chunks.append((lo, hi, struct.Struct("=" + "".join(formats)), tuple(pieces)))
    return TableLayout(size, tuple(chunks))


class KernelProbe:
    """The generation id and legacy entry counts of one network namespace.

    Sockets are opened on first use and kept; `close` releases them.  `netns` None means the
    caller's namespace.
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._netlink: socket.socket | None = None
        self._raw: dict[int, socket.socket] = {}
        self._layouts: dict[tuple[int, str], TableLayout] = {}
        self._buffers: dict[tuple[int, str], ctypes.Array[ctypes.c_char]] = {}
        self._seq = 0
        self._broken = False

    def generation(self) -> int | None:
        """nftables' ruleset generation id in the namespace, or None if it cannot be had."""
        if self._broken:
            return None
        try:
            if self._netlink is None:
                self._netlink = socket_in(
                    self.netns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER
                )
                self._netlink.settimeout(2.0)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            kind = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETGEN
            # nlmsghdr, then struct nfgenmsg {family AF_UNSPEC, version 0, res_id 0}.
            self._netlink.send(_HEADER.pack(20, kind, _NLM_F_REQUEST, self._seq, 0) + bytes(4))
            while True:
                data = self._netlink.recv(65536)
                length, kind, _, seq, _ = _HEADER.unpack_from(data)
                if seq == self._seq:
                    break
        except OSError:
            self._broken = True
            return None
        if kind != (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWGEN:
            return None
        at = _HEADER.size + 4
        while at + _ATTR.size <= min(length, len(data)):
            size, attr = _ATTR.unpack_from(data, at)
            if size < _ATTR.size:
                return None
            if attr & 0x3FFF == _NFTA_GEN_ID and size >= _ATTR.size + 4:
                return int.from_bytes(data[at + 4 : at + 8], "big")
            at += (size + 3) & ~3
        return None

    def legacy_entries(self, family: int, table: str = "filter") -> int | None:
        """Entries in a legacy x_tables table (rules, chain heads and ends), or None."""
        info = self._legacy_info(family, table)
        return None if info is None else struct.unpack_from("=I", info, _NUM_ENTRIES_AT)[0]

    def legacy_token(
        self, family: int, table: str = "filter", *, relayout: bool = False
    ) -> TableToken | None:
        """A token equal exactly when a legacy table's rules are (counters aside), or None.

        The table is fetched whole (the kernel hands out nothing smaller) and compared along
        the entry layout of a table read before (see TableToken).  Walking the entries to find
        the layout costs more than a comparison, so it is done only with `relayout` (for a
        token to remember, after a full read) or when the size changed (the table did too).
        Tokens read along different layouts never compare equal.
        """
        for _ in range(3):  # the table may be replaced between the two calls: ask again
            info = self._legacy_info(family, table)
            if info is None:
                return None
            size = struct.unpack_from("=I", info, _TABLE_SIZE_AT)[0]
            # One buffer per table, kept while the size holds: the kernel then writes into
            # pages already mapped (a 500k cell's table is 10 MB, 2,500 page faults).
            buf = self._buffers.get((family, table))
            if buf is None or len(buf) != _ENTRIES_AT + size:
                buf = ctypes.create_string_buffer(_ENTRIES_AT + size)
                self._buffers[(family, table)] = buf
            buf[: len(table)] = table.encode()  # type: ignore[call-overload]  # ctypes stubs
            buf[len(table)] = b"\0"
            struct.pack_into("=I", buf, 32, size)
            if self._getsockopt(family, _SO_GET_ENTRIES, buf):
                break
        else:
            return None
        entries = memoryview(buf).cast("B")[_ENTRIES_AT : _ENTRIES_AT + size]
        layout = self._layouts.get((family, table))
        if relayout or layout is None or layout.size != size:
            layout = _layout(entries, family)
            if layout is None:
                return None
            self._layouts[(family, table)] = layout
        return TableToken(layout, entries.tobytes())

    def _legacy_info(self, family: int, table: str) -> ctypes.Array[ctypes.c_char] | None:
        buf = ctypes.create_string_buffer(table.encode(), _GETINFO_SIZE)
        return buf if self._getsockopt(family, _SO_GET_INFO, buf) else None

    def _getsockopt(self, family: int, option: int, buf: ctypes.Array[ctypes.c_char]) -> bool:
        """x_tables' getsockopt, which reads the table name from the very buffer it fills:
        socket.getsockopt cannot pass one in, hence libc."""
        try:
            raw = self._raw.get(family)
            if raw is None:
                af = socket.AF_INET if family == 4 else socket.AF_INET6
                raw = self._raw[family] = socket_in(
                    self.netns, af, socket.SOCK_RAW, socket.IPPROTO_RAW
                )
        except OSError:
            return False
        size = ctypes.c_uint(len(buf))
        level = _LEVEL[family]
        return bool(libc().getsockopt(raw.fileno(), level, option, buf, ctypes.byref(size)) == 0)

    def __del__(self) -> None:  # a backend dropped without closing: no ResourceWarning
        self.close()

    def close(self) -> None:
        for sock in (self._netlink, *self._raw.values()):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._netlink = None
        self._raw.clear()
        self._buffers.clear()
