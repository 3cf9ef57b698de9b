"""Flow records without a lab: the NFLOG parser on bytes captured from a kernel, the prefix
scheme, aggregation and its bounds, the renderers' NFLOG targets, the config keys, and
`asgctl flows` on hostile files."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.agent.config import ConfigError, build_config, file_cell_settings
from reconciler.agent.status import fingerprint
from reconciler.backends.iptables.render import render_cell as render_iptables
from reconciler.backends.nftables.render import render_cell as render_nft
from reconciler.cli import main
from reconciler.core.cellplan import CellSettings, FlowLog, log_id
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container
from reconciler.flows.collect import (
    Aggregator,
    BoundedLabels,
    FlowContext,
    HitBook,
    RotatingWriter,
)
from reconciler.flows.nflog import LoggedPacket, parse_messages, parse_packet
from reconciler.flows.record import (
    ALLOW,
    DENY,
    RATE_ID,
    WOULD_DENY,
    Prefix,
    log_prefix,
    parse_prefix,
)
from reconciler.policy.load import load_folder

CAPTURE = Path(__file__).parent / "data" / "nflog-capture.bin"
"""Datagrams a kernel sent an NFLOG listener (4-byte big-endian length, then the bytes):
packets logged with prefix `ASG DENY 0123456789abcdef ` from a namespace's OUTPUT hook --
UDP to 127.0.0.1:53, the ICMP port unreachable it drew, TCP SYN to 127.0.0.1:9 and its RST,
TCP SYN to [::1]:443 and its RST -- batched by the kernel into one datagram."""


def _datagrams() -> list[bytes]:
    data, out = CAPTURE.read_bytes(), []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(data[4 : 4 + size])
        data = data[4 + size :]
    return out


def test_captured_kernel_datagrams_parse_into_packets_with_prefix_sequence_and_headers():
    packets = [p for d in _datagrams() for p in parse_messages(d)[0]]
    assert [p.prefix for p in packets] == [b"ASG DENY 0123456789abcdef "] * 6
    assert [p.seq for p in packets] == list(range(6))  # NFULNL_CFG_F_SEQ was on
    assert all(p.group == 16 for p in packets)
    headers = [parse_packet(p.payload) for p in packets]
    assert [(h.family, h.protocol_name, h.destination, h.port) for h in headers if h] == [
        (4, "udp", "127.0.0.1", 53),
        (4, "icmp", "127.0.0.1", None),
        (4, "tcp", "127.0.0.1", 9),
        (4, "tcp", "127.0.0.1", headers[3].port if headers[3] else None),
        (6, "tcp", "::1", 443),
        (6, "tcp", "::1", headers[5].port if headers[5] else None),
    ]


def test_a_cut_or_corrupted_datagram_never_raises_and_keeps_only_whole_messages():
    whole = _datagrams()[0]
    for cut in range(len(whole)):
        packets, _ = parse_messages(whole[:cut])
        assert len(packets) <= 6
    # A message claiming more bytes than there are ends the walk.
    bad = bytearray(whole)
    bad[0:4] = struct.pack("=I", len(whole) + 100)
    assert parse_messages(bytes(bad)) == ([], [])
    # An attribute whose length runs past its message is not read.
    for i in range(len(whole)):
        mangled = bytearray(whole)
        mangled[i] ^= 0xFF
        parse_messages(bytes(mangled))  # no exception, whatever byte is flipped


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x45", b"\x45" + b"\0" * 10, b"\x4f" + b"\0" * 19, b"\x60" + b"\0" * 20, b"\x10" * 40],
)
def test_what_is_not_a_whole_ip_header_has_no_flow(payload):
    assert parse_packet(payload) is None


def test_a_non_first_fragment_has_no_port():
    header = bytearray(b"\x45\0\0\x20" + b"\0\0\x00\x10" + b"\x40\x11\0\0" + bytes(8))
    header[12:20] = bytes([198, 18, 0, 2, 198, 19, 0, 9])
    got = parse_packet(bytes(header) + b"\x12\x34\x00\x35")
    assert got is not None and got.protocol_name == "udp" and got.port is None


def test_the_prefix_scheme_is_exact_and_carries_only_hex_ids():
    assert log_prefix(DENY, "0123456789abcdef") == "ASG DENY 0123456789abcdef "
    assert log_prefix(ALLOW, "0123456789abcdef") == "ASG OK 0123456789abcdef "
    assert log_prefix(WOULD_DENY, "0123456789abcdef") == "ASG AUDIT 0123456789abcdef "
    assert log_prefix(DENY, RATE_ID) == "ASG DENY RATE "
    for verdict in (DENY, ALLOW, WOULD_DENY):
        prefix = log_prefix(verdict, "0123456789abcdef")
        assert parse_prefix(prefix.encode()) == Prefix(verdict, "0123456789abcdef")
        assert len(prefix) <= 29  # the LOG target's limit
    assert parse_prefix(b"ASG DENY RATE ") == Prefix(DENY, RATE_ID)
    for hostile in ("payments/prod", "0123456789ABCDEF", "0123", "x" * 16, '" -j ACCEPT'):
        with pytest.raises(ValueError):
            log_prefix(DENY, hostile)
    for foreign in (
        b"ASG OK RATE ",
        b"ASG DENY 0123456789abcdef",
        b"ASG DENY 0123456789abcdef x",
        b"OTHER 0123456789abcdef ",
        b"",
    ):
        assert parse_prefix(foreign) is None


def _plan(flow: FlowLog | None = None):
    result = load_folder(Path(__file__).resolve().parent.parent / "policies")
    assert result.ok, result.findings
    policy = result.policy
    web = Container(
        "web-0", "198.18.0.2", "a1b2c3d4-0003-4e5f-9a8b-000000000003",
        "7b1d2e4f-0002-4c3a-8f2b-000000000002", "5e2f3c8a-0001-4a6e-9d1e-000000000001",
        "", "app",
    )  # fmt: skip
    settings = CellSettings(flow_log=flow) if flow else None
    return policy, compile_cell(policy, (web,), "cell-1", settings)


def _ipv4(dst: str, proto: int, port: int, src: str = "198.18.0.2") -> bytes:
    ip = bytearray(20)
    ip[0], ip[9] = 0x45, proto
    ip[12:16] = bytes(int(x) for x in src.split("."))
    ip[16:20] = bytes(int(x) for x in dst.split("."))
    return bytes(ip) + struct.pack("!HH", 40000, port) + bytes(16)


def _packet(prefix: str, payload: bytes, at: float = 100.0) -> LoggedPacket:
    return LoggedPacket(2, 16, prefix.encode(), payload, None, at)


def test_packets_of_one_flow_aggregate_into_one_record_named_through_plan_and_directory():
    policy, plan = _plan()
    ctx = FlowContext.build("cell-1", plan, policy.directory)
    agg = Aggregator(100)
    prefix = log_prefix(DENY, log_id(plan.containers[0].chain_id))
    for at in (100.0, 101.0, 102.5):
        agg.add(_packet(prefix, _ipv4("198.19.9.9", 6, 8443), at), ctx, at)
    (record,) = agg.flush("cell-1")
    assert (record.container, record.app, record.space, record.org) == (
        "web-0",
        "payments/prod/backend",
        "payments/prod",
        "payments",
    )
    assert (record.destination, record.port, record.protocol, record.verdict, record.count) == (
        "198.19.9.9",
        8443,
        "tcp",
        "deny",
        3,
    )
    assert record.to_dict()["time"] == "1970-01-01T00:01:40Z"
    assert agg.flush("cell-1") == []  # a new window


def test_an_allow_names_the_rule_its_group_and_the_file_line_that_asked_for_it():
    policy, plan = _plan()
    logged = next(r for g in plan.groups for r in g.rules if r.item.log)
    ctx = FlowContext.build("cell-1", plan, policy.directory)
    agg = Aggregator(100)
    dest = logged.item.destination.first_address
    agg.add(_packet(log_prefix(ALLOW, log_id(logged.id)), _ipv4(dest, 6, 443)), ctx, 0)
    (record,) = agg.flush("cell-1")
    assert record.rule is not None and record.rule.id == logged.id
    group = next(g.id for g in plan.groups if logged in g.rules)
    assert record.rule.group == group
    assert record.rule.sources == tuple(str(s) for s in logged.sources)
    assert all(".yaml:" in s for s in record.rule.sources)


def test_the_aggregate_cap_bounds_a_window_and_counts_what_it_drops():
    policy, plan = _plan()
    ctx = FlowContext.build("cell-1", plan, policy.directory)
    agg = Aggregator(10)
    prefix = log_prefix(DENY, log_id(plan.containers[0].chain_id))
    for port in range(1, 1001):
        agg.add(_packet(prefix, _ipv4("198.19.9.9", 17, port)), ctx, 0)
    agg.add(_packet("not ours ", _ipv4("198.19.9.9", 17, 1)), ctx, 0)
    assert len(agg) == 10
    assert agg.drops.counts["aggregate-cap"] == 990
    assert agg.drops.counts["unparsed"] == 1
    assert len(agg.flush("cell-1")) == 10


def test_a_deny_prefix_names_the_container_even_from_an_unknown_source():
    policy, plan = _plan()
    ctx = FlowContext.build("cell-1", plan, policy.directory)
    agg = Aggregator(10)
    prefix = log_prefix(DENY, log_id(plan.containers[0].chain_id))
    agg.add(_packet(prefix, _ipv4("198.19.9.9", 6, 1, src="198.18.9.9")), ctx, 0)
    agg.add(_packet(log_prefix(DENY, RATE_ID), _ipv4("198.19.9.9", 6, 2)), ctx, 0)
    first, rate = agg.flush("cell-1")
    assert first.container == "web-0" and first.source == "198.18.9.9"
    assert rate.container == "web-0" and rate.reason == "rate-limit"


def test_bounded_labels_keep_the_first_n_and_count_the_rest_as_other():
    labels = BoundedLabels(2)
    assert labels.admit(("a", "s")) == ("a", "s")
    assert labels.admit(("b", "s")) == ("b", "s")
    assert labels.admit(("c", "s")) == ("other", "other")
    assert labels.admit(("a", "s")) == ("a", "s")


def test_nflog_mode_renders_nflog_targets_with_the_group_in_both_backends():
    _, plan = _plan(FlowLog("nflog", 7, 500))
    lines = [line for rules in render_iptables(plan, 4).chains.values() for line in rules]
    deny = [line for line in lines if "asg:deny-log" in line]
    assert deny and all(
        line.endswith(
            f'-m limit --limit 500/sec --limit-burst 500 -m comment --comment "asg:deny-log" '
            f'-j NFLOG --nflog-prefix "ASG DENY {line.split("ASG DENY ")[1][:16]} " '
            "--nflog-group 7"
        )
        for line in deny
    )
    assert any('-j NFLOG --nflog-prefix "ASG OK ' in line for line in lines)
    assert not any("-j LOG" in line for line in lines)
    nft = [r for rules in render_nft(plan, 4).chains.values() for r in rules]
    logs = [json.loads(r) for r in nft if '"log"' in r]
    assert logs and all(e["log"]["group"] == 7 for rule in logs for e in rule["expr"] if "log" in e)


def test_the_flow_setting_is_part_of_the_plan_digest_but_the_default_keeps_old_digests():
    _, log_plan = _plan()
    _, nflog_plan = _plan(FlowLog("nflog"))
    assert log_plan.digest() == replace(log_plan, settings=CellSettings()).digest()
    assert log_plan.digest() != nflog_plan.digest()


def test_flow_settings_are_checked_and_name_the_key():
    base = {"source": "x", "containers": "y", "cell": "c"}
    # The kernel log stays the default: it logs whether or not an agent runs.
    assert build_config(base, {}).flow_log == "log"
    assert build_config({**base, "flow-log": "nflog"}, {}).flow_log_settings == FlowLog("nflog")
    # python-iptables corrupts its heap building NFLOG: libiptc refuses nflog by name (and
    # the backend refuses an NFLOG line too, never crashing).
    with pytest.raises(ConfigError, match="flow-log: nflog needs backend iptables or nftables"):
        build_config({**base, "backend": "libiptc", "flow-log": "nflog"}, {})
    with pytest.raises(ConfigError, match="flow-log: nflog needs backend"):
        file_cell_settings({"flow-log": "nflog"}, backend="libiptc")
    for key, value, message in (
        ("flow-log", "syslog", "flow-log:"),
        ("flow-log-group", 0, "flow-log-group:"),
        ("flow-log-group", "sixteen", "flow-log-group:"),
        ("flow-log-rate", 20000, "flow-log-rate:"),
        ("flow-log-window", "0s", "flow-log-window:"),
        ("flow-log-max-aggregates", 0, "flow-log-max-aggregates:"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_config({**base, key: value}, {})
    assert file_cell_settings({}).flow_log == FlowLog("log") == CellSettings().flow_log
    assert file_cell_settings({"flow-log": "nflog", "flow-log-group": 9}).flow_log == FlowLog(
        "nflog", 9
    )
    assert build_config({**base, "flow-unused-after": "3d"}, {}).flow_unused_after == 3 * 86400


def test_the_writer_rotates_by_size_and_keeps_two_old_files(tmp_path):
    writer = RotatingWriter(tmp_path / "flows.jsonl", 100)
    for i in range(10):
        writer.write([f'{{"n":{i},"pad":"{"x" * 40}"}}'])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert '"n":9' in (tmp_path / "flows.jsonl").read_text()


def test_rules_without_a_hit_for_n_days_are_unused_and_a_hit_resets_the_clock(tmp_path):
    book = HitBook(tmp_path / "hits.json")
    book.present(["r1", "r2"], now=0)
    book.hit("r1", 5 * 86400)
    book.hit("unknown", 5 * 86400)  # not in the plan: not tracked
    assert [rid for rid, _ in book.unused(7 * 86400, now=8 * 86400)] == ["r2"]
    book.save()
    again = HitBook(tmp_path / "hits.json")
    assert again.unused(7 * 86400, now=13 * 86400) == [("r1", 5 * 86400), ("r2", 0)]
    (tmp_path / "hits.json").write_text("[garbage")
    assert HitBook(tmp_path / "hits.json").since == {}  # a corrupt book starts afresh


def test_packet_counters_in_status_do_not_make_a_new_push():
    doc = {"cell": "c", "flows": {"counters": {"drops": {"kernel": 1}}, "unusedRules": []}}
    moved = json.loads(json.dumps(doc))
    moved["flows"]["counters"]["drops"]["kernel"] = 99
    assert fingerprint(doc) == fingerprint(moved)
    moved["flows"]["unusedRules"] = [{"id": "ab"}]
    assert fingerprint(doc) != fingerprint(moved)


GOOD = {
    "v": 1,
    "time": "2026-12-06T06:30:10Z",
    "end": "2026-12-06T06:30:12Z",
    "cell": "cell-1",
    "container": "web-0",
    "source": "198.18.0.2",
    "app": "payments/prod/backend",
    "app_id": "a1",
    "space": "payments/prod",
    "space_id": "s1",
    "org": "payments",
    "org_id": "o1",
    "destination": "198.19.9.9",
    "port": 443,
    "protocol": "tcp",
    "verdict": "deny",
    "count": 3,
}


def _flows(*args: str):
    return CliRunner().invoke(main, ["flows", *args])


def test_flows_filters_by_app_verdict_and_since(tmp_path):
    other = {**GOOD, "app": "payments/prod/frontend", "app_id": "a2", "verdict": "allow"}
    old = {**GOOD, "time": "2020-01-01T00:00:00Z", "end": "2020-01-01T00:00:01Z"}
    path = tmp_path / "flows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (GOOD, other, old)))
    res = _flows(
        "--file", str(path), "--app", "backend", "--since", "2026-01-01", "--format", "json"
    )
    assert res.exit_code == 0, res.output
    assert [json.loads(x) for x in res.output.splitlines()] == [GOOD]
    res = _flows("--file", str(path), "--app", "a2", "--verdict", "allow")
    assert res.exit_code == 0 and "payments/prod/frontend" in res.output
    assert "payments/prod/backend" not in res.output
    assert _flows("--file", str(path), "--since", "yesterday").exit_code == 1


def test_a_hostile_flows_file_gives_named_errors_never_a_traceback(tmp_path):
    path = tmp_path / "flows.jsonl"
    lines = [
        json.dumps(GOOD).encode(),
        b"{not json",
        json.dumps({**GOOD, "count": "3"}).encode(),
        json.dumps({**GOOD, "port": 70000}).encode(),
        json.dumps({**GOOD, "verdict": "maybe"}).encode(),
        b"[" * 20000 + b"]" * 20000,  # deeper than the JSON parser recurses
        b"\xff\xfe garbage",
        json.dumps({**GOOD, "rule": {"id": 1}}).encode(),
        json.dumps({**GOOD, "app": "\x1b[2J\x1b[Hforged\nrow"}).encode(),
        b"x" * 200_000,
        json.dumps([1, 2]).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    res = CliRunner().invoke(main, ["flows", "--file", str(path)])
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    for number, field in (
        (2, "not JSON"),
        (3, "'count'"),
        (4, "'port'"),
        (5, "'verdict'"),
        (6, "not JSON"),
        (7, "not JSON"),
        (8, "'rule'"),
        (10, "longer than"),
        (11, "not a JSON object"),
    ):
        assert any(f"{path}:{number}: " in e and field in e for e in errors), (number, errors)
    assert "\x1b" not in res.output and "\\x1b[2J" in res.output  # escaped, one line
    table = [line for line in res.output.splitlines() if not line.startswith("error:")]
    assert len(table) == 3  # header and the two valid records


def test_a_file_that_never_ends_or_never_stops_being_wrong_is_bounded(tmp_path):
    """/dev/zero has no end and no newline; a million bad lines must not become a million
    kept messages: the reader refuses what is not a regular file and counts past the first."""
    res = _flows("--file", "/dev/zero")
    assert res.exit_code == 1 and "/dev/zero: not a regular file" in res.output
    path = tmp_path / "flows.jsonl"
    path.write_bytes(b"{not json\n" * 100_000)
    res = _flows("--file", str(path))
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 1 and len(errors) == 21
    assert errors[-1] == f"error: ... and {100_000 - 20} more bad lines"


def test_flows_without_records_says_where_it_looked(tmp_path):
    res = _flows("--state-dir", str(tmp_path))
    assert res.exit_code == 1 and "flows/flows.jsonl" in res.output
    assert _flows("--state-dir", str(tmp_path), "--file", "x").exit_code == 2


def test_status_lists_unused_rules_per_cell_escaped_and_schema_checked():
    from reconciler.agent.fleet import Fleet, _row, render_fleet

    doc = {
        "apiVersion": "asgctl/v1",
        "kind": "CellStatus",
        "cell": "cell-1",
        "conditions": [{"type": "Ready", "status": "True"}],
        "flows": {
            "group": 16,
            "unusedAfterSeconds": 604800,
            "unusedRulesTotal": 1,
            "unusedRules": [
                {
                    "id": "20fd7598869e005d0b2860f6bfb4aea5",
                    "group": "6934918e3a7a615d8e9b7bf0de186abf",
                    "lastHit": "2026-11-29T00:00:00Z",
                    "sources": ["SecurityGroup/x\x1b[2J rules[0] (sg.yaml:4)"],
                }
            ],
        },
    }
    row = _row(Path("."), "cell-1", "status/cell-1", json.dumps(doc).encode(), "")
    assert row.error == "" and row.unused_total == 1
    text = render_fleet(Fleet("url", "main", "", (row,)), "text")
    assert "UNUSED RULES" in text and "20fd7598869e005d0b2860f6bfb4aea5" in text
    assert "(sg.yaml:4)" in text and "\x1b" not in text
    doc["flows"]["unusedRules"][0]["id"] = "'; rm -rf /"  # not an id: the schema refuses it
    bad = _row(Path("."), "cell-1", "status/cell-1", json.dumps(doc).encode(), "")
    assert bad.error and "unusedRules" in bad.error


@pytest.mark.requires("libiptc")
def test_the_libiptc_backend_refuses_an_nflog_line_instead_of_crashing():
    import iptc  # type: ignore[import-not-found, import-untyped]

    from reconciler.backends.iptables.libiptc import _rule, _words

    line = (
        '-A ASG-C-x -m comment --comment "asg:deny-log" -j NFLOG '
        '--nflog-prefix "ASG DENY 1716500248a327f3 " --nflog-group 16'
    )
    with pytest.raises(ValueError, match="NFLOG targets cannot be built through libiptc"):
        _rule(iptc, 4, _words(line)[2:])


def test_what_the_kernel_could_not_queue_is_counted_exactly_from_sequence_gaps():
    """A listener that does not read while 5,000 packets are logged: the kernel drops what
    its small buffer cannot hold, and the gaps in NFULA_SEQ count exactly those."""
    import subprocess
    import uuid

    from reconciler.flows.nflog import NflogSocket
    from tests.conftest import require_netns

    require_netns()
    ns = f"asgflowtest{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [*run, "iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "NFLOG",
             "--nflog-prefix", "ASG DENY 0123456789abcdef ", "--nflog-group", "16"],
            check=True,
        )  # fmt: skip
        sock = NflogSocket(16, ns, rcvbuf=16384)
        try:
            sender = (
                "import socket\ns = socket.socket(2, 2)\n"
                "for _ in range(5000): s.sendto(b'x', ('127.0.0.1', 9))"
            )
            subprocess.run([*run, "python3", "-c", sender], check=True)
            read = 0
            while batch := sock.receive(0.5):
                read += len(batch)
            lost = sock.lost()
            assert lost > 0 and read > 0
            assert read + lost <= 5000  # gaps count what was lost, not more
            assert 5000 - (read + lost) < 64 * 4  # at most the tail the last batches held
        finally:
            sock.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
