"""Compiling a cell's plan: Cloud Foundry semantics, sharing, counts and determinism."""

from __future__ import annotations

import random
from pathlib import Path

from reconciler.core.compile import compile_cell
from reconciler.core.endpoint import parse_endpoint
from reconciler.core.explain import explain, find_container
from reconciler.core.model import Container
from reconciler.policy.load import load_folder
from tests.policyrepo import write_tree

REPO = Path(__file__).resolve().parent.parent
POLICY = """
kind: Directory
orgs:
  - name: o
    guid: org-1
    spaces:
      - name: a
        guid: space-a
        apps: [{name: web, guid: app-web}, {name: db-client, guid: app-db}]
      - name: b
        guid: space-b
---
kind: SecurityGroup
name: dns
rules: [{protocol: udp, destination: 198.19.53.53, ports: "53"}]
globally_enabled: {running: true, staging: true}
---
kind: SecurityGroup
name: mirrors
rules: [{protocol: tcp, destination: 198.19.80.0/24, ports: "443"}]
globally_enabled: {staging: true}
---
kind: SecurityGroup
name: space-a-api
rules:
  - {protocol: tcp, destination: 198.19.20.20, ports: "443"}
  - {protocol: udp, destination: 198.19.53.53, ports: "53"}
running_spaces: [o/a]
---
kind: SecurityGroup
name: space-b-build
rules: [{protocol: tcp, destination: 198.19.90.9, ports: "22"}]
staging_spaces: [o/b]
---
kind: Destination
name: db
protocol: tcp
ips: 198.19.10.10
ports: 3306
---
kind: Destination
name: metrics
protocol: udp
ips: 198.19.30.30
ports: 8125
---
kind: EgressPolicy
name: db-client-to-db
source: {type: app, name: o/a/db-client}
destination: db
app_lifecycle: running
---
kind: EgressPolicy
name: all-to-metrics
source: {type: default}
destination: metrics
app_lifecycle: all
---
kind: EgressPolicy
name: space-b-to-db-staging
source: {type: space, name: o/b}
destination: db
app_lifecycle: staging
"""


def policy(tmp_path: Path, text: str = POLICY):
    result = load_folder(write_tree(tmp_path, {"p.yaml": text}))
    assert result.ok, [str(f) for f in result.findings]
    return result.policy


def c(handle: str, ip: str, space: str = "", app: str = "", workload: str = "app") -> Container:
    return Container(handle=handle, ip=ip, app_id=app, space_id=space, workload=workload)


def allowed(pol, plan, handle: str, to: str) -> bool:
    cp = find_container(plan, handle=handle)
    return explain(pol, plan, cp, parse_endpoint(to)).allowed


CONTAINERS = [
    c("web-1", "198.18.0.2", "space-a", "app-web"),
    c("web-2", "198.18.0.3", "space-a", "app-web"),
    c("dbc-1", "198.18.0.4", "space-a", "app-db"),
    c("dbc-task", "198.18.0.5", "space-a", "app-db", "task"),
    c("dbc-stage", "198.18.0.6", "space-a", "app-db", "staging"),
    c("b-stage", "198.18.0.7", "space-b", "app-b", "staging"),
    c("b-run", "198.18.0.8", "space-b", "app-b"),
    c("nospace", "198.18.0.9"),
]


def test_running_and_staging_containers_get_cf_lifecycle_rules(tmp_path):
    pol = policy(tmp_path)
    plan = compile_cell(pol, CONTAINERS)
    # Space-bound running ASG: apps and tasks of the space, not its staging containers.
    assert allowed(pol, plan, "web-1", "198.19.20.20:443")
    assert allowed(pol, plan, "dbc-task", "198.19.20.20:443")
    assert not allowed(pol, plan, "dbc-stage", "198.19.20.20:443")
    assert not allowed(pol, plan, "b-run", "198.19.20.20:443")
    # Global staging default and space staging binding: staging containers only.
    assert allowed(pol, plan, "dbc-stage", "198.19.80.1:443")
    assert not allowed(pol, plan, "web-1", "198.19.80.1:443")
    assert allowed(pol, plan, "b-stage", "198.19.90.9:22")
    assert not allowed(pol, plan, "b-run", "198.19.90.9:22")
    # Global running and staging default reaches everyone, even a container with no space.
    for handle in ("web-1", "dbc-stage", "b-run", "nospace"):
        assert allowed(pol, plan, handle, "198.19.53.53:53/udp")
        assert not allowed(pol, plan, handle, "198.19.53.53:53/tcp")


def test_egress_policies_by_app_space_default_and_lifecycle(tmp_path):
    pol = policy(tmp_path)
    plan = compile_cell(pol, CONTAINERS)
    # App-level: the db client reaches the database, its neighbour in the same space does not.
    assert allowed(pol, plan, "dbc-1", "198.19.10.10:3306")
    assert allowed(pol, plan, "dbc-task", "198.19.10.10:3306")
    assert not allowed(pol, plan, "web-1", "198.19.10.10:3306")
    # app_lifecycle: running excludes the app's staging container.
    assert not allowed(pol, plan, "dbc-stage", "198.19.10.10:3306")
    # Space-level, staging only.
    assert allowed(pol, plan, "b-stage", "198.19.10.10:3306")
    assert not allowed(pol, plan, "b-run", "198.19.10.10:3306")
    # Default: every container, whatever its lifecycle (app_lifecycle: all).
    for handle in ("web-1", "dbc-stage", "b-run", "nospace"):
        assert allowed(pol, plan, handle, "198.19.30.30:8125/udp")


def test_identical_rules_are_installed_once_with_every_source(tmp_path):
    pol = policy(tmp_path)
    plan = compile_cell(pol, CONTAINERS)
    dns_rules = [
        r for g in plan.groups for r in g.rules if str(r.item.destination) == "198.19.53.53"
    ]
    assert len(dns_rules) == 1
    assert [(s.kind, s.name) for s in dns_rules[0].sources] == [
        ("SecurityGroup", "dns"),
        ("SecurityGroup", "space-a-api"),
    ]
    # Explain names only the sources that grant it to *this* container.
    cp = find_container(plan, handle="b-run")
    decision = explain(pol, plan, cp, parse_endpoint("198.19.53.53:53/udp"))
    assert [s.name for m in decision.matches for s in m.sources] == ["dns"]


def test_groups_are_shared_and_counts_beat_cfs_layout(tmp_path):
    pol = policy(tmp_path)
    many = [c(f"web-{i}", f"198.18.1.{i}", "space-a", "app-web") for i in range(1, 101)]
    plan = compile_cell(pol, many)
    assert len(plan.groups) == 1
    (group,) = plan.groups
    assert all(cp.groups == (group.id,) for cp in plan.containers)
    # 4 rules (dns, api, metrics... each once), 100 containers x 6 lines, 1 FORWARD jump.
    assert plan.installed_rules == 1 + 100 * (5 + 1) + group.lines
    # CF: per container the FORWARD and netout jumps, ESTABLISHED, INVALID, LOG, REJECT and
    # its log chain's LOG and ACCEPT, then the 3 rules (one port each) again.
    assert plan.cf_equivalent_rules == 100 * (8 + group.lines)
    assert plan.installed_rules < plan.cf_equivalent_rules


def test_same_input_same_plan_byte_for_byte(tmp_path):
    pol = policy(tmp_path)
    first = compile_cell(pol, CONTAINERS, "cell-1").to_json()
    shuffled = list(CONTAINERS)
    random.Random(7).shuffle(shuffled)
    again = compile_cell(policy(tmp_path / "again"), shuffled, "cell-1").to_json()
    assert first == again


def test_containers_only_get_rules_of_their_ip_family(tmp_path):
    pol = policy(
        tmp_path,
        """
kind: SecurityGroup
name: both
rules:
  - {protocol: tcp, destination: "198.19.1.1,fd00:19::1", ports: "443"}
  - {protocol: icmpv6, destination: fd00:19::/64, type: 128, code: -1}
globally_enabled: {running: true}
""",
    )
    plan = compile_cell(pol, [c("v4", "198.18.0.2"), c("v6", "fd00:18::2")])
    by_family = {g.version: [str(r.item.destination) for r in g.rules] for g in plan.groups}
    assert by_family == {4: ["198.19.1.1"], 6: ["fd00:19::/64", "fd00:19::1"]}
    assert allowed(pol, plan, "v6", "[fd00:19::1]:443/tcp")
    assert allowed(pol, plan, "v6", "fd00:19::9/icmpv6")
    assert not allowed(pol, plan, "v4", "[fd00:19::1]:443/tcp")


def test_an_empty_cell_has_an_empty_plan(tmp_path):
    plan = compile_cell(policy(tmp_path), [])
    assert plan.containers == () and plan.groups == ()
    assert plan.installed_rules == 0 and plan.cf_equivalent_rules == 0


def test_explain_names_a_space_scoped_egress_policy_as_the_grant(tmp_path):
    """A space-scoped egress policy is a source of the rule for that space's containers: the
    answer names it (and only it), not just ALLOW with nobody to ask about it."""
    pol = policy(tmp_path)
    plan = compile_cell(pol, CONTAINERS)
    decision = explain(pol, plan, find_container(plan, handle="b-stage"),
                       parse_endpoint("198.19.10.10:3306"))  # fmt: skip
    assert decision.allowed
    assert [(s.kind, s.name) for m in decision.matches for s in m.sources] == [
        ("EgressPolicy", "space-b-to-db-staging")
    ]


def test_a_rules_sources_are_only_the_documents_granting_it_on_this_cell(tmp_path):
    """The same rule granted to two spaces by two ASGs: a cell running only the first space's
    containers installs it with the first ASG as its only source, so the plan (and the diff,
    and the rule's comment trail) never names a document that grants nothing here."""
    pol = policy(
        tmp_path,
        """
kind: Directory
orgs:
  - name: o
    guid: org-1
    spaces:
      - {name: a, guid: space-a}
      - {name: b, guid: space-b}
---
kind: SecurityGroup
name: for-a
rules: [{protocol: tcp, destination: 198.19.7.7, ports: "443"}]
running_spaces: [o/a]
---
kind: SecurityGroup
name: for-b
rules: [{protocol: tcp, destination: 198.19.7.7, ports: "443"}]
running_spaces: [o/b]
""",
    )
    only_a = compile_cell(pol, [c("a-1", "198.18.0.2", "space-a", "app-a")])
    both = compile_cell(
        pol,
        [c("a-1", "198.18.0.2", "space-a", "app-a"), c("b-1", "198.18.0.3", "space-b", "app-b")],
    )
    sources = {cell: [s.name for g in p.groups for r in g.rules for s in r.sources]
               for cell, p in (("only_a", only_a), ("both", both))}  # fmt: skip
    assert sources == {"only_a": ["for-a"], "both": ["for-a", "for-b"]}
