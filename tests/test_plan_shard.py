"""`asgctl plan --shard I/N` and `asgctl plan --merge` (issue 19): one plan, several jobs.

The spec: for real inventories (store files committed to a real repository; status branches
pushed by the real status writer to a real bare repository and fetched as the workflow does),
the merged report of N shards is the unsharded report, byte for byte, in every format and
for several N.  And partials are files between CI jobs, so the merge trusts nothing in them:
a missing, duplicated, stale or edited partial fails it with a message and exit 1, and never
turns into "No changes".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.ci.partial import (
    KIND,
    VERSION,
    PartialError,
    _encode,
    dump_partial,
    load_partial,
    merge_partials,
)
from reconciler.ci.partition import PARTITION, Shard, ShardError, shard_of
from reconciler.ci.plan import revision_loader, run_plan
from reconciler.ci.report import COMMENT_LIMIT, MARKER, PlanReport, Revision, render_markdown
from reconciler.cli import main
from reconciler.core.diff import (
    Access,
    AccessChange,
    CellDiff,
    ChainDiff,
    PlanDiff,
    PrincipalDiff,
    _limit_notices,
    diff_part,
    join_facts,
    principal_order,
)
from reconciler.core.gate import RevokeCount
from reconciler.core.model import AddressRange, Container, PortRange
from reconciler.policy.findings import Finding
from reconciler.sources.cellstore import dump_store
from reconciler.sources.inventories import StoreFiles
from reconciler.status.document import CLAIM_TRAILER
from tests.policyrepo import commit_all, git, write_tree
from tests.test_plan import (
    BACKEND,
    BLOG,
    FRONTEND,
    MARKETING,
    PAYMENTS,
    PROD,
    STAGING,
    STAGING_BACKEND,
    WEB,
    c,
    edit,
    policy_repo,
)
from tests.test_plan_truth import BLOG_ONLY, PAYMENTS_STAGING, broken_main

FORMATS = ("text", "markdown", "json")


def policies_flag(repo: Path) -> tuple[str, str]:
    """The merge loads the head and bases from the repository the shard jobs planned."""
    return ("--policies", str(repo / "policies"))


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def store_fleet(tmp_path: Path, cells: int = 40) -> Path:
    """A repository with `cells` store files and a pull request that both grants (DNS over
    TLS for everyone) and revokes (payments/prod's card network).  Principals run on many
    cells, in both families, and one space runs in the org the directory does not give it
    on some cells only: what a principal reaches is fleet-wide, never one shard's view."""
    repo = policy_repo(tmp_path)
    rng = random.Random(19)
    kinds = [
        (BACKEND, PROD, PAYMENTS, "app"),
        (FRONTEND, PROD, PAYMENTS, "app"),
        (STAGING_BACKEND, STAGING, PAYMENTS, "app"),
        (BLOG, WEB, MARKETING, "app"),
        (BLOG, WEB, MARKETING, "task"),
        (BACKEND, PROD, PAYMENTS, "staging"),
    ]
    for n in range(cells):
        containers = []
        for i in range(rng.randint(1, 4)):
            app, space, org, workload = rng.choice(kinds)
            v6 = rng.random() < 0.3
            ip = f"fd00:19:{n}::{i + 2}" if v6 else f"198.18.{n}.{i + 2}"
            containers.append(c(f"c{n:02d}-{i}", ip, app, space, org, workload))
        if n % 13 == 5:  # web's containers in the wrong org, on a few cells
            containers.append(c(f"odd-{n}", f"198.19.{n}.2", BLOG, WEB, PAYMENTS))
        write_tree(repo / "fleet", {f"cell-{n:03d}.json": dump_store(containers)})
    commit_all(repo, "fleet")
    edit(repo, "security-groups/platform-dns.yaml", 'ports: "53"', 'ports: "53,853"')
    edit(repo, "security-groups/payments-api.yaml", "  - payments/prod\n", "")
    commit_all(repo, "DNS over TLS; payments/prod loses the card network")
    return repo


def shard_files(tmp: Path, count: int, *args: str) -> list[str]:
    """Run every shard through the CLI, as the workflow's matrix does; the partials' paths."""
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        code, out, err = cli("plan", *args, "--shard", f"{i}/{count}")
        assert code == 0, err
        path = tmp / f"plan-{i}-of-{count}.json"
        path.write_text(out)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_merged_shards_of_a_store_file_fleet_are_the_plan_byte_for_byte(tmp_path, count):
    repo = store_fleet(tmp_path)
    args = ("--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies"))
    args += ("--inventory", str(repo / "fleet"))
    parts = shard_files(tmp_path / "parts", count, *args)
    for fmt in FORMATS:
        want = cli("plan", *args, "--format", fmt, "--detailed-exitcode")
        got = cli(
            "plan", "--merge", *parts, *policies_flag(repo), "--format", fmt, "--detailed-exitcode"
        )
        assert got == want, fmt
        assert want[0] == 2  # a plan with changes: equality of two empty plans proves little
    # One merge writes every format, as the workflow's merge job runs it.
    saved = {fmt: tmp_path / f"plan.{fmt}" for fmt in ("text", "json")}
    code, out, _ = cli(
        "plan",
        "--merge",
        *parts,
        *policies_flag(repo),
        "--format",
        "markdown",
        *(f"--save={fmt}={path}" for fmt, path in saved.items()),
    )
    assert (code, out) == (0, cli("plan", *args, "--format", "markdown")[1])
    for fmt, path in saved.items():
        assert path.read_text() == cli("plan", *args, "--format", fmt)[1]
    counts = json.loads(want[1])["counts"]  # the last format: json
    assert counts["containers_gaining_access"] > 0 and counts["containers_losing_access"] > 0
    assert "name unverified" in want[1]
    covered = [set(json.loads(Path(p).read_text())["covers"]) for p in parts]
    assert sum(len(x) for x in covered) == 40 and set().union(*covered) == {
        f"cell-{n:03d}" for n in range(40)
    }


@pytest.mark.parametrize("count", [2, 3, 5])
def test_merged_shards_of_a_plan_against_the_truth_are_the_plan_byte_for_byte(tmp_path, count):
    """Status branches: cells on two revisions, one refusing everything; groups and their
    bases are chosen fleet-wide in every job, so each shard plans its cells as the whole
    plan would."""
    fleet = broken_main(tmp_path)
    # And two cells whose status claims what no commit is: unknown, planned against the
    # revision most cells enforce -- a fleet-wide choice every job must make alike.
    fleet.report("cell-5", PAYMENTS_STAGING, None, claim="main@sha1:" + "f" * 40)
    fleet.report("cell-6", BLOG_ONLY, None, claim="not a revision")
    ci = fleet.ci_clone()
    args = ("--head", fleet.revs["head"], "--policies", str(ci / "policies"))
    parts = shard_files(tmp_path / "parts", count, *args)
    for fmt in FORMATS:
        want = cli("plan", *args, "--format", fmt, "--detailed-exitcode")
        got = cli("plan", "--merge", *parts, *args[:4], "--format", fmt)
        assert got[1:] == want[1:], fmt
        assert got[0] == 0 and want[0] == 2  # without --detailed-exitcode, 0
    assert "payments" in want[1] and "6 cells" in want[1] and "is unknown" in want[1]


def test_a_job_reads_in_full_only_its_own_cells_and_the_merge_warns_as_the_plan_does(tmp_path):
    """Three status branches no job but their own could find fault with: a broken tail, a
    commit whose trailer claims r0 where the whole document says r1 (status/write.py
    commit_message), and, in a commit stating no claim, first bytes that claim r0 where the
    whole document says r1 (a quoted scalar's column-0 line; status/document.py read_claim).
    Only the job holding each cell reads it in full and leaves it out; every job groups by
    the claims alike (the forged ones count for r0).  The merge names them, once each, in
    inventory order, as the unsharded plan does."""
    fleet = broken_main(tmp_path)
    r0, r1 = (f"main@sha1:{fleet.revs[r]}" for r in ("r0", "r1"))
    fleet.report("cell-7", PAYMENTS_STAGING, "r1", mangle=lambda t: t + "bogus: [\n")

    def forge_r0(text: str) -> str:
        line = f"lastAppliedRevision: {r1}\n"
        assert line in text
        return text.replace(line, f"note: 'x\nlastAppliedRevision: {r0}\n'\n{line}")

    def claim_r0(message: str) -> str:
        stated = f"\n\n{CLAIM_TRAILER}: {r1}\n"
        assert message.endswith(stated)
        return message.replace(stated, f"\n\n{CLAIM_TRAILER}: {r0}\n")

    fleet.report("cell-8", BLOG_ONLY, "r1", reword=claim_r0)
    fleet.report("cell-9", BLOG_ONLY, "r1", mangle=forge_r0, reword=lambda m: m.split("\n")[0])
    ci = fleet.ci_clone()
    args = ("--head", fleet.revs["head"], "--policies", str(ci / "policies"))
    for count in (2, 3):
        parts = shard_files(tmp_path / f"parts-{count}", count, *args)
        for i, path in enumerate(parts, 1):
            left = [x["cell"] for x in json.loads(Path(path).read_text())["left_out"]]
            assert left == [c for c in ("cell-7", "cell-8", "cell-9") if shard_of(c, count) == i]
        for fmt in FORMATS:
            want = cli("plan", *args, "--format", fmt)
            assert cli("plan", "--merge", *parts, *args[:4], "--format", fmt) == want, fmt
    text = fleet.stable(cli("plan", *args, "--format", "text")[1])
    for cell in ("cell-7", "cell-8", "cell-9"):
        (line,) = [x for x in text.splitlines() if f"status/{cell}:status.yaml" in x]
        assert line.endswith("(this cell is left out of the plan)")
    trailer = f"in its commit's {CLAIM_TRAILER} trailer and 'main@sha1:<r1>' in the whole"
    assert (
        f"status/cell-8:status.yaml: lastAppliedRevision reads 'main@sha1:<r0>' {trailer}" in text
    )
    assert "in the first 16,384 bytes and 'main@sha1:<r1>' in the whole document" in text
    assert "inventory: status branches (7 cells)" in text  # listed: 4 planned, 3 left out
    # Grouped by the claims every job reads: the forged cells count for r0, so r0 holds
    # three cells of which one is planned.
    assert "1 cell enforces <r0> (r0)" in text


def test_a_fleet_none_of_whose_status_can_be_used_fails_alike_sharded_or_not(tmp_path):
    """Every cell left out: the plan fails naming them (never "No changes" over no cells),
    and so does the merge of jobs that each found only their own cells unusable."""
    fleet = broken_main(tmp_path)
    for cell in ("cell-1", "cell-2", "cell-3", "cell-4"):
        fleet.report(cell, BLOG_ONLY, "r1", mangle=lambda t: t + "bogus: [\n")
    ci = fleet.ci_clone()
    args = ("--head", fleet.revs["head"], "--policies", str(ci / "policies"))
    parts = shard_files(tmp_path / "parts", 3, *args)
    for fmt in FORMATS:
        want = cli("plan", *args, "--format", fmt, "--detailed-exitcode")
        assert (
            cli("plan", "--merge", *parts, *args[:4], "--format", fmt, "--detailed-exitcode")
            == want
        )
        assert want[0] == 1 and "No changes" not in want[1] + want[2]
    assert "no usable status/<cell> branch" in want[1] and "cell-4" in want[1]


# ----------------------------------------------------------------------------- fleet-wide facts
#
# What a job takes of the cells of other shards: nothing of their containers.  A principal
# runs on cells of every shard, so each job counts its own cells' principal facts and the
# merge diffs every principal from their sum.


def plan_of(repo: Path, shard: Shard | None, cells: tuple[str, ...] = ()) -> PlanReport:
    """The store-file plan of the fleet (or of the given cell files), whole or one shard."""
    inventory = cells or (str(repo / "fleet"),)
    return run_plan(str(repo / "policies"), "HEAD~1", "HEAD", inventory, shard=shard)


def rewrite_cells(repo: Path, change: Callable[[int, list[Container]], list[Container]]) -> None:
    """Each store file of the fleet, its containers rewritten by `change(cell number, ...)`."""
    for path in sorted((repo / "fleet").glob("cell-*.json")):
        (cell,) = StoreFiles((str(path),)).cells()
        n = int(path.stem.rsplit("-", 1)[1])
        path.write_text(dump_store(change(n, list(cell.containers))))


def test_a_job_takes_nothing_of_other_shards_containers(tmp_path):
    """Other shards' cells made to run other principals entirely (every container the
    blog's, in another family): the job's partial is the same but for the inventory
    digest, which makes the merge refuse partials of two different reads."""
    repo = store_fleet(tmp_path)
    shard = Shard(1, 3)
    before = plan_of(repo, shard)

    def others_run_the_blog(n: int, containers: list[Container]) -> list[Container]:
        if shard.holds(f"cell-{n:03d}"):
            return containers
        return [
            c(f"moved-{n}-{i}", f"fd00:20:{n}::{i + 2:x}", BLOG, WEB, MARKETING) for i in range(5)
        ]

    rewrite_cells(repo, others_run_the_blog)
    after = plan_of(repo, shard)
    assert before.diff is not None and before.diff.cells and not before.diff.principals
    assert before.shard is not None and after.shard is not None and before.shard.facts
    assert after.shard.identity != before.shard.identity
    assert replace(after, shard=replace(after.shard, identity="")) == replace(
        before, shard=replace(before.shard, identity="")
    )


def test_a_principal_is_counted_over_every_shard_s_cells(tmp_path):
    """Each job counts a principal's containers and cells on its own cells only; the sum
    of the jobs' facts is the whole fleet's, so the merge reports every principal as the
    unsharded plan does, though no job saw more than a third of the fleet."""
    repo = store_fleet(tmp_path)
    whole = plan_of(repo, None)
    count = 3
    jobs = [plan_of(repo, Shard(i, count)) for i in range(1, count + 1)]
    parts = [j.shard.facts[0].facts for j in jobs if j.shard is not None]
    fleet = StoreFiles(tuple(str(f) for f in sorted((repo / "fleet").glob("*.json")))).cells()
    policy_of = revision_loader(str(repo / "policies"))
    base, head = (policy_of(git(repo, "rev-parse", rev)) for rev in ("HEAD~1", "HEAD"))
    assert join_facts(parts) == diff_part(base, head, fleet).facts
    assert whole.diff is not None and whole.diff.principals
    for p in whole.diff.principals:  # every principal runs in every shard, and is under-counted
        counted = [
            f
            for part in parts
            for f in part.principals
            if f.principal == (p.lifecycle, p.space_id, p.app_id)
        ]
        assert len(counted) == count
        assert all(f.cells < p.cells for f in counted)
        assert sum(f.cells for f in counted) == p.cells
        assert sum(f.ipv4 + f.ipv6 for f in counted) == p.containers


def test_principals_diffed_in_forked_workers_are_the_same(tmp_path, monkeypatch):
    """The merge diffs a fleet's principals over the runner's cores; split or not, the
    same principal diffs in the same order."""
    import reconciler.core.diff as diff

    repo = store_fleet(tmp_path)
    fleet = StoreFiles(tuple(str(f) for f in sorted((repo / "fleet").glob("*.json")))).cells()
    policy_of = revision_loader(str(repo / "policies"))
    base, head = (policy_of(git(repo, "rev-parse", rev)) for rev in ("HEAD~1", "HEAD"))
    facts = diff_part(base, head, fleet).facts
    alone = diff.diff_principals(base, head, facts, "policies/", workers=1)
    monkeypatch.setattr(diff, "_MIN_PRINCIPALS_PER_WORKER", 1)
    assert len(alone) > 2 and diff.diff_principals(base, head, facts, "policies/", 3) == alone


def test_cells_diffed_in_forked_workers_count_the_same_facts(tmp_path, monkeypatch):
    """Each worker of a diff counts its own cells' facts; joined, they are one process's."""
    import reconciler.core.diff as diff

    repo = store_fleet(tmp_path)
    fleet = StoreFiles(tuple(str(f) for f in sorted((repo / "fleet").glob("*.json")))).cells()
    policy_of = revision_loader(str(repo / "policies"))
    base, head = (policy_of(git(repo, "rev-parse", rev)) for rev in ("HEAD~1", "HEAD"))
    alone = diff.diff_part(base, head, fleet, workers=1)
    monkeypatch.setattr(diff, "_MIN_CELLS_PER_WORKER", 1)
    assert diff.diff_part(base, head, fleet, workers=3) == alone
    assert alone.diff.changed_cells and alone.facts.principals


def test_a_base_that_does_not_validate_merges_into_the_plan_against_an_empty_policy(tmp_path):
    """Store files and a base that does not validate: the plan compares the head with an
    empty policy (and says so); each partial's facts are against it, and the merge too."""
    repo = store_fleet(tmp_path, cells=9)
    edit(repo, "destinations.yaml", "ips: 198.19.30.30", "ips: 198.19.30.300")
    commit_all(repo, "broken")
    edit(repo, "destinations.yaml", "ips: 198.19.30.300", "ips: 198.19.30.30")
    commit_all(repo, "fixed")
    args = ("--base", "HEAD~1", "--head", "HEAD", *policies_flag(repo))
    args += ("--inventory", str(repo / "fleet"))
    parts = shard_files(tmp_path / "parts", 3, *args)
    assert all(json.loads(Path(p).read_text())["facts"][0]["against"] == "" for p in parts)
    for fmt in FORMATS:
        want = cli("plan", *args, "--format", fmt)
        assert cli("plan", "--merge", *parts, *policies_flag(repo), "--format", fmt) == want
    assert "EMPTY policy" in want[1] and want[0] == 0


def test_a_failed_plan_merges_into_the_same_failure(tmp_path):
    """A head that does not validate: every shard says so, the merge says it once, exit 1."""
    repo = store_fleet(tmp_path, cells=6)
    edit(repo, "destinations.yaml", "ips: 198.19.30.30", "ips: 198.19.30.300")
    commit_all(repo, "broken")
    args = ("--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies"))
    args += ("--inventory", str(repo / "fleet"))
    parts = shard_files(tmp_path / "parts", 3, *args)
    for fmt in FORMATS:
        want = cli("plan", *args, "--format", fmt)
        assert cli("plan", "--merge", *parts, "--format", fmt) == want
        assert want[0] == 1


# ----------------------------------------------------------------------------- partition


def test_the_partition_is_a_hash_of_the_name_alone():
    names = [f"cell-{n:04d}" for n in range(2000)]
    for count in (1, 2, 4, 7):
        shards = [Shard(i, count) for i in range(1, count + 1)]
        for name in names[:200]:
            assert [s.holds(name) for s in shards].count(True) == 1
        sizes = [sum(s.holds(n) for n in names) for s in shards]
        assert sum(sizes) == 2000 and min(sizes) > 2000 / count * 0.85  # about even
    # Pinned: a partial written by another asgctl version must mean the same cells.
    assert [shard_of(f"cell-{n}", 4) for n in range(8)] == [
        shard_of(f"cell-{n}", 4) for n in range(8)
    ]
    assert PARTITION == "sha256(name)[:8] mod N"
    assert (
        shard_of("cell-1", 4)
        == 1 + int.from_bytes(__import__("hashlib").sha256(b"cell-1").digest()[:8], "big") % 4
    )


@pytest.mark.parametrize("spec", ["0/4", "5/4", "1/0", "a/b", "2", "1/999", " /4"])
def test_a_shard_that_names_no_shard_is_refused(tmp_path, spec):
    with pytest.raises(ShardError):
        Shard.parse(spec)
    code, out, err = cli("plan", "--shard", spec, "--policies", str(tmp_path))
    assert code == 1 and out == "" and "shard" in err and "Traceback" not in err


@pytest.mark.parametrize("save", ["yaml=out.yaml", "text", "json="])
def test_a_save_that_names_no_format_and_path_is_refused_before_any_work(tmp_path, save):
    code, _out, err = cli("plan", "--merge", str(tmp_path / "none.json"), "--save", save)
    assert code == 2 and "--save" in err and "FORMAT=PATH" in err


def test_shard_and_merge_are_not_mixed_with_what_belongs_to_the_other(tmp_path):
    code, _out, err = cli("plan", "--shard", "1/2", "--format", "markdown")
    assert code == 1 and "--format is for --merge" in err
    code, _out, err = cli("plan", "--merge", "--inventory", "x", str(tmp_path / "a.json"))
    assert code == 1 and "--inventory belongs to the --shard runs" in err
    code, _out, err = cli("plan", "--merge")
    assert code == 1 and "give the partial results" in err
    code, _out, err = cli("plan", str(tmp_path / "a.json"))
    assert code == 1 and "only with --merge" in err


# ----------------------------------------------------------------------------- attacks


@pytest.fixture
def one_change(tmp_path: Path) -> tuple[Path, tuple[str, ...], str]:
    """Twelve cells; only one runs the blog, and the pull request lets the blog reach
    MySQL: the shard holding that cell holds the only change."""
    repo = policy_repo(tmp_path)
    for n in range(12):
        containers = [c(f"be-{n}", f"198.18.{n}.2", BACKEND, PROD, PAYMENTS)]
        if n == 7:
            containers.append(c("blog-0", "198.18.7.3", BLOG, WEB, MARKETING))
        write_tree(repo / "fleet", {f"cell-{n:02d}.json": dump_store(containers)})
    commit_all(repo, "fleet")
    grants = repo / "policies" / "egress-policies.yaml"
    grants.write_text(
        grants.read_text() + "---\nkind: EgressPolicy\nname: blog-to-mysql\n"
        "source: {type: app, name: marketing/web/blog}\ndestination: mysql\n"
    )
    commit_all(repo, "the blog reaches MySQL")
    args = ("--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies"))
    args += ("--inventory", str(repo / "fleet"))
    return repo, args, "cell-07"


def refused(parts: list[str], *more: str) -> str:
    """Merge in every format: each must fail, say why, and never say "No changes"."""
    messages = set()
    for fmt in FORMATS:
        code, out, err = cli("plan", "--merge", *parts, *more, "--format", fmt)
        assert code == 1, (fmt, out)
        assert out == "" and "No changes" not in err and "Traceback" not in err
        messages.add(err)
    (message,) = messages
    return message


def test_dropping_the_shard_with_the_only_change_fails_the_merge(tmp_path, one_change):
    _repo, args, changed = one_change
    parts = shard_files(tmp_path / "parts", 4, *args)
    holder = shard_of(changed, 4)
    merge = ("plan", "--merge", *policies_flag(_repo), "--format", "text", "--detailed-exitcode")
    code, out, _err = cli(*merge[:2], *parts, *merge[2:])
    assert code == 2 and "Plan: 1 cell changes, 1 container gains access" in out
    others = [p for i, p in enumerate(parts, 1) if i != holder]
    assert f"shard {holder}/4 missing" in refused(others)
    # Renamed copies of another shard in its place: "given twice", not a plan.
    twice = [*others, others[0]]
    assert "is given twice" in refused(twice)


def test_a_partial_of_another_head_fails_the_merge(tmp_path, one_change):
    repo, args, _changed = one_change
    old = shard_files(tmp_path / "old", 3, *args)
    edit(repo, "security-groups/platform-dns.yaml", 'ports: "53"', 'ports: "53,853"')
    commit_all(repo, "a second push")
    new = shard_files(tmp_path / "new", 3, *args)
    assert "partials of one plan only" in refused([new[0], old[1], new[2]])
    # All stale, and consistent among themselves: the expected head still refuses them.
    head = git(repo, "rev-parse", "HEAD")
    message = refused(old, "--head", head, "--policies", str(repo / "policies"))
    assert "stale" in message and old[0] in message
    assert (
        cli("plan", "--merge", *new, "--head", head, "--policies", str(repo / "policies"))[0] == 0
    )


def rewrite(path: str, change) -> None:
    doc = json.loads(Path(path).read_text())
    change(doc)
    Path(path).write_text(json.dumps(doc))


def test_an_edited_partial_whose_cells_overlap_fails_the_merge(tmp_path, one_change):
    _repo, args, changed = one_change
    parts = shard_files(tmp_path / "parts", 3, *args)
    holder = shard_of(changed, 3)
    other = next(i for i in (1, 2, 3) if i != holder)
    held = json.loads(Path(parts[holder - 1]).read_text())
    cell_diff = next(x for x in held["report"]["diff"]["cells"] if x["cell"] == changed)

    def claim_the_changed_cell_unchanged(doc):
        # Another shard says it covers the changed cell, and that it does not change.
        doc["covers"].append(changed)
        doc["report"]["diff"]["cells"].append({**cell_diff, "chains": []})

    rewrite(parts[other - 1], claim_the_changed_cell_unchanged)
    message = refused(parts)
    assert f"covers is not shard {other}/3's cells" in message and changed in message

    # The holder, edited to drop the cell (and its diff): its coverage no longer adds up.
    parts = shard_files(tmp_path / "again", 3, *args)

    def drop_the_changed_cell(doc):
        doc["covers"].remove(changed)
        doc["report"]["diff"]["cells"] = [
            x for x in doc["report"]["diff"]["cells"] if x["cell"] != changed
        ]
        doc["report"]["diff"]["principals"] = []

    rewrite(parts[holder - 1], drop_the_changed_cell)
    assert "covers is not shard" in refused(parts)

    # Covers left alone, the cell's diff taken out: each covered cell must be diffed once.
    parts = shard_files(tmp_path / "third", 3, *args)
    rewrite(
        parts[holder - 1],
        lambda doc: doc["report"]["diff"].update(
            cells=[x for x in doc["report"]["diff"]["cells"] if x["cell"] != changed]
        ),
    )
    assert "report.diff.cells: not shard" in refused(parts)


def test_a_partial_that_diffs_or_hides_a_principal_fails_the_merge(tmp_path, one_change):
    """The merge diffs every principal itself; a partial that brings a principal's diff,
    or hides one by dropping or shrinking its facts, is refused (its counts must add up
    to the containers its cells' diffs hold)."""
    repo, args, changed = one_change
    parts = shard_files(tmp_path / "parts", 3, *args)
    merged = cli("plan", "--merge", *parts, *policies_flag(repo), "--format", "json")
    (blog,) = json.loads(merged[1])["principals"]
    assert blog["name"] == "marketing/web/blog"
    holder = shard_of(changed, 3) - 1
    other = (holder + 1) % 3

    def add_a_principal(doc):
        forged = PrincipalDiff("app", blog["space_id"], BLOG, "blog", "app", 1, 1, (), ())
        doc["report"]["diff"]["principals"] = [_encode(forged)]

    rewrite(parts[other], add_a_principal)
    assert "a partial diffs no principal" in refused(parts)

    parts = shard_files(tmp_path / "hide", 3, *args)
    facts = json.loads(Path(parts[holder]).read_text())["facts"][0]["facts"]
    blog_fact = next(f for f in facts["principals"] if f["app_id"] == BLOG)
    rewrite(
        parts[holder],
        lambda d: d["facts"][0]["facts"].update(
            principals=[f for f in d["facts"][0]["facts"]["principals"] if f != blog_fact]
        ),
    )
    assert "facts[0]" in refused(parts) and "containers" in refused(parts)

    parts = shard_files(tmp_path / "shrink", 3, *args)
    rewrite(parts[holder], lambda d: d["facts"][0]["facts"]["principals"][0].update(cells=99))
    assert "cannot be counted on" in refused(parts)

    # Against an empty policy instead of the base: every grant would show as gained.
    parts = shard_files(tmp_path / "empty", 3, *args)
    rewrite(parts[holder], lambda d: d["facts"][0].update(against=""))
    assert "facts: not one per diff, against each diff's base" in refused(parts)


def test_a_partial_of_another_inventory_read_fails_the_merge(tmp_path, one_change):
    repo, args, _changed = one_change
    parts = shard_files(tmp_path / "parts", 2, *args)
    store = repo / "fleet" / "cell-03.json"
    store.write_text(dump_store([c("be-3", "198.18.3.9", BACKEND, PROD, PAYMENTS)]))
    later = shard_files(tmp_path / "later", 2, *args)
    assert "different inventories" in refused([parts[0], later[1]])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(version=1), "version 1; this asgctl reads version 2"),
        (lambda d: d.update(kind="terraform-plan"), "not an asgctl plan partial"),
        (lambda d: d.update(partition="first half"), "partition 'first half'"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d.pop("covers"), "missing field 'covers'"),
        (lambda d: d["shard"].update(index=9), "shard 9 of 2 must be 1 to 2"),
        (lambda d: d["report"].update(error=7), "report.error: expected a string, got int"),
        (
            lambda d: d["report"]["diff"]["cells"][0].update(rules_added=1),
            "report.diff.cells[0]: unknown field 'rules_added'",
        ),
        (
            lambda d: d["report"]["diff"]["cells"][0].update(containers=True),
            "report.diff.cells[0].containers: expected an integer, got bool",
        ),
        (lambda d: d["head"].update(sha="0" * 40), "head: the header and the report disagree"),
        (lambda d: d["inventory"]["cells"].append("cell-00"), "names a cell twice"),
    ],
)
def test_a_partial_that_breaks_the_schema_is_named_with_its_field(
    tmp_path, one_change, change, expected
):
    _repo, args, _changed = one_change
    parts = shard_files(tmp_path / "parts", 2, *args)
    rewrite(parts[0], change)
    message = refused(parts)
    assert expected in message and parts[0] in message


def test_a_partial_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "plan-1.json"
    bad.write_text('{"kind": "asgctl-plan-partial", "version": 1, "kind": "x"}')
    assert "duplicate" in refused([str(bad)]).lower()
    bad.write_text("[" * 10_000)
    assert str(bad) in refused([str(bad)])
    assert "cannot read it" in refused([str(tmp_path / "missing.json")])


def test_partials_round_trip_without_loss(tmp_path):
    """The codec is lossless: a partial read back is the report that was written."""
    repo = store_fleet(tmp_path, cells=12)
    for i in (1, 2):
        report = run_plan(
            str(repo / "policies"),
            "HEAD~1",
            "HEAD",
            (str(repo / "fleet"),),
            shard=Shard(i, 2),
        )
        text = dump_partial(report)
        doc = json.loads(text)
        assert (doc["kind"], doc["version"]) == (KIND, VERSION)
        assert doc["head"]["sha"] == report.head.sha and doc["shard"] == {"index": i, "count": 2}
        assert load_partial(text, "p") == report
    policies, fleet = str(repo / "policies"), (str(repo / "fleet"),)
    with pytest.raises(PartialError, match="no partials"):
        merge_partials([], revision_loader(policies))
    whole = run_plan(policies, "HEAD~1", "HEAD", fleet)
    alone = run_plan(policies, "HEAD~1", "HEAD", fleet, shard=Shard(1, 1))
    assert (
        whole.shard is None and merge_partials([("p", alone)], revision_loader(policies)) == whole
    )


# ----------------------------------------------------------------------------- the comment


def fleet_change(cells: int = 10_000) -> PlanReport:
    """A change to every cell of a 10,000-cell fleet, as the report holds it: a chain created
    and one updated per cell, a distinct change per principal (nothing groups them), every
    cell over CF's rule warning, refused by its gate, and a warning per cell."""
    diffs = []
    for n in range(cells):
        create = ChainDiff(4, f"ASG-G-{n:022x}", "create", 2, 0, (f"+ -A x{n}", f"+ -A y{n}"))
        update = ChainDiff(4, f"ASG-C-{n:022x}", "update", 1, 1, (f"- -j a{n}", f"+ -j b{n}"))
        diffs.append(
            CellDiff(
                f"cell-{n:05d}",
                f"refs/remotes/origin/status/cell-{n:05d}",
                250,
                1,
                (create, update),
                160_000,
                160_001,
                2_000,
                2_001,
                RevokeCount(net_lost=900, total=1_000, lost=900, containers_losing=200),
            )
        )
    principals = []
    for n in range(cells):
        port = 1024 + n
        access = Access("tcp", AddressRange(4, 0xC6130000, 0xC61300FF), (PortRange(port, port),))
        lost = (AccessChange(access, (f"SecurityGroup/g{n} rules[0] changed",)),)
        principals.append(
            PrincipalDiff(
                "running",
                f"space-{n:05d}",
                f"app-{n:05d}",
                f"org/space/app-{n:05d}",
                "app",
                25,
                10,
                (),
                lost,
                containers_losing=25,
            )
        )
    principals.sort(key=principal_order)
    notices = tuple(n for c in diffs for n in _limit_notices(c))
    diff = PlanDiff(tuple(diffs), tuple(principals), notices)
    return PlanReport(
        base=Revision("main", "b" * 40),
        head=Revision("pr", "a" * 40),
        policies="policies",
        inventory=f"status branches ({cells:,} cells)",
        diff=diff,
        warnings=tuple(f"status/cell-{n:05d}: skipped (a bad field)" for n in range(cells)),
    )


def table_rows(comment: str, header: str) -> list[str]:
    """The rows of the table whose header line starts with `header`."""
    lines = comment.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    columns = lines[start].count("|")
    assert all(r.count("|") == columns for r in rows), "a row cut mid-table"
    return rows


@pytest.mark.parametrize("limit", [COMMENT_LIMIT, 20_000])
def test_a_ten_thousand_cell_change_summarises_within_the_comment_limit(limit):
    report = fleet_change()
    comment = render_markdown(report, limit)
    assert len(comment) <= limit < 65_536
    assert comment.startswith(MARKER)
    assert "**Plan: 10,000 cells change, 0 containers gain access, 250,000 lose access;" in comment
    # Counts per kind of change, for all of it.
    counts = dict(r.removesuffix(" |").split(" | ")[:2] for r in table_rows(comment, "| change |"))
    assert counts["| cells changing"] == "10,000 of 10,000"
    assert counts["| chains created / updated / destroyed"] == "10,000 / 10,000 / 0"
    assert counts["| principals losing access (containers)"] == "10,000 (250,000)"
    assert counts["| cells whose mass-revoke gate refuses"] == "10,000"
    # The first cells in the plan's order, and a closing row saying how many more.
    rows = table_rows(comment, "| cell | containers |")
    *listed, more = rows
    shown = [r.split(" | ")[0].removeprefix("| ") for r in listed]
    assert shown == [c.cell for c in report.diff.changed_cells[: len(shown)]] and shown
    assert f"| … and {10_000 - len(shown):,} more changed cells (the full report) |" in more
    # The first principals in the plan's order, and a line saying how many more.
    firsts = [p.name for p in report.diff.principals[:3]]
    assert all(f"<b>{name}</b>" in comment for name in firsts)
    assert re.search(r"^- … and [\d,]+ more access changes \(the full report\)$", comment, re.M)
    # Lists that grow with the fleet are bounded, and say how much is left out.
    assert "> **And 9,970 more cells over CF's rule limits** (0 of them errors)" in comment
    assert "> **And 9,970 more warnings:** see the full report." in comment
    assert "| and 9970 more | | | |" in comment  # the gate table
    assert "Cut to fit one comment" in comment and "log and artifact" in comment


def test_a_huge_finding_list_and_long_warnings_still_fit():
    findings = tuple(
        Finding(
            f"security-groups/g{n}.yaml",
            3,
            5,
            "error",
            "SecurityGroup",
            f"g{n}",
            "rules",
            "destination is not an address " + "x" * 300,
        )
        for n in range(5_000)
    )
    failed = PlanReport(
        Revision("main", "b" * 40), Revision("pr", "a" * 40), "policies", "", head_findings=findings
    )
    comment = render_markdown(failed)
    assert len(comment) <= COMMENT_LIMIT and "more: asgctl validate lists all" in comment
    report = replace(fleet_change(40), warnings=("w" * 100_000,) * 40)
    comment = render_markdown(report)
    assert len(comment) <= COMMENT_LIMIT
    assert "(98,500 more characters in the full report)" in comment
