"""The iptables backend's shortcuts must never see less than a full read would.

What the dataplane remembers between reads (nft generation ids, the state after our own
transaction, lines iptables printed before), the incremental render, the legacy empty-table
check and libiptc's own tokenizer are all checked here against the slow path they replace:
same state, same delta, same errors, and a full read again whenever anything else changed.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from asgctl_lab.netns import Lab
from reconciler.backends import VerifyError, converge
from reconciler.backends.iptables.backend import IptablesBackend, tool
from reconciler.backends.iptables.delta import compute_delta
from reconciler.backends.iptables.libiptc import _words
from reconciler.backends.iptables.memory import after_delta
from reconciler.backends.iptables.parse import HookCopy, OwnedState, parse_save
from reconciler.backends.iptables.render import (
    CONTAINER_PREFIX,
    TOP_CHAIN,
    Ruleset,
    group_chain,
    hook_rule,
    marker_rule,
    render_cell,
)
from reconciler.backends.iptables.rendercache import RenderCache
from reconciler.backends.kernel import generation
from reconciler.backends.kernel.generation import KernelProbe
from reconciler.backends.kernel.memory import shape
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup
from tests.cases import RecordingRunner as Recording
from tests.cases import edge_plan

# -- plans ----------------------------------------------------------------------------------


def _rule(proto: str, dest: str, port: int) -> Rule:
    return Rule(proto, (AddressRange.parse(dest),), (PortRange(port, port),))


def policy(extra: tuple[Rule, ...] = ()) -> PolicySet:
    web = (_rule("tcp", "198.19.1.0/24", 443), _rule("tcp", "198.19.1.7", 8080), *extra)
    return PolicySet(
        security_groups=(
            SecurityGroup("web", web, running_spaces=("space-a",)),
            SecurityGroup("dns", (_rule("udp", "198.19.53.53", 53),), running_default=True),
        )
    )


CONTAINERS = tuple(
    Container(f"c{i}", f"198.18.0.{i + 2}", app_id=f"app-{i}", space_id=f"space-{'ab'[i % 2]}")
    for i in range(6)
)


def plan(extra: tuple[Rule, ...] = ()) -> CellPlan:
    return compile_cell(policy(extra), CONTAINERS, "t")


# -- pure -----------------------------------------------------------------------------------


def test_incremental_render_equals_a_full_render() -> None:
    cache = RenderCache()
    plans = [plan(), plan((_rule("tcp", "198.19.9.9", 22),)), edge_plan(), plan()]
    for p in plans + plans[::-1]:
        for family in (4, 6):
            assert cache.get(p, family, render_cell) == render_cell(p, family)


def test_incremental_render_renders_only_new_groups() -> None:
    cache = RenderCache()
    rendered: list[int] = []

    def counting(p: CellPlan, family: int) -> Ruleset:
        rendered.append(sum(1 for g in p.groups if g.version == family))
        return render_cell(p, family)

    before, after = plan(), plan((_rule("tcp", "198.19.9.9", 22),))
    cache.get(before, 4, counting)
    cache.get(after, 4, counting)
    cache.get(after, 4, counting)  # seen: not rendered again
    new = {g.id for g in after.groups} - {g.id for g in before.groups}
    assert rendered == [len(before.groups), len(new)]


def test_libiptc_words_split_every_rendered_line_as_shlex_does() -> None:
    lines = [
        line for f in (4, 6) for r in render_cell(edge_plan(), f).chains.values() for line in r
    ]
    odd = ['-A X -m comment --comment "a b" -j Y', "-A X 'q'", 'a"b" c', '-A X "a\\"b"', '-A X ""']
    for line in [*lines, *odd]:
        assert _words(line) == shlex.split(line), line


def test_after_delta_models_declare_fill_delete_and_hook_moves() -> None:
    first, desired = render_cell(plan(), 4), render_cell(plan((_rule("tcp", "198.19.9.9", 22),)), 4)
    foreign = "-A FORWARD -j ACCEPT"
    observed = OwnedState(4, first.chains, (HookCopy(1, hook_rule()), HookCopy(3, hook_rule())))
    delta = compute_delta(desired, observed, first)
    state = after_delta(observed, delta)
    assert state is not None and dict(state.chains) == desired.chains
    assert [(h.index, h.text) for h in state.hooks] == [(0, hook_rule())]
    assert after_delta(observed, replace(delta, ops=(foreign,))) is None  # not ours to model


def test_shapes_blank_ids_only() -> None:
    gid = "fedcba9876543210" * 2  # a whole id in the comment, a cut one in the chain names
    line = f'-A ASG-C-0123456789abcdef012345 -m comment --comment "asg:g:{gid}" -j ASG-G-x'
    assert shape(line) == '-A ASG-C-~ -m comment --comment "asg:g:~" -j ASG-G-x'
    assert shape("-A ASG-G-1 -d 198.19.1.0/24 -p tcp") == "-A ASG-G-1 -d 198.19.1.0/24 -p tcp"
    chains = render_cell(plan(), 4).chains
    containers = [rules for name, rules in chains.items() if name.startswith(CONTAINER_PREFIX)]
    assert len(containers) == len(CONTAINERS)
    for at in (0, -2):  # every container chain's ESTABLISHED and deny-log line: one shape
        assert len({shape(rules[at]) for rules in containers}) == 1


# -- in a namespace -------------------------------------------------------------------------


@pytest.fixture
def cell(make_lab: Callable[..., Lab]) -> str:
    return make_lab(conntrack=False).cell


def backend(netns: str, variant: str) -> IptablesBackend:
    return IptablesBackend(variant, Recording(("ip", "netns", "exec", netns)))


def calls(b: IptablesBackend) -> Recording:
    assert isinstance(b.runner, Recording)
    return b.runner


def full_read(netns: str, variant: str, family: int = 4) -> dict[str, tuple[str, ...]]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, tool(variant, family, "save"), "-t", "filter"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(parse_save(out, family).chains)


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_idle_cycle_reads_nothing_and_still_sees_drift(cell: str, variant: str) -> None:
    b = backend(cell, variant)
    p = plan()
    assert converge(b, p).ok
    assert converge(b, p, p).in_sync  # legacy: this read takes the table's digest
    calls(b).calls.clear()
    again = converge(b, p, p)
    assert again.ok and again.in_sync
    assert calls(b).calls == []  # generation id or table digest answered for both families
    # Someone else changes our chain, even keeping its size: the token moves, drift shows.
    rendered = render_cell(p, 4).chains
    chain = next(n for n, rules in rendered.items() if "--dport 53 " in rules[0])
    changed = rendered[chain][0].replace("--dport 53 ", "--dport 54 ")
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            cell,
            f"iptables-{variant}",
            "-R",
            chain,
            "2",  # rule 1 is the chain's ownership marker
            *shlex.split(changed)[2:],
        ],
        check=True,
    )
    healed = converge(b, p, p)
    assert healed.ok and healed.drift and calls(b).saves() >= 1
    assert full_read(cell, variant) == render_cell(p, 4).chains


def test_nft_change_is_verified_from_the_generation_and_one_listing(cell: str) -> None:
    b = backend(cell, "nft")
    before, after = plan(), plan((_rule("tcp", "198.19.9.9", 22),))
    assert converge(b, before).ok
    calls(b).calls.clear()
    result = converge(b, after, before)
    assert result.ok and not result.in_sync
    assert calls(b).saves() == 0
    assert calls(b).listings() == 1  # the group with the new rule: a line never printed
    assert full_read(cell, "nft") == render_cell(after, 4).chains
    assert dict(b.read(4).chains) == full_read(cell, "nft")  # the state it proved is the kernel's
    calls(b).calls.clear()
    back = converge(b, before, after)  # every line printed before: nothing to list
    assert back.ok and calls(b).saves() == 0 and calls(b).listings() == 0
    assert full_read(cell, "nft") == render_cell(before, 4).chains


def test_nft_verify_catches_a_line_iptables_prints_differently(cell: str) -> None:
    b = backend(cell, "nft")
    p = plan()
    assert converge(b, p).ok
    desired = render_cell(p, 4)
    name = group_chain(p.groups[0].id)
    # Same rule, options in another order: accepted, but printed back in canonical order.
    odd = f"-A {name} -p tcp -d 198.19.2.2/32 -m tcp --dport 25 -j ACCEPT"
    chains = dict(desired.chains)
    chains[name] = (*chains[name], odd)
    wrong = Ruleset(4, chains)
    delta = b.delta(wrong, b.read(4), desired)
    b.apply(delta)
    with pytest.raises(VerifyError, match="reads back differently"):
        b.verify(wrong, delta)
    assert calls(b).listings() == 1


def test_nft_second_writer_between_read_and_apply_means_a_full_verify(cell: str) -> None:
    b = backend(cell, "nft")
    before, after = plan(), plan((_rule("tcp", "198.19.9.9", 22),))
    assert converge(b, before).ok
    desired = b.render(after, 4)
    observed = b.read(4)
    subprocess.run(["ip", "netns", "exec", cell, "iptables-nft", "-N", "FOREIGN"], check=True)
    delta = b.delta(desired, observed, b.render(before, 4))
    calls(b).calls.clear()
    b.apply(delta)
    b.verify(desired, delta)
    assert calls(b).saves() == 1


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_a_family_without_containers_is_not_saved_on_legacy(cell: str, variant: str) -> None:
    b = backend(cell, variant)
    p = plan()  # IPv4 only
    assert converge(b, p).ok
    calls(b).calls.clear()
    assert converge(b, p, p).in_sync
    v6_saves = [c for c in calls(b).calls if c[0].startswith("ip6tables")]
    assert v6_saves == []
    # ... but a v6 rule of anyone's is read (it might be ours), and a stale hook and
    # dispatch chain of ours (marked) are removed.
    stale = ("*filter", f":{TOP_CHAIN} - [0:0]", marker_rule(TOP_CHAIN), hook_rule(), "COMMIT")
    subprocess.run(
        ["ip", "netns", "exec", cell, tool(variant, 6, "restore"), "--noflush"],
        input="\n".join(stale) + "\n",
        text=True,
        check=True,
    )
    fixed = converge(b, p, p)
    assert fixed.ok and not fixed.in_sync
    assert fixed.families[1].delta.deleted == (TOP_CHAIN,)
    assert full_read(cell, variant, 6) == {}
    assert (
        "asg:"
        not in subprocess.run(
            ["ip", "netns", "exec", cell, tool(variant, 6, "save"), "-t", "filter"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


# -- an install's read-back, deferred to the next cycle's read --------------------------------


@dataclass(eq=False)  # a backend is a mutable handle (see IptablesBackend)
class PrintsDifferently(IptablesBackend):
    """Renders one line in an order iptables accepts but prints back in its own: the case a
    read-back exists to catch."""

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        rendered = IptablesBackend.render(self, plan, family)
        if not rendered.chains:
            return rendered
        name = group_chain(plan.groups[0].id)
        chains = dict(rendered.chains)
        chains[name] = (
            *chains[name],
            f"-A {name} -p tcp -d 198.19.2.2/32 -m tcp --dport 25 -j ACCEPT",
        )
        return Ruleset(family, chains)


def _after_restore(b: IptablesBackend) -> list[tuple[str, ...]]:
    restores = [i for i, c in enumerate(calls(b).calls) if c[0].endswith("-restore")]
    assert restores, "nothing was sent"
    return calls(b).calls[restores[-1] + 1 :]


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_an_install_is_read_back_by_the_next_cycle_not_its_own(cell: str, variant: str) -> None:
    b = backend(cell, variant)
    p = plan()
    installed = converge(b, p, defer_install_verify=True)
    v4 = installed.families[0]
    assert installed.ok and v4.sent and not v4.verified
    ipv4_reads = [c for c in _after_restore(b) if c[0].startswith("iptables-")]
    assert not [c for c in ipv4_reads if c[0].endswith("-save") or "-S" in c]
    calls(b).calls.clear()
    checked = converge(b, p, p, defer_install_verify=True)
    assert checked.ok and checked.in_sync
    assert calls(b).saves() >= 1  # the read that checks the install is a real one
    assert full_read(cell, variant) == render_cell(p, 4).chains


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_a_change_to_installed_chains_is_still_verified_at_once(cell: str, variant: str) -> None:
    b = backend(cell, variant)
    before, after = plan(), plan((_rule("tcp", "198.19.9.9", 22),))
    assert converge(b, before, defer_install_verify=True).ok
    changed = converge(b, after, before, defer_install_verify=True)
    assert changed.ok and changed.families[0].sent and changed.families[0].verified
    assert full_read(cell, variant) == render_cell(after, 4).chains


def test_an_install_that_reads_back_differently_fails_the_cycle_after(cell: str) -> None:
    b = PrintsDifferently("legacy", Recording(("ip", "netns", "exec", cell)))
    p = plan()
    assert converge(b, p, defer_install_verify=True).ok
    for _ in range(2):  # every cycle after: a repair verified at once, and its VerifyError
        again = converge(b, p, p, defer_install_verify=True)
        v4 = again.families[0]
        assert v4.delta.drift and v4.sent and v4.verified
        assert not again.ok and "reads back differently" in (v4.error or "")


@pytest.mark.parametrize("chunk", [3, generation.CHUNK_ENTRIES])
def test_a_legacy_table_token_ignores_counters_and_nothing_else(
    cell: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "CHUNK_ENTRIES", chunk)
    b = backend(cell, "legacy")
    p = plan()
    assert converge(b, p).ok
    probe = KernelProbe(cell)
    try:
        remembered = probe.legacy_token(4, relayout=True)
        assert remembered is not None
        assert remembered == probe.legacy_token(4)  # as memory.recall compares
        first = render_cell(p, 4).chains[TOP_CHAIN][0]
        words = shlex.split(first)[2:]

        def replace_rule(*extra: str) -> None:
            cmd = ["iptables-legacy", "-R", TOP_CHAIN, "2", *extra, *words]  # 1: the marker
            subprocess.run(["ip", "netns", "exec", cell, *cmd], check=True)

        replace_rule("-c", "7", "700")  # the same rule, other counters: traffic, to the token
        assert remembered == probe.legacy_token(4)
        words[words.index("-s") + 1] = "198.18.0.99/32"  # same size, other address
        replace_rule()
        assert remembered != probe.legacy_token(4)
        # A token cut along another layout never matches, even of the very same table.
        now = probe.legacy_token(4)
        assert now is not None and probe.legacy_token(4, relayout=True) != now
    finally:
        probe.close()
