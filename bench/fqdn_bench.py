"""Grants by DNS name at scale: N names with K addresses each on one cell (issue 15).

For each backend (ipsets for iptables-legacy, sets in `inet asgctl` for nftables), in a
fresh network namespace: converge a plan that grants one container all N names (kernel
objects: one set per name and family, one rule per grant), then write every name's K
addresses as the agent's resolver does (batches of `service.WRITE_BATCH` names per set
transaction), and again (a refresh: every element renewed).  Recorded: converge time, the
wall and CPU time of a full refresh (our process plus the ipset/nft processes it starts),
what that costs per minute when every name is asked at half of a 300 s TTL, the kernel's own
memory for the sets where it says (ipset's "Size in memory"), and the agent's memory for
its per-name state.  Parsing answers is timed on its own (a K-address answer).

New-connection cost (`--newconn`, on by default): in a lab cell (`newconn_bench`'s: a probe
container, a listener in the outside world, conntrack on), the same N names x K addresses
granted to the probe container on the listener's port, the listener's address being one of
the K addresses of the name whose rule the packet reaches *last* (so a new connection walks
past every name's rule and set lookup first); and, for comparison, the same cell with one
address rule instead.  Each is measured as `newconn_bench` measures: TCP connects per second
with our rules on the packets' path and off it, alternating, and the median of the paired
extra cost per connection.

Not measured here (docs/fqdn.md): the DNS-answer latency the interception will add.
Benchmarks never assert.

Usage: .venv/bin/python bench/fqdn_bench.py [--names 5000] [--addresses 20]
           [--no-newconn] [--seconds 0.5] [--repeat 5] [--record]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
import timeit
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import newconn_bench  # noqa: E402
from bench.common import RESULTS, machine, revision, splice  # noqa: E402
from reconciler.backends import Runner, converge  # noqa: E402
from reconciler.backends.iptables.backend import IptablesBackend  # noqa: E402
from reconciler.backends.iptables.render import render_cell as render_iptables  # noqa: E402
from reconciler.backends.nftables.backend import NftablesBackend  # noqa: E402
from reconciler.backends.nftables.render import render_cell as render_nft  # noqa: E402
from reconciler.core.cellplan import CellPlan  # noqa: E402
from reconciler.core.compile import compile_cell  # noqa: E402
from reconciler.core.model import (  # noqa: E402
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
)
from reconciler.fqdn.dns import QTYPE_A, parse_response  # noqa: E402
from reconciler.fqdn.keeper import FqdnSettings, NameState, on_answer  # noqa: E402
from reconciler.fqdn.kernelsets import IpsetWriter, NftWriter, SetWriter, Write  # noqa: E402
from reconciler.fqdn.service import WRITE_BATCH  # noqa: E402
from tests.dnskit import record, response  # noqa: E402

REFRESH_EVERY = 150.0  # a 300 s TTL, asked again at half
BEGIN, END = "<!-- fqdn-bench:begin -->", "<!-- fqdn-bench:end -->"
NEWCONN_BEGIN, NEWCONN_END = "<!-- fqdn-newconn:begin -->", "<!-- fqdn-newconn:end -->"


def names(n: int) -> list[str]:
    return [f"svc{i}.bench.lab.example" for i in range(n)]


def plan_for(n: int, port_number: int = 443, ip: str = "198.18.0.2") -> CellPlan:
    """One container granted every name (tcp 443), as destinations of 256 names each."""
    fqdns = names(n)
    chunks = [tuple(fqdns[i : i + 256]) for i in range(0, n, 256)]
    port = (PortRange(port_number, port_number),)
    policy = PolicySet(
        destinations=tuple(
            Destination(f"d{i}", "tcp", (), port, fqdns=chunk) for i, chunk in enumerate(chunks)
        ),
        egress_policies=tuple(
            EgressPolicy(f"p{i}", "default", None, f"d{i}") for i in range(len(chunks))
        ),
    )
    return compile_cell(policy, [Container("c", ip, "app", "space")], "bench")


def addresses(i: int, k: int) -> tuple[str, ...]:
    base = 198 << 24 | 19 << 16  # 198.19.0.0/16, the lab's outside world
    return tuple(
        f"198.19.{((base + i * k + j) >> 8) & 0xFF}.{(base + i * k + j) & 0xFF}" for j in range(k)
    )


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def refresh_round(writer: SetWriter, plan: CellPlan, k: int) -> tuple[float, float]:
    """Every v4 name's k addresses written as the resolver writes them: (wall, CPU) s."""
    sets = [(r.set_name, r.item.fqdn) for r in plan.names if r.version == 4]
    order = {fqdn: i for i, fqdn in enumerate(names(len(sets)))}
    writes = [Write(s, 4, tuple((a, 300) for a in addresses(order[f], k))) for s, f in sets]
    cpu0, own0, t0 = children_cpu(), time.process_time(), time.perf_counter()
    for i in range(0, len(writes), WRITE_BATCH):
        writer.write(writes[i : i + WRITE_BATCH])
    wall = time.perf_counter() - t0
    return wall, (children_cpu() - cpu0) + (time.process_time() - own0)


def ipset_memory(runner: Runner) -> int:
    out = runner.run(["ipset", "list", "-t"]).stdout
    return sum(
        int(line.split(":", 1)[1]) for line in out.splitlines() if line.startswith("Size in memory")
    )


def one_backend(kind: str, plan: CellPlan, k: int) -> dict[str, object]:
    ns = f"fqdnbench{kind[:3]}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        runner = Runner.in_netns(ns)
        writer: SetWriter
        if kind == "nftables":
            backend, writer = NftablesBackend.open("auto", runner), NftWriter(runner)
        else:
            backend, writer = IptablesBackend.open("legacy", runner), IpsetWriter(runner)
        t0 = time.perf_counter()
        result = converge(backend, plan)
        install = time.perf_counter() - t0
        assert result.ok, result.to_dict()
        first = refresh_round(writer, plan, k)
        again = refresh_round(writer, plan, k)
        sets = len({r.set_name for r in plan.names})
        out: dict[str, object] = {
            "backend": "iptables-legacy + ipset" if kind != "nftables" else "nftables",
            "sets": sets,
            "rules": len(plan.names),
            "install_s": install,
            "fill_wall_s": first[0],
            "refresh_wall_s": again[0],
            "refresh_cpu_s": again[1],
            "cpu_per_minute_s": again[1] * 60 / REFRESH_EVERY,
        }
        if kind != "nftables":
            out["kernel_bytes"] = ipset_memory(runner)
        return out
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def agent_state_bytes(n: int, k: int) -> int:
    """What the resolver keeps per name (NameState with k addresses), for n names."""
    settings = FqdnSettings()
    tracemalloc.start()
    states = []
    for i, fqdn in enumerate(names(n)):
        state, _, _ = on_answer(
            NameState(fqdn, 4, f"asgn4-{i:022x}"), addresses(i, k), 300, 0.0, settings
        )
        states.append(state)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return size


def parse_us(k: int) -> float:
    qname = "svc0.bench.lab.example"
    msg = response(7, qname, QTYPE_A, [record(qname, QTYPE_A, 300, a) for a in addresses(0, k)])
    n = 2000
    return timeit.timeit(lambda: parse_response(msg, 7, qname, QTYPE_A), number=n) / n * 1e6


# -- new-connection cost with the name sets ------------------------------------------------


def address_plan(target: str, port_number: int, ip: str) -> CellPlan:
    """The comparison: the probe container granted the listener by one address rule."""
    port = (PortRange(port_number, port_number),)
    policy = PolicySet(
        destinations=(Destination("sink", "tcp", (AddressRange.parse(target),), port),),
        egress_policies=(EgressPolicy("p", "default", None, "sink"),),
    )
    return compile_cell(policy, [Container("c", ip, "app", "space")], "bench")


SPREAD = 100
"""Containers the names are spread over in the `spread` case (the probe among them)."""


def spread_plan(n: int, port_number: int, ip: str) -> CellPlan:
    """The N names spread over SPREAD containers, N / SPREAD each (the probe container last
    in iptables' dispatch): the cell holds every set, a container's chain its own names."""
    fqdns = names(n)
    per = n // SPREAD
    port = (PortRange(port_number, port_number),)
    policy = PolicySet(
        destinations=tuple(
            Destination(f"d{i}", "tcp", (), port, fqdns=tuple(fqdns[i * per : (i + 1) * per]))
            for i in range(SPREAD)
        ),
        egress_policies=tuple(
            EgressPolicy(f"p{i}", "app", f"app{i}", f"d{i}") for i in range(SPREAD)
        ),
    )
    ips = [*newconn_bench.FAKE_IPS[: SPREAD - 1], ip]
    inventory = [Container(f"c{i}", a, f"app{i}", "space") for i, a in enumerate(ips)]
    return compile_cell(policy, inventory, "bench")


def last_set(plan: CellPlan, kind: str, ip: str) -> str:
    """The v4 name set whose rule a new connection from `ip` reaches last in its chain."""
    if kind == "nftables":
        text = render_nft(plan, 4).text()
        chain = re.search(rf'\["{re.escape(ip)}",\{{"goto":\{{"target":"([^"]+)"', text)
        assert chain is not None
        rules = [ln for ln in text.splitlines() if f'"chain":"{chain[1]}"' in ln]
        return re.findall(r'"@(asgn4-[0-9a-f]+)"', "\n".join(rules))[-1]
    text = render_iptables(plan, 4).text()
    jump = re.search(rf"^-A ASG-FORWARD -s {re.escape(ip)}/32 .* -j (\S+)$", text, re.M)
    assert jump is not None
    return re.findall(rf"^-A {jump[1]} .*--match-set (asgn4-[0-9a-f]+) ", text, re.M)[-1]


def far_addresses(i: int, k: int) -> tuple[str, ...]:
    """K addresses for name i in 198.19.128.0/17, never the listener's (198.19.0.x)."""
    return tuple(f"198.19.{128 + ((i * k + j) >> 8) % 128}.{(i * k + j) & 0xFF}" for j in range(k))


def fill(writer: SetWriter, plan: CellPlan, k: int, listener_in: str, target: str) -> None:
    """Every name's k addresses; the listener is the last address of set `listener_in`."""
    sets = [(r.set_name, r.item.fqdn) for r in plan.names if r.version == 4]
    order = {fqdn: i for i, fqdn in enumerate(names(len({f for _, f in sets})))}
    writes, seen = [], set()
    for set_name, fqdn in sets:
        if set_name in seen:
            continue
        seen.add(set_name)
        addrs = far_addresses(order[fqdn], k)
        if set_name == listener_in:
            addrs = (*addrs[:-1], target)
        writes.append(Write(set_name, 4, tuple((a, 600) for a in addrs)))
    for i in range(0, len(writes), WRITE_BATCH):
        writer.write(writes[i : i + WRITE_BATCH])


def newconn_cell(kind: str, n: int, k: int, seconds: float, repeat: int) -> list[dict[str, object]]:
    """Connect cost through one lab cell, for each grant in turn (see the module docstring)."""
    cell = newconn_bench.start_cell()
    try:
        probe, target = cell.lab.containers["probe"].ipv4, cell.target
        runner = Runner.in_netns(cell.lab.cell, timeout=900)
        name = "nftables" if kind == "nftables" else "iptables-legacy"
        port = newconn_bench.PORT
        grants = (
            (f"{n:,} names, all granted to the connecting container", plan_for(n, port, probe)),
            (
                f"{n:,} names over {SPREAD} containers, {n // SPREAD} to the connecting one",
                spread_plan(n, port, probe),
            ),
            ("one address rule (no names)", address_plan(target, port, probe)),
        )
        rows: list[dict[str, object]] = []
        last: CellPlan | None = None
        for grant, plan in grants:
            writer: SetWriter
            if kind == "nftables":
                backend, writer = NftablesBackend.open("auto", runner), NftWriter(runner)
            else:
                backend, writer = IptablesBackend.open("legacy", runner), IpsetWriter(runner)
            result = converge(backend, plan, last)
            assert result.ok, result.to_dict()
            last = plan
            if plan.names:
                fill(writer, plan, k, last_set(plan, kind, probe), target)
            baseline, rate, extra, failed = cell.cost(name, seconds, repeat)
            rows.append(
                {
                    "backend": "iptables-legacy + ipset" if kind != "nftables" else "nftables",
                    "grant": grant,
                    "sets": len({r.set_name for r in plan.names}),
                    "baseline": baseline,
                    "rate": rate,
                    "extra_us": extra,
                    "failed": failed,
                }
            )
            print(f"  {rows[-1]['backend']}: {grant}: {extra:+.1f} µs/conn", flush=True)
        return rows
    finally:
        newconn_bench.stop_cell(cell)


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def newconn_text(rows: list[dict[str, object]], n: int, k: int, loads: tuple[str, str]) -> str:
    lines = [
        f"New TCP connections through one cell whose names have {k} addresses each, the"
        " listener being an address of the last name the connecting container's rules test;"
        f" {machine()}; load average {loads[0]} at the start, {loads[1]} at the end (2 cores"
        f" shared by other work); code {revision()}.",
        "",
        "| backend | grant | kernel sets | conn/s without our rules | conn/s with them "
        "| µs/conn | extra µs/conn (paired median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fails = f" ({r['failed']} failed)" if r["failed"] else ""
        rate = float(str(r["rate"]))
        lines.append(
            f"| {r['backend']} | {r['grant']} | {r['sets']:,} | {float(str(r['baseline'])):,.0f} | "
            f"{rate:,.0f}{fails} | {1e6 / rate:.1f} | {float(str(r['extra_us'])):+.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=5000)
    ap.add_argument("--addresses", type=int, default=20)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--no-newconn", action="store_true", help="skip the connect-cost part")
    ap.add_argument("--no-sets", action="store_true", help="only the connect-cost part")
    ap.add_argument("--seconds", type=float, default=0.5, help="per connect run")
    ap.add_argument("--repeat", type=int, default=5, help="runs with and without rules")
    args = ap.parse_args()
    n, k = args.names, args.addresses
    if not args.no_newconn:
        start_load = load_average()
        rows_nc: list[dict[str, object]] = []
        for kind in ("iptables", "nftables"):
            rows_nc += newconn_cell(kind, n, k, args.seconds, args.repeat)
        text_nc = newconn_text(rows_nc, n, k, (start_load, load_average()))
        print(text_nc, flush=True)
        if args.record:
            splice(RESULTS / "fqdn.md", NEWCONN_BEGIN, NEWCONN_END, text_nc)
    if args.no_sets:
        return 0
    plan = plan_for(n)
    rows = [one_backend(kind, plan, k) for kind in ("iptables", "nftables")]
    state = agent_state_bytes(n, k)
    parse = parse_us(k)
    lines = [
        f"{n:,} names x {k} addresses, one container granted all of them (tcp 443); "
        f"{machine()}; code {revision()}.",
        "",
        "| backend | kernel sets | rules | converge | first fill | refresh (wall) "
        "| refresh CPU | CPU per minute (refresh at 150 s) | kernel memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = (
            f"{int(r['kernel_bytes']) / 2**20:.1f} MiB (ipset)"
            if "kernel_bytes" in r
            else "not reported by nft"
        )
        lines.append(
            f"| {r['backend']} | {r['sets']:,} | {r['rules']:,} | {r['install_s']:.2f} s | "
            f"{r['fill_wall_s']:.2f} s | {r['refresh_wall_s']:.2f} s | "
            f"{r['refresh_cpu_s']:.2f} s | {r['cpu_per_minute_s']:.2f} s | {mem} |"
        )
    lines += [
        "",
        f"Agent state for the names: {state / 2**20:.1f} MiB (tracemalloc). "
        f"Parsing one {k}-address answer: {parse:.0f} µs.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        splice(RESULTS / "fqdn.md", BEGIN, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
