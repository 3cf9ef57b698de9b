"""Fetching every status branch of a remote: one `ls-remote`, one fetch, the blobs read.

The fleet readers that look at a remote rather than a clone (`asgctl status`, `asgctl
notify`) come through here, so both list the same branches, fetch them the same way (into a
temporary bare repository, or `cache` to fetch incrementally) and read each `status.yaml`
with the budgets of `reconciler.status.read`.  The branch names are whatever the server
lists: a caller that puts a cell name anywhere but a terminal holds it to
`branch.CELL_NAME` first.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler.sources.cellstore import InventoryError
from reconciler.sources.gitio import FULL_SHA, run_git
from reconciler.status.branch import FETCHED_PREFIX, STATUS_PREFIX, blob_spec, fetch_refspec
from reconciler.status.read import read_status_blobs


class FetchError(Exception):
    """The remote could not be listed or fetched."""


@dataclass(frozen=True)
class FetchedStatus:
    """The status branches of a remote as fetched: the bare repository holding them, the
    policy branch's head ("" when missing), and per cell its blob spec and its bytes (or why
    they cannot be used)."""

    repo: Path
    head: str
    cells: tuple[str, ...]
    specs: tuple[str, ...]
    blobs: tuple[bytes | InventoryError, ...]
    more: int = 0
    """Status branches listed past `limit`, and not read."""


def _git(git_dir: Path, *args: str, timeout: float = 120.0) -> str:
    return run_git(git_dir, *args, timeout=timeout, error=FetchError)


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


@contextlib.contextmanager
def fetched_status(
    url: str, branch: str = "main", cache: str | None = None, limit: int | None = None
) -> Iterator[FetchedStatus]:
    """Every `status/<cell>` branch of `url` (and `branch`, for its head), fetched and read;
    with `limit`, the blobs of the first `limit` cells (by name) only, the rest counted.

    The repository lives as long as the context (a caller may ask git more about it, e.g.
    ancestry); FetchError when the remote cannot be listed or fetched, or git cannot run.
    """
    with _repo(cache) as repo:
        prefix = f"refs/heads/{STATUS_PREFIX}"
        listing = _git(repo, "ls-remote", "--", url, f"{prefix}*", f"refs/heads/{branch}")
        pairs = (line.split("\t", 1) for line in listing.splitlines() if "\t" in line)
        refs = {ref: sha for sha, ref in pairs}
        head = refs.get(f"refs/heads/{branch}", "")
        if not FULL_SHA.fullmatch(head):
            head = ""
        listed = sorted(r[len(prefix) :] for r in refs if r.startswith(prefix))
        cells = tuple(listed[:limit] if limit is not None else listed)
        if not cells:
            yield FetchedStatus(repo, head, (), (), (), len(listed))
            return
        specs = [fetch_refspec()]
        if f"refs/heads/{branch}" in refs:
            specs.append(f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
        _git(repo, "fetch", "--quiet", "--no-tags", "--prune", "--", url, *specs)
        blob_specs = tuple(blob_spec(f"{FETCHED_PREFIX}{cell}") for cell in cells)
        try:
            blobs = read_status_blobs(str(repo), list(blob_specs))
        except InventoryError as exc:
            raise FetchError(str(exc)) from None
        yield FetchedStatus(repo, head, cells, blob_specs, tuple(blobs), len(listed) - len(cells))
