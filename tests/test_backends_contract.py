"""The dataplane contract (reconciler/backends/contract.py): what every backend reports.

The loop, status and metrics see a backend only through the contract, so what they report
must be the running backend's own account: an nftables cell installs rules *and* set
elements (a group's rules live in its sets), not the iptables layout's lines.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.agent.loop import SYNC
from reconciler.backends import DataplaneError, ReadError, converge, installed_rules
from reconciler.backends.contract import NoDelta, judge, rules_drift
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.backends.nftables.delta import NftDelta, compute_nft_delta
from reconciler.backends.nftables.parse import NftState
from reconciler.backends.nftables.render import NftRuleset, render_cell
from reconciler.core.cellplan import CellPlan
from tests.agentkit import sg, tcp_rules
from tests.cases import CASES, case_plan
from tests.test_agent_loop import _agent, setup  # noqa: F401  (setup is a fixture)


def _nft_count(ruleset: NftRuleset) -> int:
    """Counted by hand from the rendered slice: every rule, every set element."""
    rules = sum(len(chain) for chain in ruleset.chains.values())
    return rules + sum(len(s.elements or ()) for s in ruleset.sets.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_backend_counts_what_it_installs(name: str) -> None:
    plan = case_plan(name, "c")
    iptables = installed_rules(IptablesBackend("legacy"), plan)
    nft = installed_rules(NftablesBackend(), plan)
    # The iptables layout's count is the plan's (what CI plans show) ...
    assert iptables == plan.installed_rules
    # ... and nftables counts its own objects, which are not iptables lines.
    assert nft == sum(_nft_count(render_cell(plan, f)) for f in (4, 6))
    if name == "edge":  # ranges, ICMP and IPv6: the two layouts' counts part ways
        assert nft != iptables


class NftMemoryDataplane:
    """The nftables backend's render and delta over an in-memory kernel: the agent's cycle
    with nft's types end to end, without a namespace."""

    name = "nftables (memory)"

    def __init__(self) -> None:
        self.slices = {4: NftState(4, {}), 6: NftState(6, {})}
        self.pending: dict[int, NftRuleset] = {}
        self.fail: DataplaneError | None = None

    def render(self, plan: CellPlan, family: int) -> NftRuleset:
        return render_cell(plan, family)

    def read(self, family: int) -> NftState:
        if self.fail is not None:
            raise self.fail
        return self.slices[family]

    def delta(
        self,
        desired: NftRuleset,
        observed: NftState,
        last: NftRuleset | None,
        *,
        heal_drift: bool = True,
    ) -> NftDelta:
        self.pending[observed.family] = desired
        return compute_nft_delta(desired, observed, last, heal_drift=heal_drift)

    def apply(self, delta: NftDelta) -> None:
        d = self.pending[delta.family]
        self.slices[delta.family] = NftState(
            d.family, d.chains, table=True, base_hooks=d.base_hooks, sets=d.sets
        )

    def verify(self, desired: NftRuleset, delta: NftDelta) -> None:
        assert self.slices[delta.family].chains == desired.chains


def test_the_agent_reports_the_running_backends_installed_count(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    cfg, commit, _, _ = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    prom = tmp_path / "asgctl.prom"
    dp = NftMemoryDataplane()
    agent, _, _ = _agent(replace(cfg, metrics_textfile=str(prom)), dp)  # type: ignore[arg-type]
    state = agent.cycle(SYNC)
    assert state.applied is not None and state.applied.plan is not None
    plan = state.applied.plan
    m = re.search(r'^asgctl_agent_rules_installed\{cell="mem"\} (\d+)$', prom.read_text(), re.M)
    assert m is not None
    reported = int(m.group(1))
    assert reported == sum(_nft_count(dp.render(plan, f)) for f in (4, 6))
    assert reported != plan.installed_rules  # not the iptables layout's lines


def test_a_cycle_that_fails_before_its_delta_carries_an_empty_one() -> None:
    dp = NftMemoryDataplane()
    dp.fail = ReadError("nft list table failed (exit 1)")
    result = converge(dp, case_plan("example", "c"), families=(4,))
    (fam,) = result.families
    assert fam.error == "nft list table failed (exit 1)" and not fam.sent
    assert fam.delta == NoDelta(4) and fam.delta.text() == ""
    assert fam.to_dict()["transaction"] == "" and not result.ok


def test_drift_is_judged_alike_for_every_backend() -> None:
    # No last plan: every difference is the plan's change, never drift.
    assert judge("new", "old", None, False, heal_drift=False) == (True, False, True)
    # The kernel moved away from the last plan, the plan did not: drift, healed on request.
    assert judge("a", "b", "a", True, heal_drift=True) == (False, True, True)
    assert judge("a", "b", "a", True, heal_drift=False) == (False, True, False)
    # A rule that changed under one id is one change, not one missing and one extra,
    # whatever syntax the backend's rules are in.
    drift = rules_drift(4, "c", ("x:1 a", "x:2 b"), ("x:1 a", "x:2 c"), True, lambda r: r[:3])
    assert [(d.what, d.expected, d.found) for d in drift] == [
        ("rule-changed", ("x:2 b",), ("x:2 c",))
    ]
