"""`asgctl suggest`: the command line over `reconciler.flows.suggest` (read, propose, write)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from reconciler.atomicfile import atomic_write_text
from reconciler.escape import visible
from reconciler.flows.read import (
    MAX_ERRORS_SHOWN,
    FlowsError,
    Query,
    files_of,
    parse_time,
    read_located,
)
from reconciler.flows.record import DENY, WOULD_DENY
from reconciler.flows.suggest import (
    MARKER,
    Options,
    Proposal,
    SuggestError,
    file_names,
    parse_prefix_length,
    propose,
    render_app,
)
from reconciler.policy.importcf import schema_comment_for

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@click.command("suggest")
@click.option(
    "--state-dir",
    default=None,
    help="The agent's state directory: reads flows/flows.jsonl and its rotated files.  "
    "[default: /var/lib/asgctl]",
)
@click.option("--file", "file_", default=None, help="Read this flows file instead.")
@click.option("--app", default=None, help="Only this app: org/space/app, its name or its GUID.")
@click.option("--since", default=None, help="Only flows seen since: 2026-12-06T06:00:00Z, 2h, 7d.")
@click.option(
    "--verdict",
    "verdicts",
    type=click.Choice([DENY, WOULD_DENY]),
    multiple=True,
    help="Only records of this verdict (repeatable).  [default: deny and would-deny]",
)
@click.option(
    "--widen-to",
    "widen_v4",
    default=None,
    metavar="/N",
    help="Widen IPv4 addresses to their /N prefix (/8 to /32); ports stay exact.",
)
@click.option(
    "--widen-to6",
    "widen_v6",
    default=None,
    metavar="/N",
    help="Widen IPv6 addresses to their /N prefix (/32 to /128); ports stay exact.",
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write one YAML file per app into this folder (default: print to stdout).",
)
def suggest_cmd(
    state_dir: str | None,
    file_: str | None,
    app: str | None,
    since: str | None,
    verdicts: tuple[str, ...],
    widen_v4: str | None,
    widen_v6: str | None,
    out_dir: str | None,
) -> None:
    """Propose Destination + EgressPolicy documents that allow exactly the denied flows.

    From deny and would-deny (audit mode) records: per app, one Destination per protocol
    and set of ports with the addresses seen, granted to the app by GUID, each with the
    flows it covers in a comment; nothing wider than observed unless --widen-to asks.

    Exit 0 (also when nothing is left to propose), or 1 when a file or option cannot be
    used or a line is not a flow record (each named file:line on stderr; nothing is written).
    """
    if state_dir and file_:
        raise click.UsageError("--state-dir and --file: give one")
    try:
        paths = [Path(file_)] if file_ else files_of(state_dir or "/var/lib/asgctl")
        query = Query(app, parse_time(since, time.time()) if since else None)
        options = Options(
            verdicts=verdicts or (DENY, WOULD_DENY),
            widen_v4=parse_prefix_length(widen_v4, 4) if widen_v4 else None,
            widen_v6=parse_prefix_length(widen_v6, 6) if widen_v6 else None,
        )
        errors = _Errors()
        proposal = propose(read_located(paths, query, errors), options)
    except (FlowsError, SuggestError) as exc:
        _fail(str(exc))
    for note in proposal.notes:
        click.echo(f"note: {note}", err=True)
    bad = [*errors, *proposal.errors]
    if errors.more:
        bad.append(f"... and {errors.more} more bad lines")
    if bad:
        for line in bad:
            click.echo(f"error: {line}", err=True)
        _fail("nothing was written")
    if not proposal.apps:
        click.echo(f"nothing to propose: {proposal.records} usable records", err=True)
        return
    if out_dir is None:
        click.echo("".join(render_app(a, None) for a in proposal.apps), nl=False)
        return
    try:
        for path in _write(Path(out_dir), proposal):
            click.echo(f"wrote {path}")
    except (SuggestError, OSError) as exc:
        _fail(visible(str(exc)))


class _Errors(list[str]):
    """The reader's bad lines: the first `MAX_ERRORS_SHOWN` kept, the rest only counted, so
    a file of a billion bad lines costs no memory."""

    more = 0

    def append(self, line: str) -> None:
        if len(self) < MAX_ERRORS_SHOWN:
            super().append(line)
        else:
            self.more += 1


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _ours(path: Path) -> bool | None:
    """None: no such file; True: a regular file a previous run wrote; False: anything else."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # a symlink (ELOOP), a fifo, a folder: never written over
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return False
        return fh.read(len(MARKER) + 1) == MARKER.encode() + b"\n"


def _write(out: Path, proposal: Proposal) -> list[Path]:
    """One file per app into `out`, all checked before the first is written: a name held
    by a file this command did not write (or a symlink) stops it with nothing written."""
    out.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(os.lstat(out).st_mode):
        raise SuggestError(f"{out}: is a symlink; nothing was written")
    base = out.resolve()
    targets = [out / name for name in file_names(proposal.apps)]
    for target in targets:
        if target.resolve().parent != base:
            raise SuggestError(f"{target}: would be outside {out}; nothing was written")
        if _ours(target) is False:
            raise SuggestError(
                f"{target}: exists and was not written by `asgctl suggest`; move it away "
                "or write elsewhere; nothing was written"
            )
    hint = schema_comment_for(out)
    for app, target in zip(proposal.apps, targets, strict=True):
        atomic_write_text(target, render_app(app, hint), mode=0o644)
    return targets
