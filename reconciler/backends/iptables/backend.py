"""The default backend: `iptables-save` to read, `iptables-restore --noflush` to write.

One variant (legacy or nft) is chosen once and used for both families, because mixing them on
one host breaks traffic in ways neither side can see (calico#3709).  The choice follows what
the host already uses, as kube-proxy's iptables-wrapper does: wherever our own chains already
are, else whichever variant holds more rules, else what `iptables -V` says the system default
is.  An explicit variant overrides the heuristic, but never leads to mixing: if our chains
exist in the other variant, opening the backend fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from reconciler.backends.contract import Backend
from reconciler.backends.errors import (
    ApplyError,
    DataplaneError,
    ReadError,
    VariantError,
    VerifyError,
)
from reconciler.backends.iptables.delta import IptablesDelta, check_applied, compute_delta
from reconciler.backends.iptables.memory import (
    MAX_LISTED,
    IptablesMemory,
    after_delta,
    rewrites_most,
)
from reconciler.backends.iptables.parse import OwnedState, count_rules, parse_save
from reconciler.backends.iptables.render import Ruleset, is_marker, render_cell
from reconciler.backends.iptables.rendercache import RenderCache
from reconciler.backends.iptables.xlock import xtables_lock
from reconciler.backends.kernel.generation import EMPTY_FILTER_ENTRIES, KernelProbe
from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.fqdn.kernelsets import ensure_ipsets, referenced_ipsets

VARIANTS = ("legacy", "nft")
_ERROR_LINE = re.compile(r"(?:line:?\s+|line )(\d+)", re.IGNORECASE)


def tool(variant: str, family: int, kind: str) -> str:
    """`iptables-nft-save`, `ip6tables-legacy-restore`, ..."""
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-{kind}"


@dataclass(frozen=True, slots=True)
class VariantProbe:
    """What one variant holds on this host: rule count (all tables, both families) and
    whether our chains are among them."""

    variant: str
    available: bool
    rules: int = 0
    ours: bool = False


def probe_variant(runner: Runner, variant: str) -> VariantProbe:
    """Full saves without `-t`: they list only tables that exist, so probing loads nothing."""
    rules, ours, available = 0, False, False
    for family in (4, 6):
        try:
            res = runner.run([tool(variant, family, "save")])
        except DataplaneError:
            continue
        if res.returncode != 0:
            continue
        available = True
        n, mine = count_rules(res.stdout)
        rules += n
        ours = ours or mine
    return VariantProbe(variant, available, rules, ours)


def system_default(runner: Runner) -> str | None:
    """The variant `iptables` points at (`iptables v1.8.9 (nf_tables)`), if it says."""
    try:
        res = runner.run(["iptables", "-V"])
    except DataplaneError:
        return None
    text = res.stdout + res.stderr
    if "nf_tables" in text:
        return "nft"
    if "legacy" in text:
        return "legacy"
    return None


def choose_variant(
    probes: dict[str, VariantProbe], wanted: str = "auto", default: str | None = None
) -> tuple[str, str]:
    """The variant to use and why; VariantError when any choice would mix the two."""
    mine = [v for v in VARIANTS if probes[v].ours]
    if len(mine) > 1:
        raise VariantError(
            "our chains exist in both iptables-legacy and iptables-nft; remove one set "
            "(mixing the variants breaks traffic)"
        )
    if wanted != "auto":
        if wanted not in VARIANTS:
            raise VariantError(f"unknown iptables variant {wanted!r} (legacy, nft or auto)")
        if mine and mine[0] != wanted:
            raise VariantError(
                f"our chains are installed with iptables-{mine[0]}; refusing to install with "
                f"iptables-{wanted} as well (mixing the variants breaks traffic)"
            )
        if not probes[wanted].available:
            raise VariantError(f"iptables-{wanted} is not usable on this host")
        return wanted, "explicit"
    usable = [v for v in VARIANTS if probes[v].available]
    if not usable:
        raise VariantError("neither iptables-legacy nor iptables-nft works on this host")
    if mine:
        return mine[0], "our chains are there"
    legacy, nft = probes["legacy"].rules, probes["nft"].rules
    if legacy != nft and len(usable) == 2:
        pick = "legacy" if legacy > nft else "nft"
        return pick, f"it holds more rules (legacy {legacy}, nft {nft})"
    if default in usable:
        return default, "system default (iptables -V)"
    return usable[-1], "only usable variant" if len(usable) == 1 else "no rules anywhere"


@dataclass(eq=False)
class IptablesBackend:
    """Converges our chains with iptables-save/iptables-restore of one variant.

    A handle, not a value: it keeps its renders and what it learned of the kernel
    (`renders`, `memory`) for its whole life, so it is mutable and compares by identity.

    `fault` rewrites each transaction just before it is sent: a test hook to prove that a
    failing transaction leaves everything as it was.
    """

    variant: str
    runner: Runner = field(default_factory=Runner)
    wait_seconds: int = 10
    reason: str = ""
    fault: Callable[[int, str], str] | None = None
    renders: RenderCache = field(default_factory=RenderCache, compare=False, repr=False)
    memory: IptablesMemory = field(
        default_factory=IptablesMemory, init=False, compare=False, repr=False
    )

    @classmethod
    def open(
        cls,
        variant: str = "auto",
        runner: Runner | None = None,
        *,
        fault: Callable[[int, str], str] | None = None,
    ) -> IptablesBackend:
        """Choose the variant for this host (see module doc) and return a backend using it."""
        runner = runner or Runner()
        probes = {v: probe_variant(runner, v) for v in VARIANTS}
        default = system_default(runner) if variant == "auto" else None
        chosen, reason = choose_variant(probes, variant, default)
        return cls(chosen, runner, reason=reason, fault=fault)

    @property
    def name(self) -> str:
        return f"iptables-{self.variant}"

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        return self.renders.get(plan, family, render_cell)

    def read(self, family: int) -> OwnedState:
        """Our state in the kernel, read in full only when the kernel may have changed.

        Each variant has an exact, cheap token of its table (see `generation`): nft its
        generation id, legacy a token of the table the kernel hands out.  A state read at the
        current token is still the kernel's (see `memory`).  A legacy table with no rule and
        no user chain holds nothing of ours: no save at all for a family without containers.
        """
        memory = self.memory
        probe = memory.open(self.runner)
        if probe is None:
            return self.read_full(family)
        if self.variant == "nft":
            generation = probe.generation()
            if generation is not None:
                known = memory.recall(family, generation)
                if known is not None:
                    return known
            state = self.read_full(family)
            consistent = generation is not None and probe.generation() == generation
            memory.remember(family, generation if consistent else None, state)
            return state
        if probe.legacy_entries(family) == EMPTY_FILTER_ENTRIES:
            return OwnedState(family, {})
        if family in memory.states:  # else there is nothing to recall: no token to take first
            known = memory.recall(family, probe.legacy_token(family))
            if known is not None:
                return known
        return self._read_legacy(probe, family)

    def _read_legacy(self, probe: KernelProbe, family: int) -> OwnedState:
        """Save the table and take its token under the xtables lock, so both describe one table:
        iptables-legacy-save does not lock, every well-behaved writer does.  The lock is only
        tried, never waited for (a read must not queue behind other programs' writes, nor
        make them queue long): when it is busy, a plain save, and nothing remembered."""
        with xtables_lock(wait=0) as held:
            state = self.read_full(family)
            token = probe.legacy_token(family, relayout=True) if held else None
        self.memory.remember(family, token, state)
        return state

    def will_write(self, family: int) -> None:
        """Another writer of this backend's tables (libiptc) is about to change `family`'s:
        what was remembered of it no longer holds."""
        self.memory.states.pop(family, None)

    def read_full(self, family: int) -> OwnedState:
        """`iptables-save` and its parse, whatever is remembered."""
        cmd = tool(self.variant, family, "save")
        res = self.runner.run([cmd, "-t", "filter"])
        if res.returncode != 0:
            raise ReadError(f"{cmd} failed (exit {res.returncode}): {_first(res.stderr)}")
        if "incompatible" in res.stderr.lower():
            raise ReadError(f"{cmd}: {_first(res.stderr)}")
        return parse_save(res.stdout, family)

    def delta(
        self,
        desired: Ruleset,
        observed: OwnedState,
        last: Ruleset | None,
        *,
        heal_drift: bool = True,
    ) -> IptablesDelta:
        """compute_delta, once per set of inputs: an idle cycle passes the very objects of
        the cycle before (the render cache's rulesets, the state its read recalled)."""
        inputs = (desired, observed, last, heal_drift)
        known = self.memory.deltas.get(observed.family)
        if known is not None and all(a is b for a, b in zip(known[0], inputs, strict=True)):
            return known[1]
        delta = compute_delta(desired, observed, last, heal_drift=heal_drift)
        self.memory.deltas[observed.family] = (inputs, delta)
        return delta

    def apply(self, delta: IptablesDelta) -> None:
        if delta.empty:
            return
        text = delta.text()
        if self.fault is not None:
            text = self.fault(delta.family, text)
        cmd = tool(self.variant, delta.family, "restore")
        ensure_ipsets(self.runner, referenced_ipsets(text))  # grants by name need their sets
        memory = self.memory
        before = memory.generation() if self.variant == "nft" and self.fault is None else None
        res = self.runner.run([cmd, "--noflush", f"--wait={self.wait_seconds}"], stdin=text)
        if res.returncode == 0:
            if self.variant == "nft":
                memory.applied(delta, before, memory.generation() if before is not None else None)
            else:  # a legacy table is its own token: only this family's moved
                memory.states.pop(delta.family, None)
            return
        memory.forget()
        line, where = _error_line(res.stderr, text)
        raise ApplyError(
            f"{cmd} refused the transaction (exit {res.returncode}){where}: "
            f"{_first(res.stderr)}; nothing was changed",
            line,
            text,
        )

    def verify(self, desired: Ruleset, delta: IptablesDelta) -> None:
        observed = self._proven(desired, delta)
        if observed is None and self.variant == "legacy" and rewrites_most(desired.chains, delta):
            observed = self.read_full(delta.family)
        elif observed is None:
            observed = self.read(delta.family)
        problems = check_applied(desired, delta, observed)
        if problems:
            self.memory.forget()
            raise VerifyError(
                f"ipv{delta.family}: after apply the kernel differs: " + "; ".join(problems[:5])
            )

    def _proven(self, desired: Ruleset, delta: IptablesDelta) -> OwnedState | None:
        """The kernel's state after our transaction without a full read, when the generation
        id shows it was the only change (see `memory`); None when that cannot be shown."""
        memory = self.memory
        family = delta.family
        expected = memory.expected.pop(family, None)
        if expected is None or expected[2] is not delta:
            return None
        generation, before, _ = expected
        if memory.generation() != generation:
            return None
        unshaped = memory.unshaped(desired.chains, delta.written)
        if len(unshaped) > MAX_LISTED:
            return None
        state = after_delta(before, delta)
        if state is None:
            return None
        chains = dict(state.chains)
        for name in unshaped:
            listed = self._list_chain(family, name)
            if listed is None:
                return None
            chains[name] = listed
            memory.learn(name, listed)
        if unshaped:
            if memory.generation() != generation:
                return None
            state = replace(state, chains=chains)
        memory.remember(family, generation, state, read=False)
        return state

    def _list_chain(self, family: int, name: str) -> tuple[str, ...] | None:
        """One chain's rules in save form (`iptables -S CHAIN`) without its ownership
        marker, or None if it cannot be listed or has no marker."""
        cmd = f"{'iptables' if family == 4 else 'ip6tables'}-{self.variant}"
        res = self.runner.run([cmd, "-w", str(self.wait_seconds), "-S", name])
        if res.returncode != 0:
            return None
        head = f"-A {name}"
        lines = (line.rstrip() for line in res.stdout.splitlines())
        rules = [x for x in lines if x == head or x.startswith(head + " ")]
        kept = [x for x in rules if not is_marker(name, x)]
        return tuple(kept) if len(kept) < len(rules) else None


def _first(stderr: str) -> str:
    """The meaningful part of a tool's stderr (it ends with a `Try ... --help` line)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip() and not x.startswith("Try `")]
    return " / ".join(lines) if lines else "(no message)"


def _error_line(stderr: str, text: str) -> tuple[int | None, str]:
    m = _ERROR_LINE.search(stderr)
    if m is None:
        return None, ""
    line = int(m.group(1))
    lines = text.splitlines()
    shown = lines[line - 1] if 0 < line <= len(lines) else ""
    return line, f" at line {line} ({shown[:160]!r})" if shown else f" at line {line}"


if TYPE_CHECKING:  # the type checker holds the backend to the contract

    def _satisfies(b: IptablesBackend) -> Backend[Ruleset, OwnedState, IptablesDelta]:
        return b
