"""Work inside another network namespace from a thread of its own.

setns(2) on a network namespace moves only the calling thread, so a short-lived thread can
enter a namespace, create what must live there (a socket keeps its namespace for life) or
run a libiptc transaction, and end, while the caller never leaves its own namespace.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


@functools.cache
def libc() -> Any:
    """The C library, for the calls Python does not wrap (setns before 3.12, x_tables'
    getsockopt)."""
    return ctypes.CDLL(None, use_errno=True)


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to (OSError if not)."""
    # os.setns exists from Python 3.12; 3.11 goes through libc directly.
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
    elif libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(name: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread inside network namespace `name`: its result, or its exception
    (an OSError if the namespace cannot be entered)."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_net(fd)
            finally:
                os.close(fd)
            out["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread, raised there
            out["error"] = exc

    worker = threading.Thread(target=work, name=f"netns-{name}")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    result: T = out["result"]
    return result
