"""The mass-revoke gate end to end: a real agent, a real git daemon, real iptables in a lab
namespace, and `asgctl plan` against the status branch the agent pushed.

The issue's black-box check, step by step on a one-container cell: a one-rule port swap is
applied (the old gate refused it, "1 of 1"); removing the group the cell depends on for most
of its access is refused, and the plan said so beforehand, naming the trailer; the trailer
lets it through; emptying the cell is refused under the floor too.  Traffic is probed from
the container to the echo service after every step, so "refused" means the kernel kept the
old access, not only that a status said so.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from click.testing import CliRunner

from asgctl_lab.gitserver import git
from asgctl_lab.netns import Lab
from asgctl_lab.probe import Outcome
from reconciler.cli import main
from tests.agentkit import (  # noqa: F401 - fixtures
    AgentProc,
    PolicyRepo,
    agents,
    cond,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    tcp_rules,
)
from tests.conftest import require_netns
from tests.test_agent_e2e import ECHO, WEB, _allow, _rev

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

TRAILER = "Asgctl-Allow-Mass-Revoke"


def _plan(repo: PolicyRepo, base: str, head: str, fmt: str = "markdown") -> str:
    """`asgctl plan` in the policy repo's work tree, against the status branches the agents
    pushed (fetched as a CI checkout would), with the settings each cell reports."""
    git("fetch", "-q", repo.url, "+refs/heads/status/*:refs/remotes/origin/status/*", cwd=repo.root)
    args = ["plan", "--base", base, "--head", head, "--policies", str(repo.root / "policies")]
    result = CliRunner().invoke(main, [*args, "--inventory", "status", "--format", fmt])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_port_swap_applies_and_a_mass_revoke_waits_as_the_plan_said(
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([WEB], [ECHO], conntrack=False)
    echo = lab.services["echo"].ipv4
    cell = "cell-a"
    agent = agents(cell, source=policy_repo.url, containers=str(lab.write_store()), netns=lab.cell)

    def reaches(port: int) -> bool:
        return lab.probe_tcp("web", "echo", port).outcome is Outcome.CONNECTED

    def once(expect_rc: int) -> dict:
        res = agent.once()
        assert res.returncode == expect_rc, res.stderr
        doc = read_status(policy_repo.bare, cell)
        assert doc is not None
        return doc

    # The cell's access: echo on port 80, and a ledger group of 120 rules (198.19.1.0/24).
    ledger = sg("ledger", tcp_rules(120))
    first = policy_repo.commit("echo:80 and the ledger", {**_allow(lab, 80), "l.yaml": ledger})
    doc = once(0)
    assert doc["lastAppliedRevision"] == _rev(first)
    assert doc["source"]["massRevokeMin"] == 100  # reported: the plan judges with it
    assert reaches(80) and not reaches(8080)

    # 1. The database moves port: one rule swapped on a one-container cell.  Nothing is
    #    taken away, the plan names no gate, and the agent applies it.
    swap = policy_repo.commit("echo moves to 8080", {**_allow(lab, 8080), "l.yaml": ledger})
    said = _plan(policy_repo, first, swap)
    assert f"- tcp {echo} port 80" in said and f"+ tcp {echo} port 8080" in said
    assert "Mass-revoke gate" not in said
    doc = once(0)
    assert doc["lastAppliedRevision"] == _rev(swap) and "refused" not in doc
    assert reaches(8080) and not reaches(80)

    # 2. The ledger group goes: 120 of the cell's 121 pairs, over 50% and over the floor of
    #    100.  The plan says so beforehand, with the trailer; the agent refuses and keeps
    #    enforcing the swap.
    drop = policy_repo.commit("retire the ledger", _allow(lab, 8080))
    said = _plan(policy_repo, swap, drop)
    gate = said.split("#### Mass-revoke gate", 1)[1].split("#### Access", 1)[0]
    assert "1 cell would refuse this change" in gate
    assert f"| {cell} | 120 / 121 | 99.2% > 50% and 120 >= 100 |" in gate
    assert f"<code>{TRAILER}: true</code>" in gate
    assert "as each cell reports on its status branch" in gate
    doc = once(1)
    assert ready(doc)["reason"] == "MassRevokeBlocked" and cond(doc, "Stalled")["status"] == "True"
    assert doc["refused"]["revision"] == _rev(drop)
    assert "120 of the cell's 121" in doc["refused"]["message"]
    assert f"'{TRAILER}: true'" in doc["refused"]["message"]
    assert doc["lastAppliedRevision"] == _rev(swap)
    assert reaches(8080)  # the kernel still holds the swap's rules

    # 3. The same tree with the trailer in the merge commit: applied.
    allowed = policy_repo.commit(f"retire the ledger\n\n{TRAILER}: true", _allow(lab, 8080))
    assert "Mass-revoke gate" in _plan(policy_repo, swap, allowed)  # the plan still warns
    doc = once(0)
    assert doc["lastAppliedRevision"] == _rev(allowed) and "refused" not in doc
    assert reaches(8080)

    # 4. The last rule goes: 1 pair, far under the floor, but the cell's access goes to
    #    nothing, which the floor does not excuse.
    empty = policy_repo.commit("no more echo", {"other.yaml": sg("other", [], running=False)})
    text = _plan(policy_repo, allowed, empty, "text")
    assert f"cell {cell}: the plan takes away all of the cell's access" in text
    doc = once(1)
    assert ready(doc)["reason"] == "MassRevokeBlocked"
    assert "the floor of 100 does not apply" in doc["refused"]["message"]
    assert doc["lastAppliedRevision"] == _rev(allowed)
    assert reaches(8080)
