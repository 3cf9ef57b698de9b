"""Names on the command line (issue 15, item 1): explain --to NAME:PORT, asgctl test
assertions by name, render's name sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.core.model import Container
from reconciler.sources.cellstore import store_document
from tests.policyrepo import write_tree

DIRECTORY = """
kind: Directory
orgs:
  - name: pay
    guid: org-1
    spaces:
      - name: prod
        guid: space-1
        apps:
          - {name: api, guid: app-api}
          - {name: web, guid: app-web}
"""
POLICY = """
kind: Destination
name: db
protocol: tcp
ports: 5432
fqdns: [db.lab.example, '*.s3.lab.example']
---
kind: EgressPolicy
name: api-db
source: {type: app, name: pay/prod/api}
destination: db
"""
TESTS = """
kind: PolicyTest
name: by-name
cases:
  - {app: pay/prod/api, to: "db.lab.example:5432", expect: allow}
  - {app: pay/prod/api, to: "db.lab.example:5433", expect: deny}
  - {app: pay/prod/web, to: "db.lab.example:5432", expect: deny}
  - {app: pay/prod/api, to: "x.s3.lab.example:5432", expect: allow}
  - {app: pay/prod/api, to: "a.x.s3.lab.example:5432", expect: deny}
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_tree(tmp_path / "p", {"dir.yaml": DIRECTORY, "db.yaml": POLICY, "t.yaml": TESTS})
    store = {
        **store_document(
            [
                Container("c-api", "198.18.0.2", "app-api", "space-1", "org-1"),
                Container("c-web", "198.18.0.6", "app-web", "space-1", "org-1"),
            ]
        )
    }
    (tmp_path / "store.json").write_text(json.dumps(store))
    return tmp_path


def explain(repo: Path, app: str, to: str):
    return run(
        "explain",
        "--containers",
        str(repo / "store.json"),
        "--policies",
        str(repo / "p"),
        "--app",
        app,
        "--to",
        to,
    )


def test_explain_by_name_allows_the_granted_name_and_port(repo):
    result = explain(repo, "pay/prod/api", "DB.lab.example:5432")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "ALLOW c-api (pay/prod/api, running) -> db.lab.example:5432/tcp"
    assert "(tcp db.lab.example ports 5432):" in lines[1]
    assert lines[2] == "    EgressPolicy/api-db -> Destination/db (db.yaml:7)"
    assert "resolves to" in lines[3]


@pytest.mark.parametrize(
    ("app", "to"),
    [
        ("pay/prod/api", "db.lab.example:5433"),  # never beyond the destination's ports
        ("pay/prod/api", "db.lab.example:53/udp"),  # nor its protocol
        ("pay/prod/web", "db.lab.example:5432"),  # nor to an app not granted it
        ("pay/prod/api", "other.lab.example:5432"),
    ],
)
def test_explain_by_name_denies_what_no_grant_by_name_covers(repo, app, to):
    result = explain(repo, app, to)
    assert result.exit_code == 3, result.output
    assert "no grant by name covers it" in result.output


def test_a_wildcard_grant_allows_exactly_one_more_label(repo):
    result = explain(repo, "pay/prod/api", "b.s3.lab.example:5432")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ALLOW c-api")
    assert "wildcard name rule" in result.output and "*.s3.lab.example" in result.output
    deeper = explain(repo, "pay/prod/api", "a.b.s3.lab.example:5432")
    assert deeper.exit_code == 3, deeper.output


def test_explain_refuses_a_wildcard_or_a_bad_name(repo):
    for to in ("*.s3.lab.example:443", "db_1.lab.example:80"):
        result = explain(repo, "pay/prod/api", to)
        assert result.exit_code == 2, result.output
        assert "--to" in result.output


def test_policy_tests_assert_by_name(repo):
    result = run("test", str(repo / "p"))
    assert result.exit_code == 0, result.output
    assert "5 passed" in result.output, result.output


def test_a_failing_policy_test_by_name_fails(repo):
    (repo / "p" / "t2.yaml").write_text(
        "kind: PolicyTest\nname: wrong\ncases:\n"
        '  - {app: pay/prod/web, to: "db.lab.example:5432", expect: allow}\n'
    )
    result = run("test", str(repo / "p"))
    assert result.exit_code != 0
    assert "db.lab.example:5432/tcp" in result.output


def test_render_shows_the_name_sets(repo):
    result = run("render", "--containers", str(repo / "store.json"), "--policies", str(repo / "p"))
    assert result.exit_code == 0, result.output
    assert "# create asgn4-" in result.output and "(db.lab.example)" in result.output
    assert "(*.s3.lab.example)" in result.output
    assert "-m set --match-set asgn4-" in result.output
