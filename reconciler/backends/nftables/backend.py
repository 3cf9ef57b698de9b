"""The nftables backend: `nft -j` to read, one `nft -j -f -` transaction per family to write.

Our rules live in a table of their own, `inet asgctl` (see `nftables.render` for the
layout and for why it hooks in at priority filter - 1 and rejects rather than drops or merely
accepts).  Nothing outside that table is ever written: iptables (legacy or nft) and other
programs' nft tables keep their rules and their own say over every packet.  The table has no
global lock to share, unlike iptables-restore's.  (The agent's DNS interception is not this
backend's: its hold lives in iptables-nft's `mangle` table, `reconciler.fqdn.hold`, because
this kernel refuses nft's own `queue`.)

Reading back has two depths:

* full: `nft -j -n list table inet asgctl`, every set element included, so drift anywhere in
  the table is found and repaired, as the iptables backend does;
* terse: `nft -j -n -t list ruleset` (chains, rules and set headers, no elements) plus the
  dispatch map's elements.  At a million rules a full listing costs tens of seconds and a
  terse one a tenth of a second, because the elements are where the rules are.  Group sets
  are named by their content and never edited, so their elements are checked when written
  (verify reads them back) and audited by a periodic full read (as Calico's refresh timer
  and kube-proxy's periodic full syncs do).

`read_elements=None` (the default) chooses: full reads while the table is small (under
`auto_limit` elements, both families', at this family's last full read), and once it is
large, terse reads with a full one per family every `audit_seconds`.  True or False forces
one depth.

Most cycles list nothing at all.  The kernel numbers every committed nftables transaction
(the generation id, `generation.KernelProbe`); a state read at the current id is still
exact, and after our own transaction, if the id moved by exactly one, the kernel holds what
we read with our delta applied (`state_after`), provided the kernel has printed rules of the
same shapes back as rendered before (otherwise verify lists, and learns).  Any other
program's transaction, in any table, moves the id and the next read lists again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from reconciler.backends.contract import Backend
from reconciler.backends.errors import ApplyError, DataplaneError, ReadError, VerifyError
from reconciler.backends.kernel.runner import Runner
from reconciler.backends.nftables.delta import (
    NftDelta,
    check_applied,
    compute_nft_delta,
    slice_size,
    state_after,
)
from reconciler.backends.nftables.memory import NftMemory
from reconciler.backends.nftables.parse import NftState, parse_listing, parse_set_listing
from reconciler.backends.nftables.render import (
    NFT_FAMILY,
    TABLE,
    NftRuleset,
    NftSet,
    dispatch_map,
)
from reconciler.backends.nftables.rendercache import RenderCache
from reconciler.core.cellplan import CellPlan

_INDEX = re.compile(r"at index (\d+)")
VERIFY_SAMPLE = 8
"""After a terse read, how many written sets verify lists element by element (each costs a
process); a full read audits the rest."""
_NO_SET = NftSet("", ())
REUSE_SECONDS = 2.0


@dataclass(eq=False)
class NftablesBackend:
    """Converges our table with the `nft` command, in JSON both ways.

    A handle, not a value: it keeps what it learned of the kernel (`_memory`, the last
    listing, the last audit) for its whole life, so it is mutable and compares by identity.

    `fault` rewrites each transaction just before it is sent: a test hook to prove that a
    failing transaction leaves everything as it was.  `remember=False` makes every read list
    the kernel (no generation-id shortcut).
    """

    runner: Runner = field(default_factory=Runner)
    read_elements: bool | None = None
    fault: Callable[[int, str], str] | None = None
    nft: str = "nft"
    reason: str = ""
    auto_limit: int = 50_000
    audit_seconds: float = 600.0
    remember: bool = True
    _audits: dict[int, tuple[float, int]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    _shared: dict[str, tuple[float, bool, str, int | None]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    renders: RenderCache = field(default_factory=RenderCache, compare=False, repr=False)
    _memory: NftMemory = field(default_factory=NftMemory, init=False, compare=False, repr=False)

    @classmethod
    def open(
        cls,
        variant: str = "auto",
        runner: Runner | None = None,
        *,
        read_elements: bool | None = None,
        fault: Callable[[int, str], str] | None = None,
        remember: bool = True,
    ) -> NftablesBackend:
        """A backend for this host, after checking that `nft` runs and speaks JSON.

        `variant` is accepted for symmetry with the iptables backends and ignored: nft has
        one flavour.
        """
        runner = runner or Runner()
        res = runner.run(["nft", "-j", "list", "tables"])
        if res.returncode != 0:
            raise DataplaneError(f"nft is not usable here (exit {res.returncode}): {_msg(res)}")
        try:
            json.loads(res.stdout)
        except ValueError:
            raise DataplaneError(
                "nft does not print JSON (nftables 0.9.3 or newer needed)"
            ) from None
        return cls(runner, read_elements, fault, reason="nft with JSON", remember=remember)

    @property
    def name(self) -> str:
        return "nftables"

    def render(self, plan: CellPlan, family: int) -> NftRuleset:
        return self.renders.get(plan, family)

    def _generation(self) -> int | None:
        """The kernel's generation id now; None when unknown or not to be used."""
        if not self.remember:
            return None
        self._memory.open(self.runner)
        return self._memory.generation()

    def full_read_due(self, family: int) -> bool:
        """Whether the next read of `family` lists every element (see the module doc)."""
        if self.read_elements is not None:
            return self.read_elements
        last = self._audits.get(family)
        if last is None:
            return True
        when, elements = last
        return elements < self.auto_limit or time.monotonic() - when >= self.audit_seconds

    def read(self, family: int) -> NftState:
        """One family's slice: remembered if the generation id says it is still exact, else
        listed (and the IPv6 read of a cycle reuses the IPv4 listing, see `_listing`)."""
        memory = self._memory
        full = self.full_read_due(family)
        generation = self._generation()
        hit = memory.states.get(family)
        fresh = generation is not None and hit is not None and hit[0] == generation
        if fresh and hit is not None and (hit[1].elements_read or not full):
            return hit[1]
        state = memory.intern(self._list_state(family, full, generation))
        if generation is not None and self._generation() == generation:
            memory.states[family] = (generation, state)
            memory.learn(state)
        else:
            memory.states.pop(family, None)
        return state

    def _list_state(self, family: int, full: bool, generation: int | None) -> NftState:
        text = self._listing(family, full, generation)
        if full:
            state = parse_listing(text, family)
            elements = slice_size(state)[1] + state.other_elements
            self._audits[family] = (time.monotonic(), elements)
            return state
        state = parse_listing(text, family, elements_read=False)
        dispatch = dispatch_map(family)
        if dispatch not in state.sets:
            return state
        sets = dict(state.sets)
        sets[dispatch] = self._read_set(dispatch, "map")
        return replace(state, sets=sets)

    def _listing(self, family: int, full: bool, generation: int | None) -> str:
        """The table's listing (full) or the ruleset's (terse), as JSON text.

        One listing holds both families, so a listing serves the next read of the other
        family, once: when the generation id is unchanged since it was taken (exact), or,
        without generation ids, when the IPv6 read follows within `REUSE_SECONDS` the IPv4
        read or verify that took it, with no transaction of ours in between (converge reads
        IPv4 then IPv6, one after the other).  An IPv4 read never takes an old listing
        without a generation id to vouch for it, so no cycle starts from one.
        """
        cached = self._shared.pop("listing", None)
        if cached is not None:
            when, depth, text, taken = cached
            same = generation is not None and taken == generation
            recent = generation is None and family != 4 and time.monotonic() - when <= REUSE_SECONDS
            if (depth or not full) and (same or recent):
                return text
        if full:
            res = self.runner.run([self.nft, "-j", "-n", "list", "table", NFT_FAMILY, TABLE])
            if res.returncode == 0:
                text = res.stdout
            elif self._table_absent():
                text = '{"nftables": []}'
            else:
                raise ReadError(f"nft list table failed (exit {res.returncode}): {_msg(res)}")
        else:
            res = self.runner.run([self.nft, "-j", "-n", "-t", "list", "ruleset"])
            if res.returncode != 0:
                raise ReadError(f"nft list ruleset failed (exit {res.returncode}): {_msg(res)}")
            text = res.stdout
        if family == 4 or generation is not None:
            self._shared["listing"] = (time.monotonic(), full, text, generation)
        return text

    def _read_set(self, name: str, kind: str = "set") -> NftSet:
        res = self.runner.run([self.nft, "-j", "-n", "list", kind, NFT_FAMILY, TABLE, name])
        if res.returncode != 0:
            raise ReadError(f"nft list {kind} {name} failed (exit {res.returncode}): {_msg(res)}")
        return parse_set_listing(res.stdout, name)

    def _table_absent(self) -> bool:
        """Whether our table does not exist (a failed listing alone could mean anything)."""
        res = self.runner.run([self.nft, "-j", "list", "tables"])
        if res.returncode != 0:
            return False
        try:
            items = json.loads(res.stdout)["nftables"]
        except (ValueError, KeyError, TypeError):
            return False
        return not any(
            isinstance(x, dict)
            and isinstance(x.get("table"), dict)
            and x["table"].get("family") == NFT_FAMILY
            and x["table"].get("name") == TABLE
            for x in items
        )

    def delta(
        self,
        desired: NftRuleset,
        observed: NftState,
        last: NftRuleset | None,
        *,
        heal_drift: bool = True,
    ) -> NftDelta:
        self._memory.pending[observed.family] = (desired, observed)
        self._memory.interned[observed.family] = desired.sets
        return compute_nft_delta(desired, observed, last, heal_drift=heal_drift)

    def apply(self, delta: NftDelta) -> None:
        if delta.empty:
            return
        text = delta.text()
        memory = self._memory
        before = self._generation()
        if self.fault is not None:
            text = self.fault(delta.family, text)
            before = None  # what was sent is not what the delta says
        res = self.runner.run([self.nft, "-j", "-f", "-"], stdin=text)
        if res.returncode == 0:
            self._shared.pop("listing", None)  # what was listed before is history now
            self._remember(delta, before, self._generation())
            return
        memory.states.clear()
        line, where = None, ""
        m = _INDEX.search(res.stderr)
        if m is not None:
            line = int(m.group(1)) + 1
            ops = delta.ops
            shown = ops[line - 1] if 0 < line <= len(ops) else ""
            where = f" at command {line}" + (f" ({shown[:160]})" if shown else "")
        raise ApplyError(
            f"nft refused the transaction (exit {res.returncode}){where}: {_msg(res)}; "
            "nothing was changed",
            line,
            text,
        )

    def _remember(self, delta: NftDelta, before: int | None, after: int | None) -> None:
        """After our transaction: the state it left, if nothing else can have changed."""
        memory = self._memory
        family = delta.family
        desired, observed = memory.pending.pop(family, (None, None))
        hit = memory.states.get(family)
        exact = (
            before is not None
            and after == before + 1
            and desired is not None
            and hit is not None
            and hit[0] == before
            and hit[1] is observed
            and memory.trusted(desired, delta)
        )
        if not exact or after is None or observed is None or desired is None:
            memory.states.clear()
            return
        state = state_after(observed, desired, delta)
        memory.states[family] = (after, state)
        other = 6 if family == 4 else 4
        theirs = memory.states.get(other)
        if theirs is not None and theirs[0] == before:
            objects, elements = slice_size(state)
            memory.states[other] = (
                after,
                replace(
                    theirs[1],
                    other_slice=objects,
                    other_elements=elements,
                    table=state.table,  # the table is shared: created or deleted for both
                    table_flags=state.table_flags,
                ),
            )
        else:
            memory.states.pop(other, None)

    def verify(self, desired: NftRuleset, delta: NftDelta) -> None:
        observed = self.read(delta.family)
        if not observed.elements_read:
            unread = [
                n
                for n in delta.written
                if n in desired.sets and observed.sets.get(n, _NO_SET).elements is None
            ]
            if len(unread) > VERIFY_SAMPLE:
                unread = unread[:: max(1, len(unread) // VERIFY_SAMPLE)][:VERIFY_SAMPLE]
            if unread:
                sets = dict(observed.sets)
                for name in unread:
                    sets[name] = self._read_set(name, "map" if desired.sets[name].data else "set")
                    self._memory.kinds.add(sets[name].header)
                observed = replace(observed, sets=sets)
        problems = check_applied(desired, delta, observed)
        if problems:
            raise VerifyError(
                f"ipv{delta.family}: after apply the kernel differs: " + "; ".join(problems[:5])
            )


def _msg(res: object) -> str:
    """The meaningful part of nft's stderr (`internal:0:0-0: Error: ...`)."""
    stderr = getattr(res, "stderr", "")
    lines = [x.strip().removeprefix("internal:0:0-0: ") for x in stderr.splitlines() if x.strip()]
    return " / ".join(lines) if lines else "(no message)"


if TYPE_CHECKING:  # the type checker holds the backend to the contract

    def _satisfies(b: NftablesBackend) -> Backend[NftRuleset, NftState, NftDelta]:
        return b
