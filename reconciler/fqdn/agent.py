"""The agent's side of names: one `FqdnService` per agent, fed the applied plan.

Kept out of the agent loop so the loop only calls `follow`, `status`, `update_metrics`,
`start` and `stop`.  The service starts lazily, with the first applied plan that uses a name:
an agent whose policies have no names runs no resolver, writes no set and shows nothing.
"""

from __future__ import annotations

import threading
from typing import Protocol

from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.kernelsets import IpsetWriter, NftWriter, SetWriter
from reconciler.fqdn.service import FqdnService


class MetricSink(Protocol):
    def set(self, name: str, value: float, **labels: str) -> None: ...


class AgentNames:
    """Which names the applied plan uses, kept resolved in the kernel sets of `backend`."""

    def __init__(self, settings: FqdnSettings, backend: str, netns: str | None) -> None:
        self.settings = settings
        self.backend = backend
        self.netns = netns
        self.service: FqdnService | None = None
        self._sets: tuple[tuple[int, str, str], ...] = ()
        self._lock = threading.Lock()
        self._running = False

    def _writer(self) -> SetWriter:
        runner = Runner.in_netns(self.netns) if self.netns else Runner()
        return NftWriter(runner) if self.backend == "nftables" else IpsetWriter(runner)

    def follow(self, plan: CellPlan | None) -> None:
        """After a cycle: keep the names of the plan now in the kernel (cheap when unchanged)."""
        sets = plan.name_sets() if plan is not None else ()
        with self._lock:
            if sets == self._sets:
                return
            self._sets = sets
            if self.service is None:
                if not sets:
                    return
                self.service = FqdnService(self._writer(), self.settings, netns=self.netns)
                if self._running:
                    self.service.start()
        assert self.service is not None
        self.service.want(plan if plan is not None else CellPlan("", (), (), 0))
        if not self._running:  # a one-shot agent (--once) resolves here, once
            self.service.refresh(everything=True)

    def start(self) -> None:
        with self._lock:
            self._running = True
            if self.service is not None:
                self.service.start()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            service = self.service
        if service is not None:
            service.stop()

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
