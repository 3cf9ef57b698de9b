"""`asgctl cf compare`: shadow parity on a cell where Cloud Foundry still enforces.

A thin click layer: the kernel's CF chains are read by `backends/iptables/cfparse`, the plan
is compiled as `asgctl render` compiles it, and `core/parity` compares the two.  Registered
in the `cf` group beside `asgctl cf sync` (`cf_commands.py`).
"""

from __future__ import annotations

import gc
import json
import sys

import click

from reconciler.cli_options import format_option, variant_option


@click.command("compare")
@click.option(
    "--containers",
    required=True,
    type=click.Path(dir_okay=False),
    help="The cell's container metadata store (CF's store.json).",
)
@click.option(
    "--policies",
    default="policies",
    show_default=True,
    type=click.Path(file_okay=True, dir_okay=True),
    help="Policy folder (read from disk, or from git with --rev).",
)
@click.option("--rev", default=None, help="Read the policies at this git revision.")
@click.option(
    "--agent-config",
    default=None,
    type=click.Path(dir_okay=False),
    help="Read the cell's deny-networks (and the rest of its settings) from this agent "
    "settings file, as the agent would enforce them.",
)
@click.option("--netns", default=None, help="Read the chains in this network namespace.")
@variant_option("iptables variant holding CF's chains; auto: the one with netout chains.")
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="Packet sets shown per container and side (the counts include them all).",
)
@format_option("text", "json")
def cf_compare_cmd(
    containers: str,
    policies: str,
    rev: str | None,
    agent_config: str | None,
    netns: str | None,
    variant: str,
    limit: int,
    fmt: str,
) -> None:
    """Does asgctl's plan allow each container exactly what CF's chains allow it?

    Reads silk's netout chains and the vxlan-policy-agent's ASG chains from the kernel
    (iptables-save), works out each container's egress allow set, and compares it with the
    plan for the same store.json.  Exit 0 when every container's allow set is the same, 3
    when any differs (or holds a CF rule that cannot be judged, or has no CF chain, or CF
    has a chain for an address the store does not hold), 1 on error.  Changes nothing.
    """
    from reconciler.backends import DataplaneError, Runner
    from reconciler.backends.iptables.cfparse import CfParseError, read_cf_sides
    from reconciler.cli_inputs import cell_plan_or_exit, cell_settings_or_exit, fail
    from reconciler.core.parity import compare

    policy, plan = cell_plan_or_exit(
        policies, rev, containers, "", cell_settings_or_exit(agent_config, ())
    )
    gc.freeze()  # the policy and plan live to the end: full collections need not rescan them
    runner = Runner.in_netns(netns) if netns else Runner()
    families = plan.families() or (4,)
    try:
        sides = read_cf_sides(runner, families, variant)
    except (DataplaneError, CfParseError) as exc:
        fail(f"reading CF's chains: {exc}")
        raise  # unreachable: fail exits
    report = compare(policy, plan, sides, keep=limit)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(limit), indent=2))
    else:
        click.echo(report.text(limit), nl=False)
    sys.exit(report.exit_code)
