"""Specification of Cloud Foundry's rule grammar as `reconciler.policy.grammar` implements it.

Messages are Cloud Controller's, word for word, from cloud_controller_ng's
`security_group_rule_validator.rb` and its spec (comma-delimited destinations and IPv6
enabled); cases marked "stricter than CF" are where CF's parser would silently change the
meaning of what was written.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.model import PROTOCOLS, AddressRange, Location, PortRange, Rule
from reconciler.policy.grammar import (
    MAX_DESTINATIONS_PER_RULE,
    FieldError,
    cf_exact_errors,
    host_bits_notes,
    parse_destination_ips,
    parse_port_ranges,
    parse_rule,
)

# Cloud Controller's messages.
NOT_OBJECT = "must be an object"
PROTOCOL = "protocol must be 'tcp', 'udp', 'icmp', 'icmpv6' or 'all'"
DEST_NIL = (
    "nil destination; destination must be a comma-delimited list of valid CIDRs, "
    "IP addresses, or IP address ranges"
)
DEST_NOT_STRING = "destination must be a string"
DEST_WS = "destination must not contain whitespace"
DEST_INVALID = "destination must contain valid CIDR(s), IP address(es), or IP address range(s)"
DEST_EMPTY = "empty destination specified in comma-delimited list"
DEST_ZEROS = "destination octets cannot contain leading zeros"
DEST_RANGE = "destination IP address range is invalid"
DEST_INVERTED = (
    "beginning of IP address range is numerically greater than the end of its range "
    "(range endpoints are inverted)"
)
DEST_TOO_MANY = "maximum destinations per rule exceeded - must be under 6000"
ICMP_V6 = 'for protocol "icmp" you cannot use IPv6 addresses'
ICMPV6_V4 = 'for protocol "icmpv6" you cannot use IPv4 addresses'
PORTS_REQUIRED = "ports are required for protocols of type TCP and UDP"
PORTS_INVALID = (
    "ports must be a valid single port, comma separated list of ports, or range or ports, "
    "formatted as a string"
)
PORTS_NOT_ALL = "ports are not allowed for protocols of type all"
CODE_REQUIRED = "code is required for protocols of type ICMP"
CODE_INVALID = "code must be an integer between -1 and 255 (inclusive)"
TYPE_REQUIRED = "type is required for protocols of type ICMP"
TYPE_INVALID = "type must be an integer between -1 and 255 (inclusive)"
LOG = "log must be a boolean"
DESCRIPTION = "description must be a string"


def r(value: str) -> AddressRange:
    return AddressRange.parse(value)


def p(first: int, last: int | None = None) -> PortRange:
    return PortRange(first, first if last is None else last)


def errors_of(raw: object) -> list[tuple[str | None, str]]:
    rule, errors = parse_rule(raw)
    assert rule is None, "an invalid rule must not produce a Rule"
    assert errors, "an invalid rule must say why"
    return [(e.field, e.message) for e in errors]


def ok(raw: object) -> Rule:
    rule, errors = parse_rule(raw)
    assert errors == []
    assert rule is not None
    return rule


def tcp(destination: object, ports: object = "443") -> dict:
    return {"protocol": "tcp", "destination": destination, "ports": ports}


def icmp(destination: object, protocol: str = "icmp") -> dict:
    return {"protocol": protocol, "destination": destination, "type": -1, "code": 255}


# ---------------------------------------------------------------------------------------------
# Valid rules


class TestValidRules:
    def test_cf_v3_docs_example_rules(self) -> None:
        """`POST /v3/security_groups` example in the CF API docs."""
        assert ok(
            {"protocol": "tcp", "destination": "10.10.10.0/24", "ports": "443,80,8080"}
        ) == Rule("tcp", (r("10.10.10.0/24"),), (p(80), p(443), p(8080)))
        rule = ok(
            {
                "protocol": "icmp",
                "destination": "10.10.10.0/24",
                "type": 8,
                "code": 0,
                "description": "Allow ping requests to private services",
            }
        )
        assert (rule.icmp_type, rule.icmp_code) == (8, 0)
        assert rule.description == "Allow ping requests to private services"

    def test_cf_v2_docs_example_rules(self) -> None:
        """`POST /v2/security_groups` example: note the space in "53, 5353"."""
        assert ok({"protocol": "icmp", "destination": "0.0.0.0/0", "type": 0, "code": 1}) == Rule(
            "icmp", (r("0.0.0.0/0"),), (), 0, 1
        )
        assert ok(
            {"protocol": "tcp", "destination": "0.0.0.0/0", "ports": "2048-3000", "log": True}
        ) == Rule("tcp", (r("0.0.0.0/0"),), (p(2048, 3000),), log=True)
        assert ok({"protocol": "udp", "destination": "0.0.0.0/0", "ports": "53, 5353"}).ports == (
            p(53),
            p(5353),
        )
        assert ok({"protocol": "all", "destination": "0.0.0.0/0"}) == Rule("all", (r("0.0.0.0/0"),))

    def test_design_examples(self) -> None:
        assert ok({"protocol": "all", "destination": "0.0.0.0-9.255.255.255"}).destinations == (
            AddressRange(4, 0, int(ipaddress.IPv4Address("9.255.255.255"))),
        )
        rule = ok(
            {
                "protocol": "tcp",
                "destination": "10.0.11.0/24,10.0.12.1",
                "ports": "80,443",
                "log": True,
            }
        )
        assert rule.destinations == (r("10.0.11.0/24"), r("10.0.12.1"))
        assert ok({"protocol": "icmp", "destination": "0.0.0.0/0", "type": 0, "code": -1})

    @pytest.mark.parametrize("protocol", ["tcp", "udp", "icmp", "icmpv6", "all"])
    def test_every_protocol(self, protocol: str) -> None:
        raw: dict = {"protocol": protocol}
        raw["destination"] = "2001:db8::/32" if protocol == "icmpv6" else "10.10.10.0/24"
        if protocol in ("tcp", "udp"):
            raw["ports"] = "8080"
        if protocol in ("icmp", "icmpv6"):
            raw.update(type=-1, code=255)
        rule = ok(raw)
        assert rule.protocol == protocol
        assert bool(rule.ports) == (protocol in ("tcp", "udp"))
        assert (rule.icmp_type is not None) == (protocol in ("icmp", "icmpv6"))

    @pytest.mark.parametrize(
        ("destination", "expected"),
        [
            ("192.168.10.2", ["192.168.10.2/32"]),
            ("10.10.10.0/24", ["10.10.10.0/24"]),
            ("192.168.10.2/24", ["192.168.10.0/24"]),  # host bits allowed, as in CF
            ("0.0.0.0/0", ["0.0.0.0/0"]),
            ("10.0.0.0/255.255.0.0", ["10.0.0.0/16"]),  # dotted netmask, as NetAddr takes it
            ("192.168.10.2-192.168.15.254", ["192.168.10.2-192.168.15.254"]),
            ("1.2.3.4-1.2.3.4", ["1.2.3.4"]),  # equal ends are allowed
            ("10.0.0.0/8,192.168.0.0/16", ["10.0.0.0/8", "192.168.0.0/16"]),
            ("10.0.0.0/8,1.0.0.0-1.0.0.255,4.5.6.7", ["1.0.0.0/24", "4.5.6.7", "10.0.0.0/8"]),
            ("2001:db8::", ["2001:db8::/128"]),
            ("2001:db8::/32", ["2001:db8::/32"]),
            ("::/0", ["::/0"]),
            ("2001:db8::1-2001:db8::ff", ["2001:db8::1-2001:db8::ff"]),
            ("2001:0db8::1", ["2001:db8::1/128"]),  # IPv6 groups may have leading zeros
            ("2001:db8:0000:0000::01", ["2001:db8::1/128"]),
            ("2001:0db8::1-2001:0db8::ff", ["2001:db8::1-2001:db8::ff"]),
            ("::ffff:192.0.2.1", ["::ffff:c000:201/128"]),
            ("1:2:3:4:5:6:7::", ["1:2:3:4:5:6:7:0/128"]),
            ("2001:db8::,4.5.6.7", ["4.5.6.7", "2001:db8::/128"]),  # mixed versions, tcp
            ("fd00::1,198.18.0.0/15", ["198.18.0.0/15", "fd00::1/128"]),
        ],
    )
    def test_destination_forms(self, destination: str, expected: list[str]) -> None:
        assert ok(tcp(destination)).destinations == tuple(r(e) for e in expected)

    def test_yaml_destination_list_means_the_same_as_a_comma_list(self) -> None:
        assert ok(tcp(["10.0.11.0/24", "10.0.12.1"])) == ok(tcp("10.0.11.0/24,10.0.12.1"))

    def test_destinations_are_sorted_and_deduplicated(self) -> None:
        rule = ok(tcp("10.0.0.2,10.0.0.1,10.0.0.2,10.0.0.1/32"))
        assert rule.destinations == (r("10.0.0.1"), r("10.0.0.2"))

    def test_spellings_of_one_interval_are_one_rule(self) -> None:
        forms = ["192.168.10.0/24", "192.168.10.77/24", "192.168.10.0-192.168.10.255"]
        assert len({ok(tcp(f)) for f in forms}) == 1

    def test_exactly_6000_destinations_are_allowed(self) -> None:
        many = ",".join(f"10.{i // 256}.{i % 256}.1" for i in range(MAX_DESTINATIONS_PER_RULE))
        assert len(ok({"protocol": "all", "destination": many}).destinations) == 6000

    @pytest.mark.parametrize(
        ("ports", "expected"),
        [
            ("8080", [p(8080)]),
            ("3000,8888", [p(3000), p(8888)]),
            ("4000-5000", [p(4000, 5000)]),
            ("443,80,8080", [p(80), p(443), p(8080)]),
            (" 80 , 443 ", [p(80), p(443)]),  # spaces around numbers allowed
            ("80,\t443", [p(80), p(443)]),
            (" 80 - 90 ", [p(80, 90)]),
            ("1", [p(1)]),
            ("65535", [p(65535)]),
            ("1-65535", [p(1, 65535)]),
            ("80,80", [p(80)]),
            ("0080", [p(80)]),  # decimal, as Ruby's to_i reads it
            ("80,", [p(80)]),  # CF quirk kept: Ruby's split drops trailing empty items
            (443, [p(443)]),  # our YAML: an integer
            ([80, "443", " 8080 "], [p(80), p(443), p(8080)]),  # our YAML: a list
            ([443, 443], [p(443)]),
        ],
    )
    def test_ports_forms(self, ports: object, expected: list[PortRange]) -> None:
        assert ok(tcp("10.0.0.1", ports)).ports == tuple(expected)

    def test_integer_list_and_string_ports_are_the_same_rule(self) -> None:
        assert ok(tcp("10.0.0.1", 443)) == ok(tcp("10.0.0.1", "443")) == ok(tcp("10.0.0.1", [443]))

    @pytest.mark.parametrize(("icmp_type", "code"), [(-1, -1), (0, 0), (255, 255), (8, -1)])
    def test_icmp_type_and_code_range(self, icmp_type: int, code: int) -> None:
        rule = ok(
            {"protocol": "icmp", "destination": "10.0.0.0/8", "type": icmp_type, "code": code}
        )
        assert (rule.icmp_type, rule.icmp_code) == (icmp_type, code)

    def test_icmpv6_with_ipv6_destinations(self) -> None:
        assert ok(icmp("2001:db8::/32,2001:db8:85a3::/64", "icmpv6")).destinations == (
            r("2001:db8::/32"),
            r("2001:db8:85a3::/64"),
        )

    @pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False)])
    def test_log(self, value: object, expected: bool) -> None:
        assert ok({**tcp("10.0.0.1"), "log": value}).log is expected

    @pytest.mark.parametrize(
        ("value", "expected"), [("a description", "a description"), (None, ""), (False, "")]
    )
    def test_description(self, value: object, expected: str) -> None:
        """CF checks description (and log) with Ruby truthiness: null and false are "absent"."""
        assert ok({**tcp("10.0.0.1"), "description": value}).description == expected

    def test_description_does_not_change_rule_identity(self) -> None:
        assert ok({**tcp("10.0.0.1"), "description": "x"}) == ok(tcp("10.0.0.1"))

    @pytest.mark.parametrize("protocol", ["all", "icmp", "icmpv6"])
    @pytest.mark.parametrize("ports", [None, False])
    def test_null_or_false_ports_count_as_absent(self, protocol: str, ports: object) -> None:
        raw = icmp("2001:db8::1" if protocol == "icmpv6" else "10.0.0.1", protocol)
        if protocol == "all":
            raw = {"protocol": "all", "destination": "10.0.0.1"}
        assert ok({**raw, "ports": ports}).ports == ()

    @pytest.mark.parametrize("protocol", ["tcp", "udp", "all"])
    @pytest.mark.parametrize("value", [None, False])
    def test_null_or_false_type_and_code_count_as_absent_outside_icmp(
        self, protocol: str, value: object
    ) -> None:
        raw = tcp("10.0.0.1") if protocol != "all" else {"protocol": "all", "destination": "::1"}
        rule = ok({**raw, "protocol": protocol, "type": value, "code": value})
        assert (rule.icmp_type, rule.icmp_code) == (None, None)

    def test_location_is_attached(self) -> None:
        loc = Location("policies/a.yaml", 7, 5)
        rule, _ = parse_rule(tcp("10.0.0.1"), location=loc)
        assert rule is not None and rule.location == loc


# ---------------------------------------------------------------------------------------------
# Invalid rules: the exact messages, all of them, in Cloud Controller's order


class TestRuleShape:
    @pytest.mark.parametrize("raw", [None, "bad rule", [], 42, 1.5, True, ["protocol", "tcp"]])
    def test_a_rule_must_be_an_object(self, raw: object) -> None:
        assert errors_of(raw) == [(None, NOT_OBJECT)]

    def test_unknown_fields_are_listed_like_ruby_prints_an_array(self) -> None:
        assert errors_of({"blork": "busted", "blark": "also busted"}) == [
            (None, 'unknown field(s): ["blork", "blark"]'),
            ("protocol", PROTOCOL),
            ("destination", DEST_NIL),
        ]

    def test_unknown_field_beside_a_valid_rule(self) -> None:
        assert errors_of({**tcp("10.0.0.1"), "not-a-field": True}) == [
            (None, 'unknown field(s): ["not-a-field"]')
        ]

    def test_non_string_keys_are_unknown_fields(self) -> None:
        assert errors_of({"protocol": "all", "destination": "10.0.0.1", 1: "x", None: 2}) == [
            (None, 'unknown field(s): ["1", "None"]')
        ]

    def test_field_names_are_case_sensitive(self) -> None:
        assert errors_of({"Protocol": "all", "destination": "10.0.0.1"}) == [
            (None, 'unknown field(s): ["Protocol"]'),
            ("protocol", PROTOCOL),
        ]

    def test_every_error_is_reported_in_cf_order(self) -> None:
        raw = {
            "bogus": 1,
            "protocol": "tcp",
            "destination": "1.2.3.4 ",
            "ports": "x",
            "log": "yes",
            "description": 5,
        }
        assert errors_of(raw) == [
            (None, 'unknown field(s): ["bogus"]'),
            ("destination", DEST_WS),
            ("description", DESCRIPTION),
            ("log", LOG),
            ("ports", PORTS_INVALID),
        ]


class TestProtocol:
    @pytest.mark.parametrize("protocol", [4, None, "arp", "TCP", "tcp ", "", ["tcp"], True])
    def test_invalid_protocols(self, protocol: object) -> None:
        assert errors_of({"protocol": protocol, "destination": "10.0.0.1"}) == [
            ("protocol", PROTOCOL)
        ]

    def test_missing_protocol(self) -> None:
        assert errors_of({"destination": "10.0.0.1"}) == [("protocol", PROTOCOL)]

    def test_cf_spec_more_than_one_error(self) -> None:
        assert errors_of({"protocol": "blah"}) == [
            ("protocol", PROTOCOL),
            ("destination", DEST_NIL),
        ]


class TestDestination:
    @pytest.mark.parametrize(
        ("destination", "messages"),
        [
            (None, [DEST_NIL]),
            (42, [DEST_NOT_STRING]),
            ({"start": "10.0.0.1"}, [DEST_NOT_STRING]),
            (True, [DEST_NOT_STRING]),
            # whitespace anywhere, including around commas, and non-ASCII spaces
            ("    10.10.10.10", [DEST_WS]),
            ("10.10.10.10 ", [DEST_WS]),
            ("    10.10.10.10   ,   192.168.17.12", [DEST_WS]),
            ("    2001:0db8::1   ,   2001:0db8::2", [DEST_WS]),
            ("10.0.0.1,\t10.0.0.2", [DEST_WS]),
            ("10.0.0.1\n", [DEST_WS]),
            ("10.0.0.1\u00a0", [DEST_WS]),
            # not an address at all
            ("1010", [DEST_INVALID]),
            ("example.com", [DEST_INVALID]),
            ("10.0.0.256", [DEST_INVALID]),
            ("10.0.0", [DEST_INVALID]),
            ("10.0.0.1.2", [DEST_INVALID]),
            ("192.168.10.2/240", [DEST_INVALID]),
            ("10.0.0.0/33", [DEST_INVALID]),
            ("2001:db8::/129", [DEST_INVALID]),
            ("2001:db8::g", [DEST_INVALID]),
            ("1:2:3:4:5:6:7:8:9", [DEST_INVALID]),
            ("1::2::3", [DEST_INVALID]),
            (":1::", [DEST_INVALID]),
            ("12345::", [DEST_INVALID]),
            ("10.0.0.0/", [DEST_INVALID]),
            ("10.0.0.0/-1", [DEST_RANGE]),  # CF splits on "-" before anything else
            ("10.0.0.0/255.0.255.0", [DEST_INVALID]),  # not a contiguous netmask
            ("2001:db8::/ffff::", [DEST_INVALID]),
            ("1.2.3.4-5.6.7.8-9.9.9.9", [DEST_INVALID]),
            ("-", [DEST_RANGE]),
            # stricter than CF: these would silently mean something else there
            ("10.0.0.0/024", [DEST_INVALID]),  # Ruby's Integer("024") is octal 20
            ("10.0.0.0/8/9", [DEST_INVALID]),  # NetAddr ignores the third part
            ("1..2.3", [DEST_INVALID]),  # NetAddr reads the empty octet as 0
            ("1.2.3.4-", [DEST_RANGE]),  # Ruby's split drops the empty end
            ("fe80::1%eth0", [DEST_INVALID]),  # zone ids mean nothing to iptables
            ("fe80::1%1", [DEST_INVALID]),
            ("１.２.３.４", [DEST_INVALID]),  # only ASCII digits are digits
            ("10.0.0.٣", [DEST_INVALID]),
            ("٣٣::1", [DEST_INVALID]),
            ("", [DEST_EMPTY]),  # CF's "".split(",", -1) is [] and passes; we do not
            # ranges
            ("192.168.10.2-192.168.105", [DEST_RANGE]),
            ("2001:db8::1-2001:db8::g", [DEST_RANGE]),
            ("10.0.0.1-2001:db8::1", [DEST_RANGE]),  # mixed versions
            ("10.0.0.0/8-10.0.0.255", [DEST_RANGE]),  # range ends are plain addresses
            ("-1.2.3.4", [DEST_RANGE]),
            ("9.9.9.9-0.0.0.0", [DEST_INVERTED]),
            ("192.168.10.2-192.168.5.254", [DEST_INVERTED]),
            ("2001:db8::ff-2001:db8::1", [DEST_INVERTED]),
            # leading zeros in IPv4 octets (CF's spec cases)
            ("10.000.0.0/24", [DEST_ZEROS]),
            ("10.0.0.000/24", [DEST_ZEROS]),
            ("1.0.0.000-1.0.0.200", [DEST_ZEROS]),
            ("010.0.0.53", [DEST_ZEROS]),
            ("10.000.0.53", [DEST_ZEROS]),
            ("10.0.000.53", [DEST_ZEROS]),
            ("10.0.0.053", [DEST_ZEROS]),
            ("010.000.000.053", [DEST_ZEROS]),
            ("10.0.0.0/255.255.000.0", [DEST_ZEROS]),
            ("::ffff:10.0.0.01", [DEST_ZEROS]),
            ("010.0.0.300", [DEST_ZEROS, DEST_INVALID]),  # both problems are reported
            ("9.9.9.09-0.0.0.0", [DEST_ZEROS, DEST_INVERTED]),
            # comma lists
            ("192.168.10.2/24,1.2", [DEST_INVALID]),
            ("2001:db8::/32,2001", [DEST_INVALID]),
            (",10.10.10.10,11.11.11.11", [DEST_EMPTY]),
            ("10.10.10.10,,11.11.11.11", [DEST_EMPTY]),
            ("10.10.10.10,11.11.11.11,", [DEST_EMPTY]),
            (",10.10.10.10,,11.11.11.11,", [DEST_EMPTY]),  # one mistake, one message
            (",", [DEST_EMPTY]),
            (
                "1.2-7.8,999.999.999.999,200.0.0.0-150.0.0.0,10.0.0.0/500",
                [DEST_RANGE, DEST_INVALID, DEST_INVERTED, DEST_INVALID],  # one per entry
            ),
            (
                "2001:db8::1-2001:db8::g,2001:db8::/129,2001:db8::ff-2001:db8::1",
                [DEST_RANGE, DEST_INVALID, DEST_INVERTED],
            ),
            # our YAML list form
            ([], ["destination must not be an empty list"]),
            ([42], [DEST_NOT_STRING]),
            (["10.0.0.1", None], [DEST_NOT_STRING]),
            (["10.0.0.1 "], [DEST_WS]),
            ([""], [DEST_EMPTY]),
            (["10.0.0.1,10.0.0.2"], [DEST_INVALID]),  # an entry is one comma item
            (["010.0.0.1", "9.9.9.9-0.0.0.0"], [DEST_ZEROS, DEST_INVERTED]),
            ([["10.0.0.1"]], [DEST_NOT_STRING]),
        ],
    )
    def test_invalid_destinations(self, destination: object, messages: list[str]) -> None:
        assert errors_of({"protocol": "all", "destination": destination}) == [
            ("destination", m) for m in messages
        ]

    def test_more_than_6000_destinations(self) -> None:
        assert errors_of({"protocol": "all", "destination": ",".join(["192.168.1.3"] * 7000)}) == [
            ("destination", DEST_TOO_MANY)
        ]
        assert errors_of({"protocol": "all", "destination": ["2001:db8::"] * 6001}) == [
            ("destination", DEST_TOO_MANY)
        ]

    def test_the_offending_entry_is_named(self) -> None:
        _, errors = parse_rule(tcp("10.0.0.1,10.0.0.300,010.1.1.1"))
        assert [(e.message, e.item) for e in errors] == [
            (DEST_INVALID, "10.0.0.300"),
            (DEST_ZEROS, "010.1.1.1"),
        ]
        _, errors = parse_rule(tcp(["10.0.0.1", 7]))
        assert errors == [FieldError("destination", DEST_NOT_STRING, "7")]

    def test_whole_value_messages_name_no_entry(self) -> None:
        _, errors = parse_rule(tcp(" 10.0.0.1"))
        assert errors == [FieldError("destination", DEST_WS)]

    @pytest.mark.parametrize(
        ("protocol", "destination", "message"),
        [
            ("icmp", "2001:db8::/32", ICMP_V6),
            ("icmp", "2001:0db8::1-2001:0db8::ff", ICMP_V6),
            ("icmp", "2001:db8::/32,10.0.0.0/8", ICMP_V6),
            ("icmp", "10.0.0.1,::1", ICMP_V6),
            ("icmp", ["10.0.0.1", "::1"], ICMP_V6),
            ("icmpv6", "10.0.0.0/8", ICMPV6_V4),
            ("icmpv6", "10.0.0.0/8,2001:db8::/32", ICMPV6_V4),
            ("icmpv6", "1.0.0.0-1.0.0.200", ICMPV6_V4),
        ],
    )
    def test_icmp_needs_ipv4_and_icmpv6_needs_ipv6(
        self, protocol: str, destination: object, message: str
    ) -> None:
        assert errors_of(icmp(destination, protocol)) == [("destination", message)]

    def test_each_offending_entry_is_one_finding(self) -> None:
        _, errors = parse_rule(icmp("2001:db8::/32,2001:db8:85a3::/64,10.0.0.1"))
        assert errors == [
            FieldError("destination", ICMP_V6, "2001:db8::/32"),
            FieldError("destination", ICMP_V6, "2001:db8:85a3::/64"),
        ]

    def test_cf_spec_icmpv6_with_leading_zero_ipv4_range(self) -> None:
        assert errors_of(icmp("1.0.0.000-1.0.0.200", "icmpv6")) == [
            ("destination", DEST_ZEROS),
            ("destination", ICMPV6_V4),
        ]


class TestPorts:
    @pytest.mark.parametrize("ports", [None, False])
    @pytest.mark.parametrize("protocol", ["tcp", "udp"])
    def test_ports_are_required_for_tcp_and_udp(self, protocol: str, ports: object) -> None:
        assert errors_of({"protocol": protocol, "destination": "10.0.0.1", "ports": ports}) == [
            ("ports", PORTS_REQUIRED)
        ]

    def test_missing_ports(self) -> None:
        assert errors_of({"protocol": "udp", "destination": "192.168.10.2/24"}) == [
            ("ports", PORTS_REQUIRED)
        ]

    @pytest.mark.parametrize(
        "ports",
        [
            "6000-5000",  # inverted
            "80-80",  # a range needs left < right
            "80-90,443",  # ranges and lists do not mix
            "443,80-90",
            "0",
            "65536",
            "1-65536",
            "0-80",
            "80,0",
            "",
            " ",
            ",",
            ",80",
            "80,,443",
            "abc",
            "80;443",
            "80 443",
            "-80",
            "80-",
            "1-2-3",
            "+80",
            "0x50",
            "８０",  # fullwidth digits are not ASCII digits
            "٨٠",
            "9" * 5000,  # longer than int() will parse
            "1-" + "9" * 5000,
            42.5,
            True,
            {"start": 80},
        ],
    )
    def test_invalid_port_strings_and_types(self, ports: object) -> None:
        assert errors_of(tcp("10.0.0.1", ports)) == [("ports", PORTS_INVALID)]

    @pytest.mark.parametrize(
        ("ports", "message", "item"),
        [
            (0, "invalid port 0, must be in range 1-65535", None),
            (65536, "invalid port 65536, must be in range 1-65535", None),
            (-1, "invalid port -1, must be in range 1-65535", None),
            ([], "ports must not be an empty list", None),
            ([80, 0], "invalid port 0, must be in range 1-65535", "0"),
            (
                ["80-90"],
                "invalid port '80-90' in ports list: each entry must be a single port "
                "between 1 and 65535",
                "80-90",
            ),
            (
                ["80,443"],
                "invalid port '80,443' in ports list: each entry must be a single port "
                "between 1 and 65535",
                "80,443",
            ),
            (
                ["８０"],
                "invalid port '８０' in ports list: each entry must be a single port "
                "between 1 and 65535",
                "８０",
            ),
            ([None], "ports list entries must be integers or strings", "None"),
            ([True], "ports list entries must be integers or strings", "True"),
            ([80.0], "ports list entries must be integers or strings", "80.0"),
        ],
    )
    def test_yaml_port_forms(self, ports: object, message: str, item: str | None) -> None:
        _, errors = parse_rule(tcp("10.0.0.1", ports))
        assert errors == [FieldError("ports", message, item)]

    @pytest.mark.parametrize(
        ("protocol", "destination"),
        [("all", "10.0.0.1"), ("icmp", "10.0.0.1"), ("icmpv6", "2001:db8::1")],
    )
    @pytest.mark.parametrize("ports", ["6000", "", 0, [80]])
    def test_ports_are_not_allowed_without_tcp_or_udp(
        self, protocol: str, destination: str, ports: object
    ) -> None:
        """CF has the message for `all`.  For icmp its request validator says nothing
        (security_group_rule_validator.rb:52-62) and its model refuses the key
        (icmp_rule_validator.rb:3 has no `ports`); policy YAML refuses it in CF's words for
        `all`.  `import-cf` drops such ports with a warning instead (tests/test_importcf.py)."""
        raw = {**icmp(destination, protocol), "ports": ports}
        if protocol == "all":
            raw = {"protocol": "all", "destination": destination, "ports": ports}
        assert errors_of(raw) == [
            ("ports", f"ports are not allowed for protocols of type {protocol}")
        ]

    def test_cf_message_for_all(self) -> None:
        assert errors_of(
            {"protocol": "all", "destination": "192.168.10.2/24", "ports": "6000"}
        ) == [("ports", PORTS_NOT_ALL)]


class TestCfModelValidator:
    """Cloud Controller validates a rule twice: the v3 request validator (the `Rules[i]:`
    messages above), then the model (cloudfoundry/cloud_controller_ng
    app/models/runtime/security_group.rb:60-88 `validate_rules`, which runs
    lib/cloud_controller/rule_validator.rb@1bca0d3:22-25 `validate_fields` with the per-protocol
    `required_fields + optional_fields`: rule_validator.rb:5-6 protocol, destination, log,
    description; transport_rule_validator.rb:3 adds ports; icmp_rule_validator.rb:3 adds code
    and type).  The model's spec pins "rule number 1 contains the invalid field 'foobar'" for
    every protocol (spec/unit/models/runtime/security_group_spec.rb, "when the rule contains
    extraneous fields").  So type/code outside ICMP, which the request validator never looks
    at, are refused by CF, and by us."""

    @pytest.mark.parametrize("protocol", ["tcp", "udp", "all"])
    @pytest.mark.parametrize("field", ["type", "code"])
    def test_type_and_code_outside_icmp_are_invalid_fields(self, protocol: str, field: str) -> None:
        raw = tcp("10.0.0.1") if protocol != "all" else {"protocol": "all", "destination": "::1"}
        assert errors_of({**raw, "protocol": protocol, field: 8}) == [
            (field, f"contains the invalid field '{field}'")
        ]

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            # CF JSON has no null-means-absent: the model looks at keys (rule.keys - allowed).
            ({"protocol": "all", "destination": "10.0.0.1", "ports": None}, [("ports", "F")]),
            (
                {"protocol": "tcp", "destination": "10.0.0.1", "ports": "1", "type": None},
                [("type", "F")],
            ),
            (
                {
                    "protocol": "icmp",
                    "destination": "10.0.0.1",
                    "type": 0,
                    "code": 0,
                    "ports": False,
                },
                [("ports", "F")],
            ),
            # rule_validator.rb:15 `rule.key?('log') && !validate_boolean(rule['log'])`
            (
                {"protocol": "all", "destination": "10.0.0.1", "log": None},
                [("log", "contains invalid log value")],
            ),
            # rule_validator.rb:17 `rule.key?('description') && !...is_a?(String)`
            (
                {"protocol": "all", "destination": "10.0.0.1", "description": None},
                [("description", "contains invalid description")],
            ),
            (
                {"protocol": "all", "destination": "10.0.0.1", "description": False},
                [("description", "contains invalid description")],
            ),
            # security_group_rule_validator.rb:107-108 `return false unless ports.is_a?(String)`
            (
                {"protocol": "tcp", "destination": "10.0.0.1", "ports": 443},
                [("ports", PORTS_INVALID)],
            ),
            (
                {"protocol": "udp", "destination": "10.0.0.1", "ports": [53]},
                [("ports", PORTS_INVALID)],
            ),
            ({"protocol": "all", "destination": ["10.0.0.1"]}, [("destination", DEST_NOT_STRING)]),
        ],
    )
    def test_cf_exact_refuses_what_only_our_yaml_allows(self, raw: dict, expected: list) -> None:
        """`parse_rule` reads YAML (null = absent, lists, integer ports); `cf_exact_errors` is
        what import-cf adds so that CF JSON is judged exactly as Cloud Controller judges it."""
        assert parse_rule(raw)[1] == []
        found = [(e.field, e.message) for e in cf_exact_errors(raw)]
        assert found == [
            (f, f"contains the invalid field '{f}'" if m == "F" else m) for f, m in expected
        ]

    @pytest.mark.parametrize(
        "raw",
        [
            {"protocol": "tcp", "destination": "10.0.0.1", "ports": "443", "log": False},
            {"protocol": "icmp", "destination": "10.0.0.1", "type": -1, "code": -1, "log": True},
            {"protocol": "all", "destination": "10.0.0.1", "description": ""},
            {"protocol": "udp", "destination": "10.0.0.1", "ports": " 53, 5353 "},
        ],
    )
    def test_cf_exact_accepts_what_cf_accepts(self, raw: dict) -> None:
        assert parse_rule(raw)[1] == [] and cf_exact_errors(raw) == []


class TestHostBits:
    """`198.41.191.47/1` is the model spec's own transport rule destination
    (cloudfoundry/cloud_controller_ng spec/unit/models/runtime/security_group_spec.rb
    `build_transport_rule`): CF accepts it and NetAddr reads it as 128.0.0.0/1."""

    @pytest.mark.parametrize(
        ("destination", "notes"),
        [
            (
                "198.41.191.47/1",
                [
                    "198.41.191.47/1 has host bits set: it means 128.0.0.0/1 "
                    "(128.0.0.0-255.255.255.255)"
                ],
            ),
            (
                ["10.0.0.0/8", "10.1.2.3/255.255.0.0"],
                [
                    "10.1.2.3/255.255.0.0 has host bits set: it means 10.1.0.0/16 "
                    "(10.1.0.0-10.1.255.255)"
                ],
            ),
            (
                "2001:db8::1/126",
                [
                    "2001:db8::1/126 has host bits set: it means 2001:db8::/126 "
                    "(2001:db8::-2001:db8::3)"
                ],
            ),
            ("10.0.0.0/8,10.0.0.1,10.0.0.1-10.0.0.9,::/0", []),
            ("not-an-address/8,10.0.0.1/33", []),  # errors are parse_rule's, not notes
            (42, []),
        ],
    )
    def test_notes(self, destination: object, notes: list[str]) -> None:
        assert [n.message for n in host_bits_notes(destination)] == notes
        assert ok({"protocol": "all", "destination": "198.41.191.47/1"}).destinations == (
            r("128.0.0.0/1"),
        )


class TestIcmp:
    @pytest.mark.parametrize("protocol", ["icmp", "icmpv6"])
    def test_type_and_code_are_required(self, protocol: str) -> None:
        dest = "2001:db8::/32" if protocol == "icmpv6" else "10.10.10.0/24"
        assert errors_of({"protocol": protocol, "destination": dest}) == [
            ("code", CODE_REQUIRED),
            ("type", TYPE_REQUIRED),
        ]

    @pytest.mark.parametrize(
        ("value", "field_message"),
        [
            (None, "required"),
            (False, "required"),
            (-2, "invalid"),
            (256, "invalid"),
            (10**100, "invalid"),
            (-(10**100), "invalid"),
            ("not an int", "invalid"),
            ("8", "invalid"),
            (8.0, "invalid"),
            (True, "invalid"),  # a bool is not an integer
            ([8], "invalid"),
            ({}, "invalid"),
        ],
    )
    @pytest.mark.parametrize("field", ["type", "code"])
    def test_type_and_code_values(self, field: str, value: object, field_message: str) -> None:
        raw = {"protocol": "icmp", "destination": "10.0.0.1", "type": 0, "code": 0, field: value}
        expected = {
            ("type", "required"): TYPE_REQUIRED,
            ("type", "invalid"): TYPE_INVALID,
            ("code", "required"): CODE_REQUIRED,
            ("code", "invalid"): CODE_INVALID,
        }[(field, field_message)]
        assert errors_of(raw) == [(field, expected)]

    def test_cf_spec_out_of_range_both(self) -> None:
        assert errors_of(
            {"protocol": "icmp", "destination": "10.0.0.1", "type": -2, "code": 256}
        ) == [
            ("code", CODE_INVALID),
            ("type", TYPE_INVALID),
        ]


class TestLogAndDescription:
    @pytest.mark.parametrize("value", [42, 0, 1, "true", "", [], {}])
    def test_log_must_be_a_boolean(self, value: object) -> None:
        assert errors_of({**tcp("10.0.0.1"), "log": value}) == [("log", LOG)]

    @pytest.mark.parametrize("value", [42, 0, True, [], {}, ["a"]])
    def test_description_must_be_a_string(self, value: object) -> None:
        assert errors_of({**tcp("10.0.0.1"), "description": value}) == [
            ("description", DESCRIPTION)
        ]


# ---------------------------------------------------------------------------------------------
# Destination kind: ips and ports


class TestDestinationIps:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ([{"start": "23.96.35.235", "end": "23.96.35.235"}], ["23.96.35.235"]),
            ([{"start": "23.96.35.235"}], ["23.96.35.235"]),  # end defaults to start
            ([{"start": "10.0.0.1", "end": "10.0.0.9"}], ["10.0.0.1-10.0.0.9"]),
            ([{"start": "2001:db8::1", "end": "2001:db8::ff"}], ["2001:db8::1-2001:db8::ff"]),
            ("23.96.35.235", ["23.96.35.235"]),
            ("10.0.0.0/8", ["10.0.0.0/8"]),
            ("10.0.0.1-10.0.0.9", ["10.0.0.1-10.0.0.9"]),
            ("10.0.0.1-10.0.0.1", ["10.0.0.1"]),
            ("fd00::/8", ["fd00::/8"]),
            (
                ["10.0.0.0/8", {"start": "198.18.0.1"}, "fd00::1", "10.0.0.0/8"],
                ["10.0.0.0/8", "198.18.0.1", "fd00::1"],
            ),
        ],
    )
    def test_valid(self, value: object, expected: list[str]) -> None:
        assert parse_destination_ips(value) == (tuple(r(e) for e in expected), [])

    @pytest.mark.parametrize(
        ("value", "messages"),
        [
            (None, ["missing destination IP range"]),
            ([], ["missing destination IP range"]),
            (
                42,
                [
                    "ips entries must be an IP address, CIDR or IP address range string, "
                    "or a {start, end} mapping"
                ],
            ),
            (
                [True],
                [
                    "ips entries must be an IP address, CIDR or IP address range string, "
                    "or a {start, end} mapping"
                ],
            ),
            ([{"end": "1.2.3.4"}], ["start is required"]),
            ([{"start": 5}], ["start must be a string IP address, got 5"]),
            ([{"start": "1.2.3.4", "end": 5}], ["end must be a string IP address, got 5"]),
            ([{"start": "1.2.3.4", "x": 1}], ['unknown field(s): ["x"]']),
            (
                [{"start": "1.2.3.4", "end": "1.2.3.1"}],
                ["invalid IP range 1.2.3.4-1.2.3.1, start must be less than or equal to end"],
            ),
            (
                [{"start": "1.2.3.4", "end": "::1"}],
                ["invalid IP range 1.2.3.4-::1, start and end must be of the same IP version"],
            ),
            (
                [{"start": "1.2.3.0/24"}],
                ["invalid ip address '1.2.3.0/24', must be a valid IPv4 or IPv6 address"],
            ),
            (
                [{"start": "010.0.0.1"}],
                ["invalid ip address '010.0.0.1', octets cannot contain leading zeros"],
            ),
            (
                [{"start": " 10.0.0.1"}],
                ["invalid ip address ' 10.0.0.1', must not contain whitespace"],
            ),
            (
                "010.0.0.1",
                ["invalid ip address '010.0.0.1', octets cannot contain leading zeros"],
            ),
            (
                "10.0.0.1 ",
                ["invalid ip address '10.0.0.1 ', must not contain whitespace"],
            ),
            (
                "fe80::1%eth0",
                [
                    "invalid ip address 'fe80::1%eth0', must be a valid IP address, CIDR or "
                    "IP address range"
                ],
            ),
            (
                "1.2.3.4,1.2.3.5",
                [
                    "invalid ip address '1.2.3.4,1.2.3.5', must be a valid IP address, CIDR or "
                    "IP address range"
                ],
            ),
            (
                "1.2.3.4-1.2.3.1",
                ["invalid IP range 1.2.3.4-1.2.3.1, start must be less than or equal to end"],
            ),
            (
                "1.2.3.4-::1",
                ["invalid IP range 1.2.3.4-::1, start and end must be of the same IP version"],
            ),
            ("1.2.3.4-x", ["invalid ip address 'x', must be a valid IPv4 or IPv6 address"]),
            (
                "1-2-3",
                [
                    "invalid ip address '1-2-3', must be a valid IP address, CIDR or "
                    "IP address range"
                ],
            ),
            (
                "１.２.３.４",
                [
                    "invalid ip address '１.２.３.４', must be a valid IP address, CIDR or "
                    "IP address range"
                ],
            ),
        ],
    )
    def test_invalid(self, value: object, messages: list[str]) -> None:
        ranges, errors = parse_destination_ips(value)
        assert ranges is None
        assert [(e.field, e.message) for e in errors] == [("ips", m) for m in messages]


class TestDestinationPorts:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ([{"start": 3306, "end": 3306}], [p(3306)]),
            ([{"start": 3306}], [p(3306)]),
            ([{"start": 8080, "end": 8081}], [p(8080, 8081)]),
            (3306, [p(3306)]),
            ("3306", [p(3306)]),
            ("3306-3310", [p(3306, 3310)]),
            ("3306-3306", [p(3306)]),  # start == end is fine here
            (" 3306 - 3310 ", [p(3306, 3310)]),
            ("1-65535", [p(1, 65535)]),
            ([443, "80", {"start": 1000, "end": 2000}, 443], [p(80), p(443), p(1000, 2000)]),
        ],
    )
    def test_valid(self, value: object, expected: list[PortRange]) -> None:
        assert parse_port_ranges(value) == (tuple(expected), [])

    @pytest.mark.parametrize(
        ("value", "messages"),
        [
            (None, ["missing destination ports"]),
            ([], ["missing destination ports"]),
            (0, ["invalid port 0, must be in range 1-65535"]),
            (65536, ["invalid port 65536, must be in range 1-65535"]),
            ("0", ["invalid port 0, must be in range 1-65535"]),
            ("0-10", ["invalid start port 0, must be in range 1-65535"]),
            ("10-70000", ["invalid end port 70000, must be in range 1-65535"]),
            ("10-5", ["invalid port range 10-5, start must be less than or equal to end"]),
            (
                [{"start": 10, "end": 5}],
                ["invalid port range 10-5, start must be less than or equal to end"],
            ),
            ([{"start": 0}], ["invalid start port 0, must be in range 1-65535"]),
            (
                [{"start": 0, "end": 70000}],
                [
                    "invalid end port 70000, must be in range 1-65535",
                    "invalid start port 0, must be in range 1-65535",
                ],
            ),
            ([{"start": True}], ["start and end must be integers"]),
            ([{"start": "80"}], ["start and end must be integers"]),
            ([{"end": 5}], ["start is required"]),
            ([{"start": 1, "x": 2}], ['unknown field(s): ["x"]']),
            ("abc", ["invalid ports 'abc', must be a port or a range start-end"]),
            ("80,443", ["invalid ports '80,443', must be a port or a range start-end"]),
            ("８０", ["invalid ports '８０', must be a port or a range start-end"]),
            ("99999999999", ["invalid ports '99999999999', must be in range 1-65535"]),
            (
                3.5,
                [
                    'ports entries must be a port number, a "start-end" string, '
                    "or a {start, end} mapping"
                ],
            ),
            (
                True,
                [
                    'ports entries must be a port number, a "start-end" string, '
                    "or a {start, end} mapping"
                ],
            ),
        ],
    )
    def test_invalid(self, value: object, messages: list[str]) -> None:
        ports, errors = parse_port_ranges(value)
        assert ports is None
        assert [(e.field, e.message) for e in errors] == [("ports", m) for m in messages]


# ---------------------------------------------------------------------------------------------
# Properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-2, max_value=70000)
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
address_text = st.text(alphabet="0123456789abcdefABCDEF:./-,% ١٢８", max_size=40)
port_text = st.text(alphabet="0123456789-, \t８", max_size=20)
rule_like = st.fixed_dictionaries(
    {},
    optional={
        "protocol": st.sampled_from([*PROTOCOLS, "TCP", "arp"]) | json_values,
        "destination": address_text | st.lists(address_text, max_size=4) | json_values,
        "ports": port_text | st.integers() | st.lists(port_text | st.integers(), max_size=3),
        "type": st.integers(min_value=-3, max_value=300) | json_values,
        "code": st.integers(min_value=-3, max_value=300) | json_values,
        "log": st.booleans() | json_values,
        "description": st.text(max_size=10) | json_values,
        "extra": json_values,
    },
)


def assert_well_formed(rule: Rule) -> None:
    assert rule.protocol in PROTOCOLS
    assert rule.destinations, "a rule always has a destination"
    assert list(rule.destinations) == sorted(set(rule.destinations))
    for d in rule.destinations:
        assert d.version in (4, 6)
        assert 0 <= d.first <= d.last < 2**d.bits
    want = {"icmp": 4, "icmpv6": 6}.get(rule.protocol)
    if want:
        assert all(d.version == want for d in rule.destinations)
    if rule.protocol in ("tcp", "udp"):
        assert rule.ports
        assert list(rule.ports) == sorted(set(rule.ports))
        assert all(1 <= q.first <= q.last <= 65535 for q in rule.ports)
    else:
        assert rule.ports == ()
    if rule.protocol in ("icmp", "icmpv6"):
        assert type(rule.icmp_type) is int and -1 <= rule.icmp_type <= 255
        assert type(rule.icmp_code) is int and -1 <= rule.icmp_code <= 255
    else:
        assert rule.icmp_type is None and rule.icmp_code is None
    assert type(rule.log) is bool
    assert isinstance(rule.description, str)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | rule_like)
def test_parse_rule_never_raises_and_accepted_rules_are_well_formed(raw: object) -> None:
    rule, errors = parse_rule(raw)
    assert (rule is None) == bool(errors)
    assert all(isinstance(e, FieldError) and e.message for e in errors)
    assert len(set(errors)) == len(errors), "each finding is reported once"
    if rule is not None:
        assert_well_formed(rule)


@settings(max_examples=300)
@given(address_text)
def test_accepted_destinations_agree_with_pythons_ipaddress(text: str) -> None:
    """An independent oracle: whatever we accept, `ipaddress` reads as the same interval."""
    rule, _ = parse_rule({"protocol": "all", "destination": text})
    if rule is None:
        return
    expected = {AddressRange.parse(item) for item in text.split(",")}
    assert set(rule.destinations) == expected


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(min_value=0, max_value=bits))
    address = draw(st.integers(min_value=0, max_value=2**bits - 1))
    return ipaddress.ip_network((address, prefix), strict=False)


@settings(max_examples=200)
@given(networks(), st.booleans())
def test_every_network_is_accepted_in_cidr_and_range_form(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network, exploded: bool
) -> None:
    first, last = net.network_address, net.broadcast_address
    spell = (lambda a: a.exploded) if exploded and net.version == 6 else str
    cidr = ok({"protocol": "all", "destination": f"{spell(first)}/{net.prefixlen}"})
    rng = ok({"protocol": "all", "destination": f"{spell(first)}-{spell(last)}"})
    assert cidr == rng
    assert cidr.destinations == (AddressRange(net.version, int(first), int(last)),)


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=8))
def test_every_port_list_is_accepted_as_string_int_list_and_comma_list(ports: list[int]) -> None:
    expected = tuple(PortRange(n, n) for n in sorted(set(ports)))
    assert ok(tcp("10.0.0.1", ",".join(map(str, ports)))).ports == expected
    assert ok(tcp("10.0.0.1", ports)).ports == expected
    assert ok(tcp("10.0.0.1", [str(n) for n in ports])).ports == expected


@settings(max_examples=300)
@given(json_values | address_text | st.lists(address_text | json_values, max_size=4))
def test_parse_destination_ips_never_raises(value: object) -> None:
    ranges, errors = parse_destination_ips(value)
    assert (ranges is None) == bool(errors)
    if ranges is not None:
        assert ranges and all(0 <= x.first <= x.last < 2**x.bits for x in ranges)


@settings(max_examples=300)
@given(json_values | port_text | st.lists(port_text | json_values, max_size=4))
def test_parse_port_ranges_never_raises(value: object) -> None:
    ports, errors = parse_port_ranges(value)
    assert (ports is None) == bool(errors)
    if ports is not None:
        assert ports and all(1 <= q.first <= q.last <= 65535 for q in ports)
