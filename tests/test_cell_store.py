"""A store.json as a real Diego cell writes it: stale, odd and broken entries, judged one by one.

The report this answers: one bad entry (a stale entry claiming another container's IP, an id
that is not GUID-shaped) made the whole store invalid, so the cell froze on its last good
inventory -- and the IP that moved from payments' backend to a marketing blog kept payments'
MySQL access.  Now:

* only a store unreadable as a whole is refused (tests/test_inventory.py, test_faults.py);
* a bad entry is skipped (no usable IP) or held (its IP gets nothing), and reported in the
  agent's log, its status and `asgctl_agent_inventory_rejected_entries`, and by `render`;
* an IP claimed by several entries gets only what every claimant gets, decided in the pure
  compile so the CI plan and the agent agree;
* `container_workload` and the app id follow silk's vxlan-policy-agent planner.

Silk is cited at the versions read: planner.go at 7fcef73, planner_linux.go at be375feb
(cloudfoundry/silk-release, src/code.cloudfoundry.org/vxlan-policy-agent/planner/).
"""

from __future__ import annotations

import io
import ipaddress
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import example, given
from hypothesis import strategies as st

from asgctl_lab.netns import ContainerSpec, Lab, ServiceSpec
from asgctl_lab.probe import Outcome
from reconciler.agent.config import build_config
from reconciler.agent.core import condition
from reconciler.agent.loop import INVENTORY, SYNC, Agent
from reconciler.backends.iptables.render import render_text
from reconciler.cli import main
from reconciler.core.compile import cf_equivalent_rules, compile_cell, profile_of, profile_rules
from reconciler.core.model import (
    AddressRange,
    Container,
    Destination,
    EgressPolicy,
    PolicySet,
    PortRange,
    Rule,
    SecurityGroup,
)
from reconciler.sources.cellstore import decode_store, judge_store
from tests.agentkit import local_repo, sg
from tests.conftest import require_netns
from tests.iptables_eval import Packet, parse_restore, verdict

MYSQL, WWW, DNS = "198.19.0.10", "198.19.0.20", "198.19.0.53"


def tcp(dest: str, port: int) -> Rule:
    return Rule("tcp", (AddressRange.parse(dest),), (PortRange(port, port),))


POLICY = PolicySet(
    security_groups=(
        SecurityGroup("payments-mysql", (tcp(MYSQL, 3306),), running_spaces=("payments",)),
        SecurityGroup("marketing-web", (tcp(WWW, 80),), running_spaces=("marketing",)),
        SecurityGroup(
            "dns",
            (Rule("udp", (AddressRange.parse(DNS),), (PortRange(53, 53),)),),
            running_default=True,
            staging_default=True,
        ),
    ),
    destinations=(
        Destination("www-alt", "tcp", (AddressRange.parse(WWW),), (PortRange(8080, 8080),)),
    ),
    egress_policies=(EgressPolicy("blog-alt", "app", "blog", "www-alt"),),
)


def entry(ip: Any, space: str = "", app: str = "", workload: str | None = "app") -> dict:
    meta: dict[str, Any] = {"app_id": app, "policy_group_id": app, "space_id": space}
    if workload is not None:
        meta["container_workload"] = workload
    return {"ip": ip, "metadata": meta}


def reach(text: str, src: str) -> set[str]:
    """Which of the test destinations `src` may open, by the rendered rules."""
    chains = parse_restore(text)
    probes = {
        "mysql": Packet(src, MYSQL, "tcp", 3306),
        "www": Packet(src, WWW, "tcp", 80),
        "www-alt": Packet(src, WWW, "tcp", 8080),
        "dns": Packet(src, DNS, "udp", 53),
    }
    return {name for name, p in probes.items() if verdict(chains, p) == "ACCEPT"}


# -- compile: a shared IP gets the intersection -----------------------------------------------


def test_a_stale_entry_never_lends_its_access_to_the_container_holding_its_ip():
    """backend-0 stopped; its entry stayed and its IP went to the blog.  The IP gets what both
    the blog and the stale backend get (dns), not the backend's MySQL; the rest of the cell
    (api-0) is compiled exactly as without the stale entry."""
    reading = judge_store(
        {
            "blog-0": entry("198.18.0.2", "marketing", "blog"),
            "backend-0": entry("198.18.0.2", "payments", "backend"),  # stale
            "api-0": entry("198.18.0.3", "payments", "api"),
        }
    )
    assert {(r.kind, r.handle) for r in reading.rejected} == {
        ("shared", "blog-0"),
        ("shared", "backend-0"),
    }
    plan = compile_cell(POLICY, reading.containers, "cell")
    text = render_text(plan, 4)
    assert reach(text, "198.18.0.2") == {"dns"}
    assert reach(text, "198.18.0.3") == {"mysql", "dns"}
    # Every claimant's chain holds the same groups, whichever the kernel dispatches to.
    groups = {cp.container.handle: cp.groups for cp in plan.containers}
    assert groups["blog-0"] == groups["backend-0"]
    # Without the stale entry, the blog gets its own access back.
    live = [c for c in reading.containers if c.handle != "backend-0"]
    assert reach(render_text(compile_cell(POLICY, live), 4), "198.18.0.2") == {
        "www",
        "www-alt",
        "dns",
    }


def test_a_shared_ip_is_never_wider_than_any_claimant():
    rng = random.Random(13)
    spaces, apps, workloads = (
        ["payments", "marketing", ""],
        ["blog", "api", ""],
        ["app", "staging", "task", ""],
    )
    for _ in range(200):
        claimants = [
            Container(f"c{i}", "198.18.0.2", rng.choice(apps), rng.choice(spaces),
                      workload=rng.choice(workloads))
            for i in range(rng.randrange(2, 5))
        ]  # fmt: skip
        plan = compile_cell(POLICY, claimants)
        groups = plan.group_by_id
        [got] = {cp.groups for cp in plan.containers}
        items = {r.item for gid in got for r in groups[gid].rules}
        for c in claimants:
            assert items <= set(profile_rules(POLICY, profile_of(c))), (c, claimants)
        # ... and it is exactly what they all share.
        common = set.intersection(*(set(profile_rules(POLICY, profile_of(c))) for c in claimants))
        assert items == common
        # CF would install each claimant's own rules in its own chain: counted that way.
        assert plan.cf_equivalent_rules == cf_equivalent_rules(POLICY, claimants)


# -- silk's planner: container_workload and the app id ---------------------------------------


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        ("app", {"www", "www-alt", "dns"}),
        ("task", {"www", "www-alt", "dns"}),
        ("staging", {"www-alt", "dns"}),
        (None, set()),
        ("vm", set()),
    ],
)
def test_container_workload_decides_the_rules_as_in_silk(workload, expected):
    """silk binds running ASGs to `app` and `task`, staging ASGs to `staging`, and nothing to
    any other purpose, a missing one included (planner_linux.go@be375fe:189-192; the purpose
    is "" when the key is missing, planner.go@7fcef73:120-123).  The old egress-policy planner
    let a purpose-less container match every app_lifecycle (planner_linux.go@25ea819:441-447,
    `containerPurposeMatchesAppLifecycle`, :443 `containerPurpose == ""`); here it gets no
    policy either: a container whose lifecycle is unknown is given neither lifecycle's
    access."""
    containers = decode_store(
        json.dumps({"blog-0": entry("198.18.0.2", "marketing", "blog", workload)})
    ).containers
    assert reach(render_text(compile_cell(POLICY, containers), 4), "198.18.0.2") == expected


def test_metadata_null_gets_nothing_not_the_global_defaults():
    """silk's planner skips an entry without policy_group_id (planner.go@7fcef73:108-113), so CF
    gives such a container no ASG; here its IP is held to no access and reported, where it
    used to get the global running defaults."""
    reading = decode_store(json.dumps({"x": {"handle": "x", "ip": "198.18.0.9", "metadata": None}}))
    assert [(r.kind, r.ip) for r in reading.rejected] == [("held", "198.18.0.9")]
    text = render_text(compile_cell(POLICY, reading.containers), 4)
    assert reach(text, "198.18.0.9") == set()
    assert verdict(parse_restore(text), Packet("198.18.0.9", DNS, "udp", 53)) == "REJECT"


def test_egress_policies_name_the_app_by_policy_group_id():
    """silk's AppID is the store's policy_group_id (planner.go@7fcef73:136), never app_id."""
    store = {
        "blog-0": {
            "ip": "198.18.0.2",
            "metadata": {"app_id": "api", "policy_group_id": "blog", "space_id": "x",
                         "container_workload": "app"},
        },
    }  # fmt: skip
    text = render_text(compile_cell(POLICY, decode_store(json.dumps(store)).containers), 4)
    assert reach(text, "198.18.0.2") == {"www-alt", "dns"}


# -- asgctl render on the same files ---------------------------------------------------------

BAD_CELL = {
    "blog-0": {"handle": "blog-0", **entry("198.18.0.2", "marketing", "blog")},
    "backend-0": {"handle": "backend-0", **entry("198.18.0.2", "payments", "backend")},
    "api-0": {"handle": "api-0", **entry("198.18.0.3", "payments", "api")},
    "broken": {"handle": "broken", **entry("10.0.0.300", "payments", "api")},
    "odd-org": {
        "handle": "odd-org",
        "ip": "198.18.0.4",
        "metadata": {"app_id": "web", "policy_group_id": "web", "space_id": "marketing",
                     "org_id": "system org (not a GUID)", "container_workload": "task"},
    },
}  # fmt: skip


def test_render_works_on_a_store_with_bad_entries_and_reports_them(tmp_path: Path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "sg.yaml").write_text(
        sg("payments-mysql", [f'{{protocol: tcp, destination: {MYSQL}, ports: "3306"}}'],
           running=False, spaces=("payments",))
        + "---\n"
        + sg("marketing-web", [f'{{protocol: tcp, destination: {WWW}, ports: "80"}}'],
             running=False, spaces=("marketing",))
    )  # fmt: skip
    store = tmp_path / "store.json"
    store.write_text(json.dumps(BAD_CELL))
    result = CliRunner().invoke(
        main, ["render", "--containers", str(store), "--policies", str(policies), "--family", "4"]
    )
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: ") for w in warnings), warnings
    assert f"{store}: container 'broken': ip '10.0.0.300' is not an IP address (skipped)" in (
        result.stderr
    )
    assert "container 'backend-0': ip 198.18.0.2 is also claimed by 'blog-0'" in result.stderr
    assert reach(result.stdout, "198.18.0.2") == set()  # marketing-web ∩ payments-mysql
    assert reach(result.stdout, "198.18.0.3") == {"mysql"}
    assert reach(result.stdout, "198.18.0.4") == {"www"}  # a free-text org is just an org


# -- the agent: reports, and the CI plan agrees with it --------------------------------------


def test_the_agent_and_the_ci_plan_from_its_status_branch_compile_the_same_cell(tmp_path: Path):
    """The agent reports every rejection (log, status, metric) and still applies the cell;
    `asgctl plan --inventory status` reads the status file's containers back, and compiling
    them gives the very plan the agent applied: held and shared IPs included."""
    from reconciler.policy.load import load_revision
    from reconciler.status.document import containers_from_status
    from reconciler.status.write import dump_status
    from tests.test_agent_loop import MemoryDataplane

    repo = local_repo(tmp_path)
    rule = '{{protocol: tcp, destination: {}, ports: "{}"}}'.format
    sha = repo.commit(
        "asgs",
        {
            "a.yaml": sg("payments-mysql", [rule(MYSQL, 3306)], False, ("payments",)),
            "b.yaml": sg("marketing-web", [rule(WWW, 80)], False, ("marketing",)),
            "c.yaml": sg("dns", [rule(DNS, 53)]),
        },
    )
    store = tmp_path / "store.json"
    store.write_text(json.dumps({**BAD_CELL, "ghost": {"ip": "198.18.0.9", "metadata": None}}))
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "mem",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "status-push": False,
        },
        {},
    )
    err = io.StringIO()
    agent = Agent(cfg, out=io.StringIO(), err=err, backend=MemoryDataplane())
    try:
        st = agent.cycle(SYNC)
    finally:
        agent.source.close()
    ready = condition(st.conditions, "Ready")
    assert ready is not None and ready.status == "True", ready
    assert st.applied is not None and st.applied.plan is not None
    expected = {("shared", "blog-0"), ("shared", "backend-0"), ("skipped", "broken"),
                ("held", "ghost")}  # fmt: skip
    assert {(r["kind"], r["handle"]) for r in _events(err)} == expected
    doc = agent.status_document(st)
    assert {(r["kind"], r["handle"]) for r in doc["inventory"]["rejected"]} == expected
    assert agent.metrics.get("asgctl_agent_inventory_rejected_entries", kind="held") == 1

    containers = containers_from_status(dump_status(doc), "status/mem")
    policy = load_revision(repo.root, sha, "policies").policy
    assert compile_cell(policy, containers, "mem").digest() == st.applied.plan.digest()


# -- the agent on a real kernel ----------------------------------------------------------------


def _lab_store(lab: Lab, stale: bool) -> dict[str, Any]:
    ip = {name: lab.containers[name].ipv4 for name in ("blog", "api", "ghost")}
    store = {
        "blog-0": {"handle": "blog-0", **entry(ip["blog"], "marketing", "blog")},
        "api-0": {"handle": "api-0", **entry(ip["api"], "payments", "api")},
        "broken": {"handle": "broken", **entry("198.18.0.300", "payments", "api")},
        "ghost-0": {"handle": "ghost-0", "ip": ip["ghost"], "metadata": None},
    }
    if stale:  # backend-0 stopped; its entry stayed behind and its IP went to the blog
        store["backend-0"] = {"handle": "backend-0", **entry(ip["blog"], "payments", "backend")}
    return store


@pytest.mark.netns
def test_an_agent_converges_a_cell_whose_store_has_stale_and_broken_entries(
    tmp_path: Path, make_lab: Callable[..., Lab]
) -> None:
    """Real kernel, real packets: the stale backend entry and the broken one do not freeze the
    cell; the blog's IP never reaches payments' MySQL; api-0 does; the metadata-less ghost
    gets nothing; every rejection is in the log, the status and the metric; and a later store
    change (the stale entry cleaned up) is enforced."""
    require_netns()
    lab = make_lab(
        [ContainerSpec("blog"), ContainerSpec("api"), ContainerSpec("ghost")],
        [ServiceSpec("mysql", tcp_ports=(3306,)), ServiceSpec("www", tcp_ports=(80, 53))],
    )
    mysql, www = lab.services["mysql"].ipv4, lab.services["www"].ipv4
    repo = local_repo(tmp_path)
    rule = '{{protocol: tcp, destination: {}, ports: "{}"}}'.format
    repo.commit(
        "asgs",
        {
            "a.yaml": sg("payments-mysql", [rule(mysql, 3306)], False, ("payments",)),
            "b.yaml": sg("marketing-web", [rule(www, 80)], False, ("marketing",)),
            "c.yaml": sg("dns", [rule(www, 53)]),
        },
    )
    store = tmp_path / "store.json"
    store.write_text(json.dumps(_lab_store(lab, stale=True)))
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "cell-a",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "netns": lab.cell,
            "status-push": False,
            "mass-revoke-threshold": "100%",
        },
        {},
    )
    err = io.StringIO()
    agent = Agent(cfg, out=io.StringIO(), err=err)
    try:
        st = agent.cycle(SYNC)
        ready = condition(st.conditions, "Ready")
        assert ready is not None and (ready.status, ready.reason) == (
            "True",
            "ReconciliationSucceeded",
        ), ready
        assert "4 container metadata entries not used as written" in ready.message

        def outcome(src: str, dst: str, port: int) -> Outcome:
            return lab.probe_tcp(src, dst, port).outcome

        assert outcome("api", "mysql", 3306) is Outcome.CONNECTED
        assert outcome("blog", "mysql", 3306) is Outcome.REJECTED  # never the stale access
        assert outcome("blog", "www", 80) is Outcome.REJECTED  # marketing-web ∩ payments
        assert outcome("blog", "www", 53) is Outcome.CONNECTED  # what both get
        assert outcome("ghost", "www", 53) is Outcome.REJECTED  # held: not even defaults

        kinds = {(r["kind"], r["handle"]) for r in _events(err)}
        assert kinds == {
            ("shared", "blog-0"),
            ("shared", "backend-0"),
            ("skipped", "broken"),
            ("held", "ghost-0"),
        }
        doc = agent.status_document(st)
        assert {(r["kind"], r["handle"]) for r in doc["inventory"]["rejected"]} == kinds
        assert doc["inventory"]["error"] == ""
        metric = agent.metrics.render()
        for kind, count in (("shared", 2), ("skipped", 1), ("held", 1)):
            assert f'asgctl_agent_inventory_rejected_entries{{cell="cell-a",kind="{kind}"}} ' \
                   f"{count}" in metric, metric  # fmt: skip

        # The stale entry is cleaned up: the next inventory cycle gives the blog its own access.
        store.write_text(json.dumps(_lab_store(lab, stale=False)))
        err.seek(0)
        err.truncate()
        st = agent.cycle(INVENTORY)
        assert outcome("blog", "www", 80) is Outcome.CONNECTED
        assert outcome("blog", "mysql", 3306) is Outcome.REJECTED
        assert outcome("api", "mysql", 3306) is Outcome.CONNECTED
        assert {(r.kind, r.handle) for r in st.inventory_rejected} == {
            ("skipped", "broken"),
            ("held", "ghost-0"),
        }
        assert _events(err) == []  # already reported: not logged again every cycle
        assert agent.metrics.get("asgctl_agent_inventory_rejected_entries", kind="shared") == 0

        # A half-written store is the one whole refusal: the last good inventory is kept.
        store.write_text(json.dumps(_lab_store(lab, stale=True))[:40])
        st = agent.cycle(INVENTORY)
        ready = condition(st.conditions, "Ready")
        assert ready is not None and ready.reason == "InventoryInvalid"
        assert outcome("blog", "www", 80) is Outcome.CONNECTED
    finally:
        agent.source.close()


def _events(err: io.StringIO) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in err.getvalue().splitlines()]
    return [r for r in records if r["event"] == "inventory-entry-rejected"]


_OCTET_TEXTS = st.one_of(
    st.integers(0, 300).map(str),
    st.sampled_from(["00", "01", "010", "255", "256", "\u0663", "1 ", "+1", "", "0x1", "1e2"]),
)


@given(st.lists(_OCTET_TEXTS, min_size=3, max_size=5).map(".".join))
@example("0.0.0.0")
@example("223.255.255.255")
@example("224.0.0.1")
@example("239.255.255.255")
@example("240.0.0.1")
@example("255.255.255.255")
@example("10.0.0.01")
def test_a_store_ip_is_judged_as_ipaddress_reads_it(text):
    """A plain dotted quad skips ipaddress (a fleet's status read holds 250,000): whatever
    the text, the verdict must be the one ipaddress gives -- its normal form, or refused as
    no address (leading zeros, Unicode digits, out of range), unspecified or multicast."""
    entry = {"handle": "c1", "ip": text, "metadata": {"policy_group_id": "app-1"}}
    reading = judge_store({"c1": entry})
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        (rejection,) = reading.rejected
        assert rejection.kind == "skipped" and "is not an IP address" in rejection.reason
        return
    if ip.is_unspecified or ip.is_multicast:
        (rejection,) = reading.rejected
        assert rejection.reason.endswith(f"ip {ip} cannot be a container address")
        return
    assert reading.rejected == ()
    assert [c.ip for c in reading.containers] == [str(ip)]
