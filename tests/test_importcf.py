"""Specification of `asgctl import-cf`: Cloud Foundry input in, policy documents out.

The test data are the examples from Cloud Foundry's API documentation (`POST /v2/
security_groups`, the v3 security group object) and `cf create-security-group` rules files.
The central promise is the round trip: the imported YAML describes exactly the same rules as
the CF input, so parsing both with the CF grammar gives equal `Rule` objects.
"""

from __future__ import annotations

import copy
import ipaddress

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.policy.grammar import parse_rule
from reconciler.policy.importcf import SCHEMA_COMMENT, dump_documents, import_cf

# `cf create-security-group my_super_sec_group rules.json`, from the CF v2 API docs.
V2_DOCS_RULES = [
    {"protocol": "icmp", "destination": "0.0.0.0/0", "type": 0, "code": 1},
    {"protocol": "tcp", "destination": "0.0.0.0/0", "ports": "2048-3000", "log": True},
    {"protocol": "udp", "destination": "0.0.0.0/0", "ports": "53, 5353"},
    {
        "protocol": "all",
        "destination": "0.0.0.0/0",
        "description": "This rule allows access to all ips and protocols",
    },
]

# The v3 security group object, from the CF v3 API docs.
V3_DOCS_GROUP = {
    "guid": "b85a788e-671f-4549-814d-e34cdb2f539a",
    "created_at": "2020-02-20T17:42:08Z",
    "updated_at": "2020-02-20T17:42:08Z",
    "name": "my-group0",
    "globally_enabled": {"running": True, "staging": False},
    "rules": [
        {"protocol": "tcp", "destination": "10.10.10.0/24", "ports": "443,80,8080"},
        {
            "protocol": "icmp",
            "destination": "10.10.10.0/24",
            "type": 8,
            "code": 0,
            "description": "Allow ping requests to private services",
        },
    ],
    "relationships": {
        "staging_spaces": {"data": [{"guid": "space-guid-1"}, {"guid": "space-guid-2"}]},
        "running_spaces": {"data": []},
    },
    "links": {
        "self": {
            "href": "https://api.example.org/v3/security_groups/b85a788e-671f-4549-814d-e34cdb2f539a"
        }
    },
}

PUBLIC_NETWORKS = {
    "guid": "0a1b2c3d-0000-4000-8000-000000000001",
    "name": "public_networks",
    "globally_enabled": {"running": True, "staging": True},
    "rules": [
        {"protocol": "all", "destination": "0.0.0.0-9.255.255.255"},
        {"protocol": "all", "destination": "11.0.0.0-169.253.255.255"},
        {
            "protocol": "tcp",
            "destination": "10.0.11.0/24,10.0.12.1",
            "ports": "80,443",
            "log": True,
        },
        {"protocol": "icmpv6", "destination": "2001:db8::/32", "type": -1, "code": -1},
    ],
    "relationships": {
        "running_spaces": {"data": [{"guid": "space-b"}, {"guid": "space-a"}]},
        "staging_spaces": {"data": []},
    },
}


def v3_list(*groups: dict, next_page: object = None) -> dict:
    return {
        "pagination": {
            "total_results": len(groups),
            "total_pages": 1,
            "first": {"href": "https://api.example.org/v3/security_groups?page=1&per_page=50"},
            "last": {"href": "https://api.example.org/v3/security_groups?page=1&per_page=50"},
            "next": next_page,
            "previous": None,
        },
        "resources": list(groups),
    }


def rules_of(raw_rules: list) -> list:
    parsed = []
    for raw in raw_rules:
        rule, errors = parse_rule(raw)
        assert errors == []
        parsed.append(rule)
    return parsed


def imported(data: object, name: str | None = None) -> list[dict]:
    docs, errors, _ = import_cf(data, name=name)
    assert errors == []
    return docs


# ---------------------------------------------------------------------------------------------
# Input forms


class TestBareRulesArray:
    def test_cf_docs_example(self) -> None:
        assert imported(V2_DOCS_RULES, "my_super_sec_group") == [
            {"kind": "SecurityGroup", "name": "my_super_sec_group", "rules": V2_DOCS_RULES}
        ]

    def test_values_are_kept_exactly_as_cf_gave_them(self) -> None:
        (doc,) = imported(V2_DOCS_RULES, "g")
        assert doc["rules"][2]["ports"] == "53, 5353"  # not rewritten, still a string
        assert doc["rules"][0]["type"] == 0 and doc["rules"][0]["code"] == 1

    def test_a_name_is_required(self) -> None:
        assert import_cf(V2_DOCS_RULES, name=None) == (
            [],
            ["a name is required to import a bare rules array"],
            [],
        )

    def test_empty_array_is_a_group_without_rules(self) -> None:
        assert imported([], "empty") == [{"kind": "SecurityGroup", "name": "empty", "rules": []}]

    def test_the_input_is_not_modified(self) -> None:
        data = copy.deepcopy(V2_DOCS_RULES)
        imported(data, "g")
        assert data == V2_DOCS_RULES


class TestV3Resource:
    def test_cf_docs_example(self) -> None:
        assert imported(V3_DOCS_GROUP) == [
            {
                "kind": "SecurityGroup",
                "name": "my-group0",
                "rules": V3_DOCS_GROUP["rules"],
                "globally_enabled": {"running": True, "staging": False},
                "staging_spaces": ["space-guid-1", "space-guid-2"],
            }
        ]

    def test_bindings_become_sorted_guid_lists_and_empty_ones_are_dropped(self) -> None:
        (doc,) = imported(PUBLIC_NETWORKS)
        assert doc["running_spaces"] == ["space-a", "space-b"]
        assert "staging_spaces" not in doc

    def test_missing_optional_parts_are_not_invented(self) -> None:
        assert imported({"guid": "g1", "name": "bare"}) == [
            {"kind": "SecurityGroup", "name": "bare", "rules": []}
        ]

    def test_name_selects_the_group(self) -> None:
        assert imported(V3_DOCS_GROUP, "my-group0")[0]["name"] == "my-group0"
        assert import_cf(V3_DOCS_GROUP, name="other") == (
            [],
            ["security group 'other' is not in the input"],
            [],
        )

    def test_duplicate_space_guids_are_listed_once(self) -> None:
        group = {
            "name": "g",
            "rules": [],
            "relationships": {"running_spaces": {"data": [{"guid": "s1"}, {"guid": "s1"}]}},
        }
        assert imported(group)[0]["running_spaces"] == ["s1"]


class TestV3List:
    def test_every_group_in_order(self) -> None:
        docs = imported(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS))
        assert [d["name"] for d in docs] == ["my-group0", "public_networks"]

    def test_name_picks_one_group(self) -> None:
        docs = imported(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS), "public_networks")
        assert [d["name"] for d in docs] == ["public_networks"]

    def test_name_not_found(self) -> None:
        assert import_cf(v3_list(V3_DOCS_GROUP), name="nope") == (
            [],
            ["security group 'nope' is not in the input"],
            [],
        )

    def test_an_empty_list_imports_nothing(self) -> None:
        assert import_cf(v3_list(), name=None) == ([], [], [])

    def test_duplicate_names_are_refused_in_cfs_words(self) -> None:
        _, errors, _ = import_cf(v3_list(V3_DOCS_GROUP, V3_DOCS_GROUP), name=None)
        assert errors == ["Security group with name 'my-group0' already exists."]

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ({"resources": "x"}, "resources must be an array"),
            ({"resources": [42]}, "resources[0] must be an object"),
        ],
    )
    def test_malformed_lists(self, data: dict, message: str) -> None:
        assert import_cf(data, name=None) == ([], [message], [])


class TestUnrecognisedInput:
    @pytest.mark.parametrize(
        "data",
        [
            {"metadata": {"guid": "g"}, "entity": {"name": "n", "rules": []}},
            {"total_results": 1, "resources": [{"metadata": {}, "entity": {"name": "n"}}]},
        ],
    )
    def test_v2_responses_point_to_v3(self, data: dict) -> None:
        assert import_cf(data, name=None) == (
            [],
            [
                "this is a v2 API response; export the v3 form (README: Importing from Cloud "
                "Foundry)"
            ],
            [],
        )

    @pytest.mark.parametrize(
        ("data", "kind"), [("rules", "str"), (42, "int"), (None, "NoneType"), ({"a": 1}, "dict")]
    )
    def test_says_what_it_expected(self, data: object, kind: str) -> None:
        assert import_cf(data, name="g") == (
            [],
            [
                "input is not a CF rules array, a v3 security group, a v3 security group list, "
                f"or a BOSH manifest or ops file (got a JSON {kind})"
            ],
            [],
        )


# ---------------------------------------------------------------------------------------------
# Errors: CF's v3 form, prefixed with the group name


class TestErrors:
    def test_rule_errors_use_cfs_v3_form(self) -> None:
        _, errors, _ = import_cf(
            [
                {"protocol": "tcp", "destination": "10.0.0.1", "ports": "443"},
                {"protocol": "blah"},
                {"not-a-field": True, "protocol": "all", "destination": "10.0.0.1"},
                "bad rule",
            ],
            name="g",
        )
        assert errors == [
            "g: Rules[1]: protocol must be 'tcp', 'udp', 'icmp', 'icmpv6' or 'all'",
            "g: Rules[1]: nil destination; destination must be a comma-delimited list of "
            "valid CIDRs, IP addresses, or IP address ranges",
            'g: Rules[2]: unknown field(s): ["not-a-field"]',
            "g: Rules[3]: must be an object",
        ]

    def test_errors_from_several_groups_are_all_reported(self) -> None:
        bad_a = {"name": "a", "rules": [{"protocol": "udp", "destination": "10.0.0.1"}]}
        bad_b = {"name": "b", "rules": [{"protocol": "all", "destination": "9.9.9.9-0.0.0.0"}]}
        _, errors, _ = import_cf(v3_list(bad_a, V3_DOCS_GROUP, bad_b), name=None)
        assert errors == [
            "a: Rules[0]: ports are required for protocols of type TCP and UDP",
            "b: Rules[0]: beginning of IP address range is numerically greater than the end "
            "of its range (range endpoints are inverted)",
        ]

    @pytest.mark.parametrize(
        ("group", "message"),
        [
            ({"name": "g", "rules": "x"}, "g: Rules must be an array"),
            ({"name": "g", "rules": None}, "g: Rules must be an array"),
            ({"guid": "x", "rules": []}, "<unnamed>: Name can't be blank"),
            ({"name": "", "rules": []}, "<unnamed>: Name can't be blank"),
            ({"name": 5, "rules": []}, "<unnamed>: Name must be a string"),
            (
                {"name": "n" * 251, "rules": []},
                f"{'n' * 251}: Name is too long (maximum is 250 characters)",
            ),
            (
                {"name": "g", "globally_enabled": True},
                "g: Globally enabled must be an object",
            ),
            (
                {"name": "g", "globally_enabled": {"running": True, "tasks": True}},
                "g: Globally enabled only allows keys 'running' or 'staging'",
            ),
            (
                {"name": "g", "globally_enabled": {"running": "yes"}},
                "g: Globally enabled values must be booleans",
            ),
            ({"name": "g", "relationships": []}, "g: Relationships must be an object"),
            (
                {"name": "g", "relationships": {"running_spaces": []}},
                "g: Relationships running_spaces must be an object with a data array",
            ),
            (
                {"name": "g", "relationships": {"staging_spaces": {"data": [{"id": "x"}]}}},
                "g: Relationships staging_spaces data entries must be objects with a guid string",
            ),
        ],
    )
    def test_group_level_errors(self, group: dict, message: str) -> None:
        _, errors, _ = import_cf(group, name=None)
        assert message in errors

    def test_a_250_character_name_is_fine(self) -> None:
        assert imported([], "n" * 250)[0]["name"] == "n" * 250

    def test_bare_array_name_is_checked_too(self) -> None:
        _, errors, _ = import_cf([], name="")
        assert errors == ["<unnamed>: Name can't be blank"]


# ---------------------------------------------------------------------------------------------
# What is kept and what is dropped


class TestRuleFields:
    def test_empty_descriptions_are_dropped(self) -> None:
        raw = {"protocol": "all", "destination": "10.0.0.0/8", "description": ""}
        (doc,) = imported([raw], "g")
        assert doc["rules"] == [{"protocol": "all", "destination": "10.0.0.0/8"}]

    def test_explicit_false_log_is_kept(self) -> None:
        raw = {"protocol": "tcp", "destination": "10.0.0.1", "ports": "1", "log": False}
        assert imported([raw], "g")[0]["rules"] == [raw]

    def test_keys_are_written_in_cfs_documented_order(self) -> None:
        raw = {"log": True, "ports": "80", "destination": "10.0.0.1", "protocol": "tcp"}
        (doc,) = imported([raw], "g")
        assert list(doc["rules"][0]) == ["protocol", "destination", "ports", "log"]


# ---------------------------------------------------------------------------------------------
# YAML output and the round trip


class TestDump:
    def test_first_line_is_the_schema_hint(self) -> None:
        text = dump_documents(imported(V3_DOCS_GROUP))
        assert text.splitlines()[0] == SCHEMA_COMMENT
        assert SCHEMA_COMMENT == "# yaml-language-server: $schema=../schemas/asgctl.schema.json"

    def test_multi_document_yaml_loads_back_to_the_same_documents(self) -> None:
        docs = imported(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS))
        text = dump_documents(docs)
        assert list(yaml.safe_load_all(text)) == docs
        assert text.count("\n---\n") == 1

    def test_one_rule_per_line(self) -> None:
        text = dump_documents(imported(V2_DOCS_RULES, "my_super_sec_group"))
        assert "- {protocol: udp, destination: 0.0.0.0/0, ports: '53, 5353'}\n" in text
        assert "- {protocol: tcp, destination: 0.0.0.0/0, ports: 2048-3000, log: true}\n" in text

    def test_strings_that_look_like_numbers_stay_strings(self) -> None:
        rules = [
            {"protocol": "tcp", "destination": "10.0.0.1", "ports": "443"},
            {"protocol": "tcp", "destination": "10.0.0.1", "ports": "1"},
            {"protocol": "udp", "destination": "::1", "ports": "8080"},
        ]
        (doc,) = yaml.safe_load_all(dump_documents(imported(rules, "g")))
        assert [r["ports"] for r in doc["rules"]] == ["443", "1", "8080"]

    def test_unicode_descriptions_survive(self) -> None:
        rule = {"protocol": "all", "destination": "10.0.0.1", "description": "Zürich — 東京"}
        text = dump_documents(imported([rule], "g"))
        assert "Zürich — 東京" in text
        assert next(yaml.safe_load_all(text))["rules"] == [rule]

    def test_shared_objects_are_written_out_not_aliased(self) -> None:
        spaces = ["s1", "s2"]
        rule = {"protocol": "all", "destination": ["10.0.0.1", "10.0.0.2"]}
        text = dump_documents(
            [
                {
                    "kind": "SecurityGroup",
                    "name": "g",
                    "rules": [rule, rule],
                    "running_spaces": spaces,
                }
            ]
        )
        assert "&" not in text and "*" not in text

    @pytest.mark.parametrize(
        "description", ["a\x85b", "line\u2028sep", "tab\there", "two\nlines ", "\ufeffbom", "\x00"]
    )
    def test_control_characters_survive_exactly(self, description: str) -> None:
        rule = {"protocol": "all", "destination": "10.0.0.1", "description": description}
        text = dump_documents(imported([rule], "g"))
        assert next(yaml.safe_load_all(text))["rules"][0]["description"] == description

    def test_no_documents(self) -> None:
        assert dump_documents([]) == SCHEMA_COMMENT + "\n"

    def test_documents_are_not_modified(self) -> None:
        docs = imported(V3_DOCS_GROUP)
        before = copy.deepcopy(docs)
        dump_documents(docs)
        assert docs == before and type(docs[0]["rules"][0]) is dict


@pytest.mark.parametrize(
    "data",
    [V2_DOCS_RULES, V3_DOCS_GROUP, v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS)],
    ids=["v2-docs-rules", "v3-docs-group", "v3-list"],
)
def test_round_trip_gives_the_same_rules(data: object) -> None:
    docs = imported(data, "from-array" if isinstance(data, list) else None)
    loaded = list(yaml.safe_load_all(dump_documents(docs)))
    sources = (
        [data]
        if isinstance(data, list)
        else [g["rules"] for g in data["resources"]]
        if "resources" in data
        else [data["rules"]]
    )
    assert len(loaded) == len(sources)
    for doc, source in zip(loaded, sources, strict=True):
        assert rules_of(doc["rules"]) == rules_of(source)
        assert [r.description for r in rules_of(doc["rules"])] == [
            r.description for r in rules_of(source)
        ]


# Valid CF rules, spelled the many ways CF allows.
ipv4 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(min_value=0, max_value=2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@st.composite
def destination_item(draw: st.DrawFn, version: int) -> str:
    address = draw(ipv4 if version == 4 else ipv6)
    form = draw(st.sampled_from(["address", "cidr", "range"]))
    if form == "cidr":
        return f"{address}/{draw(st.integers(0, 32 if version == 4 else 128))}"
    if form == "range":
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        a, b = sorted(
            [int(cls(address)), draw(st.integers(0, 2 ** (32 if version == 4 else 128) - 1))]
        )
        return f"{cls(a)}-{cls(b)}"
    return address


@st.composite
def cf_rules(draw: st.DrawFn) -> dict:
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "all"]))
    versions = {"icmp": [4], "icmpv6": [6]}.get(protocol, [4, 6])
    items = draw(
        st.lists(st.sampled_from(versions).flatmap(destination_item), min_size=1, max_size=4)
    )
    rule: dict = {"protocol": protocol, "destination": ",".join(items)}
    if protocol in ("tcp", "udp"):
        ports = draw(st.lists(st.integers(1, 65535), min_size=1, max_size=4))
        if len(ports) == 2 and ports[0] < ports[1] and draw(st.booleans()):
            rule["ports"] = f"{ports[0]}-{ports[1]}"
        else:
            rule["ports"] = draw(st.sampled_from([",", ", ", " , "])).join(map(str, ports))
    if protocol in ("icmp", "icmpv6"):
        rule["type"] = draw(st.integers(-1, 255))
        rule["code"] = draw(st.integers(-1, 255))
    if draw(st.booleans()):
        rule["log"] = draw(st.booleans())
    if draw(st.booleans()):
        rule["description"] = draw(st.text(max_size=20))
    return rule


@settings(max_examples=150)
@given(
    st.lists(cf_rules(), max_size=6),
    st.text(min_size=1, max_size=20).filter(str.isprintable),
)
def test_round_trip_property(rules: list[dict], name: str) -> None:
    docs, errors, warnings = import_cf(rules, name=name)
    assert errors == []
    assert all("has host bits set" in w for w in warnings)
    (doc,) = yaml.safe_load_all(dump_documents(docs))
    assert doc["name"] == name
    assert rules_of(doc["rules"]) == rules_of(rules)
    assert [r.description for r in rules_of(doc["rules"])] == [
        r.description for r in rules_of(rules)
    ]
