"""`asgctl lab up|down|status|probe|demo`: click options only; the lab is in `platform`.

Kept out of `reconciler/cli.py` (which only registers the group) so the lab's commands can
grow without touching the file every other command lives in.  Every command that touches
namespaces checks first and exits 1 with a plain reason on a host that cannot run the lab
(not Linux, not root, tools missing), instead of failing half-way through with a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from reconciler.cli_options import format_option

name_option = click.option(
    "--name",
    default="default",
    show_default=True,
    envvar="ASGCTL_LAB_NAME",
    help="Which lab (several can run side by side).",
)


def _require_host() -> None:
    from asgctl_lab.platform import unavailable_reason

    reason = unavailable_reason()
    if reason:
        click.echo(f"error: {reason}", err=True)
        sys.exit(1)


def _load(name: str) -> Any:  # a started Platform (imported lazily: root-only code)
    from asgctl_lab.platform import PlatformError, load

    try:
        return load(name)
    except PlatformError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.group("lab")
def lab() -> None:
    """A Cloud Foundry-style platform in network namespaces (root, Linux).

    Cells with containers, outside services (MySQL, an HTTPS API, DNS, mirrors, metrics),
    a git server with the policy repo, and an agent per cell.  State: /run/asgctl-lab/NAME
    (or $ASGCTL_LAB_STATE/NAME).
    """


@lab.command("up")
@name_option
@click.option("--cells", default=2, show_default=True, type=click.IntRange(1, 60))
@click.option(
    "--policies",
    default="policies",
    show_default=True,
    type=click.Path(exists=True, file_okay=False),
    help="Seed the lab's policy repo from this folder.",
)
@click.option(
    "--agents/--no-agents", default=True, show_default=True, help="Start an agent per cell."
)
@click.option("--interval", default="2s", show_default=True, help="Agent sync interval.")
@click.option("--backend", default="iptables", show_default=True, help="Agents' dataplane.")
@click.option(
    "--cf-layout",
    is_flag=True,
    help="Also install CF's own chains in each cell, as silk and the vxlan-policy-agent write "
    "them (netout, overlay and vpa chains; iptables backends only).",
)
def up_cmd(
    name: str,
    cells: int,
    policies: str,
    agents: bool,
    interval: str,
    backend: str,
    cf_layout: bool,
) -> None:
    """Build the lab and leave it running (until `asgctl lab down`)."""
    from pathlib import Path

    from asgctl_lab.platform import (
        PlatformError,
        cf_layout_variant,
        default_spec,
        render_status,
        start_agents,
    )
    from asgctl_lab.platform import up as lab_up

    _require_host()
    try:
        info = lab_up(
            name,
            default_spec(cells),
            policies=Path(policies),
            log=lambda m: click.echo(m, err=True),
            cf_layout=cf_layout_variant(backend) if cf_layout else None,
        )
        if agents:
            info = start_agents(
                info, interval, ["--backend", backend], log=lambda m: click.echo(m, err=True)
            )
    except PlatformError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(render_status(info), nl=False)
    flag = "" if name == "default" else f" --name {name}"
    click.echo(
        f"\nnext: asgctl lab probe{flag}   |   git clone {info.git_url}   |   "
        f"asgctl status --source {info.git_url}   |   asgctl lab down{flag}"
    )


@lab.command("down")
@name_option
@click.option("--all", "everything", is_flag=True, help="Every lab under the state dir.")
def down_cmd(name: str, everything: bool) -> None:
    """Remove everything a lab made (also after a crashed `up`); safe to run twice."""
    from asgctl_lab.platform import down, list_labs

    _require_host()
    for n in list_labs() if everything else [name]:
        removed = down(n)
        if removed:
            ns = sum(r.startswith("netns ") for r in removed)
            procs = sum(r.startswith("process ") for r in removed)
            click.echo(f"lab {n}: removed {ns} namespaces, {procs} processes and its state")
        else:
            click.echo(f"lab {n}: nothing to remove")


@lab.command("status")
@name_option
@format_option("text", "json")
def status_cmd(name: str, fmt: str) -> None:
    """Where the lab's parts are and whether they are alive.  Exit 0 healthy, 1 otherwise."""
    import json

    from asgctl_lab.platform import health, render_status

    _require_host()
    info = _load(name)
    h = health(info)
    if fmt == "json":
        doc = {
            "name": info.name,
            "id": info.lab_id,
            "phase": info.phase,
            "git_url": info.git_url,
            "state_dir": str(info.directory),
            "cells": {c: info.cell_netns(c) for c in info.cells},
            "cf_layout": info.cf_layout,
            "healthy": h.ok,
            "missing_namespaces": list(h.missing_namespaces),
            "dead_processes": [f"{p.role} {p.pid}" for p in h.dead],
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_status(info), nl=False)
    sys.exit(0 if h.ok else 1)


@lab.command("probe")
@name_option
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="[LABEL=]IP:PORT[/tcp|udp] (repeat); default: every service's ports.",
)
@click.option("--from", "sources", multiple=True, help="Only these containers (repeat).")
@click.option("--timeout", default=1.0, show_default=True, type=float)
@click.option("--wide", is_flag=True, help="Also show each container's app.")
@format_option("text", "json")
def probe_cmd(
    name: str,
    targets: tuple[str, ...],
    sources: tuple[str, ...],
    timeout: float,
    wide: bool,
    fmt: str,
) -> None:
    """Reachability matrix: every container against every service port (✓ / ✗ and why)."""
    from asgctl_lab.matrix import parse_target, probe_matrix

    _require_host()
    info = _load(name)
    try:
        parsed = [parse_target(t) for t in targets] or None
        matrix = probe_matrix(info, parsed, sources or None, timeout=timeout)
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(matrix.to_json() if fmt == "json" else matrix.render(wide=wide), nl=False)


@lab.command("demo")
@click.option("--name", default="demo", show_default=True, help="The demo's own lab.")
@click.option("--interval", default="2s", show_default=True, help="Agent sync interval.")
@click.option("--timeout", default=60.0, show_default=True, help="Longest wait for the cells.")
@click.option("--policies", default="policies", show_default=True, type=click.Path(file_okay=False))
@click.option("--backend", default="iptables", show_default=True, help="Agents' dataplane.")
@click.option(
    "--cf-layout/--no-cf-layout",
    default=None,
    help="CF's own chains in each cell (default: on, except with the nftables backend).",
)
def demo_cmd(
    name: str, interval: str, timeout: float, policies: str, backend: str, cf_layout: bool | None
) -> None:
    """Tell the seeds' stories on a fresh lab, then tear it down (also on Ctrl-C)."""
    from asgctl_lab.demo import main as demo_main

    args = ["--name", name, "--interval", interval, "--timeout", str(timeout)]
    if cf_layout is not None:
        args.append("--cf-layout" if cf_layout else "--no-cf-layout")
    sys.exit(demo_main([*args, "--policies", policies, "--backend", backend]))


@lab.group("dns")
def dns_group() -> None:
    """The lab's DNS server (dnsmasq in the outside world): its names, and moving them.

    Every service is `<service>.lab.example`; `cdn.lab.example` has sixteen addresses,
    rotated on every query.  Containers resolve through it (their resolv.conf names it).
    """


@dns_group.command("show")
@name_option
def dns_show_cmd(name: str) -> None:
    """The names the server serves now, with their addresses."""
    from asgctl_lab.platform import PlatformError, dns_records

    _require_host()
    info = _load(name)
    try:
        records = dns_records(info)
    except PlatformError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for fqdn, addresses in sorted(records.items()):
        click.echo(f"{fqdn:<32} {' '.join(addresses)}")


@dns_group.command("set")
@name_option
@click.argument("fqdn")
@click.argument("addresses", nargs=-1, required=True)
def dns_set_cmd(name: str, fqdn: str, addresses: tuple[str, ...]) -> None:
    """The provider moves FQDN to ADDRESSES: the running server rereads its records (no
    restart, nothing in git); returns once it answers with them."""
    from asgctl_lab.platform import PlatformError, set_dns_record

    _require_host()
    info = _load(name)
    try:
        set_dns_record(info, fqdn, addresses)
    except PlatformError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{fqdn} -> {' '.join(addresses)}")


@dns_group.command("ask")
@name_option
@click.argument("fqdn")
@click.option("--from", "source", default=None, help="Ask from this container's namespace.")
@click.option("--ipv6", is_flag=True, help="AAAA instead of A.")
def dns_ask_cmd(name: str, fqdn: str, source: str | None, ipv6: bool) -> None:
    """Ask the server for FQDN (from a container: through its cell's firewall); the
    addresses in the server's order.  Exit 1 when no answer comes."""
    from asgctl_lab.dns import LabDnsError, lookup
    from asgctl_lab.platform import PlatformError, dns_service

    _require_host()
    info = _load(name)
    try:
        server = dns_service(info)
        if source is None:
            netns = info.net.services[server.name].netns
        elif source in info.net.containers:
            netns = info.net.containers[source].netns
        else:
            raise click.BadParameter(f"no container {source!r}", param_hint="--from")
        click.echo(" ".join(lookup(netns, server.addresses[0], fqdn, ipv6=ipv6)))
    except (PlatformError, LabDnsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
