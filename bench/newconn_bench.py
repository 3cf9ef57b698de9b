"""New-connection cost and converge times at 1k to 1M rules: iptables vs nftables, side by side.

The claim under test: with the nftables backend a new connection costs the same whatever the
number of rules on the cell (one verdict-map lookup finds the container, then a few set
lookups), while with iptables it grows with the rules the packet walks past.  Targets
(nftables): the cost at 1M rules within 2x of the cost at 1k, and a one-ASG change under
100 ms at 1M.

Each scale is a synthetic cell plan (built directly as a CellPlan, so 1M rules is quick to
make): 100 containers with 10 private rule groups each, rules spread evenly over the groups
(90% tcp single ports, 5% tcp port ranges, 4% udp, 1% protocol all; unique destinations in
198.19.128.0/17).  The probe container is last in iptables' dispatch chain, the allowed
destination is the last rule of its last group: a packet walks past every rule it can.  For
each scale and backend, in a fresh lab cell (network namespaces, conntrack on):

* new-connection cost: TCP connects per second from the probe container to a listener in a
  service namespace, through the cell, with our rules on the packets' path and (the
  baseline) with them taken off it -- the FORWARD jump deleted, or the nft table made
  dormant -- alternating, so that the noise of a shared machine falls on both alike; client
  and listener are small Python processes pinned to one CPU each, the client closes with RST
  so no TIME_WAIT piles up, and the cell's conntrack table is flushed before each run;
* converge cycles, each a full `converge` (render, read, delta, apply, verify), with each
  backend's defaults and one backend object per cell, as the agent keeps one: from scratch;
  a resync (the measurement above moved our hook, so the kernel changed under the backend:
  it must list it again); a one-ASG change (one group of the probe gains a rule) and a
  no-op, both in the steady state.  For nftables, also the full read that audits every set
  element, timed on its own (at scale the backend reads tersely and audits periodically).

Usage: .venv/bin/python bench/newconn_bench.py [--scales 1k,10k,100k,1m]
           [--backends iptables-legacy,iptables-nft,nftables] [--seconds 0.5] [--repeat 5]
           [--skip iptables-nft@1m] [--record]
Needs root.  Not part of `make test`.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec  # noqa: E402
from bench.common import RESULTS, machine  # noqa: E402
from reconciler.backends import (  # noqa: E402
    Backend,
    ConvergeResult,
    Runner,
    converge,
    open_backend,
)
from reconciler.backends.iptables.render import hook_rule  # noqa: E402
from reconciler.backends.nftables.backend import NftablesBackend  # noqa: E402
from reconciler.backends.nftables.render import render_cell as render_nft  # noqa: E402
from reconciler.core.cellplan import CellPlan, ContainerPlan, PlanRule, RuleGroup, content_id  # noqa: E402
from reconciler.core.model import AddressRange, Container, PortRange, RuleItem  # noqa: E402

SCALES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}
BACKENDS = ("iptables-legacy", "iptables-nft", "nftables")
CONTAINERS = 100
GROUPS_PER_CONTAINER = 10
PORT = 8080
RULE_BASE = int(ipaddress.IPv4Address("198.19.128.0"))
# Fake containers sort before the probe (198.18.0.2) in iptables' dispatch chain, which
# orders by address text: 198.18.0.100 ... 198.18.0.198.
FAKE_IPS = [f"198.18.0.{100 + i}" for i in range(CONTAINERS - 1)]

CLIENT = r"""
import socket, struct, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
linger = struct.pack("ii", 1, 0)
done = fails = 0
start = time.perf_counter()
end = start + seconds
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    try:
        s.connect((host, port))
        done += 1
    except OSError:
        fails += 1
    s.close()
    if (done + fails) % 32 == 0 and time.perf_counter() >= end:
        break
print(done, fails, time.perf_counter() - start)
"""

SINK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


# -- synthetic plans -------------------------------------------------------------------------


def _item(k: int) -> RuleItem:
    """The k-th synthetic rule: unique, never overlapping the probe's destination."""
    addr = RULE_BASE + (k // 32) % 32768
    dest = AddressRange(4, addr, addr)
    slot = k % 32
    kind = k % 100
    if kind < 90:
        return RuleItem("tcp", dest, (PortRange(2000 + 2 * slot, 2000 + 2 * slot),))
    if kind < 95:
        return RuleItem("tcp", dest, (PortRange(3000 + 20 * slot, 3009 + 20 * slot),))
    if kind < 99:
        return RuleItem("udp", dest, (PortRange(2000 + 2 * slot, 2000 + 2 * slot),))
    return RuleItem("all", dest)


def _group(items: list[RuleItem]) -> RuleGroup:
    rules = tuple(PlanRule(content_id(i.key()), i, ()) for i in items)
    return RuleGroup(content_id("\n".join(r.id for r in rules)), 4, rules)


@dataclass
class Plans:
    """A scale's plan, the same plan after a one-ASG change, and what the probe needs."""

    rules: int
    plan: CellPlan
    changed: CellPlan
    build_seconds: float


def synthetic(rules: int, probe_ip: str, target_ip: str) -> Plans:
    start = time.perf_counter()
    n_groups = CONTAINERS * GROUPS_PER_CONTAINER
    per_group = max(1, rules // n_groups)
    target = RuleItem(
        "tcp", AddressRange.parse(target_ip), (PortRange(PORT, PORT),)
    )  # the probe's allowed destination: the last rule of its last group
    groups: list[RuleGroup] = []
    containers: list[ContainerPlan] = []
    k = 0
    probe_groups: list[list[RuleItem]] = []
    for c in range(CONTAINERS):
        ids = []
        for j in range(GROUPS_PER_CONTAINER):
            items = [_item(k + i) for i in range(per_group)]
            k += per_group
            if c == CONTAINERS - 1:
                if j == GROUPS_PER_CONTAINER - 1:
                    items[-1] = target
                probe_groups.append(items)
            group = _group(items)
            groups.append(group)
            ids.append(group.id)
        ip = probe_ip if c == CONTAINERS - 1 else FAKE_IPS[c]
        handle = f"synthetic-{c:04d}"
        containers.append(
            ContainerPlan(Container(handle, ip), content_id("container " + handle), tuple(ids))
        )
    plan = CellPlan("bench", tuple(containers), tuple(sorted(groups, key=lambda g: g.id)), 0)
    # The one-ASG change: the probe's first group gains a rule.
    old = _group(probe_groups[0])
    new = _group([*probe_groups[0], _item(k + 1)])
    probe = containers[-1]
    moved = ContainerPlan(
        probe.container, probe.chain_id, tuple(new.id if g == old.id else g for g in probe.groups)
    )
    changed = CellPlan(
        "bench",
        (*containers[:-1], moved),
        tuple(sorted([*(g for g in groups if g.id != old.id), new], key=lambda g: g.id)),
        0,
    )
    return Plans(rules, plan, changed, time.perf_counter() - start)


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Cell:
    lab: Lab
    sink: subprocess.Popen[str]

    @property
    def target(self) -> str:
        return self.lab.services["sink"].ipv4

    def connects(self, seconds: float) -> tuple[float, int]:
        """Connects per second in one run, and how many failed."""
        probe_ns = self.lab.containers["probe"].netns
        self.lab.cell_exec(["conntrack", "-F"])
        client = [sys.executable, "-c", CLIENT, self.target, str(PORT), str(seconds)]
        out = subprocess.run(
            ["ip", "netns", "exec", probe_ns, "taskset", "-c", "0", *client],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        done, fails, elapsed = int(out[0]), int(out[1]), float(out[2])
        return done / elapsed, fails

    def on_path(self, backend: str, on: bool) -> None:
        """Put our rules on the packets' path or take them off it, touching nothing else."""
        if backend == "nftables":
            table = '{"nftables": [{"add": {"table": {"family": "inet", "name": "asgctl"}}}]}'
            if on:  # `add table` without flags wakes a dormant table
                self.lab.cell_exec(["nft", "-j", "-f", "-"], input=table, check=True)
            else:
                cmd = "add table inet asgctl { flags dormant; }"
                self.lab.cell_exec(["nft", cmd], check=True)
            return
        tool = f"iptables-{backend.removeprefix('iptables-')}"
        spec = shlex.split(hook_rule())[2:]  # after `-A FORWARD`
        verb = ["-I", "FORWARD", "1"] if on else ["-D", "FORWARD"]
        self.lab.cell_exec([tool, "-w", *verb, *spec], check=True)

    def cost(self, backend: str, seconds: float, repeat: int) -> tuple[float, float, float, int]:
        """Median connects/s without and with our rules on the path (runs alternating), the
        median of the pairwise extra cost per connection in µs, and failed connects."""
        off, on, extra, failed = [], [], [], 0
        for _ in range(repeat):
            pair = []
            for state in (False, True):
                self.on_path(backend, state)
                rate, fails = self.connects(seconds)
                pair.append(rate)
                failed += fails
            off.append(pair[0])
            on.append(pair[1])
            extra.append(1e6 / pair[1] - 1e6 / pair[0])
        return statistics.median(off), statistics.median(on), statistics.median(extra), failed


def start_cell() -> Cell:
    lab = Lab([ContainerSpec("probe")], [ServiceSpec("sink")], conntrack=True).start()
    server = [sys.executable, "-c", SINK, str(PORT)]
    sink = subprocess.Popen(
        ["ip", "netns", "exec", lab.services["sink"].netns, "taskset", "-c", "1", *server],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    return Cell(lab, sink)


def stop_cell(cell: Cell) -> None:
    cell.sink.kill()
    cell.sink.wait()
    cell.lab.teardown()


@dataclass
class Cycle:
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    sent: int = 0


def timed(backend: Backend, plan: CellPlan, last: CellPlan | None) -> Cycle:
    gc.collect()
    start = time.perf_counter()
    result: ConvergeResult = converge(backend, plan, last)
    seconds = time.perf_counter() - start
    phases: dict[str, float] = {}
    for fam in result.families:
        for k, v in fam.timings.items():
            phases[k] = phases.get(k, 0.0) + v
    if not result.ok:
        print("   converge failed:", [f.error for f in result.families], flush=True)
    return Cycle(seconds, phases, result.ok, sum(f.sent for f in result.families))


@dataclass
class Row:
    scale: str
    backend: str
    kernel_rules: int
    baseline: float
    rate: float
    extra_us: float
    failed: int
    scratch: Cycle
    resync: Cycle
    change: Cycle
    noop: Cycle
    audit: float | None = None

    @property
    def cost_us(self) -> float:
        return 1e6 / self.rate


def kernel_rules(backend: str, plan: CellPlan) -> int:
    """What the kernel holds: iptables lines, or nft rules plus set elements."""
    if backend == "nftables":
        return sum(render_nft(plan, f).rule_count for f in (4, 6))
    return plan.installed_rules


def run_one(scale: str, backend_name: str, plans: Plans, seconds: float, repeat: int) -> Row:
    cell = start_cell()
    try:
        runner = Runner.in_netns(cell.lab.cell, timeout=900)
        # Opened as `asgctl apply --backend` and the agent open it (defaults):
        # "iptables-legacy" is kind "iptables", variant "legacy"; "nftables" has no variant.
        kind, _, variant = backend_name.partition("-")
        backend = open_backend(kind, variant or "auto", runner)
        scratch = timed(backend, plans.plan, None)
        baseline, rate, extra, failed = cell.cost(backend_name, seconds, repeat)
        # Measuring moved the hook, which any backend must notice: a cycle that finds the
        # kernel changed by someone else (and lists it), then the steady state.
        resync = timed(backend, plans.plan, plans.plan)
        change = timed(backend, plans.changed, plans.plan)
        noop = timed(backend, plans.changed, plans.changed)
        audit = None
        if backend_name == "nftables":
            full = NftablesBackend.open("auto", runner, read_elements=True)
            start = time.perf_counter()
            full.read(4)
            audit = time.perf_counter() - start
        return Row(
            scale,
            backend_name,
            kernel_rules(backend_name, plans.plan),
            baseline,
            rate,
            extra,
            failed,
            scratch,
            resync,
            change,
            noop,
            audit,
        )
    finally:
        stop_cell(cell)


# -- reporting -----------------------------------------------------------------------------


def _ms(c: Cycle) -> str:
    return f"{c.seconds * 1000:,.0f}" if c.ok else "failed"


def _phase(c: Cycle, name: str) -> str:
    v = c.phases.get(name)
    return "-" if v is None else f"{v * 1000:,.0f}"


def report(rows: list[Row], plans: dict[str, Plans], note: str, total: float, load: str) -> str:
    out = [
        "# New-connection cost and converge times: iptables vs nftables",
        "",
        f"Machine: {machine()}.",
        f"Run: `{note}`, {total:.0f} s in all; load average {load}.",
        "",
        f"Synthetic cells: {CONTAINERS} containers x {GROUPS_PER_CONTAINER} private groups;"
        " the probe container is last in iptables' dispatch chain and its allowed destination"
        " is the last rule of its last group.  *Rules* are the plan's rule items; *kernel* is"
        " what the kernel holds (iptables lines; nft rules plus set elements, after the sets"
        " join what they can).",
        "",
        "## New-connection cost",
        "",
        "TCP connect + RST close through the cell, median of runs alternating between our rules"
        " on the path and off it (*baseline*: the same cell, same kernel state, the FORWARD jump"
        " removed or the table dormant); *extra* is the median over the on/off pairs of the cost"
        " per connection above the baseline.",
        "",
        "| rules | backend | kernel | baseline conn/s | conn/s | µs/conn | extra µs |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fails = f" ({r.failed} failed)" if r.failed else ""
        out.append(
            f"| {r.scale} | {r.backend} | {r.kernel_rules:,} | {r.baseline:,.0f} | "
            f"{r.rate:,.0f}{fails} | {r.cost_us:.1f} | {r.extra_us:+.1f} |"
        )
    out += [
        "",
        "## Converge cycles (ms)",
        "",
        "Full cycles (render, read, delta, apply, verify, both families); the one-ASG change"
        " also split into its apply (the transaction) and reads (read + verify).",
        "",
        "| rules | backend | from scratch | resync | one-ASG change | its apply | its reads |"
        " no-op | full audit read |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reads = r.change.phases.get("read", 0.0) + r.change.phases.get("verify", 0.0)
        audit = "-" if r.audit is None else f"{r.audit * 1000:,.0f}"
        out.append(
            f"| {r.scale} | {r.backend} | {_ms(r.scratch)} | {_ms(r.resync)} | {_ms(r.change)} | "
            f"{_phase(r.change, 'apply')} | {reads * 1000:,.0f} | {_ms(r.noop)} | {audit} |"
        )
    nft = {r.scale: r for r in rows if r.backend == "nftables"}
    out += ["", "## Targets (nftables)", ""]
    if "1k" in nft and "1m" in nft:
        lo, hi = nft["1k"], nft["1m"]
        ratio = hi.cost_us / lo.cost_us
        # The machine's load moves whole runs; the rules' own cost is the paired extra.  On a
        # common baseline (the median of every baseline in this run) the two compare fairly.
        base = statistics.median(1e6 / r.baseline for r in rows)
        fair = (base + max(hi.extra_us, 0.0)) / (base + max(lo.extra_us, 0.0))
        verdict = "met" if max(ratio, fair) <= 2 else "missed"
        out.append(
            f"- new-connection cost at 1M / at 1k: {hi.cost_us:.1f} / {lo.cost_us:.1f} µs ="
            f" {ratio:.2f}x as measured; on the run's median baseline ({base:.1f} µs) plus each"
            f" one's paired extra, {fair:.2f}x (target 2x): {verdict}"
        )
    if "1m" in nft:
        c = nft["1m"].change
        apply_ms = c.phases.get("apply", 0.0) * 1000
        out.append(
            f"- one-ASG change at 1M: transaction {apply_ms:.0f} ms, whole cycle "
            f"{c.seconds * 1000:.0f} ms (target 100 ms)"
        )
    out += [
        "",
        "Plan build times (s): "
        + ", ".join(f"{k} {p.build_seconds:.1f}" for k, p in plans.items()),
        "",
    ]
    return "\n".join(out)


LOADS: list[str] = []


def _load() -> str:
    """The 1/5/15-minute load averages: the machine is shared, and this says how busy."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1k,10k,100k,1m")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--seconds", type=float, default=0.5, help="per connect run")
    ap.add_argument("--repeat", type=int, default=5, help="runs with and without rules")
    ap.add_argument(
        "--skip",
        default="iptables-nft@1m",
        help="backend@scale pairs to leave out ('' for none; iptables-nft at 1M takes minutes)",
    )
    ap.add_argument("--record", action="store_true", help="write bench/results/newconn.md")
    args = ap.parse_args()
    scales = [s.strip().lower() for s in args.scales.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    LOADS.append(_load())
    # The probe's and the sink's addresses are fixed by the lab's address plan.
    probe_ip, target_ip = "198.18.0.2", "198.19.0.2"
    rows: list[Row] = []
    plans: dict[str, Plans] = {}
    for scale in scales:
        p = plans[scale] = synthetic(SCALES[scale], probe_ip, target_ip)
        print(f"{scale}: plan built in {p.build_seconds:.1f} s", flush=True)
        for backend in backends:
            if f"{backend}@{scale}" in skip:
                print(f"  {backend}: skipped", flush=True)
                continue
            row = run_one(scale, backend, p, args.seconds, args.repeat)
            rows.append(row)
            print(
                f"  {backend:16} {row.kernel_rules:>9,} kernel  "
                f"{row.baseline:>7,.0f} -> {row.rate:>7,.0f} conn/s ({row.extra_us:+.1f} µs)  "
                f"scratch {_ms(row.scratch)} ms, change {_ms(row.change)} ms "
                f"(apply {_phase(row.change, 'apply')}), no-op {_ms(row.noop)} ms",
                flush=True,
            )
    note = shlex.join(["bench/newconn_bench.py", *sys.argv[1:]])
    load = f"{LOADS[0]} at the start, {_load()} at the end"
    text = report(rows, plans, note, time.perf_counter() - started, load)
    print()
    print(text)
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "newconn.md").write_text(text)
        print(f"recorded in {RESULTS / 'newconn.md'}")


if __name__ == "__main__":
    main()
