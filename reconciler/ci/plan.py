"""`asgctl plan` and `asgctl test` at the edge: git, files and inventories are read here.

Everything after this module is pure (`diff.diff_plans`, `report.*`, `policytest.run_tests`),
so the CI plan differs from the agents' compile only in where its inputs come from.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.ci.partition import Shard
from reconciler.ci.report.plan import BaseGroup, Enforces, PlanReport, Revision, ShardScope
from reconciler.core.cellplan import DEFAULT_GATE, CellInventory, GateSettings, PlanError
from reconciler.core.compile import prepare
from reconciler.core.diff import PlanDiff, diff_plans
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
MAX_WORKERS = 4  # forked processes for a fleet-wide diff (see diff._diff_cells)
SYNTHETIC = "directory"
MAX_BASES = 16
"""Distinct revisions a plan against the truth compiles.  A fleet mid-rollout runs two or
three; each costs a load and a validation, so whoever can push status branches must not be
able to make CI compile hundreds: cells on rarer revisions are planned as unknown."""
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


def load_inventory(
    spec: Sequence[str],
    place: RepoPlace,
    policies: Sequence[PolicySet],
    found: StatusRead | None = None,
    remote: StatusBranches | None = None,
) -> tuple[tuple[CellInventory, ...], str, tuple[str, ...]]:
    """The cells to plan for, a description of where they came from, and the status
    branches skipped as unusable (each with the reason, for the report's warnings).

    `spec` is empty (status branches when there are any, else a synthetic cell), `status`,
    `directory` (the synthetic cell), or store files and folders of them.  `found` is the
    status branches when the caller has read them already; `remote`, where they are when
    not in the clone (`--status-url`).
    """
    status = remote or (StatusBranches(str(place.top)) if place.top is not None else None)
    has_status = found is not None or (status is not None and status.exists())
    if list(spec) == [STATUS] or (not spec and has_status):
        if status is None:
            raise InventoryError("--inventory status: the policies are not in a git repository")
        found = found if found is not None else status.read()
        if not found.cells:
            if found.skipped:
                raise InventoryError(
                    "--inventory status: no usable status/<cell> branch; skipped: "
                    + "; ".join(found.skipped)
                )
            raise InventoryError("--inventory status: there are no status/<cell> branches")
        skipped = [f"{m} (this cell is left out of the plan)" for m in found.skipped]
        n = len(found.cells)
        return found.cells, f"status branches ({n:,} cells)", tuple(skipped)
    if not spec or list(spec) == [SYNTHETIC]:
        cell = synthetic_inventory(policies)
        return (
            (cell,),
            "synthetic (one container per app and lifecycle from the directory; "
            "no status branches yet)",
            (),
        )
    if STATUS in spec or SYNTHETIC in spec:
        raise InventoryError("--inventory: 'status' and 'directory' cannot be mixed with files")
    source = StoreFiles(_store_paths(spec))
    cells = source.cells()
    return cells, f"{source.description} ({len(cells):,} cells)", ()


def inventory_identity(cells: Sequence[CellInventory]) -> str:
    """A digest of the inventory as planned: every cell's name, origin, reported gate and
    containers.  Each job of a sharded plan reads the inventory on its own; the merge
    refuses partials whose reads differ (a status branch pushed between two jobs)."""
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


def _scoped(report: PlanReport, shard: Shard | None, cells: Sequence[CellInventory]) -> PlanReport:
    """The report of a sharded plan says which inventory it partitioned."""
    if shard is None:
        return report
    names = tuple(c.cell for c in cells)
    return _with(
        report, shard=ShardScope(shard.index, shard.count, names, inventory_identity(cells))
    )


def gate_origin(cells: Sequence[CellInventory], given: str) -> str:
    """Where the mass-revoke settings the plan judges each cell with come from, in words:
    what each cell reports (status branches), else the agent config given, else defaults."""
    if cells and all(c.gate is not None for c in cells):
        return "as each cell reports on its status branch"
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
    compile_revisions: bool = True,
    workers: int = 1,
    cache: ParseCache | None = None,
) -> FleetTruth:
    """Check every cell's claim (`applied`: `{cell: lastAppliedRevision}`; a cell missing
    from it has no status branch) and, with `compile_revisions`, load each trusted revision
    once, most-enforced first, in up to `workers` forked processes: at most MAX_BASES that
    validate, out of at most twice as many tried.  `cache` holds the files parsed so far
    (the head's): revisions share most of them."""
    git_dir = gitio.git_dir_of(top)
    checked: dict[str, Enforced] = {}
    out: dict[str, Enforced] = {}
    with gitio.BlobReader(git_dir or str(top)) as reader:
        for cell in cells:
            if cell not in applied:
                out[cell] = Enforced("unknown", reason="it has no status branch")
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
    first; then the cells enforcing nothing; then the unknown ones."""
    by: dict[tuple[Enforces, str], list[CellInventory]] = {}
    for cell in cells:
        e = truth.cells[cell.cell]
        by.setdefault((e.kind, e.sha), []).append(cell)
    order = {"revision": 0, "nothing": 1, "unknown": 2}
    keys = sorted(by, key=lambda k: (order[k[0]], -len(by[k]), k[1]))
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
    prefix: str,
    workers: int,
    gate: GateSettings = DEFAULT_GATE,
    part: Shard | None = None,
) -> list[PlanDiff]:
    """`diff_plans(base, head, cells)` for every (base, cells) job, in order.

    A group holding at least a worker's share of the cells is diffed on its own, split
    across the workers as a one-base plan is.  The others are shared out whole, one forked
    process per worker, largest first: each runs its groups one after another, so the
    parts of a diff that do not split by cell (which profiles changed, who gains and loses
    what) run side by side for different groups, and the head's compiled groups, memoised
    in the process, serve each of its groups.  The head's index and its profiles' entries
    are built before the fork (`compile.prepare`), so the workers share one copy.  The
    result is the same either way.  `part`: only that shard's cells and principals.
    """
    holds = part.holds if part is not None else None
    total = sum(len(cells) for _base, cells in jobs) or 1
    out: dict[int, PlanDiff] = {}
    small: list[int] = []
    for i, (base, cells) in enumerate(jobs):
        if workers <= 1 or len(cells) * workers >= total:
            out[i] = diff_plans(base, head, cells, prefix, workers, gate, holds)
        else:
            small.append(i)
    small.sort(key=lambda i: -len(jobs[i][1]))
    if small:
        # Every worker compiles with the head: index it and its profiles here, once.
        prepare(head, (c for i in small for cell in jobs[i][1] for c in cell.containers))
        shared = (jobs, small, head, prefix, gate, holds)
        for done in fork_ranges(_diff_group_range, shared, len(small), workers):
            out.update(done)
    return [out[i] for i in range(len(jobs))]


def _diff_group_range(
    shared: tuple[
        Sequence[DiffJob], list[int], PolicySet, str, GateSettings, Callable[[str], bool] | None
    ],
    bounds: tuple[int, int],
) -> list[tuple[int, PlanDiff]]:
    jobs, order, head, prefix, gate, holds = shared
    return [
        (order[k], diff_plans(jobs[order[k]][0], head, jobs[order[k]][1], prefix, 1, gate, holds))
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
    notes: Sequence[str] = (),
    gate: GateSettings = DEFAULT_GATE,
    gate_from: str = "",
    cache: ParseCache | None = None,
    shard: Shard | None = None,
) -> PlanReport:
    """The head against what each cell enforces, one diff per distinct base (each loaded
    through `cache`, which holds the head's files).  With `shard`, what every cell
    enforces is still read and ranked over the whole inventory (so each job groups cells
    and picks their bases as the unsharded plan does), and only the shard's are diffed."""
    assert place.top is not None
    try:
        cells, described, skipped = load_inventory(inventory, place, (head_policy,), found)
    except InventoryError as exc:
        return _with(report, error=str(exc))
    report = _scoped(report, shard, cells)
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    names = [c.cell for c in cells]
    truth = read_truth(
        policies, place.top, report.head.sha, names, found.applied, True, workers, cache
    )
    warnings = truth_warnings(truth) + list(skipped)
    planned = base_groups(truth, cells)
    jobs = [(truth.policies[a] if a else PolicySet(), members) for _k, _s, a, members in planned]
    gc.freeze()  # as in run_plan: the loaded policies and inventory live until the end
    try:
        diffs = diff_groups(jobs, head_policy, place.prefix, workers, gate, shard)
    except PlanError as exc:
        return _with(report, error=str(exc))
    finally:
        gc.unfreeze()
    groups = [
        BaseGroup(
            enforces=kind,
            revision=Revision(sha, sha),
            against=Revision(against, against),
            cells=tuple(c.cell for c in members if shard is None or shard.holds(c.cell)),
            diff=diff,
            subject=truth.subjects.get(sha, ""),
        )
        for (kind, sha, against, members), diff in zip(planned, diffs, strict=True)
    ]
    merged = merge_diffs([g.diff for g in groups])
    if shard is None:  # a partial's principals are a part: the merge counts them all
        warnings += unverified_warnings(merged)
    return _with(
        report,
        base=Revision(""),
        inventory=described,
        diff=merged,
        groups=tuple(groups),
        notes=tuple(notes),
        warnings=tuple(warnings),
        gate_settings=gate_origin(cells, gate_from),
    )


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


def _read_status(place: RepoPlace, remote: StatusBranches | None = None) -> StatusRead | None:
    """The status branches, read once (from `remote`'s status repositories when given, else
    the clone's refs), or None when there are none."""
    if remote is not None:
        found = remote.read()
        return found if found.cells or found.skipped else None
    if place.top is None:
        return None
    status = StatusBranches(str(place.top))
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

    With `shard`, the report is a partial (`PlanReport.shard`): everything is read as for
    the whole inventory, and only the shard's cells and principals are diffed
    (`ci.partial` writes it, checks it and merges the partials).
    """
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
        shard=ShardScope(shard.index, shard.count) if shard is not None else None,
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
    try:
        found = _read_status(place, status)
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
            (),
            gate,
            gate_from,
            cache,
            shard,
        )
    base_result = load_policy(policies, base_sha, cache=cache)
    warnings: list[str] = []
    notes: list[str] = []
    base_policy = base_result.policy
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
                [note],
                gate,
                gate_from,
                cache,
                shard,
            )
        base_policy = PolicySet()
        notes.append(
            f"{invalid}, which this plan cannot see without the cells' status branches. "
            "It compares the head with an EMPTY policy, so no access lost is shown: fetch "
            f"the status branches ({FETCH_STATUS}) and run `asgctl plan --head {head}` "
            "without --base"
        )
    try:
        cells, described, skipped = load_inventory(
            inventory, place, (base_policy, head_result.policy), found, status
        )
    except InventoryError as exc:
        return _with(report, error=str(exc), base_findings=base_result.findings)
    report = _scoped(report, shard, cells)
    warnings.extend(skipped)
    if found is not None and base_result.ok:
        truth = read_truth(
            policies,
            place.top,
            head_sha,
            [c.cell for c in cells],
            found.applied,
            compile_revisions=False,
        )
        if any(e.kind != "revision" or e.sha != base_sha for e in truth.cells.values()):
            notes.append(
                f"the base {base} is not what the cells enforce: {enforced_summary(truth)}. "
                f"This plan compares the two revisions; `asgctl plan --head {head}` without "
                "--base compares the head with what each cell enforces"
            )
    # Everything loaded so far lives until the end; taking it out of the cyclic collector's
    # view keeps full collections (a quarter of a fleet-wide diff's time) from rescanning it.
    gc.freeze()
    try:
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        holds = shard.holds if shard is not None else None
        diff = diff_plans(
            base_policy, head_result.policy, cells, place.prefix, workers, gate, holds
        )
    except PlanError as exc:  # a hash collision: no agent would apply it either
        return _with(report, error=str(exc), base_findings=base_result.findings)
    finally:
        gc.unfreeze()  # a long-lived caller (tests, a server) gets its collector back
    if shard is None:  # a partial's principals are a part: the merge counts them all
        warnings += unverified_warnings(diff)
    return _with(
        report,
        inventory=described,
        diff=diff,
        head_findings=head_result.findings,
        base_findings=base_result.findings,
        warnings=tuple(warnings),
        gate_settings=gate_origin(cells, gate_from),
        notes=tuple(notes),
    )


def _with(report: PlanReport, **changes: object) -> PlanReport:
    from dataclasses import replace

    # `changes` names fields of PlanReport; mypy cannot check keyword splats into replace().
    return replace(report, **changes)  # type: ignore[arg-type]
