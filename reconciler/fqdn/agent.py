"""The agent's side of names: one `FqdnService` per agent, fed the applied plan, and the
DNS interception (`Interceptor`) beside it when `fqdn-intercept` is on.

Kept out of the agent loop so the loop only calls `follow`, `status`, `hold_condition`,
`update_metrics`, `start` and `stop`.  Both start lazily, with the first applied plan that
uses a name: an agent whose policies have no names runs no resolver, holds no answer,
writes no set and shows nothing.  The interception runs only in a long-lived agent (not
`--once`): its rules hold answers for a reader, and a one-shot agent would leave none.
Stopping the agent leaves the rules in place: answers are then dropped (fail closed) until
an agent reads them again; `remove` is for taking the interception away.
"""

from __future__ import annotations

import threading
from typing import Protocol

from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.fqdn.hold import DnsHold, variant_for
from reconciler.fqdn.intercept import VERDICT_BUCKETS, Interceptor
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.kernelsets import IpsetWriter, NftWriter, SetWriter
from reconciler.fqdn.service import FqdnService

HOLD: str = "FqdnDnsHold"
"""The condition the status shows while the interception runs: False when answers were
dropped (queue full or overflowed) since the last report, or the interception is down."""


class MetricSink(Protocol):
    def set(self, name: str, value: float, **labels: str) -> None: ...


class AgentNames:
    """Which names the applied plan uses, kept resolved in the kernel sets of `backend`."""

    def __init__(
        self,
        settings: FqdnSettings,
        backend: str,
        netns: str | None,
        *,
        intercept: bool = False,
        variant: str = "auto",
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.netns = netns
        self.variant = variant
        """The iptables variant the backend chose (the hold is written with the same tools)."""
        self.intercept = intercept and settings.intercept
        self.interceptor: Interceptor | None = None
        self.intercept_error = ""
        self.hold_repairs = 0
        """Cycles that found the hold's rules changed by someone else, and wrote them again."""
        self._drops_seen = 0
        self._errors_seen = 0
        self._plan: CellPlan | None = None
        self.service: FqdnService | None = None
        self._sets: tuple[tuple[int, str, str], ...] = ()
        self._lock = threading.Lock()
        self._running = False

    def _runner(self) -> Runner:
        return Runner.in_netns(self.netns) if self.netns else Runner()

    def _writer(self) -> SetWriter:
        runner = self._runner()
        return NftWriter(runner) if self.backend == "nftables" else IpsetWriter(runner)

    def _start_interceptor(self) -> None:
        """With the lock held: start the interception if it should run and does not."""
        if not (self.intercept and self._running and self._sets) or self.service is None:
            return
        if self.interceptor is not None or self._plan is None:
            return
        resolvers = [(c.server, c.port) for c in self.service.clients]
        if not resolvers:
            self.intercept_error = (
                "DNS interception not started: no trusted resolvers "
                "(fqdn-resolvers, or nameserver lines in /etc/resolv.conf)"
            )
            return
        kind = "nftables" if self.backend == "nftables" else "ipset"
        try:
            variant = variant_for(self.backend, self.variant)
            hold = DnsHold(self._runner(), variant, self.settings.intercept_queue)
            interceptor = Interceptor(self.service, hold, kind, resolvers, netns=self.netns)
            interceptor.follow(self._plan)
            interceptor.start()
        except Exception as exc:  # shown as FqdnDnsHold=False; tried again next follow
            self.intercept_error = f"DNS interception not started: {exc}"
            return
        self.intercept_error = ""
        self.interceptor = interceptor

    def follow(self, plan: CellPlan | None) -> None:
        """After a cycle: keep the names of the plan now in the kernel (the resolver's work
        only when they changed), and give the interception the plan's grants every time
        (containers come and go under unchanged names).  Without names, the interception
        stops and its hold goes: holding answers that can teach nothing only delays them."""
        sets = plan.name_sets() if plan is not None else ()
        current = plan if plan is not None else CellPlan("", (), (), 0)
        with self._lock:
            changed = sets != self._sets
            self._sets = sets
            self._plan = current
            if self.service is None:
                if not sets:
                    return
                self.service = FqdnService(self._writer(), self.settings, netns=self.netns)
                if self._running:
                    self.service.start()
            service = self.service
        if changed:
            service.want(current)
        with self._lock:
            if self.interceptor is not None and not sets:
                self.interceptor.stop(remove=True)
                self.interceptor = None
            elif self.interceptor is not None:
                self.interceptor.follow(current)
                if self.interceptor.hold.install(self.interceptor.resolvers, repair=True):
                    self.hold_repairs += 1
            else:  # a first start, or a retry after a failed one
                self._start_interceptor()
        if changed and not self._running:  # a one-shot agent (--once) resolves here, once
            service.refresh(everything=True)

    def start(self) -> None:
        with self._lock:
            self._running = True
            if self.service is not None:
                self.service.start()
            self._start_interceptor()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            service, interceptor, self.interceptor = self.service, self.interceptor, None
        if interceptor is not None:
            interceptor.stop()  # the rules stay: answers are dropped until an agent reads
        if service is not None:
            service.stop()

    def hold_condition(self) -> dict[str, str] | None:
        """The FqdnDnsHold condition while the interception should run; None otherwise."""
        if not (self.intercept and self._running and self._sets and self.service is not None):
            return None
        interceptor = self.interceptor
        if interceptor is None:
            return {
                "type": HOLD,
                "status": "False",
                "reason": "InterceptionDown",
                "message": self.intercept_error or "the DNS interception is not running",
            }
        errors, self._errors_seen = (
            interceptor.metrics.errors - self._errors_seen,
            interceptor.metrics.errors,
        )
        if errors > 0:
            return {
                "type": HOLD,
                "status": "False",
                "reason": "InterceptionFailing",
                "message": f"the verdict thread failed {errors} times since the last report "
                f"(last: {interceptor.metrics.last_error}); held answers wait or are dropped",
            }
        dropped = interceptor.queue_drops()
        total = sum(dropped) if dropped is not None else 0
        new, self._drops_seen = total - self._drops_seen, total
        if new > 0:
            return {
                "type": HOLD,
                "status": "False",
                "reason": "AnswersDropped",
                "message": f"{new} DNS answers to containers dropped since the last report "
                "(the queue was full or the agent could not keep up): their lookups were "
                "retried, nothing was learned from them",
            }
        return {
            "type": HOLD,
            "status": "True",
            "reason": "AnswersHeld",
            "message": "answers to containers are learned before they are released",
        }

    def status(self) -> list[dict[str, object]] | None:
        """Each name's current addresses on this cell (bounded); None without names."""
        return self.service.status() if self.service is not None else None

    def update_metrics(self, m: MetricSink) -> None:
        service = self.service
        if service is None:
            return
        mt = service.metrics
        m.set("asgctl_agent_fqdn_resolutions_total", mt.resolutions)
        m.set("asgctl_agent_fqdn_resolution_failures_total", mt.failures)
        m.set("asgctl_agent_fqdn_set_write_errors_total", mt.write_errors)
        ignored = sum(c.stats.ignored for c in service.clients)
        m.set("asgctl_agent_fqdn_answers_ignored_total", ignored)
        for fqdn, family, count in service.counts():
            m.set("asgctl_agent_fqdn_addresses", count, fqdn=fqdn, family=str(family))
        for fqdn, count in mt.capped.items():
            m.set("asgctl_agent_fqdn_max_ips_hit_total", count, fqdn=fqdn)
        interceptor = self.interceptor
        if interceptor is None:
            return
        im = interceptor.metrics
        for result, count in (
            ("learned", im.learned),
            ("unsolicited", im.unsolicited),
            ("unparsable", im.unparsable),
            ("not-granted", im.not_granted),
        ):
            m.set("asgctl_agent_fqdn_dns_answers_total", count, result=result)
        m.set("asgctl_agent_fqdn_dns_queries_total", im.queries)
        m.set("asgctl_agent_fqdn_dns_hold_repairs_total", self.hold_repairs)
        m.set("asgctl_agent_fqdn_dns_queries_lost_total", im.queries_lost)
        m.set("asgctl_agent_fqdn_dns_write_errors_total", im.write_errors)
        m.set("asgctl_agent_fqdn_dns_queries_evicted_total", interceptor.table.evicted)
        dropped = interceptor.queue_drops() or (0, 0)
        m.set("asgctl_agent_fqdn_dns_dropped_total", dropped[0], reason="queue-full")
        m.set("asgctl_agent_fqdn_dns_dropped_total", dropped[1], reason="socket-overflow")
        for bound, count in zip(VERDICT_BUCKETS, im.verdict_buckets, strict=True):
            m.set("asgctl_agent_fqdn_dns_verdict_seconds_bucket", count, le=f"{bound:g}")
        m.set("asgctl_agent_fqdn_dns_verdict_seconds_bucket", im.verdict_count, le="+Inf")
        m.set("asgctl_agent_fqdn_dns_verdict_seconds_sum", im.verdict_sum)
        m.set("asgctl_agent_fqdn_dns_verdict_seconds_count", im.verdict_count)
