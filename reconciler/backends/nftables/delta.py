"""Build the minimal `nft -j -f -` transaction from plan, kernel and last plan (pure).

Three values in (the desired slice, the kernel's slice, the slice last applied or None), one
NftDelta out.  The transaction carries only what differs, in an order that is valid at every
step, and the kernel commits it atomically:

1. `add table` (a no-op when it exists) and new chains, empty, so anything may refer to them;
2. flush every chain that is rewritten or removed, and every chain that refers to a set about
   to be re-created: their references go before what they refer to;
3. delete map and set elements that are no longer wanted (a container's dispatch entry goes
   before its chain);
4. create new sets and maps with their elements (a changed group is a new set: its name is
   its content hash), then add the elements missing from existing ones;
5. fill the written chains: logging groups, then containers, then base chains (hooked last,
   so a new base chain starts dispatching when everything it reaches is in place);
6. delete removed sets and maps (a map's elements refer to chains), then removed chains and
   other objects, which nothing refers to any more, except what a rule we keep still refers
   to: those stay (flushed) and are reported.

When a family's slice becomes empty and nothing else is in the table, the table itself is
deleted instead.  A difference is *drift* when the kernel differs from the last plan applied,
a *change* when the plan differs from it; without a last plan every difference is a change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from reconciler.backends import contract as r
from reconciler.backends.contract import Change, DeltaRecord, Drift, judge, rules_drift
from reconciler.backends.nftables.parse import NftState
from reconciler.backends.nftables.render import (
    BaseHook,
    NftRuleset,
    NftSet,
    chain_command,
    chain_order,
    element_command,
    object_command,
    rule_command,
    rule_comment,
    set_command,
    table_command,
    transaction_text,
)

# Kinds of drift and change beyond the contract's (chains, hooks): sets, maps and elements.
SET_MISSING = "set-missing"
SET_EXTRA = "set-extra"
SET_CHANGED = "set-changed"
ELEMENT_MISSING = "element-missing"
ELEMENT_EXTRA = "element-extra"
OBJECT_EXTRA = "object-extra"
TABLE_DORMANT = "table-dormant"
SET_ADDED = "set-added"
SET_REMOVED = "set-removed"
ELEMENTS_CHANGED = "elements-changed"
TABLE_REMOVED = "table-removed"

_TARGET = re.compile(r'"target":"([^"]+)"')
_SET_REF = re.compile(r'"@([^"]+)"')

ChainKey = tuple[BaseHook | None, tuple[str, ...]]


@dataclass(frozen=True)
class NftDelta(DeltaRecord):
    """One family's transaction: `ops` are JSON commands, one per string.

    `written` names the chains and sets the transaction creates, rewrites or edits;
    `deleted` what it removes, `orphaned` chains flushed but kept because something not ours
    refers to them; the element counts say how much of it is set elements.  `foreign` is
    always empty: our table is ours whole, and anything else in it is removed.
    """

    elements_added: int = 0
    elements_deleted: int = 0
    table_deleted: bool = False

    def text(self) -> str:
        """The `nft -j -f -` input, or "" when there is nothing to send."""
        return transaction_text(self.ops)


def _dump(command: Mapping[str, Any]) -> str:
    return json.dumps(command, separators=(",", ":"))


def _chain_key(
    rules: Mapping[str, tuple[str, ...]], hooks: Mapping[str, BaseHook], name: str
) -> ChainKey | None:
    if name not in rules:
        return None
    return (hooks.get(name), rules[name])


def compute_nft_delta(
    desired: NftRuleset,
    observed: NftState,
    last: NftRuleset | None = None,
    *,
    heal_drift: bool = True,
) -> NftDelta:
    """The transaction taking `observed` to `desired`, with drift and changes explained.

    With `heal_drift=False`, objects that only drifted are reported and left alone; objects
    the plan changes are written anyway, which repairs their drift too.  Elements of sets
    that were not read (terse read-back) are taken to be as they should: they were checked
    when written, and a full read audits them.
    """
    family = observed.family
    want_hooks = desired.base_hooks
    last_hooks: Mapping[str, BaseHook] = last.base_hooks if last else {}
    want_sets = desired.sets
    have_sets = observed.sets
    last_sets = last.sets if last else None
    drift: list[Drift] = []
    changes: list[Change] = []

    # -- chains --------------------------------------------------------------------------
    new_chains: list[str] = []
    rewrite: dict[str, tuple[str, ...]] = {}
    recreate: list[str] = []
    removed_chains: list[str] = []
    names = set(desired.chains) | set(observed.chains) | set(last.chains if last else ())
    for name in sorted(names):
        w = _chain_key(desired.chains, want_hooks, name)
        h = _chain_key(observed.chains, observed.base_hooks, name)
        if w == h:
            continue
        b = _chain_key(last.chains, last_hooks, name) if last is not None else None
        planned, drifted, act = judge(w, h, b, last is not None, heal_drift)
        if drifted:
            drift.extend(_chain_drift(family, name, b, h, act))
        if planned:
            changes.append(_chain_change(family, name, w, h))
        if not act:
            continue
        if w is None:
            removed_chains.append(name)
        elif h is None:
            new_chains.append(name)
        elif w[0] != h[0]:
            recreate.append(name)
        else:
            rewrite[name] = w[1]

    # -- sets and maps ---------------------------------------------------------------------
    new_sets: list[str] = []
    recreate_sets: list[str] = []
    removed_sets: list[str] = []
    adds: dict[str, frozenset[str]] = {}
    deletes: dict[str, frozenset[str]] = {}
    for name in sorted(set(want_sets) | set(have_sets) | set(last_sets or ())):
        ws = want_sets.get(name)
        bs = last_sets.get(name) if last_sets is not None else None
        hs = _known(have_sets.get(name), ws, bs)
        if ws == hs:
            continue
        planned, drifted, act = judge(ws, hs, bs, last_sets is not None, heal_drift)
        if drifted:
            drift.extend(_set_drift(family, name, bs, hs, act))
        if planned:
            changes.append(_set_change(family, name, ws, hs))
        if not act:
            continue
        if ws is None:
            removed_sets.append(name)
        elif hs is None:
            new_sets.append(name)
        elif ws.header != hs.header:
            recreate_sets.append(name)
        else:
            want_el = ws.elements or frozenset()
            have_el = hs.elements or frozenset()
            if want_el - have_el:
                adds[name] = want_el - have_el
            if have_el - want_el:
                deletes[name] = have_el - want_el

    # -- other objects (someone else's, in our table) --------------------------------------
    removed_others: list[str] = []
    for key in sorted(observed.others):
        if last is not None:
            drift.append(Drift(family, key, OBJECT_EXTRA, (), (observed.others[key],), heal_drift))
            if heal_drift:
                removed_others.append(key)
        else:
            changes.append(Change(family, key, OBJECT_EXTRA, 0))
            removed_others.append(key)

    # Chains that refer to a set being re-created must let go of it first.
    for name in recreate_sets:
        for chain, rules in observed.chains.items():
            if chain in rewrite or chain in recreate or chain in removed_chains:
                continue
            if any(f'"@{name}"' in rule for rule in rules):
                rewrite[chain] = desired.chains.get(chain, rules)

    # -- what is still referred to after the transaction -----------------------------------
    final_rules: dict[str, tuple[str, ...]] = {}
    for name, rules in observed.chains.items():
        if name not in removed_chains:
            final_rules[name] = rules
    for name in [*new_chains, *recreate]:
        final_rules[name] = desired.chains[name]
    final_rules.update(rewrite)
    referenced: set[str] = set()
    if removed_chains or removed_sets:
        for name, rules in final_rules.items():
            mine = desired.chains.get(name)
            if mine is rules or mine == rules:
                continue  # as planned: refers only to what is planned, never to what goes
            for rule in rules:
                referenced |= (set(_TARGET.findall(rule)) | set(_SET_REF.findall(rule))) - {name}
        for name in set(want_sets) | set(have_sets):
            s = want_sets.get(name) if name in want_sets else have_sets.get(name)
            if name in removed_sets or s is None or s.data != "verdict":
                continue  # only a verdict map's elements refer to chains
            referenced |= _element_targets(s.elements)
    orphaned = tuple(n for n in removed_chains if n in referenced)
    orphaned_sets = tuple(n for n in removed_sets if n in referenced)
    deleted_chains = [n for n in removed_chains if n not in referenced]
    deleted_sets = [n for n in removed_sets if n not in referenced]
    notes = tuple(
        f"ipv{family} {n}: no longer planned but still referenced by a rule that is not ours; "
        + ("flushed, not deleted" if n in orphaned else "kept")
        for n in (*orphaned, *orphaned_sets)
    )

    # -- the table itself ------------------------------------------------------------------
    # A table with flags (dormant: its chains see no packets) is woken by `add table`, which
    # sends no flags.  (nft 1.0.6 prints the flag's name wrongly in JSON, so any flag counts.)
    wake = bool(observed.table and observed.table_flags and not _empty(desired))
    if wake:
        found = ("flags " + ",".join(observed.table_flags),)
        if last is not None:
            drift.append(Drift(family, "table", TABLE_DORMANT, (), found, True))
        else:
            changes.append(Change(family, "table", TABLE_DORMANT, 0))
    everything_goes = (
        _empty(desired)
        and observed.table
        and observed.other_slice == 0
        and not orphaned
        and not orphaned_sets
        and set(deleted_chains) == set(observed.chains)
        and set(deleted_sets) == set(have_sets)
        and set(removed_others) == set(observed.others)
    )
    if everything_goes:
        if not (deleted_chains or deleted_sets or removed_others):
            changes.append(Change(family, "table", TABLE_REMOVED, 0))
        return NftDelta(
            family=family,
            ops=(_dump(table_command("delete")),),
            drift=tuple(drift),
            changes=tuple(changes),
            deleted=tuple(sorted([*deleted_chains, *deleted_sets])),
            notes=notes,
            table_deleted=True,
        )

    # -- the transaction -------------------------------------------------------------------
    ops: list[dict[str, Any]] = []
    creates = new_chains or recreate or rewrite or new_sets or recreate_sets or adds
    if creates or wake:
        ops.append(table_command())
    ops.extend(chain_command("add", n) for n in new_chains if n not in want_hooks)
    flush = sorted({*rewrite, *recreate, *removed_chains})
    ops.extend(chain_command("flush", n) for n in flush)
    for name in sorted(deletes):
        ops.append(element_command("delete", have_sets[name], deletes[name]))
    ops.extend(chain_command("delete", n) for n in recreate)
    ops.extend(set_command("delete", have_sets[n]) for n in recreate_sets)
    ops.extend(set_command("add", want_sets[n]) for n in sorted([*new_sets, *recreate_sets]))
    fill = [n for n in [*new_chains, *recreate, *rewrite] if n not in want_hooks]
    for name in sorted(fill, key=chain_order):
        if name in recreate:
            ops.append(chain_command("add", name))
        ops.extend(rule_command(name, rule) for rule in final_rules[name])
    for name in sorted(adds):
        ops.append(element_command("add", want_sets[name], adds[name]))
    for name in sorted(n for n in [*new_chains, *recreate, *rewrite] if n in want_hooks):
        if name not in rewrite:
            ops.append(chain_command("add", name, want_hooks[name]))
        ops.extend(rule_command(name, rule) for rule in final_rules[name])
    # Sets and maps before chains: a removed map's elements still point at their chains.
    ops.extend(set_command("delete", have_sets[n]) for n in deleted_sets)
    ops.extend(chain_command("delete", n) for n in deleted_chains)
    for key in removed_others:
        kind, _, name = key.partition(" ")
        ops.append(object_command("delete", kind, name))
    written = sorted({*new_chains, *recreate, *rewrite, *new_sets, *recreate_sets, *adds, *deletes})
    return NftDelta(
        family=family,
        ops=tuple(_dump(op) for op in ops),
        drift=tuple(drift),
        changes=tuple(changes),
        written=tuple(written),
        deleted=tuple(sorted([*deleted_chains, *deleted_sets, *removed_others])),
        orphaned=orphaned,
        notes=notes,
        elements_added=sum(len(x) for x in adds.values())
        + sum(len(want_sets[n].elements or ()) for n in [*new_sets, *recreate_sets]),
        elements_deleted=sum(len(x) for x in deletes.values()),
    )


def _empty(desired: NftRuleset) -> bool:
    return desired.empty


def _known(have: NftSet | None, want: NftSet | None, last: NftSet | None) -> NftSet | None:
    """A read-back set whose elements were not read, taken to hold what it should: what the
    last plan put there (checked when written), or else, with no last plan, what this one
    wants.  The last plan comes first: a set is named by its group's id, and a group whose
    id collides with the old one's is a set of other elements under the same name."""
    if have is None or have.elements is not None:
        return have
    for ref in (last, want):
        if ref is not None and ref.name == have.name and ref.header == have.header:
            return ref  # equal to `have` with those elements, and cheap to compare with
    return replace(have, elements=frozenset())


def _element_targets(elements: Iterable[str] | None) -> set[str]:
    out = set()
    for e in elements or ():
        _, sep, verdict = e.partition(" : ")
        if sep:
            _, _, target = verdict.partition(" ")
            if target:
                out.add(target)
    return out


def _chain_change(family: int, name: str, want: ChainKey | None, have: ChainKey | None) -> Change:
    base = (want or have or (None, ()))[0] is not None
    if want is None:
        return Change(family, name, r.HOOK_REMOVED if base else r.CHAIN_REMOVED, 0)
    if have is None:
        return Change(family, name, r.HOOK_ADDED if base else r.CHAIN_ADDED, len(want[1]))
    if want[0] != have[0]:
        return Change(family, name, r.HOOK_FIXED, len(want[1]))
    return Change(family, name, r.CHAIN_REWRITTEN, len(want[1]))


def _chain_drift(
    family: int,
    chain: str,
    expected: ChainKey | None,
    found: ChainKey | None,
    repair: bool,
) -> list[Drift]:
    """Classify how one chain differs from what the last plan put there."""
    base = expected is not None and expected[0] is not None
    if found is None:
        kind = r.HOOK_MISSING if base else r.CHAIN_MISSING
        return [Drift(family, chain, kind, expected[1] if expected else (), (), repair)]
    if expected is None:
        return [Drift(family, chain, r.CHAIN_EXTRA, (), found[1], repair)]
    out: list[Drift] = []
    if expected[0] != found[0]:
        out.append(
            Drift(family, chain, r.HOOK_CHANGED, (str(expected[0]),), (str(found[0]),), repair)
        )
    out.extend(rules_drift(family, chain, expected[1], found[1], repair, rule_comment))
    return out


def _set_change(family: int, name: str, want: NftSet | None, have: NftSet | None) -> Change:
    if want is None:
        return Change(family, name, SET_REMOVED, 0)
    if have is None:
        return Change(family, name, SET_ADDED, len(want.elements or ()))
    if want.header != have.header:
        return Change(family, name, SET_CHANGED, len(want.elements or ()))
    diff = (want.elements or frozenset()) ^ (have.elements or frozenset())
    return Change(family, name, ELEMENTS_CHANGED, len(diff))


def _set_drift(
    family: int, name: str, expected: NftSet | None, found: NftSet | None, repair: bool
) -> list[Drift]:
    """How a set or map differs from what the last plan put there."""
    if found is None:
        shown = tuple(sorted(expected.elements or ())) if expected else ()
        return [Drift(family, name, SET_MISSING, shown, (), repair)]
    if expected is None:
        return [Drift(family, name, SET_EXTRA, (), tuple(sorted(found.elements or ())), repair)]
    if expected.header != found.header:
        return [
            Drift(family, name, SET_CHANGED, (expected.describe(),), (found.describe(),), repair)
        ]
    want = expected.elements or frozenset()
    have = found.elements or frozenset()
    out = []
    if want - have:
        out.append(Drift(family, name, ELEMENT_MISSING, tuple(sorted(want - have)), (), repair))
    if have - want:
        out.append(Drift(family, name, ELEMENT_EXTRA, (), tuple(sorted(have - want)), repair))
    return out


def slice_size(state: NftState) -> tuple[int, int]:
    """A slice's objects and set elements (what the other family's `other_*` counts)."""
    objects = len(state.chains) + len(state.sets) + len(state.others)
    return objects, sum(len(s.elements or ()) for s in state.sets.values())


def state_after(observed: NftState, desired: NftRuleset, delta: NftDelta) -> NftState:
    """What the kernel holds once `delta`, computed from `observed`, has been committed.

    Exact when nothing else committed in between (the generation id moved by one): a
    transaction is all or nothing.  Written objects are as desired, deleted ones gone,
    orphaned chains empty; everything else is as it was read.
    """
    if delta.table_deleted:
        return NftState(observed.family, {}, elements_read=observed.elements_read)
    chains = dict(observed.chains)
    hooks = dict(observed.base_hooks)
    sets = dict(observed.sets)
    others = dict(observed.others)
    for name in delta.written:
        if name in desired.chains:
            chains[name] = desired.chains[name]
            if name in desired.base_hooks:
                hooks[name] = desired.base_hooks[name]
            else:
                hooks.pop(name, None)
        if name in desired.sets:
            sets[name] = desired.sets[name]
    for name in delta.deleted:
        chains.pop(name, None)
        hooks.pop(name, None)
        sets.pop(name, None)
        others.pop(name, None)
    for name in delta.orphaned:
        chains[name] = ()
    table_flags = () if delta.ops else observed.table_flags
    return replace(
        observed,
        chains=chains,
        base_hooks=hooks,
        sets=sets,
        others=others,
        table=True,
        table_flags=table_flags,
    )


def check_applied(desired: NftRuleset, delta: NftDelta, observed: NftState) -> list[str]:
    """What of `delta` is not in the kernel after it was applied ([] when all of it is).

    Only what the transaction touched is checked; a set whose elements were not read back
    is checked by header only (the backend reads written sets' elements itself).
    """
    problems: list[str] = []
    if delta.table_deleted:
        if observed.table:
            problems.append("the table still exists")
        return problems
    for name in delta.written:
        if name in desired.chains:
            got = observed.chains.get(name)
            if got is None:
                problems.append(f"chain {name} is missing")
            elif got != desired.chains[name]:
                diff = [x for x in got if x not in set(desired.chains[name])][:1]
                problems.append(
                    f"chain {name} reads back differently" + (f": {diff[0]}" if diff else "")
                )
            elif observed.base_hooks.get(name) != desired.base_hooks.get(name):
                problems.append(f"chain {name} hooks in differently")
        elif name in desired.sets:
            want, got_set = desired.sets[name], observed.sets.get(name)
            if got_set is None:
                problems.append(f"set {name} is missing")
            elif got_set.header != want.header:
                problems.append(f"set {name} reads back as {got_set.describe()}")
            elif got_set.elements is not None and got_set.elements != want.elements:
                lost = sorted((want.elements or frozenset()) - got_set.elements)[:1]
                problems.append(
                    f"set {name} holds other elements" + (f": {lost[0]} missing" if lost else "")
                )
    for name in delta.deleted:
        if name in observed.chains or name in observed.sets or name in observed.others:
            problems.append(f"{name} still exists")
    problems.extend(f"{n} is not empty" for n in delta.orphaned if observed.chains.get(n))
    return problems
