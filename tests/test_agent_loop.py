"""The agent's cycle in-process, with a file:// remote and an in-memory dataplane: runs
anywhere (no root), and pins down what a cycle logs, persists and reports.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

import reconciler.core.compile as compile_module
from asgctl_lab.gitserver import git
from reconciler.agent.config import build_config
from reconciler.agent.core import condition
from reconciler.agent.loop import INVENTORY, SYNC, Agent
from reconciler.backends import DataplaneError
from reconciler.backends.iptables.delta import IptablesDelta, compute_delta
from reconciler.backends.iptables.parse import HookCopy, OwnedState
from reconciler.backends.iptables.render import Ruleset, hook_rule, render_cell
from reconciler.core.cellplan import CellPlan
from tests.agentkit import container, local_repo, sg, tcp_rules, write_store


class MemoryDataplane:
    """A kernel in a dict: applying a delta installs what was last rendered for its family."""

    name = "memory"

    def __init__(self) -> None:
        self.chains: dict[int, dict[str, tuple[str, ...]]] = {4: {}, 6: {}}
        self.rendered: dict[int, Ruleset] = {}
        self.fail: Exception | None = None
        self.applies = 0
        self.verifies = 0

    def render(self, plan: CellPlan, family: int) -> Ruleset:
        ruleset = render_cell(plan, family)
        self.rendered[family] = ruleset
        return ruleset

    def read(self, family: int) -> OwnedState:
        if self.fail is not None:
            raise self.fail
        chains = self.chains[family]
        hooks = (HookCopy(0, hook_rule()),) if chains else ()
        return OwnedState(family, dict(chains), hooks)

    def delta(
        self, desired: Ruleset, observed: OwnedState, last, *, heal_drift=True
    ) -> IptablesDelta:  # type: ignore[no-untyped-def]
        return compute_delta(desired, observed, last, heal_drift=heal_drift)

    def apply(self, delta: IptablesDelta) -> None:
        self.applies += 1
        self.chains[delta.family] = dict(self.rendered[delta.family].chains)

    def verify(self, desired: Ruleset, delta: IptablesDelta) -> None:
        self.verifies += 1


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    repo = local_repo(tmp_path)
    bare = repo.bare

    def commit(files: dict[str, str], message: str = "change") -> str:
        return repo.commit(message, files)

    store = write_store(tmp_path / "store.json", [container("c0", 0), container("c1", 1)])
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "mem",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "retry-base": "1s",
        },
        {},
    )
    return cfg, commit, store, bare


def _agent(cfg, dataplane: MemoryDataplane) -> tuple[Agent, io.StringIO, io.StringIO]:  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    return Agent(cfg, out=out, err=err, backend=dataplane), out, err


def test_a_cycle_applies_logs_persists_and_reports(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, store, bare = setup
    sha = commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, out, err = _agent(cfg, dp)
    st = agent.cycle(SYNC)
    assert st.applied is not None and st.applied.sha == sha
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["handle"], x["change"], x["rules_added"]) for x in lines] == [
        ("c0", "added", 3),
        ("c1", "added", 3),
    ]
    assert json.loads(err.getvalue())["event"] == "ready-changed"
    assert json.loads((Path(cfg.state_dir) / "state.json").read_text())["applied"]["sha"] == sha
    assert agent.pusher is not None and agent.pusher.push_now().ok
    assert "lastAppliedRevision: main@sha1:" + sha in git(
        "--git-dir", str(bare), "show", "status/mem:status.yaml"
    )

    # An unchanged cycle sends nothing and logs nothing.
    for stream in (out, err):
        stream.seek(0)
        stream.truncate()
    applies = dp.applies
    agent.cycle(SYNC)
    assert dp.applies == applies and out.getvalue() == "" and err.getvalue() == ""
    # A touch of the metadata file is no change either.
    store.write_text(store.read_text())
    assert agent.cycle(INVENTORY) is agent.state


@pytest.mark.parametrize("once", [False, True])
def test_an_install_is_read_back_next_cycle_unless_there_is_none(setup, once: bool) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, _, _ = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, _, _ = _agent(replace(cfg, once=once), dp)
    agent.cycle(SYNC)
    assert dp.applies == 1
    assert dp.verifies == (1 if once else 0)  # a --once run has no next cycle to read it back
    commit({"sg.yaml": sg("web", tcp_rules(4))})
    agent.cycle(SYNC)
    assert dp.applies == 2 and dp.verifies == (2 if once else 1)  # a change: read back at once


def test_a_restarted_agent_remembers_what_it_applied(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, store, _ = setup
    first = commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, _, _ = _agent(cfg, dp)
    agent.cycle(SYNC)
    agent.source.close()
    # While it is down: a container comes, and the policy moves on.
    write_store(store, [container("c0", 0), container("c1", 1), container("c2", 2)])
    second = commit({"sg.yaml": sg("web", tcp_rules(4))})
    again, out, _ = _agent(cfg, dp)
    assert again.state.applied is not None and again.state.applied.sha == first
    st = again.cycle(SYNC)
    assert st.applied is not None and st.applied.sha == second
    changes = {x["handle"]: x for x in map(json.loads, out.getvalue().splitlines())}
    assert changes["c2"]["change"] == "added"
    assert changes["c0"]["change"] == "updated" and changes["c0"]["rules_added"] == 1
    assert [h.total for h in st.history] == [1, 1]


def test_report_only_drift_is_reported_as_drift_and_left(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, _, _ = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, out, _ = _agent(replace(cfg, heal_drift=False), dp)
    agent.cycle(SYNC)
    chain = next(n for n in dp.chains[4] if n.startswith("ASG-C-"))
    dp.chains[4][chain] = dp.chains[4][chain][:-1]  # someone deletes a rule
    out.seek(0)
    out.truncate()
    applies = dp.applies
    st = agent.cycle(SYNC)
    drifted = condition(st.conditions, "Drifted")
    assert drifted is not None and (drifted.status, drifted.reason) == ("True", "DriftDetected")
    assert drifted.message == f"ipv4 {chain}: rule-missing (1 rule); not repaired (report-only)"
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    assert dp.applies == applies and out.getvalue() == ""  # nothing sent, no change logged
    assert st.drift_log[0]["repaired"] is False and st.drift_corrections == 0


def test_an_upgrade_that_renames_chains_installs_them_without_self_heal(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel holds what an older asgctl rendered (64-bit ids, other chain names) and
    state.json its digest; the new version must not take its own plan for the last one
    applied, or with self-heal off every renamed chain would count as drift, left alone."""
    cfg, commit, _, _ = setup
    cfg = replace(cfg, heal_drift=False)
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    monkeypatch.setattr(
        compile_module, "content_id", lambda t: hashlib.sha256(t.encode()).hexdigest()[:16]
    )
    compile_module._chain_id.cache_clear()
    dp = MemoryDataplane()
    old, _, _ = _agent(cfg, dp)
    old.cycle(SYNC)
    old.source.close()
    monkeypatch.undo()
    compile_module._chain_id.cache_clear()
    installed = dict(dp.chains[4])
    assert installed and all(len(n) <= 22 for n in installed)  # ASG-G-<16 digits>

    again, _, _ = _agent(cfg, dp)
    st = again.cycle(SYNC)
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    assert st.applied is not None and st.applied.plan is not None
    assert dp.chains[4] == render_cell(st.applied.plan, 4).chains != installed


def test_metrics_go_to_a_textfile_for_node_exporter(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, _, _ = setup
    sha = commit({"sg.yaml": sg("web", tcp_rules(3))})
    prom = tmp_path / "asgctl.prom"
    agent, _, _ = _agent(replace(cfg, metrics_textfile=str(prom)), MemoryDataplane())
    agent.cycle(SYNC)
    text = prom.read_text()
    assert 'asgctl_agent_applied_revision_info{cell="mem",digest="' in text
    assert f'revision="main@sha1:{sha}"' in text
    assert 'asgctl_agent_rules_installed{cell="mem"} ' in text
    assert 'asgctl_agent_sync_duration_seconds_count{cell="mem",phase="enforce"} 1' in text


def test_dataplane_failures_keep_state_and_back_off(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, _, _ = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, _, err = _agent(cfg, dp)
    good = agent.cycle(SYNC)
    dp.fail = DataplaneError("iptables-save: exit 4")
    bad = agent.cycle(SYNC)
    ready = condition(bad.conditions, "Ready")
    assert ready is not None and ready.reason == "EnforcementFailed"
    assert "still enforcing" in ready.message and bad.failures == 1
    assert bad.applied == good.applied
    assert condition(bad.conditions, "Reconciling").reason == "ProgressingWithRetry"  # type: ignore[union-attr]
    # Anything else a backend throws is caught by the loop's guard, logged, and retried.
    dp.fail = RuntimeError("surprise")
    assert agent._guarded(SYNC) >= 2
    assert any(json.loads(x)["event"] == "cycle-failed" for x in err.getvalue().splitlines())
    dp.fail = None
    assert agent._guarded(SYNC) == 0


def test_a_corrupt_cache_is_fetched_again_without_touching_the_rules(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, _, _ = setup
    sha = commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, _, _ = _agent(cfg, dp)
    agent.cycle(SYNC)
    kernel = {f: dict(c) for f, c in dp.chains.items()}
    agent.source.close()
    for f in (Path(cfg.state_dir) / "cache.git" / "objects").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (Path(cfg.state_dir) / "cache.git" / "HEAD").write_text("nonsense")
    st = agent.cycle(SYNC)
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]
    assert st.applied is not None and st.applied.sha == sha
    assert dp.chains == kernel


def test_a_source_failure_stands_until_a_sync_shows_recovery(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, commit, store, bare = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    dp = MemoryDataplane()
    agent, _, _ = _agent(cfg, dp)
    agent.cycle(SYNC)
    bare.rename(tmp_path / "away.git")
    down = agent.cycle(SYNC)
    assert condition(down.conditions, "Ready").reason == "RepositoryNotFound"  # type: ignore[union-attr]
    assert down.failures == 1
    # A container arrives: enforced, but the source problem is still reported.
    write_store(store, [container("c0", 0), container("c1", 1), container("c2", 2)])
    st = agent.cycle(INVENTORY)
    assert st.applied is not None and len(st.applied.inventory) == 3
    assert condition(st.conditions, "Ready").reason == "RepositoryNotFound"  # type: ignore[union-attr]
    assert st.failures == 1
    (tmp_path / "away.git").rename(bare)
    assert condition(agent.cycle(SYNC).conditions, "Ready").status == "True"  # type: ignore[union-attr]


def test_an_in_process_run_gives_the_signals_back(setup) -> None:  # type: ignore[no-untyped-def]
    """The agent handles SIGTERM/SIGINT/SIGHUP while it runs; run in-process (a test, an
    embedding program), it puts the previous handlers back, or that process would stay deaf
    to SIGTERM -- and so would anything it forks."""
    import signal

    def mine(signum, frame):  # type: ignore[no-untyped-def]
        pass

    cfg, commit, _, _ = setup
    commit({"sg.yaml": sg("web", tcp_rules(3))})
    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        agent, _, _ = _agent(replace(cfg, once=True, status_push=False), MemoryDataplane())
        assert agent.run() == 0
        for sig in before:
            assert signal.getsignal(sig) is mine, sig
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
