"""FQDN destinations: the format (issue 15, item 1).

A Destination may give `fqdns:` instead of or beside `ips:`; names are validated as RFC 1123
host names, lower-cased, and a wildcard is `*` as the whole left-most label only.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.core.model import NameItem
from reconciler.policy.load import load_folder
from tests.policyrepo import write_tree
from tests.test_validate import findings


def test_a_destination_by_name_loads_lower_cased_sorted_and_deduplicated(tmp_path):
    doc = (
        "kind: Destination\nname: db\nprotocol: tcp\nports: 5432\n"
        "fqdns: [DB.Lab.Example., db.lab.example, '*.s3.lab.example']\n"
    )
    write_tree(tmp_path, {"d.yaml": doc})
    result = load_folder(tmp_path)
    (dest,) = result.policy.destinations
    assert dest.ips == ()
    assert dest.fqdns == ("*.s3.lab.example", "db.lab.example")
    assert [i.fqdn for i in dest.name_items()] == ["*.s3.lab.example", "db.lab.example"]
    assert result.ok


def test_names_beside_ips_keep_both(tmp_path):
    doc = (
        "kind: Destination\nname: db\nprotocol: tcp\nports: 5432\n"
        "ips: 198.18.0.1\nfqdns: db.lab.example\n"
    )
    write_tree(tmp_path, {"d.yaml": doc})
    (dest,) = load_folder(tmp_path).policy.destinations
    assert [str(r) for r in dest.ips] == ["198.18.0.1"]
    assert dest.fqdns == ("db.lab.example",)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("198.18.0.1", "is an IP address or CIDR: give it under ips"),
        ("fd00::1", "is an IP address or CIDR: give it under ips"),
        ("198.18.0.0/15", "is an IP address or CIDR: give it under ips"),
        ("'*'", "a bare * would allow every name: give a domain after it (*.example.com)"),
        ("'db.*.example'", "* may only be the whole left-most label (*.example.com)"),
        ("'*.*.example.com'", "* may only be the whole left-most label (*.example.com)"),
        ("'db*.example.com'", "* may only be the whole left-most label (*.example.com)"),
        ("'*.com'", "a wildcard needs at least two labels after * (*.example.com)"),
        ("localhost", "must be a fully qualified name with at least two labels (db.example.com)"),
        ("db..example", "must not contain empty labels"),
        (
            "-db.example",
            "labels must be letters, digits and hyphens, not starting or ending "
            "with a hyphen (RFC 1123)",
        ),
        (
            "db_1.example",
            "labels must be letters, digits and hyphens, not starting or ending "
            "with a hyphen (RFC 1123)",
        ),
        ("db.example.123", "the top-level label must not be all digits"),
        ("x" * 64 + ".example", "labels must be at most 63 characters"),
        (".".join(["a" * 60] * 5), "must be at most 253 characters"),
    ],
)
def test_a_bad_name_is_an_error_at_its_own_line(tmp_path, entry, why):
    doc = (
        "kind: Destination\nname: db\nprotocol: tcp\nports: 5432\n"
        f"fqdns:\n  - ok.lab.example\n  - {entry}\n"
    )
    got = findings(tmp_path, {"d.yaml": doc})
    shown = entry.strip("'")
    shown = shown if len(shown) <= 64 else shown[:61] + "..."
    assert got == [f"d.yaml:7:5: Destination/db: fqdns[1]: invalid fqdn '{shown}', {why}"]
    assert CliRunner().invoke(main, ["validate", str(tmp_path)]).exit_code == 1


def test_a_destination_needs_ips_or_fqdns(tmp_path):
    doc = "kind: Destination\nname: db\nprotocol: tcp\nports: 5432\n"
    got = findings(tmp_path, {"d.yaml": doc})
    assert got == ["d.yaml:1:1: Destination/db: ips: a destination needs ips, fqdns or both"]


def test_a_non_string_name_is_an_error(tmp_path):
    doc = "kind: Destination\nname: db\nprotocol: tcp\nports: 5432\nfqdns: [{a: 1}]\n"
    got = findings(tmp_path, {"d.yaml": doc})
    assert len(got) == 1 and "Destination/db: fqdns" in got[0]


def test_a_wildcard_validates_without_a_warning_now_that_answers_fill_it(tmp_path):
    """The DNS interception (reconciler/fqdn/intercept.py) enforces wildcards: no more
    "allows nothing yet" warning; the one-label rule stays (`*.com` is refused above)."""
    doc = "kind: Destination\nname: s3\nprotocol: tcp\nports: 443\nfqdns: '*.s3.lab.example'\n"
    assert findings(tmp_path, {"d.yaml": doc}) == []
    assert load_folder(tmp_path).ok


@pytest.mark.parametrize(
    ("pattern", "qname", "matches"),
    [
        ("db.lab.example", "db.lab.example", True),
        ("db.lab.example", "x.db.lab.example", False),
        ("*.s3.lab.example", "b.s3.lab.example", True),
        ("*.s3.lab.example", "s3.lab.example", False),
        ("*.s3.lab.example", "a.b.s3.lab.example", False),
        ("*.s3.lab.example", "*.s3.lab.example", False),
    ],
)
def test_a_wildcard_stands_for_exactly_one_label(pattern, qname, matches):
    assert NameItem("tcp", pattern).matches(qname) is matches


def test_a_name_without_ports_allows_every_port_and_says_so(tmp_path):
    doc = "kind: Destination\nname: db\nprotocol: tcp\nfqdns: db.lab.example\n"
    assert findings(tmp_path, {"d.yaml": doc}) == [
        "d.yaml:1:1: Destination/db: ports: warning: no ports given: tcp to these names on all "
        "ports (1-65535)"
    ]
