"""A small iptables interpreter for the tests, independent of the compiler and explain.

It reads rendered `iptables-restore` text the way the kernel would walk it for the first
packet of a new connection, for exactly the matches our renderer may emit, and refuses any
option it does not know, so a renderer change cannot slip past it unnoticed.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    protocol: str  # tcp | udp | icmp | icmpv6
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


def parse_restore(text: str) -> dict[str, list[list[str]]]:
    chains: dict[str, list[list[str]]] = {"FORWARD": []}
    for line in text.splitlines():
        if not line or line.startswith(("#", "*", "COMMIT")):
            continue
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
            continue
        words = shlex.split(line)
        if words[0] == "-A":
            chains[words[1]].append(words[2:])
        elif words[0] == "-I":
            chains[words[1]].insert(int(words[2]) - 1, words[3:])
        else:
            raise AssertionError(f"unexpected line {line!r}")
    return chains


def _in_net(addr: str, spec: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(spec, strict=False)


def _in_range(addr: str, spec: str) -> bool:
    lo, hi = spec.split("-")
    a = ipaddress.ip_address(addr)
    low, high = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
    return a.version == low.version and low <= a <= high


def _ports(spec: str, port: int | None) -> bool:
    if port is None:
        return False
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def _matches(words: list[str], pkt: Packet) -> tuple[bool, str, list[str]]:
    """Whether the rule matches, its target, and the target's options."""
    i = 0
    ok = True
    proto_names = {"icmp": "icmp", "ipv6-icmp": "icmpv6", "tcp": "tcp", "udp": "udp"}
    while i < len(words):
        w = words[i]
        if w == "-j":
            return ok, words[i + 1], words[i + 2 :]
        if w == "-s":
            ok &= _in_net(pkt.src, words[i + 1])
            i += 2
        elif w == "-d":
            ok &= _in_net(pkt.dst, words[i + 1])
            i += 2
        elif w == "-p":
            ok &= proto_names[words[i + 1]] == pkt.protocol
            i += 2
        elif w == "-m":
            module = words[i + 1]
            i += 2
            if module == "comment":
                assert words[i] == "--comment"
                i += 2
            elif module == "conntrack":
                assert words[i] == "--ctstate"
                # The first packet of a connection is NEW.
                ok &= "NEW" in words[i + 1].split(",")
                i += 2
            elif module == "limit":
                assert words[i] == "--limit"
                i += 2
            elif module == "iprange":
                assert words[i] == "--dst-range"
                ok &= _in_range(pkt.dst, words[i + 1])
                i += 2
            elif module in ("tcp", "udp"):
                assert words[i] == "--dport"
                ok &= _ports(words[i + 1], pkt.port)
                i += 2
            elif module == "multiport":
                assert words[i] == "--dports"
                ok &= _ports(words[i + 1], pkt.port)
                i += 2
            elif module in ("icmp", "icmp6"):
                assert words[i] in ("--icmp-type", "--icmpv6-type")
                t, _, code = words[i + 1].partition("/")
                ok &= pkt.icmp_type == int(t) and (not code or pkt.icmp_code == int(code))
                i += 2
            else:
                raise AssertionError(f"unknown match module {module}")
        else:
            raise AssertionError(f"unknown option {w}")
    # No target: iptables goes on to the next rule (our ownership marker is such a rule).
    return ok, "", []


def verdict(chains: dict[str, list[list[str]]], pkt: Packet, chain: str = "FORWARD") -> str:
    """ACCEPT, REJECT or DROP for the packet, or RETURN if it falls off FORWARD."""
    for words in chains.get(chain, []):
        ok, target, _ = _matches(words, pkt)
        if not ok or target in ("", "LOG"):
            continue
        if target in ("ACCEPT", "REJECT", "DROP"):
            return target
        result = verdict(chains, pkt, target)
        if result != "RETURN":
            return result
    return "RETURN"
