"""Plain data the dataplane passes around: what the kernel holds, what to send, what drifted.

These are values, not handles: a delta computed from a read-back can be printed (`--dry-run`),
reported (status, PR comment) or sent, and the same inputs always give the same delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kinds of drift: the kernel differs from the last plan applied, so someone else changed it.
RULE_MISSING = "rule-missing"
RULE_EXTRA = "rule-extra"
RULE_CHANGED = "rule-changed"
RULES_REORDERED = "rules-reordered"
CHAIN_MISSING = "chain-missing"
CHAIN_EXTRA = "chain-extra"
HOOK_MISSING = "hook-missing"
HOOK_MOVED = "hook-moved"
HOOK_DUPLICATED = "hook-duplicated"
HOOK_CHANGED = "hook-changed"
HOOK_EXTRA = "hook-extra"
MARKER_MISSING = "marker-missing"
"""A chain the last plan put there lost its ownership marker (flushed, or the marker rule
deleted): still ours, because the last plan says so, and rewritten with it."""

# Kinds of change: the plan differs from what was applied (or from the kernel, when the last
# plan applied is unknown).
CHAIN_ADDED = "chain-added"
CHAIN_REWRITTEN = "chain-changed"
CHAIN_REMOVED = "chain-removed"
HOOK_ADDED = "hook-added"
HOOK_REMOVED = "hook-removed"
HOOK_FIXED = "hook-fixed"


@dataclass(frozen=True, slots=True)
class HookCopy:
    """A rule in FORWARD carrying our hook comment: its 0-based position and full text."""

    index: int
    text: str


@dataclass(frozen=True)
class OwnedState:
    """What the kernel holds of ours for one family, read back in `iptables-save` form.

    `chains` are the chains that carry our ownership marker (`iptables.render.marker_rule`),
    with their rules minus the marker: provably ours.  `unmarked` are chains with our name
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
    def rule_count(self) -> int:
        """Rules of ours in the kernel: the plan's rules, each chain's marker, the hook."""
        return sum(len(r) + 1 for r in self.chains.values()) + len(self.hooks)


@dataclass(frozen=True, slots=True, order=True)
class Drift:
    """One way the kernel differs from the last plan applied: someone changed it from outside.

    `expected` holds the rules the last plan put there, `found` what the kernel holds instead
    (both in `iptables-save` form), so an operator can see exactly what was touched.
    `repair` says whether the delta carrying this record rewrites it (false in report-only
    and no-self-heal modes).
    """

    family: int
    chain: str
    what: str
    expected: tuple[str, ...] = ()
    found: tuple[str, ...] = ()
    repair: bool = True

    def __str__(self) -> str:
        n = max(len(self.expected), len(self.found))
        detail = f" ({n} rule{'s' if n != 1 else ''})" if n else ""
        return f"ipv{self.family} {self.chain}: {self.what}{detail}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "chain": self.chain, "what": self.what}
        if self.expected:
            out["expected"] = list(self.expected)
        if self.found:
            out["found"] = list(self.found)
        out["repair"] = self.repair
        return out


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One chain (or the hook) the plan changes: added, rewritten or removed."""

    family: int
    chain: str
    what: str
    rules: int = 0

    def __str__(self) -> str:
        suffix = f" ({self.rules} rules)" if self.what in (CHAIN_ADDED, CHAIN_REWRITTEN) else ""
        return f"ipv{self.family} {self.chain}: {self.what}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "chain": self.chain, "what": self.what, "rules": self.rules}


@dataclass(frozen=True)
class Delta:
    """The transaction for one family, and why each part of it is there.

    `ops` are the lines between `*filter` and `COMMIT`; empty means nothing to send.
    `written` chains are declared (which flushes them under --noflush) and refilled,
    `deleted` chains flushed and removed, `orphaned` chains flushed but kept because a rule
    that is not ours still jumps to them.  `foreign` are chains with our name prefix that
    are not ours: reported, never written, flushed or deleted.
    """

    family: int
    ops: tuple[str, ...] = ()
    drift: tuple[Drift, ...] = ()
    changes: tuple[Change, ...] = ()
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    orphaned: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.ops

    def text(self) -> str:
        """The `iptables-restore --noflush` input, or "" when there is nothing to send."""
        if not self.ops:
            return ""
        return "\n".join(("*filter", *self.ops, "COMMIT")) + "\n"
