"""Cloud Foundry's security group rule grammar, as Cloud Controller validates it.

Operators already know Cloud Controller's error messages from `cf create-security-group`, so
every message that CF has is reproduced here word for word (from cloud_controller_ng's
`app/messages/validators/security_group_rule_validator.rb`, `lib/cloud_controller/
rule_validator.rb`, `transport_rule_validator.rb` and `icmp_rule_validator.rb`).  The grammar is
CF's with IPv6 and comma-delimited destinations enabled, because our policy format supports both.

Where CF's parser has quirks that would make the firewall mean something other than what was
written, this module is stricter and says so in its own words:

* a CIDR prefix with a leading zero (`10.0.0.0/024`) is rejected: Ruby reads it as octal (/20);
* extra `/` parts (`10.0.0.0/8/9`), empty octets (`1..2.3`) and a trailing `-` are rejected
  (CF's NetAddr and Ruby's `split` silently drop them);
* IPv6 zone ids (`fe80::1%eth0`) are rejected: a zone is meaningless in an iptables rule;
* only ASCII digits count as digits, so `"８０"` is not port 80.

Where CF reports one mistake twice (a missing `code` is both "required" and "not an integer";
an empty comma item is both "empty" and "invalid"), we report it once, and identical findings
are reported once: one mistake, one message.

Extensions for our YAML (CF JSON keeps working unchanged): `destination` may be a list of
strings and `ports` an integer or a list of integers/strings, each list entry obeying the
grammar of one comma-separated item.

Everything here is pure and never raises, whatever object it is given: it is fed raw YAML.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.core.model import PROTOCOLS, AddressRange, Location, PortRange, Rule

__all__ = [
    "ALLOWED_RULE_KEYS",
    "CF_MODEL_KEYS",
    "MAX_DESTINATIONS_PER_RULE",
    "FieldError",
    "cf_exact_errors",
    "host_bits_notes",
    "parse_destination_ips",
    "parse_port_ranges",
    "parse_rule",
]

ALLOWED_RULE_KEYS: tuple[str, ...] = (
    "protocol",
    "destination",
    "ports",
    "type",
    "code",
    "log",
    "description",
)
_ALLOWED_KEY_SET = frozenset(ALLOWED_RULE_KEYS)
MAX_DESTINATIONS_PER_RULE = 6000
MSG_TOO_MANY_IPS = f"at most {MAX_DESTINATIONS_PER_RULE} ips per destination"
MIN_PORT, MAX_PORT = 1, 65535
MIN_ICMP, MAX_ICMP = -1, 255

# Cloud Controller's messages (comma-delimited destinations and IPv6 enabled).
MSG_NOT_OBJECT = "must be an object"
MSG_PROTOCOL = "protocol must be 'tcp', 'udp', 'icmp', 'icmpv6' or 'all'"
MSG_DEST_NIL = (
    "nil destination; destination must be a comma-delimited list of valid CIDRs, "
    "IP addresses, or IP address ranges"
)
MSG_DEST_NOT_STRING = "destination must be a string"
MSG_DEST_WHITESPACE = "destination must not contain whitespace"
MSG_DEST_INVALID = "destination must contain valid CIDR(s), IP address(es), or IP address range(s)"
MSG_DEST_EMPTY_ITEM = "empty destination specified in comma-delimited list"
MSG_DEST_LEADING_ZEROS = "destination octets cannot contain leading zeros"
MSG_DEST_RANGE_INVALID = "destination IP address range is invalid"
MSG_DEST_INVERTED = (
    "beginning of IP address range is numerically greater than the end of its range "
    "(range endpoints are inverted)"
)
MSG_DEST_TOO_MANY = (
    f"maximum destinations per rule exceeded - must be under {MAX_DESTINATIONS_PER_RULE}"
)
MSG_PORTS_REQUIRED = "ports are required for protocols of type TCP and UDP"
MSG_PORTS_INVALID = (
    "ports must be a valid single port, comma separated list of ports, or range or ports, "
    "formatted as a string"
)
MSG_CODE_REQUIRED = "code is required for protocols of type ICMP"
MSG_CODE_INVALID = "code must be an integer between -1 and 255 (inclusive)"
MSG_TYPE_REQUIRED = "type is required for protocols of type ICMP"
MSG_TYPE_INVALID = "type must be an integer between -1 and 255 (inclusive)"
MSG_LOG = "log must be a boolean"
MSG_DESCRIPTION = "description must be a string"

# Cloud Controller's model validator (`app/models/runtime/security_group.rb#validate_rules` with
# `lib/cloud_controller/rule_validator.rb`, `transport_rule_validator.rb`,
# `icmp_rule_validator.rb`): after the request validator above, the model takes only these keys
# per protocol (`required_fields + optional_fields`), whatever their value, and `log` /
# `description` must be a boolean / string whenever the key is present, even `null`.
_MODEL_BASE = frozenset(("protocol", "destination", "log", "description"))
CF_MODEL_KEYS: dict[str, frozenset[str]] = {
    "tcp": _MODEL_BASE | {"ports"},
    "udp": _MODEL_BASE | {"ports"},
    "icmp": _MODEL_BASE | {"type", "code"},
    "icmpv6": _MODEL_BASE | {"type", "code"},
    "all": _MODEL_BASE,
}
MSG_MODEL_LOG = "contains invalid log value"
MSG_MODEL_DESCRIPTION = "contains invalid description"

# Our own messages, for forms CF does not have (YAML lists, integer ports), in CF's style.
MSG_DEST_EMPTY_LIST = "destination must not be an empty list"
MSG_PORTS_EMPTY_LIST = "ports must not be an empty list"
MSG_PORTS_ENTRY_TYPE = "ports list entries must be integers or strings"


def msg_unknown_fields(keys: list[str]) -> str:
    """CF prints the offending keys as a Ruby array: `unknown field(s): ["a", "b"]`."""
    return f"unknown field(s): {json.dumps(keys, ensure_ascii=False)}"


def msg_invalid_field(key: str) -> str:
    """The model validator's words (`rule number N contains the invalid field 'type'`)."""
    return f"contains the invalid field '{key}'"


def msg_host_bits(item: str, network: str, first: str, last: str) -> str:
    return f"{item} has host bits set: it means {network} ({first}-{last})"


def msg_wrong_ip_version(protocol: str, version: int) -> str:
    return f'for protocol "{protocol}" you cannot use IPv{version} addresses'


def msg_ports_not_allowed(protocol: str) -> str:
    """CF has this for `all`; we apply the same words to icmp and icmpv6, where CF is silent."""
    return f"ports are not allowed for protocols of type {protocol}"


def msg_port_out_of_range(port: int) -> str:
    return f"invalid port {port}, must be in range {MIN_PORT}-{MAX_PORT}"


def msg_port_list_entry(entry: str) -> str:
    return (
        f"invalid port '{_show(entry)}' in ports list: each entry must be a single port "
        f"between {MIN_PORT} and {MAX_PORT}"
    )


@dataclass(frozen=True)
class FieldError:
    """One finding about a rule, in CF's words where CF has them.

    `field` names the rule key the message is about (None for the rule as a whole) so that the
    caller can point at the exact YAML line.  `item` is the offending entry of a destination or
    ports list when the message is about one entry: CF's messages do not name it, and in a list
    of hundreds of addresses the operator needs to know which one is wrong.
    """

    field: str | None
    message: str
    item: str | None = None


# --------------------------------------------------------------------------------------------
# Low-level, ASCII-only lexing.  str.isdigit() and int() accept other scripts' digits ("８０"),
# and Python's ipaddress accepts IPv6 zone ids; a firewall must not.

_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_V6_CHARS = _HEX | frozenset(":.")
# Ruby's \s, which is what CF's regexes use.
_ASCII_WS = " \t\n\r\f\v"
_WS = frozenset(_ASCII_WS)
_S = r"[ \t\n\r\f\v]*"
_PORT_RANGE_RE = re.compile(rf"{_S}([0-9]+){_S}-{_S}([0-9]+){_S}")
_PORT_SINGLE_RE = re.compile(rf"{_S}([0-9]+){_S}")
_PORT_CHARS = _DIGITS | _WS | frozenset("-,")


def _is_digits(text: str) -> bool:
    return bool(text) and all(c in _DIGITS for c in text)


def _digits_value(text: str, limit_digits: int) -> int | None:
    """The value of an ASCII digit string, or None when it has more than `limit_digits`
    significant digits (which also keeps int() away from its 4300-digit ValueError)."""
    significant = text.lstrip("0") or "0"
    if len(significant) > limit_digits:
        return None
    return int(significant)


def _show(value: object, limit: int = 64) -> str:
    """A short printable rendering of a user value for messages."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _absent(value: object) -> bool:
    """CF tests optional keys with Ruby truthiness, so `null` and `false` mean "not given"."""
    return value is None or value is False


def _as_int(value: object) -> int | None:
    """JSON integers only: bool is an int subclass in Python but not an Integer in Ruby."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _key_text(key: object) -> str:
    """A mapping key as text for messages (YAML allows non-string keys; JSON does not)."""
    return key if isinstance(key, str) else _show(key)


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[FieldError] = set()
    out: list[FieldError] = []
    for err in errors:
        if err not in seen:
            seen.add(err)
            out.append(err)
    return out


# --------------------------------------------------------------------------------------------
# Addresses


def _leading_zero_octets(text: str) -> bool:
    """CF's rule: a dotted-decimal octet of more than one character may not start with 0.

    Applied to the address and to a dotted netmask, and to the IPv4 tail of an IPv6 address;
    IPv6 hex groups may have leading zeros (CF allows `2001:0db8::1`).
    """
    for part in text.split("/"):
        dotted = part.rsplit(":", 1)[-1]
        if "." not in dotted:
            continue
        for octet in dotted.split("."):
            if len(octet) > 1 and octet[0] == "0" and _is_digits(octet):
                return True
    return False


def _parse_ipv4(text: str) -> int | None:
    """Dotted quad to int; leading zeros are read as decimal here (and reported separately)."""
    octets = text.split(".")
    if len(octets) != 4:
        return None
    value = 0
    for octet in octets:
        if not _is_digits(octet) or len(octet) > 3:
            return None
        n = int(octet)
        if n > 255:
            return None
        value = (value << 8) | n
    return value


def _parse_ipv6(text: str) -> int | None:
    """RFC 4291 text form to int: hex groups, one `::`, optional dotted IPv4 tail; no zone."""
    if not text or any(c not in _V6_CHARS for c in text):
        return None
    if "." in text:
        head, sep, tail = text.rpartition(":")
        v4 = _parse_ipv4(tail)
        if not sep or v4 is None:
            return None
        text = f"{head}:{v4 >> 16:x}:{v4 & 0xFFFF:x}"
    if text.count("::") > 1:
        return None
    if "::" in text:
        left, right = text.split("::")
        left_groups = left.split(":") if left else []
        right_groups = right.split(":") if right else []
        if len(left_groups) + len(right_groups) > 7:
            return None
        groups = left_groups + ["0"] * (8 - len(left_groups) - len(right_groups)) + right_groups
    else:
        groups = text.split(":")
        if len(groups) != 8:
            return None
    value = 0
    for group in groups:
        if not 1 <= len(group) <= 4 or any(c not in _HEX for c in group):
            return None
        value = (value << 16) | int(group, 16)
    return value


def _parse_address(text: str) -> tuple[int, int] | None:
    """A plain address (no prefix) as (version, integer)."""
    v4 = _parse_ipv4(text)
    if v4 is not None:
        return 4, v4
    v6 = _parse_ipv6(text)
    if v6 is not None:
        return 6, v6
    return None


def _parse_prefix(text: str, version: int) -> int | None:
    """A CIDR prefix: decimal without leading zeros, or (IPv4) a contiguous dotted netmask."""
    bits = 32 if version == 4 else 128
    if _is_digits(text):
        if len(text) > 1 and text[0] == "0":
            return None  # Ruby's Integer() would read "024" as octal 20
        n = _digits_value(text, 3)
        return n if n is not None and n <= bits else None
    if version == 4:
        mask = _parse_ipv4(text)
        if mask is None:
            return None
        ones = bin(mask).count("1")
        if mask != ((1 << 32) - 1) ^ ((1 << (32 - ones)) - 1):
            return None
        return ones
    return None


def _parse_network(text: str) -> AddressRange | None:
    """An address or CIDR (host bits allowed, as in CF) as the interval it covers."""
    addr_text, sep, prefix_text = text.partition("/")
    parsed = _parse_address(addr_text)
    if parsed is None:
        return None
    version, value = parsed
    bits = 32 if version == 4 else 128
    if not sep:
        return AddressRange(version, value, value)
    prefix = _parse_prefix(prefix_text, version)
    if prefix is None:
        return None
    host = (1 << (bits - prefix)) - 1
    first = value & ~host & ((1 << bits) - 1)
    return AddressRange(version, first, first | host)


@dataclass(frozen=True)
class _Item:
    """The outcome of one destination entry: a range, and/or messages."""

    range: AddressRange | None
    messages: tuple[str, ...]
    version: int | None


def _check_destination_item(item: str) -> _Item:
    """One comma item (or YAML list entry) by CF's `validate_destination`, returning every
    message CF would give, plus the IP version found (for the icmp/icmpv6 check)."""
    if item == "":
        return _Item(None, (MSG_DEST_EMPTY_ITEM,), None)
    messages: list[str] = []
    parts = item.split("-")
    if any(_leading_zero_octets(p) for p in parts):
        messages.append(MSG_DEST_LEADING_ZEROS)
    if len(parts) == 1:
        rng = _parse_network(item)
        if rng is None:
            messages.append(MSG_DEST_INVALID)
            return _Item(None, tuple(messages), None)
        return _Item(None if messages else rng, tuple(messages), rng.version)
    if len(parts) == 2:
        lo, hi = _parse_address(parts[0]), _parse_address(parts[1])
        if lo is None or hi is None or lo[0] != hi[0]:
            messages.append(MSG_DEST_RANGE_INVALID)
            return _Item(None, tuple(messages), None)
        if lo[1] > hi[1]:
            messages.append(MSG_DEST_INVERTED)
        rng = AddressRange(lo[0], lo[1], hi[1]) if not messages else None
        return _Item(rng, tuple(messages), lo[0])
    messages.append(MSG_DEST_INVALID)
    return _Item(None, tuple(messages), None)


def _parse_destination(
    value: object, protocol: str | None
) -> tuple[tuple[AddressRange, ...] | None, list[FieldError]]:
    """The `destination` key: CF's string (comma list) or our YAML list of strings."""
    field = "destination"
    if value is None:
        return None, [FieldError(field, MSG_DEST_NIL)]
    if isinstance(value, str):
        if any(c.isspace() for c in value):
            return None, [FieldError(field, MSG_DEST_WHITESPACE)]
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        if not value:
            return None, [FieldError(field, MSG_DEST_EMPTY_LIST)]
        items = list(value)
    else:
        return None, [FieldError(field, MSG_DEST_NOT_STRING)]

    errors: list[FieldError] = []
    if len(items) > MAX_DESTINATIONS_PER_RULE:
        errors.append(FieldError(field, MSG_DEST_TOO_MANY))
    wanted_version = {"icmp": 4, "icmpv6": 6}.get(protocol or "")
    ranges: list[AddressRange] = []
    for entry in items:
        if not isinstance(entry, str):
            errors.append(FieldError(field, MSG_DEST_NOT_STRING, _show(entry)))
            continue
        if any(c.isspace() for c in entry):
            errors.append(FieldError(field, MSG_DEST_WHITESPACE, _show(entry)))
            continue
        result = _check_destination_item(entry)
        for message in result.messages:
            errors.append(FieldError(field, message, _show(entry)))
        if wanted_version is not None and result.version not in (None, wanted_version):
            message = msg_wrong_ip_version(protocol or "", result.version)
            errors.append(FieldError(field, message, _show(entry)))
        elif result.range is not None:
            ranges.append(result.range)
    if errors:
        return None, errors
    return tuple(sorted(set(ranges))), []


# --------------------------------------------------------------------------------------------
# Ports


def _port(text: str) -> int | None:
    """An ASCII decimal port in 1..65535 (leading zeros are decimal, as in Ruby's to_i)."""
    n = _digits_value(text, 5)
    return n if n is not None and MIN_PORT <= n <= MAX_PORT else None


def _parse_cf_ports(text: str) -> tuple[PortRange, ...] | None:
    """CF's `TransportRuleValidator.validate_port`: "80", "80, 443" or "80-90" (left < right).

    A trailing comma is tolerated as in CF (Ruby's split drops trailing empty strings);
    a range cannot be mixed into a list, and "80-80" is not a range.
    """
    if any(c not in _PORT_CHARS for c in text):
        return None
    match = _PORT_RANGE_RE.fullmatch(text)
    if match:
        left, right = _port(match.group(1)), _port(match.group(2))
        if left is None or right is None or left >= right:
            return None
        return (PortRange(left, right),)
    items = text.split(",")
    while items and items[-1] == "":
        items.pop()
    if not items:
        return None
    ports: set[int] = set()
    for item in items:
        single = _PORT_SINGLE_RE.fullmatch(item)
        port = _port(single.group(1)) if single else None
        if port is None:
            return None
        ports.add(port)
    return tuple(PortRange(p, p) for p in sorted(ports))


def _parse_rule_ports(value: object) -> tuple[tuple[PortRange, ...] | None, list[FieldError]]:
    """The `ports` key of a tcp/udp rule: CF's string, or our integer or list forms."""
    field = "ports"
    if isinstance(value, str):
        parsed = _parse_cf_ports(value)
        if parsed is None:
            return None, [FieldError(field, MSG_PORTS_INVALID)]
        return parsed, []
    number = _as_int(value)
    if number is not None:
        if not MIN_PORT <= number <= MAX_PORT:
            return None, [FieldError(field, msg_port_out_of_range(number))]
        return (PortRange(number, number),), []
    if isinstance(value, list):
        if not value:
            return None, [FieldError(field, MSG_PORTS_EMPTY_LIST)]
        errors: list[FieldError] = []
        ports: set[int] = set()
        for entry in value:
            number = _as_int(entry)
            if number is not None:
                if MIN_PORT <= number <= MAX_PORT:
                    ports.add(number)
                else:
                    message = msg_port_out_of_range(number)
                    errors.append(FieldError(field, message, _show(str(number))))
            elif isinstance(entry, str):
                single = _PORT_SINGLE_RE.fullmatch(entry)
                port = _port(single.group(1)) if single else None
                if port is None:
                    errors.append(FieldError(field, msg_port_list_entry(entry), _show(entry)))
                else:
                    ports.add(port)
            else:
                errors.append(FieldError(field, MSG_PORTS_ENTRY_TYPE, _show(entry)))
        if errors:
            return None, errors
        return tuple(PortRange(p, p) for p in sorted(ports)), []
    return None, [FieldError(field, MSG_PORTS_INVALID)]


# --------------------------------------------------------------------------------------------
# Rules


def parse_rule(
    raw: object, *, location: Location | None = None
) -> tuple[Rule | None, list[FieldError]]:
    """Validate one CF rule mapping and normalise it into a `Rule`.

    Returns `(rule, [])` when valid, else `(None, errors)` with every mistake found, in the
    order Cloud Controller reports them (unknown keys, protocol, destination, description,
    log, then the protocol's own fields).  Normalised means: destinations and ports sorted
    with duplicates dropped (rules only allow, so order never changes meaning), ICMP type and
    code as ints (-1 = any) only for icmp/icmpv6, `log` a bool, `description` a string.
    Never raises.
    """
    if not isinstance(raw, Mapping):
        return None, [FieldError(None, MSG_NOT_OBJECT)]
    errors: list[FieldError] = []

    unknown = [_key_text(k) for k in raw if not (isinstance(k, str) and k in _ALLOWED_KEY_SET)]
    if unknown:
        errors.append(FieldError(None, msg_unknown_fields(unknown)))

    protocol_value = raw.get("protocol")
    protocol = protocol_value if isinstance(protocol_value, str) else None
    if protocol not in PROTOCOLS:
        errors.append(FieldError("protocol", MSG_PROTOCOL))
        protocol = None

    destinations, dest_errors = _parse_destination(raw.get("destination"), protocol)
    errors.extend(dest_errors)

    description_value = raw.get("description")
    description = ""
    if isinstance(description_value, str):
        description = description_value
    elif not _absent(description_value):
        errors.append(FieldError("description", MSG_DESCRIPTION))

    log_value = raw.get("log")
    log = log_value is True
    if not _absent(log_value) and log_value is not True:
        errors.append(FieldError("log", MSG_LOG))

    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    ports_value = raw.get("ports")
    if protocol in ("tcp", "udp"):
        if _absent(ports_value):
            errors.append(FieldError("ports", MSG_PORTS_REQUIRED))
        else:
            parsed_ports, port_errors = _parse_rule_ports(ports_value)
            errors.extend(port_errors)
            ports = parsed_ports or ()
    elif protocol is not None and not _absent(ports_value):
        errors.append(FieldError("ports", msg_ports_not_allowed(protocol)))
    if protocol in ("icmp", "icmpv6"):
        icmp_code, code_errors = _icmp_field(raw.get("code"), "code")
        icmp_type, type_errors = _icmp_field(raw.get("type"), "type")
        errors.extend(code_errors)
        errors.extend(type_errors)
    elif protocol is not None:
        # The request validator never looks at type/code outside ICMP; the model then refuses
        # the rule (RuleValidator.validate_fields), so a policy that CF would refuse is refused.
        errors.extend(
            FieldError(key, msg_invalid_field(key))
            for key in ("type", "code")
            if not _absent(raw.get(key))
        )

    if errors or protocol is None or destinations is None:
        return None, _dedupe(errors)
    return (
        Rule(
            protocol=protocol,
            destinations=destinations,
            ports=ports,
            icmp_type=icmp_type,
            icmp_code=icmp_code,
            log=log,
            description=description,
            location=location,
        ),
        [],
    )


def cf_exact_errors(raw: object) -> list[FieldError]:
    """What Cloud Controller refuses in a rule that `parse_rule` accepts for our YAML.

    `parse_rule` reads YAML policy, where `null`/`false` mean "not given" and `destination` /
    `ports` may be lists or integers.  CF JSON has none of that: the request validator wants
    strings (`valid_ports` returns false unless `ports.is_a?(String)`; `destination must be a
    string`), and the model validator refuses every key its protocol does not take and any
    non-boolean `log` or non-string `description`, `null` included.  `import-cf` adds these
    findings to `parse_rule`'s so that it accepts exactly what CF accepts.  Never raises.
    """
    if not isinstance(raw, Mapping):
        return []
    errors: list[FieldError] = []
    protocol = raw.get("protocol")
    destination = raw.get("destination")
    if isinstance(destination, list):
        errors.append(FieldError("destination", MSG_DEST_NOT_STRING))
    ports = raw.get("ports")
    if protocol in ("tcp", "udp") and not _absent(ports) and not isinstance(ports, str):
        errors.append(FieldError("ports", MSG_PORTS_INVALID))
    if isinstance(protocol, str) and protocol in CF_MODEL_KEYS:  # `[]` is unhashable
        allowed = CF_MODEL_KEYS[protocol]
        for key in ALLOWED_RULE_KEYS:
            # A non-absent value is already parse_rule's finding, in the request's words.
            if key in raw and key not in allowed and _absent(raw[key]):
                errors.append(FieldError(key, msg_invalid_field(key)))
    if "log" in raw and raw["log"] is None:
        errors.append(FieldError("log", MSG_MODEL_LOG))
    if "description" in raw and _absent(raw["description"]):
        errors.append(FieldError("description", MSG_MODEL_DESCRIPTION))
    return errors


def host_bits_notes(value: object) -> list[FieldError]:
    """One note per CIDR of `destination` whose address has bits set past the prefix.

    CF (and this grammar) read `198.41.191.47/1` as the network it lies in, `128.0.0.0/1`:
    half the internet, where the writer almost certainly meant one host.  Not an error,
    because CF accepts it and rules already in CF must import unchanged, but worth saying.
    """
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        return []
    notes: list[FieldError] = []
    for item in items:
        if not isinstance(item, str) or "/" not in item or "-" in item:
            continue
        addr_text, _, prefix_text = item.partition("/")
        parsed = _parse_address(addr_text)
        if parsed is None:
            continue
        version, address = parsed
        prefix = _parse_prefix(prefix_text, version)
        rng = _parse_network(item)
        if prefix is None or rng is None or rng.first == address:
            continue
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        first, last = str(cls(rng.first)), str(cls(rng.last))
        message = msg_host_bits(_show(item), f"{first}/{prefix}", first, last)
        notes.append(FieldError("destination", message, _show(item)))
    return notes


def _icmp_field(value: object, name: str) -> tuple[int | None, list[FieldError]]:
    """ICMP `type`/`code`: a required JSON integer in -1..255 (-1 means any)."""
    required, invalid = (
        (MSG_CODE_REQUIRED, MSG_CODE_INVALID)
        if name == "code"
        else (MSG_TYPE_REQUIRED, MSG_TYPE_INVALID)
    )
    if _absent(value):
        return None, [FieldError(name, required)]
    number = _as_int(value)
    if number is None or not MIN_ICMP <= number <= MAX_ICMP:
        return None, [FieldError(name, invalid)]
    return number, []


# --------------------------------------------------------------------------------------------
# Destination kind (CF's dynamic egress destinations, policy-server API)
#
# The policy server's messages are used where it has them ("missing destination IP range",
# "invalid IP range a-b, start must be less than or equal to end", "invalid start port N, must
# be in range 1-65535", ...); address checks are the same as for rules.

_RANGE_KEYS = frozenset(("start", "end"))
MSG_IPS_MISSING = "missing destination IP range"
MSG_PORTS_MISSING = "missing destination ports"
MSG_IPS_ENTRY = (
    "ips entries must be an IP address, CIDR or IP address range string, or a {start, end} mapping"
)
MSG_PORTS_ENTRY = (
    'ports entries must be a port number, a "start-end" string, or a {start, end} mapping'
)


def _msg_bad_ip(text: str, why: str) -> str:
    return f"invalid ip address '{_show(text)}', {why}"


def _msg_inverted_ips(start: str, end: str) -> str:
    return f"invalid IP range {_show(start)}-{_show(end)}, start must be less than or equal to end"


def _ips_string(text: str) -> tuple[AddressRange | None, list[str]]:
    """An address, CIDR or `a-b` range string, with the same checks as rule destinations."""
    if any(c.isspace() for c in text):
        return None, [_msg_bad_ip(text, "must not contain whitespace")]
    messages: list[str] = []
    parts = text.split("-")
    if any(_leading_zero_octets(p) for p in parts):
        messages.append(_msg_bad_ip(text, "octets cannot contain leading zeros"))
    if len(parts) == 1:
        rng = _parse_network(text)
        if rng is None:
            messages.append(
                _msg_bad_ip(text, "must be a valid IP address, CIDR or IP address range")
            )
        return (rng if not messages else None), messages
    if len(parts) == 2:
        lo, hi = _parse_address(parts[0]), _parse_address(parts[1])
        if lo is None or hi is None:
            bad = parts[0] if lo is None else parts[1]
            messages.append(_msg_bad_ip(bad, "must be a valid IPv4 or IPv6 address"))
        elif lo[0] != hi[0]:
            messages.append(
                f"invalid IP range {_show(text)}, start and end must be of the same IP version"
            )
        elif lo[1] > hi[1]:
            messages.append(_msg_inverted_ips(parts[0], parts[1]))
        if messages or lo is None or hi is None:
            return None, messages
        return AddressRange(lo[0], lo[1], hi[1]), []
    return None, [_msg_bad_ip(text, "must be a valid IP address, CIDR or IP address range")]


def _ips_endpoint(value: object, key: str) -> tuple[tuple[int, int] | None, list[str]]:
    if not isinstance(value, str):
        return None, [f"{key} must be a string IP address, got {_show(value)}"]
    if any(c.isspace() for c in value):
        return None, [_msg_bad_ip(value, "must not contain whitespace")]
    messages: list[str] = []
    if _leading_zero_octets(value):
        messages.append(_msg_bad_ip(value, "octets cannot contain leading zeros"))
    parsed = _parse_address(value)
    if parsed is None:
        messages.append(_msg_bad_ip(value, "must be a valid IPv4 or IPv6 address"))
    return (parsed if not messages else None), messages


def _ips_mapping(entry: Mapping[str, Any]) -> tuple[AddressRange | None, list[str]]:
    """A policy-server `{start, end}` entry; `end` defaults to `start` (one address)."""
    messages: list[str] = []
    unknown = [_key_text(k) for k in entry if not (isinstance(k, str) and k in _RANGE_KEYS)]
    if unknown:
        messages.append(msg_unknown_fields(unknown))
    if entry.get("start") is None:
        return None, [*messages, "start is required"]
    start, start_msgs = _ips_endpoint(entry.get("start"), "start")
    end_value = entry.get("end")
    end_msgs: list[str]
    if end_value is None:
        end, end_msgs = start, []
    else:
        end, end_msgs = _ips_endpoint(end_value, "end")
    messages += start_msgs + end_msgs
    if start is None or end is None or messages:
        return None, messages
    if start[0] != end[0]:
        return None, [
            f"invalid IP range {_show(entry.get('start'))}-{_show(end_value)}, "
            "start and end must be of the same IP version"
        ]
    if start[1] > end[1]:
        return None, [_msg_inverted_ips(str(entry.get("start")), str(end_value))]
    return AddressRange(start[0], start[1], end[1]), []


def parse_destination_ips(
    value: object,
) -> tuple[tuple[AddressRange, ...] | None, list[FieldError]]:
    """A Destination's `ips`: `[{start, end}]` as the policy server takes it, or an address /
    CIDR / `a-b` string, or a list mixing both.  Sorted, duplicates dropped.  Never raises."""
    field = "ips"
    if value is None:
        return None, [FieldError(field, MSG_IPS_MISSING)]
    entries = value if isinstance(value, list) else [value]
    if not entries:
        return None, [FieldError(field, MSG_IPS_MISSING)]
    if len(entries) > MAX_DESTINATIONS_PER_RULE:
        # The same bound as a rule's destination list: a destination is one rule's worth.
        return None, [FieldError(field, MSG_TOO_MANY_IPS)]
    ranges: list[AddressRange] = []
    errors: list[FieldError] = []
    for entry in entries:
        if isinstance(entry, str):
            rng, messages = _ips_string(entry)
        elif isinstance(entry, Mapping):
            rng, messages = _ips_mapping(entry)
        else:
            rng, messages = None, [MSG_IPS_ENTRY]
        errors.extend(FieldError(field, m, _show(entry)) for m in messages)
        if rng is not None:
            ranges.append(rng)
    if errors:
        return None, _dedupe(errors)
    return tuple(sorted(set(ranges))), []


def _port_bounds(start: int, end: int) -> list[str]:
    """The policy server's checks, in its order and words."""
    if start > end:
        return [f"invalid port range {start}-{end}, start must be less than or equal to end"]
    messages = []
    if end > MAX_PORT:
        messages.append(f"invalid end port {end}, must be in range {MIN_PORT}-{MAX_PORT}")
    if start < MIN_PORT:
        messages.append(f"invalid start port {start}, must be in range {MIN_PORT}-{MAX_PORT}")
    return messages


def _ports_entry(entry: object) -> tuple[PortRange | None, list[str]]:
    number = _as_int(entry)
    if number is not None:
        if not MIN_PORT <= number <= MAX_PORT:
            return None, [msg_port_out_of_range(number)]
        return PortRange(number, number), []
    if isinstance(entry, str):
        return _ports_string(entry)
    if isinstance(entry, Mapping):
        messages = []
        unknown = [_key_text(k) for k in entry if not (isinstance(k, str) and k in _RANGE_KEYS)]
        if unknown:
            messages.append(msg_unknown_fields(unknown))
        if entry.get("start") is None:
            return None, [*messages, "start is required"]
        start = _as_int(entry.get("start"))
        end = start if entry.get("end") is None else _as_int(entry.get("end"))
        if start is None or end is None:
            return None, [*messages, "start and end must be integers"]
        messages += _port_bounds(start, end)
        return (None if messages else PortRange(start, end)), messages
    return None, [MSG_PORTS_ENTRY]


def _ports_string(text: str) -> tuple[PortRange | None, list[str]]:
    """`"3306"` or `"3306-3310"` (spaces around the numbers allowed, as in rule ports)."""
    range_match = _PORT_RANGE_RE.fullmatch(text)
    single = _PORT_SINGLE_RE.fullmatch(text)
    if range_match:
        start_text, end_text = range_match.group(1), range_match.group(2)
    elif single:
        start_text = end_text = single.group(1)
    else:
        return None, [f"invalid ports '{_show(text)}', must be a port or a range start-end"]
    start, end = _digits_value(start_text, 5), _digits_value(end_text, 5)
    if start is None or end is None:
        return None, [f"invalid ports '{_show(text)}', must be in range {MIN_PORT}-{MAX_PORT}"]
    if not range_match:
        if not MIN_PORT <= start <= MAX_PORT:
            return None, [msg_port_out_of_range(start)]
        return PortRange(start, start), []
    messages = _port_bounds(start, end)
    return (None if messages else PortRange(start, end)), messages


def parse_port_ranges(value: object) -> tuple[tuple[PortRange, ...] | None, list[FieldError]]:
    """A Destination's `ports`: `[{start, end}]` as the policy server takes it, an integer,
    `"3306"` or `"3306-3310"` (start <= end allowed here, unlike rule ports), or a list of
    those.  Range 1-65535.  Sorted, duplicates dropped.  Never raises."""
    field = "ports"
    if value is None:
        return None, [FieldError(field, MSG_PORTS_MISSING)]
    entries = value if isinstance(value, list) else [value]
    if not entries:
        return None, [FieldError(field, MSG_PORTS_MISSING)]
    ranges: list[PortRange] = []
    errors: list[FieldError] = []
    for entry in entries:
        rng, messages = _ports_entry(entry)
        errors.extend(FieldError(field, m, _show(entry)) for m in messages)
        if rng is not None:
            ranges.append(rng)
    if errors:
        return None, _dedupe(errors)
    return tuple(sorted(set(ranges))), []
