"""A real git server on loopback for the lab, the agent tests and the fleet benchmark.

`git daemon` serves bare repositories under one base directory over `git://127.0.0.1:PORT/`,
with pushes enabled (agents push their status branches).  It can be stopped and started
again on the same port -- "the git server is down" is a test case -- and reports its CPU time
(its own plus its reaped children's, i.e. every upload-pack and receive-pack it forked) from
/proc, which is what the fleet benchmark charges to the server.

The daemon runs in its own session and is killed as a process group, so no upload-pack child
outlives a test; the context manager stops it however the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "lab",
    "GIT_AUTHOR_EMAIL": "lab@example.invalid",
    "GIT_COMMITTER_NAME": "lab",
    "GIT_COMMITTER_EMAIL": "lab@example.invalid",
    "LC_ALL": "C",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run git and return its stdout, stripped; RuntimeError with its stderr on failure.

    `env` is the whole environment; by default the caller's with a neutral identity and no
    user or system config.
    """
    res = subprocess.run(
        ["git", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else {**os.environ, **_GIT_ENV},
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


def proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid` (its CPU and its reaped children's), in s.

    0.0 once the process is gone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class GitDaemon:
    """`git daemon` over `base` on 127.0.0.1; repositories are `base/<name>.git`."""

    def __init__(self, base: str | os.PathLike[str], port: int | None = None) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._cpu_before_restarts = 0.0

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}.git"

    def create(self, name: str) -> Path:
        """An empty bare repository `name.git`, ready to be pushed to."""
        path = self.base / f"{name}.git"
        git("init", "--quiet", "--bare", "-b", "main", "--", str(path))
        return path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> Self:
        if self.pid is not None:
            return self
        log = open(self.base / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                [
                    # git-daemon itself, not `git daemon`: the `git` wrapper would stay our
                    # child and hide the daemon's CPU (and its children's) until it exits.
                    str(Path(git("--exec-path")) / "git-daemon"),
                    "--export-all",
                    "--enable=receive-pack",
                    f"--base-path={self.base}",
                    "--listen=127.0.0.1",
                    f"--port={self.port}",
                    "--reuseaddr",
                    "--informative-errors",
                    str(self.base),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **_GIT_ENV},
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"git daemon exited: {self._log_tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"git daemon did not listen on {self.port}: {self._log_tail()}")

    def stop(self) -> None:
        """Kill the daemon and every child it forked; wait until the port is closed."""
        proc = self.proc
        if proc is None:
            return
        self._cpu_before_restarts += proc_cpu(proc.pid) if proc.poll() is None else 0.0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "daemon.log").read_text(errors="replace")[-500:]
        return ""

    def cpu_seconds(self) -> float:
        """CPU the daemon and its reaped children used, over every start so far."""
        pid = self.pid
        return self._cpu_before_restarts + (proc_cpu(pid) if pid is not None else 0.0)
