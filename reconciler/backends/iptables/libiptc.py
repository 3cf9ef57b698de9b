"""Optional backend for legacy hosts: the same transaction, committed in-process by libiptc.

It exists for cells where forking `iptables-restore` every cycle is unwelcome.  Only the
write path differs from the iptables backend: reading stays `iptables-legacy-save` (the
canonical text the plan is rendered in, and the only form drift can be compared in), and the
delta is the very same list of lines.  Each line is parsed into a python-iptables rule by
xtables' own option parsers and applied to one libiptc handle; a single commit at the end
replaces the table atomically, and anything that fails before it leaves the kernel untouched.

libiptc speaks only to legacy iptables.  It takes no lock of its own, so the backend takes
the xtables lock (`/run/xtables.lock`, as the iptables tools do) around the transaction.
Needs `pip install 'asgctl[libiptc]'` (python-iptables).
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reconciler.backends.contract import Backend
from reconciler.backends.errors import ApplyError, DataplaneError, VariantError
from reconciler.backends.iptables.backend import (
    VARIANTS,
    IptablesBackend,
    choose_variant,
    probe_variant,
)
from reconciler.backends.iptables.delta import IptablesDelta
from reconciler.backends.iptables.parse import OwnedState
from reconciler.backends.iptables.render import OWNED_PREFIX, Ruleset, render_cell
from reconciler.backends.iptables.rendercache import RenderCache
from reconciler.backends.iptables.xlock import lock_path as default_lock_path
from reconciler.backends.iptables.xlock import xtables_lock
from reconciler.backends.kernel.nsthread import run_in_netns
from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.fqdn.kernelsets import ensure_ipsets, referenced_ipsets

_PROTOCOLS = {"icmp": "1", "tcp": "6", "udp": "17", "ipv6-icmp": "58", "icmpv6": "58"}


def _iptc() -> Any:
    try:
        import iptc  # type: ignore[import-not-found, import-untyped, unused-ignore]  # no stubs
    except (ImportError, OSError) as exc:  # OSError: libxtables/libiptc missing
        raise DataplaneError(
            f"the libiptc backend needs python-iptables (pip install 'asgctl[libiptc]'): {exc}"
        ) from None
    return iptc


@dataclass(eq=False)
class LibiptcBackend:
    """Reads with iptables-legacy-save, writes one libiptc commit per family.

    A handle like `IptablesBackend`, whose reading, delta and verify it uses (`_reader`).
    """

    runner: Runner = field(default_factory=Runner)
    wait_seconds: int = 10
    reason: str = ""
    fault: Callable[[int, str], str] | None = None
    lock_path: str = field(default_factory=default_lock_path)
    renders: RenderCache = field(default_factory=RenderCache, compare=False, repr=False)
    _reader: IptablesBackend = field(init=False, compare=False, repr=False)

    @classmethod
    def open(
        cls,
        variant: str = "auto",
        runner: Runner | None = None,
        *,
        fault: Callable[[int, str], str] | None = None,
    ) -> LibiptcBackend:
        _iptc()
        runner = runner or Runner()
        if variant == "nft":
            raise VariantError("the libiptc backend drives legacy iptables only")
        probes = {v: probe_variant(runner, v) for v in VARIANTS}
        nft, legacy = probes["nft"], probes["legacy"]
        if variant == "auto" and nft.rules > legacy.rules and not legacy.ours:
            raise VariantError(
                f"this host uses iptables-nft ({nft.rules} rules, legacy {legacy.rules}); "
                "libiptc drives legacy iptables only: use the iptables backend"
            )
        _, reason = choose_variant(probes, "legacy")
        return cls(runner, reason=reason, fault=fault)

    @property
    def name(self) -> str:
        return "libiptc"

    def __post_init__(self) -> None:
        # One reader for the backend's life, so what it learns of the kernel (the probe
        # sockets, see IptablesBackend.read) outlives a single call.
        self._reader = IptablesBackend("legacy", self.runner)

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        return self.renders.get(plan, family, render_cell)

    def read(self, family: int) -> OwnedState:
        return self._reader.read(family)

    def delta(
        self,
        desired: Ruleset,
        observed: OwnedState,
        last: Ruleset | None,
        *,
        heal_drift: bool = True,
    ) -> IptablesDelta:
        return self._reader.delta(desired, observed, last, heal_drift=heal_drift)

    def apply(self, delta: IptablesDelta) -> None:
        if delta.empty:
            return
        text = delta.text()
        if self.fault is not None:
            text = self.fault(delta.family, text)
        self._reader.will_write(delta.family)
        ensure_ipsets(self.runner, referenced_ipsets(text))  # grants by name need their sets
        netns = self.runner.netns
        if netns is None:
            self._commit(delta.family, text)
            return
        # The whole transaction on a thread of its own inside the namespace: the caller never
        # leaves its namespace, whatever happens.
        try:
            run_in_netns(netns, self._commit, delta.family, text)
        except OSError as exc:
            raise DataplaneError(f"cannot enter netns {netns}: {exc.strerror or exc}") from None

    def verify(self, desired: Ruleset, delta: IptablesDelta) -> None:
        self._reader.verify(desired, delta)

    def _commit(self, family: int, text: str) -> None:
        iptc = _iptc()
        cls = iptc.Table if family == 4 else iptc.Table6
        with _xtables_lock(self.lock_path, self.wait_seconds):
            # A handle of our own: python-iptables caches one per table name for the whole
            # process, bound to the namespace it was first opened in.
            table = object.__new__(cls)
            table._init("filter", False)
            try:
                built: dict[tuple[str, ...], tuple[Any, str | None]] = {}
                for number, line in enumerate(text.splitlines(), 1):
                    try:
                        _op(iptc, table, family, line, built)
                    except Exception as exc:  # any refusal, from libiptc, xtables or us
                        raise ApplyError(
                            f"libiptc refused the transaction at line {number} "
                            f"({line[:160]!r}): {exc}; nothing was changed",
                            number,
                            text,
                        ) from None
                try:
                    table.commit()
                except iptc.IPTCError as exc:
                    raise ApplyError(f"libiptc commit failed: {exc}; nothing was changed") from None
            finally:
                table.close()


def _op(iptc: Any, table: Any, family: int, line: str, built: dict[tuple[str, ...], Any]) -> None:
    """One line of an iptables-restore transaction, on a libiptc handle.

    `built` keeps the entry each distinct rule text became in this transaction: container
    chains repeat the same lines (ESTABLISHED, REJECT, the jump to a shared group) hundreds
    of times, and building a rule through xtables costs far more than appending it.
    """
    if not line or line.startswith("#") or line in ("*filter", "COMMIT"):
        return
    if line.startswith(":"):
        name = line[1:].split()[0]
        if table.is_chain(name):
            table.flush_entries(name)
        else:
            table.create_chain(name)
        return
    words = _words(line)
    op, chain = words[0], words[1] if len(words) > 1 else ""
    if op == "-X":
        table.delete_chain(chain)
        return
    if op not in ("-A", "-D", "-I"):
        raise ValueError(f"unsupported operation {op!r}")
    rest = words[2:]
    position = 0
    if op == "-I" and rest and rest[0].isdigit():
        position, rest = int(rest[0]) - 1, rest[1:]
    if op == "-D":
        rule, _ = _rule(iptc, family, rest)
        iptc.Chain(table, chain).delete_rule(rule)
        return
    key = tuple(rest)
    entry = built.get(key)
    if entry is None:
        rule, jump = _rule(iptc, family, rest)
        _final_check(rule)
        buf = rule.rule
        if not buf:
            raise ValueError("invalid rule")
        entry = built[key] = (buf, jump)
    buf, jump = entry
    if jump is not None and not table.is_chain(jump):
        # libiptc would only find out at commit, without saying which line.
        raise ValueError(f"chain {jump} does not exist")
    if op == "-A":
        table.append_entry(chain, buf)
    else:
        table.insert_entry(chain, buf, position)


# A word of iptables-save output: a double-quoted string without escapes, or a bare word; each
# must end at a blank or the end of the line.  Anything else (a backslash, a single quote, a
# quote inside a word) makes the line take shlex's slower, general path.
_WORD = re.compile(r'"([^"\\]*)"(?=\s|$)|([^\s"\'\\]+)(?=\s|$)|(\S)')


def _words(line: str) -> list[str]:
    """shlex.split for the lines we render (quotes only around comments and log prefixes),
    at a fraction of its cost: shlex was the largest single cost of a large transaction."""
    words = []
    for quoted, bare, other in _WORD.findall(line):
        if other:
            return shlex.split(line)
        words.append(bare or quoted)
    return words


def _final_check(rule: Any) -> None:
    """xtables' final check of every match and the target, as python-iptables' own
    `Rule.final_check` does, minus its round trip of saving every option through a pipe and
    parsing it back, which cost more than building the rule: our options were just parsed by
    the same xtables parsers."""
    for match in rule.matches:
        if match._module:
            match._final_check()
    target = rule.target
    if target is not None and target._module:
        target._final_check()


def _rule(iptc: Any, family: int, words: list[str]) -> tuple[Any, str | None]:
    """A python-iptables rule from iptables-save words, options parsed by xtables itself,
    and the chain it jumps to, if it jumps to one of ours."""
    rule = iptc.Rule() if family == 4 else iptc.Rule6()
    jump: str | None = None
    current: Any = None  # the match or target that following --options belong to
    target: Any = None
    negate = False
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if word == "!":
            negate, i = True, i + 1
            continue
        if value is None:
            raise ValueError(f"option {word} has no value")
        shown = ("!" if negate else "") + value
        if word in ("-s", "--source"):
            rule.src = shown
        elif word in ("-d", "--destination"):
            rule.dst = shown
        elif word in ("-p", "--protocol"):
            # By number: python-iptables' own IPv6 protocol table lacks `ipv6-icmp`.
            rule.protocol = ("!" if negate else "") + _PROTOCOLS.get(value, value)
        elif word in ("-i", "--in-interface"):
            rule.in_interface = shown
        elif word in ("-o", "--out-interface"):
            rule.out_interface = shown
        elif word in ("-m", "--match"):
            current = iptc.Match(rule, value)
            rule.add_match(current)
        elif word in ("-j", "--jump") and value.startswith(OWNED_PREFIX):
            # A jump to a chain is a standard target named after it.  Built by hand, because
            # python-iptables would otherwise open every table (loading nat, raw, ... into the
            # namespace) to find out whether the name is a chain.
            current = target = iptc.Target(rule, "ACCEPT")
            target.standard_target = jump = value
        elif word in ("-j", "--jump") and value == "NFLOG":
            # python-iptables corrupts its heap building NFLOG (a segfault a few rules
            # later): refused, with a message, never a crash (flow-log: log for libiptc).
            raise ValueError("NFLOG targets cannot be built through libiptc; use flow-log: log")
        elif word in ("-j", "--jump"):
            current = target = iptc.Target(rule, value)
        elif word == "--match-set" and current is not None and i + 2 < len(words):
            # ipset's match takes two words, the set and its direction (grants by name).
            current.parse("match-set", [*(["!"] if negate else []), value, words[i + 2]])
            negate = False
            i += 3
            continue
        elif word.startswith("--") and current is not None:
            current.parse(word[2:], shown)
        else:
            raise ValueError(f"unsupported word {word!r}")
        negate = False
        i += 2
    if target is None:  # no -j (our ownership marker): the standard "go on" verdict
        target = iptc.Target(rule, "ACCEPT")
        target.standard_target = ""
    rule.target = target
    return rule, jump


@contextlib.contextmanager
def _xtables_lock(path: str, wait: float) -> Iterator[None]:
    """The lock every iptables tool takes, so our commit never races theirs."""
    with xtables_lock(path, wait) as held:
        if not held:
            raise ApplyError(f"{path}: held by another program for {wait} s")
        yield


if TYPE_CHECKING:  # the type checker holds the backend to the contract

    def _satisfies(b: LibiptcBackend) -> Backend[Ruleset, OwnedState, IptablesDelta]:
        return b
