"""Five-field cron expressions and the change windows built on them, in UTC, without a clock.

A change window (`kind: Rollout`, `windows:`) opens at every minute its schedule matches and
stays open for its duration, as Argo CD's sync windows do.  The matcher is small and ours:
the fields are `minute hour day-of-month month day-of-week`, each a `*`, a number, a range
`a-b`, a step `*/n` or `a-b/n` or `a/n`, or a comma list of those; months and weekdays may be
named (`jan`..`dec`, `sun`..`sat`, any case), and weekday 7 is Sunday as well as 0.  When both
day fields are restricted a day matches if either does (Vixie cron's rule, which Argo CD's
cron library follows); when one is `*` only the other decides.

Times are seconds since the epoch, in UTC: the core reads no clock and no time zone database,
so the calendar is computed here (`civil`), and the same window means the same minutes on
every cell whatever its local zone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MONTHS: Final = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS: Final = (
    # name, lowest, highest, names (value of the first name = lowest)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day-of-week", 0, 7, WEEKDAYS),
)
MAX_WINDOW_MINUTES: Final = 31 * 24 * 60
"""The longest window (31 days): how far back `window_open` looks for the minute it opened."""


class CronError(ValueError):
    """The expression is not a five-field cron schedule; the message names the field."""


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed schedule: the set of values each field matches."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0-6, Sunday 0 (a 7 in the text is folded into 0)."""
    any_day: bool
    """The day-of-month field was `*` (or a step over all of it)."""
    any_weekday: bool

    def matches(self, t: float) -> bool:
        """Does the minute holding `t` (UTC) match the schedule?"""
        minute = int(t // 60)
        return self._matches_minute(minute)

    def _matches_minute(self, minute: int) -> bool:
        if minute % 60 not in self.minutes or (minute // 60) % 24 not in self.hours:
            return False
        return self._matches_day(minute // 1440)

    def _matches_day(self, days: int) -> bool:
        """Does the day `days` after 1970-01-01 match the month, day and weekday fields?"""
        _year, month, day = civil(days)
        if month not in self.months:
            return False
        weekday = (days + 4) % 7  # 1970-01-01 was a Thursday
        day_ok, weekday_ok = day in self.days, weekday in self.weekdays
        if self.any_day or self.any_weekday:
            return day_ok and weekday_ok
        return day_ok or weekday_ok

    def last_match(self, t: float, within_minutes: int) -> int | None:
        """The latest matching minute (epoch minutes) at or before `t`, looking back at most
        `within_minutes` minutes; None when there is none that recent.

        Walked day by day, and within a matching day through the schedule's own hours and
        minutes, latest first: a policy author's windows (up to 100, of up to 31 days) cost
        each agent one check per day looked back, not one per minute."""
        now = int(t // 60)
        earliest = now - within_minutes
        times = sorted((h * 60 + m for h in self.hours for m in self.minutes), reverse=True)
        day = now // 1440
        while (day + 1) * 1440 > earliest:
            if self._matches_day(day):
                for at in times:
                    minute = day * 1440 + at
                    if minute > now:
                        continue
                    if minute >= earliest:
                        return minute
                    break
            day -= 1
        return None


def civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of the day `days` after 1970-01-01, in the proleptic Gregorian
    calendar (H. Hinnant's civil_from_days, written from its description)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def _value(text: str, lo: int, hi: int, names: tuple[str, ...], field: str) -> int:
    low = text.lower()
    if low in names:
        return lo + names.index(low)
    if not text.isascii() or not text.isdigit():
        raise CronError(f"{field}: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(text)
    if not lo <= value <= hi:
        raise CronError(f"{field}: {value} is outside {lo}-{hi}")
    return value


def _field(text: str, lo: int, hi: int, names: tuple[str, ...], field: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty list entry in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isascii() or not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field}: step {step_text!r} must be a number of at least 1")
            step = int(step_text)
        if base == "*":
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, lo, hi, names, field), _value(b, lo, hi, names, field)
            if first > last:
                raise CronError(f"{field}: range {base!r} runs backwards")
        else:
            first = _value(base, lo, hi, names, field)
            last = hi if slash else first  # `5/15`: from 5 on, every 15
        out.update(range(first, last + 1, step))
    return frozenset(out)


def parse_cron(text: str) -> Cron:
    """A five-field schedule; CronError naming the field that is wrong."""
    parts = text.split()
    if len(parts) != 5:
        raise CronError(
            f"{text!r} has {len(parts)} fields; a schedule has 5: "
            "minute hour day-of-month month day-of-week"
        )
    sets = [
        _field(part, lo, hi, names, name)
        for part, (name, lo, hi, names) in zip(parts, _FIELDS, strict=True)
    ]
    weekdays = frozenset(d % 7 for d in sets[4])
    cron = Cron(
        " ".join(parts),
        sets[0],
        sets[1],
        sets[2],
        sets[3],
        weekdays,
        any_day=parts[2] in _STAR,
        any_weekday=parts[4] in _STAR,
    )
    if not _can_match(cron):
        raise CronError(f"{text!r} never matches (no month has such a day)")
    return cron


_STAR: Final = ("*", "*/1")
"""A day field written so (not `*/2`: a step restricts it) leaves the day to the other field,
as in Argo CD's cron library."""
_MONTH_DAYS: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _can_match(cron: Cron) -> bool:
    """A window that never opens would hold every change forever (`0 0 30 feb *`)."""
    if not cron.any_weekday and not cron.any_day:
        return True  # either day field suffices, and every weekday comes round
    if not cron.any_day:
        return any(d <= _MONTH_DAYS[m - 1] for m in cron.months for d in cron.days)
    return True


@dataclass(frozen=True, slots=True)
class Window:
    """A change window: open for `duration` seconds from every minute `cron` matches."""

    cron: Cron
    duration: float
    kind: str
    """`allow` or `deny`."""

    def open_since(self, t: float) -> float | None:
        """When the occurrence of the window that holds `t` opened (seconds), or None when
        the window is closed at `t`."""
        # Every occurrence lasts as long, so the latest one that started is the one that
        # ends last: only it need be looked at.
        minute = self.cron.last_match(t, min(MAX_WINDOW_MINUTES, int(self.duration // 60) + 1))
        if minute is not None and minute * 60.0 <= t < minute * 60.0 + self.duration:
            return minute * 60.0
        return None


def window_state(windows: tuple[Window, ...], t: float) -> tuple[bool, Window | None]:
    """(changes allowed at `t`, the window that decides it), Argo CD's rules: no window at
    all allows; an open deny window denies (deny wins over allow); otherwise, when any allow
    window exists, only an open one allows.  The window returned is the open deny window,
    or the open allow window, or None (no window, or none of the allow windows open)."""
    opened = [w for w in windows if w.open_since(t) is not None]
    deny = next((w for w in opened if w.kind == "deny"), None)
    if deny is not None:
        return False, deny
    allow = next((w for w in opened if w.kind == "allow"), None)
    if allow is not None:
        return True, allow
    return not any(w.kind == "allow" for w in windows), None


_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """`90s`, `10m`, `2h`, `1d`, combined as `1h30m`, or a bare number of seconds -> seconds.

    ValueError saying what is expected; a policy document's durations (a wave's soak, a
    window's length) are read here, so they are spelt as the agent's own settings are.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 10m or 2h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        seconds, number = 0.0, ""
        for ch in text:
            if ch.isascii() and (ch.isdigit() or ch == "."):
                number += ch
            elif ch in _UNITS and number and number.count(".") <= 1 and number != ".":
                seconds += float(number) * _UNITS[ch]
                number = ""
            else:
                raise ValueError(f"expected a duration such as 30s, 10m or 2h, got {value!r}")
        if number:  # a trailing bare number is seconds only when it is all there is
            if number != text or number.count(".") > 1 or number == ".":
                raise ValueError(f"expected a duration such as 30s, 10m or 2h, got {value!r}")
            seconds = float(number)
        if not text:
            raise ValueError("expected a duration such as 30s, 10m or 2h, got ''")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds
