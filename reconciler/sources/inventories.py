"""Where the CI plan learns which containers run on which cell.

A plan diff is only as true as its inventory, so the sources sit behind one small interface
(`InventorySource.cells()`) and the plan never cares which one it got:

* `StoreFiles`: CF metadata stores (`store.json`) given on the command line.  The cell name is
  the file's parent folder when the file is called `store.json`
  (`cells/cell-1/store.json` -> `cell-1`), else the file's stem (`cell-1.json` -> `cell-1`).
* `StatusBranches`: what every agent last reported, read from the policy repository's
  `status/<cell>` branches without a checkout, or fetched from the status repositories the
  agents push to (`remote`: `--status-url`, sharded with `--status-shards`), incrementally
  into `cache` (`reconciler.status.fetch`); with `only`, the containers of just the cells
  it keeps (a plan job's shard of the fleet), while every cell is still fetched, budgeted
  and read for its claimed revision (`StatusRead.claims`).
* `synthetic_inventory`: when neither exists (a repo with no agents yet), one made-up cell
  holding a container per app and lifecycle of the directory, so a pull request still gets a
  per-app access diff.  The report says so.

The status-branch contract (what the agents write and `StatusBranches` reads) is specified
and implemented once, in `reconciler.status`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reconciler.core.cellplan import CellInventory
from reconciler.core.model import Container, PolicySet
from reconciler.sources.cellstore import InventoryError, read_store
from reconciler.status.branch import CELL_NAME
from reconciler.status.fetch import FetchError, StatusRepos
from reconciler.status.read import (
    has_status_branches,
    read_fleet_containers,
    read_remote_containers,
)

SYNTHETIC_CELL = "directory"


class InventorySource(Protocol):
    """Anything that can say which containers run on which cell."""

    description: str

    def cells(self) -> tuple[CellInventory, ...]:
        """Every cell, sorted by name; raises InventoryError when the source is unusable."""
        ...


def cell_name_for(path: str | os.PathLike[str]) -> str:
    """`cells/cell-1/store.json` -> `cell-1`; `cell-1.json` -> `cell-1`."""
    p = Path(path)
    if p.name == "store.json" and p.parent.name not in ("", ".", ".."):
        return p.parent.name
    if p.name == "store.json":
        return p.resolve().parent.name
    return p.stem


def _check_cell(name: str, origin: str) -> str:
    if not CELL_NAME.match(name):
        raise InventoryError(f"{origin}: cell name {name!r} must match {CELL_NAME.pattern}")
    return name


def _sorted_unique(cells: Iterable[CellInventory]) -> tuple[CellInventory, ...]:
    out: dict[str, CellInventory] = {}
    for c in cells:
        if c.cell in out:
            raise InventoryError(
                f"cell {c.cell!r} is given twice ({out[c.cell].origin} and {c.origin})"
            )
        out[c.cell] = c
    return tuple(out[name] for name in sorted(out))


@dataclass(frozen=True)
class StoreFiles:
    """Cells from CF metadata store files, one file per cell."""

    paths: tuple[str, ...]

    @property
    def description(self) -> str:
        n = len(self.paths)
        return f"{n} store file{'s' * (n != 1)}"

    def cells(self) -> tuple[CellInventory, ...]:
        found = []
        for path in self.paths:
            cell = _check_cell(cell_name_for(path), path)
            found.append(CellInventory(cell, read_store(path), str(path)))
        return _sorted_unique(found)


@dataclass(frozen=True)
class StatusRead:
    """The cells whose status files could be used, what each usable cell says it enforces
    (`{cell: lastAppliedRevision}`, unchecked text), and of the whole listing -- whatever
    `only` keeps -- each cell's claimed revision, the listing itself and its identity
    (`reconciler.status.read.FleetContainers` says what each field holds)."""

    cells: tuple[CellInventory, ...]
    skipped: tuple[str, ...]
    """Listing-level messages only: branches that are no cell (bad names, wrong shard)."""
    applied: Mapping[str, str] = field(default_factory=dict)
    left_out: int = 0
    """Cells with a status branch that the source's `only` left out (not read in full)."""
    claims: Mapping[str, str] = field(default_factory=dict)
    """`{cell: revision}` from each cell's status commit's trailer or its document's first
    bytes (`read.read_claims`), for every listed cell that has a claim, kept by `only` or
    not, usable or not."""
    unclaimed: Mapping[str, str] = field(default_factory=dict)
    """`{cell: why}` for every other listed cell (`claims | unclaimed` is the listing)."""
    fleet: tuple[str, ...] = ()
    """Every listed cell with a valid name, sorted."""
    identity: str = ""
    """`sha256:` over the listing's (cell, status blob id): alike in every job reading the
    same branches, whatever `only` keeps."""
    unusable: Mapping[str, str] = field(default_factory=dict)
    """`{cell: message}` for the cells `only` keeps that could not be used (a broken file,
    over the budget, a claim the whole document contradicts)."""


@dataclass(frozen=True)
class StatusBranches:
    """Cells as their agents last reported them on `status/<cell>` branches.

    Anyone who can push a status branch writes what this reads, so one bad branch costs
    only its own cell: it is skipped with a message naming the branch and the field
    (`read().skipped`), and the plan goes on with the others.
    """

    repo_path: str
    workers: int = 4
    remote: StatusRepos | None = None
    """The status repositories to fetch from; None: the clone's own refs (`repo_path`)."""
    cache: str | None = None
    """Where a remote read keeps its bare repository between runs (None: a temporary one)."""
    only: Callable[[str], bool] | None = None
    """Which cells to read in full (cell name -> read it?); None: every cell.  The others
    are listed, fetched, budgeted and read for their claims alike, and counted
    (`read().left_out`), never parsed in full."""

    @property
    def description(self) -> str:
        return "status branches"

    def exists(self) -> bool:
        """Are there any status branches to read?  (Decides the default inventory.)"""
        if self.remote is not None:
            found = self.read()
            return bool(found.fleet or found.skipped)
        return has_status_branches(self.repo_path)

    def cells(self) -> tuple[CellInventory, ...]:
        """The usable cells (see `read` for the skipped ones)."""
        return self.read().cells

    def read(self) -> StatusRead:
        """Every cell's containers; InventoryError when the branches cannot be read at all."""
        if self.remote is not None:
            try:
                found = read_remote_containers(
                    self.remote, self.cache, self.workers, only=self.only
                )
            except (FetchError, OSError) as exc:
                raise InventoryError(f"status repositories {self.remote.shown}: {exc}") from None
        else:
            found = read_fleet_containers(self.repo_path, self.workers, only=self.only)
        cells = (CellInventory(c.cell, c.containers, c.ref, c.gate) for c in found.cells)
        return StatusRead(
            _sorted_unique(cells),
            found.skipped,
            {c.cell: c.applied for c in found.cells},
            found.left_out,
            found.claims,
            found.unclaimed,
            found.fleet,
            found.identity,
            found.unusable,
        )


def synthetic_inventory(policies: Sequence[PolicySet]) -> CellInventory:
    """One made-up cell: a container per app (or app-less space) and lifecycle.

    Built from the union of the given revisions' directories, so an app added or removed by
    the pull request is compared on both sides.  IPv6 containers are added only when some
    policy grants an IPv6 destination, so IPv4-only repos get no doubled noise.  Addresses
    come from the benchmarking range 198.18.0.0/15 and fd00::/8 and mean nothing.
    """
    org_of: dict[str, str] = {}  # space guid -> org guid
    apps: dict[str, str] = {}
    for policy in policies:
        d = policy.directory
        for s in d.spaces:
            org_of.setdefault(s.guid, s.org_guid)
        for a in d.apps:
            apps.setdefault(a.guid, a.space_guid)
    with_apps = set(apps.values())
    principals = sorted((space, app) for app, space in apps.items())
    principals += sorted((space, "") for space in org_of if space not in with_apps)
    families = [4]
    if any(_has_v6(p) for p in policies):
        families.append(6)
    base4 = int(ipaddress.IPv4Address("198.18.0.1"))
    base6 = int(ipaddress.IPv6Address("fd00:18::"))
    containers: list[Container] = []
    n = 0
    for space, app in principals:
        for workload in ("app", "staging"):
            for family in families:
                n += 1
                ip = (
                    ipaddress.IPv4Address(base4 + n)
                    if family == 4
                    else ipaddress.IPv6Address(base6 + n)
                )
                containers.append(
                    Container(
                        handle=f"synthetic-{n:06d}",
                        ip=str(ip),
                        app_id=app,
                        space_id=space,
                        org_id=org_of.get(space, ""),
                        workload=workload,
                    )
                )
    return CellInventory(SYNTHETIC_CELL, tuple(sorted(containers)), "synthetic")


def _has_v6(policy: PolicySet) -> bool:
    for sg in policy.security_groups:
        if any(d.version == 6 for r in sg.rules for d in r.destinations):
            return True
    return any(r.version == 6 for d in policy.destinations for r in d.ips)
