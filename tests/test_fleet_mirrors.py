"""The read-mirror tier (docs/fleet.md): agents fetch the policy from plain git mirrors.

A fleet's policy fetches can be spread over N mirrors of the policy repository, one URL per
group of cells (the agent's ordinary `source`); the primary keeps taking merges and status.
A mirror is kept by the shipped scripts of deploy/mirrors: the primary's `post-receive`
pushes every changed policy branch to each mirror before the merge's push returns (no lag),
and `fetch-from-primary`, run periodically on the mirror, catches up after a failed push
(lag: its period).  Both run here for real, between two `git daemon`s on loopback.

A mirror is a git server, and the git server is untrusted: a mirror that lags, is restored
from an old backup, sits behind a load balancer next to a fresher one, or is controlled by an
attacker can serve a head older than, or unrelated to, what the cell enforces.  The agent's
existing rule holds there as everywhere: a head that does not descend from the applied
revision is refused (HistoryRewritten) and the kernel keeps what it enforces, unless the
operator set `allow-rewind`.  Also when a cell group is re-pointed from the primary to a
mirror that is still behind: the head it serves is the applied revision's own past.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from reconciler.agent.conditions import (
    FALSE,
    HISTORY_REWRITTEN,
    RECONCILIATION_SUCCEEDED,
    TRUE,
    UNSIGNED_COMMIT,
    UNTRUSTED_SIGNATURE,
)
from reconciler.agent.config import AgentConfig
from reconciler.agent.loop import SYNC, Agent
from reconciler.agent.state import AgentState
from reconciler.status.write import StatusWriter
from tests.agentkit import PolicyRepo, sg, ssh_signing_keys, tcp_rules
from tests.test_agent_loop import MemoryDataplane
from tests.test_agent_source_change import _cfg, _ready

pytestmark = pytest.mark.requires("git")

MIRRORS = Path(__file__).resolve().parent.parent / "deploy" / "mirrors"
HOOK = MIRRORS / "post-receive"
FETCH = MIRRORS / "fetch-from-primary"


@dataclass
class Tier:
    """A primary and one mirror, each its own git daemon; `repo` pushes to the primary."""

    primary: GitDaemon
    mirror: GitDaemon
    primary_bare: Path
    mirror_bare: Path
    repo: PolicyRepo

    @property
    def mirror_url(self) -> str:
        return self.mirror.url("policy")

    def mirror_head(self, branch: str = "main") -> str:
        return git("--git-dir", str(self.mirror_bare), "rev-parse", f"refs/heads/{branch}")

    def mirror_refs(self) -> list[str]:
        out = git("--git-dir", str(self.mirror_bare), "for-each-ref", "--format=%(refname)")
        return out.split()

    def hook(self) -> None:
        """Install the shipped post-receive in the primary, pushing to the mirror."""
        shutil.copy(HOOK, self.primary_bare / "hooks" / "post-receive")
        git(
            "--git-dir", str(self.primary_bare), "config", "--add", "asgctl.mirror", self.mirror_url
        )

    def fetch_from_primary(self) -> None:
        """One run of the shipped periodic catch-up, as cron would run it on the mirror."""
        subprocess.run(
            [str(FETCH), str(self.mirror_bare), self.primary.url("policy")],
            check=True,
            capture_output=True,
            text=True,
        )

    def serve_on_mirror(self, sha: str) -> None:
        """The mirror's main set to `sha` (a mirror restored from a backup, or an attacker
        who controls it): it serves whatever its refs say."""
        git("--git-dir", str(self.mirror_bare), "update-ref", "refs/heads/main", sha)


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[Tier]:
    primary, mirror = GitDaemon(tmp_path / "primary"), GitDaemon(tmp_path / "mirror")
    try:
        primary.start()
        mirror.start()
        primary_bare = primary.create("policy")
        repo = PolicyRepo(tmp_path / "work", primary.url("policy"), primary_bare)
        yield Tier(primary, mirror, primary_bare, mirror.create("policy"), repo)
    finally:
        primary.stop()
        mirror.stop()


def _rules(n: int) -> dict[str, str]:
    """n tcp rules: 198.19.1.i port 1000+i for i in 1..n (tcp_rules)."""
    return {"sg.yaml": sg("web", tcp_rules(n))}


def _granted(n: int) -> set[tuple[str, str]]:
    return {(f"198.19.1.{i}", str(1000 + i)) for i in range(1, n + 1)}


_ACCEPT = re.compile(r"-d (\S+)/32 -p tcp -m tcp --dport (\d+) .* -j ACCEPT")


def allowed(dp: MemoryDataplane) -> set[tuple[str, str]]:
    """(destination, port) pairs the dataplane accepts, in any chain."""
    return {
        m.groups() for rules in dp.chains[4].values() for r in rules if (m := _ACCEPT.search(r))
    }


class Kernel(MemoryDataplane):
    """A kernel in a dict that installs the ruleset each transaction was computed for (the
    agent also renders the previous plan, so "the last rendered" is not always the one)."""

    def delta(self, desired, observed, last, *, heal_drift=True):  # type: ignore[no-untyped-def]
        self.rendered[observed.family] = desired
        return super().delta(desired, observed, last, heal_drift=heal_drift)


class Cell:
    """An agent in-process on a kernel in a dict; `restart` is a new process (state from
    state.json, cache from disk), possibly with another configuration."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.dp = Kernel()
        self.agent = self._new(cfg)

    def _new(self, cfg: AgentConfig) -> Agent:
        return Agent(cfg, out=io.StringIO(), err=io.StringIO(), backend=self.dp)

    def sync(self) -> AgentState:
        return self.agent.cycle(SYNC)

    def restart(self, cfg: AgentConfig) -> AgentState:
        self.agent.source.close()
        self.agent = self._new(cfg)
        return self.sync()


# -- freshness ----------------------------------------------------------------------------------


def test_with_the_hook_a_merge_is_on_the_mirror_when_its_push_returns(
    tmp_path: Path, tier: Tier
) -> None:
    """The hook's freshness is the push itself: once the merge's push has returned, the
    mirror serves the new head, and an agent whose source is the mirror applies it."""
    tier.hook()
    cell = Cell(_cfg(tmp_path, tier.mirror_url))
    for n in (3, 4):
        sha = tier.repo.commit(f"{n} rules", _rules(n))
        assert tier.mirror_head() == sha  # no lag: the push waited for the mirror
        st = cell.sync()
        assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
        assert st.applied is not None and st.applied.sha == sha
        assert allowed(cell.dp) == _granted(n)
    # Only policy branches are mirrored: a status push to the primary does not reach it.
    writer = StatusWriter(tier.primary.url("policy"), "status/cell-a", tmp_path / "status")
    writer.push("cell: cell-a\n", "status cell-a")
    assert tier.mirror_refs() == ["refs/heads/main"]


def test_a_branch_deleted_on_the_primary_is_deleted_on_the_mirror(tier: Tier) -> None:
    tier.hook()
    tier.repo.commit("rules", _rules(3))
    git("push", "-q", tier.repo.url, "main:refs/heads/canary", cwd=tier.repo.root)
    assert tier.mirror_refs() == ["refs/heads/canary", "refs/heads/main"]
    git("push", "-q", tier.repo.url, ":refs/heads/canary", cwd=tier.repo.root)
    assert tier.mirror_refs() == ["refs/heads/main"]


def test_a_mirror_the_hook_cannot_reach_lags_until_its_periodic_fetch(
    tmp_path: Path, tier: Tier
) -> None:
    """The hook's failure is not the merge's: the push to the primary succeeds and says
    which mirror lags; the agent on that mirror keeps the last head it saw (no error), and
    the mirror's next `fetch-from-primary` ends the lag -- its period is the freshness."""
    tier.hook()
    cell = Cell(_cfg(tmp_path, tier.mirror_url))
    first = tier.repo.commit("3 rules", _rules(3))
    cell.sync()
    tier.mirror.stop()
    second = tier.repo.commit("4 rules", _rules(4), push=False)
    pushed = subprocess.run(
        ["git", "push", tier.repo.url, "main"],
        cwd=tier.repo.root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "asgctl-mirror: mirror 1 was not updated" in pushed.stderr
    assert tier.mirror_url not in pushed.stderr  # a URL may carry credentials
    tier.mirror.start()
    assert tier.mirror_head() == first
    st = cell.sync()
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and st.applied.sha == first
    tier.fetch_from_primary()
    assert tier.mirror_head() == second
    st = cell.sync()
    assert st.applied is not None and st.applied.sha == second
    assert allowed(cell.dp) == _granted(4)


def test_the_periodic_fetch_takes_policy_branches_only(tier: Tier, tmp_path: Path) -> None:
    """A mirror kept by `fetch-from-primary` alone: the primary's status branches are neither
    fetched nor, when the mirror has some of its own, pruned; deleted policy branches are."""
    tier.repo.commit("rules", _rules(3))
    git("push", "-q", tier.repo.url, "main:refs/heads/canary", cwd=tier.repo.root)
    StatusWriter(tier.primary.url("policy"), "status/cell-a", tmp_path / "a").push("a\n", "a")
    tier.fetch_from_primary()
    assert tier.mirror_refs() == ["refs/heads/canary", "refs/heads/main"]
    git("push", "-q", tier.repo.url, ":refs/heads/canary", cwd=tier.repo.root)
    StatusWriter(tier.mirror_url, "status/cell-b", tmp_path / "b").push("b\n", "b")
    tier.fetch_from_primary()
    assert tier.mirror_refs() == ["refs/heads/main", "refs/heads/status/cell-b"]


# -- attacks: a mirror is an untrusted git server --------------------------------------------------


def test_a_mirror_serving_an_older_commit_never_rewinds_the_agent(
    tmp_path: Path, tier: Tier
) -> None:
    """A lagging replica behind the cell group's URL, or a mirror restored from last week's
    backup, serves a head the cell has already moved past: refused as a rewind, also after a
    restart, the kernel untouched, until the mirror serves the applied revision again."""
    tier.hook()
    cfg = _cfg(tmp_path, tier.mirror_url)
    cell = Cell(cfg)
    older = tier.repo.commit("3 rules", _rules(3))
    cell.sync()
    applied = tier.repo.commit("revoke one: 2 rules", _rules(2))
    st = cell.sync()
    assert st.applied is not None and st.applied.sha == applied
    assert allowed(cell.dp) == _granted(2)

    tier.serve_on_mirror(older)  # the revoked rule, back from the mirror
    for st in (cell.sync(), cell.restart(cfg)):
        assert _ready(st) == (FALSE, HISTORY_REWRITTEN)
        assert st.head is not None and st.head.sha == older
        assert st.applied is not None and st.applied.sha == applied
        assert allowed(cell.dp) == _granted(2)

    tier.fetch_from_primary()  # the mirror catches up
    st = cell.sync()
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and st.applied.sha == applied
    assert allowed(cell.dp) == _granted(2)

    # Only the operator's explicit setting lets a mirror's older head through.
    tier.serve_on_mirror(older)
    st = cell.restart(_cfg(tmp_path, tier.mirror_url, **{"allow-rewind": True}))
    assert st.applied is not None and st.applied.sha == older
    assert allowed(cell.dp) == _granted(3)


def test_a_mirror_serving_another_history_is_refused_the_same_way(
    tmp_path: Path, tier: Tier
) -> None:
    """A mirror whose main is a history of its own (an attacker's root commit that opens
    everything) is not a descendant of what the cell enforces: refused, kernel untouched."""
    tier.hook()
    cell = Cell(_cfg(tmp_path, tier.mirror_url))
    applied = tier.repo.commit("3 rules", _rules(3))
    cell.sync()

    evil = PolicyRepo(tmp_path / "evil", tier.mirror_url, tier.mirror_bare)
    forged = evil.commit(
        "open everything",
        {"sg.yaml": sg("web", ["{protocol: all, destination: 0.0.0.0/0}"])},
        push=False,
    )
    evil.push(force=True)
    assert tier.mirror_head() == forged
    st = cell.sync()
    assert _ready(st) == (FALSE, HISTORY_REWRITTEN)
    assert st.applied is not None and st.applied.sha == applied
    assert allowed(cell.dp) == _granted(3)
    assert not any("0.0.0.0/0" in r for rules in cell.dp.chains[4].values() for r in rules)


def test_a_cell_group_repointed_to_a_mirror_that_is_behind_does_not_rewind(
    tmp_path: Path, tier: Tier
) -> None:
    """Cells that fetched from the primary are moved to a mirror (a new `source`) that has
    not caught up: it serves the applied revision's own past.  A new source without the
    applied commit is otherwise a fresh start (another repository), but a head that the
    cell's kept history shows to be an ancestor of the applied revision is a rewind, and is
    refused; once the mirror has caught up, the cell carries on from where it stands."""
    older = tier.repo.commit("3 rules", _rules(3))
    tier.fetch_from_primary()  # the mirror's last catch-up
    cell = Cell(_cfg(tmp_path, tier.repo.url))
    cell.sync()
    applied = tier.repo.commit("revoke one: 2 rules", _rules(2))
    st = cell.sync()
    assert st.applied is not None and st.applied.sha == applied
    assert tier.mirror_head() == older

    on_mirror = _cfg(tmp_path, tier.mirror_url)
    for st in (cell.restart(on_mirror), cell.sync(), cell.restart(on_mirror)):
        assert _ready(st) == (FALSE, HISTORY_REWRITTEN)
        assert st.applied is not None and st.applied.sha == applied
        assert allowed(cell.dp) == _granted(2)

    tier.fetch_from_primary()
    st = cell.sync()
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and st.applied.sha == applied
    assert allowed(cell.dp) == _granted(2)


def test_a_mirror_adding_commits_on_top_is_stopped_by_signatures_not_by_ancestry(
    tmp_path: Path, tier: Tier
) -> None:
    """What ancestry cannot catch: a mirror that serves a descendant of the applied revision
    with content of its own.  That is what `verify: signed` is for -- run mirrors others
    operate with it (docs/fleet.md): an unsigned or untrusted head is refused, kernel kept."""
    trusted, stranger, signers = ssh_signing_keys(tmp_path)
    tier.hook()
    cfg = _cfg(tmp_path, tier.mirror_url, verify="signed", **{"allowed-signers": str(signers)})
    cell = Cell(cfg)
    applied = tier.repo.commit("3 rules", _rules(3), sign_with=trusted)
    st = cell.sync()
    assert st.applied is not None and st.applied.sha == applied

    on_mirror = PolicyRepo(tmp_path / "mirror-work", tier.mirror_url, tier.mirror_bare)
    git("fetch", "-q", tier.mirror_url, "main", cwd=on_mirror.root)
    git("reset", "-q", "--hard", "FETCH_HEAD", cwd=on_mirror.root)
    opened = {"sg.yaml": sg("web", ["{protocol: all, destination: 0.0.0.0/0}"])}
    for reason, key in ((UNSIGNED_COMMIT, None), (UNTRUSTED_SIGNATURE, stranger)):
        added = on_mirror.commit(f"on top, {reason}", opened, sign_with=key)
        assert tier.mirror_head() == added
        st = cell.sync()
        assert _ready(st) == (FALSE, reason)
        assert st.applied is not None and st.applied.sha == applied
        assert allowed(cell.dp) == _granted(3)
