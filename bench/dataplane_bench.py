"""Converge one cell's iptables: from scratch, after a one-ASG change, and a no-op cycle.

The same synthetic cells as bench/compile_bench.py (250 containers; its repo generator and
inventory, sized here to 150k and 500k CF-equivalent rules), converged in fresh network
namespaces with iptables-legacy, iptables-nft and libiptc (legacy), and compared with two raw
`iptables-restore` runs into an empty namespace:

* the floor: our own rendered rules, restored in one go (what converging from scratch cannot
  beat: it renders and sends exactly this, after a read of a table holding none of it);
* CF: Cloud Foundry's per-container layout of the same policies and inventory
  (reconciler/backends/iptables/cflayout.py), what a CF cell has to load.

Each round converges every backend from scratch twice, each in a fresh namespace: once as a
one-shot `asgctl apply` does (read back at once), once as the agent does (the install read
back by the next cycle's read).  The agent's namespace then runs that next cycle, an idle
cycle, four one-ASG changes (the first follows a full read) and a no-op cycle twice (the
first after a change re-reads the kernel, the second is an idle agent's cycle); on legacy
tables, a few more idle cycles follow, each after counters moved as in a busy cell.  The
backends are interleaved within each round, so the noise of a shared machine falls on all of
them alike; figures are medians.  The xtables lock is a private file (XTABLES_LOCKFILE), so
other people's iptables runs on the machine do not show up as waits.  Needs root; about three
minutes with the defaults.

Usage: .venv/bin/python bench/dataplane_bench.py [--repeat 3] [--case 150k] [--record]
       [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine
from bench.compile_bench import build_repo, inventory
from reconciler.backends import ConvergeResult, Runner, converge, open_backend
from reconciler.backends.contract import Backend
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.iptables.cflayout import render_cf, rule_count
from reconciler.backends.iptables.delta import compute_delta
from reconciler.backends.iptables.parse import OwnedState
from reconciler.backends.iptables.render import GROUP_PREFIX, render_cell
from reconciler.compile import compile_cell
from reconciler.lab.netns import Lab
from reconciler.model import AddressRange, PolicySet, PortRange, Rule
from reconciler.plan import CellPlan
from reconciler.policy.load import load_folder

# name: (ASGs, rules per ASG, ASGs bound per space) for compile_bench's build_repo; 250
# containers each.  Sized to CF's real layout (compile_bench's own cases count 172k and 572k).
CASES = {
    "150k": (100, 26, 20),
    "500k": (200, 87, 20),
}
BUSY_CYCLES = 3  # idle cycles per round after counters moved as in a busy cell (legacy)
CHANGES = 4  # one-ASG changes per round: A->B, B->A, ...; the first follows a full read
# (label, backend, iptables variant)
BACKENDS = (
    ("legacy", "iptables", "legacy"),
    ("nft", "iptables", "nft"),
    ("libiptc", "libiptc", "legacy"),
)
VARIANTS = ("legacy", "nft")
# The rule a one-ASG change adds to (and then removes from) one bound ASG.
EXTRA_RULE = Rule("tcp", (AddressRange.parse("198.19.250.250"),), (PortRange(8443, 8443),))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One case: the plan, the plan after a one-ASG change, and the two raw transactions."""

    name: str
    plan: CellPlan
    changed: CellPlan
    changed_asg: str
    ours: str
    cf: str

    @property
    def cf_rules(self) -> int:
        return rule_count(self.cf)


def one_asg_changed(policy: PolicySet) -> tuple[PolicySet, str]:
    """The policy with one rule added to the first ASG bound to some spaces."""
    groups = list(policy.security_groups)
    i = next(i for i, g in enumerate(groups) if g.running_spaces)
    groups[i] = dataclasses.replace(groups[i], rules=(*groups[i].rules, EXTRA_RULE))
    return dataclasses.replace(policy, security_groups=tuple(groups)), groups[i].name


def build_cell(name: str) -> Cell:
    with tempfile.TemporaryDirectory(prefix="asgctl-bench-") as tmp:
        build_repo(Path(tmp), *CASES[name])
        result = load_folder(tmp)
    assert result.ok and result.policy is not None
    containers = inventory()
    plan = compile_cell(result.policy, containers, "bench")
    changed_policy, asg = one_asg_changed(result.policy)
    changed = compile_cell(changed_policy, containers, "bench")
    assert not any(c.container.version == 6 for c in plan.containers)
    return Cell(name, plan, changed, asg, render_cell(plan, 4).text(), render_cf(plan, 4))


@contextmanager
def fresh_cell() -> Iterator[str]:
    """An empty cell namespace (no containers, no conntrack), removed afterwards."""
    with Lab(conntrack=False) as lab:
        yield lab.cell


def open_in(netns: str, kind: str, variant: str) -> Backend:
    """A backend for the namespace; it takes the benchmark's own xtables lock (see main)."""
    return open_backend(kind, variant, Runner.in_netns(netns))


def raw(netns: str, argv: list[str], stdin: str | None = None) -> float:
    """Wall time of one tool run in the namespace (the same `ip netns exec` as converge)."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[:300]}")
    return elapsed


def busy_counters(netns: str, variant: str, plan: CellPlan, n: int) -> None:
    """Counters moved as traffic moves them in a busy cell: every rule of every container
    chain and of the dispatch chain (each container forwards established traffic and opens
    connections), and the first rule of every group (one destination each just reached).

    One `iptables-restore --counters` rewriting those chains with the same rules and new
    counters (`n` packets each): what an idle cycle then reads differs from the last read in
    counters only, in most of the table.  Legacy tables only: nft's generation id does not
    move with counters, and rewriting would move it.
    """
    lines = ["*filter"]
    chains = render_cell(plan, 4).chains
    lines += [f":{name} - [0:0]" for name in chains]
    for name, rules in chains.items():
        group = name.startswith(GROUP_PREFIX)
        for i, rule in enumerate(rules):
            moved = not group or i == 0
            lines.append(f"[{n if moved else 0}:{n * 100 if moved else 0}] {rule}")
    lines.append("COMMIT")
    restore = [f"iptables-{variant}-restore", "--noflush", "--counters"]
    raw(netns, restore, "\n".join(lines) + "\n")


def timed_converge(
    backend: Backend, plan: CellPlan, last: CellPlan | None, *, agent: bool = True
) -> tuple[float, dict]:
    """One converge as the agent runs it (an install read back by the next cycle), or, with
    `agent=False`, as a one-shot `asgctl apply` does (everything read back at once)."""
    start = time.perf_counter()
    result = converge(backend, plan, last, defer_install_verify=agent)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise RuntimeError(f"{backend.name}: {[f.error for f in result.families]}")
    return elapsed, phases(result)


def phases(result: ConvergeResult) -> dict[str, float]:
    """IPv4's phases, plus the whole IPv6 pass (no v6 containers here: its cost is overhead)."""
    out: dict[str, float] = {}
    for f in result.families:
        if f.family == 4:
            out.update(f.timings)
        else:
            out["v6"] = sum(f.timings.values())
    return out


class Samples:
    """Seconds per (case, backend, measure), and per-phase seconds for converge runs."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        self.phases: dict[tuple[str, str, str], list[dict[str, float]]] = defaultdict(list)

    def add(self, key: tuple[str, str, str], seconds: float, ph: dict | None = None) -> None:
        self.times[key].append(seconds)
        if ph is not None:
            self.phases[key].append(ph)

    def median(self, key: tuple[str, str, str]) -> float:
        return statistics.median(self.times[key])

    def phase_medians(self, key: tuple[str, str, str]) -> dict[str, float]:
        runs = self.phases[key]
        names = dict.fromkeys(k for r in runs for k in r)
        return {n: statistics.median(r.get(n, 0.0) for r in runs) for n in names}


def measure(cell: Cell, samples: Samples, repeat: int, cf_repeat: int, wait: int) -> None:
    """`repeat` rounds; each round runs every measure once per backend, side by side.

    The raw restores use the flags converge uses (`--noflush --wait`), so both take the
    xtables lock alike.  CF's layout, by far the slowest, is restored in the first
    `cf_repeat` rounds only.
    """
    for rnd in range(repeat):
        for variant in VARIANTS:
            restore = [f"iptables-{variant}-restore", "--noflush", f"--wait={wait}"]
            with fresh_cell() as ns:
                samples.add((cell.name, variant, "floor"), raw(ns, restore, cell.ours))
                save = raw(ns, [f"iptables-{variant}-save", "-t", "filter"])
                samples.add((cell.name, variant, "save"), save)
            if rnd < cf_repeat:
                with fresh_cell() as ns:
                    samples.add((cell.name, variant, "cf"), raw(ns, restore, cell.cf))
        for label, kind, variant in BACKENDS:
            key = (cell.name, label)
            with fresh_cell() as ns:
                backend = open_in(ns, kind, variant)
                one_shot = timed_converge(backend, cell.plan, None, agent=False)
                samples.add((*key, "scratch, verified at once"), *one_shot)
            with fresh_cell() as ns:
                backend = open_in(ns, kind, variant)
                samples.add((*key, "scratch"), *timed_converge(backend, cell.plan, None))
                samples.add((*key, "install check"), *timed_converge(backend, cell.plan, cell.plan))
                samples.add((*key, "idle"), *timed_converge(backend, cell.plan, cell.plan))
                plans = (cell.plan, cell.changed)
                for i in range(CHANGES):
                    new, old = plans[(i + 1) % 2], plans[i % 2]
                    what = "first change" if i == 0 else "change"
                    samples.add((*key, what), *timed_converge(backend, new, old))
                samples.add((*key, "noop"), *timed_converge(backend, cell.plan, cell.plan))
                samples.add((*key, "idle"), *timed_converge(backend, cell.plan, cell.plan))
                if variant == "legacy":
                    for n in range(1, BUSY_CYCLES + 1):
                        busy_counters(ns, variant, cell.plan, rnd * BUSY_CYCLES + n)
                        idle = timed_converge(backend, cell.plan, cell.plan)
                        samples.add((*key, "idle, busy counters"), *idle)
        print(f"  {cell.name}: round {rnd + 1}/{repeat} done", file=sys.stderr, flush=True)


def profile(cell: Cell) -> str:
    """Where a converge spends its Python time (cProfile, cumulative), per backend and cycle."""
    out = io.StringIO()
    for label, kind, variant in BACKENDS:
        with fresh_cell() as ns:
            backend = open_in(ns, kind, variant)
            for what, plan, last in (
                ("scratch", cell.plan, None),
                ("change", cell.changed, cell.plan),
                ("noop", cell.changed, cell.changed),
            ):
                prof = cProfile.Profile()
                prof.runcall(converge, backend, plan, last)
                out.write(f"\n### {cell.name} {label} {what}\n")
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(14)
    return out.getvalue()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def share_verdict(part: float, whole: float, share: float = 0.1) -> str:
    return f"{'met' if part <= share * whole else 'missed'} ({part / whole:.1%})"


def busy_idle(s: Samples, case: str, label: str) -> float | None:
    key = (case, label, "idle, busy counters")
    return s.median(key) if s.times.get(key) else None


def tables(cells: list[Cell], s: Samples) -> list[str]:
    lines = [
        "| case | backend | floor: restore ours | CF layout: restore | from scratch | "
        "scratch / floor | the next cycle (reads the install back) | one-shot apply from scratch "
        "(read back at once) | one-shot / floor | CF / scratch | one-ASG change | "
        "first change after a full read | no-op cycle (idle) | idle / scratch | "
        "idle, busy counters | busy / scratch | first no-op after a change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            floor = s.median((cell.name, variant, "floor"))
            cf = s.median((cell.name, variant, "cf"))
            scratch = s.median((cell.name, label, "scratch"))
            check = s.median((cell.name, label, "install check"))
            once = s.median((cell.name, label, "scratch, verified at once"))
            change = s.median((cell.name, label, "change"))
            first = s.median((cell.name, label, "first change"))
            noop = s.median((cell.name, label, "noop"))
            idle = s.median((cell.name, label, "idle"))
            busy = busy_idle(s, cell.name, label)
            lines.append(
                f"| {cell.name} | {label} | {ms(floor)} | {ms(cf)} | {ms(scratch)} | "
                f"{scratch / floor:.2f}x | {ms(check)} | {ms(once)} | {once / floor:.2f}x | "
                f"{cf / scratch:.1f}x | {ms(change)} | {ms(first)} | "
                f"{ms(idle)} | {idle / scratch:.1%} | "
                + (f"{ms(busy)} | {busy / scratch:.1%}" if busy is not None else "- | -")
                + f" | {ms(noop)} |"
            )
    lines += [
        "",
        "From scratch is the agent's cycle: it installs and leaves the read-back to the next "
        "cycle's read (`converge(..., defer_install_verify=True)`), whose time is the next "
        'column.  A one-shot `asgctl apply` reads back at once.  "Idle, busy counters" is '
        "an idle cycle on a legacy table whose counters moved since the last cycle as a busy "
        "cell's do (`busy_counters`); on nft counters do not move the generation id.",
        "",
        "Targets: from scratch <= 1.3x the floor; one-ASG change on nft <= 100 ms; "
        "no-op (idle) <= 10% of from scratch; the last column applies that target to the "
        "busy-counters idle cycle as well (legacy tables only).",
        "",
        "| case | backend | scratch <= 1.3x floor | nft change <= 100 ms | no-op <= 10% | "
        "no-op <= 10%, busy counters |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            floor = s.median((cell.name, variant, "floor"))
            scratch = s.median((cell.name, label, "scratch"))
            change = s.median((cell.name, label, "change"))
            idle = s.median((cell.name, label, "idle"))
            busy = busy_idle(s, cell.name, label)
            nft = ("met" if change <= 0.1 else "missed") if label == "nft" else "-"
            busy_verdict = share_verdict(busy, scratch) if busy else "-"
            lines.append(
                f"| {cell.name} | {label} | "
                f"{'met' if scratch <= 1.3 * floor else 'missed'} ({scratch / floor:.2f}x) | "
                f"{nft} | {share_verdict(idle, scratch)} | {busy_verdict} |"
            )
    lines += [
        "",
        "Per phase (medians of the IPv4 pass; `read` and `verify` include iptables-save and "
        "its parse when they need one, `apply` is the restore or the libiptc commit, `v6` the "
        "whole IPv6 pass: no IPv6 containers here), and a bare `iptables-save -t filter` of "
        "our rules:",
        "",
        "| case | backend | cycle | render | read | delta | apply | verify | v6 | save alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            save = s.median((cell.name, variant, "save"))
            for what in (
                "scratch",
                "install check",
                "scratch, verified at once",
                "first change",
                "change",
                "noop",
                "idle",
                "idle, busy counters",
            ):
                if not s.times.get((cell.name, label, what)):
                    continue
                p = s.phase_medians((cell.name, label, what))
                cols = " | ".join(
                    ms(p[k]) if k in p else "-"
                    for k in ("render", "read", "delta", "apply", "verify", "v6")
                )
                lines.append(f"| {cell.name} | {label} | {what} | {cols} | {ms(save)} |")
    return lines


def sizes(cells: list[Cell]) -> list[str]:
    lines = [
        "| case | containers | CF-equivalent rules | CF layout lines | our rules | "
        "our chains | one-ASG change |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        d = compute_delta(render_cell(c.changed, 4), OwnedState(4, render_cell(c.plan, 4).chains))
        lines.append(
            f"| {c.name} | {len(c.plan.containers)} | {c.plan.cf_equivalent_rules:,} | "
            f"{c.cf_rules:,} | {c.plan.installed_rules:,} | {c.plan.chains:,} | "
            f"one rule added to {c.changed_asg}: {len(d.written)} chains written, "
            f"{len(d.deleted)} deleted, {len(d.ops):,} lines |"
        )
    return lines


def versions() -> str:
    """The tools measured: iptables (both variants) and python-iptables."""
    out = subprocess.run(["iptables-legacy", "-V"], capture_output=True, text=True).stdout
    try:
        from importlib.metadata import version

        pyipt = f"python-iptables {version('python-iptables')}"
    except Exception:
        pyipt = "python-iptables not installed"
    return f"{out.strip()} and its nf_tables variant, {pyipt}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--cf-repeat", type=int, default=3, help="rounds that also restore CF's layout"
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print cProfile output")
    parser.add_argument("--output", default="dataplane.md", help="file under bench/results/")
    args = parser.parse_args()
    names = args.case or list(CASES)
    # A lock of the benchmark's own: legacy iptables (and the libiptc backend) take the
    # xtables lock, one file for every namespace on the host, and on a shared machine other
    # people's iptables runs would otherwise show up here as seconds of waiting.
    os.environ["XTABLES_LOCKFILE"] = str(Path(tempfile.gettempdir()) / "asgctl-bench-xtables.lock")
    started = time.perf_counter()
    cells = []
    samples = Samples()
    wait = IptablesBackend("legacy").wait_seconds
    for name in names:
        cell = build_cell(name)
        cells.append(cell)
        print(
            f"{name}: {cell.plan.cf_equivalent_rules:,} CF-equivalent rules, "
            f"{cell.plan.installed_rules:,} ours",
            file=sys.stderr,
            flush=True,
        )
        measure(cell, samples, args.repeat, min(args.cf_repeat, args.repeat), wait)
    lines = [*sizes(cells), "", *tables(cells, samples)]
    print("\n".join(lines))
    took = time.perf_counter() - started
    print(f"\n({took:.0f} s)", file=sys.stderr)
    if args.profile:
        print("".join(profile(c) for c in cells))
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        flags = " ".join(sys.argv[1:])
        (RESULTS / args.output).write_text(
            "# Dataplane benchmark (one cell, 250 containers)\n\n"
            f"Machine: {machine()}; {versions()}\n\n"
            f"Command (as root): `.venv/bin/python bench/dataplane_bench.py {flags}` "
            f"({args.repeat} rounds, medians; {took:.0f} s in all)\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
