"""Waves, halts, pause and change windows as tables (`reconciler.agent.rollout`, pure).

Each row is a cell, the Rollouts of its applied revision and of the head, what the other
cells' status branches say, and this agent's clock -> may the head be applied, and if not,
which reason the cell reports (Ready stays True: it enforces its applied revision).
"""

from __future__ import annotations

import calendar
from dataclasses import replace
from datetime import datetime

import pytest

from reconciler.agent.conditions import (
    FALSE,
    OUTSIDE_CHANGE_WINDOW,
    READY,
    RECONCILING,
    ROLLOUT_HALTED,
    ROLLOUT_HOLDS,
    ROLLOUT_PAUSED,
    TRUE,
    WAITING_FOR_WAVE,
)
from reconciler.agent.core import condition
from reconciler.agent.cycle import INVENTORY, Observation, Target, decide, settle
from reconciler.agent.rollout import (
    CellReport,
    FleetReports,
    Soaking,
    place,
    rollout_hold,
    wants_fleet,
)
from reconciler.agent.state import AgentState, from_persisted, to_persisted
from reconciler.core.cron import Window, parse_cron
from reconciler.core.model import ChangeWindow, Rollout, Wave
from tests.test_agent_cycle import (
    APPLIED,
    APPLIED_SHA,
    BEFORE,
    CFG,
    HEAD_SHA,
    OLD,
    _facts,
    _obs,
    _policy,
    compile_plan,
)

REV = CFG.revision(HEAD_SHA)
NOTHING_SEEN = Soaking()
OLD_REV = CFG.revision(APPLIED_SHA)
T0 = float(calendar.timegm(datetime(2026, 12, 7, 12, 0).timetuple()))  # a Monday, noon UTC

WAVES = Rollout(
    "fleet",
    waves=(Wave("canary", ("canary-*",), 60.0), Wave("half", ("cell-[0-4]",), 300.0)),
)
# cell-7 is in no wave: the implicit last one.


def ready_on(cell: str, rev: str = REV) -> CellReport:
    return CellReport(cell, applied=rev, observed=rev, ready=TRUE, reason="ReconciliationSucceeded")


def waiting(cell: str) -> CellReport:
    return CellReport(cell, applied=OLD_REV, observed=REV, ready=TRUE, reason=WAITING_FOR_WAVE)


def refused(cell: str) -> CellReport:
    return CellReport(
        cell, applied=OLD_REV, observed=REV, refused=REV, ready=FALSE, reason="UnsignedCommit"
    )


def hold(
    cell: str,
    fleet: tuple[CellReport, ...] | None,
    *,
    applied: Rollout | None = WAVES,
    head: Rollout | None = WAVES,
    soaking: Soaking = NOTHING_SEEN,
    now: float = T0,
    emergency: bool = False,
):  # type: ignore[no-untyped-def]
    return rollout_hold(
        cell=cell,
        head_sha=HEAD_SHA,
        revision=REV,
        applied=applied,
        head=head,
        fleet=None if fleet is None else FleetReports(fleet),
        soaking=soaking,
        now=now,
        emergency=emergency,
        trailer="Asgctl-Emergency",
    )


SOAKED = Soaking(REV, (("canary-1", T0 - 60), ("canary-2", T0 - 3600)))


@pytest.mark.parametrize(
    ("cell", "fleet", "soaking", "reason", "names"),
    [
        # The first wave never waits, and never reads the other cells.
        ("canary-1", None, Soaking(), None, ()),
        # A later wave waits while an earlier cell has not applied the revision...
        (
            "cell-1",
            (ready_on("canary-1"), waiting("canary-2")),
            SOAKED,
            WAITING_FOR_WAVE,
            ("canary-2", "wave 'canary'", "not yet applied"),
        ),
        # ...or has, but not for the soak time (first seen Ready now: 0 s of 60 s)...
        (
            "cell-1",
            (ready_on("canary-1"), ready_on("canary-2")),
            Soaking(),
            WAITING_FOR_WAVE,
            ("canary-1", "Ready, its 60s soak ends 2026-12-07T12:01:00Z"),
        ),
        # ...and goes once every earlier cell has held it Ready for the soak.
        ("cell-1", (ready_on("canary-1"), ready_on("canary-2")), SOAKED, None, ()),
        # A cell of an earlier wave that refused the revision halts everything after it.
        (
            "cell-1",
            (ready_on("canary-1"), refused("canary-2")),
            SOAKED,
            ROLLOUT_HALTED,
            ("halted", "canary-2", "UnsignedCommit"),
        ),
        (
            "cell-7",
            (ready_on("canary-1"), refused("canary-2"), ready_on("cell-1")),
            SOAKED,
            ROLLOUT_HALTED,
            ("canary-2",),
        ),
        # The implicit last wave waits for wave 'half' too (and its longer soak).
        (
            "cell-7",
            (ready_on("canary-1"), ready_on("canary-2"), ready_on("cell-1")),
            SOAKED,
            WAITING_FOR_WAVE,
            ("wave 'half'", "cell-1", "its 300s soak ends"),
        ),
        # Cells of the same wave do not wait for each other.
        (
            "cell-1",
            (ready_on("canary-1"), ready_on("canary-2"), waiting("cell-2")),
            SOAKED,
            None,
            (),
        ),
        # A status branch that cannot be read is not Ready: its wave is not done.
        (
            "cell-1",
            (
                CellReport("canary-1", error="status.yaml: 9 MB, over the limit"),
                ready_on("canary-2"),
            ),
            SOAKED,
            WAITING_FOR_WAVE,
            ("unreadable",),
        ),
        # Not read at all (the fetch failed): wait, never guess.
        ("cell-1", None, SOAKED, WAITING_FOR_WAVE, ("cannot be read",)),
        # An empty earlier wave has nothing to wait for.
        ("cell-1", (), Soaking(), None, ()),
    ],
    ids=[
        "first-wave",
        "earlier-not-applied",
        "soaking",
        "soaked",
        "halted",
        "halt-reaches-last",
        "last-waits-for-half",
        "same-wave",
        "unreadable",
        "unread",
        "empty-wave",
    ],
)
def test_a_cell_takes_the_revision_only_after_the_waves_before_it(
    cell: str,
    fleet: tuple[CellReport, ...] | None,
    soaking: Soaking,
    reason: str | None,
    names: tuple[str, ...],
) -> None:
    held, _after = hold(cell, fleet, soaking=soaking)
    if reason is None:
        assert held is None
        return
    assert held is not None and held.reason == reason, held
    for text in (REV, *names):
        assert text in held.message, held.message


def test_the_soak_is_measured_on_the_readers_clock_from_when_it_first_saw_ready() -> None:
    fleet = (ready_on("canary-1"), ready_on("canary-2"))
    held, seen = hold("cell-1", fleet)
    assert held is not None and seen == Soaking(REV, (("canary-1", T0), ("canary-2", T0)))
    held, seen2 = hold("cell-1", fleet, soaking=seen, now=T0 + 59)
    assert held is not None and held.message == hold("cell-1", fleet, soaking=seen)[0].message
    assert "soak ends 2026-12-07T12:01:00Z" in held.message and seen2 == seen
    held, _ = hold("cell-1", fleet, soaking=seen, now=T0 + 60)
    assert held is None
    # A cell seen not Ready in between starts its soak again.
    _, reset = hold(
        "cell-1", (ready_on("canary-1"), waiting("canary-2")), soaking=seen, now=T0 + 30
    )
    assert reset == Soaking(REV, (("canary-1", T0),))
    held, _ = hold("cell-1", fleet, soaking=reset, now=T0 + 60)
    assert held is not None and "canary-2" in held.message
    # What was seen of another revision does not count for this one.
    other = Soaking(CFG.revision("c" * 40), (("canary-1", T0 - 999), ("canary-2", T0 - 999)))
    held, _ = hold("cell-1", fleet, soaking=other, now=T0)
    assert held is not None and "soak ends 2026-12-07T12:01:00Z" in held.message
    # A clock that went back does not make a soak longer than it was.
    _, back = hold("cell-1", fleet, soaking=seen, now=T0 - 3600)
    assert back.since == (("canary-1", T0 - 3600), ("canary-2", T0 - 3600))


def test_soaking_survives_a_restart_and_bad_state_reads_as_nothing_seen() -> None:
    st = replace(BEFORE, soaking=SOAKED)
    assert from_persisted(to_persisted(st)).soaking == SOAKED
    data = to_persisted(st)
    for bad in (None, "x", {"revision": 1}, {"revision": REV, "since": [["a", "1"], [1, 2]]}):
        data["rolloutSoaking"] = bad
        assert from_persisted(data).soaking.since == ()


# -- which Rollout governs: the applied revision's brakes hold a head that removes them -------


def test_a_head_that_deletes_the_waves_still_waits_for_the_applied_revisions_waves() -> None:
    """The attack: a PR drops the Rollout (or empties its waves) with its change, hoping to
    reach every cell at once.  Wave 2 still waits for wave 1 to hold it Ready and soaked."""
    fleet = (waiting("canary-1"), waiting("canary-2"))
    for head in (None, Rollout("fleet"), replace(WAVES, waves=(Wave("all", ("*",), 0.0),))):
        held, _ = hold("cell-1", fleet, head=head)
        assert held is not None and held.reason == WAITING_FOR_WAVE, head
        assert "wave 'canary'" in held.message
    # Reordering the waves cannot put wave 2 first either.
    swapped = replace(WAVES, waves=(WAVES.waves[1], WAVES.waves[0]))
    held, _ = hold("cell-1", fleet, head=swapped)
    assert held is not None and "wave 'canary'" in held.message


def test_a_head_can_add_a_wave_that_acts_at_once() -> None:
    fleet = (waiting("canary-1"),)
    assert hold("cell-1", fleet, applied=None)[0] is not None
    held, _ = hold("cell-1", fleet, applied=Rollout("none-yet"), head=WAVES)
    assert held is not None and held.reason == WAITING_FOR_WAVE


def test_the_order_is_a_pair_so_no_two_cells_wait_for_each_other() -> None:
    a = Rollout("a", waves=(Wave("x-first", ("x",), 0.0),))
    h = Rollout("h", waves=(Wave("y-first", ("y",), 0.0),))
    assert place(a, h, "x") == (0, 1) and place(a, h, "y") == (1, 0)
    assert place(a, h, "x") < place(a, h, "y")  # x goes first; y waits for x; never both
    assert not wants_fleet("x", None, None) and wants_fleet("y", a, h)


# -- pause ------------------------------------------------------------------------------------


def test_a_head_that_pauses_holds_every_cell_even_the_first_wave() -> None:
    paused = replace(WAVES, pause=True)
    for cell in ("canary-1", "cell-1", "cell-7"):
        held, _ = hold(cell, (ready_on("canary-1"),), head=paused, soaking=SOAKED)
        assert held is not None and held.reason == ROLLOUT_PAUSED and REV in held.message


def test_a_pin_holds_every_other_revision_and_names_the_pinned_one() -> None:
    pinned = replace(WAVES, pause=True, pinned="d" * 40)
    held, _ = hold("canary-1", None, head=pinned)
    assert (
        held is not None
        and held.reason == ROLLOUT_PAUSED
        and "pinned to dddddddddddd" in (held.message)
    )
    assert hold("canary-1", None, head=replace(pinned, pinned=HEAD_SHA))[0] is None


def test_a_pause_in_the_applied_revision_does_not_hold_the_head_that_lifts_it() -> None:
    """Else a paused fleet could never be unpaused by a commit (every head would wait)."""
    assert hold("canary-1", None, applied=replace(WAVES, pause=True), head=WAVES)[0] is None


# -- change windows (Argo CD's sync windows) -------------------------------------------------


def _window(expr: str, duration: float, kind: str) -> ChangeWindow:
    return ChangeWindow(Window(parse_cron(expr), duration, kind), "payments freeze")


NIGHTS = Rollout("w", windows=(_window("0 22 * * *", 7200, "allow"),))
FREEZE = Rollout("w", windows=(_window("0 9 * * mon", 8 * 3600, "deny"),))  # Mon 09-17


@pytest.mark.parametrize(
    ("applied", "head", "now", "emergency", "reason"),
    [
        (None, None, T0, False, None),
        (NIGHTS, None, T0, False, OUTSIDE_CHANGE_WINDOW),  # noon: no allow window open
        (NIGHTS, None, T0 + 10.5 * 3600, False, None),  # 22:30
        (None, NIGHTS, T0, False, OUTSIDE_CHANGE_WINDOW),  # a head's window acts at once
        (FREEZE, None, T0, False, OUTSIDE_CHANGE_WINDOW),
        (None, FREEZE, T0, False, OUTSIDE_CHANGE_WINDOW),
        (FREEZE, None, T0 + 6 * 3600, False, None),  # 18:00: the freeze is over
        (FREEZE, None, T0, True, None),  # the emergency trailer overrides a deny window
        (NIGHTS, None, T0, True, None),  # ...and being outside every allow window
        # Deny wins over allow: an allow window open during the freeze does not open it.
        (
            Rollout("w", windows=(*FREEZE.windows, _window("0 11 * * *", 7200, "allow"))),
            None,
            T0,
            False,
            OUTSIDE_CHANGE_WINDOW,
        ),
    ],
    ids=[
        "no-windows",
        "outside-allow",
        "inside-allow",
        "head-window",
        "applied-deny",
        "head-deny",
        "after-deny",
        "emergency-deny",
        "emergency-allow",
        "deny-wins",
    ],
)
def test_change_windows(
    applied: Rollout | None, head: Rollout | None, now: float, emergency: bool, reason: str | None
) -> None:
    held, _ = hold("canary-1", None, applied=applied, head=head, now=now, emergency=emergency)
    assert (held.reason if held else None) == reason, held
    if held is not None:
        assert REV in held.message and "Asgctl-Emergency: true" in held.message


def test_the_emergency_trailer_never_skips_a_pause_or_a_wave() -> None:
    held, _ = hold("canary-1", None, head=replace(WAVES, pause=True), emergency=True)
    assert held is not None and held.reason == ROLLOUT_PAUSED
    held, _ = hold("cell-1", (waiting("canary-1"),), emergency=True)
    assert held is not None and held.reason == WAITING_FOR_WAVE


# -- in the cycle: held heads, the applied revision still enforced, Ready=True ----------------

WITH_WAVES = replace(OLD, rollout=WAVES)
APPLIED_WAVES = replace(APPLIED, policy=WITH_WAVES)
NEW = replace(_policy(1, 2, 3, 4, 5), rollout=WAVES)


def _cycle_obs(fleet: tuple[CellReport, ...] | None, **kw) -> Observation:  # type: ignore[no-untyped-def]
    obs = _obs(_facts(NEW), applied=APPLIED_WAVES, **kw)
    return replace(obs, fleet=None if fleet is None else FleetReports(fleet), at=T0)


def test_a_held_head_leaves_the_applied_revision_enforced_and_ready() -> None:
    cfg = replace(CFG, cell="cell-1")
    before = replace(BEFORE, applied=APPLIED_WAVES)
    d = decide(before, _cycle_obs((waiting("canary-1"),)), cfg, compile_plan)
    assert d.hold is not None and d.hold.reason == WAITING_FOR_WAVE
    assert d.state.head is not None and d.state.head.verdict is None  # valid, not refused
    assert d.target == Target(APPLIED_SHA, WITH_WAVES)
    assert d.converge is not None  # new containers and drift: still converged
    out = settle(d, None, cfg, applied_at="t1", elapsed=0.1)
    ready = condition(out.state.conditions, READY)
    assert ready is not None and (ready.status, ready.reason) == (TRUE, WAITING_FOR_WAVE)
    assert "canary-1" in ready.message and REV in ready.message and OLD_REV in ready.message
    rec = condition(out.state.conditions, RECONCILING)
    assert rec is not None and rec.status == TRUE and rec.reason == WAITING_FOR_WAVE
    assert WAITING_FOR_WAVE in ROLLOUT_HOLDS

    # An inventory cycle reads no status branch: the sync's verdict stands.
    inv = replace(_cycle_obs(None), trigger=INVENTORY, head=None)
    again = decide(out.state, inv, cfg, compile_plan)
    assert again.hold == d.hold and again.target == Target(APPLIED_SHA, WITH_WAVES)

    # The next sync sees wave 1 Ready and soaked: the head is applied.
    soaked = replace(out.state, soaking=Soaking(REV, (("canary-1", T0 - 60),)))
    go = decide(soaked, replace(_cycle_obs((ready_on("canary-1"),)), head=None), cfg, compile_plan)
    assert go.hold is None and go.target is not None and go.target.sha == HEAD_SHA
    assert go.state.hold is None


def test_a_cell_with_nothing_applied_takes_the_head_at_once() -> None:
    cfg = replace(CFG, cell="cell-7")
    obs = replace(_cycle_obs((waiting("canary-1"),)), applied=None)
    d = decide(AgentState(inventory=BEFORE.inventory), obs, cfg, compile_plan)
    assert d.hold is None and d.target is not None and d.target.sha == HEAD_SHA


def test_the_emergency_trailer_is_read_from_the_head_commit() -> None:
    cfg = replace(CFG, cell="canary-1")
    freeze_new = replace(NEW, rollout=FREEZE)
    for message, reason in (
        ("fix", OUTSIDE_CHANGE_WINDOW),
        ("fix\n\nAsgctl-Emergency: true", None),
    ):
        obs = replace(_obs(_facts(freeze_new, message=message), applied=APPLIED_WAVES), at=T0)
        d = decide(replace(BEFORE, applied=APPLIED_WAVES), obs, cfg, compile_plan)
        assert (d.hold.reason if d.hold else None) == reason


# -- a pin: cells converge to the pinned revision and stay there -----------------------------

PIN_SHA = "d" * 40
PINNED = _policy(1, 2, 3, 4, 6)
PINNING = replace(NEW, rollout=replace(WAVES, pause=True, pinned=PIN_SHA))


def _pin_obs(pinned_facts, fleet=None):  # type: ignore[no-untyped-def]
    obs = _obs(_facts(PINNING), applied=APPLIED_WAVES)
    return replace(
        obs, pinned=pinned_facts, fleet=None if fleet is None else FleetReports(fleet), at=T0
    )


def test_a_head_pinning_another_revision_moves_the_cell_to_that_revision() -> None:
    cfg = replace(CFG, cell="canary-1")
    facts = replace(_facts(PINNED), sha=PIN_SHA)
    d = decide(replace(BEFORE, applied=APPLIED_WAVES), _pin_obs(facts), cfg, compile_plan)
    assert d.hold is None and d.target == Target(PIN_SHA, PINNED)
    assert d.state.head is not None and d.state.head.sha == HEAD_SHA  # observed: the head
    assert d.state.pinned is not None and d.state.pinned.sha == PIN_SHA

    # Once there, it stays: the head's pause holds it on the pinned revision.
    on_pin = replace(APPLIED_WAVES, sha=PIN_SHA, policy=PINNED)
    after = replace(d.state, applied=on_pin)
    d2 = decide(after, replace(_obs(None, applied=on_pin), at=T0), cfg, compile_plan)
    assert d2.hold is not None and d2.hold.reason == ROLLOUT_PAUSED
    assert d2.target is not None and d2.target.sha == PIN_SHA


def test_a_pinned_revision_meets_the_waves_like_any_other() -> None:
    cfg = replace(CFG, cell="cell-1")
    facts = replace(_facts(PINNED), sha=PIN_SHA)
    obs = _pin_obs(facts, (waiting("canary-1"),))
    d = decide(replace(BEFORE, applied=APPLIED_WAVES), obs, cfg, compile_plan)
    assert d.hold is not None and d.hold.reason == WAITING_FOR_WAVE
    assert CFG.revision(PIN_SHA) in d.hold.message
    assert d.target == Target(APPLIED_SHA, WITH_WAVES)


@pytest.mark.parametrize(
    ("facts", "words"),
    [
        (None, "not in the history fetched"),
        (replace(_facts(PINNED, descends=False), sha=PIN_SHA), "HistoryRewritten"),
    ],
    ids=["missing", "refused"],
)
def test_a_pinned_revision_that_cannot_be_applied_keeps_the_cell_where_it_is(
    facts, words: str
) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(CFG, cell="canary-1")
    d = decide(replace(BEFORE, applied=APPLIED_WAVES), _pin_obs(facts), cfg, compile_plan)
    assert d.hold is not None and d.hold.reason == ROLLOUT_PAUSED and words in d.hold.message
    assert d.target == Target(APPLIED_SHA, WITH_WAVES)


def test_what_was_seen_of_a_soak_is_dropped_once_nothing_is_pending() -> None:
    cfg = replace(CFG, cell="cell-1")
    st = replace(BEFORE, applied=APPLIED_WAVES, soaking=SOAKED)
    head_is_applied = replace(_facts(WITH_WAVES), sha=APPLIED_SHA)
    obs = replace(_obs(head_is_applied, applied=APPLIED_WAVES), at=T0)
    d = decide(st, obs, cfg, compile_plan)
    assert d.hold is None and d.state.soaking == Soaking()
