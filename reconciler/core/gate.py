"""The mass-revoke gate: how much access a plan really takes away from a cell, and whether
that is enough to hold the plan back until a human says so.

One definition, used by the agent (before it applies a head: `agent/core.revoke_verdict`)
and by the CI plan (per changed cell: `core/diff.CellDiff.gate`), so `asgctl plan` says
exactly what the agents will do.

**What is counted.**  A *container-rule pair* is one container and one rule its groups allow
it (rules told apart by the full digest of their match, so the same rule reached through two
groups is one pair).  The cell's *total* is its pairs in the old plan.  For each container:

* an old pair is **lost** when the new plan no longer allows that container every packet of
  the rule (`packetspace.covers` over the container's new rules);
* a new pair is **gained** when the old plan did not allow that container every packet of
  the rule (the same question the other way round);
* the container's **net loss** is `max(0, lost - gained)`.

The cell's net loss is the sum over its containers.  So a database moving from port 3306 to
5432 is one pair lost and one gained on each container that reaches it: net zero.  A rule
re-spelled, split into several, or merged with a neighbour allows the same packets: neither
lost nor gained.  A rule narrowed (ports 80,443 to 443) is lost, its narrower successor
gains nothing: net one.  Removing a rule with nothing new is net one.

**Gains offset losses of the same container only.**  Access is held by a container, and a
container that loses its database cannot use the access another container gains; a pull
request that revokes most of a cell while granting many new rules to other containers (or
to containers that had nothing) is counted at its full loss.  Within one container a gain
offsets any one loss, whatever its destination: which new rule replaces which old one (a
port swap, a moved address, a re-cut range) is not something the gate can know, and every
gain is shown to reviewers in the plan's access diff, where new access is what they read
most closely.  The gate is a brake on accidents of scale, not a reviewer: a change that
takes 90 rules from a container and gives it 90 others is a big change, and the plan lists
each of the 180.

**Audit mode.**  A container in audit (`kind: Enforcement`) is allowed every packet: what
no rule allows is accepted and logged as would-deny.  It holds one pair more than its rules,
the *audit pair* (everything no rule allows), and its rules are covered by it.  So:

* moving a container from audit to enforce loses the audit pair (one pair, unless its rules
  cover everything of its family) and any rule the same change takes away from it (no
  longer covered by anything); it gains nothing (everything was allowed before);
* moving it into audit loses nothing;
* a container audited at both revisions loses and gains nothing, whatever its rules do.

One pair for "everything else" is a count of rules, as every pair is, not of traffic: the
would-deny records, not the plan, say how much a container sent that no rule allows.  What
makes the gate honest about it is that a move to enforce is never free: a cell all in audit
without rules that moves to enforce goes to nothing (every container had access and keeps
none), and the gate fires whatever the floor, as for any cell emptied.  Deny networks are
the cell's and the same at both revisions, so they are left out of the count.

**When it fires.**  Only when the cell had access (`total` > 0), and either

* the net loss is more than `threshold` of the total *and* at least `minimum` pairs (the
  floor: on a small cell, a few pairs are a large share and still an ordinary change); or
* the cell's access goes to nothing -- every container that had any allowed packet has none
  left -- and the share (then 100%) is more than `threshold`: the floor does not protect a
  cell from being emptied.

A threshold of 100% therefore turns the gate off; a minimum of 0 removes the floor.  The
commit trailer (`trailer: true` in the head's message) lets a gated plan through; whether
the commit is trusted at all is decided before, by the signature gate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Literal

from reconciler.core.cellplan import GateSettings
from reconciler.core.model import AddressRange, RuleItem
from reconciler.core.packetspace import Box, covers, item_space

if TYPE_CHECKING:
    from reconciler.core.cellplan import CellPlan, PlanRule, RuleGroup


@dataclass(frozen=True, slots=True)
class RevokeCount:
    """What a plan takes away from one cell, in container-rule pairs (module docstring)."""

    net_lost: int
    """Sum over containers of max(0, lost - gained)."""
    total: int
    """The cell's allowed pairs in the old plan."""
    lost: int = 0
    """Pairs lost before gains are set against them."""
    gained: int = 0
    """Pairs gained, by containers that also lost (only those can offset anything)."""
    containers_losing: int = 0
    """Containers with a net loss."""
    to_nothing: bool = False
    """The cell had access and every container that had any is left with none."""

    @property
    def share(self) -> float:
        return self.net_lost / self.total if self.total else 0.0


NOTHING_LOST = RevokeCount(0, 0)

_PerContainer = tuple[int, int, int, bool]  # (old pairs, lost, gained, none left)
_Key = tuple[str, ...]  # a container's group digests, in plan order


class Memo:
    """What a fleet-wide plan computes once and every cell reuses: the count of a container
    per (old group digests, new group digests) -- containers with the same groups have the
    same count -- and each rule's packet space, by rule digest.  Keys are full digests, so
    cells of different plans share it safely."""

    def __init__(self) -> None:
        self.counts: dict[tuple[_Key, _Key], _PerContainer] = {}
        self.spaces: dict[str, tuple[Box, ...]] = {}

    def space_of(self, rule: PlanRule) -> tuple[Box, ...]:
        """The packets one rule allows (`packetspace.item_space`), computed once per rule."""
        boxes = self.spaces.get(rule.digest)
        if boxes is None:
            boxes = self.spaces[rule.digest] = item_space(rule.item)
        return boxes

    def space(self, groups: Iterable[RuleGroup]) -> list[Box]:
        """Every packet the rules of `groups` allow, as boxes."""
        return [box for g in groups for r in g.rules for box in self.space_of(r)]

    def not_covered(self, rules: Iterable[PlanRule], space: list[Box]) -> int:
        """How many of `rules` allow some packet that `space` does not."""
        return sum(1 for r in rules if not covers(space, self.space_of(r)))


def _moved_out(mine: list[RuleGroup], theirs: list[RuleGroup]) -> list[PlanRule]:
    """Rules of `mine` (groups one side has and the other does not) that are in none of
    `theirs` (the other side's groups this side lacks)."""
    elsewhere = {r.digest for g in theirs for r in g.rules}
    return [r for g in mine for r in g.rules if r.digest not in elsewhere]


def _container(
    old_key: _Key,
    new_key: _Key,
    old_groups: dict[str, RuleGroup],
    new_groups: dict[str, RuleGroup],
    memo: Memo,
) -> _PerContainer:
    """One container's count, from its groups at both sides.

    A plan puts each rule of a cell in exactly one group (the rules shared by exactly the
    same containers), so a group both sides give the container keeps all its rules, and a
    rule of a group only the old side gives can now be held only through a group only the
    new side gives: only those groups are looked into.  Pairs are told apart by rule digest.
    """
    pairs = sum(len(old_groups[d].rules) for d in old_key)
    if old_key == new_key:  # the usual container: a change elsewhere
        return pairs, 0, 0, pairs == 0
    old_set, new_set = set(old_key), set(new_key)
    old_only = [old_groups[d] for d in old_key if d not in new_set]
    new_only = [new_groups[d] for d in new_key if d not in old_set]
    none_left = not any(new_groups[d].rules for d in new_key)
    gone = _moved_out(old_only, new_only)
    if not gone:
        return pairs, 0, 0, none_left
    lost = memo.not_covered(gone, memo.space(new_groups[d] for d in new_key))
    if not lost:
        return pairs, 0, 0, none_left
    came = _moved_out(new_only, old_only)
    gained = memo.not_covered(came, memo.space(old_groups[d] for d in old_key)) if came else 0
    return pairs, lost, gained, none_left


def _everything(version: int) -> RuleItem:
    """Every packet of a family: what an audited container's chain accepts in the end."""
    return RuleItem("all", AddressRange.whole(version))


def _with_audit(
    found: _PerContainer,
    was: bool,
    now: bool,
    version: int,
    new_groups: list[RuleGroup],
    memo: Memo,
) -> _PerContainer:
    """One container's count (from its groups) with its modes at both sides (module
    docstring, "Audit mode")."""
    pairs, lost, _, none_left = found
    if not (was or now):
        return found
    if now:  # audited after: every packet allowed, nothing lost
        return pairs + was, 0, 0, False
    everything = item_space(_everything(version))
    audit_lost = 0 if covers(memo.space(new_groups), everything) else 1
    return pairs + 1, lost + audit_lost, 0, none_left


def revoke_count(old: CellPlan | None, new: CellPlan, memo: Memo | None = None) -> RevokeCount:
    """What `new` takes away from the access `old` allows, container by container.

    Both plans must be compiled for the same containers, so a container that simply stopped
    running is never counted as revoked access (a container missing from `new` counts as
    left with nothing).  `memo` may be shared between calls (see `Memo`).
    """
    if old is None:
        return NOTHING_LOST
    memo = Memo() if memo is None else memo
    old_ids = {g.id: g for g in old.groups}
    new_ids = {g.id: g for g in new.groups}
    after = {cp.container.handle: cp.groups for cp in new.containers}
    audited = {cp.container.handle for cp in new.containers if cp.audit}
    # Groups under the same id with the same digest at both sides: a container jumping to
    # exactly these, at both sides, keeps every rule (the usual container of a large cell).
    same = {i for i, g in old_ids.items() if i in new_ids and new_ids[i].digest == g.digest}
    by_digest: tuple[dict[str, RuleGroup], dict[str, RuleGroup]] | None = None  # at a change
    # Per (old group ids, new group ids): within these two plans an id names one group, so
    # containers with the same ids are counted once, before any digest is looked up.
    local: dict[tuple[tuple[str, ...], tuple[str, ...]], _PerContainer] = {}
    # Each rule of a plan is in exactly one group, so a container's pairs are its groups'
    # sizes, and the cell's total is every group's size times the containers jumping to it.
    jumps = Counter(chain.from_iterable(cp.groups for cp in old.containers))
    total = sum(len(old_ids[i].rules) * n for i, n in jumps.items())
    total += sum(1 for cp in old.containers if cp.audit)  # the audit pair
    net = lost = gained = losing = 0
    some_kept = False  # some container that had access keeps some
    for cp in old.containers:
        ids = (cp.groups, after.get(cp.container.handle, ()))
        now = cp.container.handle in audited
        if ids[0] == ids[1] and same.issuperset(ids[0]) and cp.audit == now:
            some_kept = some_kept or bool(ids[0]) or now
            continue
        found = local.get(ids)
        if found is None:
            key = (
                tuple(old_ids[i].digest for i in ids[0]),
                tuple(new_ids[i].digest for i in ids[1]),
            )
            found = memo.counts.get(key)
            if found is None:
                if by_digest is None:
                    by_digest = (
                        {g.digest: g for g in old.groups},
                        {g.digest: g for g in new.groups},
                    )
                found = _container(*key, *by_digest, memo)
                memo.counts[key] = found
            local[ids] = found
        if cp.audit or now:
            groups = [new_ids[i] for i in ids[1]]
            found = _with_audit(found, cp.audit, now, cp.container.version, groups, memo)
        pairs, c_lost, c_gained, none_left = found
        lost += c_lost
        gained += c_gained
        if c_lost > c_gained:
            net += c_lost - c_gained
            losing += 1
        some_kept = some_kept or (pairs > 0 and not none_left)
    return RevokeCount(net, total, lost, gained, losing, total > 0 and not some_kept)


# -- the verdict ---------------------------------------------------------------------------


def percent(share: float) -> str:
    """`0.7` -> `70%`, `0.525` -> `52.5%`: whole percentages where exact, one decimal else."""
    text = f"{share * 100:.1f}".removesuffix(".0")
    return f"{text}%"


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """The gate holds a plan back: the count, the settings it was judged with, and which
    rule fired (`share`: above the threshold and the floor; `to-nothing`: the cell is
    emptied, floor or not)."""

    count: RevokeCount
    settings: GateSettings
    rule: Literal["share", "to-nothing"]

    @property
    def reason(self) -> str:
        """The numbers and the rule that fired, in one sentence."""
        c, s = self.count, self.settings
        taken = (
            f"{c.net_lost:,} of the cell's {c.total:,} allowed container-rule pairs "
            "(net of what the same containers gain)"
        )
        above = f"{percent(c.share)} > {percent(s.threshold)}"
        if self.rule == "to-nothing":
            floor = (
                f"{c.net_lost:,} >= the floor of {s.minimum:,}"
                if c.net_lost >= s.minimum
                else f"the floor of {s.minimum:,} does not apply when a cell's access goes "
                "to nothing"
            )
            return (
                f"the plan takes away all of the cell's access: {taken}, and no container "
                f"that had access keeps any ({above}; {floor})"
            )
        return (
            f"the plan takes away {taken} ({above} threshold, and {c.net_lost:,} >= the "
            f"floor of {s.minimum:,})"
        )

    @property
    def override(self) -> str:
        """What lets it through: the trailer line, as the head commit must carry it."""
        return f"{self.settings.trailer}: true"

    @property
    def message(self) -> str:
        return f"{self.reason}; not applied without the commit trailer '{self.override}'"


def judge(count: RevokeCount, settings: GateSettings) -> GateVerdict | None:
    """None when the gate lets the plan through; else why it holds it back.

    The trailer is not looked at here: the agent lets a verdict through when the head
    carries it, and the plan says which trailer each gated cell needs.
    """
    if count.total == 0 or count.share <= settings.threshold:
        return None
    if count.to_nothing:
        return GateVerdict(count, settings, "to-nothing")
    if count.net_lost >= settings.minimum:
        return GateVerdict(count, settings, "share")
    return None
