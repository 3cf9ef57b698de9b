"""Reading status branches out of a repository: the blobs, with budgets, and the fleet-wide parse.

Both fleet readers come through here: `asgctl plan --inventory status` (every cell's
containers, `read_fleet_containers`) and `asgctl status` (every cell's document, via
`read_status_blobs` and `document.parse_status`).  Whoever can push a status branch chose
what is read, so one bad branch costs only its own cell: it comes back as a message naming
the branch and the field, never as an exception that stops the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from reconciler.core.cellplan import DEFAULT_GATE, GateSettings
from reconciler.core.model import Container
from reconciler.forkpool import fork_ranges
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import CELL_NAME, StatusBranchError, blob_spec, status_refs
from reconciler.status.document import (
    MAX_STATUS_BYTES,
    containers_of,
    parse_status,
    reported_gate,
)


def read_status_blobs(
    repo: str | os.PathLike[str], specs: list[str], limit: int = MAX_STATUS_BYTES
) -> list[bytes | InventoryError]:
    """`<ref>:<path>` blobs, or the reason each cannot be used (missing, not a file, too big).

    Sizes are asked of git first (`gitio.read_blobs`), so an oversized blob (a status file
    that compresses 2 GB into 10 MB on the server) is never read; InventoryError when git
    itself cannot run.
    """
    try:
        found = gitio.read_blobs(repo, specs, limit)
    except OSError as exc:
        raise InventoryError(f"{os.fspath(repo)}: git cat-file failed: {exc}") from None
    return [
        data if isinstance(data, bytes) else InventoryError(f"{spec}: {data}")
        for spec, data in zip(specs, found, strict=True)
    ]


@dataclass(frozen=True)
class CellContainers:
    """The containers one cell's status branch lists, the ref they were read from, and the
    revision the document says the cell enforces (`lastAppliedRevision`, as written: the
    cell's own words, checked against the repository by `asgctl plan`, never trusted)."""

    cell: str
    ref: str
    containers: tuple[Container, ...]
    gate: GateSettings = DEFAULT_GATE
    """The mass-revoke gate settings the cell's agent reports (`document.reported_gate`)."""
    applied: str = ""
    """The revision the cell says it enforces (`lastAppliedRevision`), as written."""


@dataclass(frozen=True)
class FleetContainers:
    """The cells whose status files could be used, and a message for each one skipped."""

    cells: tuple[CellContainers, ...]
    skipped: tuple[str, ...]


_MIN_CELLS_PER_WORKER = 64
ContainerRow = tuple[str, str, str, str, str, str, str]
Parsed = tuple[str, str, list[ContainerRow] | str, tuple[float, int, str] | None, str]


def _parse_range(jobs: list[tuple[str, str, bytes]], bounds: tuple[int, int]) -> list[Parsed]:
    """Each cell's container rows, gate settings and applied revision, or why it is skipped.

    Workers inherit the jobs (~100 MB of status files at fleet scale) rather than have them
    pickled, and send plain tuples back: far cheaper to pickle than dataclass instances.
    """
    out: list[Parsed] = []
    for cell, ref, data in jobs[bounds[0] : bounds[1]]:
        origin = blob_spec(ref)
        try:
            doc = parse_status(data, origin)
            containers = containers_of(doc, origin)
            gate = reported_gate(doc, origin)
        except InventoryError as exc:
            out.append((cell, ref, str(exc), None, ""))
            continue
        rows = [
            (c.handle, c.ip, c.app_id, c.space_id, c.org_id, c.policy_group_id, c.workload)
            for c in containers
        ]
        # The schema made it a string when present.
        applied = str(doc.header.get("lastAppliedRevision") or "")
        out.append((cell, ref, rows, (gate.threshold, gate.minimum, gate.trailer), applied))
    return out


def has_status_branches(repo: str | os.PathLike[str]) -> bool:
    """Are there any status branches to read?  (False outside a repository.)"""
    try:
        return bool(status_refs(repo))
    except StatusBranchError:
        return False


def read_fleet_containers(repo: str | os.PathLike[str], workers: int = 4) -> FleetContainers:
    """Every status branch's containers, in the order `status_refs` lists them.

    InventoryError when `repo` is not in a git repository; a branch that breaks any rule of
    the contract is in `skipped`.  Parsing a fleet's status files is CPU-bound and per cell,
    so it is split across up to `workers` forked processes (`forkpool.fork_ranges`).
    """
    try:
        listed = status_refs(repo)
    except StatusBranchError as exc:
        raise InventoryError(str(exc)) from None
    skipped: list[str] = []
    refs: dict[str, str] = {}
    for cell, ref in listed.items():
        if CELL_NAME.match(cell):
            refs[cell] = ref
        else:
            skipped.append(f"{ref}: cell name {cell!r} must match {CELL_NAME.pattern}")
    blobs = read_status_blobs(repo, [blob_spec(ref) for ref in refs.values()])
    jobs = []
    for (cell, ref), data in zip(refs.items(), blobs, strict=True):
        if isinstance(data, InventoryError):
            skipped.append(str(data))
        else:
            jobs.append((cell, ref, data))
    workers = min(os.cpu_count() or 1, workers, len(jobs) // _MIN_CELLS_PER_WORKER)
    parts = fork_ranges(_parse_range, jobs, len(jobs), workers)
    cells = []
    for part in parts:
        for cell, ref, rows, gate, applied in part:
            if isinstance(rows, str) or gate is None:
                skipped.append(str(rows))
            else:
                containers = tuple(Container(*row) for row in rows)
                settings = GateSettings(*gate)
                cells.append(CellContainers(cell, ref, containers, settings, applied))
    return FleetContainers(tuple(cells), tuple(skipped))
