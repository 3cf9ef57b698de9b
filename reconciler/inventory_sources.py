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
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from reconciler.inventory import MAX_STORE_BYTES, InventoryError, parse_store, read_store
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


CONTRACT_KEYS = ("handle", "ip", "app_id", "space_id", "org_id", "workload")
_KEYS = "|".join(CONTRACT_KEYS)
# The block style PyYAML writes: `- key: value` opens an entry, `  key: value` continues it,
# `  - item` and deeper lines belong to a field without an inline value.  A value may not
# start a flow collection (other than an empty one), an anchor, alias, tag, block scalar,
# double-quoted string or comment: anything like that goes to the full YAML loader.
_SHAPE = re.compile(
    r"(?:(?:- |  )[A-Za-z_][A-Za-z0-9_]*:"
    r"(?: (?:\[\]|\{\}|(?![\[{&*!|>\"#%@`])[^\n]*))?\n"
    r"|  - [^\n]*\n|    [^\n]*\n)*"
)
# A contract field, and the start of the next line: deeper means a multi-line value.
_FIELD = re.compile(rf"^(?:- |  )({_KEYS}):(?: ([^\n]*))?\n((?:    |  - )?)", re.M)
_NEXT_TOP_KEY = re.compile(r"\n[^ \n-]")
_PLAIN = re.compile(r"[A-Za-z0-9_.:/-]+")
_SINGLE_QUOTED = re.compile(r"'((?:[^'\n]|'')*)'")
_NULLS = ("~", "null", "Null", "NULL")
_UNSEEN: Any = object()


# YAML's implicit resolvers (null, bool, int, float, timestamp, merge, value) as one regex:
# a plain scalar it matches is not a string.  Each pattern pins its own first characters, so
# one match does what the resolver's per-first-character lookup does, at C speed.
_NOT_A_STRING = re.compile(
    "|".join(
        sorted(
            {
                f"(?:{regexp.pattern})"
                for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values()
                for _tag, regexp in resolvers
            }
        )
    ),
    re.X,
)


def _plain_is_string(value: str) -> bool:
    """Would YAML read this plain scalar as a string (not a number, bool, null or date)?"""
    return _NOT_A_STRING.match(value) is None


def _fast_entries(text: str) -> list[dict[str, str]] | None:
    """The contract fields of `containers:` in PyYAML's block style, without a YAML load.

    A full YAML load of a fleet's status files took most of a fleet-wide plan (each entry
    also carries chains, groups and sources that the plan does not need).  This accepts only
    the shape the agent writes (`yaml.dump(..., default_flow_style=False)`) and returns None
    on anything else -- comments, tabs, flow collections, double quotes, multi-line values,
    a contract field that is not a plain or single-quoted string -- so the caller falls back
    to the full YAML loader, and the two read the same containers from every valid file.
    """
    at = 0 if text.startswith("containers:") else text.find("\ncontainers:") + 1
    if at == 0 and not text.startswith("containers:"):
        return None
    if text.find("\ncontainers:", at + 1) != -1:
        return None
    eol = text.find("\n", at)
    head = text[at : eol if eol != -1 else len(text)]
    if head in ("containers: []", "containers: null", "containers: ~"):
        return []
    if head != "containers:":
        return None
    body_start = eol + 1
    m = _NEXT_TOP_KEY.search(text, body_start - 1)
    block = text[body_start : m.start() + 1 if m else len(text)]
    if block and not block.endswith("\n"):
        block += "\n"
    if " #" in block or "\t" in block or "\r" in block or not block.startswith("- "):
        return None if block else []
    if _SHAPE.fullmatch(block) is None:
        return None
    checked: dict[str, str | None] = {}
    entries: list[dict[str, str]] = []
    for i, chunk in enumerate(block.split("\n- ")):
        entry: dict[str, str] = {}
        text_of = (chunk if i == 0 else "- " + chunk) + "\n"
        for key, raw, deeper in _FIELD.findall(text_of):
            if key in entry or not raw or deeper:
                return None
            value = checked.get(raw, _UNSEEN)
            if value is _UNSEEN:
                value = checked[raw] = _scalar(raw)
            if value is None:
                return None
            entry[key] = value
        entries.append(entry)
    return entries


def _scalar(raw: str) -> str | None:
    """A contract field's string value, or None when only a YAML loader can say."""
    if raw in _NULLS:
        return ""  # YAML null: the field is empty, as the loader path reads it
    quoted = _SINGLE_QUOTED.fullmatch(raw)
    if quoted is not None:
        return quoted.group(1).replace("''", "'")
    if _PLAIN.fullmatch(raw) and _plain_is_string(raw):
        return raw
    return None


def containers_from_status(text: bytes | str, origin: str) -> tuple[Container, ...]:
    """The containers of a `status.yaml` (the contract above), validated like a store file."""
    if len(text) > MAX_STORE_BYTES:
        raise InventoryError(f"{origin}: larger than {MAX_STORE_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InventoryError(f"{origin}: not UTF-8") from None
    fast = _fast_entries(text)
    if fast is not None:
        entries: Any = fast
    else:
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


def _read_blobs(git_dir: str, specs: list[str]) -> list[bytes | None]:
    """`<ref>:<path>` blobs in one `git cat-file --batch` (one process, not one per cell)."""
    if not specs:
        return []
    out = subprocess.run(
        ["git", "-C", git_dir, "cat-file", "--batch"],
        input="".join(s + "\n" for s in specs).encode(),
        capture_output=True,
        check=True,
    ).stdout
    blobs: list[bytes | None] = []
    pos = 0
    for _ in specs:
        eol = out.index(b"\n", pos)
        header = out[pos:eol].split()
        pos = eol + 1
        if len(header) != 3 or header[1] != b"blob":
            blobs.append(None)  # "<spec> missing", or not a file
            if len(header) == 3:
                pos += int(header[2]) + 1
            continue
        size = int(header[2])
        blobs.append(out[pos : pos + size])
        pos += size + 1
    return blobs


_MIN_CELLS_PER_WORKER = 64
# The jobs forked workers read: set just before the pool forks, so ~100 MB of status files
# are inherited rather than pickled to them.
_JOBS: list[tuple[str, str, bytes]] = []
ContainerRow = tuple[str, str, str, str, str, str, str]


def _parse_status(job: tuple[str, str, bytes]) -> CellInventory:
    cell, ref, data = job
    return CellInventory(cell, containers_from_status(data, ref), ref)


def _parse_range(bounds: tuple[int, int]) -> list[tuple[str, str, list[ContainerRow]]]:
    """Workers send plain tuples back: far cheaper to pickle than dataclass instances."""
    out = []
    for cell, ref, data in _JOBS[bounds[0] : bounds[1]]:
        rows = [
            (c.handle, c.ip, c.app_id, c.space_id, c.org_id, c.policy_group_id, c.workload)
            for c in containers_from_status(data, ref)
        ]
        out.append((cell, ref, rows))
    return out


@dataclass(frozen=True)
class StatusBranches:
    """Cells as their agents last reported them on `status/<cell>` branches."""

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
        repo = self._repo()
        refs = status_refs(repo)
        for cell, ref in refs.items():
            _check_cell(cell, ref)
        blobs = _read_blobs(repo.git_dir, [f"{ref}:{STATUS_FILE}" for ref in refs.values()])
        jobs = []
        for (cell, ref), data in zip(refs.items(), blobs, strict=True):
            if data is None:
                raise InventoryError(f"{ref}: has no file {STATUS_FILE}")
            jobs.append((cell, ref, data))
        workers = min(os.cpu_count() or 1, self.workers, len(jobs) // _MIN_CELLS_PER_WORKER)
        if workers <= 1:
            return _sorted_unique(_parse_status(job) for job in jobs)
        import multiprocessing

        # Parsing a fleet's status files is CPU-bound and per cell: split it across cores.
        global _JOBS
        _JOBS = jobs
        step = -(-len(jobs) // (workers * 4))
        ranges = [(lo, min(len(jobs), lo + step)) for lo in range(0, len(jobs), step)]
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_parse_range, ranges)
        finally:
            _JOBS = []
        return _sorted_unique(
            CellInventory(cell, tuple(Container(*row) for row in rows), ref)
            for part in parts
            for cell, ref, rows in part
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
