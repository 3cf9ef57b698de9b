"""The dataplane contract: what every backend gives the converge loop, and the loop itself.

Why this seam exists: the agent, `asgctl apply`, status, metrics and the summaries need to
converge a kernel to a plan and say what happened, whatever does the enforcing.  They used to
speak iptables for it: the loop carried iptables rulesets, nftables fitted in by subclassing
iptables' records and overriding their meaning, and rule counts were iptables lines even
under nftables.  Here the loop speaks only of

* a backend's *desired* state for one family (`Desired`: what it renders from a plan, and how
  many rules and set elements installing it puts in the kernel),
* its *observed* state (`Observed`: what a read found of ours),
* the *delta* between them (`Delta`: one transaction, with the `Drift` and `Change` records
  that explain it), and
* the `Backend` protocol: render, read, delta, apply, verify.

Each backend defines its own three types (iptables: `Ruleset`, `OwnedState`, `IptablesDelta`;
nftables: `NftRuleset`, `NftState`, `NftDelta`) and satisfies `Backend` under the type
checker without inheriting from another backend.  Drift is judged the same way by all of
them (`judge`, `rules_drift`): the kernel differs from the last plan applied (someone else's
doing) or the plan differs from it (a change).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from reconciler.backends.errors import DataplaneError
from reconciler.core.cellplan import CellPlan

Mode = Literal["apply", "dry-run", "report-only"]
FAMILIES = (4, 6)

# Kinds of drift: the kernel differs from the last plan applied, so someone else changed it.
RULE_MISSING = "rule-missing"
RULE_EXTRA = "rule-extra"
RULE_CHANGED = "rule-changed"
RULES_REORDERED = "rules-reordered"
CHAIN_MISSING = "chain-missing"
CHAIN_EXTRA = "chain-extra"
HOOK_MISSING = "hook-missing"
HOOK_MOVED = "hook-moved"
HOOK_DUPLICATED = "hook-duplicated"
HOOK_CHANGED = "hook-changed"
HOOK_EXTRA = "hook-extra"
MARKER_MISSING = "marker-missing"
"""A chain the last plan put there lost its ownership marker (flushed, or the marker rule
deleted): still ours, because the last plan says so, and rewritten with it."""

# Kinds of change: the plan differs from what was applied (or from the kernel, when the last
# plan applied is unknown).
CHAIN_ADDED = "chain-added"
CHAIN_REWRITTEN = "chain-changed"
CHAIN_REMOVED = "chain-removed"
HOOK_ADDED = "hook-added"
HOOK_REMOVED = "hook-removed"
HOOK_FIXED = "hook-fixed"


@dataclass(frozen=True, slots=True, order=True)
class Drift:
    """One way the kernel differs from the last plan applied: someone changed it from outside.

    `expected` holds what the last plan put there, `found` what the kernel holds instead (both
    in the backend's canonical text), so an operator can see exactly what was touched.
    `repair` says whether the delta carrying this record rewrites it (false in report-only
    and no-self-heal modes).
    """

    family: int
    chain: str
    what: str
    expected: tuple[str, ...] = ()
    found: tuple[str, ...] = ()
    repair: bool = True

    def __str__(self) -> str:
        n = max(len(self.expected), len(self.found))
        detail = f" ({n} rule{'s' if n != 1 else ''})" if n else ""
        return f"ipv{self.family} {self.chain}: {self.what}{detail}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "chain": self.chain, "what": self.what}
        if self.expected:
            out["expected"] = list(self.expected)
        if self.found:
            out["found"] = list(self.found)
        out["repair"] = self.repair
        return out


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One object (chain, hook, set...) the plan changes: added, rewritten or removed."""

    family: int
    chain: str
    what: str
    rules: int = 0

    def __str__(self) -> str:
        suffix = f" ({self.rules} rules)" if self.what in (CHAIN_ADDED, CHAIN_REWRITTEN) else ""
        return f"ipv{self.family} {self.chain}: {self.what}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "chain": self.chain, "what": self.what, "rules": self.rules}


class Desired(Protocol):
    """A backend's rendering of one family of a plan (pure, immutable)."""

    @property
    def family(self) -> int: ...

    @property
    def installed_rules(self) -> int:
        """What installing this puts in the kernel, counted as the backend installs it (rules,
        hooks, set elements): the number the agent reports as installed."""
        ...


class Observed(Protocol):
    """What a read found of ours in one family's part of the kernel."""

    @property
    def family(self) -> int: ...

    @property
    def empty(self) -> bool:
        """Nothing of ours is there: a transaction now is an install, not an update."""
        ...


class Delta(Protocol):
    """One family's transaction, and why each part of it is there.

    `ops` are the transaction's commands in the backend's own syntax; empty means nothing to
    send.  `written` objects are created or rewritten, `deleted` removed, `orphaned` emptied
    but kept because something not ours still refers to them; `foreign` are objects with our
    names that are not ours: reported, never touched.
    """

    @property
    def family(self) -> int: ...
    @property
    def ops(self) -> tuple[str, ...]: ...
    @property
    def drift(self) -> tuple[Drift, ...]: ...
    @property
    def changes(self) -> tuple[Change, ...]: ...
    @property
    def written(self) -> tuple[str, ...]: ...
    @property
    def deleted(self) -> tuple[str, ...]: ...
    @property
    def orphaned(self) -> tuple[str, ...]: ...
    @property
    def notes(self) -> tuple[str, ...]: ...
    @property
    def foreign(self) -> tuple[str, ...]: ...
    @property
    def empty(self) -> bool: ...

    def text(self) -> str:
        """The transaction as the backend's tool reads it, or "" when there is nothing."""
        ...


@dataclass(frozen=True)
class DeltaRecord:
    """What every backend's delta says besides its transaction: the fields of `Delta`, in
    one place.  Backends extend it with their own `text()` (and fields of their own); it is
    a record to share, not a backend to inherit from."""

    family: int
    ops: tuple[str, ...] = ()
    drift: tuple[Drift, ...] = ()
    changes: tuple[Change, ...] = ()
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    orphaned: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.ops


@dataclass(frozen=True)
class NoDelta(DeltaRecord):
    """The delta of a family whose cycle failed before a delta was computed (a read error):
    nothing to send, nothing found."""

    def text(self) -> str:
        return ""


D = TypeVar("D", bound=Desired)
O = TypeVar("O", bound=Observed)  # noqa: E741
X = TypeVar("X", bound=Delta)


class Backend(Protocol[D, O, X]):
    """What the converge loop needs from a dataplane (iptables-restore, libiptc, nft...).

    Generic in the backend's own desired, observed and delta types: a backend's `delta`
    takes exactly what its `render` and `read` return, and `apply` what its `delta` returns.
    """

    @property
    def name(self) -> str:
        """Backend and variant, for logs and status (e.g. `iptables-nft`)."""
        ...

    def render(self, plan: CellPlan, family: int) -> D:
        """The plan as this backend's desired state for one family (pure)."""
        ...

    def read(self, family: int) -> O:
        """Our part of the kernel's state; ReadError rather than a guess."""
        ...

    def delta(self, desired: D, observed: O, last: D | None, *, heal_drift: bool = True) -> X:
        """What to send (pure): `last` is the last plan applied, rendered, or None."""
        ...

    def apply(self, delta: X) -> None:
        """Send one atomic transaction; ApplyError leaves the previous state in place."""
        ...

    def verify(self, desired: D, delta: X) -> None:
        """Read back: did every part of `delta` take effect?  VerifyError if not."""
        ...


AnyBackend = Backend[Any, Any, Any]
"""A backend whose types the caller does not need (the agent, the CLI)."""


def installed_rules(backend: AnyBackend, plan: CellPlan) -> int:
    """What `plan` puts in the kernel through `backend`, both families, as it counts them."""
    return sum(backend.render(plan, family).installed_rules for family in FAMILIES)


def judge(
    want: object, have: object, last: object, last_known: bool, heal_drift: bool
) -> tuple[bool, bool, bool]:
    """How one object (chain, set, ...) that differs from the plan is to be taken: whether
    the plan changes it (a change), whether the kernel moved away from the last plan applied
    (drift: someone else's doing), and whether the transaction rewrites it.  Without a last
    plan every difference is a change; drift is rewritten only with `heal_drift`."""
    planned = want != (last if last_known else have)
    drifted = last_known and have != last
    return planned, drifted, planned or heal_drift


def rules_drift(
    family: int,
    chain: str,
    expected: Sequence[str],
    found: Sequence[str],
    repair: bool,
    rule_id: Callable[[str], str],
) -> list[Drift]:
    """How a chain's rules differ from the last plan's: missing, extra, changed, reordered.

    Shared by every backend: `rule_id` reads the id a rule carries (an iptables comment, an
    nft rule comment), so a rule that lost one line and gained another under the same id is
    reported once as changed rather than as one missing and one extra.
    """
    if tuple(expected) == tuple(found):
        return []
    missing, expected_shared = _split(expected, Counter(expected) - Counter(found))
    extra, found_shared = _split(found, Counter(found) - Counter(expected))
    by_key: dict[str, list[str]] = {}
    for line in extra:
        by_key.setdefault(rule_id(line), []).append(line)
    changed_old: list[str] = []
    changed_new: list[str] = []
    still_missing: list[str] = []
    for line in missing:
        key = rule_id(line)
        bucket = by_key.get(key)
        if bucket and key:
            changed_old.append(line)
            changed_new.append(bucket.pop(0))
        else:
            still_missing.append(line)
    leftover = Counter(x for bucket in by_key.values() for x in bucket)
    still_extra = _split(found, leftover)[0]
    out: list[Drift] = []
    if still_missing:
        out.append(Drift(family, chain, RULE_MISSING, tuple(still_missing), (), repair))
    if still_extra:
        out.append(Drift(family, chain, RULE_EXTRA, (), tuple(still_extra), repair))
    if changed_old:
        out.append(
            Drift(family, chain, RULE_CHANGED, tuple(changed_old), tuple(changed_new), repair)
        )
    if expected_shared != found_shared:  # the rules both sides keep, in another order
        out.append(Drift(family, chain, RULES_REORDERED, tuple(expected), tuple(found), repair))
    return out


def _split(lines: Sequence[str], counts: Counter[str]) -> tuple[list[str], list[str]]:
    """The last `counts[x]` occurrences of each x (a duplicate is the later copy), and the
    lines left, both in order."""
    left = Counter(counts)
    picked: list[str] = []
    kept: list[str] = []
    for line in reversed(lines):
        if left[line] > 0:
            left[line] -= 1
            picked.append(line)
        else:
            kept.append(line)
    return picked[::-1], kept[::-1]


# -- the converge cycle ----------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyResult:
    """One family's cycle: the delta, whether it was sent, how long each phase took."""

    family: int
    delta: Delta
    sent: bool = False
    error: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    verified: bool = False
    """Read back in this cycle (whether or not it matched); false when nothing was sent, or
    when an install's read-back was left to the next cycle's read (`defer_install_verify`)."""

    @property
    def in_sync(self) -> bool:
        return self.error is None and self.delta.empty

    def to_dict(self) -> dict[str, Any]:
        d = self.delta
        return {
            "family": self.family,
            "in_sync": self.in_sync,
            "sent": self.sent,
            "verified": self.verified,
            "error": self.error,
            "written": list(d.written),
            "deleted": list(d.deleted),
            "orphaned": list(d.orphaned),
            "foreign": list(d.foreign),
            "changes": [c.to_dict() for c in d.changes],
            "drift": [{**x.to_dict(), "repaired": self.sent and x.repair} for x in d.drift],
            "notes": list(d.notes),
            "transaction": d.text(),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class ConvergeResult:
    backend: str
    mode: str
    families: tuple[FamilyResult, ...]

    @property
    def ok(self) -> bool:
        return all(f.error is None for f in self.families)

    @property
    def in_sync(self) -> bool:
        """Nothing needed sending (the cheap no-op cycle)."""
        return all(f.in_sync for f in self.families)

    @property
    def drift(self) -> tuple[Drift, ...]:
        return tuple(x for f in self.families for x in f.delta.drift)

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(x for f in self.families for x in f.delta.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "ok": self.ok,
            "in_sync": self.in_sync,
            "families": [f.to_dict() for f in self.families],
        }


def converge(
    backend: Backend[D, O, X],
    plan: CellPlan,
    last: CellPlan | None = None,
    *,
    mode: Mode = "apply",
    heal_drift: bool = True,
    families: tuple[int, ...] = FAMILIES,
    defer_install_verify: bool = False,
) -> ConvergeResult:
    """Bring each family's kernel state to the plan: read, delta, apply, verify.

    `last` is the plan the previous successful cycle applied; it only decides whether a
    difference is reported as drift or as a change.  `dry-run` and `report-only` compute
    everything and send nothing; report-only is meant for drift audits, dry-run for printing
    the transactions.  Families are independent: one failing does not stop the other.  It
    never raises for a kernel failure (the agent must write status either way): the error is
    in the result.

    `defer_install_verify` is for a caller that converges again (the agent): a transaction
    that installs our state into a kernel holding none of it is then not read back in this
    cycle but by the next cycle's read, which compares the kernel with this plan anyway and
    would find any difference as drift.  The transaction is atomic and reports its own
    failure; the read-back only catches the kernel printing our rules differently from how
    we render them, and reading a freshly installed table costs a third of installing it
    (Calico checks its writes the same way, by a later read).  Only an install is deferred: a
    repair of what that later read found is verified at once, so a persistent difference
    still ends in a VerifyError rather than a loop of repairs.  A one-shot `asgctl apply`
    verifies at once.
    """
    out = []
    for family in families:
        out.append(_one(backend, plan, last, family, mode, heal_drift, defer_install_verify))
    return ConvergeResult(backend.name, mode, tuple(out))


def remove(backend: Backend[D, O, X], *, mode: Mode = "apply") -> ConvergeResult:
    """Take every chain, set and hook of ours out of the kernel, and nothing else.

    The way back from asgctl to whatever enforced before it (CF's own chains, on a Diego
    cell): converging to a plan with no containers leaves nothing of ours, and ownership is
    judged exactly as in every other converge -- marker, recorded set, the previous release's
    shape -- so the host's own chains, even ones named like ours, are never touched.  Stop
    the agent first, or its next cycle puts the rules back.
    """
    nothing = CellPlan("uninstall", (), (), 0)
    return converge(backend, nothing, None, mode=mode)


def _one(
    backend: Backend[D, O, X],
    plan: CellPlan,
    last: CellPlan | None,
    family: int,
    mode: Mode,
    heal_drift: bool,
    defer_install_verify: bool = False,
) -> FamilyResult:
    timings: dict[str, float] = {}
    delta: Delta = NoDelta(family)
    clock = time.perf_counter
    phase, t = "render", clock()
    try:
        desired = backend.render(plan, family)
        previous = backend.render(last, family) if last is not None else None
        timings["render"] = clock() - t
        phase, t = "read", clock()
        observed = backend.read(family)
        timings["read"] = clock() - t
        phase, t = "delta", clock()
        sent = backend.delta(desired, observed, previous, heal_drift=heal_drift)
        delta = sent
        timings["delta"] = clock() - t
        if sent.empty or mode != "apply":
            return FamilyResult(family, sent, False, None, timings)
        phase, t = "apply", clock()
        backend.apply(sent)
        timings["apply"] = clock() - t
        if defer_install_verify and observed.empty:
            return FamilyResult(family, sent, True, None, timings, verified=False)
        phase, t = "verify", clock()
        backend.verify(desired, sent)
        timings["verify"] = clock() - t
        return FamilyResult(family, sent, True, None, timings, verified=True)
    except DataplaneError as exc:
        # The phase that failed keeps its time: an iptables-restore that waited 10 s for the
        # xtables lock and then gave up must not be reported as 0.02 s of enforcing.
        timings[phase] = clock() - t
        read_back = phase == "verify"
        return FamilyResult(family, delta, read_back, str(exc), timings, verified=read_back)
