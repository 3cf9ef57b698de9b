"""Compile and render one cell: 250 containers at 150k and 500k CF-equivalent rules.

Each case runs in a fresh interpreter (so peak RSS is its own); compile and render are timed
as medians of several runs.  Prints installed vs CF-equivalent rules.

Usage: python bench/compile_bench.py [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS,
    directory_doc,
    machine,
    median_time,
    peak_rss_mib,
    run_child,
    security_groups,
    write_repo,
)

# name: (ASGs, rules per ASG, ASGs bound per space); 50 spaces x 5 containers = 250.
CASES = {
    "150k": (100, 30, 20),
    "500k": (200, 100, 20),
}
SPACES, PER_SPACE = 50, 5


def build_repo(root: Path, groups: int, rules: int, per_space: int) -> None:
    docs = security_groups(groups, rules)
    for g in docs:
        g["running_spaces"] = []
    for s in range(SPACES):
        for j in range(per_space):
            docs[(s * 7 + j) % groups]["running_spaces"].append(f"org0/s{s}")
    write_repo(root, {"directory.yaml": [directory_doc(1, SPACES, PER_SPACE)], "sg.yaml": docs})


def inventory():
    from reconciler.core.model import Container

    out = []
    for s in range(SPACES):
        for a in range(PER_SPACE):
            n = s * PER_SPACE + a
            out.append(
                Container(
                    handle=f"c-{n:04d}",
                    ip=f"198.18.{n // 250}.{n % 250 + 1}",
                    app_id=f"app-0-{s}-{a}",
                    space_id=f"space-0-{s}",
                    org_id="org-0",
                )
            )
    return out


def child(repo: str, repeat: int) -> None:
    from reconciler.backends.iptables.render import render_text
    from reconciler.core.compile import compile_cell
    from reconciler.policy.load import load_folder

    result = load_folder(repo)
    assert result.ok
    containers = inventory()
    # A fresh PolicySet per run: compile memoises its index per policy object, and the
    # figure wanted here is a cold compile (what a new revision costs the agent).
    compile_s, plan = median_time(
        lambda: compile_cell(replace(result.policy), containers, "bench"), repeat
    )
    warm_s, _ = median_time(lambda: compile_cell(result.policy, containers, "bench"), repeat)
    render_s, text = median_time(lambda: render_text(plan, 4), repeat)
    print(
        json.dumps(
            {
                "compile_s": compile_s,
                "warm_s": warm_s,
                "render_s": render_s,
                "installed": plan.installed_rules,
                "cf_equivalent": plan.cf_equivalent_rules,
                "groups": len(plan.groups),
                "chains": plan.chains,
                "text_mib": len(text) / 2**20,
                "rss_mib": peak_rss_mib(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeat)
        return
    lines = [
        "| case | containers | CF-equivalent rules | installed rules | ratio | groups | "
        "compile, cold (median) | compile, same policy again | render (median) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (groups, rules, per_space) in CASES.items():
        with tempfile.TemporaryDirectory(prefix="asgctl-bench-") as tmp:
            build_repo(Path(tmp), groups, rules, per_space)
            r = json.loads(
                run_child([sys.executable, __file__, "--child", tmp, "--repeat", str(args.repeat)])
            )
        lines.append(
            f"| {name} | {SPACES * PER_SPACE} | {r['cf_equivalent']:,} | {r['installed']:,} | "
            f"{r['cf_equivalent'] / r['installed']:.1f}x | {r['groups']} | "
            f"{r['compile_s'] * 1000:.0f} ms | {r['warm_s'] * 1000:.1f} ms | "
            f"{r['render_s'] * 1000:.0f} ms | "
            f"{r['rss_mib']:.0f} MiB |"
        )
        print(lines[-1], flush=True)
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "compile.md").write_text(
            "# Compile + render benchmark (one cell)\n\n"
            f"Machine: {machine()}\n\nCommand: `python bench/compile_bench.py --record` "
            f"(medians of {args.repeat} runs, each case in a fresh interpreter)\n\n"
            + "\n".join(lines)
            + "\n"
        )


if __name__ == "__main__":
    main()
