"""The CI plan at fleet scale: 1,000 cells x 250 containers, 2,000 ASGs, one ASG changed.

The pull request edits one rule of an ASG bound to 10% of the spaces, which is the common
large change: about a tenth of every cell's containers gain and lose access.  The figure that
matters is `asgctl plan --format markdown` end to end (a fresh interpreter, as CI runs it):
wall time and peak RSS, target under 30 s and 2 GB.  A second, in-process run splits the time
into phases, and `--profile` prints where it goes function by function.

`--against enforced` is the plan against the truth (issue 17): `asgctl plan --head HEAD`
without --base, every cell planned against the revision its status branch says it applied.
The fleet is mid-rollout: the cells' applied revisions are spread over `--revisions` commits
(each widening one more rule of a small ASG), so the plan checks each claimed revision,
compiles each once, and diffs every group of cells against its own base.

Usage: python bench/plan_bench.py [--cells N] [--containers N] [--asgs N]
                                  [--inventory files|status] [--against base|enforced]
                                  [--revisions N] [--profile] [--record]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.gitserver import git  # noqa: E402
from bench.common import RESULTS, machine, revision  # noqa: E402
from reconciler.status.write import dump_status  # noqa: E402

ORGS, SPACES_PER_ORG, APPS_PER_SPACE = 100, 10, 10  # 1,000 spaces, 10,000 apps
ASG_RULES = 5
ASGS_PER_SPACE = 5  # running bindings per space (plus one staging binding)
GLOBAL_RUNNING, GLOBAL_STAGING = 3, 2
STAGING_SHARE = 0.04  # of containers
CHANGED_SHARE = 0.10  # of spaces bound to the ASG the PR edits
TARGET_SECONDS, TARGET_MIB = 30.0, 2048.0
ROLLOUT_ASGS = (100, 200, 300, 400, 500, 600, 700, 800)  # edited one per revision, in order


NOTES = """\
## Where the time goes, and what was done about it

Profiled with cProfile and per-phase CPU clocks (`--profile` prints the top functions).
The first straightforward version needed about 0.3 s per cell compile and rendered every
chain of every cell twice: over 10 minutes for this fleet.  What changed:

* **Compile per profile, over atoms** (`compile._Index`): a policy set is indexed once per
  object; rule items and provenances are numbered in sort order and grouped into *atoms*
  (items granted by exactly the same bindings), so a cell's partition runs over a few
  atoms per container profile on ints, not over dozens of items as hashed dataclasses.
  Profile entries, groups and rules are memoised per policy and shared by every cell.
  A cell compile went from ~300 ms to ~3 ms (warm); the agent compiles the same way.
* **Skip what no change touches** (`diff.diff_plans`): a profile whose rule ids are equal
  at base and head renders identical chains, so a cell without a touched profile is not
  compiled at all; in a touched cell only created and deleted groups and re-chained
  containers are rendered (group chains are content-addressed).
* **Cheap per-container work**: the address family is read off the validated text instead
  of parsing every IP with `ipaddress`; chain ids are cached; the cyclic GC is frozen over
  the loaded data during the diff (full collections were a quarter of the time).
* **Inventory**: the status files are ~146 KB per cell (the agent also writes each
  container's chain, groups and sources): ~146 MB of YAML here.  A full YAML load was
  ~40 ms per cell; a line reader for the agent's block style (falling back to YAML on
  anything else) takes ~5 ms, plus ~3 ms to validate like a store file; all blobs come
  from one `git cat-file --batch`.
* **Cores**: touched cells and status files are split across forked workers (up to 4).

Remaining CPU, roughly: inventory 40%, compiling 1,000 cells twice 35%, loading and
validating both revisions 15%, the rest 10%.  Wall time depends on what else the machine
runs: the load average is recorded above, and CPU time is the figure to compare.
"""


TRUTH_NOTES = """\
## What the plan against the truth adds

`asgctl plan --head HEAD` reads every status branch once (the same forked parse as the
`--inventory status` case, now also keeping each document's `lastAppliedRevision`), checks
each distinct claimed revision with one `git cat-file --batch-check` lookup and one
`git merge-base`, loads and validates each distinct revision once (cells on the same revision
share it), and runs one diff per group of cells.  The revisions of one repository share most
files: one parse cache per plan (`yamlsafe.ParseCache`, by name, limits and content digest)
parses and schema-checks each distinct file once, every load still charged its full budget,
so a base costs little more than its changed files and its semantic checks (loaded one after
another in the plan's process).  Against the base-only plan, the extra cost is those base
loads and a per-group diff whose cells are compiled against their own base.  No wall-clock
target is asserted in a test; the figures above are the record.
"""


def guid(kind: int, n: int) -> str:
    return f"{kind:08x}-0000-4000-8000-{n:012x}"


def build(
    root: Path, cells: int, per_cell: int, asgs: int, inventory: str, revisions: int = 0
) -> dict[str, int]:
    """A policy repo with two commits (base, head) and the fleet's inventory; with
    `revisions`, that many commits before the head, applied round-robin by the cells."""
    rng = random.Random(42)
    pol = root / "policies"
    (pol / "security-groups").mkdir(parents=True)
    orgs = []
    spaces: list[str] = []
    apps: list[tuple[str, str, str]] = []  # (app guid, space guid, org guid)
    for o in range(ORGS):
        org = {"name": f"org-{o:03d}", "guid": guid(1, o), "spaces": []}
        for s in range(SPACES_PER_ORG):
            sid = len(spaces)
            space = {"name": f"space-{s:02d}", "guid": guid(2, sid), "apps": []}
            spaces.append(space["guid"])
            for a in range(APPS_PER_SPACE):
                aid = len(apps)
                space["apps"].append({"name": f"app-{a:02d}", "guid": guid(3, aid)})
                apps.append((guid(3, aid), space["guid"], org["guid"]))
            org["spaces"].append(space)
        orgs.append(org)
    (pol / "directory.yaml").write_text(yaml.safe_dump({"kind": "Directory", "orgs": orgs}))

    changed = 42
    bound: dict[int, list[str]] = {g: [] for g in range(asgs)}
    for space in spaces:
        for g in rng.sample(range(GLOBAL_RUNNING + GLOBAL_STAGING, asgs), ASGS_PER_SPACE):
            if g != changed:
                bound[g].append(space)
    bound[changed] = sorted(rng.sample(spaces, int(len(spaces) * CHANGED_SHARE)))

    def group(g: int, edited: bool) -> dict:
        rules = []
        for r in range(ASG_RULES):
            third, fourth = (g * ASG_RULES + r) // 256 % 256, (g * ASG_RULES + r) % 256
            rules.append(
                {
                    "protocol": "tcp",
                    "destination": f"10.{g % 200}.{third}.{fourth}",
                    "ports": str(1000 + r) if not (edited and r == 2) else "1000-1010",
                }
            )
        doc: dict = {"kind": "SecurityGroup", "name": f"asg-{g:04d}", "rules": rules}
        if g < GLOBAL_RUNNING:
            doc["globally_enabled"] = {"running": True}
        elif g < GLOBAL_RUNNING + GLOBAL_STAGING:
            doc["globally_enabled"] = {"staging": True}
        else:
            doc["running_spaces"] = bound[g]
            if g % 7 == 0:
                doc["staging_spaces"] = bound[g][:3]
        return doc

    def write_groups(edited: set[int]) -> None:
        per_file = 100
        for f in range(0, asgs, per_file):
            docs = [group(g, g in edited) for g in range(f, min(asgs, f + per_file))]
            text = yaml.safe_dump_all(docs, sort_keys=False)
            (pol / "security-groups" / f"groups-{f // per_file:03d}.yaml").write_text(text)

    rollout = set(ROLLOUT_ASGS[: max(0, revisions - 1)])
    applied: list[str] = []
    write_groups(set())
    git("init", "-q", "-b", "main", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "base", cwd=root)
    for r in range(1, revisions):  # r0 is the base; each later one widens one more ASG
        applied.append(git("rev-parse", "HEAD", cwd=root).strip())
        write_groups(set(ROLLOUT_ASGS[:r]))
        message = f"rollout {r}: widen one rule of asg-{ROLLOUT_ASGS[r - 1]}"
        git("commit", "-q", "-am", message, cwd=root)
    if revisions:
        applied.append(git("rev-parse", "HEAD", cwd=root).strip())
    write_groups(rollout | {changed})
    git("commit", "-q", "-am", "head: widen one rule of asg-0042", cwd=root)

    total = 0
    stores: dict[str, dict] = {}
    for cell in range(cells):
        store = {}
        for i in range(per_cell):
            app, space, org = apps[rng.randrange(len(apps))]
            handle = f"c{cell:04d}-{i:03d}"
            ip = f"198.18.{cell % 256}.{i + 2}" if cell < 256 else f"198.19.{cell % 256}.{i + 2}"
            store[handle] = {
                "handle": handle,
                "ip": ip,
                "metadata": {
                    "app_id": app,
                    "space_id": space,
                    "org_id": org,
                    "policy_group_id": app,
                    "container_workload": "staging" if rng.random() < STAGING_SHARE else "app",
                },
            }
            total += 1
        stores[f"cell-{cell:04d}"] = store
    if inventory == "files":
        for name, store in stores.items():
            d = root / "cells" / name
            d.mkdir(parents=True)
            (d / "store.json").write_text(json.dumps(store))
    else:
        _status_branches(root, stores, applied)
    return {"spaces": len(spaces), "apps": len(apps), "containers": total}


def _status_branches(root: Path, stores: dict[str, dict], applied: list[str]) -> None:
    """One `status/<cell>` branch per cell with a status.yaml, written by git fast-import;
    with `applied`, cell n says it enforces `applied[n % len(applied)]`."""
    buf = io.StringIO()
    rng = random.Random(7)
    for n, (name, store) in enumerate(stores.items()):
        # Shaped like the agent's status document: header fields, then per container the
        # contract fields plus its chain, groups and the documents behind them.
        doc = {
            "apiVersion": "asgctl.io/v1",
            "kind": "CellStatus",
            "cell": name,
            "observedRevision": "main@sha1:" + "0" * 40,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Applied"}],
            "containers": [
                {
                    "handle": c["handle"],
                    "ip": c["ip"],
                    "app_id": c["metadata"]["app_id"],
                    "space_id": c["metadata"]["space_id"],
                    "org_id": c["metadata"]["org_id"],
                    "workload": c["metadata"]["container_workload"],
                    "chain": f"{rng.getrandbits(128):032x}",
                    "groups": [f"{rng.getrandbits(128):032x}" for _ in range(7)],
                    "sources": [f"SecurityGroup/asg-{rng.randrange(2000):04d}" for _ in range(7)],
                }
                for c in store.values()
            ],
            "history": [{"revision": "main@sha1:" + "0" * 40, "status": "Applied"}],
        }
        if applied:
            doc["lastAppliedRevision"] = "main@sha1:" + applied[n % len(applied)]
        data = dump_status(doc).encode()
        buf.write(f"commit refs/heads/status/{name}\n")
        buf.write("committer bench <bench@example.invalid> 1700000000 +0000\n")
        buf.write("data 6\nstatus\n")
        buf.write(f"M 100644 inline status.yaml\ndata {len(data)}\n")
        buf.write(data.decode() + "\n")
    subprocess.run(
        ["git", "-C", str(root), "fast-import", "--quiet"],
        input=buf.getvalue().encode(),
        check=True,
    )


def end_to_end(
    root: Path, inventory: str, against: str = "base"
) -> tuple[float, float, float, int, int]:
    """`asgctl plan` in a fresh interpreter: wall s, CPU s, peak RSS MiB, exit code, size.

    CPU time (user + system, forked workers included) is reported beside wall time because
    the machine is shared: other work running at the same time stretches wall time only.
    """
    inv = ["--inventory", "cells"] if inventory == "files" else ["--inventory", "status"]
    base = ["--base", "HEAD~1"] if against == "base" else []
    cmd = [
        sys.executable,
        "-c",
        "from reconciler.cli import main; main()",
        "plan",
        *base,
        "--head",
        "HEAD",
        "--policies",
        "policies",
        *inv,
        "--format",
        "markdown",
        "--detailed-exitcode",
    ]
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "wall = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "sys.stderr.write(p.stderr.decode()[-2000:])\n"
        "print(wall, r.ru_utime + r.ru_stime, r.ru_maxrss / 1024, p.returncode, "
        "len(p.stdout.decode()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.stderr.strip():
        print(out.stderr, file=sys.stderr)
    wall, cpu, rss, rc, size = out.stdout.split()
    return float(wall), float(cpu), float(rss), int(rc), int(size)


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the diff's forked workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _start(
    profile: bool, cache: Any = None
) -> tuple[cProfile.Profile | None, list[tuple[str, float, float]], Any]:
    """The profiler (with --profile), and the first phase: the head, loaded and validated
    (through `cache`, a ParseCache, as `run_plan` loads it)."""
    from reconciler.policy.load import load_policy

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t, c = time.perf_counter(), _cpu()
    head = load_policy("policies", "HEAD", cache=cache)
    return prof, [("load + validate head", time.perf_counter() - t, _cpu() - c)], head


def _finish(
    prof: cProfile.Profile | None, text: str, times: list[tuple[str, float, float]]
) -> tuple[list[tuple[str, float, float]], str]:
    """The phases with the plan's summary line last, and the profile's top functions."""
    stats = ""
    if prof:
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        stats = s.getvalue()
    summary = next(line for line in text.splitlines() if line.startswith("**"))
    times.append((summary.strip("*"), 0.0, 0.0))
    return times, stats


def truth_phases(root: Path, profile: bool) -> tuple[list[tuple[str, float, float]], str]:
    """`plan --head HEAD` without --base in-process, timed phase by phase."""
    os.chdir(root)
    from reconciler.ci.plan import (
        MAX_WORKERS,
        base_groups,
        diff_groups,
        load_inventory,
        locate,
        read_truth,
    )
    from reconciler.ci.report.plan import PlanReport, Revision, render_markdown
    from reconciler.core.model import PolicySet
    from reconciler.policy.yamlsafe import ParseCache
    from reconciler.sources.inventories import StatusBranches

    cache = ParseCache()  # one per plan, as run_plan has it
    prof, times, head = _start(profile, cache)
    t, c = time.perf_counter(), _cpu()
    place = locate("policies")
    found = StatusBranches(str(place.top)).read()
    cells, described, _skipped = load_inventory(["status"], place, (head.policy,), found)
    times.append(
        ("inventory (status), with applied revisions", time.perf_counter() - t, _cpu() - c)
    )
    t, c = time.perf_counter(), _cpu()
    sha = git("rev-parse", "HEAD", cwd=root).strip()
    assert place.top is not None
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    names = [x.cell for x in cells]
    truth = read_truth("policies", place.top, sha, names, found.applied, True, workers, cache)
    n = len(truth.policies)
    times.append((f"check claims, load + validate {n} bases", time.perf_counter() - t, _cpu() - c))
    t, c = time.perf_counter(), _cpu()
    gc.freeze()  # as run_plan does
    jobs = [
        (truth.policies[a] if a else PolicySet(), m) for _k, _s, a, m in base_groups(truth, cells)
    ]
    diffs = diff_groups(jobs, head.policy, place.prefix, workers)
    times.append((f"diff {len(diffs)} groups", time.perf_counter() - t, _cpu() - c))
    t, c = time.perf_counter(), _cpu()
    from reconciler.ci.plan import merge_diffs

    report = PlanReport(
        Revision(""), Revision("HEAD"), "policies", described, merge_diffs(diffs), head.findings
    )
    text = render_markdown(report)
    times.append(("markdown report", time.perf_counter() - t, _cpu() - c))
    return _finish(prof, text, times)


def phases(root: Path, inventory: str, profile: bool) -> tuple[list[tuple[str, float, float]], str]:
    """The same work in-process, timed phase by phase (and profiled with --profile)."""
    os.chdir(root)
    from reconciler.ci.plan import MAX_WORKERS, load_inventory, locate
    from reconciler.ci.report.plan import PlanReport, Revision, render_markdown
    from reconciler.core.diff import diff_plans
    from reconciler.policy.load import load_policy

    prof, times, head = _start(profile)
    t, c = time.perf_counter(), _cpu()
    base = load_policy("policies", "HEAD~1")
    times.append(("load + validate base", time.perf_counter() - t, _cpu() - c))
    t, c = time.perf_counter(), _cpu()
    place = locate("policies")
    spec = ["cells"] if inventory == "files" else ["status"]
    cells, described, _skipped = load_inventory(spec, place, (base.policy, head.policy))
    times.append((f"inventory ({inventory})", time.perf_counter() - t, _cpu() - c))
    t, c = time.perf_counter(), _cpu()
    gc.freeze()  # as run_plan does
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    diff = diff_plans(base.policy, head.policy, cells, place.prefix, workers)
    times.append(("diff (compile, render, compare)", time.perf_counter() - t, _cpu() - c))
    t, c = time.perf_counter(), _cpu()
    report = PlanReport(
        Revision("HEAD~1"), Revision("HEAD"), "policies", described, diff, head.findings
    )
    text = render_markdown(report)
    times.append(("markdown report", time.perf_counter() - t, _cpu() - c))
    return _finish(prof, text, times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--containers", type=int, default=250)
    ap.add_argument("--asgs", type=int, default=2000)
    ap.add_argument("--inventory", choices=["files", "status"], default="status")
    ap.add_argument(
        "--against",
        choices=["base", "enforced"],
        default="base",
        help="enforced: `plan --head HEAD` without --base, against the cells' applied revisions",
    )
    ap.add_argument(
        "--revisions",
        type=int,
        default=4,
        help="with --against enforced: distinct revisions the cells have applied",
    )
    ap.add_argument("--profile", action="store_true", help="print the top functions by time")
    ap.add_argument("--record", action="store_true", help="write bench/results/plan.md")
    ap.add_argument(
        "--keep",
        metavar="DIR",
        help="build the repo in DIR and reuse it on later runs (same shape options)",
    )
    args = ap.parse_args()
    truth = args.against == "enforced"
    if truth and args.inventory != "status":
        ap.error("--against enforced reads the status branches: use --inventory status")
    revisions = args.revisions if truth else 0
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        root = Path(args.keep or tmp)
        t = time.perf_counter()
        marker = root / "shape.json"
        if args.keep and marker.exists():  # built by an earlier run with the same --keep
            shape = json.loads(marker.read_text())
        else:
            root.mkdir(parents=True, exist_ok=True)
            shape = build(root, args.cells, args.containers, args.asgs, args.inventory, revisions)
            marker.write_text(json.dumps(shape))
        setup = time.perf_counter() - t
        load_before = os.getloadavg()[0]
        wall, cpu, rss, rc, size = end_to_end(root, args.inventory, args.against)
        load_after = os.getloadavg()[0]
        if truth:
            steps, stats = truth_phases(root, args.profile)
        else:
            steps, stats = phases(root, args.inventory, args.profile)
        os.chdir(ROOT)
    ok = wall < TARGET_SECONDS and rss < TARGET_MIB
    rows = [
        ("cells x containers", f"{args.cells:,} x {args.containers:,} = {shape['containers']:,}"),
        ("ASGs (rules each)", f"{args.asgs:,} ({ASG_RULES})"),
        ("spaces / apps", f"{shape['spaces']:,} / {shape['apps']:,}"),
        ("change", f"one rule of an ASG bound to {CHANGED_SHARE:.0%} of the spaces"),
        ("inventory", args.inventory),
        (
            "planned against",
            f"what each cell enforces: {revisions} applied revisions, round-robin "
            f"(the newest {revisions - 1} commits behind the head widen one more rule each)"
            if truth
            else "the base (HEAD~1)",
        ),
        ("`asgctl plan` wall time", f"{wall:.1f} s (target < {TARGET_SECONDS:.0f} s)"),
        ("`asgctl plan` CPU time (user + sys)", f"{cpu:.1f} s"),
        ("`asgctl plan` peak RSS", f"{rss:,.0f} MiB (target < {TARGET_MIB:,.0f} MiB)"),
        (
            "load average before / after",
            f"{load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores",
        ),
        ("exit code / comment size", f"{rc} / {size:,} characters"),
        ("verdict", "within target" if ok else "OVER TARGET"),
    ]
    phase_rows = [
        (name, f"{sec:.2f} s" if sec else "", f"{cpu_s:.2f} s" if sec else "")
        for name, sec, cpu_s in steps
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| phase (in-process run) | wall | CPU |", "|---|--:|--:|"]
    lines += [f"| {k} | {w} | {c} |" for k, w, c in phase_rows]
    table = "\n".join(lines)
    print(table)
    print(f"\n(setup, not timed: {setup:.1f} s)")
    if stats:
        print(stats)
    if args.record and truth:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "plan_truth.md").write_text(
            "# asgctl plan against the truth at fleet scale (issue 17)\n\n"
            f"Machine: {machine()}.\n\nCode: {revision()}.\n\n"
            f"Command: `python bench/plan_bench.py --cells {args.cells} "
            f"--containers {args.containers} --asgs {args.asgs} --inventory status "
            f"--against enforced --revisions {args.revisions} --record`\n\n{table}\n\n"
            f"{TRUTH_NOTES}"
        )
        print(f"wrote {RESULTS / 'plan_truth.md'}")
    elif args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "plan.md").write_text(
            "# asgctl plan at fleet scale\n\n"
            f"Machine: {machine()}.\n\n"
            f"Command: `python bench/plan_bench.py --cells {args.cells} "
            f"--containers {args.containers} --asgs {args.asgs} "
            f"--inventory {args.inventory} --record`\n\n{table}\n\n{NOTES}"
        )
        print(f"wrote {RESULTS / 'plan.md'}")


if __name__ == "__main__":
    main()
