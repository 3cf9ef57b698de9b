"""A fleet of agents against one git server: how fast a commit is applied and reported, what
the server pays, and how big a status branch gets.

Three experiments, all on this machine, against `git daemon` on loopback:

1. **Fetch depth.**  A policy repo with a few hundred commits of history: the first fetch into
   an empty cache with depth 1 (the agent's default) and with the full history, then one
   incremental fetch; time, objects and bytes of the cache.
2. **Fleet.**  N agents (default 50), each a long-running `asgctl agent` process enforcing in
   a network namespace of its own, syncing every `--interval` with 10 % jitter.  After they
   settle, an idle window measures the git server's CPU (the daemon's own plus every
   upload-pack / receive-pack it forked and reaped, from /proc/<pid>/stat) and the agents'.
   Then `--commits` commits, one at a time: for each, the time from the push to every cell's
   *applied* time (the agent's `lastAppliedTime`) and to its *report* (the status branch on
   the server showing the revision, polled every 50 ms).
3. **Status branch size.**  One agent runs `--status-cycles` cycles and pushes its status
   after every one (the worst case: a heartbeat of zero); then the branch's commits and
   reachable objects, and the server repository's object count and size before and after
   `git gc --prune=now` (every push leaves the previous root commit unreachable).

Usage: python bench/agent_fleet.py [--agents 50] [--interval 5] [--commits 5]
                                   [--status-cycles 1000] [--history 300] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.gitserver import GitDaemon, git, proc_cpu  # noqa: E402
from asgctl_lab.netns import Lab, cleanup_stale  # noqa: E402
from bench.common import RESULTS, machine  # noqa: E402
from reconciler.agent.config import build_config  # noqa: E402
from reconciler.agent.loop import SYNC, Agent  # noqa: E402
from reconciler.agent.source import GitSource  # noqa: E402
from reconciler.core.model import Container  # noqa: E402
from reconciler.sources.cellstore import dump_store  # noqa: E402

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ASGCTL = (sys.executable, "-c", "import sys; from reconciler.cli import main; sys.exit(main())")
SPACES = 10
CONTAINERS_PER_CELL = 20


# -- the policy repo -----------------------------------------------------------------------


def policy_files(version: int) -> dict[str, str]:
    """20 space-bound groups of 10 rules and one global group whose size follows `version`."""
    files = {}
    for g in range(20):
        rules = "\n".join(
            f'  - {{protocol: tcp, destination: 198.19.{g}.{r + 1}, ports: "{1000 + r}"}}'
            for r in range(10)
        )
        files[f"sg-{g:02d}.yaml"] = (
            f"kind: SecurityGroup\nname: group-{g:02d}\nrules:\n{rules}\n"
            f"globally_enabled: {{running: false, staging: false}}\n"
            f"running_spaces: [space-{g % SPACES}]\n"
        )
    extra = "\n".join(
        f'  - {{protocol: udp, destination: 198.19.200.{r + 1}, ports: "53"}}'
        for r in range(1 + version % 3)
    )
    files["global.yaml"] = (
        f"kind: SecurityGroup\nname: dns\nrules:\n{extra}\n"
        "globally_enabled: {running: true, staging: true}\n"
    )
    return files


def write_policies(work: Path, version: int) -> None:
    folder = work / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in policy_files(version).items():
        (folder / name).write_text(text)


def commit(work: Path, message: str) -> str:
    git("add", "-A", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def cell_store(cell: int) -> str:
    containers = [
        Container(
            f"c{cell:03d}-{i:02d}",
            f"198.18.{cell}.{i + 2}",
            f"app-{i}",
            f"space-{i % SPACES}",
            "org-0",
            "",
            "staging" if i % 7 == 6 else "app",
        )
        for i in range(CONTAINERS_PER_CELL)
    ]
    return dump_store(containers)


# -- measurements --------------------------------------------------------------------------


def proc_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def parse_iso(text: str) -> float:
    """`2025-01-02T03:04:05.678Z` -> unix time."""
    import calendar

    main, _, frac = text.rstrip("Z").partition(".")
    t = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return t + (int(frac) / 1000 if frac else 0.0)


class StatusPoller:
    """Reads every status branch on the server repo, re-reading only the ones that moved."""

    def __init__(self, bare: Path) -> None:
        self.bare = bare
        self.tips: dict[str, str] = {}
        self.docs: dict[str, dict[str, Any]] = {}

    def poll(self) -> dict[str, dict[str, Any]]:
        out = git("--git-dir", str(self.bare), "for-each-ref", "--format=%(objectname) %(refname)",
                  "refs/heads/status/")  # fmt: skip
        for line in out.splitlines():
            sha, ref = line.split(" ", 1)
            cell = ref.rsplit("/", 1)[1]
            if self.tips.get(cell) != sha:
                text = git("--git-dir", str(self.bare), "cat-file", "blob", f"{sha}:status.yaml")
                self.docs[cell] = yaml.load(text, Loader=_LOADER)
                self.tips[cell] = sha
        return self.docs


# -- 1. fetch depth ------------------------------------------------------------------------


def fetch_depth(daemon: GitDaemon, work: Path, tmp: Path) -> dict[str, Any]:
    url = daemon.url("policy")
    out: dict[str, Any] = {}
    for depth in (1, 0):
        cache = tmp / f"depth{depth}.git"
        src = GitSource(url, "main", cache, depth=depth)
        t0 = time.perf_counter()
        src.fetch()
        first = time.perf_counter() - t0
        objects = git("--git-dir", str(cache), "count-objects", "-v")
        out[depth] = {"first": first, "bytes": dir_size(cache), "objects": objects}
    write_policies(work, 7)
    commit(work, "one more")
    git("push", "-q", url, "main", cwd=work)
    for depth in (1, 0):
        src = GitSource(url, "main", tmp / f"depth{depth}.git", depth=depth)
        t0 = time.perf_counter()
        src.fetch()
        out[depth]["incremental"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        src.fetch()
        out[depth]["noop"] = time.perf_counter() - t0
        src.close()
    return out


def protocol_cost(daemon: GitDaemon, tmp: Path, fetches: int = 40) -> dict[str, Any]:
    """A no-op fetch of the policy branch with wire protocol v0 and v2, once the repository
    holds the fleet's status branches: v0 advertises every ref to every fetch, v2 only the
    ones the refspec asks for."""
    url = daemon.url("policy")
    cache = tmp / "depth0.git"
    refs = len(git("ls-remote", url).splitlines())
    out: dict[str, Any] = {"refs": refs}
    for version in (0, 2):
        cpu, t0 = daemon.cpu_seconds(), time.perf_counter()
        for _ in range(fetches):
            spec = "+refs/heads/main:refs/remotes/origin/main"
            git(
                "-c", f"protocol.version={version}", "--git-dir", str(cache), "fetch", "-q",
                "--no-tags", "--no-write-fetch-head", url, spec,
            )  # fmt: skip
        out[version] = {
            "wall_ms": (time.perf_counter() - t0) / fetches * 1000,
            "server_cpu_ms": (daemon.cpu_seconds() - cpu) / fetches * 1000,
        }
    return out


# -- 2. the fleet --------------------------------------------------------------------------


def fleet(
    daemon: GitDaemon, work: Path, bare: Path, tmp: Path, n: int, interval: float, commits: int
) -> dict[str, Any]:
    url = daemon.url("policy")
    labs: list[Lab] = []
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"agents": n, "interval": interval}
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            labs.append(Lab([], [], conntrack=False).start())
        result["lab_seconds"] = time.perf_counter() - t0
        version = 100
        write_policies(work, version)
        head = commit(work, "fleet start")
        git("push", "-q", url, "main", cwd=work)
        for i, lab in enumerate(labs):
            d = tmp / f"agent-{i:03d}"
            d.mkdir()
            (d / "store.json").write_text(cell_store(i))
            cfg = {
                "source": url,
                "cell": f"cell-{i:03d}",
                "containers": str(d / "store.json"),
                "netns": lab.cell,
                "state-dir": str(d / "state"),
                "interval": f"{interval}s",
                "jitter": "10%",
                "heartbeat": "10m",
                "status-min-interval": "1s",
                "retry-base": "1s",
            }
            (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
            with open(d / "out.log", "wb") as o, open(d / "err.log", "wb") as e:
                procs.append(
                    subprocess.Popen(
                        [*ASGCTL, "agent", "--config", str(d / "agent.yaml")],
                        stdout=o,
                        stderr=e,
                        cwd=ROOT,
                        start_new_session=True,
                    )
                )
        poller = StatusPoller(bare)
        rev = f"main@sha1:{head}"
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 120:
            docs = poller.poll()
            if sum(1 for d in docs.values() if d.get("lastAppliedRevision") == rev) == n:
                break
            time.sleep(0.2)
        result["settle_seconds"] = time.perf_counter() - t0

        # Idle window: the steady cost of N agents polling.
        time.sleep(interval)
        window = max(15.0, 3 * interval)
        s_cpu, a_cpu = daemon.cpu_seconds(), sum(proc_cpu(p.pid) for p in procs)
        time.sleep(window)
        result["idle_window"] = window
        result["server_cpu_idle"] = (daemon.cpu_seconds() - s_cpu) / window
        result["agents_cpu_idle"] = (sum(proc_cpu(p.pid) for p in procs) - a_cpu) / window
        result["agent_rss_mib"] = statistics.median(proc_rss_mib(p.pid) for p in procs)

        applied: list[float] = []
        reported: list[float] = []
        push_lag: list[float] = []
        s_cpu, t_start = daemon.cpu_seconds(), time.perf_counter()
        rng = random.Random(7)
        for k in range(commits):
            version += 1
            write_policies(work, version)
            sha = commit(work, f"change {k}")
            git("push", "-q", url, "main", cwd=work)
            pushed = time.time()
            rev = f"main@sha1:{sha}"
            seen: dict[str, float] = {}
            deadline = time.monotonic() + 4 * interval + 30
            while len(seen) < n and time.monotonic() < deadline:
                for cell, doc in poller.poll().items():
                    if cell not in seen and doc.get("lastAppliedRevision") == rev:
                        seen[cell] = time.time()
                        applied.append(parse_iso(doc["lastAppliedTime"]) - pushed)
                        reported.append(seen[cell] - pushed)
                        push_lag.append(
                            parse_iso(doc["reportedAt"]) - parse_iso(doc["lastAppliedTime"])
                        )
                time.sleep(0.05)
            if len(seen) < n:
                result.setdefault("missed", 0)
                result["missed"] += n - len(seen)
            time.sleep(rng.uniform(0, interval))
        span = time.perf_counter() - t_start
        result["server_cpu_commits"] = (daemon.cpu_seconds() - s_cpu) / span
        result["applied"] = applied
        result["reported"] = reported
        result["push_lag"] = push_lag
        result["ready"] = sum(
            1
            for d in poller.poll().values()
            for c in d.get("conditions", ())
            if c["type"] == "Ready" and c["status"] == "True"
        )
        result["status_bytes"] = statistics.median(
            len(git("--git-dir", str(bare), "cat-file", "blob", f"{t}:status.yaml"))
            for t in poller.tips.values()
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        result["clean_exits"] = sum(1 for p in procs if p.returncode == 0)
        for lab in labs:
            lab.teardown()
    return result


# -- 3. status branch size -----------------------------------------------------------------


def count_objects(bare: Path) -> dict[str, int]:
    out = git("--git-dir", str(bare), "count-objects", "-v")
    return {k: int(v) for k, v in (line.split(": ") for line in out.splitlines())}


def status_size(daemon: GitDaemon, bare: Path, tmp: Path, cycles: int) -> dict[str, Any]:
    url = daemon.url("policy")
    store = tmp / "size-store.json"
    store.write_text(cell_store(1))
    before = count_objects(bare)
    with Lab([], [], conntrack=False) as lab:
        cfg = build_config(
            {
                "source": url,
                "cell": "size-probe",
                "containers": str(store),
                "netns": lab.cell,
                "state-dir": str(tmp / "size-state"),
                "interval": "1s",
            },
            {},
        )
        with open(os.devnull, "w") as null:
            agent = Agent(cfg, out=null, err=null)
            assert agent.pusher is not None
            t0 = time.perf_counter()
            failed = 0
            for _ in range(cycles):
                agent.cycle(SYNC)
                failed += not agent.pusher.push_now().ok
            seconds = time.perf_counter() - t0
            agent.source.close()
    ref = "refs/heads/status/size-probe"
    reachable = git("--git-dir", str(bare), "rev-list", "--objects", ref).splitlines()
    sizes = git(
        "--git-dir", str(bare), "cat-file", "--batch-check=%(objectsize)",
        input="\n".join(line.split()[0] for line in reachable) + "\n",
    ).split()  # fmt: skip
    after = count_objects(bare)
    t0 = time.perf_counter()
    git("--git-dir", str(bare), "gc", "--quiet", "--prune=now")
    gc_seconds = time.perf_counter() - t0
    collected = count_objects(bare)
    return {
        "cycles": cycles,
        "seconds": seconds,
        "failed_pushes": failed,
        "branch_commits": int(git("--git-dir", str(bare), "rev-list", "--count", ref)),
        "reachable_objects": len(reachable),
        "reachable_bytes": sum(int(s) for s in sizes),
        "before": before,
        "after": after,
        "after_gc": collected,
        "gc_seconds": gc_seconds,
        "scratch_bytes": dir_size(tmp / "size-state" / "status.git"),
    }


# -- report --------------------------------------------------------------------------------


def report(
    depth: dict, fl: dict, size: dict, proto: dict, args: argparse.Namespace, history: int
) -> str:
    applied, reported, lag = fl["applied"], fl["reported"], fl["push_lag"]
    d1, d0 = depth[1], depth[0]

    def objs(text: str) -> str:
        kv = dict(line.split(": ") for line in text.splitlines())
        return f"{int(kv['count']) + int(kv['in-pack'])}"

    lines = [
        "# Agent fleet benchmark",
        "",
        f"Machine: {machine()}",
        "",
        f"Command: `python bench/agent_fleet.py --agents {args.agents} --interval "
        f"{args.interval:g} --commits {args.commits} --status-cycles {args.status_cycles}`",
        "",
        "Git server: `git daemon` on 127.0.0.1 (git://), one bare repository; every agent a",
        "long-running `asgctl agent` process enforcing (iptables) in a network namespace of its",
        f"own, {CONTAINERS_PER_CELL} containers per cell, 21 security groups, syncing every "
        f"{fl['interval']:g} s + up to 10 % jitter.",
        "",
        "## Commit to applied and reported",
        "",
        f"{fl['agents']} agents x {args.commits} commits = {len(applied)} samples "
        f"(missed: {fl.get('missed', 0)}); seconds from the push returning to:",
        "",
        "| | median | p90 | p99 | max |",
        "|---|---|---|---|---|",
        f"| applied in the kernel (agent's `lastAppliedTime`) | {statistics.median(applied):.2f} "
        f"| {pct(applied, 0.9):.2f} | {pct(applied, 0.99):.2f} | {max(applied):.2f} |",
        f"| reported (status branch on the server shows it) | {statistics.median(reported):.2f} "
        f"| {pct(reported, 0.9):.2f} | {pct(reported, 0.99):.2f} | {max(reported):.2f} |",
        f"| of which: applied to status push started (`reportedAt`) | "
        f"{statistics.median(lag):.2f} | {pct(lag, 0.9):.2f} | {pct(lag, 0.99):.2f} | "
        f"{max(lag):.2f} |",
        "",
        f"The wait is dominated by the interval: a commit lands at a uniformly random point of "
        f"each agent's {fl['interval']:g} s (+10 %) cycle, so the expected median is about half "
        "an interval plus one cycle's work, and the bound one interval plus jitter "
        f"({fl['interval'] * 1.1:.1f} s) plus one cycle.  Cycles that apply take longer while "
        f"all {fl['agents']} agents, the git server and this benchmark's poller share the "
        "machine's cores, which is what stretches the tail.  The status push starts "
        "within milliseconds of the apply; the rest of the report delay is the push itself "
        "and the poller, under the same contention.",
        "",
        "## Cost",
        "",
        "| | value |",
        "|---|---|",
        f"| git server CPU, idle fleet ({fl['idle_window']:g} s window) | "
        f"{fl['server_cpu_idle'] * 100:.1f} % of one core |",
        f"| git server CPU, during the commits | {fl['server_cpu_commits'] * 100:.1f} % of one "
        "core |",
        f"| all {fl['agents']} agents' CPU, idle (incl. git, iptables children) | "
        f"{fl['agents_cpu_idle'] * 100:.1f} % of one core |",
        f"| per agent per idle cycle | "
        f"{fl['agents_cpu_idle'] / fl['agents'] * fl['interval'] * 1.05 * 1000:.0f} ms CPU |",
        f"| agent resident memory (median) | {fl['agent_rss_mib']:.0f} MiB |",
        f"| status.yaml per cell ({CONTAINERS_PER_CELL} containers) | "
        f"{fl['status_bytes'] / 1024:.1f} KiB |",
        f"| fleet start to all {fl['agents']} applied and reported | "
        f"{fl['settle_seconds']:.1f} s |",
        f"| agents Ready at the end / clean exits on SIGTERM | {fl['ready']} / "
        f"{fl['clean_exits']} |",
        "",
        "Server CPU is the daemon's own time plus that of every upload-pack / receive-pack it",
        "forked and reaped (`/proc/<pid>/stat` utime+stime+cutime+cstime).",
        "",
        f"## Status branch after {size['cycles']:,} cycles",
        "",
        f"One agent ran {size['cycles']:,} cycles and pushed after every one (heartbeat 0, the "
        f"worst case) in {size['seconds']:.0f} s ({size['failed_pushes']} failed pushes).",
        "",
        "| | value |",
        "|---|---|",
        f"| commits on `status/size-probe` | {size['branch_commits']} |",
        f"| objects reachable from it | {size['reachable_objects']} "
        f"({size['reachable_bytes'] / 1024:.1f} KiB) |",
        f"| server repo objects before / after the {size['cycles']:,} pushes | "
        f"{size['before']['count'] + size['before']['in-pack']:,} / "
        f"{size['after']['count'] + size['after']['in-pack']:,} |",
        f"| server repo size before / after | "
        f"{(size['before']['size'] + size['before']['size-pack']) / 1024:.1f} MiB / "
        f"{(size['after']['size'] + size['after']['size-pack']) / 1024:.1f} MiB |",
        f"| after `git gc --prune=now` ({size['gc_seconds']:.1f} s) | "
        f"{size['after_gc']['count'] + size['after_gc']['in-pack']:,} objects, "
        f"{(size['after_gc']['size'] + size['after_gc']['size-pack']) / 1024:.1f} MiB |",
        f"| agent's local status scratch repo | {size['scratch_bytes'] / 1024:.0f} KiB |",
        "",
        "Each push is a new root commit (commit + tree + blob), so the branch never grows; the",
        "replaced commits are unreachable garbage until the server's gc prunes them (by default",
        "`gc.pruneExpire` = 2 weeks).  With the default heartbeat of 10 minutes and pushes only",
        "on change, a steady cell adds 144 commits a day, not one per cycle.",
        "",
        f"## Fetch depth (policy repo with {history} commits of history)",
        "",
        "| first fetch into an empty cache | time | objects | cache size | next fetch (1 "
        "commit) | no-op fetch |",
        "|---|---|---|---|---|---|",
        f"| depth 1 (default) | {d1['first'] * 1000:.0f} ms | {objs(d1['objects'])} | "
        f"{d1['bytes'] / 1024:.0f} KiB | {d1['incremental'] * 1000:.0f} ms | "
        f"{d1['noop'] * 1000:.0f} ms |",
        f"| full history | {d0['first'] * 1000:.0f} ms | {objs(d0['objects'])} | "
        f"{d0['bytes'] / 1024:.0f} KiB | {d0['incremental'] * 1000:.0f} ms | "
        f"{d0['noop'] * 1000:.0f} ms |",
        "",
        "Later fetches are incremental either way; the shallow cache keeps every commit since",
        "its first fetch, so the rewind check stays local, and unshallows only to prove a",
        "negative (a head that does not descend from the applied revision).",
        "",
        f"## Wire protocol: a no-op fetch with {proto['refs']} refs on the server",
        "",
        "| protocol | wall per fetch | server CPU per fetch |",
        "|---|---|---|",
        f"| v2 (git's default, what the agent uses) | {proto[2]['wall_ms']:.0f} ms | "
        f"{proto[2]['server_cpu_ms']:.1f} ms |",
        f"| v0 | {proto[0]['wall_ms']:.0f} ms | {proto[0]['server_cpu_ms']:.1f} ms |",
        "",
        "Status branches live in the policy repository, so the number of refs grows with the",
        "fleet; v2 sends a fetch only the refs its refspec names, v0 advertises all of them",
        "to every agent on every cycle.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--commits", type=int, default=5)
    ap.add_argument("--status-cycles", type=int, default=1000)
    ap.add_argument("--history", type=int, default=300)
    ap.add_argument("--record", action="store_true", help="write bench/results/agent.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    cleanup_stale()
    tmp = Path(tempfile.mkdtemp(prefix="asgctl-fleet-"))
    daemon = GitDaemon(tmp / "srv")
    try:
        daemon.start()
        bare = daemon.create("policy")
        work = tmp / "work"
        git("init", "-q", "-b", "main", str(work))
        for v in range(args.history):
            write_policies(work, v)
            (work / "policies" / "notes.yaml").write_text(f"# revision {v}\n" * (1 + v % 5))
            commit(work, f"history {v}")
        git("push", "-q", daemon.url("policy"), "main", cwd=work)
        print("fetch depth ...", flush=True)
        depth = fetch_depth(daemon, work, tmp)
        print(json.dumps(depth, default=str)[:400], flush=True)
        print(f"fleet of {args.agents} ...", flush=True)
        fl = fleet(daemon, work, bare, tmp, args.agents, args.interval, args.commits)
        print(
            json.dumps(
                {k: v for k, v in fl.items() if k not in ("applied", "reported", "push_lag")}
            ),
            flush=True,
        )
        proto = protocol_cost(daemon, tmp)
        print(json.dumps(proto), flush=True)
        print(f"status branch, {args.status_cycles} cycles ...", flush=True)
        size = status_size(daemon, bare, tmp, args.status_cycles)
        print(json.dumps(size), flush=True)
        text = report(depth, fl, size, proto, args, args.history)
        print(text)
        if args.record:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "agent.md").write_text(text)
        return 0
    finally:
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
