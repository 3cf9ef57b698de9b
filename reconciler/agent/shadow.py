"""The agent's shadow mode: every cycle, compare the plan with what CF's chains allow.

An operator proves parity fleet-wide before the cutover by running the agent with
`mode: shadow` on every cell: it fetches, gates and compiles exactly as when enforcing, but
instead of converging it reads CF's chains (`backends/iptables/cfparse`) and compares
(`core/parity`), and reports the result on its status branch (`parity`) and as metrics.
Nothing is written to the kernel: the cycle's "converge" is an empty result, whatever the
plan holds.
"""

from __future__ import annotations

from typing import Any

from reconciler.agent.conditions import DATAPLANE_UNAVAILABLE
from reconciler.agent.config import AgentConfig
from reconciler.agent.core import Problem
from reconciler.agent.metrics import Metrics
from reconciler.backends import ConvergeResult, DataplaneError, Runner
from reconciler.backends.iptables.cfparse import CfParseError, read_cf_sides
from reconciler.core.cellplan import CellPlan
from reconciler.core.model import PolicySet
from reconciler.core.parity import RESULTS, ParityReport, compare

BACKEND = "cf-shadow"
"""The backend name a shadow cycle reports: status shows that nothing was enforced."""
STATUS_CONTAINERS = 50
"""Containers listed in the status document (those that differ first); counts are whole."""
STATUS_PIECES = 5
"""Packet sets listed per container and side in the status document."""
STATUS_WIDTH = 300
"""Characters of a rule's text (or a note) in the status document."""


def shadow_converge(
    cfg: AgentConfig, policy: PolicySet | None, plan: CellPlan
) -> tuple[ConvergeResult | Problem, ParityReport | None]:
    """Compare `plan` with CF's chains in the agent's namespace; send nothing anywhere.

    The result is an empty converge (no family touched, so in sync) and the report; when
    CF's chains cannot be read, a Problem (the cell is not Ready) and no report.
    `policy` names the rules' sources and the directory's names; without it (a plan
    restored from an earlier run) each rule's own sources are shown.
    """
    runner = Runner.in_netns(cfg.netns) if cfg.netns else Runner()
    try:
        sides = read_cf_sides(runner, plan.families() or (4,), cfg.variant)
    except (DataplaneError, CfParseError) as exc:
        return Problem(DATAPLANE_UNAVAILABLE, f"reading CF's chains: {exc}"), None
    report = compare(policy or PolicySet(), plan, sides, keep=STATUS_PIECES)
    return ConvergeResult(BACKEND, "report-only", ()), report


def parity_status(report: ParityReport) -> dict[str, Any]:
    """The status document's `parity` section: bounded, whatever the cell holds."""
    return report.to_dict(limit=STATUS_PIECES, containers=STATUS_CONTAINERS, width=STATUS_WIDTH)


def parity_metrics(metrics: Metrics, report: ParityReport) -> None:
    counts = report.counts()
    for result in RESULTS:
        metrics.set("asgctl_agent_parity_containers", counts[result], result=result)
    metrics.set(
        "asgctl_agent_parity_cf_chains_without_container", counts["cf_chains_without_container"]
    )
    metrics.set("asgctl_agent_parity_same", 1 if report.same else 0)
