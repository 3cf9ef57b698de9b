"""The lab's echo server, detached: it outlives the process that started it.

    python -m asgctl_lab.serve --tcp 0.0.0.0:3306 --udp 0.0.0.0:53

`asgctl_lab.echo` exits when its stdin reaches end-of-file, which is right for the test
harness (a killed test takes its servers with it) but wrong for `asgctl lab up`, which builds
the platform and returns: its services must keep running until `asgctl lab down`.  So this
wrapper gives the echo server a stdin that never ends -- a pipe whose write end it keeps open
itself -- and otherwise runs it unchanged.  `down` finds these processes through their
namespace (`ip netns pids`) and kills them; nothing else ever needs to stop them.
"""

from __future__ import annotations

import os
import sys

from asgctl_lab import echo


def main(argv: list[str] | None = None) -> int:
    """Point fd 0 at a pipe nobody writes to or closes, then serve like `echo` does."""
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        return echo.main(argv)
    finally:
        os.close(write_end)  # only reached when the server fails or is interrupted


if __name__ == "__main__":
    sys.exit(main())
