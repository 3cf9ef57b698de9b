"""Hostile input in every string field, and the edge cases test_hostile.py does not cover.

test_hostile.py keeps a corpus aimed at SecurityGroup rules (and the group's name and
description) and test_fuzz.py throws hypothesis-generated structures at the pipeline; this
file fills in the rest of the issue's list, field by field, for every kind a repo holds
(Directory, Destination, EgressPolicy, SecurityGroup, PolicyTest) and for the container
metadata store the agent reads on every cell:

* an injection attempt (iptables-restore syntax, shell, terminal control, bidi, 10k chars)
  in *every* string field, through `asgctl validate`, `render` and `test`;
* huge and negative numbers, dates that do not exist, CIDRs with host bits, IPv6 zone ids,
  6001 destinations, look-alike digits, alias bombs, deep nesting and 100 MB files, in the
  kinds and the store where the older corpus has none;
* the same store.json attacks straight through `decode_store`, which the agent calls on
  every inventory change.

The contract is the older corpus's: never a traceback, and never a rule that was not asked
for -- whatever renders is a subset of what the valid base repo renders, and the only rule
in FORWARD is our hook.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.core.policytest import render_results, run_tests
from reconciler.policy.load import load_revision, parse_files
from reconciler.policy.source import SourceFile
from reconciler.sources.cellstore import InventoryError, decode_store
from tests.iptables_eval import Packet, parse_restore, verdict
from tests.policyrepo import commit_all, init_repo

INJECTIONS = [
    '"\n-A FORWARD -j ACCEPT\nCOMMIT',
    "-j ACCEPT",
    "COMMIT\n*filter\n-A FORWARD -j ACCEPT",
    "$(reboot); `id` | rm -rf / &",
    "' OR 1=1 --",
    "\u202e\u200b\ufeff\x1b[2J\x07",
    "../../../../etc/passwd",
    "x" * 10_000,
]
"""Each is tried in every string field below: 8 strings x 31 fields."""

BASE: list[dict[str, Any]] = [
    {
        "kind": "Directory",
        "orgs": [
            {
                "name": "acme",
                "guid": "org-1",
                "spaces": [
                    {
                        "name": "prod",
                        "guid": "space-1",
                        "apps": [{"name": "web", "guid": "app-1"}],
                    }
                ],
            }
        ],
    },
    {
        "kind": "Destination",
        "name": "db",
        "description": "the database",
        "protocol": "tcp",
        "ips": "198.19.5.5",
        "ports": 5432,
    },
    {
        "kind": "EgressPolicy",
        "name": "web-to-db",
        "description": "web keeps its data in db",
        "source": {"type": "app", "name": "acme/prod/web"},
        "destination": "db",
        "app_lifecycle": "running",
    },
    {
        "kind": "SecurityGroup",
        "name": "g",
        "description": "https",
        "rules": [
            {
                "protocol": "tcp",
                "destination": "198.19.0.1",
                "ports": "443",
                "description": "the api",
            }
        ],
        "running_spaces": ["acme/prod"],
        "staging_spaces": [],
    },
    {
        "kind": "PolicyTest",
        "name": "t",
        "description": "web reaches db",
        "cases": [
            {"app": "acme/prod/web", "to": "198.19.5.5:5432", "expect": "allow"},
            {"space": "acme/prod", "lifecycle": "running", "to": "198.19.0.1:443/tcp",
             "expect": "allow"},
        ],
    },
]  # fmt: skip

# Every string field of the base repo: (document index, path inside the document).
FIELDS: list[tuple[int, tuple[str | int, ...]]] = [
    (0, ("orgs", 0, "name")),
    (0, ("orgs", 0, "guid")),
    (0, ("orgs", 0, "spaces", 0, "name")),
    (0, ("orgs", 0, "spaces", 0, "guid")),
    (0, ("orgs", 0, "spaces", 0, "apps", 0, "name")),
    (0, ("orgs", 0, "spaces", 0, "apps", 0, "guid")),
    (1, ("name",)),
    (1, ("description",)),
    (1, ("protocol",)),
    (1, ("ips",)),
    (1, ("ports",)),
    (2, ("name",)),
    (2, ("description",)),
    (2, ("source", "type")),
    (2, ("source", "name")),
    (2, ("destination",)),
    (2, ("app_lifecycle",)),
    (3, ("rules", 0, "protocol")),
    (3, ("rules", 0, "ports")),
    (3, ("rules", 0, "description")),
    (3, ("running_spaces", 0)),
    (3, ("staging_spaces", 0)),
    (4, ("name",)),
    (4, ("description",)),
    (4, ("cases", 0, "app")),
    (4, ("cases", 0, "to")),
    (4, ("cases", 0, "expect")),
    (4, ("cases", 1, "space")),
    (4, ("cases", 1, "lifecycle")),
    (0, ("orgs", 0, "spaces", 0, "apps", 0, "extra")),  # an unknown key, injected value
    (2, ("source", "id")),
]
STRICT = {"protocol", "ips", "ports", "expect", "lifecycle", "app_lifecycle", "type", "to"}
"""Fields with a grammar (an enum, an address, a port): every injection is a finding."""
STORE = {
    "c1": {
        "handle": "c1",
        "ip": "198.18.0.2",
        "metadata": {
            "app_id": "app-1",
            "space_id": "space-1",
            "org_id": "org-1",
            "policy_group_id": "app-1",  # Cloud Controller writes the app GUID to both
            "container_workload": "app",
        },
    }
}
STORE_FIELDS: list[tuple[str, ...]] = [
    ("handle",),
    ("ip",),
    ("metadata", "app_id"),
    ("metadata", "space_id"),
    ("metadata", "org_id"),
    ("metadata", "policy_group_id"),
    ("metadata", "container_workload"),
]


def _set(doc: Any, path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    last = path[-1]
    if isinstance(doc, list) and isinstance(last, int) and last >= len(doc):
        doc.append(value)
    else:
        doc[last] = value


def _dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True, width=1_000_000)


class Repo:
    """A policies folder and a store.json in tmp_path, and the three commands run on them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.policies = root / "policies"
        self.policies.mkdir(exist_ok=True)
        self.store = root / "store.json"

    def write(self, text: str | bytes, store: Any = STORE, name: str = "input.yaml") -> None:
        for old in self.policies.iterdir():
            old.unlink()
        target = self.policies / name
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text, encoding="utf-8")
        if isinstance(store, bytes):
            self.store.write_bytes(store)
        else:
            self.store.write_text(json.dumps(store))

    def render(self) -> Result:
        return CliRunner().invoke(
            main,
            [
                *("render", "--containers", str(self.store)),
                *("--policies", str(self.policies), "--family", "4"),
            ],
        )

    def run(self) -> tuple[Result, Result, Result]:
        runner = CliRunner()
        validate = runner.invoke(main, ["validate", str(self.policies)])
        tests = runner.invoke(main, ["test", str(self.policies)])
        return validate, self.render(), tests


def rendered(result: Result) -> bool:
    """Did the command print a ruleset?  (An echoed hostile value may contain `*filter`.)"""
    return "*filter" in result.output.splitlines()


def _clean_exit(result: Result, codes: tuple[int, ...] = (0, 1)) -> None:
    """Ended by the command itself (sys.exit), with a documented code, and no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in codes, (result.exit_code, result.output[-500:])
    assert "Traceback" not in result.output


BASE_RULES: set[tuple[str, ...]] = set()


def _group_rules(text: str) -> list[tuple[str, ...]]:
    chains = parse_restore(text)
    # rs[0] is each chain's ownership marker, no rule of the policy's
    return [tuple(r) for n, rs in chains.items() if n.startswith("ASG-G-") for r in rs[1:]]


def assert_only_asked(render: Result) -> None:
    """The render holds no line but ours, and no group rule the base repo did not ask for."""
    text = render.stdout  # stderr may carry warnings about the store
    assert text.count("*filter") == 1 and text.count("COMMIT") == 1, text[-300:]
    hook = '-I FORWARD 1 -m comment --comment "asg:forward" -j ASG-FORWARD'
    for line in text.splitlines():
        assert line in ("*filter", "COMMIT", hook) or re.match(
            r"^(:ASG-\S+ - \[0:0\]|-A ASG-\S+ )", line
        ), line
    assert text.count(hook) <= 1
    if not BASE_RULES:
        base = base_render()
        BASE_RULES.update(_group_rules(base))
    assert set(_group_rules(text)) <= BASE_RULES
    chains = parse_restore(text)
    # Nothing but the two granted services, whatever the input said.
    for dst, port in (("198.19.9.9", 443), ("198.18.0.1", 22), ("0.0.0.0", 80)):
        assert verdict(chains, Packet("198.18.0.2", dst, "tcp", port)) != "ACCEPT"


_BASE_CACHE: dict[str, str] = {}


def base_render() -> str:
    """The base repo's rendered v4 rules (computed once)."""
    if "v4" not in _BASE_CACHE:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="asg-hostile-") as tmp:
            repo = Repo(Path(tmp))
            repo.write(_dump(BASE))
            validate, render, tests = repo.run()
            assert validate.exit_code == 0, validate.output
            assert tests.exit_code == 0, tests.output
            assert render.exit_code == 0, render.output
            _BASE_CACHE["v4"] = render.output
    return _BASE_CACHE["v4"]


def test_the_base_repo_is_valid_and_grants_exactly_two_services(tmp_path: Path) -> None:
    text = base_render()
    chains = parse_restore(text)
    assert verdict(chains, Packet("198.18.0.2", "198.19.0.1", "tcp", 443)) == "ACCEPT"
    assert verdict(chains, Packet("198.18.0.2", "198.19.5.5", "tcp", 5432)) == "ACCEPT"
    assert verdict(chains, Packet("198.18.0.2", "198.19.5.5", "tcp", 5433)) == "REJECT"
    assert len(_group_rules(text)) == 2


@pytest.mark.parametrize(
    ("doc", "path"), FIELDS, ids=[f"{BASE[d]['kind']}.{'.'.join(map(str, p))}" for d, p in FIELDS]
)
def test_injection_in_every_string_field(tmp_path: Path, doc: int, path: tuple) -> None:
    repo = Repo(tmp_path)
    outcomes = []
    for text in INJECTIONS:
        docs = copy.deepcopy(BASE)
        _set(docs[doc], path, text)
        repo.write(_dump(docs))
        validate, render, tests = repo.run()
        for result in (validate, render, tests):
            _clean_exit(result)
        # The terminal never receives raw control characters or an injected line break.
        for result in (validate, render, tests):
            assert "\x1b" not in result.output and "\u202e" not in result.output
            assert "\n-A FORWARD -j ACCEPT" not in result.output
        if validate.exit_code == 1:
            assert re.search(r"input\.yaml:\d+:\d+: ", validate.output), validate.output[-300:]
            assert render.exit_code == 1 and not rendered(render)
            outcomes.append("refused")
        else:
            assert render.exit_code == 0, render.output[-300:]
            assert_only_asked(render)
            outcomes.append("valid")
    # Free text and references (names, GUIDs) may hold anything -- an unknown GUID grants
    # nothing; fields with a grammar refuse every one of these strings.
    if path[-1] in STRICT:
        assert set(outcomes) == {"refused"}, outcomes


@pytest.mark.parametrize("path", STORE_FIELDS, ids=[".".join(p) for p in STORE_FIELDS])
def test_injection_in_every_store_field(tmp_path: Path, path: tuple[str, ...]) -> None:
    """A store is judged entry by entry: an injection never fails the cell.  Printable text is
    an id as CF allows it and reaches no rule; anything else holds the entry's IP to no access
    (or, in `ip`, skips the entry), reported on stderr naming store.json.  Either way the
    render holds only what the base repo asks for, never more."""
    repo = Repo(tmp_path)
    for text in INJECTIONS:
        store = copy.deepcopy(STORE)
        if path == ("handle",):
            store = {text: {**store["c1"], "handle": text}}
        else:
            _set(store["c1"], path, text)
        repo.write(_dump(BASE), store=store)
        render = repo.render()
        _clean_exit(render)
        assert render.exit_code == 0, render.output[-300:]
        assert_only_asked(render)
        assert "\x1b" not in render.output and "\u202e" not in render.output
        assert "\n-A FORWARD -j ACCEPT" not in render.output
        reading = decode_store(json.dumps(store))
        if reading.rejected:
            assert "store.json" in render.stderr and "warning: " in render.stderr
        else:
            assert render.stderr == ""


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _big_int(digits: int) -> str:
    return "1" + "0" * (digits - 1)


def _store_with(**fields: Any) -> dict[str, Any]:
    store = copy.deepcopy(STORE)
    store["c1"].update(fields)
    return store


# (id, policy text or a function of the base docs, expected message or None for valid)
def _edit(doc: int, path: tuple[str | int, ...], value: Any) -> str:
    docs = copy.deepcopy(BASE)
    _set(docs[doc], path, value)
    return _dump(docs)


def _raw_edit(doc: int, path: tuple[str | int, ...], raw: str) -> str:
    """Like `_edit`, but the value is written as raw YAML (a number with 5000 digits...)."""
    marker = "__RAW_VALUE__"
    return _edit(doc, path, marker).replace(f"'{marker}'", raw).replace(marker, raw)


def _many_ips(n: int) -> list[str]:
    return [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(n)]


POLICY_CASES: list[tuple[str, str, str | None]] = [
    # Numbers: huge, negative, beyond Python's int-from-text limit.
    ("dest-port-negative", _edit(1, ("ports",), -1), "ports"),
    ("dest-port-huge", _edit(1, ("ports",), 2**70), "ports"),
    ("dest-port-5000-digits", _raw_edit(1, ("ports",), _big_int(5000)), "cannot read scalar"),
    ("dest-port-range-huge", _edit(1, ("ports",), [{"start": 1, "end": 2**64}]), "ports"),
    (
        "dest-icmp-huge",
        _dump(
            [
                *BASE[:1],
                {**BASE[1], "protocol": "icmp", "icmp_type": 2**64, "icmp_code": -(2**64)},
                *BASE[2:4],
            ]
        ),
        "icmp",
    ),
    (
        "sg-type-5000-digits",
        _raw_edit(3, ("rules", 0, "type"), _big_int(5000)),
        "cannot read scalar",
    ),
    ("test-icmp-huge", _edit(4, ("cases", 0, "icmp_type"), 10**30), "icmp_type"),
    ("test-negative-port", _edit(4, ("cases", 0, "to"), "198.19.5.5:-1"), "to"),
    # Dates that do not exist, wherever a scalar may go (PyYAML resolves them as timestamps).
    ("no-such-date-name", _raw_edit(1, ("name",), "2001-02-30"), "cannot read scalar"),
    ("no-such-hour", _raw_edit(2, ("description",), "2001-12-14 25:59:43"), "cannot read scalar"),
    (
        "bad-tz-offset",
        _raw_edit(3, ("description",), "2001-12-14t21:59:43.10-99:00"),
        "cannot read scalar",
    ),
    ("real-date-as-text", _raw_edit(1, ("description",), "2001-02-28"), "is not of type 'string'"),
    # CIDRs with host bits, zone ids, look-alike digits, in Destination and PolicyTest.
    ("dest-host-bits-v6", _edit(1, ("ips",), "fd00:19::5/128"), None),
    ("dest-zone-id", _edit(1, ("ips",), "fe80::1%eth0"), "ips"),
    ("dest-zone-id-inject", _edit(1, ("ips",), "fd00::1%x -j ACCEPT"), "ips"),
    ("dest-unicode-digits", _edit(1, ("ips",), "１９８.19.5.5"), "ips"),
    ("dest-unicode-port", _edit(1, ("ports",), "５４３２"), "ports"),
    ("dest-arabic-digits", _edit(1, ("ports",), "٥٤٣٢"), "ports"),
    ("test-zone-id", _edit(4, ("cases", 0, "to"), "[fe80::1%eth0]:443"), "to"),
    ("test-unicode-digits", _edit(4, ("cases", 0, "to"), "１９８.19.5.5:5432"), "to"),
    ("test-host-bits", _edit(4, ("cases", 0, "to"), "198.19.5.5/24:5432"), "to"),
    # A kind that is not a string (found by atheris: `kind` followed by a list crashed).
    ("kind-list", "kind:\n  - SecurityGroup\nname: g\n", "unknown kind"),
    ("kind-map", "kind: {SecurityGroup: 1}\nname: g\n", "unknown kind"),
    # 6001 destinations as a YAML list in a rule (the comma form is in test_hostile.py).
    (
        "sg-6001-list",
        _edit(3, ("rules", 0, "destination"), _many_ips(6001)),
        "maximum destinations per rule exceeded",
    ),
    # Alias bombs and deep nesting inside the kinds that had none.
    (
        "directory-alias-bomb",
        "kind: Directory\norgs:\n- &o {name: a, guid: g, spaces: &s [x, x, x, x, x, x, x, x]}\n"
        + "".join(
            f"- &{c} [{', '.join(['*' + p] * 10)}]\n"
            for p, c in zip(["o", *"bcdefgh"], "bcdefghi", strict=True)
        ),
        "expands to more than",
    ),
    (
        "egress-deep-source",
        "kind: EgressPolicy\nname: e\nsource: " + _deep(100_000) + "\n",
        "nesting",
    ),
    (
        "test-deep-cases",
        "kind: PolicyTest\nname: t\ncases: " + "{a: " * 5000 + "1" + "}" * 5000,
        "nesting",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in POLICY_CASES], ids=[c[0] for c in POLICY_CASES]
)
def test_hostile_numbers_dates_addresses_and_shapes(
    tmp_path: Path, text: str, expected: str | None
) -> None:
    repo = Repo(tmp_path)
    repo.write(text)
    validate, render, tests = repo.run()
    for result in (validate, render, tests):
        _clean_exit(result)
    if expected is None:
        assert validate.exit_code == 0, validate.output[-500:]
        assert render.exit_code == 0
        assert_only_asked(render)
        return
    assert validate.exit_code == 1, validate.output[-500:]
    assert re.search(r"input\.yaml:\d+:\d+: ", validate.output)
    assert expected in validate.output, validate.output[-500:]
    assert render.exit_code == 1 and not rendered(render)
    assert tests.exit_code == 1


STORE_CASES: list[tuple[str, bytes, str]] = [
    ("ip-zone-id", json.dumps(_store_with(ip="fd00:18::5%eth0")).encode(), "zone id"),
    (
        "ip-zone-id-injection",
        json.dumps(_store_with(ip="fd00:18::5%x\n-A FORWARD -j ACCEPT\nCOMMIT\n*filter")).encode(),
        "zone id",
    ),
    ("ip-number", json.dumps(_store_with(ip=3323068418)).encode(), "missing field 'ip'"),
    ("ip-unicode-digits", json.dumps(_store_with(ip="１９８.18.0.2")).encode(), "not an IP"),
    ("ip-host-bits", json.dumps(_store_with(ip="198.18.0.2/24")).encode(), "not an IP"),
    ("ip-negative", json.dumps(_store_with(ip="-198.18.0.2")).encode(), "not an IP"),
    ("ip-multicast", json.dumps(_store_with(ip="224.0.0.1")).encode(), "cannot be a container"),
    ("huge-int", ('{"c1": {"handle": "c1", "ip": ' + _big_int(5000) + "}}").encode(), "valid JSON"),
    ("deep-array", _deep(100_000).encode(), "nested too deeply"),
    ("deep-object", ('{"a": ' * 100_000 + "1" + "}" * 100_000).encode(), "nested too deeply"),
    ("not-utf8", b'{"c1": {"handle": "\xff\xfe"}}', "valid JSON"),
    ("nan", b'{"c1": NaN}', "store.json:1:8: not valid JSON: NaN"),
    (
        "workload-list",
        json.dumps(_store_with(metadata={"container_workload": ["app"]})).encode(),
        "container_workload",
    ),
    ("metadata-string", json.dumps(_store_with(metadata="x")).encode(), "metadata must be"),
    (
        "duplicate-ip",
        json.dumps({**STORE, "c2": {**STORE["c1"], "handle": "c2"}}).encode(),
        "also claimed by",
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES]
)
def test_hostile_store_json(tmp_path: Path, data: bytes, expected: str) -> None:
    """Only a store that is not a JSON object as a whole is refused (and nothing renders);
    any other hostile entry is reported on stderr and the rest of the cell renders."""
    repo = Repo(tmp_path)
    repo.write(_dump(BASE), store=data)
    render = repo.render()
    _clean_exit(render)
    try:
        reading = decode_store(data, "store.json")
    except InventoryError as err:
        assert expected in str(err)
        assert render.exit_code == 1 and not rendered(render)
        assert "store.json" in render.output
        return
    assert any(expected in r.reason for r in reading.rejected), reading.rejected
    assert render.exit_code == 0 and rendered(render)
    assert_only_asked(render)
    assert expected in render.stderr


def test_a_100_mb_store_is_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.write(_dump(BASE), store=b"{}")
    with repo.store.open("wb") as f:
        f.truncate(100 * 1024 * 1024)
    render = repo.render()
    _clean_exit(render)
    assert render.exit_code == 1 and "larger than" in render.output


def test_a_100_mb_blob_at_a_git_revision_is_refused_without_reading_it(tmp_path: Path) -> None:
    """The agent loads policy from git objects: the size check must come before the read."""
    work = init_repo(tmp_path / "work")
    (work / "policies").mkdir()
    (work / "policies" / "ok.yaml").write_text(_dump(BASE))
    with (work / "policies" / "huge.yaml").open("wb") as f:
        f.truncate(100 * 1024 * 1024)
    commit_all(work, "huge")
    result = load_revision(work, "HEAD", "policies")
    assert not result.ok
    assert any(
        f.file == "huge.yaml" and "104857600 bytes, over the limit" in f.message
        for f in result.findings
    ), result.findings


def test_host_bits_and_6000_ips_in_a_destination_grant_exactly_what_was_written(
    tmp_path: Path,
) -> None:
    """A CIDR with host bits is its network (CF's reading); a Destination holds at most 6000
    addresses, as a rule's destination list does: 6000 render exactly, 6001 are refused."""
    repo = Repo(tmp_path)
    repo.write(_edit(1, ("ips",), "198.19.5.77/24"))
    validate, render, _ = repo.run()
    assert validate.exit_code == 0 and render.exit_code == 0, validate.output
    chains = parse_restore(render.output)
    assert verdict(chains, Packet("198.18.0.2", "198.19.5.200", "tcp", 5432)) == "ACCEPT"
    assert verdict(chains, Packet("198.18.0.2", "198.19.6.1", "tcp", 5432)) == "REJECT"
    assert len(_group_rules(render.output)) == 2

    ips = _many_ips(6000)
    repo.write(_edit(1, ("ips",), ips))
    validate, render, _ = repo.run()
    assert validate.exit_code == 0 and render.exit_code == 0, validate.output[-300:]
    rules = _group_rules(render.output)
    granted = {r[r.index("-d") + 1] for r in rules}
    assert granted == {f"{ip}/32" for ip in ips} | {"198.19.0.1/32"}
    assert len(rules) == 6001

    repo.write(_edit(1, ("ips",), _many_ips(6001)))
    validate, render, _ = repo.run()
    assert validate.exit_code == 1 and render.exit_code == 1
    assert "ips: at most 6000 ips per destination" in validate.output


# -- fuzzing what test_fuzz.py does not reach: the store, and PolicyTest cases -------------

HOSTILE_TEXT = st.sampled_from(
    [*INJECTIONS[:-1], "198.18.0.2", "fd00:18::2", "fd00:18::2%eth0", "fd00:18::2%x y",
     "::ffff:198.18.0.2", "１９８.18.0.2", "198.18.0.2/32", "0.0.0.0", "224.0.0.1", "app",
     "staging", "task", "c1", "app-1", "space-1", "", " ", "2001-02-30"]
) | st.text(max_size=12)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | HOSTILE_TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "handle",
                    "ip",
                    "metadata",
                    "app_id",
                    "space_id",
                    "org_id",
                    "policy_group_id",
                    "container_workload",
                ]
            )
            | HOSTILE_TEXT,
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(HOSTILE_TEXT, JSON, max_size=3))
def test_any_store_is_an_inventory_error_or_safe_containers(store: dict[str, Any]) -> None:
    """Whatever the metadata store holds, what comes out is safe to put in a rule or a log
    line, and no IP gets more than the narrowest entry claiming it."""
    try:
        reading = decode_store(json.dumps(store))
    except InventoryError as exc:
        assert "\n" not in str(exc).split(": ", 1)[0]
        return
    handles = [c.handle for c in reading.containers]
    assert len(set(handles)) == len(handles)
    for c in reading.containers:
        ip = ipaddress.ip_address(c.ip)
        assert str(ip) == c.ip and "%" not in c.ip and not any(ch.isspace() for ch in c.ip)
        for value in (c.handle, c.app_id, c.space_id, c.org_id, c.policy_group_id, c.workload):
            assert value.isprintable() and len(value) <= 1024, value
    for r in reading.rejected:
        assert str(r).isprintable(), r


CASE = st.fixed_dictionaries(
    {"to": HOSTILE_TEXT | st.sampled_from(["198.19.5.5:5432", "[fd00:19::1]:443/tcp",
                                           "198.19.0.1/icmp", "198.19.0.1:0"])},
    optional={
        "app": HOSTILE_TEXT | st.just("acme/prod/web"),
        "space": HOSTILE_TEXT | st.just("acme/prod"),
        "lifecycle": HOSTILE_TEXT | st.sampled_from(["running", "staging"]),
        "expect": HOSTILE_TEXT | st.sampled_from(["allow", "deny"]),
        "icmp_type": st.integers(-(2**40), 2**40) | HOSTILE_TEXT,
        "icmp_code": st.integers(-3, 300),
    },
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(CASE, min_size=1, max_size=3), HOSTILE_TEXT)
def test_any_policy_test_gives_findings_or_results(cases: list[dict[str, Any]], name: str) -> None:
    """PolicyTest documents (test_fuzz.py's generator never makes one) through load,
    validate and `run_tests`: findings or one result per case, never an exception."""
    docs = [*copy.deepcopy(BASE[:4]), {"kind": "PolicyTest", "name": name or "t", "cases": cases}]
    result = parse_files([SourceFile("t.yaml", _dump(docs).encode())])
    if not result.ok:
        assert all("\n" not in str(f) for f in result.findings)
        return
    results = run_tests(result.policy)
    assert len(results) == len(cases)
    for fmt in ("text", "json", "github"):
        out = render_results(results, fmt, "", verbose=True)
        assert "\x1b" not in out and "\n-A FORWARD" not in out
