"""`asgctl status` text: the DRIFT legend only where a cell has drift to explain."""

from __future__ import annotations

from dataclasses import replace

from reconciler.agent.fleet import CellRow, Fleet, render_fleet

CALM = CellRow(
    cell="cell-1",
    ready="True",
    reason="ReconciliationSucceeded",
    message="",
    applied="main@sha1:" + "a" * 40,
    behind=0,
    diverged=False,
    last_sync="2026-12-06T04:00:00Z",
    reported_at="2026-12-06T04:00:01Z",
    drifted="False",
    drift_corrections=0,
    installed_rules=12,
    cf_equivalent_rules=40,
    containers=2,
    refused="",
)
LEGEND = "DRIFT: corrections so far (* = drifted at the last sync)"


def test_no_drift_prints_no_drift_legend() -> None:
    text = render_fleet(Fleet("ssh://git/p.git", "main", "a" * 40, (CALM,)), "text")
    assert LEGEND not in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_a_cell_with_drift_gets_the_legend_and_its_star() -> None:
    drifted = replace(CALM, cell="cell-2", drifted="True", drift_corrections=3)
    text = render_fleet(Fleet("ssh://git/p.git", "main", "a" * 40, (CALM, drifted)), "text")
    assert LEGEND in text
    row = next(x for x in text.splitlines() if x.startswith("cell-2"))
    assert " 3* " in row
