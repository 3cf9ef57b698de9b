"""`asgctl status`: the fleet at a glance, read from every `status/<cell>` branch.

The branches are read by the one status reader (`reconciler.status.fetch`): from the policy
repository, or from the status repositories the agents push to (`--status-url`, sharded
with `--status-shards`), one batched fetch per repository into a bare repository (a
temporary one, or `--cache DIR`, which fetches only what changed and keeps each file's
parse by blob id).  The policy branch is fetched into the same repository, and "behind" is
counted on its own history: how many commits the cell's applied revision is behind the
head, or `diverged` when the applied revision is no longer in that history (a rewind).
A branch that is no cell's, or sits in another cell's shard, is listed as skipped.

Whoever can push a status branch writes what this shows, so each file is read like the plan
reads it (`reconciler.status`: size asked of git first, the safe loader with budgets, the
status schema): a bad file becomes that cell's `error`, never a traceback, and every string
from a status file is shown with its control characters escaped (`report.escape.visible`),
so a status branch cannot move the cursor, clear the screen or forge table rows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reconciler.agent.config import redact_url
from reconciler.agent.source import clip
from reconciler.escape import visible
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.sources.gitio import run_git
from reconciler.status.document import UnusedRule, parse_status, summarize
from reconciler.status.document import revision_sha as _sha_of
from reconciler.status.fetch import FetchError, StatusRepos, read_remote, status_cache
from reconciler.status.read import HEADER


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
    skipped: tuple[str, ...] = ()
    """Status branches that are no cell's (a bad name, another cell's shard), with why."""

    @property
    def all_ready(self) -> bool:
        return all(c.ready == "True" for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "branch": self.branch,
            "head": self.head,
            "cells": [asdict(c) for c in self.cells],
            "skipped": list(self.skipped),
        }


def _git(git_dir: Path, *args: str, timeout: float = 120.0) -> str:
    return run_git(git_dir, *args, timeout=timeout, error=FleetError)


def read_fleet(
    url: str,
    branch: str = "main",
    cache: str | None = None,
    status: StatusRepos | None = None,
) -> Fleet:
    """Every cell's status: its branch in `status` (default: the policy repository `url`
    itself), the policy `branch` of `url` for "behind" (see the module docstring)."""
    repos = status or StatusRepos(url)
    try:
        with status_cache(cache) as repo:
            batch = read_remote(repo, repos, HEADER, workers=4)
            if not batch.cells:
                return Fleet(redact_url(url), branch, "", (), batch.skipped)
            head = _policy_head(repo, url, branch)
            rows = [
                _row(
                    repo,
                    c.cell,
                    c.origin,
                    c.value if not c.error else InventoryError(c.error),
                    head,
                )
                for c in batch.cells
            ]
            return Fleet(redact_url(url), branch, head, tuple(rows), batch.skipped)
    except FetchError as exc:
        raise FleetError(str(exc)) from None


def _policy_head(repo: Path, url: str, branch: str) -> str:
    """The policy branch's head, fetched with its history into `repo`; "" when the
    repository has no such branch."""
    local = f"refs/remotes/origin/{branch}"
    res = gitio.run(
        repo,
        "fetch",
        "--quiet",
        "--no-tags",
        "--no-write-fetch-head",
        "--",
        url,
        f"+refs/heads/{branch}:{local}",
        timeout=120.0,
    )
    if res.returncode != 0:
        if gitio.classify(res.stderr) == "BranchNotFound":
            return ""
        lines = [x.strip() for x in res.stderr.splitlines() if x.strip()]
        said = gitio.redacted(" / ".join(lines[-3:]) or "failed", url)
        raise FleetError(f"git fetch {redact_url(url)} {branch}: {said}")
    head = _git(repo, "rev-parse", "--verify", "--quiet", f"{local}^{{commit}}").strip()
    return head if gitio.FULL_SHA.fullmatch(head) else ""


@functools.lru_cache(maxsize=256)
def _behind(repo: Path, sha: str, head: str) -> tuple[int | None, bool]:
    """Commits `sha` is behind `head` on the policy branch's history, or diverged.  A fleet
    enforces a handful of revisions, so each is asked of git once, not once per cell (two
    git processes per cell are minutes at 10,000 cells)."""
    if not (sha and head):
        return None, False
    try:
        _git(repo, "merge-base", "--is-ancestor", sha, head)
        return int(_git(repo, "rev-list", "--count", f"{sha}..{head}").strip()), False
    except FleetError:
        return None, True


def _row(
    repo: Path,
    cell: str,
    origin: str,
    data: Mapping[str, Any] | bytes | InventoryError,
    head: str,
) -> CellRow:
    """One cell's row from its header (or its file's bytes); a status file that cannot be
    used is the row's error, named."""
    try:
        if isinstance(data, InventoryError):
            raise data
        header = parse_status(data, origin).header if isinstance(data, bytes) else dict(data)
        said = summarize(header)
    except InventoryError as exc:
        return CellRow(
            cell, "Unknown", "", "", "", None, False, "", "", "", 0, 0, 0, 0, "", str(exc)
        )
    behind, diverged = _behind(repo, _sha_of(said.applied_revision), head)
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
        said = [f"no status/<cell> branches on {_shown(fleet.source)}"]
        said += [f"skipped {_shown(m, _NOTE_CHARS)}" for m in fleet.skipped]
        return "\n".join(said) + "\n"
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
    notes += [f"skipped {_shown(m, _NOTE_CHARS)}" for m in fleet.skipped]
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
