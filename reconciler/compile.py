"""Compile a policy set and a cell's inventory into that cell's Plan (pure, deterministic).

Cloud Foundry semantics, as the vxlan-policy-agent applies them:

* `staging` containers get the ASGs bound to their space for staging plus the global staging
  defaults; `app` and `task` containers get the running ones.
* Egress policies add their destination to containers whose app (type app), space (type
  space) or any app (type default) matches, when `app_lifecycle` is `all` or equals the
  container's lifecycle.
* A container without a space (CF writes none for some system containers) gets only what does
  not need one: the global defaults, `default` egress policies and policies for its app GUID.
* Rules only allow; everything else is rejected.

Where CF installs every rule of every ASG again for every container, the plan installs each
distinct rule once per cell: rules are partitioned by the exact set of container profiles
that get them, each part becomes one shared group chain, and each container jumps to the
groups of its profile.  A rule two ASGs both contain is therefore installed once.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.model import Container, PolicySet, Rule, RuleItem
from reconciler.plan import (
    CF_CONTAINER_FIXED_LINES,
    CellPlan,
    ContainerPlan,
    PlanRule,
    Provenance,
    RuleGroup,
    content_id,
    item_lines,
)

Profile = tuple[int, str, str, str]  # (IP version, lifecycle, space GUID, app GUID)
ProfileRules = Mapping[RuleItem, frozenset[Provenance]]


@dataclass(frozen=True, slots=True)
class Source:
    """A rule a container gets, with the document that grants it."""

    provenance: Provenance
    rule: Rule


def profile_of(container: Container) -> Profile:
    """Everything that decides which rules a container gets; equal profiles, equal rules."""
    return (container.version, container.lifecycle, container.space_id, container.app_id)


class _Index:
    """Bindings indexed once per compile, so each profile's sources are found without scans."""

    def __init__(self, policy: PolicySet):
        self.global_groups: dict[str, list[Source]] = defaultdict(list)
        self.space_groups: dict[tuple[str, str], list[Source]] = defaultdict(list)
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
            if sg.running_default:
                self.global_groups["running"].extend(sources)
            if sg.staging_default:
                self.global_groups["staging"].extend(sources)
            for space in sg.running_spaces:
                self.space_groups[("running", space)].extend(sources)
            for space in sg.staging_spaces:
                self.space_groups[("staging", space)].extend(sources)
        self.default_policies: dict[str, list[Source]] = defaultdict(list)
        self.app_policies: dict[tuple[str, str], list[Source]] = defaultdict(list)
        self.space_policies: dict[tuple[str, str], list[Source]] = defaultdict(list)
        destinations = policy.destination_by_name
        for ep in policy.egress_policies:
            dest = destinations.get(ep.destination)
            if dest is None:
                continue
            src = Source(
                Provenance("EgressPolicy", ep.name, None, _where(ep.location), dest.name),
                dest.as_rule(),
            )
            for lifecycle in ("running", "staging"):
                if not ep.applies_to(lifecycle):
                    continue
                if ep.source_type == "default":
                    self.default_policies[lifecycle].append(src)
                elif ep.source_type == "app" and ep.source_id:
                    self.app_policies[(lifecycle, ep.source_id)].append(src)
                elif ep.source_type == "space" and ep.source_id:
                    self.space_policies[(lifecycle, ep.source_id)].append(src)

        # What each profile gets, computed once per policy object: a fleet-wide plan (CI) or a
        # cell with many containers of one app compiles each distinct profile only once.
        self._profiles: dict[Profile, ProfileRules] = {}
        self._item_cache: dict[int, tuple[RuleItem, ...]] = {}
        self.rule_ids: dict[RuleItem, str] = {}

    def profile_rules(self, profile: Profile) -> ProfileRules:
        cached = self._profiles.get(profile)
        if cached is not None:
            return cached
        items: dict[RuleItem, set[Provenance]] = {}
        for src in self.sources(profile[1], profile[2], profile[3]):
            key = id(src.rule)
            expanded = self._item_cache.get(key)
            if expanded is None:
                expanded = self._item_cache[key] = src.rule.items()
            for item in expanded:
                if item.version == profile[0]:
                    items.setdefault(item, set()).add(src.provenance)
        out = {item: frozenset(prov) for item, prov in items.items()}
        self._profiles[profile] = out
        return out

    def rule_id(self, item: RuleItem) -> str:
        rid = self.rule_ids.get(item)
        if rid is None:
            rid = self.rule_ids[item] = content_id(item.key())
        return rid

    def sources(self, lifecycle: str, space_id: str, app_id: str) -> list[Source]:
        out = list(self.global_groups.get(lifecycle, ()))
        out.extend(self.default_policies.get(lifecycle, ()))
        if space_id:
            out.extend(self.space_groups.get((lifecycle, space_id), ()))
            out.extend(self.space_policies.get((lifecycle, space_id), ()))
        if app_id:
            out.extend(self.app_policies.get((lifecycle, app_id), ()))
        return out


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


def profile_rules(policy: PolicySet, profile: Profile) -> ProfileRules:
    """The rule items a container of this profile gets, each with the documents granting it.

    Memoised per policy object: the CI plan diffs the same profiles across a whole fleet.
    """
    return _index_for(policy).profile_rules(profile)


def container_sources(policy: PolicySet, container: Container) -> list[Source]:
    """Every rule the container gets and who grants it (used by `explain` and policy tests)."""
    return _index_for(policy).sources(container.lifecycle, container.space_id, container.app_id)


def compile_cell(policy: PolicySet, containers: Iterable[Container], cell: str = "") -> CellPlan:
    """The plan for one cell; same input, same plan, byte for byte."""
    index = _index_for(policy)
    containers = sorted(containers)
    profiles: dict[Profile, ProfileRules] = {}
    for c in containers:
        profile = profile_of(c)
        if profile not in profiles:
            profiles[profile] = index.profile_rules(profile)

    # Partition the distinct items by the exact set of profiles that get them.
    holders: dict[RuleItem, list[Profile]] = defaultdict(list)
    provenance: dict[RuleItem, set[Provenance]] = defaultdict(set)
    for profile in sorted(profiles):
        for item, prov in profiles[profile].items():
            holders[item].append(profile)
            provenance[item] |= prov
    # Logging rules get groups of their own, which containers jump to first, so a log rule
    # sees every packet it matches before any silent accept of the same traffic can take it.
    parts: dict[tuple[tuple[Profile, ...], bool], list[RuleItem]] = defaultdict(list)
    for item, owners in holders.items():
        parts[(tuple(owners), item.log)].append(item)

    groups: list[RuleGroup] = []
    groups_of: dict[Profile, list[RuleGroup]] = defaultdict(list)
    for (owners, _), items in parts.items():
        rules = tuple(
            PlanRule(index.rule_id(item), item, tuple(sorted(provenance[item])))
            for item in sorted(items)
        )
        group = RuleGroup(content_id("\n".join(r.id for r in rules)), items[0].version, rules)
        groups.append(group)
        for profile in owners:
            groups_of[profile].append(group)

    container_plans = []
    for c in containers:
        mine = groups_of.get(profile_of(c), [])
        ordered = sorted(mine, key=lambda g: (not g.has_log, g.id))
        container_plans.append(
            ContainerPlan(c, content_id("container " + c.handle), tuple(g.id for g in ordered))
        )
    return CellPlan(
        cell=cell,
        containers=tuple(container_plans),
        groups=tuple(sorted(groups, key=lambda g: g.id)),
        cf_equivalent_rules=cf_equivalent_rules(policy, containers),
    )


def cf_equivalent_rules(policy: PolicySet, containers: Iterable[Container]) -> int:
    """What CF's layout would install here: every rule of every ASG again, per container.

    Its own function so the CI plan can count a cell it does not need to compile.
    """
    index = _index_for(policy)
    per_profile: dict[Profile, int] = {}
    total = 0
    for c in containers:
        profile = profile_of(c)
        lines = per_profile.get(profile)
        if lines is None:
            lines = per_profile[profile] = sum(item_lines(i) for i in index.profile_rules(profile))
        total += CF_CONTAINER_FIXED_LINES + lines
    return total
