"""Validation of a policy repository: schema, CF grammar, references, warnings, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.policy.load import load_folder, load_policy
from tests.golden import assert_golden
from tests.policyrepo import commit_all, init_repo, write_tree

REPO = Path(__file__).resolve().parent.parent
DIRECTORY = """
    kind: Directory
    orgs:
      - name: acme
        guid: org-1
        spaces:
          - name: prod
            guid: space-1
            apps:
              - {name: api, guid: app-1}
    """


def findings(tmp_path: Path, files: dict[str, str]) -> list[str]:
    write_tree(tmp_path, {"directory.yaml": DIRECTORY, **files})
    return [str(f) for f in load_folder(tmp_path).findings]


def test_the_example_repo_is_valid_and_clean():
    result = load_folder(REPO / "policies")
    assert result.ok
    assert result.findings == ()
    names = [g.name for g in result.policy.security_groups]
    assert names == ["package-mirrors", "payments-api", "platform-dns"]


def test_a_finding_names_file_line_column_subject_field_and_cf_message(tmp_path):
    got = findings(
        tmp_path,
        {
            "sg.yaml": """
                kind: SecurityGroup
                name: web
                rules:
                  - {protocol: tcp, destination: 10.0.0.1, ports: "443"}
                  - protocol: tcpx
                    destination: 10.0.0.2
                """
        },
    )
    assert got == [
        "sg.yaml:5:15: SecurityGroup/web: rules[1].protocol: "
        "protocol must be 'tcp', 'udp', 'icmp', 'icmpv6' or 'all'"
    ]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            "kind: SecurityGroup\nrules: []\n",
            "x.yaml:1:1: SecurityGroup: 'name' is required",
        ),
        (
            "kind: SecurityGroup\nname: a\nrules: []\nglobally_enabled: {running: 'yes'}\n",
            "x.yaml:4:29: SecurityGroup/a: globally_enabled.running: 'yes' is not of type "
            "'boolean'",
        ),
        (
            "kind: SecurityGroup\nname: a\nrules: []\nbindings: []\n",
            "x.yaml:1:1: SecurityGroup/a: Additional properties are not allowed "
            "('bindings' was unexpected)",
        ),
        (
            "kind: Firewall\nname: a\n",
            "x.yaml:1:7: Firewall/a: kind: unknown kind 'Firewall'; expected one of SecurityGroup, "
            "Destination, EgressPolicy, Directory, PolicyTest, Rollout, Enforcement",
        ),
        ("- a\n- b\n", "x.yaml:1:1: a policy document must be a mapping with a 'kind'"),
        (
            f"kind: SecurityGroup\nname: {'n' * 251}\nrules: []\n",
            f"x.yaml:2:7: SecurityGroup/{'n' * 80}: name: must be at most 250 characters (got 251)",
        ),
        (
            "kind: SecurityGroup\nname: a\nrules: {protocol: all}\n",
            "x.yaml:3:8: SecurityGroup/a: rules: {'protocol': 'all'} is not of type 'array'",
        ),
    ],
)
def test_schema_findings(tmp_path, doc, expected):
    assert findings(tmp_path, {"x.yaml": doc}) == [expected]


def test_names_are_unique_per_kind_across_files(tmp_path):
    sg = "kind: SecurityGroup\nname: dup\nrules: []\n"
    got = findings(tmp_path, {"a.yaml": sg, "b.yaml": sg})
    assert got == [
        "b.yaml:2:7: SecurityGroup/dup: name: name is already used by SecurityGroup at a.yaml:2"
    ]


def test_references_resolve_through_the_directory(tmp_path):
    got = findings(
        tmp_path,
        {
            "x.yaml": """
                kind: SecurityGroup
                name: a
                rules: []
                running_spaces: [acme/prod, acme/nope, a/b/c]
                ---
                kind: EgressPolicy
                name: p
                source: {type: app, name: acme/prod/ghost}
                destination: missing
                """
        },
    )
    assert got == [
        "x.yaml:4:29: SecurityGroup/a: running_spaces[1]: space 'acme/nope' is not in the "
        "directory",
        "x.yaml:4:40: SecurityGroup/a: running_spaces[2]: space 'a/b/c' must be org/space or a "
        "space GUID",
        "x.yaml:8:9: EgressPolicy/p: source: app 'acme/prod/ghost' is not in the directory",
        "x.yaml:9:14: EgressPolicy/p: destination: destination 'missing' is not defined",
    ]


def test_guids_always_work_and_unknown_ones_only_warn(tmp_path):
    result = load_folder(
        write_tree(
            tmp_path,
            {
                "directory.yaml": DIRECTORY,
                "sg.yaml": "kind: SecurityGroup\nname: a\nrules: []\n"
                "running_spaces: [space-1, space-404]\n",
            },
        )
    )
    assert result.ok
    assert [str(f) for f in result.findings] == [
        "sg.yaml:4:27: SecurityGroup/a: running_spaces[1]: warning: space GUID space-404 is "
        "not in the directory"
    ]
    assert result.policy.security_groups[0].running_spaces == ("space-1", "space-404")


def test_duplicate_and_redundant_rules_are_warnings(tmp_path):
    got = findings(
        tmp_path,
        {
            "sg.yaml": """
                kind: SecurityGroup
                name: a
                rules:
                  - {protocol: tcp, destination: 10.0.0.0/24, ports: "443"}
                  - {protocol: tcp, destination: 10.0.0.0-10.0.0.255, ports: "443"}
                  - {protocol: tcp, destination: 10.0.0.7, ports: "443"}
                  - {protocol: all, destination: 192.168.0.0/16}
                  - {protocol: udp, destination: 192.168.1.1, ports: "53,54"}
                  - {protocol: tcp, destination: 10.0.0.7, ports: "443", log: true}
                """
        },
    )
    assert got == [
        "sg.yaml:5:5: SecurityGroup/a: rules[1]: warning: duplicate of rules[0]",
        "sg.yaml:6:5: SecurityGroup/a: rules[2]: warning: redundant: rules[0] already allows "
        "all of it",
        "sg.yaml:8:5: SecurityGroup/a: rules[4]: warning: redundant: rules[3] already allows "
        "all of it",
    ]


def test_icmp_rules_with_other_codes_are_not_redundant(tmp_path):
    """ICMP type 3 code 1 does not cover type 3 code 4 (a rule for one code is not shadowed by
    a rule for another); code -1 covers every code of its type."""
    got = findings(
        tmp_path,
        {
            "sg.yaml": """
                kind: SecurityGroup
                name: a
                rules:
                  - {protocol: icmp, destination: 10.0.0.0/24, type: 3, code: 1}
                  - {protocol: icmp, destination: 10.0.0.7, type: 3, code: 4}
                  - {protocol: icmp, destination: 10.0.1.0/24, type: 3, code: -1}
                  - {protocol: icmp, destination: 10.0.1.7, type: 3, code: 4}
                  - {protocol: icmp, destination: 10.0.1.8, type: 5, code: 4}
                """
        },
    )
    assert got == [
        "sg.yaml:7:5: SecurityGroup/a: rules[3]: warning: redundant: rules[2] already allows "
        "all of it",
    ]


def test_a_rule_the_others_allow_between_them_is_redundant(tmp_path):
    """Coverage is of packets, however they are spelled: ports 53,54 allow all of 53-54, two
    adjacent destination ranges all of one across them, and ICMP type -1 every type and
    code whatever its code says (the render writes no --icmp-type for it)."""
    got = findings(
        tmp_path,
        {
            "sg.yaml": """
                kind: SecurityGroup
                name: a
                rules:
                  - {protocol: udp, destination: 10.0.0.1, ports: "53,54"}
                  - {protocol: udp, destination: 10.0.0.1, ports: "53-54"}
                  - {protocol: tcp, destination: "10.0.1.0-10.0.1.4,10.0.1.5-10.0.1.9", ports: 443}
                  - {protocol: tcp, destination: 10.0.1.3-10.0.1.6, ports: "443"}
                  - {protocol: icmp, destination: 10.0.2.0/24, type: -1, code: 0}
                  - {protocol: icmp, destination: 10.0.2.7, type: 3, code: 1}
                """
        },
    )
    assert got == [
        "sg.yaml:5:5: SecurityGroup/a: rules[1]: warning: redundant: rules[0] already allows "
        "all of it",
        "sg.yaml:7:5: SecurityGroup/a: rules[3]: warning: redundant: rules[2] already allows "
        "all of it",
        "sg.yaml:9:5: SecurityGroup/a: rules[5]: warning: redundant: rules[4] already allows "
        "all of it",
    ]


def test_destination_semantics(tmp_path):
    got = findings(
        tmp_path,
        {
            "d.yaml": """
                kind: Destination
                name: ping
                protocol: icmp
                ips: fd00::1
                ports: 80
                ---
                kind: Destination
                name: web
                protocol: tcp
                ips: 10.0.0.1
                icmp_type: 3
                """
        },
    )
    assert got == [
        "d.yaml:4:6: Destination/ping: ips: protocol icmp needs IPv4 addresses",
        "d.yaml:5:8: Destination/ping: ports: ports are not allowed for protocol icmp",
        "d.yaml:7:1: Destination/web: ports: warning: no ports given: tcp to these ips on all "
        "ports (1-65535)",
        "d.yaml:11:12: Destination/web: icmp_type: icmp_type is only allowed for protocols icmp "
        "and icmpv6",
    ]


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_destination_without_ports_allows_every_port_and_says_so(tmp_path, protocol):
    """The policy server's default (no ports = every port) is kept, but never silently: a
    warning names it, validation still passes (exit 0) and the plan marks the grant."""
    doc = f"kind: Destination\nname: db\nprotocol: {protocol}\nips: 10.0.0.1\n"
    write_tree(tmp_path, {"d.yaml": doc})
    result = load_folder(tmp_path)
    (dest,) = result.policy.destinations
    assert [(p.first, p.last) for p in dest.ports] == [(1, 65535)]
    assert result.ok
    assert [str(f) for f in result.findings] == [
        f"d.yaml:1:1: Destination/db: ports: warning: no ports given: {protocol} to these ips "
        "on all ports (1-65535)"
    ]
    assert CliRunner().invoke(main, ["validate", str(tmp_path)]).exit_code == 0


@pytest.mark.parametrize("protocol", ["icmp", "all"])
def test_destination_without_ports_is_quiet_where_ports_mean_nothing(tmp_path, protocol):
    doc = f"kind: Destination\nname: db\nprotocol: {protocol}\nips: 10.0.0.1\n"
    write_tree(tmp_path, {"d.yaml": doc})
    assert load_folder(tmp_path).findings == ()


def test_destination_cidr_with_host_bits_is_a_warning(tmp_path):
    doc = "kind: Destination\nname: db\nprotocol: all\nips: [10.1.2.3/8, {start: 10.0.0.1}]\n"
    write_tree(tmp_path, {"d.yaml": doc})
    assert [str(f) for f in load_folder(tmp_path).findings] == [
        "d.yaml:4:6: Destination/db: ips: warning: 10.1.2.3/8 has host bits set: it means "
        "10.0.0.0/8 (10.0.0.0-10.255.255.255)"
    ]


def test_cidr_with_host_bits_is_a_warning(tmp_path):
    """cloud_controller_ng's own model spec uses 198.41.191.47/1 (security_group_spec.rb
    `build_transport_rule`): accepted, and it means 128.0.0.0/1, half the internet."""
    got = findings(
        tmp_path,
        {
            "sg.yaml": """
                kind: SecurityGroup
                name: a
                rules:
                  - {protocol: udp, destination: 198.41.191.47/1, ports: "8080-9090"}
                  - {protocol: all, destination: [10.0.0.0/8, "2001:db8::1/64"]}
                """
        },
    )
    assert got == [
        "sg.yaml:4:34: SecurityGroup/a: rules[0].destination: warning: 198.41.191.47/1 has "
        "host bits set: it means 128.0.0.0/1 (128.0.0.0-255.255.255.255)",
        "sg.yaml:5:34: SecurityGroup/a: rules[1].destination: warning: 2001:db8::1/64 has "
        "host bits set: it means 2001:db8::/64 (2001:db8::-2001:db8::ffff:ffff:ffff:ffff)",
    ]


def write_bad(tmp_path: Path, name: str, data: bytes) -> Path:
    tmp_path.joinpath(name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("broken.yaml", b"kind: [\n", "broken.yaml:2:1: "),
        (
            "latin.yaml",
            b"kind: Destination\nname: caf\xe9\n",
            "latin.yaml:2:10: file is not valid UTF-8",
        ),
        (
            "huge.yaml",
            b"#" * (50 * 1024 * 1024),
            "huge.yaml:1:1: file is 52428800 bytes, over the limit",
        ),
        ("deep.yaml", b"a: " + b"[" * 10_000 + b"]" * 10_000, "deep.yaml:1:"),
        (
            "bomb.yaml",
            b"a: &a [x,x,x,x,x,x,x,x,x,x]\n"
            + b"".join(
                f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n".encode()
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "bomb.yaml:",
        ),
    ],
)
def test_bad_files_get_a_clean_error_and_exit_1(tmp_path, name, data, message):
    write_bad(tmp_path, name, data)
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_symlink_out_of_the_tree_is_refused(tmp_path):
    outside = tmp_path / "outside.yaml"
    outside.write_text("kind: Directory\norgs: []\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(outside, repo / "leak.yaml")
    os.symlink("/etc", repo / "etc")  # a link to a folder is never walked, from disk or git
    result = load_folder(repo)
    assert [str(f) for f in result.findings] == [
        f"leak.yaml:1:1: symlink points outside the policy tree ({outside})"
    ]


def test_a_revision_is_read_from_git_without_a_checkout(tmp_path):
    repo = init_repo(tmp_path / "repo")
    write_tree(repo, {"policies/sg.yaml": "kind: SecurityGroup\nname: v1\nrules: []\n"})
    first = commit_all(repo, "v1")
    write_tree(repo, {"policies/sg.yaml": "kind: SecurityGroup\nname: v2\nrules: [\n"})
    commit_all(repo, "v2 (broken)")
    write_tree(repo, {"policies/sg.yaml": "kind: SecurityGroup\nname: dirty\nrules: []\n"})
    at_first = load_policy(repo / "policies", first)
    assert at_first.ok
    assert [g.name for g in at_first.policy.security_groups] == ["v1"]
    at_head = load_policy(repo / "policies", "HEAD")
    assert [str(f) for f in at_head.findings] == [
        "sg.yaml:4:1: while parsing a flow node did not find expected node content"
    ]
    assert [str(f) for f in load_policy(repo / "policies", "nope").findings] == [
        f"{repo}:1:1: unknown revision 'nope'"
    ]


def test_git_symlink_escaping_the_policy_folder_is_refused(tmp_path):
    repo = init_repo(tmp_path / "repo")
    write_tree(repo, {"secrets.yaml": "kind: Directory\norgs: []\n", "policies/ok.yaml": DIRECTORY})
    os.symlink("../secrets.yaml", repo / "policies" / "leak.yaml")
    rev = commit_all(repo, "link")
    result = load_policy(repo / "policies", rev)
    assert [str(f) for f in result.findings] == [
        "leak.yaml:1:1: symlink points outside the policy tree (../secrets.yaml)"
    ]


def invalid_repo(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path,
        {
            "directory.yaml": DIRECTORY,
            "sg.yaml": """
                kind: SecurityGroup
                name: "web, \\"prod\\""
                rules:
                  - {protocol: tcp, destination: 10.0.0.01, ports: "80-80"}
                  - {protocol: all, destination: 10.0.0.0/8}
                  - {protocol: all, destination: 10.1.0.0/16}
                """,
        },
    )


@pytest.mark.parametrize("fmt", ["text", "json", "github"])
def test_validate_output_formats(tmp_path, fmt):
    repo = invalid_repo(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(repo), "--format", fmt])
    assert result.exit_code == 1
    assert_golden(f"validate.{fmt}", result.output)
    if fmt == "json":
        assert json.loads(result.output)["valid"] is False


def test_validate_exit_codes(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["validate", str(REPO / "policies")]).exit_code == 0
    assert runner.invoke(main, ["validate", "--format", "yaml"]).exit_code == 2
    missing = runner.invoke(main, ["validate", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert "no such file or directory" in missing.output


def test_github_annotations_use_repository_relative_paths(tmp_path, monkeypatch):
    repo = init_repo(tmp_path / "repo")
    write_tree(repo, {"policies/sg.yaml": "kind: SecurityGroup\nname: x\nrules: [{}]\n"})
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(main, ["validate", "policies", "--format", "github"])
    assert result.exit_code == 1
    assert result.output.startswith("::error file=policies/sg.yaml,line=3,col=9,")
    plain = CliRunner().invoke(main, ["validate", "policies"])
    assert plain.output.startswith("sg.yaml:3:9: ")


# -- a schema error does not hide the reference errors -----------------------------------


def test_a_schema_error_and_the_references_of_the_same_document_in_one_run(tmp_path):
    # A typo'd key fails the schema; the policy's source and destination are still sound,
    # so their errors come in the same run instead of after the typo is fixed.
    got = findings(
        tmp_path,
        {
            "x.yaml": """
                kind: EgressPolicy
                name: p
                descripton: typo
                source: {type: app, name: acme/prod/ghost}
                destination: missing
                ---
                kind: SecurityGroup
                name: a
                rules: [{protocol: tcpx, destination: 10.0.0.1}]
                globally_enabled: {running: 'yes'}
                running_spaces: [acme/nope]
                """
        },
    )
    assert got == [
        "x.yaml:1:1: EgressPolicy/p: Additional properties are not allowed "
        "('descripton' was unexpected)",
        "x.yaml:4:9: EgressPolicy/p: source: app 'acme/prod/ghost' is not in the directory",
        "x.yaml:5:14: EgressPolicy/p: destination: destination 'missing' is not defined",
        "x.yaml:9:20: SecurityGroup/a: rules[0].protocol: protocol must be 'tcp', 'udp', "
        "'icmp', 'icmpv6' or 'all'",
        "x.yaml:10:29: SecurityGroup/a: globally_enabled.running: 'yes' is not of type 'boolean'",
        "x.yaml:11:18: SecurityGroup/a: running_spaces[0]: space 'acme/nope' is not in the "
        "directory",
    ]


def test_the_faulty_part_itself_is_not_checked_again(tmp_path):
    # The source is what the schema rejects (both name and id): only the schema says so.
    got = findings(
        tmp_path,
        {
            "p.yaml": """
                kind: EgressPolicy
                name: p
                source: {type: app, name: acme/prod/ghost, id: app-9}
                destination: missing
                """
        },
    )
    assert len(got) == 2 and got[1].endswith("destination 'missing' is not defined")
    assert "source" in got[0] and "ghost" not in "".join(got[1:])


def test_each_sound_policy_test_case_is_checked_next_to_a_broken_one(tmp_path):
    got = findings(
        tmp_path,
        {
            "t.yaml": """
                kind: PolicyTest
                name: t
                cases:
                  - {app: acme/prod/api, to: "10.0.0.1:443", expect: alow}
                  - {app: acme/prod/ghost, to: "10.0.0.1:443", expect: deny}
                """
        },
    )
    assert len(got) == 2, got
    assert got[0].startswith("t.yaml:4:") and "cases[0].expect" in got[0]
    assert got[1].endswith("cases[1].app: app 'acme/prod/ghost' is not in the directory")


def test_a_policy_using_a_destination_that_failed_its_schema_is_not_told_it_is_undefined(
    tmp_path,
):
    got = findings(
        tmp_path,
        {
            "d.yaml": """
                kind: Destination
                name: db
                protocol: tcp
                ips: 10.0.0.5
                port: 5432
                ---
                kind: EgressPolicy
                name: p
                source: {type: app, name: acme/prod/api}
                destination: db
                """
        },
    )
    assert got == [
        "d.yaml:1:1: Destination/db: Additional properties are not allowed ('port' was unexpected)"
    ]


def test_a_broken_directory_leaves_names_unjudged_but_resolves_what_it_can(tmp_path):
    # The Directory fails its schema, so "not in the directory" cannot be said of a name it
    # may hold; references whose form is wrong, and names the other Directory holds, are
    # still judged.
    write_tree(
        tmp_path,
        {
            "directory.yaml": DIRECTORY,
            "more.yaml": """
                kind: Directory
                orgs:
                  - name: other org
                    guid: org-2
                """,
            "x.yaml": """
                kind: SecurityGroup
                name: a
                rules: []
                running_spaces: [other org/web, acme/prod, a/b/c]
                ---
                kind: EgressPolicy
                name: p
                source: {type: app, name: acme/prod/api}
                destination: missing
                """,
        },
    )
    got = [str(f) for f in load_folder(tmp_path).findings]
    assert got == [
        "more.yaml:3:11: Directory: orgs[0].name: 'other org' does not match '^[^/\\\\s]+$'",
        "x.yaml:4:44: SecurityGroup/a: running_spaces[2]: space 'a/b/c' must be org/space or "
        "a space GUID",
        "x.yaml:9:14: EgressPolicy/p: destination: destination 'missing' is not defined",
    ]


def test_names_of_documents_that_failed_their_schema_are_still_unique(tmp_path):
    got = findings(
        tmp_path,
        {
            "a.yaml": "kind: SecurityGroup\nname: dup\nrules: []\n",
            "b.yaml": "kind: SecurityGroup\nname: dup\nrules: []\nbindings: []\n",
        },
    )
    assert got == [
        "b.yaml:1:1: SecurityGroup/dup: Additional properties are not allowed "
        "('bindings' was unexpected)",
        "b.yaml:2:7: SecurityGroup/dup: name: name is already used by SecurityGroup at a.yaml:2",
    ]


def test_every_shipped_schema_is_json_without_duplicate_keys() -> None:
    """Python's json keeps the last of two equal keys, so a merge that doubled a property
    block would go unnoticed by every reader -- until the copies drift apart."""
    from reconciler.sources.jsonsafe import loads

    folder = Path(__file__).resolve().parent.parent / "schemas"
    schemas = sorted(folder.glob("*.json"))
    assert schemas
    for path in schemas:
        loads(path.read_bytes(), str(path), reject_duplicate_keys=True)
