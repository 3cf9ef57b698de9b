"""The one reader of status branches: fetched into an incremental cache, bounded, parsed once.

Every fleet reader comes through here -- `asgctl status`, `asgctl plan --inventory status`,
`asgctl notify` and the agent's waves (`reconciler.agent.peers`) -- whether the branches are
in the policy repository (the default) or in separate status repositories, sharded by cell
name (`StatusRepos`: the agent's `status-url` and `status-shards`).  A read:

1. **list** (`read_remote`; `read_local` reads a clone's refs as they are): per repository,
   in parallel, one `git ls-remote` of `refs/heads/<prefix>*`; their count over all shards
   is held to the budget before anything is fetched.
2. **route**: a branch whose name is not a cell name, or that sits in a shard its cell does
   not hash to (`branch.shard_of`), is named in `skipped`, never fetched and never read:
   whoever can push to one shard cannot speak for another shard's cells.  A reader that
   wants only some cells (`only`: a plan job reading its own shard of the fleet) still
   gets every routed cell fetched and budgeted (steps 3 and 4): only the parse (step 5)
   is limited to the cells `only` keeps, the others counted in `left_out`.  So which cells
   are refused never depends on `only`, and the blobs of every cell are in the cache for
   a cheap parse of them all (the plan's claims read, `reconciler.status.read.CLAIM`, for
   the cells whose commit states no claim: `ref_trailers` reads the others' from their
   commits, no blob read).
3. **fetch** only what changed, into the cache, a bare repository (a temporary one, or a
   folder kept between runs): the branches whose commit differs from the cache's
   `refs/shards/<i>/<prefix><cell>`, named on `git fetch --stdin` (by the pattern when more
   than `MAX_NAMED` changed, as on a cold read), one commit deep (a
   status branch is one root commit; a pusher's deep history is not fetched), one fetch per
   repository; branches no longer listed are deleted from the cache.  A warm read of an
   unchanged fleet is one `ls-remote` per repository, never a round trip per cell.
4. **budget** (`ReadBudget`): sizes are asked of git first (`cat-file --batch-check`), then,
   in cell order, a blob over `max_blob` or past `max_total` bytes summed over the read is
   that cell's error and is never read.  Sizes count whether or not the parse is cached,
   and whether or not `only` keeps the cell, so which cells are refused never depends on
   the cache or on the filter.
5. **parse, cached by blob id** (`Parse`, `ParsedStore`): a parse turns one blob into a
   JSON value; values are kept per `kind` (which names the parse and its version) under
   `<cache>/asgctl-parsed/`, so a warm read parses only the blobs that changed.  The blobs
   to parse are split over forked workers when there are many (`forkpool.fork_ranges`);
   each worker reads its own blobs (`git cat-file --batch`, in chunks: the workers hold at
   most `CHUNK_BYTES` between them, whatever the fleet), parses them and writes their
   cache files, so reading, parsing and storing all run on every core, and only the
   parsed values come back to the reader.

A bad branch costs only its own cell: its `CellStatus.error` names the branch and the field.
A repository that cannot be listed or fetched, or holds more branches than the budget, is
`FetchError` (with credentials in its URL hidden): a reader that misses a shard would show a
fleet with cells missing, so it says so instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler.forkpool import fork_ranges
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.status.branch import (
    CELL_NAME,
    MAX_SHARDS,
    SHARD_FIELD,
    STATUS_PREFIX,
    StatusBranchError,
    blob_spec,
    shard_of,
    shard_url,
    status_refs,
)
from reconciler.status.document import CLAIM_TRAILER, MAX_STATUS_BYTES, MAX_TRAILER_BYTES

SHARDS_REFS = "refs/shards/"
"""Where the cache keeps shard `i`'s branches: `refs/shards/<i>/<prefix><cell>`."""
PARSED_DIR = "asgctl-parsed"
"""The parsed-document cache's folder inside a kept cache repository."""
CHUNK_BYTES = 64 * 1024 * 1024
"""Blob bytes read (and held) at once by all the parse workers together; each worker reads
its share of the blobs in chunks of `CHUNK_BYTES / workers`."""
MAX_READ_BYTES = 2 * 1024 * 1024 * 1024
"""Status bytes one read accepts in all: 10,000 cells of 250 containers are ~0.7 GB."""
MAX_BRANCHES = 20_000
"""Status branches one read accepts over all shards: more is not a fleet, it is someone
pushing refs."""
_MIN_JOBS_PER_WORKER = 64
MAX_PARALLEL = 8
"""Status repositories listed at once."""
MAX_NAMED = 200
"""Changed branches fetched by name at most; more are fetched by the pattern (git matches
named refspecs against the listing one by one: 10,000 names take a minute, the pattern
three seconds) and what the listing did not want is deleted after."""


class FetchError(Exception):
    """A status repository could not be listed or fetched, or holds too many branches."""


@dataclass(frozen=True)
class StatusRepos:
    """Where the status branches are: one repository, or `shards` of them named by the URL
    template's `{shard}` (0 .. shards-1).  Each cell's branch is in `url_for(cell)` only."""

    url: str
    shards: int = 1
    prefix: str = STATUS_PREFIX

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"status-shards: from 1 to {MAX_SHARDS}, got {self.shards}")
        if self.shards > 1 and SHARD_FIELD not in self.url:
            raise ValueError(
                f"status-url: {self.shards} shards need {SHARD_FIELD} in the URL "
                "(each shard is its own repository)"
            )

    def urls(self) -> tuple[str, ...]:
        """Every shard's repository, in shard order."""
        return tuple(shard_url(self.url, i) for i in range(self.shards))

    def url_for(self, cell: str) -> str:
        """The repository `cell` pushes its status to."""
        return shard_url(self.url, shard_of(cell, self.shards))

    @property
    def shown(self) -> str:
        """The template as status, logs and messages may show it (no credentials)."""
        return gitio.redact_url(self.url)


@dataclass(frozen=True)
class ReadBudget:
    """What one read accepts at most: branches over all shards, bytes per status file, and
    status bytes in all (the total is what keeps a hostile fleet from filling memory)."""

    max_branches: int = MAX_BRANCHES
    max_blob: int = MAX_STATUS_BYTES
    max_total: int = MAX_READ_BYTES


DEFAULT_BUDGET = ReadBudget()


@dataclass(frozen=True)
class Parse:
    """How a reader turns one status file into the JSON value it keeps: `fn(data, origin)`,
    raising InventoryError for a file it cannot use.  `kind` names the parse and its
    version in the cache: change what `fn` returns, change `kind`."""

    kind: str
    fn: Callable[[bytes, str], Any]


@dataclass(frozen=True)
class CellStatus:
    """One cell's status branch: the ref it was read from, the parse's value, or why not."""

    cell: str
    ref: str
    value: Any = None
    error: str = ""
    blob: str = ""
    """The status file's blob id (it names the bytes read), or "" when there is no file."""

    @property
    def origin(self) -> str:
        """`<ref>:status.yaml`: how messages about this cell's file name it."""
        return blob_spec(self.ref)


@dataclass(frozen=True)
class StatusBatch:
    """A read: every cell found (sorted by name), the branches that are no cell's, and how
    many files were parsed rather than taken from the cache (for benchmarks and tests)."""

    repo: Path
    cells: tuple[CellStatus, ...]
    skipped: tuple[str, ...] = ()
    parsed: int = 0
    more: int = 0
    """Cells past the caller's `limit` (by name), listed and not read."""
    left_out: int = 0
    """Cells listed, routed, fetched and budgeted but left out of the parse by the caller's
    `only`."""
    listing: tuple[tuple[str, str], ...] = ()
    """`(cell, ref)` of every listed and routed cell, sorted, whatever `only` and `limit`
    keep: what a read of every cell's blob (the claims read) goes over."""


class ParsedStore:
    """Parse results by (kind, blob id): in memory for the process's life, and on disk when
    given a folder.  Only successful parses are kept (an error names the branch it was read
    from, which another cell pushing the same blob must not inherit).  The folder is the
    reader's own; a file in it that cannot be read back is a miss, never an error."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._memory: dict[tuple[str, str], Any] = {}

    def _path(self, kind: str, oid: str) -> Path | None:
        if self.folder is None or not gitio.FULL_SHA.fullmatch(oid):
            return None
        return self.folder / kind / oid[:2] / f"{oid}.json"

    def get(self, kind: str, oid: str) -> tuple[bool, Any]:
        key = (kind, oid)
        if key in self._memory:
            return True, self._memory[key]
        path = self._path(kind, oid)
        if path is None:
            return False, None
        try:
            value = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return False, None
        self._memory[key] = value
        return True, value

    def remember(self, kind: str, oid: str, value: Any) -> None:
        """Keep `value` in memory only (a worker has written its file)."""
        self._memory[(kind, oid)] = value

    def put(self, kind: str, oid: str, value: Any) -> None:
        """Keep `value` in memory and on disk; safe from several processes at once (each
        writes its own temporary file, and the last rename wins with a whole file)."""
        self._memory[(kind, oid)] = value
        path = self._path(kind, oid)
        if path is None:
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(value, separators=(",", ":"), default=str))
            os.replace(tmp, path)

    def keep_only(self, kind: str, oids: set[str]) -> None:
        """Forget the values of blobs no branch holds any more."""
        for key in [k for k in self._memory if k[0] == kind and k[1] not in oids]:
            del self._memory[key]
        if self.folder is None or not (self.folder / kind).is_dir():
            return
        for sub in (self.folder / kind).iterdir():
            for path in sub.glob("*.json") if sub.is_dir() else ():
                if path.stem not in oids:
                    path.unlink(missing_ok=True)


@contextlib.contextmanager
def status_cache(cache: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The bare repository a read fetches into: `cache` (made when missing, kept after), or
    a temporary one removed afterwards.  OSError when the folder cannot be made."""
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


def _git(repo: Path, *args: str, url: str = "", timeout: float = 120.0) -> str:
    try:
        return gitio.run_git(repo, *args, timeout=timeout, error=FetchError)
    except FetchError as exc:
        if not url:
            raise
        said = gitio.redacted(str(exc), url)
        raise FetchError(f"{gitio.redact_url(url)}: {said}") from None


@dataclass(frozen=True)
class _Listing:
    """One shard's `ls-remote`: the branches to hold (`{cache ref: commit}`), the branches
    named and ignored, and how many status branches the shard listed in all."""

    wanted: dict[str, str]
    skipped: list[str]
    listed: int


Only = Callable[[str], bool]
"""A reader's cell filter: cell name -> read it?  (None: every cell.)"""


def _list_shard(repo: Path, repos: StatusRepos, shard: int, timeout: float) -> _Listing:
    """Step 2 of the module docstring at listing time: only branches of cells that hash to
    `shard` are wanted; the server's words (names, ids) are checked before git sees them."""
    url = shard_url(repos.url, shard)
    heads = f"refs/heads/{repos.prefix}"
    out = _git(repo, "ls-remote", "--refs", "--", url, f"{heads}*", url=url, timeout=timeout)
    wanted: dict[str, str] = {}
    skipped: list[str] = []
    listed = 0
    shown = gitio.redact_url(url)
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if not ref.startswith(heads):
            continue
        listed += 1
        cell = ref[len(heads) :]
        where = f"{repos.prefix}{cell} in {shown}"
        if not CELL_NAME.match(cell) or ".." in cell or cell.endswith((".lock", ".")):
            skipped.append(f"{where}: cell name {cell!r} must match {CELL_NAME.pattern}")
        elif shard_of(cell, repos.shards) != shard:
            home = shard_of(cell, repos.shards)
            skipped.append(
                f"{where}: cell {cell} belongs in shard {home} of {repos.shards}, not shard "
                f"{shard}: ignored"
            )
        elif not gitio.FULL_SHA.fullmatch(sha):
            skipped.append(f"{where}: the server listed {sha[:80]!r}, not an object id")
        else:
            wanted[f"{SHARDS_REFS}{shard}/{repos.prefix}{cell}"] = sha
    return _Listing(wanted, skipped, listed)


@dataclass(frozen=True)
class Fetched:
    """What `fetch_shards` brought into the cache: `[(cell, cache ref)]` sorted by cell, and
    the branches named and ignored."""

    cells: list[tuple[str, str]]
    skipped: list[str]


def fetch_shards(
    repo: Path,
    repos: StatusRepos,
    budget: ReadBudget = DEFAULT_BUDGET,
    timeout: float = 120.0,
) -> Fetched:
    """Bring every shard's status branches into `repo` (steps 1 to 3 of the module
    docstring).

    Every shard is listed (in parallel) and counted whole; over `max_branches` in all,
    nothing is fetched.  Then only wanted branches whose commit differs from the cache's are
    fetched, and the cache's branches no shard lists any more are deleted: a warm read of an
    unchanged fleet is one `ls-remote` per repository."""
    with ThreadPoolExecutor(max_workers=min(repos.shards, MAX_PARALLEL)) as pool:
        listings = list(
            pool.map(lambda i: _list_shard(repo, repos, i, timeout), range(repos.shards))
        )
    listed = sum(x.listed for x in listings)
    if listed > budget.max_branches:
        raise FetchError(
            f"{repos.shown}: {listed} status branches, over the limit of {budget.max_branches}"
        )
    held = _held(repo)
    wanted = {ref: sha for x in listings for ref, sha in x.wanted.items()}
    for shard, x in enumerate(listings):  # one after the other: depth 1 locks `shallow`
        changed = [ref for ref, sha in x.wanted.items() if held.get(ref) != sha]
        if len(changed) > MAX_NAMED:
            _fetch(repo, repos, shard, [f"{SHARDS_REFS}{shard}/{repos.prefix}*"], timeout)
        elif changed:
            _fetch(repo, repos, shard, changed, timeout)
    _delete_refs(repo, [ref for ref in _held(repo) if ref not in wanted])
    prefix = len(SHARDS_REFS)
    cells = sorted((ref[prefix:].partition("/")[2][len(repos.prefix) :], ref) for ref in wanted)
    skipped = [m for x in listings for m in x.skipped]
    return Fetched(cells, skipped)


def _fetch(repo: Path, repos: StatusRepos, shard: int, refs: list[str], timeout: float) -> None:
    """Exactly `refs` (cache names, or one `<prefix>*` pattern) of `shard`, one commit
    deep, named on stdin."""
    if not refs:
        return
    url = shard_url(repos.url, shard)
    local = f"{SHARDS_REFS}{shard}/"
    specs = "".join(f"+refs/heads/{ref[len(local) :]}:{ref}\n" for ref in refs)
    try:
        gitio.run_git(
            repo,
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--depth=1",
            "--stdin",
            "--",
            url,
            input=specs,
            timeout=timeout,
            error=FetchError,
        )
    except FetchError as exc:
        said = gitio.redacted(str(exc), url)
        raise FetchError(f"{gitio.redact_url(url)}: {said}") from None


def _held(repo: Path) -> dict[str, str]:
    """`{cache ref: commit}` of everything under `refs/shards/`."""
    out = _git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "--", SHARDS_REFS)
    pairs = (line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {ref: sha for sha, ref in pairs}


@dataclass(frozen=True)
class Trailers:
    """What one ref's commit states in its `document.CLAIM_TRAILER` trailers: the commit,
    each trailer as `<key>: <value>` (git's trailer rules, continuation lines unfolded), and
    whether they passed `MAX_TRAILER_BYTES` (then `items` is empty: none is kept)."""

    commit: str
    items: tuple[str, ...]
    cut: bool = False


_TRAILERS_FORMAT = (
    f"--format=%(objectname) %(refname)%00%(trailers:key={CLAIM_TRAILER},unfold,separator=%x0a)%00"
)


def ref_trailers(repo: Path, patterns: Sequence[str]) -> dict[str, Trailers]:
    """`{ref: Trailers}` for every ref `patterns` match, from one `git for-each-ref`: no
    blob is read, and each commit is parsed by git itself (so a trailer is what `git
    interpret-trailers` calls one).  The commit message is the pusher's text, so the format
    ends every field with a NUL (which no message can hold: git stops at one) and each
    field is kept to `MAX_TRAILER_BYTES` however long git's is (`gitio.nul_fields`): a
    huge message, a thousand trailers, control characters or a NUL cost the reader at most
    git's linear pass over the commits the fetch already brought in, and never break the
    listing.  (The trailers are separated by line breaks, which unfolded values cannot
    hold; a value that held one would only read as two trailers, i.e. no claim.)
    InventoryError when git cannot run."""
    cap = MAX_TRAILER_BYTES
    try:
        fields = gitio.nul_fields(repo, ["for-each-ref", _TRAILERS_FORMAT, "--", *patterns], cap)
    except OSError as exc:
        raise InventoryError(f"{os.fspath(repo)}: git for-each-ref failed: {exc}") from None
    found: dict[str, Trailers] = {}
    for (head, head_cut), (body, cut) in zip(fields[0::2], fields[1::2], strict=False):
        commit, _, ref = gitio.decode(head).lstrip("\n").partition(" ")
        if head_cut or not gitio.FULL_SHA.fullmatch(commit):
            continue  # a ref name no cell has (a cell's is at most 128 characters)
        items = () if cut else tuple(gitio.decode(body).split("\n")) if body else ()
        found[ref] = Trailers(commit, items, cut)
    return found


def moved_refs(repo: Path, patterns: Sequence[str], commits: dict[str, str]) -> set[str]:
    """The refs of `{ref: commit}` that no longer name that commit (a fetch into the clone
    while it was read): what was read from their commits and their files may not agree.
    `repo` is any folder of the repository (`git -C`, as `ref_trailers`)."""
    try:
        out = gitio.run_git(
            None,
            "-C",
            os.fspath(repo),
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "--",
            *patterns,
            timeout=120.0,
            error=InventoryError,
        )
    except InventoryError as exc:
        raise InventoryError(f"{os.fspath(repo)}: {exc}") from None
    now = {ref: sha for sha, _, ref in (line.partition(" ") for line in out.splitlines())}
    return {ref for ref, commit in commits.items() if now.get(ref) != commit}


def _delete_refs(repo: Path, refs: Sequence[str]) -> None:
    """Delete cache refs in one `update-ref --stdin` (their objects go at the next gc)."""
    if refs:
        commands = "".join(f"delete {ref}\0\0" for ref in refs)
        gitio.run_git(
            repo, "update-ref", "--stdin", "-z", input=commands, timeout=120.0, error=FetchError
        )


def read_remote(
    repo: Path,
    repos: StatusRepos,
    parse: Parse,
    *,
    budget: ReadBudget = DEFAULT_BUDGET,
    store: ParsedStore | None = None,
    workers: int = 1,
    timeout: float = 120.0,
    limit: int | None = None,
    only: Only | None = None,
) -> StatusBatch:
    """Fetch (into `repo`, see `status_cache`), route, budget and parse every status branch
    of `repos`; with `only`, every branch is still fetched and budgeted but only the cells
    it keeps are parsed (the others are counted in `left_out`); with `limit`, the first
    `limit` cells by name are read and the rest counted in `more`.  `store` defaults to one
    kept inside `repo`.  FetchError when a shard cannot be read."""
    got = fetch_shards(repo, repos, budget, timeout)
    store = store if store is not None else ParsedStore(repo / PARSED_DIR)
    cells = got.cells
    more = max(0, len(cells) - limit) if limit is not None else 0
    batch = read_cells(
        repo, cells[: len(cells) - more], parse, budget, store, workers, got.skipped, only=only
    )
    return replace(batch, more=more, listing=tuple(cells))


def read_local(
    repo: str | os.PathLike[str],
    parse: Parse,
    *,
    budget: ReadBudget = DEFAULT_BUDGET,
    workers: int = 1,
    only: Only | None = None,
) -> StatusBatch:
    """The status branches a clone already holds (`branch.status_refs`: its remotes' and its
    own), read with the same budget and parse as `read_remote` (and the same `only`: every
    cell budgeted, only those it keeps parsed), nothing fetched or written.  InventoryError
    when `repo` is not in a git repository."""
    try:
        listed = status_refs(repo)
    except StatusBranchError as exc:
        raise InventoryError(str(exc)) from None
    cells: list[tuple[str, str]] = []
    skipped: list[str] = []
    for cell, ref in sorted(listed.items()):
        if not CELL_NAME.match(cell):
            skipped.append(f"{ref}: cell name {cell!r} must match {CELL_NAME.pattern}")
        else:
            cells.append((cell, ref))
    batch = read_cells(Path(repo), cells, parse, budget, ParsedStore(), workers, skipped, only=only)
    return replace(batch, listing=tuple(cells))


def read_cells(
    repo: Path,
    cells: Sequence[tuple[str, str]],
    parse: Parse,
    budget: ReadBudget,
    store: ParsedStore,
    workers: int = 1,
    skipped: Sequence[str] = (),
    *,
    only: Only | None = None,
    known: Mapping[str, Any] | None = None,
) -> StatusBatch:
    """Steps 4 and 5 of the module docstring for `[(cell, ref)]` of `repo`: every cell is
    budgeted in order, and those `only` keeps (all, without it) are parsed and returned;
    the others are counted in `left_out`.  A cell in `known` (a value read elsewhere: the
    claim its commit states) is budgeted and returned with that value and its blob id, its
    blob never read nor its value kept by blob id (it is the commit's, not the blob's).
    The cached parses of blobs none of these cells holds are forgotten (every cell counts,
    kept or not: a later read of other cells still finds theirs)."""
    try:
        infos = gitio.blob_sizes(repo, [blob_spec(ref) for _c, ref in cells])
    except OSError as exc:
        raise InventoryError(f"{os.fspath(repo)}: git cat-file failed: {exc}") from None
    results: list[CellStatus | None] = [None] * len(cells)
    todo: list[tuple[int, gitio.ObjectInfo]] = []
    total = 0
    oids: set[str] = set()
    left_out = 0
    for i, ((cell, ref), info) in enumerate(zip(cells, infos, strict=True)):
        origin = blob_spec(ref)
        if info is None or info.type != "blob":
            error = f"{origin}: no such file"
        else:
            oids.add(info.oid)
            if info.size > budget.max_blob:
                error = f"{origin}: {info.size} bytes, over the limit of {budget.max_blob} bytes"
            else:
                total += info.size
                error = (
                    f"{origin}: not read: the status files read so far pass the read's budget "
                    f"of {budget.max_total} bytes"
                    if total > budget.max_total
                    else ""
                )
        if only is not None and not only(cell):
            left_out += 1  # budgeted above like every cell, never parsed
            continue
        blob = info.oid if info is not None and info.type == "blob" else ""
        if error or info is None:
            results[i] = CellStatus(cell, ref, error=error, blob=blob)
            continue
        if known is not None and cell in known:
            results[i] = CellStatus(cell, ref, known[cell], blob=blob)
            continue
        found, value = store.get(parse.kind, info.oid)
        if found:
            results[i] = CellStatus(cell, ref, value, blob=blob)
        else:
            todo.append((i, info))
    jobs = [(blob_spec(cells[i][1]), info) for i, info in todo]
    try:
        answers = _parse_all(_Work(parse, repo, store, jobs), workers)
    except OSError as exc:
        raise InventoryError(f"{os.fspath(repo)}: git cat-file failed: {exc}") from None
    for (i, info), (ok, value) in zip(todo, answers, strict=True):
        cell, ref = cells[i]
        if ok:
            store.remember(parse.kind, info.oid, value)
            results[i] = CellStatus(cell, ref, value, blob=info.oid)
        else:
            results[i] = CellStatus(cell, ref, error=str(value), blob=info.oid)
    store.keep_only(parse.kind, oids)
    done = tuple(r for r in results if r is not None)
    return StatusBatch(repo, done, tuple(skipped), len(todo), left_out=left_out)


Job = tuple[str, gitio.ObjectInfo]
"""A blob to parse: the origin messages name it by, and its id and size (budgeted)."""
Answer = tuple[bool, Any]


@dataclass(frozen=True)
class _Work:
    parse: Parse
    repo: Path
    store: ParsedStore
    jobs: list[Job]
    chunk_bytes: int = CHUNK_BYTES


def _chunks(jobs: Sequence[Job], limit: int) -> Iterator[Sequence[Job]]:
    """Consecutive runs of `jobs` of at most `limit` blob bytes (or one blob)."""
    start, size = 0, 0
    for i, (_origin, info) in enumerate(jobs):
        if i > start and size + info.size > limit:
            yield jobs[start:i]
            start, size = i, 0
        size += info.size
    if start < len(jobs):
        yield jobs[start:]


def _parse_range(work: _Work, bounds: tuple[int, int]) -> list[Answer]:
    """(True, value) or (False, why) per blob of the range: read a chunk at a time, parsed,
    and each value stored (its cache file written here, in the worker); only plain JSON
    values go back.  OSError when git cannot run."""
    out: list[Answer] = []
    for chunk in _chunks(work.jobs[bounds[0] : bounds[1]], work.chunk_bytes):
        blobs = gitio.read_objects(work.repo, [info for _origin, info in chunk])
        for (origin, info), data in zip(chunk, blobs, strict=True):
            if data is None:
                out.append((False, f"{origin}: changed while being read"))
                continue
            try:
                value = work.parse.fn(data, origin)
            except InventoryError as exc:
                out.append((False, str(exc)))
                continue
            work.store.put(work.parse.kind, info.oid, value)
            out.append((True, value))
    return out


def _parse_all(work: _Work, workers: int) -> list[Answer]:
    """Every job's answer, in order, from up to `workers` forked workers that share
    `CHUNK_BYTES` of blobs held at once."""
    workers = max(1, min(os.cpu_count() or 1, workers, len(work.jobs) // _MIN_JOBS_PER_WORKER))
    work = replace(work, chunk_bytes=max(1, CHUNK_BYTES // workers))
    parts = fork_ranges(_parse_range, work, len(work.jobs), workers)
    return [answer for part in parts for answer in part]
