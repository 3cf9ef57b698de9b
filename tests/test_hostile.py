"""A corpus of hostile policy input, through the whole command line.

Each entry either fails validation with a clear message naming the file and line (exit 1,
nothing rendered), or is valid and renders exactly the rules it asked for.  Never a
traceback, never an extra rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from tests.iptables_eval import Packet, parse_restore, verdict

STORE = {"c1": {"handle": "c1", "ip": "198.18.0.2", "metadata": {"space_id": "s1"}}}
INJECTIONS = [
    '"\n-A FORWARD -j ACCEPT\nCOMMIT',
    "-j ACCEPT",
    "COMMIT",
    "*filter",
    "$(reboot); `id` | rm -rf / &",
    "' OR 1=1 --",
    "\u202e\u200b\ufeff",
    "x" * 10_000,
]


def sg(rule: dict, **extra: object) -> str:
    doc = {"kind": "SecurityGroup", "name": "g", "rules": [rule], "running_spaces": ["s1"]}
    doc.update(extra)
    return json.dumps(doc)


def tcp(destination: object, ports: object = "443", **more: object) -> dict:
    return {"protocol": "tcp", "destination": destination, "ports": ports, **more}


def many(n: int) -> str:
    return ",".join(f"198.19.{i // 250}.{i % 250}" for i in range(n))


# (id, file text, expected message or None for valid)
CORPUS = [
    ("6001-destinations", sg(tcp(many(6001))), "maximum destinations per rule exceeded"),
    ("6000-destinations", sg(tcp(many(6000))), None),
    ("zone-id", sg(tcp("fe80::1%eth0")), "destination must contain valid CIDR"),
    ("unicode-digits-port", sg(tcp("198.19.0.1", "８０")), "ports must be a valid"),
    ("unicode-digits-addr", sg(tcp("１９８.19.0.1")), "destination must contain valid CIDR"),
    ("huge-port", sg(tcp("198.19.0.1", "9" * 40)), "ports must be a valid"),
    ("negative-port", sg(tcp("198.19.0.1", "-1")), "ports must be a valid"),
    ("port-zero", sg(tcp("198.19.0.1", "0")), "ports must be a valid"),
    ("port-int-huge", sg(tcp("198.19.0.1", 2**70)), "must be in range 1-65535"),
    (
        "icmp-huge",
        sg({"protocol": "icmp", "destination": "198.19.0.1", "type": 2**64, "code": -2}),
        "type must be an integer between -1 and 255",
    ),
    ("leading-zero", sg(tcp("198.19.0.01")), "leading zeros"),
    ("inverted-range", sg(tcp("198.19.0.9-198.19.0.1")), "range endpoints are inverted"),
    ("host-bits", sg(tcp("198.19.0.77/24")), None),
    ("newline-in-destination", sg(tcp("198.19.0.1\n-A FORWARD -j ACCEPT")), "whitespace"),
    ("newline-in-ports", sg(tcp("198.19.0.1", "443\nCOMMIT")), "ports must be a valid"),
    (
        "float-type",
        sg({"protocol": "icmp", "destination": "198.19.0.1", "type": 8.5, "code": 0}),
        "type must be an integer",
    ),
    ("bool-log-string", sg(tcp("198.19.0.1", log="true")), "log must be a boolean"),
    ("unknown-key", sg(tcp("198.19.0.1", jump="ACCEPT")), "unknown field(s)"),
    ("non-utf8", b"kind: SecurityGroup\nname: \xff\xfe\n", "not valid UTF-8"),
    ("python-tag", "kind: !!python/object/apply:os.system [id]\n", "is not allowed"),
    ("deep", "a: " + "[" * 10_000 + "]" * 10_000, "nesting"),
    (
        "alias-bomb",
        "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
        + "".join(
            f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "expands to more than",
    ),
    *[
        (f"injection-{i}", sg(tcp("198.19.0.1"), description=text[:10_000]), None)
        for i, text in enumerate(INJECTIONS)
    ],
    *[
        (
            f"injection-name-{i}",
            sg(tcp("198.19.0.1")).replace('"name": "g"', f'"name": {json.dumps(text[:250])}'),
            None,
        )
        for i, text in enumerate(INJECTIONS)
    ],
]


def run(tmp_path: Path, text: str | bytes):
    policies = tmp_path / "policies"
    policies.mkdir()
    target = policies / "input.yaml"
    if isinstance(text, bytes):
        target.write_bytes(text)
    else:
        target.write_text(text)
    store = tmp_path / "store.json"
    store.write_text(json.dumps(STORE))
    runner = CliRunner()
    validate = runner.invoke(main, ["validate", str(policies)])
    render = runner.invoke(
        main, ["render", "--containers", str(store), "--policies", str(policies), "--family", "4"]
    )
    return validate, render


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_input(tmp_path, text, expected):
    validate, render = run(tmp_path, text)
    for result in (validate, render):
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        assert "Traceback" not in result.output
    if expected is not None:
        assert validate.exit_code == 1
        assert "input.yaml:" in validate.output and expected in validate.output
        assert render.exit_code == 1
        assert "*filter" not in render.output
        return
    assert validate.exit_code == 0, validate.output
    assert render.exit_code == 0, render.output
    chains = parse_restore(render.output)
    # (Rule 0 of every chain of ours is its ownership marker, which has no target.)
    rules = [r for name, rs in chains.items() if name.startswith("ASG-G-") for r in rs[1:]]
    # Exactly the rules asked for: every one a plain tcp/443 accept, nothing else.
    assert rules and all(r[-2:] == ["-j", "ACCEPT"] and "443" in r for r in rules)
    assert verdict(chains, Packet("198.18.0.2", "198.19.0.1", "tcp", 443)) == "ACCEPT"
    assert verdict(chains, Packet("198.18.0.2", "198.19.0.1", "tcp", 22)) == "REJECT"
    assert verdict(chains, Packet("198.18.0.2", "198.18.9.9", "udp", 53)) == "REJECT"


def test_a_100_mb_file_is_refused_without_reading_it(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    with (policies / "huge.yaml").open("wb") as f:
        f.truncate(100 * 1024 * 1024)
    result = CliRunner().invoke(main, ["validate", str(policies)])
    assert result.exit_code == 1
    assert "huge.yaml:1:1: file is 104857600 bytes, over the limit" in result.output
