"""`asgctl plan`: pull-request plan diffs, from two commits of a policy repo made here.

Golden files pin the markdown (the sticky PR comment) and the text form for the scenarios a
reviewer meets: a destination added, a rule removed, a destination's IP moved, a space-level
grant, a global ASG change, a head that does not validate, nothing at all, and a plan too
big for one comment.  Commit SHAs are replaced by placeholders before comparing.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from reconciler.backends.iptables.render import render_cell
from reconciler.ci.plan import run_plan
from reconciler.ci.report import MARKER, PlanReport, Revision, render, render_markdown
from reconciler.cli import main
from reconciler.core.cellplan import CellInventory
from reconciler.core.compile import compile_cell
from reconciler.core.diff import (
    CF_RULES_ERROR,
    CF_RULES_WARNING,
    CellDiff,
    ChainDiff,
    PlanDiff,
    _family_diff,
    _limit_notices,
    diff_plans,
)
from reconciler.core.gate import RevokeCount
from reconciler.core.model import Container, Space
from reconciler.policy.load import load_folder
from reconciler.sources.cellstore import InventoryError, dump_store
from reconciler.sources.inventories import (
    StoreFiles,
    cell_name_for,
    synthetic_inventory,
)
from reconciler.status.document import _fast_parts, containers_from_status
from tests.golden import assert_golden
from tests.policyrepo import commit_all, git, init_repo, write_tree

REPO = Path(__file__).resolve().parent.parent
BACKEND = "a1b2c3d4-0003-4e5f-9a8b-000000000003"
FRONTEND = "a1b2c3d4-0004-4e5f-9a8b-000000000004"
STAGING_BACKEND = "a1b2c3d4-0006-4e5f-9a8b-000000000006"
BLOG = "a1b2c3d4-0009-4e5f-9a8b-000000000009"
PROD = "7b1d2e4f-0002-4c3a-8f2b-000000000002"
STAGING = "7b1d2e4f-0005-4c3a-8f2b-000000000005"
WEB = "7b1d2e4f-0008-4c3a-8f2b-000000000008"
PAYMENTS = "5e2f3c8a-0001-4a6e-9d1e-000000000001"
MARKETING = "5e2f3c8a-0007-4a6e-9d1e-000000000007"


def c(handle: str, ip: str, app: str, space: str, org: str, workload: str = "app") -> Container:
    return Container(handle, ip, app, space, org, "", workload)


CELLS = {
    "cells/cell-1/store.json": [
        c("backend-0", "198.18.1.2", BACKEND, PROD, PAYMENTS),
        c("backend-1", "198.18.1.3", BACKEND, PROD, PAYMENTS),
        c("frontend-0", "198.18.1.4", FRONTEND, PROD, PAYMENTS),
        c("backend-stage", "198.18.1.5", BACKEND, PROD, PAYMENTS, "staging"),
    ],
    "cells/cell-2.json": [
        c("blog-0", "198.18.2.2", BLOG, WEB, MARKETING),
        c("blog-v6", "fd00:18:2::2", BLOG, WEB, MARKETING, "task"),
        c("staging-backend-0", "198.18.2.3", STAGING_BACKEND, STAGING, PAYMENTS),
    ],
    "cells/cell-3/store.json": [
        c("blog-stage", "198.18.3.2", BLOG, WEB, MARKETING, "staging"),
        c("system-0", "198.18.3.3", "", "", ""),
    ],
}


def policy_repo(tmp_path: Path) -> Path:
    """The example policy repo (with its tests) and a small fleet's store files, committed."""
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(REPO / "policies", repo / "policies")
    for rel, containers in CELLS.items():
        write_tree(repo, {rel: dump_store(containers)})
    commit_all(repo, "base")
    return repo


def edit(repo: Path, rel: str, old: str, new: str) -> None:
    path = repo / "policies" / rel
    text = path.read_text()
    assert old in text, f"{old!r} not in {rel}"
    path.write_text(text.replace(old, new, 1))


def plan(repo: Path, fmt: str, inventory: str = "cells") -> tuple[int, str]:
    """`asgctl plan` base HEAD~1, head HEAD, store-file inventory; SHAs made stable."""
    args = ["plan", "--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies")]
    args += ["--inventory", str(repo / inventory), "--format", fmt, "--detailed-exitcode"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    out = result.output
    for rev, placeholder in (("HEAD~1", "bbbbbbb"), ("HEAD", "hhhhhhh")):
        out = out.replace(git(repo, "rev-parse", rev)[:7], placeholder)
    return result.exit_code, out


def golden_pair(repo: Path, name: str, expect_code: int) -> str:
    code, markdown = plan(repo, "markdown")
    assert code == expect_code, markdown
    assert_golden(f"plan/{name}.md", markdown)
    code, text = plan(repo, "text")
    assert code == expect_code, text
    assert_golden(f"plan/{name}.txt", text)
    assert markdown.startswith(MARKER)
    assert len(markdown) < 65_000
    return markdown


# ----------------------------------------------------------------------------- goldens


def test_added_destination(tmp_path):
    repo = policy_repo(tmp_path)
    write_tree(
        repo / "policies",
        {
            "ledger-replica.yaml": """
                kind: Destination
                name: ledger-replica
                description: Read replica for reports
                protocol: tcp
                ips: 198.19.10.11
                ports: 3306
                ---
                kind: EgressPolicy
                name: backend-to-replica
                source: {type: app, name: payments/prod/backend}
                destination: ledger-replica
                app_lifecycle: running
                """
        },
    )
    commit_all(repo, "backend reads the replica")
    md = golden_pair(repo, "added-destination", 2)
    assert "Plan: 1 cell changes, 2 containers gain access, 0 lose access; +" in md
    assert "EgressPolicy/backend-to-replica added (policies/ledger-replica.yaml:8)" in md


def test_destination_without_ports_is_marked_all_ports(tmp_path):
    """A tcp/udp Destination without `ports` grants every port (the policy server's default);
    validation warns (tests/test_validate.py) and the plan says "all ports" on the grant."""
    repo = policy_repo(tmp_path)
    write_tree(
        repo / "policies",
        {
            "ledger-replica.yaml": """
                kind: Destination
                name: ledger-replica
                protocol: tcp
                ips: 198.19.10.11
                ---
                kind: EgressPolicy
                name: backend-to-replica
                source: {type: app, name: payments/prod/backend}
                destination: ledger-replica
                """
        },
    )
    commit_all(repo, "backend reads the replica, every port")
    for fmt in ("markdown", "text"):
        code, out = plan(repo, fmt)
        assert code == 2, out
        assert "+ tcp 198.19.10.11 all ports" in out, out


DNS_OVER_TCP = """  - protocol: tcp
    destination: 198.19.53.53
    ports: "53"
    description: DNS over TCP for large answers
"""


def test_removed_rule(tmp_path):
    repo = policy_repo(tmp_path)
    edit(repo, "security-groups/platform-dns.yaml", DNS_OVER_TCP, "")
    commit_all(repo, "drop DNS over TCP")
    md = golden_pair(repo, "removed-rule", 2)
    reason = "SecurityGroup/platform-dns rules[1] removed"
    assert f"{reason} (policies/security-groups/platform-dns.yaml:11)" in md
    assert "0 containers gain access, 8 lose access" in md


def test_destination_ip_moved(tmp_path):
    repo = policy_repo(tmp_path)
    edit(
        repo,
        "destinations.yaml",
        "198.19.10.10, end: 198.19.10.10",
        "198.19.10.20, end: 198.19.10.20",
    )
    commit_all(repo, "MySQL moves")
    md = golden_pair(repo, "destination-moved", 2)
    assert "- tcp 198.19.10.10 port 3306    # Destination/mysql ips changed" in md
    assert "+ tcp 198.19.10.20 port 3306    # Destination/mysql ips changed" in md
    # One edit of the Destination moves the access of exactly the app granted it.
    assert "2 containers gain access, 2 lose access" in md


def test_space_level_grant(tmp_path):
    repo = policy_repo(tmp_path)
    write_tree(
        repo / "policies",
        {
            "marketing-cdn.yaml": """
                kind: Destination
                name: cdn-origin
                protocol: tcp
                ips: 198.19.70.0/28
                ports: [443]
                ---
                kind: EgressPolicy
                name: marketing-web-to-cdn
                source: {type: space, name: marketing/web}
                destination: cdn-origin
                """
        },
    )
    commit_all(repo, "marketing/web reaches the CDN origin")
    md = golden_pair(repo, "space-grant", 2)
    assert (
        "marketing/web/blog" in md
        and "payments" not in md.split("#### Cells")[0].split("#### Access")[1]
    )


def test_global_asg_change(tmp_path):
    repo = policy_repo(tmp_path)
    edit(
        repo,
        "security-groups/platform-dns.yaml",
        '    destination: 198.19.53.53\n    ports: "53"\n    description: primary resolver',
        '    destination: 198.19.53.53-198.19.53.54\n    ports: "53"\n    description: resolvers',
    )
    commit_all(repo, "second resolver")
    md = golden_pair(repo, "global-asg", 2)
    assert "Plan: 3 cells change, 8 containers gain access, 0 lose access" in md


def test_validation_failure(tmp_path):
    repo = policy_repo(tmp_path)
    edit(repo, "destinations.yaml", "ips: 198.19.30.30", "ips: 198.19.30.300")
    commit_all(repo, "typo")
    md = golden_pair(repo, "validation-failure", 1)
    assert (
        "policies/destinations.yaml:14:6: Destination/metrics: ips: invalid" in md
        and "Plan failed" in md
    )


def test_empty_plan(tmp_path):
    repo = policy_repo(tmp_path)
    edit(repo, "destinations.yaml", "description: Payments MySQL cluster", "description: Ledger")
    edit(repo, "egress-policies.yaml", "# App-level grants", "# Moved lines do not matter\n\n#")
    commit_all(repo, "words only")
    md = golden_pair(repo, "empty", 0)
    assert "No changes." in md


def test_plan_too_big_for_one_comment(tmp_path):
    repo = policy_repo(tmp_path)
    fleet = repo / "fleet"
    rng = random.Random(5)
    apps = [(BACKEND, PROD, PAYMENTS), (FRONTEND, PROD, PAYMENTS), (BLOG, WEB, MARKETING)]
    for n in range(25):
        containers = []
        for i in range(4):
            app, space, org = rng.choice(apps)
            containers.append(c(f"c{n:02d}-{i}", f"198.18.{n}.{i + 2}", app, space, org))
        write_tree(fleet, {f"cell-{n:02d}.json": dump_store(containers)})
    commit_all(repo, "fleet")
    edit(repo, "security-groups/platform-dns.yaml", 'ports: "53"', 'ports: "53,853"')
    commit_all(repo, "DNS over TLS")
    code, md = plan(repo, "markdown", "fleet")
    code_text, text = plan(repo, "text", "fleet")
    assert code == code_text == 2
    # Cut, but never the summary; and it says what it cut.
    assert len(text) > 65_000 > len(md)
    assert "**Plan: 25 cells change, 100 containers gain access, 0 lose access;" in md
    assert "Cut to fit one comment (65,000 characters):" in md
    assert "not shown" in md
    assert_golden("plan/too-big.md", md)
    assert_golden("plan/too-big.txt", text)


def retire_defaults(repo: Path) -> None:
    (repo / "policies" / "security-groups" / "platform-dns.yaml").unlink()
    path = repo / "policies" / "egress-policies.yaml"
    text = path.read_text()
    path.write_text(text[: text.index("---\nkind: EgressPolicy\nname: everyone-to-metrics")])


def test_mass_revoke_gate(tmp_path):
    """Retiring the global DNS group and the default metrics grant: cell-4 runs one
    container whose only access those were, so its access goes to nothing and its agent
    would refuse (floor or not); the other cells keep some access, lose fewer pairs than the
    floor, and would apply it."""
    repo = policy_repo(tmp_path)
    write_tree(repo, {"cells/cell-4.json": dump_store([c("worker-0", "198.18.4.2", "", "", "")])})
    retire_defaults(repo)
    commit_all(repo, "retire the platform DNS group and the default metrics grant")
    md = golden_pair(repo, "mass-revoke", 2)
    gate = md.split("#### Mass-revoke gate", 1)[1].split("#### Access", 1)[0]
    assert "1 cell would refuse this change" in gate
    assert "| cell-4 | 3 / 3 | all access goes to nothing (100% > 50%) |" in gate
    assert "<code>Asgctl-Allow-Mass-Revoke: true</code>" in gate
    assert "cell-3" not in gate  # 5 of 6 pairs: 83%, but under the floor of 100
    _, text = plan(repo, "text")
    assert "cell cell-4: the plan takes away all of the cell's access" in text
    code, out = plan(repo, "json")
    assert code == 2
    doc = json.loads(out)
    assert doc["mass_revoke_gate"] == {
        "settings": "the agent's defaults",
        "cells_refusing": ["cell-4"],
    }
    by_cell = {x["cell"]: x["mass_revoke"] for x in doc["cells"]}
    assert by_cell["cell-4"]["refused"] and by_cell["cell-4"]["rule"] == "to-nothing"
    assert (by_cell["cell-3"]["net_lost"], by_cell["cell-3"]["total"]) == (5, 6)
    assert not by_cell["cell-3"]["refused"]


def test_the_plan_judges_the_gate_with_an_agent_config(tmp_path, monkeypatch):
    repo = policy_repo(tmp_path)
    (repo / "policies" / "security-groups" / "platform-dns.yaml").unlink()
    commit_all(repo, "retire the platform DNS group")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "agent.yaml").write_text(
        "mass-revoke-min: 4\nmass-revoke-trailer: Ops-Approved-Revoke\n"
    )
    args = ["plan", "--base", "HEAD~1", "--policies", str(repo / "policies")]
    args += ["--inventory", str(repo / "cells"), "--agent-config", "agent.yaml"]
    result = CliRunner().invoke(main, [*args, "--format", "text"])
    assert result.exit_code == 0, result.output
    assert "Mass-revoke gate: 1 cell would refuse this change (settings: from agent.yaml)" in (
        result.output
    )
    assert (
        "cell cell-3: the plan takes away 4 of the cell's 6 allowed container-rule pairs (net of "
        "what the same containers gain) (66.7% > 50% threshold, and 4 >= the floor of 4); lets it "
        "through: Ops-Approved-Revoke: true"
    ) in result.output
    assert 'Add "Ops-Approved-Revoke: true" to the merge commit' in result.output
    (tmp_path / "agent.yaml").write_text("mass-revoke-min: -1\n")
    bad = CliRunner().invoke(main, [*args, "--format", "text"])
    assert bad.exit_code == 1
    assert "agent.yaml: mass-revoke-min: expected a whole number >= 0" in bad.output


def test_a_gate_section_for_a_whole_fleet_stays_short_in_a_comment():
    """A change that empties 400 cells names 30 of them in the PR comment and counts the
    rest; the text form and JSON list every one."""
    chain = ChainDiff(4, "ASG-C-x", "delete", 0, 1, ("- -A ASG-C-x -j ACCEPT",))
    emptied = RevokeCount(3, 3, 3, 0, 1, True)
    cells = tuple(
        CellDiff(f"cell-{i:03d}", "s", 1, 1, (chain,), 3, 0, revoke=emptied) for i in range(400)
    )
    report = PlanReport(Revision("a"), Revision("b"), "policies", "x", PlanDiff(cells, ()))
    md = render_markdown(report)
    gate = md.split("#### Mass-revoke gate", 1)[1].split("#### Access", 1)[0]
    assert "400 cells would refuse this change" in gate and "| and 370 more |" in gate
    assert "| cell-029 |" in gate and "| cell-030 |" not in gate
    text = render(report, "text")
    assert text.count(": the plan takes away all of the cell's access") == 400
    assert len(json.loads(render(report, "json"))["mass_revoke_gate"]["cells_refusing"]) == 400


# ----------------------------------------------------------------------------- behaviour


def test_exit_codes_and_json(tmp_path):
    repo = policy_repo(tmp_path)
    commit_all(repo, "nothing")
    code, out = plan(repo, "json")
    assert code == 0 and json.loads(out)["status"] == "no-changes"
    plain = CliRunner().invoke(
        main, ["plan", "--base", "HEAD~1", "--policies", str(repo / "policies"), "--format", "json"]
    )
    assert plain.exit_code == 0
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "port")
    code, out = plan(repo, "json")
    doc = json.loads(out)
    assert code == 2 and doc["status"] == "changes"
    assert doc["counts"]["cells_changed"] == 3 and doc["counts"]["cells"] == 3
    lost = [p for p in doc["principals"] if p["lost"]]
    assert lost and all(ch["reasons"] for p in lost for ch in p["lost"])
    bad = CliRunner().invoke(
        main, ["plan", "--base", "nope", "--policies", str(repo / "policies"), "--format", "text"]
    )
    assert bad.exit_code == 1 and "unknown revision 'nope'" in bad.output


def test_without_inventory_a_synthetic_cell_per_directory_is_planned(tmp_path):
    repo = policy_repo(tmp_path)
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "port")
    report = run_plan(str(repo / "policies"), "HEAD~1", "HEAD")
    assert report.inventory.startswith("synthetic")
    names = {p.name for p in report.diff.principals}
    assert {"payments/prod/backend", "marketing/web/blog"} <= names


def test_the_readme_describes_the_synthetic_inventory_as_planned(tmp_path):
    """README's `plan --inventory directory` section, claim by claim, against the code."""
    readme = " ".join((REPO / "README.md").read_text().split())
    repo = policy_repo(tmp_path)
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "port")
    args = ["plan", "--base", "HEAD~1", "--policies", str(repo / "policies")]
    result = CliRunner().invoke(main, [*args, "--inventory", "directory"])
    assert result.exit_code == 0, result.output
    said = result.output.splitlines()[0].split("inventory: ", 1)[1]
    assert f"says `inventory: {said}`" in readme
    mixed = CliRunner().invoke(main, [*args, "--inventory", "directory", "--inventory", "status"])
    assert mixed.exit_code == 1 and "cannot be mixed" in mixed.output
    assert "`directory` cannot be combined with `status` or files (exit 1)" in readme

    policy = load_folder(REPO / "policies").policy
    d = policy.directory
    empty = Space("space-empty", "empty", d.orgs[0].guid)  # a space that lists no app
    policy = replace(policy, directory=replace(d, spaces=(*d.spaces, empty)))
    cell = synthetic_inventory((policy,))
    assert cell.cell == "directory" and "one synthetic cell named `directory`" in readme
    by_principal: dict[tuple[str, str], set[tuple[str, int]]] = {}
    for x in cell.containers:
        assert x.handle.startswith("synthetic-") and x.org_id
        by_principal.setdefault((x.space_id, x.app_id), set()).add((x.workload, x.version))
    apps = {(a.space_guid, a.guid) for a in policy.directory.apps}
    bare = {(s.guid, "") for s in policy.directory.spaces if s.guid not in {a for a, _ in apps}}
    assert set(by_principal) == apps | bare and bare  # every app, every app-less space
    assert "one per space that lists no app" in readme
    # The example grants an IPv6 destination: app and staging, each in both families.
    assert all(
        k == {(w, v) for w in ("app", "staging") for v in (4, 6)} for k in by_principal.values()
    )
    v4_only = replace(policy, security_groups=(), destinations=(), egress_policies=())
    assert {x.version for x in synthetic_inventory((v4_only,)).containers} == {4}
    assert "an IPv6 twin of each when some policy of either revision grants an IPv6" in readme


def status_branch(repo: Path, cell: str, text: str, ref: str | None = None) -> None:
    """Commit `status.yaml` on its own root commit at refs/heads/status/<cell> (or `ref`)."""
    blob = (
        subprocess.run(
            ["git", "-C", str(repo), "hash-object", "-w", "--stdin"],
            input=text.encode(),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    tree = (
        subprocess.run(
            ["git", "-C", str(repo), "mktree"],
            input=f"100644 blob {blob}\tstatus.yaml\n".encode(),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    commit = git(repo, "commit-tree", tree, "-m", f"status of {cell}")
    git(repo, "update-ref", ref or f"refs/heads/status/{cell}", commit)


def status_text(containers: list[Container]) -> str:
    doc = {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containers": [
            {
                "handle": x.handle,
                "ip": x.ip,
                "app_id": x.app_id,
                "space_id": x.space_id,
                "org_id": x.org_id,
                "workload": x.workload,
                "chain": "0123456789abcdef",
                "groups": ["fedcba9876543210"],
                "sources": ["SecurityGroup/platform-dns"],
            }
            for x in containers
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def test_status_branches_are_the_default_inventory(tmp_path):
    repo = policy_repo(tmp_path)
    for rel, containers in CELLS.items():
        status_branch(repo, cell_name_for(rel), status_text(containers))
    # A remote-tracking ref wins over a stale local branch of the same cell.
    status_branch(repo, "cell-2", status_text([]), "refs/remotes/origin/status/cell-2")
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "port")
    report = run_plan(str(repo / "policies"), "HEAD~1", "HEAD")
    assert report.inventory == "status branches (3 cells)"
    by_cell = {c.cell: c for c in report.diff.cells}
    assert by_cell["cell-1"].containers == 4
    assert by_cell["cell-2"].containers == 0 and by_cell["cell-2"].origin.startswith("refs/remotes")
    assert by_cell["cell-3"].containers == 2
    # The same plan from store files.
    files = run_plan(str(repo / "policies"), "HEAD~1", "HEAD", [str(repo / "cells")])
    assert replace(files.diff.cells[0], origin="") == replace(by_cell["cell-1"], origin="")
    explicit = run_plan(str(repo / "policies"), "HEAD~1", "HEAD", ["status"])
    assert explicit.inventory == report.inventory


def test_cell_names_of_store_files():
    assert cell_name_for("cells/cell-1/store.json") == "cell-1"
    assert cell_name_for("cell-1.json") == "cell-1"
    assert cell_name_for("/var/vcap/data/cell-7/store.json") == "cell-7"


def test_store_files_refuse_a_cell_given_twice(tmp_path):
    write_tree(tmp_path, {"a/cell-1/store.json": "{}", "b/cell-1.json": "{}"})
    with pytest.raises(InventoryError, match="cell 'cell-1' is given twice"):
        StoreFiles((str(tmp_path / "a/cell-1/store.json"), str(tmp_path / "b/cell-1.json"))).cells()


def test_hostile_status_branches_are_skipped_with_a_warning_not_a_traceback(tmp_path):
    """Issue 20, attack 6: an alias bomb (a MemoryError in a JSON round trip before), wrong
    types (TypeError before) and a `containers:` inside a quoted string, each on its own
    status branch: `asgctl plan --inventory status` plans the good cells and names the rest."""
    repo = policy_repo(tmp_path)
    status_branch(repo, "cell-1", status_text(CELLS["cells/cell-1/store.json"]))
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n"
        for p, n in zip("abcdefg", "bcdefgh", strict=True)
    )
    status_branch(repo, "bomb", bomb + "containers: [*h, *h, *h]\n")
    status_branch(repo, "types", "containers:\n- handle: a\n  ip: {x: 1}\n")
    quoted = "note: 'x\ncontainers:\n- handle: evil\n  ip: 198.18.9.9\n'\ncontainers: []\n"
    status_branch(repo, "quoted", quoted)
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "port")
    args = ["plan", "--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies")]
    args += ["--inventory", "status", "--format", "json"]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    doc = json.loads(result.output)
    # The branches listed; the two left out are named in the warnings (every job of a
    # sharded plan lists the same branches, and reads only its own in full).
    assert doc["inventory"] == "status branches (4 cells)"
    assert len(doc["cells"]) == 2
    warnings = "\n".join(doc["warnings"])
    assert "refs/heads/status/bomb:status.yaml" in warnings and "expands to more than" in warnings
    assert "refs/heads/status/types:status.yaml: containers[0].ip: must be a string" in warnings
    assert "left out of the plan" in warnings
    assert "quoted" not in warnings and "evil" not in result.output


def test_the_plan_judges_each_cell_with_the_gate_settings_its_status_branch_reports(tmp_path):
    """An agent reports its mass-revoke settings in status (`source`); the plan judges that
    cell's gate with them.  A status branch is untrusted: a value no agent could run with
    (a trailer that would forge a line, a share over 100%) skips the cell, named."""
    repo = policy_repo(tmp_path)
    strict = {"massRevokeThreshold": 0.1, "massRevokeMin": 1, "massRevokeTrailer": "Payments-Ok"}
    for rel, containers in CELLS.items():
        doc = yaml.safe_load(status_text(containers))
        if rel.startswith("cells/cell-1/"):
            doc["source"] = strict
        status_branch(repo, cell_name_for(rel), yaml.safe_dump(doc))
    forged = yaml.safe_load(status_text([]))
    forged["source"] = {"massRevokeTrailer": "Ok\n::warning::x"}
    status_branch(repo, "forged", yaml.safe_dump(forged))
    forged["source"] = {"massRevokeThreshold": 5}
    status_branch(repo, "wide", yaml.safe_dump(forged))
    edit(repo, "security-groups/platform-dns.yaml", DNS_OVER_TCP, "")
    commit_all(repo, "drop DNS over TCP")
    report = run_plan(str(repo / "policies"), "HEAD~1", "HEAD")
    assert report.gate_settings == "as each cell reports on its status branch"
    gated = {c.cell: c.gate for c in report.diff.gated_cells}
    assert list(gated) == ["cell-1"]  # over its 10% and its floor of 1; the others: defaults
    n = gated["cell-1"].count
    assert (n.net_lost, n.total) == (4, 20) and "20% > 10%" in gated["cell-1"].reason
    assert gated["cell-1"].override == "Payments-Ok: true"
    warnings = "\n".join(report.warnings)
    assert "refs/heads/status/forged:status.yaml: source.massRevokeTrailer" in warnings
    assert "refs/heads/status/wide:status.yaml: source.massRevokeThreshold: must be at most 1" in (
        warnings
    )


def test_status_entries_are_held_to_the_store_rules():
    # Free text is a handle, as in CF; one that could forge a line is held to no access.
    bad = 'containers:\n- handle: "a;b"\n  ip: 198.18.0.2\n- handle: "c\\x1bd"\n  ip: 198.18.0.3\n'
    ok, held = containers_from_status(bad, "refs/heads/status/x")
    assert ok.handle == "a;b" and ok.lifecycle == "running"
    assert held.handle.startswith("held-") and (held.ip, held.lifecycle) == ("198.18.0.3", "")
    dup = "containers:\n- {handle: a, ip: 198.18.0.2}\n- {handle: a, ip: 198.18.0.3}\n"
    with pytest.raises(InventoryError, match="listed twice"):
        containers_from_status(dup, "x")


def test_dataplane_diff_renders_only_changed_chains_but_equals_a_full_diff(tmp_path):
    """The structural diff must equal diffing every rendered chain of both plans."""
    base = load_folder(REPO / "policies").policy
    variants = {
        "moved": ("198.19.10.10, end: 198.19.10.10", "198.19.10.20, end: 198.19.10.20"),
        "ports": ('ports: "53"', 'ports: "53,5353"'),
        "unbound": ("  - payments/staging\n", ""),
    }
    rng = random.Random(2)
    pool = [x for cs in CELLS.values() for x in cs]
    for name, (old, new) in variants.items():
        tree = tmp_path / name
        shutil.copytree(REPO / "policies", tree)
        for path in tree.rglob("*.yaml"):
            path.write_text(path.read_text().replace(old, new))
        head = load_folder(tree).policy
        for _ in range(20):
            containers = rng.sample(pool, rng.randrange(1, len(pool)))
            before, after = compile_cell(base, containers), compile_cell(head, containers)
            for family in (4, 6):
                mine = {d.chain: d.lines for d in _family_diff(before, after, family)}
                old_chains = render_cell(before, family).chains
                new_chains = render_cell(after, family).chains
                full = {
                    k
                    for k in old_chains.keys() | new_chains.keys()
                    if old_chains.get(k) != new_chains.get(k)
                }
                assert set(mine) == full
                for chain, lines in mine.items():
                    assert [x[2:] for x in lines if x[0] in "- "] == list(old_chains.get(chain, ()))
                    assert [x[2:] for x in lines if x[0] in "+ "] == list(new_chains.get(chain, ()))


def test_installed_and_cf_counts_match_the_plans(tmp_path):
    base = load_folder(REPO / "policies").policy
    tree = tmp_path / "p"
    shutil.copytree(REPO / "policies", tree)
    dns = tree / "security-groups/platform-dns.yaml"
    dns.write_text(dns.read_text().replace('ports: "53"', 'ports: "53,853"'))
    head = load_folder(tree).policy
    cells = [CellInventory(cell_name_for(k), tuple(v), k) for k, v in CELLS.items()]
    diff = diff_plans(base, head, cells)
    for cell, inv in zip(diff.cells, cells, strict=True):
        assert cell.base_installed == compile_cell(base, inv.containers).installed_rules
        assert cell.head_installed == compile_cell(head, inv.containers).installed_rules
        assert cell.head_cf_rules == compile_cell(head, inv.containers).cf_equivalent_rules


def test_rule_limits_warn_and_error():
    def cell(n: int) -> CellDiff:
        return CellDiff("c", "", 1, 0, (), 0, n)

    assert _limit_notices(cell(CF_RULES_WARNING)) == []
    assert _limit_notices(cell(CF_RULES_WARNING + 1))[0].level == "warning"
    assert _limit_notices(cell(CF_RULES_ERROR + 1))[0].level == "error"
    diff = PlanDiff(
        (cell(CF_RULES_ERROR + 1),), (), tuple(_limit_notices(cell(CF_RULES_ERROR + 1)))
    )
    report = PlanReport(Revision("a", "a" * 40), Revision("b", "b" * 40), "policies", "x", diff)
    assert report.exit_code(detailed=True) == 1
    assert "**Error:** cell c: 500,001 CF-equivalent rules" in render_markdown(report)


HOSTILE = "x`y</details><img src=x>|z\n+ tcp 0.0.0.0/0 @everyone ${{ secrets }} \x1b[31m\u202e"


def test_policy_strings_are_escaped_in_markdown_and_text(tmp_path):
    repo = policy_repo(tmp_path)
    shutil.rmtree(repo / "policies" / "tests")  # they name the app being renamed
    app = "b`<i>|@everyone${{x}}\u202e"  # directory names: no whitespace or slash
    edit(repo, "directory.yaml", "{name: backend, guid", f"{{name: {json.dumps(app)}, guid")
    edit(
        repo,
        "egress-policies.yaml",
        "name: payments/prod/backend",
        f"name: {json.dumps('payments/prod/' + app)}",
    )
    edit(repo, "egress-policies.yaml", "destination: mysql", f"destination: {json.dumps(HOSTILE)}")
    edit(repo, "destinations.yaml", "name: mysql", f"name: {json.dumps(HOSTILE)}")
    commit_all(repo, "hostile names")
    edit(repo, "destinations.yaml", "ports: [{start: 3306, end: 3306}]", "ports: 3307")
    commit_all(repo, "port")
    code, md = plan(repo, "markdown")
    assert code == 2, md
    assert "Destination/" in md and "ports changed" in md
    # Outside code fences nothing a policy wrote may act as markup; inside, a fence longer
    # than any backtick run keeps it literal, and control characters are shown escaped.
    fences = list(re.finditer(r"^(`{3,})diff\n(.*?)\n\1$", md, re.M | re.S))
    assert fences
    outside = re.sub(r"^(`{3,})diff\n(.*?)\n\1$", "", md, flags=re.M | re.S)
    for raw in ("<img", "<i>", "</details><", "@everyone", "${{", "|z", "|@", "`"):
        assert raw not in outside, raw
    for f in fences:
        assert "`" * len(f.group(1)) not in f.group(2)
    assert "\x1b" not in md and "\u202e" not in md
    assert "\n+ tcp 0.0.0.0/0" not in md  # a name cannot start a diff line of its own
    code, text = plan(repo, "text")
    assert "\x1b" not in text and "\u202e" not in text and "\n+ tcp 0.0.0.0/0" not in text
    assert "\\x1b" in text  # shown, escaped


def test_markdown_cut_keeps_the_summary_at_any_limit(tmp_path):
    repo = policy_repo(tmp_path)
    edit(repo, "security-groups/platform-dns.yaml", 'ports: "53"', 'ports: "53,853"')
    commit_all(repo, "dot")
    report = run_plan(str(repo / "policies"), "HEAD~1", "HEAD", [str(repo / "cells")])
    full = render_markdown(report)
    for limit in (2_500, 4_000, len(full) - 1):
        cut = render_markdown(report, limit=limit)
        assert len(cut) <= limit
        assert "**Plan: 3 cells change" in cut and "Cut to fit one comment" in cut


def test_an_invalid_base_without_status_branches_is_compared_as_empty_and_said_so(tmp_path):
    """No status branch says what the cells enforce: the empty comparison is all there is,
    and the note says it shows no loss (tests/test_plan_truth.py: with status branches)."""
    repo = policy_repo(tmp_path)
    edit(repo, "destinations.yaml", "ips: 198.19.30.30", "ips: 198.19.30.300")
    commit_all(repo, "broken main")
    edit(repo, "destinations.yaml", "ips: 198.19.30.300", "ips: 198.19.30.30")
    commit_all(repo, "fixed")
    code, text = plan(repo, "text")
    assert code == 2
    assert "Note: the base HEAD~1 does not validate (1 error): no cell applied it" in text
    assert "compares the head with an EMPTY policy, so no access lost is shown" in text


def test_forked_workers_give_the_same_diff(tmp_path):
    base = load_folder(REPO / "policies").policy
    tree = tmp_path / "p"
    shutil.copytree(REPO / "policies", tree)
    dns = tree / "security-groups/platform-dns.yaml"
    dns.write_text(dns.read_text().replace('ports: "53"', 'ports: "53,853"'))
    head = load_folder(tree).policy
    pool = [x for cs in CELLS.values() for x in cs]
    rng = random.Random(9)
    cells = [
        CellInventory(f"cell-{i:03d}", tuple(sorted(rng.sample(pool, 4))), "") for i in range(70)
    ]
    assert diff_plans(base, head, cells, workers=2) == diff_plans(base, head, cells, workers=1)


def test_the_agents_status_file_is_read_by_the_fast_path():
    """The contract end to end: what the agent writes is what the plan reads, quickly."""
    from reconciler.agent.status import container_entries
    from reconciler.status.write import dump_status

    policy = load_folder(REPO / "policies").policy
    containers = [x for cs in CELLS.values() for x in cs]
    plan_ = compile_cell(policy, containers, "cell-x")
    text = dump_status({"cell": "cell-x", "containers": container_entries(plan_), "history": []})
    assert _fast_parts(text, "x") is not None
    assert containers_from_status(text, "refs/heads/status/cell-x") == tuple(sorted(containers))


def test_status_files_parsed_in_workers_read_the_same(tmp_path):
    repo = init_repo(tmp_path / "repo")
    commit_all(repo, "empty")
    stream = []
    for n in range(130):
        text = status_text(
            [c(f"h{n}-{i}", f"198.18.{n}.{i + 2}", BLOG, WEB, MARKETING) for i in range(3)]
        )
        data = text.encode()
        stream.append(
            f"commit refs/heads/status/cell-{n:03d}\n"
            "committer t <t@example.invalid> 1700000000 +0000\ndata 1\nx\n"
            f"M 100644 inline status.yaml\ndata {len(data)}\n{text}\n"
        )
    subprocess.run(
        ["git", "-C", str(repo), "fast-import", "--quiet"],
        input="".join(stream).encode(),
        check=True,
    )
    from reconciler.sources.inventories import StatusBranches

    one = StatusBranches(str(repo), workers=1).cells()
    assert len(one) == 130 and one[0].cell == "cell-000" and len(one[0].containers) == 3
    assert StatusBranches(str(repo), workers=2).cells() == one
