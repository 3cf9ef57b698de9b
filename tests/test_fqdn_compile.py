"""Grants by name in the plan and the renders (issue 15, item 1).

A destination's fqdns become name rules: one per grant, restricted to the destination's
protocol and ports, referencing one kernel set per name and family.  Plans without names
keep their exact bytes (the existing goldens pin that).
"""

from __future__ import annotations

import pytest

from reconciler.backends.iptables.render import render_text
from reconciler.backends.nftables.render import render_cell as render_nft
from reconciler.core import cellplan
from reconciler.core.cellplan import CellPlan, NameRule, PlanError, name_set_id
from reconciler.core.compile import compile_cell
from reconciler.core.model import (
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    NameItem,
    PolicySet,
    PortRange,
)
from tests.golden import assert_golden

DB, S3 = "db.lab.example", "*.s3.lab.example"
P5432 = (PortRange(5432, 5432),)


def policy() -> PolicySet:
    return PolicySet(
        destinations=(
            Destination("db", "tcp", (), P5432, fqdns=(DB,)),
            Destination("both", "tcp", (AddressRange.parse("198.19.0.9"),), P5432, fqdns=(DB,)),
            Destination("s3", "tcp", (), (PortRange(443, 443),), fqdns=(S3,)),
            Destination("ping", "icmp", (), (), 8, 0, fqdns=(DB,)),
        ),
        egress_policies=(
            EgressPolicy("web-db", "app", "app-web", "db"),
            EgressPolicy("space-both", "space", "space-prod", "both"),
            EgressPolicy("web-s3", "app", "app-web", "s3", app_lifecycle="running"),
            EgressPolicy("web-ping", "app", "app-web", "ping"),
        ),
    )


CONTAINERS = [
    Container("web", "198.18.0.2", "app-web", "space-prod"),
    Container("web6", "fd00::2", "app-web", "space-prod"),
    Container("other", "198.18.0.6", "app-other", "space-prod"),
    Container("stager", "198.18.0.10", "app-web", "space-prod", workload="staging"),
]


def plan() -> CellPlan:
    return compile_cell(policy(), CONTAINERS, "names")


def names_of(p: CellPlan, handle: str) -> set[tuple[str, str, str]]:
    by_id = p.name_by_id
    cp = next(c for c in p.containers if c.container.handle == handle)
    return {
        (by_id[n].item.fqdn, by_id[n].item.protocol, ",".join(map(str, by_id[n].item.ports)))
        for n in cp.names
    }


def test_each_container_gets_the_names_its_egress_policies_grant():
    p = plan()
    assert names_of(p, "web") == {
        (DB, "tcp", "5432"),
        (S3, "tcp", "443"),
        (DB, "icmp", ""),
    }
    # IPv6: the same grants but icmp (A answers serve icmp, AAAA icmpv6).
    assert names_of(p, "web6") == {(DB, "tcp", "5432"), (S3, "tcp", "443")}
    assert names_of(p, "other") == {(DB, "tcp", "5432")}  # through the space's policy
    assert names_of(p, "stager") == {(DB, "tcp", "5432"), (DB, "icmp", "")}  # s3 is running


def test_one_set_per_name_and_family_whoever_grants_it():
    p = plan()
    assert p.name_sets() == tuple(
        sorted(
            {
                (4, DB, name_set_id(DB)),
                (6, DB, name_set_id(DB)),
                (4, S3, name_set_id(S3)),
                (6, S3, name_set_id(S3)),
            }
        )
    )


def test_an_ip_several_containers_claim_gets_only_the_names_all_of_them_get():
    shared = [
        Container("web", "198.18.0.2", "app-web", "space-prod"),
        Container("stale", "198.18.0.2", "app-other", "space-prod"),
    ]
    p = compile_cell(policy(), shared, "shared")
    for cp in p.containers:
        assert {p.name_by_id[n].item.fqdn for n in cp.names} == {DB}
        assert [p.name_by_id[n].item.protocol for n in cp.names] == ["tcp"]


def test_renders_and_plan_golden():
    p = plan()
    assert_golden("names.plan.json", p.to_json())
    for family in (4, 6):
        assert_golden(f"names.v{family}.rules", render_text(p, family))
        assert_golden(f"names.v{family}.nft.json", render_nft(p, family).text())


def test_a_name_rule_never_matches_without_its_set_and_its_ports():
    text = render_text(plan(), 4)
    named = [line for line in text.splitlines() if "asg:n:" in line]
    assert named, text
    for line in named:
        assert "-m set --match-set asgn4-" in line
        assert ("--dport 5432" in line) or ("--dport 443" in line) or ("--icmp-type 8/0" in line)


def test_names_change_the_digest_but_not_plans_without_them():
    base = PolicySet(
        destinations=(Destination("ip", "tcp", (AddressRange.parse("198.19.0.9"),), P5432),),
        egress_policies=(EgressPolicy("e", "app", "app-web", "ip"),),
    )
    without = compile_cell(base, CONTAINERS, "c")
    assert "names" not in without.to_json()
    assert all(not cp.names for cp in without.containers)
    with_names = compile_cell(policy(), CONTAINERS, "c")
    assert with_names.digest() != without.digest()


def test_two_names_under_one_set_id_are_refused(monkeypatch):
    """A set name is 88 bits of a hash: two names under one would share a set, so the
    plan refuses it (a collision only a search finds; forced here)."""
    p = plan()
    other = NameRule("f" * 32, 4, NameItem("tcp", "other.lab.example", P5432), ())
    monkeypatch.setattr(cellplan, "name_set_id", lambda fqdn: "same")
    with pytest.raises(PlanError, match="one set name"):
        CellPlan(p.cell, p.containers, p.groups, 0, p.settings, (*p.names, other))
