"""`asgctl plan` against the truth (issue 17, item 2): what each cell really enforces.

A real bare repository stands for the git server.  Policy commits are pushed to it; each cell's
status is the document the agent builds (`agent.status.build_status`, from a real compiled
plan) pushed by the real status writer (`status.write.StatusWriter`: a root commit,
force-pushed to `status/<cell>`).  The plan then runs in a clone that fetched the status
branches, as the policy-PR workflow does.

The story is the issue's: main was broken (it fails validation), so the cells refused it and
still enforce the revision before; a pull request fixes main but also drops the payments
card-network grant.  Compared with the broken base, an empty policy, the plan would say
"gain access, 0 lose access"; compared with what the cells enforce, payments loses access.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.agent.core import Refusal
from reconciler.agent.state import AgentState, Applied, Head
from reconciler.agent.status import build_status
from reconciler.ci.plan import MAX_BASES, run_plan
from reconciler.cli import main
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.policy.load import load_folder
from reconciler.status.write import StatusWriter, commit_message, dump_status
from tests.golden import assert_golden
from tests.policyrepo import commit_all, git, init_repo
from tests.test_plan import (
    BACKEND,
    BLOG,
    FRONTEND,
    MARKETING,
    PAYMENTS,
    PROD,
    REPO,
    STAGING,
    STAGING_BACKEND,
    WEB,
    c,
)

WHEN = 1_800_000_000  # status commits at a fixed time: the goldens hold no clock

PAYMENTS_PROD = [
    c("backend-0", "198.18.1.2", BACKEND, PROD, PAYMENTS),
    c("frontend-0", "198.18.1.4", FRONTEND, PROD, PAYMENTS),
]
PAYMENTS_STAGING = [c("staging-backend-0", "198.18.2.3", STAGING_BACKEND, STAGING, PAYMENTS)]
BLOG_ONLY = [c("blog-0", "198.18.3.2", BLOG, WEB, MARKETING)]


class Fleet:
    """The policy history on a bare 'server', cells reporting to it, and a CI clone."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bare = tmp / "origin.git"
        git(tmp, "init", "-q", "--bare", "-b", "main", str(self.bare))
        self.work = init_repo(tmp / "work")
        shutil.copytree(REPO / "policies", self.work / "policies")
        self.revs: dict[str, str] = {}

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.work / "policies" / rel
        text = path.read_text()
        assert old in text, f"{old!r} not in {rel}"
        path.write_text(text.replace(old, new, 1))

    def commit(self, name: str) -> str:
        sha = commit_all(self.work, name)
        git(self.work, "push", "-q", str(self.bare), "HEAD:refs/heads/main")
        self.revs[name] = sha
        return sha

    def report(
        self,
        cell: str,
        containers: list[Container],
        applied: str | None,
        refused: str | None = None,
        claim: str | None = None,
        mangle: Callable[[str], str] | None = None,
        reword: Callable[[str], str] | None = None,
    ) -> str:
        """The agent's status document for `cell`, pushed by the real status writer.

        `applied` names the revision it enforces (compiled for real); `claim` overrides the
        document's `lastAppliedRevision` with any text, `mangle` rewrites the document's
        text and `reword` the commit's message, as a hostile pusher would.
        """
        state = AgentState()
        if applied is not None:
            sha = self.revs[applied]
            git(self.work, "checkout", "-q", sha, "--", "policies")
            policy = load_folder(self.work / "policies").policy
            git(self.work, "checkout", "-q", "HEAD", "--", "policies")
            plan = compile_cell(policy, containers, cell)
            state = AgentState(
                applied=Applied(sha, plan.digest(), "2027-01-15T08:00:00Z", (), policy, plan)
            )
        if refused is not None:
            verdict = Refusal("ValidationFailed", "the revision does not validate")
            state = AgentState(
                applied=state.applied, head=Head(self.revs[refused], "", None, verdict)
            )
        doc = build_status(
            state,
            cell=cell,
            settings={},
            agent={},
            revision=lambda sha: f"main@sha1:{sha}",
            containers_path="/var/vcap/data/garden/store.json",
            now="2027-01-15T08:00:00Z",
        )
        if claim is not None:
            doc["lastAppliedRevision"] = claim
        writer = StatusWriter(str(self.bare), f"status/{cell}", self.tmp / f"agent-{cell}.git")
        text = dump_status(doc)
        message = reword(commit_message(doc)) if reword else commit_message(doc)
        return writer.push(mangle(text) if mangle else text, message, when=WHEN)

    def ci_clone(self) -> Path:
        """A clone that fetched the status branches, as the policy-PR workflow does."""
        ci = self.tmp / "ci"
        if ci.exists():
            shutil.rmtree(ci)
        git(self.tmp, "clone", "-q", str(self.bare), str(ci))
        git(
            ci,
            "fetch",
            "-q",
            "--no-tags",
            "origin",
            "+refs/heads/status/*:refs/remotes/origin/status/*",
        )
        return ci

    def plan(self, *args: str, fmt: str = "text") -> tuple[int, str]:
        ci = self.ci_clone()
        argv = ["plan", *args, "--policies", str(ci / "policies"), "--format", fmt]
        result = CliRunner().invoke(main, [*argv, "--detailed-exitcode"], catch_exceptions=False)
        return result.exit_code, self.stable(result.output)

    def stable(self, out: str) -> str:
        """Commit ids replaced by their names, so goldens outlive the commit times."""
        for name, sha in self.revs.items():
            out = out.replace(sha, f"<{name}>").replace(sha[:12], f"<{name}>")
            out = out.replace(sha[:7], f"<{name}>")
        return out


def broken_main(tmp_path: Path) -> Fleet:
    """r0 and r1 applied around the fleet; main then broken (refused); the PR fixes it but
    drops the payments card-network grant."""
    fleet = Fleet(tmp_path)
    fleet.commit("r0")
    fleet.edit("destinations.yaml", "ports: 8125", "ports: 8126")
    fleet.commit("r1")
    fleet.edit("destinations.yaml", "ips: 198.19.30.30", "ips: 198.19.30.300")
    fleet.commit("broken")
    fleet.edit("destinations.yaml", "ips: 198.19.30.300", "ips: 198.19.30.30")
    fleet.edit("security-groups/payments-api.yaml", "  - payments/prod\n", "")
    fleet.commit("head")
    fleet.report("cell-1", PAYMENTS_PROD, "r1", refused="broken")
    fleet.report("cell-2", PAYMENTS_PROD + PAYMENTS_STAGING, "r1", refused="broken")
    fleet.report("cell-3", PAYMENTS_PROD + BLOG_ONLY, "r0", refused="broken")
    # Refused everything so far: enforces nothing, and (as the agent writes it before its
    # first apply) lists no containers.
    fleet.report("cell-4", BLOG_ONLY, None, refused="broken")
    return fleet


def test_plan_without_base_shows_what_cells_refusing_a_broken_main_will_lose(tmp_path):
    """The issue's check: after the cells refused a broken main, `plan --head` without --base
    shows the access the cells will lose; the broken base as base shows no loss at all."""
    fleet = broken_main(tmp_path)
    code, text = fleet.plan("--head", fleet.revs["head"])
    assert code == 2, text
    assert "against what each cell enforces" in text
    assert "2 cells enforce <r1>" in text and "1 cell enforces <r0>" in text
    assert "1 cell enforces nothing yet" in text
    # payments/prod loses the card network on every cell that runs it.
    assert text.splitlines()[1].startswith("Plan: 3 cells change, 3 containers gain access, 7 lose")
    assert "- tcp 198.19.20.20/31 port 443" in text

    report = run_plan(str(fleet.ci_clone() / "policies"), None, fleet.revs["head"])
    by = {g.revision.sha or g.enforces: g for g in report.groups}
    r1, r0 = by[fleet.revs["r1"]], by[fleet.revs["r0"]]
    assert r1.cells == ("cell-1", "cell-2") and r0.cells == ("cell-3",)
    # cell-1 and cell-2 run payments/prod twice; cell-3 once, beside the blog, which on r0
    # still sends metrics to port 8125 and moves to 8126 (r1's edit, news only to cell-3).
    assert r1.diff.containers_losing == 4 and r0.diff.containers_losing == 3
    assert by["nothing"].cells == ("cell-4",) and by["nothing"].diff.cells[0].containers == 0
    assert report.diff.containers_losing == 7
    assert r1.against.sha == fleet.revs["r1"] and by["nothing"].against.sha == ""
    moved = [str(ch.access) for p in r0.diff.principals for ch in p.lost]
    assert "udp 198.19.30.30 port 8125" in moved
    assert not any("8125" in str(ch.access) for p in r1.diff.principals for ch in p.lost)

    markdown = fleet.plan("--head", fleet.revs["head"], fmt="markdown")[1]
    assert_golden("plan/truth.md", markdown)
    assert_golden("plan/truth.txt", text)
    doc = json.loads(fleet.plan("--head", fleet.revs["head"], fmt="json")[1])
    assert doc["against"] == "enforced" and doc["base"] == {"name": "", "sha": ""}
    assert [(g["enforces"], g["cells"]) for g in doc["groups"]] == [
        ("revision", ["cell-1", "cell-2"]),
        ("revision", ["cell-3"]),
        ("nothing", ["cell-4"]),
    ]
    assert [g["counts"]["containers_losing_access"] for g in doc["groups"]] == [4, 3, 0]
    assert doc["counts"]["containers_losing_access"] == 7
    assert {p["group"] for p in doc["principals"]} == {0, 1}


def test_a_broken_base_is_not_presented_as_the_truth(tmp_path):
    """`--base <broken main>`: the base was never applied, so comparing with it (an empty
    policy) would show no loss; the plan says the base is invalid and compares the head with
    what the cells enforce instead, in every format."""
    fleet = broken_main(tmp_path)
    args = ("--base", fleet.revs["broken"], "--head", fleet.revs["head"])
    code, text = fleet.plan(*args)
    assert code == 2, text
    assert "Note: the base <broken> does not validate (1 error): no cell applied it" in text
    assert "This plan compares the head with what each cell enforces." in text
    assert "2 cells enforce <r1>" in text
    assert "Plan: 3 cells change, 3 containers gain access, 7 lose access" in text
    markdown = fleet.plan(*args, fmt="markdown")[1]
    assert "> **Note:** the base <broken> does not validate" in markdown
    assert "against what each cell enforces" in markdown
    doc = json.loads(fleet.plan(*args, fmt="json")[1])
    assert doc["notes"] and "does not validate" in doc["notes"][0]
    assert doc["counts"]["containers_losing_access"] == 7


def test_a_base_other_than_what_the_cells_enforce_is_said_so(tmp_path):
    fleet = broken_main(tmp_path)
    args = ("--base", fleet.revs["r1"], "--head", fleet.revs["head"])
    code, text = fleet.plan(*args)
    assert code == 2
    expected = (
        "Note: the base <r1> is not what the cells enforce: 2 cells enforce <r1>, "
        "1 cell enforces <r0>, 1 cell enforces nothing yet. This plan compares the two "
        "revisions; `asgctl plan --head <head>` without --base compares the head with what "
        "each cell enforces"
    )
    assert expected in text
    # Still the comparison asked for: every cell against r1.
    assert "against what each cell enforces" not in text
    markdown = fleet.plan(*args, fmt="markdown")[1]
    assert "> **Note:** the base <r1> is not what the cells enforce" in markdown
    assert_golden("plan/base-not-enforced.md", markdown)
    doc = json.loads(fleet.plan(*args, fmt="json")[1])
    assert doc["against"] == "base" and "is not what the cells enforce" in doc["notes"][0]


def test_a_base_every_cell_enforces_needs_no_note(tmp_path):
    fleet = Fleet(tmp_path)
    fleet.commit("r0")
    fleet.edit("security-groups/payments-api.yaml", "  - payments/prod\n", "")
    fleet.commit("head")
    fleet.report("cell-1", PAYMENTS_PROD, "r0")
    fleet.report("cell-2", BLOG_ONLY, "r0")
    code, with_base = fleet.plan("--base", fleet.revs["r0"], "--head", fleet.revs["head"])
    assert code == 2 and "Note:" not in with_base
    code, truth = fleet.plan("--head", fleet.revs["head"])
    assert code == 2 and "2 cells enforce <r0>" in truth
    # One revision for the whole fleet: the same diff as --base r0.
    policies = str(fleet.ci_clone() / "policies")
    (group,) = run_plan(policies, None, fleet.revs["head"]).groups
    assert group.diff == run_plan(policies, fleet.revs["r0"], fleet.revs["head"]).diff


def test_without_status_branches_plan_needs_a_base(tmp_path):
    fleet = Fleet(tmp_path)
    fleet.commit("r0")
    code, text = fleet.plan("--head", fleet.revs["r0"])
    assert code == 1
    assert "without --base the head is planned against what each cell enforces" in text
    assert "+refs/heads/status/*:refs/remotes/origin/status/*" in text


HOSTILE = {
    "garbage": "ready; $(rm -rf /)\x1b[2J",
    "option": "main@sha1:--output=/tmp/owned",
    "missing": "main@sha1:" + "0" * 40,
    "short": "main@sha1:abcdef1",
}


def test_hostile_applied_revisions_are_named_and_cannot_hide_a_loss(tmp_path):
    """Whoever can push a status branch writes `lastAppliedRevision`.  Garbage, an option,
    a sha not in the repository, a blob, a tree, a commit of another history (another
    status branch's root commit), a revision that does not validate: each is a named
    warning, never a traceback, and its cell is planned against the revision most cells
    enforce -- so its payments containers still show the loss (an empty base would show
    none)."""
    fleet = broken_main(tmp_path)
    r1 = fleet.revs["r1"]
    blob = git(fleet.work, "rev-parse", f"{r1}:policies/directory.yaml")
    tree = git(fleet.work, "rev-parse", f"{r1}^{{tree}}")
    foreign = fleet.report("cell-2", PAYMENTS_PROD + PAYMENTS_STAGING, "r1", refused="broken")
    fleet.revs["status-commit"] = foreign  # its id holds r1's, which holds the clock
    claims = {
        **HOSTILE,
        "blob": f"main@sha1:{blob}",
        "tree": f"main@sha1:{tree}",
        "foreign": f"main@sha1:{foreign}",
        "invalid": f"main@sha1:{fleet.revs['broken']}",
        "long": "x" * 5000,
    }
    for name, claim in claims.items():
        fleet.report(f"evil-{name}", PAYMENTS_PROD, "r1", claim=claim)
    result_code, text = fleet.plan("--head", fleet.revs["head"])
    assert result_code == 2, text
    expected = {
        # Dumped double-quoted (it holds an escape): no claim the plan reads in the first
        # bytes (status/document.py read_claim), so unknown all the same.
        "garbage": "no revision the plan can read (refs/remotes/origin/status/evil-garbage",
        "option": "not <branch>@sha1:<full commit id>",
        "short": "not <branch>@sha1:<full commit id>",
        "long": "not <branch>@sha1:<full commit id>",
        "missing": "which is not in this repository",
        "blob": "which is a blob, not a commit",
        "tree": "which is a tree, not a commit",
        "foreign": "a commit of another history (none in common with the head)",
        "invalid": "which does not validate here (1 error), so it cannot be compiled",
    }
    warnings = [line for line in text.splitlines() if line.startswith("Warning: ")]
    for name, words in expected.items():
        (line,) = [w for w in warnings if f"(evil-{name})" in w]
        assert words in line, line
    assert "\x1b" not in text and "x" * 100 not in text
    report = run_plan(str(fleet.ci_clone() / "policies"), None, fleet.revs["head"])
    (unknown,) = [g for g in report.groups if g.enforces == "unknown"]
    assert len(unknown.cells) == len(claims)
    # Planned against r1 (what most cells enforce): each evil cell's payments/prod
    # containers lose the card network, as on the honest cells.
    assert unknown.against.sha == r1
    assert unknown.diff.containers_losing == 2 * len(claims)
    assert report.diff.containers_losing == 7 + 2 * len(claims)
    assert not Path("/tmp/owned").exists()
    markdown = fleet.plan("--head", fleet.revs["head"], fmt="markdown")[1]
    assert_golden("plan/truth-hostile.md", markdown)


def test_many_distinct_revisions_compile_at_most_max_bases(tmp_path):
    """A status pusher cannot make CI compile every commit of the history: past MAX_BASES
    distinct revisions, the rarest are planned as unknown, against the most enforced."""
    fleet = Fleet(tmp_path)
    for i in range(MAX_BASES + 2):
        fleet.edit("destinations.yaml", f"ports: {8125 + i}", f"ports: {8126 + i}")
        fleet.commit(f"r{i}")
    fleet.commit("head")
    for i in range(MAX_BASES + 2):
        fleet.report(f"cell-{i:02d}", BLOG_ONLY, f"r{i}")
    fleet.report("cell-extra", BLOG_ONLY, "r0")  # r0 is the most enforced
    report = run_plan(str(fleet.ci_clone() / "policies"), None, fleet.revs["head"])
    revisions = [g for g in report.groups if g.enforces == "revision"]
    assert len(revisions) == MAX_BASES
    (unknown,) = [g for g in report.groups if g.enforces == "unknown"]
    assert len(unknown.cells) == 2 and unknown.against.sha == fleet.revs["r0"]
    assert any(f"one of more than {MAX_BASES} distinct revisions" in w for w in report.warnings)


def test_store_file_cells_without_a_status_branch_are_unknown(tmp_path):
    """`--inventory` still decides the containers; a cell with no status branch is named,
    and planned against what most cells enforce."""
    from reconciler.sources.cellstore import dump_store

    fleet = broken_main(tmp_path)
    cells = tmp_path / "stores"
    (cells / "cell-1").mkdir(parents=True)
    (cells / "cell-1" / "store.json").write_text(dump_store(PAYMENTS_PROD))
    (cells / "cell-9").mkdir()
    (cells / "cell-9" / "store.json").write_text(dump_store(PAYMENTS_PROD))
    code, text = fleet.plan("--head", fleet.revs["head"], "--inventory", str(cells))
    assert code == 2, text
    assert "1 cell enforces <r1>" in text
    assert re.search(
        r"Warning: what 1 cell enforces is unknown \(cell-9\): it has no status branch", text
    )
    assert "inventory: 2 store files (2 cells)" in text


def test_status_branch_reader_reports_the_applied_revision(tmp_path):
    fleet = broken_main(tmp_path)
    from reconciler.sources.inventories import StatusBranches

    found = StatusBranches(str(fleet.ci_clone())).read()
    r1, r0 = fleet.revs["r1"], fleet.revs["r0"]
    assert dict(found.applied) == {
        "cell-1": f"main@sha1:{r1}",
        "cell-2": f"main@sha1:{r1}",
        "cell-3": f"main@sha1:{r0}",
        "cell-4": "",
    }


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_every_format_says_what_the_cells_enforce(tmp_path, fmt):
    fleet = broken_main(tmp_path)
    code, out = fleet.plan("--head", fleet.revs["head"], fmt=fmt)
    assert code == 2
    assert "2 cells enforce <r1>" in out and "1 cell enforces nothing yet" in out


def test_a_truth_plan_cut_to_fit_keeps_every_group_line(tmp_path):
    """The per-group table is part of the head of the comment: cutting never drops it, and
    the cut note names the command without --base."""
    from reconciler.ci.report import render_markdown

    fleet = broken_main(tmp_path)
    report = run_plan(str(fleet.ci_clone() / "policies"), None, fleet.revs["head"])
    full = render_markdown(report)
    for limit in (3_500, 5_000, len(full) - 1):
        raw = render_markdown(report, limit=limit)
        assert len(raw) <= limit
        cut = fleet.stable(raw)
        assert "| 2 cells enforce <r1> (r1) | that revision | 2 | 0 | 4 | +13 -19 |" in cut
        assert "Cut to fit one comment" in cut
        assert "<code>asgctl plan --head <head></code>" in cut and "--base" not in cut


def test_groups_diffed_side_by_side_equal_one_diff_per_group(tmp_path):
    """`diff_groups` forks work by group (or by cell, for a group holding a worker's share);
    either way each group's part is the one `diff_part` gives on its own, and with its
    principals it is the group's `diff_plans`."""
    import random
    import shutil as sh

    from reconciler.ci.plan import diff_groups
    from reconciler.core.cellplan import CellInventory
    from reconciler.core.diff import diff_part, diff_plans, diff_principals

    def variant(old: str, new: str) -> object:
        tree = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        sh.copytree(REPO / "policies", tree)
        path = tree / "destinations.yaml"
        path.write_text(path.read_text().replace(old, new))
        return load_folder(tree).policy

    head = variant("ports: 8125", "ports: 8126")
    bases = [
        load_folder(REPO / "policies").policy,
        variant("ips: 198.19.30.30", "ips: 198.19.30.31"),
    ]
    bases.append(variant("ports: 8125", "ports: 9125"))
    pool = PAYMENTS_PROD + PAYMENTS_STAGING + BLOG_ONLY
    rng = random.Random(3)
    cells = [
        CellInventory(f"cell-{i:03d}", tuple(sorted(rng.sample(pool, 3))), "") for i in range(70)
    ]
    jobs = [(bases[0], cells[:40]), (bases[1], cells[40:55]), (bases[2], cells[55:])]
    alone = [diff_part(b, head, cs, workers=1) for b, cs in jobs]
    assert diff_groups(jobs, head, workers=2) == alone
    assert diff_groups(jobs, head, workers=1) == alone
    whole = [diff_plans(b, head, cs) for b, cs in jobs]
    for (b, _cs), part, diff in zip(jobs, alone, whole, strict=True):
        assert part.diff.cells == diff.cells and part.diff.notices == diff.notices
        assert diff_principals(b, head, part.facts) == diff.principals
    assert all(d.has_changes and d.principals for d in whole)
