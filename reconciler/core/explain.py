"""Why a container may or may not reach an endpoint, answered from the compiled plan.

The answer is read off the same plan the dataplane installs (the container's groups and their
rules), then each allowing rule is traced to the documents that grant it to *this* container,
so app developers see the ASG or egress policy and the file:line, not a chain name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.core.cellplan import CellPlan, ContainerPlan, NameRule, PlanRule, Provenance
from reconciler.core.compile import container_name_sources, container_sources, enforcement_for
from reconciler.core.endpoint import Endpoint
from reconciler.core.model import AddressRange, Container, Enforcement, PolicySet, RuleItem
from reconciler.core.packetspace import contains, item_space


@dataclass(frozen=True)
class Match:
    group: str
    rule: PlanRule
    sources: tuple[Provenance, ...]


@dataclass(frozen=True)
class NameMatch:
    """A grant by name that covers an endpoint asked about by name."""

    rule: NameRule
    sources: tuple[Provenance, ...]


@dataclass(frozen=True)
class DenyNetworkMatch:
    """A deny network of the cell that covers the endpoint: it decides before any ASG."""

    lifecycle: str  # which of CF's lists: always, running or staging
    network: str


@dataclass(frozen=True)
class Decision:
    container: Container
    endpoint: Endpoint
    allowed: bool
    matches: tuple[Match, ...]
    near_misses: tuple[Match, ...]
    rule_count: int
    denied_by: tuple[DenyNetworkMatch, ...] = ()
    names: tuple[NameMatch, ...] = ()
    """For an endpoint by name: the name rules covering it (exact or wildcard)."""
    audit: Enforcement | None = None
    """The document that puts the container in audit mode (None: enforced).  `allowed`
    stays what the rules say; `verdict` is what the chain does with the packet."""

    @property
    def verdict(self) -> str:
        """`allow`, `deny`, or `would-deny`: no rule allows it, the container is audited, and
        no deny network rejects it, so it is accepted and logged (ASG AUDIT)."""
        if self.allowed:
            return "allow"
        return "would-deny" if self.audit is not None and not self.denied_by else "deny"

    def text(self, directory_name: str = "") -> str:
        who = directory_name or self.container.app_id or self.container.handle
        head = {"allow": "ALLOW", "deny": "DENY", "would-deny": "WOULD-DENY"}[self.verdict]
        if self.verdict == "would-deny":
            head += " (allowed, audited)"
        lines = [
            f"{head} {self.container.handle} ({who}, {self.container.lifecycle}) -> {self.endpoint}"
        ]
        for d in self.denied_by:
            lines.append(
                f"  rejected by the cell's deny_networks.{d.lifecycle} {d.network}, "
                "before any ASG or egress policy"
            )
        if self.endpoint.fqdn:
            lines.extend(self._name_lines())
        elif self.allowed:
            for m in self.matches:
                lines.append(f"  allowed by rule {m.rule.id} in group {m.group}:")
                lines.extend(f"    {s}" for s in m.sources)
        elif self.matches:  # allowed by an ASG, but a deny network comes first
            for m in self.matches:
                lines.append(f"  rule {m.rule.id} in group {m.group} would allow it, from:")
                lines.extend(f"    {s}" for s in m.sources)
        else:
            lines.append(
                f"  no rule allows it: the container has {self.rule_count} rules in its groups"
            )
            for m in self.near_misses:
                lines.append(
                    f"  {_describe(m.rule.item)} covers the address but not this "
                    f"protocol/port, from:"
                )
                lines.extend(f"    {s}" for s in m.sources)
        if self.audit is not None and not self.allowed:
            where = f" ({self.audit.location.short})" if self.audit.location else ""
            by = f"Enforcement/{self.audit.name}{where}"
            if self.denied_by:
                lines.append(f"  audit mode ({by}) never applies to the cell's deny networks")
            else:
                lines.append(
                    f"  the container is in audit mode ({by}): what no rule allows is "
                    "accepted and logged as would-deny (ASG AUDIT)"
                )
        elif not self.allowed and not self.denied_by and not self.endpoint.fqdn:
            lines.append("  everything not allowed is rejected and logged (ASG DENY)")
        # Names and sources come from the policy repo: a newline in one must not start a
        # line of its own (a forged ALLOW in a CI log), so each line is escaped on its own.
        from reconciler.escape import visible

        return "\n".join(visible(x) for x in lines) + "\n"

    def _name_lines(self) -> list[str]:
        lines = []
        for m in self.names:
            item = m.rule.item
            if item.wildcard:
                lines.append(
                    f"  allowed by wildcard name rule {m.rule.id} ({_describe_name(m.rule)}, "
                    "filled only from the DNS answers the container receives):"
                )
            else:
                lines.append(f"  allowed by name rule {m.rule.id} ({_describe_name(m.rule)}):")
            lines.extend(f"    {s}" for s in m.sources)
        if self.allowed:
            lines.append(
                f"  enforced at the cell for the addresses {self.endpoint.fqdn} resolves to "
                "(the answers the container receives and the agent's own resolution, "
                "TTL-bound); the cell's deny networks still apply"
            )
        elif not self.names:
            lines.append(
                f"  no grant by name covers it; an ASG rule may still allow the addresses "
                f"{self.endpoint.fqdn} resolves to (explain --to IP:PORT)"
            )
        return lines

    def to_dict(self) -> dict[str, object]:
        return {
            "container": self.container.handle,
            "endpoint": str(self.endpoint),
            "decision": self.verdict,
            "matches": [
                {
                    "group": m.group,
                    "rule": m.rule.to_dict() | {"sources": [s.to_dict() for s in m.sources]},
                }
                for m in self.matches
            ],
            "near_misses": [{"group": m.group, "rule": m.rule.to_dict()} for m in self.near_misses],
            "deny_networks": [{"list": d.lifecycle, "network": d.network} for d in self.denied_by],
            **({"audit": self.audit.name} if self.audit is not None else {}),
            **(
                {
                    "names": [
                        m.rule.to_dict() | {"sources": [s.to_dict() for s in m.sources]}
                        for m in self.names
                    ]
                }
                if self.endpoint.fqdn
                else {}
            ),
        }


def _describe(item: RuleItem) -> str:
    text = f"{item.protocol} {item.destination}"
    if item.ports:
        text += " ports " + ",".join(str(p) for p in item.ports)
    return text


def _describe_name(rule: NameRule) -> str:
    item = rule.item
    text = f"{item.protocol} {item.fqdn}"
    if item.ports:
        text += " ports " + ",".join(str(p) for p in item.ports)
    return text


def name_covers(rule: NameRule, ep: Endpoint) -> bool:
    """Does a grant by name cover an endpoint asked about by name: the name (a wildcard by
    one label), the family the protocol implies, and the protocol and ports (the same packet
    space test as for addresses, over every address of the rule's family)."""
    if not ep.fqdn or not rule.item.matches(ep.fqdn):
        return False
    if ep.version and ep.version != rule.version:
        return False
    full = rule.item.anywhere(rule.version)
    probe = Endpoint(rule.version, 0, ep.protocol, ep.port, ep.icmp_type, ep.icmp_code)
    return contains(item_space(full), probe)


def explain_name(policy: PolicySet, plan: CellPlan, cp: ContainerPlan, ep: Endpoint) -> Decision:
    """Allow or deny for an endpoint given by name: answered from the container's grants by
    name.  A wildcard grant allows exactly one more label (its set is filled from the
    answers containers receive: the agent's DNS interception)."""
    mine = container_name_sources(policy, cp.container)
    by_id = plan.name_by_id
    found = tuple(
        NameMatch(by_id[n], tuple(s for s in by_id[n].sources if s in mine))
        for n in cp.names
        if name_covers(by_id[n], ep)
    )
    allowed = bool(found)
    audit = _audit(policy, cp)
    return Decision(cp.container, ep, allowed, (), (), len(cp.names), (), found, audit)


def explain(policy: PolicySet, plan: CellPlan, cp: ContainerPlan, ep: Endpoint) -> Decision:
    """Allow or deny for one container and endpoint, with every deciding rule and its origin."""
    if ep.fqdn:
        return explain_name(policy, plan, cp, ep)
    mine = {s.provenance for s in container_sources(policy, cp.container)}
    groups = plan.group_by_id
    matches: list[Match] = []
    near: list[Match] = []
    count = 0
    for gid in cp.groups:
        for rule in groups[gid].rules:
            count += 1
            sources = tuple(s for s in rule.sources if s in mine)
            if contains(item_space(rule.item), ep):
                matches.append(Match(gid, rule, sources))
            elif rule.item.destination.contains(ep.version, ep.address):
                near.append(Match(gid, rule, sources))
    denied = deny_network_matches(plan, cp.container, ep)
    allowed = bool(matches) and not denied
    return Decision(
        cp.container,
        ep,
        allowed,
        tuple(matches),
        tuple(near),
        count,
        denied,
        (),
        _audit(policy, cp),
    )


def _audit(policy: PolicySet, cp: ContainerPlan) -> Enforcement | None:
    """The document auditing the container, read off the plan (`ContainerPlan.audit`: a
    shared IP is audited only when every claimant is) and named from the policy."""
    if not cp.audit:
        return None
    return enforcement_for(policy, cp.container.space_id, cp.container.app_id)


def deny_network_matches(
    plan: CellPlan, container: Container, ep: Endpoint
) -> tuple[DenyNetworkMatch, ...]:
    """The cell's deny networks that reject this container's traffic to `ep`, by list: the
    render puts them before every allow, so any one of them decides."""
    return tuple(
        DenyNetworkMatch(name, net)
        for name, networks in plan.settings.deny_networks.lists(container.workload)
        for net in networks
        if AddressRange.parse(net).contains(ep.version, ep.address)
    )


LIFECYCLES = ("running", "staging", "task", "all")


def in_lifecycle(container: Container, lifecycle: str) -> bool:
    """Does `container` belong to `lifecycle` as `explain --lifecycle` means it?

    `running` and `staging` are CF's two lifecycles (tasks run with the running rules, see
    `Container.lifecycle`); `task` narrows `running` to tasks; `all` takes every container.
    """
    if lifecycle == "all":
        return True
    if lifecycle == "task":
        return container.workload == "task"
    return container.lifecycle == lifecycle


def find_container(plan: CellPlan, *, handle: str) -> ContainerPlan:
    """The container with this handle (a handle names one container of a cell)."""
    for cp in plan.containers:
        if cp.container.handle == handle:
            return cp
    raise LookupError(f"container {handle!r} is not in the inventory")


def find_containers(
    plans: Sequence[CellPlan],
    *,
    handle: str | None = None,
    app: str | None = None,
    lifecycle: str = "all",
) -> tuple[tuple[CellPlan, ContainerPlan], ...]:
    """Every container with this handle, or of this app (GUID), in the lifecycle, per cell.

    All of them, in the plans' order: an app runs instances, tasks and staging containers,
    often on several cells, and their groups differ (staging has its own rules), so one of
    them picked for the app would answer for the others too.
    """
    return tuple(
        (plan, cp)
        for plan in plans
        for cp in plan.containers
        if (
            (handle is not None and cp.container.handle == handle)
            or (app is not None and cp.container.app_id == app)
        )
        and in_lifecycle(cp.container, lifecycle)
    )
