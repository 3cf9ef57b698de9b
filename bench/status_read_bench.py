"""Reading a 10,000-cell fleet's status branches: `asgctl status` and the plan's inventory.

Issue 19's target: `asgctl status` for 10,000 cells in under 10 s from a warm cache and 60 s
cold.  The fleet is made on the server as `bench/fleet_sim.py --prefill` makes it (its
`prefill`: one `git fast-import` of a root commit per cell, holding the status document an
agent writes -- here with `--containers` containers, 250 by default, ~65 KB each), then
copied into S status repositories by each cell's shard (`branch.shard_of`), served by a real
`git daemon` on 127.0.0.1 (refs packed, as a maintained server keeps them).  Each reader runs
in a fresh interpreter, through the product's own code:

* **status**: `agent.fleet.read_fleet` -- what `asgctl status --status-url ... --cache DIR`
  does: the one status reader (`status.fetch`: one batched fetch per repository into the
  cache, headers parsed once per blob), plus the policy branch for "behind";
* **plan**: `status.read.read_remote_containers` -- what `asgctl plan --inventory status
  --status-url ... --status-cache DIR` reads before it compiles: every cell's containers;

each **cold** (an empty cache), **warm** (nothing changed), and **changed** (after
`--changed` cells pushed a new status with the agent's own `StatusWriter`).  Wall time, the
files parsed, and peak RSS are recorded: the reader's own (VmHWM), and its largest child's
(git or a forked parse worker; `ru_maxrss`, which Linux carries across exec, so a git child
counts the reader's RSS at the moment it was started: an upper bound).

    python bench/status_read_bench.py --cells 10000 --containers 250 --shards 1,4 --record

`--record` writes bench/results/status_read.md between its markers (machine, date, load
average before and after each read, and the commit measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.gitserver import GitDaemon, git  # noqa: E402
from bench import fleet_sim  # noqa: E402
from bench.common import RESULTS, machine, revision, splice  # noqa: E402
from reconciler.status.branch import branch_for, shard_of  # noqa: E402

MD = RESULTS / "status_read.md"
BEGIN, END = "<!-- status_read:begin -->", "<!-- status_read:end -->"
READERS = ("status", "plan")


def _cell(i: int) -> str:
    return f"cell-{i:05d}"  # fleet_sim.prefill's names


def build_fleet(
    srv: Path, seed: Path, cells: int, containers: int, shards: list[int]
) -> dict[str, Any]:
    """The seed repository (every cell's status, by `fleet_sim.prefill`), a policy
    repository, and for each shard count S the repositories `s<S>-status-<i>` holding the
    cells of shard i: what the agents would have pushed with `status-shards: S`."""
    fleet_sim.CONTAINERS = containers  # the document an agent with this many writes
    git("init", "-q", "--bare", "-b", "main", str(seed))
    t0 = time.monotonic()
    fleet_sim.prefill(seed, [_cell(i) for i in range(cells)])
    made: dict[str, Any] = {"prefill_s": round(time.monotonic() - t0, 1)}
    spec = f"refs/heads/{branch_for(_cell(0))}:status.yaml"
    made["doc_bytes"] = int(git("--git-dir", str(seed), "cat-file", "-s", spec))
    policy = srv / "policy.git"
    git("init", "-q", "--bare", "-b", "main", str(policy))
    tree = git("--git-dir", str(policy), "mktree", input="")
    commit = git("--git-dir", str(policy), "commit-tree", tree, "-m", "policy")
    git("--git-dir", str(policy), "update-ref", "refs/heads/main", commit)
    for count in shards:
        groups: dict[int, list[str]] = {i: [] for i in range(count)}
        for i in range(cells):
            groups[shard_of(_cell(i), count)].append(branch_for(_cell(i)))
        for shard, branches in groups.items():
            bare = srv / f"s{count}-status-{shard}.git"
            git("init", "-q", "--bare", "-b", "main", str(bare))
            refspecs = "".join(f"+refs/heads/{b}:refs/heads/{b}\n" for b in branches)
            subprocess.run(
                ["git", "--git-dir", str(bare), "fetch", "-q", "--no-tags", "--stdin", str(seed)],
                input=refspecs.encode(),
                check=True,
                env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"},
            )
            git("--git-dir", str(bare), "pack-refs", "--all")
    made["seed_mib"] = round(_size(seed) / 2**20, 1)
    return made


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def push_changes(daemon: GitDaemon, count: int, cells: int, changed: int, work: Path) -> None:
    """`changed` cells (spread over the fleet) push a new status, as their agents would."""
    from reconciler.status.fetch import StatusRepos
    from reconciler.status.write import StatusWriter

    repos = StatusRepos(daemon.url(f"s{count}-status-{{shard}}"), count)
    for n in range(changed):
        cell = _cell(n * 97 % cells)
        text = fleet_sim.status_text(cell, "1" * 40, int(time.time()))
        StatusWriter(repos.url_for(cell), branch_for(cell), work / f"w-{cell}.git").push(text, "s")


def child(reader: str, policy: str, template: str, shards: int, cache: str) -> None:
    """One read in this fresh interpreter; its figures as one JSON line."""
    from reconciler.status.fetch import StatusRepos

    repos = StatusRepos(template, shards)
    started = time.time() - 1  # file times have whole-second resolution on some systems
    t0 = time.perf_counter()
    if reader == "status":
        from reconciler.agent.fleet import read_fleet

        fleet = read_fleet(policy, "main", cache, repos)
        cells, errors = len(fleet.cells), sum(1 for c in fleet.cells if c.error)
    else:
        from reconciler.status.read import read_remote_containers

        found = read_remote_containers(repos, cache, workers=4)
        cells, errors = len(found.cells), len(found.skipped)
    seconds = time.perf_counter() - t0
    kept = list((Path(cache) / "asgctl-parsed").rglob("*.json"))
    parsed = sum(1 for p in kept if p.stat().st_mtime >= started)
    own = _peak_rss_mib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    figures = {"seconds": seconds, "cells": cells, "errors": errors, "parsed": parsed,
               "parses_kept": len(kept), "rss_mib": own, "child_rss_mib": kids}  # fmt: skip
    print(json.dumps(figures))


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM).  Not `ru_maxrss`: Linux keeps that across
    exec, so a reader started by this script would inherit the fleet builder's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(reader: str, policy: str, template: str, shards: int, cache: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    out = subprocess.run(
        [sys.executable, __file__, "--child", reader, "--policy", policy, "--template",
         template, "--child-shards", str(shards), "--cache", str(cache)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = [round(x, 1) for x in load_before] + [round(os.getloadavg()[0], 1)]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--containers", type=int, default=250)
    ap.add_argument("--shards", default="1,4", help="shard counts to measure, e.g. 1,4")
    ap.add_argument("--changed", type=int, default=100, help="cells that push between reads")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--template", help=argparse.SUPPRESS)
    ap.add_argument("--child-shards", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.policy, args.template, args.child_shards, args.cache)
        return
    shards = [int(s) for s in args.shards.split(",")]
    measured = revision()  # now: later edits to the work tree are not what ran
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="status-read-") as tmp:
        work = Path(tmp)
        daemon = GitDaemon(work / "srv")
        made = build_fleet(work / "srv", work / "seed.git", args.cells, args.containers, shards)
        print(json.dumps(made), flush=True)
        daemon.start()
        try:
            policy = daemon.url("policy")
            for count in shards:
                template = daemon.url(f"s{count}-status-{{shard}}")
                server_mib = sum(
                    _size(work / "srv" / f"s{count}-status-{i}.git") for i in range(count)
                )
                caches = {r: work / f"cache-{count}-{r}" for r in READERS}
                row: dict[str, Any] = {"shards": count, "server_mib": round(server_mib / 2**20)}
                for phase in ("cold", "warm", "changed"):
                    if phase == "changed":
                        push_changes(daemon, count, args.cells, args.changed, work / "writers")
                    for reader in READERS:
                        got = measure(reader, policy, template, count, caches[reader])
                        row[f"{reader}_{phase}"] = got
                        print(count, phase, reader, json.dumps(got), flush=True)
                row["cache_mib"] = {r: round(_size(caches[r]) / 2**20) for r in READERS}
                runs.append(row)
                for c in caches.values():
                    shutil.rmtree(c, ignore_errors=True)
        finally:
            daemon.stop()
    if args.record:
        record(args, made, runs, measured)


def record(
    args: argparse.Namespace, made: dict[str, Any], runs: list[dict[str, Any]], measured: str
) -> None:
    lines = [
        f"Machine: {machine()} (end of the run); git {git('--version').split()[-1]}; "
        f"commit measured {measured}.",
        f"Fleet: {args.cells:,} cells x {args.containers} containers, one status document "
        f"{made['doc_bytes']:,} bytes each (fleet_sim.status_text), made by `fleet_sim.prefill` "
        f"in {made['prefill_s']} s ({made['seed_mib']} MiB packed); between the warm and the "
        f"changed read, {args.changed} cells pushed a new status (`StatusWriter`).",
        "",
        "| shards | server MiB | reader | cold s | warm s | changed s | files parsed cold / "
        "warm / changed | cells (errors) | peak RSS MiB: reader, largest child (git or a "
        "parse worker) | cache MiB | load "
        "1/5/15 min before, 1 min after (cold) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in runs:
        for reader in READERS:
            cold, warm, changed = (row[f"{reader}_{p}"] for p in ("cold", "warm", "changed"))
            rss = max(r["rss_mib"] for r in (cold, warm, changed))
            git_rss = max(r["child_rss_mib"] for r in (cold, warm, changed))
            lines.append(
                f"| {row['shards']} | {row['server_mib']} | {reader} | {cold['seconds']:.1f} | "
                f"{warm['seconds']:.1f} | {changed['seconds']:.1f} | "
                f"{cold['parsed']} / {warm['parsed']} / {changed['parsed']} | "
                f"{cold['cells']:,} ({cold['errors']}) | {rss:.0f}, {git_rss:.0f} | "
                f"{row['cache_mib'][reader]} | {cold['load']} |"
            )
    splice(MD, BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
