"""The network-namespace lab: real namespaces, real packets, and nothing left behind.

The end-to-end tests trust this harness to tell "allowed", "rejected" and "dropped" apart and
to leave the host clean, so both are tested here directly.  Pure parts (address plan,
store.json) are tested without root; everything else needs namespaces (marker `netns`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from asgctl_lab import netns as netns_module
from asgctl_lab.netns import (
    MAX_IFNAME,
    OWNER_DIR,
    ContainerSpec,
    Lab,
    ServiceSpec,
    cleanup_stale,
    plan_endpoints,
    store_document,
    write_json_atomic,
)
from asgctl_lab.nsenter import list_links, list_netns, netns_pids
from asgctl_lab.probe import Outcome, check_lab_address, probe_tcp
from tests.conftest import STANDARD_CONTAINERS, STANDARD_SERVICES, require_netns

FAST = 0.3  # timeout for probes that are expected to time out

# -- pure parts ----------------------------------------------------------------------------


def test_address_plan_uses_only_lab_ranges_and_short_names() -> None:
    containers = [ContainerSpec(f"c{i}", ipv6=True) for i in range(3)]
    services = [ServiceSpec("db", tcp_ports=[5432], ipv6=True), ServiceSpec("dns")]
    ctrs, svcs = plan_endpoints("asgt00ff", containers, services)
    assert plan_endpoints("asgt00ff", containers, services) == (ctrs, svcs)  # deterministic
    assert ctrs["c0"].ipv4 == "198.18.0.2" and ctrs["c0"].gateway4 == "198.18.0.1"
    assert ctrs["c2"].ipv4 == "198.18.0.10" and ctrs["c2"].ipv6 == "fd00:18:0:2::2"
    assert svcs["db"].ipv4 == "198.19.0.2" and svcs["db"].gateway6 == "fd00:19::1"
    assert svcs["dns"].ipv6 is None
    for ep in [*ctrs.values(), *svcs.values()]:
        assert ep.netns.startswith("asgt00ff-")
        assert ep.ifname.startswith("asgt00ff-") and ep.cell_ifname.startswith("asgt00ff-")
        assert len(ep.ifname) <= MAX_IFNAME and len(ep.cell_ifname) <= MAX_IFNAME
        pairs = [(ep.ipv4, ep.gateway4, 30), (ep.ipv6, ep.gateway6, 64)]
        for host, gateway, bits in pairs:
            if host is None:
                continue
            assert check_lab_address(host) and check_lab_address(gateway)
            assert ipaddress.ip_interface(f"{host}/{bits}").network == (
                ipaddress.ip_interface(f"{gateway}/{bits}").network
            )


@pytest.mark.parametrize(
    ("lab_id", "containers", "message"),
    [
        ("ASGT", [], "lab id"),
        ("asgt123456", [], "lab id"),
        ("asgt0001", [ContainerSpec("a"), ContainerSpec("a")], "duplicate container names"),
        (
            "asgt0001",
            [ContainerSpec("a", handle="h"), ContainerSpec("b", handle="h")],
            "duplicate container handles",
        ),
    ],
)
def test_address_plan_rejects_bad_input(
    lab_id: str, containers: list[ContainerSpec], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_endpoints(lab_id, containers, [])


def test_specs_validate_names_ports_and_workloads() -> None:
    with pytest.raises(ValueError, match="name"):
        ContainerSpec("bad name")
    with pytest.raises(ValueError, match="workload"):
        ContainerSpec("a", workload="daemon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tcp_ports"):
        ServiceSpec("s", tcp_ports=(0,))
    assert ServiceSpec("s", udp_ports=[53]).udp_ports == (53,)
    assert ContainerSpec("a").handle == "a"


def test_store_document_is_cf_container_metadata_format(tmp_path: Path) -> None:
    ctrs, _ = plan_endpoints("asgt0001", STANDARD_CONTAINERS, [])
    doc = store_document(STANDARD_CONTAINERS, ctrs)
    assert doc["web"] == {
        "handle": "web",
        "ip": "198.18.0.2",
        "metadata": {
            "app_id": "app-web",
            "space_id": "space-prod",
            "org_id": "org-acme",
            "policy_group_id": "pg-web",
            "container_workload": "app",
        },
    }
    assert doc["stager"]["metadata"]["container_workload"] == "staging"
    path = write_json_atomic(tmp_path / "store.json", {"old": 1})
    write_json_atomic(path, doc)
    assert json.loads(path.read_text()) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]  # no temp file left


def test_probes_refuse_addresses_outside_the_lab_ranges() -> None:
    for outside in ("8.8.8.8", "10.0.0.1", "2001:db8::1", "198.20.0.1"):
        with pytest.raises(ValueError, match="outside the lab ranges"):
            probe_tcp("no-such-netns", outside, 80)


def test_require_netns_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns_module, "_UNAVAILABLE", ["not root"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not root"):
        require_netns()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not root"):
        require_netns()
    monkeypatch.setattr(netns_module, "_UNAVAILABLE", [None])
    require_netns()  # available: neither skips nor fails


# -- real namespaces -----------------------------------------------------------------------


def _leftovers(lab_id: str) -> list[str]:
    """Everything on the host still named after `lab_id`."""
    found = [f"netns {n}" for n in list_netns() if n.startswith(f"{lab_id}-")]
    found += [f"link {n}" for n in list_links() if n.startswith(f"{lab_id}-")]
    found += [f"dir {p}" for p in Path(tempfile.gettempdir()).glob(f"{lab_id}-*")]
    found += [f"record {p}" for p in OWNER_DIR.glob(f"{lab_id}.json")]
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _restore(lab: Lab, rules4: str, rules6: str | None = None) -> None:
    """Load a filter table into the cell, as the reconciler will (one --noflush transaction)."""
    for tool, rules in (("iptables-restore", rules4), ("ip6tables-restore", rules6 or rules4)):
        lab.cell_exec([tool, "--noflush"], input=textwrap.dedent(rules), check=True)


FORWARD_REJECT = """\
    *filter
    -A FORWARD -j REJECT
    COMMIT
    """
FORWARD_DROP = """\
    *filter
    -A FORWARD -j DROP
    COMMIT
    """


@pytest.mark.netns
def test_container_reaches_tcp_udp_and_icmp_without_a_firewall(lab: Lab) -> None:
    for ipv6 in (False, True):
        for port in (80, 8080):
            assert lab.probe_tcp("web", "echo", port, ipv6=ipv6).outcome is Outcome.CONNECTED
        assert lab.probe_udp("web", "echo", 53, ipv6=ipv6).outcome is Outcome.REPLIED
        assert lab.ping("web", "echo", ipv6=ipv6).outcome is Outcome.REPLIED
        # Nothing listening: TCP gets a RST, UDP an ICMP port-unreachable from the service.
        assert lab.probe_tcp("web", "echo", 81, ipv6=ipv6).outcome is Outcome.REFUSED
        closed = lab.probe_udp("web", "echo", 54, ipv6=ipv6)
        assert closed.outcome is Outcome.REJECTED, closed
        assert closed.icmp_from == lab.services["echo"].address(ipv6)
    assert lab.probe_tcp("stager", "other", 443).outcome is Outcome.CONNECTED
    assert lab.ping("web", "echo", icmp_type=13).outcome is Outcome.REPLIED  # timestamp


@pytest.mark.netns
def test_reject_in_the_cell_forward_chain_is_reported_as_rejected(lab: Lab) -> None:
    _restore(lab, FORWARD_REJECT)
    web = lab.containers["web"]
    for ipv6 in (False, True):
        results = [
            lab.probe_tcp("web", "echo", 80, ipv6=ipv6),
            lab.probe_udp("web", "echo", 53, ipv6=ipv6),
            lab.ping("web", "echo", ipv6=ipv6),
        ]
        for result in results:
            assert result.outcome is Outcome.REJECTED, result
            assert result.icmp_from == (web.gateway6 if ipv6 else web.gateway4), result
            assert result.elapsed < 0.5, result
    # More rejects in a row than the kernel's default ICMP rate limit lets through.
    burst = [lab.probe_tcp("web", "echo", 80).outcome for _ in range(20)]
    assert set(burst) == {Outcome.REJECTED}
    # A tcp-reset reject looks like a closed port.
    lab.cell_exec(
        ["iptables", "-I", "FORWARD", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        check=True,
    )
    assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.REFUSED


@pytest.mark.netns
def test_drop_in_the_cell_forward_chain_is_reported_as_timeout(lab: Lab) -> None:
    _restore(lab, FORWARD_DROP)
    # In parallel threads (probes only move their own thread into the namespace), so the
    # test waits for one timeout, not four.
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(lab.probe_tcp, "web", "echo", 80, timeout=FAST),
            pool.submit(lab.probe_udp, "web", "echo", 53, timeout=FAST),
            pool.submit(lab.ping, "web", "echo", timeout=FAST),
            pool.submit(lab.probe_tcp, "web", "echo", 80, ipv6=True, timeout=FAST),
        ]
        results = [f.result() for f in futures]
    for result in results:
        assert result.outcome is Outcome.TIMEOUT, result
        assert FAST <= result.elapsed < FAST + 0.5, result


@pytest.mark.netns
def test_long_lived_connection_survives_rule_changes(lab: Lab) -> None:
    held = lab.hold_tcp("web", "echo", 8080)
    assert held.check()
    # An unrelated change: reject web -> other.
    other = lab.services["other"].ipv4
    _restore(
        lab,
        f"""\
        *filter
        -A FORWARD -d {other}/32 -j REJECT
        COMMIT
        """,
        "*filter\nCOMMIT\n",
    )
    assert lab.probe_tcp("web", "other", 443).outcome is Outcome.REJECTED
    assert held.check()
    # Default deny for new connections: the held one was opened before any rule existed and
    # still counts as ESTABLISHED, because the lab keeps conntrack on from the start.
    _restore(
        lab,
        """\
        *filter
        -I FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        -A FORWARD -j REJECT
        COMMIT
        """,
    )
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    assert all(held.check() for _ in range(3))
    held.close()
    assert not held.check()


@pytest.mark.netns
def test_cell_exec_runs_inside_the_cell_namespace(lab: Lab) -> None:
    links = lab.cell_exec(["ip", "-o", "link"])
    assert isinstance(links, subprocess.CompletedProcess) and links.returncode == 0
    for ep in [*lab.containers.values(), *lab.services.values()]:
        assert ep.cell_ifname in links.stdout
    assert lab.cell_exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert lab.cell_exec(["false"]).returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        lab.cell_exec(["false"], check=True)


@pytest.mark.netns
def test_write_store_writes_the_cells_containers(lab: Lab) -> None:
    path = lab.write_store()
    doc = json.loads(path.read_text())
    assert sorted(doc) == ["stager", "web"]
    assert doc["web"]["ip"] == lab.containers["web"].ipv4


@pytest.mark.netns
def test_teardown_removes_everything_and_can_run_twice(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(STANDARD_CONTAINERS, STANDARD_SERVICES)
    pids, workdir = lab.pids, lab.workdir
    held = lab.hold_tcp("web", "echo", 80)
    assert pids and workdir is not None and workdir.is_dir()
    assert len(_leftovers(lab.lab_id)) == len(lab.namespaces) + 2  # + workdir, owner record
    lab.teardown()
    lab.teardown()
    assert _leftovers(lab.lab_id) == []
    assert not [pid for pid in pids if _alive(pid)]
    assert held.closed


@pytest.mark.netns
def test_a_failing_with_block_still_removes_the_lab() -> None:
    require_netns()
    ids = []
    with (
        pytest.raises(RuntimeError, match="test body failed"),
        Lab([ContainerSpec("web")], [ServiceSpec("echo", tcp_ports=(80,))]) as lab,
    ):
        ids.append(lab.lab_id)
        raise RuntimeError("test body failed")
    assert ids and _leftovers(ids[0]) == []


@pytest.mark.netns
def test_a_failing_start_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()

    def broken(self: Lab) -> None:
        raise OSError("echo servers exploded")

    monkeypatch.setattr(Lab, "_start_servers", broken)
    lab = Lab([ContainerSpec("web")], [ServiceSpec("echo", tcp_ports=(80,))])
    with pytest.raises(OSError, match="exploded"):
        lab.start()
    assert _leftovers(lab.lab_id) == []


# Its lab id is not under PREFIX_ROOT, so a parallel test session's start-up cleanup_stale()
# cannot reap it before this test does.
CRASHING_OWNER = """\
import os, secrets, signal
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
lab = Lab(
    [ContainerSpec("web")],
    [ServiceSpec("echo", tcp_ports=(80,), udp_ports=(53,))],
    lab_id="asgx" + secrets.token_hex(2),
)
lab.start()
print(lab.lab_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.netns
def test_cleanup_stale_removes_a_crashed_lab_but_not_a_live_one(lab: Lab) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_OWNER], capture_output=True, text=True, timeout=30
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    dead_id = crashed.stdout.strip()
    assert _leftovers(dead_id)
    # Its echo servers saw their stdin close and exited on their own.
    service_ns = f"{dead_id}-s-echo"
    deadline = time.monotonic() + 5
    while netns_pids(service_ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert netns_pids(service_ns) == []

    assert cleanup_stale(lab.lab_id) == []  # alive: left alone
    removed = cleanup_stale(dead_id)
    assert f"netns {dead_id}-cell" in removed
    assert _leftovers(dead_id) == []
    assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
