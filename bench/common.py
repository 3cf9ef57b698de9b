"""Shared pieces of the benchmarks: synthetic policy repos, timing, and the machine note.

Benchmarks are not tests: they print figures and record them under bench/results/ with the
machine and date, and never assert wall-clock limits (the machines are shared and noisy).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC"
    )


def revision() -> str:
    """The commit whose code is measured: HEAD, with "+changes" when tracked files other
    than the recorded results differ from it (a figure from uncommitted code says so)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":!bench/results", ":!docs/reliability.md")  # fmt: skip
    return head + ("+changes" if changed else "")


def splice(path: Path, begin: str, end: str, body: str) -> None:
    """Write `body` between the `begin` and `end` markers of `path`, keeping the rest (the
    written analysis and the history); a file without the markers gets the block on top."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = block + "\n\n" + old
    path.write_text(text)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn: Callable[[], object], repeat: int = 5) -> tuple[float, object]:
    """Median wall time of `repeat` runs, and the last result."""
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def directory_doc(orgs: int, spaces_per_org: int, apps_per_space: int) -> dict:
    return {
        "kind": "Directory",
        "orgs": [
            {
                "name": f"org{o}",
                "guid": f"org-{o}",
                "spaces": [
                    {
                        "name": f"s{s}",
                        "guid": f"space-{o}-{s}",
                        "apps": [
                            {"name": f"a{a}", "guid": f"app-{o}-{s}-{a}"}
                            for a in range(apps_per_space)
                        ],
                    }
                    for s in range(spaces_per_org)
                ],
            }
            for o in range(orgs)
        ],
    }


def rule(rng: random.Random, i: int) -> dict:
    """A realistic mix: mostly TCP to single hosts and subnets, some UDP, ranges and ICMP."""
    a, b = divmod(i, 250)
    kind = rng.random()
    host = f"198.{18 + (a // 250) % 2}.{a % 250}.{b + 1}"
    if kind < 0.55:
        return {
            "protocol": "tcp",
            "destination": host,
            "ports": rng.choice(["443", "80,443", "5432", "8000-8100"]),
        }
    if kind < 0.75:
        return {"protocol": "tcp", "destination": f"198.18.{a % 250}.0/24", "ports": str(1000 + b)}
    if kind < 0.9:
        return {"protocol": "udp", "destination": host, "ports": "53"}
    if kind < 0.97:
        return {"protocol": "all", "destination": f"{host}-198.19.255.{b + 1}"}
    return {"protocol": "icmp", "destination": host, "type": 8, "code": -1}


def security_groups(count: int, rules_per_group: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    groups = []
    n = 0
    for g in range(count):
        rules = []
        for _ in range(rules_per_group):
            rules.append(rule(rng, n))
            n += 1
        groups.append({"kind": "SecurityGroup", "name": f"asg-{g:05d}", "rules": rules})
    return groups


def write_repo(root: Path, docs_by_file: dict[str, list[dict]]) -> Path:
    for rel, docs in docs_by_file.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return root


def run_child(args: list[str]) -> str:
    """Run a measurement in a fresh interpreter, so its peak RSS is its own."""
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return out.stdout
