"""Which interfaces are the cell's underlay: where a container's egress leaves the cell.

silk judges a container's packet by its ASGs only when it goes out through the underlay
(`FORWARD -s <ip> -o <underlay> -j netout--<handle>`, see iptables/render.py hook_rule).  silk
names the underlay by looking up which interface holds the cell's `underlay_ips` (silk-release
lib/interfacelookup/interface_name_lookup.go, GetNamesFromIPs; cni-wrapper-plugin/main.go),
unless `temporary.underlay_interface_names` names them.  asgctl has no BOSH spec to read
those addresses from, so it asks the routing table the same question the other way round:
the interfaces the default routes leave through, per family (the BOSH address sits on that
interface on a Diego cell).  `underlay-interface` in the agent's settings overrides it, as
silk's `temporary.underlay_interface_names` does.

The lookup is I/O at the edge; `default_route_devices` is the pure part.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import check_interface_name


class UnderlayError(DataplaneError):
    """No underlay could be found: nothing is judged rather than the wrong traffic."""


def default_route_devices(text: str) -> tuple[str, ...]:
    """The output interfaces of `ip -j route show default` (ECMP next hops included), in
    order, each once; names the kernel could not hold are refused, not rendered."""
    try:
        routes = json.loads(text or "[]")
    except ValueError as exc:
        raise UnderlayError(f"`ip -j route` printed something that is not JSON: {exc}") from None
    if not isinstance(routes, list):
        raise UnderlayError("`ip -j route` did not print a list of routes")
    out: list[str] = []
    for route in routes:
        if not isinstance(route, dict):
            continue
        hops: list[Any] = [route, *(route.get("nexthops") or [])]
        for hop in hops:
            dev = hop.get("dev") if isinstance(hop, dict) else None
            if dev is None:
                continue
            try:
                out.append(check_interface_name(dev))
            except ValueError as exc:
                raise UnderlayError(f"default route: {exc}") from None
    return tuple(dict.fromkeys(out))


def detect_underlay(runner: Runner) -> dict[int, tuple[str, ...]]:
    """The default routes' interfaces for IPv4 and IPv6, in the namespace `runner` enters.

    A family without a default route takes the other family's (a v4-only underlay still
    carries whatever IPv6 egress the cell routes); neither having one is an error, since
    guessing would either judge container-to-container traffic or judge nothing.
    """
    found: dict[int, tuple[str, ...]] = {}
    for family in (4, 6):
        result = runner.run(["ip", "-j", f"-{family}", "route", "show", "default"])
        if result.returncode != 0:
            raise UnderlayError(f"ip route show default: {result.stderr.strip()}")
        found[family] = default_route_devices(result.stdout)
    if not found[4] and not found[6]:
        where = f"network namespace {runner.netns}" if runner.netns else "this host"
        raise UnderlayError(
            f"no default route in {where}, so no underlay interface to judge egress on; "
            "set underlay-interface"
        )
    return {4: found[4] or found[6], 6: found[6] or found[4]}
