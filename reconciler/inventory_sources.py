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
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from reconciler.inventory import MAX_STORE_BYTES, InventoryError, parse_store
from reconciler.model import Container, PolicySet

STATUS_FILE = "status.yaml"
STATUS_REF_PATTERNS = ("refs/remotes/*/status/*", "refs/heads/status/*")
SYNTHETIC_CELL = "directory"
_CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise InventoryError(f"{path}: {exc.strerror}") from None
            cell = _check_cell(cell_name_for(path), path)
            found.append(CellInventory(cell, parse_store(data, path), path))
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


def containers_from_status(text: bytes | str, origin: str) -> tuple[Container, ...]:
    """The containers of a `status.yaml` (the contract above), validated like a store file."""
    if len(text) > MAX_STORE_BYTES:
        raise InventoryError(f"{origin}: larger than {MAX_STORE_BYTES} bytes")
    try:
        doc = yaml.load(text, Loader=_YAML_LOADER)  # CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        raise InventoryError(f"{origin}: not valid YAML: {exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InventoryError(f"{origin}: expected a mapping with 'containers'")
    entries = doc.get("containers") or []
    if not isinstance(entries, list):
        raise InventoryError(f"{origin}: 'containers' must be a list")
    store: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("handle"), str):
            raise InventoryError(f"{origin}: containers[{i}] needs a string 'handle'")
        handle = entry["handle"]
        if handle in store:
            raise InventoryError(f"{origin}: container {handle!r} is listed twice")
        store[handle] = {
            "handle": handle,
            "ip": entry.get("ip"),
            "metadata": {
                "app_id": entry.get("app_id") or "",
                "space_id": entry.get("space_id") or "",
                "org_id": entry.get("org_id") or "",
                "container_workload": entry.get("workload") or "app",
            },
        }
    return parse_store(json.dumps(store), origin)


@dataclass(frozen=True)
class StatusBranches:
    """Cells as their agents last reported them on `status/<cell>` branches."""

    repo_path: str

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
        repo = self._repo()
        found = []
        for cell, ref in status_refs(repo).items():
            _check_cell(cell, ref)
            try:
                blob = repo.commit(ref).tree / STATUS_FILE
            except KeyError:
                raise InventoryError(f"{ref}: has no {STATUS_FILE}") from None
            if blob.type != "blob" or blob.size > MAX_STORE_BYTES:
                raise InventoryError(f"{ref}:{STATUS_FILE}: not a file of at most 64 MiB")
            data = blob.data_stream.read()
            found.append(CellInventory(cell, containers_from_status(data, ref), ref))
        return _sorted_unique(found)


def synthetic_inventory(policies: Sequence[PolicySet]) -> CellInventory:
    """One made-up cell: a container per app (or app-less space) and lifecycle.

    Built from the union of the given revisions' directories, so an app added or removed by
    the pull request is compared on both sides.  IPv6 containers are added only when some
    policy grants an IPv6 destination, so IPv4-only repos get no doubled noise.  Addresses
    come from the benchmarking range 198.18.0.0/15 and fd00::/8 and mean nothing.
    """
    spaces: dict[str, str] = {}
    org_of: dict[str, str] = {}
    apps: dict[str, str] = {}
    for policy in policies:
        d = policy.directory
        for s in d.spaces:
            spaces.setdefault(s.guid, s.org_guid)
            org_of.setdefault(s.guid, s.org_guid)
        for a in d.apps:
            apps.setdefault(a.guid, a.space_guid)
    with_apps = set(apps.values())
    principals = sorted((space, app) for app, space in apps.items())
    principals += sorted((space, "") for space in spaces if space not in with_apps)
    families = [4]
    if any(_has_v6(p) for p in policies):
        families.append(6)
    containers: list[Container] = []
    n = 0
    for space, app in principals:
        for workload in ("app", "staging"):
            for family in families:
                n += 1
                ip = (
                    ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + n)
                    if family == 4
                    else ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd00:18::")) + n)
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
