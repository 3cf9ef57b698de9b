"""The policy model: what a policy repository means once loaded and validated.

Everything here is immutable and hashable so that compiled plans are deterministic and can be
compared, cached and content-addressed.  Addresses and ports are normalised on construction
(a CIDR, a one-address range and a bare address that cover the same interval compare equal),
because Cloud Foundry lets the same destination be written many ways and the plan must not
change when only the spelling does.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from reconciler.core.cron import Window

Protocol = Literal["tcp", "udp", "icmp", "icmpv6", "all"]
Lifecycle = Literal["running", "staging"]
PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "icmp", "icmpv6", "all")
LIFECYCLES: tuple[str, ...] = ("running", "staging")


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a value was written, so every finding and every installed rule can point at it."""

    file: str
    line: int
    col: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @property
    def short(self) -> str:
        return f"{self.file}:{self.line}"


def address_text(version: int, value: int) -> str:
    """An address (4 or 6) as ipaddress, iptables-save and nft print it, from its integer."""
    if version == 4:
        # inet_ntoa prints IPv4 exactly as ipaddress and iptables-save do, at a tenth of the
        # cost: rendering a large cell formats one address per rule.
        if 0 <= value <= 0xFFFFFFFF:
            return socket.inet_ntoa(value.to_bytes(4, "big"))
        return str(ipaddress.IPv4Address(value))  # not an IPv4 address: its ValueError
    return str(ipaddress.IPv6Address(value))


@dataclass(frozen=True, slots=True, order=True)
class AddressRange:
    """An inclusive interval of addresses of one IP version.

    Kept as integers so that containment, overlap and equality are exact regardless of how the
    policy author spelled the destination.
    """

    version: int
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> AddressRange:
        """Parse an address, CIDR (host bits allowed, as in CF) or `a-b` range.

        Raises ValueError; callers that need Cloud Foundry's messages validate first.
        """
        if "-" in text:
            lo, hi = text.split("-", 1)
            a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
            if a.version != b.version:
                raise ValueError("range ends are of different IP versions")
            if int(a) > int(b):
                raise ValueError("range endpoints are inverted")
            return cls(a.version, int(a), int(b))
        net = ipaddress.ip_network(text, strict=False)
        return cls(net.version, int(net.network_address), int(net.broadcast_address))

    @classmethod
    def whole(cls, version: int) -> AddressRange:
        """Every address of a family (0.0.0.0/0, ::/0): what an audited container's chain
        accepts in the end, as the diff, the gate and shadow parity count it."""
        return cls(version, 0, (1 << (32 if version == 4 else 128)) - 1)

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128

    @property
    def first_address(self) -> str:
        return address_text(self.version, self.first)

    @property
    def last_address(self) -> str:
        return address_text(self.version, self.last)

    def prefix_length(self) -> int | None:
        """The prefix length if this interval is exactly one CIDR block, else None."""
        size = self.last - self.first + 1
        if size & (size - 1):
            return None
        if self.first % size:
            return None
        return self.bits - (size.bit_length() - 1)

    def cidr(self) -> str | None:
        """The exact CIDR covering this interval, if it is one (iptables `-d` can match it)."""
        prefix = self.prefix_length()
        return None if prefix is None else f"{self.first_address}/{prefix}"

    def contains(self, version: int, address: int) -> bool:
        return version == self.version and self.first <= address <= self.last

    def __str__(self) -> str:
        cidr = self.cidr()
        if cidr is not None:
            return cidr.removesuffix("/32") if self.version == 4 else cidr.removesuffix("/128")
        return f"{self.first_address}-{self.last_address}"


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One Cloud Foundry rule, normalised.

    `destinations` is the parsed comma list (one entry for a single destination).  `ports` is
    empty for protocols that take none.  ICMP type and code use -1 for "any", as CF's API does.
    """

    protocol: str
    destinations: tuple[AddressRange, ...]
    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    log: bool = False
    description: str = field(default="", compare=False)
    location: Location | None = field(default=None, compare=False)

    def items(self) -> tuple[RuleItem, ...]:
        """One item per destination: the unit that is installed, deduplicated and explained."""
        return tuple(
            RuleItem(self.protocol, d, self.ports, self.icmp_type, self.icmp_code, self.log)
            for d in self.destinations
        )


def _key_tail(
    ports: tuple[PortRange, ...], icmp_type: int | None, icmp_code: int | None
) -> list[str]:
    """The ports and ICMP part of an item's canonical text (`RuleItem.key`, `NameItem.key`)."""
    parts = []
    if ports:
        parts.append(",".join(str(p) for p in ports))
    if icmp_type is not None:
        parts.append(f"type={icmp_type}")
    if icmp_code is not None:
        parts.append(f"code={icmp_code}")
    return parts


@dataclass(frozen=True, slots=True, order=True)
class RuleItem:
    """A rule with a single destination: what one line of the dataplane matches."""

    protocol: str
    destination: AddressRange
    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    log: bool = False

    @property
    def version(self) -> int:
        return self.destination.version

    def key(self) -> str:
        """A canonical text form: the content that rule ids and group ids hash."""
        parts = [self.protocol, str(self.destination.version), str(self.destination)]
        parts += _key_tail(self.ports, self.icmp_type, self.icmp_code)
        if self.log:
            parts.append("log")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class SecurityGroup:
    """An Application Security Group with its bindings resolved to space GUIDs."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    running_default: bool = False
    staging_default: bool = False
    running_spaces: tuple[str, ...] = ()
    staging_spaces: tuple[str, ...] = ()
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True, order=True)
class NameItem:
    """A grant by DNS name: the protocol and ports of a Destination, to whatever addresses
    the name resolves to (`reconciler.fqdn`).  The name is validated and lower-cased; a
    wildcard (`*.s3.example.com`) stands for exactly one more label on the left.

    Kept apart from `RuleItem` on purpose: a name has no address range, and no code that
    reads `RuleItem.destination` may ever see a stand-in for one (it would widen the grant
    to whatever the stand-in covers)."""

    protocol: str
    fqdn: str
    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def wildcard(self) -> bool:
        return self.fqdn.startswith("*.")

    def key(self) -> str:
        """A canonical text form: what a name rule's id hashes (never an address's key:
        `RuleItem.key` starts with a protocol and an IP version digit, this with `name`)."""
        return " ".join(
            [
                "name",
                self.protocol,
                self.fqdn,
                *_key_tail(self.ports, self.icmp_type, self.icmp_code),
            ]
        )

    def anywhere(self, version: int) -> RuleItem:
        """This grant's protocol, ports and ICMP match as an item to *every* address of a
        family.  Only for what adds the name's set match itself (the renderers) or asks
        about the protocol and ports alone (explain): never a rule on its own."""
        everything = AddressRange.whole(version)
        return RuleItem(self.protocol, everything, self.ports, self.icmp_type, self.icmp_code)

    def matches(self, qname: str) -> bool:
        """Whether an answer for `qname` (lower-case, no trailing dot) is an answer for this
        name: equal, or, for a wildcard, exactly one label more on the left."""
        if not self.wildcard:
            return qname == self.fqdn
        head, _, tail = qname.partition(".")
        return bool(head) and head != "*" and tail == self.fqdn[2:]


@dataclass(frozen=True, slots=True)
class Destination:
    """A named external service (CF's dynamic egress destination).

    `ips` and `fqdns` may both be given; at least one is (validation sees to it).  `fqdns`
    are validated lower-case host names, exact or one-label wildcards (`*.example.com`)."""

    name: str
    protocol: str
    ips: tuple[AddressRange, ...]
    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    description: str = ""
    location: Location | None = field(default=None, compare=False)
    fqdns: tuple[str, ...] = ()

    def name_items(self) -> tuple[NameItem, ...]:
        """One name-backed item per name, with this destination's protocol and ports."""
        return tuple(
            NameItem(self.protocol, n, self.ports, self.icmp_type, self.icmp_code)
            for n in self.fqdns
        )

    def as_rule(self) -> Rule:
        return Rule(
            protocol=self.protocol,
            destinations=self.ips,
            ports=self.ports,
            icmp_type=self.icmp_type,
            icmp_code=self.icmp_code,
            description=self.description,
            location=self.location,
        )


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Grants one destination to an app, a space, or every app (`default`)."""

    name: str
    source_type: Literal["app", "space", "default"]
    source_id: str | None
    destination: str
    app_lifecycle: Literal["running", "staging", "all"] = "all"
    description: str = ""
    location: Location | None = field(default=None, compare=False)

    def applies_to(self, lifecycle: str) -> bool:
        return self.app_lifecycle in ("all", lifecycle)


ENFORCEMENT_MODES: tuple[str, ...] = ("audit", "enforce")


@dataclass(frozen=True, slots=True)
class Enforcement:
    """Whether what no rule allows is rejected (`enforce`, the default) or accepted and
    logged as would-deny (`audit`) for the containers of one app, one space, or all.

    Precedence is by specificity, never by file order: a container's app's document decides,
    else its space's, else the `all` one, else enforce (`compile.container_audit`).  Audit
    never reaches the cell's deny networks, which reject before any of this is asked."""

    name: str
    scope_type: Literal["app", "space", "all"]
    scope_id: str | None
    mode: Literal["audit", "enforce"]
    description: str = ""
    location: Location | None = field(default=None, compare=False)

    @property
    def audit(self) -> bool:
        return self.mode == "audit"

    def scope_text(self, directory: Directory) -> str:
        """`app org/space/app`, `space org/space` (the GUID where the directory has no
        name), or `all containers`: how messages and the plan name the scope."""
        if self.scope_type == "app" and self.scope_id:
            return f"app {directory.app_path(self.scope_id)}"
        if self.scope_type == "space" and self.scope_id:
            return f"space {directory.space_path(self.scope_id)}"
        return "all containers"


@dataclass(frozen=True, slots=True)
class Org:
    guid: str
    name: str


@dataclass(frozen=True, slots=True)
class Space:
    guid: str
    name: str
    org_guid: str


@dataclass(frozen=True, slots=True)
class App:
    guid: str
    name: str
    space_guid: str


@dataclass(frozen=True)
class Directory:
    """Names and GUIDs of orgs, spaces and apps, so policy can say `payments/prod/backend`."""

    orgs: tuple[Org, ...] = ()
    spaces: tuple[Space, ...] = ()
    apps: tuple[App, ...] = ()

    @cached_property
    def _org_by_guid(self) -> dict[str, Org]:
        return {o.guid: o for o in self.orgs}

    @cached_property
    def _space_by_guid(self) -> dict[str, Space]:
        return {s.guid: s for s in self.spaces}

    @cached_property
    def _app_by_guid(self) -> dict[str, App]:
        return {a.guid: a for a in self.apps}

    @cached_property
    def _space_by_path(self) -> dict[str, str]:
        return {self.space_path(s.guid): s.guid for s in self.spaces}

    @cached_property
    def _app_by_path(self) -> dict[str, str]:
        return {self.app_path(a.guid): a.guid for a in self.apps}

    def space(self, guid: str) -> Space | None:
        """The space with this GUID, if the directory knows it."""
        return self._space_by_guid.get(guid)

    def app(self, guid: str) -> App | None:
        """The app with this GUID, if the directory knows it."""
        return self._app_by_guid.get(guid)

    def space_path(self, guid: str) -> str:
        """`org/space` for a known space GUID, else the GUID itself."""
        space = self._space_by_guid.get(guid)
        if space is None:
            return guid
        org = self._org_by_guid.get(space.org_guid)
        return f"{org.name if org else space.org_guid}/{space.name}"

    def app_path(self, guid: str) -> str:
        """`org/space/app` for a known app GUID, else the GUID itself."""
        app = self._app_by_guid.get(guid)
        if app is None:
            return guid
        return f"{self.space_path(app.space_guid)}/{app.name}"

    def resolve_space(self, ref: str) -> str | None:
        """A space GUID for `org/space` or a GUID; None when a name does not resolve."""
        if "/" in ref:
            return self._space_by_path.get(ref)
        return ref

    def resolve_app(self, ref: str) -> str | None:
        if "/" in ref:
            return self._app_by_path.get(ref)
        return ref

    def knows_space(self, guid: str) -> bool:
        return guid in self._space_by_guid

    def knows_app(self, guid: str) -> bool:
        return guid in self._app_by_guid


@dataclass(frozen=True)
class PolicySet:
    """Everything one revision of a policy repository says, validated and resolved."""

    security_groups: tuple[SecurityGroup, ...] = ()
    destinations: tuple[Destination, ...] = ()
    egress_policies: tuple[EgressPolicy, ...] = ()
    directory: Directory = field(default_factory=Directory)
    tests: tuple[PolicyTest, ...] = ()
    rollout: Rollout | None = None
    """The repository's one `kind: Rollout` document, if it has one (brakes, not policy: it
    changes when a cell applies a revision, never what a plan allows)."""
    enforcements: tuple[Enforcement, ...] = ()
    """`kind: Enforcement` documents: audit or enforce per app, space or every container
    (validation has refused two documents that give one scope two modes)."""

    @cached_property
    def destination_by_name(self) -> dict[str, Destination]:
        return {d.name: d for d in self.destinations}


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """An assertion kept in the policy repo: this principal may (not) reach this endpoint."""

    name: str
    app: str | None
    space: str | None
    lifecycle: str
    protocol: str
    address: str
    port: int | None
    expect: Literal["allow", "deny"]
    icmp_type: int | None = None
    icmp_code: int | None = None
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True, order=True)
class Container:
    """A container on a cell, as CF's container metadata store describes it.

    `app_id` is the id policies name the app by: the store's `policy_group_id` as silk's
    planner reads it, else its `app_id` (see `reconciler.sources.cellstore`); `policy_group_id` is
    the store's own field.
    """

    handle: str
    ip: str
    app_id: str = ""
    space_id: str = ""
    org_id: str = ""
    policy_group_id: str = ""
    workload: str = "app"

    @property
    def version(self) -> int:
        """4 or 6, read off the address text: inventory has already validated and normalised
        it (str(ip_address(...))), and parsing it again per call was a fleet plan's largest cost."""
        return 6 if ":" in self.ip else 4

    @property
    def lifecycle(self) -> str:
        """CF gives staging containers the staging rules; apps and tasks the running ones.

        Any other workload, none included, has no lifecycle ("") and so is bound to nothing:
        silk's planner gives such a container no ASG rules.
        """
        if self.workload == "staging":
            return "staging"
        return "running" if self.workload in ("app", "task") else ""


HALT_CONDITIONS: tuple[str, ...] = ("NotReady",)
"""What halts a rollout (`halt:`): a cell of an earlier wave not Ready on the revision.  The
audit issue's flow records will add `DeniedFlowJump` (a jump in denied flows); until then the
schema accepts only these, so a document cannot ask for a brake that does not exist."""


@dataclass(frozen=True, slots=True)
class Wave:
    """Cells (by name pattern, `fnmatch` globs) that take a new revision together, and how
    long each of them must hold it Ready before the next wave may start."""

    name: str
    cells: tuple[str, ...]
    soak: float
    """Seconds."""
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ChangeWindow:
    """A change window as written (`schedule`, `duration`, `kind`), with its parsed form."""

    window: Window
    description: str = ""
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Rollout:
    """How a new revision reaches the fleet: waves, halt conditions, a pause, change windows.

    Cells that no wave names form an implicit last wave.  `pause` True holds every cell on
    the revision it enforces; `pinned` names the one revision cells may apply while paused.
    """

    name: str
    waves: tuple[Wave, ...] = ()
    halt: tuple[str, ...] = HALT_CONDITIONS
    pause: bool = False
    pinned: str | None = None
    windows: tuple[ChangeWindow, ...] = ()
    location: Location | None = field(default=None, compare=False)
