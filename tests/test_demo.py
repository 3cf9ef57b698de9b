"""The demo, end to end: `python -m asgctl_lab.demo` exactly as `make demo` runs it.

What the README promises about the demo is asserted here against its JSON report: the
reachability matrix after each story (taken from real packets), the agents' status branches
naming each revision, the connection held open through everything, and the same container
PIDs at the end.  The pure helpers that edit the policy repo as an operator would are tested
without root; the run itself needs namespaces (skipped without, failing under CI=true).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgctl_lab import demo, platform
from asgctl_lab.nsenter import list_netns
from reconciler.core.policytest import run_tests
from reconciler.policy.load import load_folder
from tests.test_lab_platform import require_lab

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"

# -- the operator's edits (pure) -----------------------------------------------------------


def _docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_remove_document_keeps_the_header_and_the_rest() -> None:
    text = (POLICIES / "destinations.yaml").read_text()
    rest, removed = demo.remove_document(text, "Destination", "mysql")
    assert rest.startswith("# yaml-language-server:")  # the header stays on top
    assert [d["name"] for d in _docs(rest)] == ["metrics"]
    assert _docs(removed) == [d for d in _docs(text) if d["name"] == "mysql"]
    back = demo.append_document(rest, removed)
    assert sorted(d["name"] for d in _docs(back)) == ["metrics", "mysql"]
    with pytest.raises(KeyError):
        demo.remove_document(text, "Destination", "nope")


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "repo"
    (tree / "policies").mkdir(parents=True)
    for f in POLICIES.rglob("*.yaml"):
        target = tree / "policies" / f.relative_to(POLICIES)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.read_text())
    return tree


def test_the_stories_edits_keep_the_repo_valid_and_its_tests_green(tmp_path: Path) -> None:
    """Every revision the demo pushes validates and passes the repo's own PolicyTests."""
    tree = _tree(tmp_path)
    demo.seed_before_story(tree)
    before = load_folder(tree / "policies")
    assert before.ok, before.findings
    assert "mysql" not in {d.name for d in before.policy.destinations}
    assert all(r.passed for r in run_tests(before.policy))

    for path, doc in demo.grant_documents(POLICIES).items():
        file = tree / path
        file.write_text(demo.append_document(file.read_text(), doc))
    story1 = load_folder(tree / "policies")
    assert story1.ok and all(r.passed for r in run_tests(story1.policy))
    for name in ("destinations.yaml", "egress-policies.yaml", "tests/payments.yaml"):
        got = _docs((tree / "policies" / name).read_text())
        want = _docs((POLICIES / name).read_text())
        assert sorted(got, key=str) == sorted(want, key=str), name

    dest = tree / "policies/destinations.yaml"
    dest.write_text(
        demo.edit_document(
            dest.read_text(),
            "Destination",
            "mysql",
            lambda d: d.replace(demo.MYSQL_OLD, demo.MYSQL_NEW),
        )
    )
    metrics = [d for d in _docs(dest.read_text()) if d["name"] == "metrics"]
    assert metrics == [
        d for d in _docs((POLICIES / "destinations.yaml").read_text()) if d["name"] == "metrics"
    ]  # only the mysql document changed

    dns = tree / "policies/security-groups/platform-dns.yaml"
    dns.write_text(
        demo.edit_document(
            dns.read_text(), "SecurityGroup", "platform-dns", demo.add_second_resolver
        )
    )
    (group,) = _docs(dns.read_text())
    assert [r["destination"] for r in group["rules"]][-2:] == [demo.DNS2, demo.DNS2]
    assert group["globally_enabled"] == {"running": True, "staging": True}
    assert load_folder(tree / "policies").ok

    tests = tree / "policies/tests/platform.yaml"  # story 3's edit of its policy test
    tests.write_text(
        tests.read_text().replace(
            f'to: "{demo.DNS2}:53/udp", expect: deny', f'to: "{demo.DNS2}:53/udp", expect: allow'
        )
    )
    # Story 4 takes the backend's grant away again, whatever story 2 made of it.
    for path, kind, name in demo.GRANT:
        file = tree / path
        file.write_text(demo.remove_document(file.read_text(), kind, name)[0])
    story4 = load_folder(tree / "policies")
    assert story4.ok, story4.findings
    assert "mysql" not in {d.name for d in story4.policy.destinations}
    assert all(r.passed for r in run_tests(story4.policy))

    # Story 5 grants the backend the card API by name: no address in the repo, and its
    # policy tests (by name) hold.
    for path, doc in demo.BY_NAME.items():
        file = tree / path
        file.write_text(demo.append_document(file.read_text(), doc))
    story5 = load_folder(tree / "policies")
    assert story5.ok, story5.findings
    (card,) = [d for d in story5.policy.destinations if d.name == "card-network"]
    assert card.fqdns == (demo.CARD_NAME,) and not card.ips
    results = run_tests(story5.policy)
    assert all(r.passed for r in results)
    assert sum(r.test.name.startswith("card-network-by-name") for r in results) == 3


# -- the run -------------------------------------------------------------------------------


def _verdicts(step: dict[str, Any], label: str) -> dict[str, str]:
    return {r["container"]: r["results"][label]["verdict"] for r in step["matrix"]["rows"]}


@pytest.mark.netns
def test_make_demo_tells_the_five_stories(tmp_path: Path) -> None:
    require_lab()
    env = {**os.environ, platform.STATE_ENV: str(tmp_path / "labs")}
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "asgctl_lab.demo",
            "--name",
            "demo-test",
            "--report",
            str(report_file),
            "--timeout",
            "30",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    transcript = run.stdout
    assert run.returncode == 0, transcript[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["ok"] is True
    steps = {s["key"]: s for s in report["steps"]}
    assert list(steps) == [
        "start",
        "story1",
        "story2-before",
        "story2",
        "story3",
        "story4",
        "story5",
    ]
    backends = ["backend-0", "backend-1"]

    # Before the stories: nobody reaches MySQL or the second resolver.
    start = steps["start"]
    assert {_verdicts(start, "mysql")[c] for c in (*backends, "frontend-0")} == {"rejected"}
    assert set(_verdicts(start, "dns-2").values()) == {"rejected"}

    # Story 1: the backend reaches MySQL; the frontend in the same space is rejected by the
    # cell (an ICMP error from its gateway), not merely unanswered.
    s1 = _verdicts(steps["story1"], "mysql")
    assert all(s1[b] == "open" for b in backends)
    assert s1["frontend-0"] == "rejected"
    assert s1["stg-backend-0"] == "rejected" and s1["blog-0"] == "rejected"
    assert {r["handle"] for r in steps["story1"]["changes"]} == set(backends)
    assert all(
        "EgressPolicy/backend-to-mysql" in r["groups_added"] for r in steps["story1"]["changes"]
    )

    # Story 2: with MySQL at both addresses, the new one is closed until the edit; after it,
    # the backend reaches the new address and no longer the old one.
    before = steps["story2-before"]
    assert all(_verdicts(before, "mysql-dc2")[b] == "rejected" for b in backends)
    s2 = steps["story2"]
    assert all(_verdicts(s2, "mysql-dc2")[b] == "open" for b in backends)
    assert all(_verdicts(s2, "mysql")[b] != "open" for b in backends)
    assert _verdicts(s2, "mysql-dc2")["frontend-0"] == "rejected"

    # Story 3: every running container -- and the staging one -- reaches the new resolver,
    # every cell applied the revision, and each container's change was logged.
    s3 = steps["story3"]
    assert set(_verdicts(s3, "dns-2").values()) == {"open"}
    assert set(s3["applied_after"]) == {"cell-1", "cell-2"}
    logged = {r["handle"] for r in s3["changes"]}
    assert logged == {r["container"] for r in s3["matrix"]["rows"]}
    assert all(r["revision"].endswith(s3["revision"]) for r in s3["changes"])

    # Story 4: the backend's MySQL grant goes; the overlay is the network policy's alone at
    # every step, ASG changes or not: the frontend reaches both backends (one across the
    # cells' VXLAN), the blog, with no network policy, is rejected -- CF's chains are in.
    s4 = steps["story4"]
    assert all(_verdicts(s4, "mysql-dc2")[b] == "rejected" for b in backends)
    assert report["cf_layout"] in ("legacy", "nft")
    overlay = {
        "frontend-0->backend-0:8080": "open",
        "frontend-0->backend-1:8080": "open",
        "blog-0->backend-1:8080": "rejected",
    }
    assert all(s["overlay"] == overlay for s in steps.values()), [
        s["overlay"] for s in steps.values()
    ]
    assert all(report["overlay_held"]["checks"]) and report["overlay_held"]["open_at_end"]
    assert len(report["overlay_held"]["checks"]) == len(steps) + 1

    # Story 5: the backend reaches the card API by name; the provider moves the name (the
    # lab's DNS server, not git); the backends reach the new address by name, the old one is
    # rejected after its TTL, and no agent restarted, no commit was made.
    by_name = report["by_name"]
    assert {c: v["verdict"] for c, v in by_name["before"].items()} == {
        "backend-0": "open",
        "backend-1": "open",
        "frontend-0": "rejected",
    }
    assert {v["address"] for v in by_name["before"].values()} == {demo.CARD_OLD}
    assert {c: v["verdict"] for c, v in by_name["after"].items()} == {
        "backend-0": "open",
        "backend-1": "open",
        "frontend-0": "rejected",
    }
    assert {v["address"] for v in by_name["after"].values()} == {demo.CARD_NEW}
    assert by_name["agents_same"] is True
    assert by_name["head_before"] == by_name["head_after"] == steps["story5"]["revision"]
    s5 = steps["story5"]
    assert all(_verdicts(s5, "card-new")[b] == "open" for b in backends)
    assert all(_verdicts(s5, "card-api")[b] == "rejected" for b in backends)
    assert _verdicts(s5, "card-new")["frontend-0"] == "rejected"
    assert set(_verdicts(start, "card-api").values()) == {"rejected"}

    # Nothing restarted, nothing disconnected; the fleet is Ready at the new revision.
    assert report["restarted"] == []
    assert report["held"]["open_at_end"] is True and all(report["held"]["checks"])
    assert len(report["held"]["checks"]) == len(steps) + 1
    assert report["status_exit"] == 0
    for cell in ("cell-1", "cell-2"):
        line = next(ln for ln in report["status_text"].splitlines() if ln.startswith(cell))
        assert "True" in line and s5["revision"][:12] in line

    for marker in (
        "Story 1",
        "Story 2",
        "Story 3",
        "Story 4",
        "Story 5",
        "asgctl lab dns set",
        "asgctl status",
        "Nothing restarted",
    ):
        assert marker in transcript
    # Always torn down.
    lab_id = re.search(r"\(lab (asgl[0-9a-f]{4})\)", transcript)
    assert lab_id is not None
    assert not [n for n in list_netns() if n.startswith(f"{lab_id[1]}-")]
    assert not (tmp_path / "labs" / "demo-test").exists()
    assert report["duration"] < 90
