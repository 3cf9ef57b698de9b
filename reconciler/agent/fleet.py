"""`asgctl status`: the fleet at a glance, read from every `status/<cell>` branch of a remote.

`git ls-remote` lists the branches; one fetch brings the policy branch and every status
branch into a bare repository (a temporary one, or `--cache DIR` to fetch incrementally);
each `status.yaml` is read straight from git objects.  "Behind" is counted on the policy
branch's own history: how many commits the cell's applied revision is behind the head, or
`diverged` when the applied revision is no longer in that history (a rewind).

Whoever can push a status branch writes what this shows, so each file is read like the plan
reads it (`reconciler.status`: size asked of git first, the safe loader with budgets, the
status schema): a bad file becomes that cell's `error`, never a traceback, and every string
from a status file is shown with its control characters escaped (`report.escape.visible`),
so a status branch cannot move the cursor, clear the screen or forge table rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reconciler.agent.config import redact_url
from reconciler.agent.source import clip
from reconciler.escape import visible
from reconciler.sources.cellstore import InventoryError
from reconciler.sources.gitio import run_git
from reconciler.status.document import UnusedRule, parse_status, summarize
from reconciler.status.document import revision_sha as _sha_of
from reconciler.status.fetch import FetchError, fetched_status


class FleetError(Exception):
    """The remote or a status branch could not be read."""


@dataclass(frozen=True)
class CellRow:
    """One cell as `asgctl status` shows it."""

    cell: str
    ready: str
    reason: str
    message: str
    applied: str
    behind: int | None
    diverged: bool
    last_sync: str
    reported_at: str
    drifted: str
    drift_corrections: int
    installed_rules: int
    cf_equivalent_rules: int
    containers: int
    refused: str
    error: str = ""
    unused_rules: tuple[UnusedRule, ...] = ()
    """log: true rules that matched nothing for the cell's unused-after (flow records)."""
    unused_total: int = 0


@dataclass(frozen=True)
class Fleet:
    source: str
    branch: str
    head: str
    cells: tuple[CellRow, ...]

    @property
    def all_ready(self) -> bool:
        return all(c.ready == "True" for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "branch": self.branch,
            "head": self.head,
            "cells": [asdict(c) for c in self.cells],
        }


def _git(git_dir: Path, *args: str, timeout: float = 120.0) -> str:
    return run_git(git_dir, *args, timeout=timeout, error=FleetError)


def read_fleet(url: str, branch: str = "main", cache: str | None = None) -> Fleet:
    """Every cell's status on the remote `url` (see the module docstring)."""
    try:
        with fetched_status(url, branch, cache) as got:
            if not got.cells:
                return Fleet(redact_url(url), branch, "", ())
            rows = [
                _row(got.repo, cell, spec, data, got.head)
                for cell, spec, data in zip(got.cells, got.specs, got.blobs, strict=True)
            ]
            return Fleet(redact_url(url), branch, got.head, tuple(rows))
    except FetchError as exc:
        raise FleetError(str(exc)) from None


def _row(repo: Path, cell: str, origin: str, data: bytes | InventoryError, head: str) -> CellRow:
    """One cell's row; a status file that cannot be used is the row's error, named."""
    try:
        if isinstance(data, InventoryError):
            raise data
        said = summarize(parse_status(data, origin).header)
    except InventoryError as exc:
        return CellRow(
            cell, "Unknown", "", "", "", None, False, "", "", "", 0, 0, 0, 0, "", str(exc)
        )
    sha = _sha_of(said.applied_revision)
    behind: int | None = None
    diverged = False
    if sha and head:
        try:
            _git(repo, "merge-base", "--is-ancestor", sha, head)
            behind = int(_git(repo, "rev-list", "--count", f"{sha}..{head}").strip())
        except FleetError:
            diverged = True
    return CellRow(
        cell=cell,
        ready=said.ready.status,
        reason=said.ready.reason,
        message=said.ready.message,
        applied=said.applied_revision,
        behind=behind,
        diverged=diverged,
        last_sync=said.last_sync,
        reported_at=said.reported_at,
        drifted=said.drifted.status,
        drift_corrections=said.drift_corrections,
        installed_rules=said.installed_rules,
        cf_equivalent_rules=said.cf_equivalent_rules,
        containers=said.containers,
        refused=said.refused,
        unused_rules=said.unused_rules,
        unused_total=said.unused_total,
    )


_NOTE_CHARS = 300


def _shown(text: str, limit: int = 0) -> str:
    """A status-file string for the terminal: control characters escaped, long ones cut."""
    return clip(text, limit) if limit else visible(text)


def render_fleet(fleet: Fleet, fmt: str) -> str:
    """The fleet as JSON (strings escaped by JSON itself) or as a text table."""
    if fmt == "json":
        return json.dumps(fleet.to_dict(), indent=2) + "\n"
    if not fleet.cells:
        return f"no status/<cell> branches on {_shown(fleet.source)}\n"
    head = fleet.head[:12] or "(missing)"
    lines = [
        f"{_shown(fleet.source)} {_shown(fleet.branch)} at {head}: {len(fleet.cells)} cells",
        "",
    ]
    header = (
        "CELL",
        "READY",
        "REASON",
        "APPLIED",
        "BEHIND",
        "LAST SYNC",
        "DRIFT",
        "RULES",
        "CF-EQUIV",
        "CONTAINERS",
    )
    table = [header]
    for c in fleet.cells:
        sha = _sha_of(c.applied)
        behind = "diverged" if c.diverged else "-" if c.behind is None else str(c.behind)
        drift = f"{c.drift_corrections}" + ("*" if c.drifted == "True" else "")
        table.append(
            (
                _shown(c.cell, 64),
                _shown(c.ready, 16),
                _shown(c.reason, 40) if c.reason else "error" if c.error else "",
                sha[:12] or "-",
                behind,
                _shown(c.last_sync, 40) or "-",
                drift,
                str(c.installed_rules),
                str(c.cf_equivalent_rules),
                str(c.containers),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    notes = [
        f"{_shown(c.cell, 64)}: {_shown(c.error, _NOTE_CHARS)}" for c in fleet.cells if c.error
    ]
    notes += [
        f"{_shown(c.cell, 64)}: {_shown(c.message, _NOTE_CHARS)}"
        for c in fleet.cells
        if c.ready != "True" and c.message
    ]
    notes += [
        f"{_shown(c.cell, 64)}: refused {_shown(c.refused, _NOTE_CHARS)}"
        for c in fleet.cells
        if c.refused
    ]
    if notes:
        lines.append("")
        lines.extend(notes)
    if any(c.drift_corrections or c.drifted == "True" for c in fleet.cells):
        lines.append("")
        lines.append("DRIFT: corrections so far (* = drifted at the last sync)")
    lines.extend(_unused_lines(fleet))
    return "\n".join(lines) + "\n"


_UNUSED_SHOWN = 10


def _unused_lines(fleet: Fleet) -> list[str]:
    """Per cell, the `log: true` rules that matched nothing for its unused-after: the first
    few, with the group and the file:line that asked for them, then how many more."""
    cells = [c for c in fleet.cells if c.unused_total]
    if not cells:
        return []
    lines = ["", "UNUSED RULES (log: true rules with no flow for the cell's flow-unused-after)"]
    for c in cells:
        lines.append(f"{_shown(c.cell, 64)}: {c.unused_total}")
        for r in c.unused_rules[:_UNUSED_SHOWN]:
            where = "; ".join(_shown(s, 200) for s in r.sources[:3])
            lines.append(
                f"  rule {_shown(r.id, 32)} group {_shown(r.group, 32)} "
                f"last {_shown(r.last_hit, 40)}: {where}"
            )
        if c.unused_total > _UNUSED_SHOWN:
            lines.append(f"  ... and {c.unused_total - _UNUSED_SHOWN} more")
    return lines
