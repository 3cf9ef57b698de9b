"""The per-name kernel sets: created with the ruleset, filled from DNS answers.

One set per name and family (`cellplan.name_set`), shared by every rule that grants the
name; the rules restrict it to their protocol and ports, so an address in the set widens
nothing else.  Elements carry a timeout (the record's TTL, clamped), so the kernel drops
an address when nobody renews it: a resolver outage keeps the last addresses until their
TTL, then they go.  Writing elements is a transaction of its own, never part of a ruleset
transaction: chains are not rewritten when a name's addresses change.

iptables: ipsets (`hash:net`, `timeout`), which `-m set --match-set` rules reference; the
ruleset transaction cannot create them, so `ensure_ipsets` makes those it references first.
nftables: sets flagged `timeout` in our table, created by the ruleset transaction itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import NAME_SET_PREFIX

KERNEL_MAXELEM = 65536
"""ipset's own bound on a name's set: a backstop only; `fqdn-max-ips` (default 1,024) is
what the agent enforces, with a metric, before the kernel would refuse."""
IPSET_DEFAULT_TIMEOUT = 300
"""The default timeout ipset needs to enable per-element timeouts; every element we add
gives its own."""
_REFERENCED = re.compile(rf"--match-set ({NAME_SET_PREFIX}([46])-[0-9a-f]+) dst")


def referenced_ipsets(text: str) -> dict[str, int]:
    """The name sets an iptables-restore transaction references, with their families.

    Our renderer writes set names only from hashes (`asgn4-<hex>`), so this pattern finds
    exactly ours and nothing a policy author wrote."""
    return {m.group(1): int(m.group(2)) for m in _REFERENCED.finditer(text)}


def ipset_create(name: str, family: int) -> str:
    """The `ipset restore` line that creates a name's set (what `render` shows, too)."""
    return (
        f"create {name} hash:net family {'inet' if family == 4 else 'inet6'} "
        f"timeout {IPSET_DEFAULT_TIMEOUT} maxelem {KERNEL_MAXELEM}"
    )


def ensure_ipsets(runner: Runner, sets: Mapping[str, int]) -> None:
    """Create the ipsets a transaction needs (existing ones are left as they are)."""
    if not sets:
        return
    lines = [ipset_create(name, family) for name, family in sorted(sets.items())]
    res = runner.run(["ipset", "restore", "-exist"], stdin="\n".join(lines) + "\n")
    if res.returncode != 0:
        raise DataplaneError(f"ipset could not create the name sets: {res.stderr.strip()}")


@dataclass(frozen=True, slots=True)
class Write:
    """Addresses to (re)add to one set, each with its timeout in seconds."""

    set_name: str
    family: int
    elements: tuple[tuple[str, int], ...]


class ElementWriter(Protocol):
    """What writes elements: a process per transaction (`IpsetWriter`, `NftWriter`) or a
    kept-open netlink socket (`netlinksets.NetlinkSets`, the interception's path)."""

    def write(self, writes: Iterable[Write]) -> None: ...


class SetWriter(ElementWriter, Protocol):
    """What the agent needs of a backend's name sets."""

    def members(self, set_name: str) -> dict[str, int] | None:
        """Addresses in the set with their seconds left; None when the set does not exist."""
        ...

    def prune(self, keep: Iterable[str]) -> None:
        """Remove our name sets not in `keep` (those the ruleset no longer references)."""
        ...


@dataclass(frozen=True)
class IpsetWriter:
    runner: Runner

    def write(self, writes: Iterable[Write]) -> None:
        lines = [
            f"add {w.set_name} {address} timeout {max(1, timeout)}"
            for w in writes
            for address, timeout in w.elements
        ]
        if not lines:
            return
        # -exist: adding an address already there renews its timeout.
        res = self.runner.run(["ipset", "restore", "-exist"], stdin="\n".join(lines) + "\n")
        if res.returncode != 0:
            raise DataplaneError(f"ipset refused the name set update: {res.stderr.strip()}")

    def members(self, set_name: str) -> dict[str, int] | None:
        res = self.runner.run(["ipset", "save", set_name])
        if res.returncode != 0:
            return None
        out: dict[str, int] = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "add" and parts[1] == set_name:
                left = parts[parts.index("timeout") + 1] if "timeout" in parts else "0"
                out[parts[2].removesuffix("/32").removesuffix("/128")] = int(left)
        return out

    def prune(self, keep: Iterable[str]) -> None:
        res = self.runner.run(["ipset", "list", "-n"])
        if res.returncode != 0:
            return
        wanted = set(keep)
        for name in res.stdout.split():
            ours = _REFERENCED.fullmatch(f"--match-set {name} dst") is not None
            if ours and name not in wanted:
                # Refused while a rule still references it: tried again next time.
                self.runner.run(["ipset", "destroy", name])


@dataclass(frozen=True)
class NftWriter:
    runner: Runner
    table: str = "asgctl"
    family: str = "inet"

    def _ref(self, name: str) -> dict[str, Any]:
        return {"family": self.family, "table": self.table, "name": name}

    def write(self, writes: Iterable[Write]) -> None:
        commands: list[dict[str, Any]] = []
        for w in writes:
            if not w.elements:
                continue
            fresh = [{"elem": {"val": a, "timeout": max(1, t)}} for a, t in w.elements]
            keys = [a for a, _ in w.elements]
            # add (so delete finds it), delete, add: renews the timeout on every kernel,
            # atomically (one transaction: no packet sees the address missing).
            commands.append({"add": {"element": {**self._ref(w.set_name), "elem": keys}}})
            commands.append({"delete": {"element": {**self._ref(w.set_name), "elem": keys}}})
            commands.append({"add": {"element": {**self._ref(w.set_name), "elem": fresh}}})
        if not commands:
            return
        res = self.runner.run(["nft", "-j", "-f", "-"], stdin=json.dumps({"nftables": commands}))
        if res.returncode != 0:
            raise DataplaneError(f"nft refused the name set update: {res.stderr.strip()}")

    def members(self, set_name: str) -> dict[str, int] | None:
        res = self.runner.run(["nft", "-j", "list", "set", self.family, self.table, set_name])
        if res.returncode != 0:
            return None
        out: dict[str, int] = {}
        for item in json.loads(res.stdout).get("nftables", []):
            for elem in item.get("set", {}).get("elem", []) if isinstance(item, dict) else []:
                body = elem.get("elem", elem) if isinstance(elem, dict) else elem
                if isinstance(body, dict):
                    out[str(body.get("val"))] = int(body.get("expires", 0))
                else:
                    out[str(body)] = 0
        return out

    def prune(self, keep: Iterable[str]) -> None:
        """Nothing to do: the ruleset transaction creates and deletes nft sets itself."""
