"""The change windows' cron matcher (`reconciler.core.cron`): five fields, UTC, Argo CD's rules.

Argo CD's sync windows (argo-cd docs, user-guide/sync_windows.md): "If there are any allow
windows ... syncs will only be allowed when there is an active allow window"; "If there is
an active matching allow and an active matching deny then syncs will be denied as deny
windows override allow windows"; no window at all allows everything.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.cron import (
    CronError,
    Window,
    civil,
    parse_cron,
    parse_duration,
    window_state,
)


def at(text: str) -> float:
    """`2026-12-07 22:30` (UTC) -> seconds since the epoch."""
    return float(calendar.timegm(datetime.strptime(text, "%Y-%m-%d %H:%M").timetuple()))


@pytest.mark.parametrize(
    ("expr", "field", "values"),
    [
        ("* * * * *", "minutes", set(range(60))),
        ("5 * * * *", "minutes", {5}),
        ("1-4 * * * *", "minutes", {1, 2, 3, 4}),
        ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
        ("10-30/10 * * * *", "minutes", {10, 20, 30}),
        ("50/5 * * * *", "minutes", {50, 55}),
        ("1,2,40-42 * * * *", "minutes", {1, 2, 40, 41, 42}),
        ("0 */6 * * *", "hours", {0, 6, 12, 18}),
        ("0 0 1,15 * *", "days", {1, 15}),
        ("0 0 * jan,MAR-may *", "months", {1, 3, 4, 5}),
        ("0 0 * * mon-fri", "weekdays", {1, 2, 3, 4, 5}),
        ("0 0 * * 7", "weekdays", {0}),  # 7 is Sunday too
        ("0 0 * * Sun,sat", "weekdays", {0, 6}),
    ],
)
def test_each_field_form_expands_to_its_values(expr: str, field: str, values: set[int]) -> None:
    assert set(getattr(parse_cron(expr), field)) == values


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "has 4 fields"),
        ("* * * * * *", "has 6 fields"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("* 24 * * *", "hour: 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month: 0 is outside 1-31"),
        ("* * * 13 *", "month: 13 is outside 1-12"),
        ("* * * * 8", "day-of-week: 8 is outside 0-7"),
        ("5-1 * * * *", "runs backwards"),
        ("*/0 * * * *", "step '0'"),
        ("1,,2 * * * *", "empty list entry"),
        ("x * * * *", "'x' is not a number"),
        ("* * * foo *", "'foo' is not a number or a name"),
        ("* * * * mon-funday", "'funday' is not a number or a name"),
        ("０ * * * *", "is not a number"),  # a full-width digit: isdigit() says yes, we say no
        ("0 0 30 feb *", "never matches"),
        ("0 0 31 apr,jun *", "never matches"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_field(expr: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        parse_cron(expr)


@pytest.mark.parametrize(
    ("expr", "when", "matches"),
    [
        ("0 22 * * *", "2026-12-07 22:00", True),
        ("0 22 * * *", "2026-12-07 22:01", False),
        ("0 22 * * mon-fri", "2026-12-07 22:00", True),  # a Monday
        ("0 22 * * mon-fri", "2026-12-06 22:00", False),  # a Sunday
        # Both day fields restricted: either matches (the 13th, or any Friday).
        ("0 0 13 * fri", "2026-11-13 00:00", True),  # Friday the 13th
        ("0 0 13 * fri", "2026-12-13 00:00", True),  # the 13th, a Sunday
        ("0 0 13 * fri", "2026-12-11 00:00", True),  # a Friday, the 11th
        ("0 0 13 * fri", "2026-12-12 00:00", False),
        # One day field `*`: only the other decides.
        ("0 0 13 * *", "2026-12-11 00:00", False),
        ("0 0 * * fri", "2026-12-13 00:00", False),
        # A step restricts the field (Argo CD's cron library): the OR rule applies.
        ("0 0 */2 * sun", "2026-12-06 00:00", True),  # the 6th (even day off), a Sunday
        ("0 0 29 2 *", "2028-02-29 00:00", True),
        ("59 23 31 12 *", "2026-12-31 23:59", True),
    ],
)
def test_the_minute_matches_as_cron_says(expr: str, when: str, matches: bool) -> None:
    assert parse_cron(expr).matches(at(when)) is matches


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-719_162, max_value=2_900_000))
def test_the_calendar_agrees_with_the_standard_library(days: int) -> None:
    d = datetime.fromtimestamp(days * 86400, UTC)
    assert civil(days) == (d.year, d.month, d.day)


_FIELD_VALUES = {
    "minute": st.integers(0, 59),
    "hour": st.integers(0, 23),
    "day": st.integers(1, 28),
    "month": st.integers(1, 12),
    "weekday": st.integers(0, 6),
}


@st.composite
def _field(draw: st.DrawFn, values: st.SearchStrategy[int]) -> str:
    kind = draw(st.sampled_from(["*", "n", "range", "step", "list"]))
    if kind == "*":
        return "*"
    a, b = sorted((draw(values), draw(values)))
    if kind == "n":
        return str(a)
    if kind == "range":
        return f"{a}-{b}"
    if kind == "step":
        return f"{a}-{b}/{draw(st.integers(1, 7))}"
    return ",".join(str(v) for v in sorted({a, b}))


def _reference(expr: str, t: float) -> bool:
    """What the schedule means, read off datetime's calendar with plain loops."""
    d = datetime.fromtimestamp(t, UTC)
    parts = expr.split()

    def hit(part: str, value: int) -> bool:
        for item in part.split(","):
            base, _, step = item.partition("/")
            lo, hi = (0, 99) if base == "*" else map(int, (base.split("-") * 2)[:2])
            if lo <= value <= hi and (value - lo) % int(step or 1) == 0:
                return True
        return False

    weekday = (d.weekday() + 1) % 7
    day_ok, weekday_ok = hit(parts[2], d.day), hit(parts[4], weekday)
    day = day_ok and weekday_ok if "*" in (parts[2], parts[4]) else day_ok or weekday_ok
    return hit(parts[0], d.minute) and hit(parts[1], d.hour) and hit(parts[3], d.month) and day


@settings(max_examples=400, deadline=None)
@given(
    st.tuples(*(_field(v) for v in _FIELD_VALUES.values())),
    st.integers(min_value=0, max_value=4_000_000_000),
)
def test_matching_agrees_with_a_plain_reading_of_the_schedule(
    fields: tuple[str, ...], t: int
) -> None:
    expr = " ".join(fields)
    assert parse_cron(expr).matches(t) == _reference(expr, t), expr


def _w(expr: str, duration: str, kind: str) -> Window:
    return Window(parse_cron(expr), parse_duration(duration), kind)


def test_a_window_is_open_for_its_duration_from_each_match() -> None:
    w = _w("0 22 * * *", "2h", "deny")
    assert w.open_since(at("2026-12-07 21:59")) is None
    assert w.open_since(at("2026-12-07 22:00")) == at("2026-12-07 22:00")
    assert w.open_since(at("2026-12-07 23:59")) == at("2026-12-07 22:00")
    assert w.open_since(at("2026-12-08 00:00")) is None  # [start, start + duration)
    # Across midnight and into a new month, the occurrence that started last decides.
    assert _w("30 23 31 12 *", "1h", "deny").open_since(at("2027-01-01 00:15")) is not None


def test_argo_cd_rules_no_windows_allow_and_deny_wins() -> None:
    night = _w("0 22 * * *", "2h", "allow")
    freeze = _w("0 23 * * *", "30m", "deny")
    t_day, t_night, t_frozen = (
        at("2026-12-07 12:00"),
        at("2026-12-07 22:10"),
        at("2026-12-07 23:10"),
    )
    assert window_state((), t_day) == (True, None)
    assert window_state((night,), t_day) == (False, None)  # an allow window exists: only inside
    assert window_state((night,), t_night) == (True, night)
    assert window_state((night, freeze), t_frozen) == (False, freeze)  # deny wins over allow
    assert window_state((freeze,), t_day) == (True, None)  # only deny windows: open otherwise


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("90", 90), (2, 2)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "1x", "5 m", "1h5", "1.2.3s", True, -1, "nan"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@settings(max_examples=300, deadline=None)
@given(
    minute=st.sampled_from(["*", "0", "*/15", "5,35", "59"]),
    hour=st.sampled_from(["*", "0", "22", "9-17", "*/6"]),
    dom=st.sampled_from(["*", "1", "15", "29", "31", "1-7"]),
    month=st.sampled_from(["*", "2", "12", "1-6"]),
    dow=st.sampled_from(["*", "0", "1-5", "6"]),
    start=st.integers(min_value=0, max_value=3_000_000),
    within=st.integers(min_value=0, max_value=3 * 1440),
)
def test_the_latest_match_is_the_one_a_minute_by_minute_look_back_finds(
    minute: str, hour: str, dom: str, month: str, dow: str, start: int, within: int
) -> None:
    """`last_match` skips days and hours the schedule cannot hold; it must find exactly the
    minute that looking at every minute back from `t` finds (or none)."""
    try:
        cron = parse_cron(f"{minute} {hour} {dom} {month} {dow}")
    except CronError:  # a schedule no month can hold is refused before it is ever asked
        return
    t = start * 60.0 + 30
    expected = next(
        (m for m in range(start, start - within - 1, -1) if cron.matches(m * 60.0)), None
    )
    assert cron.last_match(t, within) == expected
