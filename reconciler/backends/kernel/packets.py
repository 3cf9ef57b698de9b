"""IPv4/IPv6 packets as the kernel hands them to us (NFLOG copies, NFQUEUE holds): pure.

One parser for both readers: the flow collector keys flows on addresses, protocol and
destination port (`parse_packet`); the DNS interception also needs the source port and the
transport payload (`parse_segment`).  Every offset is checked against the bytes we have: a
packet cut short (NFLOG's copy range) or malformed yields None or fewer fields, never an
exception.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
TCP = 6
UDP = 17
_PORTED = frozenset({6, 17, 132})
_IPV6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options


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


@dataclass(frozen=True, slots=True)
class Segment:
    """A UDP datagram or TCP segment: both ends and what it carries past its header."""

    family: int
    protocol: int
    source: str
    sport: int
    destination: str
    dport: int
    data: bytes


def _ip(payload: bytes) -> tuple[int, bytes, bytes, int, int | None] | None:
    """(family, source, destination, protocol, transport offset or None) of an IP packet."""
    if len(payload) < 1:
        return None
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            return None
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20 or len(payload) < ihl:
            return None
        fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        return 4, payload[12:16], payload[16:20], payload[9], None if fragment else ihl
    if version == 6:
        if len(payload) < 40:
            return None
        protocol = payload[6]
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
        return 6, payload[8:24], payload[24:40], protocol, offset
    return None


def parse_packet(payload: bytes) -> PacketHeader | None:
    """Addresses, protocol and destination port of an IPv4 or IPv6 packet's first bytes;
    None when they are not a whole IP header.  The port is None for ICMP, for protocols
    without ports, for a non-first fragment and when the transport header was cut off."""
    ip = _ip(payload)
    if ip is None:
        return None
    family, src, dst, protocol, start = ip
    port = None
    if start is not None and protocol in _PORTED and len(payload) >= start + 4:
        port = struct.unpack_from("!H", payload, start + 2)[0]
    return PacketHeader(
        family, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), protocol, port
    )


def parse_segment(payload: bytes) -> Segment | None:
    """The UDP or TCP segment in a whole IP packet; None for anything else (other
    protocols, fragments, a header cut short).  UDP's data ends where its length says; TCP's
    starts past its data offset (options included)."""
    ip = _ip(payload)
    if ip is None:
        return None
    family, src, dst, protocol, start = ip
    if start is None or protocol not in (TCP, UDP):
        return None
    if protocol == UDP:
        if len(payload) < start + 8:
            return None
        sport, dport, length = struct.unpack_from("!HHH", payload, start)
        if length < 8 or start + length > len(payload):
            return None
        data = payload[start + 8 : start + length]
    else:
        if len(payload) < start + 20:
            return None
        sport, dport = struct.unpack_from("!HH", payload, start)
        offset = (payload[start + 12] >> 4) * 4
        if offset < 20 or start + offset > len(payload):
            return None
        data = payload[start + offset :]
    return Segment(
        family,
        protocol,
        str(ipaddress.ip_address(src)),
        sport,
        str(ipaddress.ip_address(dst)),
        dport,
        data,
    )
