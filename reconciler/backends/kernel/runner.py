"""Run the kernel tools, optionally inside another network namespace.

The one place the dataplane starts processes.  A prefix such as `ip netns exec NAME` lets
tests and the lab converge a namespace without moving the calling process into it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.backends.errors import DataplaneError


@dataclass(frozen=True, slots=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Runner:
    """Runs a command (with `prefix` in front) and captures its output as text."""

    prefix: tuple[str, ...] = ()
    timeout: float = 300.0

    @classmethod
    def in_netns(cls, name: str, timeout: float = 300.0) -> Runner:
        return cls(("ip", "netns", "exec", name), timeout)

    @property
    def netns(self) -> str | None:
        """The namespace this runner enters, when it was made by `in_netns`."""
        if len(self.prefix) == 4 and self.prefix[:3] == ("ip", "netns", "exec"):
            return self.prefix[3]
        return None

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        full = (*self.prefix, *argv)
        try:
            proc = subprocess.run(
                full,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise DataplaneError(f"{full[0]}: command not found") from None
        except subprocess.TimeoutExpired:
            raise DataplaneError(f"{' '.join(argv)}: no answer within {self.timeout:g} s") from None
        return Result(tuple(full), proc.returncode, proc.stdout, proc.stderr)
