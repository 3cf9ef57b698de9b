"""`asgctl cf sync` of a large foundation from the stand-in Cloud Controller: time and memory.

The foundation (2,000 orgs, 20,000 spaces, 200,000 apps, 3,000 security groups by default) is
generated in memory by the stand-in (tests/cfstandin.py) in a process of its own, so the sync
is measured alone: `asgctl cf sync` runs as a child and its wall time and peak RSS are its
own (wait4's rusage).  Two syncs are measured: into an empty folder (every file written),
then again with nothing changed in CF (every file compared, none written).  The issue's
target is under 60 s and 1 GiB; this records, it does not assert.  The sync's CPU time is
recorded beside its wall time: on two cores shared with other work, the wall time says as
much about the neighbours as about the sync.

Usage: python bench/cfsync_bench.py [--orgs 2000 --spaces 20000 --apps 200000 --groups 3000]
                                    [--record]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, revision  # noqa: E402
from tests.cfstandin import CLIENT_ID, CLIENT_SECRET  # noqa: E402


def timed_sync(api: str, out: Path) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (MiB), the last stdout line and the CPU seconds (user + system)
    of one `asgctl cf sync`."""
    asgctl = Path(sys.executable).parent / "asgctl"
    env = dict(os.environ, ASGCTL_CF_CLIENT_ID=CLIENT_ID, ASGCTL_CF_CLIENT_SECRET=CLIENT_SECRET)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(
            [str(asgctl), "cf", "sync", "--api", api, "--out", str(out)],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"cf sync failed ({child.returncode}): {stderr.read()[-2000:]}")
        lines = stdout.read().splitlines()
    cpu = usage.ru_utime + usage.ru_stime
    return elapsed, usage.ru_maxrss / 1024, lines[-1] if lines else "", cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=2000)
    parser.add_argument("--spaces", type=int, default=20000)
    parser.add_argument("--apps", type=int, default=200000)
    parser.add_argument("--groups", type=int, default=3000)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.cfstandin", str(args.orgs), str(args.spaces),
         str(args.apps), str(args.groups)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        api = server.stdout.readline().strip()
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="asgctl-cfsync-bench-") as tmp:
            out = Path(tmp) / "policies"
            first = timed_sync(api, out)
            files = [p for p in out.rglob("*.yaml")]
            size = sum(p.stat().st_size for p in files)
            second = timed_sync(api, out)
        load_after = os.getloadavg()[0]
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
    foundation = (
        f"{args.orgs} orgs, {args.spaces} spaces, {args.apps} apps, {args.groups} security groups"
    )
    lines = [
        f"cf sync of {foundation} into an empty folder: {first[0]:.1f} s wall "
        f"({first[3]:.1f} s CPU), peak RSS {first[1]:.0f} MiB ({len(files)} files, "
        f"{size / 2**20:.1f} MiB of YAML; {first[2]})",
        f"cf sync again, nothing changed in CF: {second[0]:.1f} s wall ({second[3]:.1f} s CPU), "
        f"peak RSS {second[1]:.0f} MiB ({second[2]})",
        f"1-minute load average before and after (2 cores shared with other work): "
        f"{load_before:.1f}, {load_after:.1f}",
    ]
    print("\n".join(lines))
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cfsync.md").write_text(
            f"# cf sync benchmark\n\nMachine: {machine()}\n\nCode: {revision()}\n\n"
            f"Command: `python bench/cfsync_bench.py --record` (the stand-in serves pages of up "
            f"to 5,000 over plain http on loopback, from its own process)\n\n"
            f"Target (issue 14): under 60 s and 1 GiB.\n\n"
            + "".join(f"- {line}\n" for line in lines)
        )


if __name__ == "__main__":
    main()
