"""A real DNS server in the lab's outside world: dnsmasq in a service namespace.

It serves the lab's names from a hosts file of its own (`addn-hosts`), authoritative-style
with a short TTL (`local-ttl`), and nothing else (no upstream, no /etc/hosts, no system
config).  `set_record` rewrites the file and sends SIGHUP, which makes dnsmasq read it
again: the test's "the provider moves the service" without a restart.

Round robin: a name with several addresses is answered with all of them, in an order that
dnsmasq rotates by one place on every query ("Dnsmasq normally permutes the order of A or
AAAA records for the same name on successive queries", man dnsmasq, `--no-round-robin`;
Debian bookworm's 2.90 does it for `addn-hosts` names too, which `tests/test_lab_dns.py`
checks on the wire).  So a name of 16 addresses is what a CDN or round-robin DNS looks like
to a container: whichever address it picks first changes from one lookup to the next.
`answer_order` reads an answer's addresses in wire order (the agent's client sorts them).

Names served here must be in `.lab.example` (reserved by RFC 2606, never on the internet)
and addresses in the lab's ranges (198.18.0.0/15, fd00::/8).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from asgctl_lab.nsenter import netns_exec_argv
from reconciler.backends.kernel.nsthread import run_in_netns
from reconciler.core.names import fqdn_problem
from reconciler.fqdn.dns import (
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    UDP_PAYLOAD,
    Client,
    DnsError,
    build_query,
    parse_response,
    read_name,
)

LAB_DOMAIN = ".lab.example"
_LAB_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8"))


class LabDnsError(RuntimeError):
    pass


def check_record(name: str, addresses: list[str]) -> None:
    """A lab record: a valid host name in `.lab.example`, addresses in the lab's ranges."""
    problem = fqdn_problem(name)
    if problem or name.startswith("*"):
        raise LabDnsError(f"{name!r}: {problem or 'the lab serves exact names only'}")
    if not name.endswith(LAB_DOMAIN):
        raise LabDnsError(f"{name!r}: lab names end in {LAB_DOMAIN}")
    if not addresses:
        raise LabDnsError(f"{name}: give at least one address")
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise LabDnsError(f"{a!r} is not an IP address") from None
        if not any(ip in net for net in _LAB_NETS):
            raise LabDnsError(f"{a}: lab addresses are in 198.18.0.0/15 or fd00::/8")


def write_hosts(path: Path, records: dict[str, list[str]]) -> None:
    """The records as dnsmasq's `addn-hosts` file, replaced atomically (never half-read)."""
    lines = [f"{a} {name}" for name, addrs in sorted(records.items()) for a in addrs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_hosts(path: Path) -> dict[str, list[str]]:
    """The records of a file `write_hosts` wrote, in its order."""
    records: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            records.setdefault(parts[1], []).append(parts[0])
    return records


class LabDns:
    """dnsmasq listening on `address` port 53 inside namespace `netns`.

    `start` runs it as our child (the tests); the platform lab spawns `argv()` itself, as a
    process that outlives the command that started it, and `attach`es to it later (`asgctl
    lab dns set`) by the PID it recorded."""

    def __init__(self, netns: str, address: str, workdir: Path, ttl: int = 2) -> None:
        if shutil.which("dnsmasq") is None:
            raise LabDnsError(
                "dnsmasq is not installed (make sysdeps: apt-get install dnsmasq-base)"
            )
        self.netns = netns
        self.address = address
        self.ttl = ttl
        self.hosts = workdir / "lab-dns.hosts"
        self.records: dict[str, list[str]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.log = workdir / "lab-dns.log"

    def argv(self) -> list[str]:
        """dnsmasq serving the hosts file only: no upstream, no /etc/hosts, no system config."""
        return [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--addn-hosts={self.hosts}",
            f"--listen-address={self.address}",
            "--bind-interfaces",
            "--port=53",
            f"--local-ttl={self.ttl}",
            "--user=root",
            "--pid-file=",
            f"--log-facility={self.log}",
            "--log-queries",
        ]

    def prepare(self, records: dict[str, list[str]]) -> LabDns:
        """Check and write the records, before the server starts."""
        for name, addresses in records.items():
            check_record(name, addresses)
        self.records = {k: list(v) for k, v in records.items()}
        write_hosts(self.hosts, self.records)
        return self

    def start(self, records: dict[str, list[str]]) -> LabDns:
        self.prepare(records)
        self.proc = subprocess.Popen(
            netns_exec_argv(self.netns, self.argv()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.wait_listening()
        return self

    def attach(self, pid: int) -> LabDns:
        """The server already running as `pid` (the platform's), with the records on disk."""
        self.pid = pid
        self.records = read_hosts(self.hosts)
        return self

    def _exited(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            return f"dnsmasq exited ({self.proc.returncode}): {err.strip()}"
        if self.proc is None and self.pid is not None and not _alive(self.pid):
            return f"dnsmasq (pid {self.pid}) exited; see {self.log}"
        return None

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            why = self._exited()
            if why:
                raise LabDnsError(why)
            host = f"[{self.address}]" if ":" in self.address else self.address  # IPv6
            out = subprocess.run(
                netns_exec_argv(self.netns, ["ss", "-Hlun", f"src {host}:53"]),
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise LabDnsError("dnsmasq did not start listening")

    def set_record(self, name: str, addresses: list[str]) -> None:
        """Point `name` at `addresses` (the provider moved it); dnsmasq rereads on SIGHUP."""
        check_record(name, addresses)
        if self.pid is None or self._exited():
            raise LabDnsError("dnsmasq is not running")
        self.records[name] = list(addresses)
        write_hosts(self.hosts, self.records)
        os.kill(self.pid, signal.SIGHUP)
        self._wait_answer(name, addresses)

    def query(self, name: str, ipv6: bool = False) -> tuple[str, ...]:
        """The server's answer now, asked from its own namespace."""
        client = Client(self.address, 53, 1.0)
        qtype = QTYPE_AAAA if ipv6 else QTYPE_A
        return run_in_netns(self.netns, client.query, name, qtype).addresses

    def answer_order(self, name: str, ipv6: bool = False) -> tuple[str, ...]:
        """The addresses of one answer as the server ordered them (round robin shows here)."""
        return lookup(self.netns, self.address, name, ipv6=ipv6)

    def _wait_answer(self, name: str, addresses: list[str], timeout: float = 5.0) -> None:
        """dnsmasq rereads on SIGHUP in its own time: wait until it answers the new record."""
        want4 = sorted(a for a in addresses if ":" not in a)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if sorted(self.query(name)) == want4:
                    return
            except DnsError:
                pass
            time.sleep(0.05)
        raise LabDnsError(f"dnsmasq did not take the new record for {name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.pid = None


def lookup(
    netns: str, server: str, name: str, *, ipv6: bool = False, timeout: float = 1.0
) -> tuple[str, ...]:
    """Ask `server` for `name` from inside `netns` (a container: the query crosses its cell's
    firewall as the container's own would); the addresses in the server's order.

    The answer is first checked to be ours by the agent's own `parse_response` (id,
    question, flags); only then are its records read again in order.  LabDnsError when no
    usable answer comes (the firewall rejected the query, the server is down, NXDOMAIN)."""
    qtype = QTYPE_AAAA if ipv6 else QTYPE_A
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    txid = secrets.randbits(16)

    def ask() -> bytes:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.connect((server, 53))
            sock.send(build_query(txid, name, qtype))
            return sock.recv(UDP_PAYLOAD)

    try:
        data = run_in_netns(netns, ask)
        answer, truncated = parse_response(data, txid, name, qtype)
    except (OSError, DnsError) as exc:
        why = str(exc) or type(exc).__name__
        raise LabDnsError(f"{name}: no answer from {server} ({why})") from None
    if truncated:
        raise LabDnsError(f"the answer for {name} was truncated")
    if answer.rcode:
        raise LabDnsError(f"{name}: {server} has no such name (NXDOMAIN)")
    ordered = _addresses_in_order(data, name, qtype)
    if sorted(ordered) != sorted(answer.addresses):
        raise LabDnsError(f"the answer for {name} is not a plain list of addresses")
    return ordered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _addresses_in_order(data: bytes, name: str, qtype: int) -> tuple[str, ...]:
    """The answer section's `qtype` records owned by `name`, in message order."""
    count = struct.unpack("!H", data[6:8])[0]
    _, pos = read_name(data, 12)
    pos += 4
    out = []
    for _ in range(count):
        owner, pos = read_name(data, pos)
        rtype, rclass, _ttl, size = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        if owner == name and rtype == qtype and rclass == QCLASS_IN:
            out.append(str(ipaddress.ip_address(data[pos : pos + size])))
        pos += size
    return tuple(out)
