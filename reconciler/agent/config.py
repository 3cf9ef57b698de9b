"""The agent's settings: defaults, then a YAML file (`--config`), then command-line flags.

Config file keys are the long flag names without `--` (`policies-path: policies`), so what a
flag does and what a key does can never drift apart, and "the flag overrides the file" is a
plain dictionary merge.  Unknown keys are an error: a misspelt `alow-rewind: true` silently
ignored would be a safety setting that is not in force.  Two keys are mappings and live in the
file only, as CF spells them: `deny-networks` (`always`, `running`, `staging`) and
`outbound-connections` (`limit`, `burst`, `rate-per-sec`, `logging`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from reconciler.backends import BACKENDS, VARIANT_CHOICES
from reconciler.core.cellplan import (
    DEFAULT_GATE,
    FLOW_LOG_GROUP,
    FLOW_LOG_MODES,
    FLOW_LOG_RATE,
    LIFECYCLES,
    CellSettings,
    DenyNetworks,
    FlowLog,
    GateSettings,
    RateLimit,
    check_interface_name,
    check_network,
)
from reconciler.fqdn.keeper import (
    DEFAULT_INTERCEPT_QUEUE,
    DEFAULT_MAX_IPS,
    DEFAULT_MAX_TTL,
    DEFAULT_MIN_TTL,
    FqdnSettings,
)
from reconciler.fqdn.service import parse_server
from reconciler.sources.gitio import redact_url as redact_url  # the one spelling, re-exported
from reconciler.status.branch import STATUS_PREFIX, branch_for
from reconciler.status.fetch import StatusRepos

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")
VERIFY_MODES = ("none", "signed")
WATCH_MODES = ("auto", "inotify", "poll")
POLICY_TEST_MODES = ("enforce", "warn", "off")
"""`policy-tests`: refuse a head whose PolicyTests fail, apply it and report, or skip them."""


class ConfigError(ValueError):
    """The settings cannot run an agent; the message names the key."""


def parse_duration(value: object, key: str) -> float:
    """`60s`, `1.5m`, `500ms`, `2h` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 60s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if m is None:
            raise ConfigError(f"{key}: expected a duration such as 60s or 500ms, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative")
    return seconds


def parse_share(value: object, key: str) -> float:
    """`10%` or `0.1` -> 0.1; must lie in [0, 1]."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a share such as 10%, got {value!r}")
    text = str(value).strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a share such as 10% or 0.1, got {value!r}") from None
    if not 0 <= share <= 1:
        raise ConfigError(f"{key}: must be between 0% and 100%")
    return share


def parse_whole(value: object, key: str, meaning: str = "") -> int:
    """A whole number >= 0 (flags arrive as int, click converts them)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: expected a whole number >= 0{meaning}, got {value!r}")
    return value


def _bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent process runs with; built by `build_config`, never mutated."""

    source: str
    cell: str
    containers: str
    branch: str = "main"
    policies_path: str = "policies"
    interval: float = 60.0
    jitter: float = 0.1
    backend: str = "iptables"
    variant: str = "auto"
    netns: str | None = None
    """Run the dataplane tools in this network namespace (the lab and tests; a real cell
    leaves it unset and enforces in the agent's own namespace)."""
    once: bool = False
    state_dir: str = "/var/lib/asgctl"
    fetch_depth: int = 1
    """Depth of the first fetch into an empty cache (0 = full history).  Later fetches are
    incremental and complete, so every commit since the first one is present for the
    ancestry check; a rewind fetches what it needs."""
    git_timeout: float = 60.0
    retry_base: float = 2.0
    retry_cap: float = 0.0
    """Longest wait between retries after failures; 0 means the interval."""
    verify: str = "none"
    allowed_signers: str | None = None
    gpg_keyring: str | None = None
    allow_rewind: bool = False
    mass_revoke_threshold: float = DEFAULT_GATE.threshold
    mass_revoke_min: int = DEFAULT_GATE.minimum
    """Net container-rule pairs a plan must also take away for the share to hold it back
    (`reconciler.core.gate`); a cell emptied of access is held back below it too."""
    mass_revoke_trailer: str = DEFAULT_GATE.trailer
    emergency_trailer: str = "Asgctl-Emergency"
    """A head carrying `<this>: true` is applied inside a deny window (or outside every allow
    window) of the repository's Rollout; it never skips a pause or a wave."""
    heal_drift: bool = True
    policy_tests: str = "warn"
    """The repository's PolicyTest documents, run once per new head: `enforce` refuses a head
    with a failing test (PolicyTestsFailed), `warn` applies it and reports the failures."""
    status_push: bool = True
    status_branch_prefix: str = STATUS_PREFIX
    status_url: str | None = None
    """The repository status is pushed to (unset: the policy repository, `source`); a
    `{shard}` in it is the cell's shard of `status-shards` (`branch.shard_of`).  Credentials
    are as the source's: in the URL (hidden in status and logs) or the SSH key."""
    status_shards: int = 1
    """Status repositories the fleet is spread over; every reader is given the same two."""
    heartbeat: float = 600.0
    status_min_interval: float = 1.0
    """Pushes closer together than this are merged into one (bursts of container changes)."""
    metrics_listen: str | None = None
    """`127.0.0.1:9465` serves Prometheus text on that address; unset or empty, no server."""
    metrics_textfile: str | None = None
    listen_webhook: str | None = None
    """`0.0.0.0:9292` accepts signed push notifications there and syncs at once
    (`reconciler.agent.webhook`); unset or empty, no receiver."""
    webhook_secret_file: str | None = None
    """The receiver's HMAC secret; unset, $ASGCTL_WEBHOOK_SECRET."""
    webhook_min_interval: float = 10.0
    """At most one webhook-triggered sync this often (more are coalesced or answered 429)."""
    watch: str = "auto"
    watch_poll: float = 0.1
    underlay_interface: tuple[str, ...] = ()
    """Interfaces through which containers' egress leaves the cell; the only traffic judged.
    Empty: the interfaces of the default routes in the namespace enforced, per family."""
    deny_networks: DenyNetworks = field(default_factory=DenyNetworks)
    outbound_connections: RateLimit = field(default_factory=RateLimit)
    mode: str = "enforce"
    """`enforce` converges the kernel; `shadow` writes nothing to it and, every cycle, compares
    the plan with what CF's own chains allow each container (`reconciler.agent.shadow`)."""
    fqdn_min_ttl: int = DEFAULT_MIN_TTL
    """Grants by name: the shortest a resolved address is kept (seconds), whatever its TTL."""
    fqdn_max_ttl: int = DEFAULT_MAX_TTL
    """The longest an address is kept without a fresh answer (seconds)."""
    fqdn_max_ips: int = DEFAULT_MAX_IPS
    """Addresses per name and family at most (a metric counts answers that hit it)."""
    fqdn_resolvers: tuple[str, ...] = ()
    """DNS servers the agent asks (`addr` or `addr:port`); empty: the cell's resolv.conf.
    They are also the trusted resolvers whose answers to containers are intercepted."""
    fqdn_intercept: bool = True
    """Learn from the DNS answers containers receive, before they receive them (NFQUEUE,
    fail closed): a container's first connection to a name it resolved works."""
    fqdn_intercept_queue: int = DEFAULT_INTERCEPT_QUEUE
    """The NFQUEUE number holding answers, and the NFLOG group copying queries."""

    def fqdn_settings(self) -> FqdnSettings:
        return FqdnSettings(
            self.fqdn_min_ttl,
            self.fqdn_max_ttl,
            self.fqdn_max_ips,
            self.fqdn_resolvers,
            intercept=self.fqdn_intercept,
            intercept_queue=self.fqdn_intercept_queue,
        )

    flow_log: str = "log"
    """Deny and `log: true` verdicts: `log` (default) to the kernel log (LOG, 1/s), which
    keeps logging whether or not an agent runs; `nflog` to netlink group `flow-log-group`,
    which this agent reads into flow records (`reconciler.flows`)."""
    flow_log_group: int = FLOW_LOG_GROUP
    flow_log_rate: int = FLOW_LOG_RATE
    """NFLOG entries per second per container chain the kernel sends at most."""
    flow_log_window: float = 10.0
    """Packets are aggregated per (container, destination, port, protocol, verdict, rule)
    over this window; one record per aggregate."""
    flow_log_max_aggregates: int = 10_000
    """Distinct aggregates per window; packets of further ones are dropped and counted."""
    flow_log_max_bytes: int = 16 * 1024 * 1024
    """flows.jsonl is rotated (to flows.jsonl.1, .2) when a write would pass this size."""
    flow_log_stdout: bool = False
    """Also print every flow record on the agent's stdout."""
    flow_unused_after: float = 7 * 86400.0
    """`log: true` rules with no flow for this long are reported as unused in status."""

    def cell_settings(self, detected: dict[int, tuple[str, ...]] | None = None) -> CellSettings:
        """What the plan renders besides policy: the underlay (configured, else `detected`
        per family), the deny networks and the connection limit."""
        found = detected or {}
        v4 = self.underlay_interface or found.get(4, ())
        v6 = self.underlay_interface or found.get(6, ())
        return CellSettings(
            v4, v6, self.deny_networks, self.outbound_connections, self.flow_log_settings
        )

    @property
    def flow_log_settings(self) -> FlowLog:
        return FlowLog(self.flow_log, self.flow_log_group, self.flow_log_rate)

    @property
    def gate(self) -> GateSettings:
        """The mass-revoke gate's settings, as the agent and the CI plan both judge with them."""
        return GateSettings(
            self.mass_revoke_threshold, self.mass_revoke_min, self.mass_revoke_trailer
        )

    @property
    def status_branch(self) -> str:
        return branch_for(self.cell, self.status_branch_prefix)

    def status_repos(self) -> StatusRepos:
        """Where the fleet's status branches are: this cell pushes to `url_for(cell)`, the
        waves read them all."""
        return StatusRepos(
            self.status_url or self.source, self.status_shards, self.status_branch_prefix
        )

    @property
    def effective_retry_cap(self) -> float:
        return self.retry_cap if self.retry_cap > 0 else max(self.interval, self.retry_base)

    def revision(self, sha: str) -> str:
        """Flux's revision spelling: `main@sha1:<sha>`."""
        return f"{self.branch}@sha1:{sha}"

    def public(self) -> dict[str, Any]:
        """The settings worth showing in status: no paths to keys, source URL without secrets."""
        return {
            "url": redact_url(self.source),
            "branch": self.branch,
            "statusUrl": redact_url(self.status_url or self.source),
            "statusShards": self.status_shards,
            "policiesPath": self.policies_path,
            "interval": self.interval,
            "jitter": self.jitter,
            "backend": self.backend,
            "verify": self.verify,
            "allowRewind": self.allow_rewind,
            "massRevokeThreshold": self.mass_revoke_threshold,
            "massRevokeMin": self.mass_revoke_min,
            "massRevokeTrailer": self.mass_revoke_trailer,
            "healDrift": self.heal_drift,
            "policyTests": self.policy_tests,
            "underlayInterface": list(self.underlay_interface),
            "denyNetworks": self.deny_networks.to_dict(),
            "outboundConnections": self.outbound_connections.to_dict(),
            "mode": self.mode,
            "flowLog": self.flow_log_settings.to_dict(),
        }


_KEYS = {f.name.replace("_", "-"): f.name for f in fields(AgentConfig)}
_DURATIONS = {
    "interval",
    "git_timeout",
    "retry_base",
    "retry_cap",
    "heartbeat",
    "status_min_interval",
    "watch_poll",
    "webhook_min_interval",
    "flow_log_window",
    "flow_unused_after",
}
_SHARES = {"jitter", "mass_revoke_threshold"}
_BOOLS = {"once", "allow_rewind", "heal_drift", "status_push", "flow_log_stdout", "fqdn_intercept"}
_INTS = {
    "status_shards",
    "flow_log_group",
    "flow_log_rate",
    "flow_log_max_aggregates",
    "flow_log_max_bytes",
    "fqdn_intercept_queue",
}


def load_file(path: str) -> dict[str, Any]:
    """A config file's keys as given (kebab-case), checked only for being a mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def build_config(file_values: Mapping[str, Any], flags: Mapping[str, Any]) -> AgentConfig:
    """Merge file values and flags (flags win; None means "not given") into a checked config.

    Keys may be spelt kebab-case (as in the file) or snake_case (as click passes them).
    """
    merged: dict[str, Any] = {}
    for origin, values in (("config file", file_values), ("flags", flags)):
        for key, value in values.items():
            name = _KEYS.get(str(key)) or (key if key in _KEYS.values() else None)
            if name is None:
                known = ", ".join(sorted(_KEYS))
                raise ConfigError(f"{origin}: unknown setting {key!r} (known: {known})")
            if value is not None:
                merged[name] = value
    if not merged.get("cell"):
        merged["cell"] = _default_cell()
    for required in ("source", "containers"):
        if not merged.get(required):
            raise ConfigError(f"{required.replace('_', '-')}: required (flag or config file)")
    out: dict[str, Any] = {}
    for name, value in merged.items():
        key = name.replace("_", "-")
        if name in _DURATIONS:
            out[name] = parse_duration(value, key)
        elif name in _SHARES:
            out[name] = parse_share(value, key)
        elif name in _BOOLS:
            out[name] = _bool(value, key)
        elif name in _INTS:
            out[name] = _whole(value, key)
        elif name == "fetch_depth":
            out[name] = parse_whole(value, key, " (0 = full history)")
        elif name == "mass_revoke_min":
            out[name] = parse_whole(value, key, " (container-rule pairs; 0 = no floor)")
        elif name == "underlay_interface":
            out[name] = parse_interfaces(value, key)
        elif name == "deny_networks":
            out[name] = parse_deny_networks(value, key)
        elif name == "outbound_connections":
            out[name] = parse_outbound(value, key)
        elif name in ("fqdn_min_ttl", "fqdn_max_ttl", "fqdn_max_ips"):
            out[name] = _count(value, key)
        elif name == "fqdn_resolvers":
            out[name] = parse_resolvers(value, key)
        elif value == "" and name in (
            "metrics_listen",
            "metrics_textfile",
            "netns",
            "listen_webhook",
            "webhook_secret_file",
            "status_url",
        ):
            out[name] = None
        else:
            out[name] = str(value)
    cfg = AgentConfig(**out)
    _check(cfg)
    return cfg


def _whole(value: object, key: str) -> int:
    """A whole number from a file (int) or a flag (text); ranges are checked by `_check`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    try:
        return int(str(value).strip(), 10)
    except ValueError:
        raise ConfigError(f"{key}: expected a whole number, got {value!r}") from None


def parse_interfaces(value: object, key: str) -> tuple[str, ...]:
    """`eth0`, or a list of names: each checked as the kernel would take it (rendered)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ConfigError(f"{key}: expected an interface name or a list of them")
    try:
        return tuple(dict.fromkeys(check_interface_name(n) for n in names))
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _mapping(value: object, key: str, known: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping with keys {', '.join(known)}")
    for k in value:
        if str(k) not in known:
            raise ConfigError(f"{key}.{k}: unknown setting (known: {', '.join(known)})")
    return {str(k): v for k, v in value.items()}


def parse_deny_networks(value: object, key: str) -> DenyNetworks:
    """CF's deny_networks: `always`, `running`, `staging`, each a list of CIDRs (IPv4 and
    IPv6 alike; silk-cni's deny_networks and deny_networks_ipv6 in one list)."""
    if isinstance(value, DenyNetworks):
        return value
    lists: dict[str, tuple[str, ...]] = {}
    for name, raw in _mapping(value, key, LIFECYCLES).items():
        items = [] if raw is None else raw
        if not isinstance(items, list):
            raise ConfigError(f"{key}.{name}: expected a list of CIDRs")
        try:
            lists[name] = tuple(dict.fromkeys(check_network(x) for x in items))
        except ValueError as exc:
            raise ConfigError(f"{key}.{name}: {exc}") from None
    return DenyNetworks(**lists)


def _count(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"{key}: expected a whole number from 1 to 1000000, got {value!r}")
    return value


def parse_outbound(value: object, key: str) -> RateLimit:
    """CF's outbound_connections: `limit` (off by default), `burst`, `rate-per-sec`,
    `logging` (silk-cni's job spec; both > 0, as cni-wrapper-plugin's config check wants)."""
    if isinstance(value, RateLimit):
        return value
    known = ("limit", "burst", "rate-per-sec", "logging")
    raw = _mapping(value, key, known)
    default = RateLimit()
    return RateLimit(
        limit=_bool(raw.get("limit", default.limit), f"{key}.limit"),
        burst=_count(raw.get("burst", default.burst), f"{key}.burst"),
        rate_per_sec=_count(raw.get("rate-per-sec", default.rate_per_sec), f"{key}.rate-per-sec"),
        logging=_bool(raw.get("logging", default.logging), f"{key}.logging"),
    )


def file_cell_settings(
    values: Mapping[str, Any], underlay: tuple[str, ...] = (), backend: str | None = None
) -> CellSettings:
    """The cell settings of an agent config file's values (the rest is not looked at), with
    `underlay` (from a flag) overriding the file's: what `asgctl render`/`explain` show for
    that cell without being on it.  `backend` (a flag) overrides the file's too: it decides
    whether `flow-log: nflog` can be rendered."""
    backend = backend or str(values.get("backend", AgentConfig.backend))
    names = underlay or values.get("underlay-interface") or ()
    v = parse_interfaces(names, "underlay-interface") if names else ()
    mode = str(values.get("flow-log", AgentConfig.flow_log))
    if mode == "nflog" and backend == "libiptc":
        raise ConfigError(LIBIPTC_NFLOG)
    try:  # the agent's defaults (class attributes of the dataclass), not FlowLog's
        flow = FlowLog(
            mode,
            _whole(values.get("flow-log-group", AgentConfig.flow_log_group), "flow-log-group"),
            _whole(values.get("flow-log-rate", AgentConfig.flow_log_rate), "flow-log-rate"),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return CellSettings(
        v,
        v,
        parse_deny_networks(values.get("deny-networks"), "deny-networks"),
        parse_outbound(values.get("outbound-connections"), "outbound-connections"),
        flow,
    )


def _default_cell() -> str:
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name) or "cell"


MODES = ("enforce", "shadow")


def _check(cfg: AgentConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    if cfg.variant not in VARIANT_CHOICES:
        raise ConfigError(f"variant: {cfg.variant!r} is not one of {', '.join(VARIANT_CHOICES)}")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: {cfg.mode!r} is not one of {', '.join(MODES)}")
    if not _CELL_NAME.match(cfg.cell):
        raise ConfigError(f"cell: {cfg.cell!r} must match {_CELL_NAME.pattern}")
    if not _BRANCH.match(cfg.branch) or ".." in cfg.branch or cfg.branch.endswith((".", "/")):
        raise ConfigError(f"branch: {cfg.branch!r} is not a branch name")
    if cfg.branch.startswith(cfg.status_branch_prefix) or cfg.status_branch == cfg.branch:
        raise ConfigError("branch: the policy branch cannot be a status branch")
    if not _BRANCH.match(cfg.status_branch):
        raise ConfigError(f"status-branch-prefix: {cfg.status_branch_prefix!r} is not usable")
    try:
        cfg.status_repos()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.interval <= 0:
        raise ConfigError("interval: must be longer than 0")
    if cfg.retry_base <= 0:
        raise ConfigError("retry-base: must be longer than 0")
    if cfg.verify not in VERIFY_MODES:
        raise ConfigError(f"verify: one of {', '.join(VERIFY_MODES)}, got {cfg.verify!r}")
    if cfg.verify == "signed" and not (cfg.allowed_signers or cfg.gpg_keyring):
        raise ConfigError("verify: signed needs allowed-signers (SSH) and/or gpg-keyring (GPG)")
    if cfg.policy_tests not in POLICY_TEST_MODES:
        modes = ", ".join(POLICY_TEST_MODES)
        raise ConfigError(f"policy-tests: one of {modes}, got {cfg.policy_tests!r}")
    _check_flows(cfg)
    if cfg.watch not in WATCH_MODES:
        raise ConfigError(f"watch: one of {', '.join(WATCH_MODES)}, got {cfg.watch!r}")
    if cfg.metrics_listen:
        parse_listen(cfg.metrics_listen)
    if cfg.listen_webhook:
        _check_webhook(cfg)
    check_trailer(cfg.mass_revoke_trailer)
    if not re.match(r"^[A-Za-z0-9-]+$", cfg.emergency_trailer):
        raise ConfigError("emergency-trailer: a trailer key such as Asgctl-Emergency")
    try:
        cfg.fqdn_settings()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if (
        cfg.fqdn_intercept
        and cfg.flow_log == "nflog"
        and cfg.fqdn_intercept_queue == cfg.flow_log_group
    ):
        raise ConfigError(
            f"fqdn-intercept-queue {cfg.fqdn_intercept_queue} is also the NFLOG group copying "
            "DNS queries: it must differ from flow-log-group"
        )


def parse_resolvers(value: object, key: str) -> tuple[str, ...]:
    """`198.18.0.53`, `[fd00::53]:5353`, or a list of those."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key}: an address (addr or addr:port) or a list of them")
    for item in items:
        try:
            parse_server(item)
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not addr or addr:port") from None
    return tuple(items)


def check_trailer(trailer: str) -> str:
    """A trailer key as git writes one (letters, digits, `-`): it is matched in commit
    messages and shown in status and PR comments."""
    if not re.fullmatch(r"[A-Za-z0-9-]{1,100}", trailer):
        raise ConfigError("mass-revoke-trailer: a trailer key such as Asgctl-Allow-Mass-Revoke")
    return trailer


def file_gate_settings(values: Mapping[str, Any]) -> GateSettings:
    """The mass-revoke settings of an agent config file's values (the rest is not looked
    at), checked as the agent checks them: what `asgctl plan --agent-config` judges with."""
    default = DEFAULT_GATE
    threshold = values.get("mass-revoke-threshold")
    minimum = values.get("mass-revoke-min")
    trailer = values.get("mass-revoke-trailer")
    return GateSettings(
        default.threshold if threshold is None else parse_share(threshold, "mass-revoke-threshold"),
        default.minimum if minimum is None else parse_whole(minimum, "mass-revoke-min"),
        default.trailer if trailer is None else check_trailer(str(trailer)),
    )


LIBIPTC_NFLOG = (
    "flow-log: nflog needs backend iptables or nftables (python-iptables corrupts its heap "
    "building NFLOG targets); use flow-log: log with libiptc"
)


def _check_flows(cfg: AgentConfig) -> None:
    if cfg.flow_log not in FLOW_LOG_MODES:
        modes = ", ".join(FLOW_LOG_MODES)
        raise ConfigError(f"flow-log: one of {modes}, got {cfg.flow_log!r}")
    if cfg.flow_log == "nflog" and cfg.backend == "libiptc":
        raise ConfigError(LIBIPTC_NFLOG)
    try:
        cfg.flow_log_settings  # noqa: B018 - checks group and rate
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0.1 <= cfg.flow_log_window <= 3600:
        raise ConfigError("flow-log-window: from 100ms to 1h")
    if not 1 <= cfg.flow_log_max_aggregates <= 1_000_000:
        raise ConfigError("flow-log-max-aggregates: from 1 to 1000000")
    if not 4096 <= cfg.flow_log_max_bytes <= 1 << 40:
        raise ConfigError("flow-log-max-bytes: from 4096 to 1 TiB")


def _check_webhook(cfg: AgentConfig) -> None:
    """The receiver's address parses and its secret can be read (not kept: the config is
    shown and logged, the secret is read again when the receiver starts)."""
    from reconciler.hmacsig import WEBHOOK_SECRET_ENV, SecretError, load_secret

    parse_listen(cfg.listen_webhook or "", "listen-webhook")
    try:
        load_secret(cfg.webhook_secret_file, WEBHOOK_SECRET_ENV)
    except SecretError as exc:
        raise ConfigError(
            f"listen-webhook needs webhook-secret-file or ${WEBHOOK_SECRET_ENV}: {exc}"
        ) from None


def parse_listen(text: str, key: str = "metrics-listen") -> tuple[str, int]:
    """`127.0.0.1:9465` or `:9465` (loopback) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)
