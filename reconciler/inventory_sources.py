"""Where the CI plan learns which containers run on which cell.

A plan diff is only as true as its inventory, so the sources sit behind one small interface
(`InventorySource.cells()`) and the plan never cares which one it got:

* `StoreFiles`: CF metadata stores (`store.json`) given on the command line.  The cell name is
  the file's parent folder when the file is called `store.json`
  (`cells/cell-1/store.json` -> `cell-1`), else the file's stem (`cell-1.json` -> `cell-1`).
* `StatusBranches`: what every agent last reported, read from the policy repository's
  `status/<cell>` branches without a checkout.
* `synthetic_inventory`: when neither exists (a repo with no agents yet), one made-up cell
  holding a container per app and lifecycle of the directory, so a pull request still gets a
  per-app access diff.  The report says so.

The status-branch contract (the agent writes it, this module reads it)
----------------------------------------------------------------------
* Branches `refs/heads/status/<cell>` or `refs/remotes/<remote>/status/<cell>`; the cell name
  is everything after `status/` and must match `[A-Za-z0-9][A-Za-z0-9_.-]*`.  When a cell has
  several refs, the first of `refs/remotes/origin/...`, other remotes (sorted), then
  `refs/heads/...` wins: remotes are what the agents pushed; a local branch may be stale.
* The tip commit holds one YAML file, `status.yaml`, at the root of its tree.
* Its top-level `containers:` is a list of mappings with the keys `handle`, `ip`, `app_id`,
  `space_id`, `org_id` and `workload` (`app`, `task` or `staging`), the fields of CF's
  metadata store; any other keys (groups, chains, ...) are ignored here.  An empty or missing
  list means the cell runs no container.
* Entries are held to exactly the rules of `parse_store` (safe handles and GUIDs, valid and
  unique IPs), so a status branch cannot smuggle into a PR comment what a store file cannot.
* Whoever can push a status branch is untrusted: the file is read by `reconciler.statusdoc`
  (size asked of git first, the safe YAML loader with budgets, `cell-status.schema.json`),
  and a branch that breaks any rule is skipped with a message naming it and the field
  (`StatusBranches.read().skipped`; the plan shows them as warnings).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reconciler.forkpool import fork_ranges
from reconciler.inventory import InventoryError, read_store
from reconciler.model import Container, PolicySet
from reconciler.statusdoc import (
    CONTRACT_KEYS,
    STATUS_FILE,
    containers_from_status,
    read_status_blobs,
)

__all__ = ["CONTRACT_KEYS", "STATUS_FILE", "containers_from_status"]
STATUS_REF_PATTERNS = ("refs/remotes/*/status/*", "refs/heads/status/*")
SYNTHETIC_CELL = "directory"
_CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class CellInventory:
    """The containers one cell runs, and where that was read (shown in reports)."""

    cell: str
    containers: tuple[Container, ...]
    origin: str


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
    if not _CELL_NAME.match(name):
        raise InventoryError(f"{origin}: cell name {name!r} must match {_CELL_NAME.pattern}")
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


def _ref_rank(ref: str) -> tuple[int, str]:
    if ref.startswith("refs/remotes/origin/"):
        return (0, ref)
    if ref.startswith("refs/remotes/"):
        return (1, ref)
    return (2, ref)


def _cell_of_ref(ref: str) -> str | None:
    if ref.startswith("refs/heads/status/"):
        return ref[len("refs/heads/status/") :]
    parts = ref.split("/", 4)
    if len(parts) == 5 and parts[:2] == ["refs", "remotes"] and parts[3] == "status":
        return parts[4]
    return None


def status_refs(repo: Any) -> dict[str, str]:
    """`{cell: ref}` for every status branch of a gitpython Repo, preferring remotes."""
    out = repo.git.for_each_ref("--format=%(refname)", *STATUS_REF_PATTERNS)
    best: dict[str, str] = {}
    for ref in sorted(out.split(), key=_ref_rank):
        cell = _cell_of_ref(ref)
        if cell is not None and cell not in best:
            best[cell] = ref
    return best


_MIN_CELLS_PER_WORKER = 64
ContainerRow = tuple[str, str, str, str, str, str, str]


def _parse_range(
    jobs: list[tuple[str, str, bytes]], bounds: tuple[int, int]
) -> list[tuple[str, str, list[ContainerRow] | str]]:
    """Each cell's container rows, or why the cell is skipped.

    Workers inherit the jobs (~100 MB of status files at fleet scale) rather than have them
    pickled, and send plain tuples back: far cheaper to pickle than dataclass instances.
    """
    out: list[tuple[str, str, list[ContainerRow] | str]] = []
    for cell, ref, data in jobs[bounds[0] : bounds[1]]:
        try:
            containers = containers_from_status(data, f"{ref}:{STATUS_FILE}")
        except InventoryError as exc:
            out.append((cell, ref, str(exc)))
            continue
        rows = [
            (c.handle, c.ip, c.app_id, c.space_id, c.org_id, c.policy_group_id, c.workload)
            for c in containers
        ]
        out.append((cell, ref, rows))
    return out


@dataclass(frozen=True)
class StatusRead:
    """The cells whose status files could be used, and a message for each one skipped."""

    cells: tuple[CellInventory, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class StatusBranches:
    """Cells as their agents last reported them on `status/<cell>` branches.

    Anyone who can push a status branch writes what this reads, so one bad branch costs
    only its own cell: it is skipped with a message naming the branch and the field
    (`read().skipped`), and the plan goes on with the others.
    """

    repo_path: str
    workers: int = 4

    @property
    def description(self) -> str:
        return "status branches"

    def _repo(self) -> Any:
        import git

        try:
            return git.Repo(self.repo_path, search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise InventoryError(f"{self.repo_path}: not in a git repository") from None

    def exists(self) -> bool:
        """Are there any status branches to read?  (Decides the default inventory.)"""
        try:
            return bool(status_refs(self._repo()))
        except InventoryError:
            return False

    def cells(self) -> tuple[CellInventory, ...]:
        """The usable cells (see `read` for the skipped ones)."""
        return self.read().cells

    def read(self) -> StatusRead:
        repo = self._repo()
        skipped: list[str] = []
        refs: dict[str, str] = {}
        for cell, ref in status_refs(repo).items():
            try:
                refs[_check_cell(cell, ref)] = ref
            except InventoryError as exc:
                skipped.append(str(exc))
        blobs = read_status_blobs(repo.git_dir, [f"{ref}:{STATUS_FILE}" for ref in refs.values()])
        jobs = []
        for (cell, ref), data in zip(refs.items(), blobs, strict=True):
            if isinstance(data, InventoryError):
                skipped.append(str(data))
            else:
                jobs.append((cell, ref, data))
        workers = min(os.cpu_count() or 1, self.workers, len(jobs) // _MIN_CELLS_PER_WORKER)
        # Parsing a fleet's status files is CPU-bound and per cell: split across cores.
        parts = fork_ranges(_parse_range, jobs, len(jobs), workers)
        cells = []
        for part in parts:
            for cell, ref, rows in part:
                if isinstance(rows, str):
                    skipped.append(rows)
                else:
                    cells.append(CellInventory(cell, tuple(Container(*row) for row in rows), ref))
        return StatusRead(_sorted_unique(cells), tuple(skipped))


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
