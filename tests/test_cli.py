"""The command line: render and explain over the example repository."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from reconciler.cli import main
from tests.golden import assert_golden

REPO = Path(__file__).resolve().parent.parent
STORE = str(REPO / "tests/data/example-store.json")
POLICIES = str(REPO / "policies")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_explain_allow_names_the_rule_and_file_line():
    result = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--app",
        "payments/prod/backend",
        "--to",
        "198.19.10.10:3306",
    )
    assert result.exit_code == 0
    assert_golden("explain-allow.txt", result.output)


def test_explain_deny_says_why():
    result = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--app",
        "payments/prod/frontend",
        "--to",
        "198.19.20.20:80",
    )
    assert result.exit_code == 3
    assert_golden("explain-deny.txt", result.output)


def test_explain_by_container_json():
    result = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--container",
        "c-backend-stg",
        "--to",
        "198.19.80.7:443",
        "--format",
        "json",
    )
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["decision"] == "allow"
    assert doc["matches"][0]["rule"]["sources"][0]["name"] == "package-mirrors"


def test_explain_usage_errors():
    assert run("explain", "--containers", STORE, "--to", "1.2.3.4:80").exit_code == 2
    bad = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--container",
        "x",
        "--to",
        "198.19.0.1:99999",
    )
    assert bad.exit_code == 2 and "outside 1-65535" in bad.output
    missing = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--container",
        "ghost",
        "--to",
        "198.19.0.1:80",
    )
    assert missing.exit_code == 1 and "container 'ghost' is not in the inventory" in missing.output


def test_render_refuses_invalid_policy_and_bad_store(tmp_path):
    bad = tmp_path / "p"
    bad.mkdir()
    (bad / "x.yaml").write_text("kind: SecurityGroup\nname: x\nrules: [{protocol: tcp}]\n")
    result = run("render", "--containers", STORE, "--policies", str(bad))
    assert result.exit_code == 1
    assert "x.yaml:3:9: SecurityGroup/x: rules[0]" in result.output
    assert "*filter" not in result.output
    store = tmp_path / "store.json"
    store.write_text('{"c1": {"ip": "198.18.0.2", "metad')  # half-written
    result = run("render", "--containers", str(store), "--policies", POLICIES)
    assert result.exit_code == 1
    assert f"{store}:1:29: not valid JSON: Unterminated string" in result.output
    assert "*filter" not in result.output


def test_render_one_family():
    result = run("render", "--containers", STORE, "--policies", POLICIES, "--family", "6")
    assert result.exit_code == 0
    assert result.output.startswith("*filter\n") and "198.18." not in result.output
