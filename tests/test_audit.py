"""Audit mode (`kind: Enforcement`, issue 16 item 4), from the YAML to the plan diff.

A container in audit keeps its rules, but what no rule allows is logged as would-deny
(`ASG AUDIT <chain log id>`) and accepted instead of rejected.  The cell's deny networks
are jumped to before the groups, as silk orders them (cloudfoundry/silk-release
src/code.cloudfoundry.org/cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:58-83,
IPTablesRules: the deny networks' REJECTs stand ahead of the ASG accepts), so audit, which
only replaces the chain's last word, never reaches them.  The packets that prove it are in
tests/test_audit_e2e.py; here: validation, precedence, compile, render, the flow
collector, the plan diff, the gate and explain.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from reconciler.backends.iptables.render import container_chain
from reconciler.backends.iptables.render import render_cell as render_iptables
from reconciler.backends.nftables.render import container_chain as nft_chain
from reconciler.backends.nftables.render import render_cell as render_nft
from reconciler.core.cellplan import (
    CellInventory,
    CellPlan,
    CellSettings,
    DenyNetworks,
    FlowLog,
    GateSettings,
    log_id,
)
from reconciler.core.compile import compile_cell
from reconciler.core.diff import AUDIT_DETAIL, diff_plans
from reconciler.core.endpoint import parse_endpoint
from reconciler.core.explain import explain
from reconciler.core.gate import judge, revoke_count
from reconciler.core.model import Container, PolicySet
from reconciler.core.packetspace import contains
from reconciler.core.parity import asgctl_space
from reconciler.flows.collect import Aggregator, FlowContext
from reconciler.flows.nflog import LoggedPacket
from reconciler.flows.record import WOULD_DENY, log_prefix, parse_prefix
from reconciler.policy.load import load_folder
from reconciler.policy.validate import Result
from tests.cases import REPO
from tests.policyrepo import commit_all, write_tree
from tests.test_plan import HOSTILE, golden_pair
from tests.test_plan import plan as plan_cli
from tests.test_plan import policy_repo as plan_repo

PAYMENTS = "5e2f3c8a-0001-4a6e-9d1e-000000000001"
PROD = "7b1d2e4f-0002-4c3a-8f2b-000000000002"
STAGING = "7b1d2e4f-0005-4c3a-8f2b-000000000005"
BACKEND = "a1b2c3d4-0003-4e5f-9a8b-000000000003"
FRONTEND = "a1b2c3d4-0004-4e5f-9a8b-000000000004"
STAGING_BACKEND = "a1b2c3d4-0006-4e5f-9a8b-000000000006"
BLOG = "a1b2c3d4-0009-4e5f-9a8b-000000000009"
WEB = "7b1d2e4f-0008-4c3a-8f2b-000000000008"
DIRECTORY = (REPO / "policies" / "directory.yaml").read_text()

PROD_AUDIT = """
    kind: Enforcement
    name: prod-audit
    scope: {type: space, name: payments/prod}
    mode: audit
    """


def enf(name: str, scope: str, mode: str) -> str:
    """An Enforcement document; `scope` as YAML flow text (`{type: all}`)."""
    return f"kind: Enforcement\nname: {name}\nscope: {scope}\nmode: {mode}\n"


def load(tmp_path: Path, files: dict[str, str], *, example: bool = False) -> Result:
    """A policy folder of the example directory (and, with `example`, the example repo's
    groups and destinations) plus `files`."""
    root = tmp_path / "policies"
    if example:
        for path in (REPO / "policies").rglob("*.yaml"):
            if "tests" not in path.parts:
                write_tree(root, {str(path.relative_to(REPO / "policies")): path.read_text()})
    write_tree(root, {"directory.yaml": DIRECTORY, **files})
    return load_folder(root)


def ok(tmp_path: Path, files: dict[str, str], *, example: bool = True) -> PolicySet:
    result = load(tmp_path, files, example=example)
    assert result.ok, result.findings
    return result.policy


def messages(result: Result) -> list[str]:
    return [f"{f.file}:{f.line} {f.severity} {f.field}: {f.message}" for f in result.findings]


def c(handle: str, ip: str, app: str, space: str, workload: str = "app") -> Container:
    return Container(handle, ip, app, space, PAYMENTS, "", workload)


BACKEND_0 = c("backend-0", "198.18.1.2", BACKEND, PROD)
FRONTEND_0 = c("frontend-0", "198.18.1.3", FRONTEND, PROD)
STAGER = c("backend-stage", "198.18.1.4", BACKEND, PROD, "staging")
STAGING_0 = c("staging-backend-0", "198.18.1.5", STAGING_BACKEND, STAGING)
BLOG_V6 = c("blog-v6", "fd00:18::6", BLOG, WEB)
CONTAINERS = (BACKEND_0, FRONTEND_0, STAGER, STAGING_0, BLOG_V6)


def audited(plan: CellPlan) -> set[str]:
    return {cp.container.handle for cp in plan.containers if cp.audit}


# ----------------------------------------------------------------------------- validation


def test_an_enforcement_resolves_its_scope_as_an_egress_policy_source_does(tmp_path):
    policy = ok(
        tmp_path,
        {
            "e.yaml": f"""
                kind: Enforcement
                name: prod-audit
                scope: {{type: space, name: payments/prod}}
                mode: audit
                ---
                kind: Enforcement
                name: blog-by-guid
                scope: {{type: app, id: {BLOG}}}
                mode: enforce
                ---
                kind: Enforcement
                name: everyone
                description: the whole foundation, for a week
                scope: {{type: all}}
                mode: audit
                """
        },
        example=False,
    )
    got = {(e.name, e.scope_type, e.scope_id, e.mode) for e in policy.enforcements}
    assert got == {
        ("prod-audit", "space", PROD, "audit"),
        ("blog-by-guid", "app", BLOG, "enforce"),
        ("everyone", "all", None, "audit"),
    }
    assert {e.location.short for e in policy.enforcements if e.location} == {
        "e.yaml:1",
        "e.yaml:6",
        "e.yaml:11",
    }


def test_one_scope_with_two_modes_is_an_error_naming_both_files_and_lines(tmp_path):
    """Which of the two would win is file order: refused, not guessed.  A space by name and
    by GUID is one scope."""
    result = load(
        tmp_path,
        {
            "a.yaml": PROD_AUDIT,
            "b.yaml": f"""
                kind: Enforcement
                name: prod-enforce
                scope: {{type: space, id: {PROD}}}
                mode: enforce
                """,
        },
    )
    assert messages(result) == [
        "b.yaml:4 error mode: Enforcement/prod-enforce (b.yaml:4) puts space payments/prod in "
        "enforce, Enforcement/prod-audit (a.yaml:4) in audit: one scope has one mode"
    ]


def test_the_same_scope_twice_in_the_same_mode_is_a_warning(tmp_path):
    result = load(
        tmp_path,
        {"a.yaml": PROD_AUDIT, "b.yaml": PROD_AUDIT.replace("prod-audit", "prod-audit-2")},
    )
    assert result.ok
    assert messages(result) == [
        "b.yaml:3 warning scope: space payments/prod is already in audit by "
        "Enforcement/prod-audit (a.yaml:4)"
    ]
    assert [e.name for e in result.policy.enforcements] == ["prod-audit"]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            "kind: Enforcement\nname: x\nscope: {type: app, name: payments/prod/nope}\n"
            "mode: audit\n",
            "e.yaml:3 error scope: app 'payments/prod/nope' is not in the directory",
        ),
        (
            "kind: Enforcement\nname: x\nscope: {type: space, name: a/b/c}\nmode: audit\n",
            "e.yaml:3 error scope: space 'a/b/c' must be org/space or a space GUID",
        ),
        (
            "kind: Enforcement\nname: x\nscope: {type: app, id: not-in-directory}\nmode: audit\n",
            "e.yaml:3 warning scope: app GUID not-in-directory is not in the directory",
        ),
        (
            "kind: Enforcement\nname: x\nscope: {type: space}\nmode: audit\n",
            "e.yaml:3 error scope: {'type': 'space'} is not valid: 'id' is a required property",
        ),
        (
            "kind: Enforcement\nname: x\nscope: {type: all}\nmode: quiet\n",
            "e.yaml:4 error mode: 'quiet' is not one of ['audit', 'enforce']",
        ),
        (
            "kind: Enforcement\nname: x\nscope: {type: all}\n",
            "e.yaml:1 error : 'mode' is required",
        ),
    ],
    ids=["unknown-app-name", "bad-space-name", "unknown-guid", "no-name", "bad-mode", "no-mode"],
)
def test_bad_enforcement_documents_name_file_line_and_field(tmp_path, doc, expected):
    result = load(tmp_path, {"e.yaml": doc})
    assert messages(result) == [expected]


def test_enforcement_names_are_unique(tmp_path):
    result = load(
        tmp_path,
        {"a.yaml": PROD_AUDIT, "b.yaml": PROD_AUDIT.replace("payments/prod", "payments/staging")},
    )
    assert messages(result) == [
        "b.yaml:2 error name: name is already used by Enforcement at a.yaml:2"
    ]


@pytest.mark.parametrize(
    "doc",
    [
        # The deny networks are the cell's (agent config), not a scope a policy can name ...
        "kind: Enforcement\nname: x\nscope: {type: deny_networks}\nmode: audit\n",
        # ... nor a switch on the document ...
        "kind: Enforcement\nname: x\nscope: {type: all}\nmode: audit\ndeny_networks: audit\n",
        # ... nor part of a scope.
        "kind: Enforcement\nname: x\nscope: {type: all, deny_networks: true}\nmode: audit\n",
    ],
    ids=["scope-type", "top-level", "in-scope"],
)
def test_attack_a_pull_request_cannot_put_deny_networks_in_audit(tmp_path, doc):
    """Nothing an Enforcement says reaches the deny networks: a document that tries to name
    them is refused by the schema (and `type: all` still leaves them rejecting, below)."""
    result = load(tmp_path, {"e.yaml": doc})
    assert not result.ok
    assert all(f.file == "e.yaml" and f.kind == "Enforcement" for f in result.errors)


# ----------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("docs", "expect"),
    [
        ({}, set()),
        ({"space": ("payments/prod", "audit")}, {"backend-0", "frontend-0", "backend-stage"}),
        (
            {"space": ("payments/prod", "audit"), "app": ("payments/prod/frontend", "enforce")},
            {"backend-0", "backend-stage"},
        ),
        ({"all": "audit"}, {h.handle for h in CONTAINERS}),
        (
            {"all": "audit", "space": ("payments/prod", "enforce")},
            {"staging-backend-0", "blog-v6"},
        ),
        (
            {
                "all": "audit",
                "space": ("payments/prod", "enforce"),
                "app": ("payments/prod/backend", "audit"),
            },
            {"backend-0", "backend-stage", "staging-backend-0", "blog-v6"},
        ),
        ({"all": "enforce", "app": ("marketing/web/blog", "audit")}, {"blog-v6"}),
    ],
    ids=[
        "none", "space", "app-over-space", "all", "space-over-all", "app-over-space-over-all",
        "app-only",
    ],
)  # fmt: skip
def test_the_most_specific_scope_decides(tmp_path, docs, expect):
    """App over space over all, whatever the file order; without any document, enforce.
    Staging containers of an audited app or space are audited too (the scope names the
    app, not a lifecycle)."""
    files = {}
    for kind, value in docs.items():
        if kind == "all":
            scope, mode = "{type: all}", value
        else:
            scope, mode = f"{{type: {kind}, name: {value[0]}}}", value[1]
        files[f"{kind}.yaml"] = enf(kind, scope, mode)
    policy = ok(tmp_path, files)
    assert audited(compile_cell(policy, CONTAINERS, "c")) == expect


def test_an_address_two_containers_claim_is_audited_only_when_both_are(tmp_path):
    """A stale metadata entry beside the live one gets the intersection of their access;
    audit is access, so it is never wider than either's."""
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    stale = c("stale", BACKEND_0.ip, STAGING_BACKEND, STAGING)
    assert audited(compile_cell(policy, (BACKEND_0, stale), "c")) == set()
    twin = c("twin", BACKEND_0.ip, FRONTEND, PROD)
    assert audited(compile_cell(policy, (BACKEND_0, twin), "c")) == {"backend-0", "twin"}


# ----------------------------------------------------------------------------- compile


def test_enforce_documents_leave_the_plan_byte_for_byte_as_without_any(tmp_path):
    """Plans without audit keep their exact JSON and digest (the goldens of every other case
    are unchanged too): `enforce` is what a plan always did."""
    without = compile_cell(ok(tmp_path / "a", {}), CONTAINERS, "c")
    enforce = ok(
        tmp_path / "b",
        {"e.yaml": "kind: Enforcement\nname: e\nscope: {type: all}\nmode: enforce\n"},
    )
    with_enforce = compile_cell(enforce, CONTAINERS, "c")
    assert with_enforce.to_json() == without.to_json()
    assert with_enforce.digest() == without.digest()
    audit = compile_cell(ok(tmp_path / "c", {"e.yaml": PROD_AUDIT}), CONTAINERS, "c")
    assert audit.digest() != without.digest()
    modes = {cp["handle"]: cp.get("mode") for cp in json.loads(audit.to_json())["containers"]}
    assert modes["backend-0"] == "audit" and modes["staging-backend-0"] is None
    # Audit changes no group: the same rules, only the chain's last word.
    assert audit.groups == without.groups
    assert [cp.groups for cp in audit.containers] == [cp.groups for cp in without.containers]


DENY = DenyNetworks(always=("169.254.169.254/32",), running=("10.0.0.0/8", "fd00:a::/32"))


def _chain(plan: CellPlan, handle: str, family: int = 4) -> tuple[str, ...]:
    cp = next(cp for cp in plan.containers if cp.container.handle == handle)
    return render_iptables(plan, family).chains[container_chain(cp.chain_id)]


@pytest.mark.parametrize("flow", [FlowLog(), FlowLog("nflog", 7, 500)], ids=["log", "nflog"])
def test_iptables_an_audited_chain_logs_would_deny_and_accepts_after_the_deny_networks(
    tmp_path, flow
):
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, CONTAINERS, "c", CellSettings(deny_networks=DENY, flow_log=flow))
    chain = _chain(plan, "backend-0")
    comments = [line.split('--comment "')[1].split('"')[0] for line in chain]
    assert comments[:3] == ["asg:est", "asg:invalid", "asg:deny"]
    assert comments[-2:] == ["asg:audit-log", "asg:audit"]
    assert chain[-1].endswith("-j ACCEPT") and "REJECT" not in " ".join(chain)
    ids = {cp.container.handle: cp.chain_id for cp in plan.containers}
    prefix = log_prefix(WOULD_DENY, log_id(ids["backend-0"]))
    # Logged exactly as a deny is on this cell (the same limit, target and group): the
    # neighbour's deny log with only the chain, the comment and the prefix swapped.
    neighbour = _chain(plan, "staging-backend-0")
    swaps = (
        (container_chain(ids["staging-backend-0"]), container_chain(ids["backend-0"])),
        ("asg:deny-log", "asg:audit-log"),
        (log_prefix("deny", log_id(ids["staging-backend-0"])), prefix),
    )
    expected = neighbour[-2]
    for old, new in swaps:
        expected = expected.replace(old, new)
    assert chain[-2] == expected
    assert neighbour[-1].endswith("-j REJECT --reject-with icmp-port-unreachable")
    # The deny networks' own chain still rejects, for the audited container too.
    deny_chain = render_iptables(plan, 4).chains["ASG-D-running"]
    assert deny_chain and all(line.endswith("icmp-port-unreachable") for line in deny_chain)
    assert parse_prefix(prefix) is not None and parse_prefix(prefix).verdict == "would-deny"


@pytest.mark.parametrize("flow", [FlowLog(), FlowLog("nflog", 7, 500)], ids=["log", "nflog"])
def test_nftables_an_audited_chain_logs_would_deny_and_accepts_after_the_deny_networks(
    tmp_path, flow
):
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, CONTAINERS, "c", CellSettings(deny_networks=DENY, flow_log=flow))
    ruleset = render_nft(plan, 4)
    by_handle = {cp.container.handle: cp.chain_id for cp in plan.containers}
    chain = [json.loads(r) for r in ruleset.chains[nft_chain(4, by_handle["backend-0"])]]
    other = [json.loads(r) for r in ruleset.chains[nft_chain(4, by_handle["staging-backend-0"])]]
    assert [r["comment"] for r in chain][1] == "asg:deny"
    assert chain[1]["expr"][-1] == other[1]["expr"][-1] and "reject" in chain[1]["expr"][-1]
    assert [r["comment"] for r in chain][-2:] == ["asg:audit-log", "asg:audit"]
    assert chain[-1]["expr"] == [{"accept": None}]
    log, limit = chain[-2]["expr"][1]["log"], chain[-2]["expr"][0]
    assert log["prefix"] == log_prefix(WOULD_DENY, log_id(by_handle["backend-0"]))
    # As deny logging is set up on this cell: the same limit, the same group (or none).
    assert limit == other[-2]["expr"][0]
    assert log.get("group") == other[-2]["expr"][1]["log"].get("group")
    assert other[-1]["comment"] == "asg:reject"


@pytest.mark.parametrize("render", ["iptables", "nftables"])
def test_an_audited_container_with_names_keeps_them_before_its_tail(tmp_path, render):
    policy = ok(
        tmp_path,
        {
            "e.yaml": PROD_AUDIT,
            "n.yaml": """
                kind: Destination
                name: api
                protocol: tcp
                fqdns: [api.example.com]
                ports: 443
                ---
                kind: EgressPolicy
                name: backend-api
                source: {type: app, name: payments/prod/backend}
                destination: api
                """,
        },
    )
    plan = compile_cell(policy, (BACKEND_0,), "c")
    if render == "iptables":
        chain = _chain(plan, "backend-0")
        assert "--match-set asgn4-" in chain[-3] and "asg:audit-log" in chain[-2]
    else:
        rules = render_nft(plan, 4).chains[nft_chain(4, plan.containers[0].chain_id)]
        assert "asg:n:" in rules[-3] and "asg:audit-log" in rules[-2]


# ----------------------------------------------------------------------------- flow records


def _ipv4(src: str, dst: str, port: int) -> bytes:
    ip = bytearray(20)
    ip[0], ip[9] = 0x45, 6
    ip[12:16] = bytes(int(x) for x in src.split("."))
    ip[16:20] = bytes(int(x) for x in dst.split("."))
    return bytes(ip) + struct.pack("!HH", 40000, port) + bytes(16)


def test_the_collector_turns_an_audit_prefix_into_a_would_deny_record(tmp_path):
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, (BACKEND_0,), "cell-1")
    ctx = FlowContext.build("cell-1", plan, policy.directory)
    agg = Aggregator(10)
    prefix = log_prefix(WOULD_DENY, log_id(plan.containers[0].chain_id)).encode()
    for at in (10.0, 11.0):
        agg.add(LoggedPacket(2, 16, prefix, _ipv4(BACKEND_0.ip, "198.19.99.9", 8443)), ctx, at)
    (record,) = agg.flush("cell-1")
    assert record.verdict == "would-deny" and record.count == 2
    assert (record.app, record.space, record.destination, record.port) == (
        "payments/prod/backend",
        "payments/prod",
        "198.19.99.9",
        8443,
    )
    assert record.rule is None and record.to_dict()["verdict"] == "would-deny"


# ----------------------------------------------------------------------------- plan diff


def _inventory() -> list[CellInventory]:
    return [CellInventory("cell-1", CONTAINERS, "test")]


def _principal(diff, app: str, lifecycle: str = "running"):
    return next(p for p in diff.principals if p.app_id == app and p.lifecycle == lifecycle)


def test_moving_into_audit_gains_and_back_to_enforce_loses_everything_not_denied(tmp_path):
    base = ok(tmp_path / "base", {})
    head = ok(tmp_path / "head", {"e.yaml": PROD_AUDIT})
    on = diff_plans(base, head, _inventory(), "policies/")
    assert {(p.app_id, p.lifecycle) for p in on.principals} == {
        (BACKEND, "running"),
        (BACKEND, "staging"),
        (FRONTEND, "running"),
    }
    backend = _principal(on, BACKEND)
    assert backend.lost == () and len(backend.gained) == 1
    (gain,) = backend.gained
    assert str(gain.access) == "all 0.0.0.0/0" and gain.detail == AUDIT_DETAIL
    assert gain.reasons == ("Enforcement/prod-audit added (policies/e.yaml:1)",)
    assert on.containers_gaining == 3 and on.containers_losing == 0
    assert {c.cell for c in on.changed_cells} == {"cell-1"}
    off = diff_plans(head, base, _inventory(), "policies/")
    (loss,) = _principal(off, BACKEND).lost
    assert str(loss.access) == "all 0.0.0.0/0" and loss.detail == AUDIT_DETAIL
    assert loss.reasons == ("Enforcement/prod-audit deleted (policies/e.yaml:1)",)
    assert off.containers_losing == 3


def test_a_mode_flip_and_a_more_specific_document_are_named_as_reasons(tmp_path):
    base = ok(tmp_path / "base", {"e.yaml": PROD_AUDIT})
    flipped = ok(tmp_path / "flip", {"e.yaml": PROD_AUDIT.replace("mode: audit", "mode: enforce")})
    (loss,) = _principal(diff_plans(base, flipped, _inventory()), BACKEND).lost
    assert loss.reasons == ("Enforcement/prod-audit mode changed to enforce (e.yaml:1)",)
    carve = ok(
        tmp_path / "carve",
        {
            "e.yaml": PROD_AUDIT,
            "f.yaml": "kind: Enforcement\nname: backend-enforced\n"
            "scope: {type: app, name: payments/prod/backend}\nmode: enforce\n",
        },
    )
    diff = diff_plans(base, carve, _inventory())
    assert {p.app_id for p in diff.principals} == {BACKEND}
    (loss,) = _principal(diff, BACKEND).lost
    assert loss.reasons == ("Enforcement/backend-enforced added (f.yaml:1)",)


def test_an_ipv6_principal_gains_all_of_ipv6(tmp_path):
    head = ok(
        tmp_path,
        {"e.yaml": enf("b", "{type: app, name: marketing/web/blog}", "audit")},
    )
    diff = diff_plans(ok(tmp_path / "b", {}), head, _inventory())
    (gain,) = _principal(diff, BLOG).gained
    assert str(gain.access) == "all ::/0"


def test_attack_an_enforcement_in_a_hostile_pr_is_never_no_changes(tmp_path):
    """A PR that adds nothing but `{type: all}` audit (tucked into any file, under any name)
    opens every container of the fleet: the plan must say so, per principal, as gained
    access, and the dataplane diff must show each re-written chain."""
    base = ok(tmp_path / "base", {})
    head = ok(
        tmp_path / "head",
        {"security-groups/zz-cosmetic.yaml": enf("typo-fix", "{type: all}", "audit")},
    )
    diff = diff_plans(base, head, _inventory())
    assert diff.has_changes
    assert diff.containers_gaining == len(CONTAINERS)
    assert all(p.gained and not p.lost for p in diff.principals)
    assert all(
        "Enforcement/typo-fix added (security-groups/zz-cosmetic.yaml:1)" in g.reasons
        for p in diff.principals
        for g in p.gained
    )
    assert sum(c.containers_rechained for c in diff.cells) == len(CONTAINERS)


# ----------------------------------------------------------------------------- gate


def test_the_gate_counts_audit_to_enforce_as_a_lost_pair_and_into_audit_as_none(tmp_path):
    base = ok(tmp_path / "base", {})
    head = ok(tmp_path / "head", {"e.yaml": PROD_AUDIT})
    enforced = compile_cell(base, CONTAINERS, "c")
    audit = compile_cell(head, CONTAINERS, "c")
    into = revoke_count(enforced, audit)
    assert (into.net_lost, into.lost) == (0, 0)
    out = revoke_count(audit, enforced)
    # Three audited containers, one audit pair each, on top of every container's rules.
    assert out.total == revoke_count(enforced, enforced).total + 3
    assert (out.lost, out.net_lost, out.containers_losing) == (3, 3, 3)
    assert not out.to_nothing
    # Audited at both revisions: a rule taken away is no packet lost.
    fewer = ok(tmp_path / "fewer", {"e.yaml": PROD_AUDIT}, example=False)
    prod = CONTAINERS[:3]  # all audited
    assert revoke_count(compile_cell(head, prod, "c"), compile_cell(fewer, prod, "c")).lost == 0


def test_a_cell_all_in_audit_without_rules_moving_to_enforce_goes_to_nothing_and_is_gated(
    tmp_path,
):
    """The floor (100 pairs) does not protect a cell from being emptied: a fleet that ran in
    audit with no rules at all, flipped to enforce, is held back until a human says so."""
    audit = ok(
        tmp_path / "a",
        {"e.yaml": "kind: Enforcement\nname: all\nscope: {type: all}\nmode: audit\n"},
        example=False,
    )
    enforce = ok(tmp_path / "e", {}, example=False)
    count = revoke_count(
        compile_cell(audit, CONTAINERS, "c"), compile_cell(enforce, CONTAINERS, "c")
    )
    assert (count.total, count.net_lost, count.to_nothing) == (5, 5, True)
    verdict = judge(count, GateSettings())
    assert verdict is not None and verdict.rule == "to-nothing"


def test_a_rule_allowing_everything_leaves_nothing_for_audit_to_lose(tmp_path):
    everything = """
        kind: SecurityGroup
        name: open
        rules: [{protocol: all, destination: 0.0.0.0/0}]
        globally_enabled: {running: true}
        """
    audit = ok(tmp_path / "a", {"e.yaml": PROD_AUDIT, "open.yaml": everything}, example=False)
    enforce = ok(tmp_path / "e", {"open.yaml": everything}, example=False)
    count = revoke_count(
        compile_cell(audit, (BACKEND_0,), "c"), compile_cell(enforce, (BACKEND_0,), "c")
    )
    assert (count.total, count.lost) == (2, 0)


# ----------------------------------------------------------------------------- explain


def test_explain_says_would_deny_for_an_audited_container_and_deny_for_its_deny_networks(
    tmp_path,
):
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, CONTAINERS, "c", CellSettings(deny_networks=DENY))
    backend = next(cp for cp in plan.containers if cp.container.handle == "backend-0")
    staging = next(cp for cp in plan.containers if cp.container.handle == "staging-backend-0")
    nowhere = parse_endpoint("198.19.99.9:8443")
    d = explain(policy, plan, backend, nowhere)
    assert (d.allowed, d.verdict) == (False, "would-deny")
    text = d.text("payments/prod/backend")
    assert text.startswith("WOULD-DENY (allowed, audited) backend-0")
    assert "audit mode (Enforcement/prod-audit (e.yaml:1))" in text
    assert "accepted and logged as would-deny (ASG AUDIT)" in text
    assert d.to_dict()["decision"] == "would-deny" and d.to_dict()["audit"] == "prod-audit"
    # A neighbour outside the scope: denied, as ever.
    other = explain(policy, plan, staging, nowhere)
    assert other.verdict == "deny" and "ASG DENY" in other.text()
    # A deny network: rejected for the audited container too.
    denied = explain(policy, plan, backend, parse_endpoint("10.1.2.3:443"))
    assert denied.verdict == "deny"
    assert "never applies to the cell's deny networks" in denied.text()
    # What a rule allows stays an allow.
    dns = explain(policy, plan, backend, parse_endpoint("198.19.53.53:53/udp"))
    assert dns.verdict == "allow"


# ----------------------------------------------------------------------------- PR comment


AUDIT_FILE = """
    kind: Enforcement
    name: payments-prod-audit
    description: run the tighter payments policy for a week
    scope: {type: space, name: payments/prod}
    mode: audit
    ---
    kind: Enforcement
    name: frontend-enforced
    scope: {type: app, name: payments/prod/frontend}
    mode: enforce
    """


def test_pr_comment_a_space_moving_into_audit(tmp_path):
    repo = plan_repo(tmp_path)
    write_tree(repo / "policies", {"enforcement.yaml": AUDIT_FILE})
    commit_all(repo, "payments/prod in audit, frontend stays enforced")
    md = golden_pair(repo, "audit-on", 2)
    assert "Plan: 1 cell changes, 3 containers gain access, 0 lose access" in md
    assert f"+ all 0.0.0.0/0 {AUDIT_DETAIL}" in md
    assert "Enforcement/payments-prod-audit added (policies/enforcement.yaml:1)" in md
    assert "payments/prod/frontend" not in md  # its own document keeps it enforced


def test_pr_comment_a_space_moving_back_to_enforce(tmp_path):
    repo = plan_repo(tmp_path)
    write_tree(repo / "policies", {"enforcement.yaml": AUDIT_FILE})
    commit_all(repo, "payments/prod in audit")
    text = (repo / "policies" / "enforcement.yaml").read_text()
    (repo / "policies" / "enforcement.yaml").write_text(
        text.replace("mode: audit", "mode: enforce", 1)
    )
    commit_all(repo, "a week of would-deny records read: enforce")
    md = golden_pair(repo, "audit-off", 2)
    assert "0 containers gain access, 3 lose access" in md
    assert f"- all 0.0.0.0/0 {AUDIT_DETAIL}" in md
    assert "Enforcement/payments-prod-audit mode changed to enforce" in md


def test_shadow_parity_counts_what_an_audited_chain_accepts(tmp_path):
    """Before a takeover, parity says what the switch changes: for an audited container,
    every packet but its deny networks', traced to the Enforcement document."""
    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, CONTAINERS, "c", CellSettings(deny_networks=DENY))
    by = {cp.container.handle: cp for cp in plan.containers}
    mine = asgctl_space(plan, by["backend-0"], policy=policy)
    audit = [(rule, box) for rule, box in mine if rule.sources[0].kind == "Enforcement"]
    assert audit and str(audit[0][0].sources[0]) == "Enforcement/prod-audit audit (e.yaml:1)"
    boxes = [box for _, box in mine]
    assert contains(boxes, parse_endpoint("198.19.99.9:8443"))
    assert not contains(boxes, parse_endpoint("10.1.2.3:443"))  # a running deny network
    assert not contains(boxes, parse_endpoint("169.254.169.254:80"))  # always
    neighbour = [box for _, box in asgctl_space(plan, by["staging-backend-0"], policy=policy)]
    assert not contains(neighbour, parse_endpoint("198.19.99.9:8443"))


def test_attack_a_hostile_enforcement_name_cannot_forge_a_plan_line(tmp_path):
    """The name is the PR author's text; in the reasons it is escaped like any other."""
    repo = plan_repo(tmp_path)
    name = json.dumps(HOSTILE)
    write_tree(repo / "policies", {"e.yaml": enf(name, "{type: all}", "audit")})
    commit_all(repo, "hostile name")
    for fmt in ("markdown", "text"):
        code, out = plan_cli(repo, fmt)
        assert code == 2, out
        assert "Enforcement/" in out and "added" in out
        assert "\x1b" not in out and "\u202e" not in out
        assert "\n+ tcp 0.0.0.0/0" not in out and "\n- tcp" not in out


def test_the_ci_plan_gates_a_cell_all_in_audit_moving_to_enforce(tmp_path):
    audit = ok(tmp_path / "a", {"e.yaml": enf("all", "{type: all}", "audit")}, example=False)
    enforce = ok(tmp_path / "e", {}, example=False)
    diff = diff_plans(audit, enforce, _inventory())
    (cell,) = diff.gated_cells
    assert cell.gate is not None and cell.gate.rule == "to-nothing"
    assert diff.containers_losing == len(CONTAINERS)
    assert not diff_plans(enforce, audit, _inventory()).gated_cells


def test_the_status_document_marks_audited_containers_and_still_reads_fast(tmp_path):
    """`status/<cell>` says which containers run in audit; the plan's inventory reader (its
    fast path included) reads such a document back to the same containers."""
    from reconciler.agent.status import container_entries
    from reconciler.status.document import _fast_parts, containers_from_status
    from reconciler.status.write import dump_status

    policy = ok(tmp_path, {"e.yaml": PROD_AUDIT})
    plan = compile_cell(policy, CONTAINERS, "cell-x")
    entries = container_entries(plan)
    assert {e["handle"] for e in entries if e.get("mode") == "audit"} == audited(plan)
    assert all(set(e) - {"mode"} == set(entries[0]) - {"mode"} for e in entries)
    text = dump_status({"cell": "cell-x", "containers": entries, "history": []})
    assert _fast_parts(text, "x") is not None
    assert containers_from_status(text, "refs/heads/status/cell-x") == tuple(sorted(CONTAINERS))


def test_explain_cli_golden_for_an_audited_app_and_its_enforced_neighbour():
    """`asgctl explain` on the audit case: the backend's space is audited, the frontend's own
    document keeps it enforced (tests/data/audit-policies/enforcement.yaml)."""
    from click.testing import CliRunner

    from reconciler.cli import main
    from tests.cases import CASES
    from tests.golden import assert_golden

    policies, store = CASES["audit"]
    out = []
    for app in ("payments/prod/backend", "payments/prod/frontend"):
        argv = ["explain", "--containers", str(store), "--policies", str(policies)]
        result = CliRunner().invoke(main, [*argv, "--app", app, "--to", "198.19.20.20:80"])
        assert result.exit_code == 3, result.output  # enforcing would reject either
        out.append(result.output)
    assert_golden("explain-would-deny.txt", "\n".join(out))
    assert out[0].startswith("WOULD-DENY (allowed, audited) c-backend-1")
    assert out[1].startswith("DENY c-frontend-1")
