"""`asgctl flows`: the command line over `reconciler.flows.read`."""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from reconciler.cli_options import format_option
from reconciler.flows.read import (
    BadLines,
    FlowsError,
    Query,
    files_of,
    parse_time,
    read_records,
    regular_file,
    render,
)
from reconciler.flows.record import VERDICTS

F = TypeVar("F", bound=Callable[..., Any])


def record_options(command: F) -> F:
    """--state-dir, --file, --app and --since: where records are read and which, as every
    command over flow records (`flows`, `suggest`) spells them."""
    for option in reversed(
        (
            click.option(
                "--state-dir",
                default=None,
                help="The agent's state directory: reads flows/flows.jsonl and its rotated "
                "files.  [default: /var/lib/asgctl]",
            ),
            click.option("--file", "file_", default=None, help="Read this flows file instead."),
            click.option(
                "--app", default=None, help="Only this app: org/space/app, its name or its GUID."
            ),
            click.option(
                "--since", default=None, help="Only flows seen since: 2026-12-06T06:00:00Z, 2h, 7d."
            ),
        )
    ):
        command = option(command)
    return command


@click.command("flows")
@record_options
@click.option("--verdict", type=click.Choice(list(VERDICTS)), default=None)
@click.option("--rule", default=None, help="Only allows by this rule or group id (a prefix).")
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=10_000,
    show_default=True,
    help="Print at most the last N matching records.",
)
@format_option("text", "json", help="text: a table; json: one record per line.")
def flows_cmd(
    state_dir: str | None,
    file_: str | None,
    app: str | None,
    since: str | None,
    verdict: str | None,
    rule: str | None,
    limit: int,
    fmt: str,
) -> None:
    """What the agent's flow records say: which app was denied what, who used a rule.

    Exit 0, or 1 when a file or option cannot be used or a line of a file is not a flow
    record (each named file:line on stderr; the good records are still printed).
    """
    if state_dir and file_:
        raise click.UsageError("--state-dir and --file: give one")
    try:
        paths = [regular_file(file_)] if file_ else files_of(state_dir or "/var/lib/asgctl")
        query = Query(app, parse_time(since, time.time()) if since else None, verdict, rule)
    except FlowsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    errors = BadLines()
    kept = collections.deque(read_records(paths, query, errors), maxlen=limit)
    click.echo(render(list(kept), fmt), nl=False)
    for line in errors:
        click.echo(f"error: {line}", err=True)
    if errors.more:
        click.echo(f"error: ... and {errors.more} more bad lines", err=True)
    sys.exit(1 if errors else 0)
