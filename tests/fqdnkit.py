"""The lab cell the FQDN traffic tests share: one per backend variant, set writers to match,
and a round-robin service answering on many addresses."""

from __future__ import annotations

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
