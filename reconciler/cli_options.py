"""Options shared by the command groups (asgctl, asgctl lab, asgctl agent/status)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from reconciler.status.fetch import StatusRepos


def format_option(*choices: str, help: str | None = None) -> Callable[[Any], Any]:
    """`--format` as every command spells it: the first choice is the default."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help=help,
    )


def variant_option(
    help: str = "iptables variant; auto follows what the host already uses.",
) -> Callable[[Any], Any]:
    """`--variant` as every command that touches iptables spells it."""
    from reconciler.backends import VARIANT_CHOICES

    return click.option(
        "--variant",
        type=click.Choice(VARIANT_CHOICES),
        default="auto",
        show_default=True,
        help=help,
    )


def backend_option(help: str) -> Callable[[Any], Any]:
    """`--backend` for the commands that converge or remove our rules (`apply`, `uninstall`)."""
    from reconciler.backends import BACKENDS

    return click.option(
        "--backend",
        "backend_name",
        type=click.Choice(BACKENDS),
        default="iptables",
        show_default=True,
        help=help,
    )


def status_repo_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--status-url` and `--status-shards`, as the agents' `status-url` and `status-shards`
    name where they push (readers must be given the same two, or they look elsewhere)."""
    fn = click.option(
        "--status-shards",
        type=click.IntRange(1, 1024),
        default=1,
        show_default=True,
        help="Status repositories the fleet is spread over (the agents' status-shards).",
    )(fn)
    return click.option(
        "--status-url",
        default=None,
        help="Status repository the agents push to (their status-url), with {shard} for "
        "each shard's number.  [default: the policy repository]",
    )(fn)


def status_repos_or_exit(url: str | None, shards: int, default: str) -> StatusRepos:
    """The `StatusRepos` the two options name (`default` when no URL is given); a usage
    error naming the option when they do not fit together."""
    from reconciler.status.fetch import StatusRepos

    try:
        return StatusRepos(url or default, shards)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
