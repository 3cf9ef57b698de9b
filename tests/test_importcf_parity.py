"""`import-cf` accepts exactly what Cloud Controller accepts (issue 13).

Cases come from cloud_controller_ng's own specs and code, cited per case:
* the v3 request validator, app/messages/validators/security_group_rule_validator.rb (line
  numbers are of its icmpv6 revision: :52-62 per protocol, :107-108 valid_ports, :113-140
  valid_destination_type), and its spec
  spec/unit/messages/validators/security_group_rule_validator_spec.rb;
* the model validator, app/models/runtime/security_group.rb:60-88 (`validate_rules`) with
  lib/cloud_controller/rule_validator.rb@1bca0d3 (:5-6 fields, :15 log, :17 description),
  transport_rule_validator.rb, icmp_rule_validator.rb, and its spec
  spec/unit/models/runtime/security_group_spec.rb;
* seeding from the BOSH manifest, lib/cloud_controller/seeds.rb `create_seed_security_groups`.
Also: every page of a paginated `/v3/security_groups`, BOSH manifests and ops files, and the
README's `cf curl` recipe run against a Cloud Controller stand-in with more than 50 groups.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.policy.importcf import import_cf, import_sources
from reconciler.policy.load import load_folder

REPO = Path(__file__).resolve().parent.parent
PORTS_INVALID = (
    "ports must be a valid single port, comma separated list of ports, or range or ports, "
    "formatted as a string"
)


def transport(**kw: object) -> dict:
    """security_group_spec.rb@0421a54:6-12 `build_transport_rule`."""
    return {"protocol": "udp", "ports": "8080-9090", "destination": "198.41.191.47/1", **kw}


def icmp_rule(**kw: object) -> dict:
    """security_group_spec.rb@0421a54:14-21 `build_icmp_rule`."""
    return {"protocol": "icmp", "type": 0, "code": 0, "destination": "0.0.0.0/0", **kw}


def all_rule(**kw: object) -> dict:
    return {"protocol": "all", "destination": "0.0.0.0/0", **kw}


MODEL_SPEC = "spec/unit/models/runtime/security_group_spec.rb"
MESSAGE_SPEC = "spec/unit/messages/validators/security_group_rule_validator_spec.rb"

# (id, rule, None when CC accepts it, else a message CC's validators give for it, where)
PARITY: list[tuple[str, dict, str | None, str]] = [
    ("ports-range", transport(ports="8080-8081"), None, MODEL_SPEC + " ports is a range"),
    ("ports-list", transport(ports="8080, 8081"), None, MODEL_SPEC + " comma separated list"),
    ("ports-single-padded", transport(ports=" 8080 "), None, MODEL_SPEC + " single value"),
    ("ports-range-padded", transport(ports=" 1 - 4 "), None, MODEL_SPEC + " space padding"),
    ("ports-non-integers", transport(ports="asdf"), PORTS_INVALID, MODEL_SPEC),
    ("ports-degenerate", transport(ports="1-1"), PORTS_INVALID, MODEL_SPEC + " degenerate"),
    ("ports-decreasing", transport(ports="8-1"), PORTS_INVALID, MODEL_SPEC),
    ("ports-negative", transport(ports="-1"), PORTS_INVALID, MODEL_SPEC),
    ("ports-zero", transport(ports="0-7"), PORTS_INVALID, MODEL_SPEC),
    ("ports-two-formats", transport(ports="1-7,1"), PORTS_INVALID, MODEL_SPEC),
    ("ports-65536", transport(ports="1,5,65536"), PORTS_INVALID, MODEL_SPEC),
    (
        "ports-missing",
        {"protocol": "udp", "destination": "198.41.191.47/1"},
        "ports are required for protocols of type TCP and UDP",
        MODEL_SPEC + " missing required field 'ports'",
    ),
    # security_group_rule_validator.rb:107-108 `valid_ports`:
    # `return false unless ports.is_a?(String)`
    ("ports-integer", transport(ports=443), PORTS_INVALID, "security_group_rule_validator.rb:108"),
    ("ports-list-yaml-only", transport(ports=[443]), PORTS_INVALID, "valid_ports"),
    (
        "extraneous-field",
        transport(foobar="asdf"),
        'unknown field(s): ["foobar"]',
        MODEL_SPEC + " extraneous fields; " + MESSAGE_SPEC + " invalid key",
    ),
    # The request validator never looks at type/code for tcp/udp/all; the model refuses them.
    ("tcp-type", transport(protocol="tcp", type=0), "contains the invalid field 'type'", "model"),
    ("udp-code", transport(code=0), "contains the invalid field 'code'", "model"),
    ("all-type-null", all_rule(type=None), "contains the invalid field 'type'", "model"),
    ("all-ports", all_rule(ports="80"), "ports are not allowed for protocols of type all", "req"),
    ("all-ports-null", all_rule(ports=None), "contains the invalid field 'ports'", "model"),
    ("icmp-type-5", icmp_rule(type=5), None, MODEL_SPEC + " valid 8 bit number"),
    ("icmp-type-any", icmp_rule(type=-1), None, MODEL_SPEC + " type is -1"),
    (
        "icmp-type-asdf",
        icmp_rule(type="asdf"),
        "type must be an integer between -1 and 255 (inclusive)",
        MODEL_SPEC + " non numeric",
    ),
    (
        "icmp-type-256",
        icmp_rule(type=256),
        "type must be an integer between -1 and 255 (inclusive)",
        MODEL_SPEC,
    ),
    (
        "icmp-code-missing",
        {"protocol": "icmp", "type": 0, "destination": "0.0.0.0/0"},
        "code is required for protocols of type ICMP",
        MODEL_SPEC + " missing required field 'code'",
    ),
    ("icmp-range", icmp_rule(destination="1.1.1.1-2.2.2.2"), None, MODEL_SPEC + " valid range"),
    (
        "icmp-three-endpoints",
        icmp_rule(destination="1.1.1.1-2.2.2.2-3.3.3.3"),
        "destination must contain valid CIDR(s), IP address(es), or IP address range(s)",
        MODEL_SPEC + " more than 2 endpoints",
    ),
    (
        "icmp-backwards",
        icmp_rule(destination="2.2.2.2-1.1.1.1"),
        "beginning of IP address range is numerically greater than the end of its range "
        "(range endpoints are inverted)",
        MODEL_SPEC + " range is backwards",
    ),
    (
        "icmp-cidr-in-range",
        icmp_rule(destination="1.1.1.1-2.2.2.2/30"),
        "destination IP address range is invalid",
        MODEL_SPEC + " range has CIDR blocks",
    ),
    ("all-log-true", all_rule(log=True), None, MODEL_SPEC + " log is a boolean"),
    ("all-log-3", all_rule(log=3), "log must be a boolean", MODEL_SPEC + " non-boolean"),
    # rule_validator.rb:15/17 `rule.key?(...)`: a present null is not "not given" to the model.
    ("log-null", all_rule(log=None), "contains invalid log value", "rule_validator.rb:15"),
    (
        "desc-null",
        all_rule(description=None),
        "contains invalid description",
        "rule_validator.rb:17",
    ),
    (
        "protocol-unsupported",
        transport(protocol="foobar"),
        "protocol must be 'tcp', 'udp', 'icmp', 'icmpv6' or 'all'",
        MODEL_SPEC + " unsupported protocol",
    ),
    ("dest-0.0.0.0/33", all_rule(destination="0.0.0.0/33"), "destination must contain", "spec"),
    ("dest-0.257.0.0/20", all_rule(destination="0.257.0.0/20"), "destination must contain", "s"),
    (
        "dest-not-string",
        {"protocol": "udp", "destination": 42, "ports": "53"},
        "destination must be a string",
        MESSAGE_SPEC + " the destination is not a string",
    ),
    (
        "dest-list-yaml-only",
        all_rule(destination=["10.0.0.1"]),
        "destination must be a string",
        "security_group_rule_validator.rb:124-127 valid_destination_type",
    ),
    (
        "dest-leading-zero",
        transport(destination="10.000.0.0/24"),
        "destination octets cannot contain leading zeros",
        MESSAGE_SPEC + " leading zero in an octet",
    ),
]


@pytest.mark.parametrize(("rule", "message"), [c[1:3] for c in PARITY], ids=[c[0] for c in PARITY])
def test_cc_parity(rule: dict, message: str | None) -> None:
    docs, errors, _ = import_cf([rule], name="g")
    if message is None:
        assert errors == []
        assert docs[0]["rules"] == [rule]
    else:
        assert any(e.startswith("g: Rules[0]: ") and message in e for e in errors), errors


class TestCcAcceptsAndIgnores:
    @pytest.mark.parametrize(
        ("protocol", "destination"), [("icmp", "10.0.0.0/8"), ("icmpv6", "2001:db8::/32")]
    )
    @pytest.mark.parametrize("ports", ["80", "1-65535", None, 53])
    def test_icmp_ports_are_dropped_with_a_warning_naming_them(
        self, protocol: str, destination: str, ports: object
    ) -> None:
        """The request validator's `case rule[:protocol] when 'icmp'` never reads `ports`
        (security_group_rule_validator.rb:52-62), so exports carry such rules; ICMP has no
        ports, so dropping them changes no packet.  (Policy YAML keeps refusing them:
        tests/test_grammar.py::TestPortsNotAllowed.)"""
        rule = {"protocol": protocol, "destination": destination, "type": 8, "code": 0}
        docs, errors, warnings = import_cf([{**rule, "ports": ports}], name="g")
        assert errors == []
        assert docs[0]["rules"] == [rule]
        assert warnings == [
            f"g: Rules[0]: ports {json.dumps(ports)} dropped: {protocol} has no ports "
            "(Cloud Controller's request validator ignores them)"
        ]

    def test_host_bits_are_imported_as_cf_reads_them_with_a_warning(self) -> None:
        """security_group_spec.rb@0421a54:6-12 `build_transport_rule` uses 198.41.191.47/1:
        accepted."""
        docs, errors, warnings = import_cf([transport()], name="g")
        assert errors == [] and docs[0]["rules"] == [transport()]
        assert warnings == [
            "g: Rules[0]: 198.41.191.47/1 has host bits set: it means 128.0.0.0/1 "
            "(128.0.0.0-255.255.255.255)"
        ]

    @pytest.mark.parametrize("name", ["one\ntwo", "a\x1b word"])
    def test_names_cc_refuses(self, name: str) -> None:
        """security_group_spec.rb: 'should not allow newline characters' / 'escape characters'
        (SECURITY_GROUP_NAME_REGEX)."""
        _, errors, _ = import_cf({"name": name, "rules": []}, name=None)
        assert errors == [
            f"{name}: name is invalid (Cloud Controller allows printable characters only)"
        ]

    @pytest.mark.parametrize("name", ["A -_- word 2!?()'\"&+.", "a\\word", "Ω∂∂ƒƒß√˜˙∆ß"])
    def test_names_cc_accepts(self, name: str) -> None:
        """security_group_spec.rb: standard ascii, backslash and unicode characters."""
        assert import_cf({"name": name, "rules": []}, name=None).errors == []


# ---------------------------------------------------------------------------------------------
# Every page of /v3/security_groups


def group(n: int) -> dict:
    return {
        "guid": f"00000000-0000-4000-8000-{n:012d}",
        "name": f"asg-{n:03d}",
        "globally_enabled": {"running": False, "staging": False},
        "rules": [
            {"protocol": "tcp", "destination": f"198.19.{n // 250}.{n % 250}", "ports": "443"}
        ],
        "relationships": {"running_spaces": {"data": []}, "staging_spaces": {"data": []}},
    }


def listing(total: int, per_page: int) -> list[dict]:
    """Every page of `GET /v3/security_groups` as Cloud Controller paginates it."""
    pages = max(1, -(-total // per_page))
    base = "https://api.example.org/v3/security_groups"

    def link(page: int) -> dict:
        return {"href": f"{base}?page={page}&per_page={per_page}"}

    return [
        {
            "pagination": {
                "total_results": total,
                "total_pages": pages,
                "first": link(1),
                "last": link(pages),
                "next": link(p + 1) if p < pages else None,
                "previous": link(p - 1) if p > 1 else None,
            },
            "resources": [group(n) for n in range((p - 1) * per_page, min(total, p * per_page))],
        }
        for p in range(1, pages + 1)
    ]


class TestPages:
    def test_every_page_together_imports_every_group_in_page_order(self) -> None:
        p1, p2, p3 = listing(120, 50)
        result = import_sources([("c.json", p3), ("a.json", p1), ("b.json", p2)], None)
        assert result.errors == []
        assert [d["name"] for d in result.documents] == [f"asg-{n:03d}" for n in range(120)]

    def test_the_last_page_alone_is_refused(self) -> None:
        """The bug: page 3 has no `next`, so it used to import silently, losing 100 groups."""
        *_, last = listing(120, 50)
        assert import_sources([("p3.json", last)], None).errors == [
            "incomplete: the pages hold 20 of the 120 security groups that "
            "pagination.total_results counts (missing pages: 1, 2); pass every page of "
            "/v3/security_groups (README: Importing from Cloud Foundry)"
        ]

    def test_a_missing_middle_page_is_named(self) -> None:
        p1, _, p3 = listing(120, 50)
        (error,) = import_sources([("p1.json", p1), ("p3.json", p3)], None).errors
        assert "70 of the 120" in error and "(missing pages: 2)" in error

    def test_a_page_given_twice_is_refused(self) -> None:
        p1, p2 = listing(60, 50)
        errors = import_sources([("a.json", p1), ("b.json", p1), ("c.json", p2)], None).errors
        assert "page 1 is given twice (a.json, b.json)" in errors

    def test_pages_from_different_moments_are_refused(self) -> None:
        p1, _ = listing(60, 50)
        _, p2 = listing(61, 50)
        (error, *_) = import_sources([("a.json", p1), ("b.json", p2)], None).errors
        assert error.startswith(
            "the pages disagree on pagination.total_results (60 in a.json, 61 in b.json)"
        )

    def test_name_picks_a_group_from_any_page_and_says_which_pages_were_missing(self) -> None:
        _, p2, _ = listing(120, 50)
        picked = import_sources([("p2.json", p2)], "asg-077")
        assert picked.errors == [] and [d["name"] for d in picked.documents] == ["asg-077"]
        assert import_sources([("p2.json", p2)], "asg-117").errors == [
            "security group 'asg-117' is not in the input (pages 1, 3 were not given)"
        ]

    def test_separate_listings_are_judged_apart(self) -> None:
        """`cf curl '/v3/security_groups?names=a'` and `...?names=b` are two complete
        listings of one page each, not one listing given page 1 twice."""
        a, b = listing(1, 50)[0], listing(1, 50)[0]
        b = json.loads(json.dumps(b).replace("per_page=50", "names=asg-x&per_page=50"))
        b["resources"][0]["name"] = "asg-x"
        result = import_sources([("a.json", a), ("b.json", b)], None)
        assert result.errors == []
        assert [d["name"] for d in result.documents] == ["asg-000", "asg-x"]

    def test_pages_without_links_are_each_complete_on_their_own(self) -> None:
        bare = [{"resources": [group(1)]}, {"resources": [group(2)]}]
        assert import_sources([("a.json", bare[0]), ("b.json", bare[1])], None).errors == []

    def test_one_page_holding_everything_is_complete(self) -> None:
        (only,) = listing(120, 5000)
        assert import_sources([("all.json", only)], None).errors == []


@pytest.mark.requires("jq", "bash")
def test_readme_recipe_imports_more_than_50_groups(tmp_path: Path) -> None:
    """The README's `cf curl` recipe, run by bash against a `cf` stand-in that pages like
    Cloud Controller (this one at most 50 per page, so 120 groups take 3 pages)."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- import-recipe -->\n```sh\n(.*?)```", readme, re.S)
    assert match, "README must keep the import recipe under <!-- import-recipe -->"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    data = tmp_path / "listing.json"
    data.write_text(json.dumps(listing(120, 50)))
    cf = bin_dir / "cf"
    cf.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, urllib.parse\n"
        "assert sys.argv[1] == 'curl', sys.argv\n"
        "url = urllib.parse.urlsplit(sys.argv[2])\n"
        "assert url.path == '/v3/security_groups', url\n"
        "page = int(urllib.parse.parse_qs(url.query).get('page', ['1'])[0])\n"
        f"pages = json.load(open({str(data)!r}))\n"
        "print(json.dumps(pages[page - 1], indent=3))\n"
    )
    cf.chmod(0o755)
    asgctl = Path(sys.executable).parent / "asgctl"
    (bin_dir / "asgctl").symlink_to(asgctl)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", match.group(1)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    loaded = load_folder(tmp_path / "policies" / "security-groups")
    assert loaded.ok
    assert len(loaded.policy.security_groups) == 120


# ---------------------------------------------------------------------------------------------
# BOSH: cf-deployment.yml and ops files

# cloudfoundry/cf-deployment cf-deployment.yml: instance group `api`, job
# `cloud_controller_ng`, properties.cc (security_group_definitions and the default lists).
CF_DEPLOYMENT = """
name: cf
instance_groups:
- name: api
  jobs:
  - name: cloud_controller_ng
    properties:
      cc:
        default_running_security_groups: [public_networks, dns]
        default_staging_security_groups: [public_networks, dns]
        security_group_definitions:
        - name: public_networks
          rules:
          - {destination: 0.0.0.0-9.255.255.255, protocol: all}
          - {destination: 11.0.0.0-169.253.255.255, protocol: all}
          - {destination: 169.255.0.0-172.15.255.255, protocol: all}
          - {destination: 172.32.0.0-192.167.255.255, protocol: all}
          - {destination: 192.169.0.0-255.255.255.255, protocol: all}
        - name: dns
          rules:
          - {destination: 0.0.0.0/0, ports: '53', protocol: tcp}
          - {destination: 0.0.0.0/0, ports: '53', protocol: udp}
  - name: routing-api
    properties: {cc: {security_group_definitions: "not this job's"}}
"""
CC_PATH = "/instance_groups/name=api/jobs/name=cloud_controller_ng/properties/cc"
# The append form cf-deployment's own tooling writes (vpc peering ops file generator).
VPC_OPS = f"""
- type: replace
  path: {CC_PATH}/security_group_definitions?/-
  value:
    name: vpc_peer_cheese
    rules:
    - protocol: all
      destination: 198.18.0.0/15
- type: replace
  path: {CC_PATH}/default_running_security_groups/-
  value: vpc_peer_cheese
- type: replace
  path: /instance_groups/name=api/instances
  value: 3
"""


def bosh(tmp_path: Path, *files: tuple[str, str], name: str | None = None):
    paths = []
    for file, text in files:
        (tmp_path / file).write_text(text)
        paths.append(str(tmp_path / file))
    from reconciler.policy.importcf import import_files

    return import_files(paths, name)


class TestBosh:
    def test_cf_deployment_groups_and_defaults(self, tmp_path: Path) -> None:
        """seeds.rb create_seed_security_groups: running_default/staging_default set for the
        names in the default lists."""
        docs, errors, warnings = bosh(tmp_path, ("cf-deployment.yml", CF_DEPLOYMENT))
        assert errors == [] and warnings == []
        assert [(d["name"], d.get("globally_enabled")) for d in docs] == [
            ("public_networks", {"running": True, "staging": True}),
            ("dns", {"running": True, "staging": True}),
        ]
        assert docs[1]["rules"] == [
            {"protocol": "tcp", "destination": "0.0.0.0/0", "ports": "53"},
            {"protocol": "udp", "destination": "0.0.0.0/0", "ports": "53"},
        ]

    def test_manifest_then_ops_file_like_bosh_int(self, tmp_path: Path) -> None:
        docs, errors, _ = bosh(tmp_path, ("cf-deployment.yml", CF_DEPLOYMENT), ("vpc.yml", VPC_OPS))
        assert errors == []
        assert [(d["name"], d.get("globally_enabled")) for d in docs] == [
            ("public_networks", {"running": True, "staging": True}),
            ("dns", {"running": True, "staging": True}),
            ("vpc_peer_cheese", {"running": True}),
        ]

    def test_an_ops_file_alone(self, tmp_path: Path) -> None:
        ops = f"""
- type: replace
  path: {CC_PATH}/security_group_definitions?
  value:
  - name: load_balancer
    rules: [{{protocol: all, destination: 198.18.0.34}}]
- type: replace
  path: {CC_PATH}/default_running_security_groups?
  value: [load_balancer]
"""
        docs, errors, _ = bosh(tmp_path, ("asgs.yml", ops))
        assert errors == []
        assert docs == [
            {
                "kind": "SecurityGroup",
                "name": "load_balancer",
                "rules": [{"protocol": "all", "destination": "198.18.0.34"}],
                "globally_enabled": {"running": True},
            }
        ]

    def test_replace_and_remove_by_name(self, tmp_path: Path) -> None:
        ops = f"""
- type: replace
  path: {CC_PATH}/security_group_definitions/name=dns/rules/0/ports
  value: "53,5353"
- type: remove
  path: {CC_PATH}/security_group_definitions/name=public_networks
- type: replace
  path: {CC_PATH}/default_staging_security_groups
  value: []
"""
        docs, errors, warnings = bosh(
            tmp_path, ("cf-deployment.yml", CF_DEPLOYMENT), ("ops.yml", ops)
        )
        assert errors == []
        assert [d["name"] for d in docs] == ["dns"]
        assert docs[0]["rules"][0]["ports"] == "53,5353"
        assert docs[0]["globally_enabled"] == {"running": True}
        assert warnings == [
            "cc.default_running_security_groups names 'public_networks', which "
            "cc.security_group_definitions does not define (Cloud Controller ignores it)"
        ]

    def test_bad_rules_in_a_manifest_are_reported_like_cc(self, tmp_path: Path) -> None:
        bad = CF_DEPLOYMENT.replace("ports: '53', protocol: udp", "ports: 53, protocol: udp")
        _, errors, _ = bosh(tmp_path, ("cf.yml", bad))
        assert errors == [f"dns: Rules[1]: {PORTS_INVALID}"]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("name: cf\ninstance_groups: []\n", "no cloud_controller_ng job"),
            (
                f"- type: replace\n  path: {CC_PATH}/security_group_definitions/name=x/rules\n"
                "  value: []\n",
                "is not there",
            ),
            (
                f"- type: replace\n  path: {CC_PATH}/security_group_definitions\n  value: []\n",
                "'security_group_definitions' is not there",
            ),
            (
                f"- type: replace\n  path: {CC_PATH}/security_group_definitions?\n"
                "  value: [{name: a, rules: [], running_default: true}]\n",
                "unknown key(s) running_default",
            ),
            ("- type: replace\n  path: /name\n  value: x\n", "security_group_definitions is not"),
            (
                f"- type: remove\n  path: {CC_PATH}/security_group_definitions?/name=x\n",
                "cc.security_group_definitions is not set",  # an optional remove is a no-op
            ),
            ("a: [[[[", "asgs.yml:2:1: "),
        ],
    )
    def test_unusable_bosh_input(self, tmp_path: Path, text: str, message: str) -> None:
        _, errors, _ = bosh(tmp_path, ("asgs.yml", text))
        assert any(message in e for e in errors), errors

    def test_ops_on_a_missing_group_or_another_job(self, tmp_path: Path) -> None:
        worker = CC_PATH.replace("cloud_controller_ng", "cloud_controller_worker")
        ops = f"""
- type: replace
  path: {worker}/security_group_definitions?
  value: []
- type: replace
  path: {CC_PATH}/security_group_definitions/name=nope/rules/-
  value: {{protocol: all, destination: 198.18.0.1}}
"""
        _, errors, warnings = bosh(tmp_path, ("cf-deployment.yml", CF_DEPLOYMENT), ("ops.yml", ops))
        assert [e.split(": ", 1)[1] for e in errors] == [
            "ops[1] (...loud_controller_ng/properties/cc/security_group_definitions/name=nope/"
            "rules/-): no entry named 'nope'"
        ]
        assert warnings == [
            f"{worker}/security_group_definitions?: only the cloud_controller_ng job seeds "
            "security groups; ignored"
        ]

    def test_cli_writes_a_valid_policy_folder(self, tmp_path: Path) -> None:
        (tmp_path / "cf-deployment.yml").write_text(CF_DEPLOYMENT)
        out = tmp_path / "policies"
        result = CliRunner().invoke(
            main, ["import-cf", str(tmp_path / "cf-deployment.yml"), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        loaded = load_folder(out)
        assert loaded.ok
        groups = {g.name: g for g in loaded.policy.security_groups}
        assert groups["dns"].running_default and groups["dns"].staging_default
        assert yaml.safe_load((out / "dns.yaml").read_text().split("\n", 1)[1])["name"] == "dns"
