"""The mass-revoke gate, as a table: what a plan really takes away, and when that holds it back.

The gate counts container-rule pairs whose packets the new plan no longer allows that
container, net of the pairs the *same* container gains (`reconciler.core.gate`), and fires
only above both the share (`mass-revoke-threshold`) and the floor (`mass-revoke-min`), or
when a cell's access goes to nothing.  The agent (tests/test_agent_cycle.py) and the CI plan
(tests/test_plan.py) ask this one function.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from reconciler.agent.conditions import MASS_REVOKE_BLOCKED
from reconciler.agent.core import revoke_verdict
from reconciler.core.cellplan import DEFAULT_GATE, CellPlan, GateSettings
from reconciler.core.compile import compile_cell
from reconciler.core.gate import (
    NOTHING_LOST,
    Memo,
    RevokeCount,
    judge,
    percent,
    revoke_count,
)
from reconciler.core.model import AddressRange, Container, PolicySet, PortRange, Rule, SecurityGroup

NO_FLOOR = replace(DEFAULT_GATE, minimum=0)


def tcp(dest: str, *ports: int | tuple[int, int], log: bool = False) -> Rule:
    ranges = tuple(PortRange(p, p) if isinstance(p, int) else PortRange(*p) for p in ports)
    return Rule("tcp", (AddressRange.parse(dest),), ranges, log=log)


def many(count: int, net: int = 1) -> tuple[Rule, ...]:
    """`count` distinct rules, each its own host and port."""
    return tuple(tcp(f"198.19.{net}.{i % 250 + 1}", 1000 + i) for i in range(count))


def group(name: str, rules: tuple[Rule, ...], *spaces: str) -> SecurityGroup:
    """Bound to `spaces` (running), or to every running container when none are named."""
    return SecurityGroup(name, rules, running_default=not spaces, running_spaces=spaces)


def containers(count: int, space: str = "space-a", first: int = 0) -> tuple[Container, ...]:
    return tuple(
        Container(f"{space}-{i}", f"198.18.{(first + i) // 250}.{(first + i) % 250 + 2}",
                  f"app-{space}", space, "org", "", "app")
        for i in range(count)
    )  # fmt: skip


def plan(inventory: tuple[Container, ...], *groups: SecurityGroup) -> CellPlan:
    return compile_cell(PolicySet(security_groups=groups), inventory, "cell-1")


def count(inventory: tuple[Container, ...], old: list[SecurityGroup], new: list[SecurityGroup]):
    return revoke_count(plan(inventory, *old), plan(inventory, *new))


ONE = containers(1)
TWO = containers(2)
BIG = containers(20)


# -- what counts as taken away ------------------------------------------------------------


def test_a_port_swap_on_a_one_container_cell_takes_nothing_away() -> None:
    """The issue's case: the database moves from 3306 to 5432; the old gate said 1 of 1."""
    n = count(
        ONE, [group("db", (tcp("198.19.0.5", 3306),))], [group("db", (tcp("198.19.0.5", 5432),))]
    )
    assert (n.net_lost, n.total, n.lost, n.gained) == (0, 1, 1, 1)
    assert not n.to_nothing
    assert judge(n, NO_FLOOR) is None and judge(n, replace(NO_FLOOR, threshold=0.0)) is None


def test_a_destination_moving_address_is_a_swap_too() -> None:
    n = count(
        ONE, [group("db", (tcp("198.19.0.5", 3306),))], [group("db", (tcp("198.19.0.9", 3306),))]
    )
    assert n.net_lost == 0


def test_removing_a_rule_with_nothing_gained_counts_one_per_container() -> None:
    old = [group("web", (tcp("198.19.0.1", 443), tcp("198.19.0.2", 443)))]
    n = count(TWO, old, [group("web", (tcp("198.19.0.1", 443),))])
    assert (n.net_lost, n.total, n.containers_losing) == (2, 4, 2)


@pytest.mark.parametrize(
    "new",
    [
        # split in two address halves, ports listed the other way round
        (tcp("198.19.0.0/25", 443, 80), tcp("198.19.0.128/25", 80, 443)),
        # split by port
        (tcp("198.19.0.0/24", 80), tcp("198.19.0.0/24", 443)),
        # the same, spelled as a range list that merges
        (tcp("198.19.0.0-198.19.0.255", 80, 443),),
        # new connections now logged: no packet's fate changes
        (tcp("198.19.0.0/24", 80, 443, log=True),),
    ],
    ids=["split-addresses", "split-ports", "respelled", "logged"],
)
def test_a_respelled_or_split_rule_is_no_loss(new: tuple[Rule, ...]) -> None:
    old = [group("web", (tcp("198.19.0.0/24", 80, 443),))]
    n = count(TWO, old, [group("web", new)])
    assert (n.net_lost, n.lost, n.total) == (0, 0, 2)


def test_a_narrowed_rule_is_lost_and_its_narrower_successor_gains_nothing() -> None:
    n = count(
        ONE,
        [group("web", (tcp("198.19.0.1", 80, 443),))],
        [group("web", (tcp("198.19.0.1", 443),))],
    )
    assert (n.net_lost, n.lost, n.gained) == (1, 1, 0)


def test_a_rule_moved_to_another_group_of_the_same_container_is_no_loss() -> None:
    rule = tcp("198.19.0.7", 5432)
    old = [group("a", (rule, tcp("198.19.0.1", 443)))]
    new = [group("a", (tcp("198.19.0.1", 443),)), group("b", (rule,), "space-a")]
    assert count(TWO, old, new).net_lost == 0


def test_nothing_applied_yet_has_nothing_to_lose() -> None:
    assert revoke_count(None, plan(ONE, group("web", many(3)))) == NOTHING_LOST
    assert judge(NOTHING_LOST, replace(NO_FLOOR, threshold=0.0)) is None


def test_containers_with_the_same_groups_are_counted_once_and_the_memo_is_shared() -> None:
    old, new = plan(BIG, group("web", many(10))), plan(BIG, group("web", many(3)))
    memo = Memo()
    first = revoke_count(old, new, memo)
    assert len(memo.counts) == 1  # twenty containers, one profile
    assert revoke_count(old, new, memo) == first == RevokeCount(140, 200, 140, 0, 20, False)


# -- when it fires -------------------------------------------------------------------------


def test_removing_a_group_that_holds_most_of_a_big_cells_access_is_refused() -> None:
    """20 containers x (10 + 2) rules; the 10-rule group goes: 200 of 240, over both bars."""
    base = group("base", many(2, net=2))
    n = count(BIG, [group("payments", many(10)), base], [base])
    assert (n.net_lost, n.total) == (200, 240) and not n.to_nothing
    v = judge(n, DEFAULT_GATE)
    assert v is not None and v.rule == "share"
    assert v.reason == (
        "the plan takes away 200 of the cell's 240 allowed container-rule pairs (net of what "
        "the same containers gain) (83.3% > 50% threshold, and 200 >= the floor of 100)"
    )
    assert v.message.endswith(
        "; not applied without the commit trailer 'Asgctl-Allow-Mass-Revoke: true'"
    )


def test_a_small_cell_under_the_floor_applies_a_large_share() -> None:
    """Two containers keeping one of four rules: 75% > 50%, but 6 pairs < the floor of 100."""
    n = count(TWO, [group("web", many(4))], [group("web", many(1))])
    assert (n.net_lost, n.total) == (6, 8)
    assert judge(n, DEFAULT_GATE) is None
    assert judge(n, replace(DEFAULT_GATE, minimum=6)) is not None  # the floor is inclusive


def test_the_share_must_be_more_than_the_threshold() -> None:
    n = count(TWO, [group("web", many(4))], [group("web", many(2))])
    assert n.share == 0.5 and judge(n, NO_FLOOR) is None
    assert judge(n, replace(NO_FLOOR, threshold=0.49)) is not None


def test_all_access_to_nothing_is_refused_even_under_the_floor() -> None:
    n = count(ONE, [group("db", (tcp("198.19.0.5", 3306),))], [])
    assert (n.net_lost, n.total, n.to_nothing) == (1, 1, True)
    v = judge(n, DEFAULT_GATE)
    assert v is not None and v.rule == "to-nothing"
    assert "no container that had access keeps any" in v.reason
    assert "the floor of 100 does not apply when a cell's access goes to nothing" in v.reason
    assert judge(n, replace(DEFAULT_GATE, threshold=1.0)) is None  # 100% turns the gate off


def test_a_cell_that_had_no_access_is_never_gated() -> None:
    n = count(TWO, [], [])
    assert n.total == 0 and not n.to_nothing and judge(n, replace(NO_FLOOR, threshold=0.0)) is None


def test_the_override_trailer_lets_a_gated_plan_through() -> None:
    n = count(ONE, [group("db", (tcp("198.19.0.5", 3306),))], [])
    refused = revoke_verdict(n, DEFAULT_GATE, override=False)
    assert refused is not None and refused.reason == MASS_REVOKE_BLOCKED
    assert "'Asgctl-Allow-Mass-Revoke: true'" in refused.message
    assert revoke_verdict(n, DEFAULT_GATE, override=True) is None
    mine = GateSettings(0.5, 100, "Ops-Approved-Revoke")
    assert "'Ops-Approved-Revoke: true'" in (revoke_verdict(n, mine, False) or refused).message


def test_percent_does_not_round_a_share_onto_its_threshold() -> None:
    assert [percent(x) for x in (0.5, 0.7, 0.525, 1 / 3, 1.0)] == [
        "50%", "70%", "52.5%", "33.3%", "100%"
    ]  # fmt: skip


# -- the attack: laundering a revoke through gains -------------------------------------------


def test_gains_of_other_containers_do_not_launder_a_revoke() -> None:
    """A PR takes the payments group (10 rules) from the 20 containers of space-a and, to
    look net-neutral, grants 20 new rules to the 20 containers of space-b.  Cell-wide the
    pairs even out (400 gained, 200 lost); per container, space-a still loses 200."""
    a, b = containers(20, "space-a"), containers(20, "space-b", first=20)
    cell = a + b
    base = group("base", many(2, net=2))
    old = [group("payments", many(10), "space-a"), base]
    new = [group("noise", many(20, net=3), "space-b"), base]
    n = count(cell, old, new)
    assert (n.net_lost, n.total, n.containers_losing) == (200, 280, 20)
    assert n.gained == 0  # the gains are on containers that lost nothing: they offset nothing
    v = judge(n, DEFAULT_GATE)
    assert v is not None and v.rule == "share"  # 71.4% > 50%, 200 >= 100


def test_emptying_a_cell_cannot_hide_behind_a_container_that_had_nothing() -> None:
    """Every container that had access loses all of it; a bystander with no access before
    gains some.  Still all access to nothing, refused below the floor."""
    a, b = containers(2, "space-a"), containers(1, "space-b", first=2)
    old = [group("web", many(3), "space-a")]
    new = [group("noise", many(5, net=3), "space-b")]
    n = count(a + b, old, new)
    assert (n.net_lost, n.total, n.to_nothing) == (6, 6, True)
    assert judge(n, DEFAULT_GATE) is not None


def test_within_one_container_a_replacement_is_not_a_revoke() -> None:
    """The decision, pinned: a container that loses ten rules and gains ten others has its
    access replaced, not revoked -- which new rule replaces which old one the gate cannot
    know.  The plan lists all twenty for the reviewer (tests/test_plan.py)."""
    n = count(BIG, [group("web", many(10))], [group("web", many(10, net=4))])
    assert (n.net_lost, n.lost, n.gained) == (0, 200, 200)
    # ...but only as far as it goes: keeping one replacement of ten is a loss of nine each.
    n = count(BIG, [group("web", many(10))], [group("web", many(1, net=4))])
    assert (n.net_lost, n.total) == (180, 200) and judge(n, DEFAULT_GATE) is not None


# -- the count is the definition, whatever the plan's grouping -------------------------------


def _by_definition(old: CellPlan, new: CellPlan) -> tuple[int, int, int, bool]:
    """(net lost, total, containers losing, to nothing), straight from the module docstring:
    every container's rules by digest, every rule checked against the other side's packets."""
    from reconciler.core.packetspace import covers, item_space

    def rules(plan: CellPlan) -> dict[str, dict[str, object]]:
        groups = plan.group_by_id
        return {
            cp.container.handle: {r.digest: r.item for g in cp.groups for r in groups[g].rules}
            for cp in plan.containers
        }

    before, after = rules(old), rules(new)
    net = total = losing = 0
    had, emptied = 0, 0
    for handle, mine in before.items():
        theirs = after.get(handle, {})
        new_space = [b for item in theirs.values() for b in item_space(item)]
        old_space = [b for item in mine.values() for b in item_space(item)]
        lost = sum(1 for item in mine.values() if not covers(new_space, item_space(item)))
        gained = sum(1 for item in theirs.values() if not covers(old_space, item_space(item)))
        total += len(mine)
        net += max(0, lost - gained)
        losing += lost > gained
        if mine:
            had += 1
            emptied += not theirs
    return net, total, losing, had > 0 and emptied == had


def _random_policy(rng: random.Random, spaces: list[str]) -> PolicySet:
    pool = [
        tcp(f"198.19.{rng.randrange(3)}.{rng.randrange(1, 5)}", rng.choice((80, 443, (8000, 8010))))
        for _ in range(12)
    ]
    pool += [Rule("udp", (AddressRange.parse("198.19.9.0/30"),), (PortRange(53, 53),))]
    pool += [Rule("icmp", (AddressRange.parse("198.19.0.0/24"),), (), 8, -1)]
    groups = []
    for n in range(rng.randrange(0, 5)):
        rules = tuple(rng.sample(pool, rng.randrange(1, 6)))
        bound = tuple(s for s in spaces if rng.random() < 0.4)
        groups.append(
            SecurityGroup(f"g{n}", rules, running_default=rng.random() < 0.3, running_spaces=bound)
        )
    return PolicySet(security_groups=tuple(groups))


def _edited(rng: random.Random, policy: PolicySet) -> PolicySet:
    groups = list(policy.security_groups)
    if not groups:
        return policy
    i = rng.randrange(len(groups))
    g = groups[i]
    edit = rng.choice(("drop", "swap", "unbind"))
    if edit == "drop" and len(g.rules) > 1:
        g = replace(g, rules=g.rules[1:])
    elif edit == "swap":
        first = g.rules[0]
        moved = replace(first, ports=(PortRange(5432, 5432),)) if first.ports else first
        g = replace(g, rules=(moved, *g.rules[1:]))
    else:
        g = replace(g, running_default=False, running_spaces=g.running_spaces[1:])
    groups[i] = g
    return replace(policy, security_groups=tuple(groups))


@pytest.mark.parametrize("seed", range(80))
def test_the_count_is_the_definition_for_random_plans(seed: int) -> None:
    """The fast count (group by group, memoised) against the definition, rule by rule, on
    random policies and inventories (shared IPs included: they get the intersection)."""
    rng = random.Random(seed)
    spaces = ["space-a", "space-b", "space-c"]
    inventory = tuple(
        Container(
            f"c{i}", f"198.18.0.{rng.randrange(2, 12)}", f"app-{i % 4}", rng.choice(spaces), "org"
        )
        for i in range(rng.randrange(1, 9))
    )
    before = _random_policy(rng, spaces)
    # Odd seeds: one edit of one group, so most groups stay (the count's shortcut); even
    # seeds: another policy altogether.
    after = _edited(rng, before) if seed % 2 else _random_policy(rng, spaces)
    old = plan(inventory, *before.security_groups)
    new = plan(inventory, *after.security_groups)
    memo = Memo()
    n = revoke_count(old, new, memo)
    assert (n.net_lost, n.total, n.containers_losing, n.to_nothing) == _by_definition(old, new)
    assert revoke_count(old, new, memo) == n  # and the memo changes nothing
