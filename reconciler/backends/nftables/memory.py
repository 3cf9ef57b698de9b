"""What the nftables backend may remember of the kernel between calls.

Most cycles list nothing at all.  The kernel numbers every committed nftables transaction
(the generation id, `kernel.generation.KernelProbe`); a state read at the current id is still
exact (`KernelMemory`), and after our own transaction, if the id moved by exactly one, the
kernel holds what we read with our delta applied (`delta.state_after`), provided the kernel
has printed rules of the same shapes, and sets of the same kinds, back as rendered before
(`trusted`; otherwise verify lists, and learns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from reconciler.backends.kernel.memory import KernelMemory, shape
from reconciler.backends.nftables.delta import NftDelta
from reconciler.backends.nftables.parse import NftState
from reconciler.backends.nftables.render import NftRuleset, NftSet


@dataclass
class NftMemory(KernelMemory[NftState]):
    """Per backend: the probe and states read at known generations (`KernelMemory`), the
    rule shapes and kinds of set the kernel has printed back, and what the pending
    transaction was computed from."""

    shapes: set[str] = field(default_factory=set)
    kinds: set[tuple[tuple[str, ...], tuple[str, ...], str, int]] = field(default_factory=set)
    pending: dict[int, tuple[NftRuleset, NftState]] = field(default_factory=dict)
    interned: dict[int, Mapping[str, NftSet]] = field(default_factory=dict)

    def intern(self, state: NftState) -> NftState:
        """Read-back sets equal to ones last rendered, swapped for those: a million elements
        are compared once per listing, not once per cycle (equal objects compare at once)."""
        interned = self.interned.get(state.family)
        if not state.elements_read or not interned:
            return state
        sets = dict(state.sets)
        for name, s in state.sets.items():
            mine = interned.get(name)
            if mine is not None and mine is not s and mine == s:
                sets[name] = mine
        return replace(state, sets=sets)

    def learn(self, state: NftState) -> None:
        """Rule shapes, and kinds of set whose elements, the kernel has printed back."""
        for rules in state.chains.values():
            self.shapes.update(shape(r) for r in rules)
        self.kinds.update(s.header for s in state.sets.values() if s.elements is not None)

    def trusted(self, desired: NftRuleset, delta: NftDelta) -> bool:
        """Whether everything `delta` writes is of a shape the kernel has printed as rendered."""
        for name in delta.written:
            if any(shape(r) not in self.shapes for r in desired.chains.get(name, ())):
                return False
            if name in desired.sets and desired.sets[name].header not in self.kinds:
                return False
        return True
