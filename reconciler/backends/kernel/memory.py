"""What every backend may remember of the kernel between calls, and the token that says when.

Reading our state back is the largest cost of a cycle that changes little or nothing, so a
backend keeps the last state it read per family, tagged with a token of the kernel's (the
nftables generation id, a legacy table's token: see `generation`).  While the token is the
same, nothing changed and the state is still the kernel's; any other value, or none, and the
next read lists the kernel again.  What a backend remembers beyond that (the lines the kernel
printed, the state after its own transaction) is its own: `iptables.memory.IptablesMemory`,
`nftables.memory.NftMemory`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from reconciler.backends.kernel.generation import KernelProbe
from reconciler.backends.kernel.runner import Runner

S = TypeVar("S")

_ID = re.compile(r"[0-9a-f]{16,}")


def shape(line: str) -> str:
    """A rendered rule with its hex ids (16 digits and more) blanked: rules of one shape
    print back alike, so once the kernel has printed a shape as rendered, new rules of it
    can be trusted to read back as rendered too."""
    return _ID.sub("~", line)


@dataclass
class KernelMemory(Generic[S]):
    """The probe of the backend's namespace and, per family, a state and its token."""

    probe: KernelProbe | None = None
    states: dict[int, tuple[Hashable, S]] = field(default_factory=dict)
    _opened: bool = False

    def open(self, runner: Runner) -> KernelProbe | None:
        """The probe for the runner's namespace, made once; None when the runner's context
        is unknown (a prefix that is not `ip netns exec`)."""
        if not self._opened:
            self._opened = True
            if runner.netns is not None or not runner.prefix:
                self.probe = KernelProbe(runner.netns)
        return self.probe

    def generation(self) -> int | None:
        return self.probe.generation() if self.probe is not None else None

    def recall(self, family: int, token: Hashable) -> S | None:
        """The state read while the kernel's token was `token`, if that is the one kept."""
        hit = self.states.get(family)
        return hit[1] if hit is not None and hit[0] == token else None
