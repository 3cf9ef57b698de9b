"""The agent's resolver against a real kernel set (issue 15, items 2 and 3): what it records
is what the kernel holds, also when a write is refused."""

from __future__ import annotations

from collections.abc import Callable

from asgctl_lab.netns import Lab
from reconciler.backends.kernel.runner import Runner
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, Destination, EgressPolicy, PolicySet, PortRange
from reconciler.fqdn.dns import Client
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.kernelsets import IpsetWriter, ensure_ipsets
from reconciler.fqdn.service import FqdnService
from tests.conftest import require_netns, skip_unless_available, tool_unavailable_reason
from tests.dnskit import QTYPE_A, Responder, record

NAMES = [f"n{i}.lab.example" for i in range(300)]


def test_a_refused_write_records_nothing_and_a_batch_of_300_names_lands(
    make_lab: Callable[..., Lab],
) -> None:
    require_netns()
    skip_unless_available("ipset", tool_unavailable_reason("ipset"))
    lab = make_lab([], [], conntrack=False)
    zone = {
        (n, QTYPE_A): [record(n, QTYPE_A, 60, f"198.19.{i // 250}.{i % 250 + 1}")]
        for i, n in enumerate(NAMES)
    }
    server = Responder(zone)
    try:
        policy = PolicySet(
            destinations=(
                Destination("many", "tcp", (), (PortRange(443, 443),), fqdns=tuple(NAMES)),
            ),
            egress_policies=(EgressPolicy("all", "default", None, "many"),),
        )
        plan = compile_cell(policy, [Container("c", "198.18.0.2", "app", "space")], "c")
        runner = Runner.in_netns(lab.cell)
        writer = IpsetWriter(runner)
        service = FqdnService(
            writer, FqdnSettings(), clients=[Client("127.0.0.1", server.port, 1.0)]
        )
        service.want(plan)
        # The sets do not exist yet (no ruleset references them): ipset refuses the write,
        # and the resolver records no address it could not put in the kernel.
        assert service.refresh(everything=True) == len(NAMES)
        status = {s["fqdn"]: s for s in service.status() if s["family"] == 4}
        assert all(s["count"] == 0 and "ipset" in str(s["error"]) for s in status.values())
        assert service.metrics.write_errors >= 1
        # With the sets there (as a converge makes them), every answer lands.
        sets = {name: 4 for name in {r.set_name for r in plan.names if r.version == 4}}
        ensure_ipsets(runner, sets)
        service.refresh(everything=True)
        status = {s["fqdn"]: s for s in service.status() if s["family"] == 4}
        assert all(s["count"] == 1 and "error" not in s for s in status.values())
        first = next(r.set_name for r in plan.names if r.item.fqdn == NAMES[0] and r.version == 4)
        assert set(writer.members(first) or {}) == {"198.19.0.1"}
    finally:
        server.close()


def test_uninstall_takes_our_name_sets_and_leaves_the_hosts(make_lab: Callable[..., Lab]) -> None:
    """`asgctl uninstall` (iptables) removes the ipsets our rules referenced, by their name
    pattern, and nothing else: a host's own ipset stays."""
    import subprocess
    import sys

    from reconciler.backends import converge
    from reconciler.backends.iptables.backend import IptablesBackend

    require_netns()
    skip_unless_available("ipset", tool_unavailable_reason("ipset"))
    lab = make_lab([], [], conntrack=False)
    runner = Runner.in_netns(lab.cell)
    policy = PolicySet(
        destinations=(Destination("db", "tcp", (), (PortRange(5432, 5432),), fqdns=(NAMES[0],)),),
        egress_policies=(EgressPolicy("all", "default", None, "db"),),
    )
    plan = compile_cell(policy, [Container("c", "198.18.0.2", "app", "space")], "c")
    assert converge(IptablesBackend.open("legacy", runner), plan).ok
    runner.run(["ipset", "create", "hostset", "hash:net"])
    ours = next(r.set_name for r in plan.names)
    assert ours in runner.run(["ipset", "list", "-n"]).stdout.split()
    cli = "import sys; from reconciler.cli import main; sys.exit(main())"
    argv = ["uninstall", "--backend", "iptables", "--variant", "legacy"]
    done = subprocess.run(
        ["ip", "netns", "exec", lab.cell, sys.executable, "-c", cli, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert runner.run(["ipset", "list", "-n"]).stdout.split() == ["hostset"]
