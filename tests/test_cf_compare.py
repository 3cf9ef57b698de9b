"""`asgctl cf compare`: shadow parity between CF's chains in the kernel and asgctl's plan.

The CF cell here is written the way silk writes one, from Cloud Foundry's own security group
JSON, by `silk_cell` below (independent of asgctl's compiler), and loaded with the real
`iptables-restore` into a network namespace the test creates.  What it follows, in
cloudfoundry/silk-release (path@commit:line):

- the jump: `-s <ip> -o <underlay> --jump netout--<handle>`, one per underlay interface
  (src/code.cloudfoundry.org/lib/rules/rules.go@0a8b534:50-62 NewNetOutJumpConditions);
  chain names `netout--<handle>` cut to 28 characters and `<chain>--log`
  (cni-wrapper-plugin/netrules/chain_namer.go@7ed0ad5:25-27 Prefix, :29-35 Postfix);
- the ASG chain `asg-<handle without dashes, 20 chars>` jumped to first from the netout
  chain, which keeps its trailing REJECT (vxlan-policy-agent/enforcer/enforcer.go@01b6775
  ASGChainName, EnforceOnChain: "Rule 1 should be the jump to the new/desired asg-* chain",
  DeleteAfterRuleNumKeepReject);
- the ASG chain's rules: the group accepts, deny networks, INVALID drop, RELATED,ESTABLISHED
  (cni-wrapper-plugin/netrules/netout_chain.go@0fc76f3:58-83 IPTablesRules, deny networks
  :85-107), after the default LOG and REJECT (:44-52 DefaultRules; vxlan-policy-agent/
  planner/planner_linux.go@25ea819 GetASGRulesAndChains: `append(defaultRules,
  iptablesRules...)`), inserted one by one at position 1, so the kernel holds them reversed
  (lib/rules/locked_iptables.go@03b6465:112-138 bulkAction/BulkInsert `-I <chain> 1`);
- each rule's text: rules.go@0a8b534:168-177 NewNetOutWithPortsRule (`-m iprange -p tcp
  --dst-range a-b -m tcp --destination-port x:y --jump ACCEPT`, one per port range),
  :179-188 NewNetOutICMPRule (`--icmp-type T/C`), :160-166 NewNetOutRule (protocol all),
  :201-207 and :209-218 the `-g <log chain>` variants, :264-270 NewInputRejectRule (a deny
  network), :279-284 NewNetOutInvalidRule, :286-291 NewNetOutRelatedEstablishedRule;
  cni-wrapper-plugin/netrules/rule_converter.go@390d225 Convert (per network and port
  range; tcp/udp without ports skipped; `log` sends to the log chain).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reconciler.backends.iptables.cfparse import allow_sets, parse_save
from reconciler.cli import main
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, PolicySet
from reconciler.core.parity import compare, describe_box
from reconciler.policy.load import load_policy
from reconciler.sources.cellstore import load_store
from tests.conftest import require_netns

# -- CF's side, as silk writes it ------------------------------------------------------------

RELATED = "-m state --state RELATED,ESTABLISHED --jump ACCEPT"
INVALID = "-p tcp -m state --state INVALID --jump DROP"
REJECT = "--jump REJECT --reject-with icmp-port-unreachable"


def _network(destination: str) -> tuple[str, str]:
    if "-" in destination:
        first, last = destination.split("-")
        return first, last
    net = ipaddress.ip_network(destination, strict=False)
    return str(net.network_address), str(net.broadcast_address)


def _port_ranges(ports: str) -> list[tuple[int, int]]:
    if "-" in ports:
        a, b = ports.split("-")
        return [(int(a), int(b))]
    return [(int(p), int(p)) for p in ports.split(",")]


def silk_rules(rule: dict[str, Any], log_chain: str) -> list[str]:
    """rule_converter.go Convert for one CC rule: one line per network and port range."""
    start, end = _network(rule["destination"])
    dst = f"-m iprange --dst-range {start}-{end}"
    verdict = f"-g {log_chain}" if rule.get("log") else "--jump ACCEPT"
    proto = rule["protocol"]
    if proto == "all":
        return [f"{dst} {verdict}"]
    if proto == "icmp":
        code = rule["code"] % 256  # garden.ICMPCode is a uint8: -1 is written 255
        return [
            f"-m iprange -p icmp --dst-range {start}-{end} -m icmp "
            f"--icmp-type {rule['type']}/{code} {verdict}"
        ]
    return [
        f"-m iprange -p {proto} --dst-range {start}-{end} -m {proto} "
        f"--destination-port {a}:{b} {verdict}"
        for a, b in _port_ranges(rule["ports"])
    ]


def _rules_for(container: dict[str, Any], groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """planner_linux.go GetASGRulesAndChains: global defaults, then the space's groups."""
    meta = container["metadata"]
    purpose, space = meta["container_workload"], meta["space_id"]
    kind = "staging" if purpose == "staging" else "running"
    out: list[dict[str, Any]] = []
    for g in groups:
        if g["globally_enabled"][kind]:
            out.extend(g["rules"])
    for g in groups:
        bound = [d["guid"] for d in g["relationships"][f"{kind}_spaces"]["data"]]
        if space in bound and not g["globally_enabled"][kind]:
            out.extend(g["rules"])
    return out


def silk_cell(
    store: dict[str, Any],
    groups: list[dict[str, Any]],
    underlay: str = "eth0",
    deny: tuple[str, ...] = (),
    extra: dict[str, list[str]] | None = None,
) -> str:
    """The filter table silk and the vxlan-policy-agent leave on a cell for these groups,
    as `iptables-restore --noflush` input.  `extra` puts further lines at the head of a
    container's ASG chain (by handle): for the tests of rules the reader must not guess."""
    heads, lines = [], []
    for handle, c in store.items():
        netout = f"netout--{handle}"[:28]
        log = f"{netout[: 28 - len('--log')]}--log"
        asg = "asg-" + handle.replace("-", "")[:20]
        heads += [f":{netout} - [0:0]", f":{log} - [0:0]", f":{asg} - [0:0]"]
        lines.append(f"-A FORWARD -s {c['ip']}/32 -o {underlay} --jump {netout}")
        lines += [f"-A {netout} --jump {asg}", f"-A {netout} {REJECT}"]
        accepts = [x for r in _rules_for(c, groups) for x in silk_rules(r, log)]
        denies = [f"-d {n} {REJECT}" for n in deny]
        planned = [REJECT, *accepts, *denies, INVALID, RELATED]  # DefaultRules, IPTablesRules
        body = list(reversed(planned))  # each inserted at position 1
        body = (extra or {}).get(handle, []) + body
        lines += [f"-A {asg} {x}" for x in body]
        lines += [
            f"-A {log} ! -p udp -m conntrack --ctstate INVALID,NEW,UNTRACKED "
            f'-j LOG --log-prefix "OK_{handle[:25]} "',
            f"-A {log} --jump ACCEPT",
        ]
    return "\n".join(["*filter", *heads, *lines, "COMMIT"]) + "\n"


# -- the cell: a network namespace of the test's own -----------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, always deleted after the test."""
    require_netns()
    name = f"asgcfc-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def load(netns: str, text: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-legacy-restore", "--noflush"],
        input=text,
        text=True,
        check=True,
    )


def saved(netns: str) -> str:
    """Every table of both variants and families, without the timestamp comments."""
    out = []
    for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save"):
        res = subprocess.run(
            ["ip", "netns", "exec", netns, tool], capture_output=True, text=True, check=False
        )
        out.append("".join(x for x in res.stdout.splitlines(True) if not x.startswith("#")))
    return "\n".join(out)


SPACE_A, SPACE_B = "a0000000-0000-4000-8000-00000000000a", "b0000000-0000-4000-8000-00000000000b"

GROUPS: list[dict[str, Any]] = [
    {
        "guid": "g-web",
        "name": "public-web",
        "globally_enabled": {"running": False, "staging": False},
        "rules": [
            {"protocol": "tcp", "destination": "198.19.10.0/24", "ports": "80,443"},
            {"protocol": "udp", "destination": "198.19.11.0-198.19.11.127", "ports": "53"},
            {"protocol": "icmp", "destination": "198.19.12.0/24", "type": 8, "code": 0},
            {"protocol": "tcp", "destination": "198.19.13.7", "ports": "8000-8100", "log": True},
        ],
        "relationships": {
            "running_spaces": {"data": [{"guid": SPACE_A}]},
            "staging_spaces": {"data": []},
        },
    },
    {
        "guid": "g-dns",
        "name": "dns",
        "globally_enabled": {"running": True, "staging": True},
        "rules": [{"protocol": "all", "destination": "198.19.53.53"}],
        "relationships": {"running_spaces": {"data": []}, "staging_spaces": {"data": []}},
    },
    {
        "guid": "g-stage",
        "name": "staging-mirror",
        "globally_enabled": {"running": False, "staging": False},
        "rules": [{"protocol": "tcp", "destination": "198.19.20.0/23", "ports": "443"}],
        "relationships": {
            "running_spaces": {"data": []},
            "staging_spaces": {"data": [{"guid": SPACE_A}]},
        },
    },
]


def _entry(handle: str, ip: str, space: str, workload: str) -> dict[str, Any]:
    meta = {
        "app_id": f"app-{handle}",
        "space_id": space,
        "org_id": "org-1",
        "policy_group_id": f"app-{handle}",
        "container_workload": workload,
    }
    return {"handle": handle, "ip": ip, "metadata": meta}


STORE = {
    "web-1": _entry("web-1", "198.18.0.2", SPACE_A, "app"),
    "web-task": _entry("web-task", "198.18.0.3", SPACE_A, "task"),
    "web-stage": _entry("web-stage", "198.18.0.4", SPACE_A, "staging"),
    "other-1": _entry("other-1", "198.18.0.5", SPACE_B, "app"),
}


@pytest.fixture
def cell(tmp_path: Path) -> dict[str, Path]:
    """The groups as CF's API returns them, imported with `asgctl import-cf`; the store."""
    (tmp_path / "sg.json").write_text(json.dumps({"resources": GROUPS, "pagination": {}}))
    res = CliRunner().invoke(
        main, ["import-cf", str(tmp_path / "sg.json"), "--out", str(tmp_path / "policies")]
    )
    assert res.exit_code == 0, res.output
    (tmp_path / "store.json").write_text(json.dumps(STORE))
    return {"policies": tmp_path / "policies", "store": tmp_path / "store.json"}


def cf_compare(cell: dict[str, Path], netns: str, *more: str) -> Any:
    argv = ["cf", "compare", "--containers", str(cell["store"]), "--netns", netns]
    argv += ["--policies", str(cell["policies"]), *more]
    return CliRunner().invoke(main, argv)


# -- the black-box check ---------------------------------------------------------------------


def test_same_asgs_imported_give_parity_and_nothing_in_the_kernel_changes(
    netns: str, cell: dict[str, Path]
) -> None:
    load(netns, silk_cell(STORE, GROUPS))
    before = saved(netns)
    res = cf_compare(cell, netns)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("PARITY 4 containers: 4 same, 0 different")
    assert saved(netns) == before  # read only: every table, both variants, byte for byte


def test_one_rule_changed_on_our_side_names_the_container_and_the_packets(
    netns: str, cell: dict[str, Path]
) -> None:
    load(netns, silk_cell(STORE, GROUPS))
    doc = cell["policies"] / "public-web.yaml"
    doc.write_text(doc.read_text().replace("ports: '80,443'", "ports: '80,8443'"))
    line = 1 + doc.read_text().splitlines().index(
        next(x for x in doc.read_text().splitlines() if "8443" in x)
    )
    res = cf_compare(cell, netns)
    assert res.exit_code == 3, res.output
    out = res.output
    assert out.startswith("NO PARITY 4 containers: 2 same, 2 different")
    assert f"DIFFERENT web-1 (app app-web-1, space {SPACE_A}, app, 198.18.0.2)" in out
    assert f"DIFFERENT web-task (app app-web-task, space {SPACE_A}, task, 198.18.0.3)" in out
    assert "SAME web-stage" in out and "SAME other-1" in out
    block = out.split("DIFFERENT web-1")[1].split("DIFFERENT")[0]
    assert "only CF allows: tcp 198.19.10.0/24 port 443\n" in block
    assert "by CF rule asg-web1 rule" in block and "--dport 443 -j ACCEPT" in block
    assert "only asgctl allows: tcp 198.19.10.0/24 port 8443\n" in block
    assert f"SecurityGroup/public-web rules[0] ({doc.name}:{line})" in block

    as_json = json.loads(cf_compare(cell, netns, "--format", "json").output)
    assert as_json["parity"] == "different"
    assert as_json["counts"] | {} == {
        "same": 2,
        "different": 2,
        "unknown": 0,
        "no-cf-chain": 0,
        "containers": 4,
        "cf_chains_without_container": 0,
    }
    web = next(c for c in as_json["containers"] if c["handle"] == "web-1")
    assert [p["text"] for p in web["only_cf_allows"]] == ["tcp 198.19.10.0/24 port 443"]
    assert web["only_asgctl_allows"][0] | {"by": []} == {
        "family": 4,
        "destination": "198.19.10.0/24",
        "protocol": "tcp",
        "ports": "8443",
        "text": "tcp 198.19.10.0/24 port 8443",
        "by": [],
    }


def test_deny_networks_on_both_sides(netns: str, cell: dict[str, Path], tmp_path: Path) -> None:
    """CF rejects a deny network before the accepts (netout_chain.go@0fc76f3:85-107); the
    agent's deny-networks do the same in the plan.  Only with both is there parity."""
    load(netns, silk_cell(STORE, GROUPS, deny=("198.19.10.128/25",)))
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    assert "only asgctl allows: tcp 198.19.10.128/25 port 80" in res.output
    settings = tmp_path / "agent.yaml"
    settings.write_text("deny-networks:\n  always: [198.19.10.128/25]\n")
    res = cf_compare(cell, netns, "--agent-config", str(settings))
    assert res.exit_code == 0, res.output


def test_a_store_container_without_a_cf_chain_and_a_cf_chain_without_a_container(
    netns: str, cell: dict[str, Path]
) -> None:
    cf_store = {k: v for k, v in STORE.items() if k != "other-1"}
    cf_store["gone-1"] = _entry("gone-1", "198.18.0.9", SPACE_A, "app")
    load(netns, silk_cell(cf_store, GROUPS))
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    assert "ORPHAN CF chain with no container in the store: 198.18.0.9" in res.output
    assert f"NO CF CHAIN other-1 (app app-other-1, space {SPACE_B}, app, 198.18.0.5)" in res.output
    assert "CF's FORWARD has no jump to a netout chain for this address" in res.output


def test_a_cf_rule_the_reader_does_not_understand_is_named_not_guessed(
    netns: str, cell: dict[str, Path]
) -> None:
    """A physdev match decides by the bridge port, which the reader cannot know: the packets
    it could take are undetermined, for that container only, and the rule is shown."""
    odd = "-m physdev --physdev-is-bridged --jump ACCEPT"
    load(netns, silk_cell(STORE, GROUPS, extra={"web-1": [odd]}))
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    assert "NOT JUDGED web-1" in res.output
    assert "CF rule not understood (match module 'physdev'): asg-web1 rule 1: " in res.output
    assert res.output.count("SAME") == 3


def test_hostile_comment_text_cannot_forge_a_verdict_or_a_report_line(
    netns: str, cell: dict[str, Path]
) -> None:
    """A comment is anyone's text: one that reads like `-j ACCEPT` stays a comment (the
    rule is the REJECT it is), and control characters reach neither the terminal nor JSON."""
    fake = '-d 198.19.10.0/24 -m comment --comment "x --jump ACCEPT" ' + REJECT
    evil = '-m physdev --physdev-is-bridged -m comment --comment "\x1b[2J::error::SAME" -j ACCEPT'
    load(netns, silk_cell(STORE, GROUPS, extra={"web-1": [fake], "web-task": [evil]}))
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    web = res.output.split("DIFFERENT web-1")[1]
    assert "only asgctl allows: tcp 198.19.10.0/24 ports 80" not in web  # 80 and 443, apart
    assert "only asgctl allows: tcp 198.19.10.0/24 port 80\n" in web
    assert "\x1b" not in res.output and "\\x1b[2J::error::SAME" in res.output
    assert not any(x.lstrip().startswith("::") for x in res.output.splitlines())
    as_json = cf_compare(cell, netns, "--format", "json").output
    assert "\x1b" not in as_json and "\\\\x1b" in as_json


def test_the_lab_cells_diego_layout_reads_as_parity(netns: str, cell: dict[str, Path]) -> None:
    """The lab's CF cell (`cflayout.render_diego`: the VPA's c2c chain first in FORWARD with
    its MARK and mark-matched ACCEPTs to local containers, silk's overlay chains) decides no
    packet that leaves by the underlay for another host: still parity."""
    from reconciler.backends.iptables.cflayout import NetworkPolicy, render_diego

    policy = load_policy(str(cell["policies"])).policy
    plan = compile_cell(policy, load_store(str(cell["store"])).containers, "cell")
    c2c = [NetworkPolicy("app-web-1", "app-other-1", "tcp", 8080, 8080)]
    load(netns, render_diego(plan, c2c, vtep="silk-vtep", stamp=1700000000))
    res = cf_compare(cell, netns)
    assert res.exit_code == 0, res.output


# -- the walk, rule by rule (iptables-save text as the kernel prints it back) ----------------


def _walk(body: list[str], policy_text: str = "ACCEPT") -> list[str]:
    """The allow set of 198.18.0.2 for a netout chain with `body`, described."""
    text = "\n".join(
        [
            "*filter",
            f":FORWARD {policy_text} [0:0]",
            ":netout--h - [0:0]",
            ":netout--h--log - [0:0]",
            "-A FORWARD -s 198.18.0.2/32 -o eth0 -j netout--h",
            *(f"-A netout--h {x}" for x in body),
            "-A netout--h--log -j ACCEPT",
            "COMMIT",
        ]
    )
    side = allow_sets(parse_save(text, 4))["198.18.0.2"]
    assert not side.unread, side.unread
    container = Container("h", "198.18.0.2", space_id="s")
    plan = compile_cell(PolicySet(), [container], "t")
    report = compare(PolicySet(), plan, {"198.18.0.2": side})
    return [describe_box(p.box) for p in report.containers[0].cf_only]


def test_a_reject_before_an_accept_leaves_only_the_remainder() -> None:
    assert _walk(
        [
            "-d 198.19.0.0/24 -j REJECT --reject-with icmp-port-unreachable",
            "-p tcp -m iprange --dst-range 198.19.0.0-198.19.1.255 -m tcp --dport 443 -j ACCEPT",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    ) == ["tcp 198.19.1.0/24 port 443"]


def test_an_accept_before_a_reject_keeps_what_it_accepted() -> None:
    """First match wins: 198.19.0.0/23 was accepted before the REJECT of the /16; the
    later ACCEPT of 198.19.2.0/24 comes after it and allows nothing."""
    assert _walk(
        [
            "-p tcp -m iprange --dst-range 198.19.0.0-198.19.1.255 -m tcp --dport 443 -j ACCEPT",
            "-d 198.19.0.0/16 -j REJECT --reject-with icmp-port-unreachable",
            "-p tcp -d 198.19.2.0/24 -m tcp --dport 443 -j ACCEPT",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    ) == ["tcp 198.19.0.0/23 port 443"]


def test_overlapping_ranges_are_one_set_whatever_their_order() -> None:
    one = _walk(
        [
            "-p udp -m iprange --dst-range 198.19.0.0-198.19.0.200 -m udp --dport 53 -j ACCEPT",
            "-p udp -m iprange --dst-range 198.19.0.100-198.19.0.255 -m udp --dport 53 -j ACCEPT",
            "-p udp -m multiport --dports 53,54:60 -d 198.19.0.0/24 -j ACCEPT",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    )
    assert one == ["udp 198.19.0.0/24 ports 53-60"]


def test_icmp_type_and_code_as_the_kernel_reads_them() -> None:
    """`8` is every code of type 8; `8/255` is code 255 only (silk's ICMP code -1, see
    reference/cf-asg.md); `any` is every type."""
    assert _walk(
        [
            "-p icmp -m iprange --dst-range 198.19.0.1-198.19.0.1 -m icmp --icmp-type 8/255"
            " -j ACCEPT",
            "-p icmp -d 198.19.0.2/32 -m icmp --icmp-type 8 -j ACCEPT",
            "-p icmp -d 198.19.0.3/32 -m icmp --icmp-type any -j ACCEPT",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    ) == [
        "icmp 198.19.0.1/32 type 8 code 255",
        "icmp 198.19.0.2/32 type 8",
        "icmp 198.19.0.3/32",
    ]


def test_all_protocols_a_goto_to_the_log_chain_and_return() -> None:
    assert _walk(
        [
            "-m state --state RELATED,ESTABLISHED -j ACCEPT",
            "-p tcp -m state --state INVALID -j DROP",
            "-d 198.19.9.0/24 -j RETURN",
            "-m iprange --dst-range 198.19.0.0-198.19.0.255 -g netout--h--log",
            '-m limit --limit 2/s --limit-burst 2 -j LOG --log-prefix "DENY_h "',
            "-j REJECT --reject-with icmp-port-unreachable",
        ],
        policy_text="DROP",
    ) == ["all 198.19.0.0/24"]


def test_what_returns_to_forward_meets_its_policy() -> None:
    """A RETURN hands packets back to FORWARD; with policy ACCEPT the kernel lets them go."""
    assert _walk(["-d 198.19.9.0/24 -j RETURN", "-j REJECT"]) == ["all 198.19.9.0/24"]


@pytest.mark.parametrize(
    "text",
    [
        "-p tcp -m iprange --dst-range 198.19.1.0-198.19.1.255 -m tcp --dport 80:443 -j ACCEPT",
        "-p udp -m iprange --dst-range 198.19.1.7-198.19.1.7 -m udp --dport 53 -j ACCEPT",
        "-p tcp -m iprange --dst-range 198.19.1.9-198.19.1.7 -m tcp --dport 80 -j ACCEPT",
        "-p tcp -m iprange --dst-range 198.19.1.1-198.19.1.7 -m udp --dport 80 -j ACCEPT",
    ],
)
def test_the_fast_reading_of_silks_commonest_rule_is_the_general_one(text: str) -> None:
    """silk's NewNetOutWithPortsRule as iptables-save prints it is read without splitting;
    whatever that reading gives, the general reading gives too (or both refuse the text)."""
    from reconciler.backends.iptables import cfparse

    fast = cfparse.analyse(text, 4)
    general = cfparse.analyse(text + " ", 4)  # a trailing space: not the fast path's form
    assert fast.boxes == general.boxes and bool(fast.unknown) == bool(general.unknown)


def test_icmp_code_minus_one_as_silk_writes_it_is_a_difference(
    netns: str, cell: dict[str, Path]
) -> None:
    """Cloud Controller takes ICMP `code: -1` as any code; silk writes `--icmp-type 8/255`
    (garden.ICMPCode is a uint8; rule_converter.go@390d225 Convert with rules.go@0a8b534
    :179-188), which the kernel reads as code 255 only.  asgctl allows every code: the
    comparison says so instead of calling it parity."""
    groups = [dict(g) for g in GROUPS]
    groups[0] = dict(groups[0])
    rules = [dict(r) for r in groups[0]["rules"]]
    rules[2] = {"protocol": "icmp", "destination": "198.19.12.0/24", "type": 8, "code": -1}
    groups[0]["rules"] = rules
    (cell["policies"].parent / "sg.json").write_text(json.dumps({"resources": groups}))
    res = CliRunner().invoke(
        main,
        ["import-cf", str(cell["policies"].parent / "sg.json"), "--out", str(cell["policies"])],
    )
    assert res.exit_code == 0, res.output
    load(netns, silk_cell(STORE, groups))
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    web = res.output.split("DIFFERENT web-1")[1].split("DIFFERENT")[0]
    assert "only asgctl allows: icmp 198.19.12.0/24 type 8 code 0-254\n" in web
    assert "only CF allows" not in web


def test_ipv6_chains_and_the_rate_limit_note() -> None:
    """ip6tables-save text: `-d` with an IPv6 prefix, icmpv6; silk's connection limit
    (rules.go@0a8b534:293-301 NewNetOutConnRateLimitRule) takes only packets over the rate,
    so it is noted, not read as a REJECT of every new tcp connection."""
    text = "\n".join(
        [
            "*filter",
            ":FORWARD ACCEPT [0:0]",
            ":netout--h - [0:0]",
            "-A FORWARD -s fd00:18::2/128 -o eth0 -j netout--h",
            "-A netout--h -p tcp -m conntrack --ctstate NEW -m hashlimit --hashlimit-above "
            "100/sec --hashlimit-burst 1000 --hashlimit-mode dstip,dstport --hashlimit-name h "
            "--hashlimit-htable-expire 10000 -j REJECT --reject-with icmp6-port-unreachable",
            "-A netout--h -d fd00:19::/64 -p tcp -m tcp --dport 443 -j ACCEPT",
            "-A netout--h -d fd00:1a::/64 -p ipv6-icmp -m icmp6 --icmpv6-type 128/0 -j ACCEPT",
            "-A netout--h -j REJECT --reject-with icmp6-port-unreachable",
            "COMMIT",
        ]
    )
    side = allow_sets(parse_save(text, 6))["fd00:18::2"]
    assert sorted(describe_box(g.box) for g in side.grants) == [
        "icmpv6 fd00:1a::/64 type 128 code 0",
        "tcp fd00:19::/64 port 443",
    ]
    assert len(side.notes) == 1 and side.notes[0].startswith("connection rate limit")


def test_errors_exit_1_and_change_nothing(cell: dict[str, Path]) -> None:
    """No namespace to read from, or save output that is not an iptables-save table."""
    from reconciler.backends.iptables.cfparse import CfParseError

    require_netns()
    res = cf_compare(cell, f"asgcfc-missing-{secrets.token_hex(3)}")
    assert res.exit_code == 1
    assert "error: reading CF's chains: " in res.output
    with pytest.raises(CfParseError, match="line 3: not an iptables-save line"):
        parse_save("*filter\n:FORWARD ACCEPT [0:0]\nnonsense\nCOMMIT\n", 4)
    with pytest.raises(CfParseError, match="rule in undeclared chain 'x'"):
        parse_save("*filter\n-A x -j ACCEPT\nCOMMIT\n", 4)


def test_a_hostile_chain_name_is_shown_escaped(netns: str, cell: dict[str, Path]) -> None:
    """The kernel takes an escape sequence in a chain name (iptables-restore accepts it);
    the report names the chain that accepted the packets, escaped, never raw."""
    chain = "evil\x1b[2J"
    extra = {"web-1": [f"-d 198.19.99.0/24 -g {chain}"]}
    text = silk_cell(STORE, GROUPS, extra=extra)
    text = text.replace("*filter\n", f"*filter\n:{chain} - [0:0]\n-A {chain} -j ACCEPT\n", 1)
    load(netns, text)
    res = cf_compare(cell, netns)
    assert res.exit_code == 3
    assert "\x1b" not in res.output
    assert "only CF allows: all 198.19.99.0/24\n" in res.output
    assert "by CF rule evil\\x1b[2J rule 1: -A evil\\x1b[2J -j ACCEPT" in res.output
