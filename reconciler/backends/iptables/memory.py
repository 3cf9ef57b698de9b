"""What an iptables backend may remember of the kernel between two reads, and when.

Reading our state back (`iptables-save` and its parse) is the largest cost of a cycle that
changes little or nothing: on the nft variant a 500k-rule cell takes hundreds of
milliseconds to save, ten times the one-ASG transaction itself.  nftables numbers every
committed transaction in a namespace (its generation id, see `generation`), which makes two
shortcuts exact rather than hopeful:

* a read at the generation of a previous full read returns that read's state: nothing in any
  nftables table changed since;
* after our own transaction, if the generation moved by exactly one from the one we read at,
  nothing but our transaction happened, and the kernel holds what we read with the delta
  applied.  What that cannot show is whether iptables prints our new lines back exactly as we
  rendered them (the renderer's canonical form, the point of verifying).  A line is trusted
  when the kernel has printed its body before (everything after `-A CHAIN`, which iptables
  prints whatever the chain: a group's rules move to a new group chain unchanged), or, in
  container and dispatch chains, a line of the same *shape* (equal but for its hex ids,
  which iptables prints verbatim: the jump to a new group).  The few chains with a line
  of neither kind are listed on their own (`iptables -S CHAIN`, which the nft variant answers
  from that chain alone).  More than a few: one full read, as before.

Anything unexpected (no generation, a second writer, a failed transaction, a test's fault
hook) drops what is remembered, and the next read is a full one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from reconciler.backends.iptables.delta import IptablesDelta
from reconciler.backends.iptables.parse import HookCopy, OwnedState
from reconciler.backends.iptables.render import GROUP_PREFIX, HOOK_CHAIN, is_marker
from reconciler.backends.kernel.memory import KernelMemory, shape

MAX_LISTED = 4
"""Chains with lines of a new shape that verify lists one by one before it reads in full."""


@dataclass
class IptablesMemory(KernelMemory[OwnedState]):
    """Per backend: the probe and states read at known tokens (`KernelMemory`), the lines
    printed before, and what to expect after our own transaction."""

    expected: dict[int, tuple[int, OwnedState, IptablesDelta]] = field(default_factory=dict)
    bodies: set[str] = field(default_factory=set)
    shapes: set[str] = field(default_factory=set)
    unfolded: list[Mapping[str, tuple[str, ...]]] = field(default_factory=list)
    deltas: dict[int, tuple[tuple[object, ...], IptablesDelta]] = field(default_factory=dict)

    def remember(
        self, family: int, generation: Hashable | None, state: OwnedState, *, read: bool = True
    ) -> None:
        """A state of the kernel while its token stayed `generation` (nft: the generation id;
        legacy: the table's token): read in full, or proven by `IptablesBackend.verify`
        (`read=False`).

        A full read's lines are kept as printed lines, folded in only when a verify needs
        them (a large cell has tens of thousands), and only the latest reads: older ones add
        little.  A proven state adds nothing: its lines were known or listed.
        """
        if generation is None:
            self.states.pop(family, None)
            return
        self.states[family] = (generation, state)
        if read:
            self.unfolded = [*self.unfolded[-1:], state.chains]

    def forget(self) -> None:
        self.states.clear()
        self.expected.clear()

    def applied(self, delta: IptablesDelta, before: int | None, after: int | None) -> None:
        """After our transaction: keep what is still provably true, and what to expect."""
        family = delta.family
        hit = self.states.pop(family, None)
        self.expected.pop(family, None)
        if before is None or after != before + 1:
            self.forget()
            return
        # Only our transaction happened: other families' states still hold.
        for other, (generation, state) in list(self.states.items()):
            self.states[other] = (after, state) if generation == before else (generation, state)
        if hit is not None and hit[0] == before:
            # What the kernel now holds is hit[1] with the delta applied; worked out only if
            # verify gets that far (`after_delta`), which a large transaction never does.
            self.expected[family] = (after, hit[1], delta)

    def learn(self, chain: str, lines: Iterable[str]) -> None:
        """Lines the kernel printed for `chain`: lines with their body or shape print alike.

        Shapes are kept for all but group chains, whose lines differ by content anyway:
        blanking ids is a regex pass, the one costly step here.
        """
        lines = list(lines)
        body = len(chain) + 4
        self.bodies.update(line[body:] for line in lines)
        if not chain.startswith(GROUP_PREFIX):
            self.shapes.update(shape(line) for line in lines)

    def unshaped(
        self, chains: Mapping[str, tuple[str, ...]], names: Iterable[str], limit: int = MAX_LISTED
    ) -> list[str]:
        """The chains among `names` with a line whose body and shape were never printed;
        only up to one more than `limit` (beyond it, verify reads in full anyway)."""
        if self.unfolded:
            lines = sum(len(rules) for read in self.unfolded for rules in read.values())
            if len(self.bodies) > 4 * lines + 10_000:
                self.bodies, self.shapes = set(), set()  # mostly rules long gone: start again
            for read in self.unfolded:
                for chain, rules in read.items():
                    self.learn(chain, rules)
            self.unfolded.clear()
        unknown: list[str] = []
        for name in names:
            if not all(self._known(name, line) for line in chains[name]):
                unknown.append(name)
                if len(unknown) > limit:
                    break
        return unknown

    def _known(self, chain: str, line: str) -> bool:
        return line[len(chain) + 4 :] in self.bodies or shape(line) in self.shapes


def rewrites_most(chains: Mapping[str, tuple[str, ...]], delta: IptablesDelta) -> bool:
    """Whether a transaction rewrote most of our chains (converging from scratch, say).

    Its read-back then serves that cycle only: taking a legacy table's token as well would
    cost a third of a save more, for a table likely to change again before the next cycle
    (a restart, a large policy change), and the next cycle takes the token anyway.
    """
    return 2 * len(delta.written) > len(chains)


def after_delta(state: OwnedState, delta: IptablesDelta) -> OwnedState | None:
    """`state` with the transaction applied, as iptables-restore applies it; None for an
    operation this does not model."""
    chains = {name: list(rules) for name, rules in state.chains.items()}
    unmarked = dict(state.unmarked)
    declared: set[str] = set()
    hooks = list(state.hooks)
    for op in delta.ops:
        if op.startswith(":"):
            name = op[1:].split(" ", 1)[0]
            chains[name] = []
            declared.add(name)
            unmarked.pop(name, None)
        elif op.startswith("-A "):
            end = op.find(" ", 3)
            name = op[3:end] if end > 0 else op[3:]
            rules = chains.get(name)
            if rules is None:
                return None
            if is_marker(name, op):
                declared.discard(name)
            else:
                rules.append(op)
        elif op.startswith("-X "):
            chains.pop(op[3:], None)
            unmarked.pop(op[3:], None)
            declared.discard(op[3:])
        elif op.startswith(f"-D {HOOK_CHAIN} "):
            text = "-A " + op[3:]
            gone = next((h for h in hooks if h.text == text), None)
            if gone is None:
                return None
            hooks = [
                HookCopy(h.index - 1 if h.index > gone.index else h.index, h.text)
                for h in hooks
                if h is not gone
            ]
        elif op.startswith(f"-I {HOOK_CHAIN} 1 "):
            text = f"-A {HOOK_CHAIN} " + op[len(f"-I {HOOK_CHAIN} 1 ") :]
            hooks = [HookCopy(0, text), *(HookCopy(h.index + 1, h.text) for h in hooks)]
        else:
            return None
    if declared:  # a chain left without its marker: not a delta of ours, not modelled
        return None
    return replace(
        state,
        chains={name: tuple(rules) for name, rules in chains.items()},
        hooks=tuple(sorted(hooks, key=lambda h: h.index)),
        unmarked=unmarked,
    )
