"""`asgctl lab`: a small Cloud Foundry-style platform in network namespaces, on one machine.

Where `netns.Lab` is one cell for one test, this is the whole picture the seeds describe:
several cells with containers behind them, external services they may or may not reach, a
git server holding the policy repo, and an agent per cell.  It outlives the command that
built it (`up` returns; `down`, `status`, `probe` and the demo find it again from other
processes through its state dir), so an operator can poke at it with ordinary tools.

Topology (every box a network namespace, every line a veth pair)::

    container --+            eth0                          +-- service mysql 198.19.10.10
    container --+-- cell-1 ------+                         +-- service payments-api
                    silk-vtep    +-- core (the underlay) --+-- service dns 198.19.53.53
                      : vxlan    |                         +-- ...
    container --+-- cell-2 ------+
    container --+   silk-vtep    eth0

Each cell looks like a Diego cell: its underlay is `eth0`, holding the cell's address and the
default route (via the core), which is how the agent finds the underlay; its overlay is
`silk-vtep`, a VXLAN device as silk-daemon makes it (VNI 1, port 4789, group-policy
extension on, learning off; a static route, ARP and FDB entry per other cell;
silk-release silk/daemon/vtep/factory.go@85ad715 CreateVTEP, converger.go Converge).
Containers are routed (no NAT, no bridge) through their cell, so their egress crosses the
cell's FORWARD chain, where the agent enforces: out through `eth0` to services, out through
`silk-vtep` (encapsulated, over the underlay) to containers on other cells.

Addresses: the overlay is 198.18.0.0/17 and stands in for CF's 10.255.0.0/16 (the lab only
ever uses the benchmark ranges): cell i leases 198.18.(i+1).0/24 as silk-controller leases a
/24, its vtep holds the lease's first address (ee:ee:<address> as its MAC, as silk does) and
its containers hold /30s of it.  The underlay links are in 198.18.128.0/24, the services'
links in 198.18.255.0/24, and the services keep the addresses the example policy repo names
(198.19.0.0/16), so the policies need no rewriting.  Silk masquerades overlay traffic leaving
through the underlay; the lab routes it instead (the core knows each cell's lease), so the
services see container addresses -- ASGs are judged before NAT either way.

`up(cf_layout=True)` (`asgctl lab up --cf-layout`) also installs CF's own chains in each cell
as silk and the vxlan-policy-agent write them (`iptables/cflayout.py` `render_diego`): silk's
netout chains with the ASGs of the seed revision, one `overlay--` chain per container, and the
VPA's `vpa--` chain first in FORWARD, which allows container-to-container traffic only for the
lab's network policies (`LabSpec.network_policies`), on one cell and across cells.
Nothing is ever created in the host's namespace except the git daemon (loopback only) and the
agents, which enforce through `ip netns exec <cell>` (their `--netns`).

Every namespace and interface is named `<lab id>-...` with a lab id `asgl` + 4 hex digits, a
prefix the test harness's `cleanup_stale` (which reaps `asgt*`) never touches -- except a
cell's `eth0` and `silk-vtep`, named as on a Diego cell, which are created inside the cell's
namespace (never in the host's) and go with it.  `down` works
from the state dir alone and is idempotent; it also cleans up after an `up` that was killed
with SIGKILL half-way, because `up` records the lab id before it creates anything and every
process it starts either lives in a lab namespace or is recorded (and, failing that, found
by the state-dir path in its command line).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asgctl_lab.netns import netns_unavailable_reason, write_json_atomic
from asgctl_lab.nsenter import (
    NetnsError,
    Started,
    enable_conntrack,
    netns_exec_argv,
    process_start_time,
    python_env,
    remove_namespaces,
    run,
    safe_list_netns,
    start_command,
    start_ip_batch,
    wait_all,
)
from reconciler.core.model import Container
from reconciler.sources import cellstore

PREFIX = "asgl"
"""Lab ids are `asgl` + 4 hex digits: disjoint from the test harness's `asgt` labs."""
STATE_ENV = "ASGCTL_LAB_STATE"
DEFAULT_STATE_ROOT = Path("/run/asgctl-lab")
STATE_FILE = "lab.json"
DEFAULT_NAME = "default"

LAB_V4 = ipaddress.IPv4Network("198.18.0.0/16")
"""Containers (198.18.<cell>.0/24), cell uplinks (198.18.128.0/24), service gateways
(198.18.255.0/24): all lab-internal, never named by policy."""
SERVICES_V4 = ipaddress.IPv4Network("198.19.0.0/16")
"""Service addresses: what the policy repo names."""
OVERLAY_V4 = ipaddress.IPv4Network("198.18.0.0/17")
"""The container network; stands in for CF's overlay 10.255.0.0/16 (cf_network.network)."""
UPLINKS = ipaddress.IPv4Network("198.18.128.0/24")
SERVICE_GATEWAYS = ipaddress.IPv4Network("198.18.255.0/24")
UNDERLAY_IF = "eth0"
"""The cell's underlay interface, named as on a Diego cell's VM."""
VTEP_IF = "silk-vtep"
"""silk-daemon's VXLAN device (silk-release jobs/silk-daemon/spec, vtep_name default)."""
VXLAN_VNI = 1
VXLAN_PORT = 4789
"""silk's defaults (jobs/silk-daemon/spec: vni 1, vtep_port 4789)."""
MAX_CELLS = 60  # uplink /30s in 198.18.128.0/24, cell subnets 198.18.1-60.0/24
MAX_CONTAINERS_PER_CELL = 63  # /30s in a /24
MAX_SERVICES = 250
MAX_IFNAME = 15

Workload = Literal["app", "task", "staging"]
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_ENDPOINT_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
_LAB_ID_RE = re.compile(rf"^{PREFIX}[0-9a-f]{{4}}$")


class PlatformError(RuntimeError):
    """The lab cannot be built, found or used; the message says what to do."""


# -- what to build -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabContainer:
    """A container on a cell, running an app of the directory (by `org/space/app` path)."""

    name: str
    """Its CF handle (the store.json key); unique in the lab."""
    cell: str
    app: str
    workload: Workload = "app"
    tcp: tuple[int, ...] = ()
    """Ports its app listens on (an echo server), for other containers to reach over the
    overlay."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcp", tuple(self.tcp))
        if any(not 0 < p < 65536 for p in self.tcp):
            raise ValueError(f"container {self.name}: ports must be in 1..65535")
        if not _ENDPOINT_RE.match(self.name):
            raise ValueError(f"container name {self.name!r} must match {_ENDPOINT_RE.pattern}")
        if self.workload not in ("app", "task", "staging"):
            raise ValueError(f"container {self.name}: unknown workload {self.workload!r}")
        if self.app.count("/") != 2:
            raise ValueError(f"container {self.name}: app must be org/space/app, not {self.app!r}")


@dataclass(frozen=True, slots=True)
class LabService:
    """An external service: echo servers on its ports, reachable at each of its addresses.

    With `dns`, the service is the lab's DNS server instead (dnsmasq on its first address,
    port 53 over UDP and TCP), serving the lab's names (`lab_names`)."""

    name: str
    addresses: tuple[str, ...]
    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = ()
    description: str = ""
    dns: bool = False

    def __post_init__(self) -> None:
        if not _ENDPOINT_RE.match(self.name):
            raise ValueError(f"service name {self.name!r} must match {_ENDPOINT_RE.pattern}")
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "tcp", tuple(self.tcp))
        object.__setattr__(self, "udp", tuple(self.udp))
        if not self.addresses:
            raise ValueError(f"service {self.name}: needs at least one address")
        for address in self.addresses:
            check_service_address(address)
        if any(not 0 < p < 65536 for p in (*self.tcp, *self.udp)):
            raise ValueError(f"service {self.name}: ports must be in 1..65535")
        if self.dns and (self.tcp, self.udp) != ((53,), (53,)):
            raise ValueError(f"service {self.name}: a DNS server listens on 53/tcp and 53/udp")


@dataclass(frozen=True, slots=True)
class LabNetworkPolicy:
    """A CF network policy between two apps of the directory (by `org/space/app` path):
    what `cf add-network-policy SOURCE DEST --protocol tcp --port PORT` makes."""

    source: str
    dest: str
    port: int
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        for path in (self.source, self.dest):
            if path.count("/") != 2:
                raise ValueError(f"network policy: app must be org/space/app, not {path!r}")
        if not 0 < self.port < 65536 or self.protocol not in ("tcp", "udp"):
            raise ValueError(f"network policy {self.source} -> {self.dest}: bad port/protocol")


@dataclass(frozen=True, slots=True)
class LabSpec:
    """Cells, containers and services of one lab, and the network policies between apps."""

    cells: tuple[str, ...]
    containers: tuple[LabContainer, ...]
    services: tuple[LabService, ...]
    network_policies: tuple[LabNetworkPolicy, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "network_policies", tuple(self.network_policies))
        if not self.cells or len(self.cells) > MAX_CELLS:
            raise ValueError(f"a lab has 1 to {MAX_CELLS} cells")
        for cell in self.cells:
            if not _ENDPOINT_RE.match(cell):
                raise ValueError(f"cell name {cell!r} must match {_ENDPOINT_RE.pattern}")
        for kind, names in (
            ("cell", list(self.cells)),
            ("container", [c.name for c in self.containers]),
            ("service", [s.name for s in self.services]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {sorted(names)}")
        for c in self.containers:
            if c.cell not in self.cells:
                raise ValueError(f"container {c.name}: no cell {c.cell!r}")
        for cell in self.cells:
            if sum(c.cell == cell for c in self.containers) > MAX_CONTAINERS_PER_CELL:
                raise ValueError(f"cell {cell}: more than {MAX_CONTAINERS_PER_CELL} containers")
        if len(self.services) > MAX_SERVICES:
            raise ValueError(f"at most {MAX_SERVICES} services")
        addresses = [a for s in self.services for a in s.addresses]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two services share an address")
        if sum(s.dns for s in self.services) > 1:
            raise ValueError("a lab has one DNS server")


def check_service_address(address: str) -> str:
    """Services live in 198.19.0.0/16 only: lab traffic never leaves the benchmark range."""
    try:
        addr = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"service address {address!r} is not an IPv4 address") from None
    if addr not in SERVICES_V4 or addr in (SERVICES_V4[0], SERVICES_V4[-1]):
        raise ValueError(f"service address {address} must lie inside {SERVICES_V4}")
    return str(addr)


def default_spec(cells: int = 2) -> LabSpec:
    """The seeds' platform: payments/prod backend and frontend side by side on cell-1, a
    marketing blog, the payments staging space and a staging (buildpack) container, and the
    services the example policy repo names.  Every extra cell runs one more backend instance,
    so "every cell converges" is visible however many cells there are.  Every backend
    listens on 8080 for the frontend, which a CF network policy lets reach it over the
    overlay (on its own cell and across cells); the blog has no such policy.
    """
    if not 1 <= cells <= MAX_CELLS:
        raise ValueError(f"cells must be 1..{MAX_CELLS}")
    names = tuple(f"cell-{i}" for i in range(1, cells + 1))
    last = names[-1]
    containers = [
        LabContainer("backend-0", "cell-1", "payments/prod/backend", tcp=(BACKEND_PORT,)),
        LabContainer("frontend-0", "cell-1", "payments/prod/frontend"),
        LabContainer("blog-0", "cell-1", "marketing/web/blog"),
    ]
    containers += [
        LabContainer(f"backend-{i - 1}", f"cell-{i}", "payments/prod/backend", tcp=(BACKEND_PORT,))
        for i in range(2, cells + 1)
    ]
    containers += [
        LabContainer("stg-backend-0", last, "payments/staging/backend"),
        LabContainer("blog-staging", last, "marketing/web/blog", "staging"),
    ]
    services = (
        LabService("mysql", ("198.19.10.10",), tcp=(3306,), description="payments MySQL"),
        LabService(
            "payments-api",
            ("198.19.20.20", "198.19.20.21"),
            tcp=(443,),
            description="card network API",
        ),
        LabService(
            "dns", ("198.19.53.53",), tcp=(53,), udp=(53,), description="platform DNS", dns=True
        ),
        LabService(
            "dns-2", ("198.19.53.54",), tcp=(53,), udp=(53,), description="second DNS resolver"
        ),
        LabService("mirror", ("198.19.80.10",), tcp=(80, 443), description="package mirror"),
        LabService("metrics", ("198.19.30.30",), udp=(8125,), description="statsd collector"),
        LabService("card-api", (CARD_API,), tcp=(443,), description="card network API, by name"),
        LabService("cdn", CDN, tcp=(443,), description="one name, 16 addresses"),
    )
    policies = (LabNetworkPolicy("payments/prod/frontend", "payments/prod/backend", BACKEND_PORT),)
    return LabSpec(names, tuple(containers), services, policies)


BACKEND_PORT = 8080
"""Where the backends listen for the frontend, over the overlay (the default spec's one
network policy: payments/prod/frontend -> payments/prod/backend, tcp 8080)."""
CARD_API = "198.19.40.40"
"""The card network's API as the lab's DNS names it first (`card-api.lab.example`); no ASG
of the example repo covers it, so only a grant by name opens it."""
CDN = tuple(f"198.19.70.{i}" for i in range(1, 17))
"""Sixteen addresses behind one name (`cdn.lab.example`), rotated on every query."""
DNS_TTL = 5
"""The TTL of the lab's names: how long an address the provider moved away from is kept."""


def lab_names(spec: LabSpec) -> dict[str, list[str]]:
    """The names the lab's DNS server starts with: `<service>.lab.example` for every service,
    with the service's addresses (so `cdn.lab.example` has sixteen)."""
    from asgctl_lab.dns import LAB_DOMAIN

    return {f"{s.name}{LAB_DOMAIN}": list(s.addresses) for s in spec.services}


# -- the address plan (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Veth:
    """One veth pair, each end created directly in its namespace."""

    a_netns: str
    a_if: str
    b_netns: str
    b_if: str


@dataclass(frozen=True, slots=True)
class ContainerNet:
    netns: str
    ip: str
    gateway: str
    ifname: str
    cell_ifname: str


@dataclass(frozen=True, slots=True)
class ServiceNet:
    netns: str
    gateway: str
    """The core's address on this service's link; the service's default route."""
    ifname: str
    core_ifname: str


@dataclass(frozen=True, slots=True)
class CellNet:
    netns: str
    subnet: str
    """The cell's overlay lease (a /24 of OVERLAY_V4)."""
    uplink_ip: str
    """Its underlay address, on `eth0`."""
    core_ip: str
    ifname: str
    core_ifname: str
    vtep_ip: str = ""
    """The lease's first address, held by `silk-vtep` (silk's overlay IP of the cell)."""
    vtep_mac: str = ""
    """ee:ee + the vtep address, as silk derives it (silk lib/hardware_address_generator.go,
    GenerateForVTEP)."""


@dataclass(frozen=True)
class NetworkPlan:
    """Every namespace, veth, address and route of a lab, as `ip -batch` scripts."""

    lab_id: str
    core: str
    cells: Mapping[str, CellNet]
    containers: Mapping[str, ContainerNet]
    services: Mapping[str, ServiceNet]
    veths: tuple[Veth, ...]
    scripts: Mapping[str, tuple[str, ...]]
    """netns -> `ip -batch` commands run inside it once the veths exist."""
    fdb: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """cell netns -> `bridge -batch` commands (the vteps' forwarding entries), run after."""

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (
            self.core,
            *(c.netns for c in self.cells.values()),
            *(c.netns for c in self.containers.values()),
            *(s.netns for s in self.services.values()),
        )

    @property
    def routers(self) -> tuple[str, ...]:
        """Namespaces that forward packets (the core and the cells)."""
        return (self.core, *(c.netns for c in self.cells.values()))


def _v4(net: ipaddress.IPv4Network, offset: int) -> str:
    return str(net.network_address + offset)


def plan_network(lab_id: str, spec: LabSpec) -> NetworkPlan:
    """Names, addresses and `ip` commands for `spec`; deterministic, so it is unit-tested.

    Cell i (from 0) gets uplink /30 number i of 198.18.128.0/24 on its `eth0` (core .1, cell
    .2 of the block) and overlay lease 198.18.(i+1).0/24, split into /30s, one per container
    (gateway .1, container .2 of the block); its `silk-vtep` holds the lease's first address
    with the overlay's prefix and routes every other cell's lease via that cell's vtep
    address, with a permanent ARP entry and an FDB entry naming the cell's underlay address
    (silk's converger; the FDB entries are `bridge` commands, in `fdb`).  Service j gets
    gateway 198.18.255.(j+1) on the core's end of its link and its own addresses as /32s on
    its end, with a host route for each in the core, so a service can hold any address of
    198.19.0.0/16 -- and can move.
    """
    if not _LAB_ID_RE.match(lab_id):
        raise ValueError(f"lab id {lab_id!r} must match {_LAB_ID_RE.pattern}")
    core = f"{lab_id}-core"
    cells: dict[str, CellNet] = {}
    containers: dict[str, ContainerNet] = {}
    services: dict[str, ServiceNet] = {}
    veths: list[Veth] = []
    scripts: dict[str, list[str]] = {core: ["link set lo up"]}

    for i, cell in enumerate(spec.cells):
        block = ipaddress.IPv4Network((int(UPLINKS.network_address) + 4 * i, 30))
        subnet = ipaddress.IPv4Network(f"198.18.{i + 1}.0/24")
        vtep_ip = subnet.network_address
        cn = CellNet(
            netns=f"{lab_id}-{cell}",
            subnet=str(subnet),
            uplink_ip=_v4(block, 2),
            core_ip=_v4(block, 1),
            ifname=UNDERLAY_IF,
            core_ifname=f"{lab_id}-u{i}p",
            vtep_ip=str(vtep_ip),
            vtep_mac="ee:ee:" + ":".join(f"{b:02x}" for b in vtep_ip.packed),
        )
        cells[cell] = cn
        veths.append(Veth(cn.netns, cn.ifname, core, cn.core_ifname))
        scripts[core] += [
            f"addr add {cn.core_ip}/30 dev {cn.core_ifname}",
            f"link set {cn.core_ifname} up",
            f"route add {cn.subnet} via {cn.uplink_ip}",
        ]
        scripts[cn.netns] = [
            "link set lo up",
            f"addr add {cn.uplink_ip}/30 dev {cn.ifname}",
            f"link set {cn.ifname} up",
            f"route add default via {cn.core_ip}",
            f"link add {VTEP_IF} address {cn.vtep_mac} type vxlan id {VXLAN_VNI}"
            f" local {cn.uplink_ip} dev {cn.ifname} dstport {VXLAN_PORT} nolearning gbp",
            f"link set {VTEP_IF} up",
            f"addr add {cn.vtep_ip}/{OVERLAY_V4.prefixlen} dev {VTEP_IF} scope link",
        ]
        for j, c in enumerate(x for x in spec.containers if x.cell == cell):
            cblock = ipaddress.IPv4Network((int(subnet.network_address) + 4 * j, 30))
            n = len(containers)
            net = ContainerNet(
                netns=f"{lab_id}-c-{c.name}",
                ip=_v4(cblock, 2),
                gateway=_v4(cblock, 1),
                ifname=f"{lab_id}-c{n}p",
                cell_ifname=f"{lab_id}-c{n}",
            )
            containers[c.name] = net
            veths.append(Veth(cn.netns, net.cell_ifname, net.netns, net.ifname))
            scripts[cn.netns] += [
                f"addr add {net.gateway}/30 dev {net.cell_ifname}",
                f"link set {net.cell_ifname} up",
            ]
            scripts[net.netns] = [
                "link set lo up",
                f"addr add {net.ip}/30 dev {net.ifname}",
                f"link set {net.ifname} up",
                f"route add default via {net.gateway}",
            ]

    fdb: dict[str, list[str]] = {}
    for cn in cells.values():
        fdb[cn.netns] = []
        for other in cells.values():
            if other is cn:
                continue
            scripts[cn.netns] += [
                f"route add {other.subnet} via {other.vtep_ip} dev {VTEP_IF} src {cn.vtep_ip}",
                f"neigh add {other.vtep_ip} lladdr {other.vtep_mac} dev {VTEP_IF} nud permanent",
            ]
            fdb[cn.netns].append(
                f"fdb add {other.vtep_mac} dev {VTEP_IF} dst {other.uplink_ip} self permanent"
            )

    for j, s in enumerate(spec.services):
        gateway = _v4(SERVICE_GATEWAYS, j + 1)
        sn = ServiceNet(
            netns=f"{lab_id}-s-{s.name}",
            gateway=gateway,
            ifname=f"{lab_id}-s{j}p",
            core_ifname=f"{lab_id}-s{j}",
        )
        services[s.name] = sn
        veths.append(Veth(core, sn.core_ifname, sn.netns, sn.ifname))
        scripts[core] += [
            f"addr add {gateway}/32 dev {sn.core_ifname}",
            f"link set {sn.core_ifname} up",
            *(f"route add {a}/32 dev {sn.core_ifname}" for a in s.addresses),
        ]
        scripts[sn.netns] = [
            "link set lo up",
            *(f"addr add {a}/32 dev {sn.ifname}" for a in s.addresses),
            f"link set {sn.ifname} up",
            f"route add {gateway}/32 dev {sn.ifname}",
            f"route add default via {gateway} dev {sn.ifname}",
        ]

    for v in veths:
        for name in (v.a_if, v.b_if, VTEP_IF):
            if len(name) > MAX_IFNAME:
                raise ValueError(f"interface name {name} is longer than {MAX_IFNAME}")
    return NetworkPlan(
        lab_id=lab_id,
        core=core,
        cells=cells,
        containers=containers,
        services=services,
        veths=tuple(veths),
        scripts={k: tuple(v) for k, v in scripts.items()},
        fdb={k: tuple(v) for k, v in fdb.items()},
    )


# -- inventory -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Guids:
    app_id: str
    space_id: str
    org_id: str


def resolve_guids(policies: Path, apps: Sequence[str]) -> dict[str, Guids]:
    """GUIDs of `org/space/app` paths from the policy repo's directory.

    The lab's containers carry the same GUIDs a real cell's store.json would, so the agents
    compile exactly what they would compile in production from the same repo.
    """
    from reconciler.policy.load import load_policy

    result = load_policy(policies)
    if not result.ok:
        raise PlatformError(f"{policies} does not validate; run `asgctl validate {policies}`")
    d = result.policy.directory
    spaces = {s.guid: s for s in d.spaces}
    out: dict[str, Guids] = {}
    for path in apps:
        guid = d.resolve_app(path)
        app = next((a for a in d.apps if a.guid == guid), None)
        if guid is None or app is None:
            raise PlatformError(f"app {path!r} is not in the directory of {policies}")
        space = spaces[app.space_guid]
        out[path] = Guids(app.guid, space.guid, space.org_guid)
    return out


def cell_containers(
    spec: LabSpec, net: NetworkPlan, guids: Mapping[str, Guids], cell: str
) -> list[Container]:
    """One cell's containers as the agent reads them from its store.json."""
    return [
        Container(
            handle=c.name,
            ip=net.containers[c.name].ip,
            app_id=g.app_id,
            space_id=g.space_id,
            org_id=g.org_id,
            policy_group_id=g.app_id,
            workload=c.workload,
        )
        for c, g in ((c, guids[c.app]) for c in spec.containers if c.cell == cell)
    ]


def store_document(
    spec: LabSpec, cell: str, net: NetworkPlan, guids: Mapping[str, Guids]
) -> dict[str, Any]:
    """One cell's containers in CF's container metadata store format (store.json)."""
    return cellstore.store_document(cell_containers(spec, net, guids, cell))


# -- state on disk -------------------------------------------------------------------------


def state_root() -> Path:
    """Where running labs are recorded: $ASGCTL_LAB_STATE, else /run/asgctl-lab.

    /run is a tmpfs, so a reboot (which also removes every namespace) forgets labs too.
    """
    return Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_ROOT)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise PlatformError(f"lab name {name!r} must match {_NAME_RE.pattern}")
    return name


def lab_dir(name: str) -> Path:
    return state_root() / check_name(name)


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process the lab started, identified by PID *and* start time (PIDs get reused)."""

    role: str
    pid: int
    start: int | None
    netns: str = ""
    cell: str = ""

    def alive(self) -> bool:
        return self.start is not None and process_start_time(self.pid) == self.start


@dataclass(frozen=True)
class LabInfo:
    """A lab as its state file describes it (read-only; `update_state` writes)."""

    name: str
    lab_id: str
    phase: str
    directory: Path
    created: str
    spec: LabSpec
    net: NetworkPlan
    git_url: str
    processes: tuple[ProcessRecord, ...]
    service_addresses: Mapping[str, tuple[str, ...]]
    guids: Mapping[str, Guids] = field(default_factory=dict)
    cf_layout: str = ""
    """The iptables variant (legacy, nft) CF's own chains were installed with; "" if none."""

    @property
    def cells(self) -> tuple[str, ...]:
        return self.spec.cells

    def cell_netns(self, cell: str) -> str:
        return self.net.cells[cell].netns

    def store_path(self, cell: str) -> Path:
        return self.directory / "cells" / cell / "store.json"

    def container(self, name: str) -> LabContainer:
        for c in self.spec.containers:
            if c.name == name:
                return c
        raise KeyError(f"no container {name!r} in lab {self.name}")

    def service(self, name: str) -> LabService:
        for s in self.spec.services:
            if s.name == name:
                return s
        raise KeyError(f"no service {name!r} in lab {self.name}")

    def by_role(self, role: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == role]

    def container_pids(self) -> dict[str, ProcessRecord]:
        return {p.netns.split("-c-", 1)[1]: p for p in self.by_role("container")}

    def agents(self) -> dict[str, ProcessRecord]:
        return {p.cell: p for p in self.by_role("agent") if p.alive()}

    @property
    def git_root(self) -> Path:
        return self.directory / "git"


def _spec_to_dict(spec: LabSpec) -> dict[str, Any]:
    return {
        "cells": list(spec.cells),
        "containers": [
            {
                "name": c.name,
                "cell": c.cell,
                "app": c.app,
                "workload": c.workload,
                "tcp": list(c.tcp),
            }
            for c in spec.containers
        ],
        "network_policies": [
            {"source": p.source, "dest": p.dest, "port": p.port, "protocol": p.protocol}
            for p in spec.network_policies
        ],
        "services": [
            {
                "name": s.name,
                "addresses": list(s.addresses),
                "tcp": list(s.tcp),
                "udp": list(s.udp),
                "description": s.description,
                "dns": s.dns,
            }
            for s in spec.services
        ],
    }


def _spec_from_dict(d: Mapping[str, Any]) -> LabSpec:
    return LabSpec(
        tuple(d["cells"]),
        tuple(
            LabContainer(c["name"], c["cell"], c["app"], c["workload"], tuple(c.get("tcp", ())))
            for c in d["containers"]
        ),
        tuple(
            LabService(
                s["name"],
                tuple(s["addresses"]),
                tuple(s["tcp"]),
                tuple(s["udp"]),
                s.get("description", ""),
                bool(s.get("dns", False)),
            )
            for s in d["services"]
        ),
        tuple(LabNetworkPolicy(**p) for p in d.get("network_policies") or []),
    )


def load(name: str = DEFAULT_NAME) -> LabInfo:
    """The lab called `name`; PlatformError (with what to do) when there is none."""
    path = lab_dir(name) / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlatformError(f"no lab called {name!r} is up (try `asgctl lab up`)") from None
    except (OSError, ValueError) as exc:
        raise PlatformError(f"{path}: unreadable ({exc}); `asgctl lab down` removes it") from None
    return _info(name, doc)


def _info(name: str, doc: Mapping[str, Any]) -> LabInfo:
    spec = _spec_from_dict(doc["spec"])
    addresses = {k: tuple(v) for k, v in (doc.get("service_addresses") or {}).items()}
    return LabInfo(
        name=name,
        lab_id=doc["id"],
        phase=doc.get("phase", "?"),
        directory=lab_dir(name),
        created=doc.get("created", ""),
        spec=spec,
        net=plan_network(doc["id"], spec),
        git_url=doc.get("git_url", ""),
        processes=tuple(ProcessRecord(**p) for p in doc.get("processes") or []),
        service_addresses=addresses or {s.name: s.addresses for s in spec.services},
        guids={k: Guids(**v) for k, v in (doc.get("guids") or {}).items()},
        cf_layout=str(doc.get("cf_layout") or ""),
    )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of lab.json between processes (up, demo, CLI)."""
    with open(directory / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_state(directory: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `change` to lab.json under the lock and write it back atomically."""
    with _locked(directory):
        path = directory / STATE_FILE
        doc = json.loads(path.read_text())
        change(doc)
        write_json_atomic(path, doc)
        return doc


def record_process(directory: Path, record: ProcessRecord) -> None:
    """Remember a process at once, so a crash right after starting it cannot orphan it."""
    entry = {
        "role": record.role,
        "pid": record.pid,
        "start": record.start,
        "netns": record.netns,
        "cell": record.cell,
    }
    update_state(directory, lambda d: d.setdefault("processes", []).append(entry))


def live_user(name: str) -> ProcessRecord | None:
    """The live process that builds (`owner`) or runs a demo on (`holder`) lab `name`.

    Lets a second demo refuse to start instead of tearing down a lab another one is using.
    """
    try:
        doc = json.loads((lab_dir(name) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    for role in ("owner", "holder"):
        entry = doc.get(role) or {}
        with contextlib.suppress(KeyError, TypeError, ValueError):
            rec = ProcessRecord(role, int(entry["pid"]), entry.get("start"))
            if rec.pid != os.getpid() and rec.alive():
                return rec
    return None


def hold(info: LabInfo) -> None:
    """Record this process as the one using the lab (see `live_user`)."""
    me = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
    update_state(info.directory, lambda d: d.__setitem__("holder", me))


# -- availability --------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab, in words an operator can act on; None if it can."""
    if not sys.platform.startswith("linux"):
        return f"the lab needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return "the lab creates network namespaces and firewall rules: run it as root (sudo)"
    missing = [t for t in ("ip", "git", "nft", "iptables", "dnsmasq") if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (`make sysdeps` installs them)"
    return netns_unavailable_reason()


# -- up ------------------------------------------------------------------------------------


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def new_lab_id() -> str:
    taken = {n.split("-", 1)[0] for n in safe_list_netns()}
    root = state_root()
    if root.is_dir():
        for p in root.glob(f"*/{STATE_FILE}"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                taken.add(json.loads(p.read_text())["id"])
    for _ in range(200):
        lab_id = PREFIX + secrets.token_hex(2)
        if lab_id not in taken:
            return lab_id
    raise PlatformError("could not find an unused lab id")


def up(
    name: str = DEFAULT_NAME,
    spec: LabSpec | None = None,
    *,
    policies: Path = Path("policies"),
    seed_hook: Callable[[Path], None] | None = None,
    log: Log = _quiet,
    cf_layout: str | None = None,
) -> LabInfo:
    """Build the lab, start its services and git server, and return; it runs until `down`.

    On any failure (or Ctrl-C) everything made so far is removed before the error propagates.
    `seed_hook` may edit the policy repo's first commit (a folder) before it is committed:
    the demo uses it to start from the state before its first story.  `cf_layout` ("legacy",
    "nft" or "auto": the system's `iptables`) also installs CF's own chains in every cell
    with that iptables variant (see the module docstring); agents enforcing with iptables
    must use the same variant, or CF's netout chains judge again what they accepted.
    """
    reason = unavailable_reason()
    if reason:
        raise PlatformError(reason)
    spec = spec or default_spec()
    directory = lab_dir(name)
    if (directory / STATE_FILE).exists():
        raise PlatformError(
            f"a lab called {name!r} exists already ({directory}); "
            f"`asgctl lab down --name {name}` removes it"
        )
    apps = {c.app for c in spec.containers}
    apps |= {a for p in spec.network_policies for a in (p.source, p.dest)}
    guids = resolve_guids(policies, sorted(apps))
    variant = _cf_variant(cf_layout) if cf_layout else ""
    directory.mkdir(parents=True, exist_ok=True)
    lab_id = new_lab_id()
    net = plan_network(lab_id, spec)
    # The id is on disk before anything named after it exists: `down` can always find it.
    write_json_atomic(
        directory / STATE_FILE,
        {
            "id": lab_id,
            "phase": "building",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "owner": {"pid": os.getpid(), "start": process_start_time(os.getpid())},
            "spec": _spec_to_dict(spec),
            "cf_layout": variant,
            "guids": {
                k: {"app_id": g.app_id, "space_id": g.space_id, "org_id": g.org_id}
                for k, g in guids.items()
            },
            "processes": [],
        },
    )
    try:
        t0 = time.monotonic()
        _build_network(net)
        log(f"network: {len(net.namespaces)} namespaces in {time.monotonic() - t0:.1f}s")
        for cell in spec.cells:
            store = directory / "cells" / cell / "store.json"
            store.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store, store_document(spec, cell, net, guids))
        (directory / "logs").mkdir(exist_ok=True)
        if variant:
            install_cf_layout(spec, net, guids, _seed_policy(policies, seed_hook), variant)
            log(f"CF's own chains (silk, vxlan-policy-agent) installed with iptables-{variant}")
        _start_containers(directory, spec, net)
        _start_services(directory, spec, net)
        log(f"containers and services running after {time.monotonic() - t0:.1f}s")
        url = _start_git(directory, spec, net, guids, policies, seed_hook)
        log(f"git server: {url}")

        def done(d: dict[str, Any]) -> None:
            d["phase"] = "up"
            d["git_url"] = url
            d.pop("owner", None)

        update_state(directory, done)
    except BaseException:
        down(name)
        raise
    return load(name)


def _wait(started: Sequence[Started], what: str) -> None:
    """Wait for setup commands started in parallel; fail listing every one that failed."""
    try:
        wait_all(started, what, timeout=60)
    except NetnsError as exc:
        raise PlatformError(str(exc)) from None


def _build_network(net: NetworkPlan) -> None:
    """Namespaces, sysctls, veths, addresses, routes, conntrack; in as few processes as can be.

    Sysctls go first so that interfaces inherit them:
    - no ICMP rate limit: the matrix fires dozens of rejected probes at once, and the default
      limit turns later REJECTs into timeouts, which would read as a DROP;
    - no reverse-path filter on the routers (the host's default may be strict);
    - forwarding on the core and the cells.
    """
    _wait([start_ip_batch(["ip"], [f"netns add {ns}" for ns in net.namespaces])], "netns add")
    common = ["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"]
    router = [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ]
    procs = []
    for ns in net.namespaces:
        settings = [*common, *(router if ns in net.routers else [])]
        procs.append(start_command(netns_exec_argv(ns, ["sysctl", "-q", "-w", *settings])))
    _wait(procs, "sysctl")
    _wait(
        [
            start_ip_batch(
                ["ip"],
                [
                    f"link add name {v.a_if} netns {v.a_netns} type veth"
                    f" peer name {v.b_if} netns {v.b_netns}"
                    for v in net.veths
                ],
            )
        ],
        "veths",
    )
    # Cells and containers first; the core's routes need its uplinks up, which they are by
    # the time its own script runs (the same script brings them up first).
    _wait(
        [start_ip_batch(["ip", "-n", ns], cmds) for ns, cmds in net.scripts.items()],
        "addresses and routes",
    )
    _wait(
        [
            start_command(["bridge", "-n", ns, "-batch", "-"], cmds)
            for ns, cmds in net.fdb.items()
            if cmds
        ],
        "vxlan forwarding entries",
    )
    for cell in net.cells.values():
        enable_conntrack(
            cell.netns, net.lab_id, "asgctl lab: connection tracking on from the start"
        )


def spawn(
    directory: Path,
    role: str,
    argv: Sequence[str],
    *,
    netns: str = "",
    cell: str = "",
    log: Path | None = None,
    stdout: Path | None = None,
) -> ProcessRecord:
    """Start a process that outlives us (own session, no terminal) and record it at once."""
    out = open(stdout or log or os.devnull, "ab")  # noqa: SIM115 - the child keeps it
    err = open(log or os.devnull, "ab")  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            netns_exec_argv(netns, argv) if netns else list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=python_env(),
            start_new_session=True,  # Ctrl-C in the terminal goes to us, not to the lab
            close_fds=True,
        )
    finally:
        out.close()
        err.close()
    _CHILDREN.append(proc)
    record = ProcessRecord(role, proc.pid, process_start_time(proc.pid), netns, cell)
    record_process(directory, record)
    return record


_CHILDREN: list[subprocess.Popen[Any]] = []
"""Lab processes this process started.  They outlive us when we exit (`up` returns), but
while we run (the demo) they are our children: `down` reaps them, so none lingers as a
zombie that would still look alive by PID."""


def _reap_children() -> None:
    for proc in list(_CHILDREN):
        if proc.poll() is not None:
            _CHILDREN.remove(proc)


def _start_containers(directory: Path, spec: LabSpec, net: NetworkPlan) -> None:
    """One long-lived process per container: its PID must not change while policy does.

    A container with ports also runs its app: an echo server on them (role `app`).
    """
    waiting = []
    for c in spec.containers:
        netns = net.containers[c.name].netns
        spawn(directory, "container", ["sleep", "infinity"], netns=netns)
        if c.tcp:
            argv = [sys.executable, "-m", "asgctl_lab.serve"]
            argv += [a for p in c.tcp for a in ("--tcp", f"0.0.0.0:{p}")]
            log = directory / "logs" / f"app-{c.name}.log"
            spawn(directory, "app", argv, netns=netns, stdout=log, log=log)
            waiting.append(log)
    _wait_ready(waiting, "container apps")


def _wait_ready(logs: Sequence[Path], what: str) -> None:
    """Until each echo server's log says `ready`; PlatformError with their tails if not."""
    deadline = time.monotonic() + 20
    waiting = list(logs)
    while waiting:
        waiting = [p for p in waiting if b"ready" not in p.read_bytes()]
        if not waiting:
            return
        if time.monotonic() > deadline:
            tails = "; ".join(f"{p.name}: {p.read_text(errors='replace')[-300:]}" for p in waiting)
            raise PlatformError(f"{what} did not start: {tails}")
        time.sleep(0.02)


def _start_services(directory: Path, spec: LabSpec, net: NetworkPlan) -> None:
    logs = directory / "logs"
    waiting = []
    for s in spec.services:
        if s.dns:
            _start_dns(directory, spec, net, s)
            continue
        argv = [sys.executable, "-m", "asgctl_lab.serve"]
        argv += [a for p in s.tcp for a in ("--tcp", f"0.0.0.0:{p}")]
        argv += [a for p in s.udp for a in ("--udp", f"0.0.0.0:{p}")]
        log = logs / f"service-{s.name}.log"
        spawn(directory, "service", argv, netns=net.services[s.name].netns, stdout=log, log=log)
        waiting.append(log)
    _wait_ready(waiting, "services")


# -- the lab's DNS server ------------------------------------------------------------------


def _lab_dns(directory: Path, net: NetworkPlan, service: LabService) -> Any:
    """The LabDns of the lab's DNS service (its hosts file and log in the state dir)."""
    from asgctl_lab.dns import LabDns, LabDnsError

    workdir = directory / "dns"
    workdir.mkdir(exist_ok=True)
    try:
        return LabDns(net.services[service.name].netns, service.addresses[0], workdir, DNS_TTL)
    except LabDnsError as exc:
        raise PlatformError(str(exc)) from None


def _start_dns(directory: Path, spec: LabSpec, net: NetworkPlan, service: LabService) -> None:
    """dnsmasq in the DNS service's namespace, recorded like every lab process; and each
    container's resolv.conf naming it (`/etc/netns/<container netns>/resolv.conf`, which
    `ip netns exec` mounts over /etc/resolv.conf: `getent hosts cdn.lab.example` in a
    container asks the lab's server, through the cell's firewall)."""
    from asgctl_lab.dns import LabDnsError

    dns = _lab_dns(directory, net, service).prepare(lab_names(spec))
    rec = spawn(directory, "dns", dns.argv(), netns=net.services[service.name].netns)
    try:
        dns.attach(rec.pid).wait_listening()
    except LabDnsError as exc:
        raise PlatformError(f"the lab's DNS server did not start: {exc}") from None
    resolv = f"nameserver {service.addresses[0]}\noptions timeout:1 attempts:2\n"
    for c in net.containers.values():
        folder = ETC_NETNS / c.netns
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "resolv.conf").write_text(resolv)


ETC_NETNS = Path("/etc/netns")
"""Where `ip netns exec NAME` finds files to mount over /etc for that namespace."""


def _remove_etc_netns(lab_id: str) -> list[str]:
    """The containers' resolv.conf folders of lab `lab_id` (named after its namespaces)."""
    removed = []
    for folder in ETC_NETNS.glob(f"{lab_id}-*") if ETC_NETNS.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(f"dir {folder}")
    return removed


def dns_service(info: LabInfo) -> LabService:
    for s in info.spec.services:
        if s.dns:
            return s
    raise PlatformError(f"lab {info.name} has no DNS server")


def dns_records(info: LabInfo) -> dict[str, list[str]]:
    """The names the lab's DNS server serves now."""
    from asgctl_lab.dns import read_hosts

    path = _lab_dns(info.directory, info.net, dns_service(info)).hosts
    try:
        return read_hosts(path)
    except OSError as exc:
        raise PlatformError(f"{path}: unreadable ({exc})") from None


def set_dns_record(info: LabInfo, name: str, addresses: Sequence[str]) -> None:
    """The provider moves `name` to `addresses`: the running server rereads its records
    (no restart, nothing in git); returns once it answers with them."""
    from asgctl_lab.dns import LabDnsError

    service = dns_service(info)
    running = [p for p in info.by_role("dns") if p.alive()]
    if not running:
        raise PlatformError(f"lab {info.name}: its DNS server is not running")
    try:
        _lab_dns(info.directory, info.net, service).attach(running[0].pid).set_record(
            name, list(addresses)
        )
    except LabDnsError as exc:
        raise PlatformError(str(exc)) from None


# -- CF's own chains (--cf-layout) ---------------------------------------------------------


def _cf_variant(wanted: str) -> str:
    """`legacy` or `nft`; `auto` is what the system's `iptables` is (as an agent's `auto`)."""
    if wanted in ("legacy", "nft"):
        return wanted
    if wanted != "auto":
        raise PlatformError(f"cf layout: unknown iptables variant {wanted!r} (legacy, nft, auto)")
    from reconciler.backends.iptables.backend import system_default
    from reconciler.backends.kernel.runner import Runner

    return system_default(Runner()) or "nft"


def cf_layout_variant(backend: str) -> str:
    """The variant to install CF's chains with, for agents on `backend`: `auto`, which an
    agent's `--variant auto` then follows (it picks the variant holding the rules).

    CF's chains are iptables; an nftables agent would leave silk's netout chains judging
    underlay egress after it (with the ASGs the containers started with), so the pair is
    refused rather than shown as asgctl's decision.
    """
    if backend == "nftables":
        raise PlatformError(
            "--cf-layout installs CF's iptables chains; run the agents with an iptables "
            "backend (iptables, libiptc), not nftables"
        )
    return "auto"


def _seed_policy(policies: Path, seed_hook: Callable[[Path], None] | None) -> Any:
    """The policy of the lab's first commit: what silk wrote when the containers started."""
    from reconciler.policy.load import load_policy

    with tempfile.TemporaryDirectory(prefix="asgctl-lab-cf-") as tmp:
        shutil.copytree(policies, Path(tmp) / "policies")
        if seed_hook is not None:
            seed_hook(Path(tmp))
        result = load_policy(Path(tmp) / "policies")
    if not result.ok:
        raise PlatformError(f"{policies} (as seeded) does not validate")
    return result.policy


def network_policies(spec: LabSpec, guids: Mapping[str, Guids]) -> tuple[Any, ...]:
    """The spec's network policies by app GUID, as the policy server hands them to the VPA."""
    from reconciler.backends.iptables.cflayout import NetworkPolicy

    return tuple(
        NetworkPolicy(guids[p.source].app_id, guids[p.dest].app_id, p.protocol, p.port, p.port)
        for p in spec.network_policies
    )


def cf_layout_text(
    spec: LabSpec, net: NetworkPlan, guids: Mapping[str, Guids], policy: Any, cell: str
) -> str:
    """One cell's `iptables-restore --noflush` input: `render_diego` of the seed plan."""
    from reconciler.backends.iptables.cflayout import render_diego
    from reconciler.core.cellplan import CellSettings
    from reconciler.core.compile import compile_cell

    underlay = (UNDERLAY_IF,)
    plan = compile_cell(
        policy, cell_containers(spec, net, guids, cell), cell, CellSettings(underlay, underlay)
    )
    stamp = int(time.time())
    return render_diego(plan, network_policies(spec, guids), vtep=VTEP_IF, stamp=stamp)


def install_cf_layout(
    spec: LabSpec, net: NetworkPlan, guids: Mapping[str, Guids], policy: Any, variant: str
) -> None:
    """CF's chains into every cell, one `iptables-<variant>-restore --noflush` each."""
    for cell in spec.cells:
        text = cf_layout_text(spec, net, guids, policy, cell)
        argv = [f"iptables-{variant}-restore", "--noflush"]
        try:
            run(netns_exec_argv(net.cells[cell].netns, argv), input=text)
        except NetnsError as exc:
            raise PlatformError(f"{cell}: CF's chains did not install: {exc}") from None


def sync_cf_asgs(info: LabInfo, policy: Any) -> None:
    """Give CF's chains in every cell the ASGs of `policy`, as the vxlan-policy-agent's ASG
    poll does after the Cloud Controller's security groups changed (`render_asg_sync`: each
    container's `asg-` chain rewritten in one transaction; netout, overlay and vpa chains
    untouched).  Restoring the seed's policy gives back the chains `up` installed.
    """
    from reconciler.backends.iptables.cflayout import render_asg_sync
    from reconciler.core.cellplan import CellSettings
    from reconciler.core.compile import compile_cell

    if not info.cf_layout:
        raise PlatformError(f"lab {info.name} has no CF chains (`asgctl lab up --cf-layout`)")
    underlay = (UNDERLAY_IF,)
    for cell in info.cells:
        containers = cell_containers(info.spec, info.net, info.guids, cell)
        plan = compile_cell(policy, containers, cell, CellSettings(underlay, underlay))
        text = render_asg_sync(plan, 4)
        if not text:
            continue
        argv = [f"iptables-{info.cf_layout}-restore", "--noflush"]
        try:
            run(netns_exec_argv(info.cell_netns(cell), argv), input=text)
        except NetnsError as exc:
            raise PlatformError(f"{cell}: CF's ASG chains did not update: {exc}") from None


def _start_git(
    directory: Path,
    spec: LabSpec,
    net: NetworkPlan,
    guids: Mapping[str, Guids],
    policies: Path,
    seed_hook: Callable[[Path], None] | None,
) -> str:
    """Seed the bare repository and serve it with `git daemon` on the host's loopback."""
    from asgctl_lab import policyrepo
    from asgctl_lab.gitserver import GitDaemon

    root = directory / "git"
    root.mkdir()
    repo = policyrepo.init_bare(root)
    with tempfile.TemporaryDirectory(prefix="asgctl-lab-seed-") as tmp:
        tree = Path(tmp)
        shutil.copytree(policies, tree / "policies")
        (tree / "lab.yaml").write_text(lab_yaml(spec, net, guids))
        (tree / "README.md").write_text(SEED_README)
        if seed_hook is not None:
            seed_hook(tree)
        policyrepo.seed(repo, tree, "Policy repository of the asgctl lab")
    daemon = GitDaemon(root)
    daemon.start()
    assert daemon.proc is not None
    _CHILDREN.append(daemon.proc)
    record = ProcessRecord("git-daemon", daemon.proc.pid, process_start_time(daemon.proc.pid))
    record_process(directory, record)
    url = daemon.url(policyrepo.REPO_NAME.removesuffix(".git"))
    policyrepo.git("ls-remote", "--", url)
    return url


SEED_README = """\
# The asgctl lab's policy repository

`policies/` is the example policy repo of asgctl; the cells' agents enforce it.  `lab.yaml`
describes the lab this repo was made for (cells, containers and services with their
addresses); nothing reads it but people.  Each cell's agent writes its status to the branch
`status/<cell>`; `asgctl status --source <this repo's URL>` shows them all.
"""


def lab_yaml(spec: LabSpec, net: NetworkPlan, guids: Mapping[str, Guids]) -> str:
    """The lab's topology, for the people reading the policy repo (deterministic)."""
    import yaml

    doc = {
        "overlay": str(OVERLAY_V4),
        "network_policies": [
            {"source": p.source, "destination": p.dest, "port": p.port, "protocol": p.protocol}
            for p in spec.network_policies
        ],
        "cells": {
            cell: {
                "underlay": {"interface": UNDERLAY_IF, "ip": net.cells[cell].uplink_ip},
                "overlay": {
                    "interface": VTEP_IF,
                    "ip": net.cells[cell].vtep_ip,
                    "lease": net.cells[cell].subnet,
                },
                "containers": [
                    {
                        "handle": c.name,
                        "ip": net.containers[c.name].ip,
                        "app": c.app,
                        "app_id": guids[c.app].app_id,
                        "workload": c.workload,
                    }
                    for c in spec.containers
                    if c.cell == cell
                ],
            }
            for cell in spec.cells
        },
        "services": {
            s.name: {
                "addresses": list(s.addresses),
                "tcp": list(s.tcp),
                "udp": list(s.udp),
                "description": s.description,
            }
            for s in spec.services
        },
    }
    header = "# The asgctl lab this repository was seeded for (informational).\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


# -- agents --------------------------------------------------------------------------------


def asgctl_argv() -> list[str]:
    """How to run asgctl from here: the venv's script, else this interpreter."""
    script = Path(sys.executable).parent / "asgctl"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from reconciler.cli import main; main()"]


def agent_log(info: LabInfo, cell: str) -> Path:
    """The agent's stdout: one JSON record per line (container-rules-changed, ...)."""
    return info.directory / "logs" / f"agent-{cell}.out"


def start_agents(
    info: LabInfo, interval: str = "2s", extra: Sequence[str] = (), log: Log = _quiet
) -> LabInfo:
    """One `asgctl agent` per cell, enforcing through `ip netns exec <cell>` (`--netns`),
    resolving grants by name with the lab's DNS server (`fqdn-resolvers` in its `--config`).

    They run in the host's namespace so they reach the git server on loopback like a real
    cell reaches its git server over the network; only their iptables commands enter the cell.
    """
    if info.agents():
        raise PlatformError(f"agents already run: {sorted(info.agents())}")
    settings: dict[str, Any] = {}
    with contextlib.suppress(PlatformError):  # names are resolved with the lab's DNS server
        settings["fqdn-resolvers"] = [dns_service(info).addresses[0]]
    for cell in info.cells:
        state = info.directory / "agents" / cell
        state.mkdir(parents=True, exist_ok=True)
        config = state.parent / f"{cell}.yml"
        config.write_text(json.dumps(settings) + "\n")  # JSON is YAML
        argv = [
            *asgctl_argv(),
            "agent",
            "--config",
            str(config),
            "--source",
            info.git_url,
            "--branch",
            "main",
            "--cell",
            cell,
            "--containers",
            str(info.store_path(cell)),
            "--interval",
            interval,
            "--netns",
            info.cell_netns(cell),
            "--state-dir",
            str(state),
            *extra,
        ]
        rec = spawn(
            info.directory,
            "agent",
            argv,
            cell=cell,
            stdout=agent_log(info, cell),
            log=info.directory / "logs" / f"agent-{cell}.err",
        )
        log(f"agent for {cell}: pid {rec.pid}, every {interval}, netns {info.cell_netns(cell)}")
    return load(info.name)


def stop_agents(info: LabInfo, timeout: float = 10.0) -> None:
    """SIGTERM every agent (each finishes its cycle and leaves the rules in place)."""
    records = [p for p in info.by_role("agent") if p.alive()]
    for p in records:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in records) and time.monotonic() < deadline:
        _reap_children()
        time.sleep(0.05)
    for p in records:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

    def forget(d: dict[str, Any]) -> None:
        d["processes"] = [x for x in d.get("processes", []) if x["role"] != "agent"]

    update_state(info.directory, forget)


# -- services that move --------------------------------------------------------------------


def add_service_address(info: LabInfo, service: str, address: str) -> LabInfo:
    """Give a running service one more address (e.g. MySQL comes up in a new data center)."""
    address = check_service_address(address)
    sn = info.net.services[service]
    current = info.service_addresses[service]
    if address in current:
        return info
    for other, addrs in info.service_addresses.items():
        if address in addrs:
            raise PlatformError(f"{address} already belongs to service {other}")
    run(["ip", "-n", sn.netns, "addr", "add", f"{address}/32", "dev", sn.ifname])
    run(["ip", "-n", info.net.core, "route", "add", f"{address}/32", "dev", sn.core_ifname])
    return _set_addresses(info, service, (*current, address))


def remove_service_address(info: LabInfo, service: str, address: str) -> LabInfo:
    """Take an address away from a service (the old data center is switched off)."""
    sn = info.net.services[service]
    current = info.service_addresses[service]
    if address not in current:
        return info
    run(["ip", "-n", info.net.core, "route", "del", f"{address}/32"], check=False)
    run(["ip", "-n", sn.netns, "addr", "del", f"{address}/32", "dev", sn.ifname], check=False)
    return _set_addresses(info, service, tuple(a for a in current if a != address))


def _set_addresses(info: LabInfo, service: str, addresses: tuple[str, ...]) -> LabInfo:
    def change(d: dict[str, Any]) -> None:
        current = d.setdefault(
            "service_addresses", {k: list(v) for k, v in info.service_addresses.items()}
        )
        current[service] = list(addresses)

    update_state(info.directory, change)
    return load(info.name)


# -- down ----------------------------------------------------------------------------------


def down(name: str = DEFAULT_NAME) -> list[str]:
    """Remove everything lab `name` made; returns what was removed.  Idempotent.

    Works from the state dir alone, so it also cleans up after an `up` killed half-way:
    processes first (a process or socket inside keeps a deleted namespace alive, unnamed and
    unfindable), then namespaces and any stray link with the lab id, then the state dir.
    """
    directory = lab_dir(name)
    removed: list[str] = []
    if not directory.exists():
        return removed
    lab_id: str | None = None
    records: list[ProcessRecord] = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        doc = json.loads((directory / STATE_FILE).read_text())
        lab_id = doc["id"] if _LAB_ID_RE.match(doc["id"]) else None
        records = [ProcessRecord(**p) for p in doc.get("processes") or []]
        owner = doc.get("owner") or {}
        if owner.get("pid") and owner.get("pid") != os.getpid():
            # An `up` still building this lab: stop it first, or it builds on.
            owner_rec = ProcessRecord("up", int(owner["pid"]), owner.get("start"))
            if owner_rec.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(owner_rec.pid, signal.SIGKILL)
                removed.append(f"process {owner_rec.pid} (the `up` building it)")
    # Host-namespace processes (git daemon, agents): by record, killing the whole process
    # group (upload-pack children, agents' git commands); then by state-dir path, for one
    # started in the instant before it could be recorded.
    for rec in records:
        if not rec.netns and rec.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
            removed.append(f"process {rec.pid} ({rec.role})")
    for pid in _processes_mentioning(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        removed.append(f"process {pid} (by path)")
    if lab_id is not None:
        removed += remove_namespaces(lab_id)
        removed += _remove_etc_netns(lab_id)
    _reap_children()
    shutil.rmtree(directory, ignore_errors=True)
    removed.append(f"dir {directory}")
    return removed


_KILLABLE = ("git", "python", "asgctl")


def _processes_mentioning(directory: Path) -> list[int]:
    """PIDs of git/python/asgctl processes whose command line names a path under `directory`.

    Restricted to the programs the lab itself starts, so an editor or a shell that merely
    has a lab file open is never killed.
    """
    needle = str(directory).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0]:
            continue
        prog = os.path.basename(argv[0].decode(errors="replace"))
        if not prog.startswith(_KILLABLE):
            continue
        if any(needle in a.decode(errors="replace") for a in argv[1:]):
            found.append(int(entry.name))
    return found


def list_labs() -> list[str]:
    """Names of the labs recorded under the state root."""
    root = state_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))


# -- status --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """What is missing from a lab that should be running."""

    missing_namespaces: tuple[str, ...]
    dead: tuple[ProcessRecord, ...]

    @property
    def ok(self) -> bool:
        return not self.missing_namespaces and not self.dead


def health(info: LabInfo) -> Health:
    present = set(safe_list_netns())
    missing = tuple(ns for ns in info.net.namespaces if ns not in present)
    dead = tuple(p for p in info.processes if not p.alive())
    return Health(missing, dead)


def short_addresses(addresses: Sequence[str]) -> str:
    """A service's addresses for a one-line listing: the first two, then how many more."""
    more = f" (+{len(addresses) - 2})" if len(addresses) > 2 else ""
    return ",".join(addresses[:2]) + more


def render_status(info: LabInfo) -> str:
    """The lab at a glance: where everything is, and whether it is still alive."""
    h = health(info)
    alive = {(p.role, p.netns, p.cell): p for p in info.processes}

    def pid(role: str, netns: str = "", cell: str = "") -> str:
        p = alive.get((role, netns, cell))
        if p is None:
            return "-"
        return f"pid {p.pid}" + ("" if p.alive() else " DEAD")

    lines = [
        f"lab {info.name} ({info.lab_id}): {info.phase}, created {info.created}",
        f"  state   {info.directory}",
        f"  git     {info.git_url or '-'}  ({pid('git-daemon')})",
        f"  network {info.net.core} routes between the cells and the services (the underlay)",
        f"  overlay {VTEP_IF} (VXLAN {VXLAN_VNI}, port {VXLAN_PORT}) in every cell, "
        f"{OVERLAY_V4} standing in for CF's 10.255.0.0/16",
        "  network policies "
        + (
            ", ".join(
                f"{p.source} -> {p.dest}:{p.port}/{p.protocol}" for p in info.spec.network_policies
            )
            or "-"
        )
        + (f"; CF's chains installed (iptables-{info.cf_layout})" if info.cf_layout else ""),
        "",
    ]
    for cell in info.cells:
        cn = info.net.cells[cell]
        lines.append(
            f"{cell}  netns {cn.netns}  containers {cn.subnet}  agent {pid('agent', '', cell)}"
        )
        lines.append(
            f"  underlay {cn.ifname} {cn.uplink_ip}  overlay {VTEP_IF} {cn.vtep_ip} {cn.vtep_mac}"
        )
        lines.append(f"  store {info.store_path(cell)}")
        for c in info.spec.containers:
            if c.cell != cell:
                continue
            net = info.net.containers[c.name]
            lines.append(
                f"  {c.name:<14} {net.ip:<13} {c.app:<26} {c.workload:<8}"
                f" {pid('container', net.netns)}"
            )
    lines.append("")
    lines.append("services")
    for s in info.spec.services:
        sn = info.net.services[s.name]
        ports = [f"{p}/tcp" for p in s.tcp] + [f"{p}/udp" for p in s.udp]
        addrs = short_addresses(info.service_addresses.get(s.name, s.addresses))
        role = "dns" if s.dns else "service"
        lines.append(f"  {s.name:<13} {addrs:<27} {' '.join(ports):<16} {pid(role, sn.netns)}")
    lines.append("")
    if h.ok:
        lines.append("healthy: every namespace and process is in place")
    else:
        if h.missing_namespaces:
            lines.append(f"UNHEALTHY: missing namespaces {', '.join(h.missing_namespaces)}")
        for p in h.dead:
            lines.append(f"UNHEALTHY: {p.role} {p.cell or p.netns} (pid {p.pid}) is gone")
    return "\n".join(lines) + "\n"
