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
