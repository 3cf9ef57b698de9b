"""`asgctl cf compare` on a cell with 250 containers and 150,000 of CF's rules.

The cell is a network namespace holding CF's own layout (`cflayout.render_diego`, as the
lab's `--cf-layout` cells and the dataplane benchmarks build it), loaded with
`iptables-legacy-restore`; the policy repo and store.json are the ones the layout was
rendered from, so the expected answer is parity (exit 0).  The figure that matters is
`asgctl cf compare` end to end in a fresh interpreter (read the kernel, walk every
container's chains, compile the plan, compare): wall time, target under 5 s.  An in-process
run splits it into phases.  Benchmarks never assert: the figures are recorded.

Usage: python bench/cfcompare_bench.py [--containers N] [--rules N] [--repeat N] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, revision, rule, write_repo  # noqa: E402

TARGET_SECONDS = 5.0
SPACES = 25
GROUPS_PER_SPACE = 4
ASGCTL = (sys.executable, "-c", "import sys; from reconciler.cli import main; sys.exit(main())")


def build(tmp: Path, containers: int, rules: int) -> tuple[Path, Path, int]:
    """A policy repo and a store whose CF layout holds about `rules` rules."""
    from reconciler.core.model import Container
    from reconciler.sources.cellstore import dump_store

    # CF writes every rule of every bound group again per container (about 1.15 lines per
    # rule with the port lists of `bench.common.rule`): rules per group from the target.
    per_container = rules / containers - 8
    per_group = max(1, round(per_container / GROUPS_PER_SPACE / 1.15))
    rng = random.Random(7)
    groups = []
    n = 0
    for g in range(SPACES * GROUPS_PER_SPACE):
        items = []
        for _ in range(per_group):
            items.append(rule(rng, n))
            n += 1
        groups.append(
            {
                "kind": "SecurityGroup",
                "name": f"asg-{g:04d}",
                "rules": items,
                "running_spaces": [f"space-{g // GROUPS_PER_SPACE}"],
            }
        )
    policies = write_repo(tmp / "policies", {"groups.yaml": groups})
    store = [
        Container(
            f"c-{i:04d}",
            f"10.{i // 250 % 250}.{i % 250}.2",
            f"app-{i}",
            f"space-{i % SPACES}",
            "org-1",
            "",
            "app",
        )
        for i in range(containers)
    ]
    store_path = tmp / "store.json"
    store_path.write_text(dump_store(store))
    return policies, store_path, per_group


def cf_layout(policies: Path, store: Path) -> str:
    from reconciler.backends.iptables.cflayout import render_diego
    from reconciler.core.cellplan import CellSettings
    from reconciler.core.compile import compile_cell
    from reconciler.policy.load import load_policy
    from reconciler.sources.cellstore import load_store

    policy = load_policy(str(policies)).policy
    settings = CellSettings(underlay4=("eth0",))
    plan = compile_cell(policy, load_store(str(store)).containers, "bench", settings)
    return render_diego(plan, [], vtep="silk-vtep", stamp=1700000000)


def in_process(policies: Path, store: Path, netns: str) -> dict[str, float]:
    """The same work as the command, phase by phase."""
    from reconciler.backends import Runner
    from reconciler.backends.iptables.cfparse import allow_sets, parse_save
    from reconciler.core.compile import compile_cell
    from reconciler.core.parity import compare
    from reconciler.policy.load import load_policy
    from reconciler.sources.cellstore import load_store

    out: dict[str, float] = {}
    t = time.perf_counter()
    text = Runner.in_netns(netns).run(["iptables-legacy-save", "-t", "filter"]).stdout
    out["iptables-save"] = time.perf_counter() - t
    t = time.perf_counter()
    table = parse_save(text, 4)
    out["parse"] = time.perf_counter() - t
    t = time.perf_counter()
    sides = allow_sets(table)
    out["walk CF's chains"] = time.perf_counter() - t
    t = time.perf_counter()
    policy = load_policy(str(policies)).policy
    plan = compile_cell(policy, load_store(str(store)).containers, "")
    out["load + compile"] = time.perf_counter() - t
    t = time.perf_counter()
    report = compare(policy, plan, sides)
    out["compare"] = time.perf_counter() - t
    out["same"] = float(report.same)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, default=250)
    parser.add_argument("--rules", type=int, default=150_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    netns = f"asgbench-{os.getpid()}-{secrets.token_hex(2)}"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        policies, store, per_group = build(tmp, args.containers, args.rules)
        layout = cf_layout(policies, store)
        cf_rules = sum(1 for x in layout.splitlines() if x.startswith(("-A ", "-I ")))
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            subprocess.run(
                ["ip", "netns", "exec", netns, "iptables-legacy-restore", "--noflush"],
                input=layout,
                text=True,
                check=True,
            )
            argv = [*ASGCTL, "cf", "compare", "--containers", str(store)]
            argv += ["--policies", str(policies), "--netns", netns, "--format", "json"]
            walls, cpus, codes = [], [], []
            load_before = os.getloadavg()[0]
            for _ in range(args.repeat):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
                walls.append(time.perf_counter() - t)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                codes.append(done.returncode)
                if done.returncode not in (0, 3):
                    print(done.stderr, file=sys.stderr)
            load_after = os.getloadavg()[0]
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            counts = json.loads(done.stdout)["counts"] if done.stdout else {}
            phases = in_process(policies, store, netns)
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)

    wall = statistics.median(walls)
    cpu = statistics.median(cpus)
    verdict = "wall time within target" if wall < TARGET_SECONDS else "wall time OVER TARGET"
    verdict += f" at load {load_before:.1f} on {os.cpu_count()} cores; CPU time "
    verdict += "within target" if cpu < TARGET_SECONDS else "OVER TARGET"
    rows = [
        ("containers", f"{args.containers:,}"),
        ("CF rules in the cell (`-A`/`-I` lines of the layout)", f"{cf_rules:,}"),
        (
            "ASGs (rules each) / bound per space",
            f"{SPACES * GROUPS_PER_SPACE} ({per_group}) / {GROUPS_PER_SPACE}",
        ),
        (
            f"`asgctl cf compare` wall time, median of {args.repeat}",
            f"{wall:.2f} s (target < {TARGET_SECONDS:g} s)",
        ),
        ("runs", ", ".join(f"{w:.2f} s" for w in walls)),
        (
            "CPU time (user + sys, the command and its iptables-save), median",
            f"{cpu:.2f} s (one thread that waits on little else: about its wall time on a "
            "quiet core)",
        ),
        ("peak RSS of a run", f"{rss:.0f} MiB"),
        ("exit codes", ", ".join(map(str, codes))),
        ("result", ", ".join(f"{k} {v}" for k, v in counts.items())),
        ("load average before / after", f"{load_before:.1f} / {load_after:.1f}"),
        ("verdict", verdict),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    phase = "| phase (in-process run) | wall |\n|---|--:|\n" + "\n".join(
        f"| {k} | {v:.2f} s |" for k, v in phases.items() if k != "same"
    )
    text = (
        "# asgctl cf compare: shadow parity on a 150,000-rule cell\n\n"
        f"Machine: {machine()}\n\nCode: {revision()}\n\n"
        f"Command: `python bench/cfcompare_bench.py --containers {args.containers} "
        f"--rules {args.rules} --repeat {args.repeat} --record`\n\n"
        f"{table}\n\n{phase}\n\n"
        "The cell is CF's layout as `cflayout.render_diego` renders it (silk's netout and ASG "
        "chains with `-o eth0`, the overlay chains, the VPA's chain first in FORWARD), "
        "loaded with iptables-legacy-restore into a namespace; the store and policies are "
        "the ones it was rendered from, so every container must come out the same.\n\n"
        "Where the time goes: `load + compile` is what every asgctl command that takes "
        "`--policies` pays (validation, with its redundant-rule warnings, then the cell "
        "compile); the rest is this command's own: the kernel's save, reading it (rule texts "
        "once per cell: a space's containers share them), the walk (FORWARD's jumps indexed "
        "by source host, a plain ACCEPT reached by every packet granted without cutting) and "
        "the comparison (equal box sets need no sweep; canonical forms once per distinct "
        "set).  The machine is shared by several jobs: the load average above is part of "
        "every figure.\n"
    )
    print(text)
    if args.record:
        (RESULTS / "cfcompare.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
