"""Prometheus metrics: a small registry, the text exposition format, a loopback server, a file.

No client library: the agent exports a dozen series, and the text format is a few lines of
code, where a dependency on every cell is not.  The names follow CF's vxlan-policy-agent
where one exists (enforce time, cleanup time, total poll time, rule count), so existing
dashboards have a counterpart:

=====================================================  ======================================
asgctl_agent_sync_duration_seconds{phase}              summary (_sum, _count) per phase
asgctl_agent_last_sync_duration_seconds{phase}         gauge: the last cycle's phases
asgctl_agent_syncs_total{result}                       counter: success | failure
asgctl_agent_sync_failures_total{reason}               counter, by condition reason
asgctl_agent_last_success_timestamp_seconds            gauge (unix time)
asgctl_agent_rules_installed                           gauge: rules (nft: and elements)
asgctl_agent_chains                                    gauge
asgctl_agent_cf_equivalent_rules                       gauge: what CF would install
asgctl_agent_containers                                gauge
asgctl_agent_drift_corrections_total                   counter
asgctl_agent_applied_revision_info{revision,digest}    gauge = 1 (info style)
asgctl_agent_ready                                     gauge: 1 when Ready=True
asgctl_agent_status_pushes_total{result}               counter
asgctl_agent_inventory_rejected_entries{kind}          gauge: store entries skipped | held | shared
asgctl_agent_parity_containers{result}                 gauge (--mode shadow): same | different |
                                                       unknown | no-cf-chain
asgctl_agent_parity_cf_chains_without_container        gauge (--mode shadow)
asgctl_agent_parity_same                               gauge (--mode shadow): 1 when proven
asgctl_agent_flow_packets_total{verdict}               counter: NFLOG packets aggregated
asgctl_agent_flow_records_total                        counter: flow records written
asgctl_agent_flow_drops_total{reason}                  counter: kernel|aggregate-cap|queue|unparsed
asgctl_agent_flow_denied_total{app,space}              counter: denied packets (first 20 pairs,
                                                       the rest app="other",space="other")
asgctl_agent_flow_rule_group_hits_total{group}         counter: log:true rule hits per group
asgctl_agent_flow_unused_rules                         gauge: log:true rules with no flow for
                                                       flow-unused-after (status lists them)
asgctl_agent_fqdn_dns_answers_total{result}            counter: DNS answers to containers held:
                                                       learned | unsolicited | unparsable |
                                                       not-granted
asgctl_agent_fqdn_dns_dropped_total{reason}            counter: answers the kernel dropped:
                                                       queue-full | socket-overflow
asgctl_agent_fqdn_dns_verdict_seconds                  histogram: held answer read -> verdict
=====================================================  ======================================
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler

from reconciler.agent.httpserve import BackgroundServer
from reconciler.atomicfile import atomic_write_text

_HELP = {
    "asgctl_agent_sync_duration_seconds": ("summary", "Time spent per sync phase."),
    "asgctl_agent_last_sync_duration_seconds": ("gauge", "Phases of the last sync, seconds."),
    "asgctl_agent_syncs_total": ("counter", "Sync cycles by result."),
    "asgctl_agent_sync_failures_total": ("counter", "Failed syncs by reason."),
    "asgctl_agent_last_success_timestamp_seconds": (
        "gauge",
        "Unix time of the last sync that left the cell Ready.",
    ),
    "asgctl_agent_rules_installed": (
        "gauge",
        "Rules and set elements the running backend installs for the applied plan (both families).",
    ),
    "asgctl_agent_chains": ("gauge", "Chains the applied plan installs."),
    "asgctl_agent_cf_equivalent_rules": (
        "gauge",
        "Rules Cloud Foundry's layout would install for the same containers.",
    ),
    "asgctl_agent_containers": ("gauge", "Containers in the applied plan."),
    "asgctl_agent_drift_corrections_total": ("counter", "Kernel changes made by others, undone."),
    "asgctl_agent_applied_revision_info": ("gauge", "The applied revision (value is always 1)."),
    "asgctl_agent_ready": ("gauge", "1 when the Ready condition is True."),
    "asgctl_agent_status_pushes_total": ("counter", "Status branch pushes by result."),
    "asgctl_agent_inventory_rejected_entries": (
        "gauge",
        "Container metadata entries not used as written, by what became of them.",
    ),
    "asgctl_agent_parity_containers": (
        "gauge",
        "Shadow mode: containers whose allow set under CF's chains and the plan compare so.",
    ),
    "asgctl_agent_parity_cf_chains_without_container": (
        "gauge",
        "Shadow mode: CF netout chains for an address the container store does not hold.",
    ),
    "asgctl_agent_parity_same": ("gauge", "Shadow mode: 1 when every container is the same."),
    "asgctl_agent_flow_packets_total": ("counter", "Logged packets aggregated, by verdict."),
    "asgctl_agent_flow_records_total": ("counter", "Flow records written."),
    "asgctl_agent_flow_drops_total": ("counter", "Logged packets not recorded, by reason."),
    "asgctl_agent_flow_denied_total": (
        "counter",
        "Denied packets by app and space (the first 20 pairs; the rest as other).",
    ),
    "asgctl_agent_flow_rule_group_hits_total": (
        "counter",
        "Packets accepted by log:true rules, by rule group (the first 200; then other).",
    ),
    "asgctl_agent_flow_unused_rules": (
        "gauge",
        "log:true rules that matched nothing for flow-unused-after (the status branch lists them).",
    ),
    "asgctl_agent_fqdn_dns_answers_total": (
        "counter",
        "DNS answers to containers held by the interception, by what they taught.",
    ),
    "asgctl_agent_fqdn_dns_dropped_total": (
        "counter",
        "DNS answers to containers the kernel dropped (fail closed), by reason.",
    ),
    "asgctl_agent_fqdn_dns_verdict_seconds": (
        "histogram",
        "Time from reading a held DNS answer to its verdict (learning included).",
    ),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Metrics:
    """Thread-safe series store; the loop writes, the HTTP thread renders."""

    def __init__(self, cell: str) -> None:
        self.cell = cell
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = float(value)

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + by

    def replace_info(self, name: str, **labels: str) -> None:
        """An info series has one current label set: drop the old one."""
        with self._lock:
            for key in [k for k in self._values if k[0] == name]:
                del self._values[key]
            self._values[(name, tuple(sorted(labels.items())))] = 1.0

    def observe_timings(self, timings: Mapping[str, float]) -> None:
        for phase, seconds in timings.items():
            self.inc("asgctl_agent_sync_duration_seconds_sum", seconds, phase=phase)
            self.inc("asgctl_agent_sync_duration_seconds_count", 1, phase=phase)
            self.set("asgctl_agent_last_sync_duration_seconds", seconds, phase=phase)

    def get(self, name: str, **labels: str) -> float | None:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))))

    def render(self) -> str:
        """The text exposition format (version 0.0.4), families in a stable order."""
        with self._lock:
            items = sorted(self._values.items())
        by_family: dict[str, list[str]] = {}
        for (name, labels), value in items:
            family = name.removesuffix("_sum").removesuffix("_count").removesuffix("_bucket")
            if family not in _HELP:
                family = name
            labels_out = {"cell": self.cell, **dict(labels)}
            by_family.setdefault(family, []).append(f"{name}{_labels(labels_out)} {_num(value)}")
        lines: list[str] = []
        for family in sorted(by_family):
            kind, text = _HELP.get(family, ("untyped", family))
            lines.append(f"# HELP {family} {text}")
            lines.append(f"# TYPE {family} {kind}")
            lines.extend(by_family[family])
        return "\n".join(lines) + "\n"


class MetricsServer(BackgroundServer):
    """`GET /metrics` on a local address, from a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # scrapes are not log lines
                return

        super().__init__(host, port, Handler, name="metrics", threaded=True)


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """For node_exporter's textfile collector: written by rename, never seen half-written."""
    atomic_write_text(path, text, mode=0o644)
