"""The Plan: what a cell must enforce, as pure data.

A plan names everything by content: a rule's id is a hash of its normalised match, a group's
id a hash of its rules' ids, a container chain's id a hash of the container handle.  The same
policy and inventory therefore give byte-identical plans on the CI runner and on the cell, and
a rule installed in the kernel can be traced back through its id to the ASG, rule index and
file:line that asked for it.

Ids are names, not proof of equality.  They are 128 bits of SHA-256 (`ID_LEN` hex digits), so
no search finds two contents with one id; even so, nothing that decides compares ids alone:
rules and groups also carry the full SHA-256 of their content (`digest`), and the plan digest,
the CI diff, the agent's change log and mass-revoke gate and the render caches compare those.
Where a name must be shorter than an id (an iptables chain name holds `NAME_ID_LEN` hex
digits, a log prefix `LOG_ID_LEN`), a plan refuses two different contents under one name
(`PlanError`) instead of letting one chain stand for both.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from reconciler.core.model import Container, NameItem, PortRange, RuleItem

ID_LEN = 32
"""Hex digits of an id: 128 bits, out of reach of a birthday search (2^64 hashes)."""
NAME_ID_LEN = 22
"""Hex digits of an id in an iptables chain name: a name holds 28 characters, and the
prefixes (`ASG-G-`, `ASG-C-`) take 6.  88 bits: a plan checks them unique per cell."""
LOG_ID_LEN = 16
"""Hex digits of an id in a log prefix (iptables allows 29 characters): enough to find the
rule, whose comment carries the whole id."""
MULTIPORT_SLOTS = 15


class PlanError(ValueError):
    """A plan that cannot be installed as asked: two different contents under one name."""


def content_digest(text: str) -> str:
    """The full SHA-256 of a canonical text: what decides whether two contents are equal."""
    return hashlib.sha256(text.encode()).hexdigest()


def content_id(text: str) -> str:
    """The id that names a content in the plan, chains, comments and status."""
    return content_digest(text)[:ID_LEN]


def port_chunks(ports: tuple[PortRange, ...]) -> list[tuple[PortRange, ...]]:
    """Split ports into runs that fit one multiport match (15 slots; a range takes two)."""
    chunks: list[tuple[PortRange, ...]] = []
    current: list[PortRange] = []
    used = 0
    for p in ports:
        cost = 1 if p.first == p.last else 2
        if used + cost > MULTIPORT_SLOTS:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append(p)
        used += cost
    if current or not chunks:
        chunks.append(tuple(current))
    return chunks


def item_lines(item: RuleItem) -> int:
    """How many dataplane lines one rule item becomes (multiport runs, LOG before ACCEPT)."""
    return len(port_chunks(item.ports)) * (2 if item.log else 1)


@dataclass(frozen=True, slots=True, order=True)
class Provenance:
    """Why a rule is installed: the document and rule that asked for it."""

    kind: str
    name: str
    index: int | None
    location: str
    destination: str = ""

    def __str__(self) -> str:
        if self.kind == "SecurityGroup":
            return f"SecurityGroup/{self.name} rules[{self.index}] ({self.location})"
        if self.kind == "Enforcement":  # audit mode: what no rule allows (shadow parity)
            return f"Enforcement/{self.name} audit ({self.location})"
        return f"EgressPolicy/{self.name} -> Destination/{self.destination} ({self.location})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "location": self.location}
        if self.index is not None:
            out["index"] = self.index
        if self.destination:
            out["destination"] = self.destination
        return out


@dataclass(frozen=True, slots=True)
class PlanRule:
    """One rule item as installed: its id (a name), its match, and who asked for it.

    `digest` is the full SHA-256 of the match, computed here from the item itself, so two
    rules that share an id but not a match never compare or digest alike.
    """

    id: str
    item: RuleItem
    sources: tuple[Provenance, ...]
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", content_digest(self.item.key()))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "protocol": self.item.protocol}
        out["destination"] = str(self.item.destination)
        if self.item.ports:
            out["ports"] = ",".join(str(p) for p in self.item.ports)
        if self.item.icmp_type is not None:
            out["type"] = self.item.icmp_type
            out["code"] = self.item.icmp_code
        if self.item.log:
            out["log"] = True
        out["sources"] = [s.to_dict() for s in self.sources]
        return out


@dataclass(frozen=True, slots=True)
class RuleGroup:
    """Rules shared by exactly the same containers: one chain, jumped to by each of them."""

    id: str
    version: int
    rules: tuple[PlanRule, ...]
    digest: str = field(init=False, repr=False)
    """The full SHA-256 of everything its chain renders from: family, id, and each rule's id
    and match.  Equal digests render equal chains; equal ids alone prove nothing."""

    def __post_init__(self) -> None:
        lines = [f"{self.version} {self.id}"]
        lines.extend(f"{r.id} {r.digest}" for r in self.rules)
        object.__setattr__(self, "digest", content_digest("\n".join(lines)))

    @property
    def has_log(self) -> bool:
        return any(r.item.log for r in self.rules)

    @property
    def lines(self) -> int:
        return sum(item_lines(r.item) for r in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "family": self.version,
            "rules": [r.to_dict() for r in self.rules],
        }


def name_set_id(fqdn: str) -> str:
    """The id of a name's kernel set: a hash of the name, cut to `NAME_ID_LEN` digits so
    that `asgn4-<id>` fits an ipset name (31 characters).  The plan refuses two names under
    one id (`_check_names`), as it does chains."""
    return content_id("fqdn " + fqdn)[:NAME_ID_LEN]


NAME_SET_PREFIX = "asgn"


def name_set(family: int, set_id: str) -> str:
    """The kernel set holding a name's addresses of one family, in every backend (an ipset,
    an nft set in our table): `asgn4-<22 hex>`, 28 characters, under ipset's 31."""
    return f"{NAME_SET_PREFIX}{family}-{set_id}"


@dataclass(frozen=True, slots=True)
class NameRule:
    """A grant by name as installed: the destination's protocol and ports, to the addresses
    in the name's kernel set (one set per name and family, shared by every rule naming it).

    The set's contents are not part of the plan: the agent fills it from DNS answers
    (`reconciler.fqdn`), so a plan by names is the same plan whatever the names resolve to.
    """

    id: str
    version: int
    item: NameItem
    sources: tuple[Provenance, ...]
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", content_digest(f"{self.version} {self.item.key()}"))

    @property
    def set_id(self) -> str:
        return name_set_id(self.item.fqdn)

    @property
    def set_name(self) -> str:
        return name_set(self.version, self.set_id)

    @property
    def lines(self) -> int:
        """Dataplane lines in the iptables layout: one per multiport run, as an item."""
        return len(port_chunks(self.item.ports))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "family": self.version}
        out["protocol"] = self.item.protocol
        out["fqdn"] = self.item.fqdn
        out["set"] = self.set_id
        if self.item.ports:
            out["ports"] = ",".join(str(p) for p in self.item.ports)
        if self.item.icmp_type is not None:
            out["type"] = self.item.icmp_type
            out["code"] = self.item.icmp_code
        out["sources"] = [s.to_dict() for s in self.sources]
        return out


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    container: Container
    chain_id: str
    groups: tuple[str, ...]
    names: tuple[str, ...] = ()
    """The ids of the name rules (`CellPlan.names`) the container gets, after its groups."""
    audit: bool = False
    """Audit mode (`kind: Enforcement`): what no rule allows is logged as would-deny
    (`ASG AUDIT <chain log id>`) and accepted, where it would be rejected.  The cell's deny
    networks and connection limit reject before the groups are asked, audited or not."""

    def to_dict(self) -> dict[str, Any]:
        c = self.container
        out: dict[str, Any] = {
            "handle": c.handle,
            "ip": c.ip,
            "chain": self.chain_id,
            "app_id": c.app_id,
            "space_id": c.space_id,
            "org_id": c.org_id,
            "workload": c.workload,
            "groups": list(self.groups),
        }
        if self.names:  # absent without names: plans by address keep their exact form
            out["names"] = list(self.names)
        if self.audit:  # absent when enforced: plans without audit keep their exact form
            out["mode"] = "audit"
        return out


# Per container, outside its groups: the dispatch jump, ESTABLISHED, INVALID, LOG and REJECT.
CONTAINER_FIXED_LINES = 5
# CF per container (silk's cni-wrapper-plugin and vxlan-policy-agent): the FORWARD jump to
# netout--<handle>, its jump to asg-<hash>, ESTABLISHED, INVALID, the rate-limited deny LOG and
# REJECT, and the netout--<handle>--log chain (LOG, ACCEPT) that every container gets; then
# every rule of every bound ASG again (`cf_rule_keys`, deduplicated per container).
CF_CONTAINER_FIXED_LINES = 8

CfLine = tuple[str, int, int, int, tuple[int, int] | None, int | None, int | None, bool]


def cf_rule_keys(item: RuleItem) -> tuple[CfLine, ...]:
    """The lines CF writes for one rule item, as keys that are equal when the lines are.

    CF's RuleConverter writes one rule per destination and *port range* (no multiport: "80,443"
    is two rules), a log rule as one `-g` to the container's log chain, and the agent drops
    rules whose text repeats within the container.  Equal keys are exactly equal texts.
    """
    d = item.destination
    head = (item.protocol, d.version, d.first, d.last)
    tail = (item.icmp_type, item.icmp_code, item.log)
    if not item.ports:
        return ((*head, None, *tail),)
    return tuple((*head, (p.first, p.last), *tail) for p in item.ports)


IFNAMSIZ = 16
"""Linux's interface name buffer: a name is at most 15 bytes."""
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}")
LIFECYCLES = ("always", "running", "staging")


def check_interface_name(name: object) -> str:
    """An interface name as the kernel allows it, and nothing more: it is rendered into
    iptables rules and nft JSON, so it must not carry a space, quote, `+` wildcard or `/`."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{name!r} is not an interface name (1-{IFNAMSIZ - 1} of A-Z a-z 0-9 _ . @ -)"
        )
    return name


def check_network(text: object) -> str:
    """A deny network as silk reads it (Go's net.ParseCIDR), normalised to its network
    address: `10.1.2.3/8` -> `10.0.0.0/8` (cni-wrapper-plugin/netrules/netout_chain.go,
    NetOutChain.Validate)."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR such as 10.0.0.0/8")
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR such as 10.0.0.0/8") from None


def deny_list(workload: str) -> str | None:
    """Which of CF's deny lists a workload gets besides `always`: `running` for apps and
    tasks, `staging` for staging, none for anything else (netout_chain.go)."""
    if workload in ("app", "task"):
        return "running"
    return "staging" if workload == "staging" else None


def deny_class(workload: str) -> str:
    """The name every backend gives a workload's deny networks (a chain, a set): its
    lifecycle's list, else `always`."""
    return deny_list(workload) or "always"


def log_id(full_id: str) -> str:
    """The id in a log prefix, in every backend (iptables allows 29 characters): the
    rule's comment carries the whole id."""
    return full_id[:LOG_ID_LEN]


@dataclass(frozen=True, slots=True)
class DenyNetworks:
    """CF's `deny_networks`: destinations rejected before any ASG or egress policy is asked.

    silk-release cni-wrapper-plugin/netrules/netout_chain.go (NetOutChain.denyNetworksRules):
    `always` applies to every container, `running` to workloads `app` and `task`, `staging`
    to `staging`; each network is one `REJECT` placed before the ASG accepts.
    """

    always: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    staging: tuple[str, ...] = ()

    def lists(self, workload: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The lists that apply to a workload, by name: `always`, then its lifecycle's."""
        own = deny_list(workload)
        out = [("always", self.always)]
        if own is not None:
            out.append((own, getattr(self, own)))
        return tuple(out)

    def for_workload(self, workload: str) -> tuple[str, ...]:
        """The networks a container of this workload may never reach, in silk's order."""
        return tuple(dict.fromkeys(n for _, nets in self.lists(workload) for n in nets))

    def __bool__(self) -> bool:
        return bool(self.always or self.running or self.staging)

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in LIFECYCLES}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """CF's `outbound_connections`: new TCP connections per container, destination address and
    port, over `rate_per_sec` after a `burst`, are rejected (silk-release lib/rules/rules.go,
    NewNetOutConnRateLimitRule: hashlimit `dstip,dstport`, one table per container).  Off by
    default, as in silk-cni's job spec (limit: false, burst: 1000, rate_per_sec: 100)."""

    limit: bool = False
    burst: int = 1000
    rate_per_sec: int = 100
    logging: bool = False

    @property
    def expire_ms(self) -> int:
        """How long an idle bucket is kept: silk's rateLimitExpiryPeriod, ceil(burst/rate) s."""
        return -(-self.burst // self.rate_per_sec) * 1000

    def to_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "burst": self.burst,
            "rate_per_sec": self.rate_per_sec,
            "logging": self.logging,
        }


FLOW_LOG_MODES = ("nflog", "log")
FLOW_LOG_GROUP = 16
FLOW_LOG_RATE = 1000


@dataclass(frozen=True, slots=True)
class FlowLog:
    """Where the kernel sends deny and `log: true` verdicts (`reconciler.flows.record` has
    the prefix scheme): `nflog` to netlink group `group`, read by the agent; `log` to the
    kernel log (the LOG target / nft `log`, rate-limited to 1/s as silk's deny log).
    There is no `off`: the rule counts CI plans show would then differ per cell.

    `rate`: NFLOG entries per second per container chain, so a flood costs the kernel a
    bounded amount of copying (the agent counts what it is sent: a count is "at least").

    The default is `log`, as before flow records: it keeps logging whether or not an agent
    runs (NFLOG with no listener is lost), every plan keeps its digest, and the libiptc
    backend, which cannot build NFLOG, keeps working.  A cell opts in with `flow-log: nflog`
    in its agent config (`reconciler.agent.config`), which CI plans read as well."""

    mode: str = "log"
    group: int = FLOW_LOG_GROUP
    rate: int = FLOW_LOG_RATE

    def __post_init__(self) -> None:
        if self.mode not in FLOW_LOG_MODES:
            raise ValueError(f"flow-log: one of {', '.join(FLOW_LOG_MODES)}, got {self.mode!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int):
            raise ValueError(f"flow-log-group: expected a whole number, got {self.group!r}")
        if not 1 <= self.group <= 65535:
            raise ValueError(f"flow-log-group: from 1 to 65535, got {self.group}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, int):
            raise ValueError(f"flow-log-rate: expected a whole number, got {self.rate!r}")
        if not 1 <= self.rate <= 10000:  # xt_limit's ceiling (XT_LIMIT_SCALE)
            raise ValueError(f"flow-log-rate: from 1 to 10000 per second, got {self.rate}")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "group": self.group, "rate": self.rate}


@dataclass(frozen=True, slots=True)
class CellSettings:
    """What a cell's operator decides beyond the policy repo: rendered, so part of the plan.

    `underlay4`/`underlay6`: the interfaces through which a container's egress leaves the
    cell, per family.  Only packets going out through one of them are judged (silk's
    `FORWARD -s <ip> -o <underlay> -j netout--<handle>`); empty means "not known", and then
    every packet a container sends is judged, the strict reading for a render without a cell.
    """

    underlay4: tuple[str, ...] = ()
    underlay6: tuple[str, ...] = ()
    deny_networks: DenyNetworks = field(default_factory=DenyNetworks)
    outbound: RateLimit = field(default_factory=RateLimit)
    flow_log: FlowLog = field(default_factory=FlowLog)

    def underlay(self, family: int) -> tuple[str, ...]:
        return self.underlay4 if family == 4 else self.underlay6

    def deny(self, workload: str, family: int) -> tuple[str, ...]:
        """The deny networks of one workload in one family."""
        return tuple(
            n for n in self.deny_networks.for_workload(workload) if (":" in n) == (family == 6)
        )

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "underlay": {"ipv4": list(self.underlay4), "ipv6": list(self.underlay6)},
            "deny_networks": self.deny_networks.to_dict(),
            "outbound_connections": self.outbound.to_dict(),
        }
        if self.flow_log != FlowLog():  # plans from before flow logs keep their digest
            out["flow_log"] = self.flow_log.to_dict()
        return out

    def fingerprint(self) -> str:
        """Everything here that moves packets, as one line (part of the plan's digest)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CellPlan:
    """What one cell enforces: its containers, the groups they jump to, the cell's settings
    (underlay, deny networks, connection limit), and the counts."""

    cell: str
    containers: tuple[ContainerPlan, ...]
    groups: tuple[RuleGroup, ...]
    cf_equivalent_rules: int
    settings: CellSettings = field(default_factory=CellSettings)
    names: tuple[NameRule, ...] = ()
    """Grants by DNS name, each rule once per cell; containers list the ids they get."""

    def __post_init__(self) -> None:
        _check_names(self)

    @property
    def group_by_id(self) -> dict[str, RuleGroup]:
        return {g.id: g for g in self.groups}

    @property
    def name_by_id(self) -> dict[str, NameRule]:
        return {n.id: n for n in self.names}

    def name_sets(self) -> tuple[tuple[int, str, str], ...]:
        """(family, fqdn, set id) of every name some container of the cell uses, sorted:
        the kernel sets the agent keeps filled."""
        used = {n for cp in self.containers for n in cp.names}
        return tuple(
            sorted({(n.version, n.item.fqdn, n.set_id) for n in self.names if n.id in used})
        )

    def families(self) -> tuple[int, ...]:
        return tuple(sorted({c.container.version for c in self.containers}))

    @property
    def installed_rules(self) -> int:
        """Lines this plan puts in the kernel in the iptables layout, FORWARD hooks included
        (one per underlay interface and family), deny-network chains and the connection limit.

        What CI plans and status show, as the one layout every backend's count is compared
        with; the agent's metric reports what the running backend installs instead
        (`backends.installed_rules`: nftables counts its rules and set elements)."""
        st = self.settings
        total = sum(max(1, len(st.underlay(f))) for f in self.families())
        by_id: dict[str, NameRule] | None = None
        deny_chains: dict[tuple[int, str], int] = {}
        for cp in self.containers:
            total += CONTAINER_FIXED_LINES + len(cp.groups) + (1 if st.outbound.limit else 0)
            if cp.names:
                by_id = by_id if by_id is not None else self.name_by_id
                total += sum(by_id[n].lines for n in cp.names)
            family, workload = cp.container.version, cp.container.workload
            deny = st.deny(workload, family)
            if deny:
                total += 1
                deny_chains[(family, deny_list(workload) or "always")] = len(deny)
        if st.outbound.limit and st.outbound.logging:
            total += 2 * len(self.families())
        return total + sum(deny_chains.values()) + sum(g.lines for g in self.groups)

    @property
    def chains(self) -> int:
        st = self.settings
        deny = {
            (cp.container.version, deny_list(cp.container.workload))
            for cp in self.containers
            if st.deny(cp.container.workload, cp.container.version)
        }
        rate = len(self.families()) if st.outbound.limit and st.outbound.logging else 0
        return len(self.families()) + len(self.containers) + len(self.groups) + len(deny) + rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "counts": {
                "containers": len(self.containers),
                "groups": len(self.groups),
                "chains": self.chains,
                "installed_rules": self.installed_rules,
                "cf_equivalent_rules": self.cf_equivalent_rules,
            },
            "settings": self.settings.to_dict(),
            "containers": [c.to_dict() for c in self.containers],
            "groups": [g.to_dict() for g in self.groups],
            **({"names": [n.to_dict() for n in self.names]} if self.names else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def digest(self) -> str:
        """A short fingerprint of what is enforced (provenance excluded: it moves no packet)."""
        return self._digest

    @cached_property
    def _digest(self) -> str:
        # Once per plan object: an idle agent's cycle asks for it four times (render caches).
        # Groups enter by content digest, not id: two plans whose groups share ids but not
        # rules must never digest alike (the render caches and "applied" are keyed by this).
        h = hashlib.sha256()
        if self.settings != CellSettings():  # a plan without settings keeps its old digest
            h.update(f"s {self.settings.fingerprint()}\n".encode())
        for cp in self.containers:
            h.update(f"c {cp.container.ip} {cp.chain_id} {' '.join(cp.groups)}\n".encode())
            if cp.names:  # a plan without names keeps its old digest
                h.update(f"n {' '.join(cp.names)}\n".encode())
            if cp.audit:  # a plan without audit keeps its old digest
                h.update(f"a {cp.chain_id}\n".encode())
        for g in self.groups:
            h.update(f"g {g.digest}\n".encode())
        for n in self.names:
            h.update(f"r {n.id} {n.digest}\n".encode())
        return "sha256:" + h.hexdigest()


def _check_names(plan: CellPlan) -> None:
    """Refuse a plan in which one name would stand for two different contents.

    Containers jump to groups by id, and the iptables renderer names chains by the first
    `NAME_ID_LEN` hex digits of an id.  Two groups with different rules (or two containers)
    under one such name would share one chain: whichever was written last would enforce
    for both.  Ids are hashes, so this takes a collision, which only a search finds; the
    plan then fails loudly, on the CI runner and on the cell alike, and nothing is applied.
    """
    groups: dict[str, RuleGroup] = {}
    for g in plan.groups:
        other = groups.setdefault(g.id[:NAME_ID_LEN], g)
        if other.digest != g.digest:
            raise PlanError(
                f"cell {plan.cell or '(unnamed)'}: rule groups {other.id} and {g.id} hold "
                f"different rules under one chain name ({g.id[:NAME_ID_LEN]}): a hash "
                "collision; refusing to plan either"
            )
    fqdns: dict[str, str] = {}
    for n in plan.names:
        fqdn = fqdns.setdefault(n.set_id, n.item.fqdn)
        if fqdn != n.item.fqdn:
            raise PlanError(
                f"cell {plan.cell or '(unnamed)'}: names {fqdn!r} and {n.item.fqdn!r} get one "
                f"set name ({n.set_id}): a hash collision; refusing to plan either"
            )
    handles: dict[str, str] = {}
    for cp in plan.containers:
        handle = handles.setdefault(cp.chain_id[:NAME_ID_LEN], cp.container.handle)
        if handle != cp.container.handle:
            raise PlanError(
                f"cell {plan.cell or '(unnamed)'}: containers {handle!r} and "
                f"{cp.container.handle!r} get one chain name ({cp.chain_id[:NAME_ID_LEN]}): "
                "a hash collision; refusing to plan either"
            )


@dataclass(frozen=True, slots=True)
class GateSettings:
    """The gate's knobs, as an agent runs with them (`mass-revoke-threshold`,
    `mass-revoke-min`, `mass-revoke-trailer`); the defaults are the agent's."""

    threshold: float = 0.5
    """Share of the cell's pairs the net loss must exceed (0 to 1)."""
    minimum: int = 100
    """Net lost pairs the loss must also reach (the floor), unless the cell is emptied."""
    trailer: str = "Asgctl-Allow-Mass-Revoke"
    """Commit trailer whose value `true` lets a gated plan through."""


DEFAULT_GATE = GateSettings()


@dataclass(frozen=True, slots=True)
class CellInventory:
    """The containers one cell runs, and where that was read (shown in reports)."""

    cell: str
    containers: tuple[Container, ...]
    origin: str
    gate: GateSettings | None = None
    """The mass-revoke gate settings the cell's agent reports (status branches); None when
    the inventory does not say, and the plan judges with its own."""
