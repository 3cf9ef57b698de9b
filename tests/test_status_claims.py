"""Every cell's claimed revision, read cheaply from its status document's first bytes.

Issue 19: a sharded `asgctl plan` job reads its own cells in full, and of the other shards'
cells only what the plan takes fleet-wide: the listing, each cell's *claimed* revision
(`lastAppliedRevision`) and a digest of the inventory (bench/results/plan_shard.md, "What a
job needs of the other shards' cells").  The claim is read from the first `CLAIM_BYTES` of
each document (`document.read_claim`, the `CLAIM` parse), where the agent writes it
(`agent/status.py`), and checked against the whole document for every cell read in full.

The agent's status commit also states the claim, as an `Asgctl-Applied-Revision` trailer
(`write.commit_message`); the reader then takes it from one `git for-each-ref` over the
commits and reads no document of a cell it leaves out (`read.read_claims`); a commit that
states none (an old agent's, a hand-pushed one) falls back to the first bytes.

Whoever can push a status branch writes every byte read here, so the attacks are tests:
first bytes that claim one revision while the whole YAML says another, a huge value before
the claim, a claim that is not a scalar.  Each fleet test runs against the branches of one
bare repository read as a clone's own refs (`local`) and fetched from a real git daemon on
loopback (`remote`), the two readers `asgctl plan --inventory status` has.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import GitDaemon
from reconciler.agent.config import build_config
from reconciler.agent.state import AgentState, Applied, Head
from reconciler.agent.status import build_status
from reconciler.core.compile import compile_cell
from reconciler.policy.load import load_folder
from reconciler.sources.inventories import StatusBranches, StatusRead
from reconciler.status.document import (
    CLAIM_BYTES,
    CLAIM_TRAILER,
    MAX_STATUS_BYTES,
    MAX_TRAILER_BYTES,
    Claim,
    parse_status,
    read_claim,
)
from reconciler.status.fetch import (
    PARSED_DIR,
    Parse,
    ReadBudget,
    StatusBatch,
    StatusRepos,
    moved_refs,
    read_local,
    read_remote,
    ref_trailers,
    status_cache,
)
from reconciler.status.read import CLAIM, CONTAINERS
from reconciler.status.write import StatusWriter, commit_message, dump_status
from tests.agentkit import container, sg, tcp_rules

pytestmark = pytest.mark.requires("git")

A = "main@sha1:" + "a" * 40
B = "main@sha1:" + "b" * 40
NOT_A_STRING = "lastAppliedRevision is not a one-line string"


def status(cell: str, applied: str = A, containers: int = 2, **extra: Any) -> bytes:
    """A status document in the agent's layout (header fields first, then containers)."""
    doc = {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "cell": cell,
        "observedRevision": applied,
        **extra,
        "lastAppliedRevision": applied,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": ""}],
        "containers": [
            {
                "handle": f"{cell}-h{i}",
                "ip": f"198.18.0.{i + 2}",
                "app_id": "app-web",
                "space_id": "space-prod",
                "org_id": "org-acme",
                "workload": "app",
            }
            for i in range(containers)
        ],
    }
    return dump_status(doc).encode()


# -- what the agent writes ---------------------------------------------------------------------

BASE_SETTINGS = {
    "source": "https://ops:hunter2@git.example.internal/platform/egress-policies.git",
    "cell": "diego-cell-0123456789abcdef",
    "containers": "/var/vcap/data/garden/store.json",
}
TYPICAL_SETTINGS = {
    **BASE_SETTINGS,
    "branch": "release/production-egress",
    "status-url": "https://git.example.internal/platform/status-{shard}.git",
    "status-shards": 16,
    "underlay-interface": ["eth0", "eth1"],
    "deny-networks": {
        "always": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"],
        "running": ["100.64.0.0/10"],
    },
}
# The settings that grow without bound: deny-network CIDRs and interfaces.
LONG_SETTINGS = {
    **TYPICAL_SETTINGS,
    "underlay-interface": [f"eth{i}" for i in range(16)],
    "fqdn-resolvers": [f"10.0.0.{i}:53" for i in range(1, 9)],
    "deny-networks": {
        lifecycle: [f"10.{i}.{j}.0/24" for i in range(10) for j in range(10)]
        + [f"fd00:{i:x}::/32" for i in range(100)]
        for lifecycle in ("always", "running", "staging")
    },
}


def agent_document(tmp_path: Path, settings: dict[str, Any], applied: bool) -> bytes:
    """What the agent pushes (`build_status`, `dump_status`) for a real config and a real
    compiled plan of 250 containers; `applied` False: nothing applied yet."""
    return dump_status(agent_status(tmp_path, settings, applied)).encode()


def agent_status(tmp_path: Path, settings: dict[str, Any], applied: bool) -> dict[str, Any]:
    """The document `agent_document` dumps (`build_status`)."""
    cfg = build_config(settings, {})
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "sg.yaml").write_text(sg("web", tcp_rules(3)))
    policy = load_folder(tmp_path / "policies").policy
    inventory = tuple(container(f"h{n:03d}", n) for n in range(250))
    plan = compile_cell(policy, inventory, cfg.cell)
    done = Applied("a" * 40, plan.digest(), "2027-01-15T08:00:00Z", inventory, policy, plan)
    state = AgentState(applied=done if applied else None, head=Head("b" * 40, "s", None, None))
    doc = build_status(
        state,
        cell=cfg.cell,
        settings=cfg.public(),
        agent={
            "version": "1.2.3+g0123456789ab",
            "backend": "nftables",
            "host": "d" * 63 + ".diego-cell.service.cf.internal",
            "pid": 4194304,
            "inventoryWatch": "inotify",
        },
        revision=cfg.revision,
        containers_path=cfg.containers,
        now="2027-01-15T08:00:00.123456Z",
    )
    return doc


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "nothing-applied"])
@pytest.mark.parametrize(
    ("settings", "within"),
    [(BASE_SETTINGS, 2_000), (TYPICAL_SETTINGS, 2_000), (LONG_SETTINGS, 13_000)],
    ids=["minimal", "typical", "600-deny-cidrs"],
)
def test_the_claim_of_what_the_agent_writes_is_its_whole_documents_revision(
    tmp_path: Path, settings: dict[str, Any], within: int, applied: bool
) -> None:
    # Where the line lands is what CLAIM_BYTES was chosen from (its docstring): about 1.4 KB
    # with typical settings, ten times under the bound; 12.4 KB with 600 deny CIDRs.
    data = agent_document(tmp_path, settings, applied)
    whole = parse_status(data, "x").header["lastAppliedRevision"]
    assert whole == (build_config(settings, {}).revision("a" * 40) if applied else "")
    assert read_claim(data) == Claim(whole)
    end = data.index(b"\n", data.index(b"\nlastAppliedRevision: ") + 1) + 1
    assert end <= within < CLAIM_BYTES
    # With its containers, the document is many times the bytes the claims read looks at.
    assert len(data) > 40_000 or not applied


# -- the rule ----------------------------------------------------------------------------------

CUT = CLAIM_BYTES - 13  # where a line of 26 bytes starts to cross the bound
FILL = CLAIM_BYTES - len("x: \nlastAppliedRevision: a\n")  # the line ends at the bound
ACROSS = CLAIM_BYTES - 1 - len("lastAppliedRevision: a\nx: ")  # "é" then crosses it
FILLED = f"the lastAppliedRevision: line may go on past the first {CLAIM_BYTES:,} bytes"


@pytest.mark.parametrize(
    ("data", "revision", "why"),
    [
        (f"kind: CellStatus\nlastAppliedRevision: {A}\nconditions: []\n".encode(), A, ""),
        (b"lastAppliedRevision: 'it''s'\n", "it's", ""),
        (b"lastAppliedRevision: ''\n", "", ""),  # the agent's "nothing applied"
        # The first column-0 line wins; an indented one is another mapping's.
        (f"agent:\n  lastAppliedRevision: {B}\nlastAppliedRevision: {A}\n".encode(), A, ""),
        (f"lastAppliedRevision: {A}\nlastAppliedRevision: {B}\n".encode(), A, ""),
        # Only what the fast path's grammar reads alone (`_VALUE`, `_scalar`) is a claim.
        (b"lastAppliedRevision: ~\n", None, NOT_A_STRING),
        (b"lastAppliedRevision:\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: [a]\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: {a: b}\n", None, NOT_A_STRING),
        (b"lastAppliedRevision:\n- a\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: |\n  a\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: 1234\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: true\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: a # b\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: &x a\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: !!str a\n", None, NOT_A_STRING),
        (b'lastAppliedRevision: "a"\n', None, NOT_A_STRING),
        (b"lastAppliedRevision:  a\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: a\r\n", None, NOT_A_STRING),
        # A plain scalar that the next lines continue is not one line (YAML reads `a b`).
        (b"lastAppliedRevision: 'a\n  b'\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: a\n  b\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: a\n\tb\n", None, NOT_A_STRING),
        (b"lastAppliedRevision: a\n\n  b\n", None, NOT_A_STRING),
        (
            b"containers: []\nlastAppliedRevision: a\n",
            None,
            "a containers: line comes before the lastAppliedRevision: line",
        ),
        (b"lastAppliedRevision: a", None, "no lastAppliedRevision: line"),  # not a whole line
        (b"kind: CellStatus\n", None, "no lastAppliedRevision: line"),
        (b"\xfflastAppliedRevision: a\n", None, f"not UTF-8 in the first {CLAIM_BYTES:,} bytes"),
        # At the bound: a line cut there, or one whose next line is past it, is no claim.
        (
            b"x: " + b"y" * (CUT - 4) + b"\nlastAppliedRevision: main\nz: 1\n",
            None,
            f"no lastAppliedRevision: line in the first {CLAIM_BYTES:,} bytes",
        ),
        (b"x: " + b"y" * FILL + b"\nlastAppliedRevision: a\n  b\n", None, FILLED),
        # A character cut at the bound is dropped; the bytes past it are never looked at.
        (b"lastAppliedRevision: a\nx: " + b"y" * ACROSS + "é".encode() + b"\n", "a", ""),
        (
            b"lastAppliedRevision: a\nx: "
            + b"y" * CLAIM_BYTES
            + b"\n"
            + b"\xff" * MAX_STATUS_BYTES,
            "a",
            "",
        ),
    ],
)
def test_the_claim_is_one_line_of_the_first_bytes_read_by_the_fast_paths_grammar(
    data: bytes, revision: str | None, why: str
) -> None:
    assert read_claim(data) == Claim(revision, why)


def test_the_table_reaches_the_bound_where_it_says_it_does() -> None:
    # The rows above are about the bound only if their lines sit where they say.
    across = b"lastAppliedRevision: a\nx: " + b"y" * ACROSS + "é".encode()
    assert len(across) == CLAIM_BYTES + 1
    line = b"x: " + b"y" * (CUT - 4) + b"\n"
    assert len(line) < CLAIM_BYTES < len(line) + len(b"lastAppliedRevision: main\n")
    filled = b"x: " + b"y" * FILL + b"\nlastAppliedRevision: a\n"
    assert len(filled) == CLAIM_BYTES


# -- the fleet: local and remote readers ------------------------------------------------------


class Fleet:
    """Status branches in one bare repository (exact bytes, as any pusher may write them),
    read as a clone's own refs (`local`) or fetched from a git daemon on loopback."""

    def __init__(self, root: Path, daemon: GitDaemon | None) -> None:
        self.root = root
        self.daemon = daemon
        self.bare = daemon.create("status") if daemon else root / "status.git"
        if daemon is None:
            self._git("init", "-q", "--bare", "-b", "main", str(self.bare))
        self.cache = root / "cache.git"

    def _git(self, *args: str, input: bytes | None = None) -> str:
        done = subprocess.run(["git", *args], input=input, capture_output=True, check=True)
        return done.stdout.decode().strip()

    def push(self, cell: str, data: bytes, message: bytes = b"status\n") -> None:
        """`data` as `cell`'s status file, in a commit whose message is exactly `message`
        (any bytes, a NUL included: the commit object is written as is)."""
        at = ["--git-dir", str(self.bare)]
        blob = self._git(*at, "hash-object", "-w", "--stdin", input=data)
        tree = self._git(*at, "mktree", input=f"100644 blob {blob}\tstatus.yaml\n".encode())
        who = b"pusher <pusher@example.invalid> 1700000000 +0000"
        body = b"tree %s\nauthor %s\ncommitter %s\n\n%s" % (tree.encode(), who, who, message)
        commit = self._git(
            *at, "hash-object", "-t", "commit", "--literally", "-w", "--stdin", input=body
        )
        self._git(*at, "update-ref", f"refs/heads/status/{cell}", commit)

    def agent_push(self, cell: str, doc: dict[str, Any]) -> None:
        """What the agent pushes: `doc` through the real `StatusWriter`, with its message."""
        writer = StatusWriter(str(self.bare), f"status/{cell}", self.root / f"w-{cell}.git")
        writer.push(dump_status(doc), commit_message(doc))

    def corrupt_blob(self, repo: Path, cell: str) -> None:
        """Replace `cell`'s status file in `repo` (loose) by as many bytes that are no UTF-8,
        under the same id and size: git's size check still passes, and any read of the file
        gets bytes that claim nothing."""
        oid = self.blob(cell)
        path = repo / "objects" / oid[:2] / oid[2:]
        size = len(zlib.decompress(path.read_bytes()).partition(b"\0")[2])
        path.chmod(0o644)
        path.write_bytes(zlib.compress(b"blob %d\0" % size + b"\xff" * size))

    def blob(self, cell: str) -> str:
        return self._git("--git-dir", str(self.bare), "rev-parse", f"status/{cell}:status.yaml")

    def ref(self, cell: str) -> str:
        """The ref the reader reads `cell` from (how messages about its commit name it)."""
        return f"refs/shards/0/status/{cell}" if self.daemon else f"refs/heads/status/{cell}"

    def origin(self, cell: str) -> str:
        """How the reader's messages name `cell`'s file."""
        return f"{self.ref(cell)}:status.yaml"

    @property
    def read_from(self) -> Path:
        """The repository the reader reads objects from: the bare one, or its fetch cache."""
        return self.cache if self.daemon else self.bare

    def read(self, only: Callable[[str], bool] | None = None) -> StatusRead:
        """What `asgctl plan --inventory status` reads (`StatusBranches`)."""
        if self.daemon is None:
            return StatusBranches(str(self.bare), workers=1, only=only).read()
        repos = StatusRepos(self.daemon.url("status"))
        return StatusBranches(".", 1, repos, str(self.cache), only).read()

    def batch(
        self, parse: Parse, budget: ReadBudget, only: Callable[[str], bool] | None = None
    ) -> StatusBatch:
        """One parse through the one reader (`fetch.read_local` / `read_remote`)."""
        if self.daemon is None:
            return read_local(self.bare, parse, budget=budget, only=only)
        with status_cache(self.root / "budget-cache.git") as repo:
            return read_remote(
                repo, StatusRepos(self.daemon.url("status")), parse, budget=budget, only=only
            )


@pytest.fixture(params=["local", "remote"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    daemon = GitDaemon(tmp_path / "srv") if request.param == "remote" else None
    try:
        if daemon is not None:
            daemon.start()
        yield Fleet(tmp_path, daemon)
    finally:
        if daemon is not None:
            daemon.stop()


def test_a_cell_left_out_by_only_still_has_its_claim_and_counts_in_the_identity(
    fleet: Fleet,
) -> None:
    cells = ["cell-1", "cell-2", "cell-3", "cell-4"]
    for cell in cells:
        fleet.push(cell, status(cell, A if cell != "cell-3" else B))
    fleet.push("cell-4", b"kind: CellStatus\n")  # claims nothing
    mine = {"cell-1", "cell-4"}
    whole, ours = fleet.read(), fleet.read(mine.__contains__)
    assert [c.cell for c in ours.cells] == ["cell-1", "cell-4"] and ours.left_out == 2
    assert [c.cell for c in whole.cells] == cells and whole.left_out == 0
    # Of the whole listing, alike whatever `only` keeps.
    for read in (whole, ours):
        assert read.fleet == tuple(cells)
        assert read.claims == {"cell-1": A, "cell-2": A, "cell-3": B}
        assert read.unclaimed == {
            "cell-4": f"{fleet.origin('cell-4')}: no lastAppliedRevision: line"
        }
        assert read.claims.keys() | read.unclaimed.keys() == set(read.fleet)
        assert not read.unusable and not read.skipped
    lines = "".join(f"{cell} {fleet.blob(cell)}\n" for cell in cells)
    assert whole.identity == ours.identity == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    # A change to a cell the job does not read changes the identity it reports.
    fleet.push("cell-3", status("cell-3", A))
    again = fleet.read(mine.__contains__)
    assert again.identity != ours.identity and again.claims["cell-3"] == A
    assert again.applied == ours.applied == {"cell-1": A, "cell-4": ""}
    if fleet.daemon is not None:  # remote: the claims are cached by blob id beside the parses
        kept = list((fleet.cache / PARSED_DIR / CLAIM.kind).rglob("*.json"))
        assert sorted(p.stem for p in kept) == sorted(fleet.blob(c) for c in cells)


def test_which_cells_the_budget_refuses_never_depends_on_only(fleet: Fleet) -> None:
    # The 2nd cell's blob pushes the total over the read's budget: it and every cell after
    # it are refused, in the same words, whichever cells the reader parses.
    cells = ["cell-a", "cell-b", "cell-c"]
    for cell in cells:
        fleet.push(cell, status(cell, containers=3))
    size = len(status("cell-a", containers=3))
    budget = ReadBudget(max_total=2 * size - 1)
    whole = {c.cell: c.error for c in fleet.batch(CONTAINERS, budget).cells}
    assert whole["cell-a"] == ""
    for cell in ("cell-b", "cell-c"):
        assert whole[cell] == (
            f"{fleet.origin(cell)}: not read: the status files read so far pass the read's "
            f"budget of {budget.max_total} bytes"
        )
    for keep in ({"cell-a"}, {"cell-b"}, {"cell-c"}, {"cell-a", "cell-c"}):
        part = fleet.batch(CONTAINERS, budget, keep.__contains__)
        assert {c.cell: c.error for c in part.cells} == {c: whole[c] for c in sorted(keep)}
        assert part.left_out == len(cells) - len(keep)
        assert [c for c, _ref in part.listing] == cells


def test_first_bytes_that_claim_another_revision_than_the_whole_document_cost_the_cell(
    fleet: Fleet,
) -> None:
    # Column-0 lines that are not the top-level key: inside a multi-line quoted scalar
    # (PyYAML takes its unindented lines), or a key the whole document states twice (the
    # loader refuses duplicates).  The cell is unusable, named; never planned with either.
    header = "apiVersion: asgctl.io/v1\nkind: CellStatus\ncell: {cell}\n"
    forged = {
        "quoted": f"note: 'x\nlastAppliedRevision: {A}\n'\nlastAppliedRevision: {B}\n",
        "dquoted": f'note: "x\nlastAppliedRevision: {A}\n"\nlastAppliedRevision: {B}\n',
        "silent": f"note: 'x\nlastAppliedRevision: {A}\nmore: words'\n",
        "twice": f"lastAppliedRevision: {A}\nlastAppliedRevision: {B}\n",
    }
    # Where the next line is indented, it may continue the claim's line: no claim at all,
    # so no contradiction; the plan takes the cell as unknown.
    continued = f"note: 'x\nlastAppliedRevision: {A}\n  '\nlastAppliedRevision: {B}\n"
    fleet.push("good", status("good"))
    for cell, body in {**forged, "continued": continued}.items():
        fleet.push(cell, (header.format(cell=cell) + body + "containers: []\n").encode())
    found = fleet.read()
    assert [c.cell for c in found.cells] == ["continued", "good"]
    assert found.applied == {"continued": B, "good": A}
    assert found.unclaimed == {"continued": f"{fleet.origin('continued')}: {NOT_A_STRING}"}
    assert sorted(found.unusable) == ["dquoted", "quoted", "silent", "twice"]
    for cell, whole in (("quoted", B), ("dquoted", B), ("silent", "")):
        assert found.unusable[cell] == (
            f"{fleet.origin(cell)}: lastAppliedRevision reads {A!r} in the first "
            f"{CLAIM_BYTES:,} bytes and {whole!r} in the whole document"
        )
    assert found.unusable["twice"].startswith(fleet.origin("twice"))
    assert "duplicate key" in found.unusable["twice"]
    # The claim is the blob's, read alike by every job; only the job reading the cell in
    # full can tell, and does, for each of its cells.
    assert found.claims == {"good": A, **dict.fromkeys(forged, A)}
    other = fleet.read({"good"}.__contains__)
    assert other.claims == found.claims and not other.unusable and other.identity == found.identity


def test_a_huge_value_before_the_claim_leaves_the_cell_unknown_not_unusable(
    fleet: Fleet,
) -> None:
    fleet.push("padded", status("padded", note="y" * (2 * CLAIM_BYTES)))
    found = fleet.read()
    assert [c.cell for c in found.cells] == ["padded"] and found.applied == {"padded": A}
    assert not found.claims and not found.unusable
    assert found.unclaimed == {
        "padded": f"{fleet.origin('padded')}: no lastAppliedRevision: line in the first "
        f"{CLAIM_BYTES:,} bytes"
    }


def test_a_claim_line_with_a_value_that_is_no_scalar_is_no_claim(fleet: Fleet) -> None:
    bodies = {
        "flow": "lastAppliedRevision: [a]\n",
        "block": "lastAppliedRevision:\n- a\n",
        "mapping": "lastAppliedRevision: {a: b}\n",
        "number": "lastAppliedRevision: 12\n",
    }
    for cell, body in bodies.items():
        fleet.push(cell, f"kind: CellStatus\ncell: {cell}\n{body}containers: []\n".encode())
    fleet.push("good", status("good"))
    whole, ours = fleet.read(), fleet.read({"good"}.__contains__)
    for read in (whole, ours):
        assert read.claims == {"good": A}
        assert read.unclaimed == {c: f"{fleet.origin(c)}: {NOT_A_STRING}" for c in bodies}
    # Read in full, the schema refuses each value: unusable, named by branch and field.
    assert sorted(whole.unusable) == sorted(bodies) and not ours.unusable
    for cell, message in whole.unusable.items():
        assert message.startswith(f"{fleet.origin(cell)}: lastAppliedRevision: must be string")


# -- the claim in the agent's commit -----------------------------------------------------------

T = CLAIM_TRAILER
ONE_LINE = f"its commit's {T} trailer is not a one-line string"


def test_an_agent_written_fleet_is_claimed_from_its_commits_without_reading_left_out_files(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Three cells pushed by the real writer (two applied, one nothing yet) and one by an old
    # agent whose commit states nothing.  A job keeping only cell-1 reads the others' claims
    # from their commits: their files are made unreadable first (same id and size, bytes
    # that claim nothing), so any read of them would lose their claims -- as it does for the
    # old agent's cell, the control that proves the corruption would be seen.
    cells = ["cell-1", "cell-2", "cell-3"]
    for cell in cells:
        settings = {**TYPICAL_SETTINGS, "cell": cell}
        fleet.agent_push(cell, agent_status(tmp_path, settings, applied=cell != "cell-3"))
    fleet.push("old", status("old", B))
    revision = build_config(TYPICAL_SETTINGS, {}).revision("a" * 40)
    whole = fleet.read()
    assert whole.claims == {"cell-1": revision, "cell-2": revision, "cell-3": "", "old": B}
    assert [c.cell for c in whole.cells] == [*cells, "old"] and not whole.unusable
    mine = {"cell-1"}.__contains__
    fleet.read(mine)  # remote: fetches into the cache, which then holds the blobs read
    for cell in ("cell-2", "cell-3", "old"):
        fleet.corrupt_blob(fleet.read_from, cell)
    shutil.rmtree(fleet.cache / PARSED_DIR, ignore_errors=True)  # no parse kept by blob id
    ours = fleet.read(mine)
    assert ours.claims == {"cell-1": revision, "cell-2": revision, "cell-3": ""}
    assert ours.unclaimed == {"old": f"{fleet.origin('old')}: not UTF-8 in the first 16,384 bytes"}
    assert [c.cell for c in ours.cells] == ["cell-1"] and ours.left_out == 3
    assert ours.identity == whole.identity and not ours.unusable


def test_a_commit_without_the_trailer_falls_back_to_the_documents_first_bytes(
    fleet: Fleet,
) -> None:
    # Git's rules: a trailer is a line of the message's last paragraph, after a blank line;
    # in the subject's paragraph it is text.  Either way the document's first bytes decide,
    # and the cross-check names them.
    fleet.push("plain", status("plain", A))
    fleet.push("unblank", status("unblank", A), f"status\n{T}: {B}\n".encode())
    forged = f"cell: forged\nnote: 'x\nlastAppliedRevision: {A}\n'\nlastAppliedRevision: {B}\n"
    fleet.push("forged", (forged + "containers: []\n").encode())
    fleet.push("stated", status("stated", A), f"status\n\n{T}: {A}\n".encode())
    found = fleet.read()
    assert found.claims == {"plain": A, "unblank": A, "stated": A, "forged": A}
    assert found.unusable == {
        "forged": f"{fleet.origin('forged')}: lastAppliedRevision reads {A!r} in the first "
        f"{CLAIM_BYTES:,} bytes and {B!r} in the whole document"
    }


def test_a_trailer_the_whole_document_contradicts_costs_the_cell_read_in_full(
    fleet: Fleet,
) -> None:
    fleet.push("liar", status("liar", A), f"status\n\n{T}: {B}\n".encode())
    fleet.push("good", status("good", A), f"status\n\n{T}: {A}\n".encode())
    found = fleet.read()
    assert [c.cell for c in found.cells] == ["good"]
    assert found.unusable == {
        "liar": f"{fleet.origin('liar')}: lastAppliedRevision reads {B!r} in its commit's "
        f"{T} trailer and {A!r} in the whole document"
    }
    # A job that leaves it out takes the commit's word, as every job does for its claim;
    # the job reading the cell in full is the one that refuses it.
    other = fleet.read({"good"}.__contains__)
    assert other.claims == found.claims == {"liar": B, "good": A} and not other.unusable


def test_a_commit_that_states_its_claim_badly_has_none_and_never_breaks_the_listing(
    fleet: Fleet,
) -> None:
    # Each document claims A in its first bytes and whole: a commit that states its claim
    # badly gets no second chance there (no claim, "unknown" to the plan), and still costs
    # only its own cell.  The NUL and the huge messages sit between good cells in the
    # listing, whose claims must come through intact.
    over = f"its commit's {T} trailers are over {MAX_TRAILER_BYTES:,} bytes"
    bad: dict[str, tuple[bytes, str]] = {
        "b-two": (f"s\n\n{T}: {A}\n{T}: {A}\n".encode(), f"its commit has 2 {T} trailers, not one"),
        "b-cased": (
            f"s\n\n{T}: {A}\nasgctl-applied-revision: {A}\n".encode(),
            f"its commit has 2 {T} trailers, not one",
        ),
        "b-escape": (f"s\n\n{T}: main\x1b[31m@x\n".encode(), ONE_LINE),
        "b-control": (f"s\n\n{T}: main\x01x\n".encode(), ONE_LINE),
        "b-empty": (f"s\n\n{T}:\n".encode(), ONE_LINE),
        "b-flow": (f"s\n\n{T}: [a]\n".encode(), ONE_LINE),
        "b-number": (f"s\n\n{T}: 12\n".encode(), ONE_LINE),
        "b-huge": (f"s\n\n{T}: {'y' * 1_000_000}\n".encode(), over),
        "b-many": (("s\n\n" + f"{T}: {A}\n" * 10_000).encode(), over),
    }
    for cell, (message, _why) in bad.items():
        fleet.push(cell, status(cell, A), message)
    # Continuation lines are unfolded by git: one line, whatever the pusher broke it into.
    fleet.push("c-folded", status("c-folded", "main x"), f"s\n\n{T}: main\n  x\n".encode())
    # Git reads a message up to a NUL: what follows it is not there.
    nul = f"s\n\n{T}: {A}\0\n{T}: {B}\n".encode()
    fleet.push("c-nul", status("c-nul", A), nul)
    fleet.push("c-none", status("c-none", ""), f"s\n\n{T}: none\n".encode())
    fleet.push("z-good", status("z-good", A), f"s\n\n{T}: {A}\n".encode())
    for only in (None, {"z-good"}.__contains__):
        found = fleet.read(only)
        assert found.claims == {"c-folded": "main x", "c-nul": A, "c-none": "", "z-good": A}
        assert found.unclaimed == {c: f"{fleet.ref(c)}: {why}" for c, (_m, why) in bad.items()}
        assert not found.unusable and not found.skipped
    assert len(fleet.read().cells) == len(bad) + 4


def test_a_ref_that_moved_after_its_commits_trailers_were_read_is_found(fleet: Fleet) -> None:
    # The claims read takes a cell's claim from its commit, and its blob id (the identity)
    # through its ref: a ref that moved between the two (a fetch into the clone meanwhile)
    # is found by `moved_refs`, and `read_claims` makes that cell "changed while being read".
    fleet.push("cell-1", status("cell-1", A), f"s\n\n{T}: {A}\n".encode())
    fleet.read()  # remote: into the cache
    repo, ref = fleet.read_from, fleet.ref("cell-1")
    patterns = ["refs/"]
    (stated,) = [t for r, t in ref_trailers(repo, patterns).items() if r == ref]
    assert stated.items == (f"{T}: {A}",) and not stated.cut
    assert moved_refs(repo, patterns, {ref: stated.commit}) == set()
    later = subprocess.run(
        ["git", "-C", str(repo), "commit-tree", "-m", "later", f"{stated.commit}^{{tree}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(["git", "-C", str(repo), "update-ref", ref, later], check=True)
    assert moved_refs(repo, patterns, {ref: stated.commit}) == {ref}
