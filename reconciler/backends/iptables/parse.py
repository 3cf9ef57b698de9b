"""Read our part of `iptables-save -t filter` output, refusing anything ambiguous.

Only chain names and whole rule lines are looked at (the renderer writes the exact form
iptables-save prints, so lines compare as strings).  The parser is strict on purpose:
`iptables-nft-save` can print "Table `filter' is incompatible" and exit 0 (felix#2501); read
as an empty table that would make us reinstall everything on top of rules we cannot see.
So every line must be one we understand, and the table must be complete, or ReadError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.backends.errors import ReadError
from reconciler.backends.iptables.render import (
    HOOK_CHAIN,
    MARKER_TAIL,
    OWNED_PREFIX,
    TOP_CHAIN,
    is_marker,
)


@dataclass(frozen=True, slots=True)
class HookCopy:
    """A rule in FORWARD carrying our hook comment: its 0-based position and full text."""

    index: int
    text: str


@dataclass(frozen=True)
class OwnedState:
    """What the kernel holds of ours for one family, read back in `iptables-save` form.

    `chains` are the chains that carry our ownership marker (`render.marker_rule`), with
    their rules minus the marker: provably ours.  `unmarked` are chains with our name
    prefix but no marker: someone else's (the host's `ASG-ADMIN-BLOCKLIST`), or ours after
    someone flushed them or removed the marker, which only the last plan applied can tell
    (`delta.compute_delta` decides).  `hooks` are the FORWARD rules carrying our hook comment
    and jumping to our dispatch chain; other programs' rules are not even stored.
    `foreign_refs` names chains that a rule outside the prefixed chains jumps to: those must
    not be deleted, or the whole restore would fail.
    """

    family: int
    chains: Mapping[str, tuple[str, ...]]
    hooks: tuple[HookCopy, ...] = ()
    foreign_refs: frozenset[str] = frozenset()
    unmarked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No chain of ours carries its marker: a transaction now installs."""
        return not self.chains

    @property
    def rule_count(self) -> int:
        """Rules of ours in the kernel: the plan's rules, each chain's marker, the hook."""
        return sum(len(r) + 1 for r in self.chains.values()) + len(self.hooks)


_HOOK_COMMENT = re.compile(r'(?:^|\s)--comment\s+"?asg:forward"?(?:\s|$)')
_JUMP = re.compile(r"(?:^|\s)(?:-j|--jump|-g|--goto)\s+(" + re.escape(OWNED_PREFIX) + r"\S+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_CHAIN_DECL = re.compile(r"^:(\S+) (\S+) \[\d+:\d+\]$")


def is_hook(rule: str) -> bool:
    """A FORWARD rule is our hook when it carries our hook comment and jumps to our dispatch
    chain, whatever else it matches; a rule with the comment that jumps anywhere else is some
    other program's (or an operator's copy), and never ours to delete or move."""
    return _HOOK_COMMENT.search(rule) is not None and TOP_CHAIN in jump_targets(rule)


def jump_targets(rule: str) -> set[str]:
    """Our chains a rule jumps (-j) or goes (-g) to.

    Quoted strings (comments, log prefixes) are cut out first, so a comment that merely
    mentions `-j ASG-X` is no reference; two patterns, not a shell tokeniser, because this
    runs on every rule of ours whenever chains are removed.
    """
    if '"' in rule:
        rule = _QUOTED.sub('""', rule)
    return set(_JUMP.findall(rule))


def parse_save(text: str, family: int, table: str = "filter") -> OwnedState:
    """Our chains, hook copies and foreign references from one table's save output.

    Chains with our name prefix are sorted by their ownership marker (`marker_rule`, which
    is stripped): with it into `chains`, without it into `unmarked`.  Runs over the whole
    table whenever the kernel may have changed (tens of thousands of lines at 500k
    CF-equivalent rules), so the common line -- a rule in one of our chains -- takes one
    prefix test, one `find`, one dict lookup and one `endswith`; line numbers are only
    counted for errors.
    """
    chains: dict[str, list[str]] = {}
    marked: set[str] = set()
    hooks: list[HookCopy] = []
    foreign: set[str] = set()
    forward_index = 0
    state = "before"  # before -> inside -> after
    ours = "-A " + OWNED_PREFIX
    hook_head = f"-A {HOOK_CHAIN} "
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if line.startswith(ours) and state == "inside":
            if line[-1:].isspace():
                line = line.rstrip()
            end = line.find(" ", 3)
            chain = line[3:end] if end > 0 else line[3:]
            rules = chains.get(chain)
            if rules is None:
                raise ReadError(f"ipv{family}: rule for undeclared chain {chain} at line {number}")
            if is_marker(chain, line):  # wherever it is: a marker changes no verdict
                marked.add(chain)
            else:
                rules.append(line)
            continue
        line = line.rstrip()
        if not line:
            continue
        if line.startswith("#"):
            if "incompatible" in line.lower():
                raise ReadError(f"ipv{family} {table} table cannot be read: {line.lstrip('# ')}")
            continue
        if state == "before":
            if line == f"*{table}":
                state = "inside"
                continue
            raise ReadError(f"ipv{family}: unexpected line {number} before *{table}: {line!r}")
        if state == "after":
            raise ReadError(f"ipv{family}: unexpected line {number} after COMMIT: {line!r}")
        if line == "COMMIT":
            state = "after"
            continue
        if line.startswith(":"):
            m = _CHAIN_DECL.match(line)
            if m is None:
                raise ReadError(f"ipv{family}: unparsable chain line {number}: {line!r}")
            if m.group(1).startswith(OWNED_PREFIX):
                chains.setdefault(m.group(1), [])
            continue
        if not line.startswith("-A "):
            raise ReadError(f"ipv{family}: unparsable line {number}: {line!r}")
        forward = line.startswith(hook_head)
        if forward and is_hook(line):
            hooks.append(HookCopy(forward_index, line))
        elif OWNED_PREFIX in line:
            foreign |= jump_targets(line)
        if forward:
            forward_index += 1
    if state != "after":
        what = "no *filter table" if state == "before" else "no COMMIT (truncated output)"
        raise ReadError(f"ipv{family}: iptables-save output has {what}")
    return OwnedState(
        family=family,
        chains={name: tuple(rules) for name, rules in chains.items() if name in marked},
        hooks=tuple(hooks),
        foreign_refs=frozenset(foreign),
        unmarked={name: tuple(rules) for name, rules in chains.items() if name not in marked},
    )


def count_rules(text: str) -> tuple[int, bool]:
    """Rules in a full (all tables) save, and whether chains of ours may be there.

    Used to tell which iptables variant a host already uses; tolerant, as the counts are a
    heuristic (kube-proxy's iptables-wrapper counts the same way).  "Ours" is a chain with
    our ownership marker, or our dispatch chain by name: a chain of ours from before markers
    existed must still keep the other variant from being chosen (mixing the two breaks
    traffic), and if the name is someone else's, the delta refuses to take it over anyway.
    A host's own `ASG-...` chains alone do not count.
    """
    rules = 0
    ours = False
    head = "-A " + OWNED_PREFIX
    for line in text.splitlines():
        if line.startswith("-"):
            rules += 1
            if line.startswith(head) and line.endswith(MARKER_TAIL):
                end = line.find(" ", 3)
                ours = ours or is_marker(line[3:end], line)
        elif line.startswith(f":{TOP_CHAIN} "):
            ours = True
    return rules, ours
