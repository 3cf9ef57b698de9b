"""Build the minimal `iptables-restore --noflush` transaction from plan, kernel and last plan.

Pure: three values in (the desired Ruleset, the kernel's OwnedState, the Ruleset last applied
or None), one IptablesDelta out.  The transaction carries only chains whose rules differ, in
an order that is valid at every step for iptables-restore's own checks and atomic for packets:

1. declare every chain we write or remove (`:C - [0:0]`; under --noflush that creates a new
   chain or flushes an existing one, which also drops its jumps to chains about to go);
2. delete every copy of our FORWARD hooks that is wrong, by full rule text (never by index:
   other programs insert into FORWARD concurrently);
3. fill the written chains, rule groups first, then container chains, then the dispatch chain,
   so a chain is complete before anything jumps to it;
4. insert the hooks (one per underlay interface) at position 1, last first, unless they are
   already there exactly once each, first in FORWARD and in order;
5. delete (`-X`) the removed chains, which nothing references any more -- except chains a
   foreign rule still jumps to: those stay, empty, and are reported.

A difference is *drift* when the kernel differs from the last plan applied (someone changed it
from outside), and a *change* when the plan differs from it.  Without a last plan, every
difference is a change.

Only what is ours is ever written, flushed or deleted.  A chain is ours when it carries our
ownership marker (`marker_rule`), or when the last plan applied put it there (the recorded
set: a chain someone flushed has lost its marker, not its owner).  Every chain written gets
its marker first.  Any other chain with our name prefix is someone else's: it is reported
(`IptablesDelta.foreign`), its rules' jumps keep our chains they target alive like any foreign
rule's, and a plan that needs its name is refused (`OwnershipError`) rather than allowed to
take it over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from reconciler.backends import contract as r
from reconciler.backends.contract import Change, DeltaRecord, Drift, judge, rules_drift
from reconciler.backends.errors import OwnershipError
from reconciler.backends.iptables.parse import HookCopy, OwnedState, jump_targets
from reconciler.backends.iptables.render import (
    CONTAINER_PREFIX,
    GROUP_PREFIX,
    HOOK_CHAIN,
    TOP_CHAIN,
    Ruleset,
    insert_hook_ops,
    marker_rule,
)

Chains = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class IptablesDelta(DeltaRecord):
    """The transaction for one family, and why each part of it is there.

    `ops` are the lines between `*filter` and `COMMIT`; empty means nothing to send.
    `written` chains are declared (which flushes them under --noflush) and refilled,
    `deleted` chains flushed and removed, `orphaned` chains flushed but kept because a rule
    that is not ours still jumps to them.  `foreign` are chains with our name prefix that
    are not ours: reported, never written, flushed or deleted.
    """

    def text(self) -> str:
        """The `iptables-restore --noflush` input, or "" when there is nothing to send."""
        if not self.ops:
            return ""
        return "\n".join(("*filter", *self.ops, "COMMIT")) + "\n"


def compute_delta(
    desired: Ruleset,
    observed: OwnedState,
    last: Ruleset | None = None,
    *,
    heal_drift: bool = True,
) -> IptablesDelta:
    """The transaction taking `observed` to `desired`, with drift and changes explained.

    With `heal_drift=False` a chain that only drifted (the plan did not change it) is reported
    but left as it is (Argo CD's selfHeal=false); chains the plan changes are written anyway,
    which repairs their drift too.
    """
    family = observed.family
    want, have = desired.chains, observed.chains
    base = last.chains if last is not None else None
    adopted, foreign = _unmarked(observed, base)
    if adopted:
        have = {**have, **adopted}
    if foreign:
        _refuse_collisions(family, want, foreign)
        if TOP_CHAIN in foreign:  # jumps to someone else's chain are not our hook either
            observed = replace(observed, hooks=())
    drift: list[Drift] = []
    changes: list[Change] = []
    written: list[str] = []
    removed: list[str] = []
    for name in sorted(set(want) | set(have) | set(base or {})):
        w, h = want.get(name), have.get(name)
        lost_marker = name in adopted
        if w == h and not lost_marker:
            continue
        b = base.get(name) if base is not None else None
        planned, drifted, act = judge(w, h, b, base is not None, heal_drift)
        if lost_marker:
            act = act or heal_drift
            drift.append(Drift(family, name, r.MARKER_MISSING, (marker_rule(name),), (), act))
        if drifted:
            drift.extend(_chain_drift(family, name, b, h, repair=act))
        if planned:
            changes.append(_chain_change(observed.family, name, w, h))
        if not act:
            continue
        if w is None:
            removed.append(name)
        else:
            written.append(name)

    hook_ops, hook_drift, hook_change = _hook(desired, observed, last, heal_drift)
    drift.extend(hook_drift)
    changes.extend(hook_change)

    # After the transaction, which rules still jump to the chains we remove?  Rules in
    # chains that are not ours count like any other program's.
    final = {n: want[n] for n in written}
    final.update({n: rules for n, rules in have.items() if n not in final and n not in removed})
    final.update(foreign)
    referenced = set(observed.foreign_refs)
    if not hook_ops:  # hook copies we leave in place keep their targets alive
        for copy in observed.hooks:
            referenced |= jump_targets(copy.text)
    if removed:
        for name, rules in final.items():
            # Only a chain whose text names a removed chain can jump to one: one substring
            # test per chain spares the regex on every rule (tens of thousands) of a big cell.
            text = "\n".join(rules)
            if any(gone in text for gone in removed if gone != name):
                for rule in rules:
                    referenced |= jump_targets(rule) - {name}
    deleted = tuple(n for n in removed if n not in referenced)
    orphaned = tuple(n for n in removed if n in referenced)
    notes = tuple(
        f"ipv{family} {n}: no longer planned but still referenced by a rule that is "
        "not ours; flushed (keeping our marker), not deleted"
        for n in orphaned
    ) + tuple(
        f"ipv{family} {n}: has our name prefix but not our ownership marker, and the last "
        "plan applied did not create it: someone else's chain, left alone"
        for n in sorted(foreign)
    )

    ops: list[str] = [f":{n} - [0:0]" for n in sorted({*written, *removed})]
    ops.extend(op for op in hook_ops if op.startswith("-D "))
    for name in sorted(written, key=_fill_order):
        ops.append(marker_rule(name))
        ops.extend(want[name])
    ops.extend(marker_rule(n) for n in orphaned)  # kept, so still provably ours
    ops.extend(op for op in hook_ops if op.startswith("-I "))
    ops.extend(f"-X {n}" for n in deleted)
    return IptablesDelta(
        family=family,
        ops=tuple(ops),
        drift=tuple(drift),
        changes=tuple(changes),
        written=tuple(sorted(written)),
        deleted=deleted,
        orphaned=orphaned,
        notes=notes,
        foreign=tuple(sorted(foreign)),
    )


# The chains asgctl wrote before it marked them: 16-digit ids, every rule tagged `asg:`.
_PRE_MARKER_NAME = re.compile(r"ASG-FORWARD|ASG-[CG]-[0-9a-f]{16}")


def _pre_marker(name: str, rules: Sequence[str]) -> bool:
    """A chain an asgctl from before ownership markers wrote: its exact name shape, and not
    one rule without our comment.  A host's own chain has neither by accident; without this,
    an upgrade (which also renames every chain, so there is no last plan to record them)
    would leave the old chains as someone else's and refuse ASG-FORWARD forever."""
    return (
        _PRE_MARKER_NAME.fullmatch(name) is not None
        and bool(rules)
        and all('-m comment --comment "asg:' in rule for rule in rules)
    )


def _unmarked(observed: OwnedState, base: Chains | None) -> tuple[Chains, Chains]:
    """The prefixed chains without our marker, split into ours (the last plan applied put
    them there: flushed, or their marker deleted; or an older asgctl wrote them) and someone
    else's."""
    if not observed.unmarked:
        return {}, {}
    recorded = base or {}
    ours: dict[str, tuple[str, ...]] = {}
    theirs: dict[str, tuple[str, ...]] = {}
    for name, rules in observed.unmarked.items():
        mine = name in recorded or _pre_marker(name, rules)
        (ours if mine else theirs)[name] = rules
    return ours, theirs


def _refuse_collisions(family: int, want: Chains, foreign: Chains) -> None:
    """A planned chain whose name someone else's chain already has: refused, never taken."""
    clash = sorted(n for n in foreign if n in want)
    if clash:
        raise OwnershipError(
            f"ipv{family}: the plan needs chain {', '.join(clash)}, but the filter table "
            "already has a chain of that name without asgctl's ownership marker that the last "
            "plan applied did not create: someone else's, so it is not taken over and nothing "
            f"is sent for ipv{family}; remove or rename it (if an older asgctl created it, "
            "delete it) and asgctl installs on its next cycle"
        )


def _fill_order(name: str) -> tuple[int, str]:
    """Groups before containers before dispatch: jump targets are filled first."""
    if name.startswith(GROUP_PREFIX):
        return (0, name)
    if name.startswith(CONTAINER_PREFIX):
        return (1, name)
    if name == TOP_CHAIN:
        return (3, name)
    return (2, name)


def _hook(
    desired: Ruleset, observed: OwnedState, last: Ruleset | None, heal_drift: bool
) -> tuple[list[str], list[Drift], list[Change]]:
    """Keep the hooks, first in FORWARD and in order, when the family has chains; none otherwise.

    A hook whose interface changed (another underlay) is a wrong copy like any other: all
    copies go and the wanted ones are inserted, in one transaction.
    """
    family = observed.family
    copies = observed.hooks
    wanted = bool(desired.chains)
    expected = desired.hooks
    if wanted and _hooks_in_place(copies, expected):
        return [], [], []
    if not wanted and not copies:
        return [], [], []
    # Are the hooks as the last apply left them?  Then the difference is the plan's (a new
    # underlay, the first or last container of the family); otherwise someone else's doing.
    known = last is not None
    last_hooks = last.hooks if last is not None and last.chains else ()
    if wanted:
        texts = [c.text for c in copies]
        if not copies:
            kind = r.HOOK_MISSING
        elif len(texts) > len(set(texts)):
            kind = r.HOOK_DUPLICATED
        elif sorted(texts) != sorted(expected):
            kind = r.HOOK_CHANGED
        else:
            kind = r.HOOK_MOVED
    else:
        kind = r.HOOK_EXTRA
    drifted = known and not _hooks_in_place(copies, last_hooks)
    planned = not drifted
    act = planned or heal_drift
    drift: list[Drift] = []
    change: list[Change] = []
    found = tuple(f"{c.index + 1}: {c.text}" for c in copies)
    if drifted:
        drift.append(Drift(family, HOOK_CHAIN, kind, expected if wanted else (), found, act))
    else:
        what = r.HOOK_ADDED if wanted and not copies else r.HOOK_REMOVED
        if wanted and copies:
            what = r.HOOK_FIXED
        change.append(Change(family, HOOK_CHAIN, what, len(expected) if wanted else 0))
    if not act:
        return [], drift, change
    ops = [_delete_op(c.text) for c in copies]
    if wanted:
        ops.extend(insert_hook_ops(expected))
    return ops, drift, change


def _hooks_in_place(copies: Sequence[HookCopy], expected: Sequence[str]) -> bool:
    """Each wanted hook exactly once, at FORWARD's top, in order, and no other copy."""
    if len(copies) != len(expected):
        return False
    pairs = enumerate(zip(copies, expected, strict=True))
    return all(c.index == i and c.text == text for i, (c, text) in pairs)


def _delete_op(rule: str) -> str:
    """Delete a rule by its full text: `-A CHAIN spec` -> `-D CHAIN spec`."""
    return "-D " + rule[3:]


def _chain_change(
    family: int, name: str, want: tuple[str, ...] | None, have: tuple[str, ...] | None
) -> Change:
    if want is None:
        return Change(family, name, r.CHAIN_REMOVED, 0)
    if have is None:
        return Change(family, name, r.CHAIN_ADDED, len(want))
    return Change(family, name, r.CHAIN_REWRITTEN, len(want))


def _comment_key(rule: str) -> str:
    """The id comment of a rule (`asg:r:<id>`, ...): pairs a changed rule with its original."""
    marker = '--comment "'
    at = rule.find(marker)
    if at < 0:
        return ""
    end = rule.find('"', at + len(marker))
    return rule[at + len(marker) : end]


def _chain_drift(
    family: int,
    chain: str,
    expected: tuple[str, ...] | None,
    found: tuple[str, ...] | None,
    repair: bool,
) -> list[Drift]:
    """Classify how one chain differs from what the last plan put there."""
    if found is None:
        return [Drift(family, chain, r.CHAIN_MISSING, expected or (), (), repair)]
    if expected is None:
        return [Drift(family, chain, r.CHAIN_EXTRA, (), found, repair)]
    return rules_drift(family, chain, expected, found, repair, _comment_key)


def check_applied(desired: Ruleset, delta: IptablesDelta, observed: OwnedState) -> list[str]:
    """What of `delta` is not in the kernel after it was applied ([] when all of it is).

    Checks only what the transaction touched: drift left alone on purpose (no self-heal) and
    other programs' rules are not this transaction's business.  A written chain that reads
    back differently means the renderer's canonical form disagrees with iptables-save.
    """
    problems = []
    unmarked = observed.unmarked
    for name in delta.written:
        got = observed.chains.get(name)
        if got is None:
            lost = name in unmarked
            problems.append(f"{name} has no ownership marker" if lost else f"{name} is missing")
        elif got != desired.chains[name]:
            diff = [x for x in got if x not in set(desired.chains[name])][:1]
            problems.append(f"{name} reads back differently" + (f": {diff[0]}" if diff else ""))
    problems.extend(
        f"{n} still exists" for n in delta.deleted if n in observed.chains or n in unmarked
    )
    for name in delta.orphaned:
        if name in unmarked:
            problems.append(f"{name} has no ownership marker")
        elif observed.chains.get(name):
            problems.append(f"{name} is not empty")
    if any(op.startswith(f"-I {HOOK_CHAIN} ") for op in delta.ops):
        # Exactly once each, but not necessarily still first: `-I FORWARD 1` did put them
        # first, and another program may insert above them before this read (Docker,
        # firewalld... do).  That is drift for the next cycle to repair, not a failed
        # transaction.
        found = sorted(h.text for h in observed.hooks)
        if found != sorted(desired.hooks):
            problems.append(f"the {HOOK_CHAIN} hooks are not there exactly once each")
    elif any(op.startswith(f"-D {HOOK_CHAIN} ") for op in delta.ops) and observed.hooks:
        problems.append(f"the {HOOK_CHAIN} hook is still there")
    return problems
