"""`asgctl plan` and `asgctl test` at the edge: git, files and inventories are read here.

Everything after this module is pure (`diff.diff_part`, `diff.diff_principals`, `report.*`,
`policytest.run_tests`), and so is `complete` here (the policies come in as a function), so
the CI plan differs from the agents' compile only in where its inputs come from.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from reconciler.ci.partition import Shard
from reconciler.ci.report.plan import (
    BaseGroup,
    Enforces,
    LeftOut,
    PartFacts,
    PlanReport,
    Revision,
    ShardScope,
)
from reconciler.core.cellplan import DEFAULT_GATE, CellInventory, GateSettings, PlanError
from reconciler.core.compile import prepare
from reconciler.core.diff import (
    DiffPart,
    PlanDiff,
    PrincipalFacts,
    diff_part,
    diff_principals,
    join_facts,
)
from reconciler.core.model import PolicySet
from reconciler.forkpool import fork_ranges
from reconciler.policy.load import load_policy
from reconciler.policy.source import RepoPlace, locate
from reconciler.policy.yamlsafe import ParseCache
from reconciler.sources import gitio
from reconciler.sources.cellstore import InventoryError
from reconciler.sources.gitio import resolve_commit
from reconciler.sources.inventories import (
    StatusBranches,
    StatusRead,
    StoreFiles,
    synthetic_inventory,
)
from reconciler.status.document import revision_sha

STATUS = "status"
MAX_WORKERS = 4  # forked processes for a fleet-wide diff (see diff.diff_part)
SYNTHETIC = "directory"
MAX_BASES = 16
"""Distinct revisions a plan against the truth compiles.  A fleet mid-rollout runs two or
three; each costs a load and a validation, so whoever can push status branches must not be
able to make CI compile hundreds: cells on rarer revisions are planned as unknown."""
WHOLE = Shard(1, 1)
"""An unsharded plan: the one shard of one."""
FETCH_STATUS = "git fetch origin '+refs/heads/status/*:refs/remotes/origin/status/*'"


def resolve_revision(top: Path | None, rev: str) -> str | None:
    """The commit SHA a revision names, or None when it names nothing."""
    if top is None:
        return None
    return resolve_commit(top, rev)


def _store_paths(spec: Sequence[str]) -> tuple[str, ...]:
    """Files as given; a folder means every `store.json` below it and its own `*.json`."""
    out: list[str] = []
    for item in spec:
        p = Path(item)
        if p.is_dir():
            found = sorted(set(p.rglob("store.json")) | set(p.glob("*.json")))
            if not found:
                raise InventoryError(f"{item}: no store.json or *.json files in this folder")
            out.extend(str(f) for f in found)
        else:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class Inventory:
    """The cells a plan diffs, and what it knows of the whole inventory.

    Every job of a sharded plan reads the same `fleet`, `identity` and `skipped` (they come
    from the listing of the status branches, or from every store file), and diffs only its
    own `cells`; `left_out` are its cells that could not be used.  Unsharded, a plan is the
    one job of one shard."""

    cells: tuple[CellInventory, ...]
    described: str
    fleet: tuple[str, ...]
    """Every cell of the inventory, planned or not, in plan order."""
    identity: str
    """A digest of what was read (`ShardScope.identity`)."""
    skipped: tuple[str, ...] = ()
    """Branches that are no cell (a warning each; the same for every job)."""
    left_out: tuple[LeftOut, ...] = ()
    """Cells of `cells`' shard whose status could not be used (a warning each)."""
    gate_settings: str = ""


LEFT_OUT = " (this cell is left out of the plan)"


def load_inventory(
    spec: Sequence[str],
    place: RepoPlace,
    policies: Sequence[PolicySet],
    found: StatusRead | None = None,
    remote: StatusBranches | None = None,
    shard: Shard | None = None,
    gate_from: str = "",
) -> Inventory:
    """The cells to plan for (of `shard`, when given) and what the plan knows of the rest.

    `spec` is empty (status branches when there are any, else a synthetic cell), `status`,
    `directory` (the synthetic cell), or store files and folders of them.  `found` is the
    status branches when the caller has read them already (for `shard`: its cells in full,
    every cell's claim); `remote`, where they are when not in the clone (`--status-url`).
    """
    status = remote or (StatusBranches(str(place.top)) if place.top is not None else None)
    has_status = found is not None or (status is not None and status.exists())
    if list(spec) == [STATUS] or (not spec and has_status):
        if status is None:
            raise InventoryError("--inventory status: the policies are not in a git repository")
        if found is None:
            found = replace(status, only=shard.holds if shard else None).read()
        if not found.fleet:
            if found.skipped:
                raise InventoryError(
                    "--inventory status: no usable status/<cell> branch; skipped: "
                    + "; ".join(found.skipped)
                )
            raise InventoryError("--inventory status: there are no status/<cell> branches")
        cells = tuple(c for c in found.cells if shard is None or shard.holds(c.cell))
        return Inventory(
            cells,
            f"status branches ({len(found.fleet):,} cells)",
            found.fleet,
            found.identity,
            tuple(m + LEFT_OUT for m in found.skipped),
            tuple(
                LeftOut(cell, found.unusable[cell] + LEFT_OUT)
                for cell in found.fleet
                if cell in found.unusable and (shard is None or shard.holds(cell))
            ),
            REPORTED_GATES,  # every status document states its gate (the reader's defaults
            # when it says nothing), whichever of them a shard's job holds
        )
    if not spec or list(spec) == [SYNTHETIC]:
        every: tuple[CellInventory, ...] = (synthetic_inventory(policies),)
        described = (
            "synthetic (one container per app and lifecycle from the directory; "
            "no status branches yet)"
        )
    elif STATUS in spec or SYNTHETIC in spec:
        raise InventoryError("--inventory: 'status' and 'directory' cannot be mixed with files")
    else:
        source = StoreFiles(_store_paths(spec))
        every = source.cells()
        described = f"{source.description} ({len(every):,} cells)"
    return Inventory(
        tuple(c for c in every if shard is None or shard.holds(c.cell)),
        described,
        tuple(c.cell for c in every),
        inventory_identity(every),
        gate_settings=gate_origin(every, gate_from),
    )


def inventory_identity(cells: Sequence[CellInventory]) -> str:
    """A digest of an inventory read in full by every job: each cell's name, origin,
    reported gate and containers.  The merge refuses partials whose reads differ."""
    h = hashlib.sha256()
    for c in cells:
        rows = [repr((c.cell, c.origin, c.gate, len(c.containers)))]
        rows += [
            f"{k.handle}\t{k.ip}\t{k.app_id}\t{k.space_id}\t{k.org_id}\t{k.policy_group_id}\t"
            f"{k.workload}"
            for k in c.containers
        ]
        h.update("\n".join(rows).encode("utf-8", "surrogateescape") + b"\n")
    return "sha256:" + h.hexdigest()


REPORTED_GATES = "as each cell reports on its status branch"


def gate_origin(cells: Sequence[CellInventory], given: str) -> str:
    """Where the mass-revoke settings the plan judges each cell with come from, in words:
    what each cell reports (status branches), else the agent config given, else defaults."""
    if cells and all(c.gate is not None for c in cells):
        return REPORTED_GATES
    return f"from {given}" if given else "the agent's defaults"


@dataclass(frozen=True, slots=True)
class Enforced:
    """What one cell enforces, as far as its status branch and the repository can tell.

    `revision` (a commit `sha` that passed every check), `nothing` (the status names no
    applied revision: the agent has not applied one yet) or `unknown`, with the `reason`.
    """

    kind: Enforces
    sha: str = ""
    reason: str = ""


def _claim(raw: str) -> str:
    """A status document's revision text, quoted and cut: the cell's words, not ours."""
    return repr(raw[:80] + ("..." if len(raw) > 80 else ""))


def check_applied(top: Path, raw: str, head_sha: str, reader: gitio.BlobReader) -> Enforced:
    """Is `raw` (a status document's `lastAppliedRevision`) a revision this plan can trust
    as what the cell enforces?  Whoever can push a status branch wrote it, so it must be
    `<branch>@sha1:<full hex id>` (nothing else reaches git), name an object of this
    repository, that object must be a commit, and the commit must share history with the
    head (a status branch's own root commit, or a commit of another repository's history,
    is not a revision of this policy).  Each failure is a reason; nothing raises."""
    if not raw:
        return Enforced("nothing")
    sha = revision_sha(raw)
    said = f"its status says it enforces {_claim(raw)}"
    if not sha:
        return Enforced("unknown", reason=f"{said}, not <branch>@sha1:<full commit id>")
    try:
        info = reader.info(sha)
    except OSError as exc:
        return Enforced("unknown", reason=f"{said}, which git could not look up ({exc})")
    if info is None:
        return Enforced("unknown", reason=f"{said}, which is not in this repository")
    if info.type != "commit":
        return Enforced("unknown", reason=f"{said}, which is a {info.type}, not a commit")
    try:
        res = gitio.run(None, "-C", str(top), "merge-base", head_sha, sha, timeout=60.0)
    except (gitio.GitTimeout, OSError) as exc:
        return Enforced("unknown", reason=f"{said}, which git could not relate to the head ({exc})")
    if res.returncode != 0:
        return Enforced(
            "unknown", reason=f"{said}, a commit of another history (none in common with the head)"
        )
    return Enforced("revision", sha)


@dataclass(frozen=True)
class FleetTruth:
    """What every cell of an inventory enforces, with the policy of each trusted revision.

    `policies` holds the revisions compiled (at most MAX_BASES, each validated); a claimed
    revision that fails validation or is over that count is `unknown` in `cells`.
    """

    cells: Mapping[str, Enforced]
    policies: Mapping[str, PolicySet]
    subjects: Mapping[str, str]


def read_truth(
    policies: str,
    top: Path,
    head_sha: str,
    cells: Sequence[str],
    applied: Mapping[str, str],
    unclaimed: Mapping[str, str] | None = None,
    compile_revisions: bool = True,
    workers: int = 1,
    cache: ParseCache | None = None,
) -> FleetTruth:
    """Check every cell's claim (`applied`: `{cell: lastAppliedRevision}`; a cell missing
    from it is in `unclaimed`, with why its status states none, or has no status branch)
    and, with `compile_revisions`, load each trusted revision
    once, most-enforced first, in up to `workers` forked processes: at most MAX_BASES that
    validate, out of at most twice as many tried.  `cache` holds the files parsed so far
    (the head's): revisions share most of them."""
    git_dir = gitio.git_dir_of(top)
    checked: dict[str, Enforced] = {}
    out: dict[str, Enforced] = {}
    with gitio.BlobReader(git_dir or str(top)) as reader:
        for cell in cells:
            if cell not in applied:
                why = (unclaimed or {}).get(cell)
                said = f"its status states no revision the plan can read ({why})"
                out[cell] = Enforced("unknown", reason=said if why else "it has no status branch")
                continue
            raw = applied[cell]
            if raw not in checked:
                checked[raw] = check_applied(top, raw, head_sha, reader)
            out[cell] = checked[raw]
    loaded: dict[str, PolicySet] = {}
    subjects: dict[str, str] = {}
    if not compile_revisions:
        return FleetTruth(out, loaded, subjects)
    counts = Counter(e.sha for e in out.values() if e.kind == "revision")
    ranked = [sha for sha, _n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    refused: dict[str, str] = {}
    tried = 0
    while ranked and len(loaded) < MAX_BASES and tried < MAX_BASES * 2:
        batch, ranked = ranked[: MAX_BASES - len(loaded)], ranked[MAX_BASES - len(loaded) :]
        tried += len(batch)
        # With the cache, a revision costs little more than its changed files: one after
        # another here beats forked workers, whose policies come back pickled (measured).
        loads = _load_revisions(policies, batch, 1 if cache is not None else workers, cache)
        for sha, errors, policy in loads:
            if policy is None:
                refused[sha] = (
                    f"it enforces {sha[:12]}, which does not validate here ({errors} error"
                    f"{'s' * (errors != 1)}), so it cannot be compiled to compare with"
                )
            else:
                loaded[sha] = policy
                subjects[sha] = _subject(top, sha)
    for sha in ranked:
        refused[sha] = (
            f"it enforces {sha[:12]}, one of more than {MAX_BASES} distinct revisions "
            "(only the most enforced are compiled)"
        )
    for cell, e in out.items():
        if e.kind == "revision" and e.sha in refused:
            out[cell] = Enforced("unknown", reason=refused[e.sha])
    return FleetTruth(out, loaded, subjects)


def _load_revisions(
    policies: str, shas: list[str], workers: int, cache: ParseCache | None = None
) -> list[tuple[str, int, PolicySet | None]]:
    """(sha, validation errors, the policy or None) for each revision, loaded in forked
    workers when there are several (loading and validating is about as long per revision
    as the head's; the policies come back pickled)."""
    return [
        row
        for part in fork_ranges(_load_range, (policies, shas, cache), len(shas), workers)
        for row in part
    ]


def _load_range(
    shared: tuple[str, list[str], ParseCache | None], bounds: tuple[int, int]
) -> list[tuple[str, int, PolicySet | None]]:
    policies, shas, cache = shared
    out: list[tuple[str, int, PolicySet | None]] = []
    for sha in shas[bounds[0] : bounds[1]]:
        result = load_policy(policies, sha, cache=cache)
        out.append((sha, len(result.errors), result.policy if result.ok else None))
    return out


def _subject(top: Path, sha: str) -> str:
    """The commit's subject line (shown beside its id; escaped by the report), or ""."""
    try:
        res = gitio.run(None, "-C", str(top), "log", "-1", "--format=%s", sha, timeout=60.0)
    except (gitio.GitTimeout, OSError):
        return ""
    return res.stdout.strip()[:100] if res.returncode == 0 else ""


def _names(cells: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(cells[:limit])
    return shown + (f" and {len(cells) - limit:,} more" if len(cells) > limit else "")


def truth_warnings(truth: FleetTruth) -> list[str]:
    """One warning per reason a cell's revision is unknown, naming the cells."""
    by_reason: dict[str, list[str]] = {}
    for cell in sorted(truth.cells):
        e = truth.cells[cell]
        if e.kind == "unknown":
            by_reason.setdefault(e.reason, []).append(cell)
    return [
        f"what {_n_cells(len(cells))} enforce{'s' * (len(cells) == 1)} is unknown "
        f"({_names(cells)}): {reason}"
        for reason, cells in by_reason.items()
    ]


def _n_cells(n: int) -> str:
    return f"{n:,} cell{'s' * (n != 1)}"


def enforced_summary(truth: FleetTruth) -> str:
    """`3 cells enforce 1a2b3c4d5e6f, 1 cell enforces nothing yet, 1 cell: unknown`."""
    kinds = Counter(
        (e.kind, e.sha) for e in truth.cells.values() if e.kind == "revision"
    ).most_common()
    parts = [
        f"{_n_cells(n)} enforce{'s' * (n == 1)} {sha[:12]}"
        for (_kind, sha), n in sorted(kinds, key=lambda kv: (-kv[1], kv[0][1]))
    ]
    nothing = sum(1 for e in truth.cells.values() if e.kind == "nothing")
    unknown = sum(1 for e in truth.cells.values() if e.kind == "unknown")
    if nothing:
        parts.append(f"{_n_cells(nothing)} enforce{'s' * (nothing == 1)} nothing yet")
    if unknown:
        parts.append(f"what {_n_cells(unknown)} enforce{'s' * (unknown == 1)} is unknown")
    return ", ".join(parts)


def _reference(truth: FleetTruth) -> str:
    """The revision most cells enforce (ties: the lowest id): what a cell whose revision is
    unknown is planned against, so a status branch saying nothing useful cannot make its
    cell's losses vanish the way an empty base would.  "" when no revision is known."""
    counts = Counter(e.sha for e in truth.cells.values() if e.kind == "revision")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked[0][0] if ranked else ""


def base_groups(
    truth: FleetTruth, cells: Sequence[CellInventory]
) -> list[tuple[Enforces, str, str, list[CellInventory]]]:
    """(kind, revision, planned against, cells): revisions by cells enforcing them, most
    first; then the cells enforcing nothing; then the unknown ones.  The groups and their
    order are the whole inventory's (`truth`), so every job of a sharded plan lists the
    same groups, each with its own cells (some with none)."""
    counts = Counter((e.kind, e.sha) for e in truth.cells.values())
    by: dict[tuple[Enforces, str], list[CellInventory]] = {key: [] for key in counts}
    for cell in cells:
        e = truth.cells[cell.cell]
        by[(e.kind, e.sha)].append(cell)
    order = {"revision": 0, "nothing": 1, "unknown": 2}
    keys = sorted(by, key=lambda k: (order[k[0]], -counts[k], k[1]))
    ref = _reference(truth)
    out: list[tuple[Enforces, str, str, list[CellInventory]]] = []
    for kind, sha in keys:
        against = sha if kind == "revision" else ref if kind == "unknown" else ""
        out.append((kind, sha, against, by[(kind, sha)]))
    return out


DiffJob = tuple[PolicySet, Sequence[CellInventory]]


def diff_groups(
    jobs: Sequence[DiffJob],
    head: PolicySet,
    workers: int,
    gate: GateSettings = DEFAULT_GATE,
) -> list[DiffPart]:
    """`diff_part(base, head, cells)` for every (base, cells) job, in order.

    A group holding at least a worker's share of the cells is diffed on its own, split
    across the workers as a one-base plan is.  The others are shared out whole, one forked
    process per worker, largest first: each runs its groups one after another, and the
    head's compiled groups, memoised in the process, serve each of its groups.  The head's
    index and its profiles' entries are built before the fork (`compile.prepare`), so the
    workers share one copy.  The result is the same either way.
    """
    total = sum(len(cells) for _base, cells in jobs) or 1
    out: dict[int, DiffPart] = {}
    small: list[int] = []
    for i, (base, cells) in enumerate(jobs):
        if not cells:
            out[i] = DiffPart(PlanDiff((), ()), PrincipalFacts())
        elif workers <= 1 or len(cells) * workers >= total:
            out[i] = diff_part(base, head, cells, workers, gate)
        else:
            small.append(i)
    small.sort(key=lambda i: -len(jobs[i][1]))
    if small:
        # Every worker compiles with the head: index it and its profiles here, once.
        prepare(head, (c for i in small for cell in jobs[i][1] for c in cell.containers))
        shared = (jobs, small, head, gate)
        for done in fork_ranges(_diff_group_range, shared, len(small), workers):
            out.update(done)
    return [out[i] for i in range(len(jobs))]


def _diff_group_range(
    shared: tuple[Sequence[DiffJob], list[int], PolicySet, GateSettings],
    bounds: tuple[int, int],
) -> list[tuple[int, DiffPart]]:
    jobs, order, head, gate = shared
    return [
        (order[k], diff_part(jobs[order[k]][0], head, jobs[order[k]][1], 1, gate))
        for k in range(*bounds)
    ]


def merge_diffs(diffs: Sequence[PlanDiff]) -> PlanDiff:
    """The groups' diffs as one, for the totals: the cells are disjoint, so counts add up."""
    cells = sorted((c for d in diffs for c in d.cells), key=lambda c: c.cell)
    principals = tuple(p for d in diffs for p in d.principals)
    notices = tuple(n for d in diffs for n in d.notices)
    return PlanDiff(tuple(cells), principals, notices)


def _plan_truth(
    report: PlanReport,
    policies: str,
    place: RepoPlace,
    head_policy: PolicySet,
    inventory: Sequence[str],
    found: StatusRead,
    loaded: dict[str, PolicySet],
    notes: Sequence[str] = (),
    gate: GateSettings = DEFAULT_GATE,
    gate_from: str = "",
    cache: ParseCache | None = None,
    shard: Shard = WHOLE,
) -> PlanReport:
    """The head against what each cell enforces, one diff per distinct base (each loaded
    through `cache`, which holds the head's files, and kept in `loaded`).  What every cell
    enforces is read from the whole inventory's claims, so every job of a sharded plan
    groups the cells and picks their bases alike, and diffs its own cells."""
    assert place.top is not None
    try:
        inv = load_inventory(
            inventory, place, (head_policy,), found, shard=shard, gate_from=gate_from
        )
    except InventoryError as exc:
        return _with(report, error=str(exc))
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    truth = read_truth(
        policies,
        place.top,
        report.head.sha,
        inv.fleet,
        found.claims,
        found.unclaimed,
        True,
        workers,
        cache,
    )
    loaded.update(truth.policies)
    planned = base_groups(truth, inv.cells)
    jobs = [(loaded[a] if a else PolicySet(), members) for _k, _s, a, members in planned]
    try:
        parts = diff_groups(jobs, head_policy, workers, gate)
    except PlanError as exc:
        return _with(report, error=str(exc))
    groups = [
        BaseGroup(
            enforces=kind,
            revision=Revision(sha, sha),
            against=Revision(against, against),
            cells=tuple(c.cell for c in members),
            diff=part.diff,
            subject=truth.subjects.get(sha, ""),
        )
        for (kind, sha, against, members), part in zip(planned, parts, strict=True)
    ]
    facts = tuple(
        PartFacts(against, part.facts)
        for (_k, _s, against, _m), part in zip(planned, parts, strict=True)
    )
    return _with(
        _scoped(report, shard, inv, facts),
        base=Revision(""),
        inventory=inv.described,
        diff=merge_diffs([g.diff for g in groups]),
        groups=tuple(groups),
        notes=tuple(notes),
        warnings=tuple(truth_warnings(truth)) + inv.skipped,
        gate_settings=inv.gate_settings,
    )


def _scoped(
    report: PlanReport, shard: Shard, inv: Inventory, facts: tuple[PartFacts, ...]
) -> PlanReport:
    """The report of one shard's job: which inventory it partitioned, its cells left out,
    and its principal facts."""
    scope = ShardScope(shard.index, shard.count, inv.fleet, inv.identity, inv.left_out, facts)
    return _with(report, shard=scope)


def complete(parts: Sequence[PlanReport], policy_of: Callable[[str], PolicySet]) -> PlanReport:
    """The reports of every shard of one plan (checked, in shard order: `ci.partial`) as
    the report of the whole inventory: each diff's cells joined in inventory order, the
    groups no cell is left in dropped, every shard's cells left out warned about in
    inventory order, and every principal diffed from the sum of the shards' facts, with
    the policies `policy_of(sha)` gives (`""`: an empty one).  An unsharded plan is the
    one shard's report, completed here too: one way to a report."""
    first = parts[0]
    scope = first.shard
    assert scope is not None
    merged = replace(first, shard=None)
    if first.diff is None:
        return merged
    order = {c: i for i, c in enumerate(scope.fleet)}
    left = sorted((x for r in parts for x in r.shard.left_out), key=lambda x: order[x.cell])  # type: ignore[union-attr]
    planned = sum(len(r.diff.cells) for r in parts if r.diff is not None)
    if left and not planned:
        said = "; ".join(x.message for x in left)
        return PlanReport(
            base=first.base,
            head=first.head,
            policies=first.policies,
            inventory="",
            head_findings=first.head_findings,
            base_findings=first.base_findings,
            location_prefix=first.location_prefix,
            error=f"--inventory status: no usable status/<cell> branch: {said}",
        )
    head = policy_of(first.head.sha)

    def whole(k: int, diffs: Sequence[PlanDiff]) -> PlanDiff:
        joined = _join(diffs, order)
        facts = join_facts([r.shard.facts[k].facts for r in parts])  # type: ignore[union-attr]
        base = policy_of(scope.facts[k].against)
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        principals = diff_principals(base, head, facts, first.location_prefix, workers)
        return replace(joined, principals=principals)

    if first.groups:
        groups = []
        for k, g in enumerate(first.groups):
            mine = [r.groups[k] for r in parts]
            if not any(m.cells for m in mine):
                continue
            cells = sorted((c for m in mine for c in m.cells), key=order.__getitem__)
            groups.append(replace(g, cells=tuple(cells), diff=whole(k, [m.diff for m in mine])))
        diff = merge_diffs([g.diff for g in groups])
        merged = replace(merged, groups=tuple(groups))
    else:
        diff = whole(0, [r.diff for r in parts if r.diff is not None])
    warnings = merged.warnings + tuple(x.message for x in left) + tuple(unverified_warnings(diff))
    return replace(merged, diff=diff, warnings=warnings)


class RevisionError(ValueError):
    """A revision a merge must load that does not load here."""


def revision_loader(policies: str) -> Callable[[str], PolicySet]:
    """`policy_of(sha)` for `complete` in a merge job: each revision of the repository
    holding `policies` loaded and validated once (sharing one parse cache), `""` an empty
    policy; RevisionError when one does not validate (the shard jobs validated it, so the
    merge runs another asgctl or another repository than they did)."""
    cache = ParseCache()
    loaded: dict[str, PolicySet] = {"": PolicySet()}

    def policy_of(sha: str) -> PolicySet:
        if sha not in loaded:
            result = load_policy(policies, sha, cache=cache)
            if not result.ok:
                n = len(result.errors)
                raise RevisionError(
                    f"{policies} at {sha[:12]} does not load here ({n} error{'s' * (n != 1)}"
                    f"{': ' + str(result.errors[0]) if result.errors else ''}), and the "
                    "shard jobs planned with it: run the merge in a clone with the history "
                    "and the asgctl of the shard jobs"
                )
            loaded[sha] = result.policy
        return loaded[sha]

    return policy_of


def _join(diffs: Sequence[PlanDiff], order: Mapping[str, int]) -> PlanDiff:
    """Disjoint parts of one diff's cells as `diff_part` gives the whole: cells (and their
    notices) in inventory order."""
    cells = sorted((c for d in diffs for c in d.cells), key=lambda c: order[c.cell])
    notices = sorted((n for d in diffs for n in d.notices), key=lambda n: order[n.cell])
    return PlanDiff(tuple(cells), (), tuple(notices))


def unverified_warnings(diff: PlanDiff) -> list[str]:
    """The warning for principals named by GUID; the last of a report's warnings."""
    flagged = {(p.lifecycle, p.space_id, p.app_id) for p in diff.principals if p.name_mismatch}
    n = len(flagged)
    if not n:
        return []
    # Said up front: in a comment cut to fit, the flagged blocks may be folded away.
    return [
        f"{n} principal{'s' * (n != 1)} shown by GUID (name unverified): "
        "the directory puts the app or space elsewhere than the inventory runs it"
    ]


def _read_status(
    place: RepoPlace, remote: StatusBranches | None = None, shard: Shard = WHOLE
) -> StatusRead | None:
    """The status branches, read once (from `remote`'s status repositories when given, else
    the clone's refs): `shard`'s cells in full, every cell's claim; None when there are none."""
    only = None if shard == WHOLE else shard.holds
    if remote is not None:
        found = replace(remote, only=only).read()
        return found if found.fleet or found.skipped else None
    if place.top is None:
        return None
    status = StatusBranches(str(place.top), only=only)
    return status.read() if status.exists() else None


def run_plan(
    policies: str,
    base: str | None,
    head: str,
    inventory: Sequence[str] = (),
    gate: GateSettings = DEFAULT_GATE,
    gate_from: str = "",
    shard: Shard | None = None,
    status: StatusBranches | None = None,
) -> PlanReport:
    """Load the revisions from git (no checkout), read the inventory, diff, and report.

    With `base` None, the head is compared with what each cell enforces (its status
    branch's applied revision, checked); else with `base`, saying where that is not what
    the cells enforce, and comparing with what they enforce when `base` does not validate.
    `gate` is the mass-revoke settings for cells that do not report their own, read from
    `gate_from` (an agent config file; empty: the defaults).  `status` reads the status
    branches from the status repositories (`--status-url`) instead of the clone's refs.

    With `shard`, the report is a partial (`PlanReport.shard`): the shard's cells are read
    and diffed, and of the others only what every job needs alike (the listing, the
    revision each cell claims); `ci.partial` writes it, checks it and merges the partials
    with `complete`, as this does with the one part of an unsharded plan.
    """
    loaded: dict[str, PolicySet] = {"": PolicySet()}
    # A plan builds millions of objects that live until it ends (policies, status documents,
    # containers, compiled cells) and makes next to no cyclic garbage: the cyclic collector,
    # kept on, rescanned them over and over (an eighth of a 10,000-cell shard job's CPU, in
    # its forked workers too).  It is off for the run; a long-lived caller (tests, a server)
    # gets it back after.
    enabled = gc.isenabled()
    gc.disable()
    try:
        report = _plan_part(
            policies, base, head, inventory, gate, gate_from, shard or WHOLE, status, loaded
        )
        if shard is not None or report.shard is None:
            return report
        return complete([report], loaded.__getitem__)
    finally:
        if enabled:
            gc.enable()


def _plan_part(
    policies: str,
    base: str | None,
    head: str,
    inventory: Sequence[str],
    gate: GateSettings,
    gate_from: str,
    shard: Shard,
    status: StatusBranches | None,
    loaded: dict[str, PolicySet],
) -> PlanReport:
    """`run_plan`'s report of `shard`'s part, with every policy it loaded in `loaded`."""
    place = locate(policies)
    folder = place.folder or "."
    base_sha = resolve_revision(place.top, base) if base is not None else ""
    head_sha = resolve_revision(place.top, head)
    report = PlanReport(
        base=Revision(base or "", base_sha or ""),
        head=Revision(head, head_sha or ""),
        policies=folder,
        inventory="",
        location_prefix=place.prefix,
        shard=ShardScope(shard.index, shard.count),
    )
    if place.top is None:
        return _with(report, error=f"{policies} is not in a git repository")
    for name, sha in ((base, base_sha), (head, head_sha)):
        if name is not None and sha is None:
            return _with(report, error=f"unknown revision {name!r}")
    assert head_sha is not None and base_sha is not None
    # Every revision this plan loads is of one repository: each distinct file is parsed and
    # schema-checked once (each load is still charged its full budget).
    cache = ParseCache()
    head_result = load_policy(policies, head_sha, cache=cache)
    if not head_result.ok:
        return _with(report, head_findings=head_result.findings)
    report = _with(report, head_findings=head_result.findings)
    loaded[head_sha] = head_result.policy
    try:
        found = _read_status(place, status, shard)
    except InventoryError as exc:
        return _with(report, error=str(exc))
    if base is None:
        if found is None:
            return _with(
                report,
                error="without --base the head is planned against what each cell enforces, "
                "read from the status/<cell> branches, and this repository has none: fetch "
                f"them ({FETCH_STATUS}) or give --base",
            )
        return _plan_truth(
            report,
            policies,
            place,
            head_result.policy,
            inventory,
            found,
            loaded,
            (),
            gate,
            gate_from,
            cache,
            shard,
        )
    base_result = load_policy(policies, base_sha, cache=cache)
    notes: list[str] = []
    base_policy = base_result.policy
    against = base_sha
    if not base_result.ok:
        n = len(base_result.errors)
        invalid = (
            f"the base {base} does not validate ({n} error{'s' * (n != 1)}): no cell applied "
            "it, so the cells still enforce an older revision"
        )
        if found is not None:
            # Comparing with an empty policy would show every loss as nothing lost: compare
            # with what the cells really enforce instead, and say so.
            note = f"{invalid}. This plan compares the head with what each cell enforces."
            report = _with(report, base_findings=base_result.findings)
            return _plan_truth(
                report,
                policies,
                place,
                head_result.policy,
                inventory,
                found,
                loaded,
                [note],
                gate,
                gate_from,
                cache,
                shard,
            )
        base_policy, against = PolicySet(), ""
        notes.append(
            f"{invalid}, which this plan cannot see without the cells' status branches. "
            "It compares the head with an EMPTY policy, so no access lost is shown: fetch "
            f"the status branches ({FETCH_STATUS}) and run `asgctl plan --head {head}` "
            "without --base"
        )
    else:
        loaded[base_sha] = base_policy
    try:
        inv = load_inventory(
            inventory,
            place,
            (base_policy, head_result.policy),
            found,
            status,
            shard,
            gate_from,
        )
    except InventoryError as exc:
        return _with(report, error=str(exc), base_findings=base_result.findings)
    if found is not None and base_result.ok:
        truth = read_truth(
            policies,
            place.top,
            head_sha,
            inv.fleet,
            found.claims,
            found.unclaimed,
            compile_revisions=False,
        )
        if any(e.kind != "revision" or e.sha != base_sha for e in truth.cells.values()):
            notes.append(
                f"the base {base} is not what the cells enforce: {enforced_summary(truth)}. "
                f"This plan compares the two revisions; `asgctl plan --head {head}` without "
                "--base compares the head with what each cell enforces"
            )
    try:
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        part = diff_part(base_policy, head_result.policy, inv.cells, workers, gate)
    except PlanError as exc:  # a hash collision: no agent would apply it either
        return _with(report, error=str(exc), base_findings=base_result.findings)
    return _with(
        _scoped(report, shard, inv, (PartFacts(against, part.facts),)),
        inventory=inv.described,
        diff=part.diff,
        head_findings=head_result.findings,
        base_findings=base_result.findings,
        warnings=inv.skipped,
        gate_settings=inv.gate_settings,
        notes=tuple(notes),
    )


def _with(report: PlanReport, **changes: object) -> PlanReport:
    # `changes` names fields of PlanReport; mypy cannot check keyword splats into replace().
    return replace(report, **changes)  # type: ignore[arg-type]
