"""`asgctl plan` and `asgctl test` at the edge: git, files and inventories are read here.

Everything after this module is pure (`diff.diff_plans`, `report.*`, `policytest.run_tests`),
so the CI plan differs from the agents' compile only in where its inputs come from.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

from reconciler.ci.report.plan import PlanReport, Revision
from reconciler.core.cellplan import PlanError
from reconciler.core.diff import diff_plans
from reconciler.core.gate import DEFAULT_GATE, GateSettings
from reconciler.core.model import CellInventory, PolicySet
from reconciler.policy.load import load_policy
from reconciler.policy.source import RepoPlace, locate
from reconciler.sources.cellstore import InventoryError
from reconciler.sources.gitio import resolve_commit
from reconciler.sources.inventories import (
    StatusBranches,
    StoreFiles,
    synthetic_inventory,
)

STATUS = "status"
MAX_WORKERS = 4  # forked processes for a fleet-wide diff (see diff._diff_cells)
SYNTHETIC = "directory"


def resolve_revision(top: Path | None, rev: str) -> str | None:
    """The commit SHA a revision names, or None when it names nothing."""
    if top is None:
        return None
    return resolve_commit(top, rev)


def _store_paths(spec: Sequence[str]) -> tuple[str, ...]:
    """Files as given; a folder means every `store.json` below it and its own `*.json`."""
    out: list[str] = []
    for item in spec:
        p = Path(item)
        if p.is_dir():
            found = sorted(set(p.rglob("store.json")) | set(p.glob("*.json")))
            if not found:
                raise InventoryError(f"{item}: no store.json or *.json files in this folder")
            out.extend(str(f) for f in found)
        else:
            out.append(item)
    return tuple(out)


def load_inventory(
    spec: Sequence[str], place: RepoPlace, policies: Sequence[PolicySet]
) -> tuple[tuple[CellInventory, ...], str, tuple[str, ...]]:
    """The cells to plan for, a description of where they came from, and the status
    branches skipped as unusable (each with the reason, for the report's warnings).

    `spec` is empty (status branches when there are any, else a synthetic cell), `status`,
    `directory` (the synthetic cell), or store files and folders of them.
    """
    status = StatusBranches(str(place.top)) if place.top is not None else None
    if list(spec) == [STATUS] or (not spec and status is not None and status.exists()):
        if status is None:
            raise InventoryError("--inventory status: the policies are not in a git repository")
        found = status.read()
        if not found.cells:
            if found.skipped:
                raise InventoryError(
                    "--inventory status: no usable status/<cell> branch; skipped: "
                    + "; ".join(found.skipped)
                )
            raise InventoryError("--inventory status: there are no status/<cell> branches")
        skipped = [f"{m} (this cell is left out of the plan)" for m in found.skipped]
        n = len(found.cells)
        return found.cells, f"status branches ({n:,} cells)", tuple(skipped)
    if not spec or list(spec) == [SYNTHETIC]:
        cell = synthetic_inventory(policies)
        return (
            (cell,),
            "synthetic (one container per app and lifecycle from the directory; "
            "no status branches yet)",
            (),
        )
    if STATUS in spec or SYNTHETIC in spec:
        raise InventoryError("--inventory: 'status' and 'directory' cannot be mixed with files")
    source = StoreFiles(_store_paths(spec))
    cells = source.cells()
    return cells, f"{source.description} ({len(cells):,} cells)", ()


def gate_origin(cells: Sequence[CellInventory], given: str) -> str:
    """Where the mass-revoke settings the plan judges each cell with come from, in words:
    what each cell reports (status branches), else the agent config given, else defaults."""
    if cells and all(c.gate is not None for c in cells):
        return "as each cell reports on its status branch"
    return f"from {given}" if given else "the agent's defaults"


def run_plan(
    policies: str,
    base: str,
    head: str,
    inventory: Sequence[str] = (),
    gate: GateSettings = DEFAULT_GATE,
    gate_from: str = "",
) -> PlanReport:
    """Load both revisions from git (no checkout), read the inventory, diff, and report.

    `gate` is the mass-revoke settings for cells that do not report their own, read from
    `gate_from` (an agent config file; empty: the defaults)."""
    place = locate(policies)
    folder = place.folder or "."
    base_sha = resolve_revision(place.top, base)
    head_sha = resolve_revision(place.top, head)
    report = PlanReport(
        base=Revision(base, base_sha or ""),
        head=Revision(head, head_sha or ""),
        policies=folder,
        inventory="",
        location_prefix=place.prefix,
    )
    if place.top is None:
        return _with(report, error=f"{policies} is not in a git repository")
    for name, sha in ((base, base_sha), (head, head_sha)):
        if sha is None:
            return _with(report, error=f"unknown revision {name!r}")
    head_result = load_policy(policies, head_sha)
    if not head_result.ok:
        return _with(report, head_findings=head_result.findings)
    base_result = load_policy(policies, base_sha)
    warnings: list[str] = []
    base_policy = base_result.policy
    if not base_result.ok:
        # No agent can be running an invalid revision; compare against nothing, and say so.
        base_policy = PolicySet()
        n = len(base_result.errors)
        warnings.append(
            f"the base revision does not validate ({n} error{'s' * (n != 1)}), so the plan "
            "compares the head against an empty policy"
        )
    try:
        cells, described, skipped = load_inventory(
            inventory, place, (base_policy, head_result.policy)
        )
    except InventoryError as exc:
        return _with(report, error=str(exc), base_findings=base_result.findings)
    warnings.extend(skipped)
    # Everything loaded so far lives until the end; taking it out of the cyclic collector's
    # view keeps full collections (a quarter of a fleet-wide diff's time) from rescanning it.
    gc.freeze()
    try:
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        diff = diff_plans(base_policy, head_result.policy, cells, place.prefix, workers, gate)
    except PlanError as exc:  # a hash collision: no agent would apply it either
        return _with(report, error=str(exc), base_findings=base_result.findings)
    finally:
        gc.unfreeze()  # a long-lived caller (tests, a server) gets its collector back
    unverified = sum(1 for p in diff.principals if p.name_mismatch)
    if unverified:
        # Said up front: in a comment cut to fit, the flagged blocks may be folded away.
        warnings.append(
            f"{unverified} principal{'s' * (unverified != 1)} shown by GUID (name unverified): "
            "the directory puts the app or space elsewhere than the inventory runs it"
        )
    return _with(
        report,
        inventory=described,
        diff=diff,
        head_findings=head_result.findings,
        base_findings=base_result.findings,
        warnings=tuple(warnings),
        gate_settings=gate_origin(cells, gate_from),
    )


def _with(report: PlanReport, **changes: object) -> PlanReport:
    from dataclasses import replace

    # `changes` names fields of PlanReport; mypy cannot check keyword splats into replace().
    return replace(report, **changes)  # type: ignore[arg-type]
