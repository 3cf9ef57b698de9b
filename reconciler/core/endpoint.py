"""The `IP[:PORT][/PROTO]` / `NAME[:PORT][/PROTO]` notation shared by `asgctl explain`,
policy tests and the lab."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from reconciler.core.model import address_text
from reconciler.core.names import fqdn_entry

_PORT_PROTOCOLS = ("tcp", "udp")
_ALL_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
_BRACKETED = re.compile(r"^\[(?P<ip>[0-9A-Fa-f:.]+)\](?::(?P<port>[0-9]{1,5}))?$")
_PLAIN = re.compile(r"^(?P<ip>[0-9.]+)(?::(?P<port>[0-9]{1,5}))?$")
_NAME = re.compile(r"^(?P<name>[^:\[\]/]+)(?::(?P<port>[0-9]{1,5}))?$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A concrete packet's destination: what a policy decision is asked about."""

    version: int
    address: int
    protocol: str
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    fqdn: str = ""
    """A destination asked about by DNS name: then `address` means nothing, and `version` is
    the family the protocol implies (4 for icmp, 6 for icmpv6) or 0 for either."""

    @property
    def address_text(self) -> str:
        return self.fqdn or address_text(self.version, self.address)

    def __str__(self) -> str:
        if self.fqdn:
            text = self.fqdn if self.port is None else f"{self.fqdn}:{self.port}"
            return f"{text}/{self.protocol}"
        addr = self.address_text
        if self.version == 6 and self.port is not None:
            addr = f"[{addr}]"
        text = addr if self.port is None else f"{addr}:{self.port}"
        return f"{text}/{self.protocol}"


def parse_endpoint(
    text: str, icmp_type: int | None = None, icmp_code: int | None = None
) -> Endpoint:
    """Parse `198.18.0.1:443/tcp`, `[fd00::1]:53/udp`, `fd00::1/icmpv6`, `198.18.0.1/icmp`.

    A port without a protocol means TCP.  ICMP without a type means an echo request (the ping
    most people test with).  Raises ValueError with a message fit for a user.
    """
    body, _, proto = text.strip().partition("/")
    proto = proto.lower()
    match = _BRACKETED.match(body) or _PLAIN.match(body)
    named = _NAME.match(body) if match is None else None
    if named is not None and not _is_address(body):
        return _name_endpoint(text, named["name"], named["port"], proto, icmp_type, icmp_code)
    if match is None:
        try:
            ip = ipaddress.ip_address(body)
        except ValueError:
            raise ValueError(f"{text!r} is not IP[:PORT][/PROTO]") from None
        port_text = None
    else:
        try:
            ip = ipaddress.ip_address(match["ip"])
        except ValueError:
            raise ValueError(f"{match['ip']!r} is not an IP address") from None
        port_text = match["port"]
    port, proto, icmp_type, icmp_code = _rest(text, port_text, proto, icmp_type, icmp_code)
    if proto == "icmp" and ip.version != 4:
        raise ValueError("icmp needs an IPv4 address (use icmpv6)")
    if proto == "icmpv6" and ip.version != 6:
        raise ValueError("icmpv6 needs an IPv6 address")
    return Endpoint(ip.version, int(ip), proto, port, icmp_type, icmp_code)


def _rest(
    text: str,
    port_text: str | None,
    proto: str,
    icmp_type: int | None,
    icmp_code: int | None,
) -> tuple[int | None, str, int | None, int | None]:
    """Port, protocol and ICMP type/code of an endpoint, by address or by name alike."""
    port = int(port_text) if port_text is not None else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    if not proto:
        if port is None:
            raise ValueError(f"{text!r}: give a port (for tcp) or a protocol, e.g. /icmp")
        proto = "tcp"
    if proto not in _ALL_PROTOCOLS:
        raise ValueError(f"protocol {proto!r} must be one of {', '.join(_ALL_PROTOCOLS)}")
    if proto in _PORT_PROTOCOLS and port is None:
        raise ValueError(f"{text!r}: {proto} needs a port")
    if proto not in _PORT_PROTOCOLS and port is not None:
        raise ValueError(f"{text!r}: {proto} takes no port")
    if proto in ("icmp", "icmpv6"):
        echo = 8 if proto == "icmp" else 128
        icmp_type = echo if icmp_type is None else icmp_type
        icmp_code = 0 if icmp_code is None else icmp_code
    else:
        icmp_type = icmp_code = None
    return port, proto, icmp_type, icmp_code


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _name_endpoint(
    text: str,
    name: str,
    port_text: str | None,
    proto: str,
    icmp_type: int | None,
    icmp_code: int | None,
) -> Endpoint:
    """`db.example.com:5432`, `db.example.com:53/udp`, `db.example.com/icmp`: a concrete
    host name (validated as a Destination's fqdns are; a wildcard is not a destination)."""
    fqdn, problem = fqdn_entry(name)
    if problem is not None or fqdn is None:
        raise ValueError(f"{text!r} is not IP[:PORT][/PROTO] or NAME[:PORT][/PROTO]: {problem}")
    if fqdn.startswith("*."):
        raise ValueError(f"{text!r}: ask about one name (db.example.com), not a wildcard")
    port, proto, icmp_type, icmp_code = _rest(text, port_text, proto, icmp_type, icmp_code)
    version = {"icmp": 4, "icmpv6": 6}.get(proto, 0)
    return Endpoint(version, 0, proto, port, icmp_type, icmp_code, fqdn)
