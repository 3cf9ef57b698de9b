"""`asgctl cf ...`: commands that work against a live Cloud Foundry.

`cf sync` keeps the policy repo's view of CF current from the Cloud Controller v3 API
(reconciler.sources.cc reads it, reconciler.sources.cfsync writes the files).  The group lives
here, not in cli.py, so each `cf` command is added without editing the main command list.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

import click

from reconciler.cfcompare import cf_compare_cmd
from reconciler.cli_options import format_option
from reconciler.escape import visible
from reconciler.sources.cc import CCError, Client, Progress
from reconciler.sources.cfsync import (
    Outcome,
    Rendered,
    SyncError,
    apply,
    read_foundation,
    render,
    schema_hints,
)

SECRET_ENV = "ASGCTL_CF_CLIENT_SECRET"
CLIENT_ENV = "ASGCTL_CF_CLIENT_ID"


@click.group("cf")
def cf_group() -> None:
    """Work with a live Cloud Foundry: sync its view from the Cloud Controller v3 API, compare
    what a cell's CF chains enforce with the plan."""


class _ProgressLine:
    """`organizations: page 3/40, 15000/200000` on one rewritten terminal line per listing."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.kind = ""

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if self.kind and p.kind != self.kind:
            self.stream.write("\n")
        self.kind = p.kind
        pages = f"/{p.total_pages}" if p.total_pages is not None else ""
        total = f"/{p.total_results}" if p.total_results is not None else ""
        self.stream.write(f"\r{p.kind}: page {p.page}{pages}, {p.resources}{total} resources")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.kind:
            self.stream.write("\n")
            self.stream.flush()
        self.kind = ""


@cf_group.command("sync")
@click.option(
    "--api", required=True, help="The Cloud Controller's URL (https://api.SYSTEM_DOMAIN)."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of the policy repo to write into (directory/ and security-groups/ below it).",
)
@click.option(
    "--client-id",
    default=None,
    help=f"UAA client (client_credentials grant); default ${CLIENT_ENV}.  The secret is read "
    f"from ${SECRET_ENV} only.",
)
@click.option(
    "--ca-cert",
    default=None,
    type=click.Path(dir_okay=False),
    help="Trust this CA (PEM) for the Cloud Controller and UAA certificates.",
)
@click.option("--skip-ssl-validation", is_flag=True, help="Do not check certificates (labs only).")
@click.option(
    "--prune",
    is_flag=True,
    help="Remove the files of security groups that are gone from CF (default: report them).",
)
@format_option("text", "json")
def sync_cmd(
    api: str,
    out_dir: str,
    client_id: str | None,
    ca_cert: str | None,
    skip_ssl_validation: bool,
    prune: bool,
    fmt: str,
) -> None:
    """Write CF's orgs, spaces and apps (a Directory per org) and its security groups (a file
    each) into OUT, changing only what changed in CF.

    Files it writes start with a comment saying so; any other file is never touched.  Groups
    gone from CF are reported, and removed only with --prune.  Exit 0 on success, 1 when
    anything fails (then nothing was written).
    """
    warnings: list[str] = []
    progress = _ProgressLine(sys.stderr, fmt == "text" and sys.stderr.isatty())
    client_id = client_id if client_id is not None else os.environ.get(CLIENT_ENV, "")
    out = Path(out_dir)
    try:
        with Client(
            api,
            client_id,
            os.environ.get(SECRET_ENV, ""),
            ca_cert=ca_cert,
            skip_ssl_validation=skip_ssl_validation,
            warn=warnings.append,
        ) as client:
            for w in warnings if fmt == "text" else ():
                click.echo(f"warning: {w}", err=True)
            foundation = read_foundation(client, progress)
        progress.done()
        rendered = render(foundation, *schema_hints(out))
        if rendered.errors:
            for e in rendered.errors:
                click.echo(f"error: {visible(e)}", err=True)
            raise SyncError("the Cloud Controller's data cannot be written; nothing was written")
        outcome = apply(out, rendered, prune=prune)
    except (CCError, SyncError) as exc:
        progress.done()
        if fmt == "json":
            click.echo(json.dumps({"ok": False, "error": str(exc), "warnings": warnings}))
        click.echo(f"error: {visible(str(exc))}", err=True)
        sys.exit(1)
    except OSError as exc:
        progress.done()
        click.echo(f"error: {out}: {exc.strerror or exc}; the sync stopped", err=True)
        sys.exit(1)
    warnings.extend(rendered.warnings)
    _report(api, out, rendered, outcome, warnings, fmt, prune)


def _report(
    api: str,
    out: Path,
    rendered: Rendered,
    outcome: Outcome,
    warnings: list[str],
    fmt: str,
    prune: bool,
) -> None:
    if fmt == "json":
        doc = {
            "ok": True,
            "api": api,
            "out": str(out),
            "counts": dict(rendered.counts),
            "written": list(outcome.written),
            "unchanged": outcome.unchanged,
            "removed": list(outcome.removed),
            "vanished": [{"file": f, "removed": prune} for f in outcome.vanished],
            "warnings": warnings,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    for w in rendered.warnings:
        click.echo(f"warning: {visible(w)}", err=True)
    c = rendered.counts
    lines = [
        f"synced {c.get('orgs', 0)} orgs, {c.get('spaces', 0)} spaces, {c.get('apps', 0)} apps "
        f"and {c.get('security_groups', 0)} security groups into {out}"
    ]
    lines += [f"wrote {rel}" for rel in outcome.written]
    lines += [f"removed {rel}" for rel in outcome.removed]
    if outcome.vanished and not prune:
        lines += [f"gone from CF: {rel} (kept; --prune removes it)" for rel in outcome.vanished]
    lines.append(
        f"{len(outcome.written)} written, {len(outcome.removed)} removed, "
        f"{outcome.unchanged} unchanged"
    )
    click.echo("\n".join(lines))


cf_group.add_command(cf_compare_cmd)
