"""The lab cell the FQDN traffic tests share: one per backend variant, set writers to match,
and a round-robin service answering on many addresses."""

from __future__ import annotations

from asgctl_lab.dns import LabDns
from asgctl_lab.netns import Lab
from reconciler.backends import Backend, Runner, open_backend
from reconciler.backends.iptables.backend import IptablesBackend
from reconciler.backends.nftables.backend import NftablesBackend
from reconciler.fqdn.kernelsets import IpsetWriter, NftWriter, SetWriter
from tests.conftest import require_netns, skip_unless_available, tool_unavailable_reason

VARIANTS = ("legacy", "nft", "libiptc", "nftables")
"""Every backend: iptables-legacy, iptables-nft, libiptc (legacy through python-iptables),
nftables."""


def require(variant: str) -> None:
    """Skip (fail under CI) without namespaces or a tool this variant's cell needs."""
    require_netns()
    for tool in ("ipset", "dnsmasq", *(("libiptc",) if variant == "libiptc" else ())):
        skip_unless_available(tool, tool_unavailable_reason(tool))


def open_dataplane(variant: str, runner: Runner) -> tuple[Backend, SetWriter]:
    """The backend of `variant` in the runner's namespace, and the writer of its name sets."""
    if variant == "nftables":
        return NftablesBackend.open("auto", runner), NftWriter(runner)
    if variant == "libiptc":
        return open_backend("libiptc", "legacy", runner), IpsetWriter(runner)
    return IptablesBackend.open(variant, runner), IpsetWriter(runner)


def add_addresses(lab: Lab, service: str, addresses: list[str], net: str) -> None:
    """Give `service` more addresses (one name's round robin), routed to it from the cell."""
    ep = lab.services[service]
    for address in addresses:
        lab.exec_in(service, ["ip", "addr", "add", f"{address}/32", "dev", ep.ifname], check=True)
    lab.cell_exec(["ip", "route", "add", net, "via", ep.ipv4], check=True)


def spray_from_resolver(
    lab: Lab, dns: LabDns, answer: bytes, to: str, ports: range, txids: range | None = None
) -> None:
    """A forger in the outside world: with the lab's DNS server stopped, it takes the
    server's own address and port 53 and sends `answer` to `to` on every port of `ports`,
    as it is or once per transaction id of `txids`.  The server is started again after."""
    ids = f"range({txids.start},{txids.stop},{txids.step})" if txids else "[None]"
    script = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('{dns.address}',53))\n"
        f"m=bytes.fromhex('{answer.hex()}')\n"
        f"for p in range({ports.start},{ports.stop},{ports.step}):\n"
        f"    for txid in {ids}:\n"
        "        b=m if txid is None else txid.to_bytes(2,'big')+m[2:]\n"
        f"        s.sendto(b,('{to}',p))\n"
    )
    dns.stop()
    try:
        out = lab.exec_in("dns", ["python3", "-c", script])
        assert out.returncode == 0, out.stderr
    finally:
        dns.start(dns.records)
