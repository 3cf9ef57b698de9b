"""The lab's reachability matrix: every container against every service port, with *how* a
denied connection ended.

"Can't reach" is not enough to tell a story about a firewall.  A cell that enforces CF
semantics answers a denied connection at once with an ICMP error from the container's own
gateway (the cell); a packet that is dropped only ever times out; a service with nothing on
that port answers itself; an address nobody holds any more is unreachable from the network.
The matrix keeps those apart, so "frontend cannot reach MySQL" reads as "✗ rejected": the
cell said no.

All probes run from this process in parallel threads (each thread steps into a container's
namespace only to create its socket; see `nsenter`), so a 6 x 8 matrix takes about as long as
one probe.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from asgctl_lab.platform import LabInfo
from asgctl_lab.probe import Outcome, ProbeResult, probe_tcp, probe_udp

Proto = Literal["tcp", "udp"]
_TARGET_RE = re.compile(
    r"^(?:(?P<label>[A-Za-z0-9][A-Za-z0-9_.@-]{0,15})=)?"
    r"(?P<address>\d+\.\d+\.\d+\.\d+):(?P<port>\d+)(?:/(?P<proto>tcp|udp))?$"
)


@dataclass(frozen=True, slots=True)
class Target:
    """One column: an address, a port and a protocol, with a short label."""

    label: str
    address: str
    port: int
    proto: Proto = "tcp"

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.proto}"


def parse_target(text: str) -> Target:
    """`[LABEL=]IP:PORT[/tcp|udp]`, e.g. `mysql=198.19.10.10:3306` or `198.19.53.53:53/udp`."""
    m = _TARGET_RE.match(text.strip())
    if m is None:
        raise ValueError(f"expected [LABEL=]IP:PORT[/tcp|udp], got {text!r}")
    port = int(m["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    proto: Proto = "udp" if m["proto"] == "udp" else "tcp"
    label = m["label"] or f"{m['address']}:{port}" + ("/udp" if proto == "udp" else "")
    return Target(label, m["address"], port, proto)


def default_targets(info: LabInfo) -> tuple[Target, ...]:
    """Each service's first TCP and first UDP port, at each of its current addresses.

    One port per protocol keeps the matrix narrow enough for a terminal; a service that has
    moved shows both addresses while it holds both, and one behind a round-robin name (the
    `cdn`'s sixteen) its first two only.
    """
    out: list[Target] = []
    for s in info.spec.services:
        addresses = info.service_addresses.get(s.name, s.addresses)[:2]
        for i, address in enumerate(addresses):
            name = s.name if len(addresses) == 1 or i == 0 else f"{s.name}#{i + 1}"
            ports: list[tuple[int, Proto]] = []
            if s.tcp:
                ports.append((s.tcp[0], "tcp"))
            if s.udp:
                ports.append((s.udp[0], "udp"))
            for port, proto in ports:
                label = f"{name}/{proto}" if len(ports) > 1 else name
                out.append(Target(label, address, port, proto))
    return tuple(out)


class Verdict(StrEnum):
    """How one probe ended, from the container's point of view."""

    OPEN = "open"  # connected / got a reply
    REJECTED = "rejected"  # the cell answered with an ICMP error: the firewall said no
    TIMEOUT = "timeout"  # nothing came back: dropped
    REFUSED = "refused"  # the service answered: nothing listens on that port
    UNREACHABLE = "unreachable"  # the network answered: nobody holds that address
    ERROR = "error"  # failed locally

    @property
    def symbol(self) -> str:
        """What a matrix cell shows: at most 10 characters, so columns stay narrow."""
        return _SYMBOLS[self]


_SYMBOLS = {
    Verdict.OPEN: "✓",
    Verdict.REJECTED: "✗ rejected",
    Verdict.TIMEOUT: "✗ timeout",
    Verdict.REFUSED: "✗ refused",
    Verdict.UNREACHABLE: "✗ no route",
    Verdict.ERROR: "✗ error",
}


def classify(
    result: ProbeResult, gateway: str, address: str, cells: Collection[str] = ()
) -> Verdict:
    """Who answered decides: the container's gateway is its cell, i.e. the firewall.

    `cells` are the other cells' overlay addresses: a container on another cell is behind
    that cell's firewall, which answers from its `silk-vtep` address.
    """
    if result.reached:
        return Verdict.OPEN
    if result.outcome is Outcome.REJECTED:
        if result.icmp_from == gateway or result.icmp_from in cells:
            return Verdict.REJECTED
        if result.icmp_from == address:
            return Verdict.REFUSED
        return Verdict.UNREACHABLE
    if result.outcome is Outcome.REFUSED:
        return Verdict.REFUSED
    if result.outcome is Outcome.TIMEOUT:
        return Verdict.TIMEOUT
    return Verdict.ERROR


@dataclass(frozen=True, slots=True)
class Row:
    """One container, as the matrix labels it."""

    container: str
    cell: str
    app: str
    workload: str
    netns: str
    gateway: str

    @property
    def label(self) -> str:
        """`cell-1/backend-0`: short, so seven columns fit a terminal."""
        return f"{self.cell}/{self.container}"

    @property
    def wide_label(self) -> str:
        """`cell-1/backend-0 payments/prod/backend` (+ `[staging]`)."""
        suffix = f" [{self.workload}]" if self.workload != "app" else ""
        return f"{self.label:<20} {self.app}{suffix}"


@dataclass(frozen=True)
class Matrix:
    """Probe results by (container, target label)."""

    rows: tuple[Row, ...]
    targets: tuple[Target, ...]
    results: Mapping[tuple[str, str], ProbeResult]
    cells: frozenset[str] = field(default_factory=frozenset)
    """The cells' overlay addresses (see `classify`)."""

    def verdict(self, container: str, label: str) -> Verdict:
        row = next(r for r in self.rows if r.container == container)
        target = next(t for t in self.targets if t.label == label)
        result = self.results[(container, label)]
        return classify(result, row.gateway, target.address, self.cells)

    def reached(self, container: str, label: str) -> bool:
        return self.verdict(container, label) is Verdict.OPEN

    def column(self, label: str) -> dict[str, Verdict]:
        return {r.container: self.verdict(r.container, label) for r in self.rows}

    def render(self, *, title: str = "", wide: bool = False, legend: bool = True) -> str:
        """A table with ✓ / ✗ <how>; `wide` adds each container's app to its row."""
        labels = [r.wide_label if wide else r.label for r in self.rows]
        width = max(map(len, labels)) if labels else 0
        cols = [max(len(t.label), 10) for t in self.targets]
        heads = [t.label.ljust(w) for t, w in zip(self.targets, cols, strict=True)]
        lines = [title] if title else []
        lines.append((" " * width + "  " + " ".join(heads)).rstrip())
        for r, label in zip(self.rows, labels, strict=True):
            cells = [
                self.verdict(r.container, t.label).symbol.ljust(w)
                for t, w in zip(self.targets, cols, strict=True)
            ]
            lines.append((label.ljust(width) + "  " + " ".join(cells)).rstrip())
        if legend:
            lines.append("")
            where = ", ".join(f"{t.label} {t}" for t in self.targets)
            lines += textwrap.wrap(where, 96, initial_indent="  ", subsequent_indent="  ")
            lines.append(
                "  ✗ rejected = the cell's firewall said no (ICMP from the container's gateway, "
                "at once);"
            )
            lines.append(
                "  ✗ timeout = dropped;  ✗ refused / ✗ no route = the service / the network said no"
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": [
                {"label": t.label, "address": t.address, "port": t.port, "proto": t.proto}
                for t in self.targets
            ],
            "rows": [
                {
                    "container": r.container,
                    "cell": r.cell,
                    "app": r.app,
                    "workload": r.workload,
                    "results": {
                        t.label: {
                            "verdict": self.verdict(r.container, t.label).value,
                            "detail": str(self.results[(r.container, t.label)]),
                        }
                        for t in self.targets
                    },
                }
                for r in self.rows
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def rows_of(info: LabInfo, containers: Iterable[str] | None = None) -> tuple[Row, ...]:
    wanted = set(containers) if containers is not None else None
    return tuple(
        Row(
            c.name,
            c.cell,
            c.app,
            c.workload,
            info.net.containers[c.name].netns,
            info.net.containers[c.name].gateway,
        )
        for c in info.spec.containers
        if wanted is None or c.name in wanted
    )


def probe_matrix(
    info: LabInfo,
    targets: Sequence[Target] | None = None,
    containers: Iterable[str] | None = None,
    *,
    timeout: float = 1.0,
) -> Matrix:
    """Probe every (container, target) pair at once; see the module docstring."""
    rows = rows_of(info, containers)
    if containers is not None:
        unknown = set(containers) - {r.container for r in rows}
        if unknown:
            raise KeyError(f"no such containers: {', '.join(sorted(unknown))}")
    cols = tuple(targets) if targets is not None else default_targets(info)

    def one(row: Row, t: Target) -> ProbeResult:
        probe = probe_udp if t.proto == "udp" else probe_tcp
        return probe(row.netns, t.address, t.port, timeout=timeout)

    pairs = [(r, t) for r in rows for t in cols]
    with ThreadPoolExecutor(max_workers=min(64, max(1, len(pairs)))) as pool:
        futures = {(r.container, t.label): pool.submit(one, r, t) for r, t in pairs}
        results = {k: f.result() for k, f in futures.items()}
    cells = frozenset(c.vtep_ip for c in info.net.cells.values())
    return Matrix(rows, cols, results, cells)
