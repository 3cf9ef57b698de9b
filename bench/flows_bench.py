"""Flow records: what the agent's NFLOG reader sustains, its CPU, and what logging adds to a
denied connect (NFLOG vs LOG vs none), side by side.

Everything runs in a network namespace of its own (lo holds 198.18.0.1, the "container",
and 198.19.0.1, the destination), with the agent's real reader (`flows.collect.Collector`,
its netlink socket opened in the namespace as the agent opens it) and real rules:

* reader throughput: a sender process in the namespace sends UDP datagrams from
  198.18.0.1 as fast as it can for `--seconds`; an OUTPUT rule logs every one of them to
  NFLOG with a container's deny prefix (no rate limit: the reader is what is measured) and
  drops it.  Two shapes: one flow (every packet the same aggregate: what a retrying client
  looks like) and distinct flows (each packet its own port: every packet a record, the
  writer's worst case).  Reported: packets aggregated per second, records written per
  second, the reader process's CPU seconds per 10,000 packets and per 10,000 records
  (getrusage of this process, whose only busy threads are the reader and writer; the
  sender is another process), and what the kernel could not queue (NFLOG sequence gaps).
* denied-connect latency: TCP connects to 198.19.0.1:9 answered by REJECT
  (icmp-port-unreachable, as the renderers write it), timed one by one in a child process,
  with the deny rule preceded by nothing, by the LOG rule as rendered in `log` mode
  (limit 1/s), or by the NFLOG rule as rendered in `nflog` mode (limit 1000/s, with the
  reader bound), in iptables and in nftables; modes alternate in rounds so that a shared
  machine's noise falls on all of them alike.

Usage: .venv/bin/python bench/flows_bench.py [--seconds 3] [--connects 2000] [--record]
Needs root.  Not part of `make test`; it records, it does not assert.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, revision  # noqa: E402
from reconciler.core.cellplan import log_id  # noqa: E402
from reconciler.core.compile import compile_cell  # noqa: E402
from reconciler.core.model import Container, PolicySet  # noqa: E402
from reconciler.flows.collect import Collector, CollectorSettings  # noqa: E402
from reconciler.flows.record import DENY, log_prefix  # noqa: E402

SRC, DST, GROUP = "198.18.0.1", "198.19.0.1", 4242

SENDER = textwrap.dedent(
    """\
    import socket, sys, time
    src, dst, seconds, distinct = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setblocking(False)
    sent, port, end = 0, 1, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(500):
            if distinct:
                port = port + 1 if port < 65535 else 1
            try:
                s.sendto(b"x", (dst, port))
            except OSError:
                pass
            sent += 1
    print(sent)
    """
)

CONNECTOR = textwrap.dedent(
    """\
    import json, socket, sys, time
    src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(2.0)
        s.bind((src, 0))
        t = time.perf_counter()
        try:
            s.connect((dst, 9))
        except OSError:
            pass
        out.append(time.perf_counter() - t)
        s.close()
    print(json.dumps(out))
    """
)


def sh(*argv: str, input: str | None = None) -> str:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *argv: str, input: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *argv, input=input)


def make_ns() -> str:
    ns = f"asgflowbench{os.getpid()}"
    sh("ip", "netns", "add", ns)
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "ip", "addr", "add", f"{SRC}/32", "dev", "lo")
    in_ns(ns, "ip", "addr", "add", f"{DST}/32", "dev", "lo")
    # The namespace's own ICMP limits: REJECT answers every SYN, not 1 a second per peer.
    in_ns(ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv4.icmp_msgs_per_sec=1000000")
    return ns


def prefix_and_plan() -> tuple[str, object]:
    container = Container("bench-0", SRC, "app-bench", "space-bench", "org-bench", "", "app")
    plan = compile_cell(PolicySet(), (container,), "bench")
    return log_prefix(DENY, log_id(plan.containers[0].chain_id)), plan


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def collector(ns: str, state: Path, plan: object, **kw: object) -> Collector:
    settings = CollectorSettings(cell="bench", state_dir=state, group=GROUP, netns=ns, **kw)  # type: ignore[arg-type]
    c = Collector(settings)
    c.set_context(plan, None)  # type: ignore[arg-type]
    c.start()
    if not c.bound.wait(10):
        raise SystemExit(f"the reader did not bind NFLOG group {GROUP}: {c.error}")
    return c


def throughput(ns: str, seconds: float, distinct: bool) -> dict[str, float]:
    prefix, plan = prefix_and_plan()
    in_ns(ns, "iptables", "-F", "OUTPUT")
    in_ns(ns, "iptables", "-A", "OUTPUT", "-d", DST, "-p", "udp", "-j", "NFLOG",
          "--nflog-prefix", prefix, "--nflog-group", str(GROUP))  # fmt: skip
    in_ns(ns, "iptables", "-A", "OUTPUT", "-d", DST, "-p", "udp", "-j", "DROP")
    with tempfile.TemporaryDirectory() as tmp:
        c = collector(ns, Path(tmp), plan, window=1.0, max_aggregates=1_000_000,
                      max_bytes=1 << 30)  # fmt: skip
        start_cpu, start = cpu(), time.perf_counter()
        out = in_ns(ns, sys.executable, "-c", SENDER, SRC, DST, str(seconds),
                    "1" if distinct else "0")  # fmt: skip
        time.sleep(1.5)  # the last window closes and is written
        c.stop()
        elapsed, used = time.perf_counter() - start, cpu() - start_cpu
    packets = sum(c.aggregator.packets.values())
    del out  # the sender's count includes sends the DROP refused: the reader's is the figure
    return {
        "packets": packets,
        "records": c.records,
        "kernel_lost": c.aggregator.drops.counts["kernel"],
        "seconds": elapsed,
        "packets_per_s": packets / seconds,
        "records_per_s": c.records / seconds,
        "cpu_s": used,
        "cpu_per_10k_packets": used / packets * 10_000 if packets else float("nan"),
        "cpu_per_10k_records": used / c.records * 10_000 if c.records else float("nan"),
    }


def _ipt_rules(mode: str, prefix: str) -> list[list[str]]:
    base = ["-A", "OUTPUT", "-d", DST, "-p", "tcp"]
    rules = []
    if mode == "log":
        rules.append([*base, "-m", "limit", "--limit", "1/sec", "-j", "LOG",
                      "--log-prefix", prefix])  # fmt: skip
    elif mode == "nflog":
        limit = ["-m", "limit", "--limit", "1000/sec", "--limit-burst", "1000"]
        nflog = ["-j", "NFLOG", "--nflog-prefix", prefix, "--nflog-group", str(GROUP)]
        rules.append([*base, *limit, *nflog])
    rules.append([*base, "-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
    return rules


def _nft_script(mode: str, prefix: str) -> str:
    match = f"ip daddr {DST} meta l4proto tcp"
    log = ""
    if mode == "log":
        log = f'{match} limit rate 1/second burst 5 packets log prefix "{prefix}"\n'
    elif mode == "nflog":
        log = (
            f"{match} limit rate 1000/second burst 1000 packets "
            f'log prefix "{prefix}" group {GROUP}\n'
        )
    return (
        "table inet flowbench {\nchain out {\ntype filter hook output priority 0; policy accept;\n"
        f"{log}{match} reject with icmpx port-unreachable\n}}\n}}\n"
    )


def set_mode(ns: str, backend: str, mode: str, prefix: str) -> None:
    in_ns(ns, "iptables", "-F", "OUTPUT")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "flowbench"],
                   capture_output=True, check=False)  # fmt: skip
    if backend == "iptables":
        for rule in _ipt_rules(mode, prefix):
            in_ns(ns, "iptables", *rule)
    else:
        in_ns(ns, "nft", "-f", "-", input=_nft_script(mode, prefix))


def latency(ns: str, connects: int, rounds: int) -> dict[str, dict[str, float]]:
    prefix, plan = prefix_and_plan()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        c = collector(ns, Path(tmp), plan, window=1.0)
        try:
            for _ in range(rounds):
                for backend in ("iptables", "nftables"):
                    for mode in ("none", "log", "nflog"):
                        set_mode(ns, backend, mode, prefix)
                        out = in_ns(ns, sys.executable, "-c", CONNECTOR, SRC, DST,
                                    str(connects // rounds))  # fmt: skip
                        samples.setdefault(f"{backend} {mode}", []).extend(json.loads(out))
        finally:
            c.stop()
        logged = sum(c.aggregator.packets.values())
    out: dict[str, dict[str, float]] = {}
    for key, values in samples.items():
        values.sort()
        out[key] = {
            "n": len(values),
            "median_us": statistics.median(values) * 1e6,
            "p90_us": values[int(len(values) * 0.9)] * 1e6,
            "p99_us": values[int(len(values) * 0.99)] * 1e6,
        }
    out["_nflog_packets_read"] = {"n": logged}
    return out


def report(tp: dict[str, dict[str, float]], lat: dict[str, dict[str, float]], args: object) -> str:
    lines = [
        f"Machine: {machine()}",
        f"Code: {revision()}",
        f"Command: .venv/bin/python bench/flows_bench.py --seconds {args.seconds} "  # type: ignore[attr-defined]
        f"--connects {args.connects}",  # type: ignore[attr-defined]
        "",
        "### Reader throughput (NFLOG, no kernel rate limit, one sender process)",
        "",
        "| shape | packets read | kernel could not queue | packets/s read | "
        "records/s written | CPU s | CPU s / 10k packets | CPU s / 10k records |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, r in tp.items():
        per_record = f"{r['cpu_per_10k_records']:.3f}" if r["records"] >= 1000 else "-"
        lines.append(
            f"| {shape} | {r['packets']:,} | {r['kernel_lost']:,} | "
            f"{r['packets_per_s']:,.0f} | {r['records_per_s']:,.0f} | {r['cpu_s']:.2f} | "
            f"{r['cpu_per_10k_packets']:.3f} | {per_record} |"
        )
    lines += [
        "",
        "### Denied connect latency (connect() to ECONNREFUSED), microseconds",
        "",
        "| backend | logging | connects | median | p90 | p99 | median added vs none |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend in ("iptables", "nftables"):
        base = lat[f"{backend} none"]["median_us"]
        for mode in ("none", "log", "nflog"):
            r = lat[f"{backend} {mode}"]
            lines.append(
                f"| {backend} | {mode} | {r['n']:.0f} | {r['median_us']:.1f} | "
                f"{r['p90_us']:.1f} | {r['p99_us']:.1f} | {r['median_us'] - base:+.1f} |"
            )
    lines.append("")
    lines.append(
        f"NFLOG packets the reader aggregated during the latency runs: "
        f"{lat['_nflog_packets_read']['n']:.0f} (LOG mode logs at most 1/s, as silk does)."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    ns = make_ns()
    try:
        tp = {
            "one flow": throughput(ns, args.seconds, distinct=False),
            "distinct flows": throughput(ns, args.seconds, distinct=True),
        }
        lat = latency(ns, args.connects, args.rounds)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    text = report(tp, lat, args)
    print(text)
    if args.record:
        path = RESULTS / "flows.md"
        head = "# Flow records: reader throughput, CPU, denied-connect latency\n\n"
        path.write_text(head + text)
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
