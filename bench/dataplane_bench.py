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
other people's iptables runs on the machine do not show up as waits.

Every case is converged under two sets of cell settings (plan `CellSettings`), interleaved
within every round the way the backends are, and in alternating order from round to round:
none (every packet a container sends is judged, no deny networks) and a CF-like cell's
(`SETTINGS`: the FORWARD hook only for packets leaving through the underlay, `-o eth0` /
`oifname`, and deny networks, three `always`, two `running`, one `staging`; they are only
rendered, no traffic is sent).  The ratio "with settings / without" is measured side by side:
the ratio of the medians, and the median of the per-round paired ratios.  Needs root; about
six minutes with the defaults.

Usage: .venv/bin/python bench/dataplane_bench.py [--repeat 3] [--case 150k] [--record]
       [--settings both|none|cf] [--json FILE] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
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

from asgctl_lab.netns import Lab
from bench.common import RESULTS, machine, revision, splice
from bench.compile_bench import build_repo, inventory
from reconciler.backends import ConvergeResult, Runner, converge, open_backend
from reconciler.backends.contract import Backend
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.iptables.cflayout import render_cf, rule_count
from reconciler.backends.iptables.delta import compute_delta
from reconciler.backends.iptables.parse import OwnedState
from reconciler.backends.iptables.render import GROUP_PREFIX, marker_rule, render_cell
from reconciler.core.cellplan import CellPlan, CellSettings, DenyNetworks
from reconciler.core.compile import compile_cell
from reconciler.core.model import AddressRange, PolicySet, PortRange, Rule
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
# The cell settings each case is converged under: none, and a CF-like cell's.  The underlay
# name is rendered only (an `-o` / `oifname` match need not name an existing interface); the
# deny networks are documentation ranges (RFC 5737), disjoint from every ASG destination here
# (198.18.0.0/15), standing in for an operator's metadata and link-local denies.
SETTINGS: dict[str, CellSettings | None] = {
    "none": None,
    "cf": CellSettings(
        ("eth0",),
        ("eth0",),
        DenyNetworks(
            always=("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/25"),
            running=("203.0.113.128/26", "203.0.113.192/27"),
            staging=("203.0.113.224/27",),
        ),
    ),
}
SETTINGS_NOTE = {
    "none": "no cell settings",
    "cf": "underlay `eth0` + deny_networks (3 always, 2 running, 1 staging)",
}
# The rule a one-ASG change adds to (and then removes from) one bound ASG.
EXTRA_RULE = Rule("tcp", (AddressRange.parse("198.19.250.250"),), (PortRange(8443, 8443),))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One case under one set of cell settings: the plan, the plan after a one-ASG change,
    and the two raw transactions."""

    name: str
    settings: str
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


def build_cells(name: str, settings: list[str]) -> list[Cell]:
    """The case under each of the settings named (one policy repo, compiled per settings)."""
    with tempfile.TemporaryDirectory(prefix="asgctl-bench-") as tmp:
        build_repo(Path(tmp), *CASES[name])
        result = load_folder(tmp)
    assert result.ok and result.policy is not None
    containers = inventory()
    changed_policy, asg = one_asg_changed(result.policy)
    cells = []
    for label in settings:
        plan = compile_cell(result.policy, containers, "bench", SETTINGS[label])
        changed = compile_cell(changed_policy, containers, "bench", SETTINGS[label])
        assert not any(c.container.version == 6 for c in plan.containers)
        ours, cf = render_cell(plan, 4).text(), render_cf(plan, 4)
        cells.append(Cell(name, label, plan, changed, asg, ours, cf))
    return cells


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
    counters only, in most of the table (a rewrite that left anything else different would
    measure a repair, not an idle cycle).  Legacy tables only: nft's generation id does not
    move with counters, and rewriting would move it.
    """
    lines = ["*filter"]
    chains = render_cell(plan, 4).chains
    lines += [f":{name} - [0:0]" for name in chains]
    for name, rules in chains.items():
        group = name.startswith(GROUP_PREFIX)
        # Each chain as the kernel holds it: the ownership marker on top (every packet
        # entering the chain moves its counters), then the plan's rules.
        lines.append(f"[{n}:{n * 100}] {marker_rule(name)}")
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


Key = tuple[str, str, str, str]  # (case, settings, backend or iptables variant, measure)


class Samples:
    """Seconds per (case, settings, backend, measure), and per-phase seconds for converges.

    Samples of one key are kept in the order taken, and every round takes the same number of
    each under every settings, so the i-th samples of two settings are a side-by-side pair.
    """

    def __init__(self) -> None:
        self.times: dict[Key, list[float]] = defaultdict(list)
        self.phases: dict[Key, list[dict[str, float]]] = defaultdict(list)

    def add(self, key: Key, seconds: float, ph: dict | None = None) -> None:
        self.times[key].append(seconds)
        if ph is not None:
            self.phases[key].append(ph)

    def median(self, key: Key) -> float:
        return statistics.median(self.times[key])

    def paired_ratio(self, key: Key, base: Key) -> float:
        """The median of the per-pair ratios key / base (pairs taken side by side)."""
        pairs = zip(self.times[key], self.times[base], strict=True)
        return statistics.median(a / b for a, b in pairs if b > 0)

    def to_json(self) -> dict[str, object]:
        return {
            "|".join(k): {"median": self.median(k), "samples": v, "phases": self.phase_medians(k)}
            for k, v in self.times.items()
        }

    def phase_medians(self, key: Key) -> dict[str, float]:
        runs = self.phases[key]
        names = dict.fromkeys(k for r in runs for k in r)
        return {n: statistics.median(r.get(n, 0.0) for r in runs) for n in names}


def measure(cells: list[Cell], samples: Samples, repeat: int, cf_repeat: int, wait: int) -> None:
    """`repeat` rounds of one case; each round runs every measure once per backend and
    settings, side by side: backend by backend, each under every settings in turn (the order
    of the settings reversed every other round, so neither always runs first).

    The raw restores use the flags converge uses (`--noflush --wait`), so both take the
    xtables lock alike.  CF's layout, by far the slowest, is restored in the first
    `cf_repeat` rounds only.
    """
    for rnd in range(repeat):
        turn = cells if rnd % 2 == 0 else cells[::-1]
        for variant in VARIANTS:
            restore = [f"iptables-{variant}-restore", "--noflush", f"--wait={wait}"]
            for cell in turn:
                key = (cell.name, cell.settings, variant)
                with fresh_cell() as ns:
                    samples.add((*key, "floor"), raw(ns, restore, cell.ours))
                    samples.add(
                        (*key, "save"), raw(ns, [f"iptables-{variant}-save", "-t", "filter"])
                    )
            if rnd < cf_repeat:
                for cell in turn:
                    with fresh_cell() as ns:
                        samples.add(
                            (cell.name, cell.settings, variant, "cf"), raw(ns, restore, cell.cf)
                        )
        for label, kind, variant in BACKENDS:
            for cell in turn:
                converge_cycles(cell, samples, label, kind, variant, rnd)
        print(f"  {cells[0].name}: round {rnd + 1}/{repeat} done", file=sys.stderr, flush=True)


def converge_cycles(
    cell: Cell, samples: Samples, label: str, kind: str, variant: str, rnd: int
) -> None:
    """One round's converges of one backend under one settings (see the module docstring)."""
    key = (cell.name, cell.settings, label)
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
                out.write(f"\n### {cell.name} {cell.settings} {label} {what}\n")
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(14)
    return out.getvalue()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def share_verdict(part: float, whole: float, share: float = 0.1) -> str:
    return f"{'met' if part <= share * whole else 'missed'} ({part / whole:.1%})"


def busy_idle(s: Samples, cell: Cell, label: str) -> float | None:
    key = (cell.name, cell.settings, label, "idle, busy counters")
    return s.median(key) if s.times.get(key) else None


# The headline measures of the settings comparison: (measure key, column title).
HEADLINE = (
    ("scratch", "from scratch"),
    ("change", "one-ASG change"),
    ("idle", "no-op cycle (idle)"),
    ("idle, busy counters", "idle, busy counters"),
)
BUDGET = 0.05  # issue 13: the underlay match and deny_networks may cost at most 5%


def settings_table(cells: list[Cell], s: Samples) -> list[str]:
    """Per case and backend: each headline figure without and with the CF-like settings, and
    the ratio side by side (of the medians; in brackets the median of per-round pairs)."""
    by_case: dict[str, dict[str, Cell]] = defaultdict(dict)
    for c in cells:
        by_case[c.name][c.settings] = c
    pairs = [(case, d["none"], d["cf"]) for case, d in by_case.items() if len(d) == 2]
    if not pairs:
        return []
    head = " | ".join(f"{t}: none | {t}: cf | cf / none" for _, t in HEADLINE)
    lines = [
        f"With the CF-like settings ({SETTINGS_NOTE['cf']}) against none, side by side in the "
        "same rounds: ratio of the medians, and in brackets the median of the per-round "
        "paired ratios.",
        "",
        f"| case | backend | {head} |",
        "|---|---|" + "---|---|---|" * len(HEADLINE),
    ]
    over: list[str] = []
    for case, _, _ in pairs:
        for label, _, _ in BACKENDS:
            cols = []
            for what, title in HEADLINE:
                a, b = (case, "none", label, what), (case, "cf", label, what)
                if not s.times.get(a):
                    cols.append("- | - | -")
                    continue
                ratio, paired = s.median(b) / s.median(a), s.paired_ratio(b, a)
                cols.append(f"{ms(s.median(a))} | {ms(s.median(b))} | {ratio:.3f} ({paired:.3f})")
                if min(ratio, paired) > 1 + BUDGET and s.median(b) - s.median(a) >= 0.001:
                    over.append(f"{case} {label} {title} ({ratio:.3f}, paired {paired:.3f})")
            lines.append(f"| {case} | {label} | {' | '.join(cols)} |")
    lines.append("")
    for case, off, on in pairs:
        floor = "; ".join(
            f"{v} {ms(s.median((case, 'none', v, 'floor')))} -> "
            f"{ms(s.median((case, 'cf', v, 'floor')))}"
            for v in VARIANTS
        )
        lines.append(
            f"- {case}: our rules {off.plan.installed_rules:,} -> "
            f"{on.plan.installed_rules:,}, chains {off.plan.chains:,} -> {on.plan.chains:,}; "
            f"the floor (a bare restore of ours) none -> cf: {floor}."
        )
    lines += [
        "",
        "Budget (issue 13): with the settings, no figure more than 5% above without, "
        "counting a figure over only when both the ratio of medians and the paired ratio are "
        "over and the difference is at least 1 ms: "
        + ("held." if not over else "exceeded by " + "; ".join(over) + "."),
    ]
    return lines


def tables(cells: list[Cell], s: Samples) -> list[str]:
    lines = [
        "| case | settings | backend | floor: restore ours | CF layout: restore | from scratch | "
        "scratch / floor | the next cycle (reads the install back) | one-shot apply from scratch "
        "(read back at once) | one-shot / floor | CF / scratch | one-ASG change | "
        "first change after a full read | no-op cycle (idle) | idle / scratch | "
        "idle, busy counters | busy / scratch | first no-op after a change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            c = (cell.name, cell.settings)
            floor = s.median((*c, variant, "floor"))
            cf = s.median((*c, variant, "cf"))
            scratch = s.median((*c, label, "scratch"))
            check = s.median((*c, label, "install check"))
            once = s.median((*c, label, "scratch, verified at once"))
            change = s.median((*c, label, "change"))
            first = s.median((*c, label, "first change"))
            noop = s.median((*c, label, "noop"))
            idle = s.median((*c, label, "idle"))
            busy = busy_idle(s, cell, label)
            lines.append(
                f"| {cell.name} | {cell.settings} | {label} | {ms(floor)} | {ms(cf)} | "
                f"{ms(scratch)} | {scratch / floor:.2f}x | {ms(check)} | {ms(once)} | "
                f"{once / floor:.2f}x | {cf / scratch:.1f}x | {ms(change)} | {ms(first)} | "
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
        "cell's do (`busy_counters`); on nft counters do not move the generation id.  "
        "Settings: "
        + "; ".join(
            f"`{k}` = {v}" for k, v in SETTINGS_NOTE.items() if any(c.settings == k for c in cells)
        )
        + ".",
        "",
        "Targets: from scratch <= 1.3x the floor; one-ASG change on nft <= 100 ms; "
        "no-op (idle) <= 10% of from scratch; the last column applies that target to the "
        "busy-counters idle cycle as well (legacy tables only).",
        "",
        "| case | settings | backend | scratch <= 1.3x floor | nft change <= 100 ms | "
        "no-op <= 10% | no-op <= 10%, busy counters |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            c = (cell.name, cell.settings)
            floor = s.median((*c, variant, "floor"))
            scratch = s.median((*c, label, "scratch"))
            change = s.median((*c, label, "change"))
            idle = s.median((*c, label, "idle"))
            busy = busy_idle(s, cell, label)
            nft = ("met" if change <= 0.1 else "missed") if label == "nft" else "-"
            busy_verdict = share_verdict(busy, scratch) if busy else "-"
            lines.append(
                f"| {cell.name} | {cell.settings} | {label} | "
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
        "| case | settings | backend | cycle | render | read | delta | apply | verify | v6 | "
        "save alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for label, _, variant in BACKENDS:
            c = (cell.name, cell.settings)
            save = s.median((*c, variant, "save"))
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
                if not s.times.get((*c, label, what)):
                    continue
                p = s.phase_medians((*c, label, what))
                cols = " | ".join(
                    ms(p[k]) if k in p else "-"
                    for k in ("render", "read", "delta", "apply", "verify", "v6")
                )
                lines.append(
                    f"| {cell.name} | {cell.settings} | {label} | {what} | {cols} | {ms(save)} |"
                )
    return lines


def sizes(cells: list[Cell]) -> list[str]:
    lines = [
        "| case | settings | containers | CF-equivalent rules | CF layout lines | our rules | "
        "our chains | one-ASG change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        d = compute_delta(render_cell(c.changed, 4), OwnedState(4, render_cell(c.plan, 4).chains))
        lines.append(
            f"| {c.name} | {c.settings} | {len(c.plan.containers)} | "
            f"{c.plan.cf_equivalent_rules:,} | {c.cf_rules:,} | {c.plan.installed_rules:,} | "
            f"{c.plan.chains:,} | one rule added to {c.changed_asg}: {len(d.written)} chains "
            f"written, {len(d.deleted)} deleted, {len(d.ops):,} lines |"
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


GENERATED = "<!-- generated by bench/dataplane_bench.py --record; do not edit -->"
GENERATED_END = "<!-- end of bench/dataplane_bench.py figures -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--cf-repeat", type=int, default=3, help="rounds that also restore CF's layout"
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument(
        "--settings",
        choices=("both", *SETTINGS),
        default="both",
        help="cell settings to converge under (default both, interleaved)",
    )
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--json", help="also write every sample and median to this file")
    parser.add_argument("--profile", action="store_true", help="also print cProfile output")
    parser.add_argument("--output", default="dataplane.md", help="file under bench/results/")
    args = parser.parse_args()
    names = args.case or list(CASES)
    settings = list(SETTINGS) if args.settings == "both" else [args.settings]
    # A lock of the benchmark's own: legacy iptables (and the libiptc backend) take the
    # xtables lock, one file for every namespace on the host, and on a shared machine other
    # people's iptables runs would otherwise show up here as seconds of waiting.
    os.environ["XTABLES_LOCKFILE"] = str(Path(tempfile.gettempdir()) / "asgctl-bench-xtables.lock")
    started = time.perf_counter()
    rev = revision()
    cells: list[Cell] = []
    samples = Samples()
    wait = IptablesBackend("legacy").wait_seconds
    for name in names:
        case = build_cells(name, settings)
        cells += case
        for cell in case:
            print(
                f"{name} ({cell.settings}): {cell.plan.cf_equivalent_rules:,} CF-equivalent "
                f"rules, {cell.plan.installed_rules:,} ours",
                file=sys.stderr,
                flush=True,
            )
        measure(case, samples, args.repeat, min(args.cf_repeat, args.repeat), wait)
    lines = [*sizes(cells), "", *settings_table(cells, samples), "", *tables(cells, samples)]
    print("\n".join(lines))
    took = time.perf_counter() - started
    print(f"\n({took:.0f} s)", file=sys.stderr)
    if args.profile:
        print("".join(profile(c) for c in cells))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "revision": rev,
                    "machine": machine(),
                    "argv": sys.argv[1:],
                    "samples": samples.to_json(),
                },
                indent=1,
            )
        )
    if args.record:
        RESULTS.mkdir(exist_ok=True)
        flags = " ".join(sys.argv[1:])
        splice(
            RESULTS / args.output,
            GENERATED,
            GENERATED_END,
            f"Revision {rev}.  Machine: {machine()}; {versions()}\n\n"
            f"Command (as root): `.venv/bin/python bench/dataplane_bench.py {flags}` "
            f"({args.repeat} rounds, medians; {took:.0f} s in all)\n\n" + "\n".join(lines),
        )


if __name__ == "__main__":
    main()
