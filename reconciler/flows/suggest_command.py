"""`asgctl suggest`: the command line over `reconciler.flows.suggest` (read, propose, write)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

from reconciler.core.model import PolicySet
from reconciler.escape import visible
from reconciler.flows.command import record_options
from reconciler.flows.read import (
    MAX_ERRORS_SHOWN,
    BadLines,
    FlowsError,
    Query,
    files_of,
    parse_time,
    read_located,
    regular_file,
)
from reconciler.flows.record import DENY, WOULD_DENY
from reconciler.flows.suggest import (
    Options,
    Proposal,
    SuggestError,
    file_names,
    parse_prefix_length,
    propose,
    render_app,
)
from reconciler.policy.importcf import schema_comment_for
from reconciler.policy.load import load_policy

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@click.command("suggest")
@record_options
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
    "--policies",
    default=None,
    type=click.Path(file_okay=False),
    help="The policy folder the proposal is for: flows it already allows are left out "
    "and its names are not reused.",
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
    policies: str | None,
    out_dir: str | None,
) -> None:
    """Propose Destination + EgressPolicy documents that allow exactly the denied flows.

    From deny and would-deny (audit mode) records: per app, one Destination per protocol
    and set of ports with the addresses seen, granted to the app by GUID, each with the
    flows it covers in a comment; nothing wider than observed unless --widen-to asks.

    Exit 0 (also when nothing is left to propose), or 1 when a file or option cannot be
    used, the --policies folder does not validate, or a line is not a flow record (each
    named file:line on stderr); then nothing is written.
    """
    if state_dir and file_:
        raise click.UsageError("--state-dir and --file: give one")
    try:
        paths = [regular_file(file_)] if file_ else files_of(state_dir or "/var/lib/asgctl")
        query = Query(app, parse_time(since, time.time()) if since else None)
        options = Options(
            verdicts=verdicts or (DENY, WOULD_DENY),
            widen_v4=parse_prefix_length(widen_v4, 4) if widen_v4 else None,
            widen_v6=parse_prefix_length(widen_v6, 6) if widen_v6 else None,
        )
        policy = _policy(policies) if policies else None
        errors = BadLines()
        proposal = propose(read_located(paths, query, errors), options, policy)
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


def _policy(path: str) -> PolicySet:
    result = load_policy(path)
    if not result.ok:
        for finding in result.errors[:MAX_ERRORS_SHOWN]:
            click.echo(f"error: {visible(str(finding))}", err=True)
        raise SuggestError(f"--policies {path}: does not validate (asgctl validate {path})")
    return result.policy


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _write(out: Path, proposal: Proposal) -> list[Path]:
    """One new file per app into `out`, all checked before the first is written.  A file
    that exists is never written over, not even an earlier proposal: rewritten from newer
    records (or with --policies, which leaves out what it already grants) it would drop
    what the earlier one granted.  Each proposal goes into a folder of its own."""
    out.mkdir(parents=True, exist_ok=True)
    if stat.S_ISLNK(os.lstat(out).st_mode):
        raise SuggestError(f"{out}: is a symlink; nothing was written")
    base = out.resolve()
    targets = [out / name for name in file_names(proposal.apps)]
    for target in targets:
        if target.resolve().parent != base:
            raise SuggestError(f"{target}: would be outside {out}; nothing was written")
        if os.path.lexists(target):
            raise SuggestError(
                f"{target}: exists; nothing was written (write each proposal into a new "
                "folder: a rewrite would drop what the earlier one granted)"
            )
    hint = schema_comment_for(out)
    for app, target in zip(proposal.apps, targets, strict=True):
        _create(target, render_app(app, hint))
    return targets


def _create(path: Path, text: str) -> None:
    """A new file (O_EXCL: never one that appeared since the check, never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
