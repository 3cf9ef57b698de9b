"""A network-namespace lab: one Cloud Foundry-style cell, its containers and outside services.

Topology (every box is a network namespace, every line a veth pair)::

    container ns --veth-- +-----------+ --veth-- service ns (echo servers)
    container ns --veth-- | cell ns   | --veth-- service ns
                          | forwards, |
                          | FORWARD   |
                          | filters   |
                          +-----------+

The cell routes between containers and services, so container egress crosses the cell's
FORWARD chain: exactly where a real cell (and the reconciler) filters it.  The service veths
are the cell's underlay: its default routes leave through them (one ECMP route per family
over every service of that family), as a Diego cell's leave through its BOSH interface, so
the underlay is found the way the agent finds it on a real cell.  A container may listen too
(`ContainerSpec.tcp_ports`): traffic to it crosses FORWARD out of its container veth, never
the underlay, as container-to-container traffic does on a real cell.  Each veth is its
own point-to-point subnet (a /30 and, when dual-stack, a /64) with the gateway on the cell's
end, so no bridge, no proxy ARP and no NAT is involved and the source address a rule sees is
the container's own.  Addresses come only from 198.18.0.0/15 and fd00::/8: containers from
198.18.0.0/16 and fd00:18::/48, services from 198.19.0.0/16 and fd00:19::/48.

Every name the lab creates (namespaces, interfaces, its temp dir) starts with the lab id, a
short unique prefix such as ``asgt1a2b``, so parallel labs never collide and whatever a
crashed run leaves behind can be found and removed (`cleanup_stale`).  Veth ends are created
directly inside their namespaces, so a lab never leaves anything in the host's namespace.

Teardown is guaranteed three ways: the context manager (also when `start` itself fails),
an atexit hook for scripts that forget, and `cleanup_stale` for runs that were killed.  Echo
servers also exit on their own when the lab's process dies (they watch a pipe from it).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Self, cast

from asgctl_lab.nsenter import (
    enable_conntrack,
    list_links,
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
from asgctl_lab.probe import HeldConnection, ProbeResult, ping, probe_tcp, probe_udp
from reconciler.atomicfile import atomic_write_text
from reconciler.core.model import Container
from reconciler.sources import cellstore

PREFIX_ROOT = "asgt"
"""Every lab id starts with this; `cleanup_stale(PREFIX_ROOT)` finds all dead labs."""

CONTAINERS_V4 = ipaddress.IPv4Network("198.18.0.0/16")
SERVICES_V4 = ipaddress.IPv4Network("198.19.0.0/16")
CONTAINERS_V6 = ipaddress.IPv6Network("fd00:18::/48")
SERVICES_V6 = ipaddress.IPv6Network("fd00:19::/48")
OWNER_DIR = Path("/run/asgt-lab")
"""One `<lab id>.json` per lab: the owning process and the lab's temp dir."""
MAX_IFNAME = 15  # IFNAMSIZ - 1
MAX_ENDPOINTS = 9999  # keeps `<8-char id>-c9999p` within MAX_IFNAME

Workload = Literal["app", "task", "staging"]
WORKLOADS: tuple[str, ...] = ("app", "task", "staging")
Role = Literal["container", "service"]

_LAB_ID_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


class LabError(RuntimeError):
    """The lab could not be built (the message says which step and why)."""


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern}")


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """A container to run on the cell, with the CF metadata the compiler keys rules on."""

    name: str
    app_id: str = ""
    space_id: str = ""
    org_id: str = ""
    policy_group_id: str = ""
    workload: Workload = "app"
    handle: str = ""
    """CF container handle (the store.json key); defaults to `name`."""
    ipv6: bool = False
    tcp_ports: tuple[int, ...] = ()
    """Echo servers in the container: another app's container a peer can reach on the cell."""
    udp_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_name("container", self.name)
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        if not self.handle:
            object.__setattr__(self, "handle", self.name)
        _check_ports(self)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """An external service: a namespace with echo servers on the given ports."""

    name: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    ipv6: bool = False

    def __post_init__(self) -> None:
        _check_name("service", self.name)
        _check_ports(self)


def _check_ports(spec: ContainerSpec | ServiceSpec) -> None:
    for attr in ("tcp_ports", "udp_ports"):
        ports = tuple(getattr(spec, attr))  # accept lists; store tuples (hashable)
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"{attr} must be in 1..65535, got {ports}")
        object.__setattr__(spec, attr, ports)


@dataclass(frozen=True, slots=True)
class Attachment:
    """How the lab attaches a container or service to a cell: namespace, veth ends, addresses.

    (Not `core.endpoint.Endpoint`, the `IP[:PORT][/PROTO]` a rule is asked about.)
    """

    name: str
    role: Role
    netns: str
    ifname: str
    """Its end of the veth, inside `netns`."""
    cell_ifname: str
    """The cell's end of the veth, inside the cell namespace (holds the gateways)."""
    ipv4: str
    gateway4: str
    ipv6: str | None = None
    gateway6: str | None = None

    def address(self, ipv6: bool = False) -> str:
        """Its IPv4 address, or its IPv6 one (ValueError when it is not dual-stack)."""
        if not ipv6:
            return self.ipv4
        if self.ipv6 is None:
            raise ValueError(f"{self.role} {self.name} has no IPv6 address (ipv6=False)")
        return self.ipv6


def new_lab_id() -> str:
    """`asgt` + 4 hex digits, not used by any namespace or temp dir on this host."""
    taken = {n.split("-", 1)[0] for n in safe_list_netns()}
    taken |= {p.name.split("-", 1)[0] for p in Path(tempfile.gettempdir()).glob("asgt*-*")}
    taken |= {p.stem for p in OWNER_DIR.glob("*.json")}
    for _ in range(100):
        lab_id = PREFIX_ROOT + secrets.token_hex(2)
        if lab_id not in taken:
            return lab_id
    raise LabError("could not find an unused lab id")


def plan_endpoints(
    lab_id: str, containers: Sequence[ContainerSpec], services: Sequence[ServiceSpec]
) -> tuple[dict[str, Attachment], dict[str, Attachment]]:
    """Names and addresses for every endpoint; pure, so it is unit-tested without root.

    Attachment i of a role gets the i-th /30 (gateway .1, host .2 of the block) and the i-th
    /64 (gateway ::1, host ::2) of that role's range; order decides, so the same specs give
    the same addresses every run.
    """
    if not _LAB_ID_RE.match(lab_id):
        raise ValueError(f"lab id {lab_id!r} must match {_LAB_ID_RE.pattern}")
    for kind, specs in (("container", containers), ("service", services)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {kind} names: {sorted(names)}")
        if len(specs) > MAX_ENDPOINTS:
            raise ValueError(f"at most {MAX_ENDPOINTS} {kind}s per lab")
    handles = [c.handle for c in containers]
    if len(set(handles)) != len(handles):
        raise ValueError(f"duplicate container handles: {sorted(handles)}")

    def build(role: Role, tag: str, i: int, name: str, ipv6: bool) -> Attachment:
        # One veth: <id>-<tag><i> in the cell, <id>-<tag><i>p in the endpoint's namespace.
        net4, net6 = (CONTAINERS_V4, CONTAINERS_V6)
        if role == "service":
            net4, net6 = SERVICES_V4, SERVICES_V6
        base4 = int(net4.network_address) + 4 * i
        base6 = int(net6.network_address) + (i << 64)
        cell_if = f"{lab_id}-{tag}{i}"
        assert len(cell_if) + 1 <= MAX_IFNAME, cell_if
        return Attachment(
            name=name,
            role=role,
            netns=f"{lab_id}-{tag}-{name}",
            ifname=cell_if + "p",
            cell_ifname=cell_if,
            ipv4=str(ipaddress.IPv4Address(base4 + 2)),
            gateway4=str(ipaddress.IPv4Address(base4 + 1)),
            ipv6=str(ipaddress.IPv6Address(base6 + 2)) if ipv6 else None,
            gateway6=str(ipaddress.IPv6Address(base6 + 1)) if ipv6 else None,
        )

    return (
        {c.name: build("container", "c", i, c.name, c.ipv6) for i, c in enumerate(containers)},
        {s.name: build("service", "s", i, s.name, s.ipv6) for i, s in enumerate(services)},
    )


def store_document(
    containers: Iterable[ContainerSpec], endpoints: Mapping[str, Attachment]
) -> dict[str, Any]:
    """The cell's containers in CF's container metadata store format (store.json)."""
    return cellstore.store_document(
        Container(
            handle=c.handle,
            ip=endpoints[c.name].ipv4,
            app_id=c.app_id,
            space_id=c.space_id,
            org_id=c.org_id,
            policy_group_id=c.policy_group_id,
            workload=c.workload,
        )
        for c in containers
    )


def write_json_atomic(path: Path, document: Any) -> Path:
    """Write JSON via a temp file in the same directory and rename(2) it into place.

    The agent may read store.json while the lab rewrites it; a reader must see either the
    old file or the new one, never half of one.
    """
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(path, text, mode=0o644, fsync=True)


class Lab:
    """One cell with containers and services in network namespaces; see the module docstring.

    Use it as a context manager::

        web, db = ContainerSpec("web", app_id="a1"), ServiceSpec("db", tcp_ports=(5432,))
        with Lab([web], [db]) as lab:
            lab.cell_exec(["iptables-restore", "--noflush"], input=rules)
            assert lab.probe_tcp("web", "db", 5432).outcome is Outcome.REJECTED
    """

    def __init__(
        self,
        containers: Sequence[ContainerSpec] = (),
        services: Sequence[ServiceSpec] = (),
        *,
        lab_id: str | None = None,
        conntrack: bool = True,
    ) -> None:
        """Plan the lab (validates names and addresses); nothing is created until `start`.

        `conntrack=True` turns connection tracking on in the cell from the start, as on a real
        cell.  Without it, conntrack only starts when the first rule that needs it is
        installed, so connections opened before that are not ESTABLISHED and are cut off by a
        default-reject ruleset (the kernel picks them up mid-stream as NEW).
        """
        self.lab_id = lab_id or new_lab_id()
        self.container_specs: tuple[ContainerSpec, ...] = tuple(containers)
        self.service_specs: tuple[ServiceSpec, ...] = tuple(services)
        self.containers, self.services = plan_endpoints(
            self.lab_id, self.container_specs, self.service_specs
        )
        self.cell = f"{self.lab_id}-cell"
        self.conntrack = conntrack
        self.workdir: Path | None = None
        self._servers: list[subprocess.Popen[bytes]] = []
        self._held: list[HeldConnection] = []
        self._state: Literal["planned", "started", "torn down"] = "planned"
        self._owner_pid = os.getpid()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def start(self) -> Self:
        """Create everything; on any failure remove what was made and re-raise."""
        if self._state != "planned":
            raise LabError(f"lab {self.lab_id} is {self._state}; plan a new Lab instead")
        self._state = "started"
        atexit.register(self._teardown_at_exit)
        try:
            self._claim()
            self._build_network()
            if self.conntrack:
                self._enable_conntrack()
            self._start_servers()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Remove every namespace, veth, process and temp dir of this lab.  Idempotent."""
        for conn in self._held:
            conn.close()  # sockets keep their namespace alive
        self._held.clear()
        for proc in self._servers:
            _stop_process(proc)
        self._servers.clear()
        if self._state != "planned":  # never started: the id may even be someone else's
            _remove_lab(self.lab_id)
        self._state = "torn down"
        atexit.unregister(self._teardown_at_exit)

    def _teardown_at_exit(self) -> None:
        # Only in the process that built the lab: a forked child exiting must not take the
        # parent's lab down with it.
        if os.getpid() == self._owner_pid:
            self.teardown()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab, the cell first."""
        eps = [*self.containers.values(), *self.services.values()]
        return [self.cell, *(e.netns for e in eps)]

    @property
    def pids(self) -> list[int]:
        """PIDs of the echo servers this lab started."""
        return [p.pid for p in self._servers]

    def _claim(self) -> None:
        """Record who owns this lab id, then make the temp dir, before any namespace exists.

        So `cleanup_stale` in a parallel session never mistakes a lab being built for a dead
        one.  The record lives in OWNER_DIR, not in the temp dir, so it is found whatever
        TMPDIR the other session has, and it names the temp dir so that is found too.
        """
        owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}
        OWNER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        record = OWNER_DIR / f"{self.lab_id}.json"
        write_json_atomic(record, owner)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.lab_id}-"))
        write_json_atomic(record, {**owner, "workdir": str(self.workdir)})

    def _build_network(self) -> None:
        endpoints = [*self.containers.values(), *self.services.values()]
        # 1. the namespaces.
        _ip_batch([f"netns add {ns}" for ns in self.namespaces])
        # 2. sysctls, before any interface exists so that new ones inherit `default`:
        #  - no IPv6 DAD: while an interface's link-local address is tentative, IPv6 through
        #    it stalls (measured here: TCP over IPv6 only worked ~2 s after setup);
        #  - no ICMP rate limit: tests fire many rejected probes in a row, and the default
        #    (a burst of 6, then 1/s per peer) turns later REJECTs into silent timeouts;
        #  - the cell forwards, IPv4 and IPv6.
        common = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
        ]
        forwarding = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        wait_all(
            [
                start_command(
                    netns_exec_argv(
                        ns,
                        ["sysctl", "-q", "-w", *common, *(forwarding if ns == self.cell else [])],
                    )
                )
                for ns in self.namespaces
            ],
            "lab setup",
            timeout=30,
        )
        # 3. the veths, each end created directly in its namespace: nothing ever exists in
        #    the host's namespace, so nothing can be left behind there.
        _ip_batch(
            [
                f"link add name {e.cell_ifname} netns {self.cell} type veth"
                f" peer name {e.ifname} netns {e.netns}"
                for e in endpoints
            ]
        )
        # 4. addresses and routes: gateways on the cell's ends; each endpoint's address and
        #    default routes via the cell (`nodad` too, in case `default` was not inherited).
        cell_cmds = ["link set lo up"]
        for e in endpoints:
            cell_cmds.append(f"addr add {e.gateway4}/30 dev {e.cell_ifname}")
            if e.gateway6:
                cell_cmds.append(f"addr add {e.gateway6}/64 dev {e.cell_ifname} nodad")
            cell_cmds.append(f"link set {e.cell_ifname} up")
        cell_cmds.extend(self._default_routes())
        procs = [start_ip_batch(["ip", "-n", self.cell], cell_cmds)]
        for e in endpoints:
            cmds = ["link set lo up", f"addr add {e.ipv4}/30 dev {e.ifname}"]
            if e.ipv6:
                cmds.append(f"addr add {e.ipv6}/64 dev {e.ifname} nodad")
            cmds += [f"link set {e.ifname} up", f"route add default via {e.gateway4}"]
            if e.gateway6:
                cmds.append(f"route add default via {e.gateway6}")
            procs.append(start_ip_batch(["ip", "-n", e.netns], cmds))
        wait_all(procs, "lab setup", timeout=30)

    @property
    def underlay(self) -> tuple[str, ...]:
        """The cell's underlay interfaces: its service veths, where its default routes go."""
        return tuple(e.cell_ifname for e in self.services.values())

    def _default_routes(self) -> list[str]:
        """The cell's default routes: per family, one (ECMP) route over its services."""
        out = []
        for family in (4, 6):
            hops = [
                (e.address(family == 6), e.cell_ifname)
                for e in self.services.values()
                if family == 4 or e.ipv6
            ]
            if len(hops) == 1:
                out.append(f"route add default via {hops[0][0]} dev {hops[0][1]}")
            elif hops:
                nexthops = " ".join(f"nexthop via {a} dev {d}" for a, d in hops)
                out.append(f"route add default {nexthops}")
        return out

    def _enable_conntrack(self) -> None:
        if shutil.which("nft") is None:
            raise LabError("conntrack=True needs nft (apt-get install nftables) or pass False")
        enable_conntrack(
            self.cell,
            self.lab_id,
            "asgt lab: connection tracking on from the start, as on a real cell",
        )

    def _start_servers(self) -> None:
        assert self.workdir is not None
        env = python_env()
        specs: list[tuple[ContainerSpec | ServiceSpec, Attachment]] = [
            *((s, self.services[s.name]) for s in self.service_specs),
            *((c, self.containers[c.name]) for c in self.container_specs),
        ]
        for spec, endpoint in specs:
            if not (spec.tcp_ports or spec.udp_ports):
                continue
            hosts = ["0.0.0.0"] + (["[::]"] if spec.ipv6 else [])
            argv = [sys.executable, "-m", "asgctl_lab.echo"]
            for host in hosts:
                argv += [a for p in spec.tcp_ports for a in ("--tcp", f"{host}:{p}")]
                argv += [a for p in spec.udp_ports for a in ("--udp", f"{host}:{p}")]
            with open(self.workdir / f"echo-{endpoint.netns}.log", "wb") as log:
                proc = subprocess.Popen(
                    netns_exec_argv(endpoint.netns, argv),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    start_new_session=True,  # a Ctrl-C in the terminal goes to us, not them
                )
            self._servers.append(proc)
        self._wait_ready(timeout=15.0)

    def _wait_ready(self, timeout: float) -> None:
        waiting = {p.stdout: p for p in self._servers if p.stdout is not None}
        sel = selectors.DefaultSelector()
        for stream in waiting:
            sel.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(f"echo servers not ready after {timeout}s: {self._logs()}")
                for key, _ in sel.select(left):
                    ready = cast(IO[bytes], key.fileobj)  # registered above: a server's stdout
                    line = ready.readline()
                    if line.strip() != b"ready":
                        raise LabError(f"echo server failed to start: {self._logs()}")
                    sel.unregister(ready)
                    del waiting[ready]
        finally:
            sel.close()

    def _logs(self) -> str:
        assert self.workdir is not None
        return "; ".join(
            f"{p.name}: {p.read_text(errors='replace').strip()[-500:]}"
            for p in sorted(self.workdir.glob("echo-*.log"))
        )

    # -- running things ----------------------------------------------------------------------

    def cell_exec(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = False,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the cell namespace (e.g. iptables-restore), capturing text output.

        With `check`, raises subprocess.CalledProcessError (carrying stdout and stderr).
        """
        return self.exec_in(self.cell, argv, input=input, check=check, timeout=timeout)

    def exec_in(
        self,
        where: str,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = False,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a container or service (by name) or in any of the lab's namespaces."""
        ep = self.containers.get(where) or self.services.get(where)
        netns = ep.netns if ep else where
        if netns not in self.namespaces:
            raise KeyError(f"{where!r} is not a container, service or namespace of this lab")
        return subprocess.run(
            netns_exec_argv(netns, argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    # -- inventory ---------------------------------------------------------------------------

    def store_document(self) -> dict[str, Any]:
        """This cell's containers in CF's container metadata store format."""
        return store_document(self.container_specs, self.containers)

    def write_store(self, path: str | Path | None = None) -> Path:
        """Write store.json atomically (default: in the lab's temp dir) and return its path."""
        if path is None:
            if self.workdir is None:
                raise LabError("the lab has no workdir before start(); pass a path")
            path = self.workdir / "store.json"
        return write_json_atomic(Path(path), self.store_document())

    # -- probes ------------------------------------------------------------------------------

    def _target(self, service: str, ipv6: bool) -> str:
        """A service's address, else a (listening) container's, else `service` as given."""
        if service in self.services:
            return self.services[service].address(ipv6)
        if service in self.containers:
            return self.containers[service].address(ipv6)
        return service

    def probe_tcp(
        self, container: str, service: str, port: int, *, ipv6: bool = False, timeout: float = 1.0
    ) -> ProbeResult:
        """TCP connect from `container` to `service` (a service name or a lab address)."""
        target = self._target(service, ipv6)
        return probe_tcp(self.containers[container].netns, target, port, timeout=timeout)

    def probe_udp(
        self, container: str, service: str, port: int, *, ipv6: bool = False, timeout: float = 1.0
    ) -> ProbeResult:
        """One UDP datagram from `container` to `service`; waits for a reply or ICMP error."""
        target = self._target(service, ipv6)
        return probe_udp(self.containers[container].netns, target, port, timeout=timeout)

    def ping(
        self,
        container: str,
        service: str,
        *,
        ipv6: bool = False,
        icmp_type: int | None = None,
        icmp_code: int = 0,
        timeout: float = 1.0,
    ) -> ProbeResult:
        """One ICMP message (echo request unless `icmp_type` says otherwise)."""
        target = self._target(service, ipv6)
        return ping(
            self.containers[container].netns,
            target,
            icmp_type=icmp_type,
            icmp_code=icmp_code,
            timeout=timeout,
        )

    def hold_tcp(
        self, container: str, service: str, port: int, *, ipv6: bool = False, timeout: float = 1.0
    ) -> HeldConnection:
        """Open a long-lived connection to an echo port; the lab closes it on teardown."""
        target = self._target(service, ipv6)
        conn = HeldConnection(self.containers[container].netns, target, port, timeout=timeout)
        self._held.append(conn)
        return conn

    def __repr__(self) -> str:
        return (
            f"Lab({self.lab_id}, {self._state}, containers={sorted(self.containers)}, "
            f"services={sorted(self.services)})"
        )


# -- cleanup -------------------------------------------------------------------------------


def cleanup_stale(prefix: str = PREFIX_ROOT, *, include_live: bool = False) -> list[str]:
    """Remove leftovers of labs whose id starts with `prefix`; returns what was removed.

    A lab whose owning process is still running is left alone unless `include_live`, so a
    test session can call ``cleanup_stale()`` at start without breaking a parallel session.
    """
    ids = {n.split("-", 1)[0] for n in safe_list_netns() if n.startswith(prefix)}
    ids |= {n.split("-", 1)[0] for n in list_links() if n.startswith(prefix)}
    ids |= {p.stem for p in OWNER_DIR.glob(f"{prefix}*.json")}
    tmp = Path(tempfile.gettempdir())
    ids |= {p.name.split("-", 1)[0] for p in tmp.glob(f"{prefix}*-*") if p.is_dir()}
    removed: list[str] = []
    for lab_id in sorted(i for i in ids if _LAB_ID_RE.match(i)):
        if include_live or not _owner_alive(lab_id):
            removed += _remove_lab(lab_id)
    return removed


def _remove_lab(lab_id: str) -> list[str]:
    """Delete everything named after `lab_id`: processes, namespaces, links, dirs, record."""
    removed = remove_namespaces(lab_id)
    record = OWNER_DIR / f"{lab_id}.json"
    dirs = set(Path(tempfile.gettempdir()).glob(f"{lab_id}-*"))
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        dirs.add(Path(json.loads(record.read_text())["workdir"]))
    for path in sorted(dirs):
        if path.is_dir() and path.name.startswith(f"{lab_id}-"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
        removed.append(f"record {record}")
    return removed


def _owner_alive(lab_id: str) -> bool:
    try:
        owner = json.loads((OWNER_DIR / f"{lab_id}.json").read_text())
        return process_start_time(int(owner["pid"]), zombie_is_dead=False) == owner["start_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -- processes -----------------------------------------------------------------------------


def _ip_batch(commands: list[str]) -> None:
    """Run `ip` commands in the host namespace, one process for all of them."""
    run(["ip", "-batch", "-"], input="\n".join(commands) + "\n")


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Ask nicely (close its stdin, SIGTERM), then SIGKILL; always reap, so no zombie."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- environment check ---------------------------------------------------------------------

_UNAVAILABLE: list[str | None] = []


def netns_unavailable_reason() -> str | None:
    """Why this host cannot run a lab (not root, no `ip`, namespaces refused), or None.

    Tries to create and delete a namespace once per process, because being root is not
    enough inside an unprivileged container.
    """
    if _UNAVAILABLE:
        return _UNAVAILABLE[0]
    reason: str | None = None
    if os.geteuid() != 0:
        reason = "network namespaces need root (euid is not 0)"
    elif shutil.which("ip") is None:
        reason = "iproute2's `ip` is not installed"
    else:
        # Shaped like a lab (so cleanup_stale reaps it if we die here) but never a real lab
        # id, which is all hex after the root.
        probe = f"{PREFIX_ROOT}z{os.getpid() & 0xFFF:03x}-probe"
        try:
            added = run(["ip", "netns", "add", probe], check=False, timeout=10)
            if added.returncode != 0:
                reason = f"`ip netns add` failed: {added.stderr.strip()}"
            run(["ip", "netns", "del", probe], check=False, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"`ip netns` is unavailable: {exc}"
    _UNAVAILABLE.append(reason)
    return reason
