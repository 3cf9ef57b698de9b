"""One notify run, and the service that repeats it: fetch, compare, send, remember.

Every run fetches all status branches (`reconciler.status.fetch`, the budgets of the status
reader), makes each cell's notice (`events.notice_of`), and sends a notice to a sink only
when its fingerprint differs from the one last delivered there.  What was delivered is kept
in a state file, keyed per cell and per sink and written by rename (`atomicfile`), so a rerun
with nothing new sends nothing, a crash sends again at most what it had not recorded, and a
sink that failed is tried again next run.  The file holds only cells still listed, at most
`max_cells` of them: a flood of status branches cannot make it grow without bound.

A sink that refuses the token or cannot be reached stops being tried for the rest of the
run (the same answer would come for every cell); a notice it rejects for what it says (422:
GitHub does not know the commit) is recorded as delivered so it is not sent every interval.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reconciler.agent.config import redact_url
from reconciler.agent.source import clip
from reconciler.agent.status import iso
from reconciler.atomicfile import atomic_write_text
from reconciler.notify.events import Notice, Skipped, notice_of
from reconciler.notify.http import FATAL, REJECTED, DeliveryError, Retry
from reconciler.notify.sinks import GitHubStatuses, Webhook
from reconciler.status.fetch import FetchError, StatusRepos, read_remote, status_cache
from reconciler.status.read import HEADER

STATE_VERSION = 1
MAX_CELLS = 10_000
Sent = dict[str, dict[str, str]]
"""`{cell: {sink: fingerprint}}`: what was last delivered where."""


@dataclass(frozen=True)
class Settings:
    """What a run reads from and sends to; the sinks are the operator's, never a branch's."""

    source: str
    state_file: Path
    branch: str = "main"
    cache: str | None = None
    github: GitHubStatuses | None = None
    webhook: Webhook | None = None
    max_cells: int = MAX_CELLS
    retry: Retry = field(default_factory=Retry)
    status: StatusRepos | None = None
    """Where the status branches are (`--status-url`); None: the policy repository."""


@dataclass
class Report:
    """What one run did: lines already escaped, and whether anything failed."""

    sent: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def load_sent(path: Path) -> tuple[Sent, str]:
    """The state file's record, and a warning when it could not be used (then: empty)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, ""
    except (OSError, ValueError) as exc:
        return {}, f"{path}: unreadable ({clip(str(exc), 200)}); starting afresh"
    cells = doc.get("cells") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != STATE_VERSION
        or not isinstance(cells, dict)
    ):
        return {}, f"{path}: not a version {STATE_VERSION} notify state; starting afresh"
    sent: Sent = {}
    for cell, sinks in cells.items():
        if isinstance(cell, str) and isinstance(sinks, dict):
            sent[cell] = {k: v for k, v in sinks.items() if isinstance(v, str)}
    return sent, ""


def save_sent(path: Path, sent: Sent) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": STATE_VERSION, "cells": {c: sent[c] for c in sorted(sent)}}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n", mode=0o600, fsync=True)


def read_notices(settings: Settings) -> tuple[list[str], list[Notice], list[Skipped]]:
    """Every listed cell (up to `max_cells`), the notices of those that have one, and the
    branches skipped; FetchError when the remote cannot be read."""
    with status_cache(settings.cache) as repo:
        repos = settings.status or StatusRepos(settings.source)
        got = read_remote(repo, repos, HEADER, limit=settings.max_cells)
    listed = [c.cell for c in got.cells]
    notices: list[Notice] = []
    skipped: list[Skipped] = []
    if got.more:
        skipped.append(Skipped("*", f"{got.more} more status branches past --max-cells"))
    skipped += [Skipped("*", clip(said, 300)) for said in got.skipped]
    for c in got.cells:
        if c.error:
            skipped.append(Skipped(clip(c.cell, 80), clip(c.error, 300)))
            continue
        found = notice_of(c.cell, c.value)
        if isinstance(found, Notice):
            notices.append(found)
        elif isinstance(found, Skipped):
            skipped.append(found)
    return listed, notices, skipped


def notify_once(
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Report:
    """One run (see the module docstring)."""
    report = Report()
    sent, warning = load_sent(settings.state_file)
    if warning:
        report.skipped.append(warning)
    try:
        listed, notices, skipped = read_notices(settings)
    except (FetchError, OSError) as exc:
        report.failed.append(f"{redact_url(settings.source)}: {clip(str(exc), 500)}")
        return report
    report.skipped.extend(f"{s.cell}: {s.why}" for s in skipped)
    kept = set(listed)
    sent = {cell: sinks for cell, sinks in sent.items() if cell in kept}
    dead: dict[str, str] = {}
    source = redact_url(settings.source)
    now = iso(clock())
    try:
        for notice in notices:
            for sink in ("github", "webhook"):
                if (sink == "github" and settings.github is None) or (
                    sink == "webhook" and settings.webhook is None
                ):
                    continue
                record = sent.setdefault(notice.cell, {})
                if record.get(sink) == notice.fingerprint:
                    report.unchanged += 1
                    continue
                if sink in dead:
                    continue
                what = f"{sink} {notice.context} {notice.state} {notice.sha[:12]} {notice.reason}"
                try:
                    if sink == "github" and settings.github is not None:
                        settings.github.send(notice, retry=settings.retry, sleep=sleep, clock=clock)
                    elif settings.webhook is not None:
                        settings.webhook.send(
                            notice,
                            source=source,
                            branch=settings.branch,
                            now=now,
                            retry=settings.retry,
                            sleep=sleep,
                            clock=clock,
                        )
                except DeliveryError as exc:
                    if exc.kind == REJECTED:
                        record[sink] = notice.fingerprint
                        report.skipped.append(f"{what}: rejected: {exc}")
                        continue
                    report.failed.append(f"{what}: {exc}")
                    if exc.kind == FATAL:
                        dead[sink] = str(exc)
                    continue
                record[sink] = notice.fingerprint
                report.sent.append(what)
    finally:
        save_sent(settings.state_file, {c: s for c, s in sent.items() if s})
    return report


def report_lines(report: Report) -> list[str]:
    """The run as log lines (the caller escapes them for its log, e.g. `escape.log_text`)."""
    lines = [f"sent {line}" for line in report.sent]
    lines += [f"skipped {line}" for line in report.skipped]
    lines += [f"failed {line}" for line in report.failed]
    lines.append(
        f"notify: {len(report.sent)} sent, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped, {len(report.failed)} failed"
    )
    return lines


def watch(
    settings: Settings,
    interval: float,
    stop: threading.Event,
    emit: Callable[[str], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run every `interval` seconds until `stop` is set: a cell that fails to apply is
    reported within one interval of its agent pushing the status.  A failed run (a sink down,
    the token refused) is logged and tried again next interval, never the end of the service."""
    while not stop.is_set():
        started = time.monotonic()
        for line in report_lines(notify_once(settings, sleep=sleep)):
            emit(line)
        stop.wait(max(0.0, interval - (time.monotonic() - started)))


def summary(report: Report) -> dict[str, Any]:
    """The run as JSON (`--format json`)."""
    return asdict(report)
