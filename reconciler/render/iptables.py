"""Render a cell plan as `iptables-restore` input, in the exact form `iptables-save` prints.

Writing the canonical form means the dataplane can compare what the kernel holds with what
the plan wants line by line, with no parser of iptables syntax in between.  Nothing a policy
author wrote is rendered: chains, comments and log prefixes carry only hex ids from the plan,
addresses are re-printed from parsed integers, and ports and ICMP values are integers, so no
string from a policy file or the metadata store can add, remove or alter a rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.model import RuleItem
from reconciler.plan import LOG_ID_LEN, NAME_ID_LEN, CellPlan, ContainerPlan, PlanRule, port_chunks

TOP_CHAIN = "ASG-FORWARD"
CONTAINER_PREFIX = "ASG-C-"
GROUP_PREFIX = "ASG-G-"
OWNED_PREFIX = "ASG-"
"""Names we give our chains.  A name says nothing about who made a chain: the host may well
have chains of its own that start with it (`ASG-ADMIN-BLOCKLIST`), so ownership is proven
by `marker_rule`, never by this prefix alone."""
OWNER_COMMENT = "asg:owned"
HOOK_CHAIN = "FORWARD"
DENY_LOG_LIMIT = "-m limit --limit 1/sec"


def container_chain(chain_id: str) -> str:
    """A container's chain: iptables names hold 28 characters, so the id is cut to
    NAME_ID_LEN digits (the plan refuses two containers under one name); its comments and
    log prefix say which container it is."""
    return CONTAINER_PREFIX + chain_id[:NAME_ID_LEN]


def group_chain(group_id: str) -> str:
    """A group's chain, its id cut as `container_chain`'s; the jump to it carries the whole
    id (`asg:g:<id>`), and the plan refuses two different groups under one name."""
    return GROUP_PREFIX + group_id[:NAME_ID_LEN]


def log_id(full_id: str) -> str:
    """The id in a log prefix (29 characters at most): the comment carries the whole id."""
    return full_id[:LOG_ID_LEN]


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


def hook_rule() -> str:
    """The one rule we own in FORWARD: kept first, so no earlier ACCEPT can bypass us."""
    return f"-A {HOOK_CHAIN} {_comment('asg:forward')} -j {TOP_CHAIN}"


@dataclass(frozen=True)
class Ruleset:
    """Our chains for one family, each with its rules in iptables-save form, in order.

    The rules are the plan's; each chain's ownership marker (`marker_rule`) comes on top of
    them in the kernel, and is written by `text` and by the dataplane's deltas.
    """

    family: int
    chains: dict[str, tuple[str, ...]]

    def text(self, hook: bool = True) -> str:
        """A complete `iptables-restore --noflush` transaction installing this ruleset."""
        lines = ["*filter"]
        lines.extend(f":{name} - [0:0]" for name in sorted(self.chains))
        if hook and self.chains:
            lines.append(hook_rule().replace("-A FORWARD", "-I FORWARD 1", 1))
        for name in sorted(self.chains, key=chain_order):
            lines.append(marker_rule(name))
            lines.extend(self.chains[name])
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values())


def chain_order(name: str) -> tuple[int, str]:
    """Groups before containers before dispatch: a chain is filled before anything jumps to it."""
    if name.startswith(GROUP_PREFIX):
        return (0, name)
    if name.startswith(CONTAINER_PREFIX):
        return (1, name)
    return (2, name)


def render_cell(plan: CellPlan, family: int) -> Ruleset:
    """Our chains for one IP family (4 or 6) of a cell plan."""
    chains: dict[str, tuple[str, ...]] = {}
    containers = [c for c in plan.containers if c.container.version == family]
    groups = [g for g in plan.groups if g.version == family]
    if not containers:
        return Ruleset(family, {})
    for group in groups:
        name = group_chain(group.id)
        chains[name] = tuple(line for r in group.rules for line in _rule_lines(name, r))
    for cp in containers:
        name = container_chain(cp.chain_id)
        chains[name] = _container_lines(name, cp, family)
    host = "/32" if family == 4 else "/128"
    chains[TOP_CHAIN] = tuple(
        f"-A {TOP_CHAIN} -s {cp.container.ip}{host} {_comment('asg:c:' + cp.chain_id)} "
        f"-j {container_chain(cp.chain_id)}"
        for cp in sorted(containers, key=lambda cp: (cp.container.ip, cp.chain_id))
    )
    return Ruleset(family, chains)


def _container_lines(name: str, cp: ContainerPlan, family: int) -> tuple[str, ...]:
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    lines = [
        f"-A {name} -m conntrack --ctstate RELATED,ESTABLISHED {_comment('asg:est')} -j ACCEPT",
        f"-A {name} -m conntrack --ctstate INVALID {_comment('asg:invalid')} -j DROP",
    ]
    lines.extend(f"-A {name} {_comment('asg:g:' + gid)} -j {group_chain(gid)}" for gid in cp.groups)
    lines.append(
        f"-A {name} {DENY_LOG_LIMIT} {_comment('asg:deny-log')} "
        f'-j LOG --log-prefix "ASG DENY {log_id(cp.chain_id)} "'
    )
    lines.append(f"-A {name} {_comment('asg:reject')} -j REJECT --reject-with {reject}")
    return tuple(lines)


def _rule_lines(chain: str, rule: PlanRule) -> list[str]:
    item = rule.item
    comment = _comment("asg:r:" + rule.id)
    out = []
    for match in _matches(item):
        if item.log:
            out.append(
                f"-A {chain}{match} -m conntrack --ctstate NEW {comment} "
                f'-j LOG --log-prefix "ASG OK {log_id(rule.id)} "'
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
