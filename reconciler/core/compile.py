"""Compile a policy set and a cell's inventory into that cell's Plan (pure, deterministic).

Cloud Foundry semantics, as the vxlan-policy-agent applies them:

* `staging` containers get the ASGs bound to their space for staging plus the global staging
  defaults; `app` and `task` containers get the running ones.
* Egress policies add their destination to containers whose app (type app), space (type
  space) or any app (type default) matches, when `app_lifecycle` is `all` or equals the
  container's lifecycle.
* A container without a space (CF writes none for some system containers) gets only what does
  not need one: the global defaults, `default` egress policies and policies for its app GUID.
* A container of any other workload (none included) gets nothing, as silk gives it no ASG.
* An IP several containers claim (a stale metadata entry beside the live one) gets only what
  every claimant gets: the intersection of their rules, never wider than any one of them.
  Each claimant keeps its own chain, all with the same groups, so whichever the kernel
  dispatches to, the address gets the same narrow access.
* Rules only allow; everything else is rejected -- or, for a container in audit mode
  (`kind: Enforcement`), accepted and logged as would-deny.  The most specific scope decides
  (the container's app, else its space, else `all`, else enforce); an IP several containers
  claim is audited only when every claimant is (never wider than any one of them).  The
  cell's deny networks reject before any of this, audited or not.

Where CF installs every rule of every ASG again for every container, the plan installs each
distinct rule once per cell: rules are partitioned by the exact set of container profiles
that get them, each part becomes one shared group chain, and each container jumps to the
groups of its profile.  A rule two ASGs both contain is therefore installed once.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from reconciler.core.cellplan import (
    CF_CONTAINER_FIXED_LINES,
    CellPlan,
    CellSettings,
    ContainerPlan,
    NameRule,
    PlanRule,
    Provenance,
    RuleGroup,
    cf_rule_keys,
    content_id,
)
from reconciler.core.model import (
    LIFECYCLES,
    Container,
    EgressPolicy,
    Enforcement,
    NameItem,
    PolicySet,
    Rule,
    RuleItem,
    SecurityGroup,
)

Profile = tuple[int, str, str, str]  # (IP version, lifecycle, space GUID, app GUID)
ProfileRules = Mapping[RuleItem, frozenset[Provenance]]


@dataclass(frozen=True, slots=True)
class Source:
    """A rule a container gets, with the document that grants it."""

    provenance: Provenance
    rule: Rule


@dataclass(frozen=True, slots=True)
class _Entry:
    """What one profile gets, by number: the unit compile works with."""

    keys: frozenset[int]  # the binding keys it has
    atoms: tuple[int, ...]  # what those keys grant, of its family
    numbers: tuple[int, ...]  # the atoms' items, sorted
    items: tuple[RuleItem, ...]  # those items themselves: what the profile's chains match
    cf_lines: int


def _item_order(item: RuleItem) -> tuple[Any, ...]:
    """RuleItem's own ordering as a plain tuple, so sorting runs at C speed."""
    d = item.destination
    ports = tuple((p.first, p.last) for p in item.ports)
    return (
        item.protocol,
        (d.version, d.first, d.last),
        ports,
        item.icmp_type,
        item.icmp_code,
        item.log,
    )


@lru_cache(maxsize=1 << 16)
def _chain_id(handle: str) -> str:
    """A container chain's id (a hash of its handle), cached: cells recompile the same
    containers every cycle, and the CI plan compiles each cell twice."""
    return content_id("container " + handle)


# How a document reaches containers: a binding key names a kind and what it is bound to.
# ("global", lifecycle): an ASG's globally_enabled; ("default", lifecycle): an egress policy
# for every app; ("space-group" | "space-policy", lifecycle, space GUID): an ASG bound to a
# space, an egress policy for a space; ("app-policy", lifecycle, app GUID).
BindingKey = tuple[str, ...]
_KIND_ORDER = {"global": 0, "default": 1, "space-group": 2, "space-policy": 3, "app-policy": 4}


def bindings_for(lifecycle: str, space: str, app: str) -> tuple[BindingKey, ...]:
    """The binding keys a container of this lifecycle, space and app gets: all it gets is
    what the documents bound by these keys grant (its IP family then picks their items).

    A container without a space gets no space's groups or policies, one without an app no
    app's policies; one without a lifecycle ("": a workload silk gives no ASGs) matches no
    key, as no document is bound to lifecycle "".  Keys come in the order `explain` lists a
    container's sources: global groups, default policies, space groups, space policies,
    app policies.
    """
    keys: list[BindingKey] = [("global", lifecycle), ("default", lifecycle)]
    if space:
        keys += [("space-group", lifecycle, space), ("space-policy", lifecycle, space)]
    if app:
        keys.append(("app-policy", lifecycle, app))
    return tuple(keys)


def group_bindings(sg: SecurityGroup) -> tuple[BindingKey, ...]:
    """The keys through which an ASG reaches containers (`bindings_for` is the other side)."""
    keys: list[BindingKey] = []
    if sg.running_default:
        keys.append(("global", "running"))
    if sg.staging_default:
        keys.append(("global", "staging"))
    keys += [("space-group", "running", space) for space in sg.running_spaces]
    keys += [("space-group", "staging", space) for space in sg.staging_spaces]
    return tuple(keys)


def policy_bindings(ep: EgressPolicy) -> tuple[BindingKey, ...]:
    """The keys through which an egress policy reaches containers, per lifecycle it names."""
    keys: list[BindingKey] = []
    for lifecycle in LIFECYCLES:
        if not ep.applies_to(lifecycle):
            continue
        if ep.source_type == "default":
            keys.append(("default", lifecycle))
        elif ep.source_type == "app" and ep.source_id:
            keys.append(("app-policy", lifecycle, ep.source_id))
        elif ep.source_type == "space" and ep.source_id:
            keys.append(("space-policy", lifecycle, ep.source_id))
    return tuple(keys)


def profile_of(container: Container) -> Profile:
    """Everything that decides which rules a container gets; equal profiles, equal rules."""
    return (container.version, container.lifecycle, container.space_id, container.app_id)


class _Index:
    """A policy set indexed once, so compiling a cell touches only what its containers get.

    Bindings are kept by key (global defaults and default policies per lifecycle, space
    groups and space policies per lifecycle and space, app policies per lifecycle and app).
    A container's profile names a handful of keys; everything it gets is what those keys
    grant.

    Items (rules with one destination) are numbered in their sort order, and grouped into
    *atoms*: the items granted by exactly the same keys, of one family and one log flag.  Two
    items of an atom are held by the same containers in every cell, so compiling partitions
    a cell's atoms (a few per profile) instead of its items (dozens per profile); that is
    what makes a fleet-wide CI plan, thousands of compiles, take seconds.
    """

    def __init__(self, policy: PolicySet):
        bound: dict[BindingKey, list[Source]] = defaultdict(list)
        for sg in policy.security_groups:
            sources = [
                Source(
                    Provenance(
                        "SecurityGroup",
                        sg.name,
                        i,
                        rule.location.short if rule.location else _where(sg.location),
                    ),
                    rule,
                )
                for i, rule in enumerate(sg.rules)
            ]
            for key in group_bindings(sg):
                bound[key].extend(sources)
        destinations = policy.destination_by_name
        named: dict[BindingKey, list[tuple[Provenance, NameItem]]] = defaultdict(list)
        for ep in policy.egress_policies:
            dest = destinations.get(ep.destination)
            if dest is None:
                continue
            prov = Provenance("EgressPolicy", ep.name, None, _where(ep.location), dest.name)
            src = Source(prov, dest.as_rule())
            for key in policy_bindings(ep):
                if dest.ips:
                    bound[key].append(src)
                named[key].extend((prov, item) for item in dest.name_items())
        self.named: dict[BindingKey, list[tuple[Provenance, NameItem]]] = dict(named)
        self.modes: dict[tuple[str, str | None], Enforcement] = {
            (e.scope_type, e.scope_id): e for e in policy.enforcements
        }
        self._names: dict[Profile, dict[NameRule, None]] = {}
        # Keys by kind, in the order a container's sources are listed (`bindings_for`).
        self.bound: dict[BindingKey, list[Source]] = dict(
            sorted(bound.items(), key=lambda kv: _KIND_ORDER[kv[0][0]])
        )
        self._build_atoms()

    def _build_atoms(self) -> None:
        bindings = list(self.bound.items())
        expanded: dict[int, tuple[RuleItem, ...]] = {}
        provs: set[Provenance] = set()
        for _, sources in bindings:
            for src in sources:
                if id(src.rule) not in expanded:
                    expanded[id(src.rule)] = src.rule.items()
                provs.add(src.provenance)
        # Numbers follow the sort order, so sorting numbers sorts items and provenances
        # exactly as the plan orders them, at the speed of sorting ints.
        self.items: list[RuleItem] = sorted(
            {i for items in expanded.values() for i in items}, key=_item_order
        )
        number = self.number = {item: n for n, item in enumerate(self.items)}
        self.provenances: list[Provenance] = sorted(provs)
        prov_number = {p: n for n, p in enumerate(self.provenances)}
        self.item_ids = [content_id(i.key()) for i in self.items]
        # CF's lines per item (one per port range), and whether another item could print one
        # of them too (same match but ports): only those need a set to count as CF dedups.
        cf_keys = [cf_rule_keys(i) for i in self.items]
        bases = Counter(keys[0][:4] + keys[0][5:] for keys in cf_keys)
        self.cf_keys = cf_keys
        self.cf_count = [len(keys) for keys in cf_keys]
        self.cf_shared = [bases[keys[0][:4] + keys[0][5:]] > 1 for keys in cf_keys]
        # Per key: which items it grants, and which documents grant each of them.
        self.key_number: dict[BindingKey, int] = {}
        grants: list[dict[int, set[int]]] = []
        for key, sources in bindings:
            k = self.key_number.setdefault(key, len(grants))
            if k == len(grants):
                grants.append({})
            for src in sources:
                p = prov_number[src.provenance]
                for item in expanded[id(src.rule)]:
                    grants[k].setdefault(number[item], set()).add(p)
        self.grants: list[dict[int, frozenset[int]]] = [
            {n: frozenset(ps) for n, ps in g.items()} for g in grants
        ]
        signature: dict[int, list[int]] = defaultdict(list)
        for k, granted in enumerate(self.grants):
            for n in granted:
                signature[n].append(k)
        atoms: dict[tuple[tuple[int, ...], int, bool], list[int]] = defaultdict(list)
        for n in sorted(signature):
            item = self.items[n]
            atoms[(tuple(signature[n]), item.version, item.log)].append(n)
        self.atom_items: list[tuple[int, ...]] = []
        self.atom_keyset: list[frozenset[int]] = []
        self.atom_version: list[int] = []
        self.atom_log: list[bool] = []
        # An atom is *uniform* when every key grants each of its items through the same
        # documents (an ASG bound to many spaces): its provenance then does not depend on
        # which of those keys a cell's containers have, and needs no per-cell work.
        self.atom_uniform: list[tuple[frozenset[int], ...] | None] = []
        self.key_atoms: list[list[int]] = [[] for _ in self.grants]
        for (keys, version, log), numbers in atoms.items():
            a = len(self.atom_items)
            self.atom_items.append(tuple(numbers))
            self.atom_keyset.append(frozenset(keys))
            self.atom_version.append(version)
            self.atom_log.append(log)
            per_item = [{self.grants[k][n] for k in keys} for n in numbers]
            uniform = all(len(p) == 1 for p in per_item)
            self.atom_uniform.append(tuple(p.pop() for p in per_item) if uniform else None)
            for k in keys:
                self.key_atoms[k].append(a)
        self._entries: dict[Profile, _Entry] = {}
        self._shared_entries: dict[tuple[Profile, ...], _Entry] = {}
        self._profile_rules: dict[Profile, ProfileRules] = {}
        self._rules: dict[tuple[int, frozenset[int]], PlanRule] = {}
        self._groups: dict[tuple[tuple[int, frozenset[int] | None], ...], RuleGroup] = {}
        self._atom_rules: dict[tuple[int, frozenset[int] | None], list[tuple[int, PlanRule]]] = {}
        # The group of a part that is one uniform atom, by atom: most parts of most cells.
        self.single_groups: dict[int, RuleGroup] = {}

    def profile_keys(self, profile: Profile) -> frozenset[int]:
        _, lifecycle, space, app = profile
        names = bindings_for(lifecycle, space, app)
        return frozenset(self.key_number[n] for n in names if n in self.key_number)

    def entry(self, profile: Profile) -> _Entry:
        """What a profile gets, computed once per policy object and reused by every cell."""
        cached = self._entries.get(profile)
        if cached is not None:
            return cached
        keys = self.profile_keys(profile)
        atoms = sorted(
            {a for k in keys for a in self.key_atoms[k] if self.atom_version[a] == profile[0]}
        )
        numbers = tuple(sorted(n for a in atoms for n in self.atom_items[a]))
        entry = _Entry(
            keys=keys,
            atoms=tuple(atoms),
            numbers=numbers,
            items=tuple(self.items[n] for n in numbers),
            cf_lines=self._cf_lines(numbers),
        )
        self._entries[profile] = entry
        return entry

    def shared_entry(self, profiles: tuple[Profile, ...]) -> _Entry:
        """What an IP claimed by containers of these profiles gets: what every one gets.

        An atom is held whole or not at all by a profile, so the intersection of the
        profiles' atoms is exactly the intersection of their items.  Provenance is taken
        through all their keys: each document that grants a shared item to some claimant.
        """
        if len(profiles) == 1:
            return self.entry(profiles[0])
        cached = self._shared_entries.get(profiles)
        if cached is not None:
            return cached
        parts = [self.entry(p) for p in profiles]
        atoms = sorted(set(parts[0].atoms).intersection(*(e.atoms for e in parts[1:])))
        numbers = tuple(sorted(n for a in atoms for n in self.atom_items[a]))
        entry = _Entry(
            keys=frozenset().union(*(e.keys for e in parts)),
            atoms=tuple(atoms),
            numbers=numbers,
            items=tuple(self.items[n] for n in numbers),
            cf_lines=self._cf_lines(numbers),
        )
        self._shared_entries[profiles] = entry
        return entry

    def _cf_lines(self, numbers: tuple[int, ...]) -> int:
        """The ASG lines CF writes for these items in one container: their distinct
        `cf_rule_keys`."""
        shared = [n for n in numbers if self.cf_shared[n]]
        alone = sum(self.cf_count[n] for n in numbers if not self.cf_shared[n])
        return alone + len({key for n in shared for key in self.cf_keys[n]})

    def provenance(self, n: int, keys: Iterable[int]) -> frozenset[int]:
        """The documents granting item `n` through any of these keys."""
        out: set[int] = set()
        for k in keys:
            out |= self.grants[k].get(n, frozenset())
        return frozenset(out)

    def profile_rules(self, profile: Profile) -> ProfileRules:
        cached = self._profile_rules.get(profile)
        if cached is None:
            e = self.entry(profile)
            cached = {
                self.items[n]: frozenset(self.provenances[p] for p in self.provenance(n, e.keys))
                for n in e.numbers
            }
            self._profile_rules[profile] = cached
        return cached

    def _plan_rule(self, n: int, provs: frozenset[int]) -> PlanRule:
        key = (n, provs)
        rule = self._rules.get(key)
        if rule is None:
            sources = tuple(self.provenances[p] for p in sorted(provs))
            rule = self._rules[key] = PlanRule(self.item_ids[n], self.items[n], sources)
        return rule

    def group(self, parts: tuple[tuple[int, frozenset[int] | None], ...]) -> RuleGroup:
        """The group of these atoms, each with the keys through which the cell gets it
        (None for a uniform atom, whose provenance is the same through any of its keys)."""
        group = self._groups.get(parts)
        if group is None:
            numbered: list[tuple[int, PlanRule]] = []
            for part in parts:
                numbered.extend(self._part_rules(part))
            # Atoms are disjoint, so no item number repeats: the sort never compares rules.
            numbered.sort(key=_first)
            rules = tuple(rule for _, rule in numbered)
            gid = content_id("\n".join(r.id for r in rules))
            group = self._groups[parts] = RuleGroup(gid, self.atom_version[parts[0][0]], rules)
        return group

    def names(self, profile: Profile) -> dict[NameRule, None]:
        """The name rules a container of this profile gets (ordered, as a dict for `&`):
        what egress policies bound to its keys grant by name, of its family.  ICMP names
        only in their own family (A answers for icmp, AAAA for icmpv6), as for addresses."""
        hit = self._names.get(profile)
        if hit is not None:
            return hit
        version, lifecycle, space, app = profile
        provs: dict[NameItem, set[Provenance]] = defaultdict(set)
        for key in bindings_for(lifecycle, space, app):
            for prov, item in self.named.get(key, ()):
                if {"icmp": 4, "icmpv6": 6}.get(item.protocol, version) == version:
                    provs[item].add(prov)
        out = {
            NameRule(
                content_id(f"name {version} {item.key()}"), version, item, tuple(sorted(p))
            ): None
            for item, p in sorted(provs.items())
        }
        self._names[profile] = out
        return out

    def shared_names(self, profiles: tuple[Profile, ...]) -> tuple[NameRule, ...]:
        """What every claimant of one IP gets by name: never wider than any one of them.
        A grant all claimants have keeps the provenance of each."""
        if len(profiles) == 1:
            return tuple(self.names(profiles[0]))
        per = [{r.item: r for r in self.names(p)} for p in profiles]
        out = []
        for item, rule in per[0].items():
            if all(item in other for other in per[1:]):
                sources = tuple(sorted({s for other in per for s in other[item].sources}))
                out.append(NameRule(rule.id, rule.version, item, sources))
        return tuple(out)

    def _part_rules(self, part: tuple[int, frozenset[int] | None]) -> list[tuple[int, PlanRule]]:
        """An atom's rules (with their item numbers) as granted through these keys (None:
        a uniform atom): the same in every group it is part of, so built once."""
        rules = self._atom_rules.get(part)
        if rules is None:
            a, keys = part
            uniform = self.atom_uniform[a]
            numbered: Iterable[tuple[int, frozenset[int]]]
            if keys is None and uniform is not None:
                numbered = zip(self.atom_items[a], uniform, strict=True)
            else:
                keys = self.atom_keyset[a] if keys is None else keys
                numbered = ((n, self.provenance(n, keys)) for n in self.atom_items[a])
            rules = self._atom_rules[part] = [(n, self._plan_rule(n, p)) for n, p in numbered]
        return rules

    def enforcement(self, space: str, app: str) -> Enforcement | None:
        """The document deciding the mode of a container of this space and app: its app's,
        else its space's, else the one for all; None (enforce) without any."""
        modes = self.modes
        if not modes:
            return None
        return (
            (modes.get(("app", app)) if app else None)
            or (modes.get(("space", space)) if space else None)
            or modes.get(("all", None))
        )

    def audited(self, profiles: tuple[Profile, ...]) -> bool:
        """Whether an IP claimed by containers of these profiles is audited: only when every
        claimant is, as its rules are what every claimant gets."""
        for _, _, space, app in profiles:
            decided = self.enforcement(space, app)
            if decided is None or not decided.audit:
                return False
        return True

    def sources(self, lifecycle: str, space_id: str, app_id: str) -> list[Source]:
        return [
            src
            for key in bindings_for(lifecycle, space_id, app_id)
            for src in self.bound.get(key, ())
        ]


def _first(pair: tuple[int, PlanRule]) -> int:
    return pair[0]


def _where(location: object) -> str:
    short = getattr(location, "short", None)
    return short if isinstance(short, str) else ""


# PolicySet is immutable, so its index can be kept for as long as the object lives.  Keyed by
# identity (hashing a whole policy set would cost more than the index saves), with a weak
# reference to tell a live entry from a recycled id.
_INDEXES: dict[int, tuple[weakref.ref[PolicySet], _Index]] = {}


def _index_for(policy: PolicySet) -> _Index:
    hit = _INDEXES.get(id(policy))
    if hit is not None and hit[0]() is policy:
        return hit[1]
    index = _Index(policy)
    key = id(policy)
    _INDEXES[key] = (weakref.ref(policy, lambda _ref: _INDEXES.pop(key, None)), index)
    return index


def prepare(policy: PolicySet, containers: Iterable[Container]) -> None:
    """Index `policy` and work out what each of these containers' profiles gets, now.

    Both are memoised per policy object: a caller about to fork workers that all compile
    with one policy (the head of a plan against several bases) builds them once, and every
    worker inherits them instead of building its own copy.
    """
    index = _index_for(policy)
    for profile in {profile_of(c) for c in containers}:
        index.entry(profile)


def profile_rules(policy: PolicySet, profile: Profile) -> ProfileRules:
    """The rule items a container of this profile gets, each with the documents granting it.

    Memoised per policy object: the CI plan diffs the same profiles across a whole fleet.
    """
    return _index_for(policy).profile_rules(profile)


def profile_signature(policy: PolicySet, profile: Profile) -> tuple[RuleItem, ...]:
    """The rule items a profile gets, in plan order.

    Equal signatures at two revisions mean equal chains for every container of the profile,
    which lets the CI plan skip cells that no change touches.  They are the items themselves,
    not their ids: a rule whose id collides with another's is still a different rule.
    """
    return _index_for(policy).entry(profile).items


def signature_comparer(base: PolicySet, head: PolicySet) -> Callable[[Profile], bool]:
    """`profile_signature(base, p) == profile_signature(head, p)`, for any profile `p`.

    The CI plan asks this of every profile of a fleet.  Comparing the items themselves
    compares two policies' separate (equal) objects field by field; here each head item's
    number in the base (-1 when the base has no equal item) is found once, and a profile's
    signatures are equal exactly when its head numbers map onto its base numbers.
    """
    b, h = _index_for(base), _index_for(head)
    to_base = [b.number.get(item, -1) for item in h.items]

    def same(profile: Profile) -> bool:
        mine, theirs = h.entry(profile).numbers, b.entry(profile).numbers
        return len(mine) == len(theirs) and tuple(map(to_base.__getitem__, mine)) == theirs

    return same


def container_sources(policy: PolicySet, container: Container) -> list[Source]:
    """Every rule the container gets and who grants it (used by `explain` and policy tests)."""
    return _index_for(policy).sources(container.lifecycle, container.space_id, container.app_id)


def profile_names(policy: PolicySet, profile: Profile) -> dict[NameItem, frozenset[Provenance]]:
    """The grants by name a container of this profile gets, with the documents granting
    them (the plan diff compares them per principal, as `profile_rules` for addresses)."""
    return {r.item: frozenset(r.sources) for r in _index_for(policy).names(profile)}


def enforcement_for(policy: PolicySet, space_id: str, app_id: str) -> Enforcement | None:
    """The Enforcement document that decides the mode of a container of this space and app
    (None: enforce, no document); `explain` and the plan diff name it."""
    return _index_for(policy).enforcement(space_id, app_id)


def profile_audit(policy: PolicySet, profile: Profile) -> bool:
    """Whether containers of this profile are in audit mode (the plan diff compares it per
    principal, as access)."""
    return _index_for(policy).audited((profile,))


def container_name_sources(policy: PolicySet, container: Container) -> frozenset[Provenance]:
    """The egress policies that grant names to the container (used by `explain`)."""
    index = _index_for(policy)
    keys = bindings_for(container.lifecycle, container.space_id, container.app_id)
    return frozenset(prov for key in keys for prov, _ in index.named.get(key, ()))


def compile_cell(
    policy: PolicySet,
    containers: Iterable[Container],
    cell: str = "",
    settings: CellSettings | None = None,
) -> CellPlan:
    """The plan for one cell; same input, same plan, byte for byte.

    `settings` are the cell's own (underlay, deny networks, connection limit): carried into
    the plan untouched, so the render sees them and the plan shows them.

    Raises PlanError when two different groups or containers would get one chain name (a
    hash collision, see `plan._check_names`): nothing is better than a shared chain.
    """
    index = _index_for(policy)
    containers = sorted(containers)
    of = [profile_of(c) for c in containers]
    # The unit compiled is an IP's profiles: one for most, every claimant's for a shared IP.
    slots_of = _ip_profiles(containers, of)
    profiles = sorted(set(slots_of))
    position = {p: i for i, p in enumerate(profiles)}
    entries = [index.shared_entry(p) for p in profiles]

    # Partition the cell's rules by the exact set of profiles that get them.  Every item of
    # an atom has the same holders, so the partition is computed over atoms.
    holders: dict[int, list[int]] = {}
    for i, entry in enumerate(entries):
        for a in entry.atoms:
            held = holders.get(a)
            if held is None:
                holders[a] = [i]
            else:
                held.append(i)
    # Logging rules get groups of their own, which containers jump to first, so a log rule
    # sees every packet it matches before any silent accept of the same traffic can take it.
    parts: dict[tuple[tuple[int, ...], bool], list[int]] = defaultdict(list)
    for a, held in holders.items():
        parts[(tuple(held), index.atom_log[a])].append(a)

    groups: list[RuleGroup] = []
    groups_of: list[list[tuple[bool, str]]] = [[] for _ in profiles]
    single = index.single_groups
    for (owners, log), atoms in parts.items():
        if len(atoms) == 1 and atoms[0] in single:  # the common part: one uniform atom
            group = single[atoms[0]]
            groups.append(group)
            key = (not log, group.id)
            for i in owners:
                groups_of[i].append(key)
            continue
        # A rule's provenance is every document granting it to some container of the cell:
        # the atom's keys that at least one owner has.
        union: frozenset[int] | None = None
        keyed: list[tuple[int, frozenset[int] | None]] = []
        for a in sorted(atoms):
            if index.atom_uniform[a] is not None:
                keyed.append((a, None))
                continue
            keys = index.atom_keyset[a]
            if len(keys) > 1:  # granted through several keys: keep those the owners have
                if union is None:
                    union = frozenset().union(*(entries[i].keys for i in owners))
                keys = keys & union
            keyed.append((a, keys))
        group = index.group(tuple(keyed))
        if len(keyed) == 1 and keyed[0][1] is None:
            single[keyed[0][0]] = group
        groups.append(group)
        key = (not log, group.id)  # a part's rules all log or none do: this is has_log
        for i in owners:
            groups_of[i].append(key)
    chain_groups = [tuple(gid for _, gid in sorted(mine)) for mine in groups_of]

    slots = [position[p] for p in slots_of]
    names_of = [index.shared_names(p) for p in profiles] if index.named else []
    audit_of = [index.audited(p) for p in profiles] if index.modes else []
    # One rule per grant in the cell; its provenance is every document granting it to some
    # container here (as a group rule's is).
    merged: dict[str, NameRule] = {}
    for rules in names_of:
        for r in rules:
            seen = merged.get(r.id)
            if seen is None:
                merged[r.id] = r
            elif not set(r.sources) <= set(seen.sources):
                sources = tuple(sorted(set(seen.sources) | set(r.sources)))
                merged[r.id] = NameRule(r.id, r.version, r.item, sources)
    container_plans = tuple(
        ContainerPlan(
            c,
            _chain_id(c.handle),
            chain_groups[i],
            tuple(r.id for r in names_of[i]) if names_of else (),
            audit_of[i] if audit_of else False,
        )
        for c, i in zip(containers, slots, strict=True)
    )
    return CellPlan(
        cell=cell,
        containers=container_plans,
        groups=tuple(sorted(groups, key=lambda g: g.id)),
        # CF installs every claimant's own rules in its own chain: counted per container.
        cf_equivalent_rules=_cf_lines(index, of),
        settings=settings or CellSettings(),
        names=tuple(merged[k] for k in sorted(merged)),
    )


def _ip_profiles(containers: list[Container], of: list[Profile]) -> list[tuple[Profile, ...]]:
    """Per container, the distinct profiles of every container claiming its IP, sorted."""
    by_ip: dict[str, set[Profile]] = defaultdict(set)
    for c, p in zip(containers, of, strict=True):
        by_ip[c.ip].add(p)
    shared = {ip: tuple(sorted(ps)) for ip, ps in by_ip.items()}
    return [shared[c.ip] for c in containers]


def cf_equivalent_rules(policy: PolicySet, containers: Iterable[Container]) -> int:
    """What CF's layout would install here: every rule of every ASG again, per container.

    Counted as silk's vxlan-policy-agent writes it (`iptables/cflayout.py` renders it, and its
    tests hold the two equal): one rule per destination and port range, repeats within a
    container dropped, plus CF_CONTAINER_FIXED_LINES.  Its own function so the CI plan can
    count a cell it does not need to compile.
    """
    return _cf_lines(_index_for(policy), [profile_of(c) for c in containers])


def _cf_lines(index: _Index, profiles: Iterable[Profile]) -> int:
    """CF's lines for containers of these profiles: each profile's lines, once per container
    (looked up once per distinct profile: a cell runs many containers of one app)."""
    return sum(
        n * (CF_CONTAINER_FIXED_LINES + index.entry(p).cf_lines)
        for p, n in Counter(profiles).items()
    )
