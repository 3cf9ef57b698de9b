"""The xtables lock: one file (`/run/xtables.lock`, or $XTABLES_LOCKFILE) that every iptables
writer on the host takes, whatever network namespace it works in.

Our libiptc commits take it like iptables-restore does.  The legacy read takes it too, while
it saves the table and takes its token (see IptablesBackend.read): iptables-legacy-save itself
never locks, so holding the lock is what makes the saved text and the token describe the
same table -- no well-behaved writer can replace it in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

DEFAULT_PATH = "/run/xtables.lock"


def lock_path() -> str:
    """Where the iptables tools of this environment look for the lock."""
    return os.environ.get("XTABLES_LOCKFILE", DEFAULT_PATH)


@contextlib.contextmanager
def xtables_lock(path: str | None = None, wait: float = 10.0) -> Iterator[bool]:
    """Hold the lock for the body; yields False (and holds nothing) if another program kept
    it for `wait` seconds or the file cannot be opened."""
    try:
        fd = os.open(path or lock_path(), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield False
        return
    try:
        held = False
        deadline = time.monotonic() + wait
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        yield held
    finally:
        os.close(fd)  # closing the descriptor releases the lock
