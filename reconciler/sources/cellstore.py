"""A cell's containers, read from Cloud Foundry's container metadata store (`store.json`).

The format is the one silk's cni-wrapper-plugin writes on a real cell (`{handle: {handle,
ip, metadata: {app_id, space_id, org_id, policy_group_id, ports, container_workload}}}`), so
the agent runs on a CF cell unchanged.  A real cell's file holds stale and odd entries, so
the store is judged *entry by entry* (`judge_store`):

* Only a store that cannot be read as a whole -- unreadable, oversized, truncated or
  otherwise not JSON, not an object -- is refused (InventoryError); the agent then keeps its
  last good inventory.
* An entry without a usable IP is *skipped*: there is nothing to enforce on.
* An entry with a usable IP but nothing else usable (no metadata, `"metadata": null`, a
  handle or id that is not text) is *held*: its IP becomes a container that gets no access
  at all.  Dropping it instead would leave the address outside every chain -- wider, not
  narrower -- and silk's planner skips such entries too (no `policy_group_id`), leaving the
  container with only the REJECT of its netout chain.
* An IP claimed by several entries is *shared*: every claimant is kept, and compile gives
  that IP only what all of them would get (`compile.compile_cell`), so a stale entry can
  never lend its access to the container that now holds the address.

Each of these is a `Rejection` beside the containers, for the agent's log, status and
metrics and for `asgctl render`'s stderr.  The rest follows silk's vxlan-policy-agent
planner, which reads this file: the app is named by `policy_group_id` (Cloud Controller
writes the app GUID to both it and `app_id`); `container_workload` other than app, task or
staging -- missing included -- binds no rules.  Ids are free text in CF (Diego's network
properties are a string map; Cloud Controller happens to write GUIDs), so any printable
string is accepted: handles and ids never reach rendered rules (chains are named by
hashes), and the logs, status files and PR comments they do reach escape them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from reconciler.core.model import Container
from reconciler.sources import jsonsafe

MAX_STORE_BYTES = 64 * 1024 * 1024
MAX_TEXT = 1024
"""Longest handle or id accepted (a GUID is 36); longer ones hold their entry's IP."""
ID_FIELDS = ("app_id", "space_id", "org_id", "policy_group_id")

RejectionKind = Literal["skipped", "held", "shared"]


class InventoryError(ValueError):
    """The metadata store cannot be used; the agent keeps its last good inventory."""


@dataclass(frozen=True, slots=True, order=True)
class Rejection:
    """A store entry not used as written: what becomes of it, and why.

    `kind` is `skipped` (no usable IP: nothing to enforce on), `held` (its IP gets no
    access) or `shared` (its IP is claimed by other entries too and gets only what all of
    them get).  `handle` is the store key in printable form; `ip` the entry's usable address.
    """

    kind: RejectionKind
    handle: str
    ip: str
    reason: str

    def __str__(self) -> str:
        what = {
            "skipped": "skipped",
            "held": f"ip {self.ip} gets no access",
            "shared": f"ip {self.ip} gets only what every claimant gets",
        }[self.kind]
        return f"{self.reason} ({what})"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "handle": self.handle, "ip": self.ip, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class StoreReading:
    """A judged metadata store: the containers to compile, and the entries not used as written."""

    containers: tuple[Container, ...]
    rejected: tuple[Rejection, ...] = ()


def decode_store(text: str | bytes, source: str = "store.json") -> StoreReading:
    """Judge a metadata store's text; raises InventoryError only when it is unusable as a whole."""
    if len(text) > MAX_STORE_BYTES:
        raise InventoryError(f"{source}: larger than {MAX_STORE_BYTES} bytes")
    try:
        # Deep nesting, 5000-digit integers and bad UTF-8 become errors naming line and column.
        data = jsonsafe.loads(text, source)
    except jsonsafe.JsonInputError as exc:
        raise InventoryError(str(exc)) from None
    return judge_store(data, source)


def load_store(path: str | os.PathLike[str]) -> StoreReading:
    """Read and judge a metadata store file, refusing an oversized one before reading it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_STORE_BYTES:
            raise InventoryError(f"{path}: larger than {MAX_STORE_BYTES} bytes")
        with open(path, "rb") as f:
            data = f.read(MAX_STORE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"{path}: {exc.strerror or exc}") from None
    return decode_store(data, str(path))


def parse_store(text: str | bytes, source: str = "store.json") -> tuple[Container, ...]:
    """The containers of a metadata store's text (`decode_store` without the rejections)."""
    return decode_store(text, source).containers


def parse_store_document(data: Any, source: str = "store.json") -> tuple[Container, ...]:
    """The containers of an already decoded store (`judge_store` without the rejections)."""
    return judge_store(data, source).containers


def read_store(path: str | os.PathLike[str]) -> tuple[Container, ...]:
    """The containers of a metadata store file (`load_store` without the rejections)."""
    return load_store(path).containers


def judge_store(data: Any, source: str = "store.json") -> StoreReading:
    """Judge a decoded metadata store entry by entry (pure; see the module docstring)."""
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: expected an object of handle -> container")
    containers: list[Container] = []
    rejected: list[Rejection] = []
    held: list[tuple[str, str]] = []  # (key, ip) of held entries, named once all keys are known
    for key in sorted(data, key=str):
        where = f"{source}: container {_printable(key)}"
        entry = data[key]
        ip, ip_problem = _address(entry)
        shown = key if _is_text(key) else _printable(key)
        if ip_problem is not None:
            rejected.append(Rejection("skipped", shown, "", f"{where}: {ip_problem}"))
            continue
        container, problem = _container(key, ip, entry)
        if container is None:
            rejected.append(Rejection("held", shown, ip, f"{where}: {problem}"))
            held.append((key, ip))
        else:
            containers.append(container)
    taken = {c.handle for c in containers}
    for key, ip in held:
        handle = _held_handle(key, taken)
        taken.add(handle)
        containers.append(Container(handle=handle, ip=ip, workload=""))
    rejected.extend(_shared(source, containers))
    return StoreReading(tuple(sorted(containers)), tuple(sorted(rejected)))


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_NORMAL_V4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
"""A dotted quad already in normal form (ASCII digits, no leading zeros): ipaddress reads it
as itself, so `_address` need not build the object (250,000 containers in a fleet's read)."""


def _address(entry: Any) -> tuple[str, str | None]:
    """The entry's IP in normal form, or why it has none usable."""
    if not isinstance(entry, dict):
        return "", "entry must be an object"
    ip_text = entry.get("ip")
    if not isinstance(ip_text, str) or not ip_text:
        return "", "missing field 'ip'"
    if _NORMAL_V4.fullmatch(ip_text):  # what ipaddress says of it, without ipaddress
        first = int(ip_text[: ip_text.index(".")])
        if ip_text == "0.0.0.0" or 224 <= first <= 239:  # unspecified, multicast
            return "", f"ip {ip_text} cannot be a container address"
        return ip_text, None
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return "", f"ip {_printable(ip_text)} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # ipaddress keeps a zone id verbatim (`fd00::1%<anything, newlines too>`) and the
        # address text goes into rendered rules: a zone id is never a container's address.
        return "", f"ip {_printable(ip_text)} has a zone id"
    if ip.is_unspecified or ip.is_multicast:
        return "", f"ip {ip} cannot be a container address"
    return str(ip), None


def _container(key: Any, ip: str, entry: dict[str, Any]) -> tuple[Container | None, str]:
    """The container an entry with a usable IP describes, or why it describes none."""
    if not _is_text(key):
        return None, f"handle must be printable text of 1 to {MAX_TEXT} characters"
    handle = entry.get("handle", key)
    if handle != key:
        return None, f"handle field {_printable(handle)} differs from its key"
    meta = entry.get("metadata")
    if meta is None:
        # silk's planner finds no policy_group_id here and leaves the container unmanaged.
        return None, "metadata is missing or null"
    if not isinstance(meta, dict):
        return None, "metadata must be an object"
    fields: dict[str, str] = {}
    for name in (*ID_FIELDS, "container_workload"):
        value = meta.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str) or (value and not _is_text(value)):
            return None, f"metadata.{name} must be printable text of at most {MAX_TEXT} characters"
        fields[name] = value
    # silk names the app by policy_group_id; app_id (the same GUID from Cloud Controller)
    # stands in only when it is absent, as in the status-branch contract, which carries app_id.
    app = fields["policy_group_id"] or fields["app_id"]
    return (
        Container(
            handle=key,
            ip=ip,
            app_id=app,
            space_id=fields["space_id"],
            org_id=fields["org_id"],
            policy_group_id=fields["policy_group_id"],
            workload=fields["container_workload"],
        ),
        "",
    )


def _is_text(value: Any) -> bool:
    """Free text as CF allows it, minus what could forge a line or a terminal sequence."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()


def _held_handle(key: Any, taken: set[str]) -> str:
    """A handle for a held entry: its key when usable, else a stable name derived from it."""
    if _is_text(key) and key not in taken:
        return str(key)
    digest = hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    handle = f"held-{digest}"
    while handle in taken:  # only a store written to collide gets here
        handle += "-"
    return handle


def _shared(source: str, containers: list[Container]) -> list[Rejection]:
    """One `shared` rejection per claimant of an IP that several entries claim."""
    by_ip: dict[str, list[str]] = defaultdict(list)
    for c in containers:
        by_ip[c.ip].append(c.handle)
    out = []
    for ip, handles in by_ip.items():
        if len(handles) < 2:
            continue
        for h in handles:
            others = ", ".join(_printable(o) for o in sorted(handles) if o != h)
            reason = f"{source}: container {_printable(h)}: ip {ip} is also claimed by {others}"
            out.append(Rejection("shared", h, ip, reason))
    return out


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
