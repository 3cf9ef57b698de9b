"""The asgctl command line: a thin click layer over the reconciler API.

Exit codes follow the tools operators already script against: 0 success, 1 invalid input or
failure, 2 usage error (click's own) -- except where a command documents a detailed code.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from reconciler.agent.commands import agent_cmd, status_cmd
from reconciler.backends.contract import ConvergeResult, Mode
from reconciler.backends.iptables.render import render_text
from reconciler.cf_commands import cf_group
from reconciler.cli_inputs import (
    cell_plan_or_exit,
    cell_settings_or_exit,
    fail,
    gate_settings_or_exit,
    policy_or_exit,
)
from reconciler.cli_options import (
    backend_option,
    format_option,
    status_repo_options,
    status_repos_or_exit,
    variant_option,
)
from reconciler.core.cellplan import PlanError
from reconciler.core.compile import compile_cell
from reconciler.core.endpoint import parse_endpoint
from reconciler.core.explain import LIFECYCLES, explain, find_containers
from reconciler.flows.command import flows_cmd
from reconciler.flows.suggest_command import suggest_cmd
from reconciler.notify.command import notify_cmd
from reconciler.policy.findings import render_findings
from reconciler.policy.load import load_policy
from reconciler.policy.source import locate
from reconciler.sources.cellstore import InventoryError


def cell_options(func: Any) -> Any:
    """`--agent-config` and `--underlay-interface`: the cell settings a plan renders."""
    func = click.option(
        "--underlay-interface",
        "underlay",
        multiple=True,
        help="Judge only what containers send out through this interface (repeatable); "
        "overrides the agent config's.  Without one, every packet a container sends is judged.",
    )(func)
    return click.option(
        "--agent-config",
        default=None,
        type=click.Path(dir_okay=False),
        help="Read the cell's underlay-interface, deny-networks and outbound-connections "
        "from this agent settings file (deploy/agent.yaml).",
    )(func)


policies_option = click.option(
    "--policies",
    default="policies",
    show_default=True,
    type=click.Path(file_okay=True, dir_okay=True),
    help="Policy folder (read from disk, or from git with --rev).",
)
rev_option = click.option(
    "--rev", default=None, help="Read the policies at this git revision instead of the disk."
)
containers_option = click.option(
    "--containers",
    required=True,
    type=click.Path(dir_okay=False),
    help="The cell's container metadata store (CF's store.json).",
)


PLUGIN_GROUP = "asgctl.commands"


class _PluginGroup(click.Group):
    """The built-in commands, plus any a separately installed distribution adds.

    The lab ships as its own distribution (`asgctl-lab`) so a cell's install carries no
    namespace or demo code; installed beside asgctl it still answers as `asgctl lab`.  A
    plugin is imported only when its command runs or help lists it, and it can add a command
    but never replace a built-in one.
    """

    def _plugins(self) -> dict[str, Any]:
        found = {}
        for ep in entry_points(group=PLUGIN_GROUP):
            if ep.name not in self.commands:
                found[ep.name] = ep
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        plugin = self._plugins().get(cmd_name)
        if plugin is None:
            return None
        try:
            loaded = plugin.load()
        except ImportError as exc:
            raise click.ClickException(
                f"the {cmd_name!r} command comes from {plugin.value}, which cannot be imported: "
                f"{exc}"
            ) from exc
        if not isinstance(loaded, click.Command):
            raise click.ClickException(
                f"the {cmd_name!r} command's entry point {plugin.value} is not a click command"
            )
        return loaded


@click.group(cls=_PluginGroup)
@click.version_option(package_name="asgctl")
def main() -> None:
    """GitOps reconciler for Cloud Foundry-style egress firewalls."""


@main.command()
@click.argument("path", default="policies", type=click.Path())
@rev_option
@format_option("text", "json", "github")
def validate(path: str, rev: str | None, fmt: str) -> None:
    """Validate a policy repository: JSON Schemas, then Cloud Foundry's rule grammar.

    Exit 0 when valid (warnings allowed), 1 when invalid.
    """
    result = load_policy(path, rev)
    place = locate(path)
    prefix = place.prefix if fmt == "github" and place.top is not None else ""
    click.echo(render_findings(result.findings, fmt, prefix), nl=False)
    sys.exit(0 if result.ok else 1)


@main.command("import-cf")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--name",
    default=None,
    help="Group name for a bare rules array (default: file name); otherwise import only "
    "the group of this name.",
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Write one YAML file per group here (default: print to stdout).",
)
def import_cf_cmd(files: tuple[str, ...], name: str | None, out_dir: str | None) -> None:
    """Convert Cloud Foundry ASGs to policy YAML: a rules array, a v3 security group, every
    page of /v3/security_groups, or a BOSH manifest / ops files (cc.security_group_definitions).

    Rules are judged as Cloud Controller judges them, with its messages; any error means
    nothing is written (exit 1).  Warnings (ICMP ports dropped, CIDRs with host bits, ...) go
    to stderr and the import goes ahead (exit 0).
    """
    from reconciler.policy.importcf import (
        document_filenames,
        dump_documents,
        import_files,
        schema_comment_for,
    )

    docs, errors, warnings = import_files(files, name)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    if errors:
        for e in errors:
            click.echo(e, err=True)
        fail("nothing was written")
    if out_dir is None:
        click.echo(dump_documents(docs), nl=False)
        return
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    hint = schema_comment_for(target)
    for doc, filename in zip(docs, document_filenames([d["name"] for d in docs]), strict=True):
        path = target / filename
        path.write_text(dump_documents([doc], hint), encoding="utf-8")
        click.echo(f"wrote {path}")


@main.command()
@containers_option
@policies_option
@rev_option
@click.option("--cell", default="", help="Cell name recorded in the plan.")
@format_option(
    "iptables",
    "nft",
    "json",
    help="iptables-restore input, the nftables backend's `nft -j -f` JSON, or the plan.",
)
@click.option(
    "--family",
    type=click.Choice(["4", "6"]),
    default=None,
    help="Only this IP family (both by default).",
)
@cell_options
def render(
    containers: str,
    policies: str,
    rev: str | None,
    cell: str,
    fmt: str,
    family: str | None,
    agent_config: str | None,
    underlay: tuple[str, ...],
) -> None:
    """Compile the cell's plan and print it as a from-scratch transaction or JSON."""
    _, plan = cell_plan_or_exit(
        policies, rev, containers, cell, cell_settings_or_exit(agent_config, underlay)
    )
    if fmt == "json":
        click.echo(plan.to_json(), nl=False)
        return
    families = [int(family)] if family else [4, 6]
    for fam in families:
        if fmt == "nft":
            from reconciler.backends.nftables.render import render_cell as render_nft

            if len(families) > 1:
                click.echo(f"# nft -j -f - (table inet asgctl, IPv{fam})")
            click.echo(render_nft(plan, fam).text(), nl=False)
            continue
        if len(families) > 1:
            click.echo(f"# {'iptables' if fam == 4 else 'ip6tables'}-restore --noflush")
        named = [(f, fqdn, sid) for f, fqdn, sid in plan.name_sets() if f == fam]
        if named:
            from reconciler.core.cellplan import name_set
            from reconciler.fqdn.kernelsets import ipset_create

            click.echo("# name sets: ipset restore -exist; the agent fills them from DNS answers")
            for f, fqdn, sid in named:
                click.echo(f"# {ipset_create(name_set(f, sid), f)}  ({fqdn})")
        click.echo(render_text(plan, fam), nl=False)


@main.command("explain")
@click.option(
    "--containers",
    "stores",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A cell's container metadata store (CF's store.json); repeat it for several cells, "
    "each named as `plan --inventory` names it (cells/cell-1/store.json -> cell-1).",
)
@policies_option
@rev_option
@click.option("--app", default=None, help="App GUID or org/space/app.")
@click.option("--container", "handle", default=None, help="Container handle.")
@click.option(
    "--lifecycle",
    type=click.Choice(LIFECYCLES),
    default="all",
    show_default=True,
    help="Only these containers: running (app instances and tasks), staging, or task.",
)
@click.option(
    "--to",
    "to",
    required=True,
    help="IP[:PORT][/PROTO] or NAME[:PORT][/PROTO]: 198.51.100.7:443/tcp, db.example.com:5432.",
)
@click.option("--icmp-type", type=int, default=None)
@click.option("--icmp-code", type=int, default=None)
@format_option("text", "json")
@cell_options
def explain_cmd(
    stores: tuple[str, ...],
    policies: str,
    rev: str | None,
    app: str | None,
    handle: str | None,
    lifecycle: str,
    to: str,
    icmp_type: int | None,
    icmp_code: int | None,
    fmt: str,
    agent_config: str | None,
    underlay: tuple[str, ...],
) -> None:
    """Would this app's containers be allowed to reach IP:PORT, and by which rules?

    One verdict per container of the app (or with the handle) on every cell given: running
    instances, tasks and staging containers get different groups.  JSON is a list of them.
    Exit 0 when every container is allowed, 3 when any is denied or would-deny (an
    audited container: enforcing would reject it), 1 on error.
    """
    from reconciler.sources.inventories import StoreFiles

    if (app is None) == (handle is None):
        raise click.UsageError("give exactly one of --app or --container")
    try:
        endpoint = parse_endpoint(to, icmp_type, icmp_code)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None
    settings = cell_settings_or_exit(agent_config, underlay)
    if len(stores) == 1:
        # One store is one unnamed cell: a cell's own store path names no cell
        # (/var/vcap/data/container-metadata/store.json), so none is made up for it.
        policy, plan = cell_plan_or_exit(policies, rev, stores[0], "", settings)
        plans = [plan]
    else:
        policy = policy_or_exit(policies, rev)
        try:
            cells = StoreFiles(stores).cells()
            plans = [compile_cell(policy, c.containers, c.cell, settings) for c in cells]
        except (InventoryError, PlanError) as exc:
            fail(str(exc))
    app_id = None
    if app is not None:
        app_id = policy.directory.resolve_app(app)
        if app_id is None:
            fail(f"app {app!r} is not in the directory")
    found = find_containers(plans, handle=handle, app=app_id, lifecycle=lifecycle)
    if not found:  # named as typed: the GUID an org/space/app resolved to means nothing here
        which = "" if lifecycle == "all" else f"{lifecycle} "
        if handle is not None:
            kind = f" as a {lifecycle} container" if which else ""
            fail(f"container {handle!r} is not in the inventory{kind}")
        fail(f"app {app!r} has no {which}container in the inventory")
    verdicts = [(plan.cell, explain(policy, plan, cp, endpoint)) for plan, cp in found]
    if fmt == "json":
        docs = [
            {"cell": cell, "lifecycle": d.container.lifecycle, "workload": d.container.workload}
            | d.to_dict()
            for cell, d in verdicts
        ]
        click.echo(json.dumps(docs, indent=2))
    else:
        from reconciler.escape import log_text

        blocks = []
        for cell, d in verdicts:
            app_id = d.container.app_id
            name = policy.directory.app_path(app_id) if app_id else ""
            where = f"on cell {cell}:\n" if cell else ""
            blocks.append(where + d.text(name))
        if len(verdicts) > 1:
            allowed = sum(d.allowed for _, d in verdicts)
            audited = sum(d.verdict == "would-deny" for _, d in verdicts)
            also = f", {audited} would-deny (audited)" if audited else ""
            denied = len(verdicts) - allowed - audited
            blocks.append(f"{len(verdicts)} containers: {allowed} allowed, {denied} denied{also}\n")
        click.echo(log_text("\n".join(blocks)), nl=False)
    sys.exit(0 if all(d.allowed for _, d in verdicts) else 3)


def _report_converge(result: ConvergeResult, fmt: str, transactions: bool) -> None:
    """The summary on stdout (text or JSON), each family's error once on stderr, and the exit
    code `apply` and `uninstall` share: 0 in sync, 2 changed (or would be), 1 error."""
    from reconciler.backends.summary import format_text

    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_text(result, transactions=transactions), nl=False)
    for fam in result.families:
        if fam.error is not None:
            click.echo(f"error: ipv{fam.family}: {fam.error}", err=True)
    sys.exit(1 if not result.ok else 0 if result.in_sync else 2)


@main.command("apply")
@containers_option
@policies_option
@rev_option
@click.option("--cell", default="", help="Cell name recorded in the plan.")
@backend_option("Dataplane backend (nftables: table inet asgctl; --variant does not apply).")
@variant_option()
@click.option("--dry-run", is_flag=True, help="Print the transactions; change nothing.")
@click.option(
    "--report-only",
    is_flag=True,
    help="Audit: report how the kernel drifted from the plan; change nothing.",
)
@format_option("text", "json")
@cell_options
def apply_cmd(
    containers: str,
    policies: str,
    rev: str | None,
    cell: str,
    backend_name: str,
    variant: str,
    dry_run: bool,
    report_only: bool,
    fmt: str,
    agent_config: str | None,
    underlay: tuple[str, ...],
) -> None:
    """Converge this host's firewall (current network namespace) to the cell's plan, once.

    Exit 0 when already in sync (nothing sent), 2 when something changed (or would, with
    --dry-run or --report-only), 1 on error (invalid policy or store: nothing touched).
    The summary goes to stdout; each error, once, to stderr.
    """
    from dataclasses import replace

    from reconciler.backends import DataplaneError, Runner, converge, open_backend
    from reconciler.backends.kernel.underlay import detect_underlay

    settings = cell_settings_or_exit(agent_config, underlay, backend_name)
    if not settings.underlay4:  # on the cell itself: the underlay its default routes use
        try:
            found = detect_underlay(Runner())
        except DataplaneError as exc:
            fail(str(exc))
        settings = replace(settings, underlay4=found[4], underlay6=found[6])
    _, plan = cell_plan_or_exit(policies, rev, containers, cell, settings)
    try:
        backend = open_backend(backend_name, variant)
    except DataplaneError as exc:
        fail(str(exc))
    mode: Mode = "dry-run" if dry_run else "report-only" if report_only else "apply"
    # A report-only run audits the host against the plan it is given: whatever the kernel
    # holds otherwise is drift (to --dry-run, with no last plan, it is a change to send).
    result = converge(backend, plan, plan if mode == "report-only" else None, mode=mode)
    _report_converge(result, fmt, dry_run)


@main.command("uninstall")
@backend_option("The backend that installed the rules.")
@variant_option()
@click.option("--dry-run", is_flag=True, help="Print the transactions; change nothing.")
@format_option("text", "json")
def uninstall_cmd(backend_name: str, variant: str, dry_run: bool, fmt: str) -> None:
    """Remove every rule asgctl installed on this host (current network namespace), and only those.

    The way back to what enforced before (CF's own chains on a Diego cell): stop the agent
    first, then run this.  Chains are ours by the same proof as in every apply (ownership
    marker, the previous release's shape), so the host's chains, even ones named like ours,
    stay.  Exit 0 when nothing of ours was there, 2 when something was removed (or would be,
    with --dry-run), 1 on error (nothing half-removed: one transaction per family).
    The DNS interception's hold (mangle chains ASG-DNSQ/ASG-DNSL, ownership-marked) goes
    too: left without an agent it would drop every answer to the containers.
    """
    from reconciler.backends import DataplaneError, open_backend, remove

    try:
        backend = open_backend(backend_name, variant)
    except DataplaneError as exc:
        fail(str(exc))
    result = remove(backend, mode="dry-run" if dry_run else "apply")
    if backend_name != "nftables" and not dry_run and result.ok:
        # Grants by name: the ipsets our rules referenced (nftables' sets went with its table).
        from reconciler.backends import Runner
        from reconciler.fqdn.kernelsets import IpsetWriter

        with contextlib.suppress(DataplaneError):  # no ipset on this host: none of ours
            IpsetWriter(Runner()).prune(())
    if not dry_run and result.ok:
        from reconciler.backends import Runner
        from reconciler.fqdn.hold import DnsHold, variant_for

        hold_variant = variant_for(backend_name, str(getattr(backend, "variant", variant)))
        try:
            if DnsHold(Runner(), hold_variant, 0).remove():
                click.echo(
                    "removed the DNS interception's hold (mangle ASG-DNSQ, ASG-DNSL)", err=True
                )
        except DataplaneError as exc:
            fail(str(exc))
    _report_converge(result, fmt, dry_run)


@main.command("plan")
@click.option(
    "--base",
    default=None,
    help="Base revision (e.g. origin/main or a SHA).  Without it, the head is compared with "
    "what each cell enforces: the applied revision its status/<cell> branch reports (cells "
    "on the same revision are planned together).",
)
@click.option("--head", "head", default="HEAD", show_default=True, help="Head revision.")
@policies_option
@click.option(
    "--inventory",
    "inventory",
    multiple=True,
    help="`status` (the cells' status/<cell> branches; the default when there are any), "
    "`directory` (a synthetic cell: one container per app and lifecycle), or store.json "
    "files or folders of them (repeat the option; a folder means every store.json below it "
    "and every *.json directly in it).  A file's cell is its folder's name when "
    "it is called store.json (cells/cell-1/store.json -> cell-1), else its stem "
    "(cell-1.json -> cell-1).",
)
@click.option(
    "--agent-config",
    default=None,
    type=click.Path(dir_okay=False),
    help="Judge the mass-revoke gate with this agent settings file's mass-revoke-threshold, "
    "-min and -trailer, for cells whose status branch does not report them.  "
    "[default: the agent's defaults]",
)
@status_repo_options
@click.option(
    "--status-cache",
    default=None,
    help="With --status-url: keep the fetched status branches (and each file's parse) in "
    "this folder between runs, so a run fetches and parses only what changed.",
)
@format_option("text", "markdown", "json")
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when nothing changes, 2 when something does, 1 on error.",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Plan only shard I of N of the inventory (a cell's shard is a hash of its name) and "
    "print the partial result as JSON, for `--merge`.  Exit 0 when it is written.",
)
@click.option(
    "--merge",
    "merge",
    is_flag=True,
    help="Merge the partial results given as arguments (one per shard, each exactly once, of "
    "one plan) into the report of the whole inventory.  With an explicit --head, also "
    "refuse partials that planned another head.",
)
@click.option(
    "--save",
    "saves",
    multiple=True,
    metavar="FORMAT=PATH",
    help="Also write the report as FORMAT (text, markdown or json) to PATH, from this same "
    "run (repeatable): a merge job gets every format for one merge.",
)
@click.argument("parts", nargs=-1, type=click.Path(dir_okay=False))
@click.pass_context
def plan_cmd(
    ctx: click.Context,
    base: str | None,
    head: str,
    policies: str,
    inventory: tuple[str, ...],
    agent_config: str | None,
    status_url: str | None,
    status_shards: int,
    status_cache: str | None,
    fmt: str,
    detailed_exitcode: bool,
    shard: str | None,
    merge: bool,
    saves: tuple[str, ...],
    parts: tuple[str, ...],
) -> None:
    """What a change does: who gains and loses access, the iptables chains that change, and
    the cells whose mass-revoke gate would refuse it (with the trailer that lets it through).

    Both revisions are read from git without a checkout and compiled for every cell of the
    inventory; without --base, every revision the cells enforce is (and a --base that is not
    what they enforce, or does not validate, is said so).  Exit 0, or 1 on error (a head
    that does not validate, an unreadable inventory, a cell over the rule limit); with
    --detailed-exitcode, 2 when there are changes.

    A large fleet is planned by several jobs: `--shard I/N` in each, then `--merge PART...`
    with every partial, which prints the report one plan would (README: sharded plans).
    """
    from reconciler.ci.plan import run_plan
    from reconciler.ci.report import render

    outputs = _plan_saves(saves)
    if merge:
        report = _merged_plan(ctx, head, policies, parts)
        _save_plan(report, outputs)
        click.echo(render(report, fmt), nl=False)
        sys.exit(report.exit_code(detailed_exitcode))
    if parts:
        fail("plan: partial results are given only with --merge")
    gate = gate_settings_or_exit(agent_config)
    status = None
    if status_url is not None:
        from reconciler.sources.inventories import StatusBranches

        repos = status_repos_or_exit(status_url, status_shards, status_url)
        status = StatusBranches(".", remote=repos, cache=status_cache)
    elif status_shards != 1 or status_cache is not None:
        raise click.UsageError("--status-shards and --status-cache go with --status-url")
    part = None
    if shard is not None:
        from reconciler.ci.partition import Shard, ShardError

        if ctx.get_parameter_source("fmt") != click.core.ParameterSource.DEFAULT:
            fail("plan --shard writes its partial result as JSON; --format is for --merge")
        try:
            part = Shard.parse(shard)
        except ShardError as exc:
            fail(str(exc))
    report = run_plan(
        policies, base, head, inventory, gate, agent_config or "", shard=part, status=status
    )
    if part is not None:
        from reconciler.ci.partial import dump_partial

        if outputs:
            fail("plan --shard writes its partial result as JSON; --save is for the report")
        click.echo(dump_partial(report), nl=False)
        sys.exit(0)
    _save_plan(report, outputs)
    click.echo(render(report, fmt), nl=False)
    sys.exit(report.exit_code(detailed_exitcode))


PLAN_FORMATS = ("text", "markdown", "json")


def _plan_saves(saves: tuple[str, ...]) -> list[tuple[str, Path]]:
    """`--save FORMAT=PATH` values, checked before any work is done."""
    out = []
    for item in saves:
        fmt, sep, path = item.partition("=")
        if not sep or fmt not in PLAN_FORMATS or not path:
            raise click.BadParameter(
                f"{item!r}: expected FORMAT=PATH, FORMAT one of {', '.join(PLAN_FORMATS)}",
                param_hint="--save",
            )
        out.append((fmt, Path(path)))
    return out


def _save_plan(report: Any, outputs: list[tuple[str, Path]]) -> None:
    """Write the report in each `--save` format (whole files: a reader never sees half)."""
    from reconciler.atomicfile import atomic_write_text
    from reconciler.ci.report import render

    for fmt, path in outputs:
        try:
            atomic_write_text(path, render(report, fmt), mode=0o644)
        except OSError as exc:
            fail(f"plan --save {fmt}={path}: {exc.strerror or exc}")


def _merged_plan(ctx: click.Context, head: str, policies: str, parts: tuple[str, ...]) -> Any:
    """`plan --merge`: the partials as one report, or exit 1 naming what is wrong."""
    from reconciler.ci.partial import PartialError, merge_partials, read_partials
    from reconciler.ci.plan import RevisionError, resolve_revision, revision_loader
    from reconciler.sources.gitio import FULL_SHA

    for name in ("base", "inventory", "agent_config", "shard"):
        if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            fail(f"plan --merge: --{name.replace('_', '-')} belongs to the --shard runs")
    if not parts:
        fail("plan --merge: give the partial results (one file per shard)")
    head_sha = None
    if ctx.get_parameter_source("head") != click.core.ParameterSource.DEFAULT:
        # A full commit id is taken as it is (the merge job needs no checkout for it).
        full = FULL_SHA.fullmatch(head) is not None
        head_sha = head if full else resolve_revision(locate(policies).top, head)
        if head_sha is None:
            fail(f"plan --merge: unknown revision {head!r} (give the full commit id)")
    # The partials decode into a few million plain objects that live until the process
    # ends: the cyclic collector is kept off while they are built and then told to leave
    # them be (at 10,000 cells its passes over them were a third of the read).
    gc.disable()
    try:
        partials = read_partials(parts)
    except PartialError as exc:
        fail(f"plan --merge: {exc}")
    finally:
        gc.freeze()
        gc.enable()
    try:
        return merge_partials(partials, revision_loader(policies), head_sha)
    except (PartialError, RevisionError) as exc:
        fail(f"plan --merge: {exc}")


@main.command("test")
@click.argument("path", default="policies", type=click.Path())
@rev_option
@format_option("text", "json", "github")
@click.option("-v", "--verbose", is_flag=True, help="Also list the tests that pass.")
def test_cmd(path: str, rev: str | None, fmt: str, verbose: bool) -> None:
    """Check the repo's PolicyTest assertions (e.g. policies/tests/*.yaml) against the plan.

    Exit 0 when every test passes, 1 on any failure or invalid policy.
    """
    from reconciler.core.policytest import render_results, run_tests

    prefix = locate(path).prefix
    policy = policy_or_exit(path, rev, prefix if fmt == "github" else None)
    results = run_tests(policy)
    click.echo(render_results(results, fmt, prefix, verbose), nl=False)
    sys.exit(0 if all(r.passed for r in results) else 1)


main.add_command(agent_cmd)
main.add_command(status_cmd)
main.add_command(notify_cmd)
main.add_command(cf_group)
main.add_command(flows_cmd)
main.add_command(suggest_cmd)
