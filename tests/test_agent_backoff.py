"""The retry back-off: capped exponential, and no overflow however long the failures last.

Before the shared helper, 1025 consecutive failures made `2 ** (failures - 1)` too large to
multiply with a float; the OverflowError ended the agent loop or the status pusher thread.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.agent.config import AgentConfig
from reconciler.agent.core import backoff
from reconciler.agent.loop import next_delay
from reconciler.agent.status import StatusPusher
from reconciler.status.write import StatusPushError, StatusWriter


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(1, 2.0), (2, 4.0), (10, 60.0), (1024, 60.0), (1025, 60.0), (5000, 60.0)],
)
def test_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    wait = backoff(failures, 2.0, 60.0)
    assert wait == expected
    assert wait <= 60.0


def test_backoff_never_exceeds_the_cap_for_a_tiny_cap() -> None:
    for failures in (1, 2, 10, 5000):
        assert backoff(failures, 2.0, 1.5) == 1.5


def test_backoff_matches_the_plain_formula_where_that_did_not_overflow() -> None:
    for failures in range(1, 1025):
        assert backoff(failures, 0.5, 3600.0) == min(3600.0, 0.5 * 2 ** (failures - 1))


def test_next_delay_does_not_raise_after_many_failures() -> None:
    cfg = AgentConfig("s", "c", "/x", interval=60, jitter=0.1, retry_base=2.0, retry_cap=300)
    assert next_delay(cfg, 5000, 0.0) == 300
    assert next_delay(cfg, 5000, 0.5) == pytest.approx(315)


def test_status_pusher_waits_the_cap_after_many_failures() -> None:
    pusher = StatusPusher(None, heartbeat=60, retry_base=2.0, retry_cap=60.0, rand=lambda: 0.0)  # type: ignore[arg-type]
    pusher.offer({"cell": "c"})
    pusher._failures = 5000
    pusher._retry_wait = pusher.retry_after(5000)
    pusher._last_attempt = 100.0
    assert pusher._due(100.0) == 60.0
    assert pusher._due(200.0) == 0.0


def test_pushes_that_failed_together_come_back_spread_over_half_their_back_off() -> None:
    """A status server that restarts fails every cell's push in the same second; with the
    same back-off they would all return in the same second too (bench/results/fleet.md saw
    connection resets from exactly that).  Each pusher stretches its wait by its own random."""
    waits = []
    for r in (0.0, 0.25, 0.999):
        pusher = StatusPusher(
            None, heartbeat=60, retry_base=2.0, retry_cap=60.0, rand=lambda r=r: r
        )  # type: ignore[arg-type]
        waits.append([pusher.retry_after(n) for n in (1, 2, 10)])
    assert waits[0] == [2.0, 4.0, 60.0]
    assert waits[1] == [2.25, 4.5, 67.5]
    assert [round(w, 2) for w in waits[2]] == [3.0, 6.0, 89.97]
    spread = StatusPusher(None, heartbeat=60)  # type: ignore[arg-type]
    assert len({spread.retry_after(1) for _ in range(50)}) > 40  # random.random by default


def test_a_git_timeout_is_a_push_error_the_pusher_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every git call of a status push, commit-tree included, reports a timeout as
    StatusPushError (retried with back-off), never as a TimeoutExpired that ends the thread."""
    writer = StatusWriter("file:///nowhere.git", "status/c", tmp_path / "s.git", timeout=5)
    writer._ensure_repo()
    real = subprocess.run

    def slow_commit_tree(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if "commit-tree" in argv:
            raise subprocess.TimeoutExpired(argv, kw["timeout"])
        return real(argv, **kw)

    monkeypatch.setattr(subprocess, "run", slow_commit_tree)
    with pytest.raises(StatusPushError, match=r"git commit-tree: no answer within 5 s"):
        writer.commit("x: 1\n", "status c", 1_700_000_000)
