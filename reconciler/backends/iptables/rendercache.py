"""Remember the last few rendered rulesets, so a steady agent does not render every cycle.

A converge cycle renders the plan and the last plan applied, for both families; an idle agent
passes the same plan as both, cycle after cycle.  At 500k CF-equivalent rules a render takes
tens of milliseconds of Python, more than the rest of a no-op cycle, so a backend keeps its
recent renders.  The key is the plan's digest, which names every container (address, chain)
and every group by the full SHA-256 of its content: equal digests render to equal rulesets,
whichever compile produced the plan object.

A plan it has not seen (the next revision) is rendered in part: a group chain renders from
the group alone, so the chains of groups already rendered (same content digest, not merely
same id or chain name) are reused and only new groups, the container chains and the
dispatch chain are rendered.  After a one-ASG change that is one group and a few hundred
short lines, not the whole cell.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from reconciler.backends.iptables.render import Ruleset, group_chain
from reconciler.core.cellplan import CellPlan, FlowLog


class RenderCache:
    """The `size` most recently used renders, by (plan digest, family), each with the
    content digests of the groups whose chains it holds."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int, FlowLog], tuple[Ruleset, dict[str, str]]] = (
            OrderedDict()
        )

    def get(
        self, plan: CellPlan, family: int, render: Callable[[CellPlan, int], Ruleset]
    ) -> Ruleset:
        key = (plan.digest(), family, plan.settings.flow_log)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0]
        ruleset = self._render_new_groups(plan, family, render)
        names = {g.digest: group_chain(g.id) for g in plan.groups if g.version == family}
        self._entries[key] = (ruleset, names)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return ruleset

    def _render_new_groups(
        self, plan: CellPlan, family: int, render: Callable[[CellPlan, int], Ruleset]
    ) -> Ruleset:
        flow = plan.settings.flow_log  # a logging group's chain renders its log target
        known = {
            digest: ruleset.chains[name]
            for (_, fam, fl), (ruleset, names) in self._entries.items()
            if fam == family and fl == flow
            for digest, name in names.items()
            if name in ruleset.chains
        }
        if not known:
            return render(plan, family)
        mine = [g for g in plan.groups if g.version == family]
        new = tuple(g for g in mine if g.digest not in known)
        partial = render(replace(plan, groups=new), family)
        if not partial.chains:  # no container of this family: nothing jumps to any group
            return partial
        chains = dict(partial.chains)
        for g in mine:
            if g.digest in known:
                chains[group_chain(g.id)] = known[g.digest]
        return Ruleset(family, chains, partial.hooks)
