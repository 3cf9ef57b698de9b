"""The fleet dashboard (`deploy/grafana/asgctl-fleet.json`) shows data, read through a real
Prometheus scraping real agents.

Statically: the JSON is a provisionable Grafana dashboard, every panel has a PromQL query,
every metric a query names is one the agent exports, and every query parses (promtool).
End to end: two lab cells (iptables and nftables), an `asgctl agent` process per cell with
its metrics endpoint, dnsmasq for a name the policy allows, and Debian's `prometheus`
scraping both agents every second.  A container's connection is denied and another passes
a `log: true` rule (real packets, logged to NFLOG and read by the agents); then EVERY
panel's query, as parsed from the dashboard JSON (so a panel added later is checked too),
must return data through Prometheus' HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.dns import LabDns
from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from tests.agentkit import (  # noqa: F401 - fixtures
    AgentProc,
    PolicyRepo,
    agents,
    applied,
    git_server,
    policy_repo,
    read_status,
    ready,
    sg,
    wait_for,
)
from tests.conftest import require_netns

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "asgctl-fleet.json"
RECONCILER = Path(__file__).resolve().parent.parent / "reconciler"

# What Grafana puts in place of its variables when it sends a query: the cells chosen
# (a regex alternation), a rate window of at least four scrapes, the dashboard's range.
RATE_INTERVAL, RANGE = "1m", "5m"


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", ())


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) of every target of every panel."""
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in panels(dashboard)
        for t in p.get("targets", ())
    ]


def substitute(expr: str, cells: list[str]) -> str:
    """The query as Grafana sends it, its variables replaced; none may be left over."""
    out = (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$cell", "|".join(cells))  # plain names: no regex metacharacters
    )
    assert "$" not in out, f"a Grafana variable the tests do not know: {expr}"
    return out


# -- static ------------------------------------------------------------------------------------


def test_the_dashboard_is_provisionable_json_with_a_query_in_every_panel() -> None:
    d = load_dashboard()
    assert d["uid"] == "asgctl-fleet" and d["title"]
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"]: v for v in d["templating"]["list"]}
    # Provisioned as is on any Grafana: the data source is a variable, never a fixed uid.
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"
    assert names["cell"]["allValue"] == ".*"
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'cell=~"$cell"' in t["expr"], f"{p['title']}: not filtered by $cell"
    provider = (DASHBOARD.parent / "provisioning" / "dashboards" / "asgctl.yaml").read_text()
    assert "type: file" in provider and "apiVersion: 1" in provider


def test_every_metric_a_panel_queries_is_one_the_agent_exports() -> None:
    """A name is exported when the agent's code writes it as a string literal (the registry
    is keyed by name; summaries write `_sum` and `_count`)."""
    source = "\n".join(p.read_text() for p in RECONCILER.rglob("*.py"))
    exported = set(re.findall(r'"(asgctl_agent_[a-z0-9_]+)"', source))
    used = {
        name
        for _, expr in queries(load_dashboard())
        for name in re.findall(r"\basgctl_agent_[a-z0-9_]+", expr)
    }
    assert used, "no metric in the dashboard"
    missing = sorted(n for n in used if n not in exported)
    assert not missing, f"the dashboard queries metrics the agent never exports: {missing}"


@pytest.mark.requires("promtool")
def test_every_panel_query_parses_with_promtool(tmp_path: Path) -> None:
    """Each query, as Grafana sends it, as a recording rule: `promtool check rules` parses it."""
    rules = [
        {"record": f"asgctl:dashboard:q{i}", "expr": substitute(expr, ["cell-a", "cell-b"])}
        for i, (_, expr) in enumerate(queries(load_dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout


@pytest.mark.requires("promtool")
def test_promtool_refuses_a_query_that_does_not_parse(tmp_path: Path) -> None:
    """The check above can fail: a broken query is refused."""
    path = tmp_path / "bad.yml"
    bad = {"record": "asgctl:bad", "expr": "sum by (cell (asgctl_agent_ready)"}
    path.write_text(json.dumps({"groups": [{"name": "bad", "rules": [bad]}]}))
    res = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0


# -- a real Prometheus scraping real agents -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """Debian's `prometheus` on a loopback port, scraping `targets` every second; its
    storage in a temporary directory; stopped and removed by `stop`, however the test ends."""

    def __init__(self, targets: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="asgctl-prom-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "asgctl-agent", "static_configs": [{"targets": targets}]}
            ],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.dir / "prometheus.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, 30, interval=0.2, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/-/ready") as r:
            return bool(r.status == 200)
        return False

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "prometheus.log").read_text()[-4000:]
        return ""

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


ORG_GUID, SPACE_GUID, APP_GUID = "org-acme", "space-prod", "app-web"
DB = "db.lab.example"
DIRECTORY = f"""\
kind: Directory
orgs:
  - name: acme
    guid: {ORG_GUID}
    spaces:
      - name: prod
        guid: {SPACE_GUID}
        apps:
          - {{name: web, guid: {APP_GUID}}}
"""
NAMED = f"""\
kind: Destination
name: db
protocol: tcp
ports: 5432
fqdns: {DB}
---
kind: EgressPolicy
name: web-db
source: {{type: app, id: {APP_GUID}}}
destination: db
"""
WEB = ContainerSpec("web", app_id=APP_GUID, space_id=SPACE_GUID, org_id=ORG_GUID)
SERVICES = (ServiceSpec("echo", tcp_ports=(80, 8080)), ServiceSpec("dns"))


def _policy(echo: str) -> dict[str, str]:
    """echo:80 allowed and logged; echo:8443 allowed and logged, never used; a name."""
    rules = [
        f'{{protocol: tcp, destination: {echo}, ports: "80", log: true}}',
        f'{{protocol: tcp, destination: {echo}, ports: "8443", log: true}}',
    ]
    return {"directory.yaml": DIRECTORY, "sg.yaml": sg("echo", rules), "db.yaml": NAMED}


def _metrics_address(agent: AgentProc) -> str:
    for r in agent.log_records("err"):
        if r.get("event") == "metrics-listening":
            return str(r["address"])
    return ""


@pytest.mark.netns
@pytest.mark.requires("git", "prometheus", "dnsmasq")
def test_prometheus_scraping_the_lab_agents_has_data_for_every_panel(
    make_lab: Callable[..., Lab],
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    cells = {"cell-a": "iptables", "cell-b": "nftables"}
    labs = {name: make_lab([WEB], SERVICES) for name in cells}
    # Both labs number their services alike: one policy serves both cells.
    echo = labs["cell-a"].services["echo"].ipv4
    assert all(lab.services["echo"].ipv4 == echo for lab in labs.values())
    sha = policy_repo.commit("echo logged, db by name", _policy(echo))
    dns: list[LabDns] = []
    prom: Prometheus | None = None
    try:
        procs = {}
        for name, backend in cells.items():
            lab = labs[name]
            assert lab.workdir is not None
            server = LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir)
            dns.append(server)  # stopped in `finally`, even if it fails to start
            server.start({DB: [echo]})
            procs[name] = agents(
                name,
                source=policy_repo.url,
                containers=str(lab.write_store()),
                netns=lab.cell,
                backend=backend,
                flow_log="nflog",
                flow_log_window="1s",
                flow_unused_after="3s",
                fqdn_resolvers=[server.address],
                metrics_listen="127.0.0.1:0",
            ).start()

        for name in cells:
            wait_for(applied(policy_repo.bare, name, sha), 60, what=f"{name} applies the policy")
        targets = [wait_for(lambda a=a: _metrics_address(a), 10) for a in procs.values()]
        prom = Prometheus(targets)  # assigned first: stopped and removed even if start fails
        prom.start()

        # Real packets: a denied connect and a hit of the first logged rule, in each cell.
        for lab in labs.values():
            assert lab.probe_tcp("web", "echo", 8080).outcome is Outcome.REJECTED
            assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED

        p = prom

        def denied_seen() -> list[dict[str, Any]]:
            return p.query('asgctl_agent_flow_denied_total{app="acme/prod/web"} > 0')

        wait_for(denied_seen, 60, interval=0.5, what="denied packets scraped for acme/prod/web")
        wait_for(
            lambda: p.query("asgctl_agent_flow_rule_group_hits_total > 0"),
            60,
            interval=0.5,
            what="rule group hits scraped",
        )
        # Every panel's query, as the dashboard JSON has it, returns data.
        pending = queries(load_dashboard())

        def all_answered() -> bool:
            nonlocal pending
            pending = [(t, e) for t, e in pending if not p.query(substitute(e, list(cells)))]
            return not pending

        with contextlib.suppress(AssertionError):
            wait_for(all_answered, 60, interval=1.0, what="every panel's query")
        assert not pending, "panels without data:\n" + "\n".join(
            f"  {t}: {substitute(e, list(cells))}" for t, e in pending
        )
        # And the data says what happened: both cells report, Ready, at the same revision; the
        # unused logged rule (8443) is counted per cell, the one hit (80) is not.
        up = p.query('up{job="asgctl-agent"} == 1')
        assert len(up) == 2
        revs = p.query("asgctl_agent_applied_revision_info")
        assert {r["metric"]["cell"] for r in revs} == set(cells)
        assert {r["metric"]["revision"] for r in revs} == {f"main@sha1:{sha}"}

        def only_8443_unused() -> bool:
            for lab in labs.values():  # rule 80 keeps being hit; 8443 never is
                assert lab.probe_tcp("web", "echo", 80).outcome is Outcome.CONNECTED
            unused = {
                r["metric"]["cell"]: float(r["value"][1])
                for r in p.query("asgctl_agent_flow_unused_rules")
            }
            return unused == {"cell-a": 1.0, "cell-b": 1.0}

        wait_for(only_8443_unused, 30, interval=0.5, what="one unused rule per cell")
        names = p.query(f'asgctl_agent_fqdn_addresses{{fqdn="{DB}",family="4"}}')
        assert {float(r["value"][1]) for r in names} == {1.0}
    finally:
        if prom is not None:
            prom.stop()
        for server in dns:
            server.stop()


def test_the_dashboard_readme_names_the_files() -> None:
    text = (DASHBOARD.parent / "README.md").read_text()
    for name in ("asgctl-fleet.json", "provisioning/dashboards/asgctl.yaml", "metrics-listen"):
        assert name in text, name
