"""What was reviewed is what runs, even when two contents share an id.

The attack (issue 20): rule ids used to be 64 bits of SHA-256, and a birthday search on two
cores found, in minutes, a one-host five-port TCP rule and a `0.0.0.0/0` TCP `1-65535` rule
with one id.  With the first at the base and the second in a pull request, `asgctl plan`
said "No changes", and agents installed the wide rule without a change log line, or kept
the narrow one while reporting the new revision applied, because every decision compared
ids.  Ids now carry 128 bits, which no search reaches; these tests go further and *force*
the collision, by injecting an id function under which the two rules (and so their groups)
get equal ids, and check that every decision still sees the change: the plan (text and
exit code), explain, the render caches (iptables and nft), the nft delta, the agent's
change log and mass-revoke gate, and real agents (`--once`, and a long-running one whose
render cache is warm), which must end with the wide rule in the kernel.

Where a name is shorter than the content it stands for, two contents under one name are
refused, loudly: an id function that makes *every* id equal gives a plan error, an exit 1
from `plan` and `explain`, and a `PlanRefused` agent that keeps the rules it has.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import reconciler.core.compile as compile_module
from asgctl_lab.netns import Lab
from reconciler.agent.config import build_config
from reconciler.agent.core import condition, container_changes
from reconciler.agent.loop import SYNC, Agent
from reconciler.backends import Runner
from reconciler.backends.iptables import render as iptables
from reconciler.backends.iptables.rendercache import RenderCache
from reconciler.backends.nftables import render as nft
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.backends.nftables.delta import compute_nft_delta
from reconciler.backends.nftables.parse import NftState
from reconciler.cli import main
from reconciler.core.cellplan import CellSettings, PlanError, content_id
from reconciler.core.compile import compile_cell
from reconciler.core.gate import revoke_count
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, RuleItem
from reconciler.core.model import SecurityGroup as Group
from reconciler.sources.cellstore import dump_store
from tests.agentkit import container, local_repo, sg, write_store
from tests.conftest import require_netns
from tests.faultkit import expected_snapshot, snapshot
from tests.policyrepo import commit_all, init_repo, write_tree

NARROW = '{protocol: tcp, destination: 198.19.7.7, ports: "22,80,443,8080,9090"}'
WIDE = '{protocol: tcp, destination: 0.0.0.0/0, ports: "1-65535"}'
NARROW_ITEM = RuleItem(
    "tcp",
    AddressRange.parse("198.19.7.7"),
    tuple(PortRange(p, p) for p in (22, 80, 443, 8080, 9090)),
)
WIDE_ITEM = RuleItem("tcp", AddressRange.parse("0.0.0.0/0"), (PortRange(1, 65535),))
ONLY_WIDE_ALLOWS = "198.19.200.1:3306"  # no port or host of NARROW
WIDE_ELEMENT = "0.0.0.0-255.255.255.255 . 6 . 1-65535"  # its nft set element


def _collide(text: str) -> str:
    """The attacker's id function: the wide rule hashes as the narrow one does."""
    return content_id(text.replace(WIDE_ITEM.key(), NARROW_ITEM.key()))


def _inject(monkeypatch: pytest.MonkeyPatch, ids: Callable[[str], str]) -> None:
    """Compile names everything with `ids` from now on (container ids are memoised)."""
    monkeypatch.setattr(compile_module, "content_id", ids)
    compile_module._chain_id.cache_clear()


@pytest.fixture
def collision(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ids are computed by the injected function for the rest of the test."""
    _inject(monkeypatch, _collide)
    yield
    compile_module._chain_id.cache_clear()  # no injected id outlives the test


@pytest.fixture
def all_ids_equal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    _inject(monkeypatch, lambda text: "0" * 32)
    yield
    compile_module._chain_id.cache_clear()


def _policy(item: RuleItem) -> PolicySet:
    rule = Rule(item.protocol, (item.destination,), item.ports)
    return PolicySet(security_groups=(Group("open", (rule,), running_default=True),))


CONTAINERS = (container("c0", 0), container("c1", 1))


# ----------------------------------------------------------------------------- the premise


def test_the_injected_function_gives_both_rules_and_their_groups_one_id(collision: None) -> None:
    narrow = compile_cell(_policy(NARROW_ITEM), CONTAINERS, "cell-a")
    wide = compile_cell(_policy(WIDE_ITEM), CONTAINERS, "cell-a")
    assert [r.item for g in narrow.groups for r in g.rules] == [NARROW_ITEM]
    assert [r.item for g in wide.groups for r in g.rules] == [WIDE_ITEM]
    # What the old code compared: all equal, so it saw no change anywhere.
    assert [r.id for g in narrow.groups for r in g.rules] == [
        r.id for g in wide.groups for r in g.rules
    ]
    assert [g.id for g in narrow.groups] == [g.id for g in wide.groups]
    assert [cp.groups for cp in narrow.containers] == [cp.groups for cp in wide.containers]
    # What decides now: the content.
    assert [g.digest for g in narrow.groups] != [g.digest for g in wide.groups]
    assert narrow.digest() != wide.digest()


def test_ids_carry_128_bits_and_names_fit_iptables() -> None:
    plan = compile_cell(_policy(WIDE_ITEM), CONTAINERS, "cell-a")
    ids = [plan.groups[0].id, plan.groups[0].rules[0].id, plan.containers[0].chain_id]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    chains = iptables.render_cell(plan, 4).chains
    assert max(len(name) for name in chains) <= 28  # iptables' limit on chain names
    text = "\n".join(line for lines in chains.values() for line in lines)
    assert f'"asg:g:{plan.groups[0].id}"' in text  # comments carry whole ids


# ----------------------------------------------------------------------------- CI and CLI


def _repo(tmp_path: Path, base: str, head: str) -> Path:
    """A policy repo: `base` then `head` as the only rule of a global ASG; one cell."""
    repo = init_repo(tmp_path / "repo")
    store = dump_store(list(CONTAINERS))
    write_tree(repo, {"policies/open.yaml": sg("open", [base]), "cells/cell-a.json": store})
    commit_all(repo, "base")
    write_tree(repo, {"policies/open.yaml": sg("open", [head])})
    commit_all(repo, "head")
    return repo


def _plan(repo: Path, fmt: str) -> Any:
    args = ["plan", "--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies")]
    args += ["--inventory", str(repo / "cells"), "--format", fmt, "--detailed-exitcode"]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_plan_shows_a_rule_that_took_the_old_rules_id(tmp_path: Path, collision: None) -> None:
    repo = _repo(tmp_path, NARROW, WIDE)
    text = _plan(repo, "text")
    assert text.exit_code == 2, text.output  # changes
    out = text.output
    assert "No changes" not in out
    assert "2 containers gain access" in out  # for reviewers: what the rule opens
    assert "+ tcp 198.19.7.8-255.255.255.255 all ports" in out
    # For operators: the chain keeps its name and its rule its id, and is rewritten.
    (group,) = {line.split()[1] for line in out.splitlines() if "(IPv4): update @@" in line}
    assert f"- -A {group} -d 198.19.7.7/32 -p tcp -m multiport --dports 22,80" in out
    assert f"+ -A {group} -p tcp -m tcp --dport 1:65535 " in out
    doc = json.loads(_plan(repo, "json").output)
    assert doc["status"] == "changes" and doc["counts"]["cells_changed"] == 1


def test_explain_answers_from_the_content(tmp_path: Path, collision: None) -> None:
    repo = _repo(tmp_path, NARROW, WIDE)
    store = str(repo / "cells" / "cell-a.json")
    args = ["explain", "--containers", store, "--policies", str(repo / "policies")]
    args += ["--container", "c0", "--to", ONLY_WIDE_ALLOWS]
    before = CliRunner().invoke(main, [*args, "--rev", "HEAD~1"])
    after = CliRunner().invoke(main, [*args, "--rev", "HEAD"])
    assert before.exit_code == 3 and before.output.startswith("DENY"), before.output
    assert after.exit_code == 0 and after.output.startswith("ALLOW"), after.output
    assert "SecurityGroup/open rules[0]" in after.output


# ----------------------------------------------------------------------------- caches


def test_render_caches_render_the_new_content(collision: None) -> None:
    narrow = compile_cell(_policy(NARROW_ITEM), CONTAINERS, "cell-a")
    wide = compile_cell(_policy(WIDE_ITEM), CONTAINERS, "cell-a")
    cache = RenderCache()
    assert cache.get(narrow, 4, iptables.render_cell) == iptables.render_cell(narrow, 4)
    warm = cache.get(wide, 4, iptables.render_cell)  # the narrow group's chain is cached
    assert warm == iptables.render_cell(wide, 4)
    assert any("--dport 1:65535" in line for lines in warm.chains.values() for line in lines)
    memo = nft.RenderMemo()  # what an nftables backend's render cache keeps
    nft.render_cell(narrow, 4, memo)  # fills the group memo with the narrow group
    sets = nft.render_cell(wide, 4, memo).sets
    elements = {e for s in sets.values() for e in s.elements or ()}
    assert WIDE_ELEMENT in elements, elements


def test_nft_delta_edits_a_set_whose_name_now_means_other_content(collision: None) -> None:
    """After a terse read (set elements unread) the kernel holds what the last plan wrote."""
    narrow = nft.render_cell(compile_cell(_policy(NARROW_ITEM), CONTAINERS, "c"), 4)
    wide = nft.render_cell(compile_cell(_policy(WIDE_ITEM), CONTAINERS, "c"), 4)
    (name,) = (n for n in wide.sets if n.startswith("g4-"))
    assert name in narrow.sets and narrow.sets[name] != wide.sets[name]  # one name, two sets
    unread = {n: s if s.data else _unread(s) for n, s in narrow.sets.items()}
    kernel = NftState(
        4,
        dict(narrow.chains),
        table=True,
        base_hooks=narrow.base_hooks,
        sets=unread,
        elements_read=False,
    )
    delta = compute_nft_delta(wide, kernel, narrow)
    assert name in delta.written
    assert delta.elements_added == 1 and delta.elements_deleted == 5
    assert any(c.chain == name for c in delta.changes)


def _unread(s: nft.NftSet) -> nft.NftSet:
    return nft.NftSet(s.name, s.keys, s.flags, s.data, None)


# ----------------------------------------------------------------------------- agent gates


def test_change_log_and_mass_revoke_gate_compare_rules_not_ids(collision: None) -> None:
    narrow = compile_cell(_policy(NARROW_ITEM), CONTAINERS, "cell-a")
    wide = compile_cell(_policy(WIDE_ITEM), CONTAINERS, "cell-a")
    records = container_changes(narrow, wide, cell="cell-a", revision="r")
    assert [(r["handle"], r["rules_added"], r["rules_removed"]) for r in records] == [
        ("c0", 1, 1),
        ("c1", 1, 1),
    ]
    # Narrowing the wide rule revokes it from both: the gate compares packets, not ids.
    share = revoke_count(wide, narrow)
    assert (share.net_lost, share.total) == (2, 2)


# ----------------------------------------------------------------------------- every id equal


def test_one_name_for_two_contents_is_refused_everywhere(
    tmp_path: Path, all_ids_equal: None
) -> None:
    with pytest.raises(PlanError, match=r"containers 'c0' and 'c1' get one chain name"):
        compile_cell(_policy(WIDE_ITEM), CONTAINERS, "cell-a")
    two_groups = PolicySet(
        security_groups=(
            Group("a", (Rule("tcp", (NARROW_ITEM.destination,), NARROW_ITEM.ports),),
                  running_default=True),
            Group("b", (Rule("udp", (NARROW_ITEM.destination,), NARROW_ITEM.ports),),
                  running_spaces=("elsewhere",)),
        )
    )  # fmt: skip
    other = Container("c9", "198.18.0.9", "app-x", "elsewhere", "org", "", "app")
    with pytest.raises(PlanError, match="hold different rules under one chain name"):
        compile_cell(two_groups, (CONTAINERS[0], other), "cell-a")
    repo = _repo(tmp_path, NARROW, WIDE)
    planned = _plan(repo, "text")
    assert planned.exit_code == 1 and "get one chain name" in planned.output, planned.output
    store = str(repo / "cells" / "cell-a.json")
    explained = CliRunner().invoke(
        main,
        ["explain", "--containers", store, "--policies", str(repo / "policies"),
         "--container", "c0", "--to", ONLY_WIDE_ALLOWS],
    )  # fmt: skip
    assert explained.exit_code == 1 and "hash collision" in explained.output


# ----------------------------------------------------------------------------- real agents


class Cell:
    """Agents enforcing a policy repo's `main` in a lab namespace, on iptables-legacy or on
    nftables with terse reads (set elements not listed: what a large cell does)."""

    def __init__(self, tmp_path: Path, lab: Lab, backend: str = "iptables") -> None:
        self.tmp_path = tmp_path
        self.lab = lab
        self.backend = backend
        self.repo = local_repo(tmp_path)
        self.store = write_store(tmp_path / "store.json", list(CONTAINERS))
        self.foreign, _ = snapshot(lab.cell, "legacy")

    def agent(self, **more: Any) -> Agent:
        """A fresh agent process, as a restart or a systemd timer makes one."""
        backend = None
        if self.backend == "nftables":
            runner = Runner.in_netns(self.lab.cell)
            backend = NftablesBackend.open(runner=runner, read_elements=False)
        settings = {
            "source": self.repo.url,
            "cell": "cell-a",
            "containers": str(self.store),
            "state-dir": str(self.tmp_path / "state"),
            "netns": self.lab.cell,
            "variant": "legacy",
            "verify": "none",
            "mass-revoke-threshold": "100%",
            "status-push": False,
            "underlay-interface": "uplink0",  # a lab cell without services: no default route
        }
        settings.update(more)
        cfg = build_config(settings, {})
        return Agent(cfg, out=io.StringIO(), err=io.StringIO(), backend=backend)

    def commit(self, rule: str) -> str:
        return self.repo.commit(rule, {"open.yaml": sg("open", [rule])})

    def holds(self, item: RuleItem) -> None:
        """The kernel holds exactly the plan of `item` (and the wide rule, if that one)."""
        settings = CellSettings(underlay4=("uplink0",), underlay6=("uplink0",))
        plan = compile_cell(_policy(item), CONTAINERS, "cell-a", settings)
        if self.backend == "nftables":  # a full read, every element listed
            runner = Runner.in_netns(self.lab.cell)
            state = NftablesBackend.open(runner=runner, read_elements=True).read(4)
            want = nft.render_cell(plan, 4)
            assert dict(state.chains) == dict(want.chains)
            assert dict(state.sets) == dict(want.sets), state.sets
            elements = {e for s in state.sets.values() for e in s.elements or ()}
            assert (WIDE_ELEMENT in elements) == (item == WIDE_ITEM), elements
            return
        state, raw = snapshot(self.lab.cell, "legacy")
        assert state == expected_snapshot(self.foreign, plan), raw[-2000:]
        assert ("--dport 1:65535" in raw) == (item == WIDE_ITEM), raw[-2000:]


def _changes(agent: Agent) -> list[dict[str, Any]]:
    out = agent.out.getvalue().splitlines()  # type: ignore[attr-defined]
    records = [json.loads(x) for x in out if x.startswith("{")]
    return [r for r in records if r.get("event") == "container-rules-changed"]


@pytest.fixture(params=["iptables", "nftables"])
def cell(request: pytest.FixtureRequest, tmp_path: Path, make_lab: Callable[..., Lab]) -> Cell:
    require_netns()
    return Cell(tmp_path, make_lab(conntrack=False), request.param)


@pytest.mark.netns
def test_a_long_running_agent_with_a_warm_cache_installs_the_new_rule(
    cell: Cell, collision: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = cell.agent()
    try:
        base = cell.commit(NARROW)
        first = agent.cycle(SYNC)
        assert first.applied is not None and first.applied.sha == base
        cell.holds(NARROW_ITEM)
        head = cell.commit(WIDE)
        second = agent.cycle(SYNC)  # same process: render caches hold the narrow chains
        ready = condition(second.conditions, "Ready")
        assert ready is not None and ready.status == "True", ready
        assert second.applied is not None and second.applied.sha == head
        assert second.applied.digest != first.applied.digest
        cell.holds(WIDE_ITEM)
        assert [(r["handle"], r["rules_added"], r["rules_removed"]) for r in _changes(agent)][
            -2:
        ] == [("c0", 1, 1), ("c1", 1, 1)]

        # A head under which two containers share a chain name is refused, not applied.
        _inject(monkeypatch, lambda text: "0" * 32)
        refused = cell.commit(NARROW)
        third = agent.cycle(SYNC)
        ready = condition(third.conditions, "Ready")
        assert ready is not None and ready.status == "False" and ready.reason == "PlanRefused"
        assert third.applied is not None and third.applied.sha == head != refused
        _inject(monkeypatch, _collide)
        cell.holds(WIDE_ITEM)
    finally:
        agent.source.close()


@pytest.mark.netns
def test_agent_once_installs_the_new_rule_and_logs_it(cell: Cell, collision: None) -> None:
    cell.commit(NARROW)
    first = cell.agent(once=True)
    assert first.run() == 0
    cell.holds(NARROW_ITEM)
    cell.commit(WIDE)
    second = cell.agent(once=True)  # a new process, as a systemd timer starts it
    assert second.run() == 0
    cell.holds(WIDE_ITEM)
    assert [(r["handle"], r["rules_added"], r["rules_removed"]) for r in _changes(second)] == [
        ("c0", 1, 1),
        ("c1", 1, 1),
    ]
