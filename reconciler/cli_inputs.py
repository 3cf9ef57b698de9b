"""What the one-shot commands read from the files they are given: a policy folder or
revision, a cell's store.json and an agent settings file -- each checked at once, so a command
stops with one clear line on stderr (exit 1) before it computes or touches anything.

Shared by `cli.py` and the `asgctl cf` commands.
"""

from __future__ import annotations

import sys

import click

from reconciler.core.cellplan import CellPlan, CellSettings, GateSettings, PlanError
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, PolicySet
from reconciler.policy.findings import render_findings
from reconciler.policy.load import load_policy
from reconciler.sources.cellstore import InventoryError, load_store


def fail(message: str, code: int = 1) -> None:
    """Say what is wrong on stderr and exit (1 unless `code` says otherwise)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def policy_or_exit(policies: str, rev: str | None, annotate: str | None = None) -> PolicySet:
    """Load and validate; any error stops the command before it computes anything.

    The findings go to stderr as text, or, with `annotate` (the policy folder's path in the
    repository), as GitHub annotations: a command asked for `--format github` runs in
    Actions, where a text line can be read as a workflow command.
    """
    result = load_policy(policies, rev)
    if not result.ok:
        fmt = "text" if annotate is None else "github"
        click.echo(render_findings(result.findings, fmt, annotate or ""), err=True, nl=False)
        fail(f"policy at {policies}{'@' + rev if rev else ''} is invalid; nothing was done")
    return result.policy


def containers_or_exit(path: str) -> tuple[Container, ...]:
    """The store's containers; each entry not used as written is a warning on stderr."""
    try:
        reading = load_store(path)
    except InventoryError as exc:
        fail(str(exc))
    for rejected in reading.rejected:
        click.echo(f"warning: {rejected}", err=True)
    return reading.containers


def cell_plan_or_exit(
    policies: str,
    rev: str | None,
    containers: str,
    cell: str,
    settings: CellSettings | None = None,
) -> tuple[PolicySet, CellPlan]:
    policy = policy_or_exit(policies, rev)
    try:
        return policy, compile_cell(policy, containers_or_exit(containers), cell, settings)
    except PlanError as exc:
        fail(str(exc))
        raise  # unreachable: fail exits


def cell_settings_or_exit(
    agent_config: str | None, underlay: tuple[str, ...], backend: str | None = None
) -> CellSettings:
    """The cell's settings from `--agent-config` (its underlay-interface, deny-networks and
    outbound-connections keys) and `--underlay-interface`, which wins; bad values stop the
    command before anything is computed."""
    from reconciler.agent.config import ConfigError, file_cell_settings, load_file

    try:
        values = load_file(agent_config) if agent_config else {}
        return file_cell_settings(values, underlay, backend)
    except ConfigError as exc:
        fail(f"{agent_config}: {exc}" if agent_config else str(exc))
        raise  # unreachable: fail exits


def gate_settings_or_exit(agent_config: str | None) -> GateSettings:
    """The mass-revoke settings of `--agent-config` (defaults without one); bad values stop
    the command before anything is computed."""
    from reconciler.agent.config import ConfigError, file_gate_settings, load_file

    try:
        values = load_file(agent_config) if agent_config else {}  # its errors name the file
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable: fail exits
    try:
        return file_gate_settings(values)
    except ConfigError as exc:
        fail(f"{agent_config}: {exc}")
        raise  # unreachable: fail exits
