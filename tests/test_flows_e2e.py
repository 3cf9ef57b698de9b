"""Flow records from real packets: a lab cell, a real agent, NFLOG read from the kernel.

Each test runs an `asgctl agent` process whose dataplane is a lab cell namespace; a
container there makes real connections, the kernel logs the verdicts to the agent's NFLOG
group, and the test reads what the agent wrote to `<state-dir>/flows/flows.jsonl` (and what
`asgctl flows` makes of it).  Waits are bounded waits on that state, never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from tests.agentkit import (  # noqa: F401 - fixtures
    ASGCTL,
    REPO_ROOT,
    AgentProc,
    PolicyRepo,
    agents,
    applied,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    wait_for,
)
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.requires("git")]

ORG_GUID, SPACE_GUID, APP_GUID = "org-acme", "space-prod", "app-web"
WEB = ContainerSpec("web", app_id=APP_GUID, space_id=SPACE_GUID, org_id=ORG_GUID)
ECHO = ServiceSpec("echo", tcp_ports=(80, 8080), udp_ports=(53,))
DIRECTORY = textwrap.dedent(
    f"""\
    kind: Directory
    orgs:
      - name: acme
        guid: {ORG_GUID}
        spaces:
          - name: prod
            guid: {SPACE_GUID}
            apps:
              - {{name: web, guid: {APP_GUID}}}
    """
)


def _policy(lab: Lab) -> dict[str, str]:
    """echo:80 allowed with `log: true` (line 3 of sg.yaml); everything else denied."""
    ip = lab.services["echo"].ipv4
    rule = f'{{protocol: tcp, destination: {ip}, ports: "80", log: true}}'
    return {"directory.yaml": DIRECTORY, "sg.yaml": sg("echo-logged", [rule])}


def _find(agent: AgentProc, **want: Any) -> Callable[[], list[dict[str, Any]]]:
    def check() -> list[dict[str, Any]]:
        return [r for r in agent.flow_records() if all(r.get(k) == v for k, v in want.items())]

    return check


def _start(
    lab: Lab, repo: PolicyRepo, make: Callable[..., AgentProc], backend: str, **extra: Any
) -> AgentProc:
    sha = repo.commit("echo:80 logged", _policy(lab))
    agent = make(
        f"flows-{backend}",
        source=repo.url,
        containers=str(lab.write_store()),
        netns=lab.cell,
        backend=backend,
        flow_log="nflog",
        flow_log_window="1s",
        **extra,
    ).start()

    wait_for(applied(repo.bare, agent.name, sha), 30, what="the agent applies the policy")
    return agent


def _flows_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ASGCTL, "flows", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


@pytest.fixture
def cell(make_lab: Callable[..., Lab]) -> Lab:
    require_netns()
    return make_lab([WEB], [ECHO])


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_denied_connection_becomes_one_record_naming_app_space_destination_and_port(
    cell: Lab,
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    backend: str,
) -> None:
    agent = _start(cell, policy_repo, agents, backend, flow_log_stdout=True)
    echo = cell.services["echo"].ipv4
    # A refused connect is one SYN (REJECT answers it at once); three of them in a row are
    # three packets of one flow: one aggregate, counted.
    for _ in range(3):
        assert cell.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    found = wait_for(
        _find(agent, verdict="deny", destination=echo, port=8080),
        15,
        what="a deny record for echo:8080",
    )
    record = found[0]
    assert record["app"] == "acme/prod/web" and record["app_id"] == APP_GUID
    assert record["space"] == "acme/prod" and record["org"] == "acme"
    assert record["container"] == "web" and record["source"] == cell.containers["web"].ipv4
    assert record["protocol"] == "tcp" and record["cell"] == agent.name
    assert sum(r["count"] for r in found) == 3
    # flow-log-stdout: the same records on the agent's stdout, as events.
    printed = wait_for(
        lambda: [r for r in agent.log_records() if r.get("event") == "flow"], 15, what="stdout"
    )
    assert any(r["destination"] == echo and r["port"] == 8080 for r in printed)
    # `asgctl flows` answers "what did app X get denied": by name, as JSON lines.
    res = _flows_cli(
        "--state-dir", str(agent.state_dir), "--app", "web", "--verdict", "deny", "--format", "json"
    )
    assert res.returncode == 0, res.stderr
    shown = [json.loads(line) for line in res.stdout.splitlines()]
    assert {(r["destination"], r["port"], r["verdict"]) for r in shown} == {(echo, 8080, "deny")}
    for key in ("time", "cell", "container", "app", "space", "protocol", "count"):
        assert key in shown[0]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_an_allowed_connection_through_a_log_rule_names_its_group_and_file_line(
    cell: Lab,
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    backend: str,
) -> None:
    agent = _start(cell, policy_repo, agents, backend)
    assert cell.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
    found = wait_for(_find(agent, verdict="allow", port=80), 15, what="an allow record for echo:80")
    rule = found[0]["rule"]
    assert len(rule["id"]) == 32 and len(rule["group"]) == 32
    # The rule's provenance: the SecurityGroup, its rule index, and file:line.
    assert rule["sources"] == ["SecurityGroup/echo-logged rules[0] (sg.yaml:4)"]
    assert found[0]["app"] == "acme/prod/web"
    # The NFLOG rules read back exactly as rendered: the agent never saw them as drift.
    doc = read_status(policy_repo.bare, agent.name) or {}
    assert doc["drift"]["corrections"] == 0 and doc["flows"]["error"] == ""
    # "Who used rule R": by the rule's id.
    res = _flows_cli("--state-dir", str(agent.state_dir), "--rule", rule["id"][:12])
    assert res.returncode == 0, res.stderr
    assert "acme/prod/web" in res.stdout and "(sg.yaml:4)" in res.stdout


FLOOD = textwrap.dedent(
    """\
    import socket, sys, time
    target, seconds = sys.argv[1], float(sys.argv[2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent, port, end = 0, 1000, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            port = port + 1 if port < 60000 else 1000
            try:
                s.sendto(b"x", (target, port))
                sent += 1
            except OSError:
                pass
    print(sent)
    """
)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _metric(agent: AgentProc, name: str) -> float:
    path = Path(agent.settings["metrics-textfile"])
    total = 0.0
    for line in path.read_text().splitlines() if path.exists() else ():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_flood_of_denies_is_bounded_counted_as_drops_and_other_traffic_flows(
    cell: Lab,
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    backend: str,
    tmp_path: Path,
) -> None:
    cap = 50
    agent = _start(
        cell,
        policy_repo,
        agents,
        backend,
        flow_log_max_aggregates=cap,
        metrics_textfile=str(tmp_path / f"{backend}.prom"),
        heartbeat="1s",  # status counters travel with the heartbeat
    )
    echo = cell.services["echo"].ipv4
    assert agent.proc is not None
    rss_before = _rss_kib(agent.proc.pid)
    flood = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            cell.containers["web"].netns,
            sys.executable,
            "-c",
            FLOOD,
            echo,
            "4",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Other traffic of the cell still works while the flood runs.
        assert cell.probe_tcp("web", "echo", 80, timeout=5).outcome is Outcome.CONNECTED
        assert cell.probe_tcp("web", "echo", 8080, timeout=5).outcome is Outcome.REJECTED
        sent = int(flood.communicate(timeout=60)[0])
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    assert sent > 10_000  # tens of thousands of denied packets, each to its own port
    # Drops are counted (each window holds at most `cap` aggregates), in metrics and status.
    wait_for(lambda: _metric(agent, "asgctl_agent_flow_drops_total") > 0, 30, what="drops counted")

    def status_drops() -> int:
        doc = read_status(policy_repo.bare, agent.name) or {}
        return sum((doc.get("flows") or {}).get("counters", {}).get("drops", {}).values())

    wait_for(status_drops, 30, what="drops in the status document")
    # Memory stays flat: the kernel sends at most flow-log-rate entries a second, a window
    # holds at most `cap` aggregates and the writer queue four windows (slack: the
    # interpreter's own arenas).
    assert _rss_kib(agent.proc.pid) - rss_before < 16 * 1024
    records = agent.flow_records()
    denied_ports = {r["port"] for r in records if r["verdict"] == "deny"}
    assert len(denied_ports) < sent  # not every distinct flow was kept: bounded
    # Per window of one second at most `cap` records: as many records as distinct
    # (first-seen) seconds allow, never one per packet.
    by_window: dict[str, int] = {}
    for r in records:
        by_window[r["time"]] = by_window.get(r["time"], 0) + 1
    assert max(by_window.values()) <= 2 * cap  # a window spans at most two seconds' stamps
    # And after it, the allowed path is as it was.
    assert cell.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
