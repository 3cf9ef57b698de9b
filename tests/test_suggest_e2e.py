"""`asgctl suggest` from real packets: issue 16's check, end to end.

A lab cell runs a real agent with the flow log on NFLOG.  The container `web` is denied a
TCP and a UDP connection; the agent writes the deny records; `asgctl suggest` turns them
into YAML in the policy repository's work tree; `asgctl validate` accepts the repository
with them; once committed and applied by the agent, exactly those flows are allowed: the
same service's neighbouring port and another address on the same port are still rejected
by the firewall (both listen, so only the firewall can say no).  Waits are bounded waits on
state, never timings.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import yaml

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
# Both listen on tcp 8080 and 8081, echo on udp 53 too: a probe that is rejected was
# rejected by the firewall, not by a closed port.
ECHO = ServiceSpec("echo", tcp_ports=(8080, 8081), udp_ports=(53,))
OTHER = ServiceSpec("other", tcp_ports=(8080, 8081), udp_ports=(53,))
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
# Something unrelated is allowed, so the cell has a policy; nothing towards echo or other.
UNRELATED = '{protocol: tcp, destination: 198.19.255.1, ports: "9"}'


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ASGCTL, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


def _deny_records(agent: AgentProc) -> list[dict[str, Any]]:
    return [r for r in agent.flow_records() if r["verdict"] == "deny"]


@pytest.fixture
def cell(make_lab: Callable[..., Lab]) -> Lab:
    require_netns()
    return make_lab([WEB], [ECHO, OTHER])


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_suggested_policy_from_real_denies_allows_exactly_those_flows_once_applied(
    cell: Lab,
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
    backend: str,
) -> None:
    sha = policy_repo.commit(
        "nothing towards echo",
        {"directory.yaml": DIRECTORY, "sg.yaml": sg("unrelated", [UNRELATED])},
    )
    agent = agents(
        f"suggest-{backend}",
        source=policy_repo.url,
        containers=str(cell.write_store()),
        netns=cell.cell,
        backend=backend,
        flow_log="nflog",
        flow_log_window="1s",
    ).start()
    wait_for(applied(policy_repo.bare, agent.name, sha), 30, what="the agent applies the policy")
    echo, other = cell.services["echo"].ipv4, cell.services["other"].ipv4

    # Denied by the firewall, and the agent records it.
    assert cell.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
    assert cell.probe_udp("web", "echo", 53).outcome is Outcome.REJECTED
    wait_for(
        lambda: (
            {(r["protocol"], r["port"]) for r in _deny_records(agent)}
            >= {("tcp", 8080), ("udp", 53)}
        ),
        15,
        what="deny records for echo tcp/8080 and udp/53",
    )
    assert {r["destination"] for r in _deny_records(agent)} == {echo}

    # The proposal, written into the policy repository's work tree, validates with it.
    out = policy_repo.root / "policies" / "suggested"
    res = _cli("suggest", "--state-dir", str(agent.state_dir), "--app", "web", "--out", str(out))
    assert res.returncode == 0, res.stderr
    (written,) = out.iterdir()
    assert written.name == "acme_prod_web.yaml"
    docs = [d for d in yaml.safe_load_all(written.read_text()) if d]
    assert {(d["protocol"], tuple(d["ips"]), tuple(d["ports"])) for d in docs[::2]} == {
        ("tcp", (echo,), (8080,)),
        ("udp", (echo,), (53,)),
    }
    valid = _cli("validate", str(policy_repo.root / "policies"))
    assert valid.returncode == 0, valid.stdout + valid.stderr

    # Committed and applied: exactly those flows pass.
    sha = policy_repo.commit("allow what web was denied (asgctl suggest)")
    wait_for(
        applied(policy_repo.bare, agent.name, sha), 30, what="the agent applies the suggestion"
    )
    assert cell.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
    assert cell.probe_udp("web", "echo", 53).outcome is Outcome.REPLIED
    # ... and nothing else: the neighbouring port, another address on the same ports.
    assert cell.probe_tcp("web", "echo", 8081).outcome is Outcome.REJECTED
    assert cell.probe_tcp("web", "other", 8080).outcome is Outcome.REJECTED
    assert cell.probe_udp("web", "other", 53).outcome is Outcome.REJECTED
    # A second proposal against the repository as merged: the flows granted above are left
    # out (their old records are still in the file), only the new denies are proposed.
    wait_for(
        lambda: (
            {(r["destination"], r["port"]) for r in _deny_records(agent)}
            >= {(echo, 8081), (other, 8080)}
        ),
        15,
        what="deny records for the neighbouring port and the other address",
    )
    again = policy_repo.root / "policies" / "suggested-2"
    res = _cli(
        "suggest",
        "--state-dir",
        str(agent.state_dir),
        "--policies",
        str(policy_repo.root / "policies"),
        "--out",
        str(again),
    )
    assert res.returncode == 0, res.stderr
    assert "not proposed: 2 flows the policy already allows to its app" in res.stderr
    docs = [d for d in yaml.safe_load_all((again / "acme_prod_web.yaml").read_text()) if d]
    assert {(d["protocol"], d["ips"][0], d["ports"][0]) for d in docs[::2]} == {
        ("tcp", echo, 8081),
        ("tcp", other, 8080),
        ("udp", other, 53),
    }


def test_the_lab_services_really_listen_on_the_probed_ports(make_lab: Callable[..., Lab]) -> None:
    """Without a firewall (no agent), every probe above that must be rejected connects: a
    REJECTED outcome there is the firewall's, not a closed port's."""
    require_netns()
    lab = make_lab([WEB], [ECHO, OTHER])
    assert lab.probe_tcp("web", "echo", 8081).outcome is Outcome.CONNECTED
    assert lab.probe_tcp("web", "other", 8080).outcome is Outcome.CONNECTED
    assert lab.probe_udp("web", "other", 53).outcome is Outcome.REPLIED
