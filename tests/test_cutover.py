"""Cutover and rollback (docs/cutover.md), walked with real packets on Diego-like cells.

A lab whose cells carry CF's own chains (`asgctl lab up --cf-layout`) goes through the
steps an operator follows, while a prober thread keeps sending the same flows -- allowed and
denied, TCP and UDP, out of the underlay and between containers, from containers on two
cells -- and records every verdict:

  cf-only -> asgctl enforcing (the agents, same ASGs) -> CF's ASGs reduced to one global
  allow-all -> rollback: CF's ASGs restored -> agents stopped -> `asgctl uninstall`.

Every recorded probe must be the flow's expected verdict (none ever changes), a connection
opened before the first step carries data after every step, and at the end nothing of
asgctl's is left in any cell and CF's chains are what they were at the start. Waits are
bounded and wait on state (status branches, the kernel, probe rounds), never on time.

Why the verdicts cannot change, pinned against CF's code (cloudfoundry/silk-release,
path@commit:line):
- Order in FORWARD. silk's cni-wrapper-plugin *appends* each container's
  `-s <ip> -o <underlay> -j netout--<c>` jump (cni-wrapper-plugin/netrules/common.go@7ed0ad5
  :11-27 initChains, BulkAppend at :19); the vxlan-policy-agent inserts its `vpa--<time>`
  jump at position 1 (vxlan-policy-agent/enforcer/enforcer.go@01b6775:64-71 NewPolicyChain,
  :258 BulkInsert at 1).  asgctl's agent inserts its hooks at position 1 after them, so they
  come first, and they match underlay egress only (`-o eth0`): its chains ACCEPT or REJECT
  every packet leaving through the underlay before CF's netout chains see it, and leave
  container-to-container traffic to the vpa/overlay chains
  (tests/test_diego_cell.py::test_asgs_decide_underlay_egress_with_cfs_chains_in_place).
- An ASG change on CF's side rewrites only the container's `asg-<c>` chain, behind the jump
  in `netout--<c>` (enforcer.go@01b6775:224-242, the ASG branch of EnforceOnChain; the new
  chain's jump goes in before its rules, :258 then :269, so a packet in between falls
  through to the old chain): the lab does the same (`platform.sync_cf_asgs`).
- Established connections: CF's asg chain accepts RELATED,ESTABLISHED first
  (cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:58-83 IPTablesRules, :79; the list is
  inserted in reverse, so it is the chain's first rule), so does silk's overlay chain
  (lib/rules/rules.go@0a8b534:338-344 NewOverlayRelatedEstablishedRule), and so does
  asgctl's per-container chain (reconciler/backends/iptables/render.py, `asg:est`): a
  connection opened under one of them is accepted by whichever judges its next packet.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from asgctl_lab import platform
from asgctl_lab.netns import write_json_atomic
from asgctl_lab.nsenter import netns_exec_argv
from asgctl_lab.policyrepo import Operator
from asgctl_lab.probe import HeldConnection, Outcome, ProbeResult, probe_tcp, probe_udp
from reconciler.core.model import PolicySet, SecurityGroup
from reconciler.policy.load import load_policy
from reconciler.sources import cellstore
from tests.agentkit import wait_for
from tests.test_diego_cell import _up
from tests.test_lab_platform import POLICIES
from tests.test_traffic import rule

Verdict = Literal["allowed", "rejected"]

PROBE_TIMEOUT = 5.0
"""How long one probe waits for an answer: a bound, not an assertion (a denied flow is
rejected at once; an allowed one answers at once unless the machine is very busy)."""
PACE = 0.05
"""The prober's pause between rounds. Unpaced, a cell answering hundreds of rejected probes a
second runs out of the kernel's ICMP error budget (net.ipv4.icmp_msgs_per_sec, 1000 a second
with a burst of 50, per namespace), and a REJECT then reads as silence."""
STATE_TIMEOUT = 90.0
"""How long a step may take to show in the kernel or on the status branches."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One probed flow and the verdict CF's ASGs (and network policies) give it."""

    container: str
    protocol: Literal["tcp", "udp"]
    target: str
    """A service address, or a container's name (over the overlay)."""
    port: int
    expected: Verdict
    why: str

    def __str__(self) -> str:
        return f"{self.container} -> {self.target}:{self.port}/{self.protocol}"


# The seed policy repo (policies/): what each flow gets, and from which file.
FLOWS = (
    # cell-1
    Flow("backend-0", "tcp", "198.19.10.10", 3306, "allowed", "egress policy backend-to-mysql"),
    Flow("frontend-0", "tcp", "198.19.10.10", 3306, "rejected", "mysql is the backend's only"),
    Flow("blog-0", "udp", "198.19.53.53", 53, "allowed", "platform-dns, global running"),
    Flow("blog-0", "tcp", "198.19.20.20", 443, "rejected", "payments-api: payments spaces"),
    Flow("frontend-0", "tcp", "backend-1", 8080, "allowed", "network policy, over the overlay"),
    Flow("blog-0", "tcp", "backend-1", 8080, "rejected", "no network policy for the blog"),
    # cell-2
    Flow("backend-1", "tcp", "198.19.20.21", 443, "allowed", "payments-api, payments/prod"),
    Flow("backend-1", "udp", "198.19.30.30", 8125, "allowed", "egress policy everyone-to-metrics"),
    Flow("backend-1", "udp", "198.19.53.54", 53, "rejected", "the second resolver: no ASG"),
    Flow("blog-staging", "tcp", "198.19.80.10", 443, "allowed", "package-mirrors, global staging"),
    Flow("blog-staging", "udp", "198.19.30.30", 8125, "rejected", "metrics: running apps only"),
    Flow("stg-backend-0", "tcp", "198.19.80.10", 80, "rejected", "mirrors: staging only"),
)
HELD = (("backend-0", "198.19.10.10", 3306), ("backend-1", "198.19.20.21", 443))
"""Connections opened before the first step and checked after every one (one per cell)."""


def verdict(result: ProbeResult) -> str:
    """allowed (answered), rejected (an ICMP error: CF's and asgctl's REJECT alike), or how
    else it ended (a timeout or a reset is neither verdict, so it fails the comparison)."""
    if result.reached:
        return "allowed"
    return "rejected" if result.outcome is Outcome.REJECTED else result.outcome.value


@dataclass(frozen=True, slots=True)
class Record:
    step: str
    flow: Flow
    result: ProbeResult


class Prober(threading.Thread):
    """Probes FLOWS round after round until stopped, recording every verdict with the step
    that was current when the probe started."""

    def __init__(self, info: platform.LabInfo) -> None:
        super().__init__(name="cutover-prober", daemon=True)
        self.info = info
        self.step = "cf-only"
        self.records: list[Record] = []
        self.rounds = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def probe(self, flow: Flow) -> ProbeResult:
        net = self.info.net.containers
        netns = net[flow.container].netns
        host = net[flow.target].ip if flow.target in net else flow.target
        send = probe_tcp if flow.protocol == "tcp" else probe_udp
        return send(netns, host, flow.port, timeout=PROBE_TIMEOUT)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for flow in FLOWS:
                    step = self.step
                    result = self.probe(flow)
                    with self._lock:
                        self.records.append(Record(step, flow, result))
                with self._lock:
                    self.rounds += 1
                self._halt.wait(PACE)
        except BaseException as exc:  # re-raised by stop(), in the test's thread
            self.error = exc

    def enter(self, step: str) -> None:
        self.step = step

    def settle(self, rounds: int = 2) -> None:
        """Wait until `rounds` whole rounds ran after now (all of them in the current step)."""
        start = self.rounds
        wait_for(
            lambda: self.rounds >= start + rounds or self.error or not self.is_alive(),
            STATE_TIMEOUT,
            what=f"{rounds} probe rounds in step {self.step}",
        )
        assert self.error is None, self.error

    def halt(self) -> None:
        """Stop after the current probe, and wait for it (a thread left behind would keep
        probing a lab that is being torn down)."""
        self._halt.set()
        if self.ident is not None:
            self.join(timeout=len(FLOWS) * PROBE_TIMEOUT * 2)

    def stop(self) -> list[Record]:
        """Halt, and hand back every record (or the error that ended the thread)."""
        self.halt()
        assert not self.is_alive(), "the prober did not stop"
        if self.error is not None:
            raise self.error
        with self._lock:
            return list(self.records)


# -- the kernel, read with the cell's own iptables ---------------------------------------------


def save(info: platform.LabInfo, cell: str, family: int) -> list[str]:
    """The cell's rules as `iptables-save` prints them, without comments and counters, and
    without tables that hold nothing (an empty table is what the kernel shows once any tool
    looked at it: not something of ours, not something of CF's)."""
    tool = f"{'ip6' if family == 6 else 'ip'}tables-{info.cf_layout}-save"
    out = subprocess.run(
        netns_exec_argv(info.cell_netns(cell), [tool]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tables: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("*"):
            tables.append([])
        elif line.startswith(":") and line.endswith("]"):
            line = line.rsplit(" ", 1)[0]  # the chain's packet and byte counters
        tables[-1].append(line)
    return [ln for t in tables if not _empty(t) for ln in t]


BUILTIN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}


def _empty(table: list[str]) -> bool:
    """No rule, and only the built-in chains, accepting."""
    heads = [ln[1:].split() for ln in table if ln.startswith(":")]
    return not any(ln.startswith("-") for ln in table) and all(
        h[0] in BUILTIN and h[1] == "ACCEPT" for h in heads
    )


def cfs_own(lines: list[str]) -> list[str]:
    """The lines that are not asgctl's: its chains are `ASG-*`, its hooks jump to one."""
    return [ln for ln in lines if not any(w.lstrip(":").startswith("ASG-") for w in ln.split())]


def forward(info: platform.LabInfo, cell: str) -> list[str]:
    return [ln for ln in save(info, cell, 4) if ln.startswith("-A FORWARD ")]


def asgctl_cli(info: platform.LabInfo, cell: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`asgctl ...` run inside the cell's namespace, as an operator on the cell runs it."""
    argv = [*platform.asgctl_argv(), *args]
    return subprocess.run(
        netns_exec_argv(info.cell_netns(cell), argv), capture_output=True, text=True, timeout=120
    )


ALLOW_ALL = PolicySet(
    security_groups=(
        SecurityGroup(
            "allow-all",
            (rule("all", "0.0.0.0-255.255.255.255"),),
            running_default=True,
            staging_default=True,
        ),
    )
)
"""What the operator leaves in CF after the burn-in: one ASG allowing everything, bound
globally (running and staging); every other group unbound."""


def enforce_with_agents(info: platform.LabInfo, tmp_path: Path) -> platform.LabInfo:
    """Start an agent per cell (the lab's policy repo, CF's iptables variant) and wait until
    every cell's status branch says it applied the repo's head and is Ready, as an operator
    checks with `asgctl status`."""
    info = platform.start_agents(info, "1s", ["--backend", "iptables", "--variant", info.cf_layout])
    op = Operator(info.git_url, tmp_path / "operator").clone()
    head = op.head()
    wait_for(
        lambda: all(
            (s := op.status_branches().get(c)) is not None
            and s.applied_sha == head
            and s.ready == "True"
            for c in info.cells
        ),
        STATE_TIMEOUT,
        interval=0.5,
        what=f"every cell Ready at {head[:10]}",
    )
    return info


def uninstall(info: platform.LabInfo) -> None:
    """`asgctl uninstall` in every cell: 2 (something removed), then nothing left (0)."""
    for cell in info.cells:
        done = asgctl_cli(info, cell, "uninstall", "--variant", info.cf_layout)
        assert done.returncode == 2, done.stdout + done.stderr
        again = asgctl_cli(info, cell, "uninstall", "--variant", info.cf_layout, "--dry-run")
        assert again.returncode == 0, again.stdout + again.stderr


# -- the walk ------------------------------------------------------------------------------


@pytest.fixture(params=["legacy", "nft"])
def cf_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[platform.LabInfo]:
    """A two-cell lab with CF's chains (iptables-legacy or -nft); always torn down, agents
    and all (`platform.down`)."""
    yield from _up("cutover", tmp_path / "labs", request.param)


@pytest.mark.netns
def test_cutover_and_rollback_change_no_verdict_and_leave_cfs_chains_as_they_were(
    cf_lab: platform.LabInfo, tmp_path: Path
) -> None:
    info = cf_lab
    seed = load_policy(POLICIES)
    assert seed.ok
    start = {(c, f): save(info, c, f) for c in info.cells for f in (4, 6)}
    assert all(cfs_own(lines) == lines for lines in start.values())  # nothing of ours yet

    held = [
        HeldConnection(info.net.containers[c].netns, host, port, timeout=PROBE_TIMEOUT)
        for c, host, port in HELD
    ]
    prober = Prober(info)
    try:
        prober.start()

        def held_ok(after: str) -> None:
            broken = [h for h in held if not h.check(timeout=PROBE_TIMEOUT)]
            assert not broken, f"after {after}: {broken} broke"

        # 0. CF alone enforces the ASGs.
        prober.settle()
        held_ok("cf-only")

        # 1. asgctl enforces the same ASGs: the agents apply the seed revision on every cell.
        prober.enter("asgctl-enforcing")
        info = enforce_with_agents(info, tmp_path)
        for cell in info.cells:
            rules = forward(info, cell)
            hooks = [i for i, ln in enumerate(rules) if "-j ASG-FORWARD" in ln]
            assert hooks and all(" -o eth0 " in rules[i] for i in hooks), rules
            assert max(hooks) < min(i for i, ln in enumerate(rules) if "-j vpa--" in ln), rules
        prober.settle()
        held_ok("asgctl-enforcing")

        # 2. CF's ASGs reduced to one global allow-all: CF's chains would now accept every
        # flow, so the rejections that stay are asgctl's.
        prober.enter("cf-allow-all")
        platform.sync_cf_asgs(info, ALLOW_ALL)
        for cell in info.cells:
            cf_rules = cfs_own(save(info, cell, 4))
            asg_accepts = [ln for ln in cf_rules if ln.startswith("-A asg-") and "ACCEPT" in ln]
            assert asg_accepts and all(
                "--dst-range 0.0.0.0-255.255.255.255 -j ACCEPT" in ln or "RELATED,ESTABLISHED" in ln
                for ln in asg_accepts
            ), asg_accepts
        prober.settle()
        held_ok("cf-allow-all")

        # 3. Rollback, first CF's ASGs back (from the policy repo), checked on every cell.
        prober.enter("cf-restored")
        platform.sync_cf_asgs(info, seed.policy)
        for cell in info.cells:
            assert cfs_own(save(info, cell, 4)) == start[(cell, 4)]
        prober.settle()
        held_ok("cf-restored")

        # 4. The agents stop; their rules stay until uninstalled (still the same verdicts).
        prober.enter("agents-stopped")
        platform.stop_agents(info)
        assert not platform.load(info.name).agents()
        for cell in info.cells:
            assert any("-j ASG-FORWARD" in ln for ln in forward(info, cell))
        prober.settle()
        held_ok("agents-stopped")

        # 5. `asgctl uninstall` on each cell: CF's chains judge again, as at the start.
        prober.enter("uninstalled")
        uninstall(info)
        prober.settle()
        held_ok("uninstalled")
    finally:
        prober.halt()
        for h in held:
            h.close()
    records = prober.stop()

    # No probe, in any step, saw anything but its flow's verdict.
    wrong = [r for r in records if verdict(r.result) != r.flow.expected]
    assert not wrong, "\n".join(
        f"{r.step}: {r.flow} ({r.flow.why}) expected {r.flow.expected}, got {r.result}"
        for r in wrong[:20]
    )
    steps = ["cf-only", "asgctl-enforcing", "cf-allow-all", "cf-restored", "agents-stopped"]
    for name in [*steps, "uninstalled"]:
        seen = {r.flow for r in records if r.step == name}
        assert seen == set(FLOWS), f"step {name}: not every flow was probed"
    # Nothing of asgctl's is left, and CF's chains are byte for byte what they were.
    for cell in info.cells:
        for family in (4, 6):
            assert save(info, cell, family) == start[(cell, family)], (cell, family)


@pytest.fixture
def legacy_lab(tmp_path: Path) -> Iterator[platform.LabInfo]:
    yield from _up("wrong-order", tmp_path / "labs", "legacy")


@pytest.mark.netns
def test_uninstalling_before_cfs_asgs_are_restored_opens_egress(
    legacy_lab: platform.LabInfo, tmp_path: Path
) -> None:
    """The trade-off of reducing CF's ASGs (docs/cutover.md): reduced to allow-all, CF's
    chains are no backstop.  A container asgctl does not know yet is let out, and asgctl's
    rules taken away before CF's ASGs are back (the rollback in the wrong order) open every
    flow the ASGs deny, until CF's ASGs are restored."""
    info = enforce_with_agents(legacy_lab, tmp_path)
    prober = Prober(info)  # used here for its probe(), not as a thread
    denied = [f for f in FLOWS if f.expected == "rejected" and not f.target.startswith("back")]
    assert denied and all(verdict(prober.probe(f)) == "rejected" for f in denied)
    platform.sync_cf_asgs(info, ALLOW_ALL)
    assert all(verdict(prober.probe(f)) == "rejected" for f in denied)  # asgctl still decides
    # A container the agent does not know (not in the store it last read: one that just
    # started, say) falls through asgctl's dispatch chain to CF's: reduced, they let it out.
    blog = info.net.containers["blog-0"].ip
    known = platform.cell_containers(info.spec, info.net, info.guids, "cell-1")
    unknown = [c for c in known if c.handle != "blog-0"]
    write_json_atomic(info.store_path("cell-1"), cellstore.store_document(unknown))
    wait_for(
        lambda: (
            not [ln for ln in save(info, "cell-1", 4) if f"-s {blog}/32" in ln and "ASG-" in ln]
        ),
        STATE_TIMEOUT,
        what="the agent dropping blog-0's chain",
    )
    blog_flows = [f for f in denied if f.container == "blog-0"]
    assert blog_flows and all(verdict(prober.probe(f)) == "allowed" for f in blog_flows)
    assert all(verdict(prober.probe(f)) == "rejected" for f in denied if f not in blog_flows)
    platform.stop_agents(info)
    uninstall(info)
    opened = [f for f in denied if verdict(prober.probe(f)) == "allowed"]
    assert opened == denied  # no backstop: every underlay flow the ASGs deny is open
    seed = load_policy(POLICIES)
    platform.sync_cf_asgs(info, seed.policy)
    assert all(verdict(prober.probe(f)) == "rejected" for f in denied)  # CF's ASGs again


def test_the_cutover_doc_names_only_tests_that_exist() -> None:
    """docs/cutover.md points at these tests as its proof; a renamed test must not leave it
    pointing at nothing."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cutover.md").read_text()
    named = set(re.findall(r"`(?:tests/test_cutover\.py::)?(test_[a-z0-9_]+)`", doc))
    assert {
        "test_cutover_and_rollback_change_no_verdict_and_leave_cfs_chains_as_they_were",
        "test_uninstalling_before_cfs_asgs_are_restored_opens_egress",
    } <= named
    assert all(callable(globals().get(name)) for name in named), named
