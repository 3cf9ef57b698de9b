"""Map a function over ranges of work in forked processes that inherit the caller's data.

The fleet-wide plan (compiling every touched cell twice) and reading thousands of status
files are CPU-bound and split cleanly by cell.  Forking lets the workers inherit what the
parent already built (policy indexes, megabytes of status blobs) copy-on-write instead of
pickling it to them; only the ranges' bounds go to a worker and only its results come back.

Each worker is a plain fork with one pipe back, not a `multiprocessing.Pool`: a pool's
queues, locks and handler threads can leave `terminate()` waiting forever on a worker it
never signalled (seen in this project's suite, and with workers that inherited an in-process
agent's SIGTERM handler).  Here a worker computes its ranges, writes one pickled answer and
exits; the parent reads each pipe to its end and reaps each child, and kills and reaps every
child still running if anything goes wrong.  Workers start with default signal dispositions.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")


def _default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _answer(
    fn: Callable[[Any, tuple[int, int]], Any], shared: object, mine: list[tuple[int, int]]
) -> bytes:
    """What a worker sends back: ("ok", results) or ("error", the exception)."""
    try:
        _default_signals()
        return pickle.dumps(("ok", [fn(shared, bounds) for bounds in mine]))
    except BaseException as exc:
        try:
            return pickle.dumps(("error", exc))
        except Exception:
            return pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def fork_ranges(
    fn: Callable[[Any, tuple[int, int]], R], shared: object, n: int, workers: int
) -> list[R]:
    """`fn(shared, (lo, hi))` over consecutive ranges covering `range(n)`, in order: one call
    when `workers` is 1, else about four ranges per worker, in that many forked processes.
    A worker's exception is raised here, in the caller."""
    if workers <= 1 or n <= 1:
        return [fn(shared, (0, n))]
    step = -(-n // (workers * 4))
    ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    children: list[tuple[int, int, list[tuple[int, int]]]] = []
    results: dict[tuple[int, int], R] = {}
    try:
        for w in range(min(workers, len(ranges))):
            mine = ranges[w::workers]
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: answer, and leave without running the parent's exits
                os.close(read_end)
                try:
                    view = memoryview(_answer(fn, shared, mine))
                    while view:
                        view = view[os.write(write_end, view) :]
                finally:
                    os._exit(0)
            os.close(write_end)
            children.append((pid, read_end, mine))
        while children:
            pid, read_end, mine = children[0]
            data = _read_all(read_end)
            os.close(read_end)
            os.waitpid(pid, 0)
            children.pop(0)
            if not data:
                raise RuntimeError(f"forked worker {pid} died without an answer")
            status, value = pickle.loads(data)
            if status == "error":
                raise value
            results.update(zip(mine, value, strict=True))
    finally:
        for pid, read_end, _ in children:
            os.close(read_end)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return [results[bounds] for bounds in ranges]
