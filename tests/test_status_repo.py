"""Status in its own, sharded repositories, read by one batched, cached, bounded reader.

Issue 19: at 10,000 cells every status push pays for every ref of the repository it goes to
(bench/results/fleet.md), so the agents can push to separate status repositories
(`status-url`, `{shard}` in it, `status-shards` N), and every reader -- `asgctl status`,
`asgctl plan --inventory status`, the waves -- reads them through one reader
(`reconciler.status.fetch`): one fetch per repository into an incremental cache, files
parsed once per blob, within a budget.  The repositories here are real bare repositories
(file://) written by the real status writer; whoever can push a status branch is untrusted,
so every attack on the reader is a test here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from asgctl_lab.gitserver import GitDaemon, git
from asgctl_lab.netns import Lab
from reconciler.agent.config import ConfigError, build_config
from reconciler.agent.fleet import read_fleet
from reconciler.agent.peers import PeerReader
from reconciler.cli import main
from reconciler.sources.inventories import StatusBranches
from reconciler.status import fetch as status_fetch
from reconciler.status.branch import shard_of, shard_url
from reconciler.status.fetch import (
    PARSED_DIR,
    FetchError,
    ReadBudget,
    StatusRepos,
    read_remote,
    status_cache,
)
from reconciler.status.read import HEADER, read_remote_containers
from reconciler.status.write import StatusPushError, StatusWriter, dump_status
from tests.agentkit import (  # noqa: F401 - fixtures
    AgentProc,
    PolicyRepo,
    agents,
    container,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    tcp_rules,
    wait_for,
    write_store,
)
from tests.conftest import require_netns
from tests.policyrepo import commit_all, init_repo, write_tree

pytestmark = pytest.mark.requires("git")

REV = "main@sha1:" + "b" * 40


def status(cell: str, ready: str = "True", containers: int = 2, **extra: object) -> str:
    doc = {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "cell": cell,
        "lastAppliedRevision": REV,
        "observedRevision": REV,
        "conditions": [{"type": "Ready", "status": ready, "reason": "Ok", "message": ""}],
        "containers": [
            {
                "handle": f"{cell}-h{i}",
                "ip": f"198.18.{shard_of(cell, 200)}.{i + 2}",
                "app_id": "app-web",
                "space_id": "space-prod",
                "org_id": "org-acme",
                "workload": "app",
            }
            for i in range(containers)
        ],
        **extra,
    }
    return dump_status(doc)


class Shards:
    """N bare status repositories on disk and a writer per cell, as the agents push."""

    def __init__(self, root: Path, shards: int) -> None:
        self.root = root
        for i in range(shards):
            git("init", "-q", "--bare", "-b", "main", str(root / f"status-{i}.git"))
        self.repos = StatusRepos(f"file://{root}/status-{{shard}}.git", shards)

    def bare(self, shard: int) -> Path:
        return self.root / f"status-{shard}.git"

    def push(self, cell: str, text: str, url: str | None = None) -> None:
        """`cell`'s agent pushes `text`; `url` (another shard) is a hostile pusher."""
        work = self.root / "writers" / f"{cell}-{abs(hash(url))}.git"
        StatusWriter(url or self.repos.url_for(cell), f"status/{cell}", work).push(text, "s")

    def branches(self, shard: int) -> list[str]:
        out = git("--git-dir", str(self.bare(shard)), "for-each-ref", "--format=%(refname)")
        return out.split()


@pytest.fixture
def shards(tmp_path: Path) -> Shards:
    return Shards(tmp_path / "srv", 3)


# -- where a cell's status lives --------------------------------------------------------------


def test_a_cells_shard_is_sha256_of_its_name_mod_n_the_same_in_every_reader() -> None:
    # Pinned: a change to the function moves every cell of every fleet to another shard.
    assert [shard_of("cell-1", n) for n in (1, 2, 3, 4, 16, 1024)] == [0, 0, 2, 2, 14, 606]
    assert [shard_of("late-1", n) for n in (1, 2, 3, 4, 16, 1024)] == [0, 1, 0, 1, 5, 245]
    for cell in ("diego-cell-0", "a", "cell_b.1"):
        digest = hashlib.sha256(cell.encode()).digest()
        assert shard_of(cell, 7) == int.from_bytes(digest[:8], "big") % 7
    assert shard_url("https://git/x/status-{shard}.git", 3) == "https://git/x/status-3.git"
    assert StatusRepos("git://h/s-{shard}", 2).urls() == ("git://h/s-0", "git://h/s-1")
    assert StatusRepos("git://h/p.git").url_for("cell-1") == "git://h/p.git"


def test_agent_settings_name_the_status_repository_and_are_checked() -> None:
    base = {"source": "https://ops:hunter2@git.example/p.git", "containers": "/s.json"}
    cfg = build_config(base, {})
    assert cfg.status_repos() == StatusRepos(base["source"], 1)  # default: nothing changes
    url = "https://ops:hunter2@git.example/status-{shard}.git"
    cfg = build_config({**base, "status-url": url, "status-shards": 4}, {"cell": "cell-1"})
    assert cfg.status_repos().url_for("cell-1") == url.replace("{shard}", "2")
    shown = json.dumps(cfg.public())
    assert "hunter2" not in shown and '"statusShards": 4' in shown
    with pytest.raises(ConfigError, match="status-url: 4 shards need"):
        build_config({**base, "status-shards": 4}, {})
    with pytest.raises(ConfigError, match="status-shards: from 1"):
        build_config({**base, "status-url": url, "status-shards": 0}, {})
    with pytest.raises(ConfigError, match="status-shards: expected a whole number"):
        build_config({**base, "status-shards": "many"}, {})


def test_a_status_push_that_fails_never_shows_the_urls_credentials(tmp_path: Path) -> None:
    url = "http://ops:hunter2@127.0.0.1:9/status-0.git"
    with pytest.raises(StatusPushError) as err:
        StatusWriter(url, "status/c", tmp_path / "w.git", timeout=10).push("a: 1\n", "s")
    assert "hunter2" not in str(err.value)
    repos = StatusRepos("http://ops:hunter2@127.0.0.1:9/status-{shard}.git", 2)
    with status_cache(None) as repo, pytest.raises(FetchError) as fetch:
        read_remote(repo, repos, HEADER, timeout=10)
    assert "hunter2" not in str(fetch.value) and "***@127.0.0.1" in str(fetch.value)
    fleet = PeerReader(repos, tmp_path / "peers.git", timeout=10).read()
    assert fleet.error and "hunter2" not in fleet.error


# -- the reader: routing, cache, budget --------------------------------------------------------


@pytest.mark.parametrize("named", [200, 0], ids=["by-name", "by-pattern"])
def test_every_shard_is_read_and_a_branch_in_the_wrong_shard_is_named_and_ignored(
    shards: Shards, tmp_path: Path, named: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Few changed branches are fetched by name, many by the pattern (then the branches the
    # listing did not want are deleted from the cache): both end in the same read.
    monkeypatch.setattr(status_fetch, "MAX_NAMED", named)
    cells = [f"cell-{i}" for i in range(9)]
    for cell in cells:
        shards.push(cell, status(cell))
    assert {shard_of(c, 3) for c in cells} == {0, 1, 2}  # every shard holds some
    # The attack: whoever can push to shard 0 forges a Ready status for a cell of shard 2,
    # and one for a cell that reports nowhere else.
    victim = next(c for c in cells if shard_of(c, 3) == 2)
    forged = status(victim, containers=0, lastAppliedRevision="main@sha1:" + "f" * 40)
    shards.push(victim, forged, url=shard_url(shards.repos.url, 0))
    ghost = next(f"ghost-{i}" for i in range(50) if shard_of(f"ghost-{i}", 3) == 1)
    shards.push(ghost, status(ghost), url=shard_url(shards.repos.url, 0))
    with status_cache(tmp_path / "cache.git") as repo:
        batch = read_remote(repo, shards.repos, HEADER)
    assert [c.cell for c in batch.cells] == cells and not any(c.error for c in batch.cells)
    held = git("--git-dir", str(tmp_path / "cache.git"), "for-each-ref", "--format=%(refname)")
    assert sorted(r.rsplit("/", 1)[1] for r in held.split()) == cells  # no forged branch kept
    assert {c.cell: c.value["lastAppliedRevision"] for c in batch.cells}[victim] == REV
    assert len(batch.skipped) == 2
    said = " ".join(batch.skipped)
    assert f"status/{victim} in file://" in said and "belongs in shard 2 of 3" in said
    assert f"status/{ghost}" in said and "belongs in shard 1 of 3, not shard 0" in said


def test_a_reader_of_some_cells_parses_only_those_fetches_every_cell_and_names_forgeries(
    shards: Shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plan job reads only its shard of the fleet in full (`only`: cell -> parse it?).  The
    # listing stays whole (counted against the budget, routed, forgeries named) and every
    # routed cell is fetched (the job reads every document's claim), but only the cells
    # kept are parsed; the parses of the others stay in a kept cache for other reads.
    monkeypatch.setattr(status_fetch, "MAX_NAMED", 0)  # many changed: fetched by the pattern
    cells = [f"cell-{i}" for i in range(9)]
    for cell in cells:
        shards.push(cell, status(cell))
    mine = [c for c in cells if shard_of(c, 2) == 0]
    others = [c for c in cells if c not in mine]
    assert mine and others
    # The attack: a shard-0 pusher forges a cell this job does not read.
    victim = next(c for c in others if shard_of(c, 3) != 0)
    shards.push(victim, status(victim, ready="False"), url=shard_url(shards.repos.url, 0))
    seen: list[str] = []

    def spy(data: bytes, origin: str) -> Any:
        seen.append(origin)
        return HEADER.fn(data, origin)

    parse = status_fetch.Parse(HEADER.kind, spy)
    cache = tmp_path / "cache.git"

    def read(only: Callable[[str], bool] | None) -> status_fetch.StatusBatch:
        seen.clear()
        with status_cache(cache) as repo:
            return read_remote(repo, shards.repos, parse, only=only)

    def held() -> list[str]:
        out = git("--git-dir", str(cache), "for-each-ref", "--format=%(refname)")
        return sorted(r.rsplit("/", 1)[1] for r in out.split())

    def in_cache(cell: str) -> bool:
        shard = shard_of(cell, 3)
        blob = git("--git-dir", str(shards.bare(shard)), "rev-parse", f"status/{cell}:status.yaml")
        found = status_fetch.gitio.blob_sizes(cache, [blob])
        return found[0] is not None

    ours = read(lambda c: shard_of(c, 2) == 0)
    assert [c.cell for c in ours.cells] == mine and not any(c.error for c in ours.cells)
    assert ours.left_out == len(others) and ours.parsed == len(mine)
    assert sorted(o.split("/")[-1].split(":")[0] for o in seen) == mine  # nothing else parsed
    assert held() == cells and all(in_cache(c) for c in others)  # but every cell fetched
    assert [c for c, _ref in ours.listing] == cells
    assert len(ours.skipped) == 1 and f"status/{victim} in file://" in ours.skipped[0]
    # The whole fleet from the same cache: only the cells left out are parsed;
    # then the filtered read again forgets nothing the whole-fleet read still wants.
    whole = read(None)
    assert [c.cell for c in whole.cells] == cells and whole.parsed == len(others)
    assert whole.left_out == 0 and held() == cells
    again = read(lambda c: shard_of(c, 2) == 0)
    assert again.parsed == 0 and again.cells == ours.cells and held() == cells
    assert read(None).parsed == 0
    # The count budget is over the whole listing, whatever the filter.
    with status_cache(None) as repo, pytest.raises(FetchError, match="over the"):
        read_remote(repo, shards.repos, HEADER, budget=ReadBudget(max_branches=9), only=bool)


def test_the_plan_inventory_reads_only_the_cells_its_filter_keeps(
    shards: Shards, tmp_path: Path
) -> None:
    for cell in ("cell-1", "cell-2", "late-1"):
        shards.push(cell, status(cell, containers=2))
    shards.push("cell-2", status("cell-2", containers=0), url=shard_url(shards.repos.url, 0))
    keep = {"cell-1", "late-1"}
    remote = StatusBranches(
        ".", remote=shards.repos, cache=str(tmp_path / "c"), only=keep.__contains__
    )
    found = remote.read()
    assert [c.cell for c in found.cells] == ["cell-1", "late-1"] and found.left_out == 1
    assert [len(c.containers) for c in found.cells] == [2, 2]
    assert len(found.skipped) == 1 and "status/cell-2 in file://" in found.skipped[0]
    # The same filter over the branches a clone holds (here: one status repository).
    one = Shards(tmp_path / "one", 1)
    for cell in ("cell-1", "cell-2", "late-1"):
        one.push(cell, status(cell, containers=1))
    local = StatusBranches(str(one.bare(0)), only=keep.__contains__).read()
    assert [c.cell for c in local.cells] == ["cell-1", "late-1"] and local.left_out == 1


def test_a_kept_cache_fetches_and_parses_only_what_changed_and_forgets_deleted_branches(
    shards: Shards, tmp_path: Path
) -> None:
    cells = [f"cell-{i}" for i in range(6)]
    for cell in cells:
        shards.push(cell, status(cell))
    cache = tmp_path / "cache.git"

    def read() -> object:
        with status_cache(cache) as repo:
            return read_remote(repo, shards.repos, HEADER)

    first = read()
    assert (
        first.parsed == 6
        and [c.value["conditions"][0]["status"] for c in first.cells] == ["True"] * 6
    )
    warm = read()
    assert warm.parsed == 0 and warm.cells == first.cells  # every parse from the cache
    shards.push("cell-3", status("cell-3", ready="False"))  # one cell changes
    gone = shard_of("cell-5", 3)
    git("--git-dir", str(shards.bare(gone)), "update-ref", "-d", "refs/heads/status/cell-5")
    changed = read()
    assert changed.parsed == 1
    assert [c.cell for c in changed.cells] == cells[:5]
    assert {c.cell: c.value["conditions"][0]["status"] for c in changed.cells}["cell-3"] == "False"
    refs = git("--git-dir", str(cache), "for-each-ref", "--format=%(refname)").split()
    assert f"refs/shards/{gone}/status/cell-5" not in refs and len(refs) == 5
    kept = list((cache / PARSED_DIR / HEADER.kind).rglob("*.json"))
    assert len(kept) == 5  # the parses of replaced and deleted files are dropped
    # A smaller fleet of shards: the old shard's refs are not read as the new ones'.
    two = StatusRepos(shards.repos.url, 2)
    with status_cache(cache) as repo:
        regrouped = read_remote(repo, two, HEADER)
    assert all(shard_of(c.cell, 2) == int(c.ref.split("/")[2]) for c in regrouped.cells)


def test_forked_workers_read_parse_and_store_in_chunks_what_one_process_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many cells are parsed by forked workers, each reading its own blobs in chunks of its
    # share of CHUNK_BYTES and writing their cache files; the reader gets the same cells.
    bare = tmp_path / "status-0.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    cells = [f"cell-{n:03d}" for n in range(160)]
    stream = "".join(
        f"commit refs/heads/status/{cell}\ncommitter t <t@example.invalid> 1700000000 +0000\n"
        f"data 1\nx\nM 100644 inline status.yaml\ndata {len(text.encode())}\n{text}\n"
        for cell in cells
        for text in [
            status(cell, containers=len(cell) % 4 + int(cell[-1]) % 3)
            if cell != "cell-077"
            else "- no\n"
        ]
    )
    git("--git-dir", str(bare), "fast-import", "--quiet", input=stream)
    repos = StatusRepos(f"file://{bare}")
    monkeypatch.setattr(status_fetch, "CHUNK_BYTES", 20_000)  # many chunks per worker
    with status_cache(tmp_path / "one.git") as repo:
        one = read_remote(repo, repos, HEADER, workers=1)
    with status_cache(tmp_path / "forked.git") as repo:
        forked = read_remote(repo, repos, HEADER, workers=2)
    assert forked.cells == one.cells and forked.parsed == one.parsed == len(cells)
    assert [c.cell for c in forked.cells if c.error] == ["cell-077"]
    kept = list((tmp_path / "forked.git" / PARSED_DIR / HEADER.kind).rglob("*"))
    assert sum(p.suffix == ".json" for p in kept) == len(
        {json.dumps(c.value) for c in one.cells if not c.error}
    )
    assert not [p for p in kept if p.suffix == ".tmp"]
    with status_cache(tmp_path / "forked.git") as repo:
        warm = read_remote(repo, repos, HEADER, workers=2)
    assert warm.parsed == 1 and warm.cells == one.cells  # only the bad file is parsed again


def test_a_hostile_status_branch_costs_only_its_own_cell_and_never_passes_the_budget(
    shards: Shards, tmp_path: Path
) -> None:
    for cell in ("a-good", "z-good"):
        shards.push(cell, status(cell))
    shards.push("b-list", "- a\n- b\n")
    shards.push("c-bomb", "a: &a [*a, *a]\nb: " + "[" * 100 + "\n")
    shards.push("d-huge", "x: '" + "y" * 5000 + "'\n")
    shards.push("e-types", status("e-types", conditions="no"))
    shards.push("f-bin", "\x00\xff" * 10)
    budget = ReadBudget(max_branches=100, max_blob=4096, max_total=1_000_000)
    with status_cache(None) as repo:
        batch = read_remote(repo, shards.repos, HEADER, budget=budget)
    by = {c.cell: c for c in batch.cells}
    assert set(by) == {"a-good", "z-good", "b-list", "c-bomb", "d-huge", "e-types", "f-bin"}
    assert not by["a-good"].error and not by["z-good"].error
    for cell in ("b-list", "c-bomb", "d-huge", "e-types", "f-bin"):
        assert by[cell].error.startswith(f"refs/shards/{shard_of(cell, 3)}/status/{cell}:")
        assert by[cell].value is None
    assert "over the limit of 4096 bytes" in by["d-huge"].error
    assert "conditions" in by["e-types"].error
    # The total: files are counted in cell order, and the first past the budget is not read.
    sizes = {c: len(status(c)) for c in ("a-good", "z-good")}
    small = ReadBudget(max_blob=4096, max_total=sizes["a-good"] + 1000)  # d-huge: not counted
    with status_cache(None) as repo:
        capped = read_remote(repo, shards.repos, HEADER, budget=small)
    said = {c.cell: c.error for c in capped.cells}
    assert said["a-good"] == "" and "pass the read's budget of" in said["z-good"]
    assert capped.parsed < len(capped.cells)  # refused files were never read
    # Too many branches over all shards: the read refuses before fetching any of them.
    with status_cache(tmp_path / "c.git") as repo, pytest.raises(FetchError, match="over the"):
        read_remote(repo, shards.repos, HEADER, budget=ReadBudget(max_branches=6))
    refs = git("--git-dir", str(tmp_path / "c.git"), "for-each-ref", "--format=%(refname)")
    assert len(refs.split()) <= 6


def test_a_status_branch_with_a_deep_history_is_fetched_one_commit_deep(
    shards: Shards, tmp_path: Path
) -> None:
    cell = "cell-1"
    bare = shards.bare(shard_of(cell, 3))
    work = tmp_path / "pusher"
    init_repo(work)
    for i in range(30):
        write_tree(work, {"status.yaml": status(cell, containers=i % 3)})
        commit_all(work, f"history {i}")
    git("push", "-q", "--", str(bare), "HEAD:refs/heads/status/cell-1", cwd=work)
    with status_cache(tmp_path / "cache.git") as repo:
        batch = read_remote(repo, shards.repos, HEADER)
        assert [c.cell for c in batch.cells] == [cell] and not batch.cells[0].error
        count = git("--git-dir", str(repo), "rev-list", "--count", "--all")
    assert count == "1"


# -- the readers -----------------------------------------------------------------------------


def test_asgctl_status_reads_every_shard_and_the_policy_repo_holds_no_status(
    shards: Shards, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.git"
    git("init", "-q", "--bare", "-b", "main", str(policy))
    work = init_repo(tmp_path / "work")
    write_tree(work, {"policies/sg.yaml": sg("web", [])})
    head = commit_all(work, "policy")
    git("push", "-q", "--", str(policy), "main", cwd=work)
    for cell in ("cell-1", "cell-2", "late-1"):
        shards.push(cell, status(cell, ready="False" if cell == "late-1" else "True"))
    args = ["status", "--source", f"file://{policy}", "--status-url", shards.repos.url]
    result = CliRunner().invoke(main, [*args, "--status-shards", "3", "--format", "json"])
    assert result.exit_code == 3, result.output  # late-1 is not Ready
    fleet = json.loads(result.output)
    assert fleet["head"] == head and [c["cell"] for c in fleet["cells"]] == [
        "cell-1",
        "cell-2",
        "late-1",
    ]
    assert git("--git-dir", str(policy), "for-each-ref", "refs/heads/status/") == ""
    # Read with another shard count than the agents', a branch in a shard its cell does not
    # hash to is named, not shown as that cell (cell-1, in status-2, is not looked at).
    wrong = read_fleet(f"file://{policy}", "main", None, StatusRepos(shards.repos.url, 2))
    assert [c.cell for c in wrong.cells] == ["cell-2"]
    assert len(wrong.skipped) == 1 and "late-1 belongs in shard 1 of 2" in wrong.skipped[0]
    bad = CliRunner().invoke(main, ["status", "--source", "x", "--status-shards", "2"])
    assert bad.exit_code == 2 and "{shard}" in bad.output


def test_plan_inventory_status_reads_the_status_repositories(
    shards: Shards, tmp_path: Path
) -> None:
    work = init_repo(tmp_path / "work")
    write_tree(work, {"policies/sg.yaml": sg("web", [])})
    commit_all(work, "policy")
    for cell in ("cell-1", "cell-2", "late-1"):
        shards.push(cell, status(cell, containers=3))
    shards.push("cell-2", status("cell-2", containers=1), url=shard_url(shards.repos.url, 2))
    cache = tmp_path / "plan-cache"
    args = [
        "plan",
        "--policies",
        str(work / "policies"),
        "--base",
        "HEAD",
        "--inventory",
        "status",
        "--status-url",
        shards.repos.url,
        "--status-shards",
        "3",
        "--status-cache",
        str(cache),
        "--format",
        "json",
    ]
    for _ in range(2):  # cold, then from the cache
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["inventory"] == "status branches (3 cells)", report["inventory"]
        assert any("belongs in shard" in w for w in report["warnings"]), report["warnings"]
    found = read_remote_containers(shards.repos, str(cache))
    assert {c.cell: len(c.containers) for c in found.cells} == {
        "cell-1": 3,
        "cell-2": 3,
        "late-1": 3,
    }
    alone = CliRunner().invoke(main, [*args[:7], "--status-shards", "2"])
    assert alone.exit_code == 2 and "go with --status-url" in alone.output


def test_the_waves_read_the_peers_from_every_shard(shards: Shards, tmp_path: Path) -> None:
    shards.push("canary-1", status("canary-1"))
    shards.push("late-1", status("late-1", ready="False"))
    forged = status("canary-1", ready="False")
    elsewhere = (shard_of("canary-1", 3) + 1) % 3
    shards.push("canary-1", forged, url=shard_url(shards.repos.url, elsewhere))
    reader = PeerReader(shards.repos, tmp_path / "peers.git")
    fleet = reader.read()
    assert fleet.error is None
    assert [(r.cell, r.ready) for r in fleet.cells] == [("canary-1", "True"), ("late-1", "False")]
    shards.push("late-1", status("late-1"))  # the next read sees the change
    assert [(r.cell, r.ready) for r in reader.read().cells][1] == ("late-1", "True")


# -- real agents -------------------------------------------------------------------------------

WAVES = """
kind: Rollout
name: fleet
waves:
  - name: canary
    cells: ["canary-*"]
    soak: 0s
"""


@pytest.mark.netns
def test_agents_push_to_their_shard_and_the_waves_and_readers_find_them_there(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    git_server: GitDaemon,  # noqa: F811
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    assert (shard_of("canary-1", 2), shard_of("late-1", 2)) == (0, 1)  # one in each
    statuses = [git_server.create(f"status-{i}") for i in range(2)]
    template = git_server.url("status-{shard}")
    labs = {name: make_lab([], [], conntrack=False) for name in ("canary-1", "late-1")}
    cells = {
        name: agents(
            name,
            source=policy_repo.url,
            containers=str(write_store(tmp_path / f"{name}.json", [container("c1", 1)])),
            netns=lab.cell,
            **{"status-url": template, "status-shards": 2, "underlay-interface": "uplink0"},
        )
        for name, lab in labs.items()
    }
    policy = {"sg.yaml": sg("web", tcp_rules(2)), "rollout.yaml": WAVES}
    c1 = policy_repo.commit("two rules, in waves", policy)

    def once(name: str) -> dict[str, Any]:
        res = cells[name].once()
        doc = read_status(statuses[shard_of(name, 2)], name)
        assert doc is not None, res.stderr
        return doc

    assert once("canary-1")["lastAppliedRevision"] == f"main@sha1:{c1}"
    assert once("late-1")["lastAppliedRevision"] == f"main@sha1:{c1}"
    assert read_status(statuses[1], "canary-1") is None  # each in its own shard only
    assert read_status(statuses[0], "late-1") is None
    heads = git("--git-dir", str(policy_repo.bare), "for-each-ref", "--format=%(refname)")
    assert heads.split() == ["refs/heads/main"]  # the policy repository: no status refs

    # The waves: late-1 reads canary-1 from shard 0 and waits until it holds c2 Ready.
    c2 = policy_repo.commit("three rules", {**policy, "sg.yaml": sg("web", tcp_rules(3))})
    doc = once("late-1")
    assert ready(doc)["reason"] == "WaitingForWave" and "canary-1" in ready(doc)["message"]
    assert once("canary-1")["lastAppliedRevision"] == f"main@sha1:{c2}"
    assert wait_for(lambda: once("late-1")["lastAppliedRevision"] == f"main@sha1:{c2}", 30, 0.5)

    # And the readers find both cells there.
    args = ["status", "--source", policy_repo.url, "--status-url", template]
    result = CliRunner().invoke(main, [*args, "--status-shards", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [c["cell"] for c in json.loads(result.output)["cells"]] == ["canary-1", "late-1"]


def test_notify_reads_the_status_repositories(shards: Shards, tmp_path: Path) -> None:
    from reconciler.notify.run import Settings, notify_once
    from reconciler.notify.sinks import GitHubStatuses
    from tests.notifykit import FakeGitHub

    work = init_repo(tmp_path / "work")
    write_tree(work, {"policies/sg.yaml": sg("web", [])})
    sha = commit_all(work, "policy")
    for cell in ("cell-1", "cell-2"):
        shards.push(cell, status(cell, lastAppliedRevision=f"main@sha1:{sha}"))
    with FakeGitHub() as github:
        sink = GitHubStatuses("acme/policy", "ghp_notify_test_token_0123456789", api=github.url)
        report = notify_once(
            Settings(str(work), tmp_path / "notify.json", github=sink, status=shards.repos)
        )
        assert report.ok, report.failed
        assert sorted(json.loads(s.body)["context"] for s in github.seen) == [
            "asgctl/cell-1",
            "asgctl/cell-2",
        ]
