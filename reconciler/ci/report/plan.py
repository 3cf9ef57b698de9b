"""A plan as people read it: a PR comment (markdown), a terminal (text), or tools (JSON).

The shape is the one Terraform and Atlantis users already know: the summary line first
("Plan: 3 cells change, 41 containers gain access, 2 lose access; +120 -8 rules"), "No
changes." when there are none, a legend only for the actions present, a reason on every
removal, and long output folded into `<details>` with `diff` fences.  The markdown carries a
hidden marker so CI edits one sticky comment instead of adding one per push, and stays under
GitHub's comment limit by cutting details (never the summary) and saying what it cut.

Templates only lay out: every string from a policy, a directory, a file name or a git ref is
escaped for its destination (`escape.md`, `escape.visible`) here, before a template sees it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import jinja2

from reconciler.core.diff import (
    AccessChange,
    CellDiff,
    ChainDiff,
    PlanDiff,
    PrincipalDiff,
    PrincipalFacts,
)
from reconciler.core.gate import percent
from reconciler.escape import fence, log_text, md, visible
from reconciler.policy.findings import Finding

MARKER = "<!-- asgctl-plan -->"
COMMENT_LIMIT = 65_000  # GitHub allows 65,536; the rest is headroom for the CI's own words
Status = Literal["changes", "no-changes", "error"]


@dataclass(frozen=True, slots=True)
class Revision:
    """A revision as the user named it and the commit it resolved to."""

    name: str
    sha: str = ""

    @property
    def short(self) -> str:
        return self.sha[:7]


Enforces = Literal["revision", "nothing", "unknown"]


@dataclass(frozen=True)
class BaseGroup:
    """Cells planned against the same base by a plan against the truth (`plan --head` alone).

    `enforces` is what their status branches say, once checked against the repository: one
    revision (`revision`, with its commit subject), `nothing` (no revision applied yet), or
    `unknown` (no status branch, or one whose revision failed a check; the warnings say
    which).  `against` is what the head was compared with: the same revision, or for
    `unknown` the revision most cells enforce; an empty sha means an empty policy.
    """

    enforces: Enforces
    revision: Revision
    against: Revision
    cells: tuple[str, ...]
    diff: PlanDiff
    subject: str = ""


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A cell of the inventory that is not planned, and why (its status document could not
    be used): one of a report's warnings, and a partial's own until the merge."""

    cell: str
    message: str


@dataclass(frozen=True, slots=True)
class PartFacts:
    """A partial's principal facts for one diff (a group's, or the plan's one diff), and
    the revision the merge diffs the principals against (`""`: an empty policy)."""

    against: str
    facts: PrincipalFacts


@dataclass(frozen=True)
class ShardScope:
    """What a partial report (`asgctl plan --shard I/N`) covers: shard `index` of `count`
    of the inventory whose cells, in plan order, are `fleet` (empty when the plan failed
    before reading it), identified by `identity` (a digest of every cell's status blob or
    containers, so partials planned from two different reads never merge).

    A partial's diffs hold its cells and no principals: a principal runs on cells of every
    shard, so each partial gives its cells' `facts` (one per diff, in order) and the merge
    diffs every principal from their sum.  `left_out` are the shard's cells that could not
    be used (the merge puts every shard's into the warnings, in fleet order)."""

    index: int
    count: int
    fleet: tuple[str, ...] = ()
    identity: str = ""
    left_out: tuple[LeftOut, ...] = ()
    facts: tuple[PartFacts, ...] = ()


@dataclass(frozen=True)
class PlanReport:
    """Everything a plan presentation needs; built by `reconciler.ci.plan`, pure from here on.

    `groups` is set by a plan against the truth: `diff` then holds every group's cells and
    principals together (for the totals), and each group's own diff is shown under it.
    `notes` say how the comparison relates to what the cells enforce, ahead of the warnings.
    """

    base: Revision
    head: Revision
    policies: str  # the policy folder inside the repo, e.g. "policies"
    inventory: str  # where the cells' containers came from
    diff: PlanDiff | None = None
    head_findings: tuple[Finding, ...] = ()
    base_findings: tuple[Finding, ...] = ()
    error: str = ""  # a failure that is not a finding (bad revision, unreadable inventory)
    location_prefix: str = ""
    warnings: tuple[str, ...] = field(default=())
    gate_settings: str = ""  # where the mass-revoke settings came from (ci.plan.gate_origin)
    groups: tuple[BaseGroup, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())
    shard: ShardScope | None = None
    """Set on a partial: `diff` and `groups` then hold only the shard's cells and principals
    (`ci.partial` merges the partials into the report of the whole inventory)."""

    @property
    def truth(self) -> bool:
        """Planned against what each cell enforces (no --base)."""
        return bool(self.groups)

    @property
    def head_errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.head_findings if f.severity == "error")

    @property
    def status(self) -> Status:
        if self.error or self.head_errors or self.diff is None or self.diff.errors:
            return "error"
        return "changes" if self.diff.has_changes else "no-changes"

    def exit_code(self, detailed: bool) -> int:
        """Terraform's `-detailed-exitcode`: 0 no changes, 2 changes, 1 error."""
        status = self.status
        if status == "error":
            return 1
        return 2 if detailed and status == "changes" else 0


# ----------------------------------------------------------------------------- words


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count:,} {one if count == 1 else (many or one + 's')}"


def summary_line(diff: PlanDiff) -> str:
    """The one line a reviewer reads first; the same in every format."""
    if not diff.has_changes:
        return "No changes. Every cell would enforce exactly what it enforces at the base."
    cells = len(diff.changed_cells)
    gain, lose = diff.containers_gaining, diff.containers_losing
    return (
        f"Plan: {_n(cells, 'cell')} {'changes' if cells == 1 else 'change'}, "
        f"{_n(gain, 'container')} {'gains' if gain == 1 else 'gain'} access, "
        f"{lose:,} {'loses' if lose == 1 else 'lose'} access; "
        f"+{diff.rules_added:,} -{diff.rules_removed:,} rules"
    )


def group_title(g: BaseGroup, esc: Callable[[str], str]) -> str:
    """`2 cells enforce 1a2b3c4d5e6f (subject)`: the group's heading, the same in every format."""
    n = len(g.cells)
    verb = "enforces" if n == 1 else "enforce"
    if g.enforces == "revision":
        subject = f" ({esc(g.subject)})" if g.subject else ""
        return f"{_n(n, 'cell')} {verb} {g.revision.sha[:12]}{subject}"
    if g.enforces == "nothing":
        return f"{_n(n, 'cell')} {verb} nothing yet (no revision applied)"
    return f"{_n(n, 'cell')}: what {'it enforces' if n == 1 else 'they enforce'} is unknown"


def group_against(g: BaseGroup) -> str:
    """What the head was compared with for this group, and why."""
    if g.enforces == "revision":
        return "that revision"
    if g.enforces == "nothing":
        return "an empty policy (what they enforce)"
    if g.against.sha:
        return f"{g.against.sha[:12]}, the revision most cells enforce"
    return "an empty policy: no cell's revision is known, so no loss can be shown"


def _group_counts(g: BaseGroup) -> dict[str, str]:
    d = g.diff
    changed, gain, lose = len(d.changed_cells), d.containers_gaining, d.containers_losing
    rules = f"+{d.rules_added:,} -{d.rules_removed:,}"
    return {
        "changed": f"{changed:,}",
        "gain": f"{gain:,}",
        "lose": f"{lose:,}",
        "rules": rules,
        "summary": (
            f"{_n(changed, 'cell')} {'changes' if changed == 1 else 'change'}, "
            f"{_n(gain, 'container')} {'gains' if gain == 1 else 'gain'} access, "
            f"{lose:,} {'loses' if lose == 1 else 'lose'} access; rules {rules}"
        ),
    }


def _access_sign(kind: str) -> str:
    return {"gained": "+", "lost": "-", "logging": "~"}[kind]


def _access_entries(p: PrincipalDiff) -> list[tuple[str, AccessChange]]:
    """Losses first: a policy that validates clean can still revoke everyone."""
    out = [("lost", c) for c in p.lost]
    out += [("gained", c) for c in p.gained]
    out += [("logging", c) for c in p.logging]
    return out


def _principal_title(p: PrincipalDiff) -> str:
    """The principal's name, or its GUID and why the Directory's name is not trusted."""
    what = {"app": "", "space": " (space, no app)", "none": ""}[p.kind]
    if p.name_mismatch:
        what += f" [name unverified: {p.name_mismatch}]"
    return f"{p.name}{what}"


def _principal_counts(p: PrincipalDiff) -> str:
    parts = []
    if p.gained:
        parts.append(f"+{len(p.gained)}")
    if p.lost:
        parts.append(f"-{len(p.lost)}")
    if p.logging:
        parts.append(f"~{len(p.logging)}")
    return " ".join(parts)


def _where(p: PrincipalDiff) -> str:
    return f"{_n(p.containers, 'container')} on {_n(p.cells, 'cell')}"


def _chain_counts(c: CellDiff) -> str:
    actions = {"create": "+", "update": "~", "delete": "-"}
    parts = []
    for action, sign in actions.items():
        k = sum(1 for ch in c.chains if ch.action == action)
        if k:
            parts.append(f"{sign}{k}")
    return " ".join(parts)


def _counts(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "unchanged"
    if before == after:
        return f"{after:,}"
    return f"{before:,} → {after:,}"


def _family(ch: ChainDiff) -> str:
    return "IPv4" if ch.family == 4 else "IPv6"


def _chain_lines(c: CellDiff) -> list[str]:
    """The cell's dataplane diff; only hex ids and addresses, but escaped all the same."""
    lines: list[str] = []
    for ch in c.chains:
        lines.append(f"@@ {ch.chain} ({_family(ch)}): {ch.action} @@")
        lines.extend(visible(x) for x in ch.lines)
    return lines


def _legends(diff: PlanDiff) -> tuple[str, str]:
    access = []
    if any(p.gained for p in diff.principals):
        access.append("+ gains access")
    if any(p.lost for p in diff.principals):
        access.append("- loses access")
    if any(p.logging for p in diff.principals):
        access.append("~ logging changes")
    actions = {ch.action for c in diff.cells for ch in c.chains}
    chains = [
        text
        for action, text in (
            ("create", "+ create"),
            ("update", "~ update in place"),
            ("delete", "- destroy"),
        )
        if action in actions
    ]
    return ", ".join(access), ", ".join(chains)


def _finding_lines(findings: tuple[Finding, ...], prefix: str) -> list[str]:
    return [visible(prefix + str(f)) for f in sorted(findings)]


def _revision_text(rev: Revision, esc: Callable[[str], str]) -> str:
    if rev.short and rev.name != rev.sha and not rev.sha.startswith(rev.name):
        return f"{esc(rev.name)} ({rev.short})"
    return rev.short or esc(rev.name)


MAX_GATED = 30  # cells listed by name in the markdown gate section before "and N more"


def _gate_rows(diff: PlanDiff | None, esc: Callable[[str], str]) -> list[dict[str, str]]:
    """One row per cell whose agent would refuse the change: the numbers, why, the trailer."""
    rows = []
    for c in diff.gated_cells if diff is not None else ():
        v = c.gate
        assert v is not None  # gated_cells holds only cells with a verdict
        n, s = v.count, v.settings
        why = (
            f"all access goes to nothing ({percent(n.share)} > {percent(s.threshold)})"
            if v.rule == "to-nothing"
            else f"{percent(n.share)} > {percent(s.threshold)} and {n.net_lost:,} >= {s.minimum:,}"
        )
        rows.append(
            {
                "cell": esc(c.cell),
                "lost": f"{n.net_lost:,} / {n.total:,}",
                "why": why,
                "override": esc(v.override),
                "reason": esc(v.reason),
            }
        )
    return rows


def _gate_context(report: PlanReport, esc: Callable[[str], str]) -> dict[str, Any]:
    rows = _gate_rows(report.diff, esc)
    trailers = sorted({r["override"] for r in rows})
    return {
        "gated": rows,
        "gated_more": 0,
        "gated_count": _n(len(rows), "cell"),
        "gated_trailers": trailers,
        "gate_settings": esc(report.gate_settings or "the agent's defaults"),
    }


# ----------------------------------------------------------------------------- templates


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("reconciler.ci.report", "templates"),
        autoescape=False,  # markdown is not HTML; strings arrive escaped by this module
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


@dataclass(frozen=True)
class _AccessView:
    title: str
    lifecycle: str
    counts: str
    where: str
    body: str  # the fenced diff, ready to place


@dataclass(frozen=True)
class _CellView:
    name: str
    containers: str
    rechained: str
    chains: str
    rules: str
    installed: str
    cf: str
    body: str


def _access_lines(p: PrincipalDiff, esc: Callable[[str], str]) -> list[str]:
    lines = []
    for kind, change in _access_entries(p):
        text = f"{_access_sign(kind)} {change.access}"
        if change.detail:
            text += f" {change.detail}"
        reasons = "; ".join(change.reasons)
        lines.append(f"{text}    # {esc(reasons)}" if reasons else text)
    return lines


def _access_view_md(p: PrincipalDiff) -> _AccessView:
    body = fence("\n".join(_access_lines(p, visible)), "diff")
    return _AccessView(md(_principal_title(p)), p.lifecycle, _principal_counts(p), _where(p), body)


MAX_NAMES = 60  # principals named in one shared block before "and N more"


def _same_change(p: PrincipalDiff) -> tuple[Any, ...]:
    """What a principal gains, loses and re-logs, and why: equal for a shared change."""
    return tuple((kind, c.access, c.detail, c.reasons) for kind, c in _access_entries(p))


def _access_groups(principals: list[PrincipalDiff]) -> list[list[PrincipalDiff]]:
    """Principals with exactly the same change, together: one ASG edit reaching 900 apps is
    one block naming them, not 900 identical blocks (which no comment could hold)."""
    groups: dict[tuple[Any, ...], list[PrincipalDiff]] = {}
    for p in principals:
        groups.setdefault(_same_change(p), []).append(p)
    return list(groups.values())


def _group_view_md(members: list[PrincipalDiff]) -> _AccessView:
    if len(members) == 1:
        return _access_view_md(members[0])
    first = members[0]
    names = [md(f"{_principal_title(p)} ({p.lifecycle})") for p in members]
    shown = ", ".join(names[:MAX_NAMES])
    if len(names) > MAX_NAMES:
        shown += f" and {len(names) - MAX_NAMES:,} more"
    body = f"{shown}\n\n" + fence("\n".join(_access_lines(first, visible)), "diff")
    # Containers the change reaches (a principal's other-family containers may not be).
    containers = sum(
        max(p.containers_gaining, p.containers_losing) or p.containers for p in members
    )
    lifecycles = sorted({p.lifecycle for p in members})
    return _AccessView(
        f"{len(members):,} principals, the same change",
        " and ".join(lifecycles),
        _principal_counts(first),
        f"{_n(containers, 'container')}",
        body,
    )


def _cell_view_md(c: CellDiff, body: bool = True) -> _CellView:
    return _CellView(
        name=md(c.cell),
        containers=f"{c.containers:,}",
        rechained=f"{c.containers_rechained:,}",
        chains=_chain_counts(c),
        rules=f"+{c.rules_added:,} -{c.rules_removed:,}",
        installed=_counts(c.base_installed, c.head_installed),
        cf=_counts(c.base_cf_rules, c.head_cf_rules),
        body=fence("\n".join(_chain_lines(c)), "diff") if body else "",
    )


def _common(report: PlanReport, esc: Callable[[str], str]) -> dict[str, Any]:
    diff = report.diff
    out: dict[str, Any] = {
        "marker": MARKER,
        "policies": esc(report.policies),
        "base": _revision_text(report.base, esc),
        "head": _revision_text(report.head, esc),
        "base_name": esc(report.base.name),
        "head_name": esc(report.head.name),
        "inventory": esc(report.inventory),
        "status": report.status,
        "error": esc(report.error),
        "warnings": [esc(w) for w in report.warnings],
        "findings": _finding_lines(report.head_errors, report.location_prefix),
        "n_errors": _n(len(report.head_errors), "error"),
        "base_findings": len([f for f in report.base_findings if f.severity == "error"]),
        "summary": summary_line(diff) if diff is not None else "",
        "notices": [],
        "access_legend": "",
        "chain_legend": "",
        "cells_total": 0,
        "cells_changed": 0,
        **_gate_context(report, esc),
        "truth": report.truth,
        "notes": [esc(x) for x in report.notes],
        "groups": [
            {"title": group_title(g, esc), "against": group_against(g), **_group_counts(g)}
            for g in report.groups
        ],
    }
    if diff is not None:
        out["notices"] = [
            {"level": n.level, "cell": esc(n.cell), "message": esc(n.message)} for n in diff.notices
        ]
        out["access_legend"], out["chain_legend"] = _legends(diff)
        out["cells_total"] = len(diff.cells)
        out["cells_changed"] = len(diff.changed_cells)
    return out


def _principal_order(diff: PlanDiff) -> list[PrincipalDiff]:
    return sorted(diff.principals, key=lambda p: (not p.lost, p.name, p.lifecycle))


MAX_LISTED = 30
"""Notices and warnings shown in a comment before "and N more": a fleet can have one per
cell (over CF's rule limit; a status branch skipped), and the comment must still fit."""
LIST_CHARS = 12_000  # characters the notices may take, and the warnings
MAX_FINDINGS = 200  # findings of a head that does not validate, in the comment
FINDINGS_CHARS = 30_000  # and the characters they may take
MAX_ITEM = 1_500  # characters of one warning, notice, note or finding in the comment


def _clip(text: str, most: int = MAX_ITEM) -> str:
    """`text`, or its start and how much of it is left out (before escaping: a cut never
    splits an escape)."""
    if len(text) <= most:
        return text
    return f"{text[:most]} … ({len(text) - most:,} more characters in the full report)"


def _take(items: list[str], most: int, chars: int) -> list[str]:
    """The first items (each clipped) while at most `most` of them fit in `chars`."""
    out: list[str] = []
    for item in items:
        item = _clip(item)
        if len(out) == most or len(item) > chars:
            break
        out.append(item)
        chars -= len(item) + 1
    return out


def _bounded_lists(report: PlanReport, ctx: dict[str, Any]) -> None:
    """The comment's lists that grow with the fleet, each cut to a count and a size with
    the number left out (the template says "and N more"); every entry clipped."""
    notices = report.diff.notices if report.diff is not None else ()
    kept = _take([f"{n.cell}: {n.message}" for n in notices], MAX_LISTED, LIST_CHARS)
    ctx["notices"] = [
        {"level": n.level, "cell": md(n.cell), "message": md(text[len(n.cell) + 2 :])}
        for n, text in zip(notices, kept, strict=False)
    ]
    ctx["notices_more"] = f"{len(notices) - len(kept):,}"
    rest = notices[len(kept) :]
    ctx["notices_more_errors"] = f"{sum(n.level == 'error' for n in rest):,}"
    warnings = _take(list(report.warnings), MAX_LISTED, LIST_CHARS)
    ctx["warnings"] = [md(w) for w in warnings]
    ctx["warnings_more"] = f"{len(report.warnings) - len(warnings):,}"
    ctx["notes"] = [md(_clip(x)) for x in report.notes]
    findings = _take(ctx["findings"], MAX_FINDINGS, FINDINGS_CHARS)
    left = len(ctx["findings"]) - len(findings)
    if left:
        findings.append(f"... and {left:,} more: asgctl validate lists all")
    ctx["findings_block"] = fence("\n".join(findings), "text")
    ctx["gated_more"] = max(0, len(ctx["gated"]) - MAX_GATED)
    ctx["gated"] = ctx["gated"][:MAX_GATED]


def _counts_table(diff: PlanDiff) -> str:
    """Counts per kind of change: what a comment cut to fit still says about all of it."""
    actions = {"create": 0, "update": 0, "delete": 0}
    for c in diff.changed_cells:
        for ch in c.chains:
            actions[ch.action] += 1
    gaining = [p for p in diff.principals if p.gained]
    losing = [p for p in diff.principals if p.lost]
    logging = sum(1 for p in diff.principals if p.logging)
    errors = len(diff.errors)
    rows = [
        ("cells changing", f"{len(diff.changed_cells):,} of {len(diff.cells):,}"),
        (
            "chains created / updated / destroyed",
            f"{actions['create']:,} / {actions['update']:,} / {actions['delete']:,}",
        ),
        ("rules added / removed", f"+{diff.rules_added:,} -{diff.rules_removed:,}"),
        (
            "principals gaining access (containers)",
            f"{len(gaining):,} ({diff.containers_gaining:,})",
        ),
        ("principals losing access (containers)", f"{len(losing):,} ({diff.containers_losing:,})"),
        ("principals whose logging changes", f"{logging:,}"),
        ("cells whose mass-revoke gate refuses", f"{len(diff.gated_cells):,}"),
        (
            "cells over CF's rule limits (errors / warnings)",
            f"{errors:,} / {len(diff.notices) - errors:,}",
        ),
    ]
    lines = ["#### Counts", "", "| change | count |", "|---|--:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n\n"


def render_markdown(report: PlanReport, limit: int = COMMENT_LIMIT) -> str:
    """The sticky PR comment; never longer than `limit` characters.

    Past the limit it summarises: the summary line, counts per kind of change, the first
    principals and cells in the report's order (each list and table closed with how many
    more there are), and a note saying where the full plan is.  Nothing is cut mid-table
    or mid-line; lists that grow with the fleet (notices, warnings, findings, gated cells)
    are always bounded."""
    env = _env()
    template = env.get_template("plan.md.j2")
    macros = env.get_template("blocks.md.j2").module
    ctx = _common(report, md)
    ctx["counts"] = ""
    _bounded_lists(report, ctx)
    diff = report.diff
    principals = _principal_order(diff) if diff is not None else []
    cells = list(diff.changed_cells) if diff is not None else []
    # The template's macros, looked up by name: jinja2 types a module's macros as unknown.
    access_block, access_line = macros.access_block, macros.access_line  # type: ignore[attr-defined]
    cell_row, cell_block = macros.cell_row, macros.cell_block  # type: ignore[attr-defined]
    access_full: list[str] = []
    access_short: list[str] = []
    heading_at: set[int] = set()  # entries of access_full that are a group's heading
    sections: list[tuple[BaseGroup | None, list[PrincipalDiff]]] = []
    if not report.truth:
        sections.append((None, principals))
    for group in report.groups:  # against the truth: each group's access under its heading
        if group.diff.principals:
            sections.append((group, _principal_order(group.diff)))
    for section, members in sections:
        if section is not None:
            against = f"<sub>(planned against {group_against(section)})</sub>"
            heading = f"##### {group_title(section, md)} {against}\n\n"
            heading_at.add(len(access_full))
            access_full.append(heading)
            access_short.append(heading)
        views = [_group_view_md(m) for m in _access_groups(members)]
        access_full += [str(access_block(v)) for v in views]
        access_short += [str(access_line(v)) for v in views]
    cell_rows = [str(cell_row(_cell_view_md(c, body=False))) for c in cells]

    def cell_detail(c: CellDiff) -> str:  # rendered only when it may be shown
        return str(cell_block(_cell_view_md(c)))

    def render(access: list[str], rows: list[str], details: list[str], cut: str) -> str:
        return log_text(
            template.render(
                **ctx,
                access=access,
                has_access=bool(principals),
                rows=rows,
                details=details,
                has_cells=bool(cells),
                cut=cut,
            )
        )

    estimate = sum(map(len, access_full)) + sum(map(len, cell_rows))
    estimate += sum(len(x) + 1 for c in cells for ch in c.chains for x in ch.lines)
    if estimate <= limit:
        full = render(access_full, cell_rows, [cell_detail(c) for c in cells], "")
        if len(full) <= limit:
            return full

    # Too long for one comment: keep the summary and the counts, then fill greedily -- one
    # line per principal, one row per cell, then access details, then dataplane details.
    if diff is not None:
        ctx["counts"] = _counts_table(diff)
    reserve = 1_200  # the cut note and the "and N more" line and row
    budget = limit - len(render([], [], [], "")) - reserve
    chosen: list[str | None] = [None] * len(access_full)
    # Principals' lines take at most half when there are cells too: both lists start.
    share = budget // 2 if cell_rows else budget
    listed = 0
    for line in access_short:
        if len(line) > min(share, budget):
            break
        chosen[listed] = line
        listed += 1
        budget -= len(line)
        share -= len(line)
    rows_kept = 0
    for row in cell_rows:
        if len(row) > budget:
            break
        rows_kept += 1
        budget -= len(row)
    for line in access_short[listed:]:  # what the cells left
        if len(line) > budget:
            break
        chosen[listed] = line
        listed += 1
        budget -= len(line)
    for i, block in enumerate(access_full):
        if chosen[i] is None:
            break
        extra = len(block) - len(access_short[i])
        if extra <= budget:
            chosen[i] = block
            budget -= extra
    details_kept: list[str] = []
    for c in cells[:rows_kept]:
        size = sum(len(x) + 1 for ch in c.chains for x in ch.lines)
        if size > budget:
            continue  # cheaper to skip by estimate than to render and measure
        block = cell_detail(c)
        if len(block) <= budget:
            details_kept.append(block)
            budget -= len(block)
    access_kept = [c for c in chosen if c is not None]
    folded = sum(
        1
        for i, c in enumerate(chosen)
        if c is not None and c == access_short[i] and i not in heading_at
    )
    unlisted = sum(1 for i, c in enumerate(chosen) if c is None and i not in heading_at)
    note = _cut_note(
        ctx,
        access_unlisted=unlisted,
        access_folded=folded,
        cells_unlisted=len(cells) - rows_kept,
        cells_folded=rows_kept - len(details_kept),
        limit=limit,
    )
    if unlisted:
        access_kept.append(f"- … and {_n(unlisted, 'more access change')} (the full report)\n")
    kept_rows = cell_rows[:rows_kept]
    if rows_kept < len(cell_rows):
        more = _n(len(cell_rows) - rows_kept, "more changed cell")
        kept_rows.append(f"| … and {more} (the full report) | | | | | | |\n")
    out = render(access_kept, kept_rows, details_kept, note)
    if len(out) > limit:  # cannot happen with the reserve above; never post an oversize one
        out = render([], [], [], note)
    return out


def _cut_note(
    ctx: dict[str, Any],
    *,
    access_unlisted: int,
    access_folded: int,
    cells_unlisted: int,
    cells_folded: int,
    limit: int,
) -> str:
    parts = []
    if access_folded:
        parts.append(f"the diffs of {_n(access_folded, 'access change')}")
    if access_unlisted:
        parts.append(f"{_n(access_unlisted, 'more access change')}")
    if cells_folded:
        parts.append(f"the chain diffs of {_n(cells_folded, 'cell')}")
    if cells_unlisted:
        parts.append(f"{_n(cells_unlisted, 'more changed cell')}")
    cut = ", ".join(parts) or "some details"
    base = "" if ctx["truth"] else f"--base {ctx['base_name']} "
    return (
        f"**Cut to fit one comment ({limit:,} characters):** {cut} not shown. "
        f"The full plan: <code>asgctl plan {base}--head {ctx['head_name']}"
        "</code> (text, or <code>--format json</code>), also in this job's log "
        "and artifact."
    )


def render_text(report: PlanReport) -> str:
    """The terminal form: everything, nothing folded; control characters made visible."""
    template = _env().get_template("plan.txt.j2")
    ctx = _common(report, visible)
    diff = report.diff
    principals = []
    cells = []
    if diff is not None:
        sections: list[tuple[str, PlanDiff]] = [("", diff)] if not report.truth else []
        for g in report.groups:  # against the truth: each group's access under its heading
            title = f"{group_title(g, visible)}; planned against {group_against(g)}"
            sections.append((title, g.diff))
        for title, part in sections:
            for i, p in enumerate(_principal_order(part)):
                principals.append(
                    {
                        "group": title if i == 0 else "",
                        "title": visible(_principal_title(p)),
                        "lifecycle": p.lifecycle,
                        "where": _where(p),
                        "lines": _access_text_lines(p),
                    }
                )
        for c in diff.changed_cells:
            cells.append(
                {
                    "name": visible(c.cell),
                    "rechained": _n(c.containers_rechained, "container"),
                    "chains": _chain_counts(c),
                    "rules": f"+{c.rules_added:,} -{c.rules_removed:,}",
                    "installed": _counts(c.base_installed, c.head_installed),
                    "cf": _counts(c.base_cf_rules, c.head_cf_rules),
                    "lines": _chain_lines(c),
                }
            )
    return log_text(template.render(**ctx, principals=principals, cells=cells))


def _access_text_lines(p: PrincipalDiff) -> list[str]:
    lines = []
    for kind, change in _access_entries(p):
        text = f"{_access_sign(kind)} {change.access}"
        if change.detail:
            text += f" {change.detail}"
        lines.append(text)
        lines.extend(f"    {visible(r)}" for r in change.reasons)
    return lines


def render_json(report: PlanReport) -> str:
    """Machine-readable and complete; strings as they are (JSON escapes them)."""
    diff = report.diff
    doc: dict[str, Any] = {
        "marker": MARKER,
        "status": report.status,
        "base": {"name": report.base.name, "sha": report.base.sha},
        "head": {"name": report.head.name, "sha": report.head.sha},
        "policies": report.policies,
        "inventory": report.inventory,
        "summary": summary_line(diff) if diff is not None else None,
        "error": report.error or None,
        "against": "enforced" if report.truth else "base",
        "notes": list(report.notes),
        "warnings": list(report.warnings),
        "findings": [
            f.to_dict() | {"file": report.location_prefix + f.file}
            for f in sorted(report.head_findings)
        ],
    }
    if diff is not None:
        doc["counts"] = {
            "cells": len(diff.cells),
            "cells_changed": len(diff.changed_cells),
            "cells_unchanged": len(diff.cells) - len(diff.changed_cells),
            "containers_gaining_access": diff.containers_gaining,
            "containers_losing_access": diff.containers_losing,
            "rules_added": diff.rules_added,
            "rules_removed": diff.rules_removed,
        }
        doc["notices"] = [
            {"level": n.level, "cell": n.cell, "message": n.message} for n in diff.notices
        ]
        doc["principals"] = [_principal_json(p) for p in _principal_order(diff)]
        doc["cells"] = [_cell_json(c) for c in diff.cells]
        doc["mass_revoke_gate"] = {
            "settings": report.gate_settings or "the agent's defaults",
            "cells_refusing": [c.cell for c in diff.gated_cells],
        }
    if report.truth:
        doc["groups"] = [_group_json(g) for g in report.groups]
        doc["principals"] = [
            {**_principal_json(p), "group": i}
            for i, g in enumerate(report.groups)
            for p in _principal_order(g.diff)
        ]
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _group_json(g: BaseGroup) -> dict[str, Any]:
    d = g.diff
    return {
        "enforces": g.enforces,
        "revision": g.revision.sha or None,
        "subject": g.subject or None,
        "planned_against": g.against.sha or None,  # None: an empty policy
        "title": group_title(g, str),
        "cells": list(g.cells),
        "counts": {
            "cells_changed": len(d.changed_cells),
            "containers_gaining_access": d.containers_gaining,
            "containers_losing_access": d.containers_losing,
            "rules_added": d.rules_added,
            "rules_removed": d.rules_removed,
        },
    }


def _change_json(c: AccessChange) -> dict[str, Any]:
    a = c.access
    out: dict[str, Any] = {
        "access": str(a),
        "protocol": a.protocol,
        "destination": str(a.destination),
    }
    if a.ports:
        out["ports"] = ",".join(str(p) for p in a.ports)
    if a.icmp_type is not None:
        out["icmp_type"] = a.icmp_type
        out["icmp_code"] = a.icmp_code
    if c.detail:
        out["detail"] = c.detail
    out["reasons"] = list(c.reasons)
    return out


def _principal_json(p: PrincipalDiff) -> dict[str, Any]:
    return {
        "name": p.name,
        "kind": p.kind,
        "lifecycle": p.lifecycle,
        "space_id": p.space_id,
        "app_id": p.app_id,
        "name_verified": not p.name_mismatch,
        "name_mismatch": p.name_mismatch or None,
        "containers": p.containers,
        "cells": p.cells,
        "gained": [_change_json(c) for c in p.gained],
        "lost": [_change_json(c) for c in p.lost],
        "logging": [_change_json(c) for c in p.logging],
    }


def _cell_json(c: CellDiff) -> dict[str, Any]:
    return {
        "cell": c.cell,
        "origin": c.origin,
        "changed": c.changed,
        "containers": c.containers,
        "containers_rechained": c.containers_rechained,
        "rules_added": c.rules_added,
        "rules_removed": c.rules_removed,
        "installed_rules": {"base": c.base_installed, "head": c.head_installed},
        "cf_equivalent_rules": {"base": c.base_cf_rules, "head": c.head_cf_rules},
        "mass_revoke": _gate_json(c),
        "chains": [
            {
                "family": ch.family,
                "chain": ch.chain,
                "action": ch.action,
                "added": ch.added,
                "removed": ch.removed,
                "lines": list(ch.lines),
            }
            for ch in c.chains
        ],
    }


def _gate_json(c: CellDiff) -> dict[str, Any]:
    n, s, v = c.revoke, c.gate_settings, c.gate
    return {
        "net_lost": n.net_lost,
        "total": n.total,
        "share": round(n.share, 4),
        "lost": n.lost,
        "gained": n.gained,
        "containers_losing": n.containers_losing,
        "to_nothing": n.to_nothing,
        "threshold": s.threshold,
        "minimum": s.minimum,
        "trailer": s.trailer,
        "refused": v is not None,
        "rule": v.rule if v is not None else None,
        "message": v.message if v is not None else None,
    }


def render(report: PlanReport, fmt: str) -> str:
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "json":
        return render_json(report)
    return render_text(report)
