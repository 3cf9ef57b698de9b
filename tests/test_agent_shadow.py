"""`asgctl agent --mode shadow`: on a cell where CF still enforces, every cycle compares the
plan with CF's chains, reports parity on the status branch and as metrics, and writes
nothing to the kernel.

The cell is a network namespace holding CF's layout as silk writes it (`silk_cell`, pinned
in tests/test_cf_compare.py); the agent is a real `asgctl agent` process pulling from a bare
repository, its dataplane tools run in the namespace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from reconciler.cli import main
from reconciler.status.document import check_header
from tests.agentkit import AgentProc, local_repo, read_status
from tests.agentkit import agents as agents
from tests.test_cf_compare import GROUPS, SPACE_A, STORE, load, saved, silk_cell
from tests.test_cf_compare import netns as netns


def _policies(tmp_path: Path) -> dict[str, str]:
    """The groups as `asgctl import-cf` writes them: the repo's policy files."""
    (tmp_path / "sg.json").write_text(json.dumps({"resources": GROUPS, "pagination": {}}))
    out = tmp_path / "imported"
    res = CliRunner().invoke(main, ["import-cf", str(tmp_path / "sg.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return {p.name: p.read_text() for p in sorted(out.glob("*.yaml"))}


def _metrics(agent: AgentProc) -> dict[str, float]:
    lines = Path(agent.settings["metrics-textfile"]).read_text().splitlines()
    return {
        k: float(v)
        for k, _, v in (x.rpartition(" ") for x in lines if x.startswith("asgctl_agent_parity"))
    }


def test_shadow_cycles_report_parity_then_a_difference_and_never_touch_the_kernel(
    tmp_path: Path,
    netns: str,
    agents: Callable[..., AgentProc],
) -> None:
    load(netns, silk_cell(STORE, GROUPS))
    kernel_before = saved(netns)
    repo = local_repo(tmp_path)
    files = _policies(tmp_path)
    repo.commit("import CF's groups", files)
    store = tmp_path / "store.json"
    store.write_text(json.dumps(STORE))
    agent = agents(
        "cell-shadow",
        source=repo.url,
        containers=str(store),
        netns=netns,
        mode="shadow",
        underlay_interface="eth0",
        metrics_textfile=str(tmp_path / "metrics.prom"),
    )

    for _ in range(2):  # the comparison is made every cycle, the idle one too
        res = agent.once()
        assert res.returncode == 0, res.stderr
        doc = read_status(repo.bare, "cell-shadow")
        assert doc is not None
        check_header(doc, "status/cell-shadow")  # raises when the schema refuses it
        assert doc["agent"]["backend"] == "cf-shadow"
        assert doc["source"]["mode"] == "shadow"
        assert doc["parity"]["parity"] == "same"
        assert doc["parity"]["counts"]["same"] == 4
        assert _metrics(agent) == {
            'asgctl_agent_parity_containers{cell="cell-shadow",result="same"}': 4,
            'asgctl_agent_parity_containers{cell="cell-shadow",result="different"}': 0,
            'asgctl_agent_parity_containers{cell="cell-shadow",result="unknown"}': 0,
            'asgctl_agent_parity_containers{cell="cell-shadow",result="no-cf-chain"}': 0,
            'asgctl_agent_parity_cf_chains_without_container{cell="cell-shadow"}': 0,
            'asgctl_agent_parity_same{cell="cell-shadow"}': 1,
        }
        assert saved(netns) == kernel_before

    files["public-web.yaml"] = files["public-web.yaml"].replace("'80,443'", "'80,8443'")
    repo.commit("web: 8443 instead of 443", files)
    res = agent.once()
    assert res.returncode == 0, res.stderr
    doc = read_status(repo.bare, "cell-shadow")
    assert doc is not None
    check_header(doc, "status/cell-shadow")
    parity = doc["parity"]
    assert parity["parity"] == "different"
    assert parity["counts"]["different"] == 2 and parity["counts"]["same"] == 2
    web = next(c for c in parity["containers"] if c["handle"] == "web-1")
    assert web["result"] == "different" and web["space_id"] == SPACE_A
    assert [p["text"] for p in web["only_cf_allows"]] == ["tcp 198.19.10.0/24 port 443"]
    assert [p["text"] for p in web["only_asgctl_allows"]] == ["tcp 198.19.10.0/24 port 8443"]
    line = 1 + next(i for i, x in enumerate(files["public-web.yaml"].splitlines()) if "8443" in x)
    assert f"SecurityGroup/public-web rules[0] (public-web.yaml:{line})" in " ".join(
        web["only_asgctl_allows"][0]["by"]
    )
    m = _metrics(agent)
    assert m['asgctl_agent_parity_containers{cell="cell-shadow",result="different"}'] == 2
    assert m['asgctl_agent_parity_same{cell="cell-shadow"}'] == 0
    assert saved(netns) == kernel_before


def test_the_status_section_stays_bounded_however_much_differs() -> None:
    """60 containers that each differ in 20 packet sets, and a CF rule with a long comment:
    the status lists 50 containers, 5 sets each, rule texts cut, and counts them all."""
    from reconciler.agent.shadow import STATUS_WIDTH, parity_status
    from reconciler.core.compile import compile_cell
    from reconciler.core.model import (
        AddressRange,
        Container,
        PolicySet,
        PortRange,
        Rule,
        SecurityGroup,
    )
    from reconciler.core.packetspace import Box
    from reconciler.core.parity import CfGrant, CfSide, compare

    rules = tuple(
        Rule("tcp", (AddressRange.parse(f"198.19.{2 * i}.0/24"),), (PortRange(443, 443),))
        for i in range(20)
    )
    policy = PolicySet(security_groups=(SecurityGroup("wide", rules, running_default=True),))
    containers = [Container(f"c-{i:02d}", f"198.18.1.{i + 2}", space_id="s") for i in range(60)]
    plan = compile_cell(policy, containers, "big")
    long_rule = "asg-x rule 1: -A asg-x -m comment --comment " + "x" * 2000 + " -j ACCEPT"
    grant = CfGrant(long_rule, Box(4, (17, 17), (0, 10)))
    sides = {c.ip: CfSide(c.ip, ("eth0",), (grant,)) for c in containers}
    doc = parity_status(compare(policy, plan, sides))
    assert doc["counts"]["different"] == 60 and len(doc["containers"]) == 50
    first = doc["containers"][0]
    assert first["only_asgctl_allows_total"] == 20 and len(first["only_asgctl_allows"]) == 5
    assert all(len(b) <= STATUS_WIDTH for p in first["only_cf_allows"] for b in p["by"])
    assert len(json.dumps(doc)) < 200_000


def test_when_cfs_chains_cannot_be_read_the_cycle_is_a_problem_not_parity(
    tmp_path: Path,
) -> None:
    """A cell whose chains cannot be read proves nothing: DataplaneUnavailable, no report."""
    import secrets

    from reconciler.agent.config import build_config
    from reconciler.agent.core import Problem
    from reconciler.agent.shadow import shadow_converge
    from reconciler.core.compile import compile_cell
    from reconciler.core.model import Container, PolicySet
    from tests.conftest import require_netns

    require_netns()
    cfg = build_config(
        {},
        {
            "source": "file:///nowhere",
            "containers": str(tmp_path / "store.json"),
            "cell": "c1",
            "netns": f"asgcfc-missing-{secrets.token_hex(3)}",
            "mode": "shadow",
        },
    )
    plan = compile_cell(PolicySet(), [Container("h", "198.18.0.2", space_id="s")], "c1")
    done, report = shadow_converge(cfg, None, plan)
    assert isinstance(done, Problem) and report is None
    assert done.reason == "DataplaneUnavailable"
    assert done.message.startswith("reading CF's chains: ")
