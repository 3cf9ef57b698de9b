"""`asgctl flows`: read flow records back, filter them, print them.

The file is the agent's, but a reader must not trust it more than any other input: a disk
that filled mid-write leaves half a line, and whoever can write the state directory can put
anything there.  So each line is read with a length limit, parsed as JSON and checked field
by field against the record format (`reconciler.flows.record`); a bad line is reported as
`file:line: field: what is wrong` and skipped, the run exits non-zero, and nothing is ever a
traceback.  Strings from the file reach the terminal only through `escape.visible`.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.escape import visible
from reconciler.flows.record import VERDICTS

MAX_LINE = 64 * 1024
"""A record is a few hundred bytes; a longer line is not one of ours."""
MAX_ERRORS_SHOWN = 20
ROTATED = 2
_RELATIVE = re.compile(r"^(\d+)(s|m|h|d)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_STRINGS = ("cell", "container", "source", "app", "app_id", "space", "space_id", "org", "org_id")


class RecordError(ValueError):
    """A line that is JSON but not a flow record: the message names the field."""


_CHECKED = RecordError


class FlowsError(ValueError):
    """A flows file or an option cannot be used; the message names which and where."""


@dataclass(frozen=True)
class Query:
    app: str | None = None
    since: float | None = None
    verdict: str | None = None
    rule: str | None = None


def parse_time(text: str, now: float) -> float:
    """`--since`: an ISO 8601 time (`2026-12-06T06:00:00Z`, a date alone is midnight UTC) or
    an age (`30m`, `2h`, `7d`) before now."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - int(m.group(1)) * _SECONDS[m.group(2)]
    try:
        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FlowsError(
            f"--since: {text!r} is neither a time (2026-12-06T06:00:00Z) nor an age (2h, 7d)"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def files_of(state_dir: str) -> list[Path]:
    """The agent's flow files under a state directory, oldest first (rotated ones too)."""
    base = Path(state_dir) / "flows" / "flows.jsonl"
    rotated = [base.with_name(f"{base.name}.{i}") for i in range(ROTATED, 0, -1)]
    found = [p for p in (*rotated, base) if p.exists()]
    if not found:
        raise FlowsError(f"{base}: no flow records (is the agent's flow-log nflog?)")
    return found


class BadLines(list[str]):
    """The reader's bad lines: the first `MAX_ERRORS_SHOWN` kept, the rest only counted, so
    a file of a billion bad lines costs no memory."""

    more = 0

    def append(self, line: str) -> None:
        if len(self) < MAX_ERRORS_SHOWN:
            super().append(line)
        else:
            self.more += 1


def regular_file(path: str) -> Path:
    """`--file` must be a regular file: /dev/zero or a pipe never ends, and is no record file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FlowsError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FlowsError(f"{path}: not a regular file")
    return Path(path)


def _time(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def check_record(doc: Any) -> tuple[dict[str, Any], float, float]:
    """A record with the fields a reader relies on checked (ValueError naming the field),
    and its start and end as Unix times."""
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    start = _time(doc.get("time"))
    if start is None:
        raise RecordError("field 'time': expected a UTC time such as 2026-12-06T06:30:10Z")
    end = _time(doc.get("end", doc.get("time")))
    if end is None:
        raise RecordError("field 'end': expected a UTC time such as 2026-12-06T06:30:10Z")
    for name in _STRINGS:
        if not isinstance(doc.get(name, ""), str):
            raise RecordError(f"field {name!r}: expected a string")
    if doc.get("verdict") not in VERDICTS:
        raise RecordError(f"field 'verdict': expected one of {', '.join(VERDICTS)}")
    count = doc.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RecordError("field 'count': expected a whole number >= 1")
    if not isinstance(doc.get("destination"), str) or not doc["destination"]:
        raise RecordError("field 'destination': expected an address")
    port = doc.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise RecordError("field 'port': expected a port number or null")
    if port is not None and not 0 <= port <= 65535:
        raise RecordError("field 'port': expected 0-65535 or null")
    if not isinstance(doc.get("protocol"), str):
        raise RecordError("field 'protocol': expected a string")
    rule = doc.get("rule")
    if rule is not None and not (
        isinstance(rule, dict)
        and isinstance(rule.get("id", ""), str)
        and isinstance(rule.get("group", ""), str)
        and isinstance(rule.get("sources", []), list)
        and all(isinstance(s, str) for s in rule.get("sources", []))
    ):
        raise RecordError("field 'rule': expected {id, group, sources: [strings]}")
    return doc, start, end


def read_records(paths: list[Path], query: Query, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The records of `paths` that match `query`; each bad line appended to `errors`."""
    for _where, doc in read_located(paths, query, errors):
        yield doc


def read_located(
    paths: list[Path], query: Query, errors: list[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`read_records` with each record's `file:line`, for readers (`asgctl suggest`) that
    check more of a record than the format and must say where a bad one is."""
    for path in paths:
        try:
            handle = path.open("rb")
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        with handle:
            number = 0
            while True:
                raw = handle.readline(MAX_LINE + 1)
                if not raw:
                    break
                number += 1
                if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                    errors.append(f"{path}:{number}: line longer than {MAX_LINE} bytes")
                    while raw and not raw.endswith(b"\n"):  # skip the rest of it, bounded
                        raw = handle.readline(MAX_LINE + 1)
                    continue
                if not raw.strip():
                    continue
                try:
                    doc, _start, end = check_record(json.loads(raw))
                except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
                    reason = "not JSON" if not isinstance(exc, _CHECKED) else str(exc)
                    errors.append(f"{path}:{number}: {visible(reason)}")
                    continue
                if _matches(doc, end, query):
                    yield f"{path}:{number}", doc


def _matches(doc: dict[str, Any], end: float, q: Query) -> bool:
    if q.since is not None and end < q.since:
        return False
    if q.verdict is not None and doc["verdict"] != q.verdict:
        return False
    if q.app is not None:
        app = doc.get("app", "")
        if q.app not in (app, doc.get("app_id", ""), app.rsplit("/", 1)[-1]):
            return False
    if q.rule is not None:
        rule = doc.get("rule") or {}
        rid, group = rule.get("id", ""), rule.get("group", "")
        if not q.rule or not (rid.startswith(q.rule) or group.startswith(q.rule)):
            return False
    return True


_COLUMNS = (
    "TIME",
    "CELL",
    "APP",
    "SPACE",
    "CONTAINER",
    "DESTINATION",
    "PORT",
    "PROTO",
    "VERDICT",
    "COUNT",
    "RULE",
)


def _row(doc: dict[str, Any]) -> tuple[str, ...]:
    rule = doc.get("rule") or {}
    where = (rule.get("sources") or [""])[0]
    rule_text = f"{rule.get('id', '')[:16]} {where}".strip() if rule else doc.get("reason", "")
    return (
        visible(doc["time"]),
        visible(doc.get("cell", ""))[:32],
        visible(doc.get("app", "") or doc.get("app_id", "") or "-")[:48],
        visible(doc.get("space", "") or doc.get("space_id", "") or "-")[:40],
        visible(doc.get("container", "") or "-")[:40],
        visible(doc["destination"])[:45],
        "-" if doc.get("port") is None else str(doc["port"]),
        visible(doc["protocol"])[:8],
        doc["verdict"],
        str(doc["count"]),
        visible(rule_text)[:120],
    )


def render(records: list[dict[str, Any]], fmt: str) -> str:
    """JSON lines (each record as read, re-serialised), or a table."""
    if fmt == "json":
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if not records:
        return "no matching flow records\n"
    table = [_COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    return "".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in table
    )
