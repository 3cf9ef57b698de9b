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
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from asgctl_lab.netns import Lab
from reconciler.agent.config import build_config
from reconciler.agent.core import condition
from reconciler.agent.loop import INVENTORY, SYNC, Agent
from reconciler.backends import Runner, converge, open_backend
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.core.cellplan import CellPlan, CellSettings
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.policy.load import load_revision, parse_files
from reconciler.policy.source import SourceFile
from tests.agentkit import (  # noqa: F401 - fixtures
    REPO_ROOT,
    AgentProc,
    PolicyRepo,
    agents,
    container,
    git_server,
    local_repo,
    policy_repo,
    read_status,
    sg,
    tcp_rules,
    wait_for,
    write_store,
)
from tests.conftest import require_netns
from tests.faultkit import (
    Checks,
    MountView,
    Rival,
    expected_snapshot,
    fill,
    find_descendant,
    in_session,
    install_foreign,
    kill,
    match_plan,
    orphans,
    record,
    scale,
    snapshot,
    wait_session_gone,
    xtables_lock_held,
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


UNDERLAY = "uplink0"
"""The lab cells here have no services, so no default route to find an underlay by."""
ON_UNDERLAY = CellSettings((UNDERLAY,), (UNDERLAY,))


def compile_files(files: dict[str, str], containers: tuple[Container, ...]) -> CellPlan:
    result = parse_files([SourceFile(k, v.encode()) for k, v in sorted(files.items())])
    assert result.ok, result.findings
    return compile_cell(result.policy, containers, "cell-a", ON_UNDERLAY)


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
    checks = Checks()
    t0 = time.monotonic()
    # `kills` kills; on a loaded machine most may land before a converge completes, so up to
    # twice as many more (bounded) until half that many converges got through, as the
    # assert below asks: the test judges the product, not the load average.
    for i in range(3 * kills):
        if i >= kills and applies >= kills // 2:
            break
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
        if not checks.check(name is not None, f"kill {i} ({mode}): neither plan: {diffs[:5]}"):
            print(raw[-2000:])
            break
        seen[name] += 1
        current = name
    figures = checks.held()
    assert mid_restore >= kills // 2, "the kills rarely landed while iptables-restore ran"
    assert applies >= kills // 2, (applies, seen)
    if kills >= 50:  # a dozen kills may all land on the same side; hundreds never do
        assert len(seen) == 2, seen
    record(
        "kill9-converge-loop",
        variant=variant,
        kills=sum(modes.values()),
        modes=dict(modes),
        applies_completed=applies,
        converge_errors=errors,
        killed_while_restore_ran=mid_restore,
        states=dict(seen),
        **figures,
        seconds=round(time.monotonic() - t0, 1),
    )


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
    checks = Checks()
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
            errors = "; ".join(str(f.error) for f in result.families if f.error)
            checks.check(result.ok, f"round {i}: {errors}")
            last = plan
    finally:
        rival_result = rival.stop()
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
    r = rival_result
    checks.check(r.lost == 0, f"the rival lost {r.lost} rules: {r.errors[-2000:]}")
    checks.check(r.other == 0, f"{r.other} rival commands failed: {r.errors[-2000:]}")
    figures = checks.held()
    # A raced insert is iptables-nft's positional insert meeting a replaced rule (ENOENT);
    # iptables-legacy serialises every writer through the xtables lock, so it never races.
    races = [x for x in r.errors.splitlines() if "RULE_INSERT failed" in x]
    assert len(races) == r.raced and (r.raced == 0 or variant == "nft"), r.errors[-2000:]
    assert r.rounds >= 5, "the rival hardly ran"
    record(
        "rival-editing-forward",
        backend=kind,
        our_converges=rounds,
        rival_rounds=r.rounds,
        rival_commands=r.commands,
        rival_rules_lost=r.lost,
        rival_inserts_raced=r.raced,
        rival_other_failures=r.other,
        **figures,
        seconds=round(seconds, 1),
    )


# -- agents: shared set-up --------------------------------------------------------------------


def agent_config(tmp_path: Path, repo: PolicyRepo, store: Path, netns: str, **more: Any) -> Any:
    settings: dict[str, Any] = {
        "source": repo.url,
        "cell": "cell-a",
        "containers": str(store),
        "state-dir": str(tmp_path / "state"),
        "netns": netns,
        "retry-base": "100ms",
        "retry-cap": "1s",
        "git-timeout": "20s",
        "mass-revoke-threshold": "100%",
        "status-push": False,
        "underlay-interface": UNDERLAY,
    }
    settings.update({k.replace("_", "-"): v for k, v in more.items()})
    return build_config(settings, {})


def quiet_agent(cfg: Any, backend: Any = None) -> Agent:
    return Agent(cfg, out=io.StringIO(), err=io.StringIO(), backend=backend)


def ready_of(st: Any) -> tuple[str, str, str]:
    c = condition(st.conditions, "Ready")
    assert c is not None
    return c.status, c.reason, c.message


def persisted(state_dir: Path) -> dict[str, Any]:
    """state.json as a restarted agent would read it: must always parse when present."""
    path = state_dir / "state.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def persisted_ready(state_dir: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        for c in persisted(state_dir).get("conditions", ()):
            if c["type"] == "Ready":
                return dict(c)
    return {}


def applied_sha(state_dir: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return (persisted(state_dir).get("applied") or {}).get("sha")
    return None


# -- kill -9 of real agents -------------------------------------------------------------------


def test_kill9_of_agents_leaves_the_old_or_the_new_plan_and_they_recover(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    """Like test_agent_e2e's kill test, and further: foreign rules in the table, the whole
    table compared (no orphan chain, hook once and first), four ways to kill (the agent at
    any time, while its iptables-restore runs, that restore alone, the whole process group),
    state.json and the status branch readable after every kill, and recovery at the end."""
    require_netns()
    lab = make_lab(conntrack=False)
    variant = "legacy"
    containers = inventory()
    store = write_store(tmp_path / "store.json", list(containers))
    install_foreign(lab.cell, variant)
    foreign, _ = snapshot(lab.cell, variant)
    plans = {"A": compile_files(POLICY_A, containers), "B": compile_files(POLICY_B, containers)}
    expect = {k: expected_snapshot(foreign, p) for k, p in plans.items()}
    expect["foreign only"] = foreign  # before the very first apply
    policy_repo.commit("A", POLICY_A)
    stop = threading.Event()

    def flip() -> None:  # a new head every ~150 ms, alternating A and B
        n = 0
        while not stop.is_set():
            n += 1
            policy_repo.commit(f"flip {n}", POLICY_A if n % 2 else POLICY_B)
            time.sleep(0.15)

    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(store),
        netns=lab.cell,
        variant=variant,
        interval="100ms",
        jitter="0%",
        **{"mass-revoke-threshold": "100%", "status-min-interval": "50ms"},
        **{"underlay-interface": UNDERLAY},
    )
    kills = scale(6, 60)
    rng = random.Random(7)
    seen: Counter[str] = Counter()
    checks = Checks()
    mid_restore = 0
    writer = threading.Thread(target=flip, daemon=True)
    writer.start()
    t0 = time.monotonic()
    try:
        for i in range(kills):
            mode = KILL_MODES[i % len(KILL_MODES)]
            a.start()
            assert a.proc is not None
            pid = a.proc.pid
            if mode == "anytime":
                time.sleep(rng.uniform(0.5, 2.0))
            else:
                child = find_descendant(pid, b"-restore", timeout=6.0)
                mid_restore += child is not None
                time.sleep(rng.uniform(0, 0.004))
                if mode == "restore-child" and child is not None:
                    kill(child)
                    time.sleep(rng.uniform(0, 0.2))  # the agent notices, reports, retries
            if mode == "process-group":
                os.killpg(pid, signal.SIGKILL)
            a.kill9()
            wait_session_gone(pid)
            state, raw = snapshot(lab.cell, variant)
            name, diffs = match_plan(state, expect)
            if not checks.check(name is not None, f"kill {i} ({mode}): {diffs[:5]}"):
                print(raw[-1500:])
                break
            seen[name] += 1
            persisted(a.state_dir)  # parses (or is absent): never half a file
            doc = read_status(policy_repo.bare, "cell-a")
            assert doc is None or doc["cell"] == "cell-a"
    finally:
        stop.set()
        writer.join()
    # Recovery: a fresh start applies the branch head and says so.
    final = policy_repo.commit("final: A", POLICY_A)
    a.start()
    wait_for(lambda: applied_sha(a.state_dir) == final, 30, what="the final head applied")
    assert persisted_ready(a.state_dir).get("status") == "True"
    state, raw = snapshot(lab.cell, variant)
    checks.check(state == expect["A"], f"after recovery: {raw[-1500:]}")
    figures = checks.held()
    assert mid_restore >= kills // 2 - 1
    record(
        "kill9-agent",
        variant=variant,
        kills=kills,
        killed_while_restore_ran=mid_restore,
        states=dict(seen),
        **figures,
        recovered=True,
        seconds=round(time.monotonic() - t0, 1),
    )


# -- the git server killed mid-fetch ----------------------------------------------------------


def test_git_server_killed_mid_fetch_keeps_rules_reports_and_recovers(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    git_server: GitDaemon,  # noqa: F811
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    """Each round pushes a commit carrying a large blob, waits for the agent's fetch (an
    upload-pack of the daemon's) and kills the daemon with everything it forked; the kernel
    keeps exactly the old or the new plan, the agent reports the outage, and when the daemon
    comes back it applies the new head."""
    require_netns()
    lab = make_lab(conntrack=False)
    variant = "legacy"
    containers = inventory(6)
    store = write_store(tmp_path / "store.json", list(containers))
    plans = {"A": compile_files(POLICY_A, containers), "B": compile_files(POLICY_B, containers)}
    foreign, _ = snapshot(lab.cell, variant)
    expect = {k: expected_snapshot(foreign, p) for k, p in plans.items()}
    first = policy_repo.commit("A", POLICY_A)
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(store),
        netns=lab.cell,
        variant=variant,
        interval="200ms",
        jitter="0%",
        **{"mass-revoke-threshold": "100%", "git-timeout": "10s"},
        **{"underlay-interface": UNDERLAY},
    ).start()
    wait_for(lambda: applied_sha(a.state_dir) == first, 20, what="first apply")
    rng = random.Random(11)
    rounds = scale(3, 20)
    reasons: Counter[str] = Counter()
    mid_fetch = 0
    messages: set[str] = set()
    current = "A"
    checks = Checks()
    t0 = time.monotonic()
    for i in range(rounds):
        new = "B" if current == "A" else "A"
        blobs = policy_repo.root / "blobs"
        blobs.mkdir(exist_ok=True)
        (blobs / f"{i}.bin").write_bytes(os.urandom(6 << 20))
        sha = policy_repo.commit(f"round {i}: {new}", POLICY_A if new == "A" else POLICY_B,
                                 push=False)  # fmt: skip
        git("push", "-q", str(policy_repo.bare), "main", cwd=policy_repo.root)
        daemon_pid = git_server.pid
        assert daemon_pid is not None
        fetching = wait_for(
            lambda p=daemon_pid: in_session(p, b"upload-pack"), 10, 0.001, "the agent's fetch"
        )
        time.sleep(rng.uniform(0, 0.03))
        still = in_session(daemon_pid, b"upload-pack") == fetching
        git_server.stop()
        state, raw = snapshot(lab.cell, variant)
        name, diffs = match_plan(state, {current: expect[current], new: expect[new]})
        checks.check(name is not None, f"round {i}, server killed: {diffs[:5]}\n{raw[-1500:]}")
        # The agent notices: either the fetch failed and Ready says why, or it had finished.
        outcome = wait_for(
            lambda s=sha: (
                "applied"
                if applied_sha(a.state_dir) == s
                else persisted_ready(a.state_dir).get("reason")
                if persisted_ready(a.state_dir).get("status") == "False"
                else None
            ),
            15,
            what="the outage reported",
        )
        reasons[outcome] += 1
        if outcome != "applied":
            mid_fetch += still
            message = persisted_ready(a.state_dir)["message"]
            assert "still enforcing main@sha1:" in message, message
            messages.add(f"{outcome}: {message.split('; still enforcing')[0][:160]}")
            time.sleep(rng.uniform(0.3, 0.8))  # retries while down change nothing
            state_down, raw = snapshot(lab.cell, variant)
            checks.check(state_down == expect[current], f"round {i}, retrying: {raw[-1500:]}")
        git_server.start()
        wait_for(lambda s=sha: applied_sha(a.state_dir) == s, 30, what="the new head applied")
        wait_for(lambda: persisted_ready(a.state_dir).get("status") == "True", 10, what="Ready")
        state, raw = snapshot(lab.cell, variant)
        checks.check(state == expect[new], f"round {i}, recovered: {raw[-1500:]}")
        current = new
    a.stop()
    fsck = subprocess.run(
        ["git", f"--git-dir={a.state_dir / 'cache.git'}", "fsck", "--no-dangling"],
        capture_output=True,
        text=True,
        check=False,
    )
    checks.check(fsck.returncode == 0, f"the cache is corrupt: {fsck.stderr}")
    figures = checks.held()
    assert sum(n for r, n in reasons.items() if r != "applied") >= 1, reasons
    record(
        "git-server-killed-mid-fetch",
        rounds=rounds,
        reported=dict(reasons),
        killed_while_upload_pack_ran=mid_fetch,
        messages=sorted(messages),
        **figures,
        seconds=round(time.monotonic() - t0, 1),
    )


# -- disk full --------------------------------------------------------------------------------


def test_disk_full_under_the_state_dir_enforcement_continues_and_recovers(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    """The agent's cache, state.json and status repo on a 8 MB tmpfs in a private mount
    namespace.  Nearly full: a fetch of a commit with a large blob fails, rules stay.  Full:
    nothing can be written, yet a new container is enforced; state.json and the pushed
    status are never half-written.  Space freed: the commit is applied and reported."""
    require_netns()
    lab = make_lab(conntrack=False)
    variant = "legacy"
    containers = list(inventory(5))
    store = write_store(tmp_path / "store.json", containers)
    state_dir = tmp_path / "state-tmpfs"
    first = policy_repo.commit("A", POLICY_A)
    foreign, _ = snapshot(lab.cell, variant)
    t0 = time.monotonic()
    with MountView(tmpfs={state_dir: "8m"}) as view:
        a = agents(
            "cell-a",
            source=policy_repo.url,
            containers=str(store),
            netns=lab.cell,
            variant=variant,
            interval="200ms",
            jitter="0%",
            **{"state-dir": str(state_dir), "mass-revoke-threshold": "100%"},
            **{"underlay-interface": UNDERLAY},
        )
        a.start(prefix=view.prefix)
        seen = view.path(state_dir)

        def status() -> dict[str, Any]:
            return read_status(policy_repo.bare, "cell-a") or {}

        wait_for(lambda: status().get("lastAppliedRevision") == f"main@sha1:{first}", 20)
        assert applied_sha(seen) == first and not any(state_dir.iterdir())  # not on the host

        # 1. Nearly full: 256 KiB free.  The next commit carries a 2 MiB blob.
        filler = seen / "filler"
        fill(filler)
        os.truncate(filler, max(0, filler.stat().st_size - (256 << 10)))
        (policy_repo.root / "blob.bin").write_bytes(os.urandom(2 << 20))
        second = policy_repo.commit("B, with a blob", POLICY_B)
        cache_error = wait_for(
            lambda: (r := persisted_ready(seen)).get("status") == "False" and r, 20,
            what="the failed fetch reported in state.json",
        )  # fmt: skip
        assert cache_error["reason"] == "DiskFull", cache_error
        assert "No space left on device" in cache_error["message"]
        wait_for(  # the failed fetch cleaned up after itself: status can still be pushed
            lambda: any(
                c["type"] == "Ready" and c["reason"] == "DiskFull"
                for c in status().get("conditions", ())
            ),
            30,
            what="DiskFull in the pushed status",
        )
        checks = Checks()
        state, raw = snapshot(lab.cell, variant)
        want_a = expected_snapshot(foreign, compile_files(POLICY_A, tuple(containers)))
        checks.check(state == want_a, f"nearly full: {raw[-1500:]}")
        assert applied_sha(seen) == first

        # 2. Full: not a byte left.  A container arrives and must get its rules anyway.
        fill(seen / "filler2")
        pushed_before = status()
        containers.append(container("late", 40))
        write_store(store, containers)
        want = expected_snapshot(foreign, compile_files(POLICY_A, tuple(containers)))
        wait_for(lambda: snapshot(lab.cell, variant)[0] == want, 10, what="the new container")
        time.sleep(1.0)  # several cycles that cannot save state or push status
        state, raw = snapshot(lab.cell, variant)
        enforced_while_full = checks.check(state == want, f"full: {raw[-1500:]}")
        assert applied_sha(seen) == first  # the old state.json, whole
        leftovers = sorted(p.name for p in seen.iterdir() if p.name.startswith(".state."))
        assert leftovers == [], leftovers
        pushed = status()  # whatever is on the server is a whole document
        assert pushed.get("cell") == "cell-a" and "conditions" in pushed
        assert pushed.get("lastAppliedRevision") == pushed_before.get("lastAppliedRevision")
        errors = [
            r for r in a.log_records("err") if r.get("event") in ("state-not-saved", "cycle-failed")
        ]
        assert any(r["event"] == "state-not-saved" for r in errors), errors[-3:]
        assert not any(r["event"] == "cycle-failed" for r in errors), errors[-3:]

        # 3. Space again: the waiting commit is applied with the new container, and reported.
        (seen / "filler").unlink()
        (seen / "filler2").unlink()
        wait_for(lambda: applied_sha(seen) == second, 30, what="the commit applied after")
        wait_for(
            lambda: (
                status().get("lastAppliedRevision") == f"main@sha1:{second}"
                and status()["counts"]["containers"] == len(containers)
            ),
            20,
            what="the status pushed again",
        )
        state, raw = snapshot(lab.cell, variant)
        want_b = expected_snapshot(foreign, compile_files(POLICY_B, tuple(containers)))
        recovered = checks.check(state == want_b, f"space again: {raw[-1500:]}")
        a.stop()
    figures = checks.held()
    record(
        "disk-full",
        tmpfs="8m",
        cache_write_failure=f"{cache_error['reason']}: {cache_error['message'][:160]}",
        state_not_saved_events=sum(1 for r in errors if r["event"] == "state-not-saved"),
        enforced_while_full=enforced_while_full,
        recovered=recovered,
        **figures,
        seconds=round(time.monotonic() - t0, 1),
    )


# -- the container metadata file half-written or invalid --------------------------------------


def _corruptions(good: bytes, rng: random.Random, cuts: int) -> list[tuple[str, bytes | None]]:
    """(name, content) pairs; None removes the file, b"<dir>" puts a directory there."""
    out: list[tuple[str, bytes | None]] = [
        (f"truncated at {n}", good[:n])
        for n in sorted(rng.sample(range(1, len(good) - 1), min(cuts, len(good) - 2)))
    ]
    out += [
        ("empty", b""),
        ("zeros", b"\0" * 4096),
        ("random bytes", rng.randbytes(2048)),
        ("null", b"null"),
        ("a list", b"[]"),
        ("a string", b'"store"'),
        ("deep nesting", b"[" * 200_000 + b"]" * 200_000),
        ("a 5000-digit number", b'{"c1": ' + b"9" * 5000 + b"}"),
        # A bad *entry* (a zone id, a shared IP, an odd workload) is judged on its own and
        # the rest of the store used: tests/test_cell_store.py.  Only whole files here.
        ("not utf-8", b'{"c\xff": {}}'),
        ("missing", None),
        ("a directory", b"<dir>"),
        ("over 64 MiB", b"<big>"),
    ]  # fmt: skip
    return out


def test_half_written_or_invalid_metadata_keeps_the_last_good_inventory(
    tmp_path: Path, make_lab: Callable[..., Lab]
) -> None:
    """An agent (in-process, real kernel) offered every broken store.json we could make --
    written in place, not renamed, as a careless writer would -- keeps enforcing the last good
    inventory exactly, reports InventoryInvalid with the reason, and takes the next good file."""
    require_netns()
    lab = make_lab(conntrack=False)
    repo = local_repo(tmp_path)
    first = repo.commit("A", {"a.yaml": sg("web", tcp_rules(20))})
    containers = list(inventory(5))
    store = write_store(tmp_path / "store.json", containers)
    agent = quiet_agent(agent_config(tmp_path, repo, store, lab.cell, variant="legacy"))
    st = agent.cycle(SYNC)
    assert ready_of(st)[0] == "True" and st.applied is not None and st.applied.sha == first
    good_state, _ = snapshot(lab.cell, "legacy")
    good = store.read_bytes()
    rng = random.Random(5)
    cases = _corruptions(good, rng, scale(12, 200))
    checks = Checks()
    t0 = time.monotonic()
    for name, content in cases:
        if store.is_dir():
            store.rmdir()
        if content is None:
            store.unlink(missing_ok=True)
        elif content == b"<dir>":
            store.unlink(missing_ok=True)
            store.mkdir()
        elif content == b"<big>":
            with store.open("wb") as f:
                f.truncate(100 << 20)
        else:
            with store.open("wb") as f:  # in place: a reader can see any prefix of it
                f.write(content)
        for trigger in (INVENTORY, SYNC):
            st = agent.cycle(trigger)
            status, reason, message = ready_of(st)
            assert (status, reason) == ("False", "InventoryInvalid"), (name, reason, message)
            assert "last good one kept" in message
            assert st.inventory == tuple(sorted(containers)), name
            doc = agent.status_document(st)
            assert doc["inventory"]["error"] and doc["inventory"]["containers"] == len(containers)
            assert "\n" not in doc["inventory"]["error"], name
        state, raw = snapshot(lab.cell, "legacy")
        checks.check(state == good_state, f"{name}: the kernel changed\n{raw[-1500:]}")
    if store.is_dir():
        store.rmdir()
    containers.append(container("next", 9))
    write_store(store, containers)
    st = agent.cycle(INVENTORY)
    assert ready_of(st)[:2] == ("True", "ReconciliationSucceeded")
    plan = compile_cell(
        load_revision(repo.root, first, "policies").policy,
        tuple(sorted(containers)),
        "cell-a",
        ON_UNDERLAY,
    )
    state, raw = snapshot(lab.cell, "legacy")
    host = {k: v for k, v in good_state.items() if not k.startswith("ASG-")}
    host["FORWARD"] = good_state["FORWARD"][1:]
    checks.check(state == expected_snapshot(host, plan), f"the next good file: {raw[-1500:]}")
    agent.source.close()
    figures = checks.held()
    record(
        "metadata-invalid",
        files_tried=len(cases),
        cycles=2 * len(cases) + 1,
        **figures,
        seconds=round(time.monotonic() - t0, 1),
    )


# -- the xtables lock held by another program -------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_xtables_lock_held_by_another_program(
    tmp_path: Path, make_lab: Callable[..., Lab], variant: str
) -> None:
    """Another program holds /run/xtables.lock (the cell's view of it: a private lock file
    bind-mounted in a private mount namespace, so the host's iptables are never stalled) for
    3 s (30 s under the soak).  iptables-legacy-restore --wait waits; the agent's timings show
    the wait; when the hold outlasts --wait the agent reports the lock and retries; nothing is
    lost.  iptables-nft does not use the lock at all and is not delayed."""
    require_netns()
    lab = make_lab(conntrack=False)
    hold = scale(3, 30)
    repo = local_repo(tmp_path)
    repo.commit("A", {"a.yaml": sg("web", tcp_rules(20))})
    containers = inventory(5)
    store = write_store(tmp_path / "store.json", list(containers))
    foreign, _ = snapshot(lab.cell, variant)
    t_all = time.monotonic()
    with MountView(private_lock=True) as view:
        backend = IptablesBackend.open(
            variant, Runner((*view.prefix, "ip", "netns", "exec", lab.cell))
        )
        agent = quiet_agent(agent_config(tmp_path, repo, store, lab.cell), backend)
        assert ready_of(agent.cycle(SYNC))[0] == "True"
        before, _ = snapshot(lab.cell, variant)
        second = repo.commit("B", {"a.yaml": sg("web", tcp_rules(25))})
        plan_b = compile_cell(load_revision(repo.root, second, "policies").policy, containers,
                              "cell-a", ON_UNDERLAY)  # fmt: skip
        reports: list[tuple[str, str, str]] = []
        timings: list[float] = []
        checks = Checks()
        done = threading.Event()

        def run() -> None:  # cycles as the loop would run them, until Ready again
            try:
                while True:
                    st = agent.cycle(SYNC)
                    reports.append(ready_of(st))
                    timings.append(st.timings.get("enforce", 0.0))
                    if ready_of(st)[0] == "True" or len(reports) > 10:
                        return
                    time.sleep(0.2)
            finally:
                done.set()

        with xtables_lock_held(view, lab.cell, hold):
            t0 = time.monotonic()
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            time.sleep(min(1.0, hold / 3))
            during, raw = snapshot(lab.cell, variant)
            if variant == "legacy":
                assert not done.is_set()
                checks.check(during == before, f"waiting: not the old rules, whole: {raw[-1500:]}")
            done.wait(hold + 5)
            waited = time.monotonic() - t0
        worker.join(timeout=60)
        assert done.is_set() and reports and reports[-1][0] == "True", reports
        state, raw = snapshot(lab.cell, variant)
        checks.check(state == expected_snapshot(foreign, plan_b), f"after: {raw[-1500:]}")
        assert agent.state.applied is not None and agent.state.applied.sha == second
        doc = agent.status_document(agent.state)
        agent.source.close()
    failed = [r for r in reports if r[0] == "False"]
    figures = checks.held()
    if variant == "nft":
        assert waited < hold and not failed  # iptables-nft takes no xtables lock
    else:
        assert waited >= hold - 0.5
    if variant == "legacy" and hold < 10:  # within --wait=10: one cycle that waited, and...
        assert len(reports) == 1 and doc["timings"]["enforce"] >= hold - 0.5, doc["timings"]
    elif variant == "legacy":  # longer than --wait: reported as the lock, retried, then applied
        assert failed and all(r[1] == "EnforcementFailed" for r in failed), failed
        # ...and the cycles that gave up say how long they waited (--wait=10).
        assert all(x >= 9.0 for x in timings[: len(failed)]), timings
        assert any("xtables lock" in r[2] for r in failed), failed
        assert any("still enforcing" in r[2] for r in failed), failed
    record(
        "xtables-lock-held",
        variant=variant,
        hold_seconds=hold,
        waited_seconds=round(waited, 2),
        cycles=len(reports),
        reported=[f"{r[1]}: {r[2][:150]}" for r in failed],
        enforce_seconds_reported=[round(x, 2) for x in timings],
        **figures,
        seconds=round(time.monotonic() - t_all, 1),
    )


def test_a_full_disk_is_reported_as_such_not_as_a_corrupt_cache() -> None:
    """git's words for ENOSPC contain 'object file', a corruption marker: the full disk must
    win, or the agent wipes its cache (and its history) and reports the wrong cause."""
    from reconciler.sources.gitio import classify

    assert (
        classify(
            "error: unable to write loose object file: No space left on device\n"
            "fatal: unpack-objects failed"
        )
        == "DiskFull"
    )
    assert classify("fatal: write error: Disk quota exceeded") == "DiskFull"
    assert classify("error: object file x is empty\nfatal: loose object x is corrupt") == (
        "CacheCorrupt"
    )


def test_a_failed_apply_keeps_its_time_in_the_timings() -> None:
    """A transaction that waits (for the xtables lock) and then fails must report the wait:
    the agent's `enforce` timing is the only place an operator sees it."""
    from reconciler.backends import ApplyError
    from reconciler.backends.iptables.delta import compute_delta
    from reconciler.backends.iptables.parse import OwnedState
    from reconciler.backends.iptables.render import render_cell

    class Slow:
        name = "slow"

        def render(self, plan: CellPlan, family: int) -> Any:
            return render_cell(plan, family)

        def read(self, family: int) -> OwnedState:
            return OwnedState(family, {}, ())

        def delta(self, desired: Any, observed: Any, last: Any, *, heal_drift: bool = True) -> Any:
            return compute_delta(desired, observed, last, heal_drift=heal_drift)

        def apply(self, delta: Any) -> None:
            time.sleep(0.3)
            raise ApplyError("Another app is currently holding the xtables lock", None, "")

        def verify(self, desired: Any, delta: Any) -> None:
            raise AssertionError("not reached")

    plan = compile_files({"a.yaml": sg("web", tcp_rules(2))}, inventory(2))
    result = converge(Slow(), plan, families=(4,))
    fam = result.families[0]
    assert not result.ok and not fam.sent
    assert fam.timings["apply"] >= 0.3, fam.timings
