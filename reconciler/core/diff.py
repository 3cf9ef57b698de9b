"""PlanDiff: what a pull request changes, as access per principal and as chains per cell.

Two levels, because two audiences read a policy PR:

* **Semantic**, for reviewers: per container profile (app or space, lifecycle), which
  destinations and ports it gains and loses, each with the document change responsible
  ("Destination/mysql ips changed (policies/destinations.yaml:3)").  Access is compared as
  packet sets, not as rule text, so re-spelling or splitting a rule is no change, and a rule
  narrowed from ports 80,443 to 443 loses exactly port 80.
* **Dataplane**, for operators: per cell, the iptables chains and lines that the agents
  will create, update and delete, from the same compile and render the agents run, and
  whether the cell's mass-revoke gate would hold the change back (`core.gate`, the same
  count and verdict the agent applies, with the settings the cell runs with).

Pure and deterministic (data in, data out), so CI can run it and golden tests can pin it.

Speed: compiling is a function of each container's *profile* (IP family, lifecycle, space,
app), memoised per policy object in `compile`.  A cell whose profiles all get the same rule
items at base and head (`profile_signature`) renders byte-identical chains, so it is not
compiled at all; cells holding a touched profile are compiled at both revisions, and only
their created, deleted and re-chained chains are rendered and compared.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

from reconciler.backends.iptables.render import (
    CONTAINER_PREFIX,
    TOP_CHAIN,
    chain_order,
    render_cell,
)
from reconciler.core.cellplan import (
    CONTAINER_FIXED_LINES,
    DEFAULT_GATE,
    CellInventory,
    CellPlan,
    ContainerPlan,
    GateSettings,
    Provenance,
    RuleGroup,
)
from reconciler.core.compile import (
    Profile,
    bindings_for,
    cf_equivalent_rules,
    compile_cell,
    enforcement_for,
    group_bindings,
    profile_audit,
    profile_names,
    profile_of,
    profile_rules,
    signature_comparer,
)
from reconciler.core.gate import (
    NOTHING_LOST,
    GateVerdict,
    Memo,
    RevokeCount,
    judge,
    revoke_count,
)
from reconciler.core.model import (
    AddressRange,
    Destination,
    Directory,
    NameItem,
    PolicySet,
    PortRange,
    RuleItem,
    SecurityGroup,
)
from reconciler.core.packetspace import ANY_PORT, item_space, merge_ranges, subtract
from reconciler.forkpool import fork_ranges

CF_RULES_WARNING = 150_000
CF_RULES_ERROR = 500_000

Principal = tuple[str, str, str]  # (lifecycle, space GUID, app GUID)
ChainAction = Literal["create", "update", "delete"]


# ----------------------------------------------------------------------------- results


# Every port, as validation writes it (a Destination without ports) and as a tcp or udp
# rule without ports means it (packetspace.ANY_PORT, port 0 included).
_ALL_PORTS = ((PortRange(1, 65535),), (PortRange(*ANY_PORT),))


@dataclass(frozen=True, slots=True, order=True)
class NameDestination:
    """A grant by DNS name, where an Access has an address range: enforced at the cell for
    whatever the name resolves to, so the diff can say only which name was granted."""

    fqdn: str
    version: int = 0
    """The lowest family of the containers it reaches (as an address range's version)."""

    def __str__(self) -> str:
        return self.fqdn


@dataclass(frozen=True, slots=True, order=True)
class Access:
    """A slice of what a container may reach (one protocol, one address range or one DNS
    name, some ports)."""

    protocol: str
    destination: AddressRange | NameDestination
    ports: tuple[PortRange, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None

    def __str__(self) -> str:
        text = f"{self.protocol} {self.destination}"
        if self.ports and self.ports not in _ALL_PORTS:
            word = (
                "port"
                if len(self.ports) == 1 and self.ports[0].first == self.ports[0].last
                else "ports"
            )
            text += f" {word} " + ",".join(str(p) for p in self.ports)
        elif self.protocol in ("tcp", "udp"):
            text += " all ports"
        if self.icmp_type is not None and self.icmp_type >= 0:
            text += f" type {self.icmp_type}"
            if self.icmp_code is not None and self.icmp_code >= 0:
                text += f" code {self.icmp_code}"
        return text


@dataclass(frozen=True, slots=True)
class AccessChange:
    """Access gained, lost or re-logged, and why: the documents (file:line) that changed it."""

    access: Access
    reasons: tuple[str, ...]
    detail: str = ""


@dataclass(frozen=True)
class PrincipalDiff:
    """What every container of one app (or app-less space) in one lifecycle gains and loses."""

    lifecycle: str
    space_id: str
    app_id: str
    name: str
    kind: Literal["app", "space", "none"]
    containers: int
    cells: int
    gained: tuple[AccessChange, ...]
    lost: tuple[AccessChange, ...]
    logging: tuple[AccessChange, ...] = ()
    containers_gaining: int = 0  # a container only gets rules of its own IP family
    containers_losing: int = 0
    # Empty when the inventory runs this principal where the Directory says it lives; else
    # both sides of the disagreement, and `name` is the GUID (see _Explainer.principal_name).
    name_mismatch: str = ""


@dataclass(frozen=True)
class ChainDiff:
    """One chain of one cell: created, updated or deleted, with its lines as a diff."""

    family: int
    chain: str
    action: ChainAction
    added: int
    removed: int
    lines: tuple[str, ...]  # "+ ...", "- ...", "  ..." in chain order


@dataclass(frozen=True)
class CellDiff:
    """One cell's dataplane change and its rule counts before and after."""

    cell: str
    origin: str
    containers: int
    containers_rechained: int
    chains: tuple[ChainDiff, ...]
    base_cf_rules: int
    head_cf_rules: int
    base_installed: int | None = None  # only computed for cells that change
    head_installed: int | None = None
    revoke: RevokeCount = NOTHING_LOST  # only counted for cells that change
    gate_settings: GateSettings = DEFAULT_GATE
    """What the cell's gate judges with: its agent's reported settings, else the plan's."""

    @property
    def changed(self) -> bool:
        return bool(self.chains)

    @property
    def gate(self) -> GateVerdict | None:
        """Why the cell's agent would hold this change back, or None when it would apply it."""
        return judge(self.revoke, self.gate_settings)

    @property
    def rules_added(self) -> int:
        return sum(c.added for c in self.chains)

    @property
    def rules_removed(self) -> int:
        return sum(c.removed for c in self.chains)


@dataclass(frozen=True, slots=True)
class Notice:
    """A limit crossed by the head revision (warning) or one the plan refuses (error)."""

    level: Literal["warning", "error"]
    cell: str
    message: str


@dataclass(frozen=True)
class PlanDiff:
    cells: tuple[CellDiff, ...]
    principals: tuple[PrincipalDiff, ...]
    notices: tuple[Notice, ...] = field(default=())

    @property
    def changed_cells(self) -> tuple[CellDiff, ...]:
        return tuple(c for c in self.cells if c.changed)

    @property
    def containers_gaining(self) -> int:
        return sum(p.containers_gaining for p in self.principals)

    @property
    def containers_losing(self) -> int:
        return sum(p.containers_losing for p in self.principals)

    @property
    def rules_added(self) -> int:
        return sum(c.rules_added for c in self.cells)

    @property
    def rules_removed(self) -> int:
        return sum(c.rules_removed for c in self.cells)

    @property
    def has_changes(self) -> bool:
        return bool(self.changed_cells or self.principals)

    @property
    def errors(self) -> tuple[Notice, ...]:
        return tuple(n for n in self.notices if n.level == "error")

    @property
    def gated_cells(self) -> tuple[CellDiff, ...]:
        """Cells whose agents would refuse the change without the override trailer."""
        return tuple(c for c in self.cells if c.gate is not None)


# ----------------------------------------------------------------------------- diff


def diff_plans(
    base: PolicySet,
    head: PolicySet,
    inventory: Sequence[CellInventory],
    location_prefix: str = "",
    workers: int = 1,
    gate: GateSettings = DEFAULT_GATE,
) -> PlanDiff:
    """Compare what `base` and `head` make every cell of `inventory` enforce.

    `location_prefix` is put before every file:line (the policy folder inside the repo,
    e.g. `policies/`), so PR readers get paths they can open.  `workers` > 1 compiles the
    touched cells in that many forked processes; the result is the same either way.
    `gate` is the mass-revoke settings for cells whose inventory does not report their own.

    The two halves are also there apart, for a plan split over several jobs (`ci.partial`):
    `diff_part` (the cells of one part of the inventory, and its principal facts) and
    `diff_principals` (every principal, from the facts of all the parts put together).
    """
    part = diff_part(base, head, inventory, workers, gate)
    principals = diff_principals(base, head, part.facts, location_prefix)
    return replace(part.diff, principals=principals)


@dataclass(frozen=True, slots=True, order=True)
class PrincipalFact:
    """One principal as an inventory runs it: its containers per IP family and its cells."""

    lifecycle: str
    space_id: str
    app_id: str
    ipv4: int
    ipv6: int
    cells: int

    @property
    def principal(self) -> Principal:
        return (self.lifecycle, self.space_id, self.app_id)

    @property
    def families(self) -> dict[int, int]:
        """Containers per family, for the families it runs in."""
        return {f: n for f, n in ((4, self.ipv4), (6, self.ipv6)) if n}


@dataclass(frozen=True, slots=True, order=True)
class SpaceOrgs:
    """The orgs an inventory runs one space's containers in (one, unless it disagrees
    with itself; the principal diff names a principal only where the Directory agrees)."""

    space_id: str
    orgs: tuple[str, ...]


@dataclass(frozen=True)
class PrincipalFacts:
    """What the access half of a diff needs of an inventory, and nothing else: per
    principal, its containers per family and the cells it runs on; per space, its orgs.

    Facts of disjoint sets of cells add up (`join_facts`), so the jobs of a sharded plan
    each count their own cells and the merge diffs every principal once, from the sum:
    a principal runs on cells of every shard.
    """

    principals: tuple[PrincipalFact, ...] = ()
    spaces: tuple[SpaceOrgs, ...] = ()


def join_facts(parts: Sequence[PrincipalFacts]) -> PrincipalFacts:
    """The facts of the union of disjoint inventories: counts add, org sets join."""
    counts: dict[Principal, list[int]] = {}
    orgs: dict[str, set[str]] = defaultdict(set)
    for part in parts:
        for p in part.principals:
            row = counts.setdefault(p.principal, [0, 0, 0])
            row[0] += p.ipv4
            row[1] += p.ipv6
            row[2] += p.cells
        for s in part.spaces:
            orgs[s.space_id].update(s.orgs)
    return PrincipalFacts(
        tuple(PrincipalFact(*pr, *row) for pr, row in sorted(counts.items())),
        tuple(SpaceOrgs(space, tuple(sorted(o))) for space, o in sorted(orgs.items())),
    )


@dataclass(frozen=True)
class DiffPart:
    """The cells half of a diff (no principals) and the principal facts of its cells."""

    diff: PlanDiff
    facts: PrincipalFacts


def diff_part(
    base: PolicySet,
    head: PolicySet,
    inventory: Sequence[CellInventory],
    workers: int = 1,
    gate: GateSettings = DEFAULT_GATE,
) -> DiffPart:
    """Every cell's chain diff and notices, and the facts its principals' diff needs.

    The cells are split over up to `workers` forked processes, each counting its own
    cells' facts as it diffs them (facts of disjoint cells add up): at fleet scale, a walk
    over every container in this process alone was a fifth of a shard job."""
    touched = _Touched(base, head)  # both indexes built before the fork: workers share them
    n = len(inventory)
    workers = max(1, min(workers, n // _MIN_CELLS_PER_WORKER))
    work = (base, head, tuple(inventory), touched, gate)
    parts = fork_ranges(_part_range, work, n, workers)
    cells = tuple(c for part_cells, _facts in parts for c in part_cells)
    notices = tuple(x for c in cells for x in _limit_notices(c))
    facts = parts[0][1] if len(parts) == 1 else join_facts([f for _c, f in parts])
    return DiffPart(PlanDiff(cells, (), notices), facts)


def _part_range(
    work: tuple[Any, ...], bounds: tuple[int, int]
) -> tuple[list[CellDiff], PrincipalFacts]:
    """The cells of `bounds`: each one's diff, and their principal facts."""
    base, head, inventory, touched, gate = work
    families: dict[Principal, list[int]] = {}
    cells_of: dict[Principal, int] = defaultdict(int)
    orgs_of_space: dict[str, set[str]] = defaultdict(set)  # what the inventory says
    group_lines: dict[str, int] = {}
    memo = Memo()
    out = []
    for cell in inventory[bounds[0] : bounds[1]]:
        for space, org in {(c.space_id, c.org_id) for c in cell.containers}:
            orgs_of_space[space].add(org)
        profiles = [profile_of(c) for c in cell.containers]
        for pr in {p[1:] for p in profiles}:
            cells_of[pr] += 1
        for p in profiles:
            row = families.get(p[1:])
            if row is None:
                row = families[p[1:]] = [0, 0]
            row[p[0] == 6] += 1
        out.append(_diff_cell(base, head, cell, profiles, touched, group_lines, memo, gate))
    facts = PrincipalFacts(
        tuple(
            PrincipalFact(*pr, v4, v6, cells_of[pr]) for pr, (v4, v6) in sorted(families.items())
        ),
        tuple(SpaceOrgs(sp, tuple(sorted(o))) for sp, o in sorted(orgs_of_space.items())),
    )
    return out, facts


class _Touched:
    """Is a profile touched (different rule items, names or mode at base and head)?
    Each distinct profile is asked once; `seen` holds the answers so far."""

    def __init__(self, base: PolicySet, head: PolicySet) -> None:
        self.base, self.head = base, head
        self.same = signature_comparer(base, head)
        self.seen: dict[Profile, bool] = {}

    def __call__(self, p: Profile) -> bool:
        known = self.seen.get(p)
        if known is None:
            base, head = self.base, self.head
            known = self.seen[p] = (
                not self.same(p)
                or profile_names(base, p) != profile_names(head, p)
                or profile_audit(base, p) != profile_audit(head, p)
            )
        return known


def diff_principals(
    base: PolicySet,
    head: PolicySet,
    facts: PrincipalFacts,
    location_prefix: str = "",
    workers: int = 1,
) -> tuple[PrincipalDiff, ...]:
    """What each principal of `facts` gains and loses from `base` to `head`, in the diff's
    order (`principal_order`); in up to `workers` forked processes when there are many
    (each principal's diff is its own; the merge of a sharded plan diffs a whole fleet's)."""
    orgs = {s.space_id: set(s.orgs) for s in facts.spaces}
    n = len(facts.principals)
    workers = max(1, min(workers, n // _MIN_PRINCIPALS_PER_WORKER))
    # Both policies' indexes are built here, before the fork: the workers share them.
    work = (base, head, facts.principals, location_prefix, orgs, _Touched(base, head))
    parts = fork_ranges(_principal_range, work, n, workers)
    return tuple(sorted((d for part in parts for d in part), key=principal_order))


_MIN_PRINCIPALS_PER_WORKER = 500


def _principal_range(work: tuple[Any, ...], bounds: tuple[int, int]) -> list[PrincipalDiff]:
    base, head, rows, prefix, orgs, touched = work
    mine = rows[bounds[0] : bounds[1]]
    return list(
        _principal_diffs(
            base,
            head,
            {p.principal: p.families for p in mine},
            {p.principal: p.cells for p in mine},
            touched,
            prefix,
            orgs,
        )
    )


_MIN_CELLS_PER_WORKER = 32


def _diff_cell(
    base: PolicySet,
    head: PolicySet,
    cell: CellInventory,
    profiles: list[Profile],
    touched: Callable[[Profile], bool],
    group_lines: dict[str, int],
    memo: Memo,
    gate: GateSettings,
) -> CellDiff:
    containers = cell.containers
    settings = cell.gate or gate
    if not any(touched(p) for p in set(profiles)):
        cf = cf_equivalent_rules(base, containers)  # untouched: the same at head
        return CellDiff(
            cell.cell, cell.origin, len(containers), 0, (), cf, cf, gate_settings=settings
        )
    before = compile_cell(base, containers, cell.cell)
    after = compile_cell(head, containers, cell.cell)
    base_cf, head_cf = before.cf_equivalent_rules, after.cf_equivalent_rules
    chains = [ch for family in (4, 6) for ch in _family_diff(before, after, family)]
    rechained = sum(1 for c in chains if c.chain.startswith(CONTAINER_PREFIX))
    return CellDiff(
        cell.cell,
        cell.origin,
        len(containers),
        rechained,
        tuple(chains),
        base_cf,
        head_cf,
        _installed(before, group_lines),
        _installed(after, group_lines),
        revoke_count(before, after, memo),
        settings,
    )


def _family_diff(before: CellPlan, after: CellPlan, family: int) -> list[ChainDiff]:
    """The chains of one family that differ, rendering only those.

    A group with the same content digest at both revisions renders the same chain, and a
    container chain is identical when its list of groups is: only created and deleted
    groups and re-chained containers are rendered.  (Rendering every chain of a cell twice
    was most of the plan's time at fleet scale.)  Groups are matched by digest, never by
    id: a group whose id collides with the old one's but whose rules differ is rendered on
    both sides, and its chain shows as updated.
    """
    old_groups = {g.digest: g for g in before.groups if g.version == family}
    new_groups = {g.digest: g for g in after.groups if g.version == family}
    old_cs = {c.chain_id: c for c in before.containers if c.container.version == family}
    new_cs = {c.chain_id: c for c in after.containers if c.container.version == family}
    changed = sorted(
        k
        for k in old_cs.keys() | new_cs.keys()
        if k not in old_cs
        or k not in new_cs
        or old_cs[k].groups != new_cs[k].groups
        or old_cs[k].names != new_cs[k].names  # name rule ids hash their content
        or old_cs[k].audit != new_cs[k].audit  # the chain's tail: reject or would-deny
    )
    dispatch = {(c.container.ip, k) for k, c in old_cs.items()} != {
        (c.container.ip, k) for k, c in new_cs.items()
    }
    gone = sorted(old_groups.keys() - new_groups.keys())
    added = sorted(new_groups.keys() - old_groups.keys())
    if not (changed or dispatch or gone or added):
        return []
    if dispatch or not changed:
        changed = sorted(old_cs.keys() | new_cs.keys())  # render all; equal chains drop out

    def sub(plan: CellPlan, cs: dict[str, ContainerPlan], groups: list[RuleGroup]) -> CellPlan:
        mine = tuple(cs[k] for k in changed if k in cs)
        return CellPlan(plan.cell, mine, tuple(groups), 0, names=plan.names)

    old = render_cell(sub(before, old_cs, [old_groups[g] for g in gone]), family).chains
    new = render_cell(sub(after, new_cs, [new_groups[g] for g in added]), family).chains
    if not dispatch:
        old.pop(TOP_CHAIN, None)
        new.pop(TOP_CHAIN, None)
    out = []
    for name in sorted(old.keys() | new.keys(), key=chain_order):
        a, b = old.get(name, ()), new.get(name, ())
        if a != b:
            out.append(_chain_diff(family, name, a, b))
    return out


def _chain_diff(family: int, name: str, old: tuple[str, ...], new: tuple[str, ...]) -> ChainDiff:
    if not old:
        return ChainDiff(family, name, "create", len(new), 0, tuple("+ " + x for x in new))
    if not new:
        return ChainDiff(family, name, "delete", 0, len(old), tuple("- " + x for x in old))
    gone, came = set(old) - set(new), set(new) - set(old)
    kept_old = [x for x in old if x not in gone]
    if kept_old == [x for x in new if x not in came]:
        # The common lines keep their order (the usual case: jumps swapped in place), so a
        # merge walk gives the diff without difflib's cost.
        lines, i = [], 0
        for x in new:
            while i < len(old) and old[i] in gone:
                lines.append("- " + old[i])
                i += 1
            if x in came:
                lines.append("+ " + x)
            else:
                lines.append("  " + x)
                i += 1
        lines.extend("- " + x for x in old[i:])
        return ChainDiff(family, name, "update", len(came), len(gone), tuple(lines))
    lines = []
    added = removed = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if op == "equal":
            lines.extend("  " + x for x in old[i1:i2])
            continue
        lines.extend("- " + x for x in old[i1:i2])
        lines.extend("+ " + x for x in new[j1:j2])
        removed += i2 - i1
        added += j2 - j1
    return ChainDiff(family, name, "update", added, removed, tuple(lines))


def _limit_notices(cell: CellDiff) -> list[Notice]:
    n = cell.head_cf_rules
    if n > CF_RULES_ERROR:
        return [
            Notice(
                "error",
                cell.cell,
                f"{n:,} CF-equivalent rules, over the limit of {CF_RULES_ERROR:,}",
            )
        ]
    if n > CF_RULES_WARNING:
        return [
            Notice(
                "warning",
                cell.cell,
                f"{n:,} CF-equivalent rules, over {CF_RULES_WARNING:,} (where CF's layout chokes)",
            )
        ]
    return []


# ----------------------------------------------------------------------------- semantic


def _principal_diffs(
    base: PolicySet,
    head: PolicySet,
    families: dict[Principal, dict[int, int]],
    cells: dict[Principal, int],
    touched: Callable[[Profile], bool],
    prefix: str,
    orgs_of_space: dict[str, set[str]],
) -> tuple[PrincipalDiff, ...]:
    explainer = _Explainer(base, head, prefix, orgs_of_space)
    out: list[PrincipalDiff] = []
    for pr in sorted(families):
        fams = sorted(families[pr])
        if not any(touched((f, *pr)) for f in fams):
            continue
        before: dict[RuleItem, frozenset[Provenance]] = {}
        after: dict[RuleItem, frozenset[Provenance]] = {}
        for f in fams:
            before.update(profile_rules(base, (f, *pr)))
            after.update(profile_rules(head, (f, *pr)))
        lost = _changes(before, after, partial(explainer.why, pr=pr, lost=True))
        gained = _changes(after, before, partial(explainer.why, pr=pr, lost=False))
        names_before = {f: profile_names(base, (f, *pr)) for f in fams}
        names_after = {f: profile_names(head, (f, *pr)) for f in fams}
        lost += _name_changes(names_before, names_after, partial(explainer.why, pr=pr, lost=True))
        gained += _name_changes(
            names_after, names_before, partial(explainer.why, pr=pr, lost=False)
        )
        logging = _logging_changes(before, after, explainer, pr)
        audit_before = profile_audit(base, (fams[0], *pr))  # the mode is the principal's
        audit_after = profile_audit(head, (fams[0], *pr))
        if audit_before != audit_after:
            mode = _mode_changes(fams, explainer.why_mode(pr, lost=audit_before))
            if audit_after:
                gained = (*gained, *mode)
            else:
                lost = (*lost, *mode)
        if not (lost or gained or logging):
            continue
        name, kind, mismatch = explainer.principal_name(pr)
        per_family = families[pr]
        gaining = {v for c in gained for v in _families(c, names_after)}
        losing = {v for c in lost for v in _families(c, names_before)}
        out.append(
            PrincipalDiff(
                lifecycle=pr[0],
                space_id=pr[1],
                app_id=pr[2],
                name=name,
                kind=kind,
                containers=sum(per_family.values()),
                cells=cells[pr],
                gained=gained,
                lost=lost,
                logging=logging,
                containers_gaining=sum(per_family[f] for f in gaining),
                containers_losing=sum(per_family[f] for f in losing),
                name_mismatch=mismatch,
            )
        )
    out.sort(key=principal_order)
    return tuple(out)


def principal_order(p: PrincipalDiff) -> tuple[str, str, str, str]:
    """The order of a diff's principals: by name, then lifecycle and GUIDs."""
    return (p.name, p.lifecycle, p.space_id, p.app_id)


def _name_changes(
    mine: dict[int, dict[NameItem, frozenset[Provenance]]],
    theirs: dict[int, dict[NameItem, frozenset[Provenance]]],
    why: Callable[[Provenance], str],
) -> tuple[AccessChange, ...]:
    """Grants by name `mine` has and `theirs` does not (per name, protocol and ports: a
    name's addresses are not known to CI, so a grant is compared as written)."""
    families: dict[NameItem, list[int]] = defaultdict(list)
    sources: dict[NameItem, set[Provenance]] = defaultdict(set)
    for family, items in sorted(mine.items()):
        for item, provs in items.items():
            if item not in theirs.get(family, {}):
                families[item].append(family)
                sources[item].update(provs)
    out = []
    for item in sorted(families):
        access = Access(
            item.protocol,
            NameDestination(item.fqdn, min(families[item])),
            item.ports,
            item.icmp_type,
            item.icmp_code,
        )
        detail = "wildcard: one label, from the answers containers receive" if item.wildcard else ""
        out.append(AccessChange(access, tuple(sorted({why(p) for p in sources[item]})), detail))
    return tuple(out)


AUDIT_DETAIL = (
    "(audit: everything no rule allows and no deny network rejects, logged as would-deny)"
)


def _mode_changes(families: list[int], reasons: tuple[str, ...]) -> tuple[AccessChange, ...]:
    """A principal moving into audit gains, and moving back to enforce loses, every packet
    no rule allows, per family of its containers: that is what the chain's last rule
    accepts instead of rejecting.  Shown as all of the family's addresses; the cell's deny
    networks (cell settings, not policy) still reject, which the detail says."""
    return tuple(
        AccessChange(
            Access("all", AddressRange.whole(f)),
            reasons,
            AUDIT_DETAIL,
        )
        for f in families
    )


def _families(
    change: AccessChange, names: dict[int, dict[NameItem, frozenset[Provenance]]]
) -> list[int]:
    """The families of containers a change reaches: an address range's own; a name's, each
    family whose containers had (or have) the grant."""
    dest = change.access.destination
    if isinstance(dest, AddressRange):
        return [dest.version]
    a = change.access
    item = NameItem(a.protocol, dest.fqdn, a.ports, a.icmp_type, a.icmp_code)
    return [f for f, items in names.items() if item in items] or [dest.version]


def _installed(plan: CellPlan, group_lines: dict[str, int]) -> int:
    """`CellPlan.installed_rules`, with each shared group's line count computed once."""
    total = len({cp.container.version for cp in plan.containers})
    total += sum(CONTAINER_FIXED_LINES + len(cp.groups) for cp in plan.containers)
    for g in plan.groups:
        n = group_lines.get(g.digest)
        if n is None:
            n = group_lines[g.digest] = g.lines
        total += n
    if plan.names:  # grants by name: as `CellPlan.installed_rules` counts them
        by_id = plan.name_by_id
        total += sum(by_id[n].lines for cp in plan.containers for n in cp.names)
    return total


# The diff reports access per rule slice: it cuts a rule's packets along addresses and ports
# only, so every slice keeps its rule's protocol and ICMP type and code (see
# packetspace.subtract).
_REPORTED_AXES = ("addresses", "ports")


def _strip_log(item: RuleItem) -> RuleItem:
    if not item.log:
        return item
    return RuleItem(item.protocol, item.destination, item.ports, item.icmp_type, item.icmp_code)


def _changes(
    mine: dict[RuleItem, frozenset[Provenance]],
    theirs: dict[RuleItem, frozenset[Provenance]],
    why: Callable[[Provenance], str],
) -> tuple[AccessChange, ...]:
    """Access that `mine` grants and `theirs` does not, with the reasons for each slice."""
    their_items = {_strip_log(i) for i in theirs}
    their_boxes = [b for i in their_items for b in item_space(i)]
    residue: dict[tuple[Any, ...], tuple[list[tuple[int, int]], set[Provenance]]] = {}
    for item, provs in sorted(mine.items()):
        plain = _strip_log(item)
        if plain in their_items:
            continue
        t = -1 if plain.icmp_type is None else plain.icmp_type
        code = -1 if plain.icmp_code is None else plain.icmp_code
        for box in item_space(plain):
            for piece in subtract(box, their_boxes, _REPORTED_AXES):
                key = (plain.protocol, t, code, piece.family, *piece.addresses)
                ports, sources = residue.setdefault(key, ([], set()))
                if plain.protocol in ("tcp", "udp"):
                    ports.append(piece.ports)
                sources.update(provs)
    out = []
    for key, (ports, sources) in residue.items():
        proto, t, code, version, first, last = key
        access = Access(
            proto,
            AddressRange(version, first, last),
            tuple(PortRange(lo, hi) for lo, hi in merge_ranges(set(ports))),
            None if proto not in ("icmp", "icmpv6") else t,
            None if proto not in ("icmp", "icmpv6") else code,
        )
        reasons = tuple(sorted({why(p) for p in sources}))
        out.append(AccessChange(access, reasons))
    out.sort(key=lambda c: c.access)
    return tuple(out)


def _logging_changes(
    before: dict[RuleItem, frozenset[Provenance]],
    after: dict[RuleItem, frozenset[Provenance]],
    explainer: _Explainer,
    pr: Principal,
) -> tuple[AccessChange, ...]:
    """Same access, but new connections are now logged, or no longer are."""
    plain_before = {_strip_log(i) for i in before}
    plain_after = {_strip_log(i) for i in after}
    logged_before = {_strip_log(i): p for i, p in before.items() if i.log}
    logged_after = {_strip_log(i): p for i, p in after.items() if i.log}
    out = []
    for item in sorted(set(logged_before) ^ set(logged_after)):
        if item not in plain_before or item not in plain_after:
            continue  # gained or lost outright; reported there
        on = item in logged_after
        sources = logged_after[item] if on else logged_before[item]
        reasons = tuple(sorted({explainer.why(p, pr, lost=not on) for p in sources}))
        access = Access(item.protocol, item.destination, item.ports, item.icmp_type, item.icmp_code)
        out.append(AccessChange(access, reasons, "logging on" if on else "logging off"))
    return tuple(out)


class _Explainer:
    """Names the document change behind a gained or lost rule: what a reviewer must look at."""

    def __init__(
        self,
        base: PolicySet,
        head: PolicySet,
        prefix: str,
        orgs_of_space: dict[str, set[str]],
    ):
        self.base, self.head, self.prefix = base, head, prefix
        self.orgs_of_space = orgs_of_space  # space GUID -> org GUIDs, as the inventory says
        self._sg = {id(p): {g.name: g for g in p.security_groups} for p in (base, head)}
        self._ep = {id(p): {e.name: e for e in p.egress_policies} for p in (base, head)}

    def loc(self, where: object) -> str:
        text = where if isinstance(where, str) else getattr(where, "short", "")
        return f" ({self.prefix}{text})" if text else ""

    def space_name(self, guid: str) -> str:
        for d in (self.head.directory, self.base.directory):
            if d.knows_space(guid):
                return d.space_path(guid)
        return guid

    def principal_name(self, pr: Principal) -> tuple[str, Literal["app", "space", "none"], str]:
        """The Directory's name for a principal where the inventory agrees; else its GUID.

        Names come from the pull request's Directory, GUIDs from the inventory.  A PR that
        swaps two apps' GUIDs would otherwise have the plan name one app while the containers
        that gain the access run another, in another space.  So a name is given only when the
        inventory runs the app in the space the Directory puts it in, and that space in the
        Directory's org.  Otherwise the name is the GUID, and the third value says what
        each side claims (empty when they agree).
        """
        _, space, app = pr
        if app:
            for d in (self.head.directory, self.base.directory):
                known = d.app(app)
                if known is None:
                    continue
                said = d.app_path(app)
                if known.space_guid != space:
                    where = self._inventory_space(space)
                    mismatch = f"directory says {said} in space {known.space_guid}, "
                    return app, "app", f"{mismatch}inventory says space {where}"
                mismatch = self._org_mismatch(d, space, said)
                return (app, "app", mismatch) if mismatch else (said, "app", "")
            return app, "app", ""
        if space:
            for d in (self.head.directory, self.base.directory):
                if d.knows_space(space):
                    said = d.space_path(space)
                    mismatch = self._org_mismatch(d, space, said)
                    return (space, "space", mismatch) if mismatch else (said, "space", "")
            return space, "space", ""
        return "(no space)", "none", ""

    def _inventory_orgs(self, space: str) -> str:
        return ", ".join(sorted(o or "(none)" for o in self.orgs_of_space.get(space, ("",))))

    def _org_mismatch(self, d: Directory, space: str, said: str) -> str:
        """Empty when every container of `space` runs in the org the Directory gives it."""
        known = d.space(space)
        org = known.org_guid if known is not None else ""
        if known is not None and self.orgs_of_space.get(space, {""}) == {org}:
            return ""
        return (
            f"directory says {said} in org {org or '(none)'}, "
            f"inventory says org {self._inventory_orgs(space)}"
        )

    def _inventory_space(self, space: str) -> str:
        """The inventory's space GUID, with a name only where the Directory's org agrees."""
        if not space:
            return "(none)"
        for d in (self.head.directory, self.base.directory):
            if d.knows_space(space) and not self._org_mismatch(d, space, ""):
                return f"{space} ({d.space_path(space)})"
        return space

    def why_mode(self, pr: Principal, *, lost: bool) -> tuple[str, ...]:
        """Why a principal's mode changed: the Enforcement documents deciding it at base and
        head that are not the same document at both (added, deleted, or changed)."""
        _, space, app = pr
        deciders = [
            (side, e)
            for side, policy in (("base", self.base), ("head", self.head))
            if (e := enforcement_for(policy, space, app)) is not None
        ]
        out = []
        for side, e in deciders:
            theirs = self.head if side == "base" else self.base
            other = next((x for x in theirs.enforcements if x.name == e.name), None)
            where = self.loc(e.location)
            subject = f"Enforcement/{e.name}"
            if other is None:
                out.append(f"{subject} {'deleted' if side == 'base' else 'added'}{where}")
            elif other != e and side == "head":
                what = "mode" if other.mode != e.mode else "scope"
                now = e.mode if what == "mode" else e.scope_text(self.head.directory)
                out.append(f"{subject} {what} changed to {now}{where}")
            elif other != e and not any(x is other for _, x in deciders):
                out.append(f"{subject} changed{self.loc(other.location)}")
        if not out:  # the documents are the same: what moved is the principal (directory)
            out = [f"Enforcement/{e.name} ({e.mode}){self.loc(e.location)}" for _, e in deciders]
        return tuple(sorted(set(out))) or (f"mode {'enforce' if lost else 'audit'}",)

    def why(self, prov: Provenance, pr: Principal, *, lost: bool) -> str:
        """For `lost`, why base granted it and head does not; else why head now grants it."""
        have, other = (self.base, self.head) if lost else (self.head, self.base)
        if prov.kind == "SecurityGroup":
            return self._why_group(prov, pr, have, other, lost)
        return self._why_policy(prov, pr, have, other, lost)

    def _why_group(
        self, prov: Provenance, pr: Principal, have: PolicySet, other: PolicySet, lost: bool
    ) -> str:
        name = prov.name
        subject = f"SecurityGroup/{name}"
        mine = self._sg[id(have)].get(name)
        theirs = self._sg[id(other)].get(name)
        if mine is None:  # cannot happen: provenance names a group of `have`
            return f"{subject} changed"
        head_group = mine if not lost else theirs
        if theirs is None:
            return f"{subject} {'deleted' if lost else 'added'}{self.loc(mine.location)}"
        lifecycle, space, _ = pr
        if _binding(theirs, lifecycle, space) is None:
            how = _binding(mine, lifecycle, space)
            where = self.loc(head_group.location if head_group else None)
            if how == "global":
                state = "off" if lost else "on"
                return f"{subject} globally_enabled.{lifecycle} turned {state}{where}"
            target = self.space_name(space)
            verb = "removed" if lost else "added"
            return f"{subject} binding to {target} ({lifecycle}) {verb}{where}"
        index = prov.index if prov.index is not None else 0
        rule = mine.rules[index] if index < len(mine.rules) else None
        if rule is not None and rule not in theirs.rules:
            if index < len(theirs.rules):
                now = theirs.rules[index] if lost else rule
                return f"{subject} rules[{index}] changed{self.loc(now.location)}"
            verb = "removed" if lost else "added"
            return f"{subject} rules[{index}] {verb}{self.loc(prov.location)}"
        return f"{subject} rules[{index}] changed{self.loc(prov.location)}"

    def _why_policy(
        self, prov: Provenance, pr: Principal, have: PolicySet, other: PolicySet, lost: bool
    ) -> str:
        name = prov.name
        subject = f"EgressPolicy/{name}"
        mine = self._ep[id(have)].get(name)
        theirs = self._ep[id(other)].get(name)
        if mine is None:
            return f"{subject} changed"
        if theirs is None:
            return f"{subject} {'deleted' if lost else 'added'}{self.loc(mine.location)}"
        head_ep = theirs if lost else mine
        where = self.loc(head_ep.location)
        if (mine.source_type, mine.source_id) != (theirs.source_type, theirs.source_id):
            return f"{subject} source changed{where}"
        if mine.app_lifecycle != theirs.app_lifecycle:
            return f"{subject} app_lifecycle changed to {head_ep.app_lifecycle}{where}"
        if mine.destination != theirs.destination:
            return f"{subject} destination changed to Destination/{head_ep.destination}{where}"
        dest_name = prov.destination or mine.destination
        d_mine = have.destination_by_name.get(dest_name)
        d_theirs = other.destination_by_name.get(dest_name)
        if d_mine is None:
            return f"{subject} changed{where}"
        if d_theirs is None:
            verb = "deleted" if lost else "added"
            return f"Destination/{dest_name} {verb}{self.loc(d_mine.location)}"
        fields = _destination_fields(d_mine, d_theirs)
        head_dest = d_theirs if lost else d_mine
        what = " and ".join(fields) if fields else "rules"
        return f"Destination/{dest_name} {what} changed{self.loc(head_dest.location)}"


def _binding(sg: SecurityGroup, lifecycle: str, space: str) -> str | None:
    """How a group reaches containers of this lifecycle and space: globally, by space, or not."""
    keys = set(group_bindings(sg)).intersection(bindings_for(lifecycle, space, ""))
    if ("global", lifecycle) in keys:
        return "global"
    return "space" if keys else None


def _destination_fields(a: Destination, b: Destination) -> list[str]:
    out = []
    if a.protocol != b.protocol:
        out.append("protocol")
    if a.ips != b.ips:
        out.append("ips")
    if a.fqdns != b.fqdns:
        out.append("fqdns")
    if a.ports != b.ports:
        out.append("ports")
    if (a.icmp_type, a.icmp_code) != (b.icmp_type, b.icmp_code):
        out.append("icmp")
    return out
