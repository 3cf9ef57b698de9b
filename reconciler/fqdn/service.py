"""The agent's resolver of names: asks the cell's DNS servers and keeps the name sets.

I/O around the pure `keeper`: which names a plan uses (`want`), resolving those due
(`refresh`), writing their sets (`kernelsets`), and what status and metrics show.  It runs
on a thread of its own (`start`), because a name's refresh (TTL/2, as short as a second)
does not wait for the agent's cycle; the set writes are transactions of their own and never
touch the chains the cycle converges.

Queries are sent from the namespace the dataplane enforces (`netns`, the lab's cell), so
they reach the resolvers a real cell's containers use.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel.nsthread import run_in_netns
from reconciler.core.cellplan import CellPlan, name_set
from reconciler.fqdn.dns import QTYPE_A, QTYPE_AAAA, Answer, Client, DnsError, resolv_conf_servers
from reconciler.fqdn.keeper import FqdnSettings, NameState, due, on_answer, on_failure, usable
from reconciler.fqdn.kernelsets import ElementWriter, SetWriter, Write

WRITE_BATCH = 256
"""Names whose answers go to the kernel in one set transaction."""


def parse_server(text: str) -> tuple[str, int]:
    """`198.18.0.53`, `198.18.0.53:5353`, `fd00::53` or `[fd00::53]:5353`."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ipaddress.ip_address(host)  # ValueError for anything that is not an address
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def cell_resolvers(settings: FqdnSettings, resolv_conf: str = "/etc/resolv.conf") -> list[Client]:
    """Clients for the configured resolvers, else the cell's resolv.conf nameservers."""
    servers = [parse_server(s) for s in settings.resolvers]
    if not servers:
        try:
            with open(resolv_conf, encoding="utf-8") as f:
                servers = [(s, 53) for s in resolv_conf_servers(f.read())]
        except OSError:
            servers = []
    return [Client(host, port, settings.timeout) for host, port in servers]


@dataclass
class FqdnMetrics:
    resolutions: int = 0
    failures: int = 0
    capped: dict[str, int] = field(default_factory=dict)
    """Per name: answers that hit fqdn-max-ips."""
    write_errors: int = 0


class FqdnService:
    """Keeps every exact name a plan uses resolved and its sets filled."""

    def __init__(
        self,
        writer: SetWriter,
        settings: FqdnSettings | None = None,
        *,
        netns: str | None = None,
        clients: list[Client] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.settings = settings or FqdnSettings()
        self.netns = netns
        self.clients = clients if clients is not None else cell_resolvers(self.settings)
        self.clock = clock
        self.metrics = FqdnMetrics()
        self._states: dict[tuple[int, str], NameState] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what to keep --------------------------------------------------------------------

    def want(self, plan: CellPlan) -> None:
        """Keep the names this (applied) plan uses; forget the rest and prune their sets.

        Called after the plan's ruleset is in the kernel, so every set written exists."""
        wanted = {(family, fqdn): name_set(family, sid) for family, fqdn, sid in plan.name_sets()}
        with self._lock:
            states = {k: s for k, s in self._states.items() if k in wanted}
            for key, set_name in wanted.items():
                if key not in states:
                    states[key] = NameState(key[1], key[0], set_name)
            self._states = states
        try:
            self.writer.prune(wanted.values())
        except DataplaneError:
            self.metrics.write_errors += 1
        self._wake.set()

    # -- resolving -----------------------------------------------------------------------

    def _ask(self, fqdn: str, qtype: int) -> Answer:
        errors = []
        for client in self.clients:
            try:
                if self.netns is None:
                    return client.query(fqdn, qtype)
                return run_in_netns(self.netns, client.query, fqdn, qtype)
            except (DnsError, OSError) as exc:
                errors.append(f"{client.server}: {exc}")
        raise DnsError("; ".join(errors) or "no resolvers configured")

    def refresh(self, now: float | None = None, *, everything: bool = False) -> int:
        """Resolve every due name once (`everything`: every exact name, due or not, as
        after a plan change); returns how many were asked.

        Set writes are batched, WRITE_BATCH names to one transaction (one process): a cell
        with thousands of names would otherwise start a process per name per refresh."""
        with self._lock:
            todo = due(self._states, float("inf") if everything else (now or self.clock()))
        pending: list[tuple[NameState, NameState, Write]] = []
        for state in todo:
            at = self.clock() if now is None else now
            qtype = QTYPE_A if state.family == 4 else QTYPE_AAAA
            try:
                answer = self._ask(state.fqdn, qtype)
            except DnsError as exc:
                self.metrics.failures += 1
                self._store(on_failure(state, str(exc), at, self.settings))
                continue
            self.metrics.resolutions += 1
            new, write, hit = on_answer(state, answer.addresses, answer.ttl, at, self.settings)
            if hit:
                self.metrics.capped[state.fqdn] = self.metrics.capped.get(state.fqdn, 0) + 1
            pending.append((state, new, write))
            if len(pending) >= WRITE_BATCH:
                self._flush(pending, at)
                pending = []
        self._flush(pending, self.clock() if now is None else now)
        return len(todo)

    def _flush(self, pending: list[tuple[NameState, NameState, Write]], at: float) -> None:
        """Write a batch of answers to the kernel, then record them.  A failed write records
        nothing of the answers (the kernel holds what it held): the names keep their
        addresses and TTLs, carry the error, and are asked again after fqdn-min-ttl."""
        if not pending:
            return
        try:
            self.writer.write([w for _, _, w in pending])
        except DataplaneError as exc:
            self.metrics.write_errors += 1
            retry = at + self.settings.min_ttl
            for old, _, _ in pending:
                self._store(replace(old, error=str(exc), next_refresh=retry))
            return
        for _, new, _ in pending:
            self._store(new)

    def _store(self, new: NameState) -> None:
        with self._lock:
            key = (new.family, new.fqdn)
            current = self._states.get(key)
            if current is not None:  # still wanted (a new plan may have dropped it)
                # What the interception learned while this answer was asked is kept too.
                merged = dict(current.addresses)
                merged.update(new.addresses)
                self._states[key] = replace(new, addresses=tuple(merged.items()))

    def learn(
        self,
        fqdn: str,
        family: int,
        addresses: tuple[str, ...],
        ttl: int,
        writer: ElementWriter | None = None,
    ) -> Write | None:
        """An answer a container received for a name it is granted (the interception):
        the same keeper rules as our own answers (TTL clamp, fqdn-max-ips, refused
        addresses), written through `writer` (the interception's kept-open netlink path)
        before this returns.  None when the plan does not use the name in that family (no
        set to fill).  Raises DataplaneError when the kernel refuses the write (nothing is
        recorded then)."""
        with self._lock:
            state = self._states.get((family, fqdn))
            if state is None:
                return None
            new, write, hit = on_answer(state, addresses, ttl, self.clock(), self.settings)
            # The schedule is our resolution's: an interception does not postpone it.
            new = replace(
                new,
                next_refresh=state.next_refresh,
                resolved_at=state.resolved_at,
                error=state.error,
            )
            if write.elements:
                (writer or self.writer).write([write])
            if hit:
                self.metrics.capped[fqdn] = self.metrics.capped.get(fqdn, 0) + 1
            self._states[(family, fqdn)] = new
        return write

    def holds(self, fqdn: str, family: int, addresses: tuple[str, ...], margin: float) -> bool:
        """Whether every address of an answer that may enter the name's set is in it for at
        least `margin` seconds more: then the container can connect at once, and the
        answer's renewal need not be written before the answer is released."""
        with self._lock:
            state = self._states.get((family, fqdn))
            if state is None:
                return True  # the plan has no set for it: nothing would be written
            live = dict(state.live(self.clock() + margin))
        return all(a in live for a in addresses if usable(a))

    def next_due(self) -> float | None:
        with self._lock:
            times = [s.next_refresh for s in self._states.values() if not s.wildcard]
        return min(times) if times else None

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fqdn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # never let the thread die: its names would lapse unseen
                self.metrics.failures += 1
            nxt = self.next_due()
            wait = 60.0 if nxt is None else max(0.05, nxt - self.clock())
            self._wake.wait(min(wait, 60.0))
            self._wake.clear()

    # -- what it shows -------------------------------------------------------------------

    def status(self) -> list[dict[str, object]]:
        """Each name's current addresses on this cell (bounded), for the status branch."""
        now = self.clock()
        with self._lock:
            states = sorted(self._states.values(), key=lambda s: (s.fqdn, s.family))
        return [s.to_dict(now) for s in states]

    def counts(self) -> list[tuple[str, int, int]]:
        """(fqdn, family, live addresses) of every name kept: the per-name gauge."""
        now = self.clock()
        with self._lock:
            states = sorted(self._states.values(), key=lambda s: (s.fqdn, s.family))
        return [(s.fqdn, s.family, len(s.live(now))) for s in states]
