"""Status branches are untrusted input (issue 20, attacks 6 and 11): the status-file reader.

Whoever can push `status/<cell>` writes what `asgctl plan --inventory status` and `asgctl
status` read.  These tests pin the reader's contract: one safe loader with budgets (or a fast
path that provably reads the same), a schema, and a per-cell error naming the branch and the
field -- never a traceback, never a whole oversized blob in memory.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgctl_lab.gitserver import GitDaemon, git
from reconciler.sources.cellstore import InventoryError
from reconciler.sources.inventories import StatusBranches
from reconciler.status.document import (
    CONTRACT_KEYS,
    MAX_STATUS_BYTES,
    _fast_parts,
    containers_from_status,
    load_yaml,
    parse_status,
)
from reconciler.status.read import read_status_blobs
from reconciler.status.write import dump_status
from tests.agentkit import git_server  # noqa: F401 - fixture

# -- the fast path reads exactly what the loader reads -----------------------------------------

_ERROR = "error"


def _reference(text: str) -> Any:
    """What the safe loader reads: (header, contract fields of each entry), or _ERROR."""
    try:
        doc = load_yaml(text, "x")
    except InventoryError:
        return _ERROR
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        return _ERROR
    listed = doc.get("containers")
    if listed is None:
        listed = []
    if not isinstance(listed, list):
        return _ERROR
    entries = [
        {k: e[k] for k in CONTRACT_KEYS if k in e} if isinstance(e, dict) else ("not a map", e)
        for e in listed
    ]
    return {k: v for k, v in doc.items() if k != "containers"}, entries


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to itself (`.nan` is a valid header value)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


VALUES = [
    "abc", "", None, "true", "123", "1e3", "null", "fd00::1", "fd00:18::", "198.18.0.2",
    "it's", "a b", "x#y", "a: b", "-x", "2001-01-01", "2001-02-30", "0x1f", "0x_", "._", "~",
    "yes", "été", "l\nb", "=", "<<", "*a", "&a", "!x", "'q'", '"d"', "[x]", "{y}", "a  b",
    "t\tab", "x ", " x", "1" * 5000, "%", "@", "`", "|", ">", "? k", ".nan", "1_000",
]  # fmt: skip


def _agent_doc(rng: st.DataObject) -> dict[str, Any]:
    entries = []
    # Half the files have every field in every entry, as the agent writes them (the
    # fast path's quickest reading, `document._AGENT_ENTRY`); the rest leave fields out.
    full = rng.draw(st.booleans())
    for i in range(rng.draw(st.integers(0, 4))):
        e: dict[str, Any] = {"handle": f"h{i}"}
        for key in ("ip", "app_id", "space_id", "org_id", "workload", "chain"):
            if full or rng.draw(st.booleans()):
                e[key] = rng.draw(st.sampled_from(VALUES))
        for key in ("groups", "sources"):
            if full or rng.draw(st.booleans()):
                e[key] = rng.draw(st.sampled_from([[], ["a", "b"], None, "x", {"k": [1]}]))
        entries.append(e)
    message = rng.draw(st.sampled_from(VALUES))
    return {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "cell": "c",
        "conditions": [{"type": "Ready", "status": "True", "message": message}],
        "containers": entries,
        "history": [{"revision": "main@sha1:" + "0" * 40, "status": "Applied"}],
    }


# Lines that change what the lines around them mean.
FRAGMENTS = [
    "containers:", "containers: []", "containers: ~", "- handle: evil", "  ip: 198.18.9.9",
    'msg: "a', 'b"', "msg: 'a", "b'", "# comment", "  # comment", "x: [", "]", "x: {a: 1,", "}",
    "y: &a {handle: z, ip: 198.18.9.8}", "- *a", "z: *a", "<<: *a", "  <<: *a", "---", "...",
    "%YAML 1.1", "k: |", "  text", "k: >-", "? containers", ": v", "containers : x",
    '"containers": []', "'containers': []", "!!map", "k: !!str 1", "  chain: 0x_",
    "  chain: ._", "  chain: 2001-02-30", "  null: x", "  yes: 1", "  handle: h2", "\t",
    "  groups:", "  - a", "    - b", "- ", "-x", " - y", "cell: x", "history:", "", "  ",
    "  ip:", "  ip: [1]", "  ip: {}", "  ip: 'a''b'", "  ip: a #c", "- - x", "  - - x",
    "   ip: 198.18.0.9", "    ip: 198.18.0.9", "- handle: h0", "\ufeffcell: x", "\r", "a: b\rc",
    "x: 'multi", "containers:", "- handle: q", "  ip: 198.18.0.77", "end'", "cell: x  ",
    "x: \"\\q\"", "x: \"\\u00e9\"", "kind: CellStatus", "  workload: task", "\x85", "\u2028",
]  # fmt: skip


@st.composite
def hostile_status(draw: st.DrawFn) -> str:
    """An agent-written status file, then a few lines and characters changed at random."""
    data = draw(st.data())
    lines = dump_status(_agent_doc(data)).split("\n")
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["insert", "replace", "indent", "char", "quoted"]))
        at = draw(st.integers(0, len(lines)))
        if kind == "insert":
            lines.insert(at, draw(st.sampled_from(FRAGMENTS)))
        elif kind == "replace" and at < len(lines):
            lines[at] = draw(st.sampled_from(FRAGMENTS))
        elif kind == "indent" and at < len(lines):
            lines[at] = draw(st.sampled_from(["", " ", "  ", "    "])) + lines[at].lstrip(" ")
        elif kind == "char" and at < len(lines):
            line = lines[at]
            pos = draw(st.integers(0, len(line)))
            ch = draw(st.sampled_from(list("'\"#&*!|>%@`{}[],:?- \t\\")))
            lines[at] = line[:pos] + ch + line[pos:]
        elif kind == "quoted":
            # A `containers:` block inside a quoted scalar that spans lines: the YAML loader
            # reads one string; a line reader that only looks for `^containers:` reads entries.
            q = draw(st.sampled_from(["'", '"']))
            lines[at:at] = [f"note: {q}x", "containers:", "- handle: evil", "  ip: 198.18.6.6",
                            f"  app_id: y{q}"]  # fmt: skip
    return "\n".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_status())
def test_the_fast_path_reads_what_the_loader_reads_or_steps_aside(text: str) -> None:
    fast = _fast_parts(text, "x")
    if fast is None:
        return
    ref = _reference(text)
    assert ref != _ERROR, f"fast path accepted a file the loader refuses:\n{text}"
    assert _same(list(fast), list(ref)), text


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_fast_path_reads_plain_agent_files(data: st.DataObject) -> None:
    """Not a vacuous property: the agent's own files take the fast path whenever its values
    are plain strings, and read the same as the loader."""
    doc = _agent_doc(data)
    for e in doc["containers"]:
        for k in list(e):
            e[k] = f"v-{k}" if k in CONTRACT_KEYS[1:] else e[k]
        for key in ("groups", "sources"):
            if key in e:
                e[key] = ["public_networks", "sg-00"]
        e["chain"] = "0123456789abcdef"
    doc["conditions"][0]["message"] = "Applied revision: main@sha1:abc"
    text = dump_status(doc)
    fast = _fast_parts(text, "x")
    assert fast is not None, text
    assert _same(list(fast), list(_reference(text)))


def test_containers_inside_a_quoted_string_are_not_containers() -> None:
    """The reported attack: a `containers:` line inside a multi-line quoted string."""
    for q in ("'", '"'):
        text = (
            f"cell: c\nnote: {q}start\ncontainers:\n- handle: evil\n  ip: 198.18.6.6\n"
            f"  app_id: x{q}\ncontainers: []\n"
        )
        assert yaml.safe_load(text)["containers"] == []
        assert containers_from_status(text, "refs/heads/status/c:status.yaml") == ()


# -- budgets, types and messages -----------------------------------------------------------

ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "containers: [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


def test_an_alias_bomb_is_refused_by_the_node_budget() -> None:
    assert len(ALIAS_BOMB) < 700  # the reported 606-byte bomb, give or take
    with pytest.raises(InventoryError, match="expands to more than"):
        containers_from_status(ALIAS_BOMB, "refs/heads/status/c:status.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("containers: 5\n", "containers: must be a list"),
        ("- a\n", "must be a mapping"),
        ("counts: {containers: x}\n", "counts.containers: must be integer or null, not str"),
        ("conditions: [{type: Ready, status: true}]\n", r"conditions\[0\].status: must be one"),
        ("conditions: 7\n", "conditions: must be array or null, not int"),
        ("refused: {findings: [1]}\n", r"refused.findings\[0\]: must be string"),
        ("containers: [7]\n", r"containers\[0\]: must be a mapping"),
        ("containers: [{handle: a, ip: [1]}]\n", r"containers\[0\].ip: must be a string, not"),
        ("containers: [{ip: 198.18.0.1}]\n", r"containers\[0\].handle: missing"),
        ("containers: [{handle: a, ip: 198.18.0.2}, {handle: a, ip: 198.18.0.3}]\n", "twice"),
        ("a: 1\na: 2\n", "duplicate key"),
        ("a: !!python/object:os.system x\n", "not allowed"),
        ("a: 1\n---\nb: 2\n", "more than 1 documents"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", "nesting deeper than"),
    ],
)
def test_a_bad_status_file_is_an_error_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message) as caught:
        containers_from_status(text, "refs/heads/status/c:status.yaml")
    assert str(caught.value).startswith("refs/heads/status/c:status.yaml")


def test_an_oversized_status_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(InventoryError, match="larger than"):
        parse_status(b"x" * (MAX_STATUS_BYTES + 1), "refs/heads/status/c:status.yaml")


def test_what_the_agent_writes_passes_the_schema() -> None:
    """The schema agrees with agent/status.py: a full document built by build_status."""
    from reconciler.agent.core import HistoryEntry, Refusal
    from reconciler.agent.state import AgentState, Applied, Head
    from reconciler.status.document import Condition

    state = AgentState(
        applied=Applied("a" * 40, "d", "t", ()),
        head=Head("b" * 40, "subject", None, Refusal("ValidationFailed", "m")),
        conditions=(Condition("Ready", "False", "ValidationFailed", "m", "t"),),
        history=(HistoryEntry("r", "d", "s", "t", "t"),),
        drift_log=({"time": "t", "family": 4, "chain": "c", "what": "w", "repaired": True},),
        timings={"fetch": 0.1},
        inventory=(),
    )
    from reconciler.agent.status import build_status

    doc = build_status(
        state,
        cell="c",
        settings={"url": "u", "interval": 1.0},
        agent={"pid": 1},
        revision=lambda sha: f"main@sha1:{sha}",
        containers_path="/x",
        now="t",
    )
    parsed = parse_status(dump_status(doc), "x")
    assert parsed.header["refused"]["reason"] == "ValidationFailed"


# -- against a real repository ---------------------------------------------------------------


def _git(repo: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], input=input, capture_output=True, check=True
    ).stdout.decode()


def _status_branch(repo: Path, cell: str, data: bytes) -> None:
    blob = _git(repo, "hash-object", "-w", "--stdin", input=data).strip()
    tree = _git(repo, "mktree", input=f"100644 blob {blob}\tstatus.yaml\n".encode()).strip()
    commit = _git(repo, "commit-tree", tree, "-m", "s").strip()
    _git(repo, "update-ref", f"refs/heads/status/{cell}", commit)


GOOD = dump_status(
    {
        "cell": "good",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containers": [
            {
                "handle": "h1",
                "ip": "198.18.0.2",
                "app_id": "app-1",
                "space_id": "s",
                "org_id": "o",
                "workload": "app",
            }
        ],
    }
)


def test_each_bad_status_branch_is_skipped_with_its_reason(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _git(tmp_path, "init", "-q", str(repo))
    _status_branch(repo, "good", GOOD.encode())
    _status_branch(repo, "bomb", ALIAS_BOMB.encode())
    _status_branch(repo, "types", b"containers: [{handle: a, ip: {x: 1}}]\n")
    _status_branch(repo, "quoted", b"note: 'x\ncontainers:\n- handle: evil\n  ip: 198.18.6.6\n'\n")
    read = StatusBranches(str(repo)).read()
    assert [c.cell for c in read.cells] == ["good", "quoted"]
    assert read.cells[1].containers == ()  # the quoted block is a string, not containers
    # A bad file costs its cell (`unusable`); `skipped` is for branches that are no cell.
    assert read.skipped == () and sorted(read.unusable) == ["bomb", "types"]
    bomb, types = read.unusable["bomb"], read.unusable["types"]
    assert bomb.startswith("refs/heads/status/bomb:status.yaml") and "expands" in bomb
    assert types.startswith("refs/heads/status/types:status.yaml: containers[0].ip")


def test_an_oversized_blob_is_never_read(tmp_path: Path) -> None:
    """A status file that compresses well (10 MB on the server for 2.2 GB) is refused by the
    size git reports, not after reading it: here, the limit is set below a small blob."""
    repo = tmp_path / "repo"
    _git(tmp_path, "init", "-q", str(repo))
    _status_branch(repo, "big", b"a: " + b"x" * 5000 + b"\n")
    _status_branch(repo, "good", GOOD.encode())
    specs = ["refs/heads/status/big:status.yaml", "refs/heads/status/good:status.yaml"]
    big, good = read_status_blobs(str(repo / ".git"), specs, limit=4096)
    assert isinstance(big, InventoryError) and "5004 bytes, over the limit of 4096" in str(big)
    assert good == GOOD.encode()
    missing = read_status_blobs(str(repo / ".git"), ["refs/heads/status/none:status.yaml"])
    assert isinstance(missing[0], InventoryError) and "no such file" in str(missing[0])


# -- asgctl status -------------------------------------------------------------------------


def test_asgctl_status_reports_each_hostile_branch_and_escapes_terminal_text(
    tmp_path: Path,
    git_server: GitDaemon,  # noqa: F811
) -> None:
    """Status branches on a git daemon: a bomb, wrong types, an oversized blob and escape
    sequences give one row each, an exit code, and no traceback or raw control character."""
    from click.testing import CliRunner

    from reconciler.cli import main
    from reconciler.status.write import StatusWriter

    bare = git_server.create("policy")
    url = git_server.url("policy")
    work = tmp_path / "work"
    git("init", "-q", "-b", "main", str(work))
    git("commit", "-q", "--allow-empty", "-m", "c0", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    sha = git("rev-parse", "HEAD", cwd=work)
    evil = "\x1b[2J\x1b[31mFAKE\rcell-z  True\nforged row"
    files = {
        "a-good": GOOD.replace("cell: good", f"cell: a-good\nlastAppliedRevision: main@sha1:{sha}"),
        "b-bomb": ALIAS_BOMB,
        "c-types": "counts: {installedRules: [1, 2]}\nconditions: [{type: Ready}]\n",
        "d-escape": dump_status(
            {
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": evil, "message": evil}
                ],
                "lastSyncTime": evil,
                "refused": {"revision": "r", "reason": evil},
                "lastAppliedRevision": "main@sha1:--output=/tmp/x",
            }
        ),
        "e-big": "a: '" + "x" * (MAX_STATUS_BYTES + 10) + "'\n",
    }
    for cell, text in files.items():
        StatusWriter(url, f"status/{cell}", tmp_path / f"{cell}.git").push(text, "s")
    result = CliRunner().invoke(main, ["status", "--source", url])
    out = result.output
    assert result.exit_code == 3, out
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in out
    assert "\x1b" not in out and "\r" not in out
    assert "forged row" not in out.replace("\\nforged row", "")
    assert "\\x1b[2J" in out  # shown, escaped
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(tuple(files))}
    assert rows["a-good"].split()[1] == "True"
    notes = "\n".join(out.splitlines())
    assert "b-bomb: refs/shards/0/status/b-bomb:status.yaml" in notes and "expands" in notes
    assert "c-types: refs/shards/0/status/c-types:status.yaml: counts.installedRules" in notes
    assert "e-big: refs/shards/0/status/e-big:status.yaml: " in notes and "over the limit" in notes
    as_json = CliRunner().invoke(main, ["status", "--source", url, "--format", "json"])
    assert as_json.exit_code == 3 and "\x1b" not in as_json.output
    by_cell = {c["cell"]: c for c in json.loads(as_json.output)["cells"]}
    assert by_cell["a-good"]["behind"] == 0
    # `--output=/tmp/x` is not a commit name, so it never reaches git's command line.
    assert by_cell["d-escape"]["behind"] is None and not by_cell["d-escape"]["diverged"]
    assert by_cell["d-escape"]["message"] == evil  # JSON keeps the text, escaped by JSON


def test_the_lab_reads_status_branches_the_same_way(tmp_path: Path) -> None:
    """The lab's operator waits on status branches: a hostile one is left out, not loaded."""
    from asgctl_lab.policyrepo import Operator
    from reconciler.status.write import StatusWriter

    bare = tmp_path / "policy.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "seed"
    git("init", "-q", "-b", "main", str(work))
    git("commit", "-q", "--allow-empty", "-m", "c0", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    url = f"file://{bare}"
    good = GOOD.replace("cell: good", "cell: good\nlastAppliedRevision: main@sha1:" + "a" * 40)
    StatusWriter(url, "status/good", tmp_path / "g.git").push(good, "s")
    StatusWriter(url, "status/bomb", tmp_path / "b.git").push(ALIAS_BOMB, "s")
    found = Operator(url, tmp_path / "op").clone().status_branches()
    assert list(found) == ["good"]
    assert found["good"].applied_sha == "a" * 40 and found["good"].ready == "True"


def test_the_status_push_ends_its_options_before_the_url(tmp_path: Path) -> None:
    """Issue 20, attack 11: the URL is always git's <repository>, never an option.  Given
    `--repo=<elsewhere>` as the URL, git must refuse that as a repository name (without `--`
    it would be the push option `--repo`, and the refspec would become the repository)."""
    from reconciler.status.write import StatusPushError, StatusWriter

    elsewhere = tmp_path / "elsewhere.git"
    git("init", "-q", "--bare", "--", str(elsewhere))
    writer = StatusWriter(f"--repo={elsewhere}", "status/cell-1", tmp_path / "scratch.git")
    with pytest.raises(StatusPushError, match=r"pathname '--repo=.*elsewhere.git' blocked"):
        writer.push("cell: cell-1\n", "s", when=1_700_000_000)
    assert git("--git-dir", str(elsewhere), "for-each-ref") == ""
