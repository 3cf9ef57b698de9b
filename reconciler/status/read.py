"""What the fleet readers parse out of status branches, on top of the one reader (`fetch`).

`HEADER` (each cell's document without its containers: `asgctl status`, `asgctl notify`,
the waves) and `CONTAINERS` (each cell's containers, gate settings and applied revision:
`asgctl plan --inventory status`) are the two parses, cached by blob id between reads.
Whoever can push a status branch chose what is read, so one bad branch costs only its own
cell: it comes back as a message naming the branch and the field, never as an exception
that stops the others.  `read_status_blobs` is the budgeted blob read for readers of single
files (the lab).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from reconciler.core.cellplan import DEFAULT_GATE, GateSettings
from reconciler.core.model import Container
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import StatusBranchError, status_refs
from reconciler.status.document import (
    MAX_STATUS_BYTES,
    containers_of,
    parse_status,
    reported_gate,
)
from reconciler.status.fetch import (
    Only,
    Parse,
    StatusBatch,
    StatusRepos,
    read_local,
    read_remote,
    status_cache,
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
    left_out: int = 0
    """Cells listed but left out by the reader's `only` (neither fetched nor parsed)."""


def _header(data: bytes, origin: str) -> dict[str, Any]:
    """The document's top-level fields but `containers`, schema-checked, as JSON values."""
    header = parse_status(data, origin).header
    value: dict[str, Any] = json.loads(json.dumps(header, default=str))
    return value


HEADER = Parse("header-v1", _header)
"""What `asgctl status`, `asgctl notify` and the waves read of each cell: its header."""


def _containers(data: bytes, origin: str) -> dict[str, Any]:
    """The cell's container rows (the `Container` fields, in order), gate settings and
    applied revision: plain lists and strings, cheap to keep and to load back."""
    doc = parse_status(data, origin)
    containers = containers_of(doc, origin)
    gate = reported_gate(doc, origin)
    return {
        "rows": [
            [c.handle, c.ip, c.app_id, c.space_id, c.org_id, c.policy_group_id, c.workload]
            for c in containers
        ],
        "gate": [gate.threshold, gate.minimum, gate.trailer],
        # The schema made it a string when present.
        "applied": str(doc.header.get("lastAppliedRevision") or ""),
    }


CONTAINERS = Parse("containers-v1", _containers)
"""What `asgctl plan --inventory status` reads of each cell."""


def has_status_branches(repo: str | os.PathLike[str]) -> bool:
    """Are there any status branches to read?  (False outside a repository.)"""
    try:
        return bool(status_refs(repo))
    except StatusBranchError:
        return False


def fleet_containers(batch: StatusBatch) -> FleetContainers:
    """A read of the `CONTAINERS` parse as the plan takes it: usable cells, and a message
    for every cell and branch skipped."""
    skipped = list(batch.skipped)
    cells = []
    for c in batch.cells:
        if c.error:
            skipped.append(c.error)
            continue
        containers = tuple(Container(*row) for row in c.value["rows"])
        settings = GateSettings(*c.value["gate"])
        cells.append(CellContainers(c.cell, c.ref, containers, settings, c.value["applied"]))
    return FleetContainers(tuple(cells), tuple(skipped), batch.left_out)


def read_fleet_containers(
    repo: str | os.PathLike[str], workers: int = 4, only: Only | None = None
) -> FleetContainers:
    """Every status branch's containers of the clone holding `repo` (`fetch.read_local`),
    or those of the cells `only` keeps.

    InventoryError when `repo` is not in a git repository; a branch that breaks any rule of
    the contract is in `skipped`.  Parsing is split across up to `workers` forked processes.
    """
    return fleet_containers(read_local(repo, CONTAINERS, workers=workers, only=only))


def read_remote_containers(
    repos: StatusRepos, cache: str | None = None, workers: int = 4, only: Only | None = None
) -> FleetContainers:
    """Every status branch's containers in `repos` (one repository or every shard), or those
    of the cells `only` keeps (the others are neither fetched nor parsed), fetched into
    `cache` incrementally (`fetch.read_remote`); FetchError when a shard cannot be read."""
    with status_cache(cache) as repo:
        batch = read_remote(repo, repos, CONTAINERS, workers=workers, only=only)
        return fleet_containers(batch)
