"""The agent process: one cycle, the timer around it, signals, and the threads at its side.

A *sync* cycle (on the jittered interval, at start, on SIGHUP) fetches the branch and, when
the head is new, puts it through the gates (signature, ancestry, validation, mass revoke)
before it can become the revision enforced.  An *inventory* cycle (the metadata file changed)
skips git and converges the revision already applied for the new containers.  Every cycle is
observe -> decide -> enforce -> settle -> report: the I/O at both ends is here (`Agent`), the
decisions between are pure functions of what was observed (`reconciler.agent.cycle`).

Whatever fails, the kernel keeps the last rules that were applied: nothing here ever flushes
or "resets" the dataplane on an error.  Transient failures (git unreachable, a dataplane
error) are retried with capped exponential back-off; refusals (bad signature, rewind, invalid
policy, mass revoke) need a human, are reported as Stalled, and are looked at again only
when the branch moves.

Threads: the loop runs cycles on the main thread, one at a time; the inventory watcher, the
status pusher and the metrics server run beside it and only ever talk to it through a
`queue.SimpleQueue` (safe to fill from a signal handler) or locks.  SIGTERM/SIGINT let the
cycle in progress finish, flush the status briefly and exit with the rules in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.agent.conditions import (
    CACHE_CORRUPT,
    DATAPLANE_UNAVAILABLE,
    INTERNAL_ERROR,
    READY,
    TRUE,
)
from reconciler.agent.config import AgentConfig, parse_listen
from reconciler.agent.core import Problem, backoff, condition
from reconciler.agent.cycle import (
    INVENTORY,
    SYNC,
    Converge,
    HeadFacts,
    HeadTrust,
    Log,
    Need,
    Observation,
    Outcome,
    Trigger,
    current_source,
    decide,
    inventory_unchanged,
    next_need,
    restored_applied,
    settle,
)
from reconciler.agent.metrics import Metrics, MetricsServer, write_textfile
from reconciler.agent.peers import PeerReader
from reconciler.agent.rollout import FleetReports, wants_fleet
from reconciler.agent.source import GitSource, MalformedCommit, SourceError, clip
from reconciler.agent.sourceid import moved
from reconciler.agent.state import AgentState, Applied, Head, load_state, save_state
from reconciler.agent.status import PushResult, StatusPusher, build_status, iso
from reconciler.agent.verify import SignatureVerifier
from reconciler.agent.watch import InventoryWatcher
from reconciler.agent.webhook import WebhookServer, serve
from reconciler.core.cellplan import CellPlan, CellSettings
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, PolicySet
from reconciler.core.policytest import CaseResult, run_tests
from reconciler.fqdn.agent import AgentNames
from reconciler.policy.load import load_revision
from reconciler.sources.cellstore import InventoryError, StoreReading, load_store
from reconciler.status.write import StatusWriter

if TYPE_CHECKING:
    from reconciler.backends import ConvergeResult
    from reconciler.core.parity import ParityReport

STOP = "stop"
MAINTAIN_EVERY = 100  # cycles between `git gc --auto` of the cache
_PHASE_OF_NEED = {Need.COMMIT: "verify", Need.TRUST: "verify", Need.REVISION: "load"}
"""The status timing phase each fact about a head counts towards (the cache check: none)."""


def next_delay(cfg: AgentConfig, failures: int, rand: float) -> float:
    """Seconds to the next sync: the interval plus up to `jitter` of it, or back-off.

    `rand` is in [0, 1).  After `failures` consecutive transient failures the wait is
    retry_base * 2^(failures-1), capped, with the same relative jitter.
    """
    if failures > 0:
        base = backoff(failures, cfg.retry_base, cfg.effective_retry_cap)
    else:
        base = cfg.interval
    return base * (1 + cfg.jitter * rand)


def _version() -> str:
    try:
        return metadata.version("asgctl")
    except metadata.PackageNotFoundError:
        return "unknown"


class Agent:
    """One cell's agent.  `cycle()` is usable on its own (tests); `run()` is the process."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        backend: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.clock = clock
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "state.json"
        self.source_ref = current_source(cfg)
        self.source = GitSource(
            cfg.source,
            cfg.branch,
            self.state_dir / "cache.git",
            depth=cfg.fetch_depth,
            timeout=cfg.git_timeout,
            identity=self.source_ref.cache_id,
        )
        self.verifier = (
            SignatureVerifier(
                cfg.allowed_signers, cfg.gpg_keyring, self.state_dir, cfg.git_timeout, clock
            )
            if cfg.verify == "signed"
            else None
        )
        self.peers = PeerReader(
            cfg.status_repos(),
            self.state_dir / "peers.git",
            timeout=cfg.git_timeout,
        )
        self.metrics = Metrics(cfg.cell)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.state = load_state(self.state_file)
        self.applied_cache = self._keep_applied_cache()
        self._backend = backend
        self._backend_owned = backend is None
        self._settings: CellSettings | None = None
        self._cycles = 0
        self._crashes = 0
        self._compiled: tuple[PolicySet, tuple[Container, ...], CellPlan] | None = None
        self._tested: tuple[PolicySet, tuple[CaseResult, ...]] | None = None
        self._compile_seconds = 0.0  # this cycle's, for its render phase
        self._settings_seconds = 0.0
        self.pusher: StatusPusher | None = None
        if cfg.status_push:
            writer = StatusWriter(
                cfg.status_repos().url_for(cfg.cell),
                cfg.status_branch,
                self.state_dir / "status.git",
                cfg.git_timeout,
            )
            self.pusher = StatusPusher(
                writer,
                heartbeat=cfg.heartbeat,
                min_interval=cfg.status_min_interval,
                retry_base=cfg.retry_base,
                retry_cap=cfg.effective_retry_cap,
                on_result=self._pushed,
            )
        self.watcher: InventoryWatcher | None = None
        self.metrics_server: MetricsServer | None = None
        self.webhook: WebhookServer | None = None
        self.flows: Any = None  # reconciler.flows.collect.Collector, when flow-log is nflog
        self.last_doc: dict[str, Any] | None = None
        self.parity: ParityReport | None = None
        """Shadow mode: the last comparison with CF's chains (None before the first)."""
        self._stopping = threading.Event()
        self.names = AgentNames(
            cfg.fqdn_settings(), cfg.backend, cfg.netns, intercept=self._backend_owned
        )
        """Grants by name: the applied plan's names, resolved into their kernel sets."""

    # -- edges: the applied revision's source ---

    @property
    def _applied_cache_path(self) -> Path:
        return self.state_dir / "cache-applied.git"

    def _keep_applied_cache(self) -> GitSource | None:
        """When the applied revision came from another source than the configured one, keep
        that source's cache aside (never fetched into) to read the applied revision from:
        the mass-revoke gate measures the new source's first head against it.  Otherwise
        there is no such cache (one left from a finished move is removed)."""
        kept = self._applied_cache_path
        applied = self.state.applied
        old = applied.source if applied is not None else None
        if old is None or not moved(old, self.source_ref):
            shutil.rmtree(kept, ignore_errors=True)
            return None
        if not kept.exists() and self.source.cached_identity() in (old.cache_id, None):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.source.path, kept)
        return GitSource(old.url, old.branch, kept, timeout=self.cfg.git_timeout)

    def _drop_applied_cache(self, st: AgentState) -> None:
        """Once a revision of the configured source is applied (and saved), the old
        source's cache has served its purpose."""
        if self.applied_cache is None or st.applied is None:
            return
        if not moved(st.applied.source, self.source_ref):
            self.applied_cache = None
            shutil.rmtree(self._applied_cache_path, ignore_errors=True)

    # -- edges: inventory, backend, logs --------------------------------------------------------

    def _read_inventory(self) -> tuple[StoreReading | None, str | None]:
        """The store judged entry by entry, or why it cannot be read at all."""
        try:
            return load_store(self.cfg.containers), None
        except InventoryError as exc:
            return None, str(exc)

    def _dataplane(self) -> Any:
        if self._backend is None:
            from reconciler.backends import Runner, open_backend

            runner = Runner.in_netns(self.cfg.netns) if self.cfg.netns else Runner()
            self._backend = open_backend(self.cfg.backend, self.cfg.variant, runner)
        return self._backend

    def _cell_settings(self) -> tuple[CellSettings, str | None]:
        """The cell's settings for the plan, with the underlay found once; when it cannot be
        found, the configured settings and why (UnderlayUnknown: nothing is converged).

        The underlay is configured, or read off the default routes of the namespace this agent
        enforces in; an agent handed its backend (tests) detects nothing and uses what is
        configured (none: every packet a container sends is judged)."""
        if self._settings is None:
            from reconciler.backends.kernel.underlay import UnderlayError

            detected = None
            if not self.cfg.underlay_interface and self._backend_owned:
                from reconciler.backends import Runner
                from reconciler.backends.kernel.underlay import detect_underlay

                runner = Runner.in_netns(self.cfg.netns) if self.cfg.netns else Runner()
                try:
                    detected = detect_underlay(runner)
                except UnderlayError as exc:
                    return self.cfg.cell_settings(), str(exc)
            self._settings = self.cfg.cell_settings(detected)
        return self._settings, None

    def _log(self, stream: TextIO, record: Mapping[str, Any]) -> None:
        line = json.dumps({"time": iso(self.clock()), **record}, separators=(",", ":"))
        with contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop enforcement
            stream.write(line + "\n")
            stream.flush()

    def _write_logs(self, logs: Iterable[Log]) -> None:
        for log in logs:
            self._log(self.out if log.stream == "out" else self.err, log.record)

    def _pushed(self, result: PushResult) -> None:
        self.metrics.inc("asgctl_agent_status_pushes_total", result="ok" if result.ok else "error")

    # -- compiling -----------------------------------------------------------------------------

    def _compile(
        self, policy: PolicySet, inventory: tuple[Container, ...], settings: CellSettings
    ) -> CellPlan:
        """This cell's plan for `policy` over `inventory`, remembering the last one (one slot).

        A sync compiles a new head for the mass-revoke gate, the applied revision beside it,
        and the head again to enforce it; compile_cell is pure and deterministic, so the same
        policy object over an equal inventory gets the remembered plan back.  The slot is
        seeded with the applied plan, so the gate's "before" side is usually free.  The time
        spent compiling is the first part of the cycle's `render` phase.
        """
        memo = self._compiled
        if (
            memo is not None
            and memo[0] is policy
            and memo[1] == inventory
            and memo[2].settings == settings
        ):
            return memo[2]
        t = time.perf_counter()
        try:
            plan = compile_cell(policy, inventory, self.cfg.cell, settings)
        finally:
            self._compile_seconds += time.perf_counter() - t
        self._compiled = (policy, inventory, plan)
        return plan

    def _run_tests(self, policy: PolicySet) -> tuple[CaseResult, ...]:
        """The PolicyTests of `policy`, remembered for the last policy (one slot, like the
        plan): a head is tested once, whatever asks again for the same revision."""
        memo = self._tested
        if memo is not None and memo[0] is policy:
            return memo[1]
        results = run_tests(policy)
        self._tested = (policy, results)
        return results

    # -- observe -------------------------------------------------------------------------------

    def _restore_applied(self, a: Applied | None, settings: CellSettings) -> Applied | None:
        """After a restart, load the applied revision's policy again (from the caches only:
        the kept one of the source it came from, when that is not the configured one, else
        the fetch cache), compiled with the cell's settings as found, so that an unchanged
        plan is recognised by its digest as the last one applied."""
        if a is None or a.policy is not None:
            return a
        cache = next(
            (c for c in (self.applied_cache, self.source) if c is not None and c.has_commit(a.sha)),
            None,
        )
        if cache is None:
            return a
        result = load_revision(cache.path, a.sha, self.cfg.policies_path)
        if not result.ok:
            return a
        return restored_applied(
            a, result.policy, self._compile(result.policy, a.inventory, settings)
        )

    def _head_facts(
        self, sha: str, applied_sha: str | None, new_source: bool, timings: dict[str, float]
    ) -> HeadFacts:
        """Read what the gates need about a new head, one fact at a time (`next_need`).

        `new_source`: the applied revision came from another source than the one fetched."""
        facts = HeadFacts(sha)
        while (need := next_need(facts, applied_sha, self.cfg.allow_rewind)) is not None:
            t = time.perf_counter()
            facts = self._gather(need, facts, applied_sha, new_source)
            phase = _PHASE_OF_NEED.get(need)
            if phase is not None:
                timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t
        return facts

    def _gather(
        self, need: Need, facts: HeadFacts, applied_sha: str | None, new_source: bool = False
    ) -> HeadFacts:
        """One fact about a head, from the cache (SourceError when the cache cannot tell).

        On a new source, a head has no history to protect when the source does not hold the
        applied commit at all (another repository): a fresh start.  When it does (the same
        repository moved, a mirror), the head must descend from it as always.  And when it
        does not, but the old source's kept cache shows the head to be the applied revision's
        own past (a mirror that is behind, docs/fleet.md), the head is a rewind."""
        sha = facts.sha
        if need is Need.COMMIT:
            try:
                return replace(facts, commit=self.source.commit_info(sha))
            except MalformedCommit as exc:
                return replace(facts, malformed=clip(str(exc), 500))
        if need is Need.TRUST:
            assert facts.commit is not None  # next_need asks for the commit first
            check = None
            if self.verifier is not None:
                check = self.verifier.verify(self.source.path, sha, facts.commit.signed)
            descends = None
            # A new source without the applied commit: nothing to descend from (None) --
            # unless the head is in the applied revision's own past.
            if applied_sha is not None and applied_sha != sha:
                if not new_source or self.source.holds(applied_sha):
                    descends = self.source.is_ancestor(applied_sha, sha)
                elif self.applied_cache is not None and self.applied_cache.shows_ancestor(
                    sha, applied_sha
                ):
                    descends = False
            return replace(facts, trust=HeadTrust(check, descends))
        if need is Need.REVISION:
            revision = load_revision(self.source.path, sha, self.cfg.policies_path)
            return replace(facts, revision=revision)
        if not self.source.intact():  # Need.CACHE_CHECK
            self.source.reset()
            raise SourceError(CACHE_CORRUPT, "the cache failed `git fsck`; fetching anew")
        return replace(facts, cache_intact=True)

    def _pending(self, sha: str, facts: HeadFacts | None, judged: Head | None) -> PolicySet | None:
        """The policy of a candidate revision (the head, or the revision it pins) that may be
        valid: as read this cycle, else as judged before."""
        if facts is not None:
            revision = facts.revision
            return revision.policy if revision is not None and revision.ok else None
        if judged is not None and judged.sha == sha and judged.verdict is None:
            return judged.policy
        return None

    def _pinned(
        self,
        fetched: str,
        policy: PolicySet | None,
        applied: Applied | None,
        timings: dict[str, float],
    ) -> HeadFacts | None:
        """The facts about the revision the head pins the fleet to, when the cell is not on it
        and it was not judged before (SourceError when the cache cannot tell)."""
        pin = policy.rollout.pinned if policy is not None and policy.rollout is not None else None
        prev = self.state.pinned
        if pin is None or pin == fetched or (applied is not None and applied.sha == pin):
            return None
        if prev is not None and prev.sha == pin:
            return None
        if not self.source.has_commit(pin):
            self.source.is_ancestor(pin, fetched)  # a shallow cache fetches the history
            if not self.source.has_commit(pin):
                return None  # not on the branch: reported as such (`held_back`)
        fresh = applied is not None and moved(applied.source, self.source_ref)
        return self._head_facts(pin, applied.sha if applied else None, fresh, timings)

    def _fleet(
        self, fetched: str, candidates: list[PolicySet | None], applied: Applied | None
    ) -> FleetReports | None:
        """The other cells' reports, read only when a valid revision other than the applied
        one is pending and a wave of its Rollout (or the applied one's) comes first."""
        if applied is None or applied.sha == fetched:
            return None
        before = applied.policy.rollout if applied.policy is not None else None
        for policy in candidates:
            if policy is not None and wants_fleet(self.cfg.cell, before, policy.rollout):
                return self.peers.read()
        return None

    def _observe(
        self,
        trigger: Trigger,
        now: str,
        reading: StoreReading | None,
        inventory_error: str | None,
        timings: dict[str, float],
        at: float = 0.0,
    ) -> Observation:
        """Everything the decision needs from the world: the fetch and the new head's facts
        (a sync only), the applied revision restored, the underlay."""
        prev = self.state
        t = time.perf_counter()
        settings, underlay_error = self._cell_settings()
        self._settings_seconds = time.perf_counter() - t
        applied = prev.applied
        source_error: Problem | None = None
        head: HeadFacts | None = None
        fleet: FleetReports | None = None
        pinned: HeadFacts | None = None
        if trigger == SYNC:
            t = time.perf_counter()
            try:
                fetched = self.source.fetch()
                timings["fetch"] = time.perf_counter() - t
                applied = self._restore_applied(applied, settings)
                if prev.head is None or prev.head.sha != fetched.sha:
                    fresh = applied is not None and moved(applied.source, self.source_ref)
                    applied_sha = applied.sha if applied else None
                    head = self._head_facts(fetched.sha, applied_sha, fresh, timings)
                policy = self._pending(fetched.sha, head, prev.head)
                pinned = self._pinned(fetched.sha, policy, applied, timings)
                pin = policy.rollout.pinned if policy and policy.rollout else None
                pinned_policy = self._pending(pin or "", pinned, prev.pinned)
                fleet = self._fleet(fetched.sha, [policy, pinned_policy], applied)
            except SourceError as exc:
                timings.setdefault("fetch", time.perf_counter() - t)
                source_error = Problem(exc.reason, exc.message)
                head, pinned, fleet = None, None, None
        return Observation(
            trigger=trigger,
            now=now,
            reading=reading,
            inventory_error=inventory_error,
            applied=self._restore_applied(applied, settings),
            settings=settings,
            underlay_error=underlay_error,
            source_error=source_error,
            head=head,
            pinned=pinned,
            fleet=fleet,
            at=at,
        )

    # -- enforce -------------------------------------------------------------------------------

    def _enforce(self, action: Converge) -> ConvergeResult | Problem:
        """Carry out the decision on the dataplane: the one place the kernel is written."""
        if self.cfg.mode == "shadow":  # compare with CF's chains; write nothing
            from reconciler.agent.shadow import shadow_converge

            memo = self._compiled
            policy = memo[0] if memo is not None and memo[2] is action.plan else None
            done, self.parity = shadow_converge(self.cfg, policy, action.plan)
            return done
        try:
            backend = self._dataplane()
        except Exception as exc:  # any backend failure is reported, never fatal
            return Problem(DATAPLANE_UNAVAILABLE, str(exc))
        from reconciler.backends import converge

        return converge(
            backend,
            action.plan,
            action.last,
            heal_drift=action.heal_drift,
            defer_install_verify=action.defer_install_verify,
        )

    # -- one cycle -----------------------------------------------------------------------------

    def cycle(self, trigger: Trigger = SYNC) -> AgentState:
        """Run one cycle (fetching only for `sync`) and return the new state."""
        at = self.clock()
        now = iso(at)
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        reading, inventory_error = self._read_inventory()
        if trigger == INVENTORY and inventory_unchanged(self.state, reading, inventory_error):
            return self.state  # a notification without a change (a touch, the same data)

        self._compile_seconds = 0.0
        obs = self._observe(trigger, now, reading, inventory_error, timings, at)
        decision = decide(self.state, obs, self.cfg, self._compile, self._run_tests)
        self._write_logs(decision.logs)

        done: ConvergeResult | Problem | None = None
        if decision.converge is not None:
            compile_seconds = self._compile_seconds
            done = self._enforce(decision.converge)
            if not isinstance(done, Problem):
                fam_t = [f.timings for f in done.families]
                timings["render"] = (
                    self._settings_seconds
                    + compile_seconds
                    + sum(x.get("render", 0.0) for x in fam_t)
                )
                timings["enforce"] = sum(
                    x.get(k, 0.0) for x in fam_t for k in ("read", "delta", "apply", "verify")
                )
        outcome = settle(
            decision,
            done,
            self.cfg,
            applied_at=iso(self.clock()),
            elapsed=time.perf_counter() - t_start,
        )
        if done is not None and not isinstance(done, Problem) and done.ok:
            a = outcome.state.applied
            assert a is not None and a.policy is not None and a.plan is not None
            self._compiled = (a.policy, a.inventory, a.plan)  # seed: the applied plan
        return self._report(outcome, timings, t_start)

    # -- report --------------------------------------------------------------------------------

    def _report(self, outcome: Outcome, timings: dict[str, float], t_start: float) -> AgentState:
        """Logs, then housekeeping (persist; now and then let git pack the cache), metrics and
        the status document for the pusher."""
        self._write_logs(outcome.logs)
        t = time.perf_counter()
        self._cycles += 1
        try:
            save_state(self.state_file, outcome.state)
            self._drop_applied_cache(outcome.state)
        except OSError as exc:
            self._log(self.err, {"event": "state-not-saved", "error": str(exc)})
        if self._cycles % MAINTAIN_EVERY == 0:
            self.source.maintain()
        timings["cleanup"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        st = replace(outcome.state, timings=dict(timings))
        self.state = st
        self._crashes = 0
        self._follow_names(st)
        self._update_metrics(st)
        if self.flows is not None:
            a = st.applied
            self.flows.set_context(
                a.plan if a else None, a.policy.directory if a and a.policy else None
            )
        doc = self.status_document(st)
        self.last_doc = doc
        if self.pusher is not None:
            self.pusher.offer(doc)
        return st

    def _follow_names(self, st: AgentState) -> None:
        """Keep the applied plan's names resolved (never fatal: a failure is logged, and
        their sets stay as the kernel keeps them, expiring at their TTL).  A shadow agent
        writes nothing to the kernel, name sets included."""
        if self.cfg.mode == "shadow":
            return
        try:
            self.names.variant = str(getattr(self._backend, "variant", self.cfg.variant))
            self.names.follow(st.applied.plan if st.applied is not None else None)
        except Exception as exc:
            self._log(self.err, {"event": "fqdn-failed", "error": str(exc)})

    def status_document(self, st: AgentState) -> dict[str, Any]:
        doc = self._status_document(st)
        names = self.names.status()
        if names is not None:
            doc["names"] = names
        hold = self.names.hold_condition()
        if hold is not None:
            doc["conditions"] = [*(doc.get("conditions") or []), hold]
        return doc

    def _status_document(self, st: AgentState) -> dict[str, Any]:
        cfg = self.cfg
        doc = build_status(
            st,
            cell=cfg.cell,
            settings=cfg.public(),
            agent={
                "version": _version(),
                "backend": st.backend or cfg.backend,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "inventoryWatch": self.watcher.mechanism if self.watcher else "per-cycle",
            },
            revision=cfg.revision,
            containers_path=cfg.containers,
            now=iso(self.clock()),
        )
        if cfg.mode == "shadow" and self.parity is not None:
            from reconciler.agent.shadow import parity_status

            doc["parity"] = parity_status(self.parity)
        if self.flows is not None:
            doc["flows"] = self.flows.status()
        return doc

    def _update_metrics(self, st: AgentState) -> None:
        m = self.metrics
        self.names.update_metrics(m)
        m.observe_timings(st.timings)
        ready = condition(st.conditions, READY)
        ok = ready is not None and ready.status == TRUE
        m.inc("asgctl_agent_syncs_total", result="success" if ok else "failure")
        if not ok and ready is not None:
            m.inc("asgctl_agent_sync_failures_total", reason=ready.reason)
        m.set("asgctl_agent_ready", 1 if ok else 0)
        if ok:
            m.set("asgctl_agent_last_success_timestamp_seconds", round(self.clock(), 3))
        m.set("asgctl_agent_drift_corrections_total", st.drift_corrections)
        for kind in ("skipped", "held", "shared"):
            count = sum(1 for r in st.inventory_rejected if r.kind == kind)
            m.set("asgctl_agent_inventory_rejected_entries", count, kind=kind)
        a = st.applied
        if a is not None and a.plan is not None:
            if self._backend is not None:  # counted as the running backend installs them
                from reconciler.backends import installed_rules

                m.set("asgctl_agent_rules_installed", installed_rules(self._backend, a.plan))
            m.set("asgctl_agent_chains", a.plan.chains)
            m.set("asgctl_agent_cf_equivalent_rules", a.plan.cf_equivalent_rules)
            m.set("asgctl_agent_containers", len(a.plan.containers))
            m.replace_info(
                "asgctl_agent_applied_revision_info",
                revision=self.cfg.revision(a.sha),
                digest=a.digest,
            )
        if self.flows is not None:
            m.set("asgctl_agent_flow_unused_rules", len(self.flows.unused()))
        if self.cfg.mode == "shadow" and self.parity is not None:
            from reconciler.agent.shadow import parity_metrics

            parity_metrics(m, self.parity)
        if self.cfg.metrics_textfile:
            try:
                write_textfile(self.cfg.metrics_textfile, m.render())
            except OSError as exc:
                self._log(self.err, {"event": "metrics-textfile-failed", "error": str(exc)})

    # -- the process ---------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.events.put(SYNC)
        else:
            self._stopping.set()
            self.events.put(STOP)

    def _install_signals(self) -> dict[int, Any]:
        """Ours for the run; the previous handlers, to put back when it ends (an agent run
        in-process must not leave a host process, or its forked children, deaf to SIGTERM)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }

    def start_sidecars(self) -> None:
        cfg = self.cfg
        if cfg.metrics_listen:
            host, port = parse_listen(cfg.metrics_listen)
            self.metrics_server = MetricsServer(self.metrics, host, port)
            self.metrics_server.start()
            host, port = self.metrics_server.address
            self._log(self.err, {"event": "metrics-listening", "address": f"{host}:{port}"})
        if not cfg.once:
            self.names.start()
            self.watcher = InventoryWatcher(
                cfg.containers,
                lambda: self.events.put(INVENTORY),
                mode=cfg.watch,
                poll=cfg.watch_poll,
            )
            self.watcher.start()
            self._start_flows()
            if self.pusher is not None:
                self.pusher.start()
            if cfg.listen_webhook:
                self.webhook = serve(
                    cfg.listen_webhook,
                    cfg.webhook_secret_file,
                    branch=cfg.branch,
                    min_interval=cfg.webhook_min_interval,
                    fire=lambda: self.events.put(SYNC),
                    log=lambda record: self._log(self.err, record),
                )
                host, port = self.webhook.address
                self._log(self.err, {"event": "webhook-listening", "address": f"{host}:{port}"})

    def _start_flows(self) -> None:
        """The NFLOG reader (`reconciler.flows.collect`), on threads of its own."""
        cfg = self.cfg
        if cfg.flow_log != "nflog" or not self._backend_owned:
            return
        from reconciler.flows.collect import Collector, CollectorSettings

        settings = CollectorSettings(
            cell=cfg.cell,
            state_dir=self.state_dir,
            group=cfg.flow_log_group,
            netns=cfg.netns,
            window=cfg.flow_log_window,
            max_aggregates=cfg.flow_log_max_aggregates,
            max_bytes=cfg.flow_log_max_bytes,
            stdout=cfg.flow_log_stdout,
            unused_after=cfg.flow_unused_after,
        )
        self.flows = Collector(
            settings,
            inc=self.metrics.inc,
            out=self.out,
            log=lambda record: self._log(self.err, record),
            clock=self.clock,
        )
        self.flows.start()

    def stop_sidecars(self) -> None:
        self.names.stop()
        if self.flows is not None:
            self.flows.stop()
        if self.webhook is not None:
            self.webhook.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.pusher is not None:
            self.pusher.flush(timeout=min(5.0, self.cfg.git_timeout))
            self.pusher.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.source.close()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or one cycle with `once`); the exit code for the CLI."""
        previous = self._install_signals()
        self.start_sidecars()
        try:
            if self.cfg.once:
                st = self.cycle(SYNC)
                if self.pusher is not None:
                    result = self.pusher.push_now()
                    if not result.ok:
                        self._log(self.err, {"event": "status-push-failed", "error": result.error})
                ready = condition(st.conditions, READY)
                return 0 if ready is not None and ready.status == TRUE else 1
            self._loop()
            return 0
        finally:
            self.stop_sidecars()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> None:
        rng = random.Random()
        due = time.monotonic()  # the first sync runs at once
        while not self._stopping.is_set():
            wait = max(0.0, due - time.monotonic())
            events: set[str] = set()
            try:
                events.add(self.events.get(timeout=wait) if wait > 0 else SYNC)
            except queue.Empty:
                events.add(SYNC)
            while True:  # merge everything already queued into this one cycle
                try:
                    events.add(self.events.get_nowait())
                except queue.Empty:
                    break
            if STOP in events or self._stopping.is_set():
                return
            if SYNC in events or time.monotonic() >= due:
                failures = self._guarded(SYNC)
                due = time.monotonic() + next_delay(self.cfg, failures, rng.random())
            elif INVENTORY in events:
                self._guarded(INVENTORY)

    def _guarded(self, trigger: Trigger) -> int:
        """Run a cycle; a bug in one cycle is logged and retried, never the end of enforcement.

        Returns the consecutive transient failures, which set the back-off.
        """
        try:
            return self.cycle(trigger).failures
        except Exception as exc:  # the last line of defence: the rules stay as they are
            self._crashes += 1
            self.metrics.inc("asgctl_agent_sync_failures_total", reason=INTERNAL_ERROR)
            self._log(
                self.err,
                {
                    "event": "cycle-failed",
                    "trigger": trigger,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            return self.state.failures + self._crashes
