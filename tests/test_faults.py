"""Faults injected into a working cell: the kernel must always hold exactly the old or the new
plan, other programs' rules must survive, and the agent must report and recover.

* kill -9 of a converge loop (tests/faultdriver.py) in every phase, and of real agents;
* the git server killed and restarted while the agent fetches;
* the disk under the agent's cache, state and status repo full (a tmpfs in a private mount
  namespace, see tests/faultkit.MountView);
* the container metadata file half-written or invalid in every way we could think of;
* the xtables lock held by another program (a private lock file, so the host is not
  stalled);
* another program adding and deleting its own FORWARD rules while we converge.

Inside `make test` each runs at a small size; `make soak` (ASGCTL_SOAK=1) runs the same
tests at the issue's sizes: 200 kills, a 30 s lock, and longer churn.  Figures go to stdout
and, under the soak, to $ASGCTL_RELIABILITY_LOG for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.compile import compile_cell
from reconciler.dataplane import Runner, converge, open_backend
from reconciler.dataplane.iptables import IptablesBackend
from reconciler.lab.netns import Lab
from reconciler.model import Container
from reconciler.plan import CellPlan
from reconciler.policy.load import parse_files
from reconciler.policy.source import SourceFile
from tests.agentkit import (  # noqa: F401 - fixtures
    REPO_ROOT,
    AgentProc,
    PolicyRepo,
    agents,
    container,
    git_server,
    policy_repo,
    read_status,
    sg,
    tcp_rules,
    wait_for,
    write_store,
)
from tests.conftest import require_netns
from tests.faultkit import (
    Rival,
    expected_snapshot,
    find_descendant,
    install_foreign,
    kill,
    match_plan,
    orphans,
    record,
    scale,
    snapshot,
    wait_session_gone,
)

pytestmark = pytest.mark.netns

VARIANTS = ("legacy", "nft")


# -- plans ------------------------------------------------------------------------------------


def inventory(n: int = 30) -> tuple[Container, ...]:
    return tuple(
        sorted(container(f"c{i}", i, app=f"app-{i % 3}", space=f"space-{i % 2}") for i in range(n))
    )


POLICY_A = {
    "a.yaml": sg("shared", tcp_rules(100, net=1)),
    "b.yaml": sg("space0", tcp_rules(600, net=2), running=False, spaces=("space-0",)),
}
POLICY_B = {
    "a.yaml": sg("shared", tcp_rules(100, net=1)),
    "b.yaml": sg("space1", tcp_rules(600, net=3), running=False, spaces=("space-1",)),
}
"""Two plans sharing a group and differing in another, so any partial state differs from
both; 600 rules in the changing group make each transaction big enough to be caught."""


def compile_files(files: dict[str, str], containers: tuple[Container, ...]) -> CellPlan:
    result = parse_files([SourceFile(k, v.encode()) for k, v in sorted(files.items())])
    assert result.ok, result.findings
    return compile_cell(result.policy, containers, "cell-a")


def variant_of(netns: str) -> str:
    """The variant the agent's auto choice lands on in a fresh namespace."""
    backend = open_backend("iptables", "auto", Runner.in_netns(netns))
    assert isinstance(backend, IptablesBackend)
    return backend.variant


# -- kill -9 of a converge loop ---------------------------------------------------------------

KILL_MODES = ("anytime", "during-restore", "restore-child", "process-group")


@pytest.mark.parametrize("variant", VARIANTS)
def test_kill9_of_a_converge_loop_leaves_exactly_the_old_or_the_new_plan(
    make_lab: Callable[..., Lab], tmp_path: Path, variant: str
) -> None:
    """SIGKILL the converge loop, or its iptables-restore, or both, at random points; the
    table iptables-save prints is always foreign rules + exactly plan A or exactly plan B."""
    require_netns()
    lab = make_lab(conntrack=False)
    containers = inventory()
    plans = {"A": compile_files(POLICY_A, containers), "B": compile_files(POLICY_B, containers)}
    install_foreign(lab.cell, variant)
    foreign, _ = snapshot(lab.cell, variant)
    backend = open_backend("iptables", variant, Runner.in_netns(lab.cell))
    assert converge(backend, plans["A"], families=(4,)).ok
    expect = {k: expected_snapshot(foreign, p) for k, p in plans.items()}
    state, raw = snapshot(lab.cell, variant)
    assert state == expect["A"], raw

    kills = scale(12, 200)
    rng = random.Random(20261126)
    spec = tmp_path / "spec.pickle"
    seen: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    applies = errors = mid_restore = 0
    current = "A"
    t0 = time.monotonic()
    for i in range(kills):
        mode = KILL_MODES[i % len(KILL_MODES)]
        order = ["A", "B"] if current == "B" else ["B", "A"]  # first converge changes things
        spec.write_bytes(
            pickle.dumps(
                {"plans": [plans[order[0]], plans[order[1]]], "netns": lab.cell, "variant": variant}
            )
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultdriver", str(spec)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            if mode == "anytime":
                time.sleep(rng.uniform(0.2, 1.0))  # start-up, probe, save, delta, restore...
            else:
                child = find_descendant(proc.pid, b"-restore", timeout=5.0)
                mid_restore += child is not None
                time.sleep(rng.uniform(0, 0.004))
                if mode == "restore-child" and child is not None:
                    kill(child)
            if mode == "process-group":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                kill(proc.pid)
            out, _ = proc.communicate(timeout=30)
        finally:
            with_suppressed_kill(proc)
        wait_session_gone(proc.pid)
        modes[mode] += 1
        applies += out.count("ok ")
        errors += out.count("error ")
        state, raw = snapshot(lab.cell, variant)
        name, diffs = match_plan(state, expect)
        assert name is not None, f"kill {i} ({mode}): neither plan: {diffs[:5]}\n{raw[-2000:]}"
        seen[name] += 1
        current = name
    record(
        "kill9-converge-loop",
        variant=variant,
        kills=kills,
        modes=dict(modes),
        applies_completed=applies,
        converge_errors=errors,
        killed_while_restore_ran=mid_restore,
        states=dict(seen),
        violations=0,
        seconds=round(time.monotonic() - t0, 1),
    )
    assert mid_restore >= kills // 2, "the kills rarely landed while iptables-restore ran"
    assert applies >= kills // 2 and len(seen) == 2, (applies, seen)


def with_suppressed_kill(proc: subprocess.Popen[Any]) -> None:
    """However the iteration ended, the loop and its children are gone before the next."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- another program editing FORWARD while we converge ---------------------------------------


@pytest.mark.parametrize("kind", ["legacy", "nft", "nftables"])
def test_another_program_editing_forward_while_we_converge(
    make_lab: Callable[..., Lab], tmp_path: Path, kind: str
) -> None:
    """A rival inserts, appends, chains and deletes its own rules in a tight loop while we
    converge back and forth; afterwards its rules and ours are both exactly intact, and none
    of its commands ever failed (a failed delete would mean we removed its rule)."""
    require_netns()
    lab = make_lab(conntrack=False)
    variant = "nft" if kind == "nftables" else kind
    containers = inventory(10)
    plans = [compile_files(POLICY_A, containers), compile_files(POLICY_B, containers)]
    install_foreign(lab.cell, variant)
    foreign, _ = snapshot(lab.cell, variant)
    backend_name = "nftables" if kind == "nftables" else "iptables"
    backend = open_backend(backend_name, variant, Runner.in_netns(lab.cell))
    rounds, budget = scale(16, 400), scale(5, 600)
    rival = Rival(lab.cell, variant, tmp_path).start()
    failures: list[str] = []
    last: CellPlan | None = None
    t0 = time.monotonic()
    try:
        time.sleep(0.1)
        for i in range(rounds):
            if i >= 8 and time.monotonic() - t0 > budget:
                rounds = i  # a slow shared machine: enough rounds, within the time budget
                break
            plan = plans[i % 2]
            result = converge(backend, plan, last, families=(4,))
            if not result.ok:
                failures.append(f"round {i}: " + "; ".join(str(f.error) for f in result.families))
            last = plan
    finally:
        rival_rounds, rival_failed, rival_errors = rival.stop()
    seconds = time.monotonic() - t0
    final = converge(backend, last, last, families=(4,))  # type: ignore[arg-type]
    assert final.ok, final.to_dict()
    state, raw = snapshot(lab.cell, variant)
    if kind == "nftables":
        # Our rules live in our own table; the iptables view must be exactly the rival's.
        assert state == foreign, raw
        assert backend.read(4).chains == backend.render(last, 4).chains  # type: ignore[arg-type]
    else:
        assert state == expected_snapshot(foreign, last), raw
        assert orphans(state, last) == []  # type: ignore[arg-type]
    record(
        "rival-editing-forward",
        backend=kind,
        our_converges=rounds,
        our_failures=len(failures),
        rival_rounds=rival_rounds,
        rival_commands=rival_rounds * 10,
        rival_failures=rival_failed,
        seconds=round(seconds, 1),
    )
    assert rival_failed == 0, rival_errors[-2000:]
    assert rival_rounds >= 5, "the rival hardly ran"
    assert failures == [], failures[:5]
