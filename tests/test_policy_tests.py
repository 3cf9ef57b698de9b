"""`asgctl test`: the PolicyTest assertions a policy repo keeps, checked against the plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from reconciler.cli import main
from reconciler.core.policytest import run_tests
from reconciler.policy.load import load_folder
from tests.policyrepo import commit_all, init_repo, write_tree

REPO = Path(__file__).resolve().parent.parent


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["test", *args], catch_exceptions=False)


def test_the_example_repo_tests_pass_and_validate_clean():
    assert CliRunner().invoke(main, ["validate", str(REPO / "policies")]).output == (
        "0 errors, 0 warnings\n"
    )
    result = run(str(REPO / "policies"))
    assert result.exit_code == 0, result.output
    assert result.output.endswith("29 tests, 29 passed, 0 failures\n")
    scenarios = {t.name.split("[")[0] for t in load_folder(REPO / "policies").policy.tests}
    assert {"payments-mysql", "card-network-api", "platform-dns", "package-mirrors"} <= scenarios


def test_every_case_is_decided_by_the_compiled_plan():
    policy = load_folder(REPO / "policies").policy
    results = {r.test.name: r for r in run_tests(policy)}
    backend = results["payments-mysql[0]"]
    assert backend.passed and backend.subject == "payments/prod/backend (running)"
    assert {m.rule.item.destination.first_address for m in backend.decision.matches} == {
        "198.19.10.10"
    }
    # A space case is a container of that space with no app: space grants only.
    marketing = results["card-network-api[6]"]
    assert marketing.subject == "marketing/web (space, running)" and not marketing.decision.allowed
    # IPv6 endpoints are asked of an IPv6 container.
    assert results["card-network-api[2]"].decision.container.version == 6


def failing_repo(tmp_path: Path) -> Path:
    tree = tmp_path / "policies"
    shutil.copytree(REPO / "policies", tree)
    write_tree(
        tree,
        {
            "tests/wrong.yaml": """
                kind: PolicyTest
                name: wrong-expectations
                cases:
                  - {app: payments/prod/frontend, to: "198.19.10.10:3306", expect: allow}
                  - {space: marketing/web, to: "198.19.53.53:53/udp", expect: deny}
                  - {app: payments/prod/backend, to: "198.19.10.10:3306", expect: allow}
                """
        },
    )
    return tree


def test_a_failure_shows_the_assertion_the_deciding_rules_and_where(tmp_path):
    result = run(str(failing_repo(tmp_path)))
    assert result.exit_code == 1
    out = result.output
    assert out.endswith("32 tests, 30 passed, 2 failures\n")
    where = f"{tmp_path}/policies/tests/wrong.yaml"
    assert (
        f"FAIL - {where}:4 - wrong-expectations[0]: payments/prod/frontend (running) -> "
        "198.19.10.10:3306/tcp: expected allow, got deny"
    ) in out
    assert "no rule allows it" in out
    # An unexpected allow names the rule and the document (file:line) that grants it.
    assert (
        f"FAIL - {where}:5 - wrong-expectations[1]: marketing/web (space, running) -> "
        "198.19.53.53:53/udp: expected deny, got allow"
    ) in out
    assert "SecurityGroup/platform-dns rules[0] (security-groups/platform-dns.yaml:7)" in out
    assert "PASS" not in out
    assert "PASS - " in run("-v", str(failing_repo(tmp_path / "v"))).output


def test_json_and_github_formats(tmp_path):
    tree = failing_repo(tmp_path)
    doc = json.loads(run(str(tree), "--format", "json").output)
    assert (doc["tests"], doc["passed"], doc["failures"]) == (32, 30, 2)
    failed = [r for r in doc["results"] if not r["passed"]]
    assert failed[0]["decision"]["decision"] == "deny"
    github = run(str(tree), "--format", "github").output.splitlines()
    assert github[0].startswith(f"::error file={tmp_path}/policies/tests/wrong.yaml,line=4,")
    assert github[-1] == "32 tests, 30 passed, 2 failures"


def test_tests_at_a_git_revision_and_repo_relative_paths(tmp_path):
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(REPO / "policies", repo / "policies")
    first = commit_all(repo, "passing")
    failing_repo(tmp_path / "x")
    shutil.copy(tmp_path / "x/policies/tests/wrong.yaml", repo / "policies/tests/wrong.yaml")
    commit_all(repo, "failing")
    assert run(str(repo / "policies"), "--rev", first).exit_code == 0
    head = run(str(repo / "policies"), "--rev", "HEAD")
    assert head.exit_code == 1
    assert "FAIL - policies/tests/wrong.yaml:4 - " in head.output


def test_invalid_policy_is_refused_before_testing(tmp_path):
    tree = failing_repo(tmp_path)
    (tree / "tests/wrong.yaml").write_text(
        "kind: PolicyTest\nname: bad\ncases:\n  - {app: nope/nope/nope, to: '1.2.3.4:1', "
        "expect: allow}\n"
    )
    result = CliRunner().invoke(main, ["test", str(tree)])
    assert result.exit_code == 1
    assert "app 'nope/nope/nope' is not in the directory" in result.output
