"""Rendering plans as iptables-restore input: golden files, kernel acceptance, injection."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from reconciler.agent.config import file_cell_settings, load_file
from reconciler.backends.iptables.render import render_cell, render_text
from reconciler.backends.kernel.runner import Runner
from reconciler.cli import main
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.fqdn.kernelsets import ensure_ipsets, referenced_ipsets
from reconciler.policy.load import load_folder
from reconciler.sources.cellstore import parse_store
from tests.cases import CASES, REPO, case_plan
from tests.golden import GOLDEN_DIR, assert_golden
from tests.policyrepo import write_tree


def plan_for(case: str):
    """CASES[case] compiled for a cell named after the case (the goldens carry that name)."""
    return case_plan(case, case)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", [4, 6])
def test_rendered_iptables_match_golden_files(case, family):
    assert_golden(f"{case}.v{family}.rules", render_text(plan_for(case), family))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_plan_json_matches_golden_file(case):
    policies, store = CASES[case]
    result = CliRunner().invoke(
        main,
        [
            "render",
            "--containers",
            str(store),
            "--policies",
            str(policies),
            "--format",
            "json",
            "--cell",
            case,
        ],
    )
    assert result.exit_code == 0, result.output
    assert_golden(f"{case}.plan.json", result.output)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_counts_match_the_rendered_lines(case):
    plan = plan_for(case)
    rendered = sum(render_cell(plan, fam).rule_count for fam in (4, 6))
    hooks = len(plan.families())
    assert plan.installed_rules == rendered + hooks
    with_settings = replace(plan, settings=file_cell_settings(load_file(str(CELL_CONFIG))))
    rulesets = [render_cell(with_settings, fam) for fam in (4, 6)]
    rendered = sum(r.rule_count + len(r.hooks) for r in rulesets if r.chains)
    assert with_settings.installed_rules == rendered
    assert with_settings.chains == sum(len(r.chains) for r in rulesets)


CELL_CONFIG = REPO / "tests" / "data" / "cell-agent.yaml"
"""Underlay interfaces, deny networks and the connection limit, as a cell's agent.yaml."""


def _render_cell_settings(fmt: str, *extra: str) -> str:
    policies, store = CASES["example"]
    argv = ["render", "--containers", str(store), "--policies", str(policies), "--cell", "cell"]
    argv += ["--format", fmt, "--agent-config", str(CELL_CONFIG), *extra]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("family", [4, 6])
def test_cell_settings_render_to_golden_files(family):
    """One FORWARD hook per underlay interface (silk's `-o <underlay>`, in the order given),
    deny networks in a shared chain per lifecycle jumped to before every group, the
    connection limit before both, after only the RELATED,ESTABLISHED accept and the INVALID
    drop.  That is silk's order: cloudfoundry/silk-release src/code.cloudfoundry.org/
    cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:58-83 IPTablesRules lists the group
    accepts, deny networks (:66), the limit (:74), INVALID drop and RELATED,ESTABLISHED accept
    (:77-80); netout.go@17a1c64:79-90 BulkInsertRules inserts that list at position 1, and
    lib/rules/locked_iptables.go@03b6465:112-138 BulkInsert writes one `-I <chain> 1` per rule,
    so the chain holds it reversed.  Pinned in both backends' goldens, which the
    kernel-acceptance tests below load."""
    text = _render_cell_settings("iptables", "--family", str(family))
    assert_golden(f"example-cell.v{family}.rules", text)
    assert_golden(
        f"example-cell.v{family}.nft.json", _render_cell_settings("nft", "--family", str(family))
    )


def test_the_plan_shows_the_cell_settings():
    assert_golden("example-cell.plan.json", _render_cell_settings("json"))


def test_underlay_interface_flag_overrides_the_agent_config():
    text = _render_cell_settings("iptables", "--family", "4", "--underlay-interface", "ens5")
    hooks = [x for x in text.splitlines() if x.startswith("-I FORWARD")]
    assert hooks == ['-I FORWARD 1 -o ens5 -m comment --comment "asg:forward" -j ASG-FORWARD']


def test_without_an_underlay_every_packet_a_container_sends_is_judged():
    """The strict reading for a render without a cell: the hook has no `-o`."""
    hooks = [x for x in render_text(plan_for("example"), 4).splitlines() if "FORWARD 1" in x]
    assert hooks == ['-I FORWARD 1 -m comment --comment "asg:forward" -j ASG-FORWARD']


@pytest.mark.parametrize(
    "name",
    ["eth0 -j ACCEPT", 'eth0"', "eth+", "a" * 16, "", "-o", "eth0\n", "../x", "eth/0", "é0"],
)
def test_an_interface_name_the_kernel_would_not_take_is_refused(tmp_path, name):
    """Interface names are rendered into rules and nft JSON: only what IFNAMSIZ and the
    kernel allow gets through (no spaces, quotes, `+` wildcards, slashes), from a flag or
    a file, and nothing is printed."""
    policies, store = CASES["example"]
    base = ["render", "--containers", str(store), "--policies", str(policies)]
    flag = CliRunner().invoke(main, [*base, "--underlay-interface", name])
    assert flag.exit_code == 1 and "not an interface name" in flag.output, flag.output
    assert "*filter" not in flag.output
    config = tmp_path / "agent.yaml"
    config.write_text(f"underlay-interface: [{_yaml_str(name)}]\n")
    filed = CliRunner().invoke(main, [*base, "--agent-config", str(config)])
    assert filed.exit_code == 1 and "underlay-interface" in filed.output, filed.output
    assert str(config) in filed.output


def test_an_empty_cell_renders_no_chains():
    result = load_folder(REPO / "policies")
    plan = compile_cell(result.policy, [])
    assert render_cell(plan, 4).chains == {}
    assert render_text(plan, 4) == "*filter\nCOMMIT\n"


def test_chain_names_fit_iptables():
    plan = plan_for("edge")
    for fam in (4, 6):
        assert all(len(name) <= 28 for name in render_cell(plan, fam).chains)


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_every_golden_file_is_accepted_by_the_kernel(make_lab, variant):
    lab = make_lab()
    for path in sorted(GOLDEN_DIR.glob("*.rules")):
        tool = "iptables" if ".v4." in path.name else "ip6tables"
        text = path.read_text()
        # Grants by name reference ipsets, which the backend creates before each transaction.
        ensure_ipsets(Runner.in_netns(lab.cell), referenced_ipsets(text))
        run = lab.cell_exec([f"{tool}-{variant}-restore", "--test", "--noflush"], input=text)
        assert run.returncode == 0, f"{path.name} rejected by {tool}-{variant}: {run.stderr}"


HOSTILE = [
    'evil"\n-A FORWARD -j ACCEPT\nCOMMIT\n*filter',
    "x' ; rm -rf / ; echo '",
    "-j ACCEPT --comment $(reboot) `id` | & > <",
    "COMMIT",
    "*filter\n:INPUT DROP [0:0]",
    "\u202e\u0000\r\n\t",
    "a" * 10_000,
]


def _policy_text(name: str, description: str) -> str:
    return f"""
kind: Directory
orgs:
  - name: org
    guid: org-1
    spaces:
      - name: space
        guid: space-1
        apps: [{{name: app, guid: app-1}}]
---
kind: SecurityGroup
name: {_yaml_str(name[:250])}
description: {_yaml_str(description)}
rules:
  - protocol: tcp
    destination: 198.19.0.1
    ports: "443"
    description: {_yaml_str(description)}
running_spaces: [org/space]
---
kind: Destination
name: {_yaml_str(name[:250])}
description: {_yaml_str(description)}
protocol: udp
ips: 198.19.0.2
ports: 53
---
kind: EgressPolicy
name: {_yaml_str(name[:250])}
description: {_yaml_str(description)}
source: {{type: app, name: org/space/app}}
destination: {_yaml_str(name[:250])}
"""


def _yaml_str(text: str) -> str:
    import json

    return json.dumps(text)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_no_policy_string_reaches_or_changes_the_rendered_rules(tmp_path, hostile):
    container = Container("c1", "198.18.0.2", app_id="app-1", space_id="space-1")
    benign = load_folder(write_tree(tmp_path / "benign", {"p.yaml": _policy_text("ok", "ok")}))
    evil = load_folder(write_tree(tmp_path / "evil", {"p.yaml": _policy_text(hostile, hostile)}))
    assert benign.ok and evil.ok, [str(f) for f in evil.findings]
    expected = render_text(compile_cell(benign.policy, [container]), 4)
    actual = render_text(compile_cell(evil.policy, [container]), 4)
    assert actual == expected
    assert actual.count("COMMIT") == 1 and actual.count("*filter") == 1


@pytest.mark.parametrize("hostile", [h for h in HOSTILE if h != "COMMIT"])
@pytest.mark.parametrize("field", ["handle", "app_id", "space_id", "org_id", "policy_group_id"])
def test_hostile_inventory_strings_never_reach_the_rules_and_never_widen(hostile, field):
    """Ids are free text in CF, so printable ones are used as written; ones that could forge a
    line (control characters, 10k characters) hold their container's IP to no access, reported
    on one line naming the container.  Either way the rules hold none of the text."""
    import json

    from reconciler.sources.cellstore import decode_store

    entry = {"handle": "c1", "ip": "198.18.0.2", "metadata": {"app_id": "app-1"}}
    key = "c1"
    if field == "handle":
        key = entry["handle"] = hostile
    else:
        entry["metadata"][field] = hostile
    reading = decode_store(json.dumps({key: entry}))
    [container] = reading.containers
    if hostile.isprintable() and len(hostile) <= 1024:
        assert reading.rejected == ()
    else:
        [rejected] = reading.rejected
        assert rejected.kind == "held" and "store.json: container " in rejected.reason
        assert "\n" not in str(rejected) and "\x00" not in str(rejected)
        assert container.lifecycle == "" and container.handle.isprintable()
    policy = load_folder(REPO / "policies").policy
    text = render_text(compile_cell(policy, reading.containers), 4)
    assert text.count("COMMIT") == 1 and text.count("*filter") == 1
    assert hostile not in text.replace("COMMIT", "")


def test_inventory_strings_never_reach_the_rendered_rules():
    store = parse_store(
        '{"COMMIT": {"handle": "COMMIT", "ip": "198.18.0.2", "metadata": {"app_id": "ACCEPT"}}}'
    )
    text = render_text(compile_cell(load_folder(REPO / "policies").policy, store), 4)
    assert text.count("COMMIT") == 1
    assert "ACCEPT\n" not in text.replace("-j ACCEPT\n", "")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", [4, 6])
def test_rendered_nft_matches_golden_files(case, family):
    policies, store = CASES[case]
    result = CliRunner().invoke(
        main,
        [
            "render",
            "--containers",
            str(store),
            "--policies",
            str(policies),
            "--format",
            "nft",
            "--family",
            str(family),
        ],
    )
    assert result.exit_code == 0, result.output
    assert_golden(f"{case}.v{family}.nft.json", result.output)


def test_every_nft_golden_file_is_accepted_by_the_kernel(make_lab):
    lab = make_lab()
    for path in sorted(GOLDEN_DIR.glob("*.nft.json")):
        run = lab.cell_exec(["nft", "-c", "-j", "-f", "-"], input=path.read_text())
        assert run.returncode == 0, f"{path.name} rejected by nft: {run.stderr}"
