"""Soak: thousands of random policy and inventory changes converged on one cell.

    python bench/soak.py --cycles 10000            # the full soak (make soak)
    python bench/soak.py --cycles 300 --verify-every 25   # the short one tests/test_soak.py runs

Each cycle makes zero to three random edits to a PolicySet (security groups and their rules
and bindings, destinations, egress policies) and to the cell's inventory (containers come,
go, move between apps and spaces, switch to staging), compiles the cell's plan and converges
a lab namespace to it with the agent's own `converge` -- the loop the agent runs, minus git,
so that ten thousand cycles fit in minutes.  Other programs' rules sit in the table
throughout.

Every `--verify-every` cycles (and after the last) the kernel is read back *independently* --
a plain `iptables-save` (or a fresh nftables backend, no caches) -- and compared with the
rendered plan: every chain of ours exactly as rendered, the hook exactly once and first, no
ASG-* chain the plan does not render (an orphan), the foreign rules untouched.  Any
difference, and any converge that reports an error, is a violation; the run exits 1 if
there was one.

Figures: cycles, edits by kind, verifications, violations, cycles per second, cycle time
percentiles, and the process's resident memory (VmRSS) and live Python objects at the
start, after a warm-up, every tenth of the run, and at the end -- whether memory stays flat
across the run is the question a soak answers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/soak.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.backends import Runner, converge, open_backend
from reconciler.backends.iptables.backend import tool
from reconciler.backends.iptables.render import hook_rule, marker_rule, render_cell
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import (
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
    Rule,
    SecurityGroup,
)

SPACES = tuple(f"space-{i}" for i in range(6))
APPS = tuple(f"app-{i}" for i in range(12))  # app i lives in space i % 6
FOREIGN = (
    ":SOAK-FOREIGN - [0:0]",
    "-A SOAK-FOREIGN -p tcp -m tcp --dport 9 -m comment --comment soak-foreign -j DROP",
    "-A FORWARD -s 198.18.250.1/32 -m comment --comment soak-foreign-first -j ACCEPT",
    "-A FORWARD -d 198.18.250.2/32 -j SOAK-FOREIGN",
    "-A INPUT -s 198.18.250.3/32 -j DROP",
)
LIMITS = {"groups": 10, "rules": 30, "containers": 40, "destinations": 6}


# -- the random world ----------------------------------------------------------------------


@dataclass
class World:
    """A policy and an inventory that random edits walk through."""

    rng: random.Random
    groups: dict[str, SecurityGroup] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)
    policies: dict[str, EgressPolicy] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    serial: int = 0

    def next(self) -> int:
        self.serial += 1
        return self.serial

    # what to enforce
    def policy(self) -> PolicySet:
        return PolicySet(
            security_groups=tuple(self.groups[k] for k in sorted(self.groups)),
            destinations=tuple(self.destinations[k] for k in sorted(self.destinations)),
            egress_policies=tuple(self.policies[k] for k in sorted(self.policies)),
        )

    def inventory(self) -> tuple[Container, ...]:
        return tuple(sorted(self.containers.values()))

    # random pieces
    def rule(self) -> Rule:
        r = self.rng
        proto = r.choice(("tcp", "tcp", "udp", "icmp", "all"))
        v6 = proto != "icmp" and r.random() < 0.2
        if v6:
            dest = AddressRange.parse(f"fd00:19:{r.randrange(16):x}::{r.randrange(1, 9999):x}")
        else:
            a, b = r.randrange(1, 200), r.randrange(1, 250)
            dest = AddressRange.parse(
                r.choice(
                    (
                        f"198.19.{a}.{b}",
                        f"198.19.{a}.0/24",
                        f"198.19.{a}.{b}-198.19.{a}.{min(254, b + r.randrange(1, 5))}",
                    )
                )
            )
        ports: tuple[PortRange, ...] = ()
        if proto in ("tcp", "udp"):
            lo = r.randrange(1, 60000)
            ports = (PortRange(lo, lo + r.choice((0, 0, 0, 10))),)
        icmp = (r.choice((-1, 0, 8)), -1) if proto == "icmp" else (None, None)
        return Rule(proto, (dest,), ports, icmp[0], icmp[1], log=r.random() < 0.1)

    def group(self) -> SecurityGroup:
        r = self.rng
        return SecurityGroup(
            f"g{self.next()}",
            tuple(self.rule() for _ in range(r.randrange(1, 8))),
            running_default=r.random() < 0.2,
            running_spaces=tuple(r.sample(SPACES, r.randrange(0, 3))),
            staging_spaces=tuple(r.sample(SPACES, r.randrange(0, 2))),
        )

    def container(self) -> Container:
        n = self.next()
        app = self.rng.randrange(len(APPS))
        v6 = self.rng.random() < 0.2
        ip = f"fd00:18::{n:x}" if v6 else f"198.18.{(n // 250) % 250}.{n % 250 + 1}"
        workload = self.rng.choice(("app", "app", "app", "task", "staging"))
        return Container(f"c{n}", ip, APPS[app], SPACES[app % 6], "org-0", "", workload)

    # edits: each returns its kind (or None when it does not apply now)
    def edit(self) -> str | None:
        r = self.rng
        kind = r.choice(
            (
                "add-rule",
                "add-rule",
                "remove-rule",
                "change-ports",
                "add-group",
                "remove-group",
                "rebind",
                "toggle-default",
                "add-destination",
                "remove-destination",
                "add-container",
                "add-container",
                "remove-container",
                "move-container",
                "restage-container",
            )
        )
        g = self.groups
        if kind == "add-group" and len(g) < LIMITS["groups"]:
            group = self.group()
            g[group.name] = group
        elif kind == "remove-group" and len(g) > 1:
            del g[r.choice(sorted(g))]
        elif kind == "add-rule" and g:
            name = r.choice(sorted(g))
            if len(g[name].rules) >= LIMITS["rules"]:
                return None
            g[name] = replace(g[name], rules=(*g[name].rules, self.rule()))
        elif kind == "remove-rule" and g:
            name = r.choice(sorted(g))
            rules = list(g[name].rules)
            if len(rules) < 2:
                return None
            rules.pop(r.randrange(len(rules)))
            g[name] = replace(g[name], rules=tuple(rules))
        elif kind == "change-ports" and g:
            name = r.choice(sorted(g))
            rules = list(g[name].rules)
            i = r.randrange(len(rules))
            if rules[i].protocol not in ("tcp", "udp"):
                return None
            lo = r.randrange(1, 60000)
            rules[i] = replace(rules[i], ports=(PortRange(lo, lo),))
            g[name] = replace(g[name], rules=tuple(rules))
        elif kind == "rebind" and g:
            name = r.choice(sorted(g))
            spaces = set(g[name].running_spaces) ^ {r.choice(SPACES)}
            g[name] = replace(g[name], running_spaces=tuple(sorted(spaces)))
        elif kind == "toggle-default" and g:
            name = r.choice(sorted(g))
            g[name] = replace(g[name], running_default=not g[name].running_default)
        elif kind == "add-destination" and len(self.destinations) < LIMITS["destinations"]:
            n = self.next()
            port = r.randrange(1, 60000)
            d = Destination(
                f"d{n}",
                r.choice(("tcp", "udp")),
                (AddressRange.parse(f"198.19.{200 + n % 50}.{n % 250 + 1}"),),
                (PortRange(port, port),),
            )
            self.destinations[d.name] = d
            source = r.choice(("app", "space", "default"))
            sid = {"app": r.choice(APPS), "space": r.choice(SPACES), "default": None}[source]
            self.policies[d.name] = EgressPolicy(
                f"p{n}", source, sid, d.name, r.choice(("running", "staging", "all"))
            )  # type: ignore[arg-type]
        elif kind == "remove-destination" and self.destinations:
            name = r.choice(sorted(self.destinations))
            del self.destinations[name]
            del self.policies[name]
        elif kind == "add-container" and len(self.containers) < LIMITS["containers"]:
            c = self.container()
            self.containers[c.handle] = c
        elif kind == "remove-container" and self.containers:
            del self.containers[r.choice(sorted(self.containers))]
        elif kind == "move-container" and self.containers:
            c = self.containers[r.choice(sorted(self.containers))]
            app = r.randrange(len(APPS))
            self.containers[c.handle] = replace(c, app_id=APPS[app], space_id=SPACES[app % 6])
        elif kind == "restage-container" and self.containers:
            c = self.containers[r.choice(sorted(self.containers))]
            workload = "app" if c.workload == "staging" else "staging"
            self.containers[c.handle] = replace(c, workload=workload)
        else:
            return None
        return kind


def seed_world(seed: int) -> World:
    """Four groups and twenty containers to start from; the same seed, the same run."""
    w = World(random.Random(seed))
    for _ in range(4):
        group = w.group()
        w.groups[group.name] = group
    for _ in range(20):
        c = w.container()
        w.containers[c.handle] = c
    return w


# -- independent read-back -----------------------------------------------------------------


def iptables_view(netns: str, variant: str, family: int) -> dict[str, tuple[str, ...]]:
    """Every chain of the filter table, as a plain iptables-save in `netns` prints it."""
    res = subprocess.run(
        ["ip", "netns", "exec", netns, tool(variant, family, "save"), "-t", "filter"],
        capture_output=True,
        text=True,
        check=True,
    )
    chains: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split(" ", 2)[1], []).append(line)
    return {k: tuple(v) for k, v in chains.items()}


def check(
    netns: str, backend: str, variant: str, plan: CellPlan, foreign: dict[int, Any]
) -> list[str]:
    """What differs between the kernel and the plan (empty when nothing does)."""
    problems: list[str] = []
    for family in (4, 6):
        view = iptables_view(netns, variant, family)
        others = {k: v for k, v in view.items() if not k.startswith("ASG-")}
        if backend == "nftables":
            fresh = open_backend("nftables", variant, Runner.in_netns(netns))
            from reconciler.backends.nftables.render import render_cell as render_nft

            have, want = fresh.read(family), render_nft(plan, family)
            if dict(have.chains) != dict(want.chains):
                problems.append(f"ipv{family}: nft chains differ from the plan")
            if getattr(have, "sets", None) != getattr(want, "sets", None):
                problems.append(f"ipv{family}: nft sets differ from the plan")
            if any(k.startswith("ASG-") for k in view):
                problems.append(f"ipv{family}: ASG chains in iptables with the nftables backend")
            if others != foreign[family]:
                problems.append(f"ipv{family}: foreign iptables rules changed")
            continue
        want = render_cell(plan, family).chains
        ours = {k: v for k, v in view.items() if k.startswith("ASG-")}
        orphans = sorted(set(ours) - set(want))
        if orphans:
            problems.append(f"ipv{family}: orphan chains {orphans[:5]}")
        for name in sorted(set(want) - set(ours)):
            problems.append(f"ipv{family}: {name} missing")
        for name in sorted(set(want) & set(ours)):
            if ours[name] != (marker_rule(name), *want[name]):  # our marker, then the plan's
                problems.append(f"ipv{family}: {name} differs from the plan")
        forward = others.get("FORWARD", ())
        hooks = [i for i, x in enumerate(forward) if x == hook_rule()]
        expected_hooks = [0] if want else []
        if hooks != expected_hooks:
            problems.append(f"ipv{family}: hook at {hooks}, want {expected_hooks}")
        rest = {**others, "FORWARD": tuple(x for x in forward if x != hook_rule())}
        if rest != foreign[family]:
            problems.append(f"ipv{family}: foreign rules changed")
    return problems


# -- the run -------------------------------------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def _cell(netns: str | None) -> Iterator[str]:
    if netns is not None:
        yield netns
        return
    from asgctl_lab.netns import Lab

    with Lab(conntrack=False) as lab:
        yield lab.cell


def _install_foreign(netns: str, variant: str) -> None:
    text = "*filter\n" + "\n".join(FOREIGN) + "\nCOMMIT\n"
    subprocess.run(
        ["ip", "netns", "exec", netns, tool(variant, 4, "restore"), "--noflush"],
        input=text,
        text=True,
        check=True,
        capture_output=True,
    )


def run(
    cycles: int = 300,
    *,
    seed: int = 1,
    backend: str = "iptables",
    variant: str = "legacy",
    verify_every: int = 50,
    netns: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the soak; returns the figures (see the module docstring)."""
    world = seed_world(seed)
    edits: Counter[str] = Counter()
    violations: list[str] = []
    times: list[float] = []
    samples: list[dict[str, int]] = []
    verifications = applied = idle = 0
    with _cell(netns) as cell:
        _install_foreign(cell, variant)
        foreign = {f: {k: v for k, v in iptables_view(cell, variant, f).items()} for f in (4, 6)}
        dp = open_backend(backend, variant, Runner.in_netns(cell))
        gc.collect()
        samples.append({"cycle": 0, "rss_kib": rss_kib(), "objects": len(gc.get_objects())})
        warm = min(cycles, max(100, cycles // 20))
        last: CellPlan | None = None
        plan: CellPlan | None = None
        t_run = time.perf_counter()
        for n in range(1, cycles + 1):
            t = time.perf_counter()
            k = world.rng.choice((0, 1, 1, 2, 3))
            made = [e for e in (world.edit() for _ in range(k)) if e]
            edits.update(made)
            idle += not made
            plan = compile_cell(world.policy(), world.inventory(), "soak")
            result = converge(dp, plan, last)
            times.append(time.perf_counter() - t)
            if result.ok:
                applied += not result.in_sync
                last = plan
            else:
                errors = "; ".join(f"ipv{f.family}: {f.error}" for f in result.families if f.error)
                violations.append(f"cycle {n}: converge failed: {errors}")
                last = None
            if n % verify_every == 0 or n == cycles:
                verifications += 1
                problems = check(cell, backend, variant, plan, foreign)
                violations += [f"cycle {n}: {p}" for p in problems]
            if n in (warm, cycles) or n % max(1, cycles // 10) == 0:
                gc.collect()
                samples.append({"cycle": n, "rss_kib": rss_kib(), "objects": len(gc.get_objects())})
                if progress:
                    s = samples[-1]
                    print(
                        f"  cycle {n:>6}: {n / (time.perf_counter() - t_run):6.1f} cycles/s, "
                        f"RSS {s['rss_kib'] / 1024:6.1f} MiB, {s['objects']} objects, "
                        f"{len(violations)} violations",
                        flush=True,
                    )
        seconds = time.perf_counter() - t_run
    times.sort()

    def pct(p: float) -> float:
        return round(times[min(len(times) - 1, int(p * len(times)))] * 1000, 1)

    at_warm = next(s for s in samples if s["cycle"] >= warm)
    return {
        "cycles": cycles,
        "seed": seed,
        "backend": backend,
        "variant": variant,
        "verify_every": verify_every,
        "edits": sum(edits.values()),
        "edits_by_kind": dict(sorted(edits.items())),
        "idle_cycles": idle,
        "cycles_that_changed_the_kernel": applied,
        "verifications": verifications,
        "violations": violations,
        "seconds": round(seconds, 1),
        "cycles_per_second": round(cycles / seconds, 1),
        "cycle_ms": {
            "p50": pct(0.5),
            "p90": pct(0.9),
            "p99": pct(0.99),
            "max": round(times[-1] * 1000, 1),
            "mean": round(statistics.fmean(times) * 1000, 1),
        },
        "final_plan": {
            "containers": len(plan.containers) if plan else 0,
            "groups": len(plan.groups) if plan else 0,
            "installed_rules": plan.installed_rules if plan else 0,
        },
        "rss_kib": {
            "start": samples[0]["rss_kib"],
            "after_warmup": at_warm["rss_kib"],
            "end": samples[-1]["rss_kib"],
        },
        "objects": {
            "start": samples[0]["objects"],
            "after_warmup": at_warm["objects"],
            "end": samples[-1]["objects"],
        },
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", default="iptables", choices=("iptables", "nftables"))
    parser.add_argument("--variant", default="legacy", choices=("legacy", "nft"))
    parser.add_argument("--verify-every", type=int, default=50)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)
    from bench.common import machine, revision

    print(
        f"soak: {args.cycles} cycles, {args.backend} ({args.variant}), seed {args.seed}",
        flush=True,
    )
    figures = run(
        args.cycles,
        seed=args.seed,
        backend=args.backend,
        variant=args.variant,
        verify_every=args.verify_every,
        progress=True,
    )
    figures["machine"] = machine()
    figures["revision"] = revision()
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {k: v for k, v in figures.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    return 1 if figures["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
