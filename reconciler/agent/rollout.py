"""Whether a valid new head may be applied now: waves, halts, pause, change windows (pure).

A head that passed every gate (`reconciler.agent.cycle.judge_head`) is still held back while
the repository's `kind: Rollout` says it is not this cell's turn.  The cell then stays
Ready=True on the revision it enforces -- new containers and drift are converged with it as
on any cycle -- and reports why the head waits (`WaitingForWave`, `RolloutHalted`,
`RolloutPaused`, `OutsideChangeWindow`) with the wave, cell and revision concerned.

**Which Rollout governs.**  A pull request's author is untrusted, and the Rollout that would
hold a change back is in the same repository as the change.  So the brakes of both the
*applied* revision (A) and the *head* (H) apply:

* waves: a cell's place is the pair (its wave in A, its wave in H), compared in that order.
  A head can add waves that act at once (they refine A's order), but a head that deletes or
  reorders A's waves cannot move a cell ahead of A's earlier waves: the commit that deletes
  the waves reaches wave 2 only after wave 1 applied it and held it Ready for the soak.  The
  order is total, so no two cells can wait for each other;
* change windows: the windows of A and H together (Argo CD's rules over the union: an open
  deny window denies; with any allow window, only an open one allows).  Windows always
  reopen, so a head that removes A's windows is applied in A's next open window;
* pause: the head's alone.  A paused applied revision could never be left (every head would
  be held by it), so unpausing must be possible by a commit; such a commit still meets A's
  waves and windows, which is what keeps an untrusted unpause from reaching the fleet at once;
* the emergency trailer (`emergency-trailer`, default `Asgctl-Emergency: true`) on the head
  overrides the change windows only -- never a pause, a wave or a halt.  Like the
  mass-revoke trailer it is a statement of the commit, and only counts on a commit that
  passed signature verification when that is on.

**Soak.**  Another cell's clock says nothing this cell can trust (whoever can push a status
branch writes its timestamps, and `lastTransitionTime` of Ready does not even move when a
cell goes from one revision to the next while staying Ready).  So the soak is measured on
the *reading* agent's own clock: from the first cycle it saw the cell report the revision
Ready, reset whenever it sees it otherwise, kept in the agent's state across restarts.  This
can only over-estimate how long a cell has held a revision (by up to one interval, or the
time since a restart), never under-estimate it.

**Halt conditions.**  `NotReady`: a cell of an earlier wave reporting Ready=False about the
revision (it refused it, or fails to enforce it) halts the rollout for every later cell;
with no halt conditions it only makes them wait.  The audit issue's flow records will add
`DeniedFlowJump` (a jump in denied flows) as another check over `CellReport`, beside
`_not_ready`; until they exist the schema accepts no such condition.

Status branches are untrusted: a forged "Ready" can only make a rollout proceed as it would
without waves (never make a cell apply a revision its own gates refused), and a forged
"not Ready" halts it -- loudly, on every waiting cell's status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from reconciler.agent.conditions import (
    FALSE,
    OUTSIDE_CHANGE_WINDOW,
    ROLLOUT_HALTED,
    ROLLOUT_PAUSED,
    TRUE,
    WAITING_FOR_WAVE,
)
from reconciler.agent.core import Problem
from reconciler.core.cron import window_state
from reconciler.core.model import HALT_CONDITIONS, ChangeWindow, Rollout
from reconciler.status.document import condition

MAX_NAMED = 3
"""Cells named in a hold's message (then a count): the status must stay small."""


@dataclass(frozen=True, slots=True)
class CellReport:
    """What another cell's status branch says about revisions (untrusted, as read)."""

    cell: str
    applied: str = ""
    """`lastAppliedRevision`."""
    observed: str = ""
    """`observedRevision`: the head it last fetched."""
    refused: str = ""
    """`refused.revision`: the head it refused, if any."""
    ready: str = "Unknown"
    reason: str = ""
    error: str = ""
    """Why the branch could not be read (then nothing else is known)."""

    @classmethod
    def from_header(cls, cell: str, header: Mapping[str, Any]) -> CellReport:
        """From a status document that passed the status schema (`parse_status`)."""
        ready = condition(dict(header), "Ready")
        refused = header.get("refused")
        return cls(
            cell,
            applied=str(header.get("lastAppliedRevision") or ""),
            observed=str(header.get("observedRevision") or ""),
            refused=str(refused.get("revision") or "") if isinstance(refused, dict) else "",
            ready=ready.status,
            reason=ready.reason,
        )


@dataclass(frozen=True)
class FleetReports:
    """Every status branch read this cycle, or why they could not be read."""

    cells: tuple[CellReport, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Soaking:
    """Since when (this agent's clock, seconds) each cell has been seen Ready on `revision`."""

    revision: str = ""
    since: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "since": [[c, t] for c, t in self.since]}

    @classmethod
    def from_dict(cls, data: object) -> Soaking:
        """What `to_dict` wrote; anything else reads as nothing seen (the soak restarts)."""
        if not isinstance(data, dict) or not isinstance(data.get("revision"), str):
            return cls()
        since = []
        for item in data.get("since") or ():
            if (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], int | float)
                and not isinstance(item[1], bool)
            ):
                since.append((item[0], float(item[1])))
        return cls(data["revision"], tuple(since))


# -- waves ---------------------------------------------------------------------------------


def wave_index(rollout: Rollout | None, cell: str) -> int:
    """The cell's wave in `rollout`: the first wave with a matching pattern, else the
    implicit last one (`len(waves)`; 0 without a Rollout or without waves)."""
    if rollout is None:
        return 0
    for i, wave in enumerate(rollout.waves):
        if any(fnmatchcase(cell, pattern) for pattern in wave.cells):
            return i
    return len(rollout.waves)


def _wave_name(rollout: Rollout | None, index: int) -> str:
    if rollout is None or index >= len(rollout.waves):
        return "(cells in no wave)"
    return rollout.waves[index].name


def _soak(rollout: Rollout | None, index: int) -> float:
    if rollout is None or index >= len(rollout.waves):
        return 0.0
    return rollout.waves[index].soak


def place(applied: Rollout | None, head: Rollout | None, cell: str) -> tuple[int, int]:
    """(wave in the applied revision's Rollout, wave in the head's): the order cells take a
    new revision in, compared as a pair, so the applied revision's waves come first."""
    return wave_index(applied, cell), wave_index(head, cell)


def wants_fleet(cell: str, applied: Rollout | None, head: Rollout | None) -> bool:
    """Must the other cells' status branches be read to judge this head?  Only when some
    wave may come before this cell's: a cell of the first wave never reads them."""
    return place(applied, head, cell) != (0, 0)


def _not_ready(report: CellReport, revision: str) -> bool:
    """Halt condition `NotReady`: Ready=False about this revision (refused, or failing)."""
    return report.ready == FALSE and revision in (report.refused, report.observed, report.applied)


@dataclass(frozen=True, slots=True)
class _Behind:
    cell: str
    wave: str
    why: str


def _waves(
    cell: str,
    revision: str,
    applied: Rollout | None,
    head: Rollout | None,
    fleet: FleetReports,
    soaking: Soaking,
    now: float,
) -> tuple[Problem | None, Soaking]:
    mine = place(applied, head, cell)
    seen = dict(soaking.since) if soaking.revision == revision else {}
    kept: dict[str, float] = {}
    halted: list[_Behind] = []
    waiting: list[tuple[tuple[int, int], _Behind]] = []
    halting = set(applied.halt if applied else HALT_CONDITIONS) | set(
        head.halt if head else HALT_CONDITIONS
    )
    for report in sorted(fleet.cells, key=lambda r: r.cell):
        if report.cell == cell:
            continue
        theirs = place(applied, head, report.cell)
        if theirs >= mine:
            continue
        wave = (
            _wave_name(applied, theirs[0]) if theirs[0] < mine[0] else _wave_name(head, theirs[1])
        )
        if report.error:
            waiting.append((theirs, _Behind(report.cell, wave, f"unreadable: {report.error}")))
            continue
        if report.applied == revision and report.ready == TRUE:
            since = seen.get(report.cell, now)
            since = now if since > now else since  # this clock went back: start again
            kept[report.cell] = since
            soak = max(_soak(applied, theirs[0]), _soak(head, theirs[1]))
            if now - since < soak:
                why = f"Ready, its {soak:g}s soak ends {_utc(since + soak)} (this agent's clock)"
                waiting.append((theirs, _Behind(report.cell, wave, why)))
            continue
        if "NotReady" in halting and _not_ready(report, revision):
            halted.append(
                _Behind(report.cell, wave, f"Ready=False, {report.reason or 'no reason'}")
            )
            continue
        on = report.applied or "no revision"
        waiting.append((theirs, _Behind(report.cell, wave, f"not yet applied (on {on})")))
    after = Soaking(revision, tuple(sorted(kept.items())))
    if halted:
        return Problem(ROLLOUT_HALTED, f"rollout of {revision} halted: " + _named(halted)), after
    if waiting:
        first = min(w[0] for w in waiting)
        behind = [b for key, b in waiting if key == first]
        others = len(waiting) - len(behind)
        more = f"; {others} more cells of later waves" if others else ""
        return Problem(
            WAITING_FOR_WAVE,
            f"{revision} waits for wave '{behind[0].wave}': " + _named(behind) + more,
        ), after
    return None, after


def _utc(t: float) -> str:
    """A time for a message, to the second: fixed while a soak runs, so the status document
    (pushed when its content changes) does not change every cycle of the wait."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _named(behind: list[_Behind]) -> str:
    shown = [f"cell {b.cell} (wave '{b.wave}') {b.why}" for b in behind[:MAX_NAMED]]
    if len(behind) > MAX_NAMED:
        shown.append(f"and {len(behind) - MAX_NAMED} more")
    return "; ".join(shown)


# -- pause and windows ---------------------------------------------------------------------


def _where(item: Rollout | ChangeWindow) -> str:
    return f" ({item.location.short})" if item.location is not None else ""


def _pause(head: Rollout | None, head_sha: str, revision: str) -> Problem | None:
    if head is None or not head.pause:
        return None
    if head.pinned is not None:
        if head.pinned == head_sha:
            return None
        return Problem(
            ROLLOUT_PAUSED,
            f"rollouts are pinned to {head.pinned[:12]} by Rollout {head.name}{_where(head)}; "
            f"{revision} is not applied",
        )
    return Problem(
        ROLLOUT_PAUSED,
        f"rollouts are paused by Rollout {head.name}{_where(head)}; {revision} is not applied",
    )


def _windows(
    rollouts: Iterable[Rollout | None], now: float, revision: str, emergency: bool, trailer: str
) -> Problem | None:
    windows = tuple(w for r in rollouts if r is not None for w in r.windows)
    allowed, deciding = window_state(tuple(w.window for w in windows), now)
    if allowed or emergency:
        return None
    override = f"a commit with the trailer '{trailer}: true' overrides it"
    if deciding is not None:
        found = next(w for w in windows if w.window == deciding)
        what = f"deny window '{deciding.cron.text}' for {deciding.duration:.0f}s{_where(found)}"
        label = f" ({found.description})" if found.description else ""
        return Problem(
            OUTSIDE_CHANGE_WINDOW, f"{what}{label} is open; {revision} waits ({override})"
        )
    allows = ", ".join(f"'{w.window.cron.text}'" for w in windows if w.window.kind == "allow")
    return Problem(
        OUTSIDE_CHANGE_WINDOW,
        f"outside every allow window ({allows}); {revision} waits ({override})",
    )


# -- the decision --------------------------------------------------------------------------


def unpaused(rollout: Rollout | None) -> Rollout | None:
    """A pinned revision's own Rollout, minus its pause: the head that pins it is the word
    on pausing, the pinned revision's waves and windows still apply."""
    return None if rollout is None else replace(rollout, pause=False, pinned=None)


def rollout_hold(
    *,
    cell: str,
    head_sha: str,
    revision: str,
    applied: Rollout | None,
    head: Rollout | None,
    fleet: FleetReports | None,
    soaking: Soaking,
    now: float,
    emergency: bool,
    trailer: str,
) -> tuple[Problem | None, Soaking]:
    """May this cell apply the head (`revision`, as cells report it) now?  None, or the
    Hold that says why not; and what it has seen of the other cells' soak, for the next cycle.

    `applied`/`head` are the Rollouts of the applied revision and of the head; `fleet` the
    other cells' reports read this cycle (None when they were not read: then the waves
    hold whenever some wave comes before this cell); `now` this agent's clock (seconds).
    A pause comes first, then the windows, then a halt, then waiting for a wave.
    """
    held: Problem | None = None
    if wants_fleet(cell, applied, head):
        if fleet is None or fleet.error is not None:
            why = fleet.error if fleet is not None else "not read this cycle"
            held = Problem(
                WAITING_FOR_WAVE,
                f"{revision} waits: the status branches of earlier waves cannot be read ({why})",
            )
        else:
            held, soaking = _waves(cell, revision, applied, head, fleet, soaking, now)
    return (
        _pause(head, head_sha, revision)
        or _windows((applied, head), now, revision, emergency, trailer)
        or held
    ), soaking
