"""Validate a generated repo of 5,000 security groups x 20 rules: time and peak memory.

Usage: python bench/validate_bench.py [--groups 5000] [--rules 20] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS,
    directory_doc,
    machine,
    peak_rss_mib,
    run_child,
    security_groups,
    write_repo,
)


def child(repo: str) -> None:
    from reconciler.policy.load import load_folder

    start = time.perf_counter()
    result = load_folder(repo)
    elapsed = time.perf_counter() - start
    rules = sum(len(g.rules) for g in result.policy.security_groups)
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "rss_mib": peak_rss_mib(),
                "ok": result.ok,
                "findings": len(result.findings),
                "rules": rules,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="asgctl-bench-") as tmp:
        groups = security_groups(args.groups, args.rules)
        for i, g in enumerate(groups):
            g["running_spaces"] = [f"org{i % 10}/s{i % 50}"]
        files = {"directory.yaml": [directory_doc(10, 50, 5)]}
        for start in range(0, len(groups), 100):
            files[f"groups/g{start // 100:03d}.yaml"] = groups[start : start + 100]
        write_repo(Path(tmp), files)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.yaml"))
        runs = [
            json.loads(run_child([sys.executable, __file__, "--child", tmp]))
            for _ in range(args.repeat)
        ]
    runs.sort(key=lambda r: r["seconds"])
    mid = runs[len(runs) // 2]
    line = (
        f"validate {args.groups} groups x {args.rules} rules ({mid['rules']} rules, "
        f"{size / 2**20:.1f} MiB of YAML in {len(files)} files): median {mid['seconds']:.2f} s "
        f"of {args.repeat}, peak RSS {mid['rss_mib']:.0f} MiB, valid={mid['ok']}, "
        f"findings={mid['findings']}"
    )
    print(line)
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "validate.md").write_text(
            f"# Validate benchmark\n\nMachine: {machine()}\n\n"
            f"Command: `python bench/validate_bench.py --record`\n\n- {line}\n"
        )


if __name__ == "__main__":
    main()
