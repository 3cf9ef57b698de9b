"""Partial plans: what `asgctl plan --shard I/N` writes, and `asgctl plan --merge` trusts.

A fleet of 10,000 cells is planned by several CI jobs, each reading and diffing the cells of
one shard (`ci.partition`) and, of the others, only what every job reads alike (the listing
and each cell's claimed revision).  A principal runs on cells of every shard, so a job
diffs no principal: it counts its cells' principal facts (`diff.PrincipalFacts`), and the
merge diffs every principal from their sum, with the head and bases loaded from git
(`plan.complete`, which an unsharded plan runs too).  The merged report is, in every
format, byte for byte what a single `asgctl plan` prints.

Between the jobs the partials are files (CI artifacts), so the merge reads them as
untrusted input and refuses, with a message naming the file and what is wrong, anything
that is not exactly one partial per shard of one plan:

* the schema: a versioned document (`asgctl-plan-partial`, VERSION) whose report is decoded
  field by field against the report's own types (a wrong type, a missing or unknown field
  names its path);
* one plan: the same partition, shard count, head, base, policies, inventory (its cell list
  and content digest) and every fleet-wide part of the report (findings, notes, warnings,
  groups) in every partial;
* each shard exactly once, none missing;
* each partial covers exactly its shard's cells (recomputed here from the names, never
  taken from the partial), every one of them diffed or left out once, no principal
  diffed, and one set of principal facts per diff, against that diff's base: shards are
  then disjoint and complete.

A missing, duplicated, stale or edited partial therefore fails the merge (exit 1); it can
never produce "No changes".  What the merge cannot check is a partial recomputed by someone
who controls a plan job (its cells' diffs and facts): the jobs run the base revision's
asgctl, as the unsharded plan did.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeAlias, Union, get_args, get_origin

from reconciler.ci.partition import PARTITION, Shard, shard_of
from reconciler.ci.plan import complete, merge_diffs
from reconciler.ci.report.plan import LeftOut, PartFacts, PlanReport, ShardScope
from reconciler.core.diff import PlanDiff, PrincipalFacts
from reconciler.core.model import PolicySet
from reconciler.sources.jsonsafe import JsonInputError, loads

KIND = "asgctl-plan-partial"
VERSION = 2
MAX_PARTIAL_BYTES = 2 << 30
"""A shard of 10,000 cells with every chain diffed is a few hundred MB; more is not ours."""


class PartialError(ValueError):
    """A partial that cannot be used, or partials that do not make one plan."""


# ----------------------------------------------------------------------------- codec


def _encode(value: Any) -> Any:
    """Dataclasses as objects of their fields, tuples as lists.  (A field whose type is a
    union of dataclasses, an access's destination, is told apart by its field names.)"""
    if isinstance(value, tuple):
        if value and type(value[0]) is str:  # a tuple[str, ...]: a chain's lines
            return list(value)
        return [_encode(v) for v in value]
    names = _field_names(type(value))
    if names is not None:
        return {name: _encode(getattr(value, name)) for name in names}
    return value


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names (None for any other type), asked once per class."""
    if cls not in _FIELD_NAMES:
        _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls)) if is_dataclass(cls) else None
    return _FIELD_NAMES[cls]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


Where: TypeAlias = "str | tuple[Where, str | int]"
"""Where a value sits in a partial: the file (and field) as text, or (parent, key), which
`_text` spells `parent.key` or `parent[i]` -- only for a message, so the millions of
values of a fleet's partial are not each given a path string they never need."""


def _text(where: Where) -> str:
    if isinstance(where, str):
        return where
    parent, key = where
    return f"{_text(parent)}[{key}]" if isinstance(key, int) else f"{_text(parent)}.{key}"


Decoder = Callable[[Any, Where], Any]


def _decode(tp: Any, value: Any, where: Where) -> Any:
    """`value` (parsed JSON) as the type `tp`, or PartialError naming `where`."""
    return _decoder(tp)(value, where)


_DECODERS: dict[Any, Decoder] = {}


def _decoder(tp: Any) -> Decoder:
    """The reader of values of type `tp`, built once per type: a fleet's partial holds a
    few hundred thousand values of a dozen types, so what to check for each type is worked
    out once, not per value."""
    found = _DECODERS.get(tp)
    if found is None:
        found = _DECODERS[tp] = _build(tp)
    return found


def _fail(where: Where, what: str) -> PartialError:
    return PartialError(f"{_text(where)}: {what}")


def _build(tp: Any) -> Decoder:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _union_decoder(get_args(tp))
    if origin is Literal:
        allowed = get_args(tp)

        def literal(value: Any, where: Where) -> Any:
            if value not in allowed or not isinstance(value, str):
                shown = ", ".join(repr(a) for a in allowed)
                raise _fail(where, f"{value!r} is not one of {shown}")
            return value

        return literal
    if origin is tuple:
        item = get_args(tp)[0]
        each = _decoder(item)

        def sequence(value: Any, where: Where) -> Any:
            if not isinstance(value, list):
                raise _fail(where, f"expected a list, got {_kind(value)}")
            if item is str and all(type(v) is str for v in value):  # a chain's lines
                return tuple(value)
            return tuple([each(v, (where, i)) for i, v in enumerate(value)])

        return sequence
    if isinstance(tp, type) and is_dataclass(tp):
        return _dataclass_decoder(tp)
    if tp in _SCALARS:
        check, expected = _SCALARS[tp]

        def scalar(value: Any, where: Where) -> Any:
            if not check(value):
                raise _fail(where, f"expected {expected}, got {_kind(value)}")
            return value

        return scalar

    def unknown(value: Any, where: Where) -> Any:  # a type this module does not know
        raise _fail(where, f"cannot read a {tp!r}")

    return unknown


_SCALARS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    # An int stays an int: it was one when written, and prints as one.
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _union_decoder(options: tuple[Any, ...]) -> Decoder:
    classes = [o for o in options if isinstance(o, type) and is_dataclass(o)]
    nullable = type(None) in options
    if len(classes) > 1:  # tell dataclasses apart by their field names
        by_names = {frozenset(f.name for f in fields(c) if f.init): c for c in classes}
        names = ", ".join(c.__name__ for c in classes)

        def tagged(value: Any, where: Where) -> Any:
            if value is None and nullable:
                return None
            cls = by_names.get(frozenset(value)) if isinstance(value, dict) else None
            if cls is None:
                raise _fail(where, f"expected one of {names}")
            return _decoder(cls)(value, where)

        return tagged
    others = [o for o in options if o is not type(None)]

    def first_that_fits(value: Any, where: Where) -> Any:
        if value is None and nullable:
            return None
        errors = []
        for option in others:
            try:
                return _decoder(option)(value, where)
            except PartialError as exc:
                errors.append(str(exc))
        raise PartialError(errors[0] if errors else f"{_text(where)}: unexpected null")

    return first_that_fits


def _dataclass_decoder(cls: type) -> Decoder:
    known = [f for f in fields(cls) if f.init]
    hints = _hints(cls)
    names = frozenset(f.name for f in known)
    required = tuple(f.name for f in known if f.default is MISSING and f.default_factory is MISSING)
    # A plain scalar field is checked here, by the exact JSON type it must have; any other
    # field by its decoder (built on first use: a field's type may be this class's own).
    exact = {f.name: _EXACT[hints[f.name]] for f in known if hints[f.name] in _EXACT}
    readers: dict[str, Decoder] = {}

    def instance(value: Any, where: Where) -> Any:
        if not isinstance(value, dict):
            raise _fail(where, f"expected an object, got {_kind(value)}")
        if len(value) != len(names) or not names.issuperset(value):
            if not names.issuperset(value):
                raise _fail(where, f"unknown field {sorted(set(value) - names)[0]!r}")
            for name in required:
                if name not in value:
                    raise _fail(where, f"missing field {name!r}")
        if not readers:
            readers.update({f.name: _decoder(hints[f.name]) for f in known})
        args = {}
        for name, v in value.items():
            allowed = exact.get(name)
            if allowed is None:
                args[name] = readers[name](v, (where, name))
            elif type(v) in allowed:
                args[name] = v
            else:
                readers[name](v, (where, name))  # raises, with the scalar's own message
        try:
            return cls(**args)
        except (TypeError, ValueError) as exc:
            raise _fail(where, str(exc)) from None

    return instance


_EXACT: dict[Any, tuple[type, ...]] = {str: (str,), int: (int,), bool: (bool,), float: (int, float)}
"""The JSON types a scalar field accepts, exactly (`type(True)` is bool, never int)."""


def dump_partial(report: PlanReport) -> str:
    """The partial a `--shard` run writes: a header a person (or a script) can read -- which
    shard of which plan, the cells it covers -- and the report, every field of it."""
    scope = report.shard
    if scope is None:
        raise ValueError("dump_partial: the report is not a shard's")
    shard = Shard(scope.index, scope.count)
    doc = {
        "kind": KIND,
        "version": VERSION,
        "partition": PARTITION,
        "shard": {"index": scope.index, "count": scope.count},
        "head": _encode(report.head),
        "base": _encode(report.base),
        "inventory": {"identity": scope.identity, "cells": list(scope.fleet)},
        "covers": [c for c in scope.fleet if shard.holds(c)],
        "left_out": _encode(scope.left_out),
        "facts": _encode(scope.facts),
        "report": _encode(replace(report, shard=None)),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


def load_partial(data: str | bytes, source: str) -> PlanReport:
    """A partial's report (with its `shard` scope), checked against the schema and against
    itself (see the module docstring); PartialError names `source` and the field."""
    if len(data) > MAX_PARTIAL_BYTES:
        raise PartialError(f"{source}: {len(data):,} bytes, over {MAX_PARTIAL_BYTES:,}")
    try:
        doc = loads(data, source, reject_duplicate_keys=True)
    except JsonInputError as exc:
        raise PartialError(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise PartialError(f"{source}: not an asgctl plan partial (kind must be {KIND!r})")
    if doc.get("version") != VERSION:
        raise PartialError(
            f"{source}: version {doc.get('version')!r}; this asgctl reads version {VERSION}"
        )
    expected = {"kind", "version", "partition", "shard", "head", "base", "inventory", "covers"}
    expected |= {"left_out", "facts"}
    missing = sorted((expected | {"report"}) - set(doc))
    unknown = sorted(set(doc) - expected - {"report"})
    if missing or unknown:
        what = f"missing field {missing[0]!r}" if missing else f"unknown field {unknown[0]!r}"
        raise PartialError(f"{source}: {what}")
    if doc["partition"] != PARTITION:
        raise PartialError(f"{source}: partition {doc['partition']!r}, not {PARTITION!r}")
    try:
        head_shard = _decode(_ShardHeader, doc["shard"], f"{source}: shard")
        shard = Shard(head_shard.index, head_shard.count)
        inventory = _decode(_Inventory, doc["inventory"], f"{source}: inventory")
        covers = _decode(tuple[str, ...], doc["covers"], f"{source}: covers")
        left_out = _decode(tuple[LeftOut, ...], doc["left_out"], f"{source}: left_out")
        facts = _decode(tuple[PartFacts, ...], doc["facts"], f"{source}: facts")
        report: PlanReport = _decode(PlanReport, doc["report"], f"{source}: report")
    except ValueError as exc:  # ShardError too
        text = str(exc)
        raise PartialError(text if text.startswith(source) else f"{source}: {text}") from None
    if report.shard is not None:
        raise PartialError(f"{source}: report.shard: the shard is given in the header")
    for name in ("head", "base"):
        if _decode(type(report.head), doc[name], f"{source}: {name}") != getattr(report, name):
            raise PartialError(f"{source}: {name}: the header and the report disagree")
    fleet = inventory.cells
    if len(set(fleet)) != len(fleet):
        raise PartialError(f"{source}: inventory.cells names a cell twice")
    mine = tuple(c for c in fleet if shard.holds(c))
    if covers != mine:
        extra = sorted(set(covers) - set(mine))
        raise PartialError(
            f"{source}: covers is not shard {shard}'s cells"
            + (
                f" (it claims {extra[0]!r}, which shard {shard_of(extra[0], shard.count)} holds)"
                if extra
                else " of its inventory"
            )
        )
    scope = ShardScope(shard.index, shard.count, fleet, inventory.identity, left_out, facts)
    report = replace(report, shard=scope)
    _check_coverage(report, mine, source)
    return report


def _check_coverage(report: PlanReport, mine: tuple[str, ...], source: str) -> None:
    """Every cell of the shard diffed or left out exactly once, nothing else; no principal
    diffed; one set of facts per diff, each against that diff's base, each counting no
    more cells than the diff holds."""
    shard = report.shard
    assert shard is not None
    left = [x.cell for x in shard.left_out]
    if report.diff is None:
        if report.groups or left or shard.facts:
            raise PartialError(f"{source}: report: groups, left_out or facts without a diff")
        return
    if left != [c for c in mine if c in set(left)]:
        raise PartialError(
            f"{source}: left_out: not cells of shard {shard.index}/{shard.count}, each once, "
            "in order"
        )
    planned = [c for c in mine if c not in set(left)]
    diff = report.diff
    diffs = [g.diff for g in report.groups] if report.groups else [diff]
    if report.groups:
        listed = [c for g in report.groups for c in g.cells]
        if sorted(listed) != planned:
            raise PartialError(
                f"{source}: report.groups: the groups' cells are not shard "
                f"{shard.index}/{shard.count}'s cells (less those left out), each once"
            )
        for i, g in enumerate(report.groups):
            if tuple(c.cell for c in g.diff.cells) != g.cells:
                raise PartialError(
                    f"{source}: report.groups[{i}].diff.cells: not the group's cells, in order"
                )
        if merge_diffs(diffs) != diff:
            raise PartialError(f"{source}: report.diff: not the sum of its groups' diffs")
        againsts = [g.against.sha for g in report.groups]
    else:
        if [c.cell for c in diff.cells] != planned:
            raise PartialError(
                f"{source}: report.diff.cells: not shard {shard.index}/{shard.count}'s cells "
                "(less those left out), each once, in order"
            )
        # Against the base; against an empty policy only when the base does not validate
        # (and no cell's status says what they enforce instead: then there are groups).
        invalid = any(f.severity == "error" for f in report.base_findings)
        againsts = ["" if invalid else report.base.sha]
    for d in diffs:
        if d.principals:
            raise PartialError(
                f"{source}: a partial diffs no principal (the merge does, from every shard's facts)"
            )
        for n in d.notices:
            if n.cell not in mine:
                raise PartialError(f"{source}: a notice names cell {n.cell!r}, not of this shard")
    if [f.against for f in shard.facts] != againsts:
        raise PartialError(f"{source}: facts: not one per diff, against each diff's base, in order")
    for k, (part, d) in enumerate(zip(shard.facts, diffs, strict=True)):
        _check_facts(part.facts, d, f"{source}: facts[{k}]")


def _check_facts(facts: PrincipalFacts, diff: PlanDiff, where: str) -> None:
    """Facts that could be a count of the diff's cells: principals and spaces sorted and
    distinct, every principal on 1 to that many cells with at least a container on each,
    and as many containers in all as the cells' diffs hold (so a principal cannot be
    dropped from the facts, or counted short, without a cell's count saying otherwise)."""
    cells = len(diff.cells)
    keys = [p.principal for p in facts.principals]
    if keys != sorted(set(keys)):
        raise PartialError(f"{where}.facts.principals: not sorted, each principal once")
    spaces = [s.space_id for s in facts.spaces]
    if spaces != sorted(set(spaces)):
        raise PartialError(f"{where}.facts.spaces: not sorted, each space once")
    for i, p in enumerate(facts.principals):
        if not 1 <= p.cells <= cells or p.ipv4 < 0 or p.ipv6 < 0 or p.ipv4 + p.ipv6 < p.cells:
            raise PartialError(
                f"{where}.facts.principals[{i}]: {p.cells} cells and {p.ipv4} + {p.ipv6} "
                f"containers cannot be counted on {cells} cells"
            )
    for i, s in enumerate(facts.spaces):
        if list(s.orgs) != sorted(set(s.orgs)) or not s.orgs:
            raise PartialError(f"{where}.facts.spaces[{i}].orgs: not sorted, each org once")
    counted = sum(p.ipv4 + p.ipv6 for p in facts.principals)
    held = sum(c.containers for c in diff.cells)
    if counted != held:
        raise PartialError(
            f"{where}.facts.principals: {counted:,} containers counted, and the diff's cells "
            f"hold {held:,}"
        )


@dataclass(frozen=True, slots=True)
class _ShardHeader:
    """The `shard` header: which shard of how many."""

    index: int
    count: int


@dataclass(frozen=True, slots=True)
class _Inventory:
    """The `inventory` header: the cells planned, in order, and their content digest."""

    identity: str
    cells: tuple[str, ...]


# ----------------------------------------------------------------------------- merge


def read_partials(paths: Sequence[str]) -> list[tuple[str, PlanReport]]:
    """Each file's partial, checked on its own (`load_partial`)."""
    out = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PartialError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        out.append((path, load_partial(data, path)))
    return out


def _shared(report: PlanReport) -> PlanReport:
    """What every partial of one plan holds alike: all but its own cells and facts."""
    groups = tuple(replace(g, cells=(), diff=PlanDiff((), ())) for g in report.groups)
    return replace(report, diff=None, groups=groups, shard=None)


def merge_partials(
    partials: Sequence[tuple[str, PlanReport]],
    policy_of: Callable[[str], PolicySet],
    head_sha: str | None = None,
) -> PlanReport:
    """The partials of one sharded plan as the report of the whole inventory
    (`plan.complete`, with `policy_of(sha)` the policy of each revision the principals
    are diffed at: the head's and each diff's base; `""` is an empty policy).

    PartialError (naming the files) unless they are exactly one partial per shard of the
    same plan; with `head_sha`, also unless that is the head they planned (a partial left
    over from an earlier push is stale).
    """
    if not partials:
        raise PartialError("no partials to merge")
    first_src, first = partials[0]
    assert first.shard is not None
    count = first.shard.count
    by_index: dict[int, str] = {}
    for src, r in partials:
        assert r.shard is not None
        if r.shard.count != count:
            raise PartialError(
                f"{src} is shard {r.shard.index}/{r.shard.count} and {first_src} is shard "
                f"{first.shard.index}/{count}: partials of one plan have one shard count"
            )
        if r.shard.index in by_index:
            raise PartialError(
                f"shard {r.shard.index}/{count} is given twice ({by_index[r.shard.index]} and "
                f"{src}): each shard must be merged exactly once"
            )
        by_index[r.shard.index] = src
    missing = [i for i in range(1, count + 1) if i not in by_index]
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing)
        raise PartialError(
            f"shard{'s' * (len(missing) > 1)} {names} missing: without every shard the plan "
            "would leave cells out"
        )
    for src, r in partials:
        if head_sha is not None and r.head.sha != head_sha:
            raise PartialError(
                f"{src} planned head {r.head.sha[:12] or r.head.name!r}, not "
                f"{head_sha[:12]}: it is stale (from another push) or not of this pull request"
            )
        for what in ("head", "base"):
            if getattr(r, what) != getattr(first, what):
                a, b = getattr(r, what), getattr(first, what)
                raise PartialError(
                    f"{src} planned {what} {a.sha[:12] or a.name!r} and {first_src} planned "
                    f"{b.sha[:12] or b.name!r}: partials of one plan only"
                )
        assert r.shard is not None
        if (r.shard.fleet, r.shard.identity) != (first.shard.fleet, first.shard.identity):
            raise PartialError(
                f"{src} and {first_src} planned different inventories (a status branch "
                "changed between the jobs?): run the plan again"
            )
        if _shared(r) != _shared(first):
            raise PartialError(
                f"{src} and {first_src} disagree on the plan's findings, notes, warnings or "
                "groups: partials of one plan only"
            )
    ordered = [r for _src, r in sorted(partials, key=lambda p: p[1].shard.index)]  # type: ignore[union-attr]
    if any((r.diff is None) != (first.diff is None) for r in ordered):
        raise PartialError("some partials failed and some did not: partials of one plan only")
    return complete(ordered, policy_of)
