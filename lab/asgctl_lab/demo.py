"""The demo: the seeds' three stories, told on a live lab, with packets as the evidence.

    python -m asgctl_lab.demo          (or `asgctl lab demo`, or `make demo`; root)

1. *Scenario 1 of the dynamic egress article*: payments/prod's backend needs MySQL.  The
   operator adds a Destination and an app-level EgressPolicy; the backend reaches MySQL
   while the frontend in the same space still cannot.  Nothing restarts.
2. *Scenario 2*: MySQL moves to another data center.  One edit of the Destination moves the
   access; the old address is then switched off.
3. *The dynamic-ASG article*: the security team edits a *global* ASG.  Every running
   container has it within one sync interval, each agent logs which apps changed, and each
   cell's `status/<cell>` branch names the revision it applied.
4. *On a Diego cell*: the frontend talks to the backends over the overlay (`silk-vtep`, on
   its own cell and across cells), allowed by a CF network policy, while the ASGs change
   under it: the backend's MySQL access is revoked, and the overlay neither notices nor
   cares.  With CF's own chains in the cells (`--cf-layout`, the default with an iptables
   backend), the blog, which has no network policy, is rejected by the destination's cell
   at every step: container-to-container traffic is the overlay policy's, underlay egress
   the ASGs'.
5. *Issue 15*: payments reaches the card API by name (a Destination by `fqdns`, resolved
   through the lab's DNS server); the provider moves the name to a new address; nothing is
   edited in git and nothing restarts: the backend reaches the new address within the
   name's TTL, the old one is rejected after it, and the agents' PIDs and the policy
   repo's head are what they were.

Everything goes through git as an operator would do it (clone, edit YAML, run the policy
tests, commit, push), and the demo learns that a change is in force only from the cells'
status branches -- never by peeking into an agent.  After each step it prints the
reachability matrix.  Throughout, one TCP connection from the backend to the card API stays
open and must still echo at the end, and every container keeps its PID: enforcement changes
rules, never workloads.  The lab is always torn down at the end, also on failure or Ctrl-C.

`--report FILE` writes what happened as JSON; the end-to-end test asserts on it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from asgctl_lab import platform
from asgctl_lab.dns import LabDnsError, lookup
from asgctl_lab.matrix import Matrix, Target, Verdict, classify, probe_matrix
from asgctl_lab.policyrepo import CellStatus, GitError, Operator
from asgctl_lab.probe import HeldConnection, probe_tcp

MYSQL_OLD = "198.19.10.10"
MYSQL_NEW = "198.19.110.10"
API = "198.19.20.20"
DNS2 = "198.19.53.54"
CARD_NAME = "card-api.lab.example"
CARD_OLD = platform.CARD_API
CARD_NEW = "198.19.140.40"
TARGETS = (
    Target("mysql", MYSQL_OLD, 3306, "tcp"),
    Target("mysql-dc2", MYSQL_NEW, 3306, "tcp"),
    Target("api", API, 443, "tcp"),
    Target("dns", "198.19.53.53", 53, "udp"),
    Target("dns-2", DNS2, 53, "udp"),
    Target("mirror", "198.19.80.10", 443, "tcp"),
    Target("metrics", "198.19.30.30", 8125, "udp"),
    Target("card-api", CARD_OLD, 443, "tcp"),
    Target("card-new", CARD_NEW, 443, "tcp"),
)
"""The demo's columns, fixed for the whole run so each matrix compares with the last."""
HELD_FROM = "backend-0"
OVERLAY_FROM = "frontend-0"
"""Holds a connection to the last cell's backend over the overlay for the whole demo."""
OPEN, REJ = Verdict.OPEN, Verdict.REJECTED
Expect = tuple[str, str, Verdict]
"""(container, target label, verdict): a claim of the story, checked against packets."""


class DemoError(RuntimeError):
    """A step did not happen as the story says (e.g. a cell never applied a revision)."""


# -- editing the policy repo as text (comments and layout survive) ---------------------------


def split_documents(text: str) -> list[str]:
    """The `---`-separated documents of a YAML file, as text (the first keeps the header)."""
    chunks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---":
            chunks.append([])
        else:
            chunks[-1].append(line)
    return ["".join(c) for c in chunks]


def _is(doc: str, kind: str, name: str) -> bool:
    try:
        data = yaml.safe_load(doc)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and data.get("kind") == kind and data.get("name") == name


def _leading_comments(doc: str) -> tuple[str, str]:
    lines = doc.splitlines(keepends=True)
    n = 0
    while n < len(lines) and (lines[n].startswith("#") or not lines[n].strip()):
        n += 1
    return "".join(lines[:n]), "".join(lines[n:])


def remove_document(text: str, kind: str, name: str) -> tuple[str, str]:
    """Remove the `kind`/`name` document; returns (new text, the document removed).

    A file's header comments stay at the top even when the first document goes.
    """
    docs = split_documents(text)
    for i, doc in enumerate(docs):
        if _is(doc, kind, name):
            header, body = _leading_comments(doc) if i == 0 else ("", doc)
            rest = docs[:i] + docs[i + 1 :]
            if i == 0 and rest:
                rest[0] = header + rest[0]
            return "---\n".join(rest), body
    raise KeyError(f"no {kind} {name!r} in the file")


def append_document(text: str, doc: str) -> str:
    return text.rstrip("\n") + "\n---\n" + doc.strip("\n") + "\n"


def edit_document(text: str, kind: str, name: str, change: Callable[[str], str]) -> str:
    """Apply `change` to the text of one document only."""
    docs = split_documents(text)
    for i, doc in enumerate(docs):
        if _is(doc, kind, name):
            new = change(doc)
            if new == doc:
                raise ValueError(f"the edit did not change {kind} {name!r}")
            docs[i] = new
            return "---\n".join(docs)
    raise KeyError(f"no {kind} {name!r} in the file")


GRANT = (
    ("policies/destinations.yaml", "Destination", "mysql"),
    ("policies/egress-policies.yaml", "EgressPolicy", "backend-to-mysql"),
    ("policies/tests/payments.yaml", "PolicyTest", "payments-mysql"),
)
"""The documents of story 1: absent when the lab starts, added by the operator."""


def seed_before_story(tree: Path) -> None:
    """The policy repo as it was before the backend asked for MySQL (the lab's first commit)."""
    for path, kind, name in GRANT:
        file = tree / path
        file.write_text(remove_document(file.read_text(), kind, name)[0])


def grant_documents(policies: Path) -> dict[str, str]:
    """The story-1 documents, as the example repo has them (what the operator writes)."""
    out = {}
    for path, kind, name in GRANT:
        source = policies / Path(path).relative_to("policies")
        out[path] = remove_document(source.read_text(), kind, name)[1]
    return out


BY_NAME = {
    "policies/destinations.yaml": f"""\
kind: Destination
name: card-network
description: The card network's API, by name; the provider moves it, the grant follows
protocol: tcp
fqdns: [{CARD_NAME}]
ports: 443
""",
    "policies/egress-policies.yaml": """\
kind: EgressPolicy
name: backend-to-card-network
description: The payments backend settles with the card network
source: {type: app, name: payments/prod/backend}
destination: card-network
app_lifecycle: running
""",
    "policies/tests/payments.yaml": f"""\
kind: PolicyTest
name: card-network-by-name
description: Only the payments backend reaches the card API by name, on 443 only
cases:
  - {{app: payments/prod/backend, to: "{CARD_NAME}:443", expect: allow}}
  - {{app: payments/prod/frontend, to: "{CARD_NAME}:443", expect: deny}}
  - {{app: payments/prod/backend, to: "{CARD_NAME}:80", expect: deny}}
""",
}
"""Story 5's documents (the operator writes them): a grant by name, and its tests."""


SECOND_RESOLVER = f"""\
  - protocol: udp
    destination: {DNS2}
    ports: "53"
    description: second resolver, rolled out by the platform team
  - protocol: tcp
    destination: {DNS2}
    ports: "53"
    description: second resolver, DNS over TCP
"""


def add_second_resolver(doc: str) -> str:
    """Story 3's edit of the global platform-dns ASG: append two rules to `rules:`."""
    head, sep, tail = doc.partition("globally_enabled:")
    if not sep:
        raise ValueError("platform-dns has no globally_enabled: block to insert before")
    return head.rstrip("\n") + "\n" + SECOND_RESOLVER + sep + tail


# -- narration ---------------------------------------------------------------------------------


class Narrator:
    """Prints the transcript: sections, what the operator types, what the lab answers."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def section(self, title: str) -> None:
        self.line()
        self.line(f"━━ {title} " + "━" * max(3, 86 - len(title)) + f" t+{self.elapsed():5.1f}s")

    def say(self, text: str) -> None:
        for para in text.strip("\n").splitlines():
            self.line(f"   {para}" if para else "")

    def cmd(self, text: str) -> None:
        self.line(f"   $ {text}")

    def block(self, text: str, indent: str = "     ") -> None:
        for ln in text.rstrip("\n").splitlines():
            self.line(indent + ln)


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One printed matrix and what led to it."""

    key: str
    title: str
    revision: str
    matrix: Matrix
    applied_after: Mapping[str, float] = field(default_factory=dict)
    changes: tuple[Mapping[str, Any], ...] = ()
    overlay: Mapping[str, str] = field(default_factory=dict)
    """`src->dst:port` -> verdict of a container-to-container probe over the overlay."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "revision": self.revision,
            "overlay": dict(self.overlay),
            "applied_after": dict(self.applied_after),
            "changes": list(self.changes),
            "matrix": self.matrix.to_dict(),
        }


@dataclass(frozen=True)
class DemoConfig:
    name: str = "demo"
    interval: str = "2s"
    timeout: float = 60.0
    policies: Path = Path("policies")
    cells: int = 2
    backend: str = "iptables"
    """The agents' dataplane backend (iptables, libiptc, nftables): the stories hold on each."""
    cf_layout: bool | None = None
    """CF's own chains in the cells; None: on unless the backend is nftables (which cannot
    share FORWARD with silk's netout chains, see `platform.cf_layout_variant`)."""

    @property
    def with_cf_layout(self) -> bool:
        return self.backend != "nftables" if self.cf_layout is None else self.cf_layout


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


class Demo:
    """One run of the demo on a lab of its own (see the module docstring)."""

    def __init__(self, cfg: DemoConfig, out: TextIO) -> None:
        self.cfg = cfg
        self.n = Narrator(out)
        self.steps: list[Step] = []
        self.info: platform.LabInfo | None = None
        self.operator: Operator | None = None
        self.held: HeldConnection | None = None
        self.held_checks: list[bool] = []
        self.overlay_held: HeldConnection | None = None
        self.overlay_checks: list[bool] = []
        self.pids_before: dict[str, tuple[int, int | None]] = {}
        self.log_offsets: dict[str, int] = {}
        self.report: dict[str, Any] = {}
        self.owns_lab = False

    # -- helpers ----------------------------------------------------------------------------

    @property
    def lab(self) -> platform.LabInfo:
        assert self.info is not None
        return self.info

    @property
    def backends(self) -> list[str]:
        """Every payments/prod/backend container, whatever cell it runs on."""
        return [c.name for c in self.lab.spec.containers if c.app == "payments/prod/backend"]

    @property
    def everyone(self) -> list[str]:
        return [c.name for c in self.lab.spec.containers]

    @property
    def op(self) -> Operator:
        assert self.operator is not None
        return self.operator

    def _check_held(self) -> bool:
        ok = self.held is not None and self.held.check(timeout=2.0)
        self.held_checks.append(ok)
        return ok

    def _check_overlay_held(self) -> bool:
        ok = self.overlay_held is not None and self.overlay_held.check(timeout=2.0)
        self.overlay_checks.append(ok)
        return ok

    def _same_pids(self) -> list[str]:
        """Containers whose process is no longer the one that started with the lab."""
        return [
            name
            for name, (pid, start) in sorted(self.pids_before.items())
            if platform.process_start_time(pid) != start
        ]

    def overlay_pairs(self) -> list[tuple[str, str, int, Verdict]]:
        """(source, destination, port, expected): the frontend to every backend (policy),
        the blog to the last backend (no policy: rejected only where CF's chains are)."""
        port = platform.BACKEND_PORT
        denied = REJ if self.cfg.with_cf_layout else OPEN
        pairs = [(OVERLAY_FROM, b, port, OPEN) for b in self.backends]
        return [*pairs, ("blog-0", self.backends[-1], port, denied)]

    def _probe_overlay(self) -> tuple[dict[str, str], list[str]]:
        """Probe every overlay pair; (verdicts by `src->dst:port`, claims that were false).

        A cell's REJECT comes from the source's gateway (same cell) or from the destination
        cell's vtep address (across the overlay): both are the firewall saying no.
        """
        verdicts: dict[str, str] = {}
        wrong = []
        cells = {c.vtep_ip for c in self.lab.net.cells.values()}
        for src, dst, port, want in self.overlay_pairs():
            net = self.lab.net.containers
            result = probe_tcp(net[src].netns, net[dst].ip, port, timeout=1.0)
            got = classify(result, net[src].gateway, net[dst].ip, cells)
            key = f"{src}->{dst}:{port}"
            verdicts[key] = got.value
            if got is not want:
                wrong.append(f"{key} over the overlay: {got.value}, expected {want.value}")
        return verdicts, wrong

    def _matrix(
        self,
        key: str,
        title: str,
        revision: str,
        expect: Sequence[Expect] = (),
        **extra: Any,
    ) -> Step:
        """Probe, print, and hold the story to its claims: DemoError when one is false."""
        matrix = probe_matrix(self.lab, TARGETS)
        overlay, overlay_wrong = self._probe_overlay()
        step = Step(key, title, revision, matrix, overlay=overlay, **extra)
        self.steps.append(step)
        self.n.line()
        first = len(self.steps) == 1  # the legend once; later matrices compare with it
        self.n.block(matrix.render(title=f"Reachability: {title}", legend=first), indent="   ")
        wrong = []
        for container, label, verdict in expect:
            got = matrix.verdict(container, label)
            if got is not verdict:
                wrong.append(f"{container} → {label}: {got.value}, expected {verdict.value}")
        held = self._check_held()
        restarted = self._same_pids()
        same = len(self.pids_before) - len(restarted)
        self.n.say(
            f"held connection {HELD_FROM} → api: "
            + ("open, echoes" if held else "BROKEN")
            + f"  ·  containers: {same} of {len(self.pids_before)} still the same process"
        )
        overlay_held = self._check_overlay_held()
        self.n.say(
            "over the overlay: "
            + "  ".join(f"{k} {Verdict(v).symbol}" for k, v in overlay.items())
            + f"  ·  held {OVERLAY_FROM} → {self.backends[-1]}: "
            + ("echoes" if overlay_held else "BROKEN")
        )
        wrong += overlay_wrong
        if not overlay_held:
            wrong.append("the held overlay connection broke")
        if expect and not wrong:
            claims = ", ".join(f"{c}→{lbl} {v.symbol}" for c, lbl, v in expect[:4])
            more = f" (+{len(expect) - 4} more)" if len(expect) > 4 else ""
            for ln in textwrap.wrap(f"as the story says: {claims}{more}", 94):
                self.n.say(ln)
        if wrong or not held or restarted:
            problems = [*wrong]
            problems += [] if held else ["the held connection broke"]
            problems += [f"{c} restarted" for c in restarted]
            raise DemoError(f"{title}: " + "; ".join(problems))
        return step

    def _agent_records(self, cell: str) -> list[dict[str, Any]]:
        """New JSON records on an agent's stdout since we last looked."""
        path = platform.agent_log(self.lab, cell)
        try:
            with open(path, "rb") as fh:
                fh.seek(self.log_offsets.get(cell, 0))
                data = fh.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.log_offsets[cell] = self.log_offsets.get(cell, 0) + end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def wait_applied(self, sha: str, pushed_at: float) -> tuple[dict[str, float], list[dict]]:
        """Poll the status branches until every cell applied `sha`; seconds after the push.

        Prefers the agent's own `lastAppliedTime`; the moment we saw the branch is the
        fallback.  DemoError on timeout, naming the cells that never got there and why.
        """
        deadline = time.monotonic() + self.cfg.timeout
        seen: dict[str, float] = {}
        statuses: dict[str, CellStatus] = {}
        while True:
            with contextlib.suppress(GitError):
                statuses = self.op.status_branches()
            for cell in self.lab.cells:
                st = statuses.get(cell)
                if cell not in seen and st and st.applied_sha == sha and st.ready == "True":
                    at = _parse_iso(str(st.document.get("lastAppliedTime", "")))
                    seen[cell] = (at if at is not None else time.time()) - pushed_at
            if len(seen) == len(self.lab.cells):
                break
            if time.monotonic() > deadline:
                missing = {
                    c: (f"{statuses[c].applied_revision} {statuses[c].reason}")
                    if c in statuses
                    else "no status branch"
                    for c in self.lab.cells
                    if c not in seen
                }
                raise DemoError(f"cells did not apply {sha[:10]} in time: {missing}")
            time.sleep(0.2)
        records = []
        for cell in self.lab.cells:
            records += [
                r
                for r in self._agent_records(cell)
                if r.get("event") == "container-rules-changed"
                and str(r.get("revision", "")).endswith(sha)
            ]
        return {c: max(0.0, seen[c]) for c in self.lab.cells}, records

    def _print_applied(self, sha: str, applied: Mapping[str, float]) -> None:
        interval = platform_interval(self.cfg.interval)
        for cell in self.lab.cells:
            self.n.say(
                f"status/{cell}: lastAppliedRevision main@sha1:{sha[:10]}…  Ready=True  "
                f"({applied[cell]:.1f}s after the push; interval {interval:g}s)"
            )

    def _print_changes(self, records: Sequence[Mapping[str, Any]], raw: bool = False) -> None:
        """The agents' `container-rules-changed` records, one line per container.

        With `raw`, the first record is also shown as the agent logged it (JSON, as a log
        pipeline would receive it).
        """
        for r in records:
            groups = [f"+{g}" for g in r.get("groups_added", [])]
            groups += [f"-{g}" for g in r.get("groups_removed", [])]
            app = r.get("app") or r.get("app_id", "")
            workload = "" if r.get("workload") == "app" else f" [{r.get('workload')}]"
            rules = f"rules +{r.get('rules_added', 0)} -{r.get('rules_removed', 0)}"
            self.n.say(
                f"  {r.get('cell')} {r.get('handle'):<13} {app + workload:<30} "
                f"{r.get('change')}: {rules}" + (f"  {' '.join(groups)}" if groups else "")
            )
        if raw and records:
            self.n.say("  as logged (first record):")
            self.n.block(json.dumps(records[0], separators=(",", ":")), indent="     ")

    def commit(self, message: str) -> tuple[str, float]:
        """Show the diff, run the repo's policy tests, commit and push; (sha, push time)."""
        self.n.cmd("git diff")
        self.n.block(_trim_diff(self.op.diff()))
        self.n.cmd("asgctl test policies")
        tested = subprocess.run(
            [*platform.asgctl_argv(), "test", "policies"],
            cwd=self.op.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        last = (tested.stdout.strip().splitlines() or ["(no output)"])[-1]
        self.n.block(last)
        if tested.returncode != 0:
            raise DemoError(f"the policy tests fail:\n{tested.stdout}{tested.stderr}")
        subject = message.splitlines()[0]
        self.n.cmd(f'git commit -am "{subject}" && git push')
        sha = self.op.commit_and_push(message)
        pushed = time.time()
        self.n.say(f"pushed main@sha1:{sha[:10]}; waiting for the cells' status branches …")
        return sha, pushed

    # -- the story ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        n = self.n
        n.section("The platform")
        user = platform.live_user(cfg.name)
        if user is not None:
            raise DemoError(
                f"lab {cfg.name!r} is in use by process {user.pid}; run the demo with "
                "another --name, or stop that one first"
            )
        self.owns_lab = True  # from here on, the lab of this name is ours to remove
        leftovers = platform.down(cfg.name)
        if leftovers:
            n.say(f"(removed a previous demo lab first: {len(leftovers)} items)")
        self.info = platform.up(
            cfg.name,
            platform.default_spec(cfg.cells),
            policies=cfg.policies,
            seed_hook=seed_before_story,
            log=lambda m: None,
            cf_layout=platform.cf_layout_variant(cfg.backend) if cfg.with_cf_layout else None,
        )
        platform.hold(self.lab)
        lab = self.lab
        n.say(
            f"{len(lab.cells)} cells, {len(lab.spec.containers)} containers and "
            f"{len(lab.spec.services)} services in network namespaces (lab {lab.lab_id}),\n"
            f"a git server with the policy repo at {lab.git_url}."
        )
        n.line()
        for c in lab.spec.containers:
            rec = lab.container_pids()[c.name]
            n.say(
                f"  {c.cell}  {c.name:<14} {lab.net.containers[c.name].ip:<12} "
                f"{c.app:<25} {c.workload:<8} pid {rec.pid}"
            )
        for s in lab.spec.services:
            ports = " ".join([*(f"{p}/tcp" for p in s.tcp), *(f"{p}/udp" for p in s.udp)])
            addrs = platform.short_addresses(s.addresses)
            n.say(f"  service {s.name:<13} {addrs:<26} {ports:<15} {s.description}")
        self.pids_before = {
            name: (rec.pid, rec.start) for name, rec in lab.container_pids().items()
        }
        n.line()
        n.say(
            f"Each cell is shaped like a Diego cell: underlay {platform.UNDERLAY_IF} (default "
            f"route, where ASGs judge egress), overlay\n{platform.VTEP_IF} (VXLAN, "
            f"{platform.OVERLAY_V4} standing in for CF's 10.255.0.0/16) between the cells' "
            "containers.\nNetwork policy: "
            + ", ".join(f"{p.source} → {p.dest}:{p.port}" for p in lab.spec.network_policies)
            + "."
        )
        if lab.cf_layout:
            n.say(
                f"CF's own chains are in every cell (iptables-{lab.cf_layout}): silk's netout--"
                " and overlay-- chains, and the\nvxlan-policy-agent's vpa-- chain first in "
                "FORWARD, which lets only network-policy traffic through the overlay."
            )
        self.operator = Operator(lab.git_url, lab.directory / "operator").clone()
        seed_sha = self.op.head()
        n.line()
        n.say(
            "The policy repo is asgctl's example (policies/), as it was before the payments "
            "team\nasked for MySQL: no Destination 'mysql', no EgressPolicy 'backend-to-mysql'."
        )
        n.line()
        n.say(
            f"Starting one agent per cell (asgctl agent --interval {cfg.interval} "
            f"--backend {cfg.backend} --netns …):"
        )
        self.info = platform.start_agents(
            lab, cfg.interval, extra=["--backend", cfg.backend], log=n.say
        )
        applied, records = self.wait_applied(seed_sha, time.time())
        cells = ", ".join(f"{c} in {t:.1f}s" for c, t in applied.items())
        n.say(f"every cell applied main@sha1:{seed_sha[:10]} ({cells}); {len(records)} containers")
        self.held = HeldConnection(
            lab.net.containers[HELD_FROM].netns, API, 443, timeout=2.0
        )  # after the first sync, as a running app would have it
        far = self.backends[-1]
        self.overlay_held = HeldConnection(
            lab.net.containers[OVERLAY_FROM].netns,
            lab.net.containers[far].ip,
            platform.BACKEND_PORT,
            timeout=2.0,
        )
        n.say(
            f"{HELD_FROM} opens a TCP connection to the card API {API}:443, and {OVERLAY_FROM} "
            f"one to {far}\n({lab.net.containers[far].ip}:{platform.BACKEND_PORT}, over the "
            "overlay); both stay open for the whole demo."
        )
        self._matrix(
            "start",
            "the platform before the stories",
            seed_sha,
            expect=[
                *((b, "mysql", REJ) for b in self.backends),
                ("frontend-0", "mysql", REJ),
                (HELD_FROM, "api", OPEN),
                *((c, "dns-2", REJ) for c in self.everyone),
                *((c, "card-api", REJ) for c in self.everyone),
            ],
        )

    def story_1(self) -> None:
        n = self.n
        n.section("Story 1: only the backend may reach MySQL (no restart)")
        n.say(
            "The payments backend must read its ledger from MySQL at "
            f"{MYSQL_OLD}:3306; the frontend,\nin the same space, must not.  An ASG would "
            "bind to the whole space and need a restart\nof every app in it.  Instead the "
            "operator adds a Destination and an app-level EgressPolicy:"
        )
        n.cmd(f"git clone {self.lab.git_url} && cd policies")
        self.op.pull()
        for path, doc in grant_documents(self.cfg.policies).items():
            self.op.write(path, append_document(self.op.read(path), doc))
        sha, pushed = self.commit(
            "Let payments/prod/backend reach MySQL\n\n"
            "Destination mysql (198.19.10.10:3306/tcp) and an app-level egress policy for the\n"
            "backend only; the frontend in the same space stays out.\n"
        )
        applied, records = self.wait_applied(sha, pushed)
        self._print_applied(sha, applied)
        self._print_changes(records)
        self._matrix(
            "story1",
            "backend reaches MySQL, frontend does not",
            sha,
            expect=[
                *((b, "mysql", OPEN) for b in self.backends),
                ("frontend-0", "mysql", REJ),
                ("stg-backend-0", "mysql", REJ),
            ],
            applied_after=applied,
            changes=tuple(records),
        )

    def story_2(self) -> None:
        n = self.n
        n.section("Story 2: MySQL moves to another data center")
        n.say(
            f"The DBAs bring MySQL up in the new data center at {MYSQL_NEW}; the old "
            f"server at\n{MYSQL_OLD} still serves while the apps move over."
        )
        self.info = platform.add_service_address(self.lab, "mysql", MYSQL_NEW)
        self._matrix(
            "story2-before",
            "MySQL also at the new address; policy unchanged",
            self.op.head(),
            expect=[
                *((b, "mysql-dc2", REJ) for b in self.backends),
                *((b, "mysql", OPEN) for b in self.backends),
            ],
        )
        n.say(
            "The backend cannot reach the new address yet: the Destination still names the "
            "old one.\nOne edit of the Destination moves the access (no new ASG, no "
            "unbinding, no restart):"
        )
        self.op.pull()
        path = "policies/destinations.yaml"
        self.op.write(
            path,
            edit_document(
                self.op.read(path),
                "Destination",
                "mysql",
                lambda d: d.replace(MYSQL_OLD, MYSQL_NEW),
            ),
        )
        tests = "policies/tests/payments.yaml"
        self.op.write(
            tests,
            edit_document(
                self.op.read(tests),
                "PolicyTest",
                "payments-mysql",
                lambda d: d.replace(MYSQL_OLD, MYSQL_NEW),
            ),
        )
        sha, pushed = self.commit(
            f"MySQL moved to the new data center: {MYSQL_NEW}\n\n"
            "The backend's access follows the Destination; nothing else changes.\n"
        )
        applied, records = self.wait_applied(sha, pushed)
        self._print_applied(sha, applied)
        self._print_changes(records)
        n.say(f"The old data center is switched off: {MYSQL_OLD} goes away.")
        self.info = platform.remove_service_address(self.lab, "mysql", MYSQL_OLD)
        self._matrix(
            "story2",
            "access moved with the Destination",
            sha,
            expect=[
                *((b, "mysql-dc2", OPEN) for b in self.backends),
                *((b, "mysql", REJ) for b in self.backends),
                ("frontend-0", "mysql-dc2", REJ),
            ],
            applied_after=applied,
            changes=tuple(records),
        )

    def story_3(self) -> None:
        n = self.n
        interval = platform_interval(self.cfg.interval)
        n.section("Story 3: the security team edits a global ASG")
        n.say(
            f"A second DNS resolver ({DNS2}) goes into platform-dns, the ASG every running "
            "and\nstaging container gets.  In Cloud Foundry before dynamic ASGs this meant "
            "asking every\napp team to restart; here every running container gets it "
            f"within one sync ({interval:g}s):"
        )
        self.op.pull()
        path = "policies/security-groups/platform-dns.yaml"
        self.op.write(
            path,
            edit_document(self.op.read(path), "SecurityGroup", "platform-dns", add_second_resolver),
        )
        tests = "policies/tests/platform.yaml"
        self.op.write(
            tests,
            edit_document(
                self.op.read(tests),
                "PolicyTest",
                "platform-dns",
                lambda d: d.replace(
                    f'to: "{DNS2}:53/udp", expect: deny',
                    f'to: "{DNS2}:53/udp", expect: allow',
                ),
            ),
        )
        sha, pushed = self.commit(
            f"platform-dns: add the second resolver {DNS2}\n\n"
            "Global ASG (running and staging); no app restarts needed.\n"
        )
        applied, records = self.wait_applied(sha, pushed)
        n.say("What each agent logged, one line per container whose rules changed:")
        self._print_changes(records, raw=True)
        n.say("What each cell's status branch says:")
        self._print_applied(sha, applied)
        slowest = max(applied.values())
        budget = interval * 1.1 + 1.0  # the interval, its 10% jitter, and one cycle's work
        n.say(
            f"every running container on every cell had it {slowest:.1f}s after the push: "
            + ("within one sync interval" if slowest <= budget else "slower than one interval")
            + f" ({interval:g}s); no app team did anything"
        )
        self._matrix(
            "story3",
            "every container reaches the new resolver",
            sha,
            expect=[(c, "dns-2", OPEN) for c in self.everyone],
            applied_after=applied,
            changes=tuple(records),
        )

    def story_4(self) -> None:
        n = self.n
        n.section("Story 4: containers talk over the overlay while the ASGs change")
        far = self.backends[-1]
        n.say(
            f"{OVERLAY_FROM} has talked to the backends over the overlay at every step so far "
            f"(to {far} across\ncells, through {platform.VTEP_IF}); no ASG names a container "
            "address, and none is asked: "
            + (
                "the network policy alone decides."
                if self.lab.cf_layout
                else "without CF's chains\nin the cells (--no-cf-layout), the overlay lets "
                "everyone through, the blog too."
            )
            + "\nNow payments decommissions MySQL: the operator removes the backend's egress "
            "grant."
        )
        self.op.pull()
        for path, kind, name in GRANT:
            self.op.write(path, remove_document(self.op.read(path), kind, name)[0])
        sha, pushed = self.commit(
            "payments no longer uses MySQL: remove the backend's grant\n\n"
            "Destination mysql, EgressPolicy backend-to-mysql and its policy test go.\n"
        )
        applied, records = self.wait_applied(sha, pushed)
        self._print_applied(sha, applied)
        self._print_changes(records)
        self._matrix(
            "story4",
            "MySQL access revoked; the overlay is untouched",
            sha,
            expect=[(b, "mysql-dc2", REJ) for b in self.backends],
            applied_after=applied,
            changes=tuple(records),
        )
        verdicts = {k: v for s in self.steps for k, v in s.overlay.items()}
        same = all(s.overlay == self.steps[0].overlay for s in self.steps)
        n.say(
            f"over the overlay, at all {len(self.steps)} steps: "
            + ("the same verdicts" if same else "DIFFERENT verdicts")
            + f" ({', '.join(f'{k} {Verdict(v).symbol}' for k, v in verdicts.items())});"
            f"\nthe held connection {OVERLAY_FROM} → {far} echoed "
            f"{sum(self.overlay_checks)}/{len(self.overlay_checks)} times."
        )
        if not same:
            raise DemoError("an ASG change moved a verdict over the overlay")

    # -- story 5: by name -------------------------------------------------------------------

    def by_name(self, container: str) -> tuple[str, Verdict]:
        """The container resolves CARD_NAME through the lab's DNS server (its query crosses
        its cell's firewall like any other packet) and connects to the first address given:
        (that address, the verdict); ("", ERROR) when no answer came."""
        net = self.lab.net.containers[container]
        server = platform.dns_service(self.lab).addresses[0]
        try:
            address = lookup(net.netns, server, CARD_NAME)[0]
        except (LabDnsError, IndexError):
            return "", Verdict.ERROR
        result = probe_tcp(net.netns, address, 443, timeout=1.0)
        return address, classify(result, net.gateway, address)

    def _by_name_table(self, containers: Sequence[str]) -> dict[str, dict[str, str]]:
        table = {}
        for c in containers:
            address, verdict = self.by_name(c)
            table[c] = {"address": address, "verdict": verdict.value}
            self.n.say(f"  {c:<14} {CARD_NAME} → {address or '(no answer)':<14} {verdict.symbol}")
        return table

    def _until(self, check: Callable[[], bool], what: str) -> float:
        """Seconds until `check()` holds; DemoError after the demo's timeout."""
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > self.cfg.timeout:
                raise DemoError(f"{what}: not within {self.cfg.timeout:g}s")
            time.sleep(0.25)
        return time.monotonic() - t0

    def _names_shown(self, address: str) -> bool:
        """Every cell's status branch lists `address` as CARD_NAME's (and only it)."""
        with contextlib.suppress(GitError):
            statuses = self.op.status_branches()
            return all(
                any(
                    n.get("fqdn") == CARD_NAME and n.get("addresses") == [address]
                    for n in (statuses[c].document.get("names") or [])
                )
                for c in self.lab.cells
                if c in statuses
            ) and set(statuses) >= set(self.lab.cells)
        return False

    def story_5(self) -> None:
        n = self.n
        name = self.cfg.name
        n.section("Story 5: the card API by name; the provider moves it")
        n.say(
            f"The card network gives payments a name, {CARD_NAME}, not addresses: it "
            "moves its\nAPI when it likes.  The lab's DNS server (dnsmasq, "
            f"{platform.dns_service(self.lab).addresses[0]}) serves the name with a "
            f"{platform.DNS_TTL}s TTL;\nthe containers resolve through it.  The operator "
            "grants the backend the name, with its\nprotocol and port (no address anywhere):"
        )
        self.op.pull()
        for path, doc in BY_NAME.items():
            self.op.write(path, append_document(self.op.read(path), doc))
        sha, pushed = self.commit(
            "Let payments/prod/backend reach the card API by name\n\n"
            f"Destination card-network ({CARD_NAME}:443/tcp, by fqdns) for the backend only;\n"
            "the agents keep the name's addresses, nobody edits them here.\n"
        )
        applied, records = self.wait_applied(sha, pushed)
        self._print_applied(sha, applied)
        self._print_changes(records)
        self._until(lambda: self._names_shown(CARD_OLD), "the status branches list the name")
        for cell in self.lab.cells:
            n.say(f"status/{cell}: names {CARD_NAME} → {CARD_OLD}")
        n.say("Each container resolves the name and connects to what it was told:")
        before = self._by_name_table([*self.backends, "frontend-0"])
        wrong = [b for b in self.backends if before[b]["verdict"] != OPEN.value]
        if wrong or before["frontend-0"]["verdict"] != REJ.value:
            raise DemoError(f"by name, before the move: {before}")
        agents = {c: (p.pid, p.start) for c, p in self.lab.agents().items()}
        head = self.op.remote_head()
        n.line()
        n.say(
            f"The card network moves its API to {CARD_NEW} (the old address still answers "
            "while\nclients move).  Nobody touches the policy repo, no agent restarts:"
        )
        self.info = platform.add_service_address(self.lab, "card-api", CARD_NEW)
        n.cmd(f"asgctl lab dns set --name {name} {CARD_NAME} {CARD_NEW}")
        moved = subprocess.run(
            [*platform.asgctl_argv(), "lab", "dns", "set", "--name", name, CARD_NAME, CARD_NEW],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        n.block((moved.stdout + moved.stderr).strip())
        if moved.returncode != 0:
            raise DemoError(f"asgctl lab dns set failed: {moved.stderr.strip()}")
        new_after = self._until(
            lambda: all(self.by_name(b) == (CARD_NEW, OPEN) for b in self.backends),
            "the backends reach the new address by name",
        )
        n.say(f"the backends reach {CARD_NEW} by name {new_after:.1f}s after the move")
        old_after = self._until(
            lambda: all(
                classify(
                    probe_tcp(self.lab.net.containers[b].netns, CARD_OLD, 443, timeout=1.0),
                    self.lab.net.containers[b].gateway,
                    CARD_OLD,
                )
                is REJ
                for b in self.backends
            ),
            "the old address is rejected",
        )
        n.say(
            f"and {CARD_OLD}, which the name no longer gives, is rejected {old_after:.1f}s after "
            f"the move\n(the TTL of the last answer that gave it, {platform.DNS_TTL}s, ran out "
            "with nobody renewing it)"
        )
        after = self._by_name_table([*self.backends, "frontend-0"])
        now = {c: (p.pid, p.start) for c, p in self.lab.agents().items()}
        head_after = self.op.remote_head()
        n.say(
            "agents: "
            + ", ".join(f"{c} pid {now.get(c, (None,))[0]}" for c in sorted(agents))
            + (" (the same processes)" if now == agents else " (RESTARTED)")
            + f"  ·  policy repo main@sha1:{head_after[:10]} "
            + ("(unchanged)" if head_after == head else f"(was {head[:10]})")
        )
        self.report["by_name"] = {
            "name": CARD_NAME,
            "before": before,
            "after": after,
            "new_reached_after": round(new_after, 1),
            "old_rejected_after": round(old_after, 1),
            "agents_same": now == agents,
            "head_before": head,
            "head_after": head_after,
        }
        if now != agents or head_after != head:
            raise DemoError("the move restarted an agent or changed the policy repo")
        self._matrix(
            "story5",
            "the card API moved; the grant by name followed",
            sha,
            expect=[
                *((b, "card-new", OPEN) for b in self.backends),
                *((b, "card-api", REJ) for b in self.backends),
                ("frontend-0", "card-new", REJ),
            ],
        )

    def finale(self) -> None:
        n = self.n
        lab = self.lab
        n.section("Nothing restarted")
        restarted = []
        for name, (pid, start) in sorted(self.pids_before.items()):
            now = platform.process_start_time(pid)
            same = now is not None and now == start
            if not same:
                restarted.append(name)
            n.say(f"  {name:<14} pid {pid:<7} {'same process' if same else 'RESTARTED'}")
        held = self._check_held()
        total = len(self.held_checks)
        n.say(
            f"held connection {HELD_FROM} → {API}:443: "
            f"{sum(self.held_checks)}/{total} echoes" + (", still open" if held else ", BROKEN")
        )
        far = self.backends[-1]
        overlay_ok = self._check_overlay_held()
        n.say(
            f"held connection {OVERLAY_FROM} → {far} over the overlay: "
            f"{sum(self.overlay_checks)}/{len(self.overlay_checks)} echoes"
            + (", still open" if overlay_ok else ", BROKEN")
        )
        n.section("asgctl status")
        n.cmd(f"asgctl status --source {lab.git_url}")
        status = subprocess.run(
            [*platform.asgctl_argv(), "status", "--source", lab.git_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        n.block(status.stdout + status.stderr)
        self.report.update(
            {
                "restarted": restarted,
                "pids": {k: v[0] for k, v in self.pids_before.items()},
                "held": {"checks": self.held_checks, "open_at_end": held},
                "overlay_held": {"checks": self.overlay_checks, "open_at_end": overlay_ok},
                "cf_layout": self.lab.cf_layout,
                "status_exit": status.returncode,
                "status_text": status.stdout,
            }
        )

    def run(self) -> dict[str, Any]:
        """All of it, in order, then teardown whatever happened; see `result`."""
        try:
            self.setup()
            self.story_1()
            self.story_2()
            self.story_3()
            self.story_4()
            self.story_5()
            self.finale()
            self.report["ok"] = True
        finally:
            self.teardown()
        return self.result()

    def result(self) -> dict[str, Any]:
        """The report so far (also after a failure: the steps that did happen)."""
        return {
            "ok": False,
            **self.report,
            "steps": [s.to_dict() for s in self.steps],
            "duration": round(self.n.elapsed(), 1),
        }

    def teardown(self) -> None:
        if not self.owns_lab:  # another demo's lab: not ours to remove
            return
        for conn in (self.held, self.overlay_held):
            if conn is not None:
                conn.close()
        if self.info is not None:
            platform.stop_agents(self.info, timeout=5.0)
        removed = platform.down(self.cfg.name)
        ns = sum(r.startswith("netns ") for r in removed)
        self.n.section("Teardown")
        self.n.say(f"asgctl lab down --name {self.cfg.name}: removed {ns} namespaces and the state")


def platform_interval(text: str) -> float:
    from reconciler.agent.config import parse_duration

    return parse_duration(text, "interval")


def _trim_diff(diff: str, limit: int = 40) -> str:
    """The diff without git's index lines, cut at `limit` lines (the point is the edit)."""
    lines = [ln for ln in diff.splitlines() if not ln.startswith(("index ", "diff --git"))]
    if len(lines) > limit:
        lines = [*lines[:limit], f"… ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP (a closed terminal, a CI timeout) tear down like Ctrl-C does."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asgctl lab demo", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo", help="lab name (default: demo)")
    parser.add_argument("--interval", default="2s", help="agent sync interval (default: 2s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait per step")
    parser.add_argument("--policies", default="policies", help="the example policy repo")
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument(
        "--backend", default="iptables", help="agents' dataplane: iptables, libiptc, nftables"
    )
    parser.add_argument("--report", default=None, help="write a JSON report here")
    parser.add_argument(
        "--cf-layout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CF's own chains in the cells (default: on, except with --backend nftables)",
    )
    args = parser.parse_args(argv)

    reason = platform.unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    # ✓, ✗ and box lines on a terminal that is not UTF-8: degrade to "?" rather than fail
    # half-way through the story.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")
    cfg = DemoConfig(
        args.name,
        args.interval,
        args.timeout,
        Path(args.policies),
        args.cells,
        args.backend,
        args.cf_layout,
    )
    demo = Demo(cfg, sys.stdout)
    code = 0
    try:
        with _sigterm_as_interrupt():
            report = demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted; the lab was torn down", file=sys.stderr)
        report, code = {**demo.result(), "error": "interrupted"}, 130
    except (DemoError, platform.PlatformError, GitError) as exc:
        note = "\n(the lab was torn down)" if demo.owns_lab else ""
        print(f"\nerror: {exc}{note}", file=sys.stderr)
        report, code = {**demo.result(), "error": str(exc)}, 1
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if code == 0:
        print(f"\ndemo finished in {report['duration']:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
