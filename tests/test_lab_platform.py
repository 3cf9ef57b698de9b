"""`asgctl lab`: the multi-cell platform, its address plan, its matrix and its cleanup.

The demo and anyone poking at the lab trust two things tested here: that the lab only ever
uses the benchmark ranges and short interface names (pure, no root), and that `down` leaves
nothing behind -- after a clean run, twice in a row, and after `up` was killed with SIGKILL
half-way through building (real namespaces; skipped without root, failing under CI=true).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from asgctl_lab import platform
from asgctl_lab.matrix import Matrix, Row, Target, Verdict, classify, parse_target
from asgctl_lab.nsenter import list_netns
from asgctl_lab.policyrepo import parse_status
from asgctl_lab.probe import Outcome, ProbeResult
from reconciler.cli import main as cli
from tests.conftest import require_netns, skip_unless_available

POLICIES = Path(__file__).resolve().parents[1] / "policies"
LAB_NETS = (ipaddress.ip_network("198.18.0.0/15"),)

# -- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("cells", [1, 2, 5])
def test_address_plan_stays_in_the_lab_ranges_with_short_unique_names(cells: int) -> None:
    spec = platform.default_spec(cells)
    net = platform.plan_network("asgl00ff", spec)
    assert platform.plan_network("asgl00ff", spec) == net  # deterministic
    assert (
        len(set(net.namespaces))
        == len(net.namespaces)
        == 1 + cells + len(spec.containers) + len(spec.services)
    )
    assert all(ns.startswith("asgl00ff-") for ns in net.namespaces)
    ends = [(ns, n) for v in net.veths for ns, n in ((v.a_netns, v.a_if), (v.b_netns, v.b_if))]
    assert len(set(ends)) == len(ends)  # unique within each namespace
    ifnames = [n for _, n in ends]
    assert all(len(n) <= platform.MAX_IFNAME for n in ifnames)
    # Named after the lab, so a stray one is found -- but a cell's underlay is `eth0`, as on
    # a Diego cell, and lives (and dies) only inside the cell's namespace.
    cells_ns = {c.netns for c in net.cells.values()}
    for ns, n in ends:
        assert n.startswith("asgl00ff-") or (n == "eth0" and ns in cells_ns), (ns, n)
    assert (
        sorted(n for ns, n in ends if ns in cells_ns and not n.startswith("asgl"))
        == ["eth0"] * cells
    )
    addresses = [c.ip for c in net.containers.values()]
    addresses += [c.gateway for c in net.containers.values()]
    addresses += [a for c in net.cells.values() for a in (c.uplink_ip, c.core_ip, c.vtep_ip)]
    addresses += [s.gateway for s in net.services.values()]
    addresses += [a for s in spec.services for a in s.addresses]
    assert len(set(addresses)) == len(addresses)
    for a in addresses:
        assert any(ipaddress.ip_address(a) in n for n in LAB_NETS), a
    # Containers sit in their cell's subnet, behind their own gateway.
    for c in spec.containers:
        cn = net.containers[c.name]
        subnet = ipaddress.ip_network(net.cells[c.cell].subnet)
        assert ipaddress.ip_address(cn.ip) in subnet and ipaddress.ip_address(cn.gateway) in subnet


def test_default_spec_tells_the_seeds_stories() -> None:
    spec = platform.default_spec(2)
    by_name = {c.name: c for c in spec.containers}
    # backend and frontend of the same space on the same cell; another backend elsewhere.
    assert by_name["backend-0"].cell == by_name["frontend-0"].cell == "cell-1"
    assert by_name["backend-0"].app == "payments/prod/backend"
    assert by_name["frontend-0"].app == "payments/prod/frontend"
    assert by_name["backend-1"].cell == "cell-2"
    assert by_name["blog-staging"].workload == "staging"
    services = {s.name: s for s in spec.services}
    assert services["mysql"].addresses == ("198.19.10.10",)
    assert services["mysql"].tcp == (3306,)
    assert services["dns"].udp == (53,) and services["dns"].tcp == (53,)
    assert [s.name for s in spec.services if s.dns] == ["dns"]  # the one real DNS server
    assert services["card-api"].addresses == (platform.CARD_API,)
    assert len(services["cdn"].addresses) == 16
    names = platform.lab_names(spec)
    assert names["card-api.lab.example"] == [platform.CARD_API]
    assert names["cdn.lab.example"] == list(services["cdn"].addresses)
    assert names["mysql.lab.example"] == ["198.19.10.10"]
    assert "198.19.20.20" in services["payments-api"].addresses
    assert services["metrics"].udp == (8125,)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: platform.LabService("db", ("10.0.0.1",), tcp=(1,)), "198.19.0.0/16"),
        (lambda: platform.LabService("db", ("198.18.0.9",), tcp=(1,)), "198.19.0.0/16"),
        (lambda: platform.LabService("db", ("198.19.0.9",), tcp=(0,)), "ports"),
        (lambda: platform.LabContainer("Bad Name", "cell-1", "a/b/c"), "container name"),
        (lambda: platform.LabContainer("web", "cell-1", "just-an-app"), "org/space/app"),
        (
            lambda: platform.LabSpec(
                ("cell-1",), (platform.LabContainer("w", "cell-9", "a/b/c"),), ()
            ),
            "no cell",
        ),
        (
            lambda: platform.LabSpec(
                ("cell-1",),
                (),
                (
                    platform.LabService("a", ("198.19.1.1",)),
                    platform.LabService("b", ("198.19.1.1",)),
                ),
            ),
            "share an address",
        ),
        (lambda: platform.default_spec(0), "cells"),
        (lambda: platform.LabService("ns", ("198.19.1.1",), udp=(53,), dns=True), "53/tcp"),
        (
            lambda: platform.LabSpec(
                ("cell-1",),
                (),
                tuple(
                    platform.LabService(n, (a,), tcp=(53,), udp=(53,), dns=True)
                    for n, a in (("a", "198.19.1.1"), ("b", "198.19.1.2"))
                ),
            ),
            "one DNS server",
        ),
    ],
)
def test_specs_refuse_what_the_lab_cannot_build(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        build()


def test_store_json_carries_the_directorys_guids() -> None:
    spec = platform.default_spec(2)
    net = platform.plan_network("asgl0001", spec)
    guids = platform.resolve_guids(POLICIES, sorted({c.app for c in spec.containers}))
    doc = platform.store_document(spec, "cell-1", net, guids)
    assert sorted(doc) == ["backend-0", "blog-0", "frontend-0"]
    assert doc["backend-0"] == {
        "handle": "backend-0",
        "ip": net.containers["backend-0"].ip,
        "metadata": {
            "app_id": "a1b2c3d4-0003-4e5f-9a8b-000000000003",
            "space_id": "7b1d2e4f-0002-4c3a-8f2b-000000000002",
            "org_id": "5e2f3c8a-0001-4a6e-9d1e-000000000001",
            "policy_group_id": "a1b2c3d4-0003-4e5f-9a8b-000000000003",
            "container_workload": "app",
        },
    }
    staging = platform.store_document(spec, "cell-2", net, guids)["blog-staging"]
    assert staging["metadata"]["container_workload"] == "staging"
    with pytest.raises(platform.PlatformError, match="not in the directory"):
        platform.resolve_guids(POLICIES, ["payments/prod/nope"])


def test_lab_names_are_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(platform.STATE_ENV, str(tmp_path))
    assert platform.lab_dir("demo") == tmp_path / "demo"
    for bad in ("../etc", "Demo", "", "a" * 40):
        with pytest.raises(platform.PlatformError, match="lab name"):
            platform.lab_dir(bad)
    with pytest.raises(platform.PlatformError, match="no lab called 'demo'"):
        platform.load("demo")
    assert platform.down("demo") == []  # nothing there: nothing to do, no error


def _result(outcome: Outcome, icmp_from: str | None = None) -> ProbeResult:
    return ProbeResult(
        outcome,
        "tcp",
        "x",
        0.01,
        icmp_type=3 if icmp_from else None,
        icmp_code=3 if icmp_from else None,
        icmp_from=icmp_from,
    )


def test_matrix_tells_who_said_no() -> None:
    gw, addr = "198.18.1.1", "198.19.10.10"
    assert classify(_result(Outcome.CONNECTED), gw, addr) is Verdict.OPEN
    assert classify(_result(Outcome.REJECTED, gw), gw, addr) is Verdict.REJECTED
    assert classify(_result(Outcome.REJECTED, addr), gw, addr) is Verdict.REFUSED
    assert classify(_result(Outcome.REJECTED, "198.18.0.1"), gw, addr) is Verdict.UNREACHABLE
    # Across the overlay, the destination's cell says no from its silk-vtep address.
    vtep2 = "198.18.2.0"
    assert classify(_result(Outcome.REJECTED, vtep2), gw, "198.18.2.2", {vtep2}) is Verdict.REJECTED
    assert classify(_result(Outcome.REJECTED, vtep2), gw, "198.18.2.2") is Verdict.UNREACHABLE
    assert classify(_result(Outcome.TIMEOUT), gw, addr) is Verdict.TIMEOUT
    assert classify(_result(Outcome.REFUSED), gw, addr) is Verdict.REFUSED
    rows = (Row("backend-0", "cell-1", "payments/prod/backend", "app", "ns", gw),)
    targets = (Target("mysql", addr, 3306), Target("dns", "198.19.53.53", 53, "udp"))
    m = Matrix(
        rows,
        targets,
        {
            ("backend-0", "mysql"): _result(Outcome.CONNECTED),
            ("backend-0", "dns"): _result(Outcome.REJECTED, gw),
        },
    )
    text = m.render(title="t")
    assert text.splitlines()[0] == "t"
    assert "cell-1/backend-0" in text and "✓" in text and "✗ rejected" in text
    assert "payments/prod/backend" in m.render(wide=True)
    doc = m.to_dict()
    assert doc["rows"][0]["results"]["dns"]["verdict"] == "rejected"


def test_targets_parse() -> None:
    assert parse_target("mysql=198.19.10.10:3306") == Target("mysql", "198.19.10.10", 3306, "tcp")
    assert parse_target("198.19.53.53:53/udp") == Target(
        "198.19.53.53:53/udp", "198.19.53.53", 53, "udp"
    )
    for bad in ("198.19.1.1", "x=198.19.1.1:0", "198.19.1.1:53/sctp"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_status_documents_are_read_for_the_applied_revision() -> None:
    doc = {
        "lastAppliedRevision": "main@sha1:abc123",
        "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded"}],
    }
    st = parse_status("cell-1", "c0ffee", doc)
    assert (st.applied_sha, st.ready, st.reason) == ("abc123", "True", "ReconciliationSucceeded")
    assert parse_status("cell-2", "x", {}).applied_sha == ""


def test_lab_commands_refuse_clearly_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "unavailable_reason", lambda: "run it as root (sudo)")
    for args in (["up"], ["down"], ["status"], ["probe"], ["demo"]):
        result = CliRunner().invoke(cli, ["lab", *args])
        assert result.exit_code == 1, (args, result.output)
        assert "run it as root" in result.output


# -- real namespaces -----------------------------------------------------------------------


def require_lab() -> None:
    """require_netns(), and the lab's own tools (git, nft): skip, or fail under CI=true."""
    require_netns()
    skip_unless_available("lab", platform.unavailable_reason())


def asgctl(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from reconciler.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        cwd=POLICIES.parent,
    )


def leftovers(lab_id: str, state: Path, pids: list[int]) -> list[str]:
    """Everything of a lab still on the host: namespaces, processes, state, the containers'
    resolv.conf folders."""
    found = [f"netns {n}" for n in list_netns() if n.startswith(f"{lab_id}-")]
    found += [f"etc {d}" for d in platform.ETC_NETNS.glob(f"{lab_id}-*")]
    found += [f"pid {p}" for p in pids if platform.process_start_time(p) is not None]
    found += [f"dir {state}"] if state.exists() else []
    found += [f"process mentioning {state}: {p}" for p in platform._processes_mentioning(state)]
    return found


@pytest.fixture
def lab_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A state root of the test's own, so nothing here can touch a lab someone else runs."""
    require_lab()
    root = tmp_path / "labs"
    env = {**os.environ, platform.STATE_ENV: str(root)}
    yield env
    for name in root.iterdir() if root.exists() else []:  # whatever a failed test left
        asgctl("lab", "down", "--name", name.name, env=env)


@pytest.mark.netns
def test_up_and_down_twice_in_a_row_leave_nothing_behind(lab_env: dict[str, str]) -> None:
    root = Path(lab_env[platform.STATE_ENV])
    for attempt in (1, 2):
        up = asgctl("lab", "up", "--name", "twice", "--interval", "1s", env=lab_env)
        assert up.returncode == 0, up.stderr
        doc = json.loads((root / "twice" / "lab.json").read_text())
        lab_id, pids = doc["id"], [p["pid"] for p in doc["processes"]]
        roles = sorted({p["role"] for p in doc["processes"]})
        assert roles == ["agent", "app", "container", "dns", "git-daemon", "service"], attempt
        assert doc["phase"] == "up" and doc["git_url"].startswith("git://127.0.0.1:")
        status = asgctl("lab", "status", "--name", "twice", env=lab_env)
        assert status.returncode == 0 and "healthy" in status.stdout, status.stdout
        assert leftovers(lab_id, root / "twice", pids)
        # From another process, the lab is found and probed: no agent has applied anything
        # yet or it has (a race we do not care about here); the path through the core
        # router must work either way for DNS, which every container may reach.
        probe = asgctl(
            "lab",
            "probe",
            "--name",
            "twice",
            "--target",
            "dns=198.19.53.53:53/udp",
            "--format",
            "json",
            env=lab_env,
        )
        assert probe.returncode == 0, probe.stderr
        rows = json.loads(probe.stdout)["rows"]
        assert {r["results"]["dns"]["verdict"] for r in rows} == {"open"}
        for _ in (1, 2):  # down may run twice
            down = asgctl("lab", "down", "--name", "twice", env=lab_env)
            assert down.returncode == 0, down.stderr
        assert leftovers(lab_id, root / "twice", pids) == []
        missing = asgctl("lab", "status", "--name", "twice", env=lab_env)
        assert missing.returncode == 1 and "no lab called" in missing.stderr


@pytest.mark.netns
def test_down_cleans_up_after_up_is_killed_half_way(lab_env: dict[str, str]) -> None:
    root = Path(lab_env[platform.STATE_ENV])
    state = root / "crash"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from reconciler.cli import main; main()",
            "lab",
            "up",
            "--name",
            "crash",
        ],
        env=lab_env,
        cwd=POLICIES.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it once it has started processes in namespaces, i.e. truly half-way.
    doc: dict = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            doc = json.loads((state / "lab.json").read_text())
        except (OSError, ValueError):
            doc = {}
        if len(doc.get("processes", [])) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert doc.get("phase") == "building", "up finished before it could be killed"
    doc = json.loads((state / "lab.json").read_text())
    lab_id, pids = doc["id"], [p["pid"] for p in doc["processes"]]
    assert leftovers(lab_id, state, pids), "the crash left nothing to clean up"
    down = asgctl("lab", "down", "--name", "crash", env=lab_env)
    assert down.returncode == 0, down.stderr
    assert leftovers(lab_id, state, pids) == []
    assert asgctl("lab", "down", "--name", "crash", env=lab_env).returncode == 0


@pytest.mark.netns
def test_down_also_stops_agents_and_git_after_a_kill_of_the_demo(lab_env: dict[str, str]) -> None:
    """A lab whose owner died with everything running (agents, git daemon) is removed."""
    root = Path(lab_env[platform.STATE_ENV])
    script = (
        "import os, signal\n"
        "from asgctl_lab import platform\n"
        "info = platform.up('orphaned', platform.default_spec(1))\n"
        "platform.start_agents(info, '1s')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", script],
        env=lab_env,
        cwd=POLICIES.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    doc = json.loads((root / "orphaned" / "lab.json").read_text())
    pids = [p["pid"] for p in doc["processes"]]
    host = [p["pid"] for p in doc["processes"] if p["role"] in ("agent", "git-daemon")]
    assert all(platform.process_start_time(p) is not None for p in host)
    assert asgctl("lab", "down", "--name", "orphaned", env=lab_env).returncode == 0
    assert leftovers(doc["id"], root / "orphaned", pids) == []


@pytest.mark.netns
@pytest.mark.requires("dnsmasq", "getent")
def test_up_serves_the_labs_names_and_containers_resolve_through_it(
    lab_env: dict[str, str],
) -> None:
    """`asgctl lab up` starts the lab's DNS server in the outside world (dnsmasq, recorded as
    every lab process); a container's own resolver (glibc, through the resolv.conf `ip netns
    exec` mounts) asks it across the cell's firewall; `asgctl lab dns set` moves a record with
    no restart; `asgctl lab down` leaves no process, namespace, resolv.conf or directory."""
    root = Path(lab_env[platform.STATE_ENV])
    up = asgctl("lab", "up", "--name", "names", "--cells", "1", "--no-agents", env=lab_env)
    assert up.returncode == 0, up.stderr
    doc = json.loads((root / "names" / "lab.json").read_text())
    lab_id, pids = doc["id"], [p["pid"] for p in doc["processes"]]
    (server,) = [p for p in doc["processes"] if p["role"] == "dns"]
    assert Path(f"/proc/{server['pid']}/exe").resolve().name == "dnsmasq"
    try:
        container = f"{lab_id}-c-backend-0"
        resolved = subprocess.run(
            ["ip", "netns", "exec", container, "getent", "ahostsv4", "card-api.lab.example"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert resolved.stdout.split()[:1] == [platform.CARD_API], resolved
        # The round-robin name, asked from a container: all sixteen, a new first each time.
        firsts = []
        for _ in range(4):
            ask = asgctl(
                "lab",
                "dns",
                "ask",
                "--name",
                "names",
                "cdn.lab.example",
                "--from",
                "blog-0",
                env=lab_env,
            )
            assert ask.returncode == 0, ask.stderr
            assert sorted(ask.stdout.split()) == sorted(platform.CDN)
            firsts.append(ask.stdout.split()[0])
        assert all(a != b for a, b in itertools.pairwise(firsts)), firsts
        # The provider moves the card API: the same server process answers the new address.
        moved = asgctl(
            "lab",
            "dns",
            "set",
            "--name",
            "names",
            "card-api.lab.example",
            "198.19.140.40",
            env=lab_env,
        )
        assert moved.returncode == 0, moved.stderr
        ask = asgctl(
            "lab",
            "dns",
            "ask",
            "--name",
            "names",
            "card-api.lab.example",
            "--from",
            "backend-0",
            env=lab_env,
        )
        assert ask.stdout.split() == ["198.19.140.40"], ask
        assert platform.process_start_time(server["pid"]) == server["start"]
        shown = asgctl("lab", "dns", "show", "--name", "names", env=lab_env)
        assert "card-api.lab.example             198.19.140.40\n" in shown.stdout
        # Bad input: named, non-zero, nothing changed.
        bad = asgctl(
            "lab",
            "dns",
            "set",
            "--name",
            "names",
            "card-api.lab.example",
            "8.8.8.8",
            env=lab_env,
        )
        assert bad.returncode == 1 and "8.8.8.8: lab addresses are in" in bad.stderr
        still = asgctl("lab", "dns", "show", "--name", "names", env=lab_env)
        assert still.stdout == shown.stdout
    finally:
        down = asgctl("lab", "down", "--name", "names", env=lab_env)
    assert down.returncode == 0, down.stderr
    assert leftovers(lab_id, root / "names", pids) == []
    assert platform.process_start_time(server["pid"]) is None
