"""Remember the last few rendered rulesets, so a steady agent does not render every cycle.

A converge cycle renders the plan and the last plan applied, for both families; an idle agent
passes the same plan as both, cycle after cycle.  At 500k CF-equivalent rules a render takes
tens of milliseconds of Python, more than the rest of a no-op cycle, so a backend keeps its
recent renders.  The key is the plan's digest, which names every container (address, chain)
and every group by content hash: equal digests render to equal rulesets, whichever compile
produced the plan object.

A plan it has not seen (the next revision) is rendered in part: a group chain is named by the
hash of its rules and holds nothing else, so the chains of groups already rendered are reused
and only new groups, the container chains and the dispatch chain are rendered.  After a
one-ASG change that is one group and a few hundred short lines, not the whole cell.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from reconciler.plan import CellPlan
from reconciler.render.iptables import GROUP_PREFIX, Ruleset, group_chain


class RenderCache:
    """The `size` most recently used renders, by (plan digest, family)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int], Ruleset] = OrderedDict()

    def get(
        self, plan: CellPlan, family: int, render: Callable[[CellPlan, int], Ruleset]
    ) -> Ruleset:
        key = (plan.digest(), family)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        ruleset = self._render_new_groups(plan, family, render)
        self._entries[key] = ruleset
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return ruleset

    def _render_new_groups(
        self, plan: CellPlan, family: int, render: Callable[[CellPlan, int], Ruleset]
    ) -> Ruleset:
        known = {
            name: rules
            for (_, fam), ruleset in self._entries.items()
            if fam == family
            for name, rules in ruleset.chains.items()
            if name.startswith(GROUP_PREFIX)
        }
        if not known:
            return render(plan, family)
        mine = [g for g in plan.groups if g.version == family]
        new = tuple(g for g in mine if group_chain(g.id) not in known)
        partial = render(replace(plan, groups=new), family)
        if not partial.chains:  # no container of this family: nothing jumps to any group
            return partial
        chains = dict(partial.chains)
        for g in mine:
            chains.setdefault(group_chain(g.id), known.get(group_chain(g.id), ()))
        return Ruleset(family, chains, partial.hooks)
