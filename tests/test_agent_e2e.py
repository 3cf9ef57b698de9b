"""The agent end to end: real `git daemon` on loopback, real agents, real namespaces.

Each agent is an `asgctl agent` process in the host namespace (it reaches the daemon on
127.0.0.1) that enforces in its own lab cell namespace (`netns:`).  Intervals are 1 s so that
"within one interval" is measurable in a test; long runs live in bench/agent_fleet.py.
"""

from __future__ import annotations

import io
import json
import random
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.backends.iptables.render import container_chain, render_cell
from reconciler.core.cellplan import content_id
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.policy.load import load_revision
from reconciler.sources.cellstore import parse_store
from reconciler.sources.inventories import StatusBranches
from tests.agentkit import (  # noqa: F401 - fixtures
    ASGCTL,
    ORG,
    REPO_ROOT,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    backend_for,
    cond,
    container,
    git_server,
    kernel,
    policy_repo,
    read_status,
    ready,
    sg,
    ssh_signing_keys,
    tcp_rules,
    wait_for,
    write_store,
)
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

WEB = ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)
ECHO = ServiceSpec("echo", tcp_ports=(80, 8080))
BARE_CELL = {"underlay-interface": "uplink0"}
"""A lab cell without services has no default route to find its underlay by: name one."""


def _rev(sha: str) -> str:
    return f"main@sha1:{sha}"


def _allow(lab: Lab, *ports: int) -> dict[str, str]:
    ip = lab.services["echo"].ipv4
    rules = [f'{{protocol: tcp, destination: {ip}, ports: "{p}"}}' for p in ports]
    return {"sg.yaml": sg("echo", rules)}


def _expected(repo: PolicyRepo, sha: str, containers: tuple[Container, ...], cell: str) -> dict:
    result = load_revision(repo.root, sha, "policies")
    assert result.ok, result.findings
    return dict(render_cell(compile_cell(result.policy, containers, cell), 4).chains)


def _applied(bare: Path, cell: str, sha: str) -> Callable[[], bool]:
    def check() -> bool:
        doc = read_status(bare, cell)
        return (
            bool(doc)
            and doc["lastAppliedRevision"] == _rev(sha)
            and ready(doc)["status"] == ("True")
        )

    return check


@pytest.fixture
def two_cells(make_lab: Callable[..., Lab]) -> tuple[Lab, Lab]:
    require_netns()
    return make_lab([WEB], [ECHO], conntrack=False), make_lab([WEB], [ECHO], conntrack=False)


def test_a_commit_reaches_every_agent_within_an_interval(
    two_cells: tuple[Lab, Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    lab_a, lab_b = two_cells
    # Both labs give web and echo the same addresses, so one policy serves both cells.
    assert lab_a.services["echo"].ipv4 == lab_b.services["echo"].ipv4
    c1 = policy_repo.commit("allow echo:80", _allow(lab_a, 80))
    procs = []
    for name, lab in (("cell-a", lab_a), ("cell-b", lab_b)):
        store = lab.write_store()
        procs.append(
            agents(name, source=policy_repo.url, containers=str(store), netns=lab.cell).start()
        )
    for name in ("cell-a", "cell-b"):
        wait_for(_applied(policy_repo.bare, name, c1), 15, what=f"{name} applies c1")
    for lab in two_cells:
        assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
        assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED

    c2 = policy_repo.commit("also echo:8080", _allow(lab_a, 80, 8080))
    t0 = time.monotonic()
    want = _expected(policy_repo, c2, parse_store(lab_a.write_store().read_text()), "cell-a")
    in_kernel: dict[str, float] = {}
    reported: dict[str, float] = {}
    deadline = t0 + 10
    while len(reported) < 2 and time.monotonic() < deadline:
        for name, lab in (("cell-a", lab_a), ("cell-b", lab_b)):
            if name not in in_kernel and dict(kernel(lab.cell).chains) == want:
                in_kernel[name] = time.monotonic() - t0
            if name not in reported and _applied(policy_repo.bare, name, c2)():
                reported[name] = time.monotonic() - t0
        time.sleep(0.02)
    assert len(reported) == 2, (in_kernel, reported)
    # One interval (1 s) plus its jitter (10 %), plus fetch + apply; reported a push later.
    assert max(in_kernel.values()) < 1.1 + 0.6, in_kernel
    assert max(reported.values()) < 1.1 + 1.5, reported
    for lab in two_cells:
        assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED

    # Each agent wrote only its own branch; main is untouched; statuses are the right cells'.
    refs = git("--git-dir", str(policy_repo.bare), "for-each-ref", "--format=%(refname)")
    assert refs.split() == [
        "refs/heads/main",
        "refs/heads/status/cell-a",
        "refs/heads/status/cell-b",
    ]
    assert git("--git-dir", str(policy_repo.bare), "rev-parse", "main") == c2
    for name, lab in (("cell-a", lab_a), ("cell-b", lab_b)):
        doc = read_status(policy_repo.bare, name)
        assert doc["cell"] == name and doc["observedRevision"] == _rev(c2)
        assert [c["handle"] for c in doc["containers"]] == ["web"]
        assert doc["containers"][0]["sources"] == ["SecurityGroup/echo"]
        assert doc["counts"]["installedRules"] > 0 and doc["counts"]["cfEquivalentRules"] > 0
        assert set(doc["timings"]) >= {"fetch", "render", "enforce", "cleanup", "total"}
        assert (
            git("--git-dir", str(policy_repo.bare), "rev-list", "--count", f"status/{name}") == "1"
        )
        expected = _expected(policy_repo, c2, parse_store(lab.write_store().read_text()), name)
        assert dict(kernel(lab.cell).chains) == expected

    # Logs: one line per container whose rules changed, per apply; nothing for idle cycles.
    time.sleep(1.5)  # a couple of idle cycles
    for a in procs:
        records = [r for r in a.log_records("out") if r.get("event") == "container-rules-changed"]
        assert [(r["change"], r["revision"]) for r in records] == [
            ("added", _rev(c1)),
            ("updated", _rev(c2)),
        ]
        assert records[1]["rules_added"] == 1 and records[1]["groups_added"] == []

    # `asgctl plan` reads the same branches as its inventory (the status-branch contract).
    clone = policy_repo.root.parent / "ci-clone"
    git("clone", "-q", str(policy_repo.bare), str(clone))
    cells = StatusBranches(str(clone)).cells()
    assert [(c.cell, [x.handle for x in c.containers]) for c in cells] == [
        ("cell-a", ["web"]),
        ("cell-b", ["web"]),
    ]

    # The fleet view.
    out = subprocess.run(
        [*ASGCTL, "status", "--source", policy_repo.url],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"cell-a\s+True\s+ReconciliationSucceeded\s+" + c2[:12] + r"\s+0\s", out.stdout
    )
    assert re.search(
        r"cell-b\s+True\s+ReconciliationSucceeded\s+" + c2[:12] + r"\s+0\s", out.stdout
    )


def _metrics_url(a: AgentProc) -> str:
    rec = wait_for(
        lambda: next(
            (r for r in a.log_records("err") if r.get("event") == "metrics-listening"), None
        ),
        10,
        what="metrics address",
    )
    return f"http://{rec['address']}/metrics"


def test_git_server_down_keeps_rules_then_recovers(
    make_lab: Callable[..., Lab],
    git_server: GitDaemon,  # noqa: F811
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([WEB], [ECHO], conntrack=False)
    c1 = policy_repo.commit("allow echo:80", _allow(lab, 80))
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(lab.write_store()),
        netns=lab.cell,
        **{"metrics-listen": "127.0.0.1:0"},
    ).start()
    wait_for(_applied(policy_repo.bare, "cell-a", c1), 15, what="c1 applied")
    url = _metrics_url(a)
    before = dict(kernel(lab.cell).chains)

    git_server.stop()
    c2 = policy_repo.commit("also 8080", _allow(lab, 80, 8080), push=False)
    git("push", "-q", str(policy_repo.bare), "main", cwd=policy_repo.root)  # behind its back

    def down() -> bool:
        conds = {c["type"]: c for c in a.state().get("conditions", [])}
        return conds.get("Ready", {}).get("reason") == "GitUnreachable"

    wait_for(down, 10, what="Ready=False GitUnreachable")
    conds = {c["type"]: c for c in a.state()["conditions"]}
    assert conds["Ready"]["status"] == "False"
    assert "still enforcing " + _rev(c1) in conds["Ready"]["message"]
    assert conds["Reconciling"]["reason"] == "ProgressingWithRetry"
    assert conds["Stalled"]["status"] == "False"
    assert dict(kernel(lab.cell).chains) == before
    assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
    # A failing git server (and failing status pushes) never hold up enforcement.
    store = Path(a.settings["containers"])
    extra = container("late", 40)
    t0 = time.monotonic()
    write_store(store, [*parse_store(store.read_text()), extra])
    chain = container_chain(content_id("container late"))
    wait_for(lambda: chain in kernel(lab.cell).chains, 3, 0.01, "new container while down")
    assert time.monotonic() - t0 < 1.0
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert re.search(
        r'asgctl_agent_sync_failures_total\{cell="cell-a",reason="GitUnreachable"\} [1-9]', text
    )
    assert 'asgctl_agent_ready{cell="cell-a"} 0' in text

    git_server.start()
    wait_for(_applied(policy_repo.bare, "cell-a", c2), 10, what="c2 applied after recovery")
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'asgctl_agent_ready{cell="cell-a"} 1' in text
    assert f'revision="{_rev(c2)}"' in text
    for phase in ("render", "enforce", "cleanup", "total"):
        assert f'asgctl_agent_sync_duration_seconds_count{{cell="cell-a",phase="{phase}"}}' in text
    assert re.search(r'asgctl_agent_cf_equivalent_rules\{cell="cell-a"\} [1-9]', text)
    assert re.search(r"asgctl_agent_last_success_timestamp_seconds\{[^}]*\} 1\d{9}", text)


@pytest.mark.requires("ssh-keygen")
def test_untrusted_invalid_rewound_and_mass_revoking_heads_wait(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([], [], conntrack=False)
    store = write_store(tmp_path / "store.json", [container(f"c{i}", i) for i in range(4)])
    inventory = parse_store(store.read_text())
    trusted, stranger, allowed = ssh_signing_keys(tmp_path)
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(store),
        netns=lab.cell,
        verify="signed",
        # Four containers: lower the floor so 28 pairs can be a mass revoke (core/gate.py).
        **{"allowed-signers": str(allowed), "mass-revoke-min": 25},
        **BARE_CELL,
    )
    bare = policy_repo.bare
    ten = {"sg.yaml": sg("web", tcp_rules(10))}

    def once(expect_rc: int) -> dict:
        res = a.once()
        assert res.returncode == expect_rc, res.stderr
        return read_status(bare, "cell-a")

    def holds(sha: str) -> None:
        assert dict(kernel(lab.cell).chains) == _expected(policy_repo, sha, inventory, "cell-a")

    good = policy_repo.commit("ten rules", ten, sign_with=trusted)
    doc = once(0)
    assert doc["lastAppliedRevision"] == _rev(good)
    assert cond(doc, "SourceVerified")["status"] == "True"
    assert "ops@example.invalid" in cond(doc, "SourceVerified")["message"]
    holds(good)

    def refused(reason: str, sha: str) -> dict:
        doc = once(1)
        assert ready(doc)["status"] == "False" and ready(doc)["reason"] == reason, ready(doc)
        assert cond(doc, "Stalled")["status"] == "True"
        assert doc["refused"]["revision"] == _rev(sha) and doc["refused"]["reason"] == reason
        assert doc["lastAttemptedRevision"] == _rev(sha)
        assert doc["observedRevision"] == _rev(sha)
        assert doc["lastAppliedRevision"] == _rev(good)
        holds(good)
        return doc

    eleven = {"sg.yaml": sg("web", tcp_rules(11))}
    unsigned = policy_repo.commit("unsigned", eleven)
    doc = refused("UnsignedCommit", unsigned)
    assert cond(doc, "SourceVerified")["status"] == "False"
    untrusted = policy_repo.commit("stranger", eleven, sign_with=stranger)
    assert cond(refused("UntrustedSignature", untrusted), "SourceVerified")["status"] == "False"

    bad = {"sg.yaml": sg("web", ['{protocol: tcp, destination: 198.19.1.1, ports: "70000"}'])}
    invalid = policy_repo.commit("bad port", bad, sign_with=trusted)
    doc = refused("ValidationFailed", invalid)
    assert cond(doc, "SourceVerified")["status"] == "True"  # signed fine, but invalid
    assert any(f.startswith("policies/sg.yaml:") for f in doc["refused"]["findings"])
    assert "policies/sg.yaml:" in ready(doc)["message"]

    three = {"sg.yaml": sg("web", tcp_rules(3))}
    revoke = policy_repo.commit("drop seven of ten", three, sign_with=trusted)
    doc = refused("MassRevokeBlocked", revoke)
    # 4 containers x 7 rules of 4 x 10: over 50% and over the floor of 25
    assert "28 of the cell's 40" in doc["refused"]["message"]
    assert "28 >= the floor of 25" in doc["refused"]["message"]

    override = policy_repo.commit(
        "drop seven of ten\n\nAsgctl-Allow-Mass-Revoke: true", three, sign_with=trusted
    )
    doc = once(0)
    assert doc["lastAppliedRevision"] == _rev(override) and "refused" not in doc
    assert cond(doc, "Stalled")["status"] == "False"
    holds(override)
    good = override

    policy_repo.reset(unsigned)  # back before the override...
    rewound = policy_repo.commit("rewritten history", ten, sign_with=trusted, push=False)
    policy_repo.push(force=True)
    refused("HistoryRewritten", rewound)
    res = subprocess.run(
        a.argv("--once", "--allow-rewind"), capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert res.returncode == 0, res.stderr
    assert read_status(bare, "cell-a")["lastAppliedRevision"] == _rev(rewound)
    holds(rewound)

    # History keeps the last syncs, newest first, with the refusals in between.
    history = read_status(bare, "cell-a")["history"]
    assert len(history) == 5 and history[0]["revision"] == _rev(rewound)


def test_containers_are_enforced_within_a_second(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([], [], conntrack=False)
    store = tmp_path / "store.json"
    present = [container("c0", 0)]
    write_store(store, present)
    c1 = policy_repo.commit("rules", {"sg.yaml": sg("web", tcp_rules(5))})
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(store),
        netns=lab.cell,
        interval="60s",
        **BARE_CELL,
    ).start()
    wait_for(_applied(policy_repo.bare, "cell-a", c1), 15, what="first apply")

    def chain(handle: str) -> str:
        return container_chain(content_id(f"container {handle}"))

    latencies = []
    for i in range(1, 6):
        present.append(container(f"c{i}", i))
        t0 = time.monotonic()
        write_store(store, present)
        wait_for(lambda h=f"c{i}": chain(h) in kernel(lab.cell).chains, 3, 0.01, f"c{i}")
        latencies.append(time.monotonic() - t0)
    gone = present.pop(2)
    t0 = time.monotonic()
    write_store(store, present)
    wait_for(lambda: chain(gone.handle) not in kernel(lab.cell).chains, 3, 0.01, "removal")
    latencies.append(time.monotonic() - t0)
    assert max(latencies) < 1.0, latencies

    # A half-written file keeps the last good inventory, and is reported.
    before = dict(kernel(lab.cell).chains)
    store.write_text('{"c9": {"handle": "c9", "ip": "198.18.0.')
    wait_for(
        lambda: ready(read_status(policy_repo.bare, "cell-a")).get("reason") == "InventoryInvalid",
        5,
        what="InventoryInvalid reported",
    )
    assert dict(kernel(lab.cell).chains) == before
    write_store(store, present)
    wait_for(_applied(policy_repo.bare, "cell-a", c1), 5, what="Ready again")

    # Drift: someone deletes one of our rules; the next sync (SIGHUP: now) puts it back.
    group = next(n for n in before if n.startswith("ASG-G-"))
    rule = before[group][0]
    tool = f"iptables-{backend_for(lab.cell).variant}"
    lab.cell_exec([tool, "-D", *shlex.split(rule)[1:]], check=True)
    assert dict(kernel(lab.cell).chains) != before
    a.signal(signal.SIGHUP)
    wait_for(lambda: dict(kernel(lab.cell).chains) == before, 5, what="drift repaired")
    doc = wait_for(
        lambda: (
            (d := read_status(policy_repo.bare, "cell-a")) and d["drift"]["corrections"] >= 1 and d
        ),
        5,
        what="drift reported",
    )
    assert doc["drift"]["recent"][0]["what"] == "rule-missing"
    assert doc["drift"]["recent"][0]["repaired"] is True


def test_signals_sync_now_and_stop_with_rules_in_place(
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([WEB], [ECHO], conntrack=False)
    c1 = policy_repo.commit("80", _allow(lab, 80))
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(lab.write_store()),
        netns=lab.cell,
        interval="60s",
    ).start()
    wait_for(_applied(policy_repo.bare, "cell-a", c1), 15, what="first apply")
    c2 = policy_repo.commit("8080 too", _allow(lab, 80, 8080))
    t0 = time.monotonic()
    a.signal(signal.SIGHUP)
    wait_for(
        lambda: lab.probe_tcp("web", "echo", 8080, timeout=0.2).outcome is Outcome.CONNECTED, 5
    )
    assert time.monotonic() - t0 < 2.0
    wait_for(_applied(policy_repo.bare, "cell-a", c2), 5, what="c2 reported")
    rules = dict(kernel(lab.cell).chains)
    assert a.stop() == 0
    assert dict(kernel(lab.cell).chains) == rules  # exit leaves the rules in place
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED


def test_kill9_at_random_points_leaves_the_old_or_the_new_plan(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([], [], conntrack=False)
    store = write_store(
        tmp_path / "store.json",
        [container(f"c{i}", i, app=f"app-{i % 3}", space=f"space-{i % 2}") for i in range(30)],
    )
    inventory = parse_store(store.read_text())
    # Two plans that share some groups and differ in others: any partial state differs from both.
    plan_a = {
        "a.yaml": sg("shared", tcp_rules(100, net=1)),
        "b.yaml": sg("space0", tcp_rules(300, net=2), running=False, spaces=("space-0",)),
    }
    plan_b = {
        "a.yaml": sg("shared", tcp_rules(100, net=1)),
        "b.yaml": sg("space1", tcp_rules(300, net=3), running=False, spaces=("space-1",)),
    }
    shas = [policy_repo.commit("A", plan_a), policy_repo.commit("B", plan_b)]
    expected = {
        "A": _expected(policy_repo, shas[0], inventory, "cell-a"),
        "B": _expected(policy_repo, shas[1], inventory, "cell-a"),
    }
    assert expected["A"] != expected["B"]

    stop = threading.Event()

    def flip() -> None:  # keep the branch moving: a new head every ~150 ms
        n = 0
        while not stop.is_set():
            n += 1
            policy_repo.commit(f"flip {n}", plan_a if n % 2 else plan_b)
            time.sleep(0.15)

    writer = threading.Thread(target=flip, daemon=True)
    a = agents(
        "cell-a",
        source=policy_repo.url,
        containers=str(store),
        netns=lab.cell,
        interval="100ms",
        jitter="0%",
        **{"mass-revoke-threshold": "100%", "status-push": False},
        **BARE_CELL,
    )
    rng = random.Random(1234)
    seen: dict[str, int] = {"A": 0, "B": 0, "empty": 0}
    mid_restore = 0
    writer.start()
    try:
        for i in range(14):
            a.start()
            assert a.proc is not None
            if i % 2:
                time.sleep(rng.uniform(0.3, 1.5))  # anywhere in the cycle
            else:  # while an iptables-restore of the agent's is running
                mid_restore += _await_restore(a.proc.pid, timeout=3.0)
                time.sleep(rng.uniform(0, 0.004))
            a.kill9()
            state = kernel(lab.cell)
            chains = dict(state.chains)
            match = next((k for k, v in expected.items() if chains == v), None)
            if match is None:
                assert chains == {} and not state.hooks, "a partial ruleset was left behind"
                match = "empty"
            else:
                assert len(state.hooks) == 1 and state.hooks[0].index == 0
            seen[match] += 1
    finally:
        stop.set()
        writer.join()
    print(f"kill -9: {seen}, {mid_restore} of 7 while iptables-restore ran")
    assert seen["A"] + seen["B"] >= 10, seen
    assert mid_restore >= 5, mid_restore


def _await_restore(pid: int, timeout: float) -> bool:
    """Wait until `pid` has an iptables-restore child running; False at the timeout."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = children.read_text().split()
        except OSError:
            return False
        for kid in kids:
            try:
                argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"-restore") for a in argv):
                return True
        time.sleep(0.0005)
    return False


HOST_CHAINS_V4 = (
    "*filter",
    ":ASG-ADMIN-BLOCKLIST - [0:0]",
    ":ASG-LEGACY - [0:0]",
    "-A INPUT -j ASG-ADMIN-BLOCKLIST",
    "-A ASG-ADMIN-BLOCKLIST -s 198.18.200.7/32 -j DROP",
    "-A ASG-LEGACY -d 198.18.200.8/32 -p tcp -m tcp --dport 22 -j ACCEPT",
    "COMMIT",
)


def test_the_hosts_prefixed_chains_are_logged_once_and_never_taken_over(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    """Issue 20 through the agent's cycle (in-process, real kernel): the host's `ASG-`
    chains are logged once as someone else's and survive, Ready stays True; a host chain
    named like the plan's dispatch chain makes the cycle fail (Ready False) with the reason,
    and is left exactly as it was."""
    from reconciler.agent.config import build_config
    from reconciler.agent.core import condition
    from reconciler.agent.loop import SYNC, Agent
    from reconciler.backends import Runner
    from reconciler.backends.iptables.backend import IptablesBackend
    from tests.agentkit import local_repo

    require_netns()
    repo = local_repo(tmp_path)
    repo.commit("allow", {"sg.yaml": sg("web", tcp_rules(3))})
    store = write_store(tmp_path / "store.json", [container("c0", 0), container("c1", 1)])

    def agent(lab: Lab, state: str) -> tuple[Agent, io.StringIO]:
        cfg = build_config(
            {
                "source": repo.url,
                "cell": "host",
                "containers": str(store),
                "state-dir": str(tmp_path / state),
            },
            {},
        )
        backend = IptablesBackend.open("legacy", Runner.in_netns(lab.cell))
        err = io.StringIO()
        return Agent(cfg, out=io.StringIO(), err=err, backend=backend), err

    def save(lab: Lab) -> list[str]:
        text = lab.cell_exec(["iptables-legacy-save", "-t", "filter"], check=True).stdout
        return [x for x in text.splitlines() if not x.startswith("#")]

    lab = make_lab(conntrack=False)
    lab.cell_exec(
        ["iptables-legacy-restore", "--noflush"], input="\n".join(HOST_CHAINS_V4) + "\n", check=True
    )
    theirs = [x for x in save(lab) if "ASG-LEGACY" in x or "ASG-ADMIN" in x]
    a, err = agent(lab, "state-a")
    for _ in range(2):
        st = a.cycle(SYNC)
        assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
        assert st.applied is not None and kernel(lab.cell).chains
        assert [x for x in save(lab) if "ASG-LEGACY" in x or "ASG-ADMIN" in x] == theirs
    logged = [json.loads(x) for x in err.getvalue().splitlines()]
    foreign = [x for x in logged if x["event"] == "foreign-chains"]
    assert [x["chains"] for x in foreign] == [["ipv4 ASG-ADMIN-BLOCKLIST", "ipv4 ASG-LEGACY"]]

    other = make_lab(conntrack=False)
    clash = (*HOST_CHAINS_V4[:-1], ":ASG-FORWARD - [0:0]", "-A ASG-FORWARD -j RETURN", "COMMIT")
    other.cell_exec(
        ["iptables-legacy-restore", "--noflush"], input="\n".join(clash) + "\n", check=True
    )
    before = save(other)
    b, _ = agent(other, "state-b")
    st = b.cycle(SYNC)
    ready = condition(st.conditions, "Ready")
    assert ready is not None and ready.status == "False" and ready.reason == "EnforcementFailed"
    assert "ASG-FORWARD" in ready.message and "not taken over" in ready.message
    assert save(other) == before


def test_a_cell_without_an_underlay_is_not_enforced_and_says_why(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    """No default route and no `underlay-interface`: judging every packet would break
    container-to-container traffic, judging none would lift every ASG, so nothing is
    installed and Ready says why; naming the underlay enforces at once."""
    require_netns()
    lab = make_lab([], [], conntrack=False)
    store = write_store(tmp_path / "store.json", [container("c0", 0)])
    sha = policy_repo.commit("rules", {"sg.yaml": sg("web", tcp_rules(3))})
    a = agents("cell-a", source=policy_repo.url, containers=str(store), netns=lab.cell)
    res = a.once()
    assert res.returncode == 1, res.stderr
    doc = read_status(policy_repo.bare, "cell-a")
    assert ready(doc)["status"] == "False" and ready(doc)["reason"] == "UnderlayUnknown"
    assert "set underlay-interface" in ready(doc)["message"]
    assert dict(kernel(lab.cell).chains) == {} and not kernel(lab.cell).hooks
    named = agents(
        "cell-a", source=policy_repo.url, containers=str(store), netns=lab.cell, **BARE_CELL
    )
    assert named.once().returncode == 0
    assert read_status(policy_repo.bare, "cell-a")["lastAppliedRevision"] == _rev(sha)
    hooks = [h.text for h in kernel(lab.cell).hooks]
    assert hooks == ['-A FORWARD -o uplink0 -m comment --comment "asg:forward" -j ASG-FORWARD']
