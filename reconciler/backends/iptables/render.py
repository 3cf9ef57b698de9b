"""Render a cell plan as `iptables-restore` input, in the exact form `iptables-save` prints.

Writing the canonical form means the dataplane can compare what the kernel holds with what
the plan wants line by line, with no parser of iptables syntax in between.  Nothing a policy
author wrote is rendered: chains, comments and log prefixes carry only hex ids from the plan,
addresses are re-printed from parsed integers, and ports and ICMP values are integers, so no
string from a policy file or the metadata store can add, remove or alter a rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.cellplan import (
    NAME_ID_LEN,
    CellPlan,
    CellSettings,
    ContainerPlan,
    FlowLog,
    NameRule,
    PlanRule,
    RateLimit,
    check_interface_name,
    deny_class,
    log_id,
    port_chunks,
)
from reconciler.core.model import RuleItem
from reconciler.flows.record import ALLOW, DENY, RATE_ID, WOULD_DENY, log_prefix

TOP_CHAIN = "ASG-FORWARD"
CONTAINER_PREFIX = "ASG-C-"
GROUP_PREFIX = "ASG-G-"
DENY_PREFIX = "ASG-D-"
RATE_CHAIN = "ASG-RATE"
OWNED_PREFIX = "ASG-"
"""Names we give our chains.  A name says nothing about who made a chain: the host may well
have chains of its own that start with it (`ASG-ADMIN-BLOCKLIST`), so ownership is proven
by `marker_rule`, never by this prefix alone."""
OWNER_COMMENT = "asg:owned"
HOOK_CHAIN = "FORWARD"
DENY_LOG_LIMIT = "-m limit --limit 1/sec"
RATE_TABLE_PREFIX = "asg"
XT_NAME_MAX = 15  # hashlimit names live in a char[IFNAMSIZ]


def container_chain(chain_id: str) -> str:
    """A container's chain: iptables names hold 28 characters, so the id is cut to
    NAME_ID_LEN digits (the plan refuses two containers under one name); its comments and
    log prefix say which container it is."""
    return CONTAINER_PREFIX + chain_id[:NAME_ID_LEN]


def group_chain(group_id: str) -> str:
    """A group's chain, its id cut as `container_chain`'s; the jump to it carries the whole
    id (`asg:g:<id>`), and the plan refuses two different groups under one name."""
    return GROUP_PREFIX + group_id[:NAME_ID_LEN]


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


MARKER_TAIL = " " + _comment(OWNER_COMMENT)


def marker_rule(chain: str) -> str:
    """The ownership marker: the first rule of every chain we create, so a chain is ours
    only when it says so, whoever else uses our name prefix.

    A comment match with no target: it matches every packet and does nothing (the packet
    goes on to the next rule), so it costs one comparison and changes no verdict.  It lives
    in the kernel with the chain, so it survives anything that loses our own records (a lost
    state directory, a kill mid-cycle), and no chain gets it by accident: it has to be written
    exactly so, as the only line without a target in a chain with our prefix.  It is not one
    of the plan's rules (`Ruleset.chains` holds only those); the dataplane adds it to every
    chain it writes and strips it when it reads.
    """
    return f"-A {chain}{MARKER_TAIL}"


def is_marker(chain: str, line: str) -> bool:
    """Whether `line` is `chain`'s ownership marker (one length test, one `endswith`)."""
    return len(line) == len(chain) + 3 + len(MARKER_TAIL) and line.endswith(MARKER_TAIL)


def hook_rule(underlay: str | None = None) -> str:
    """One rule we own in FORWARD: the jump for what containers send out through `underlay`.

    silk-release sends a container's packet to its ASG chain only when it leaves through the
    underlay: `FORWARD -s <ip> -o <underlay> -j netout--<handle>`, one jump per underlay
    interface (lib/rules/rules.go, NewNetOutJumpConditions; cni-wrapper-plugin/netrules/
    netout.go, defaultNetOutRules).  Traffic to another container on the cell leaves through
    that container's veth and traffic over the overlay through silk-vtep; both belong to the
    network policies (the vpa-- and overlay--<handle> chains) and never reach this jump.
    Kept first in FORWARD so no earlier ACCEPT can bypass us; it matches only underlay egress,
    so being first never puts us between silk and overlay traffic.  `None` (no underlay
    known) judges every packet forwarded.
    """
    out = f" -o {check_interface_name(underlay)}" if underlay is not None else ""
    return f"-A {HOOK_CHAIN}{out} {_comment('asg:forward')} -j {TOP_CHAIN}"


def hook_rules(underlay: tuple[str, ...]) -> tuple[str, ...]:
    """Our FORWARD rules for a family, in the order they stand first in FORWARD."""
    if not underlay:
        return (hook_rule(),)
    return tuple(hook_rule(name) for name in dict.fromkeys(underlay))


@dataclass(frozen=True)
class Ruleset:
    """Our chains for one family, each with its rules in iptables-save form, in order, and
    the rules that hook them into FORWARD (for every underlay interface).

    The rules are the plan's; each chain's ownership marker (`marker_rule`) comes on top of
    them in the kernel, and is written by `text` and by the dataplane's deltas.
    """

    family: int
    chains: dict[str, tuple[str, ...]]
    hooks: tuple[str, ...] = (hook_rule(),)

    def text(self, hook: bool = True) -> str:
        """A complete `iptables-restore --noflush` transaction installing this ruleset."""
        lines = ["*filter"]
        lines.extend(f":{name} - [0:0]" for name in sorted(self.chains))
        if hook and self.chains:
            lines.extend(insert_hook_ops(self.hooks))
        for name in sorted(self.chains, key=chain_order):
            lines.append(marker_rule(name))
            lines.extend(self.chains[name])
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values())

    @property
    def installed_rules(self) -> int:
        """The plan's rules plus the FORWARD hooks (none without chains): what the agent
        reports as installed, and equal to `CellPlan.installed_rules`, the CI plan's count of
        this layout.  Ownership markers are bookkeeping, not rules, and are not counted."""
        return self.rule_count + (len(self.hooks) if self.chains else 0)


def insert_hook_ops(hooks: tuple[str, ...]) -> list[str]:
    """`-I FORWARD 1` for each hook, last first, so they end up first in FORWARD in order."""
    return [h.replace(f"-A {HOOK_CHAIN} ", f"-I {HOOK_CHAIN} 1 ", 1) for h in reversed(hooks)]


def chain_order(name: str) -> tuple[int, str]:
    """Groups (and the shared deny and rate chains) before containers before dispatch: a
    chain is filled before anything jumps to it."""
    if name.startswith((GROUP_PREFIX, DENY_PREFIX)) or name == RATE_CHAIN:
        return (0, name)
    if name.startswith(CONTAINER_PREFIX):
        return (1, name)
    return (2, name)


def render_cell(plan: CellPlan, family: int) -> Ruleset:
    """Our chains for one IP family (4 or 6) of a cell plan."""
    chains: dict[str, tuple[str, ...]] = {}
    settings = plan.settings
    hooks = hook_rules(settings.underlay(family))
    containers = [c for c in plan.containers if c.container.version == family]
    groups = [g for g in plan.groups if g.version == family]
    if not containers:
        return Ruleset(family, {}, hooks)
    for group in groups:
        name = group_chain(group.id)
        chains[name] = tuple(
            line for r in group.rules for line in _rule_lines(name, r, settings.flow_log)
        )
    if settings.outbound.limit and settings.outbound.logging:
        chains[RATE_CHAIN] = _rate_log_lines(family, settings.flow_log)
    for cp in containers:
        name = container_chain(cp.chain_id)
        deny = settings.deny(cp.container.workload, family)
        if deny:
            chains.setdefault(deny_chain(cp.container.workload), _deny_lines(cp, deny, family))
        chains[name] = _container_lines(name, cp, family, settings)
        if cp.names:
            chains[name] = _with_names(chains[name], name, cp, plan)
    host = "/32" if family == 4 else "/128"
    chains[TOP_CHAIN] = tuple(
        f"-A {TOP_CHAIN} -s {cp.container.ip}{host} {_comment('asg:c:' + cp.chain_id)} "
        f"-j {container_chain(cp.chain_id)}"
        for cp in sorted(containers, key=lambda cp: (cp.container.ip, cp.chain_id))
    )
    return Ruleset(family, chains, hooks)


def _reject(family: int) -> str:
    return "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"


def deny_chain(workload: str) -> str:
    """The shared chain of a workload's deny networks: every running container jumps to the
    same one, so N deny networks cost N rules per cell, not per container."""
    return DENY_PREFIX + deny_class(workload)


def _deny_lines(cp: ContainerPlan, networks: tuple[str, ...], family: int) -> tuple[str, ...]:
    name = deny_chain(cp.container.workload)
    return tuple(
        f"-A {name} -d {net} {_comment('asg:deny-network')} -j REJECT --reject-with "
        f"{_reject(family)}"
        for net in networks
    )


def rate_table(chain_id: str) -> str:
    """The container's hashlimit table: one per container, as silk names one per handle."""
    return (RATE_TABLE_PREFIX + chain_id)[:XT_NAME_MAX]


def _rate_line(name: str, cp: ContainerPlan, rate: RateLimit, family: int) -> str:
    """silk's NewNetOutConnRateLimitRule (lib/rules/rules.go), in iptables-save's spelling."""
    verdict = f"-j {RATE_CHAIN}" if rate.logging else f"-j REJECT --reject-with {_reject(family)}"
    return (
        f"-A {name} -p tcp -m conntrack --ctstate NEW -m hashlimit --hashlimit-above "
        f"{rate.rate_per_sec}/sec --hashlimit-burst {rate.burst} --hashlimit-mode "
        f"dstip,dstport --hashlimit-name {rate_table(cp.chain_id)} --hashlimit-htable-expire "
        f"{rate.expire_ms} {_comment('asg:rate')} {verdict}"
    )


def _rate_log_lines(family: int, flow: FlowLog) -> tuple[str, ...]:
    """silk's rl-log chain (netout.go, connRateLimitLogChain): a rate-limited LOG, REJECT."""
    return (
        f"-A {RATE_CHAIN} {_log_limit(flow)} {_comment('asg:rate-log')} "
        f"{log_target(flow, log_prefix(DENY, RATE_ID))}",
        f"-A {RATE_CHAIN} {_comment('asg:reject')} -j REJECT --reject-with {_reject(family)}",
    )


def _log_limit(flow: FlowLog) -> str:
    """The kernel log gets silk's 1/s; NFLOG the cell's flow rate (bursting as much)."""
    if flow.mode == "nflog":
        return f"-m limit --limit {flow.rate}/sec --limit-burst {flow.rate}"
    return DENY_LOG_LIMIT


def log_target(flow: FlowLog, prefix: str) -> str:
    """`-j LOG` or `-j NFLOG` with a prefix of `reconciler.flows.record`'s scheme, in
    iptables-save's spelling (NFLOG: prefix, then group)."""
    if flow.mode == "nflog":
        return f'-j NFLOG --nflog-prefix "{prefix}" --nflog-group {flow.group}'
    return f'-j LOG --log-prefix "{prefix}"'


def _container_lines(
    name: str, cp: ContainerPlan, family: int, settings: CellSettings
) -> tuple[str, ...]:
    """ESTABLISHED, INVALID, the connection limit, the deny networks, the groups, LOG and
    REJECT: silk's order in its asg chain (netout_chain.go, IPTablesRules, inserted in
    reverse), so deny networks beat every allow."""
    reject = _reject(family)
    lines = [
        f"-A {name} -m conntrack --ctstate RELATED,ESTABLISHED {_comment('asg:est')} -j ACCEPT",
        f"-A {name} -m conntrack --ctstate INVALID {_comment('asg:invalid')} -j DROP",
    ]
    if settings.outbound.limit:
        lines.append(_rate_line(name, cp, settings.outbound, family))
    if settings.deny(cp.container.workload, family):
        lines.append(f"-A {name} {_comment('asg:deny')} -j {deny_chain(cp.container.workload)}")
    lines.extend(f"-A {name} {_comment('asg:g:' + gid)} -j {group_chain(gid)}" for gid in cp.groups)
    lines.extend(_tail(name, cp, settings.flow_log, reject))
    return tuple(lines)


def _tail(name: str, cp: ContainerPlan, flow: FlowLog, reject: str) -> tuple[str, str]:
    """The chain's last word on what no rule allowed: logged (as deny logging is set up)
    and rejected; in audit mode logged as would-deny (`ASG AUDIT`) and accepted.  Both come
    after the deny networks' jump, so audit never reaches a deny network."""
    limit = _log_limit(flow)
    if cp.audit:
        return (
            f"-A {name} {limit} {_comment('asg:audit-log')} "
            f"{log_target(flow, log_prefix(WOULD_DENY, log_id(cp.chain_id)))}",
            f"-A {name} {_comment('asg:audit')} -j ACCEPT",
        )
    return (
        f"-A {name} {limit} {_comment('asg:deny-log')} "
        f"{log_target(flow, log_prefix(DENY, log_id(cp.chain_id)))}",
        f"-A {name} {_comment('asg:reject')} -j REJECT --reject-with {reject}",
    )


def _with_names(
    lines: tuple[str, ...], chain: str, cp: ContainerPlan, plan: CellPlan
) -> tuple[str, ...]:
    """A container chain with its grants by name after its groups, before its tail (LOG and
    REJECT, or in audit the would-deny LOG and ACCEPT)."""
    by_id = plan.name_by_id
    named = [line for nid in cp.names for line in name_lines(chain, by_id[nid])]
    tail = tuple(_comment(c) for c in ("asg:deny-log", "asg:reject", "asg:audit-log", "asg:audit"))
    at = next(i for i, line in enumerate(lines) if any(t in line for t in tail))
    return (*lines[:at], *named, *lines[at:])


def name_lines(chain: str, rule: NameRule) -> list[str]:
    """A grant by name: the destination's protocol and ports, to the addresses in the name's
    ipset (`-m set --match-set asgn4-<id> dst`), so the set's elements change without a
    rule changing, and the set can never widen a grant beyond its protocol and ports.

    The protocol and port matches are `_matches`' for the same item to every address; the
    set match goes right after `-p`, where iptables-save prints it."""
    full = rule.item.anywhere(rule.version)
    setmatch = f" -m set --match-set {rule.set_name} dst"
    comment = _comment("asg:n:" + rule.id)
    out = []
    for match in _matches(full):
        proto, sep, rest = match.partition(" -m ")
        body = f"{proto}{setmatch}{sep and ' -m '}{rest}" if proto else f"{setmatch}{match}"
        out.append(f"-A {chain}{body} {comment} -j ACCEPT")
    return out


def _rule_lines(chain: str, rule: PlanRule, flow: FlowLog) -> list[str]:
    item = rule.item
    comment = _comment("asg:r:" + rule.id)
    out = []
    for match in _matches(item):
        if item.log:
            out.append(
                f"-A {chain}{match} -m conntrack --ctstate NEW {comment} "
                f"{log_target(flow, log_prefix(ALLOW, log_id(rule.id)))}"
            )
        out.append(f"-A {chain}{match} {comment} -j ACCEPT")
    return out


def _matches(item: RuleItem) -> list[str]:
    """The match part of each line for an item (several when ports exceed one multiport)."""
    dest = item.destination
    cidr = dest.cidr()
    if cidr is not None and cidr in ("0.0.0.0/0", "::/0"):
        addr, iprange = "", ""
    elif cidr is not None:
        addr, iprange = f" -d {cidr}", ""
    else:
        addr, iprange = "", f" -m iprange --dst-range {dest.first_address}-{dest.last_address}"
    if item.protocol == "all":
        return [f"{addr}{iprange}"]
    if item.protocol in ("icmp", "icmpv6"):
        proto = "icmp" if item.protocol == "icmp" else "ipv6-icmp"
        match = f"{addr} -p {proto}{iprange}"
        if item.icmp_type is not None and item.icmp_type >= 0:
            module, option = (
                ("icmp", "--icmp-type") if proto == "icmp" else ("icmp6", "--icmpv6-type")
            )
            value = str(item.icmp_type)
            if item.icmp_code is not None and item.icmp_code >= 0:
                value += f"/{item.icmp_code}"
            match += f" -m {module} {option} {value}"
        return [match]
    out = []
    for chunk in port_chunks(item.ports):
        base = f"{addr} -p {item.protocol}{iprange}"
        if not chunk:
            out.append(base)
        elif len(chunk) == 1:
            p = chunk[0]
            spec = str(p.first) if p.first == p.last else f"{p.first}:{p.last}"
            out.append(f"{base} -m {item.protocol} --dport {spec}")
        else:
            specs = ",".join(
                str(p.first) if p.first == p.last else f"{p.first}:{p.last}" for p in chunk
            )
            out.append(f"{base} -m multiport --dports {specs}")
    return out


def render_text(plan: CellPlan, family: int) -> str:
    """The full transaction for one family: what `asgctl render` prints."""
    return render_cell(plan, family).text()
