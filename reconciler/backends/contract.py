"""The backend interface and the one converge cycle every backend shares.

A backend turns a CellPlan into its own desired state, reads the kernel's, computes a delta,
applies it and verifies.  `converge` runs those steps per IP family and records what it did;
it never raises for a kernel failure (the agent must write status either way), it returns the
error in the result instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from reconciler.backends.errors import DataplaneError
from reconciler.backends.iptables.render import Ruleset
from reconciler.backends.records import Change, Delta, Drift, OwnedState
from reconciler.plan import CellPlan

Mode = Literal["apply", "dry-run", "report-only"]
FAMILIES = (4, 6)


class Backend(Protocol):
    """What the converge loop needs from a dataplane (iptables-restore, libiptc, ...)."""

    @property
    def name(self) -> str:
        """Backend and variant, for logs and status (e.g. `iptables (nft)`)."""
        ...

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        """The plan as this backend's desired state for one family (pure)."""
        ...

    def read(self, family: int) -> OwnedState:
        """Our part of the kernel's state; ReadError rather than a guess."""
        ...

    def delta(
        self,
        desired: Ruleset,
        observed: OwnedState,
        last: Ruleset | None,
        *,
        heal_drift: bool = True,
    ) -> Delta:
        """What to send (pure)."""
        ...

    def apply(self, delta: Delta) -> None:
        """Send one atomic transaction; ApplyError leaves the previous rules in place."""
        ...

    def verify(self, desired: Ruleset, delta: Delta) -> None:
        """Read back: did every part of `delta` take effect?  VerifyError if not."""
        ...


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


LastApplied = CellPlan | Mapping[int, Ruleset] | None


def converge(
    backend: Backend,
    plan: CellPlan,
    last: LastApplied = None,
    *,
    mode: Mode = "apply",
    heal_drift: bool = True,
    families: tuple[int, ...] = FAMILIES,
    defer_install_verify: bool = False,
) -> ConvergeResult:
    """Bring each family's kernel state to the plan: read, delta, apply, verify.

    `last` is what the previous successful cycle applied (its plan or rendered rulesets); it
    only decides whether a difference is reported as drift or as a change.  `dry-run` and
    `report-only` compute everything and send nothing; report-only is meant for drift audits,
    dry-run for printing the transactions.  Families are independent tables: one failing does
    not stop the other.

    `defer_install_verify` is for a caller that converges again (the agent): a transaction
    that installs our chains into a table holding none of them is then not read back in this
    cycle but by the next cycle's read, which compares the kernel with this plan anyway and
    would find any difference as drift.  The restore is atomic and reports its own failure;
    the read-back only catches the kernel printing our rules differently from how we render
    them, and reading a freshly installed table costs a third of installing it (Calico checks
    its writes the same way, by a later read).  Only an install is deferred: a repair of what
    that later read found is verified at once, so a persistent difference still ends in a
    VerifyError rather than a loop of repairs.  A one-shot `asgctl apply` verifies at once.
    """
    out = []
    for family in families:
        out.append(_one(backend, plan, last, family, mode, heal_drift, defer_install_verify))
    return ConvergeResult(backend.name, mode, tuple(out))


def _last_for(last: LastApplied, backend: Backend, family: int) -> Ruleset | None:
    if last is None:
        return None
    if isinstance(last, CellPlan):
        return backend.render(last, family)
    return last.get(family, Ruleset(family, {}))


def _one(
    backend: Backend,
    plan: CellPlan,
    last: LastApplied,
    family: int,
    mode: Mode,
    heal_drift: bool,
    defer_install_verify: bool = False,
) -> FamilyResult:
    timings: dict[str, float] = {}
    delta = Delta(family)
    clock = time.perf_counter
    phase, t = "render", clock()
    try:
        desired = backend.render(plan, family)
        previous = _last_for(last, backend, family)
        timings["render"] = clock() - t
        phase, t = "read", clock()
        observed = backend.read(family)
        timings["read"] = clock() - t
        phase, t = "delta", clock()
        delta = backend.delta(desired, observed, previous, heal_drift=heal_drift)
        timings["delta"] = clock() - t
        if delta.empty or mode != "apply":
            return FamilyResult(family, delta, False, None, timings)
        phase, t = "apply", clock()
        backend.apply(delta)
        timings["apply"] = clock() - t
        if defer_install_verify and not observed.chains:
            return FamilyResult(family, delta, True, None, timings, verified=False)
        phase, t = "verify", clock()
        backend.verify(desired, delta)
        timings["verify"] = clock() - t
        return FamilyResult(family, delta, True, None, timings, verified=True)
    except DataplaneError as exc:
        # The phase that failed keeps its time: an iptables-restore that waited 10 s for the
        # xtables lock and then gave up must not be reported as 0.02 s of enforcing.
        timings[phase] = clock() - t
        read_back = phase == "verify"
        return FamilyResult(family, delta, read_back, str(exc), timings, verified=read_back)
