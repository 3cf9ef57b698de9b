"""nftables' ruleset generation id: the one number that says whether anything changed.

The kernel counts every committed nftables transaction in a network namespace, whoever sends
it (nft, iptables-nft, any other program).  Asking for the count (NFT_MSG_GETGEN over
netlink) costs microseconds; listing our table costs tens of milliseconds at best and tens of
seconds at a million elements.  Equal ids before and after mean nothing changed, which lets
the nftables backend keep a state it read (or a state it wrote, when the id moved by exactly
its own one transaction) instead of listing again.

The socket is made inside the target namespace by a short-lived thread (setns(2) moves only
the calling thread, and a socket keeps the namespace it was made in), so the caller never
leaves its own.  Every failure answers None, and the caller lists the table as it would
without this.  (The iptables backend has the same probe in `generation`, written alongside;
the two should become one.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

_CLONE_NEWNET = 0x40000000
_NETLINK_NETFILTER = 12
_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN
_NEWGEN = (10 << 8) | 15  # NFT_MSG_NEWGEN
_NLM_F_REQUEST = 1
_NFTA_GEN_ID = 1
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ATTR = struct.Struct("=HH")  # struct nlattr


def _netlink_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    made: dict[str, socket.socket | OSError] = {}

    def create() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if hasattr(os, "setns"):
                    os.setns(fd, _CLONE_NEWNET)
                elif ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made["socket"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        except OSError as exc:
            made["error"] = exc

    worker = threading.Thread(target=create, name=f"nftgen-{netns}")
    worker.start()
    worker.join()
    result = made.get("socket") or made.get("error")
    if isinstance(result, OSError) or result is None:
        raise result or OSError("no socket")
    return result


@dataclass
class GenerationProbe:
    """Asks one namespace's kernel for its nftables generation id; None when it cannot."""

    netns: str | None
    _sock: socket.socket | None = field(default=None, repr=False)
    _seq: int = 0
    _broken: bool = False

    def generation(self) -> int | None:
        if self._broken:
            return None
        try:
            if self._sock is None:
                self._sock = _netlink_socket(self.netns)
                self._sock.settimeout(2.0)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            # nlmsghdr, then struct nfgenmsg {AF_UNSPEC, version 0, res_id 0}.
            self._sock.send(_HEADER.pack(20, _GETGEN, _NLM_F_REQUEST, self._seq, 0) + bytes(4))
            while True:
                data = self._sock.recv(65536)
                length, kind, _, seq, _ = _HEADER.unpack_from(data)
                if seq == self._seq:
                    break
        except OSError:
            self._broken = True
            self.close()
            return None
        if kind != _NEWGEN:
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

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
