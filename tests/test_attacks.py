"""Attacks on the policy source: each must be refused, reported, and change nothing.

An agent (in-process, so every refusal is cheap to check; its git, signature checks and
kernel are real) with `verify: signed` pulls from a git daemon on loopback and enforces in
a lab namespace.  After each attack the whole filter table is compared with the last
revision the agent accepted, and the status document must name the refusal:

* heads that are unsigned, signed by a key nobody trusts, or carry a signature transplanted
  from a trusted commit onto other content (UnsignedCommit, UntrustedSignature);
* a force-push that rewinds to an older, validly signed revision (a rollback) or rewrites
  history (HistoryRewritten) -- also after a restart and with the cache gone;
* policy pushed to branches the agent must not read: our status branch, another cell's
  agent writing to our status branch, a tag and a branch that shadow `main`;
* symlinks that point out of the policy folder at the revision the agent applies
  (ValidationFailed, naming the link).

test_agent_e2e.py covers the basic unsigned/untrusted/rewind refusals end to end with real
agent processes; this file goes after them the way an attacker would.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from asgctl_lab.netns import Lab
from reconciler.agent.config import build_config
from reconciler.agent.core import condition
from reconciler.agent.loop import SYNC, Agent
from reconciler.agent.state import AgentState
from reconciler.core.cellplan import CellSettings
from reconciler.core.compile import compile_cell
from reconciler.policy.load import load_revision
from reconciler.status.write import StatusWriter
from tests.agentkit import (  # noqa: F401 - fixtures
    PolicyRepo,
    container,
    git_server,
    policy_repo,
    read_status,
    sg,
    ssh_signing_keys,
    tcp_rules,
    write_store,
)
from tests.conftest import require_netns
from tests.faultkit import Checks, Snapshot, expected_snapshot, record, snapshot

pytestmark = [
    pytest.mark.netns,
    pytest.mark.requires("ssh-keygen", "git"),
]

ALLOW_ALL = {"evil.yaml": sg("evil", ["{protocol: all, destination: 0.0.0.0/0}"])}
GOOD = {"web.yaml": sg("web", tcp_rules(5))}
BETTER = {"web.yaml": sg("web", tcp_rules(6))}
UNDERLAY = "uplink0"
ON_UNDERLAY = CellSettings((UNDERLAY,), (UNDERLAY,))


class Cell:
    """One agent and its namespace, with the checks every attack ends with."""

    def __init__(self, tmp_path: Path, lab: Lab, repo: PolicyRepo, allowed: Path) -> None:
        self.tmp_path = tmp_path
        self.lab = lab
        self.repo = repo
        self.containers = tuple(container(f"c{i}", i) for i in range(4))
        self.store = write_store(tmp_path / "store.json", list(self.containers))
        self.allowed = allowed
        self.foreign, _ = snapshot(lab.cell, "legacy")
        self.agent = self.new_agent()
        self.refusals: list[str] = []
        self.checks = Checks()

    def config(self, **more: Any) -> Any:
        settings = {
            "source": self.repo.url,
            "cell": "cell-a",
            "containers": str(self.store),
            "state-dir": str(self.tmp_path / "state"),
            "netns": self.lab.cell,
            "variant": "legacy",
            "verify": "signed",
            "allowed-signers": str(self.allowed),
            "mass-revoke-threshold": "100%",
            "fetch-depth": 1,
            "underlay-interface": UNDERLAY,  # a lab cell without services has no default route
        }
        settings.update(more)
        return build_config(settings, {})

    def new_agent(self, **more: Any) -> Agent:
        """A fresh process, as after a restart: state from state.json, cache from disk."""
        old = getattr(self, "agent", None)
        if old is not None:
            old.source.close()
        return Agent(self.config(**more), out=io.StringIO(), err=io.StringIO())

    def cycle(self) -> AgentState:
        return self.agent.cycle(SYNC)

    def expected(self, sha: str) -> Snapshot:
        result = load_revision(self.repo.root, sha, "policies")
        assert result.ok, result.findings
        plan = compile_cell(result.policy, self.containers, settings=ON_UNDERLAY)
        return expected_snapshot(self.foreign, plan)

    def holds(self, sha: str) -> None:
        """The kernel holds exactly revision `sha`'s plan (and nothing else of ours): one
        check, counted; a broken one fails the test at once (the next attack would start from
        a kernel nobody asked for)."""
        state, raw = snapshot(self.lab.cell, "legacy")
        if not self.checks.check(state == self.expected(sha), f"not {sha}: {raw[-2000:]}"):
            self.checks.held()

    def accepted(self, sha: str) -> dict[str, Any]:
        st = self.cycle()
        ready = condition(st.conditions, "Ready")
        assert ready is not None and ready.status == "True", ready
        assert st.applied is not None and st.applied.sha == sha
        self.holds(sha)
        return self.agent.status_document(st)

    def refused(self, reason: str, head: str, still: str) -> dict[str, Any]:
        """The head `head` is refused for `reason`, reported so, and `still` is enforced."""
        st = self.cycle()
        doc = self.agent.status_document(st)
        conds = {c["type"]: c for c in doc["conditions"]}
        assert conds["Ready"]["status"] == "False", conds["Ready"]
        assert conds["Ready"]["reason"] == reason, conds["Ready"]
        assert f"still enforcing main@sha1:{still}" in conds["Ready"]["message"]
        assert conds["Stalled"]["status"] == "True"
        assert doc["refused"]["reason"] == reason
        assert doc["refused"]["revision"] == f"main@sha1:{head}"
        assert doc["lastAppliedRevision"] == f"main@sha1:{still}"
        self.holds(still)
        self.refusals.append(reason)
        return doc

    def fetched_refs(self) -> list[str]:
        out = git("--git-dir", str(self.agent.source.path), "for-each-ref", "--format=%(refname)")
        return out.split()


@pytest.fixture
def cell(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
) -> Any:
    require_netns()
    lab = make_lab(conntrack=False)
    trusted, stranger, allowed = ssh_signing_keys(tmp_path)
    c = Cell(tmp_path, lab, policy_repo, allowed)
    c.trusted, c.stranger = trusted, stranger  # type: ignore[attr-defined]
    yield c
    c.agent.source.close()


def _forge(repo: PolicyRepo, signed: str, files: dict[str, str]) -> str:
    """A commit with `signed`'s header and signature but the tree of `files`."""
    repo.write(files)
    git("add", "-A", cwd=repo.root)
    tree = git("write-tree", cwd=repo.root)
    raw = git("cat-file", "commit", signed, cwd=repo.root)
    lines = raw.split("\n")
    assert lines[0].startswith("tree ")
    lines[0] = f"tree {tree}"
    forged = git("hash-object", "-t", "commit", "-w", "--stdin", cwd=repo.root,
                 input="\n".join(lines) + "\n")  # fmt: skip
    assert forged != signed and "gpgsig" in git("cat-file", "commit", forged, cwd=repo.root)
    return forged


def _push(repo: PolicyRepo, sha: str, ref: str = "refs/heads/main", force: bool = True) -> None:
    git("push", "-q", *(["--force"] if force else []), repo.url, f"{sha}:{ref}", cwd=repo.root)


def test_unsigned_untrusted_and_forged_heads_are_refused(cell: Any) -> None:
    repo: PolicyRepo = cell.repo
    good = repo.commit("good", GOOD, sign_with=cell.trusted)
    cell.accepted(good)

    # Unsigned, with the trusted person's name on it.
    git("config", "user.name", "ops", cwd=repo.root)
    git("config", "user.email", "ops@example.invalid", cwd=repo.root)
    unsigned = repo.commit("looks like ops", ALLOW_ALL)
    doc = cell.refused("UnsignedCommit", unsigned, good)
    assert {c["type"]: c for c in doc["conditions"]}["SourceVerified"]["status"] == "False"

    # Signed, by a key that is not in allowed_signers.
    stranger = repo.commit("stranger", ALLOW_ALL, sign_with=cell.stranger)
    cell.refused("UntrustedSignature", stranger, good)

    # A trusted commit's signature transplanted onto an allow-all tree (parent unchanged,
    # so the ancestry check would pass: only the signature stands in the way).
    repo.reset(good)
    benign = repo.commit("benign", BETTER, sign_with=cell.trusted, push=False)
    forged = _forge(repo, benign, ALLOW_ALL)
    _push(repo, forged)
    doc = cell.refused("UntrustedSignature", forged, good)
    assert "not by a trusted key" in doc["refused"]["message"]

    # The real commit is fine; the trust list is what decides, not the content.
    _push(repo, benign)
    cell.accepted(benign)
    record("attacks-signatures", refused=cell.refusals, **cell.checks.held())


def test_rollbacks_and_rewrites_are_refused_also_after_a_restart(cell: Any) -> None:
    repo: PolicyRepo = cell.repo
    old = repo.commit("old: 5 rules", GOOD, sign_with=cell.trusted)
    cell.accepted(old)
    new = repo.commit("new: 6 rules", BETTER, sign_with=cell.trusted)
    cell.accepted(new)

    # Roll back to an older, validly signed revision (a replay of a real signature).
    _push(repo, old)
    cell.refused("HistoryRewritten", old, new)

    # Rewrite: a new signed commit that does not descend from what is applied.
    repo.reset(old)
    rewritten = repo.commit("rewritten", ALLOW_ALL, sign_with=cell.trusted, push=False)
    _push(repo, rewritten)
    cell.refused("HistoryRewritten", rewritten, new)

    # A restart keeps the applied revision (state.json) and so keeps refusing...
    cell.agent = cell.new_agent()
    cell.refused("HistoryRewritten", rewritten, new)
    # ...also when the cache is gone and the first fetch is shallow (it unshallows to prove
    # the negative instead of giving up).
    cell.agent.source.close()
    shutil.rmtree(cell.tmp_path / "state" / "cache.git")
    cell.agent = cell.new_agent()
    cell.refused("HistoryRewritten", rewritten, new)

    # Only an operator's explicit setting lets a rewind through.
    cell.agent = cell.new_agent(**{"allow-rewind": True})
    cell.accepted(rewritten)
    record("attacks-rewind", refused=cell.refusals, **cell.checks.held())


def test_policy_on_other_branches_and_refs_is_never_read(
    cell: Any,
    git_server: GitDaemon,  # noqa: F811
) -> None:
    """The agent reads policy from the configured branch only: YAML pushed to our status
    branch, by another cell's agent to our status branch, to a tag called `main` or to a
    branch `status/main` changes nothing; our next status push takes our branch back."""
    repo: PolicyRepo = cell.repo
    good = repo.commit("good", GOOD, sign_with=cell.trusted)
    cell.accepted(good)
    doc = cell.agent.status_document(cell.agent.state)
    assert cell.agent.pusher is not None and cell.agent.pusher.push_now().ok

    # An allow-all tree, signed by the trusted key: on any other ref it must not count.
    repo.reset(good)
    evil = repo.commit("allow everything", ALLOW_ALL, sign_with=cell.trusted, push=False)
    refs = ("refs/heads/status/cell-a", "refs/tags/main", "refs/heads/status/main")
    for ref in refs:
        _push(repo, evil, ref)
    # Another cell's agent, writing (its own kind of document plus policy) to our branch.
    intruder = StatusWriter(repo.url, "status/cell-a", cell.tmp_path / "intruder.git")
    intruder.push("cell: cell-a\npolicies: {evil.yaml: allow all}\n", "status cell-b")
    assert read_status(repo.bare, "cell-a") == {
        "cell": "cell-a",
        "policies": {"evil.yaml": "allow all"},
    }

    for agent in (cell.agent, cell.new_agent()):
        cell.agent = agent
        st = cell.cycle()
        assert st.applied is not None and st.applied.sha == good
        ready = condition(st.conditions, "Ready")
        assert ready is not None and ready.status == "True"
        cell.holds(good)
        assert cell.fetched_refs() == ["refs/remotes/origin/main"]
    assert cell.agent.pusher is not None
    cell.agent.pusher.offer(cell.agent.status_document(cell.agent.state))
    assert cell.agent.pusher.push_now().ok
    ours = read_status(repo.bare, "cell-a")
    assert ours is not None and ours["lastAppliedRevision"] == doc["lastAppliedRevision"]
    assert git("--git-dir", str(repo.bare), "ls-tree", "--name-only", "status/cell-a") == (
        "status.yaml"
    )
    record("attacks-other-refs", refs_tried=len(refs) + 1, **cell.checks.held())


def test_symlinks_out_of_the_policy_tree_are_refused(cell: Any, tmp_path: Path) -> None:
    repo: PolicyRepo = cell.repo
    outside = tmp_path / "host-evil.yaml"  # a file on the cell itself, full of policy
    outside.write_text(ALLOW_ALL["evil.yaml"])
    good = repo.commit("good", GOOD, sign_with=cell.trusted)
    cell.accepted(good)
    (repo.root / "secret.yaml").write_text(ALLOW_ALL["evil.yaml"])  # in the repo, not policies/
    links = {
        "absolute": str(outside),
        "up-and-out": "../secret.yaml",
        "far-up": "../../../../../../../../etc/passwd",
        "dot-dot-inside": "sub/../../secret.yaml",
    }
    refused = 0
    last = good
    for name, target in links.items():
        link = repo.root / "policies" / f"{name}.yaml"
        link.symlink_to(target)
        head = repo.commit(f"symlink {name}", None, sign_with=cell.trusted)
        doc = cell.refused("ValidationFailed", head, last)
        assert any(
            f"policies/{name}.yaml" in f and "outside the policy tree" in f
            for f in doc["refused"]["findings"]
        ), doc["refused"]["findings"]
        refused += 1
        link.unlink()  # fixed forward, as a reviewer would
        last = repo.commit(f"remove {name}", None, sign_with=cell.trusted)
        cell.accepted(last)
    # A loop of links: refused.
    (repo.root / "policies" / "a.yaml").symlink_to("b.yaml")
    (repo.root / "policies" / "b.yaml").symlink_to("a.yaml")
    loop = repo.commit("loop", None, sign_with=cell.trusted)
    doc = cell.refused("ValidationFailed", loop, last)
    assert any("too many levels" in f for f in doc["refused"]["findings"])
    refused += 1
    for name in ("a.yaml", "b.yaml"):
        (repo.root / "policies" / name).unlink()
    # A link to a folder on the host is not a policy file (never read); a link inside is.
    (repo.root / "policies" / "more").symlink_to(str(tmp_path))
    (repo.root / "policies" / "linked.txt").write_text(sg("linked", tcp_rules(1, net=9)))
    (repo.root / "policies" / "linked.yaml").symlink_to("linked.txt")
    dir_link = repo.commit("a folder link and a good link", None, sign_with=cell.trusted)
    cell.accepted(dir_link)
    plan = cell.agent.state.applied.plan
    names = {s.name for g in plan.groups for r in g.rules for s in r.sources}
    assert names == {"web", "linked"}, names
    record("attacks-symlinks", refused=refused, **cell.checks.held())
