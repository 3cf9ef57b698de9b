"""`asgctl status`: the fleet at a glance, read from every `status/<cell>` branch of a remote.

`git ls-remote` lists the branches; one fetch brings the policy branch and every status
branch into a bare repository (a temporary one, or `--cache DIR` to fetch incrementally);
each `status.yaml` is read straight from git objects.  "Behind" is counted on the policy
branch's own history: how many commits the cell's applied revision is behind the head, or
`diverged` when the applied revision is no longer in that history (a rewind).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from reconciler.agent.config import redact_url
from reconciler.agent.source import run_git
from reconciler.inventory_sources import STATUS_FILE

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


@contextlib.contextmanager
def _repo(cache: str | None) -> Iterator[Path]:
    if cache:
        path = Path(cache)
        if not (path / "HEAD").exists():
            path.mkdir(parents=True, exist_ok=True)
            _git(path, "init", "--quiet", "--bare")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="asgctl-status-") as tmp:
        path = Path(tmp)
        _git(path, "init", "--quiet", "--bare")
        yield path


def _sha_of(revision: str) -> str:
    """`main@sha1:<sha>` -> `<sha>`."""
    return revision.rsplit("sha1:", 1)[-1] if "sha1:" in revision else ""


def _cond(doc: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in doc.get("conditions") or ():
        if isinstance(c, dict) and c.get("type") == type_:
            return c
    return {}


def read_fleet(url: str, branch: str = "main", cache: str | None = None) -> Fleet:
    """Every cell's status on the remote `url` (see the module docstring)."""
    with _repo(cache) as repo:
        listing = _git(repo, "ls-remote", "--", url, "refs/heads/status/*", f"refs/heads/{branch}")
        pairs = (line.split("\t", 1) for line in listing.splitlines() if "\t" in line)
        refs = {ref: sha for sha, ref in pairs}
        if not any(r.startswith("refs/heads/status/") for r in refs):
            return Fleet(redact_url(url), branch, "", ())
        specs = ["+refs/heads/status/*:refs/remotes/origin/status/*"]
        if f"refs/heads/{branch}" in refs:
            specs.append(f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
        _git(repo, "fetch", "--quiet", "--no-tags", "--prune", "--", url, *specs)
        head = refs.get(f"refs/heads/{branch}", "")
        rows = []
        for ref in sorted(r for r in refs if r.startswith("refs/heads/status/")):
            cell = ref[len("refs/heads/status/") :]
            rows.append(_row(repo, cell, f"refs/remotes/origin/status/{cell}", head))
        return Fleet(redact_url(url), branch, head, tuple(rows))


def _row(repo: Path, cell: str, ref: str, head: str) -> CellRow:
    try:
        text = _git(repo, "cat-file", "blob", f"{ref}:{STATUS_FILE}")
        doc = yaml.load(text, Loader=_LOADER)
        if not isinstance(doc, dict):
            raise FleetError(f"{STATUS_FILE} is not a mapping")
    except (FleetError, yaml.YAMLError) as exc:
        return CellRow(
            cell, "Unknown", "", "", "", None, False, "", "", "", 0, 0, 0, 0, "", str(exc)
        )
    applied = str(doc.get("lastAppliedRevision") or "")
    sha = _sha_of(applied)
    behind: int | None = None
    diverged = False
    if sha and head:
        try:
            _git(repo, "merge-base", "--is-ancestor", sha, head)
            behind = int(_git(repo, "rev-list", "--count", f"{sha}..{head}").strip())
        except FleetError:
            diverged = True
    ready = _cond(doc, "Ready")
    drifted = _cond(doc, "Drifted")
    counts = doc.get("counts") or {}
    drift = doc.get("drift") or {}
    refused = doc.get("refused") or {}
    return CellRow(
        cell=cell,
        ready=str(ready.get("status", "Unknown")),
        reason=str(ready.get("reason", "")),
        message=str(ready.get("message", "")),
        applied=applied,
        behind=behind,
        diverged=diverged,
        last_sync=str(doc.get("lastSyncTime") or ""),
        reported_at=str(doc.get("reportedAt") or ""),
        drifted=str(drifted.get("status", "Unknown")),
        drift_corrections=int(drift.get("corrections") or 0),
        installed_rules=int(counts.get("installedRules") or 0),
        cf_equivalent_rules=int(counts.get("cfEquivalentRules") or 0),
        containers=int(counts.get("containers") or 0),
        refused=(f"{refused.get('revision', '')}: {refused.get('reason', '')}" if refused else ""),
    )


def render_fleet(fleet: Fleet, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(fleet.to_dict(), indent=2) + "\n"
    if not fleet.cells:
        return f"no status/<cell> branches on {fleet.source}\n"
    head = fleet.head[:12] or "(missing)"
    lines = [f"{fleet.source} {fleet.branch} at {head}: {len(fleet.cells)} cells", ""]
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
                c.cell,
                c.ready,
                c.reason or c.error,
                sha[:12] or "-",
                behind,
                c.last_sync or "-",
                drift,
                str(c.installed_rules),
                str(c.cf_equivalent_rules),
                str(c.containers),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    notes = [f"{c.cell}: {c.message}" for c in fleet.cells if c.ready != "True" and c.message]
    notes += [f"{c.cell}: refused {c.refused}" for c in fleet.cells if c.refused]
    if notes:
        lines.append("")
        lines.extend(notes)
    lines.append("")
    lines.append("DRIFT: corrections so far (* = drifted at the last sync)")
    return "\n".join(lines) + "\n"
