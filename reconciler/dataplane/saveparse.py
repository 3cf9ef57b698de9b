"""Read our part of `iptables-save -t filter` output, refusing anything ambiguous.

Only chain names and whole rule lines are looked at (the renderer writes the exact form
iptables-save prints, so lines compare as strings).  The parser is strict on purpose:
`iptables-nft-save` can print "Table `filter' is incompatible" and exit 0 (felix#2501); read
as an empty table that would make us reinstall everything on top of rules we cannot see.
So every line must be one we understand, and the table must be complete, or ReadError.
"""

from __future__ import annotations

import re

from reconciler.dataplane.errors import ReadError
from reconciler.dataplane.records import HookCopy, OwnedState
from reconciler.render.iptables import HOOK_CHAIN, OWNED_PREFIX

_HOOK_COMMENT = re.compile(r'(?:^|\s)--comment\s+"?asg:forward"?(?:\s|$)')
_JUMP = re.compile(r"(?:^|\s)(?:-j|--jump|-g|--goto)\s+(" + re.escape(OWNED_PREFIX) + r"\S+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_CHAIN_DECL = re.compile(r"^:(\S+) (\S+) \[\d+:\d+\]$")


def is_hook(rule: str) -> bool:
    """A FORWARD rule is ours when it carries our hook comment, whatever else it says."""
    return _HOOK_COMMENT.search(rule) is not None


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

    Runs on every cycle over the whole table (tens of thousands of lines at 500k
    CF-equivalent rules), so the common line -- a rule in one of our chains -- takes one
    prefix test, one `find` and one dict lookup; line numbers are only counted for errors.
    """
    chains: dict[str, list[str]] = {}
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
        chains={name: tuple(rules) for name, rules in chains.items()},
        hooks=tuple(hooks),
        foreign_refs=frozenset(foreign),
    )


def count_rules(text: str) -> tuple[int, bool]:
    """Rules in a full (all tables) save, and whether any chain of ours is declared.

    Used to tell which iptables variant a host already uses; tolerant, as the counts are a
    heuristic (kube-proxy's iptables-wrapper counts the same way).
    """
    rules = 0
    ours = False
    for line in text.splitlines():
        if line.startswith("-"):
            rules += 1
        elif line.startswith(":" + OWNED_PREFIX):
            ours = True
    return rules, ours
