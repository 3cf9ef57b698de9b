"""Cloud Foundry's own per-container layout for a plan, as `iptables-restore` input.

This is the baseline the benchmarks measure us against, so it follows what silk's
cni-wrapper-plugin and the vxlan-policy-agent write, rule for rule (see
`reference/cf-asg.md`): per container and underlay interface a
`FORWARD -s <ip> -o <underlay> -j netout--<c>` jump (silk-release
src/code.cloudfoundry.org/lib/rules/rules.go@0a8b534:50-62 NewNetOutJumpConditions, appended by
cni-wrapper-plugin/netrules/common.go@7ed0ad5:11-27 initChains, BulkAppend at :19; a plan
without an underlay gets one jump without `-o`, so a benchmark's packets, whatever interface
they leave by, still meet CF's chains), `netout--<c>`
jumping to `asg-<c>`, and in `asg-<c>` RELATED,ESTABLISHED accept, INVALID drop, every rule of
every bound ASG again (one per destination and port range, repeats within the container
dropped), a rate-limited LOG and REJECT; log rules go (`-g`) to the container's
`netout--<c>--log` chain, which LOGs and ACCEPTs.  With at most one underlay interface its
rule count is the plan's `cf_equivalent_rules`, which the tests check; silk writes one more
FORWARD jump per container for each further underlay interface.

Chain names carry the plan's container hash (`chain_id`), never a handle or app name, for the
same reason as our renderer: nothing from the metadata store or a policy file reaches the
transaction text.  Pure; used by the benchmarks and by the lab's `--cf-layout` cells.

`render_diego` adds what silk and the vxlan-policy-agent write for traffic *between*
containers, so a lab cell carries a Diego cell's whole FORWARD layout (see its docstring).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.core.cellplan import LOG_ID_LEN, CellPlan, ContainerPlan, check_interface_name
from reconciler.core.model import RuleItem


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


def _container(
    cp: ContainerPlan, items: list[RuleItem], family: int, underlay: tuple[str, ...]
) -> list[str]:
    netout, asg, log = _chains(cp.chain_id)
    host = "/32" if family == 4 else "/128"
    outs = [f" -o {check_interface_name(n)}" for n in underlay] or [""]
    reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    asg_rules: dict[str, None] = {}  # CF's DeduplicateRules: first copy of each text wins
    for item in items:
        for line in _rule(item, log):
            asg_rules.setdefault(line, None)
    return [
        *(f"-A FORWARD -s {cp.container.ip}{host}{out} -j {netout}" for out in outs),
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
        lines.extend(_container(cp, items, family, plan.settings.underlay(family)))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_asg_sync(plan: CellPlan, family: int = 4) -> str:
    """What the vxlan-policy-agent's ASG poll writes when a container's ASGs change: each
    container's `asg-<c>` chain (and its log chain) with the plan's rules, nothing else.

    silk-release vxlan-policy-agent/enforcer/enforcer.go@01b6775:224-242 (EnforceOnChain,
    the ASG branch: replaceChainRules, then the parent `netout--<c>` keeps only its jump):
    the container's netout chain, its FORWARD jump and the c2c chains stay as they are; only
    the ASG chain's rules are replaced.  The VPA builds a candidate chain, jumps to it and
    renames it (:245-280, :287 on); here the chains are redeclared in one `iptables-restore
    --noflush` transaction (a declared chain is flushed and refilled atomically), so every
    packet meets either the old rules or the new ones, as with the VPA's swap.  The text is
    `render_cf`'s for the same plan, so restoring the seed's policy gives back the seed's
    chains byte for byte.  Returns "" when the family has no containers.
    """
    full = render_cf(plan, family)
    if not full:
        return ""
    mine: set[str] = set()
    for cp in plan.containers:
        if cp.container.version == family:
            _netout, asg, log = _chains(cp.chain_id)
            mine.update((asg, log))
    kept = [
        ln
        for ln in full.splitlines()[1:-1]
        if (ln.startswith(":") and ln[1:].split(" ", 1)[0] in mine)
        or (ln.startswith("-A ") and ln.split(" ", 2)[1] in mine)
    ]
    return "\n".join(["*filter", *kept, "COMMIT"]) + "\n"


def rule_count(text: str) -> int:
    """Rules in a transaction: its `-A` lines."""
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


# -- the overlay: container-to-container traffic, as silk and the VPA write it ------------


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """A CF network policy (`cf add-network-policy SRC DST --port P --protocol tcp`): the
    source app's containers may open connections to the destination app's on the ports."""

    source_app: str
    """App GUID, as the container metadata store carries it (`app_id`)."""
    dest_app: str
    protocol: str
    start_port: int
    end_port: int

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise ValueError(f"network policy protocol must be tcp or udp, not {self.protocol!r}")
        if not 0 < self.start_port <= self.end_port < 65536:
            raise ValueError(f"network policy ports {self.start_port}-{self.end_port}")


def policy_tags(policies: Sequence[NetworkPolicy]) -> dict[str, str]:
    """The policy server's tag per source app: a 2-byte hex id (cf-networking's default
    `tag_length`), given out in order of first appearance, so a render is deterministic."""
    tags: dict[str, str] = {}
    for p in policies:
        tags.setdefault(p.source_app, f"{len(tags) + 1:04X}")
    return tags


def _ports(p: NetworkPolicy) -> str:
    return str(p.start_port) if p.start_port == p.end_port else f"{p.start_port}:{p.end_port}"


def vpa_chain_lines(plan: CellPlan, policies: Sequence[NetworkPolicy], chain: str) -> list[str]:
    """The vxlan-policy-agent's `vpa--<time>` chain for this cell's IPv4 containers.

    silk-release vxlan-policy-agent/planner/planner_linux.go@25ea819:382-439 planIPTableRules:
    first a MARK rule per local container of a policy's *source* app (:384-389; `--source <ip>
    -j MARK --set-xmark 0x<tag>`, lib/rules/rules.go@0a8b534:108-113 NewMarkSetRule), then per
    local container of a policy's *destination* app (:403-411) `-d <ip> -p <proto> --dport
    <ports> -m mark --mark 0x<tag> -j ACCEPT` (rules.go@0a8b534:74-82 NewMarkAllowRule).  The
    enforcer inserts the chain's jump at FORWARD position 1 (enforcer/enforcer.go@01b6775:258).
    The mark travels to another cell in the VXLAN header's group policy id (silk's vtep is
    created with GBP on, silk/daemon/vtep/factory.go@85ad715:38-61), so a destination cell
    sees the source's tag.  Comments carrying app
    GUIDs are left out: they decide nothing, and no store field reaches our transactions.
    """
    tags = policy_tags(policies)
    local = [cp.container for cp in plan.containers if cp.container.version == 4]
    lines: list[str] = []
    seen: set[str] = set()
    for c in sorted(local, key=lambda c: c.ip):
        if c.app_id in tags and c.ip not in seen:
            seen.add(c.ip)
            lines.append(f"-A {chain} -s {c.ip}/32 -j MARK --set-xmark 0x{tags[c.app_id]}")
    for c in sorted(local, key=lambda c: c.ip):
        for p in policies:
            if p.dest_app == c.app_id:
                lines.append(
                    f"-A {chain} -d {c.ip}/32 -p {p.protocol} -m {p.protocol} --dport {_ports(p)}"
                    f" -m mark --mark 0x{tags[p.source_app]} -j ACCEPT"
                )
    return lines


def overlay_chain_lines(cp: ContainerPlan, vtep: str) -> tuple[str, list[str]]:
    """silk-cni's `overlay--<handle>` chain of one container and its FORWARD jump.

    silk-release cni-wrapper-plugin/netrules/netout.go@17a1c64:128-141 defaultNetOutRules:
    FORWARD `--jump overlay--<handle>` (appended, no condition), and in the chain
    (lib/rules/rules.go@0a8b534): NewOverlayAllowEgress :329-336 (`-s <ip> -o <vtep> -m mark !
    --mark 0x0 -j ACCEPT`: leaving over the overlay only when the VPA tagged it),
    NewOverlayRelatedEstablishedRule :338-344, NewOverlayTagAcceptRule for the ingress routers'
    tag (no routers in the lab: left out), NewOverlayDefaultRejectRule :311-317 (`-d <ip> -j
    REJECT`): whatever the VPA did not accept.
    """
    chain = f"overlay--{_short(cp.chain_id)}"
    ip = f"{cp.container.ip}/32"
    return chain, [
        f"-A FORWARD -j {chain}",
        f"-A {chain} -s {ip} -o {check_interface_name(vtep)} -m mark ! --mark 0x0 -j ACCEPT",
        f"-A {chain} -d {ip} -m state --state RELATED,ESTABLISHED -j ACCEPT",
        f"-A {chain} -d {ip} -j REJECT --reject-with icmp-port-unreachable",
    ]


def render_diego(
    plan: CellPlan, policies: Sequence[NetworkPolicy], *, vtep: str, stamp: int
) -> str:
    """A Diego cell's own IPv4 FORWARD layout, for `iptables-restore --noflush`.

    silk's netout chains (`render_cf`: ASG egress out of the underlay), silk's overlay chain
    per container, and the VPA's `vpa--<stamp>` chain inserted first in FORWARD.  The FORWARD
    entries are what a cell shows after its containers started: netout and overlay jumps
    appended in container order, the VPA's jump on top.
    """
    vpa = f"vpa--{int(stamp)}"
    if len(vpa) > 28:
        raise ValueError(f"chain name {vpa} is longer than iptables' 28 characters")
    containers = [cp for cp in plan.containers if cp.container.version == 4]
    for cp in containers:
        ipaddress.IPv4Address(cp.container.ip)  # a store's text never reaches the rules
    body = render_cf(plan, 4).splitlines()[1:-1]  # without *filter / COMMIT
    heads = [ln for ln in body if ln.startswith(":")]
    rules = [ln for ln in body if not ln.startswith(":")]
    for cp in containers:
        chain, lines = overlay_chain_lines(cp, vtep)
        heads.append(f":{chain} - [0:0]")
        rules += lines
    heads.append(f":{vpa} - [0:0]")
    rules += vpa_chain_lines(plan, policies, vpa)
    rules.append(f"-I FORWARD 1 -j {vpa}")
    return "\n".join(["*filter", *heads, *rules, "COMMIT"]) + "\n"
