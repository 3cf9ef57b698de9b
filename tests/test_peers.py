"""Reading the other cells' status branches for the waves (`reconciler.agent.peers`), from a
real bare repository: whoever can push a status branch is untrusted, so a bad branch costs
only its own cell (read as not Ready), and a fetch that fails holds the waves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from asgctl_lab.gitserver import git
from reconciler.agent.peers import PeerReader
from reconciler.agent.rollout import CellReport
from reconciler.status.document import MAX_STATUS_BYTES
from reconciler.status.fetch import ReadBudget, StatusRepos
from reconciler.status.write import StatusWriter

pytestmark = pytest.mark.requires("git")

REV = "main@sha1:" + "b" * 40


def _status(cell: str, applied: str, ready: str, reason: str, **extra: object) -> str:
    doc = {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "cell": cell,
        "lastAppliedRevision": applied,
        "observedRevision": REV,
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": ""}],
        **extra,
    }
    return yaml.safe_dump(doc)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[str, Path]:
    bare = tmp_path / "origin.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    return f"file://{bare}", bare


def _push(url: str, tmp_path: Path, branch: str, text: str) -> None:
    StatusWriter(url, branch, tmp_path / f"w-{branch.replace('/', '-')}").push(text, "status")


def test_each_cell_is_read_as_its_status_says(origin: tuple[str, Path], tmp_path: Path) -> None:
    url, _bare = origin
    _push(url, tmp_path, "status/canary-1", _status("canary-1", REV, "True", "Ok"))
    refused = {"revision": REV, "reason": "UnsignedCommit", "message": "", "subject": ""}
    _push(
        url,
        tmp_path,
        "status/canary-2",
        _status("canary-2", "main@sha1:" + "a" * 40, "False", "UnsignedCommit", refused=refused),
    )
    fleet = PeerReader(StatusRepos(url), tmp_path / "peers.git").read()
    assert fleet.error is None
    assert fleet.cells == (
        CellReport("canary-1", REV, REV, "", "True", "Ok"),
        CellReport("canary-2", "main@sha1:" + "a" * 40, REV, REV, "False", "UnsignedCommit"),
    )


def test_a_hostile_branch_costs_only_its_own_cell(origin: tuple[str, Path], tmp_path: Path) -> None:
    url, _bare = origin
    _push(url, tmp_path, "status/good", _status("good", REV, "True", "Ok"))
    _push(url, tmp_path, "status/list", "- a\n- b\n")
    _push(url, tmp_path, "status/bomb", "a: &a [*a, *a]\n" + "b: " + "[" * 100 + "\n")
    _push(url, tmp_path, "status/huge", "x: " + "y" * (MAX_STATUS_BYTES + 10) + "\n")
    _push(url, tmp_path, "status/bad", _status("bad", REV, "True", "Ok", conditions="no"))
    _push(url, tmp_path, "status/nested/x", _status("x", REV, "True", "Ok"))  # no cell name
    fleet = PeerReader(StatusRepos(url), tmp_path / "peers.git").read()
    assert fleet.error is None
    by_cell = {r.cell: r for r in fleet.cells}
    assert set(by_cell) == {"good", "list", "bomb", "huge", "bad"}
    assert by_cell["good"] == CellReport("good", REV, REV, "", "True", "Ok")
    for cell in ("list", "bomb", "huge", "bad"):
        assert by_cell[cell].error and by_cell[cell].ready == "Unknown", by_cell[cell]
    assert "over the limit" in by_cell["huge"].error
    assert "status/bad" in by_cell["bad"].error and "conditions" in by_cell["bad"].error


def test_too_many_branches_or_an_unreachable_source_holds_the_waves(
    origin: tuple[str, Path], tmp_path: Path
) -> None:
    url, _bare = origin
    for i in range(3):
        _push(url, tmp_path, f"status/c{i}", _status(f"c{i}", REV, "True", "Ok"))
    fleet = PeerReader(
        StatusRepos(url), tmp_path / "p1.git", budget=ReadBudget(max_branches=2)
    ).read()
    assert fleet.cells == () and fleet.error.endswith(": 3 status branches, over the limit of 2")
    secret = "http://ops:hunter2@127.0.0.1:9/policy.git"
    fleet = PeerReader(StatusRepos(secret), tmp_path / "p2.git", timeout=10).read()
    assert fleet.cells == () and fleet.error
    assert "hunter2" not in fleet.error


def test_branches_that_are_gone_are_forgotten(origin: tuple[str, Path], tmp_path: Path) -> None:
    url, bare = origin
    for cell in ("a", "b"):
        _push(url, tmp_path, f"status/{cell}", _status(cell, REV, "True", "Ok"))
    reader = PeerReader(StatusRepos(url), tmp_path / "peers.git")
    assert [r.cell for r in reader.read().cells] == ["a", "b"]
    git("--git-dir", str(bare), "update-ref", "-d", "refs/heads/status/b")
    assert [r.cell for r in reader.read().cells] == ["a"]
    refs = git("--git-dir", str(tmp_path / "peers.git"), "for-each-ref", "--format=%(refname)")
    assert refs.split() == ["refs/shards/0/status/a"]
