"""Options shared by the command groups (asgctl, asgctl lab, asgctl agent/status)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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
