"""Cloud Foundry's own per-container layout for a plan, as `iptables-restore` input.

This is the baseline the benchmarks measure us against, so it follows what silk's
cni-wrapper-plugin and the vxlan-policy-agent write, rule for rule (see
`reference/cf-asg.md`): per container a `FORWARD -s <ip> -j netout--<c>` jump, `netout--<c>`
jumping to `asg-<c>`, and in `asg-<c>` RELATED,ESTABLISHED accept, INVALID drop, every rule of
every bound ASG again (one per destination and port range, repeats within the container
dropped), a rate-limited LOG and REJECT; log rules go (`-g`) to the container's
`netout--<c>--log` chain, which LOGs and ACCEPTs.  Its rule count is the plan's
`cf_equivalent_rules`, which the tests check.

Chain names carry the plan's container hash (`chain_id`), never a handle or app name, for the
same reason as our renderer: nothing from the metadata store or a policy file reaches the
transaction text.  Pure; used by the benchmarks only.
"""

from __future__ import annotations

from reconciler.model import RuleItem
from reconciler.plan import LOG_ID_LEN, CellPlan, ContainerPlan


def _short(chain_id: str) -> str:
    """The container id as CF-style names and prefixes carry it: its log-prefix length,
    which keeps `netout--<id>` within iptables' 28 characters (and the baseline's lines as
    long as they always were)."""
    return chain_id[:LOG_ID_LEN]


def _chains(chain_id: str) -> tuple[str, str, str]:
    """netout, asg and log chain names (at most 25 characters; iptables allows 28)."""
    cid = _short(chain_id)
    return f"netout--{cid}", f"asg-{cid}", f"netout--{cid[:12]}--log"


def _rule(item: RuleItem, log_chain: str) -> list[str]:
    """CF's RuleConverter: one line per port range, `-m iprange` for every destination."""
    d = item.destination
    dest = f"-m iprange --dst-range {d.first_address}-{d.last_address}"
    verdict = f"-g {log_chain}" if item.log else "-j ACCEPT"
    if item.protocol == "all":
        return [f"{dest} {verdict}"]
    if item.protocol in ("icmp", "icmpv6"):
        proto, module, option = (
            ("icmp", "icmp", "--icmp-type")
            if item.protocol == "icmp"
            else ("ipv6-icmp", "icmp6", "--icmpv6-type")
        )
        match = ""
        if item.icmp_type is not None and item.icmp_type >= 0:
            code = (
                f"/{item.icmp_code}" if item.icmp_code is not None and item.icmp_code >= 0 else ""
            )
            match = f" -m {module} {option} {item.icmp_type}{code}"
        return [f"-p {proto} {dest}{match} {verdict}"]
    if not item.ports:
        return [f"-p {item.protocol} {dest} {verdict}"]
    return [
        f"-p {item.protocol} {dest} -m {item.protocol} --dport {p.first}:{p.last} {verdict}"
        for p in item.ports
    ]


def _container(cp: ContainerPlan, items: list[RuleItem], family: int) -> list[str]:
    netout, asg, log = _chains(cp.chain_id)
    host = "/32" if family == 4 else "/128"
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    asg_rules: dict[str, None] = {}  # CF's DeduplicateRules: first copy of each text wins
    for item in items:
        for line in _rule(item, log):
            asg_rules.setdefault(line, None)
    return [
        f"-A FORWARD -s {cp.container.ip}{host} -j {netout}",
        f"-A {netout} -j {asg}",
        f"-A {asg} -m state --state RELATED,ESTABLISHED -j ACCEPT",
        f"-A {asg} -p tcp -m state --state INVALID -j DROP",
        *(f"-A {asg} {rule}" for rule in asg_rules),
        f'-A {asg} -m limit --limit 1/sec -j LOG --log-prefix "DENY_{_short(cp.chain_id)} "',
        f"-A {asg} -j REJECT --reject-with {reject}",
        f"-A {log} -p tcp -m conntrack --ctstate INVALID,NEW,UNTRACKED "
        f'-j LOG --log-prefix "OK_{_short(cp.chain_id)} "',
        f"-A {log} -j ACCEPT",
    ]


def render_cf(plan: CellPlan, family: int) -> str:
    """CF's layout of one family's containers as one `iptables-restore` transaction.

    A container's rules are the union of its groups' rules: exactly what CF installs for it.
    Returns "" when the family has no containers.
    """
    groups = plan.group_by_id
    containers = [c for c in plan.containers if c.container.version == family]
    if not containers:
        return ""
    lines = ["*filter"]
    for cp in containers:
        lines.extend(f":{name} - [0:0]" for name in _chains(cp.chain_id))
    for cp in containers:
        items = sorted(r.item for gid in cp.groups for r in groups[gid].rules)
        lines.extend(_container(cp, items, family))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def rule_count(text: str) -> int:
    """Rules in a transaction: its `-A` lines."""
    return sum(1 for line in text.splitlines() if line.startswith("-A "))
