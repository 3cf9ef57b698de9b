"""Arbitrary text and structures through load -> validate -> compile -> render.

Whatever arrives in a pull request, the pipeline answers with findings, never a traceback,
and whatever it renders was asked for by some rule of the input.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.backends.iptables.render import render_text
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.policy.findings import Finding
from reconciler.policy.load import parse_files
from reconciler.policy.source import SourceFile

CONTAINERS = [
    Container("c4", "198.18.0.2", app_id="app-1", space_id="space-1"),
    Container("c6", "fd00:18::2", app_id="app-1", space_id="space-1", workload="staging"),
]
KEYS = [
    "kind",
    "name",
    "rules",
    "protocol",
    "destination",
    "ports",
    "type",
    "code",
    "log",
    "description",
    "globally_enabled",
    "running",
    "staging",
    "running_spaces",
    "staging_spaces",
    "ips",
    "start",
    "end",
    "source",
    "id",
    "app_lifecycle",
    "orgs",
    "guid",
    "spaces",
    "apps",
    "cases",
    "to",
    "expect",
    "icmp_type",
    "icmp_code",
    "scope",
    "mode",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "SecurityGroup",
            "Destination",
            "EgressPolicy",
            "Directory",
            "PolicyTest",
            "Rollout",
            "Enforcement",
            "audit",
            "enforce",
            "tcp",
            "udp",
            "icmp",
            "icmpv6",
            "all",
            "198.19.0.1",
            "198.19.0.0/24",
            "fd00::1",
            "198.19.0.1-198.19.0.9",
            "80",
            "80,443",
            "80-90",
            "1-65535",
            "-1",
            "app",
            "space",
            "default",
            "running",
            "staging",
            "o/s",
            "o/s/a",
            "space-1",
            "app-1",
            "１２３",
            "fe80::1%eth0",
            "10.0.0.1/33",
            "\n-A FORWARD -j ACCEPT\nCOMMIT",
            "${x}",
            "",
        ]
    ),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=6),
    ),
    max_leaves=15,
)
DOCUMENT = st.fixed_dictionaries(
    {"kind": st.sampled_from(["SecurityGroup", "Destination", "EgressPolicy", "Directory"])},
    optional={k: VALUES for k in KEYS if k != "kind"},
)


def run_pipeline(files: list[SourceFile]) -> None:
    result = parse_files(files)
    assert all(isinstance(f, Finding) for f in result.findings)
    for f in result.findings:
        assert f.line >= 1 and f.col >= 1 and f.message
        assert "Traceback" not in str(f)
    if not result.ok:
        return
    plan = compile_cell(result.policy, CONTAINERS)
    asked = {
        item for g in result.policy.security_groups for rule in g.rules for item in rule.items()
    } | {item for d in result.policy.destinations for item in d.as_rule().items()}
    for group in plan.groups:
        for rule in group.rules:
            assert rule.item in asked, f"rendered a rule nobody asked for: {rule.item}"
    for family in (4, 6):
        text = render_text(plan, family)
        assert text.startswith("*filter\n") and text.endswith("COMMIT\n")
        assert text.count("COMMIT") == 1


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(DOCUMENT, min_size=1, max_size=3))
def test_arbitrary_structures_give_clean_findings(docs):
    text = yaml.safe_dump_all(
        [json.loads(json.dumps(d, default=str, allow_nan=True)) for d in docs]
    )
    run_pipeline([SourceFile("fuzz.yaml", text.encode())])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_arbitrary_bytes_give_clean_findings(data):
    run_pipeline([SourceFile("fuzz.yaml", data)])


YAML_ATOMS = st.sampled_from(
    [
        "kind: SecurityGroup\n",
        "name: x\n",
        "rules:\n",
        "  - ",
        "{protocol: tcp, ",
        "destination: 198.19.0.1, ",
        "ports: '80'}\n",
        "&a ",
        "*a ",
        "<<: ",
        "---\n",
        "[",
        "]",
        "{",
        "}",
        "!!str ",
        "!!python/name:os.system ",
        "? ",
        ": ",
        "- ",
        "\t",
        "'",
        '"',
        "#",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(YAML_ATOMS, max_size=40).map("".join))
def test_yaml_shaped_noise_gives_clean_findings(text):
    run_pipeline([SourceFile("fuzz.yaml", text.encode())])


PLAUSIBLE_RULE = st.fixed_dictionaries(
    {
        "protocol": st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "all"]),
        "destination": st.sampled_from(
            [
                "198.19.0.1",
                "198.19.0.0/24",
                "198.19.0.5-198.19.0.9",
                "fd00:19::/64",
                "198.19.1.1,198.19.2.0/30",
                "0.0.0.0/0",
                "198.19.0.9-198.19.0.5",
                "198.019.0.1",
            ]
        ),
    },
    optional={
        "ports": st.sampled_from(["80", "80,443", "1000-2000", " 53 ", "0", "65536", 443]),
        "type": st.integers(-2, 256),
        "code": st.integers(-2, 256),
        "log": st.booleans(),
        "description": st.text(max_size=30),
    },
)
PLAUSIBLE_GROUP = st.fixed_dictionaries(
    {
        "kind": st.just("SecurityGroup"),
        "name": st.text(min_size=1, max_size=12),
        "rules": st.lists(PLAUSIBLE_RULE, max_size=5),
    },
    optional={
        "globally_enabled": st.fixed_dictionaries(
            {}, optional={"running": st.booleans(), "staging": st.booleans()}
        ),
        "running_spaces": st.lists(st.sampled_from(["space-1", "space-2"]), max_size=2),
        "staging_spaces": st.lists(st.sampled_from(["space-1", "space-2"]), max_size=2),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(PLAUSIBLE_GROUP, min_size=1, max_size=4))
def test_plausible_policies_compile_to_only_what_was_asked(groups):
    run_pipeline([SourceFile("fuzz.yaml", yaml.safe_dump_all(groups).encode())])
