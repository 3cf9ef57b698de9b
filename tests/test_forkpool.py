"""Forked workers for the fleet-wide plan and status reads: in order, and never stuck.

A multiprocessing pool hung the suite for good twice: its terminate() waited on a worker it
never signalled.  Workers are now plain forks with a pipe back; these cases run in a child
process with a timeout that only guards against a hang, and check that no worker is left.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from reconciler.forkpool import fork_ranges


def _squares(shared: list[int], bounds: tuple[int, int]) -> list[int]:
    return [shared[i] ** 2 for i in range(*bounds)]


def test_ranges_cover_every_item_once_in_order() -> None:
    items = list(range(1000))
    for workers in (1, 2, 3):
        parts = fork_ranges(_squares, items, len(items), workers)
        assert [x for part in parts for x in part] == [i * i for i in items]
    assert fork_ranges(_squares, [], 0, 2) == [[]]


def _run_child(body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        """
        import signal
        from reconciler.forkpool import fork_ranges

        def handler(signum, frame):  # what an in-process agent installs
            pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, handler)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def _dispositions(shared: object, bounds: tuple[int, int]) -> list[bool]:
    import signal

    return [
        signal.getsignal(sig) == signal.SIG_DFL
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    ]


def test_workers_take_default_signals_when_the_parent_handles_them() -> None:
    """Workers that inherited the agent's SIGTERM handler would ignore a pool's terminate;
    they run with the default dispositions instead, and the map finishes."""
    done = _run_child(
        """
        from tests.test_forkpool import _dispositions, _squares
        print(fork_ranges(_dispositions, None, 100, 2))
        print(sum(len(p) for p in fork_ranges(_squares, list(range(500)), 500, 2)))
        """
    )
    assert done.returncode == 0, done.stderr
    ranges, count = done.stdout.split("\n")[:2]
    assert ranges == str([[True, True, True]] * 8)
    assert count == "500"


def _fails(shared: object, bounds: tuple[int, int]) -> list[int]:
    raise ValueError(f"bad range {bounds}")


def _failure_in_child(fn: str, error: str) -> str:
    """Run fork_ranges(fn) in a child process: what it raised, and whether a worker is left."""
    done = _run_child(
        f"""
        import os
        from tests.test_forkpool import {fn}
        try:
            fork_ranges({fn}, None, 100, 2)
        except {error} as exc:
            print("raised", exc)
        try:
            os.waitpid(-1, os.WNOHANG)
            print("a worker is left")
        except ChildProcessError:
            pass
        """
    )
    assert done.returncode == 0, done.stderr
    assert "left" not in done.stdout
    return done.stdout


def test_a_worker_error_reaches_the_caller_and_no_worker_is_left() -> None:
    assert _failure_in_child("_fails", "ValueError").startswith("raised bad range")


def test_the_worker_error_is_the_callers_exception_in_process() -> None:
    with pytest.raises(ValueError, match="bad range"):
        fork_ranges(_fails, None, 100, 2)


def _dies(shared: object, bounds: tuple[int, int]) -> list[int]:
    import os

    os._exit(3)


def test_a_worker_that_dies_without_an_answer_is_an_error_and_is_reaped() -> None:
    assert _failure_in_child("_dies", "RuntimeError").startswith("raised forked worker")
