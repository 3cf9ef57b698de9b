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
        "--lifecycle",
        "running",
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
    [doc] = json.loads(result.output)
    # One store is one unnamed cell: its path is not taken for a cell name.
    assert (doc["cell"], doc["lifecycle"], doc["container"]) == ("", "staging", "c-backend-stg")
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


def two_cells(tmp_path: Path) -> list[str]:
    """The example store split over two cells: backend runs on cell-1, stages on cell-2."""
    store = json.loads(Path(STORE).read_text())
    cells = {
        "cell-1": {h: c for h, c in store.items() if h != "c-backend-stg"},
        "cell-2": {"c-backend-stg": store["c-backend-stg"]},
    }
    args = []
    for cell, entries in cells.items():
        (tmp_path / cell).mkdir()
        (tmp_path / cell / "store.json").write_text(json.dumps(entries))
        args += ["--containers", str(tmp_path / cell / "store.json")]
    return args


def explain_backend(*extra: str):
    return run("explain", "--policies", POLICIES, "--app", "payments/prod/backend", "--to", *extra)


def test_explain_app_gives_a_verdict_per_container_of_every_cell(tmp_path):
    # The package mirrors are bound for staging only: the running instance is denied what
    # its staging container may do, and explain says so for each instead of picking one.
    result = explain_backend("198.19.80.7:443", *two_cells(tmp_path))
    assert result.exit_code == 3, result.output
    blocks = result.output.split("\n\n")
    assert [b.splitlines()[:2] for b in blocks[:2]] == [
        [
            "on cell cell-1:",
            "DENY c-backend-1 (payments/prod/backend, running) -> 198.19.80.7:443/tcp",
        ],
        [
            "on cell cell-2:",
            "ALLOW c-backend-stg (payments/prod/backend, staging) -> 198.19.80.7:443/tcp",
        ],
    ]
    assert "SecurityGroup/package-mirrors rules[0]" in blocks[1]
    assert blocks[2] == "2 containers: 1 allowed, 1 denied\n"


def test_explain_lifecycle_narrows_and_the_exit_code_follows_the_verdicts(tmp_path):
    cells = two_cells(tmp_path)
    staging = explain_backend("198.19.80.7:443", *cells, "--lifecycle", "staging")
    assert staging.exit_code == 0, staging.output
    assert staging.output.startswith("on cell cell-2:\nALLOW c-backend-stg ")
    assert "containers:" not in staging.output  # one verdict, no tally
    running = explain_backend("198.19.80.7:443", *cells, "--lifecycle", "running")
    assert running.exit_code == 3 and "c-backend-stg" not in running.output
    # The MySQL grant is for the running lifecycle: allowed there, denied while staging.
    mysql = explain_backend("198.19.10.10:3306", *cells)
    assert mysql.exit_code == 3
    heads = [line for line in mysql.output.splitlines() if line.startswith(("ALLOW", "DENY"))]
    assert [h.split(" ")[:2] for h in heads] == [
        ["ALLOW", "c-backend-1"],
        ["DENY", "c-backend-stg"],
    ]


def test_explain_json_is_a_list_with_cell_and_lifecycle(tmp_path):
    result = explain_backend("198.19.10.10:3306", *two_cells(tmp_path), "--format", "json")
    assert result.exit_code == 3
    docs = json.loads(result.output)
    assert [(d["cell"], d["container"], d["lifecycle"], d["decision"]) for d in docs] == [
        ("cell-1", "c-backend-1", "running", "allow"),
        ("cell-2", "c-backend-stg", "staging", "deny"),
    ]


def test_explain_tasks_are_running_containers_that_task_narrows_to():
    blog = ["--app", "marketing/web/blog", "--to", "[fd00::1]:443"]
    base = ["explain", "--containers", STORE, "--policies", POLICIES, *blog]
    running = run(*base, "--lifecycle", "running")
    assert "c-blog-6 (marketing/web/blog, running)" in running.output
    task = run(*base, "--lifecycle", "task")
    assert task.output == running.output
    staging = run(*base, "--lifecycle", "staging")
    assert staging.exit_code == 1
    assert "app 'marketing/web/blog' has no staging container in the inventory" in (staging.output)


def test_explain_names_a_missing_app_as_typed_not_by_its_guid():
    result = run(
        "explain",
        "--containers",
        STORE,
        "--policies",
        POLICIES,
        "--app",
        "payments/staging/backend",
        "--to",
        "198.19.10.10:3306",
    )
    assert result.exit_code == 1
    assert "app 'payments/staging/backend' has no container in the inventory" in result.output
    assert "a1b2c3d4-0006" not in result.output


def test_explain_refuses_a_cell_given_twice(tmp_path):
    cells = two_cells(tmp_path)
    twice = explain_backend("198.19.80.7:443", *cells, *cells[:2])
    assert twice.exit_code == 1 and "cell 'cell-1' is given twice" in twice.output
