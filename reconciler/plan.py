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
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from reconciler.model import Container, PortRange, RuleItem

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


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    container: Container
    chain_id: str
    groups: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        c = self.container
        return {
            "handle": c.handle,
            "ip": c.ip,
            "chain": self.chain_id,
            "app_id": c.app_id,
            "space_id": c.space_id,
            "org_id": c.org_id,
            "workload": c.workload,
            "groups": list(self.groups),
        }


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


@dataclass(frozen=True)
class CellPlan:
    """What one cell enforces: its containers, the groups they jump to, and the counts."""

    cell: str
    containers: tuple[ContainerPlan, ...]
    groups: tuple[RuleGroup, ...]
    cf_equivalent_rules: int

    def __post_init__(self) -> None:
        _check_names(self)

    @property
    def group_by_id(self) -> dict[str, RuleGroup]:
        return {g.id: g for g in self.groups}

    def families(self) -> tuple[int, ...]:
        return tuple(sorted({c.container.version for c in self.containers}))

    @property
    def installed_rules(self) -> int:
        """Lines this plan puts in the kernel, FORWARD jumps included (both families)."""
        total = len(self.families())
        for cp in self.containers:
            total += CONTAINER_FIXED_LINES + len(cp.groups)
        return total + sum(g.lines for g in self.groups)

    @property
    def chains(self) -> int:
        return sum(1 for _ in self.families()) + len(self.containers) + len(self.groups)

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
            "containers": [c.to_dict() for c in self.containers],
            "groups": [g.to_dict() for g in self.groups],
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
        for cp in self.containers:
            h.update(f"c {cp.container.ip} {cp.chain_id} {' '.join(cp.groups)}\n".encode())
        for g in self.groups:
            h.update(f"g {g.digest}\n".encode())
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
    handles: dict[str, str] = {}
    for cp in plan.containers:
        handle = handles.setdefault(cp.chain_id[:NAME_ID_LEN], cp.container.handle)
        if handle != cp.container.handle:
            raise PlanError(
                f"cell {plan.cell or '(unnamed)'}: containers {handle!r} and "
                f"{cp.container.handle!r} get one chain name ({cp.chain_id[:NAME_ID_LEN]}): "
                "a hash collision; refusing to plan either"
            )
