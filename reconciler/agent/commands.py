"""`asgctl agent` and `asgctl status`: click options only; everything else is in the package.

Every agent option defaults to None so that "not given" can be told from "given the default",
which is what lets a flag override the config file and the file override the defaults.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from reconciler.cli_options import format_option, status_repo_options, status_repos_or_exit


def _opt(*names: str, **kwargs: Any) -> Any:
    return click.option(*names, default=None, **kwargs)


@click.command("agent")
@_opt("--config", "config_file", type=click.Path(dir_okay=False), help="YAML settings file.")
@_opt("--source", help="Policy repository URL (git://, https://, ssh://, file path).")
@_opt("--branch", help="Policy branch.  [default: main]")
@_opt("--cell", help="This cell's name (status/<cell>).  [default: host name]")
@_opt("--containers", help="The container metadata store (CF's store.json).")
@_opt("--policies-path", help="Policy folder inside the repository.  [default: policies]")
@_opt("--interval", help="Time between syncs, e.g. 60s, 5m.  [default: 60s]")
@_opt("--jitter", help="Random extra wait, share of the interval, e.g. 10%.  [default: 10%]")
@_opt("--backend", help="Dataplane backend (iptables, libiptc, ...).  [default: iptables]")
@_opt("--variant", help="iptables variant: auto, legacy or nft.  [default: auto]")
@_opt("--netns", help="Enforce in this network namespace (lab and tests).")
@_opt(
    "--mode",
    type=click.Choice(["enforce", "shadow"]),
    help="shadow: write nothing to the kernel; compare the plan with CF's chains every cycle "
    "and report parity in status and metrics.  [default: enforce]",
)
@_opt("--once", is_flag=True, help="One cycle, push status, exit (for a systemd timer).")
@_opt("--state-dir", help="Cache, state and status repo.  [default: /var/lib/asgctl]")
@_opt("--fetch-depth", type=int, help="Depth of the first fetch (0 = full).  [default: 1]")
@_opt("--git-timeout", help="Longest any git command may take.  [default: 60s]")
@_opt("--retry-base", help="First retry delay after a failure.  [default: 2s]")
@_opt("--retry-cap", help="Longest retry delay.  [default: the interval]")
@_opt("--verify", type=click.Choice(["none", "signed"]), help="Require signed heads.")
@_opt("--allowed-signers", help="SSH allowed signers file (gpg.ssh.allowedSignersFile).")
@_opt("--gpg-keyring", help="Trusted OpenPGP public keys (a file, or a GnuPG home).")
@_opt("--allow-rewind/--no-allow-rewind", help="Apply heads that do not descend.")
@_opt(
    "--mass-revoke-threshold",
    help="Share of the cell's container-rule pairs a plan may take away, net.  [50%]",
)
@_opt(
    "--mass-revoke-min",
    type=int,
    help="Container-rule pairs a plan must also take away, net, to be held back (a cell "
    "left with no access is held back below it).  [100]",
)
@_opt("--mass-revoke-trailer", help="Commit trailer that overrides the mass-revoke gate.")
@_opt("--policy-tests", help="PolicyTests of a new head: enforce, warn or off.  [default: warn]")
@_opt("--heal-drift/--no-heal-drift", help="Repair changes made by others.  [default: on]")
@_opt("--status-push/--no-status-push", help="Write status/<cell>.  [default: on]")
@_opt(
    "--status-url",
    help="Push status to this repository instead of the policy repository; {shard} in it "
    "is the cell's shard (see --status-shards).  [default: the policy repository]",
)
@_opt("--status-shards", type=int, help="Status repositories the fleet uses.  [default: 1]")
@_opt("--heartbeat", help="Push an unchanged status this often.  [default: 10m]")
@_opt("--status-min-interval", help="Merge status pushes closer than this.  [default: 1s]")
@_opt("--metrics-listen", help="Serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9465).")
@_opt("--metrics-textfile", help="Also write the metrics to this file.")
@_opt("--listen-webhook", help="Sync at once on a signed push webhook to HOST:PORT/hook.")
@_opt("--webhook-secret-file", help="Its HMAC secret.  [default: $ASGCTL_WEBHOOK_SECRET]")
@_opt("--webhook-min-interval", help="At most one webhook sync this often.  [default: 10s]")
@_opt("--watch", type=click.Choice(["auto", "inotify", "poll"]), help="Inventory watching.")
@_opt("--watch-poll", help="Polling period when not using inotify.  [default: 100ms]")
@click.option(
    "--underlay-interface",
    multiple=True,
    help="Judge only egress out through this interface (repeat for several).  "
    "[default: the interfaces of the default routes]",
)
def agent_cmd(config_file: str | None, **flags: Any) -> None:
    """Pull the policy branch on a timer, converge this cell, commit status back.

    Runs until SIGTERM or SIGINT (the cycle in progress finishes; rules stay in place);
    SIGHUP syncs at once.  With --once: one cycle, exit 0 when Ready, 1 otherwise.
    """
    from reconciler.agent.config import ConfigError, build_config, load_file
    from reconciler.agent.loop import Agent

    flags["underlay_interface"] = flags.get("underlay_interface") or None  # () = not given
    if flags.get("once") is False:
        flags["once"] = None  # an absent flag must not override `once: true` in the file
    try:
        file_values = load_file(config_file) if config_file else {}
        cfg = build_config(file_values, flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(Agent(cfg).run())


@click.command("status")
@click.option("--source", required=True, help="Policy repository URL.")
@click.option("--branch", default="main", show_default=True, help="Policy branch.")
@click.option(
    "--cache",
    default=None,
    help="Keep a bare repository here between runs: later runs fetch only the branches that "
    "changed and reuse each file's parse.",
)
@status_repo_options
@format_option("text", "json")
def status_cmd(
    source: str,
    branch: str,
    cache: str | None,
    status_url: str | None,
    status_shards: int,
    fmt: str,
) -> None:
    """Every cell's status from the status/<cell> branches: applied revision, commits behind
    the branch head, last sync, Ready, drift and rule counts.

    Exit 0 when every cell is Ready, 3 when some cell is not, 1 on error.
    """
    from reconciler.agent.fleet import FleetError, read_fleet, render_fleet

    repos = status_repos_or_exit(status_url, status_shards, source)
    try:
        fleet = read_fleet(source, branch, cache, repos)
    except (FleetError, OSError) as exc:  # OSError: the --cache folder cannot be made
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(render_fleet(fleet, fmt), nl=False)
    sys.exit(0 if fleet.all_ready else 3)
