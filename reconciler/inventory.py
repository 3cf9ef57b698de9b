"""A cell's containers, read from Cloud Foundry's container metadata store (`store.json`).

The format is the one garden-external-networker writes on a real cell
(`{handle: {handle, ip, metadata: {app_id, space_id, org_id, policy_group_id,
container_workload}}}`), so the agent runs on a CF cell unchanged.  Handles and GUIDs never
reach rendered rules (chains are named by hashes), but they do reach logs, status files and
PR comments, so they are held to a conservative alphabet here, at the edge.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from reconciler import jsonsafe
from reconciler.model import Container

WORKLOADS = ("app", "task", "staging")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_STORE_BYTES = 64 * 1024 * 1024


class InventoryError(ValueError):
    """The metadata store cannot be used; the agent keeps its last good inventory."""


def parse_store(text: str | bytes, source: str = "store.json") -> tuple[Container, ...]:
    """Containers of a metadata store, sorted by handle; raises InventoryError naming the handle."""
    if len(text) > MAX_STORE_BYTES:
        raise InventoryError(f"{source}: larger than {MAX_STORE_BYTES} bytes")
    try:
        # Deep nesting, 5000-digit integers and bad UTF-8 become errors naming line and column.
        data = jsonsafe.loads(text, source)
    except jsonsafe.JsonInputError as exc:
        raise InventoryError(str(exc)) from None
    return parse_store_document(data, source)


def parse_store_document(data: Any, source: str = "store.json") -> tuple[Container, ...]:
    """Containers of an already decoded metadata store (`parse_store` without the JSON).

    For documents that are already in memory; the size limit is `parse_store`'s, on text.
    """
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: expected an object of handle -> container")
    containers: list[Container] = []
    by_ip: dict[str, str] = {}
    for key, entry in data.items():
        c = _container(source, key, entry)
        if c.ip in by_ip:
            raise InventoryError(
                f"{source}: container {c.handle!r}: ip {c.ip} is already used by "
                f"container {by_ip[c.ip]!r}"
            )
        by_ip[c.ip] = c.handle
        containers.append(c)
    return tuple(sorted(containers))


def read_store(path: str | os.PathLike[str]) -> tuple[Container, ...]:
    """Read and parse a metadata store file, refusing an oversized one before reading it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_STORE_BYTES:
            raise InventoryError(f"{path}: larger than {MAX_STORE_BYTES} bytes")
        with open(path, "rb") as f:
            data = f.read(MAX_STORE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror or exc}") from None
    return parse_store(data, str(path))


def _container(source: str, key: str, entry: Any) -> Container:
    where = f"{source}: container {_printable(key)}"
    if not _SAFE_ID.match(key):
        raise InventoryError(f"{where}: handle must match {_SAFE_ID.pattern}")
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: entry must be an object")
    handle = entry.get("handle", key)
    if handle != key:
        raise InventoryError(f"{where}: handle field {_printable(handle)} differs from its key")
    ip_text = entry.get("ip")
    if not isinstance(ip_text, str) or not ip_text:
        raise InventoryError(f"{where}: missing field 'ip'")
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise InventoryError(f"{where}: ip {_printable(ip_text)} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # ipaddress keeps a zone id verbatim (`fd00::1%<anything, newlines too>`) and the
        # address text goes into rendered rules: a zone id is never a container's address.
        raise InventoryError(f"{where}: ip {_printable(ip_text)} has a zone id")
    if ip.is_unspecified or ip.is_multicast:
        raise InventoryError(f"{where}: ip {ip} cannot be a container address")
    meta = entry.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise InventoryError(f"{where}: metadata must be an object")
    fields: dict[str, str] = {}
    for name in ("app_id", "space_id", "org_id", "policy_group_id"):
        value = meta.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str) or (value and not _SAFE_ID.match(value)):
            raise InventoryError(f"{where}: metadata.{name} must be a GUID")
        fields[name] = value
    workload = meta.get("container_workload") or "app"
    if workload not in WORKLOADS:
        raise InventoryError(
            f"{where}: metadata.container_workload must be one of {', '.join(WORKLOADS)}"
        )
    return Container(handle=key, ip=str(ip), workload=workload, **fields)


def _printable(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def store_document(containers: Iterable[Container]) -> dict[str, Any]:
    """The metadata store document for these containers, as a CF cell would write it."""
    return {
        c.handle: {
            "handle": c.handle,
            "ip": c.ip,
            "metadata": {
                "app_id": c.app_id,
                "space_id": c.space_id,
                "org_id": c.org_id,
                "policy_group_id": c.policy_group_id,
                "container_workload": c.workload,
            },
        }
        for c in sorted(containers)
    }


def dump_store(containers: tuple[Container, ...] | list[Container]) -> str:
    """The metadata store for these containers, as a CF cell would write it."""
    return json.dumps(store_document(containers), indent=2, sort_keys=True) + "\n"
