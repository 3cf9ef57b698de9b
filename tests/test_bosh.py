"""The BOSH job renders into settings the agent accepts, for the property sets operators use.

CF operators deploy with BOSH, so `deploy/bosh/` ships an `asgctl-agent` job and an ops file
for cf-deployment's `diego-cell`.  A template that renders a key the agent does not know, a
value it cannot parse, or forgets a setting would only show on a real deploy; here each
template is rendered with Ruby's ERB the way the director evaluates it (`tests/bosh_render.rb`)
and the result is loaded with the agent's own settings loader.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.agent.config import AgentConfig, ConfigError, build_config, load_file
from reconciler.core.cellplan import DenyNetworks, RateLimit

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "deploy" / "bosh"
JOB = RELEASE / "jobs" / "asgctl-agent"
RENDERER = Path(__file__).with_name("bosh_render.rb")
INSTANCE = {"name": "diego-cell", "id": "5f2c1d9e-8a7b-4c3d-9e0f-1a2b3c4d5e6f", "index": 0}
SOURCE = "ssh://git@git.example.internal/platform/egress-policy.git"

pytestmark = pytest.mark.requires("ruby")


def job_spec() -> dict[str, Any]:
    return yaml.safe_load((JOB / "spec").read_text())


def render(template: str, properties: dict[str, Any], tmp_path: Path) -> str:
    source = JOB / "templates" / template
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"properties": {"asgctl": properties}, "spec": INSTANCE}))
    done = subprocess.run(
        ["ruby", str(RENDERER), str(JOB / "spec"), str(source), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RenderError(done.stderr.strip())
    return done.stdout


class RenderError(Exception):
    """The director would have refused to render the template."""


def agent_config(properties: dict[str, Any], tmp_path: Path) -> AgentConfig:
    rendered = tmp_path / "agent.yml"
    rendered.write_text(render("agent.yml.erb", properties, tmp_path))
    return build_config(load_file(str(rendered)), {})


# Every agent setting, a manifest value unlike its default, and what the agent must read.
# A setting added to AgentConfig without a row here (and a property in the job spec and a
# line in agent.yml.erb) fails test_the_table_covers_every_agent_setting.
EVERY_SETTING: dict[str, tuple[str, Any, Any]] = {
    # field: (property, manifest value, what AgentConfig holds)
    "source": ("source", SOURCE, SOURCE),
    "cell": ("cell", "cell-az1-017", "cell-az1-017"),
    "containers": ("containers", "/var/vcap/data/cm/store.json", "/var/vcap/data/cm/store.json"),
    "branch": ("branch", "release", "release"),
    "policies_path": ("policies_path", "asg", "asg"),
    "interval": ("interval", "30s", 30.0),
    "jitter": ("jitter", "5%", 0.05),
    "mode": ("mode", "shadow", "shadow"),
    "backend": ("backend", "nftables", "nftables"),
    "variant": ("variant", "nft", "nft"),
    "state_dir": ("state_dir", "/var/vcap/store/asgctl", "/var/vcap/store/asgctl"),
    "fetch_depth": ("fetch_depth", 0, 0),
    "git_timeout": ("git_timeout", "20s", 20.0),
    "retry_base": ("retry_base", "1s", 1.0),
    "retry_cap": ("retry_cap", "45s", 45.0),
    "verify": ("verify", "signed", "signed"),
    "allowed_signers": (
        "allowed_signers",
        'ops@example.com namespaces="git" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample',
        "/var/vcap/jobs/asgctl-agent/config/allowed_signers",
    ),
    "gpg_keyring": (
        "gpg_keys",
        "-----BEGIN PGP PUBLIC KEY BLOCK-----\n...\n-----END PGP PUBLIC KEY BLOCK-----",
        "/var/vcap/jobs/asgctl-agent/config/trusted-keys.asc",
    ),
    "allow_rewind": ("allow_rewind", True, True),
    "mass_revoke_threshold": ("mass_revoke_threshold", "40%", 0.4),
    "mass_revoke_min": ("mass_revoke_min", 20, 20),
    "mass_revoke_trailer": ("mass_revoke_trailer", "Fleet-Allow-Revoke", "Fleet-Allow-Revoke"),
    "emergency_trailer": ("emergency_trailer", "Fleet-Emergency", "Fleet-Emergency"),
    "policy_tests": ("policy_tests", "enforce", "enforce"),
    "heal_drift": ("heal_drift", False, False),
    "status_push": ("status_push", False, False),
    "status_branch_prefix": ("status_branch_prefix", "fleet-status/", "fleet-status/"),
    "status_url": (
        "status_url",
        "ssh://git@git.example.internal/platform/status-{shard}.git",
        "ssh://git@git.example.internal/platform/status-{shard}.git",
    ),
    "status_shards": ("status_shards", 8, 8),
    "heartbeat": ("heartbeat", "5m", 300.0),
    "status_min_interval": ("status_min_interval", "2s", 2.0),
    "metrics_listen": ("metrics_listen", "127.0.0.1:9999", "127.0.0.1:9999"),
    "metrics_textfile": ("metrics_textfile", "/var/vcap/data/m.prom", "/var/vcap/data/m.prom"),
    "listen_webhook": ("listen_webhook", "0.0.0.0:9292", "0.0.0.0:9292"),
    "webhook_min_interval": ("webhook_min_interval", "30s", 30.0),
    "watch": ("watch", "poll", "poll"),
    "watch_poll": ("watch_poll", "200ms", 0.2),
    "underlay_interface": ("underlay_interface", ["eth1"], ("eth1",)),
    "deny_networks": (
        "deny_networks",
        {"always": ["169.254.169.254/32"], "running": ["10.0.0.0/8"], "staging": []},
        DenyNetworks(("169.254.169.254/32",), ("10.0.0.0/8",), ()),
    ),
    "outbound_connections": (
        "outbound_connections",
        {"limit": True, "burst": 500, "rate_per_sec": 50, "logging": True},
        RateLimit(True, 500, 50, True),
    ),
    "fqdn_min_ttl": ("fqdn_min_ttl", 2, 2),
    "fqdn_max_ttl": ("fqdn_max_ttl", 600, 600),
    "fqdn_max_ips": ("fqdn_max_ips", 64, 64),
    "fqdn_resolvers": ("fqdn_resolvers", ["169.254.0.2"], ("169.254.0.2",)),
    "fqdn_intercept": ("fqdn_intercept", False, False),
    "fqdn_intercept_queue": ("fqdn_intercept_queue", 153, 153),
    "flow_log": ("flow_log", "nflog", "nflog"),
    "flow_log_group": ("flow_log_group", 42, 42),
    "flow_log_rate": ("flow_log_rate", 200, 200),
    "flow_log_window": ("flow_log_window", "5s", 5.0),
    "flow_log_max_aggregates": ("flow_log_max_aggregates", 500, 500),
    "flow_log_max_bytes": ("flow_log_max_bytes", 1048576, 1048576),
    "flow_log_stdout": ("flow_log_stdout", True, True),
    "flow_unused_after": ("flow_unused_after", "3d", 259200.0),
}
# Not offered by the job: monit supervises a long-lived agent (no `once`), and a cell
# enforces in its own network namespace (`netns` is for the lab and tests).
NOT_OFFERED = {"once", "netns"}
# Offered another way: the receiver's secret reaches the agent in its environment (bpm.yml),
# never as a file in the job's config folder.
OFFERED_OTHERWISE = {"webhook_secret_file": "webhook_secret"}
# Properties that are not agent settings: how the job reaches an ssh:// source.
JOB_ONLY = {"source_ssh_key", "source_known_hosts"}
# Where a Diego cell has a better default than the agent's own.
CELL_DEFAULTS = {
    "containers": "/var/vcap/data/container-metadata/store.json",
    "state_dir": "/var/vcap/data/asgctl-agent/state",
    "metrics_listen": "127.0.0.1:9465",
    "cell": f"diego-cell-{INSTANCE['id']}",
}


def test_the_table_covers_every_agent_setting() -> None:
    settings = {f.name for f in dataclasses.fields(AgentConfig)}
    assert set(EVERY_SETTING) == settings - NOT_OFFERED - set(OFFERED_OTHERWISE)


def test_the_job_spec_declares_a_property_for_every_setting() -> None:
    declared = set(job_spec()["properties"])
    expected = {f"asgctl.{prop}" for prop, _, _ in EVERY_SETTING.values()}
    others = {f"asgctl.{name}" for name in [*JOB_ONLY, *OFFERED_OTHERWISE.values()]}
    assert declared == expected | others
    assert all(d.get("description") for d in job_spec()["properties"].values())


def test_only_the_source_is_required_and_the_rest_are_the_agents_defaults(tmp_path: Path) -> None:
    cfg = agent_config({"source": SOURCE}, tmp_path)
    defaults = AgentConfig(source=SOURCE, cell="x", containers="x")
    for f in dataclasses.fields(AgentConfig):
        expected = CELL_DEFAULTS.get(f.name, getattr(defaults, f.name))
        assert getattr(cfg, f.name) == expected, f.name


def test_every_property_reaches_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    properties = {prop: value for prop, value, _ in EVERY_SETTING.values()}
    secret = render_bpm_env(properties | {"webhook_secret": 's3cr"t'}, tmp_path)
    assert secret["ASGCTL_WEBHOOK_SECRET"] == 's3cr"t'
    monkeypatch.setenv("ASGCTL_WEBHOOK_SECRET", secret["ASGCTL_WEBHOOK_SECRET"])
    cfg = agent_config(properties, tmp_path)
    for name, (_, _, expected) in EVERY_SETTING.items():
        assert getattr(cfg, name) == expected, name


def render_bpm_env(properties: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    bpm = yaml.safe_load(render("bpm.yml.erb", properties, tmp_path))
    env: dict[str, str] = bpm["processes"][0]["env"]
    return env


def test_the_webhook_secret_is_only_in_the_agents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASGCTL_WEBHOOK_SECRET", raising=False)
    props = {"source": SOURCE, "listen_webhook": "0.0.0.0:9292", "webhook_secret": "s3cret"}
    assert render_bpm_env(props, tmp_path)["ASGCTL_WEBHOOK_SECRET"] == "s3cret"
    assert "s3cret" not in render("agent.yml.erb", props, tmp_path)
    assert "ASGCTL_WEBHOOK_SECRET" not in render_bpm_env({"source": SOURCE}, tmp_path)
    with pytest.raises(ConfigError, match="listen-webhook needs webhook-secret-file"):
        agent_config({"source": SOURCE, "listen_webhook": "0.0.0.0:9292"}, tmp_path)


def test_the_trust_files_hold_what_the_manifest_says(tmp_path: Path) -> None:
    signers = EVERY_SETTING["allowed_signers"][1]
    assert render("allowed_signers.erb", {"allowed_signers": signers}, tmp_path) == signers + "\n"
    assert render("allowed_signers.erb", {}, tmp_path) == "\n"


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({}, "source: required"),
        ({"source": SOURCE, "interval": "soon"}, "interval: expected a duration"),
        ({"source": SOURCE, "verify": "signed"}, "verify: signed needs allowed-signers"),
        ({"source": SOURCE, "backend": "ebpf"}, "backend: 'ebpf' is not one of"),
        ({"source": SOURCE, "cell": "cell/../x"}, "cell: 'cell/../x' must match"),
        ({"source": SOURCE, "status_branch_prefix": ""}, "branch"),
    ],
)
def test_a_bad_manifest_is_refused_by_the_agents_loader_naming_the_setting(
    tmp_path: Path, properties: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        agent_config(properties, tmp_path)


def test_bpm_runs_the_agent_on_the_rendered_settings_with_the_cells_store(tmp_path: Path) -> None:
    bpm = yaml.safe_load(render("bpm.yml.erb", {"source": SOURCE}, tmp_path))
    (process,) = bpm["processes"]
    assert process["name"] == "asgctl-agent"
    assert process["executable"] == "/var/vcap/packages/asgctl/bin/asgctl"
    target = job_spec()["templates"]["agent.yml.erb"]
    assert process["args"] == ["agent", "--config", f"/var/vcap/jobs/asgctl-agent/{target}"]
    assert {"path": "/var/vcap/data/container-metadata", "writable": False} in process[
        "additional_volumes"
    ]
    lock = {"path": "/run/xtables.lock", "writable": True, "mount_only": True}
    assert lock in process["unsafe"]["unrestricted_volumes"]
    assert process["env"]["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes"


def test_an_ssh_source_uses_the_deploy_key_and_pinned_host_keys(tmp_path: Path) -> None:
    props = {"source": SOURCE, "source_ssh_key": "KEY", "source_known_hosts": "git ssh-ed25519 A"}
    ssh = yaml.safe_load(render("bpm.yml.erb", props, tmp_path))["processes"][0]["env"]
    command = ssh["GIT_SSH_COMMAND"]
    assert "-i /var/vcap/data/asgctl-agent/deploy_key" in command
    assert "StrictHostKeyChecking=yes" in command
    assert "UserKnownHostsFile=/var/vcap/jobs/asgctl-agent/config/known_hosts" in command
    script = render("pre-start.erb", props, tmp_path)
    assert "install -m 0600 /var/vcap/jobs/asgctl-agent/config/deploy_key" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_a_deploy_key_without_pinned_host_keys_does_not_render(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="source_known_hosts is required"):
        render("pre-start.erb", {"source": SOURCE, "source_ssh_key": "KEY"}, tmp_path)


def test_a_template_cannot_read_an_undeclared_property(tmp_path: Path) -> None:
    """The renderer is as strict as the director, so a typo in a template fails here."""
    bad = tmp_path / "bad.erb"
    bad.write_text("<%= p('asgctl.intervall') %>")
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"properties": {"asgctl": {}}, "spec": INSTANCE}))
    done = subprocess.run(
        ["ruby", str(RENDERER), str(JOB / "spec"), str(bad), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "asgctl.intervall" in done.stderr and "not declared" in done.stderr


def test_every_template_the_spec_names_exists_and_renders(tmp_path: Path) -> None:
    props = {"source": SOURCE, "source_ssh_key": "KEY", "source_known_hosts": "git ssh-ed25519 A"}
    for template in job_spec()["templates"]:
        assert (JOB / "templates" / template).is_file(), template
        render(template, props, tmp_path)


def test_the_ops_file_adds_the_job_to_diego_cells_with_the_cf_store(tmp_path: Path) -> None:
    ops = yaml.safe_load((RELEASE / "operations" / "add-asgctl-agent.yml").read_text())
    job = next(op for op in ops if "/jobs/name=asgctl-agent" in op["path"])
    assert job["path"].startswith("/instance_groups/name=diego-cell/")
    assert job["value"]["release"] == "asgctl"
    props = job["value"]["properties"]["asgctl"]
    assert props["containers"] == "/var/vcap/data/container-metadata/store.json"
    declared = set(job_spec()["properties"])
    assert {f"asgctl.{name}" for name in props} <= declared
    # With the variables filled in, what the ops file sets renders into a config the agent takes.
    filled = {k: v for k, v in props.items() if not str(v).startswith("((")} | {"source": SOURCE}
    assert agent_config(filled, tmp_path).containers == props["containers"]
    assert any(op["path"] == "/releases/name=asgctl?" for op in ops)


def test_the_package_installs_the_product_not_the_lab() -> None:
    spec = yaml.safe_load((RELEASE / "packages" / "asgctl" / "spec").read_text())
    assert spec["dependencies"] == ["python3"]
    packaging = (RELEASE / "packages" / "asgctl" / "packaging").read_text()
    assert "--no-index" in packaging and "asgctl-lab" not in packaging
    assert "asgctl_lab" not in packaging
