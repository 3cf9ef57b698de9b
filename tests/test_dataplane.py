"""Converging a namespace's iptables to a plan: atomic, incremental, drift-repairing.

Every kernel test runs in a fresh network namespace of its own, once with iptables-legacy and
once with iptables-nft, and compares full `iptables-save` output, so "nothing else changed"
is checked byte for byte rather than assumed.  The tests that do not depend on iptables'
layout (apply, read-back, no-op, plan changes, failed transactions, foreign rules, the CLI)
also run with the nftables backend, whose own drift kinds are in test_nftables.  The pure
parts (parser, delta) are tested without a kernel at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from asgctl_lab.netns import Lab
from asgctl_lab.nsenter import in_netns
from reconciler.backends import (
    ApplyError,
    Backend,
    ConvergeResult,
    FamilyResult,
    ReadError,
    VariantError,
    converge,
    remove,
)
from reconciler.backends import contract as rec
from reconciler.backends.iptables.backend import IptablesBackend, tool
from reconciler.backends.iptables.delta import IptablesDelta, compute_delta
from reconciler.backends.iptables.parse import HookCopy, OwnedState, count_rules, parse_save
from reconciler.backends.iptables.render import (
    TOP_CHAIN,
    Ruleset,
    hook_rule,
    marker_rule,
    render_cell,
)
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.backends.nftables.render import base_chain, canonical_rule
from reconciler.backends.nftables.render import render_cell as render_nft
from reconciler.backends.summary import format_text
from reconciler.cli import main
from reconciler.core.cellplan import CellPlan, CellSettings
from reconciler.core.compile import compile_cell
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup
from tests.cases import DATA, RecordingRunner, edge_plan
from tests.conftest import skip_unless_available

VARIANTS = ("legacy", "nft")
CLI = "from reconciler.cli import main; main()"
HOST_CHAINS = ("ASG-ADMIN-BLOCKLIST", "ASG-LEGACY")
"""The host's own chains with our name prefix (issue 20): one unreferenced, with rules; one
jumped to from INPUT.  Neither is ours, whatever its name."""
FOREIGN_V4 = (
    "*filter",
    ":FOREIGN - [0:0]",
    ":ASG-ADMIN-BLOCKLIST - [0:0]",
    ":ASG-LEGACY - [0:0]",
    "-A FORWARD -s 198.18.200.1/32 -m comment --comment foreign-first -j ACCEPT",
    "-A FORWARD -d 198.18.200.2/32 -j FOREIGN",
    "-A FOREIGN -p tcp -m tcp --dport 9 -j DROP",
    "-A INPUT -s 198.18.200.3/32 -j DROP",
    "-A INPUT -j ASG-ADMIN-BLOCKLIST",
    "-A ASG-ADMIN-BLOCKLIST -s 198.18.200.7/32 -m comment --comment blocked -j DROP",
    "-A ASG-LEGACY -d 198.18.200.8/32 -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A ASG-LEGACY -j RETURN",
    "COMMIT",
)
_OURS = re.compile(r"^(?::|-A )ASG-(?:FORWARD|[GC]-[0-9a-f]+)\b|asg:forward")


# -- plans ----------------------------------------------------------------------------------


def _rule(proto: str, dest: str, ports: str = "") -> Rule:
    rng = tuple(
        PortRange(int(a), int(b or a)) for a, _, b in (p.partition("-") for p in ports.split(","))
    )
    return Rule(proto, (AddressRange.parse(dest),), rng if ports else ())


def small_policy(extra: tuple[Rule, ...] = ()) -> PolicySet:
    rules = (_rule("tcp", "198.19.1.0/24", "443"), _rule("udp", "fd00:19::1", "53"), *extra)
    return PolicySet(
        security_groups=(
            SecurityGroup("web", rules, running_spaces=("space-a",)),
            SecurityGroup("dns", (_rule("udp", "198.19.53.53", "53"),), running_default=True),
        )
    )


CONTAINERS = (
    Container("c1", "198.18.0.2", app_id="app-1", space_id="space-a"),
    Container("c2", "198.18.0.3", app_id="app-2", space_id="space-b"),
    Container("c6", "fd00:18::2", app_id="app-1", space_id="space-a"),
)


def small_plan(extra: tuple[Rule, ...] = (), containers=CONTAINERS) -> CellPlan:
    return compile_cell(small_policy(extra), containers, "t")


# -- namespace helpers -----------------------------------------------------------------------


@dataclass
class Host:
    """A fresh namespace, and the backend and iptables variant under test."""

    netns: str
    variant: str
    kind: str = "iptables"

    def runner(self) -> RecordingRunner:
        return RecordingRunner(("ip", "netns", "exec", self.netns))

    def backend(self, **kw) -> Backend:  # type: ignore[no-untyped-def]
        if self.kind == "nftables":
            return NftablesBackend.open("auto", self.runner(), **kw)
        if self.kind == "libiptc":
            from reconciler.backends.iptables.libiptc import LibiptcBackend

            return LibiptcBackend.open(self.variant, self.runner(), **kw)
        return IptablesBackend.open(self.variant, self.runner(), **kw)

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv}: {proc.stderr}")
        return proc.stdout

    def ipt(self, family: int, *args: str) -> str:
        cmd = f"{'iptables' if family == 4 else 'ip6tables'}-{self.variant}"
        return self.run(cmd, "-w", *args)

    def restore(self, family: int, lines: tuple[str, ...]) -> None:
        self.run(tool(self.variant, family, "restore"), "--noflush", stdin="\n".join(lines) + "\n")

    def save(self) -> str:
        """Both families' filter tables, without the timestamp comments (nftables: every nft
        table, iptables-nft's included, and iptables-legacy's filter tables)."""
        if self.kind == "nftables":
            out = self.run("nft", "list", "ruleset").splitlines()
            for family in (4, 6):
                text = self.run(tool("legacy", family, "save"), "-t", "filter")
                out.extend(x for x in text.splitlines() if not x.startswith("#"))
            return "\n".join(out)
        return self.ipt_save()

    def ipt_save(self) -> str:
        out = []
        for family in (4, 6):
            text = self.run(tool(self.variant, family, "save"), "-t", "filter")
            out.extend(x for x in text.splitlines() if not x.startswith("#"))
        return "\n".join(out)

    def foreign(self) -> list[str]:
        """Every line of the v4 table that is not ours (the host's `ASG-` chains included),
        in order."""
        return [x for x in self.ipt_save().split("COMMIT")[0].splitlines() if not _OURS.search(x)]

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        return render_nft(plan, family) if self.kind == "nftables" else render_cell(plan, family)

    def objects(self, state: object) -> dict[str, object]:
        """Named things of ours (chains; for nftables also base hooks, sets and maps)."""
        chains = getattr(state, "chains", {})
        if self.kind != "nftables":
            return dict(chains)
        hooks = getattr(state, "base_hooks", {})
        out: dict[str, object] = {n: (hooks.get(n), r) for n, r in chains.items()}
        out.update(getattr(state, "sets", {}))
        return out

    def unhook(self, family: int) -> None:
        """Remove our hook by hand: the FORWARD jump, or the nftables base chain."""
        if self.kind == "nftables":
            self.run("nft", "delete", "chain", "inet", "asgctl", base_chain(family))
        else:
            self.ipt(family, "-D", "FORWARD", "1")

    def hooked(self, family: int) -> bool:
        state = self.backend().read(family)
        if self.kind == "nftables":
            return base_chain(family) in state.chains
        return state.hooks != ()


def iptables_only(host: Host, why: str = "iptables layout") -> None:
    if host.kind == "nftables":
        pytest.skip(f"{why}; the nftables counterpart is in test_nftables")


LIBIPTC = pytest.mark.requires("libiptc")


@pytest.fixture(
    params=[
        pytest.param(("iptables", "legacy"), id="legacy"),
        pytest.param(("iptables", "nft"), id="nft"),
        pytest.param(("libiptc", "legacy"), id="libiptc", marks=LIBIPTC),
        pytest.param(("nftables", "nft"), id="nftables"),
    ]
)
def host(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Host:
    """A bare lab cell: a fresh namespace that the lab guarantees to remove, even after a
    killed run (conntrack off: nothing but what the test puts there)."""
    kind, variant = request.param
    return Host(make_lab(conntrack=False).cell, variant, kind)


def transactions(backend: Backend, result: ConvergeResult) -> int:
    """Transactions a cycle sent; for the iptables backend, also counted at the process level."""
    sent = sum(f.sent for f in result.families)
    if isinstance(backend, IptablesBackend):
        assert len(backend.runner.restores()) == sent  # type: ignore[attr-defined]
    if isinstance(backend, NftablesBackend):
        calls = backend.runner.calls  # type: ignore[attr-defined]
        assert len([c for c in calls if c[:3] == ("nft", "-j", "-f")]) == sent
    return sent


def assert_matches_plan(host: Host, plan: CellPlan) -> None:
    """Our chains read back exactly as rendered, and the hook is there once and first."""
    backend = host.backend()
    for family in (4, 6):
        desired = host.render(plan, family)
        observed = backend.read(family)
        assert dict(observed.chains) == desired.chains
        if host.kind == "nftables":
            assert host.objects(observed) == host.objects(desired)
        elif desired.chains:
            assert [(h.index, h.text) for h in observed.hooks] == list(enumerate(desired.hooks))
        else:
            assert observed.hooks == ()


# -- apply, read back, no-op -----------------------------------------------------------------


def test_apply_reads_back_exactly_and_second_apply_sends_nothing(host: Host) -> None:
    plan = edge_plan()
    backend = host.backend()
    first = converge(backend, plan)
    assert first.ok, first.to_dict()
    assert not first.in_sync
    assert transactions(backend, first) == 2
    assert_matches_plan(host, plan)
    # The raw save holds every rendered line verbatim: the renderer's canonical form is right.
    saved = host.save().splitlines()
    for family in (4, 6) if host.kind != "nftables" else ():
        for rules in render_cell(plan, family).chains.values():
            assert set(rules) <= set(saved)
    again = host.backend()
    second = converge(again, plan, plan)
    assert second.ok and second.in_sync
    assert transactions(again, second) == 0
    if host.kind == "nftables":  # one listing serves both families, nothing else is read
        listing = ("nft", "-j", "-n", "list", "table", "inet", "asgctl")
        assert [c for c in again.runner.calls if "list" in c][-1:] == [listing]
        assert again.runner.calls.count(listing) == 1
    else:
        reads = [c for c in again.runner.calls if c[1:] == ("-t", "filter")]
        variant = "legacy" if host.kind == "libiptc" else host.variant
        assert reads == [(tool(variant, f, "save"), "-t", "filter") for f in (4, 6)]
    assert second.drift == () and second.changes == ()


def test_dry_run_and_report_only_change_nothing(host: Host) -> None:
    before = host.save()
    for mode in ("dry-run", "report-only"):
        result = converge(host.backend(), edge_plan(), mode=mode)
        assert result.ok and not result.in_sync
        assert all(not f.sent for f in result.families)
        hooking = '"hook":"forward"' if host.kind == "nftables" else "-I FORWARD 1"
        assert hooking in result.families[0].delta.text()
    assert host.save() == before


def test_plan_change_sends_only_changed_chains_and_removes_stale_ones(host: Host) -> None:
    a = small_plan()
    b = small_plan(
        extra=(_rule("tcp", "198.19.2.0/24", "80"),),
        containers=CONTAINERS[1:],  # c1 leaves the cell
    )
    assert converge(host.backend(), a).ok
    before = {f: host.objects(host.backend().read(f)) for f in (4, 6)}
    result = converge(host.backend(), b, a)
    assert result.ok, result.to_dict()
    assert result.drift == ()
    v4, v6 = result.families
    want4 = host.objects(host.render(b, 4))
    # Only chains whose content differs were sent; unchanged ones were not rewritten.
    assert set(v4.delta.written) == {n for n in want4 if before[4].get(n) != want4[n]}
    assert set(v4.delta.deleted) == set(before[4]) - set(want4)
    assert v4.delta.deleted  # c1's container chain is gone
    assert all(c.what != rec.HOOK_ADDED for c in v4.delta.changes)
    assert v6.delta.empty and not v6.sent  # the change is v4 only: ip6tables is not touched
    assert_matches_plan(host, b)
    # Removing every container removes every chain and the hook, in one transaction each.
    empty = compile_cell(small_policy(), (), "t")
    result = converge(host.backend(), empty, b)
    assert result.ok
    assert_matches_plan(host, empty)
    assert "ASG-" not in host.save() and "asg:" not in host.save()


def test_jumps_are_swapped_atomically_when_a_group_changes(host: Host) -> None:
    iptables_only(host, "iptables-restore line order")
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(host.backend(), a).ok
    result = converge(host.backend(), b, a)
    delta = result.families[0].delta
    text = delta.ops
    new_groups = [n for n in delta.written if n.startswith("ASG-G-")]
    assert new_groups and delta.deleted
    # The new group is filled before the container chain that jumps to it; the old one is
    # deleted last, after the container chain no longer references it.
    first_fill = min(i for i, x in enumerate(text) if x.startswith(f"-A {new_groups[0]} "))
    first_jump = min(i for i, x in enumerate(text) if x.endswith(f"-j {new_groups[0]}"))
    assert first_fill < first_jump
    assert text[-len(delta.deleted) :] == tuple(f"-X {n}" for n in delta.deleted)
    assert_matches_plan(host, b)


# -- drift ----------------------------------------------------------------------------------


def _group(plan: CellPlan, family: int = 4) -> str:
    """A group chain with at least two rules (to reorder)."""
    chains = render_cell(plan, family).chains
    return next(n for n in sorted(chains) if n.startswith("ASG-G-") and len(chains[n]) >= 2)


def _container(plan: CellPlan, family: int = 4) -> str:
    return next(n for n in sorted(render_cell(plan, family).chains) if n.startswith("ASG-C-"))


# Rule 1 of every chain of ours is its ownership marker: the plan's rules start at 2.


def _drift_rule_deleted(h: Host, p: CellPlan) -> tuple[str, str]:
    h.ipt(4, "-D", _group(p), "2")
    return _group(p), rec.RULE_MISSING


def _drift_rule_added(h: Host, p: CellPlan) -> tuple[str, str]:
    h.ipt(4, "-I", _container(p), "3", "-d", "198.18.99.0/24", "-j", "ACCEPT")
    return _container(p), rec.RULE_EXTRA


def _drift_reordered(h: Host, p: CellPlan) -> tuple[str, str]:
    chain = _group(p)
    first = render_cell(p, 4).chains[chain][0]
    h.ipt(4, "-D", chain, "2")
    h.restore(4, ("*filter", first, "COMMIT"))  # appended at the end
    return chain, rec.RULES_REORDERED


def _drift_changed(h: Host, p: CellPlan) -> tuple[str, str]:
    chain = _group(p)
    rules = render_cell(p, 4).chains[chain]
    i = next(i for i, x in enumerate(rules) if x.endswith("-j ACCEPT"))
    h.ipt(4, "-D", chain, str(i + 2))
    changed = rules[i].replace(f"-A {chain} ", f"-I {chain} {i + 2} ").replace("ACCEPT", "DROP")
    h.restore(4, ("*filter", changed, "COMMIT"))
    return chain, rec.RULE_CHANGED


def _drift_flushed(h: Host, p: CellPlan) -> tuple[str, str]:
    h.ipt(4, "-F", _container(p))
    return _container(p), rec.RULE_MISSING


def _drift_marker_deleted(h: Host, p: CellPlan) -> tuple[str, str]:
    """Still ours without its marker: the last plan applied put the chain there."""
    h.ipt(4, "-D", _group(p), "1")
    return _group(p), rec.MARKER_MISSING


def _drift_chain_deleted(h: Host, p: CellPlan) -> tuple[str, str]:
    chain = _container(p)
    dispatch = next(x for x in render_cell(p, 4).chains[TOP_CHAIN] if x.endswith(chain))
    h.restore(4, ("*filter", "-D" + dispatch[2:], f"-F {chain}", f"-X {chain}", "COMMIT"))
    return chain, rec.CHAIN_MISSING


def _drift_chain_extra(h: Host, p: CellPlan) -> tuple[str, str]:
    """A chain of ours the plan does not have (an old one put back from a saved table): it
    carries our marker, so it is ours to remove.  Without it, it would be someone else's
    (test_foreign_rules_and_chains_survive_every_apply)."""
    chain = "ASG-G-0000000000000000"
    h.restore(
        4, ("*filter", f":{chain} - [0:0]", marker_rule(chain), f"-A {chain} -j ACCEPT", "COMMIT")
    )
    return chain, rec.CHAIN_EXTRA


def _drift_hook_removed(h: Host, p: CellPlan) -> tuple[str, str]:
    h.ipt(4, "-D", "FORWARD", "1")
    return "FORWARD", rec.HOOK_MISSING


def _drift_hook_moved(h: Host, p: CellPlan) -> tuple[str, str]:
    h.ipt(4, "-I", "FORWARD", "1", "-s", "198.18.200.9/32", "-j", "ACCEPT")
    return "FORWARD", rec.HOOK_MOVED


def _drift_hook_duplicated(h: Host, p: CellPlan) -> tuple[str, str]:
    h.restore(4, ("*filter", hook_rule(), "COMMIT"))
    return "FORWARD", rec.HOOK_DUPLICATED


DRIFTS: dict[str, Callable[[Host, CellPlan], tuple[str, str]]] = {
    "rule-deleted": _drift_rule_deleted,
    "rule-added": _drift_rule_added,
    "reordered": _drift_reordered,
    "rule-changed": _drift_changed,
    "chain-flushed": _drift_flushed,
    "marker-deleted": _drift_marker_deleted,
    "chain-deleted": _drift_chain_deleted,
    "chain-extra": _drift_chain_extra,
    "hook-removed": _drift_hook_removed,
    "hook-moved": _drift_hook_moved,
    "hook-duplicated": _drift_hook_duplicated,
}


@pytest.mark.parametrize("kind", sorted(DRIFTS))
def test_drift_is_reported_and_repaired(host: Host, kind: str) -> None:
    iptables_only(host, "drift made with iptables")
    plan = edge_plan()
    assert converge(host.backend(), plan).ok
    chain, what = DRIFTS[kind](host, plan)
    tampered = host.save()

    report = converge(host.backend(), plan, plan, mode="report-only")
    assert report.ok and not report.in_sync
    assert (chain, what) in {(d.chain, d.what) for d in report.drift}, report.to_dict()
    assert report.changes == ()  # the plan did not change: all of it is drift
    assert host.save() == tampered  # report-only repaired nothing

    foreign = [x for x in tampered.splitlines() if x.startswith("-A FORWARD -s 198.18.200.9")]
    backend = host.backend()
    result = converge(backend, plan, plan)
    assert result.ok, result.to_dict()
    assert (chain, what) in {(d.chain, d.what) for d in result.drift}
    assert all(d.repair for d in result.drift)
    assert transactions(backend, result) == 1  # one transaction, only the drifted family
    assert_matches_plan(host, plan)
    assert all(x in host.save().splitlines() for x in foreign)  # a foreign insert survives
    assert converge(host.backend(), plan, plan).in_sync


def test_drift_details_name_the_rules(host: Host) -> None:
    iptables_only(host, "drift made with iptables")
    plan = small_plan()
    assert converge(host.backend(), plan).ok
    chain = next(n for n in render_cell(plan, 4).chains if n.startswith("ASG-G-"))
    lost = render_cell(plan, 4).chains[chain][0]
    host.ipt(4, "-D", chain, "2")
    (drift,) = converge(host.backend(), plan, plan).drift
    assert drift == rec.Drift(4, chain, rec.RULE_MISSING, (lost,), (), True)


def test_without_self_heal_drift_is_left_but_plan_changes_apply(host: Host) -> None:
    iptables_only(host, "drift made with iptables")
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(host.backend(), a).ok
    host.ipt(4, "-D", "FORWARD", "1")  # hook drift, in a part the plan change does not touch
    host.ipt(6, "-I", _container(a, 6), "1", "-j", "ACCEPT")
    result = converge(host.backend(), b, a, heal_drift=False)
    assert result.ok, result.to_dict()
    assert {(d.family, d.what, d.repair) for d in result.drift} >= {
        (4, rec.HOOK_MISSING, False),
    }
    assert host.backend().read(4).hooks == ()  # left alone
    assert dict(host.backend().read(4).chains) == render_cell(b, 4).chains  # change applied


def test_without_last_plan_differences_are_changes_not_drift(host: Host) -> None:
    plan = small_plan()
    assert converge(host.backend(), plan).ok
    host.unhook(4)
    result = converge(host.backend(), plan)
    assert result.drift == ()
    assert [c.what for c in result.changes] == [rec.HOOK_ADDED]
    assert_matches_plan(host, plan)


# -- other programs' rules ------------------------------------------------------------------


def _not_about_host_chains(host: Host, result: ConvergeResult) -> None:
    """The host's `ASG-` chains are reported as someone else's and nowhere called ours."""
    assert result.ok, result.to_dict()
    assert not {x.chain for x in (*result.drift, *result.changes)} & set(HOST_CHAINS)
    v4 = result.families[0].delta
    for family in result.families:
        assert not set(HOST_CHAINS) & {*family.delta.written, *family.delta.deleted}
        assert not set(HOST_CHAINS) & set(family.delta.orphaned)
    if host.kind != "nftables":  # (nftables never reads iptables' tables at all)
        assert v4.foreign == HOST_CHAINS
        assert all(any(n in note for note in v4.notes) for n in HOST_CHAINS)


def test_foreign_rules_and_chains_survive_every_apply(host: Host) -> None:
    """Issue 20: the host's `ASG-LEGACY` and `ASG-ADMIN-BLOCKLIST` (jumped to from INPUT) are
    not ours for their prefix: first apply, plan change, drift repair, a restart that lost
    its state, and the teardown leave them byte for byte, and no report calls them ours."""
    host.restore(4, FOREIGN_V4)
    foreign = host.foreign()
    assert any(x.startswith("-A ASG-LEGACY ") for x in foreign)
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    steps: list[tuple[CellPlan, CellPlan | None]] = [(a, None), (b, a)]
    for plan, last in steps:
        _not_about_host_chains(host, converge(host.backend(), plan, last))
        assert host.foreign() == foreign
        assert_matches_plan(host, plan)
    # Our hook went first, ahead of the foreign rule that was first before.
    if host.kind != "nftables":  # (nftables: our own base chain, in our own table)
        assert host.ipt(4, "-S", "FORWARD").splitlines()[1] == hook_rule()
    host.ipt(4, "-I", "FORWARD", "1", "-s", "198.18.200.9/32", "-j", "ACCEPT")  # before ours
    foreign = host.foreign()
    _not_about_host_chains(host, converge(host.backend(), b, b))
    assert host.foreign() == foreign
    host.unhook(4)  # drift: repaired, and only that
    repaired = converge(host.backend(), b, b)
    _not_about_host_chains(host, repaired)
    assert repaired.drift and all(x.repair for x in repaired.drift)
    assert host.foreign() == foreign
    assert_matches_plan(host, b)
    _not_about_host_chains(host, converge(host.backend(), b))  # restarted, state lost
    assert host.foreign() == foreign
    empty = compile_cell(small_policy(), (), "t")
    _not_about_host_chains(host, converge(host.backend(), empty, b))
    assert host.foreign() == foreign
    assert_matches_plan(host, empty)


def test_a_restart_that_lost_its_state_still_cleans_up_our_chains(host: Host) -> None:
    """No last plan (the state directory is gone): the marker alone proves which chains are
    ours, so stale ones are still removed, and the host's are still left alone."""
    host.restore(4, FOREIGN_V4)
    foreign = host.foreign()
    a = small_plan()
    b = small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),), containers=CONTAINERS[1:])
    assert converge(host.backend(), a).ok
    before = {f: host.objects(host.backend().read(f)) for f in (4, 6)}
    result = converge(host.backend(), b)  # a new process: no last plan
    _not_about_host_chains(host, result)
    assert set(result.families[0].delta.deleted) == set(before[4]) - set(
        host.objects(host.render(b, 4))
    )
    assert result.families[0].delta.deleted
    assert_matches_plan(host, b)
    assert host.foreign() == foreign
    empty = compile_cell(small_policy(), (), "t")
    _not_about_host_chains(host, converge(host.backend(), empty))
    assert_matches_plan(host, empty)
    assert host.foreign() == foreign
    if host.kind != "nftables":
        ours = [x for x in host.ipt_save().splitlines() if _OURS.search(x) or "asg:" in x]
        assert ours == []


def test_uninstall_removes_ours_and_leaves_the_hosts_firewall(host: Host) -> None:
    """The way back to CF's own chains (docs/cutover.md): `asgctl uninstall` takes out every
    chain, set and hook of ours in one transaction per family, proves ownership as every apply
    does (the host's `ASG-` chains stay), and a second run finds nothing to do."""
    host.restore(4, FOREIGN_V4)
    foreign = host.foreign()
    assert converge(host.backend(), small_plan()).ok
    assert any(host.objects(host.backend().read(f)) for f in (4, 6))

    def uninstall(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = ["uninstall", "--backend", host.kind, "--variant", host.variant, *flags]
        cmd = ["ip", "netns", "exec", host.netns, sys.executable, "-c", CLI, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)

    before = host.save()
    dry = uninstall("--dry-run")
    assert dry.returncode == 2, dry.stderr
    assert host.save() == before  # a dry run changes nothing
    done = uninstall("--format", "json")
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout)["mode"] == "apply"
    assert not any(host.objects(host.backend().read(f)) for f in (4, 6))
    assert host.foreign() == foreign
    if host.kind == "nftables":
        assert "asgctl" not in host.run("nft", "list", "tables")
    else:
        assert [x for x in host.ipt_save().splitlines() if _OURS.search(x) or "asg:" in x] == []
    again = uninstall()
    assert again.returncode == 0, again.stdout + again.stderr
    assert remove(host.backend()).in_sync


def test_an_upgrade_from_before_markers_takes_the_old_chains_over(host: Host) -> None:
    """A cell still holding what the previous release wrote (16-digit ids, no markers; the
    example repo's rules as that release rendered them) and no usable last plan (every chain
    was renamed): the old chains are proven ours by their exact shape, replaced by the plan
    and removed, and the host's `ASG-` chains are still left alone."""
    iptables_only(host, "the nftables backend has its own table")
    host.restore(4, FOREIGN_V4)
    foreign = host.foreign()
    old = (DATA / "pre-marker.v4.rules").read_text().splitlines()
    host.restore(4, tuple(old))
    plan = small_plan()
    result = converge(host.backend(), plan)  # no last plan, as after the upgrade
    assert result.ok, result.families[0].error
    _not_about_host_chains(host, result)
    old_chains = {x[1:].split()[0] for x in old if x.startswith(":")}
    assert old_chains - {TOP_CHAIN} <= set(result.families[0].delta.deleted)
    assert_matches_plan(host, plan)
    assert host.foreign() == foreign


@pytest.mark.parametrize("which", ["dispatch", "group"])
def test_a_planned_chain_never_takes_over_a_foreign_chain_of_its_name(
    host: Host, which: str
) -> None:
    """A chain of the plan's name that we cannot prove ours (no marker, not in the last plan
    applied) is refused with a clear error, never flushed or rewritten; the other family,
    a separate table, still converges."""
    iptables_only(host, "the nftables backend writes only its own table")
    plan = small_plan()
    chains = render_cell(plan, 4).chains
    name = TOP_CHAIN if which == "dispatch" else next(n for n in chains if n.startswith("ASG-G-"))
    host.restore(4, (*FOREIGN_V4[:-1], f":{name} - [0:0]", f"-A {name} -j DROP", "COMMIT"))
    before = host.ipt_save().split("COMMIT")[0]
    result = converge(host.backend(), plan)
    v4, v6 = result.families
    assert not result.ok and not v4.sent
    assert v4.error is not None and name in v4.error and "not taken over" in v4.error
    assert host.ipt_save().split("COMMIT")[0] == before  # byte for byte: nothing sent
    assert v6.error is None and v6.sent
    # Once its owner removes it, the next cycle installs.
    host.restore(4, ("*filter", f"-F {name}", f"-X {name}", "COMMIT"))
    assert converge(host.backend(), plan).ok
    assert_matches_plan(host, plan)


def test_only_our_own_hook_rule_is_ever_touched_in_forward(host: Host) -> None:
    """FORWARD rules that merely look like our hook (our comment, another target; our
    target, no comment) are someone else's: they survive install, change and teardown, and
    keep the dispatch chain they jump to alive (flushed, still marked, not deleted)."""
    iptables_only(host, "the nftables backend hooks in with its own base chain")
    lookalikes = (
        '-A FORWARD -s 198.18.200.10/32 -m comment --comment "asg:forward" -j ACCEPT',
        f"-A FORWARD -s 198.18.200.11/32 -j {TOP_CHAIN}",
    )
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(host.backend(), a).ok
    host.restore(4, ("*filter", *lookalikes, "COMMIT"))
    for plan, last in ((b, a), (b, b)):
        result = converge(host.backend(), plan, last)
        assert result.ok, result.to_dict()
        assert all(x.chain != "FORWARD" for x in (*result.drift, *result.changes))
        rules = host.ipt(4, "-S", "FORWARD").splitlines()
        assert rules[1] == hook_rule() and all(x in rules for x in lookalikes)
    empty = compile_cell(small_policy(), (), "t")
    result = converge(host.backend(), empty, b)
    assert result.ok, result.to_dict()
    assert result.families[0].delta.orphaned == (TOP_CHAIN,)
    rules = host.ipt(4, "-S", "FORWARD").splitlines()
    assert hook_rule() not in rules and all(x in rules for x in lookalikes)
    assert host.ipt(4, "-S", TOP_CHAIN).splitlines()[1:] == [marker_rule(TOP_CHAIN)]


def test_chain_a_foreign_rule_jumps_to_is_flushed_not_deleted(host: Host) -> None:
    iptables_only(host, "nft rules cannot jump into another table")
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    assert converge(host.backend(), a).ok
    old = next(
        n
        for n in render_cell(a, 4).chains
        if n.startswith("ASG-G-") and n not in render_cell(b, 4).chains
    )
    host.ipt(4, "-A", "INPUT", "-s", "198.18.200.4/32", "-j", old)
    result = converge(host.backend(), b, a)
    assert result.ok, result.to_dict()
    assert old in result.families[0].delta.orphaned
    assert host.backend().read(4).chains[old] == ()
    assert f"-A INPUT -s 198.18.200.4/32 -j {old}" in host.save()


# -- failures change nothing ---------------------------------------------------------------


def test_failed_transaction_changes_nothing(host: Host) -> None:
    host.restore(4, FOREIGN_V4)
    a, b = small_plan(), edge_plan()
    assert converge(host.backend(), a).ok
    before = host.save()

    def bad_line(family: int, text: str) -> str:
        if host.kind == "nftables":  # a command nft cannot parse, last in the transaction
            doc = json.loads(text)
            doc["nftables"].append({"add": {"bogus": {}}})
            return json.dumps(doc)
        lines = text.splitlines()
        lines.insert(len(lines) - 1, "-A FORWARD --bogus-option 1 -j ACCEPT")
        return "\n".join(lines) + "\n"

    result = converge(host.backend(fault=bad_line), b, a)
    assert not result.ok
    errors = [f.error for f in result.families]
    where = "command" if host.kind == "nftables" else "line"
    assert all(e and "refused" in e and where in e for e in errors), errors
    assert all(not f.sent for f in result.families)
    assert host.save() == before


def test_jump_to_a_missing_chain_is_refused_atomically(host: Host) -> None:
    plan = small_plan()
    assert converge(host.backend(), plan).ok
    before = host.save()
    backend = host.backend()
    desired = host.render(plan, 4)
    chains = dict(desired.chains)
    if host.kind == "nftables":
        chain = next(n for n in sorted(chains) if n.startswith("c4-"))
        jump = canonical_rule([{"jump": {"target": "g4-ffffffffffffffff"}}], "asg:g:ffff")
        broken: Ruleset = replace(desired, chains={**chains, chain: (jump, *chains[chain])})
    else:
        chain = _container(plan)
        chains[chain] = (
            *chains[chain][:2],
            f"-A {chain} -j ASG-G-ffffffffffffffff",
            *chains[chain][2:],
        )
        broken = Ruleset(4, chains)
    delta = backend.delta(broken, backend.read(4), desired)
    assert delta.written == (chain,)
    with pytest.raises(ApplyError) as err:
        backend.apply(delta)
    if host.kind != "nftables":  # (nft names no position for errors the kernel reports)
        assert err.value.line is not None
    assert host.save() == before


def test_unreadable_nft_table_is_an_error_not_an_empty_table(host: Host) -> None:
    if host.variant != "nft" or host.kind != "iptables":
        pytest.skip("the nft tool writes rules iptables-nft cannot read; legacy has no such case")
    host.run(
        "nft",
        "-f",
        "-",
        stdin="table ip filter {\n chain FORWARD { type filter hook forward priority 0; "
        "policy accept; udp dport 53 ct mark set 1; }\n}\n",
    )
    before = host.run("nft", "list", "table", "ip", "filter")
    with pytest.raises(ReadError, match="incompatible"):
        host.backend().read(4)
    result = converge(host.backend(), small_plan())
    assert not result.ok
    v4, v6 = result.families
    assert "incompatible" in (v4.error or "") and not v4.sent
    assert host.run("nft", "list", "table", "ip", "filter") == before
    assert v6.error is None and v6.sent  # the families are independent tables


# -- variant detection ---------------------------------------------------------------------


def test_auto_variant_follows_the_rules_already_there(host: Host) -> None:
    if host.kind != "iptables":
        pytest.skip("variant detection of the iptables backend")
    host.restore(4, FOREIGN_V4)
    backend = IptablesBackend.open("auto", host.runner())
    assert backend.variant == host.variant
    other = "nft" if host.variant == "legacy" else "legacy"
    # The host's own `ASG-` chains are not ours: the other variant is not mixing yet.
    assert IptablesBackend.open(other, host.runner()).variant == other
    assert converge(backend, small_plan()).ok
    # Once our chains are in one variant, the other is refused: never mix.
    with pytest.raises(VariantError, match="mixing"):
        IptablesBackend.open(other, host.runner())
    assert IptablesBackend.open("auto", host.runner()).variant == host.variant


# -- the command line ----------------------------------------------------------------------


def test_asgctl_apply_exit_codes(host: Host, tmp_path: Path) -> None:
    base = [
        "apply",
        "--containers",
        str(DATA / "edge-store.json"),
        "--policies",
        str(DATA / "edge-policies"),
        "--variant",
        host.variant,
        "--backend",
        host.kind,
        "--underlay-interface",  # the host namespace has no default route to find it by
        "eth0",
    ]

    def run(*extra: str) -> Result:
        # In-process, with this thread in the namespace: the tools asgctl starts (and a
        # libiptc handle) inherit it, and no interpreter is started per call.
        with in_netns(host.netns):
            return CliRunner().invoke(main, [*base, *extra])

    host.restore(4, FOREIGN_V4)
    before = host.save()
    dry = run("--dry-run")
    assert dry.exit_code == 2, dry.output
    if host.kind == "nftables":
        assert '{"nftables": [' in dry.output and '"hook":"forward"' in dry.output
    else:
        assert "*filter" in dry.output and "COMMIT" in dry.output
    assert host.save() == before
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text("kind: SecurityGroup\nname: x\nrules: [{protocol: tcp}]\n")
    assert run("--policies", str(bad)).exit_code == 1
    (tmp_path / "store.json").write_text("{not json")
    assert run("--containers", str(tmp_path / "store.json")).exit_code == 1
    assert host.save() == before
    applied = run()
    assert applied.exit_code == 2, applied.output
    if host.kind != "nftables":  # the host's `ASG-` chains: named in a note, left alone
        notes = [x for x in applied.output.splitlines() if "note" in x and "left alone" in x]
        assert [n for n in HOST_CHAINS if any(n in x for x in notes)] == list(HOST_CHAINS)
    on_eth0 = replace(edge_plan(), settings=CellSettings(("eth0",), ("eth0",)))
    assert_matches_plan(host, on_eth0)
    again = run("--format", "json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["in_sync"] is True
    host.unhook(4)
    # Report-only audits the kernel against the plan: the removed hook is drift, left alone,
    # and not a change it would make.
    report = run("--report-only")
    assert report.exit_code == 2, report.output
    assert "ipv4: 1 drift; nothing sent (report-only)\n" in report.output
    assert re.search(
        r"^  drift: ipv4 \S+: hook-missing \(\d rules?\), not repaired \(report-only\)$",
        report.output,
        re.M,
    ), report.output
    assert "change " not in report.output and "would send" not in report.output
    [v4, _] = json.loads(run("--report-only", "--format", "json").output)["families"]
    assert v4["changes"] == [] and [(d["what"], d["repaired"]) for d in v4["drift"]] == [
        ("hook-missing", False)
    ]
    assert not host.hooked(4)
    assert run().exit_code == 2
    assert_matches_plan(host, on_eth0)
    assert run().exit_code == 0
    if host.kind == "iptables":  # the other variant would mix: refused, exit 1, untouched
        other = "nft" if host.variant == "legacy" else "legacy"
        before = host.save()
        mixed = run("--variant", other)
        assert mixed.exit_code == 1 and "mixing" in mixed.output
        assert host.save() == before


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.mark.requires("setpriv", "iptables-legacy-save")
@pytest.mark.parametrize(
    "caps",
    [
        pytest.param((), id="no-capabilities"),
        # Enough to list the (still empty) tables of a fresh namespace, so the variant probe
        # passes; not enough to open the filter table (CAP_NET_RAW): the read fails instead.
        pytest.param(("net_admin", "dac_read_search"), id="past-the-probe"),
    ],
)
def test_asgctl_apply_without_privileges_says_so_once(
    make_lab: Callable[..., Lab], caps: tuple[str, ...]
) -> None:
    host = Host(make_lab(conntrack=False).cell, "legacy")
    grant = ",".join(f"+{c}" for c in caps)
    user = [*NOBODY, *([f"--inh-caps={grant}", f"--ambient-caps={grant}"] if caps else [])]

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = ["ip", "netns", "exec", host.netns, *user, sys.executable, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)

    readable = as_nobody("-c", "import reconciler.cli")
    skip_unless_available("unprivileged asgctl", readable.stderr.strip() or None)
    # (No save before: it would create the filter table, and the probe would refuse early.)
    store, policies = DATA / "edge-store.json", DATA / "edge-policies"
    result = as_nobody(
        "-c",
        "from reconciler.cli import main; main()",
        *("apply", "--containers", str(store), "--policies", str(policies)),
        *("--variant", "legacy", "--underlay-interface", "uplink0"),  # no default route here
    )
    assert result.returncode == 1, result
    said = result.stdout + result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert errors and any("ermission denied" in x or "usable" in x for x in errors), said
    for line in errors:  # each failure said once, on stderr, and not again in the summary
        message = re.sub(r"^error: (ipv[46]: )?", "", line)
        assert said.count(message) == 1, said
    assert "Traceback" not in said
    assert "ASG-" not in host.save()


# -- pure parts ----------------------------------------------------------------------------


def test_the_summary_tells_drift_from_planned_changes() -> None:
    drift = rec.Drift(4, "ASG-C-1", rec.RULE_MISSING, ("-A ASG-C-1 -j ACCEPT",), ())
    change = rec.Change(4, "ASG-G-2", rec.CHAIN_ADDED, 1)
    delta = IptablesDelta(4, (":ASG-C-1 - [0:0]",), (drift,), (change,), written=("ASG-C-1",))

    def summary(mode: str, *, sent: bool = False, repair: bool = True) -> list[str]:
        d = replace(delta, drift=(replace(drift, repair=repair),))
        family = FamilyResult(4, d, sent)
        return format_text(ConvergeResult("iptables-nft", mode, (family,))).splitlines()

    assert summary("report-only")[1:4] == [
        "ipv4: 1 planned change(s), 1 drift; nothing sent (report-only)",
        "  change ipv4 ASG-G-2: chain-added (1 rules)",
        "  drift: ipv4 ASG-C-1: rule-missing (1 rule), not repaired (report-only)",
    ]
    assert (
        summary("apply", sent=True)[3] == "  drift: ipv4 ASG-C-1: rule-missing (1 rule), repaired"
    )
    assert summary("apply", sent=True, repair=False)[3].endswith(
        "rule-missing (1 rule), not repaired (self-heal off)"
    )
    assert summary("dry-run")[3].endswith("not repaired (dry-run)")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# Table `filter' is incompatible, use 'nft' tool.\n",
        "*filter\n:INPUT ACCEPT [0:0]\n",  # truncated
        "*filter\n:ASG-X - [0:0]\n-A ASG-X -j ACCEPT\nsomething odd\nCOMMIT\n",
        "*filter\n-A ASG-Y -j ACCEPT\nCOMMIT\n",  # rule for an undeclared chain
        "*nat\nCOMMIT\n",
    ],
)
def test_parser_refuses_ambiguous_output(text: str) -> None:
    with pytest.raises(ReadError):
        parse_save(text, 4)


def test_parser_keeps_only_ours() -> None:
    text = "\n".join(
        [
            "# Generated by iptables-save",
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [5:300]",
            ":ASG-FORWARD - [0:0]",
            ":ASG-LEGACY - [0:0]",
            ":OTHER - [0:0]",
            "-A FORWARD -j OTHER",
            hook_rule(),
            '-A FORWARD -m comment --comment "asg:forward" -j ACCEPT',  # not a jump to ours
            "-A ASG-FORWARD -s 198.18.0.2/32 -j ACCEPT",
            marker_rule("ASG-FORWARD"),  # wherever it is: it changes no verdict
            "-A ASG-LEGACY -j ASG-FORWARD",
            "-A OTHER -j ASG-FORWARD",
            '-A OTHER -m comment --comment "mentions -j ASG-NOPE" -j ACCEPT',
            "COMMIT",
            "# Completed",
        ]
    )
    state = parse_save(text, 4)
    assert dict(state.chains) == {"ASG-FORWARD": ("-A ASG-FORWARD -s 198.18.0.2/32 -j ACCEPT",)}
    assert dict(state.unmarked) == {"ASG-LEGACY": ("-A ASG-LEGACY -j ASG-FORWARD",)}
    assert [(h.index, h.text) for h in state.hooks] == [(1, hook_rule())]
    assert state.foreign_refs == frozenset({"ASG-FORWARD"})


def test_delta_is_empty_when_the_kernel_matches() -> None:
    plan = edge_plan()
    for family in (4, 6):
        desired = render_cell(plan, family)
        observed = OwnedState(family, desired.chains, (HookCopy(0, hook_rule()),), frozenset())
        assert compute_delta(desired, observed, desired).empty


def test_delta_orders_declare_delete_fill_insert_remove() -> None:
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    old = render_cell(a, 4)
    observed = OwnedState(4, old.chains, (HookCopy(3, hook_rule()),), frozenset())
    delta = compute_delta(render_cell(b, 4), observed, old)
    kinds = [op.split()[0] for op in delta.ops]
    order = {":": 0, "-D": 1, "-A": 2, "-I": 3, "-X": 4}
    seen = [order[k[0] if k.startswith(":") else k] for k in kinds]
    assert seen == sorted(seen)
    assert [d.what for d in delta.drift] == [rec.HOOK_MOVED]
    assert replace(delta, ops=()).empty


def test_delta_tells_our_unmarked_chains_from_the_hosts() -> None:
    """Without a marker, a prefixed chain is ours only if the last plan applied put it
    there; a foreign chain's jump keeps a chain of ours alive like any foreign rule's."""
    a, b = small_plan(), small_plan(extra=(_rule("tcp", "198.19.2.0/24", "80"),))
    old, new = render_cell(a, 4), render_cell(b, 4)
    gone = next(n for n in old.chains if n.startswith("ASG-G-") and n not in new.chains)
    legacy = ("-A ASG-LEGACY -s 198.18.200.5/32 -j " + gone,)
    observed = OwnedState(
        4,
        {n: rules for n, rules in old.chains.items() if n != gone},
        (HookCopy(0, hook_rule()),),
        frozenset(),
        unmarked={gone: (), "ASG-LEGACY": legacy},  # ours, flushed; the host's
    )
    delta = compute_delta(new, observed, old)
    assert delta.foreign == ("ASG-LEGACY",)
    assert not any("ASG-LEGACY" in op.split(" -j ")[0] for op in delta.ops)
    assert delta.orphaned == (gone,) and f"-X {gone}" not in delta.ops
    assert marker_rule(gone) in delta.ops  # kept, and provably ours again
    assert (gone, rec.MARKER_MISSING) in {(d.chain, d.what) for d in delta.drift}
    for name in delta.written:  # every chain written gets its marker before its rules
        assert delta.ops.index(marker_rule(name)) < delta.ops.index(new.chains[name][0])
    # Without a last plan nothing proves `gone` ours: it is left alone as well.
    blind = compute_delta(new, observed, None)
    assert blind.foreign == (gone, "ASG-LEGACY")
    assert not any(gone in op for op in blind.ops)


def test_variant_detection_counts_only_chains_we_can_prove_ours() -> None:
    """The host's `ASG-` chains in one variant must not pin us to it, nor make installing in
    the other look like mixing; our marker, or our dispatch chain by name (a chain of ours
    from before markers: never risk mixing), does."""
    host = "\n".join(FOREIGN_V4) + "\n"
    assert count_rules(host) == (8, False)
    ours = host.replace("COMMIT", f":{TOP_CHAIN} - [0:0]\n{marker_rule(TOP_CHAIN)}\nCOMMIT")
    assert count_rules(ours) == (9, True)
    old = host.replace("COMMIT", f":{TOP_CHAIN} - [0:0]\nCOMMIT")
    assert count_rules(old) == (8, True)
    # A marker copied into another chain's line proves nothing about that line's chain.
    odd = host.replace("COMMIT", f"-A ASG-LEGACY -s 198.18.200.9/32 {marker_rule('X')[5:]}\nCOMMIT")
    assert count_rules(odd)[1] is False
