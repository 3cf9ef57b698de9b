"""Watch the container metadata file, so a new container gets its rules within a second.

inotify (through ctypes: no dependency) on the file's *directory*, because CF and the lab
replace the file by rename, which a watch on the old inode would never report; events are
filtered by name.  Where inotify is unavailable (or `watch: poll`), the file's identity
(inode, size, mtime) is polled instead, by default every 100 ms -- a stat call, nothing more.
Either way, every second the identity is also compared, so an event lost to a full queue or
a directory that was replaced costs at most a second.

The watcher only says "look again"; reading, parsing and keeping the last good inventory is
the loop's job.  A half-written file triggers several notifications and a parse error or
two, and then the close-after-write one that parses.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")

Identity = tuple[int, int, int, int] | None


def identity(path: Path) -> Identity:
    """(device, inode, size, mtime ns), or None when the file is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Inotify:
    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(name, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.wd = -1

    def watch(self, directory: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.wd = wd

    def names(self) -> tuple[set[str], bool]:
        """Names in pending events, and whether the watch itself went away (or overflowed)."""
        names: set[str] = set()
        lost = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            i = 0
            while i + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, i)
                raw = data[i + _EVENT.size : i + _EVENT.size + length]
                i += _EVENT.size + length
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_Q_OVERFLOW):
                    lost = True
                name = raw.split(b"\0", 1)[0]
                if name:
                    names.add(os.fsdecode(name))
        return names, lost

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class InventoryWatcher:
    """Calls `on_change()` (from its own thread) whenever the file may have changed."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: Callable[[], None],
        *,
        mode: str = "auto",
        poll: float = 0.1,
        safety_check: float = 1.0,
    ) -> None:
        self.path = Path(path).absolute()
        self.on_change = on_change
        self.poll = poll
        self.safety_check = safety_check
        self.mode = mode
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._inotify: _Inotify | None = None
        if mode in ("auto", "inotify"):
            try:
                self._inotify = _Inotify()
            except (OSError, AttributeError):
                if mode == "inotify":
                    raise
        self.mechanism = "inotify" if self._inotify is not None else "poll"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inventory-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._inotify is not None:
            self._inotify.close()

    def _arm(self) -> bool:
        """(Re)watch the directory; False while it does not exist."""
        if self._inotify is None:
            return False
        try:
            self._inotify.watch(self.path.parent)
            return True
        except OSError:
            return False

    def _run(self) -> None:
        armed = self._arm()
        last = identity(self.path)
        while True:
            timeout = self.safety_check if armed else self.poll
            fds = [self._stop_r] + ([self._inotify.fd] if armed and self._inotify else [])
            ready, _, _ = select.select(fds, [], [], timeout)
            if self._stop_r in ready:
                return
            changed = False
            if armed and self._inotify is not None and self._inotify.fd in ready:
                names, lost = self._inotify.names()
                changed = self.path.name in names
                if lost:
                    armed = self._arm()
                    changed = True
            elif self._inotify is not None and not armed:
                armed = self._arm()
            now = identity(self.path)
            if now != last:
                changed = True
            last = now
            if changed:
                self.on_change()
