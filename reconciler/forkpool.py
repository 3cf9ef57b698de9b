"""Map a function over chunks of work in forked processes that inherit the caller's data.

The fleet-wide plan (compiling every touched cell twice) and reading thousands of status
files are CPU-bound and split cleanly by cell.  Forking lets the workers inherit what the
parent already built (policy indexes, megabytes of status blobs) copy-on-write instead of
pickling it to them; only the chunks' bounds and the results cross the pipe.

Forking a process that is not a plain CLI run needs two precautions, both here:

* the workers reset SIGTERM, SIGINT and SIGHUP to their defaults: a parent that installed
  handlers (an agent running in-process) would otherwise leave workers that a pool's
  terminate cannot stop, and the pool would wait for them forever;
* a pool that finished its map is closed and joined, not terminated: its workers exit on
  their own once the queue is drained.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

# What the workers read: set just before the pool forks, so it is inherited, not pickled.
_TASK: tuple[Callable[[Any, Any], Any], Any] | None = None


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _run(chunk: Any) -> Any:
    assert _TASK is not None, "fork_map's task is set before the pool forks"
    fn, shared = _TASK
    return fn(shared, chunk)


def fork_ranges(
    fn: Callable[[Any, tuple[int, int]], R], shared: object, n: int, workers: int
) -> list[R]:
    """`fn(shared, (lo, hi))` over consecutive ranges covering `range(n)`, in order: one call
    when `workers` is 1, else about four ranges per worker, in that many forked processes.
    `fn` must be a module-level function (it is named, not pickled)."""
    global _TASK
    if workers <= 1 or n <= 1:
        return [fn(shared, (0, n))]
    import multiprocessing

    step = -(-n // (workers * 4))
    ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    _TASK = (fn, shared)
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals)
        try:
            out = pool.map(_run, ranges)
        except BaseException:
            pool.terminate()
            raise
        else:
            pool.close()
        finally:
            pool.join()
        return out
    finally:
        _TASK = None
