"""Where a cell's status lives in git: the branch, its refs, the file, and how they are listed.

Every reader and writer of the status-branch contract names things through here, so the
agent that pushes `status/<cell>`, the plan that reads the fleet from a clone, `asgctl status`
that fetches it from the remote, and the lab all agree on the same names.
"""

from __future__ import annotations

import hashlib
import os
import re

from reconciler.sources import gitio

STATUS_PREFIX = "status/"
"""Branch names of the contract: `status/<cell>` (the agent's `status-branch-prefix`)."""
STATUS_FILE = "status.yaml"
"""The one file at the root of a status commit's tree."""
STATUS_REF_PATTERNS = (f"refs/remotes/*/{STATUS_PREFIX}*", f"refs/heads/{STATUS_PREFIX}*")
FETCHED_PREFIX = f"refs/remotes/origin/{STATUS_PREFIX}"
"""Where a reader that fetches the branches (`asgctl status`) keeps them."""
CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A cell name as a reader accepts it from a branch name (anyone may push a branch)."""
_HEADS = f"refs/heads/{STATUS_PREFIX}"


class StatusBranchError(Exception):
    """The repository's status branches cannot be listed."""


def branch_for(cell: str, prefix: str = STATUS_PREFIX) -> str:
    """`cell-1` -> `status/cell-1`: the branch an agent pushes its status to."""
    return f"{prefix}{cell}"


MAX_SHARDS = 1024
"""Status repositories a fleet may be spread over at most (`status-shards`)."""
SHARD_FIELD = "{shard}"
"""The placeholder of a status URL template that a shard's number replaces."""


def shard_of(cell: str, shards: int) -> int:
    """The status shard a cell writes to and every reader looks for it in: the first 8 bytes
    of SHA-256 of the cell name (UTF-8), read as a big-endian unsigned integer, modulo
    `shards`.  Stable across processes, versions and languages (unlike Python's `hash`), so
    the agent, `asgctl status`, `asgctl plan` and the waves agree on where a cell is."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards: from 1 to {MAX_SHARDS}, got {shards}")
    digest = hashlib.sha256(cell.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_url(template: str, shard: int) -> str:
    """`https://git/status-{shard}.git`, 3 -> `https://git/status-3.git` (a template without
    `{shard}` is one repository for every shard).  Plain replacement, not `str.format`: a URL
    may hold other braces."""
    return template.replace(SHARD_FIELD, str(shard))


def is_status_branch(branch: str) -> bool:
    """Whether `branch` (a name under `refs/heads/`) is one the contract lets an agent write."""
    return branch.startswith(STATUS_PREFIX)


def fetch_refspec() -> str:
    """Every status branch of a remote into `FETCHED_PREFIX`, replacing what was there."""
    return f"+{_HEADS}*:{FETCHED_PREFIX}*"


def blob_spec(ref: str) -> str:
    """`<ref>:status.yaml`: the name `git cat-file` reads a status file by (and the origin
    every message about that file starts with)."""
    return f"{ref}:{STATUS_FILE}"


def cell_of_ref(ref: str) -> str | None:
    """`refs/heads/status/c1` or `refs/remotes/<remote>/status/c1` -> `c1`; else None."""
    if ref.startswith(_HEADS):
        return ref[len(_HEADS) :]
    parts = ref.split("/", 4)
    if len(parts) == 5 and parts[:2] == ["refs", "remotes"] and parts[3] + "/" == STATUS_PREFIX:
        return parts[4]
    return None


def _ref_rank(ref: str) -> tuple[int, str]:
    if ref.startswith("refs/remotes/origin/"):
        return (0, ref)
    if ref.startswith("refs/remotes/"):
        return (1, ref)
    return (2, ref)


def choose_refs(refs: list[str]) -> dict[str, str]:
    """`{cell: ref}`: when a cell has several refs, the first of `refs/remotes/origin/...`,
    other remotes (sorted), then `refs/heads/...` wins: remotes are what the agents pushed; a
    local branch may be stale."""
    best: dict[str, str] = {}
    for ref in sorted(refs, key=_ref_rank):
        cell = cell_of_ref(ref)
        if cell is not None and cell not in best:
            best[cell] = ref
    return best


def status_refs(repo: str | os.PathLike[str], timeout: float = 120.0) -> dict[str, str]:
    """`{cell: ref}` for every status branch of the repository holding `repo` (a work tree
    folder or a bare repository); StatusBranchError when it is not in one."""
    try:
        listing = gitio.run_git(
            None,
            "-C",
            os.fspath(repo),
            "for-each-ref",
            "--format=%(refname)",
            "--",
            *STATUS_REF_PATTERNS,
            timeout=timeout,
            error=StatusBranchError,
        )
    except StatusBranchError:
        raise StatusBranchError(f"{os.fspath(repo)}: not in a git repository") from None
    return choose_refs(listing.split())
