"""What the fleet readers parse out of status branches, on top of the one reader (`fetch`).

`HEADER` (each cell's document without its containers: `asgctl status`, `asgctl notify`,
the waves), `CONTAINERS` (each cell's containers, gate settings and applied revision:
`asgctl plan --inventory status`) and `CLAIM` (the revision each cell claims in its
document's first bytes, `document.read_claim`) are the parses, cached by blob id between
reads.  What a plan job takes of the cells it does not read in full is each cell's claim
(`read_claims`): from its status commit's trailer when the commit states one, else `CLAIM`.
Whoever can push a status branch chose what is read, so one bad branch costs only its own
cell: it comes back as a message naming the branch and the field, never as an exception
that stops the others.  `read_status_blobs` is the budgeted blob read for readers of single
files (the lab).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.core.cellplan import DEFAULT_GATE, GateSettings
from reconciler.core.model import Container
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import STATUS_REF_PATTERNS, StatusBranchError, status_refs
from reconciler.status.document import (
    CLAIM_BYTES,
    CLAIM_TRAILER,
    MAX_STATUS_BYTES,
    claim_of_trailers,
    containers_of,
    parse_status,
    read_claim,
    reported_gate,
)
from reconciler.status.fetch import (
    DEFAULT_BUDGET,
    PARSED_DIR,
    SHARDS_REFS,
    CellStatus,
    Only,
    Parse,
    ParsedStore,
    StatusBatch,
    StatusRepos,
    moved_refs,
    read_cells,
    read_local,
    read_remote,
    ref_trailers,
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
    """The cells whose status files could be used, the branches that are no cell's, each
    unusable cell's reason, and what every listed cell claims (`CLAIM`)."""

    cells: tuple[CellContainers, ...]
    skipped: tuple[str, ...]
    """Listing-level messages: branches that are no cell (a bad name, the wrong shard)."""
    left_out: int = 0
    """Cells listed, fetched and budgeted but not parsed in full: the reader's `only` left
    them out."""
    claims: Mapping[str, str] = field(default_factory=dict)
    """`{cell: revision}` claimed (`read_claims`: in its commit's trailer, or in the first
    `CLAIM_BYTES` of its document), for every listed cell that has a claim, whether `only`
    keeps it and whether it is usable."""
    unclaimed: Mapping[str, str] = field(default_factory=dict)
    """`{cell: why}` for every other listed cell: `claims | unclaimed` is the listing."""
    fleet: tuple[str, ...] = ()
    """Every listed cell with a valid name, sorted: the listing."""
    identity: str = ""
    """`sha256:` over the listing's `(cell, status blob id or "-")`: the same for every
    reader of the same branches, whatever `only` keeps (`fleet_identity`)."""
    unusable: Mapping[str, str] = field(default_factory=dict)
    """`{cell: message naming the branch}` for the cells read in full that cannot be used:
    a file that breaks the contract, over the budget, or whose claim the whole document
    contradicts."""


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


def _claim(data: bytes, origin: str) -> dict[str, Any]:
    """`{"claim": revision or None, "why": why there is none}` (`document.read_claim`):
    never an error, and no branch named, since the value is the blob's, shared by every
    cell that pushes the same bytes."""
    found = read_claim(data)
    return {"claim": found.revision, "why": found.why}


CLAIM = Parse("claim-v1", _claim)
"""What a plan job reads of every listed cell: the revision its document's first
`CLAIM_BYTES` claim.  (A change to the rule or to `CLAIM_BYTES` changes the kind.)"""
_SHOWN = 100
"""Characters of a claimed revision a message quotes at most (it is the pusher's text)."""


def fleet_identity(listing: StatusBatch) -> str:
    """`sha256:` + the digest of `<cell> <blob id or ->` lines over every cell of a read of
    the whole listing: the blob ids name every byte read, so two readers of the same
    branches agree on it, and any change to any cell's file changes it."""
    lines = "".join(f"{c.cell} {c.blob or '-'}\n" for c in sorted(listing.cells, key=_cell))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _cell(c: CellStatus) -> str:
    return c.cell


def has_status_branches(repo: str | os.PathLike[str]) -> bool:
    """Are there any status branches to read?  (False outside a repository.)"""
    try:
        return bool(status_refs(repo))
    except StatusBranchError:
        return False


def fleet_containers(batch: StatusBatch, claimed: StatusBatch) -> FleetContainers:
    """A read of the `CONTAINERS` parse (`batch`, the cells a reader's `only` keeps) and of
    the `CLAIM` parse over the whole listing (`claimed`), as the plan takes them: usable
    cells, a message for every unusable cell and for every branch that is no cell, and
    every listed cell's claim or why it has none.

    The cross-check: a cell read in full whose document states another applied revision
    than its claim (its commit's trailer, or its first bytes) is unusable, never planned
    with either, the message naming where the claim was read.  No claim is no
    contradiction (the plan treats such a cell as unknown)."""
    claims: dict[str, str] = {}
    unclaimed: dict[str, str] = {}
    blobs: dict[str, str] = {}
    stated: set[str] = set()  # the cells whose claim their commit states
    for c in claimed.cells:
        blobs[c.cell] = c.blob
        if c.error:
            unclaimed[c.cell] = c.error
        elif c.value["claim"] is None:
            # A commit's trailer is the ref's, a document's first bytes the file's.
            where = c.ref if c.value.get("trailer") else c.origin
            unclaimed[c.cell] = f"{where}: {c.value['why']}"
        else:
            claims[c.cell] = c.value["claim"]
            if c.value.get("trailer"):
                stated.add(c.cell)
    unusable: dict[str, str] = {}
    cells = []
    for c in batch.cells:
        claim = claims.get(c.cell)
        if c.error:
            unusable[c.cell] = c.error
        elif blobs.get(c.cell) != c.blob:
            unusable[c.cell] = f"{c.origin}: changed while being read"
        elif claim is not None and claim != c.value["applied"]:
            where = (
                f"in its commit's {CLAIM_TRAILER} trailer"
                if c.cell in stated
                else f"in the first {CLAIM_BYTES:,} bytes"
            )
            unusable[c.cell] = (
                f"{c.origin}: lastAppliedRevision reads {claim[:_SHOWN]!r} {where} and "
                f"{c.value['applied'][:_SHOWN]!r} in the whole document"
            )
        else:
            containers = tuple(Container(*row) for row in c.value["rows"])
            settings = GateSettings(*c.value["gate"])
            applied = c.value["applied"]
            cells.append(CellContainers(c.cell, c.ref, containers, settings, applied))
    return FleetContainers(
        tuple(cells),
        batch.skipped,
        batch.left_out,
        claims,
        unclaimed,
        tuple(sorted(blobs)),
        fleet_identity(claimed),
        unusable,
    )


def read_claims(
    batch: StatusBatch,
    store: ParsedStore,
    workers: int = 4,
    patterns: Sequence[str] = STATUS_REF_PATTERNS,
) -> StatusBatch:
    """Every cell's claim of those `batch` listed (`StatusBatch.listing`, whatever its `only`
    kept), from the same repository, with the same budget, in `CLAIM`'s form.

    First from the commits (`patterns`: where the listing's refs are): one `git for-each-ref`
    reads every commit's `CLAIM_TRAILER` trailers (`fetch.ref_trailers`), and a commit that
    states one decides its cell's claim (`document.claim_of_trailers`), value marked
    `"trailer": True`, its blob never read.  The other cells (an old agent's commit, a
    hand-pushed one) get the `CLAIM` parse of their document's first bytes: one `git
    cat-file --batch` stream per worker, cached by blob id in `store`.  Every cell is
    budgeted alike either way, so which cells are refused and the identity do not change.
    A cell whose ref moved between the two reads is "changed while being read"."""
    trailers = ref_trailers(batch.repo, patterns)
    known: dict[str, dict[str, Any]] = {}
    commits: dict[str, str] = {}
    for cell, ref in batch.listing:
        stated = trailers.get(ref)
        claim = claim_of_trailers(stated.items, stated.cut) if stated is not None else None
        if stated is not None and claim is not None:
            known[cell] = {"claim": claim.revision, "why": claim.why, "trailer": True}
            commits[ref] = stated.commit
    claimed = read_cells(
        batch.repo, batch.listing, CLAIM, DEFAULT_BUDGET, store, workers, known=known
    )
    moved = moved_refs(batch.repo, patterns, commits) if commits else set()
    if not moved:
        return claimed
    cells = tuple(
        replace(c, value=None, error=f"{c.origin}: changed while being read")
        if c.ref in moved
        else c
        for c in claimed.cells
    )
    return replace(claimed, cells=cells)


def read_fleet_containers(
    repo: str | os.PathLike[str], workers: int = 4, only: Only | None = None
) -> FleetContainers:
    """Every status branch's containers of the clone holding `repo` (`fetch.read_local`),
    or those of the cells `only` keeps, and every listed cell's claim.

    InventoryError when `repo` is not in a git repository; a branch whose name is no cell's
    is in `skipped`, a cell whose file breaks any rule of the contract in `unusable`.
    Parsing is split across up to `workers` forked processes.
    """
    batch = read_local(repo, CONTAINERS, workers=workers, only=only)
    return fleet_containers(batch, read_claims(batch, ParsedStore(), workers))


def read_remote_containers(
    repos: StatusRepos, cache: str | None = None, workers: int = 4, only: Only | None = None
) -> FleetContainers:
    """Every status branch's containers in `repos` (one repository or every shard), or those
    of the cells `only` keeps (every cell is still fetched and budgeted: the others are
    only not parsed in full), and every listed cell's claim from the same cache, fetched
    into `cache` incrementally (`fetch.read_remote`); FetchError when a shard cannot be
    read."""
    with status_cache(cache) as repo:
        batch = read_remote(repo, repos, CONTAINERS, workers=workers, only=only)
        claimed = read_claims(batch, ParsedStore(repo / PARSED_DIR), workers, (SHARDS_REFS,))
        return fleet_containers(batch, claimed)
