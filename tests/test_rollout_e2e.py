"""Waves, halts and pause end to end: real `git daemon` on loopback, real `asgctl agent --once`
processes, each enforcing in its own lab cell namespace, talking only through the status
branches they push.

Soaks are 2 s so that a test can let one pass; every assertion is on state (status branches,
the kernel's rules, probes between the lab's namespaces), never on how long something took.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from tests.agentkit import (  # noqa: F401 - fixtures
    ORG,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    ssh_signing_keys,
)
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

WEB = ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)
API = ContainerSpec("api", app_id="app-api", space_id=SPACE, org_id=ORG)
ECHO = ServiceSpec("echo", tcp_ports=(80, 8080))
SOAK = 2.0
WAVES = f"""
kind: Rollout
name: fleet
waves:
  - name: canary
    cells: ["canary-*"]
    soak: {SOAK:g}s
"""
"""`canary-1` is the first wave; `late-1` matches no wave: the implicit last one."""


def _rev(sha: str) -> str:
    return f"main@sha1:{sha}"


def _allow(lab: Lab, *ports: int) -> str:
    ip = lab.services["echo"].ipv4
    return sg("echo", [f'{{protocol: tcp, destination: {ip}, ports: "{p}"}}' for p in ports])


def _files(lab: Lab, *ports: int, rollout: str | None = WAVES) -> dict[str, str]:
    files = {"sg.yaml": _allow(lab, *ports)}
    if rollout is not None:
        files["rollout.yaml"] = rollout
    return files


@pytest.fixture
def cells(make_lab: Callable[..., Lab]) -> dict[str, Lab]:
    require_netns()
    return {
        "canary-1": make_lab([WEB], [ECHO], conntrack=False),
        "late-1": make_lab([WEB, API], [ECHO], conntrack=False),
    }


def _agent(
    make: Callable[..., AgentProc], repo: PolicyRepo, name: str, lab: Lab, **extra: Any
) -> AgentProc:
    return make(name, source=repo.url, containers=str(lab.write_store()), netns=lab.cell, **extra)


def _once(agent: AgentProc, bare: Path) -> dict[str, Any]:
    """One `--once` run; its status as pushed."""
    agent.once()
    doc = read_status(bare, agent.name)
    assert doc is not None, agent.stderr_path.read_text()
    return doc


def _on(doc: dict[str, Any], sha: str, reason: str = "ReconciliationSucceeded") -> bool:
    r = ready(doc)
    return doc["lastAppliedRevision"] == _rev(sha) and (r["status"], r["reason"]) == (
        "True",
        reason,
    )


def test_the_second_wave_applies_a_revision_only_after_the_first_held_it_ready_for_the_soak(
    cells: dict[str, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    bare = policy_repo.bare
    canary_lab, late_lab = cells["canary-1"], cells["late-1"]
    canary = _agent(agents, policy_repo, "canary-1", canary_lab)
    late = _agent(agents, policy_repo, "late-1", late_lab)
    c1 = policy_repo.commit("allow echo:80, in waves", _files(canary_lab, 80))
    # A cell with nothing applied takes the head at once (there is nothing to roll from).
    assert _on(_once(canary, bare), c1) and _on(_once(late, bare), c1)

    c2 = policy_repo.commit("also echo:8080", _files(canary_lab, 80, 8080))
    doc = _once(late, bare)  # the canary has not even seen c2
    assert _on(doc, c1, "WaitingForWave"), doc["conditions"]
    message = ready(doc)["message"]
    assert _rev(c2) in message and "canary-1" in message and "wave 'canary'" in message
    assert doc["observedRevision"] == _rev(c2)
    assert late_lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED  # still c1

    assert _on(_once(canary, bare), c2)
    assert canary_lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    doc = _once(late, bare)  # first sees the canary Ready on c2: the soak starts now
    assert _on(doc, c1, "WaitingForWave") and f"its {SOAK:g}s soak ends" in ready(doc)["message"]
    time.sleep(SOAK)
    assert _on(_once(late, bare), c2)
    assert late_lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED

    # The attack: a commit that deletes the waves together with a change.  The cells enforce
    # c2's waves, so the last wave still waits for the canary to hold c3 Ready and soaked.
    c3 = policy_repo.commit("drop the waves, and 8080", _files(canary_lab, 80, rollout=None))
    doc = _once(late, bare)
    assert _on(doc, c2, "WaitingForWave") and "wave 'canary'" in ready(doc)["message"]
    assert late_lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED  # not c3 yet
    assert _on(_once(canary, bare), c3)
    assert _on(_once(late, bare), c2, "WaitingForWave")  # soaking
    time.sleep(SOAK)
    assert _on(_once(late, bare), c3)
    assert late_lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    # Applied under the old brakes, c3's own (none) now govern: c4 reaches every cell at once.
    c4 = policy_repo.commit("echo:8080 again", _files(canary_lab, 80, 8080, rollout=None))
    assert _on(_once(late, bare), c4)


@pytest.mark.requires("ssh-keygen")
def test_a_first_wave_that_refuses_the_revision_halts_the_second(
    tmp_path: Path,
    cells: dict[str, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    bare = policy_repo.bare
    canary_lab = cells["canary-1"]
    trusted, _stranger, allowed = ssh_signing_keys(tmp_path)
    # The canary accepts only signed heads; the late cell checks no signature.
    canary = _agent(
        agents,
        policy_repo,
        "canary-1",
        canary_lab,
        verify="signed",
        **{"allowed-signers": str(allowed)},
    )
    late = _agent(agents, policy_repo, "late-1", cells["late-1"])
    c1 = policy_repo.commit("signed", _files(canary_lab, 80), sign_with=trusted)
    assert _on(_once(canary, bare), c1) and _on(_once(late, bare), c1)

    c2 = policy_repo.commit("unsigned", _files(canary_lab, 80, 8080))
    doc = _once(canary, bare)
    assert (ready(doc)["status"], ready(doc)["reason"]) == ("False", "UnsignedCommit")
    for _ in range(2):  # however long it waits: halted, never applied
        doc = _once(late, bare)
        assert _on(doc, c1, "RolloutHalted"), doc["conditions"]
        message = ready(doc)["message"]
        assert _rev(c2) in message and "canary-1" in message and "UnsignedCommit" in message
        time.sleep(SOAK / 2)
    assert cells["late-1"].probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED


def test_a_pause_keeps_every_cell_on_its_revision_while_a_new_container_gets_its_rules(
    cells: dict[str, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    bare = policy_repo.bare
    canary_lab, late_lab = cells["canary-1"], cells["late-1"]
    store = late_lab.write_store()
    full = store.read_text()
    only_web = late_lab.store_document()
    only_web.pop(API.handle)

    store.write_text(json.dumps(only_web))
    canary = _agent(agents, policy_repo, "canary-1", canary_lab)
    late = agents("late-1", source=policy_repo.url, containers=str(store), netns=late_lab.cell)
    c1 = policy_repo.commit("allow echo:80", _files(canary_lab, 80))
    assert _on(_once(canary, bare), c1) and _on(_once(late, bare), c1)

    paused = WAVES + "pause: true\n"
    c2 = policy_repo.commit(
        "pause, and also echo:8080", _files(canary_lab, 80, 8080, rollout=paused)
    )
    for agent in (canary, late):  # the first wave too
        doc = _once(agent, bare)
        assert _on(doc, c1, "RolloutPaused"), doc["conditions"]
        assert _rev(c2) in ready(doc)["message"] and "rollout.yaml" in ready(doc)["message"]

    store.write_text(full)  # a new container on the paused cell: it gets c1's rules
    doc = _once(late, bare)
    assert _on(doc, c1, "RolloutPaused")
    assert {c["handle"] for c in doc["containers"]} == {WEB.handle, API.handle}
    assert late_lab.probe_tcp("api", "echo", 80).outcome is Outcome.CONNECTED
    assert late_lab.probe_tcp("api", "echo", 8080).outcome is Outcome.REJECTED


def test_a_pin_moves_a_cell_to_the_pinned_revision_and_keeps_it_there(
    cells: dict[str, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    bare = policy_repo.bare
    lab = cells["late-1"]
    late = _agent(agents, policy_repo, "late-1", lab)
    c1 = policy_repo.commit("allow echo:80", _files(lab, 80, rollout=None))
    assert _on(_once(late, bare), c1)
    c2 = policy_repo.commit("also echo:8080", _files(lab, 80, 8080, rollout=None))
    # Before the cell saw c2, the fleet is pinned to it and main moves on (back to echo:80
    # alone: c3 is valid, and a cell would apply it but for the pin).
    pin = f"kind: Rollout\nname: freeze\npause: {{revision: {c2}}}\n"
    c3 = policy_repo.commit("pin c2; only echo:80", _files(lab, 80, rollout=pin))
    doc = _once(late, bare)
    assert doc["lastAppliedRevision"] == _rev(c2) and doc["observedRevision"] == _rev(c3)
    assert ready(doc)["status"] == "True"
    for _ in range(2):  # and there it stays
        doc = _once(late, bare)
        assert _on(doc, c2, "RolloutPaused") and f"pinned to {c2[:12]}" in ready(doc)["message"]
    assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED


def test_a_deny_window_holds_a_change_until_an_emergency_commit_says_otherwise(
    cells: dict[str, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    bare = policy_repo.bare
    lab = cells["canary-1"]
    canary = _agent(agents, policy_repo, "canary-1", lab)
    c1 = policy_repo.commit("allow echo:80", _files(lab, 80, rollout=None))
    assert _on(_once(canary, bare), c1)
    # A freeze that is open whenever the test runs: every minute opens it for an hour.
    freeze = (
        "kind: Rollout\nname: freeze\nwindows:\n"
        '  - {schedule: "* * * * *", duration: 1h, kind: deny, description: payments freeze}\n'
    )
    c2 = policy_repo.commit("freeze; also echo:8080", _files(lab, 80, 8080, rollout=freeze))
    doc = _once(canary, bare)  # the head's own deny window acts at once, the first wave too
    assert _on(doc, c1, "OutsideChangeWindow"), doc["conditions"]
    message = ready(doc)["message"]
    assert _rev(c2) in message and "payments freeze" in message
    assert "Asgctl-Emergency: true" in message
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED

    c3 = policy_repo.commit(
        "hotfix\n\nAsgctl-Emergency: true", _files(lab, 80, 8080, rollout=freeze)
    )
    assert _on(_once(canary, bare), c3)
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    # The next commit without the trailer waits again: the freeze is still open.
    c4 = policy_repo.commit("no longer urgent", _files(lab, 80, 8080, rollout=freeze))
    doc = _once(canary, bare)
    assert _on(doc, c3, "OutsideChangeWindow") and doc["observedRevision"] == _rev(c4)
