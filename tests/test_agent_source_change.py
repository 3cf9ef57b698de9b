"""State per source: the applied revision remembers the (repository URL, branch) it came
from, so pointing an agent at another repository (a move to a new git server) is a fresh
start -- logged and reported -- not a history rewrite.

What carries over: the applied revision itself, because the kernel still enforces it.  The
new source's first head is judged against it by the mass-revoke gate (a source change is no
way around the gate), signatures are checked as always, and a new source that does hold the
applied commit (the same repository moved, a mirror) must still descend from it.  Only a
source without the applied commit starts without an ancestry check.

Pure decisions first (`normalise_url`, `note_source`, `decide`, `settle`, the state file),
then an agent in-process against real bare repositories (file://), then the attacks: a state
file written by hand, or damaged, never makes the agent skip a gate.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.agent.conditions import (
    FALSE,
    HISTORY_REWRITTEN,
    MASS_REVOKE_BLOCKED,
    READY,
    RECONCILIATION_SUCCEEDED,
    SOURCE_CHANGED,
    TRUE,
    UNSIGNED_COMMIT,
)
from reconciler.agent.config import AgentConfig, build_config
from reconciler.agent.core import condition
from reconciler.agent.cycle import current_source, decide, note_source, settle
from reconciler.agent.loop import SYNC, Agent
from reconciler.agent.source import IDENTITY_KEY, GitSource
from reconciler.agent.sourceid import SourceChange, SourceRef, normalise_url
from reconciler.agent.state import AgentState, from_persisted, load_state, to_persisted
from tests.agentkit import (  # noqa: F401 - fixtures
    ORG,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    container,
    git_server,
    kernel,
    local_repo,
    policy_repo,
    read_status,
    ready,
    sg,
    tcp_rules,
    write_store,
)
from tests.conftest import require_netns
from tests.test_agent_cycle import (
    APPLIED,
    APPLIED_SHA,
    BEFORE,
    CFG,
    HEAD_SHA,
    SIGNED,
    TRAILER,
    UNSIGNED,
    _facts,
    _obs,
    _policy,
    _result,
    compile_plan,
)
from tests.test_agent_loop import MemoryDataplane
from tests.test_agent_policy_tests import status_of

OLD_URL = "https://bot:old-token@git.old.example/platform/policy.git"
NEW_URL = "https://bot:new-token@git.new.example/platform/policy.git"
OLD = SourceRef.of(OLD_URL, "main")
NEW_CFG = replace(CFG, source=NEW_URL)
MOVED = replace(BEFORE, applied=replace(APPLIED, source=OLD))
"""A cell enforcing APPLIED_SHA from the old server, now configured with the new one."""


# -- which URLs are one source ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "urls",
    [
        # A rotated token, with or without `.git`.
        ("https://bot:tok1@git.example/org/policy.git", "https://bot:tok2@git.example/org/policy"),
        # Case of scheme and host, the default port, trailing slashes.
        ("https://git.example/org/policy", "HTTPS://Git.Example:443/org/policy.git/"),
        # scp-like, ssh:// and git+ssh:// with another user and the default port.
        (
            "git@git.example:org/policy.git",
            "ssh://git@git.example/org/policy",
            "git+ssh://deploy@git.example:22/org/policy/",
        ),
        # A local path, as a path or a file:// URL, spelt with `..` or doubled slashes.
        ("/srv/git/policy.git", "file:///srv/git/policy", "file:///srv//git/../git/policy.git/"),
        ("git://127.0.0.1:9418/policy", "git://127.0.0.1/policy"),
    ],
    ids=["token-rotation", "case-port-slash", "ssh-spellings", "local-paths", "git-port"],
)
def test_what_does_not_change_the_repository_is_one_source(urls: tuple[str, ...]) -> None:
    assert len({normalise_url(u) for u in urls}) == 1, [normalise_url(u) for u in urls]
    assert len({SourceRef.of(u, "main") for u in urls}) == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://git.old.example/org/policy", "https://git.new.example/org/policy"),
        ("git://127.0.0.1:4001/policy", "git://127.0.0.1:4002/policy"),
        ("https://git.example/org/policy", "https://git.example/org/policy-v2"),
        ("https://git.example/org/policy", "https://git.example/Org/policy"),
        ("/srv/git/policy", "https://srv/git/policy"),
    ],
    ids=["host", "port", "path", "path-case", "scheme"],
)
def test_another_server_port_or_path_is_another_source(a: str, b: str) -> None:
    assert SourceRef.of(a, "main") != SourceRef.of(b, "main")


def test_another_branch_is_another_source_and_credentials_are_never_kept() -> None:
    assert SourceRef.of(OLD_URL, "main") != SourceRef.of(OLD_URL, "release")
    assert OLD.url == "https://***@git.old.example/platform/policy.git"
    assert "old-token" not in json.dumps([OLD.to_dict(), OLD.key, OLD.cache_id])


# -- the decision ----------------------------------------------------------------------------------


def test_a_new_source_is_logged_once_and_recorded() -> None:
    prev = replace(MOVED, attempted="c" * 40)
    d = decide(prev, _obs(applied=prev.applied), NEW_CFG, compile_plan)
    [log] = [x.record for x in d.logs if x.record["event"] == "source-changed"]
    assert log["reason"] == SOURCE_CHANGED
    assert log["from"] == {
        "url": "https://***@git.old.example/platform/policy.git",
        "branch": "main",
    }
    assert log["to"] == {"url": "https://***@git.new.example/platform/policy.git", "branch": "main"}
    assert log["enforced"] == CFG.revision(APPLIED_SHA)
    assert "token" not in json.dumps(log)
    assert d.state.source_change == SourceChange(
        OLD, current_source(NEW_CFG), _obs().now, APPLIED_SHA
    )
    assert d.state.attempted is None  # the old source's last attempt is not the new one's
    # The kernel's rules stay the target until a head of the new source is accepted.
    assert d.target is not None and d.target.sha == APPLIED_SHA
    again = decide(d.state, _obs(applied=d.state.applied), NEW_CFG, compile_plan)
    assert [x for x in again.logs if x.record["event"] == "source-changed"] == []


def test_a_token_rotation_is_not_a_new_source() -> None:
    rotated = replace(CFG, source=OLD_URL.replace("old-token", "rotated"))
    d = decide(MOVED, _obs(applied=MOVED.applied), rotated, compile_plan)
    assert d.logs == () and d.state.source_change is None


def test_an_upgrade_takes_the_configured_source_without_a_change() -> None:
    """A state from before sources were kept (applied.source None) is the configured one."""
    d = decide(BEFORE, _obs(), NEW_CFG, compile_plan)
    assert d.logs == () and d.state.source_change is None
    assert d.state.applied is not None and d.state.applied.source == current_source(NEW_CFG)


@pytest.mark.parametrize(
    ("policy", "message", "reason"),
    [
        (_policy(1, 2, 3, 4, 5), "grow", None),
        # Every access the cell enforces goes: judged against the rules the kernel holds.
        (_policy(), "cut", MASS_REVOKE_BLOCKED),
        (_policy(), f"cut\n\n{TRAILER}: true", None),
    ],
    ids=["growing", "mass-revoke", "mass-revoke-override"],
)
def test_the_first_head_of_a_new_source_meets_the_gate_against_the_enforced_rules(
    policy: Any, message: str, reason: str | None
) -> None:
    # The agent found the new source does not hold the applied commit: descends is None.
    d = decide(
        MOVED,
        _obs(_facts(policy, message=message, descends=None), applied=MOVED.applied),
        NEW_CFG,
        compile_plan,
    )
    head = d.state.head
    assert head is not None
    assert (head.verdict.reason if head.verdict else None) == reason


def test_the_first_head_of_a_new_source_is_verified_as_always() -> None:
    signed = replace(SIGNED, source=NEW_URL)
    facts = _facts(_policy(1, 2, 3, 4, 5), signature=UNSIGNED, descends=None)
    d = decide(MOVED, _obs(facts, applied=MOVED.applied), signed, compile_plan)
    assert d.state.head is not None and d.state.head.verdict is not None
    assert d.state.head.verdict.reason == UNSIGNED_COMMIT
    assert d.target is not None and d.target.sha == APPLIED_SHA


def test_a_new_source_holding_the_applied_commit_must_still_descend_from_it() -> None:
    d = decide(MOVED, _obs(_facts(descends=False), applied=MOVED.applied), NEW_CFG, compile_plan)
    assert d.state.head is not None and d.state.head.verdict is not None
    assert d.state.head.verdict.reason == HISTORY_REWRITTEN


@pytest.mark.parametrize(
    ("applied_source", "message", "reason"),
    [
        (OLD, "change", MASS_REVOKE_BLOCKED),
        (OLD, f"change\n\n{TRAILER}: true", None),
        (None, "change", None),  # the same source: as before, nothing to measure against
    ],
    ids=["moved-unreadable", "moved-unreadable-override", "same-source-unreadable"],
)
def test_a_new_source_whose_enforced_revision_cannot_be_read_waits_for_the_trailer(
    applied_source: SourceRef | None, message: str, reason: str | None
) -> None:
    unread = replace(APPLIED, policy=None, plan=None, source=applied_source)
    st = replace(BEFORE, applied=unread)
    d = decide(
        st, _obs(_facts(message=message, descends=None), applied=unread), NEW_CFG, compile_plan
    )
    head = d.state.head
    assert head is not None and (head.verdict.reason if head.verdict else None) == reason
    if reason is not None:
        assert head.verdict is not None and "cannot be read" in head.verdict.message


def _status(st: AgentState) -> dict[str, Any]:
    return status_of(st, NEW_CFG)


def test_the_status_shows_the_change_until_and_after_the_new_source_is_applied() -> None:
    refused = decide(
        MOVED, _obs(_facts(_policy(), descends=None), applied=MOVED.applied), NEW_CFG, compile_plan
    )
    waiting = settle(refused, _result(), NEW_CFG, applied_at="t1", elapsed=0.1).state
    assert waiting.applied is not None and waiting.applied.source == OLD
    change = _status(waiting)["sourceChange"]
    assert change == {
        "reason": SOURCE_CHANGED,
        "from": OLD.to_dict(),
        "to": current_source(NEW_CFG).to_dict(),
        "detectedAt": _obs().now,
        "enforcedRevision": CFG.revision(APPLIED_SHA),
        "pending": True,
    }
    accepted = decide(
        waiting,
        _obs(_facts(_policy(1, 2, 3, 4, 5), descends=None), applied=waiting.applied),
        NEW_CFG,
        compile_plan,
    )
    done = settle(accepted, _result(), NEW_CFG, applied_at="t2", elapsed=0.1).state
    assert done.applied is not None and done.applied.sha == HEAD_SHA
    assert done.applied.source == current_source(NEW_CFG)
    assert _status(done)["sourceChange"]["pending"] is False
    assert condition(done.conditions, READY).status == TRUE  # type: ignore[union-attr]


def test_going_back_before_the_new_source_was_applied_is_a_change_too() -> None:
    st, _ = note_source(MOVED, NEW_CFG, "t1")  # old -> new, never applied
    back = replace(CFG, source=OLD_URL)
    st, log = note_source(st, back, "t2")
    assert log is not None and log.record["from"]["url"].endswith(
        "git.new.example/platform/policy.git"
    )
    assert st.source_change is not None and st.source_change.new == OLD
    assert _status(st)["sourceChange"]["pending"] is False


# -- the state file --------------------------------------------------------------------------------


def test_the_source_and_the_change_survive_a_restart() -> None:
    st, _ = note_source(MOVED, NEW_CFG, "t1")
    back = from_persisted(json.loads(json.dumps(to_persisted(st))))
    assert back.applied is not None and back.applied.source == OLD
    assert back.source_change == st.source_change
    assert "token" not in json.dumps(to_persisted(st))


@pytest.mark.parametrize(
    "entry",
    [
        None,
        "https://evil.example/x",
        {"url": 5, "branch": "main"},
        {"url": "https://evil.example/x"},
        {"url": "", "branch": "main"},
        {"url": "https://evil.example/" + "x" * 5000, "branch": "main"},
        {"url": "https://evil.example/x", "branch": ["main"]},
    ],
    ids=["missing", "string", "url-not-text", "no-branch", "empty", "oversized", "branch-list"],
)
def test_a_damaged_source_entry_reads_as_the_configured_source(entry: Any) -> None:
    """Damage can make the agent check ancestry, never skip the check."""
    data = to_persisted(MOVED)
    data["applied"]["source"] = entry
    st = from_persisted(data)
    assert st.applied is not None and st.applied.source is None
    d = decide(
        st,
        _obs(_facts(descends=False), applied=replace(APPLIED, source=None)),
        NEW_CFG,
        compile_plan,
    )
    assert d.state.head is not None and d.state.head.verdict is not None
    assert d.state.head.verdict.reason == HISTORY_REWRITTEN


@pytest.mark.parametrize(
    "sha", ["--upload-pack=touch /tmp/pwned", "HEAD", "a" * 39, "../../etc/passwd"]
)
def test_an_applied_revision_that_is_not_a_commit_id_is_dropped(sha: str) -> None:
    data = to_persisted(MOVED)
    data["applied"]["sha"] = sha
    assert from_persisted(data).applied is None


# -- an agent against real repositories ------------------------------------------------------------


def _cfg(tmp_path: Path, url: str, **more: Any) -> AgentConfig:
    store = tmp_path / "store.json"
    if not store.exists():
        write_store(store, [container("c0", 0), container("c1", 1)])
    return build_config(
        {
            "source": url,
            "cell": "mem",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "status-push": False,
            **more,
        },
        {},
    )


def _run(cfg: AgentConfig, dp: MemoryDataplane) -> tuple[AgentState, list[dict[str, Any]]]:
    """One sync by a freshly started agent (a restart), and what it logged to stderr."""
    err = io.StringIO()
    agent = Agent(cfg, out=io.StringIO(), err=err, backend=dp)
    st = agent.cycle(SYNC)
    agent.source.close()
    return st, [json.loads(x) for x in err.getvalue().splitlines()]


def _ready(st: AgentState) -> tuple[str, str]:
    c = condition(st.conditions, READY)
    assert c is not None
    return c.status, c.reason


def _second_server(tmp_path: Path) -> PolicyRepo:
    """Another bare repository with a history of its own (a new git server)."""
    return local_repo(tmp_path / "new-server")


@pytest.fixture
def old_server(tmp_path: Path) -> PolicyRepo:
    return local_repo(tmp_path / "old-server")


def test_a_move_to_a_new_server_is_a_fresh_start_not_a_rewind(
    tmp_path: Path, old_server: PolicyRepo
) -> None:
    a1 = old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    st, _ = _run(_cfg(tmp_path, old_server.url), dp)
    assert st.applied is not None and st.applied.sha == a1

    new = _second_server(tmp_path)
    b1 = new.commit("imported into the new server", {"sg.yaml": sg("web", tcp_rules(4))})
    cfg = _cfg(tmp_path, new.url)
    st, logs = _run(cfg, dp)
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and st.applied.sha == b1
    assert st.applied.source == current_source(cfg)
    [log] = [x for x in logs if x.get("event") == "source-changed"]
    assert (log["from"]["url"], log["to"]["url"]) == (old_server.url, new.url)
    # The state says where the applied revision came from; the old cache is gone; the new
    # cache holds only the new server's objects.
    saved = json.loads((Path(cfg.state_dir) / "state.json").read_text())
    assert saved["applied"]["source"] == {"url": new.url, "branch": "main"}
    assert saved["sourceChange"]["from"]["url"] == old_server.url
    assert not (Path(cfg.state_dir) / "cache-applied.git").exists()
    cache = Path(cfg.state_dir) / "cache.git"
    assert (
        git("--git-dir", str(cache), "config", "--get", IDENTITY_KEY)
        == current_source(cfg).cache_id
    )
    assert not GitSource(new.url, "main", cache).has_commit(a1)


def test_the_new_servers_first_head_is_measured_against_the_rules_the_cell_enforces(
    tmp_path: Path, old_server: PolicyRepo
) -> None:
    a1 = old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(4))})
    dp = MemoryDataplane()
    _run(_cfg(tmp_path, old_server.url), dp)
    enforced = dict(dp.chains[4])

    new = _second_server(tmp_path)
    new.commit("imported, but the rules were lost", {"sg.yaml": sg("web", [])})
    cfg = _cfg(tmp_path, new.url)
    for _restart in range(2):  # also after a restart: the old source's cache is kept aside
        st, _ = _run(cfg, dp)
        assert _ready(st) == (FALSE, MASS_REVOKE_BLOCKED)
        assert st.head is not None and st.head.verdict is not None
        assert "cannot be read" not in st.head.verdict.message  # measured, not unknown
        assert st.applied is not None and st.applied.sha == a1 and dp.chains[4] == enforced
        assert (Path(cfg.state_dir) / "cache-applied.git").is_dir()

    b2 = new.commit(f"yes, cut it\n\n{TRAILER}: true")
    st, _ = _run(cfg, dp)
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and st.applied.sha == b2
    assert not (Path(cfg.state_dir) / "cache-applied.git").exists()


def test_a_mirror_of_the_old_server_carries_on_where_the_cell_stands(
    tmp_path: Path, old_server: PolicyRepo
) -> None:
    """The usual move: the new server got the repository with its history; its head
    descends from the applied commit, and is applied like any other."""
    old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(3))})
    a2 = old_server.commit("more", {"sg.yaml": sg("web", tcp_rules(4))})
    dp = MemoryDataplane()
    _run(_cfg(tmp_path, old_server.url), dp)

    mirror = _second_server(tmp_path)
    a3 = old_server.commit("after the move", {"sg.yaml": sg("web", tcp_rules(5))}, push=False)
    git("push", "-q", mirror.url, "main", cwd=old_server.root)
    cfg = _cfg(tmp_path, mirror.url)
    st, logs = _run(cfg, dp)
    assert [x["event"] for x in logs if x.get("event") == "source-changed"] == ["source-changed"]
    assert _ready(st) == (TRUE, RECONCILIATION_SUCCEEDED)
    assert st.applied is not None and (st.applied.sha, st.applied.source) == (
        a3,
        current_source(cfg),
    )
    assert GitSource(mirror.url, "main", Path(cfg.state_dir) / "cache.git").is_ancestor(a2, a3)


# -- attacks on the state file ---------------------------------------------------------------------


def _edit_state(cfg: AgentConfig, edit: Any) -> None:
    path = Path(cfg.state_dir) / "state.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "claimed",
    [
        {"url": "https://elsewhere.example/unrelated.git", "branch": "main"},  # another source
        {"url": 42, "branch": "main"},  # damaged
    ],
    ids=["another-source", "damaged"],
)
def test_a_hand_written_state_does_not_get_a_rewind_or_a_mass_revoke_past_the_gates(
    tmp_path: Path, old_server: PolicyRepo, claimed: dict[str, Any]
) -> None:
    old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(4))})
    a2 = old_server.commit("more", {"sg.yaml": sg("web", tcp_rules(5))})
    cfg = _cfg(tmp_path, old_server.url)
    dp = MemoryDataplane()
    _run(cfg, dp)

    def claim(data: dict[str, Any]) -> None:
        data["applied"]["source"] = claimed

    # A rewound head: the configured source holds the applied commit, so ancestry is checked.
    _edit_state(cfg, claim)
    old_server.reset("HEAD~1")
    old_server.commit("rewritten", {"sg.yaml": sg("web", tcp_rules(5))}, push=False)
    old_server.push(force=True)
    st, _ = _run(cfg, dp)
    assert _ready(st) == (FALSE, HISTORY_REWRITTEN) and st.applied is not None
    assert st.applied.sha == a2

    # A head that descends but takes all access away: the gate measures it all the same.
    old_server.reset(a2)
    old_server.commit("cut", {"sg.yaml": sg("web", [])}, push=False)
    old_server.push(force=True)
    _edit_state(cfg, claim)
    st, _ = _run(cfg, dp)
    assert _ready(st) == (FALSE, MASS_REVOKE_BLOCKED)
    assert st.applied is not None and st.applied.sha == a2


def test_a_state_claiming_a_revision_no_cache_holds_cannot_skip_the_gate(
    tmp_path: Path, old_server: PolicyRepo
) -> None:
    """A forged applied revision from a forged source: nothing to measure against, so the
    head waits for the trailer instead of being applied unmeasured."""
    old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(4))})
    cfg = _cfg(tmp_path, old_server.url)
    dp = MemoryDataplane()
    _run(cfg, dp)

    def forge(data: dict[str, Any]) -> None:
        data["applied"]["sha"] = "f" * 40
        data["applied"]["source"] = {"url": "https://elsewhere.example/x.git", "branch": "main"}

    _edit_state(cfg, forge)
    old_server.commit("cut", {"sg.yaml": sg("web", tcp_rules(1))})
    st, _ = _run(cfg, dp)
    assert _ready(st) == (FALSE, MASS_REVOKE_BLOCKED)
    assert load_state(Path(cfg.state_dir) / "state.json").applied.sha == "f" * 40  # type: ignore[union-attr]


def test_an_upgraded_state_without_a_source_is_not_a_fresh_start(
    tmp_path: Path, old_server: PolicyRepo
) -> None:
    old_server.commit("web", {"sg.yaml": sg("web", tcp_rules(3))})
    a2 = old_server.commit("more", {"sg.yaml": sg("web", tcp_rules(4))})
    cfg = _cfg(tmp_path, old_server.url)
    dp = MemoryDataplane()
    _run(cfg, dp)

    def downgrade(data: dict[str, Any]) -> None:  # as the previous release wrote it
        del data["applied"]["source"]
        del data["sourceChange"]

    _edit_state(cfg, downgrade)
    git("--git-dir", str(Path(cfg.state_dir) / "cache.git"), "config", "--unset", IDENTITY_KEY)
    old_server.reset("HEAD~1")
    old_server.commit("rewritten", {"sg.yaml": sg("web", tcp_rules(5))}, push=False)
    old_server.push(force=True)
    st, logs = _run(cfg, dp)
    assert [x for x in logs if x.get("event") == "source-changed"] == []
    assert _ready(st) == (FALSE, HISTORY_REWRITTEN) and st.applied is not None
    assert st.applied.sha == a2 and st.applied.source == current_source(cfg)


# -- the fetch cache -------------------------------------------------------------------------------


def test_a_cache_never_holds_two_sources(tmp_path: Path) -> None:
    one, two = local_repo(tmp_path / "one"), local_repo(tmp_path / "two")
    s1 = one.commit("one", {"sg.yaml": sg("web", tcp_rules(1))})
    s2 = two.commit("two", {"sg.yaml": sg("web", tcp_rules(2))})
    path = tmp_path / "cache.git"
    first = SourceRef.of(one.url, "main")
    assert not GitSource(one.url, "main", path, identity=first.cache_id).fetch().recloned
    other = GitSource(two.url, "main", path, identity=SourceRef.of(two.url, "main").cache_id)
    fetched = other.fetch()
    assert fetched.sha == s2 and fetched.recloned and not other.has_commit(s1)
    # An untagged cache (from before the tag) is adopted, not thrown away.
    git("--git-dir", str(path), "config", "--unset", IDENTITY_KEY)
    again = GitSource(two.url, "main", path, identity=SourceRef.of(two.url, "main").cache_id)
    assert not again.fetch().recloned and again.cached_identity() == again.identity


# -- end to end: an agent process moved between two git daemons, enforcing in a namespace ----------


@pytest.mark.netns
@pytest.mark.requires("git")
def test_an_agent_moved_to_a_new_git_server_keeps_its_rules_until_the_new_server_is_applied(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811 - the old server
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab(
        [ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)],
        [ServiceSpec("echo", tcp_ports=(80, 8080))],
        conntrack=False,
    )
    ip = lab.services["echo"].ipv4

    def echo(*ports: int) -> dict[str, str]:
        return {
            "sg.yaml": sg(
                "echo", [f'{{protocol: tcp, destination: {ip}, ports: "{p}"}}' for p in ports]
            )
        }

    old = policy_repo.commit("echo:80", echo(80))
    cell = agents(
        "cell-m", source=policy_repo.url, containers=str(lab.write_store()), netns=lab.cell
    )
    assert cell.once().returncode == 0
    enforced = dict(kernel(lab.cell).chains)

    new_server = GitDaemon(tmp_path / "srv-new")
    try:
        new_server.start()
        new = PolicyRepo(
            tmp_path / "work-new", new_server.url("policy"), new_server.create("policy")
        )
        # Re-imported, not mirrored: a history of its own, and the import lost the rules.
        new.commit("import", echo())
        cell.settings["source"] = new.url
        assert cell.once().returncode == 1
        doc = read_status(new.bare, cell.name)
        assert doc is not None
        assert (ready(doc)["status"], ready(doc)["reason"]) == ("False", MASS_REVOKE_BLOCKED)
        assert doc["lastAppliedRevision"] == f"main@sha1:{old}"
        assert doc["sourceChange"]["from"]["url"] == policy_repo.url
        assert doc["sourceChange"]["to"]["url"] == new.url
        assert doc["sourceChange"]["pending"] is True
        assert dict(kernel(lab.cell).chains) == enforced
        assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED

        fixed = new.commit("restore echo:80, and open 8080", echo(80, 8080))
        assert cell.once().returncode == 0
        doc = read_status(new.bare, cell.name)
        assert doc is not None and doc["lastAppliedRevision"] == f"main@sha1:{fixed}"
        assert doc["sourceChange"]["pending"] is False
        assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.CONNECTED
        changes = [r for r in cell.log_records("err") if r.get("event") == "source-changed"]
        assert [(r["from"]["url"], r["to"]["url"]) for r in changes] == [(policy_repo.url, new.url)]
    finally:
        new_server.stop()
