"""The status-branch contract's names (`reconciler.status.branch`) and its writer and reader
agreeing through them, on real repositories."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.core.model import Container
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import (
    STATUS_FILE,
    StatusBranchError,
    blob_spec,
    branch_for,
    cell_of_ref,
    choose_refs,
    status_refs,
)
from reconciler.status.document import CLAIM_TRAILER, Claim, claim_of_trailers
from reconciler.status.read import has_status_branches, read_fleet_containers
from reconciler.status.write import StatusWriter, commit_message, dump_status
from tests.policyrepo import commit_all, git, init_repo

C1 = Container("h-1", "198.18.0.2", "app-1", "space-1", "org-1", "", "app")


def _status_text(cell: str, containers: list[Container]) -> str:
    entries = [
        {
            "handle": c.handle,
            "ip": c.ip,
            "app_id": c.app_id,
            "space_id": c.space_id,
            "org_id": c.org_id,
            "workload": c.workload,
        }
        for c in containers
    ]
    return dump_status({"apiVersion": "asgctl.io/v1", "cell": cell, "containers": entries})


def test_branch_names_and_the_cell_they_carry() -> None:
    assert branch_for("cell-1") == "status/cell-1"
    assert branch_for("cell-1", "fleet/") == "fleet/cell-1"
    assert blob_spec("refs/heads/status/c") == f"refs/heads/status/c:{STATUS_FILE}"
    assert cell_of_ref("refs/heads/status/c1") == "c1"
    assert cell_of_ref("refs/remotes/up/status/c1") == "c1"
    assert cell_of_ref("refs/remotes/up/main") is None
    assert cell_of_ref("refs/heads/main") is None
    assert cell_of_ref("refs/tags/status/c1") is None


def test_what_the_agents_pushed_wins_over_a_local_branch() -> None:
    """Remotes are what the agents pushed; a local `status/<cell>` branch may be stale."""
    refs = [
        "refs/heads/status/a",
        "refs/remotes/zz/status/a",
        "refs/remotes/origin/status/a",
        "refs/heads/status/b",
        "refs/remotes/up/status/b",
        "refs/remotes/aa/status/b",
        "refs/heads/status/c",
        "refs/heads/main",
    ]
    assert choose_refs(refs) == {
        "a": "refs/remotes/origin/status/a",
        "b": "refs/remotes/aa/status/b",
        "c": "refs/heads/status/c",
    }


def test_refs_are_listed_from_any_folder_of_the_work_tree(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "repo")
    (repo / "policies").mkdir()
    head = commit_all(repo, "c0")
    git(repo, "update-ref", "refs/heads/status/a", head)
    git(repo, "update-ref", "refs/remotes/origin/status/b", head)
    git(repo, "update-ref", "refs/heads/feature", head)
    assert status_refs(repo / "policies") == {
        "a": "refs/heads/status/a",
        "b": "refs/remotes/origin/status/b",
    }
    assert has_status_branches(repo)


def test_outside_a_repository_there_is_nothing_to_read(tmp_path: Path) -> None:
    with pytest.raises(StatusBranchError, match="not in a git repository"):
        status_refs(tmp_path)
    assert not has_status_branches(tmp_path)
    with pytest.raises(InventoryError, match="not in a git repository"):
        read_fleet_containers(tmp_path)


def test_what_the_writer_pushes_the_fleet_reader_reads(tmp_path: Path) -> None:
    """The agent's writer and the plan's reader name branch and file through one module: a
    pushed status is read back as the same containers, and a branch with an unusable cell
    name is skipped with a message, not read."""
    server = tmp_path / "server.git"
    git(tmp_path, "init", "-q", "--bare", str(server))
    StatusWriter(str(server), branch_for("cell-1"), tmp_path / "w1.git").push(
        _status_text("cell-1", [C1]), "status cell-1"
    )
    StatusWriter(str(server), branch_for("cell-2"), tmp_path / "w2.git").push(
        _status_text("cell-2", []), "status cell-2"
    )
    StatusWriter(str(server), branch_for("-bad"), tmp_path / "w3.git").push(
        _status_text("-bad", [C1]), "status -bad"
    )
    found = read_fleet_containers(server)
    assert [(c.cell, c.ref, c.containers) for c in found.cells] == [
        ("cell-1", "refs/heads/status/cell-1", (C1,)),
        ("cell-2", "refs/heads/status/cell-2", ()),
    ]
    (skipped,) = found.skipped
    assert skipped.startswith("refs/heads/status/-bad: cell name '-bad' must match")


def test_the_writer_refuses_a_branch_outside_the_contract(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a status/ branch"):
        StatusWriter(str(tmp_path / "s.git"), "main", tmp_path / "w.git")


A = "main@sha1:" + "a" * 40


@pytest.mark.parametrize(
    ("applied", "stated"),
    [
        (A, A),
        ("", "none"),  # nothing applied, spelled out
        ("none", "'none'"),  # the text `none` itself, quoted: the spelling means one thing
        ("it's: x", "'it''s: x'"),  # the document's own single-quoted spelling
    ],
)
def test_the_agents_status_commit_states_its_claim_in_a_trailer_git_reads(
    tmp_path: Path, applied: str, stated: str
) -> None:
    # The subject is what it was; the claim is the message's last paragraph, after a blank
    # line, so git's own trailer parser (interpret-trailers, for-each-ref) reads it.
    server = tmp_path / "server.git"
    git(tmp_path, "init", "-q", "--bare", str(server))
    doc = {
        "apiVersion": "asgctl.io/v1",
        "cell": "cell-1",
        "lastAppliedRevision": applied,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Applied"}],
        "containers": [],
    }
    StatusWriter(str(server), branch_for("cell-1"), tmp_path / "w.git").push(
        dump_status(doc), commit_message(doc)
    )
    ref = "refs/heads/status/cell-1"
    assert git(server, "log", "-1", "--format=%s", ref) == (
        f"status cell-1: Ready=True (Applied), {applied or 'nothing applied'}"
    )
    message = git(server, "log", "-1", "--format=%B", ref)
    parsed = subprocess.run(
        ["git", "interpret-trailers", "--parse"],
        input=message,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert parsed == f"{CLAIM_TRAILER}: {stated}\n"
    fmt = f"--format=%(trailers:key={CLAIM_TRAILER},valueonly)"
    assert git(server, "for-each-ref", fmt, ref) == stated
    assert claim_of_trailers((f"{CLAIM_TRAILER}: {stated}",), cut=False) == Claim(applied)
    # And the fleet reader takes that claim from the commit: in the server's own refs, and
    # in a clone's (refs/remotes/origin/status/*), as `asgctl plan` reads its checkout.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(server), str(clone))
    git(clone, "fetch", "-q", "origin", "+refs/heads/status/*:refs/remotes/origin/status/*")
    for repo in (server, clone / "policies"):
        repo.mkdir(exist_ok=True)
        found = read_fleet_containers(repo)
        assert found.claims == {"cell-1": applied} and not found.unusable


@pytest.mark.parametrize("applied", ["x" * 2000, "main\x1b[31m@sha1:x"], ids=["long", "escape"])
def test_a_revision_no_trailer_can_hold_is_left_to_the_document(
    tmp_path: Path, applied: str
) -> None:
    # Over the bytes the reader keeps of a trailer, or outside the one-line grammar: the
    # commit states no claim at all (never a cut or escaped one), and the reader takes the
    # document's first bytes, as for an older agent's commit.
    doc = {"cell": "cell-1", "lastAppliedRevision": applied, "conditions": []}
    message = commit_message(doc)
    assert CLAIM_TRAILER not in message and "\n" not in message
    server = tmp_path / "server.git"
    git(tmp_path, "init", "-q", "--bare", str(server))
    StatusWriter(str(server), branch_for("cell-1"), tmp_path / "w.git").push(
        dump_status({**doc, "containers": []}), message
    )
    found = read_fleet_containers(server)
    if applied.isprintable():
        assert found.claims == {"cell-1": applied}
    else:  # dumped double-quoted: no claim in the first bytes either
        assert not found.claims and "not a one-line string" in found.unclaimed["cell-1"]
