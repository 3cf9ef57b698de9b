"""A flood of denied packets from one container (issue 16, "How we will check"): at least
100,000 packets a second for 30 s, while the agent collects flows.

The agent's memory stays flat, the cell's other traffic is unaffected, and every packet the
kernel handed to the agent's NFLOG group is accounted for: aggregated into a record or
counted as a drop by reason, never silently lost.

The setup, all real: a lab cell (iptables backend, so the kernel's own rule counters are
there to check the agent's accounting against), an `asgctl agent` process with
`flow-log: nflog` at the highest `flow-log-rate` the kernel allows (10,000 log entries a
second per container; the rest of the flood is rejected without being logged, as designed)
and a small aggregate cap, so both of the agent's own bounds are hit.  The flood is our own
sender (`asgctl_lab.flood`: UDP over `sendmmsg(2)`, 256 datagrams per call, each to another port so
every packet is a distinct flow, the aggregator's worst case), two processes in the
container sending as fast as they can (as `hping3 --flood` does; one syscall per 256
packets, so the kernel's path, not the sender, sets the pace).  The rate the test claims is the rate
the cell's end of the container's veth actually received, measured from the kernel's link
counters over the sender's own send window (reported as the `flood_packets_per_second`
property).  Every check of the agent holds at whatever rate was achieved; the claim itself
is checked last: below `CLAIMED_PPS` the test fails under CI=true and is skipped elsewhere,
saying the rate and the load (this is a precondition of the test, not a timing of the
product: on a 2-core machine shared with other work the kernel's own path delivers
50,000-180,000 a second).

Runs in CI with the other netns tests; selectable alone with `pytest -m flood`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from asgctl_lab.flood import finish, start_senders
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from tests.agentkit import (  # noqa: F401 - fixtures
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
from tests.conftest import require_netns, skip_unless_available

pytestmark = [pytest.mark.netns, pytest.mark.flood, pytest.mark.requires("git")]

CLAIMED_PPS = 100_000
SECONDS = 30.0
SENDERS = 4
LOG_RATE = 10_000  # flow-log-rate: xt_limit's ceiling, the most the agent can be sent
CAP = 1_000  # flow-log-max-aggregates: a window of distinct flows overflows it

ORG_GUID, SPACE_GUID = "org-acme", "space-prod"
WEB = ContainerSpec("web", app_id="app-web", space_id=SPACE_GUID, org_id=ORG_GUID)
API = ContainerSpec("api", app_id="app-api", space_id=SPACE_GUID, org_id=ORG_GUID)
ECHO = ServiceSpec("echo", tcp_ports=(80,))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _rx_packets(lab: Lab, container: str) -> int:
    """Packets the cell received from the container: its end of the container's veth."""
    ifname = lab.containers[container].cell_ifname
    out = lab.cell_exec(["ip", "-s", "-j", "link", "show", "dev", ifname], check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def _kernel_logged_denies(lab: Lab) -> int:
    """Packets the kernel's NFLOG deny rules sent to the group: the rules' own counters
    (`iptables-save -c`, whichever iptables variant the agent chose)."""
    total = 0
    for save in ("iptables-legacy-save", "iptables-nft-save"):
        out = lab.cell_exec([save, "-c"]).stdout
        for line in out.splitlines():
            if line.startswith("[") and "-j NFLOG" in line and "ASG DENY" in line:
                total += int(line[1:].split(":", 1)[0])
    return total


def _metrics(agent: AgentProc) -> dict[str, float]:
    """The agent's metrics textfile: sample name with labels -> value."""
    path = Path(agent.settings["metrics-textfile"])
    out: dict[str, float] = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _family(metrics: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k == name or k.startswith(name + "{")}


def test_a_flood_of_100k_denied_packets_a_second_for_30s(
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    require_netns()
    lab = make_lab([WEB, API], [ECHO])
    echo = lab.services["echo"].ipv4
    rule = f'{{protocol: tcp, destination: {echo}, ports: "80"}}'
    sha = policy_repo.commit("echo:80 for every app", {"sg.yaml": sg("echo", [rule])})
    agent = agents(
        "flood",
        source=policy_repo.url,
        containers=str(lab.write_store()),
        netns=lab.cell,
        backend="iptables",
        flow_log="nflog",
        flow_log_window="1s",
        flow_log_rate=LOG_RATE,
        flow_log_max_aggregates=CAP,
        metrics_textfile=str(tmp_path / "flood.prom"),
    ).start()

    wait_for(applied(policy_repo.bare, "flood", sha), 30, what="the agent applies the policy")
    assert lab.probe_tcp("api", "echo", 80).outcome is Outcome.CONNECTED
    assert agent.proc is not None
    pid = agent.proc.pid
    rss_before = _rss_kib(pid)
    rx_before = _rx_packets(lab, "web")

    senders = start_senders(lab.containers["web"].netns, echo, SECONDS, count=SENDERS, ports=1024)
    rss: list[int] = []
    connects: list[Outcome] = []
    try:
        # While the flood runs: another container's allowed connections, one after the
        # other, and the agent's memory, sampled between them.
        while any(s.poll() is None for s in senders):
            connects.append(lab.probe_tcp("api", "echo", 80, timeout=3).outcome)
            rss.append(_rss_kib(pid))
            time.sleep(0.1)  # a steady client, not a second flood
    except BaseException:
        for s in senders:
            s.kill()
            s.wait()
        raise
    sent, window = finish(senders, timeout=30)
    rx = _rx_packets(lab, "web") - rx_before

    achieved = rx / window
    record_property("flood_packets_per_second", round(achieved))
    assert rx <= sent + 1000  # what the cell counted is what the container sent (+ probes)

    # The cell's other traffic was unaffected: every connection of the other container
    # during the flood succeeded (and there were many of them, throughout).
    assert len(connects) >= 10, connects
    assert set(connects) == {Outcome.CONNECTED}, connects

    # Memory stayed flat: bounded growth over the baseline, and no growth over the last
    # two thirds of the flood (the first windows fill the aggregator to its cap once).
    third = len(rss) // 3
    assert max(rss) - rss_before < 16 * 1024, (rss_before, rss)
    assert max(rss[third:]) - max(rss[:third]) < 4 * 1024, rss

    # Drops are counted, not hidden: one more denied packet (so a trailing gap in the NFLOG
    # sequence shows), then every packet the kernel logged is aggregated or a counted drop.
    assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    logged = _kernel_logged_denies(lab)
    assert 0 < logged <= LOG_RATE * (window + 10) + 2 * LOG_RATE  # the kernel's bound held

    def accounted() -> dict[str, float]:
        m = _metrics(agent)
        drops = _family(m, "asgctl_agent_flow_drops_total")
        out = {k.split('reason="')[1].rstrip('"}'): v for k, v in drops.items()}
        out["aggregated"] = m.get(
            'asgctl_agent_flow_packets_total{cell="flood",verdict="deny"}', 0.0
        )
        return out

    def closed() -> bool:
        # A packet is aggregated, or dropped before that (by the kernel, the aggregate cap,
        # or unparsed); a window the writer could not take ("queue") was aggregated first.
        a = accounted()
        return a["aggregated"] + a["kernel"] + a["aggregate-cap"] + a["unparsed"] == logged

    wait_for(closed, 20, interval=0.2, what=f"{logged} logged packets accounted for")
    a = accounted()
    assert a["aggregate-cap"] > 0 and a["unparsed"] == 0, a
    # What was written is what was aggregated, less whole windows dropped as "queue"; and
    # it is bounded by the cap: at most CAP records a window.
    records = [
        json.loads(line)
        for line in (agent.state_dir / "flows" / "flows.jsonl").read_text().splitlines()
    ]
    denied = sum(r["count"] for r in records if r["verdict"] == "deny")
    assert denied == a["aggregated"] - a["queue"], (denied, a)
    assert len(records) <= CAP * (window + 10)
    # The same counters reach the status branch.
    doc = read_status(policy_repo.bare, "flood") or {}
    assert doc["flows"]["error"] == ""

    # The claim: at least CLAIMED_PPS denied packets a second reached the cell for 30 s.
    # Everything above held at the rate achieved; a host too loaded to deliver the claimed
    # rate cannot test the claim (skipped, saying so), except under CI=true, where it fails.
    load = Path("/proc/loadavg").read_text().split()[0]
    skip_unless_available(
        f"{CLAIMED_PPS:,} packets/s flood",
        None
        if achieved >= CLAIMED_PPS
        else f"this host delivered {achieved:,.0f} packets/s (load average {load}); the "
        "memory, traffic and accounting checks passed at that rate",
    )
