"""`asgctl notify`: click options only; the run is `reconciler.notify.run`.

Secrets never come from a flag (argv is visible to every user of the host and ends up in
CI logs): the GitHub token is read from the environment variable `--token-env` names
(default GITHUB_TOKEN), the webhook's shared secret from `--webhook-secret-file` or
$ASGCTL_WEBHOOK_SECRET, and the webhook URL -- for chat tools often a secret itself -- may
come from $ASGCTL_NOTIFY_WEBHOOK instead of `--webhook`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from reconciler.cli_options import format_option, status_repo_options, status_repos_or_exit
from reconciler.hmacsig import WEBHOOK_SECRET_ENV

WEBHOOK_URL_ENV = "ASGCTL_NOTIFY_WEBHOOK"


def _emit(line: str) -> None:
    from reconciler.escape import log_text

    click.echo(log_text(line), err=True)


@click.command("notify")
@click.option("--source", required=True, help="Policy repository URL (or path) to read.")
@click.option("--branch", default="main", show_default=True, help="Policy branch.")
@click.option("--cache", default=None, help="Keep a bare repository here between runs.")
@click.option(
    "--state-file",
    default="asgctl-notify.json",
    show_default=True,
    help="What was last sent per cell; keep it between runs (a CI cache, a volume).",
)
@click.option("--github-repo", default=None, help="OWNER/NAME to post commit statuses to.")
@click.option(
    "--github-api",
    default=None,
    help="GitHub API base URL (GitHub Enterprise).  [default: $GITHUB_API_URL or "
    "https://api.github.com]",
)
@click.option(
    "--token-env",
    default="GITHUB_TOKEN",
    show_default=True,
    help="Environment variable holding the GitHub token (never the token itself).",
)
@click.option("--target-url", default="", help="Link per status; {cell} and {sha} filled in.")
@click.option("--webhook", default=None, help=f"POST signed JSON here.  [or ${WEBHOOK_URL_ENV}]")
@click.option(
    "--webhook-secret-file",
    default=None,
    help=f"The webhook's HMAC secret.  [default: ${WEBHOOK_SECRET_ENV}]",
)
@click.option("--watch", is_flag=True, help="Keep running, one run per --interval.")
@click.option("--interval", default="60s", show_default=True, help="Time between runs.")
@click.option("--max-cells", default=10_000, show_default=True, help="Status branches read.")
@status_repo_options
@format_option("text", "json")
def notify_cmd(**opts: Any) -> None:
    """Turn status-branch changes into GitHub commit statuses (`asgctl/<cell>` on the
    revision each cell reports: success when applied, failure when refused or failing,
    pending while waiting) and/or a signed JSON webhook.  Only changes are sent.

    Exit 0 when everything due was delivered, 1 when something failed, 2 on bad usage.
    """
    from reconciler.agent.config import ConfigError, parse_duration
    from reconciler.hmacsig import SecretError, load_secret
    from reconciler.notify.run import Settings, notify_once, report_lines, summary, watch
    from reconciler.notify.sinks import GITHUB_API, GitHubStatuses, SinkError, Webhook

    try:
        interval = parse_duration(opts["interval"], "--interval")
        github = None
        if opts["github_repo"]:
            github = GitHubStatuses(
                repo=opts["github_repo"],
                token=os.environ.get(opts["token_env"], ""),
                api=opts["github_api"] or os.environ.get("GITHUB_API_URL") or GITHUB_API,
                target_url=opts["target_url"],
            )
        webhook = None
        url = opts["webhook"] or os.environ.get(WEBHOOK_URL_ENV)
        if url:
            secret = load_secret(opts["webhook_secret_file"], WEBHOOK_SECRET_ENV)
            webhook = Webhook(url, secret)
    except SinkError as exc:
        message = str(exc)
        if message.startswith("GitHub token"):
            message = f"${opts['token_env']}: empty or not set (the GitHub token)"
        raise click.UsageError(message) from None
    except (ConfigError, SecretError) as exc:
        raise click.UsageError(str(exc)) from None
    if github is None and webhook is None:
        raise click.UsageError("nothing to notify: give --github-repo and/or --webhook")
    if interval <= 0 or opts["max_cells"] < 1:
        raise click.UsageError("--interval and --max-cells must be above 0")
    settings = Settings(
        source=opts["source"],
        state_file=Path(opts["state_file"]),
        branch=opts["branch"],
        cache=opts["cache"],
        github=github,
        webhook=webhook,
        max_cells=opts["max_cells"],
        status=status_repos_or_exit(opts["status_url"], opts["status_shards"], opts["source"]),
    )
    if opts["watch"]:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        watch(settings, interval, stop, _emit)
        sys.exit(0)
    report = notify_once(settings)
    if opts["fmt"] == "json":
        click.echo(json.dumps(summary(report), indent=2))
    for line in report_lines(report):
        _emit(line)
    sys.exit(0 if report.ok else 1)
