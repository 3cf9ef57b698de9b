"""`asgctl suggest` without a lab: the proposal from flow records, checked against the
project's own loader, validator and compiled plan, the golden files, and hostile records.

The promise under test: the documents allow exactly the observed flows -- every one of them,
and no other (address, port, protocol) -- unless `--widen-to` asks for prefixes; they load
with the example repository as it is; and no record can break the YAML, name a file outside
the output folder, or make the command print a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.core.policytest import run_tests
from reconciler.flows.suggest import (
    MARKER,
    MAX_LISTED,
    Options,
    SuggestError,
    file_names,
    propose,
    render_app,
)
from reconciler.policy.grammar import (
    MAX_DESTINATIONS_PER_RULE,
    parse_destination_ips,
    parse_port_ranges,
)
from reconciler.policy.load import load_folder
from tests.golden import assert_golden

ROOT = Path(__file__).resolve().parent.parent
FLOWS = Path(__file__).parent / "data" / "suggest" / "flows.jsonl"
FRONTEND = "a1b2c3d4-0004-4e5f-9a8b-000000000004"  # payments/prod/frontend in policies/
BLOG = "a1b2c3d4-0009-4e5f-9a8b-000000000009"  # marketing/web/blog


def _suggest(*args: str) -> Result:
    return CliRunner().invoke(main, ["suggest", *args])


def _repo(tmp_path: Path) -> Path:
    """A copy of the example policy repository (policies/ and the schemas its hints name)."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    return tmp_path / "policies"


def _record(dest: str, port: int | None, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "time": "2026-12-06T06:00:00Z",
        "end": "2026-12-06T06:00:01Z",
        "cell": "cell-1",
        "container": "h",
        "source": "198.18.0.2",
        "app": "payments/prod/frontend",
        "app_id": FRONTEND,
        "destination": dest,
        "port": port,
        "protocol": "tcp",
        "verdict": "deny",
        "count": 1,
    }
    doc.update(over)
    return doc


def _located(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"flows.jsonl:{i}", d) for i, d in enumerate(docs, 1)]


def _observed(path: Path) -> set[tuple[str, str, str, int]]:
    """(app GUID, protocol, address, port) of the deny/would-deny tcp/udp records of a file."""
    out = set()
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if (
            r["verdict"] != "allow"
            and r["app_id"]
            and r["protocol"] in ("tcp", "udp")
            and not r.get("reason")
        ):
            out.add((r["app_id"], r["protocol"], r["destination"], r["port"]))
    return out


def _granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str, int]]:
    """Every (app GUID, protocol, address, port) the documents allow, expanded through the
    project's own parsers of `ips` and `ports` (so a range or CIDR counts every address)."""
    dests = {d["name"]: d for d in docs if d["kind"] == "Destination"}
    out = set()
    for policy in (d for d in docs if d["kind"] == "EgressPolicy"):
        dest = dests[policy["destination"]]
        ips, errors = parse_destination_ips(dest["ips"])
        ports, port_errors = parse_port_ranges(dest["ports"])
        assert not errors and not port_errors and ips and ports
        for rng in ips:
            assert rng.last - rng.first < 4096, "a test set never grants this many"
            make = ipaddress.IPv4Address if rng.version == 4 else ipaddress.IPv6Address
            for address in range(rng.first, rng.last + 1):
                for pr in ports:
                    for port in range(pr.first, pr.last + 1):
                        out.add(
                            (policy["source"]["id"], dest["protocol"], str(make(address)), port)
                        )
    return out


def _documents(texts: list[str]) -> list[dict[str, Any]]:
    return [d for text in texts for d in yaml.safe_load_all(text) if d is not None]


# --------------------------------------------------------------------------------------------
# the proposal: exactly the observed flows


def test_the_sample_records_give_the_golden_files_one_per_app(tmp_path: Path) -> None:
    out = _repo(tmp_path) / "suggested"
    res = _suggest("--file", str(FLOWS), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "marketing_web_blog.yaml",
        "payments_prod_frontend.yaml",
    ]
    for path in sorted(out.iterdir()):
        assert_golden(f"suggest/{path.name}", path.read_text())
    # What cannot become a grant is said, on stderr, and not written.
    assert "not proposed: 1 record of protocol icmp" in res.stderr
    assert "not proposed: 1 record of the connection limit" in res.stderr
    assert "not proposed: 1 record of a source that is no container" in res.stderr


def test_the_proposal_allows_every_observed_flow_and_nothing_else(tmp_path: Path) -> None:
    out = _repo(tmp_path) / "suggested"
    assert _suggest("--file", str(FLOWS), "--out", str(out)).exit_code == 0
    docs = _documents([p.read_text() for p in sorted(out.iterdir())])
    assert _granted(docs) == _observed(FLOWS)
    # Granted to the app by GUID, running containers only.
    policies = [d for d in docs if d["kind"] == "EgressPolicy"]
    assert {p["source"]["id"] for p in policies} == {FRONTEND, BLOG}
    assert {p["app_lifecycle"] for p in policies} == {"running"}


def _cases(flows: set[tuple[str, str, str, int]], expect: str) -> list[dict[str, Any]]:
    def to(address: str, port: int, protocol: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{host}:{port}/{protocol}"

    return [
        {"app": app, "to": to(address, port, proto), "expect": expect}
        for app, proto, address, port in sorted(flows)
    ]


def _neighbours(observed: set[tuple[str, str, str, int]]) -> set[tuple[str, str, str, int]]:
    """For each flow: the next and previous port, the next and previous address, the other
    protocol, and the other app -- whichever of them was not observed itself."""
    out = set()
    for app, proto, address, port in observed:
        ip = ipaddress.ip_address(address)
        other_app = BLOG if app == FRONTEND else FRONTEND
        other_proto = "udp" if proto == "tcp" else "tcp"
        for cand in (
            (app, proto, address, port + 1),
            (app, proto, address, port - 1),
            (app, proto, str(ip + 1), port),
            (app, proto, str(ip - 1), port),
            (app, other_proto, address, port),
            (other_app, proto, address, port),
        ):
            if cand not in observed:
                out.add(cand)
    return out


def test_with_the_example_repository_it_validates_and_the_compiled_plan_allows_exactly_them(
    tmp_path: Path,
) -> None:
    """The files load with the repository's own documents (Directory, groups, policies) and,
    compiled as a cell would compile them, allow each observed flow; the neighbours of each
    (a port, an address, the protocol, the other app) stay denied."""
    repo = _repo(tmp_path)
    observed = _observed(FLOWS)

    def results(expect_observed: str) -> list[Any]:
        doc = {
            "kind": "PolicyTest",
            "name": "suggest-probes",
            "cases": _cases(observed, expect_observed) + _cases(_neighbours(observed), "deny"),
        }
        (repo / "tests" / "suggest-probes.yaml").write_text(yaml.safe_dump(doc))
        loaded = load_folder(repo)
        assert loaded.ok, [str(f) for f in loaded.findings]
        assert not [f for f in loaded.findings if f.severity == "warning" and "suggested" in str(f)]
        return [r for r in run_tests(loaded.policy) if r.test.name.startswith("suggest-probes[")]

    before = results("deny")  # the records say these were denied: the repository agrees
    assert before and all(r.passed for r in before), [r.subject for r in before if not r.passed]
    assert _suggest("--file", str(FLOWS), "--out", str(repo / "suggested")).exit_code == 0
    after = results("allow")
    failed = [(r.subject, r.endpoint, r.got) for r in after if not r.passed]
    assert not failed
    assert len(after) > 2 * len(observed)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([FRONTEND, BLOG]),
            st.sampled_from(["tcp", "udp"]),
            st.sampled_from(["198.19.0.", "fd00:19::"]),
            st.integers(1, 40),
            st.sampled_from([1, 2, 3, 5, 443, 444, 8080, 65535]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_for_any_records_the_grants_are_exactly_the_flows(
    flows: list[tuple[str, str, str, int, int]],
) -> None:
    docs = [
        _record(f"{net}{host}", port, app_id=app, app="", protocol=proto)
        for app, proto, net, host, port in flows
    ]
    proposal = propose(_located(docs), Options())
    assert not proposal.errors
    observed = {
        (app, proto, str(ipaddress.ip_address(f"{net}{host}")), port)
        for app, proto, net, host, port in flows
    }
    assert _granted(_documents([render_app(a, None) for a in proposal.apps])) == observed


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["tcp", "udp"]),
            st.sampled_from(["198.19.0.", "fd00:19::"]),
            st.integers(1, 40),
            st.sampled_from([1, 2, 3, 443, 8080]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_widened_grants_are_the_prefixes_of_the_flows_with_exactly_their_ports(
    flows: list[tuple[str, str, int, int]],
) -> None:
    """With --widen-to /30 (--widen-to6 /126): an address is granted a port exactly when an
    observed flow went to that port at an address of the same prefix."""
    docs = [_record(f"{net}{host}", port, protocol=proto) for proto, net, host, port in flows]
    proposal = propose(_located(docs), Options(widen_v4=30, widen_v6=126))
    granted = _granted(_documents([render_app(a, None) for a in proposal.apps]))

    def prefix(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        ip = ipaddress.ip_address(address)
        return ipaddress.ip_network((ip, 30 if ip.version == 4 else 126), strict=False)

    expected = {
        (FRONTEND, proto, str(member), port)
        for proto, net, host, port in flows
        for member in prefix(f"{net}{host}")
    }
    assert granted == expected


def test_the_order_of_the_records_does_not_change_a_byte() -> None:
    docs = [json.loads(line) for line in FLOWS.read_text().splitlines()]
    first = propose(_located(docs), Options())
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    second = propose(_located(shuffled), Options())
    assert [render_app(a, None) for a in first.apps] == [render_app(a, None) for a in second.apps]
    assert first.notes == second.notes


def test_widen_to_merges_addresses_into_prefixes_and_keeps_ports_exact() -> None:
    res = _suggest("--file", str(FLOWS), "--widen-to", "/24", "--widen-to6", "/64")
    assert res.exit_code == 0, res.stderr
    assert_golden("suggest/widened.yaml", res.stdout)
    docs = _documents([res.stdout])
    blog = next(d for d in docs if d["kind"] == "Destination" and BLOG in d["name"])
    # Two hosts of one /24, seen on 80 and 443: the /24 on exactly those two ports.
    assert blog["ips"] == ["198.19.50.0/24"] and blog["ports"] == [80, 443]
    v6 = next(d for d in docs if d["kind"] == "Destination" and "fd00" in str(d["ips"]))
    assert v6["ips"] == ["fd00:19:41::/64"] and v6["ports"] == [443]


def test_ports_merge_into_a_range_only_when_every_port_of_it_was_seen() -> None:
    docs = [_record("198.19.0.1", p) for p in (6379, 6380, 6381, 6383)]
    (app,) = propose(_located(docs), Options()).apps
    (grant,) = app.grants
    assert grant.destination["ports"] == ["6379-6381", 6383]


def test_deny_and_would_deny_are_proposed_alike_and_allows_never() -> None:
    docs = [
        _record("198.19.0.1", 80, verdict="deny"),
        _record("198.19.0.2", 80, verdict="would-deny"),
        _record("198.19.0.3", 80, verdict="allow", rule={"id": "a", "group": "b", "sources": []}),
    ]
    (app,) = propose(_located(docs), Options()).apps
    assert [g.destination["ips"] for g in app.grants] == [["198.19.0.1-198.19.0.2"]]
    (audit,) = propose(_located(docs), Options(verdicts=("would-deny",))).apps
    assert [g.destination["ips"] for g in audit.grants] == [["198.19.0.2"]]


def test_the_comment_lists_the_flows_up_to_a_bound_and_a_destination_holds_at_most_6000_ips():
    # Every other address, so none join into a range: one ips entry each.
    hosts = [ipaddress.ip_address("198.18.0.0") + 2 * i for i in range(6100)]
    docs = [_record(str(h), 443) for h in hosts]
    (app,) = propose(_located(docs), Options()).apps
    assert [len(g.destination["ips"]) for g in app.grants] == [MAX_DESTINATIONS_PER_RULE, 100]
    assert [len(g.flows) for g in app.grants] == [MAX_DESTINATIONS_PER_RULE, 100]
    names = [g.destination["name"] for g in app.grants]
    assert names == [f"{FRONTEND}-tcp-443", f"{FRONTEND}-tcp-443-part2"]
    text = render_app(app, None)
    assert text.count("#   tcp ") == 2 * MAX_LISTED
    assert f"#   ... and {MAX_DESTINATIONS_PER_RULE - MAX_LISTED} more (" in text
    assert f"#   ... and {100 - MAX_LISTED} more (" in text


# --------------------------------------------------------------------------------------------
# untrusted records


def test_a_hostile_app_name_cannot_break_the_yaml_or_leave_the_output_folder(
    tmp_path: Path,
) -> None:
    names = {
        "evil/x/y\n- kind: EgressPolicy": "app-one",  # not a Directory name: the GUID stands in
        "../../..": "app-two",  # a Directory could hold it; the file name cannot climb
        "o/s/..": "app-three",  # a valid name; its file name is made safe
        "o/s/#:&*!|>'\"%@`{}[]": "app-four",
        "o/s/\u202eevil": "app-five",  # a bidi control: not printable, not a Directory name
    }
    cell = "cell\n- kind: EgressPolicy\x1b[2J\u2028#"  # in a comment: stays in it
    docs = [_record("198.19.0.1", 80, app=n, app_id=g, cell=cell) for n, g in names.items()]
    out = tmp_path / "out"
    (tmp_path / "flows.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    res = _suggest("--file", str(tmp_path / "flows.jsonl"), "--out", str(out))
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in out.iterdir())
    four = "o_s" + "_" * 17 + ".yaml"  # each character but letters, digits, -_. is a _
    assert written == sorted(["app-one.yaml", "_.._.yaml", "o_s_.yaml", four, "app-five.yaml"])
    assert [p for p in tmp_path.rglob("*.yaml") if p.parent != out] == []
    for path in out.iterdir():
        text = path.read_text()
        loaded = [d for d in yaml.safe_load_all(text) if d]
        assert [d["kind"] for d in loaded] == ["Destination", "EgressPolicy"]
        for line in text.splitlines():  # every comment stays one comment line
            assert line.isprintable()
    loaded_four = yaml.safe_load_all((out / four).read_text())
    assert any("o/s/#:&*!|>'\"%@`{}[]" in d["description"] for d in loaded_four if d)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (_record("198.19.0.1", 80, app_id="../../etc"), "field 'app_id'"),
        (_record("198.19.0.1", 80, app_id="org/space/app"), "field 'app_id'"),
        (_record("not-an-address", 80), "field 'destination'"),
        (_record("fe80::1%eth0", 80), "field 'destination'"),
        (_record("198.19.0.1", None), "field 'port'"),
        (_record("198.19.0.1", 80, count=0), "field 'count'"),
        (_record("198.19.0.1", 80, verdict="maybe"), "field 'verdict'"),
        (_record("198.19.0.1", 80, protocol="tcp\n"), "field 'protocol'"),
        (_record("198.19.0.1", 80, protocol="x" * 40), "field 'protocol'"),
    ],
)
def test_a_bad_record_is_an_error_at_its_line_and_nothing_is_written(
    tmp_path: Path, record: dict[str, Any], field: str
) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_text(json.dumps(_record("198.19.0.9", 443)) + "\n" + json.dumps(record) + "\n")
    res = _suggest("--file", str(path), "--out", str(tmp_path / "out"))
    assert res.exit_code == 1
    assert f"error: {path}:2: {field}" in res.stderr
    assert "nothing was written" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_flows_file_is_errors_with_lines_never_a_traceback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_bytes(b"\x00\xff not json\n" + b"[" * 100_000 + b"\n" + b"x" * 200_000 + b"\n")
    res = _suggest("--file", str(path))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert f"{path}:1: not JSON" in res.stderr
    assert f"{path}:2: line longer than" in res.stderr
    assert f"{path}:3: line longer than" in res.stderr
    assert res.stdout == ""


def test_a_file_that_never_ends_is_refused(tmp_path: Path) -> None:
    res = _suggest("--file", "/dev/zero")
    assert res.exit_code == 1 and "/dev/zero: not a regular file" in res.stderr
    res = _suggest("--file", str(tmp_path / "missing"))
    assert res.exit_code == 1 and "No such file or directory" in res.stderr


def test_other_protocols_are_noted_by_number_not_proposed() -> None:
    docs = [_record("198.19.0.1", None, protocol=p) for p in ("47", "sctp", "47")]
    proposal = propose(_located(docs), Options())
    assert proposal.apps == () and not proposal.errors
    assert proposal.notes == (
        "not proposed: 2 records of protocol 47 (a Destination can say it only as protocol all)",
        "not proposed: 1 record of protocol sctp (a Destination can say it only as protocol all)",
    )


def test_too_many_distinct_flows_is_a_clear_error_not_unbounded_memory(tmp_path: Path) -> None:
    docs = [_record("198.19.0.1", p) for p in range(1, 11)]
    with pytest.raises(SuggestError, match="more than 5 distinct flows"):
        propose(_located(docs), Options(max_flows=5))


def test_the_cells_of_a_flow_are_bounded_and_do_not_depend_on_order() -> None:
    docs = [_record("198.19.0.1", 80, cell=f"cell-{i:02d}") for i in range(30)]
    (app,) = propose(_located(docs), Options()).apps
    ((_, seen),) = app.grants[0].flows
    assert seen.cells == tuple(f"cell-{i:02d}" for i in range(8)) and seen.more_cells
    assert seen.count == 30
    (again,) = propose(_located(docs[::-1]), Options()).apps
    assert again == app


# --------------------------------------------------------------------------------------------
# the command


def test_it_never_writes_over_a_file_it_did_not_write_nor_through_a_symlink(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "payments_prod_frontend.yaml"
    mine.write_text("kind: Destination\nname: hand-written\n")
    res = _suggest("--file", str(FLOWS), "--out", str(out))
    assert res.exit_code == 1 and f"{mine}: exists; nothing was written" in res.stderr
    assert mine.read_text() == "kind: Destination\nname: hand-written\n"
    assert not (out / "marketing_web_blog.yaml").exists()  # nothing at all was written
    mine.unlink()
    secret = tmp_path / "secret"
    secret.write_text("keep")
    mine.symlink_to(secret)
    res = _suggest("--file", str(FLOWS), "--out", str(out))
    assert res.exit_code == 1 and secret.read_text() == "keep"
    link = tmp_path / "link"
    mine.unlink()
    link.symlink_to(out)
    res = _suggest("--file", str(FLOWS), "--out", str(link))
    assert res.exit_code == 1 and "is a symlink" in res.stderr
    assert list(out.iterdir()) == []


def test_a_second_run_into_the_same_folder_writes_nothing(tmp_path: Path) -> None:
    """Rewritten from newer records (or with --policies), an earlier proposal would lose
    what it granted: each proposal goes into a folder of its own."""
    out = tmp_path / "out"
    assert _suggest("--file", str(FLOWS), "--out", str(out)).exit_code == 0
    first = {p.name: p.read_text() for p in out.iterdir()}
    assert all(t.startswith(MARKER + "\n") for t in first.values())
    res = _suggest("--file", str(FLOWS), "--out", str(out))
    assert res.exit_code == 1 and "exists; nothing was written" in res.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == first


def test_with_policies_what_the_repository_already_allows_is_left_out(tmp_path: Path) -> None:
    """A rerun after the first proposal was merged: the same records propose nothing more,
    and a new flow gets names the repository does not use yet."""
    repo = _repo(tmp_path)
    assert _suggest("--file", str(FLOWS), "--out", str(repo / "suggested")).exit_code == 0
    res = _suggest("--file", str(FLOWS), "--policies", str(repo), "--out", str(repo / "again"))
    assert res.exit_code == 0, res.output
    assert "nothing to propose" in res.stderr
    assert "not proposed: 10 flows the policy already allows to its app" in res.stderr
    assert not (repo / "again").exists()
    # A new address on a port set already granted: a new Destination, under a new name.
    more = tmp_path / "more.jsonl"
    new = _record("198.19.40.99", 5432, time="2026-12-07T06:00:00Z", end="2026-12-07T06:00:00Z")
    more.write_text(FLOWS.read_text() + json.dumps(new) + "\n")
    res = _suggest("--file", str(more), "--policies", str(repo), "--out", str(repo / "again"))
    assert res.exit_code == 0, res.output
    (written,) = (repo / "again").iterdir()
    docs = _documents([written.read_text()])
    assert [(d["kind"], d["name"]) for d in docs] == [
        ("Destination", f"{FRONTEND}-tcp-5432-v2"),
        ("EgressPolicy", f"{FRONTEND}-tcp-5432-v2"),
    ]
    assert docs[0]["ips"] == ["198.19.40.99"]
    assert load_folder(repo).ok


def test_policies_that_do_not_validate_are_an_error(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "broken.yaml").write_text("kind: Destination\nname: x\nprotocol: carrier-pigeon\n")
    res = _suggest("--file", str(FLOWS), "--policies", str(repo))
    assert res.exit_code == 1 and "broken.yaml" in res.stderr
    assert f"--policies {repo}: does not validate" in res.stderr and res.stdout == ""


def test_stdout_is_one_valid_multi_document_stream_and_filters_apply() -> None:
    res = _suggest("--file", str(FLOWS), "--app", "blog", "--since", "2026-12-06T07:30:00Z")
    assert res.exit_code == 0, res.stderr
    docs = _documents([res.stdout])
    assert {d["source"]["id"] for d in docs if d["kind"] == "EgressPolicy"} == {BLOG}
    res = _suggest("--file", str(FLOWS), "--since", "2099-01-01")
    assert res.exit_code == 0 and res.stdout == "" and "nothing to propose" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--widen-to", "/4"], "/8 to /32"),
        (["--widen-to6", "64x"], "/32 to /128"),
        (["--since", "yesterday"], "--since"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    res = _suggest("--file", str(FLOWS), *args)
    assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output


def test_file_names_are_distinct_for_apps_that_look_alike() -> None:
    docs = [
        _record("198.19.0.1", 80, app="o/s/Web", app_id="g1"),
        _record("198.19.0.1", 80, app="o/s/web", app_id="g2"),
        _record("198.19.0.1", 80, app="o/s_web/x", app_id="g3"),
    ]
    apps = propose(_located(docs), Options()).apps
    assert file_names(apps) == ["o_s_Web.yaml", "o_s_web-2.yaml", "o_s_web_x.yaml"]
