"""The latency the DNS interception adds to an answer, at 1,000 answers/s (issue 15, item 2).

A lab cell with one container granted `db.lab.example:5432` and allowed to ask the lab's
resolver (dnsmasq, in the outside world); our ruleset converged.  A load generator -- its
own process, inside the container's namespace -- sends A queries for the granted name at a
fixed rate over a pool of UDP sockets and times each answer (send to receive).  Runs
alternate: without the interception (no hold rules, no reader) and with it (the answers
held in NFQUEUE, each parsed, matched to its query and its addresses written to the name's
set over netlink before NF_ACCEPT: every answer takes the whole learning path).  The added
latency is the difference of the percentiles of the two; the agent's own verdict time (from
reading a held answer to the verdict) is its histogram's.  Queue drops and lost answers are
counted.

The write path, measured apart in the same cell: one name-set write of one address as the
verdict path does it (a netlink request on a kept-open socket, acknowledged) against the
same write by a process (`ipset restore -exist` / `nft -j -f -`, what the agent's own
resolution uses for its batches), each timed alone, p50/p99 over `--writes` writes.

Usage: .venv/bin/python bench/fqdn_intercept_bench.py [--rate 1000] [--seconds 5]
           [--repeat 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asgctl_lab.dns import LabDns  # noqa: E402
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec  # noqa: E402
from asgctl_lab.nsenter import netns_exec_argv  # noqa: E402
from bench.common import RESULTS, machine, revision, splice  # noqa: E402
from reconciler.backends import Backend, Runner, converge  # noqa: E402
from reconciler.backends.iptables.backend import IptablesBackend  # noqa: E402
from reconciler.backends.nftables.backend import NftablesBackend  # noqa: E402
from reconciler.core.compile import compile_cell  # noqa: E402
from reconciler.core.model import (  # noqa: E402
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
)
from reconciler.fqdn.hold import DnsHold  # noqa: E402
from reconciler.fqdn.intercept import VERDICT_BUCKETS, Interceptor  # noqa: E402
from reconciler.fqdn.keeper import FqdnSettings  # noqa: E402
from reconciler.fqdn.kernelsets import IpsetWriter, NftWriter, SetWriter, Write  # noqa: E402
from reconciler.fqdn.netlinksets import NetlinkSets  # noqa: E402
from reconciler.fqdn.nfqueue import drops  # noqa: E402
from reconciler.fqdn.service import FqdnService  # noqa: E402

BEGIN, END = "<!-- fqdn-intercept:begin -->", "<!-- fqdn-intercept:end -->"
DB = "db.lab.example"
QUEUE = 5353

LOAD = r"""
import json, os, random, select, socket, struct, sys, time
server, name, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def q(txid):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"
socks = []
for _ in range(64):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((server, 53)); s.setblocking(False); socks.append(s)
pending = {}  # (socket index, txid) -> sent at
rtts, sent, lost = [], 0, 0
start = time.perf_counter(); total = int(rate * seconds); i = 0; last = start
poller = select.epoll()
for n, s in enumerate(socks):
    poller.register(s.fileno(), select.EPOLLIN)
by_fd = {s.fileno(): n for n, s in enumerate(socks)}
# An answer counts as lost when it has not come 2 s after the last query was sent (a starved
# generator may send its last queries after the run's planned end).
while i < total or (pending and time.perf_counter() - last < 2):
    now = time.perf_counter()
    while i < total and now >= start + i / rate:
        n = i % len(socks); txid = random.getrandbits(16)
        pending[(n, txid)] = time.perf_counter()
        socks[n].send(q(txid)); i += 1; sent += 1; last = time.perf_counter()
    wait = max(0.0, start + i / rate - time.perf_counter()) if i < total else 0.05
    for fd, _ in poller.poll(wait):
        n = by_fd[fd]
        while True:
            try:
                data = socks[n].recv(1500)
            except BlockingIOError:
                break
            t = time.perf_counter()
            sent_at = pending.pop((n, struct.unpack("!H", data[:2])[0]), None)
            if sent_at is not None:
                rtts.append(t - sent_at)
print(json.dumps({"sent": sent, "rtts": rtts, "lost": len(pending),
                  "elapsed": time.perf_counter() - start}))
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def run_load(lab: Lab, server: str, rate: float, seconds: float) -> dict[str, object]:
    import subprocess

    argv = [sys.executable, "-c", LOAD, server, DB, str(rate), str(seconds)]
    done = subprocess.run(
        netns_exec_argv(lab.containers["client"].netns, argv),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def bucket_quantile(buckets: list[int], count: int, q: float) -> str:
    """The histogram's upper bound below which `q` of the verdicts fall."""
    if not count:
        return "-"
    for bound, n in zip(VERDICT_BUCKETS, buckets, strict=True):
        if n >= q * count:
            return f"≤ {bound * 1e3:g} ms"
    return f"> {VERDICT_BUCKETS[-1] * 1e3:g} ms"


def write_paths(
    writer: SetWriter, sets: str, netns: str, set_name: str, writes: int
) -> dict[str, float]:
    """p50/p99 seconds of one one-address write: netlink (kept open) and a process."""
    import time

    netlink = NetlinkSets(sets, netns)
    out: dict[str, float] = {}
    try:
        for label, path in (("netlink", netlink), ("process", writer)):
            times = []
            for i in range(writes):
                one = [Write(set_name, 4, ((f"198.19.{100 + i // 250}.{i % 250 + 1}", 60),))]
                start = time.perf_counter()
                path.write(one)
                times.append(time.perf_counter() - start)
            out[f"{label}_p50"] = pct(times, 50)
            out[f"{label}_p99"] = pct(times, 99)
    finally:
        netlink.close()
    return out


def one_backend(
    kind: str, rate: float, seconds: float, repeat: int, writes: int
) -> dict[str, object]:
    lab = Lab(
        [ContainerSpec("client", app_id="app-client", space_id="s")],
        [ServiceSpec("dns"), ServiceSpec("db", tcp_ports=(5432,))],
    ).start()
    dns: LabDns | None = None
    icpt: Interceptor | None = None
    try:
        assert lab.workdir is not None
        dns = LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir, 300)
        dns.start({DB: [lab.services["db"].ipv4]})
        resolver = (AddressRange.parse(dns.address),)
        policy = PolicySet(
            destinations=(
                Destination("db", "tcp", (), (PortRange(5432, 5432),), fqdns=(DB,)),
                Destination("dns", "udp", resolver, (PortRange(53, 53),)),
            ),
            egress_policies=(
                EgressPolicy("db", "app", "app-client", "db"),
                EgressPolicy("dns", "default", None, "dns"),
            ),
        )
        inventory = [Container("client", lab.containers["client"].ipv4, "app-client", "s")]
        plan = compile_cell(policy, inventory, "bench")
        runner = Runner.in_netns(lab.cell)
        backend: Backend
        writer: SetWriter
        if kind == "nftables":
            backend, writer, variant, sets = (
                NftablesBackend.open("auto", runner),
                NftWriter(runner),
                "nft",
                "nftables",
            )
        else:
            backend, writer, variant, sets = (
                IptablesBackend.open("legacy", runner),
                IpsetWriter(runner),
                "legacy",
                "ipset",
            )
        assert converge(backend, plan).ok
        service = FqdnService(writer, FqdnSettings(), netns=lab.cell, clients=[])
        service.want(plan)
        hold = DnsHold(runner, variant, QUEUE)
        icpt = Interceptor(service, hold, sets, [(dns.address, 53)], netns=lab.cell)
        icpt.follow(plan)
        (set_name,) = {n.set_name for n in plan.names if n.version == 4}
        paths = write_paths(writer, sets, lab.cell, set_name, writes)
        run_load(lab, dns.address, rate, 1.0)  # warm up dnsmasq and the sockets
        runs: dict[str, list[dict[str, object]]] = {"without": [], "with": []}
        dropped = 0
        for _ in range(repeat):
            hold.remove()
            runs["without"].append(run_load(lab, dns.address, rate, seconds))
            icpt.start()
            try:
                runs["with"].append(run_load(lab, dns.address, rate, seconds))
                counters = drops(lab.cell, QUEUE)  # per binding: read before unbinding
                if counters is not None:
                    dropped += counters.queue_dropped + counters.user_dropped
            finally:
                icpt.stop()
        out: dict[str, object] = {
            "backend": "iptables-legacy + ipset"
            if kind != "nftables"
            else "nftables (hold: iptables-nft)"
        }
        for mode, results in runs.items():
            rtts = [float(x) for r in results for x in r["rtts"]]  # type: ignore[attr-defined]
            out[f"{mode}_p50"] = pct(rtts, 50)
            out[f"{mode}_p99"] = pct(rtts, 99)
            out[f"{mode}_n"] = len(rtts)
            out[f"{mode}_lost"] = sum(int(str(r["lost"])) for r in results)
            out[f"{mode}_rate"] = statistics.mean(
                int(str(r["sent"])) / float(str(r["elapsed"])) for r in results
            )
        m = icpt.metrics
        out["learned"] = m.learned
        out["write_errors"] = m.write_errors
        out["last_error"] = m.last_error
        out["answers"] = m.answers
        out["verdict_mean_us"] = m.verdict_sum / m.verdict_count * 1e6 if m.verdict_count else 0
        out["verdict_p50"] = bucket_quantile(m.verdict_buckets, m.verdict_count, 0.5)
        out["verdict_p99"] = bucket_quantile(m.verdict_buckets, m.verdict_count, 0.99)
        out["queue_dropped"] = dropped
        out.update(paths)
        return out
    finally:
        if icpt is not None:
            icpt.stop(remove=True)
        if dns is not None:
            dns.stop()
        lab.teardown()


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writes", type=int, default=200)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    start_load = load_average()
    rows = [
        one_backend(k, args.rate, args.seconds, args.repeat, args.writes)
        for k in ("iptables", "nftables")
    ]
    lines = [
        f"DNS answers at {args.rate:,.0f}/s for {args.seconds:g} s, {args.repeat} alternating runs"
        " each without and with the interception (every answer learned: parsed, matched,"
        f" written to the name's set, then released); {machine()}; load average {start_load}"
        f" at the start, {load_average()} at the end (2 cores shared by other work);"
        f" code {revision()}.",
        "",
        "| backend | answers/s sent | p50 without | p50 with | added p50 | p99 without "
        "| p99 with | added p99 | lost (without/with) | kernel drops | write errors "
        "| verdict mean "
        "| verdict p50 | verdict p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def ms(key: str, row: dict[str, object] = r) -> float:
            return float(str(row[key])) * 1e3

        lines.append(
            f"| {r['backend']} | {float(str(r['with_rate'])):,.0f} | {ms('without_p50'):.3f} ms "
            f"| {ms('with_p50'):.3f} ms | {ms('with_p50') - ms('without_p50'):+.3f} ms "
            f"| {ms('without_p99'):.3f} ms | {ms('with_p99'):.3f} ms "
            f"| {ms('with_p99') - ms('without_p99'):+.3f} ms "
            f"| {r['without_lost']}/{r['with_lost']} | {r['queue_dropped']} | {r['write_errors']} "
            f"| {float(str(r['verdict_mean_us'])):.0f} µs | {r['verdict_p50']} "
            f"| {r['verdict_p99']} |"
        )
    lines += [
        "",
        f"One set write of one address, {args.writes} each, timed alone:",
        "",
        "| backend | netlink, kept open: p50 | p99 | a process per write: p50 | p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        us = {k: float(str(r[k])) * 1e6 for k in ("netlink_p50", "netlink_p99")}
        ms = {k: float(str(r[k])) * 1e3 for k in ("process_p50", "process_p99")}
        lines.append(
            f"| {r['backend']} | {us['netlink_p50']:.0f} µs | {us['netlink_p99']:.0f} µs "
            f"| {ms['process_p50']:.1f} ms | {ms['process_p99']:.1f} ms |"
        )
    text = "\n".join(lines)
    print(text)
    if args.record:
        splice(RESULTS / "fqdn.md", BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
