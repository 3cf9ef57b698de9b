"""Arbitrary input through `import-cf` (issue 20 item 11): CF exports and BOSH files come from
outside, so whatever they hold, import answers with errors or documents, never a traceback,
and whatever it accepts is a policy that validates and means what the input said."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.policy.grammar import ALLOWED_RULE_KEYS, parse_rule
from reconciler.policy.importcf import Imported, dump_documents, import_files, import_sources
from reconciler.policy.load import parse_files
from reconciler.policy.source import SourceFile
from tests.test_importcf import cf_rules

KEYS = [
    *ALLOWED_RULE_KEYS,
    "name",
    "rules",
    "guid",
    "globally_enabled",
    "running",
    "staging",
    "relationships",
    "running_spaces",
    "staging_spaces",
    "data",
    "resources",
    "pagination",
    "total_results",
    "total_pages",
    "next",
    "previous",
    "href",
    "instance_groups",
    "jobs",
    "properties",
    "cc",
    "security_group_definitions",
    "default_running_security_groups",
    "path",
    "value",
    "entity",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(
        [
            "tcp",
            "udp",
            "icmp",
            "icmpv6",
            "all",
            "10.0.0.1",
            "198.41.191.47/1",
            "10.0.0.0-10.0.0.9",
            "2001:db8::/32",
            "443",
            "80,443",
            "1-65535",
            "cloud_controller_ng",
            "replace",
            "remove",
            "/instance_groups/name=api/jobs/name=cloud_controller_ng/properties/cc/"
            "security_group_definitions?/-",
            "https://api.example.org/v3/security_groups?page=2&per_page=1",
            "",
        ]
    ),
    st.text(max_size=12),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


def check(result: Imported) -> None:
    """Errors or documents; accepted documents validate and keep the input's rules."""
    assert all(isinstance(m, str) for m in result.errors + result.warnings)
    if result.errors:
        return
    text = dump_documents(result.documents)
    loaded = parse_files([SourceFile("imported.yaml", text.encode())])
    assert loaded.ok, [str(f) for f in loaded.findings]
    groups = {g.name: g for g in loaded.policy.security_groups}
    for doc in result.documents:
        written = [replace(r, location=None) for r in groups[doc["name"]].rules]
        assert written == [parse_rule(r)[0] for r in doc["rules"]]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(JSONISH, min_size=1, max_size=3), st.none() | st.sampled_from(["g", "asg"]))
def test_arbitrary_structures_give_errors_or_valid_policy(inputs: list, name: str | None) -> None:
    check(import_sources([(f"in{i}.json", d) for i, d in enumerate(inputs)], name))


RULE = st.fixed_dictionaries(
    {"protocol": st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "all"])},
    optional={k: SCALARS for k in ("destination", "ports", "type", "code", "log", "description")},
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(RULE, max_size=5))
def test_plausible_rules_give_errors_or_valid_policy(rules: list) -> None:
    check(import_sources([("rules.json", rules)], "g"))


KEY = st.sampled_from(
    [
        "security_group_definitions",
        "security_group_definitions?",
        "default_running_security_groups?",
        "default_staging_security_groups",
    ]
)
TAIL = st.sampled_from(
    ["", "/-", "/0", "/-1", "/7", "/name=dns", "/name=dns?", "/name=dns/rules/-", "/x/y", "/-/x"]
)
CC = "/instance_groups/name=api/jobs/name=cloud_controller_ng/properties/cc/"
VALID_DEFINITION = st.fixed_dictionaries(
    {"name": st.sampled_from(["dns", "web", "db"]), "rules": st.lists(cf_rules(), max_size=3)}
)
DEFINITION = st.fixed_dictionaries(
    {"name": st.sampled_from(["dns", "web", ""]), "rules": st.lists(cf_rules() | RULE, max_size=3)}
)
OPS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["replace", "remove", "delete"]),
            "path": st.tuples(KEY, TAIL).map(lambda kt: CC + "".join(kt)),
        },
        optional={"value": JSONISH | cf_rules() | DEFINITION | st.lists(DEFINITION, max_size=2)},
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(OPS)
def test_bosh_ops_give_errors_or_valid_policy(ops: list) -> None:
    """`bosh int`-style operations on cc.security_group_definitions, on their own."""
    check(import_sources([("ops.yml", ops)], None))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(VALID_DEFINITION, max_size=3, unique_by=lambda d: d["name"]), OPS)
def test_bosh_ops_on_valid_definitions_give_errors_or_valid_policy(
    definitions: list, ops: list
) -> None:
    seed = {"type": "replace", "path": CC + "security_group_definitions?", "value": definitions}
    check(import_sources([("ops.yml", [seed, *ops])], None))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode), st.booleans())
def test_arbitrary_bytes_give_clean_errors(tmp_path_factory, data: bytes, as_yaml: bool) -> None:
    path = tmp_path_factory.mktemp("in") / ("in.yml" if as_yaml else "in.json")
    path.write_bytes(data)
    check(import_files([str(path)], None))


@pytest.mark.parametrize(
    ("file", "data", "message"),
    [
        ("deep.json", "[" * 100_000, "deep.json:1:257: not valid JSON: nested too deeply"),
        (
            "deep-object.json",
            '{"rules":' * 100_000,
            "deep-object.json:1:2305: not valid JSON: nested too deeply",
        ),
        (
            "huge.json",
            '[{"protocol": "icmp", "destination": "10.0.0.1",\n "type": ' + "9" * 5000 + "}]",
            "huge.json:2:10: not valid JSON: a number with 5000 digits (at most 100) in field "
            '"type"',
        ),
        ("nan.json", '[{"protocol": "icmp", "type": NaN}]', "nan.json:1:31: not valid JSON: NaN"),
        (
            "dupe.json",
            '[{"protocol": "tcp", "ports": "443", "destination": "10.0.0.1",\n'
            ' "ports": "1-65535"}]',
            'dupe.json:2:2: not valid JSON: duplicate key "ports"',
        ),
        ("deep.yml", "a: " + "[" * 10_000, "deep.yml:1:"),
    ],
)
def test_hostile_files_are_clean_cli_errors(
    tmp_path: Path, file: str, data: str, message: str
) -> None:
    """The same two attacks that once crashed store.json reading, now on import-cf, and the
    one it adds: a duplicate key that a reviewer reads first and JSON readers keep last."""
    (tmp_path / file).write_text(data)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import-cf", str(tmp_path / file), "--out", str(out)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    assert f"{tmp_path}/{message}" in result.output, result.output
    assert "nothing was written" in result.output and not out.exists()


def test_a_page_of_json_noise_is_not_a_crash(tmp_path: Path) -> None:
    page = {"pagination": {"total_results": "x", "next": {"href": 5}}, "resources": [None]}
    (tmp_path / "p.json").write_text(json.dumps(page))
    result = CliRunner().invoke(main, ["import-cf", str(tmp_path / "p.json")])
    assert result.exit_code == 1 and "resources[0] must be an object" in result.output
