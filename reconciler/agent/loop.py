"""The agent process: one cycle, the timer around it, signals, and the threads at its side.

A *sync* cycle (on the jittered interval, at start, on SIGHUP) fetches the branch and, when
the head is new, puts it through the gates in `core` (signature, ancestry, validation, mass
revoke) before it can become the revision enforced.  An *inventory* cycle (the metadata file
changed) skips git and converges the revision already applied for the new containers.  Both
end the same way: converge the dataplane, log the containers whose rules really changed,
save the state, hand the status document to the pusher, update the metrics.

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
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from reconciler.agent.config import AgentConfig, parse_listen
from reconciler.agent.core import (
    CycleView,
    Problem,
    Verdict,
    add_history,
    ancestry_verdict,
    backoff,
    condition,
    container_changes,
    cycle_conditions,
    merge_conditions,
    revoke_share,
    revoke_verdict,
    signature_verdict,
    validation_verdict,
)
from reconciler.agent.metrics import Metrics, MetricsServer, write_textfile
from reconciler.agent.source import GitSource, MalformedCommit, SourceError, clip
from reconciler.agent.state import AgentState, Applied, Head, load_state, save_state
from reconciler.agent.status import PushResult, StatusPusher, build_status, iso
from reconciler.agent.verify import SignatureCheck, SignatureVerifier, trailer_true
from reconciler.agent.watch import InventoryWatcher
from reconciler.compile import compile_cell
from reconciler.inventory import InventoryError, Rejection, StoreReading, load_store
from reconciler.model import Container, PolicySet
from reconciler.plan import CellPlan, CellSettings, PlanError
from reconciler.policy.findings import Finding
from reconciler.policy.load import load_revision
from reconciler.status.write import StatusWriter

SYNC = "sync"
INVENTORY = "inventory"
STOP = "stop"
MAINTAIN_EVERY = 100  # cycles between `git gc --auto` of the cache


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
        self.source = GitSource(
            cfg.source,
            cfg.branch,
            self.state_dir / "cache.git",
            depth=cfg.fetch_depth,
            timeout=cfg.git_timeout,
        )
        self.verifier = (
            SignatureVerifier(
                cfg.allowed_signers, cfg.gpg_keyring, self.state_dir, cfg.git_timeout, clock
            )
            if cfg.verify == "signed"
            else None
        )
        self.metrics = Metrics(cfg.cell)
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.state = load_state(self.state_file)
        self._backend = backend
        self._backend_owned = backend is None
        self._settings: CellSettings | None = None
        self._cycles = 0
        self._crashes = 0
        self._inventory_seen: tuple[Container, ...] | None = None
        self._compiled: tuple[PolicySet, tuple[Container, ...], CellPlan] | None = None
        self._foreign: tuple[tuple[int, str], ...] = ()
        """Chains with our name prefix that are not ours, as last logged."""
        self.pusher: StatusPusher | None = None
        if cfg.status_push:
            writer = StatusWriter(
                cfg.source, cfg.status_branch, self.state_dir / "status.git", cfg.git_timeout
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
        self.last_doc: dict[str, Any] | None = None
        self._stopping = threading.Event()

    # -- edges: inventory, backend, logs --------------------------------------------------------

    def _read_inventory(self) -> tuple[StoreReading | None, str | None]:
        """The store judged entry by entry, or why it cannot be read at all."""
        try:
            return load_store(self.cfg.containers), None
        except InventoryError as exc:
            return None, str(exc)

    def _log_rejections(self, before: tuple[Rejection, ...], after: tuple[Rejection, ...]) -> None:
        """One stderr line per store entry newly not used as written (not again every cycle)."""
        seen = set(before)
        for r in after:
            if r not in seen:
                self._log(
                    self.err,
                    {"event": "inventory-entry-rejected", "cell": self.cfg.cell, **r.to_dict()},
                )

    def _dataplane(self) -> Any:
        if self._backend is None:
            from reconciler.backends import Runner, open_backend

            runner = Runner.in_netns(self.cfg.netns) if self.cfg.netns else Runner()
            self._backend = open_backend(self.cfg.backend, self.cfg.variant, runner)
        return self._backend

    def _cell_settings(self) -> CellSettings:
        """The cell's settings for the plan, the underlay found once (raises UnderlayError).

        The underlay is configured, or read off the default routes of the namespace this agent
        enforces in; an agent handed its backend (tests) detects nothing and uses what is
        configured (none: every packet a container sends is judged)."""
        if self._settings is None:
            detected = None
            if not self.cfg.underlay_interface and self._backend_owned:
                from reconciler.backends import Runner
                from reconciler.backends.kernel.underlay import detect_underlay

                runner = Runner.in_netns(self.cfg.netns) if self.cfg.netns else Runner()
                detected = detect_underlay(runner)
            self._settings = self.cfg.cell_settings(detected)
        return self._settings

    def _report_foreign(self, result: Any) -> None:
        """Log the chains with our name prefix that we did not create (the host's own
        `ASG-...` chains), which the dataplane leaves alone: once when they appear or change,
        not every cycle.  A plan that needs one of their names fails the cycle instead
        (OwnershipError, reported as EnforcementFailed)."""
        foreign = tuple((f.family, n) for f in result.families for n in f.delta.foreign)
        if foreign == self._foreign:
            return
        self._foreign = foreign
        if foreign:
            self._log(
                self.err,
                {
                    "event": "foreign-chains",
                    "cell": self.cfg.cell,
                    "chains": [f"ipv{family} {name}" for family, name in foreign],
                    "message": "chains with asgctl's name prefix but not its ownership marker, "
                    "not created by the last plan applied: someone else's, left alone",
                },
            )

    def _log(self, stream: TextIO, record: dict[str, Any]) -> None:
        line = json.dumps({"time": iso(self.clock()), **record}, separators=(",", ":"))
        with contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop enforcement
            stream.write(line + "\n")
            stream.flush()

    def _pushed(self, result: PushResult) -> None:
        self.metrics.inc("asgctl_agent_status_pushes_total", result="ok" if result.ok else "error")

    # -- compiling -----------------------------------------------------------------------------

    def _compile(self, policy: PolicySet, inventory: tuple[Container, ...]) -> CellPlan:
        """This cell's plan for `policy` over `inventory`, remembering the last one (one slot).

        A sync compiles a new head for the mass-revoke gate, the applied revision beside it,
        and the head again to enforce it; compile_cell is pure and deterministic, so the same
        policy object over an equal inventory gets the remembered plan back.  The slot is
        seeded with the applied plan, so the gate's "before" side is usually free.
        """
        settings = self._settings or self.cfg.cell_settings()  # gates: settings move no rule
        memo = self._compiled
        if (
            memo is not None
            and memo[0] is policy
            and memo[1] == inventory
            and memo[2].settings == settings
        ):
            return memo[2]
        plan = compile_cell(policy, inventory, self.cfg.cell, settings)
        self._compiled = (policy, inventory, plan)
        return plan

    # -- the gates -----------------------------------------------------------------------------

    def _restore_applied(self, st: AgentState) -> AgentState:
        """After a restart, load the applied revision's policy again (from the cache only)."""
        a = st.applied
        if a is None or a.policy is not None:
            return st
        if not self.source.has_commit(a.sha):
            return st
        result = load_revision(self.source.path, a.sha, self.cfg.policies_path)
        if not result.ok:
            return st
        plan = self._compile(result.policy, a.inventory)
        if a.digest and plan.digest() != a.digest:
            # Compiled otherwise than what was applied (an upgrade that renamed chains, such
            # as the move to 128-bit ids): the kernel holds the old version's chains, so there
            # is no last plan to tell drift from change, and every difference is a change.
            return replace(st, applied=replace(a, policy=result.policy, plan=None))
        return replace(st, applied=replace(a, policy=result.policy, plan=plan))

    def _evaluate(self, st: AgentState, sha: str, timings: dict[str, float]) -> Head:
        """Put a new head through every gate, in order; the first that fails decides."""
        cfg = self.cfg
        t = time.perf_counter()
        try:
            info = self.source.commit_info(sha)
        except MalformedCommit as exc:
            # Refused like a bad signature (it is looked at before one): Stalled, the
            # applied revision stays enforced, and the next push to the branch is judged.
            timings["verify"] = time.perf_counter() - t
            problem = SignatureCheck(False, "MalformedCommit", clip(str(exc), 500))
            return Head(
                sha,
                "",
                problem if self.verifier is not None else None,
                Verdict(problem.reason, problem.message),
            )
        subject = info.subject
        check = None
        if self.verifier is not None:
            check = self.verifier.verify(self.source.path, sha, info.signed)
        applied = st.applied.sha if st.applied else None
        descends = None
        if applied is not None and applied != sha:
            descends = self.source.is_ancestor(applied, sha)
        timings["verify"] = time.perf_counter() - t
        verdict = signature_verdict(check) or ancestry_verdict(
            applied, sha, descends, cfg.allow_rewind
        )
        if verdict is not None:
            return Head(sha, subject, check, verdict)
        t = time.perf_counter()
        result = load_revision(self.source.path, sha, cfg.policies_path)
        timings["load"] = time.perf_counter() - t
        verdict = validation_verdict(tuple(self._repo_path(f) for f in result.findings))
        if verdict is not None:
            if not self.source.intact():
                self.source.reset()
                raise SourceError("CacheCorrupt", "the cache failed `git fsck`; fetching anew")
            return Head(sha, subject, check, verdict)
        a = st.applied
        if a is not None and a.policy is not None and st.inventory is not None:
            old = self._compile(a.policy, st.inventory)
            try:
                new = self._compile(result.policy, st.inventory)
            except PlanError as exc:  # two contents under one name: apply neither
                return Head(sha, subject, check, Verdict("PlanRefused", str(exc)))
            override = trailer_true(info.message, cfg.mass_revoke_trailer)
            verdict = revoke_verdict(
                revoke_share(old, new), cfg.mass_revoke_threshold, override, cfg.mass_revoke_trailer
            )
            if verdict is not None:
                return Head(sha, subject, check, verdict)
        return Head(sha, subject, check, None, result.policy)

    def _repo_path(self, finding: Finding) -> Finding:
        """Findings name files relative to the policy folder; status shows repository paths."""
        prefix = self.cfg.policies_path.strip("/")
        if prefix in ("", "."):
            return finding
        return replace(finding, file=f"{prefix}/{finding.file}")

    # -- one cycle -----------------------------------------------------------------------------

    def cycle(self, trigger: str = SYNC) -> AgentState:
        """Run one cycle (fetching only for `sync`) and return the new state."""
        cfg = self.cfg
        started = self.clock()
        t_start = time.perf_counter()
        now = iso(started)
        timings: dict[str, float] = {}
        st = self.state

        reading, inv_error = self._read_inventory()
        inventory = reading.containers if reading is not None else None
        rejected = reading.rejected if reading is not None else st.inventory_rejected
        unchanged = (
            inventory == st.inventory
            and st.inventory_error is None
            and rejected == st.inventory_rejected
            if inventory is not None
            else inv_error == st.inventory_error
        )
        if trigger == INVENTORY and unchanged:
            return st  # a notification without a change (a touch, a rewrite of the same data)
        if inventory is not None:
            if inventory != st.inventory:
                st = replace(st, inventory=inventory, inventory_at=now)
            self._log_rejections(st.inventory_rejected, rejected)
            st = replace(st, inventory_error=None, inventory_rejected=rejected)
        else:  # unusable as a whole: the last good inventory (and its rejections) stands
            st = replace(st, inventory_error=inv_error)

        # An inventory cycle does not fetch: the last sync's verdict on the source stands.
        source_error: Problem | None = st.source_error if trigger != SYNC else None
        head = st.head
        attempted = st.attempted
        if trigger == SYNC:
            t = time.perf_counter()
            try:
                fetched = self.source.fetch()
                timings["fetch"] = time.perf_counter() - t
                st = self._restore_applied(st)
                if head is None or head.sha != fetched.sha:
                    head = self._evaluate(st, fetched.sha, timings)
                    attempted = fetched.sha
            except SourceError as exc:
                timings.setdefault("fetch", time.perf_counter() - t)
                source_error = Problem(exc.reason, exc.message)
        st = self._restore_applied(st)

        # What to enforce: an accepted head, else what was applied before.
        target_sha, policy = None, None
        if head is not None and head.verdict is None and head.policy is not None:
            target_sha, policy = head.sha, head.policy
        elif st.applied is not None and st.applied.policy is not None:
            target_sha, policy = st.applied.sha, st.applied.policy

        enforce_error: Problem | None = None
        waiting: str | None = None
        drift_notes: tuple[str, ...] = ()
        drift_repaired = True
        applied = st.applied
        drift_log = list(st.drift_log)
        corrections = st.drift_corrections
        if policy is None or target_sha is None:
            waiting = (
                "no revision applied yet"
                if source_error is None
                else f"no revision applied yet ({source_error.reason})"
            )
        elif st.inventory is None:
            waiting = f"no valid container metadata yet ({st.inventory_error})"
        else:
            from reconciler.backends.kernel.underlay import UnderlayError

            t = time.perf_counter()
            try:
                settings: CellSettings | None = self._cell_settings()
            except UnderlayError as exc:  # nothing is judged rather than the wrong traffic
                enforce_error = Problem("UnderlayUnknown", str(exc))
                settings = None
            if (
                applied is not None
                and applied.plan is not None
                and applied.sha == target_sha
                and applied.inventory == st.inventory
                and applied.plan.settings == settings
            ):
                plan = applied.plan  # nothing moved: the idle cycle only checks the kernel
            else:
                try:
                    plan = self._compile(policy, st.inventory)
                except PlanError as exc:  # two contents under one name: keep what is installed
                    enforce_error = Problem("PlanRefused", str(exc))
            compile_seconds = time.perf_counter() - t
            backend = None
            if enforce_error is None:
                try:
                    backend = self._dataplane()
                except Exception as exc:  # any backend failure is reported, never fatal
                    enforce_error = Problem("DataplaneUnavailable", str(exc))
            if backend is not None:
                from reconciler.backends import converge

                last = applied.plan if applied is not None else None
                # An install is read back by the next cycle's read (see converge); a --once
                # run has no next cycle of its own, so it reads back at once.
                result = converge(
                    backend,
                    plan,
                    last,
                    heal_drift=cfg.heal_drift,
                    defer_install_verify=not cfg.once,
                )
                fam_t = [f.timings for f in result.families]
                timings["render"] = compile_seconds + sum(x.get("render", 0.0) for x in fam_t)
                timings["enforce"] = sum(
                    x.get(k, 0.0) for x in fam_t for k in ("read", "delta", "apply", "verify")
                )
                st = replace(st, backend=result.backend)
                self._report_foreign(result)
                for fam in result.families:
                    for d in fam.delta.drift:
                        repaired = fam.sent and d.repair and fam.error is None
                        drift_repaired = drift_repaired and repaired
                        corrections += 1 if repaired else 0
                        drift_log.insert(
                            0,
                            {
                                "time": now,
                                "family": d.family,
                                "chain": d.chain,
                                "what": d.what,
                                "repaired": repaired,
                            },
                        )
                drift_notes = tuple(str(d) for d in result.drift)
                if result.ok:
                    changed = (
                        applied is None
                        or applied.sha != target_sha
                        or applied.digest != plan.digest()
                    )
                    if changed or applied is None or applied.plan is None:
                        for record in container_changes(
                            applied.plan if applied is not None else None,
                            plan,
                            cell=cfg.cell,
                            revision=cfg.revision(target_sha),
                            directory=policy.directory,
                        ):
                            self._log(self.out, record)
                    applied = Applied(
                        target_sha,
                        plan.digest(),
                        iso(self.clock()) if changed or applied is None else applied.at,
                        st.inventory,
                        policy,
                        plan,
                    )
                    self._compiled = (policy, st.inventory, plan)  # seed: the applied plan
                else:
                    errors = [f"ipv{f.family}: {f.error}" for f in result.families if f.error]
                    enforce_error = Problem("EnforcementFailed", "; ".join(errors))

        view = CycleView(
            verify_enabled=self.verifier is not None,
            applied_revision=cfg.revision(applied.sha) if applied else None,
            head_revision=cfg.revision(head.sha) if head else None,
            source_error=source_error,
            refusal=head.verdict if head is not None else None,
            signature=head.signature if head is not None else None,
            enforce_error=enforce_error,
            inventory_error=st.inventory_error,
            inventory_rejected=len(st.inventory_rejected),
            waiting_for=waiting,
            drift=drift_notes,
            drift_repaired=drift_repaired,
            heal_drift=cfg.heal_drift,
        )
        conditions = merge_conditions(st.conditions, cycle_conditions(view), now)
        ready = condition(conditions, "Ready")
        transient = source_error is not None or enforce_error is not None
        if trigger == SYNC:
            failures = st.failures + 1 if transient else 0
        else:  # only a sync can show the source has recovered
            failures = st.failures + 1 if enforce_error else st.failures if source_error else 0
        timings["total"] = time.perf_counter() - t_start
        st = replace(
            st,
            applied=applied,
            head=head,
            attempted=attempted,
            conditions=conditions,
            drift_corrections=corrections,
            drift_log=tuple(drift_log[:10]),
            failures=failures,
            last_sync=now,
            last_success=now if ready and ready.status == "True" else st.last_success,
            source_error=source_error,
            enforce_error=enforce_error,
        )
        if applied is not None and ready is not None:
            st = replace(
                st,
                history=add_history(
                    st.history,
                    cfg.revision(applied.sha),
                    applied.digest,
                    ready.reason,
                    now,
                    timings["total"],
                ),
            )

        # Housekeeping ("cleanup"): persist, and now and then let git pack the cache.
        t = time.perf_counter()
        self._cycles += 1
        try:
            save_state(self.state_file, st)
        except OSError as exc:
            self._log(self.err, {"event": "state-not-saved", "error": str(exc)})
        if self._cycles % MAINTAIN_EVERY == 0:
            self.source.maintain()
        timings["cleanup"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        st = replace(st, timings=dict(timings))

        self._report_transition(self.state, st)
        self.state = st
        self._crashes = 0
        self._update_metrics(st, transient, source_error or enforce_error)
        doc = self.status_document(st)
        self.last_doc = doc
        if self.pusher is not None:
            self.pusher.offer(doc)
        return st

    def status_document(self, st: AgentState) -> dict[str, Any]:
        cfg = self.cfg
        return build_status(
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

    def _report_transition(self, before: AgentState, after: AgentState) -> None:
        """One stderr line when Ready changes status or reason; silence otherwise."""
        old = condition(before.conditions, "Ready")
        new = condition(after.conditions, "Ready")
        if new is None or (
            old is not None and (old.status, old.reason) == (new.status, new.reason)
        ):
            return
        record: dict[str, Any] = {
            "event": "ready-changed",
            "cell": self.cfg.cell,
            "status": new.status,
            "reason": new.reason,
            "message": new.message,
        }
        if after.head is not None and after.head.verdict is not None:
            record["findings"] = [str(f) for f in after.head.verdict.findings[:20]]
        self._log(self.err, record)

    def _update_metrics(self, st: AgentState, transient: bool, problem: Problem | None) -> None:
        m = self.metrics
        m.observe_timings(st.timings)
        ready = condition(st.conditions, "Ready")
        ok = ready is not None and ready.status == "True"
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
            self.watcher = InventoryWatcher(
                cfg.containers,
                lambda: self.events.put(INVENTORY),
                mode=cfg.watch,
                poll=cfg.watch_poll,
            )
            self.watcher.start()
            if self.pusher is not None:
                self.pusher.start()

    def stop_sidecars(self) -> None:
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
                ready = condition(st.conditions, "Ready")
                return 0 if ready is not None and ready.status == "True" else 1
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

    def _guarded(self, trigger: str) -> int:
        """Run a cycle; a bug in one cycle is logged and retried, never the end of enforcement.

        Returns the consecutive transient failures, which set the back-off.
        """
        try:
            return self.cycle(trigger).failures
        except Exception as exc:  # the last line of defence: the rules stay as they are
            self._crashes += 1
            self.metrics.inc("asgctl_agent_sync_failures_total", reason="InternalError")
            self._log(
                self.err,
                {
                    "event": "cycle-failed",
                    "trigger": trigger,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            return self.state.failures + self._crashes
