"""A fleet of thousands of simulated cells against one real git server: what it costs.

Each simulated cell does what an agent does on the wire, with the product's own code:

* **sync**: `GitSource.fetch()` (reconciler/agent/source.py) into a bare cache of its own --
  the agent's fetch of `+refs/heads/<branch>:refs/remotes/origin/<branch>`, shallow on the
  first fetch, no tags -- every `interval` (plus the agent's 10 % jitter);
* **status**: `StatusWriter.push()` (reconciler/status/write.py) of a status document of the
  size an agent writes (20 containers, about 8 KiB) as a new root commit force-pushed to
  `status/<cell>`: after a fetch that saw a new head (the agent applies and reports), and
  every `heartbeat` otherwise; a failed push is retried with the agent's back-off
  (`agent.status.retry_wait`: base 2 s doubling to 60 s, stretched by up to half of itself at
  random, since 2026-12-06) and always with the latest document;

with no kernel dataplane: "applied" is the moment the fetch returned the new head.  Real
rates are compressed in time by `--compress C`: interval 60 s / C, heartbeat 600 s / C, so a
window of W wall seconds is C*W seconds of the real fleet, and the measured server CPU per
wall second is C times what the real fleet would pay.

The server is real and on this machine: `git daemon` on 127.0.0.1 (`git://`), or git's smart
HTTP backend (`git http-backend` as a CGI of lighttpd, the recipe of git-http-backend(1)).
Its CPU and memory are charged by a cgroup-v1 `cpuacct` / `memory` group the server is started
in, so every upload-pack / receive-pack / http-backend / `gc --auto` it forks is counted
(children included, whether or not reaped); without cgroups, /proc/<pid>/stat of the server
(its own and its reaped children's time).

Phases, per run:

1. **start**: every cell's first fetch and first status push, as fast as `--workers`
   concurrent agents can (a fleet (re)starting at once: the worst push storm).  With
   `--prefill` the status branches of the cells beyond `--active` are made on the server
   by `git fast-import` (one root commit each, as an agent would push), so a 10,000-ref
   repository can be measured without 10,000 simulated clients.
2. **probe**: `--probe` no-op fetches, then `--probe` heartbeat pushes, back to back through
   the worker pool: the server's CPU per operation at this ref count (the model's input),
   and what one fetch and one push are advertised (GIT_TRACE_PACKET of one of each).
3. **steady**: `--window` wall seconds of the compressed schedule: server CPU, latencies.
4. **commit**: a commit to the policy branch, then the schedule goes on until every active
   cell has fetched it (applied) and pushed its status (reported): the time to 99 %.  With
   `--notify-spread S` a push webhook (`listen-webhook`) makes every cell sync after the
   merge, each after a random share of S real seconds (0: the agent as it is, all at once).

The git side can be spread as docs/fleet.md describes: `--status-shards K` sends each cell's
status to one of K status repositories (a stable hash of its name; `--prefill` fills them the
same way), and `--mirrors M` has cell i fetch from mirror i mod M, kept by the shipped
deploy/mirrors scripts (`--mirror-sync hook`: the primary's post-receive; `poll`:
fetch-from-primary every `--mirror-poll` real seconds), all on the one server and charged to
its cgroup -- per operation, a mirror or a shard costs what it would on a host of its own.

Usage (as root, for the cgroups; lighttpd from Debian for `--server http`):

    apt-get install lighttpd        # only for --server http; not needed by make test
    python bench/fleet_sim.py --cells 1000 --server daemon --compress 2 --record
    python bench/fleet_sim.py --cells 10000 --active 1000 --prefill --server http --record
    python bench/fleet_sim.py --cells 10000 --active 200 --prefill --server-gc --compress 1 \
        --status-shards 10 --mirrors 4 --notify-spread 10 --record

`--record` appends the run as one JSON line to bench/results/fleet.jsonl and rewrites the
measured tables of bench/results/fleet.md (between its markers) from every line there.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import heapq
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.gitserver import GitDaemon, free_port, git, proc_cpu  # noqa: E402
from bench.common import RESULTS, machine, revision  # noqa: E402
from reconciler.agent.source import GitSource, SourceError  # noqa: E402
from reconciler.agent.status import retry_wait  # noqa: E402
from reconciler.status.branch import branch_for, shard_of  # noqa: E402
from reconciler.status.write import StatusPushError, StatusWriter, dump_status  # noqa: E402

INTERVAL = 60.0
"""The agent's default `interval` (config.py)."""
HEARTBEAT = 600.0
"""The agent's default `heartbeat` (config.py)."""
JITTER = 0.1
"""The agent's default sync jitter: the interval plus up to 10 % of it."""
RETRY_BASE, RETRY_CAP = 2.0, 60.0
"""The status pusher's back-off (agent/status.py StatusPusher defaults)."""
CONTAINERS = 20
JSONL = RESULTS / "fleet.jsonl"
MD = RESULTS / "fleet.md"
BEGIN, END = "<!-- fleet_sim:begin -->", "<!-- fleet_sim:end -->"


# -- the server ------------------------------------------------------------------------------


class Cgroup:
    """A cgroup-v1 cpuacct + memory group the server runs in (None parts when unavailable)."""

    def __init__(self, name: str) -> None:
        self.cpu = Path("/sys/fs/cgroup/cpuacct") / name
        self.mem = Path("/sys/fs/cgroup/memory") / name
        self.ok = True
        for d in (self.cpu, self.mem):
            try:
                d.mkdir(exist_ok=True)
            except OSError:
                self.ok = False

    def add(self, pid: int) -> None:
        if self.ok:
            for d in (self.cpu, self.mem):
                (d / "cgroup.procs").write_text(str(pid))

    def cpu_seconds(self) -> float | None:
        if not self.ok:
            return None
        return int((self.cpu / "cpuacct.usage").read_text()) / 1e9

    def reset_peak(self) -> None:
        if self.ok:
            with contextlib.suppress(OSError):
                (self.mem / "memory.max_usage_in_bytes").write_text("0")

    def peak_mib(self) -> float | None:
        """Peak memory charged to the group (its processes' pages and the page cache of
        the files they wrote) since `reset_peak`."""
        if not self.ok:
            return None
        return int((self.mem / "memory.max_usage_in_bytes").read_text()) / 2**20

    def rss_mib(self) -> float | None:
        if not self.ok:
            return None
        stat = dict(line.split() for line in (self.mem / "memory.stat").read_text().splitlines())
        return int(stat.get("total_rss", stat.get("rss", "0"))) / 2**20

    def remove(self) -> None:
        for d in (self.cpu, self.mem):
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.2)
                d.rmdir()


class Server:
    """The git server under test: `daemon` (git daemon) or `http` (lighttpd + http-backend)."""

    def __init__(self, kind: str, base: Path, cgroup: Cgroup) -> None:
        self.kind = kind
        self.base = base
        self.cgroup = cgroup
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon: GitDaemon | None = None
        self.port = free_port()

    def url(self, name: str) -> str:
        if self.kind == "daemon":
            return f"git://127.0.0.1:{self.port}/{name}.git"
        return f"http://127.0.0.1:{self.port}/git/{name}.git"

    def start(self) -> None:
        if self.kind == "daemon":
            self.daemon = GitDaemon(self.base, self.port).start()
            assert self.daemon.proc is not None
            self.cgroup.add(self.daemon.proc.pid)
            return
        backend = Path(git("--exec-path")) / "git-http-backend"
        conf = self.base / "lighttpd.conf"
        conf.write_text(
            f"""server.document-root = "{self.base}"
server.bind = "127.0.0.1"
server.port = {self.port}
server.errorlog = "{self.base}/lighttpd.err"
server.max-connections = 4096
server.max-fds = 16384
server.modules = ("mod_alias", "mod_cgi", "mod_setenv")
alias.url = ("/git" => "{backend}")
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ("" => "")
  setenv.set-environment = (
    "GIT_PROJECT_ROOT" => "{self.base}",
    "GIT_HTTP_EXPORT_ALL" => "",
    "GIT_CONFIG_NOSYSTEM" => "1",
    "GIT_CONFIG_GLOBAL" => "/dev/null",
    "PATH" => "/usr/bin:/bin"
  )
}}
"""
        )
        self.proc = subprocess.Popen(
            ["lighttpd", "-D", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "lighttpd.out", "ab"),  # noqa: SIM115 - the child keeps it
            start_new_session=True,
        )
        self.cgroup.add(self.proc.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lighttpd exited: {(self.base / 'lighttpd.out').read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("lighttpd did not listen")

    def create(self, name: str) -> Path:
        path = self.base / f"{name}.git"
        git("init", "--quiet", "--bare", "-b", "main", "--", str(path))
        git("-C", str(path), "config", "http.receivepack", "true")
        return path

    def cpu_seconds(self) -> float:
        got = self.cgroup.cpu_seconds()
        if got is not None:
            return got
        if self.daemon is not None:
            return self.daemon.cpu_seconds()
        return proc_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


# -- what a cell sends -----------------------------------------------------------------------


def status_text(cell: str, revision_sha: str, seq: int) -> str:
    """A status document with the fields and the size of the agent's (build_status in
    agent/status.py; 20 containers, two groups each), for revision `revision_sha`."""
    rng = random.Random(f"{cell}/{seq}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    containers = [
        {
            "handle": f"{cell}-c{i:03d}-{rng.getrandbits(64):016x}",
            "ip": f"198.18.{i // 250}.{i % 250 + 2}",
            "app_id": f"app-{rng.getrandbits(48):012x}",
            "space_id": f"space-{i % 10}",
            "org_id": "org-acme",
            "workload": "app",
            "chain": f"asg-{rng.getrandbits(40):010x}",
            "groups": ["public_networks", f"sg-{i % 21:02d}"],
            "sources": ["running_default", "space_running"],
        }
        for i in range(CONTAINERS)
    ]
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Applied",
        "message": "applied",
    }
    doc = {
        "apiVersion": "asgctl.io/v1alpha1",
        "kind": "CellStatus",
        "cell": cell,
        "reportedAt": now,
        "agent": {"version": "sim", "backend": "iptables", "pid": 1},
        "source": {"url": "git://policy", "branch": "main", "path": "."},
        "observedRevision": revision_sha,
        "lastAttemptedRevision": revision_sha,
        "lastAppliedRevision": revision_sha,
        "lastAppliedDigest": f"sha256:{rng.getrandbits(256):064x}",
        "lastAppliedTime": now,
        "lastSyncTime": now,
        "lastSuccessTime": now,
        "conditions": [ready, {**ready, "type": "Synced"}, {**ready, "type": "Enforcing"}],
        "timings": {"fetch": 0.02, "load": 0.05, "compile": 0.01, "apply": 0.03},
        "counts": {"containers": CONTAINERS, "groups": 21, "chains": CONTAINERS},
        "drift": {"corrections": 0, "recent": []},
        "inventory": {"path": "/var/vcap/data/container-metadata/store.json",
                      "containers": CONTAINERS, "updatedAt": now, "error": "", "rejected": []},
        "containers": containers,
        "history": [{"revision": revision_sha, "at": now, "result": "applied"}],
    }  # fmt: skip
    return dump_status(doc)


@dataclass
class Cell:
    name: str
    source: GitSource
    writer: StatusWriter
    head: str | None = None
    reported: str | None = None
    push_failures: int = 0
    seq: int = 0
    busy: bool = False


@dataclass
class Op:
    kind: str  # fetch | push
    due: float
    start: float
    end: float
    ok: bool
    error: str = ""
    phase: str = ""


@dataclass
class Stats:
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def classify_error(text: str) -> str:
    t = text.lower()
    for key, kind in (
        ("cannot lock ref", "ref lock"),
        ("unable to create", "ref lock"),
        ("lock", "ref lock"),
        ("too many children", "daemon max-connections"),
        ("remote end hung up", "connection dropped"),
        ("connection reset", "connection reset"),
        ("connection refused", "refused"),
        ("timed out", "timeout"),
        ("no answer within", "timeout"),
        ("returned error: 5", "http 5xx"),
    ):
        if key in t:
            return kind
    return "other"


def status_repo(args: argparse.Namespace, cell: str) -> str:
    """The server repository `cell`'s status branch lives in: the policy repository, or
    with `--status-shards K` one of K status repositories."""
    return f"status-{shard_of(cell, args.status_shards):02d}" if args.status_shards else "policy"


def status_url(server: Server, args: argparse.Namespace, cell: str) -> str:
    return server.url(status_repo(args, cell))


def fetch_url(server: Server, args: argparse.Namespace, i: int) -> str:
    """What cell `i` fetches the policy from: the primary, or with `--mirrors M` mirror
    i mod M (a URL per cell group, as docs/fleet.md has operators configure it)."""
    return server.url(f"mirror-{i % args.mirrors}" if args.mirrors else "policy")


# -- the simulation --------------------------------------------------------------------------


class Fleet:
    def __init__(self, args: argparse.Namespace, server: Server, work: Path, url: str) -> None:
        self.args = args
        self.server = server
        self.url = url
        self.stats = Stats()
        self.compress = args.compress
        self.interval = INTERVAL / args.compress
        self.heartbeat = HEARTBEAT / args.compress
        self.cells = [
            Cell(
                name,
                GitSource(
                    fetch_url(server, args, i),
                    "main",
                    work / f"c{i}" / "cache",
                    timeout=120,
                ),
                StatusWriter(
                    status_url(server, args, name),
                    branch_for(name),
                    work / f"c{i}" / "status",
                    120,
                ),
            )
            for i in range(args.active)
            for name in [f"cell-{i:05d}"]
        ]
        self.pool = ThreadPoolExecutor(max_workers=args.workers)
        self.retries = 0
        self.rng = random.Random(7)

    # one operation each, on a worker thread

    def fetch(self, cell: Cell, due: float, phase: str) -> bool:
        """The agent's sync: True when the fetch saw a head the cell has not applied."""
        t0 = time.monotonic()
        try:
            got = cell.source.fetch()
            self.stats.add(Op("fetch", due, t0, time.monotonic(), True, phase=phase))
        except SourceError as exc:
            self.stats.add(Op("fetch", due, t0, time.monotonic(), False, exc.message, phase))
            return False
        changed = got.sha != cell.head
        cell.head = got.sha
        return changed

    def push(self, cell: Cell, due: float, phase: str) -> bool:
        t0 = time.monotonic()
        cell.seq += 1
        head = cell.head or ""
        try:
            cell.writer.push(status_text(cell.name, head, cell.seq), f"status {cell.name}")
        except (StatusPushError, OSError) as exc:
            cell.push_failures += 1
            self.stats.add(Op("push", due, t0, time.monotonic(), False, str(exc), phase))
            return False
        cell.push_failures = 0
        cell.reported = head
        self.stats.add(Op("push", due, t0, time.monotonic(), True, phase=phase))
        return True

    def burst(self, jobs: list[Callable[[], object]]) -> float:
        """Run `jobs` through the pool as fast as it goes; the wall time."""
        t0 = time.monotonic()
        for f in [self.pool.submit(j) for j in jobs]:
            f.result()
        return time.monotonic() - t0

    def start_all(self) -> float:
        def one(cell: Cell) -> None:
            now = time.monotonic()
            self.fetch(cell, now, "start")
            while not self.push(cell, time.monotonic(), "start"):
                self.retries += 1
                time.sleep(
                    retry_wait(cell.push_failures, RETRY_BASE, RETRY_CAP, random.random())
                    / self.compress
                )

        return self.burst([lambda c=c: one(c) for c in self.cells])

    def probe(self, count: int) -> dict[str, float]:
        """Server CPU per no-op fetch and per heartbeat push at this ref count."""
        out: dict[str, float] = {}
        sample = [self.cells[i % len(self.cells)] for i in range(count)]
        for kind in ("fetch", "push"):
            cpu0 = self.server.cpu_seconds()
            now = time.monotonic()
            if kind == "fetch":
                wall = self.burst([lambda c=c, t=now: self.fetch(c, t, "probe") for c in sample])
            else:
                wall = self.burst([lambda c=c, t=now: self.push(c, t, "probe") for c in sample])
            out[f"{kind}_cpu_ms"] = (self.server.cpu_seconds() - cpu0) / count * 1000
            out[f"{kind}_wall_s"] = wall
        return out

    def schedule(self, seconds: float, phase: str, commit_at: float | None = None) -> dict:
        """Run the compressed agent schedule for `seconds` of wall time (or, with
        `commit_at`, until every cell has reported the new head, at most `seconds`)."""
        now = time.monotonic()
        heap: list[tuple[float, int, str]] = []
        for i, _cell in enumerate(self.cells):
            heapq.heappush(heap, (now + self.rng.uniform(0, self.interval), i, "fetch"))
            heapq.heappush(heap, (now + self.rng.uniform(0, self.heartbeat), i, "push"))
            if commit_at is not None and self.args.notify_spread is not None:
                # A push webhook (`listen-webhook`): every agent syncs at once, each after a
                # random share of `--notify-spread` real seconds (0: all at the same moment).
                spread = self.args.notify_spread / self.compress
                heapq.heappush(heap, (commit_at + self.rng.uniform(0, spread), i, "notify"))
        end = now + seconds
        pending: set[Future[None]] = set()
        applied: dict[int, float] = {}
        reported: dict[int, float] = {}
        target = self.args.target_head
        lock = threading.Lock()
        next_heartbeat: dict[int, float] = {}

        def sync(i: int, due: float) -> None:
            cell = self.cells[i]
            changed = self.fetch(cell, due, phase)
            if commit_at is not None and cell.head == target and i not in applied:
                with lock:
                    applied[i] = time.monotonic()
            if changed or cell.reported != cell.head:
                report(i, time.monotonic())

        def report(i: int, due: float) -> None:
            cell = self.cells[i]
            while not self.push(cell, due, phase):
                self.retries += 1
                time.sleep(
                    retry_wait(cell.push_failures, RETRY_BASE, RETRY_CAP, random.random())
                    / self.compress
                )
            if commit_at is not None and cell.reported == target and i not in reported:
                with lock:
                    reported[i] = time.monotonic()
            next_heartbeat[i] = time.monotonic() + self.heartbeat

        def run(i: int, kind: str, due: float) -> None:
            cell = self.cells[i]
            try:
                if kind in ("fetch", "notify"):
                    sync(i, due)
                elif time.monotonic() >= next_heartbeat.get(i, 0.0):
                    report(i, due)
            finally:
                cell.busy = False

        lag: list[float] = []
        while True:
            t = time.monotonic()
            if t >= end:
                break
            if commit_at is not None and len(reported) == len(self.cells):
                break
            due, i, kind = heap[0]
            if due > t:
                time.sleep(min(due - t, 0.05))
                continue
            heapq.heappop(heap)
            period = self.interval * (1 + JITTER * self.rng.random())
            if kind != "notify":  # a webhook sync is one-off; the timer goes on as it was
                heapq.heappush(
                    heap,
                    (due + (period if kind == "fetch" else self.heartbeat), i, kind),
                )
            cell = self.cells[i]
            if cell.busy:  # the agent is still in its previous cycle
                if kind == "notify":  # a coalesced webhook sync runs when the cycle ends
                    heapq.heappush(heap, (t + 0.05, i, kind))
                continue
            cell.busy = True
            lag.append(t - due)
            pending.add(self.pool.submit(run, i, kind, due))
            pending = {f for f in pending if not f.done()}
        for f in pending:
            f.result()
        out: dict[str, Any] = {"scheduler_lag_p99_s": pct(lag, 99)}
        if commit_at is not None:
            a = [v - commit_at for v in applied.values()]
            r = [v - commit_at for v in reported.values()]
            n = len(self.cells)
            out.update(
                applied=len(a),
                reported=len(r),
                applied_p99_s=pct(a, 99) if len(a) >= 0.99 * n else float("inf"),
                reported_p99_s=pct(r, 99) if len(r) >= 0.99 * n else float("inf"),
                applied_p50_s=pct(a, 50),
                reported_p50_s=pct(r, 50),
            )
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def prefill(bare: Path, names: list[str]) -> float:
    """Status branches `status/<name>` on the server, each one root commit holding a
    status.yaml (what the agent would have pushed), via one `git fast-import`."""
    t0 = time.monotonic()
    lines: list[bytes] = []
    for name in names:
        data = status_text(name, "0" * 40, 0).encode()
        msg = f"status {name}".encode()
        lines += [
            f"commit refs/heads/{branch_for(name)}\n".encode(),
            f"committer asgctl agent {name} <{name}@asgctl.invalid> 1700000000 +0000\n".encode(),
            f"data {len(msg)}\n".encode() + msg + b"\n",
            f"M 100644 inline status.yaml\ndata {len(data)}\n".encode() + data + b"\n",
        ]
    subprocess.run(
        ["git", "-C", str(bare), "fast-import", "--quiet"],
        input=b"".join(lines),
        check=True,
        env={
            **os.environ,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
        },
    )
    return time.monotonic() - t0


def advertised(url: str, cell: Cell) -> dict[str, int]:
    """How many refs the server advertises to one agent fetch and to one status push, and
    the protocol version each spoke (GIT_TRACE_PACKET of the product's own calls)."""
    out: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        os.environ["GIT_TRACE_PACKET"] = str(trace)
        try:
            cell.source.fetch()
            text = trace.read_text(errors="replace") if trace.exists() else ""
            trace.unlink(missing_ok=True)
            cell.writer.push(status_text(cell.name, cell.head or "", 999), "probe")
            ptext = trace.read_text(errors="replace") if trace.exists() else ""
        finally:
            del os.environ["GIT_TRACE_PACKET"]
    oid_ref = re.compile(r"< [0-9a-f]{40}[ \t](refs/[^\s\x00]+)")

    def refs(trace_text: str) -> int:
        # A ref line can be traced twice (git and its remote helper): count names.
        return len({m.group(1) for m in oid_ref.finditer(trace_text)})

    out["fetch_refs_advertised"] = refs(text)
    out["fetch_protocol_v2"] = int("version 2" in text)
    out["fetch_ref_prefix_sent"] = int("> ref-prefix" in text)
    out["push_refs_advertised"] = refs(ptext)
    out["push_protocol_v2"] = int("version 2" in ptext)
    return out


def summarize(stats: Stats, phase: str, kind: str) -> dict[str, Any]:
    ops = [o for o in stats.ops if o.phase == phase and o.kind == kind]
    ok = [o for o in ops if o.ok]
    errors: dict[str, int] = {}
    for o in ops:
        if not o.ok:
            label = classify_error(o.error)
            errors[label] = errors.get(label, 0) + 1
    service = [o.end - o.start for o in ok]
    return {
        "count": len(ops),
        "failed": len(ops) - len(ok),
        "errors": errors,
        "error_sample": next((o.error[:300] for o in ops if not o.ok), ""),
        "p50_s": pct(service, 50),
        "p99_s": pct(service, 99),
        "max_s": max(service, default=float("nan")),
    }


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


@contextlib.contextmanager
def measured(server: Server) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    server.cgroup.reset_peak()
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    yield out
    out["wall_s"] = time.monotonic() - t0
    out["server_cpu_s"] = server.cpu_seconds() - cpu0
    peak = server.cgroup.peak_mib()
    if peak is not None:
        out["server_mem_peak_mib"] = peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fleetsim-"))
    cgroup = Cgroup(f"fleetsim-{os.getpid()}")
    server = Server(args.server, work / "srv", cgroup)
    result: dict[str, Any] = {
        "server": args.server,
        "cells": args.cells,
        "active": args.active,
        "compress": args.compress,
        "workers": args.workers,
        "revision": revision(),
        "machine": machine(),
        "git": git("--version"),
        "cgroup_accounting": cgroup.ok,
        "load_before": loadavg(),
        "server_gc": args.server_gc,
        "server_pack_refs": args.server_pack_refs,
        "client_config": args.client_config,
        "status_shards": args.status_shards,
        "mirrors": args.mirrors,
        "mirror_sync": args.mirror_sync if args.mirrors else "",
        "mirror_poll": args.mirror_poll if args.mirrors and args.mirror_sync == "poll" else None,
        "notify_spread": args.notify_spread,
    }
    try:
        server.base.mkdir(parents=True)
        bare = server.create("policy")
        tree = work / "policy-work"
        git("init", "-q", "-b", "main", str(tree))
        for i in range(21):
            (tree / f"sg-{i:02d}.yml").write_text(
                f"kind: SecurityGroup\nname: sg-{i:02d}\nrules:\n"
                + "".join(
                    f"  - {{protocol: tcp, destination: 198.19.{i}.{r + 1}, ports: '{1000 + r}'}}\n"
                    for r in range(20)
                )
            )
        git("-C", str(tree), "add", "-A")
        git("-C", str(tree), "commit", "-q", "-m", "policies")
        git("-C", str(tree), "push", "-q", str(bare), "main")
        status_repos = {"policy": bare}
        for k in range(args.status_shards):
            status_repos[f"status-{k:02d}"] = server.create(f"status-{k:02d}")
        if args.status_shards:
            del status_repos["policy"]
        mirrors = [server.create(f"mirror-{j}") for j in range(args.mirrors)]
        for m in mirrors:
            git("-C", str(tree), "push", "-q", str(m), "main")
        if args.prefill and args.cells > args.active:
            by_repo: dict[str, list[str]] = {}
            for i in range(args.active, args.cells):
                name = f"cell-{i:05d}"
                by_repo.setdefault(status_repo(args, name), []).append(name)
            result["prefill_s"] = sum(prefill(status_repos[k], v) for k, v in by_repo.items())
        server.start()
        url = server.url("policy")
        poller = start_mirrors(args, server, bare, mirrors)
        fleet = Fleet(args, server, work / "cells", url)
        try:
            with measured(server) as m:
                fleet.start_all()
            result["start"] = {
                **m,
                "fetch": summarize(fleet.stats, "start", "fetch"),
                "push": summarize(fleet.stats, "start", "push"),
                "retries": fleet.retries,
            }
            if args.server_gc:
                t0 = time.monotonic()
                for repo in {bare, *status_repos.values(), *mirrors}:
                    git("-C", str(repo), "gc", "--quiet")  # packs refs, objects, commit-graph
                result["server_gc_s"] = time.monotonic() - t0
            elif args.server_pack_refs:
                t0 = time.monotonic()
                for repo in {bare, *status_repos.values(), *mirrors}:
                    git("-C", str(repo), "pack-refs", "--all", "--prune")  # refs only
                result["server_gc_s"] = time.monotonic() - t0
            result["refs"] = count_refs(bare)
            per_repo = [count_refs(r) for r in status_repos.values()]
            result["status_repos"] = len(per_repo)
            result["push_repo_refs"] = round(sum(per_repo) / len(per_repo))
            result["push_repo_refs_max"] = max(per_repo)
            result["advertised"] = advertised(url, fleet.cells[0])
            with measured(server) as m:
                m.update(fleet.probe(args.probe))
            result["probe"] = {
                **m,
                "fetch": summarize(fleet.stats, "probe", "fetch"),
                "push": summarize(fleet.stats, "probe", "push"),
            }
            fleet.retries = 0
            with measured(server) as m:
                m.update(fleet.schedule(args.window, "steady"))
            ops = [o for o in fleet.stats.ops if o.phase == "steady"]
            result["steady"] = {
                **m,
                "fetch": summarize(fleet.stats, "steady", "fetch"),
                "push": summarize(fleet.stats, "steady", "push"),
                "retries": fleet.retries,
                "fetches_per_s": sum(1 for o in ops if o.kind == "fetch") / m["wall_s"],
                "pushes_per_s": sum(1 for o in ops if o.kind == "push") / m["wall_s"],
                "server_cores": m["server_cpu_s"] / m["wall_s"],
                "server_cores_real_rate": m["server_cpu_s"] / m["wall_s"] / args.compress,
            }
            sha = commit_policy(tree, url)
            t_commit = time.monotonic()
            # The mirrors' lag is watched while the cells go on (a lagging mirror serves them
            # the old head meanwhile), and counts in their time-to-effect.
            lag: list[float | None] = []
            watcher = threading.Thread(target=lambda: lag.append(mirror_lag(mirrors, sha)))
            watcher.start()
            args.target_head = sha
            fleet.retries = 0
            with measured(server) as m:
                m.update(fleet.schedule(4 * fleet.interval, "commit", commit_at=t_commit))
            watcher.join()
            result["mirror_lag_s"] = lag[0] * args.compress if lag[0] is not None else None
            for k in (
                "applied_p99_s",
                "reported_p99_s",
                "applied_p50_s",
                "reported_p50_s",
            ):
                m[k.replace("_s", "_real_s")] = m[k] * args.compress
            result["commit"] = {
                **m,
                "fetch": summarize(fleet.stats, "commit", "fetch"),
                "push": summarize(fleet.stats, "commit", "push"),
                "retries": fleet.retries,
                "unreported": sum(1 for c in fleet.cells if c.reported != sha),
            }
            repos = list(status_repos.values())
            result["server_repo"] = {
                "loose_refs": sum(
                    sum(1 for _ in (r / "refs" / "heads" / "status").glob("*")) for r in repos
                ),
                "packed_refs_lines": sum(
                    (r / "packed-refs").read_text().count("\n")
                    for r in repos
                    if (r / "packed-refs").exists()
                ),
                "size_mib": sum(
                    p.stat().st_size for r in repos for p in r.rglob("*") if p.is_file()
                )
                / 2**20,
            }
        finally:
            fleet.close()
            if poller is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(poller.pid, signal.SIGKILL)
                poller.wait()
        result["load_after"] = loadavg()
    finally:
        server.stop()
        cgroup.remove()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def commit_policy(tree: Path, url: str) -> str:
    """A merged change: one more rule in one group, pushed to main through the server (as
    the forge's merge would be), so the primary's hooks run in the server's cgroup."""
    path = tree / "sg-00.yml"
    path.write_text(
        path.read_text() + "  - {protocol: tcp, destination: 198.19.200.1, ports: '443'}\n"
    )
    git("-C", str(tree), "commit", "-q", "-am", "one more rule")
    git("-C", str(tree), "push", "-q", url, "main")
    return git("-C", str(tree), "rev-parse", "HEAD")


def count_refs(repo: Path) -> int:
    return git("-C", str(repo), "for-each-ref", "--count=1000000", "--format=x").count("x")


MIRROR_HOOK = ROOT / "deploy" / "mirrors" / "post-receive"
MIRROR_FETCH = ROOT / "deploy" / "mirrors" / "fetch-from-primary"


def start_mirrors(
    args: argparse.Namespace, server: Server, bare: Path, mirrors: list[Path]
) -> subprocess.Popen[bytes] | None:
    """Keep the mirrors fresh the way docs/fleet.md says: `hook` installs the shipped
    post-receive hook in the primary (a push returns once every mirror has it); `poll` runs
    the shipped fetch-from-primary for every mirror every `--mirror-poll` real seconds, in
    the server's cgroup (its CPU is the mirrors' to pay).  The poller, if any, is returned."""
    if not mirrors:
        return None
    if args.mirror_sync == "hook":
        shutil.copy(MIRROR_HOOK, bare / "hooks" / "post-receive")
        for j in range(len(mirrors)):
            git(
                "-C",
                str(bare),
                "config",
                "--add",
                "asgctl.mirror",
                server.url(f"mirror-{j}"),
            )
        return None
    period = args.mirror_poll / args.compress
    fetches = "; ".join(f"'{MIRROR_FETCH}' '{m}' '{server.url('policy')}'" for m in mirrors)
    proc = subprocess.Popen(
        ["sh", "-c", f"while :; do {fetches}; sleep {period:.3f}; done"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
        },
        start_new_session=True,
    )
    server.cgroup.add(proc.pid)
    return proc


def mirror_lag(mirrors: list[Path], sha: str, limit: float = 600.0) -> float | None:
    """Wall seconds from the primary's push returning until every mirror serves `sha`
    (about 0 with the hook, by construction); None without mirrors.  (The record keeps it
    in real seconds: times the compression.)"""
    if not mirrors:
        return None
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if all(git("-C", str(m), "rev-parse", "main") == sha for m in mirrors):
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


# -- the report ------------------------------------------------------------------------------


def fmt(x: float, digits: int = 1) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "--" if math.isnan(x) else "not reached"
    return f"{x:,.{digits}f}"


def series(r: dict[str, Any]) -> str:
    """A run's series, the unit the model is fitted on: the server, whether its repositories
    were maintained (`git gc`) or packed themselves during the run (`gc --auto` after ~6,700
    loose objects), and the git config the cells ran with, if any."""
    out = r["server"] + (" +gc" if r.get("server_gc") else "")
    if r.get("server_pack_refs"):
        return out + " +pack-refs"  # refs packed once after the start, objects loose
    if not r.get("server_gc") and r.get("server_repo", {}).get("packed_refs_lines"):
        # receive.autogc packed the repository during the run: a state between the two
        out += " (gc --auto ran)"
    return out + (f" [{r['client_config']}]" if r.get("client_config") else "")


def topology(r: dict[str, Any]) -> str:
    """Where status and fetches went, and how a merge reached the agents: "" for one
    repository, every agent on it, no webhook (the runs before shards and mirrors)."""
    parts = []
    if r.get("status_shards"):
        parts.append(f"{r['status_shards']} status repos")
    if r.get("mirrors"):
        sync = r.get("mirror_sync") or "hook"
        if sync == "poll":
            sync = f"poll {r.get('mirror_poll') or 0:g} s"
        parts.append(f"{r['mirrors']} mirrors ({sync})")
    if r.get("notify_spread") is not None:
        parts.append(f"webhook, spread {r['notify_spread']:g} s")
    return ", ".join(parts)


def label(r: dict[str, Any]) -> str:
    """A run as the tables show it: its series and, if any, its topology."""
    top = topology(r)
    return series(r) + (f" · {top}" if top else "")


def single_repo(r: dict[str, Any]) -> bool:
    """Status in the policy repository and every agent fetching from it (the model's fit)."""
    return not r.get("status_shards") and not r.get("mirrors")


def push_refs(r: dict[str, Any]) -> int:
    """Refs in the repository a status push goes to (the policy one, or a status shard)."""
    return int(r.get("push_repo_refs", r["refs"]))


def refs_shown(r: dict[str, Any]) -> str:
    if r.get("status_shards"):
        return f"{r['refs']:,} / {push_refs(r):,} x {r['status_shards']}"
    return f"{r['refs']:,}"


def tables(rows: list[dict[str, Any]]) -> str:
    """The measured points, one line per run (from bench/results/fleet.jsonl)."""
    out = [
        "### Per operation at each ref count (probe phase)",
        "",
        "| server | refs (policy / per status repo) | fetch: refs advertised (v2) | push: refs "
        "advertised | server CPU "
        "ms / no-op fetch | server CPU ms / push | fetch p50 / p99 s | push p50 / p99 s | "
        "failed | revision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, a = r["probe"], r["advertised"]
        out.append(
            f"| {label(r)} | {refs_shown(r)} | {a['fetch_refs_advertised']} "
            f"({'v2' if a['fetch_protocol_v2'] else 'v0'}) | {a['push_refs_advertised']:,} | "
            f"{fmt(p['fetch_cpu_ms'], 2)} | {fmt(p['push_cpu_ms'], 2)} | "
            f"{fmt(p['fetch']['p50_s'], 3)} / {fmt(p['fetch']['p99_s'], 3)} | "
            f"{fmt(p['push']['p50_s'], 3)} / {fmt(p['push']['p99_s'], 3)} | "
            f"{p['fetch']['failed'] + p['push']['failed']} | {r['revision']} |"
        )
    out += [
        "",
        "### Fleet start, steady state and a merged commit",
        "",
        "| server | cells (active) | compress | start: wall s, server CPU s, failed pushes "
        "(retried) | steady: fetch/s, push/s | steady server cores (at real rate) | steady "
        "fetch p99 s | commit: applied / reported p99, real s | unreported | server peak MiB |"
        " load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, st, c = r["start"], r["steady"], r["commit"]
        out.append(
            f"| {label(r)} | {r['cells']:,} ({r['active']:,}) | {r['compress']:g} | "
            f"{fmt(s['wall_s'])}, {fmt(s['server_cpu_s'])}, {s['push']['failed']} "
            f"({s['retries']}) | {fmt(st['fetches_per_s'])}, {fmt(st['pushes_per_s'])} | "
            f"{fmt(st['server_cores'], 2)} ({fmt(st['server_cores_real_rate'], 3)}) | "
            f"{fmt(st['fetch']['p99_s'], 3)} | {fmt(c['applied_p99_real_s'])} / "
            f"{fmt(c['reported_p99_real_s'])} | {c['unreported']} | "
            f"{fmt(max(s.get('server_mem_peak_mib', 0), st.get('server_mem_peak_mib', 0)), 0)} |"
            f" {r['load_before']} / {r['load_after']} |"
        )
    errs = [
        f"- {label(r)} {r['cells']:,}: {phase} {kind}: {r[phase][kind]['errors']} "
        f"(`{r[phase][kind]['error_sample']}`)"
        for r in rows
        for phase in ("start", "probe", "steady", "commit")
        for kind in ("fetch", "push")
        if r[phase][kind]["failed"]
    ]
    out += ["", "### Failures", ""] + (errs or ["none"])
    pinned = [r for r in rows if r.get("client_config")]
    if pinned:
        out += [
            "",
            "### The cells' git configured otherwise (before / after a product change)",
            "",
            "| server | refs | cells' git config | revision | fetch: protocol, refs advertised "
            "| server CPU ms / no-op fetch | steady server cores |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in pinned:
            a = r["advertised"]
            out.append(
                f"| {r['server']} | {r['refs']:,} | `{r['client_config']}` | {r['revision']} | "
                f"{'v2' if a['fetch_protocol_v2'] else 'v0'}, {a['fetch_refs_advertised']:,} | "
                f"{fmt(r['probe']['fetch_cpu_ms'], 2)} | {fmt(r['steady']['server_cores'], 3)} |"
            )
    return "\n".join(out)


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares `y = a + b x` through `points` (x: refs, y: ms); (a, b)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


Costs = dict[str, tuple[float, float]]


def at(line: tuple[float, float], refs: float) -> float:
    """A fitted `a + b x refs`, in ms."""
    return line[0] + line[1] * refs


def pack_ms(r: dict[str, Any], costs: Costs) -> float:
    """Server CPU of one pack-building fetch (a cell fetching a merged commit), from a run's
    commit phase: its CPU less its pushes and no-op fetches at the fitted costs, per cell."""
    c = r["commit"]
    noop = c["fetch"]["count"] - r["active"]
    rest = c["server_cpu_s"] * 1000 - c["push"]["count"] * at(costs["push"], push_refs(r))
    return max(0.0, (rest - noop * at(costs["fetch"], r["refs"])) / r["active"])


def fit_costs(rows: list[dict[str, Any]]) -> dict[str, Costs]:
    """Per series, on the probe points of the runs with one repository: server CPU per
    no-op fetch and per status push as lines in the refs of the repository served."""
    fits: dict[str, Costs] = {}
    fitted = [r for r in rows if single_repo(r) and not r.get("client_config")]
    for name in sorted({series(r) for r in fitted}):
        mine = [r for r in fitted if series(r) == name]
        if len({r["refs"] for r in mine}) < 2 or "gc --auto" in name:
            continue  # one point fits no line; a repository that changed state mid-run, none
        fits[name] = {
            "fetch": fit([(r["refs"], r["probe"]["fetch_cpu_ms"]) for r in mine]),
            "push": fit([(push_refs(r), r["probe"]["push_cpu_ms"]) for r in mine]),
        }
        packs = sorted(pack_ms(r, fits[name]) for r in mine if r["refs"] >= 5000)
        fits[name]["pack"] = (packs[len(packs) // 2] if packs else 0.0, 0.0)
    return fits


def models_for(r: dict[str, Any], fits: dict[str, Costs]) -> list[str]:
    """The fits a run is checked against: its own series', else (a repository that packed
    itself mid-run) the unmaintained and the maintained fit of its server, which bound it."""
    if series(r) in fits:
        return [series(r)]
    if r["server"] in fits:
        return [r["server"]] + ([f"{r['server']} +gc"] if f"{r['server']} +gc" in fits else [])
    return []


def err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas * 100:+.0f} %" if meas else "--"


@dataclass(frozen=True)
class Fleet10k:
    """A topology at fleet scale: N cells over K status repositories and M mirrors (M = 0:
    every agent on the primary), each on a host of its own."""

    cells: int
    shards: int
    mirrors: int

    def name(self) -> str:
        status = f"{self.shards} status repos" if self.shards > 1 else "status in the policy repo"
        return f"{status}, " + (f"{self.mirrors} mirrors" if self.mirrors else "no mirror")


def fleet_costs(f: Fleet10k, costs: Costs) -> dict[str, float]:
    """The model at fleet scale (real rates): steady cores of the fetch tier and of the status
    tier, per host, and the server CPU of one merged commit in each tier."""
    n, k, m = f.cells, max(1, f.shards), max(1, f.mirrors)
    policy_refs = 1 if f.shards > 1 else n + 1
    per_repo = n / k + (1 if f.shards <= 1 else 0)
    fetch = n / INTERVAL * at(costs["fetch"], policy_refs) / 1000
    push = n / HEARTBEAT * at(costs["push"], per_repo) / 1000
    merge_fetch = n * at(costs["pack"], 0) / 1000
    merge_push = n * at(costs["push"], per_repo) / 1000
    one_host = f.shards <= 1 and not f.mirrors
    return {
        "fetch_cores": fetch,
        "push_cores": push,
        "fetch_per_host": fetch / m,
        "push_per_host": push / k,
        "steady_max_host": fetch + push if one_host else max(fetch / m, push / k),
        "merge_fetch_s": merge_fetch,
        "merge_push_s": merge_push,
        "merge_max_host_s": merge_fetch + merge_push
        if one_host
        else max(merge_fetch / m, merge_push / k),
    }


PICKUP_P99 = 0.99 * (1 + JITTER / 2)
"""The 99th percentile of the wait from a merge to a cell's next timed sync, in intervals:
the sync period is interval x (1 + jitter x U), so the wait is about uniform on
[0, 1.05 interval]."""


def tte_model(
    window: float, cpu_s: float, cores: float, fetch_s: float, push_s: float
) -> tuple[float, float]:
    """Merge -> 99 % applied / reported (s): the cells' pickups spread over `window` (the
    interval's jittered timer, or a webhook's spread), unless the merge's server CPU on the
    busiest host needs longer on its `cores`; plus a fetch and a push."""
    drain = max(window, cpu_s / cores)
    applied = 0.99 * drain + fetch_s
    return applied, applied + push_s


def model(rows: list[dict[str, Any]]) -> str:
    """The cost model, fitted per server on the probe points, checked on the steady windows
    and on the runs it was not fitted on, and extrapolated to the issue's fleet sizes.

    server CPU per no-op fetch = a_f + b_f * refs of the repository fetched, per status push
    = a_p + b_p * refs of the repository pushed to (the policy one, or a status shard);
    steady cores = fetches/s * fetch + pushes/s * push (pushes: the heartbeat's N / 600 s);
    a merged commit adds N fetches that build a pack (their measured cost in the commit
    phase) and N status pushes.
    """
    out = [
        "### The model, fitted by code on the probe points",
        "",
        "Fitted on the runs with one repository (status branches in the policy repository, "
        "every agent fetching from it); refs = the refs of the repository served.",
        "",
        "| server | server CPU ms / no-op fetch | server CPU ms / status push | server CPU ms / "
        "pack-building fetch (median, >= 5,000 refs) | points |",
        "|---|---|---|---|---|",
    ]
    rows = [r for r in rows if not r.get("client_config")]  # those are the before/after
    fits = fit_costs(rows)
    for name, c in fits.items():
        (af, bf), (ap, bp) = c["fetch"], c["push"]
        npts = sum(1 for r in rows if single_repo(r) and series(r) == name)
        out.append(
            f"| {name} | {af:.2f} + {bf * 1000:.3f} x refs/1000 | "
            f"{ap:.2f} + {bp * 1000:.3f} x refs/1000 | {c['pack'][0]:.1f} | {npts} |"
        )
    out += [
        "",
        "Checked against the steady windows (the measured rates of each window times the fitted "
        "costs at its ref counts, against the cgroup's measured CPU; a run whose repository "
        "packed itself mid-run is checked against the unmaintained and the maintained fit of "
        "its server, which bound it; runs with status shards or mirrors were not fitted on):",
        "",
        "| server | refs (policy / per status repo) | fetch/s | push/s | model | predicted "
        "cores | measured cores | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["steady"]
        for m in models_for(r, fits):
            c = fits[m]
            pred = (
                st["fetches_per_s"] * at(c["fetch"], r["refs"])
                + st["pushes_per_s"] * at(c["push"], push_refs(r))
            ) / 1000
            out.append(
                f"| {label(r)} | {refs_shown(r)} | {st['fetches_per_s']:.1f} | "
                f"{st['pushes_per_s']:.1f} | {m} | {pred:.3f} | {st['server_cores']:.3f} | "
                f"{err(pred, st['server_cores'])} |"
            )
    checks = [r for r in rows if not single_repo(r) and series(r) in fits]
    if checks:
        out += [
            "",
            "Per operation, on the runs the model was not fitted on (a status push to a shard "
            "of 10,000 / K refs; a fetch from a mirror):",
            "",
            "| run | refs per status repo | ms / push: measured, model, error | ms / no-op "
            "fetch: measured, model, error | ms / pack-building fetch: measured, model |",
            "|---|---|---|---|---|",
        ]
        for r in checks:
            c = fits[series(r)]
            p, f = r["probe"]["push_cpu_ms"], r["probe"]["fetch_cpu_ms"]
            mp, mf = at(c["push"], push_refs(r)), at(c["fetch"], r["refs"])
            out.append(
                f"| {label(r)} | {push_refs(r):,} | {p:.1f}, {mp:.1f}, {err(mp, p)} | "
                f"{f:.2f}, {mf:.2f}, {err(mf, f)} | {pack_ms(r, c):.1f}, {c['pack'][0]:.1f} |"
            )
    out += [
        "",
        "Extrapolated to the real rates (interval 60 s, heartbeat 600 s, one repository holding "
        "every cell's status branch); a merged commit adds N pack-building fetches and N "
        "status pushes within one interval:",
        "",
        "| server | cells | steady fetch cores | steady push cores | steady total | merged "
        "commit: extra cores over one interval | server CPU s per merged commit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in fits.items():
        for n in (1000, 2000, 5000, 10000):
            fc = fleet_costs(Fleet10k(n, 1, 0), c)
            storm_s = fc["merge_fetch_s"] + fc["merge_push_s"]
            out.append(
                f"| {name} | {n:,} | {fc['fetch_cores']:.3f} | {fc['push_cores']:.3f} | "
                f"{fc['fetch_cores'] + fc['push_cores']:.3f} | {storm_s / INTERVAL:.2f} | "
                f"{storm_s:,.0f} |"
            )
    out += ["", *targets(rows, fits)]
    return "\n".join(out)


TOPOLOGIES = (
    Fleet10k(10_000, 1, 0),
    Fleet10k(10_000, 10, 0),
    Fleet10k(10_000, 10, 4),
    Fleet10k(10_000, 20, 10),
)
HOST_CORES = 2.0
"""The model's host: this machine's two cores, per git host."""


def targets(rows: list[dict[str, Any]], fits: dict[str, Costs]) -> list[str]:
    """The issue's targets at 10,000 cells, measured where this machine can, and the model."""
    out = [
        "### Time-to-effect: a merged commit, measured at the real rate (compress 1)",
        "",
    ]
    real = [r for r in rows if r["compress"] == 1 and r.get("commit", {}).get("applied")]
    out += [
        "Merge -> applied (the cell's fetch returned the new head) and -> reported (its status "
        "push succeeded), over the simulated cells (the others are prefilled refs). Model: the "
        "mirrors' lag, then the "
        f"pickup (timer: {PICKUP_P99:.3f} x interval; webhook: 0.99 x its spread; or, when "
        "longer, 0.99 x the commit phase's server CPU over this machine's 2 cores) plus the "
        "commit phase's measured fetch p99, then its push p99 (the cells' own git processes "
        "share the 2 cores with the server here: not in the model). Targets: applied within "
        "interval + 10 s = 70 s, reported within interval + 20 s = 80 s.",
        "",
        "| run | cells (simulated) | applied p50 / p99 s | reported p50 / p99 s | model: "
        "applied / reported p99 s | fetch p99 / push p99 s | failed pushes (retried) | "
        "unreported | mirror lag s | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in real:
        c = r["commit"]
        spread = r.get("notify_spread")
        window = PICKUP_P99 / 0.99 * INTERVAL if spread is None else spread
        # The run's own merge: its commit phase's server CPU on this machine's cores; and
        # the mirrors' lag, during which a cell's sync still finds the old head.
        lag = r.get("mirror_lag_s")
        ma, mr = (
            t + (lag or 0.0)
            for t in tte_model(
                window, c["server_cpu_s"], HOST_CORES, c["fetch"]["p99_s"], c["push"]["p99_s"]
            )
        )
        out.append(
            f"| {label(r)} | {r['cells']:,} ({r['active']:,}) | "
            f"{fmt(c['applied_p50_real_s'])} / {fmt(c['applied_p99_real_s'])} | "
            f"{fmt(c['reported_p50_real_s'])} / {fmt(c['reported_p99_real_s'])} | "
            f"{ma:.1f} / {mr:.1f} | {fmt(c['fetch']['p99_s'], 2)} / {fmt(c['push']['p99_s'], 2)}"
            f" | {c['push']['failed']} ({c['retries']}) | {c['unreported']} | "
            f"{'--' if lag is None else fmt(lag, 3)} | {r['load_before']} / {r['load_after']} |"
        )
    name = "daemon +gc" if "daemon +gc" in fits else next(iter(fits), None)
    if name is None:
        return out
    c = fits[name]
    out += [
        "",
        f"### The issue's targets at 10,000 cells (model: the `{name}` fit, one host of "
        f"{HOST_CORES:g} cores per git server)",
        "",
        "Steady = interval 60 s, heartbeat 600 s. Per host: the busiest git host of the "
        "topology (the primary, a status repository's host, or a mirror). Merge: the server "
        "CPU of one merged commit on the busiest host, and the time-to-effect the model gives "
        "when the cells pick it up on their timers (60 s) or by a webhook spread over 10 s.",
        "",
        "| topology | steady cores: fetch tier, status tier, busiest host (target <= 1) | merge "
        "CPU s: fetch tier, status tier, busiest host | merge -> 99 % applied / reported, "
        "timer (target 70 / 80 s) | same, webhook spread 10 s | cores per host for both "
        "targets |",
        "|---|---|---|---|---|---|",
    ]
    fetch_p99 = _measured_p99(real, "fetch")
    push_p99 = _measured_p99(real, "push")
    for f in TOPOLOGIES:
        fc = fleet_costs(f, c)
        timer = tte_model(PICKUP_P99 / 0.99 * INTERVAL, fc["merge_max_host_s"], HOST_CORES,
                          fetch_p99, push_p99)  # fmt: skip
        hook = tte_model(10.0, fc["merge_max_host_s"], HOST_CORES, fetch_p99, push_p99)
        # Cores for the timer targets: the merge's busiest-host CPU over the 70 s budget
        # less a fetch, and the steady state's one core.
        need = max(
            fc["steady_max_host"],
            fc["merge_max_host_s"] / max(1.0, (INTERVAL + 10 - fetch_p99) / 0.99),
        )
        out.append(
            f"| {f.name()} | {fc['fetch_cores']:.2f}, {fc['push_cores']:.2f}, "
            f"{fc['steady_max_host']:.2f} | {fc['merge_fetch_s']:,.0f}, "
            f"{fc['merge_push_s']:,.0f}, {fc['merge_max_host_s']:,.0f} | "
            f"{timer[0]:.0f} / {timer[1]:.0f} | {hook[0]:.0f} / {hook[1]:.0f} | "
            f"{math.ceil(need * 10) / 10:.1f} |"
        )
    out += [
        "",
        f"(fetch p99 {fetch_p99:.2f} s and push p99 {push_p99:.2f} s: the worst of the "
        "compress-1 commit phases above.)",
        *summary(rows, fits, name),
    ]
    return out


def _measured_p99(real: list[dict[str, Any]], kind: str) -> float:
    """The worst p99 of a commit phase's `kind` among the compress-1 runs with the simulated
    subset (status_shards recorded), or among all compress-1 runs when there are none."""
    mine = [r for r in real if "status_shards" in r] or real
    vals = [r["commit"][kind]["p99_s"] for r in mine if not math.isnan(r["commit"][kind]["p99_s"])]
    return max(vals) if vals else 1.0


def _steady_from_probe(r: dict[str, Any], cells: int) -> float:
    """A run's measured per-operation server CPU, at the real rates of `cells` cells."""
    p = r["probe"]
    return (cells / INTERVAL * p["fetch_cpu_ms"] + cells / HEARTBEAT * p["push_cpu_ms"]) / 1000


def summary(rows: list[dict[str, Any]], fits: dict[str, Costs], name: str) -> list[str]:
    """One line per target of the issue: measured on this machine, the model at 10,000
    cells, and what the model says it needs."""
    c = fits[name]
    new = [r for r in rows if "status_shards" in r and r["cells"] >= 10_000]
    real = [r for r in new if r["compress"] == 1 and r["commit"].get("applied")]
    one = [r for r in new if single_repo(r) and series(r) == name]
    sharded = [r for r in new if r.get("status_shards") == 10 and series(r) == name]
    out = [
        "",
        "### The targets, measured and modelled",
        "",
        "| target (10,000 cells, 60 s) | measured on this machine | model at 10,000 cells | "
        "what it needs |",
        "|---|---|---|---|",
    ]
    single = fleet_costs(Fleet10k(10_000, 1, 0), c)
    tiered = fleet_costs(Fleet10k(10_000, 10, 4), c)
    meas = []
    if one:
        meas.append(f"{_steady_from_probe(one[-1], 10_000):.2f} cores, one repository")
    if sharded:
        r = sharded[-1]
        p = r["probe"]
        meas.append(
            f"{10_000 / INTERVAL * p['fetch_cpu_ms'] / 1000:.2f} (fetches) + "
            f"{10_000 / HEARTBEAT * p['push_cpu_ms'] / 1000:.2f} (status, over 10 repos)"
        )
    out.append(
        "| steady git server CPU <= 1 core | "
        + ("; ".join(meas) or "--")
        + " (per-operation CPU measured at 10,001 refs / 1,000 per shard, times the real "
        f"rates) | one repository {single['steady_max_host']:.2f} cores; 10 status repos + 4 "
        f"mirrors: {tiered['steady_max_host']:.2f} on the busiest host | "
        + (
            "met by one maintained repository"
            if single["steady_max_host"] <= 1
            else f"one maintained repository needs {single['steady_max_host']:.2f} cores (its "
            f"heartbeat pushes {single['push_cores']:.2f}); with status in 10 repositories and "
            f"4 mirrors no host needs more than {tiered['steady_max_host']:.2f}"
        )
        + " |"
    )
    if real:
        p99 = max(r["steady"]["fetch"]["p99_s"] for r in real)
        rho = tiered["steady_max_host"] / HOST_CORES
        rho1 = single["steady_max_host"] / HOST_CORES
        queue = 4.6 * at(c["fetch"], 1) / 1000 / max(1e-9, 1 - rho)
        out.append(
            f"| p99 of a no-op fetch < 1 s | {p99:.2f} s (steady windows, compress 1, "
            f"{min(r['active'] for r in real)} simulated cells, load "
            f"{max(float(x) for r in real for x in ast.literal_eval(r['load_before']))} at most) | "
            f"the measured p99 plus a queue of {queue * 1000:.0f} ms at the busiest host's "
            f"utilisation {rho:.2f} (one repository: {rho1:.2f}"
            + (", saturated" if rho1 >= 1 else "")
            + ") | any host below ~0.8 utilisation |"
        )
        failed = sum(
            r[ph]["push"]["failed"] for r in new for ph in ("start", "probe", "steady", "commit")
        )
        retried = sum(r[ph]["retries"] for r in new for ph in ("start", "steady", "commit"))
        unrep = sum(r["commit"]["unreported"] for r in real)
        out.append(
            f"| no failed status push left unretried | {failed} pushes failed in these runs, "
            f"{retried} retries counted outside the probes (a probe push is not retried: it "
            f"measures); {unrep} cells unreported at the end of a compress-1 commit phase | the "
            "agent retries every failure with the latest document (StatusPusher) | nothing more "
            "at this load |"
        )
        for what, key, limit in (
            ("applied", "applied_p99_real_s", 70),
            ("reported", "reported_p99_real_s", 80),
        ):
            got = ", ".join(f"{fmt(r['commit'][key])} s ({label(r)})" for r in real)
            lat = (_measured_p99(real, "fetch"), _measured_p99(real, "push"))
            pickup = PICKUP_P99 / 0.99 * INTERVAL
            timer = tte_model(pickup, single["merge_max_host_s"], HOST_CORES, *lat)
            tier = tte_model(pickup, tiered["merge_max_host_s"], HOST_CORES, *lat)
            i = 0 if what == "applied" else 1
            merge = single["merge_fetch_s"] + single["merge_push_s"]
            budget = (limit - _measured_p99(real, "fetch")) / 0.99
            out.append(
                f"| merge -> 99 % {what} <= {limit} s | {got} | one repository "
                f"{timer[i]:.0f} s; 10 status repos + 4 mirrors {tier[i]:.0f} s | "
                + (
                    "met by one repository"
                    if timer[i] <= limit
                    else f"one repository: its {merge:,.0f} CPU-s per merge on "
                    f"{math.ceil(merge / budget)} cores; or 10 status repos + 4 mirrors "
                    f"({tiered['merge_max_host_s']:,.0f} CPU-s on the busiest host)"
                )
                + " |"
            )
    return out


def report() -> None:
    """Rewrite the tables of fleet.md from every line of fleet.jsonl.  A line marked
    `discarded` (a run whose measurement was wrong, kept for the record) is listed with the
    reason, and in no table."""
    from bench.common import splice

    rows = [json.loads(x) for x in JSONL.read_text().splitlines() if x.strip()]
    kept = [r for r in rows if not r.get("discarded")]
    gone = [
        f"- {label(r)}, {r['machine'].rsplit('; ', 1)[-1]}, {r['revision']}: {r['discarded']}"
        for r in rows
        if r.get("discarded")
    ]
    extra = "\n\n### Discarded runs\n\n" + "\n".join(gone) if gone else ""
    splice(MD, BEGIN, END, tables(kept) + "\n\n" + model(kept) + extra)


def record(result: dict[str, Any]) -> None:
    with JSONL.open("a") as f:
        f.write(json.dumps(result) + "\n")
    report()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cells", type=int, default=1000, help="status branches on the server")
    ap.add_argument("--active", type=int, default=0, help="simulated cells (default: --cells)")
    ap.add_argument("--prefill", action="store_true", help="fast-import the inactive cells")
    ap.add_argument("--server", choices=("daemon", "http"), default="daemon")
    ap.add_argument("--compress", type=float, default=1.0, help="time compression factor")
    ap.add_argument("--window", type=float, default=60.0, help="steady window, wall seconds")
    ap.add_argument("--workers", type=int, default=32, help="concurrent agents at most")
    ap.add_argument("--probe", type=int, default=300, help="operations per probe")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument(
        "--server-gc",
        action="store_true",
        help="`git gc` the server repository after the fleet start (a maintained host)",
    )
    ap.add_argument(
        "--server-pack-refs",
        action="store_true",
        help="only `git pack-refs --all` the server repositories after the fleet start",
    )
    ap.add_argument(
        "--client-config",
        default="",
        help="git config every simulated cell's git runs with, e.g. protocol.version=0",
    )
    ap.add_argument(
        "--status-shards",
        type=int,
        default=0,
        help="status in K separate status repositories (0: in the policy repository)",
    )
    ap.add_argument("--mirrors", type=int, default=0, help="policy fetches spread over M mirrors")
    ap.add_argument("--mirror-sync", choices=("hook", "poll"), default="hook")
    ap.add_argument("--mirror-poll", type=float, default=60.0, help="poll period, real seconds")
    ap.add_argument(
        "--notify-spread",
        type=float,
        default=None,
        help="a push webhook makes every agent sync after the merge, spread over S real "
        "seconds (default: no webhook, agents see the merge at their next interval)",
    )
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rewrite fleet.md from the jsonl")
    args = ap.parse_args()
    if args.report:
        report()
        return 0
    args.active = args.active or args.cells
    args.target_head = ""
    if args.client_config:
        key, _, value = args.client_config.partition("=")
        os.environ["GIT_CONFIG_PARAMETERS"] = f"'{key}'='{value}'"
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.record:
        record(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
