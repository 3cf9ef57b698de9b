"""Coverage-guided fuzzing with atheris (libFuzzer for Python): `make fuzz`.

    python bench/fuzz_atheris.py --target policy --seconds 120
    python bench/fuzz_atheris.py --target store --seconds 120

tests/test_fuzz.py and tests/test_hostile_fields.py fuzz with hypothesis, which generates
from grammars we wrote; libFuzzer instead mutates bytes towards new branches of the code
itself, and finds inputs nobody thought to write a strategy for.  The targets hold the same
contract as the tests:

* `policy`: bytes as a policy file through load -> validate -> compile -> render.  Findings
  are fine; an exception is a crash; a rendered group rule that no rule of the input asked
  for is a crash.
* `store`: bytes as the cell's store.json through `parse_store`.  InventoryError is fine;
  any other exception is a crash, and every container that comes out must have an address
  that is safe to put in a rule (no zone id, no whitespace) and ids of the safe alphabet.

The seed corpus is the repo's own policies and test data.  Not part of `make test` (atheris
is not a dependency; `make fuzz` installs it); the figures of the last run are in
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-not-found]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

with atheris.instrument_imports():
    from reconciler.backends.iptables.render import render_text
    from reconciler.core.compile import compile_cell
    from reconciler.core.model import Container
    from reconciler.policy.load import parse_files
    from reconciler.policy.source import SourceFile
    from reconciler.sources.cellstore import InventoryError, parse_store

CONTAINERS = [
    Container("c4", "198.18.0.2", app_id="app-1", space_id="space-1"),
    Container("c6", "fd00:18::2", app_id="app-1", space_id="space-1", workload="staging"),
]
_SAFE = re.compile(r"[A-Za-z0-9_.:-]*")


def policy_target(data: bytes) -> None:
    result = parse_files([SourceFile("fuzz.yaml", data)])
    for f in result.findings:
        assert f.line >= 1 and f.col >= 1 and f.message and "\n" not in str(f)
    if not result.ok:
        return
    plan = compile_cell(result.policy, CONTAINERS)
    asked = {
        item for g in result.policy.security_groups for rule in g.rules for item in rule.items()
    } | {item for d in result.policy.destinations for item in d.as_rule().items()}
    for group in plan.groups:
        for rule in group.rules:
            assert rule.item in asked, f"rendered a rule nobody asked for: {rule.item}"
    for family in (4, 6):
        text = render_text(plan, family)
        assert text.startswith("*filter\n") and text.count("COMMIT") == 1


def store_target(data: bytes) -> None:
    try:
        containers = parse_store(data)
    except InventoryError:
        return
    for c in containers:
        ip = ipaddress.ip_address(c.ip)
        assert str(ip) == c.ip and "%" not in c.ip and not any(x.isspace() for x in c.ip)
        for value in (c.handle, c.app_id, c.space_id, c.org_id, c.policy_group_id):
            assert _SAFE.fullmatch(value), value


def seed_corpus(target: str, into: Path) -> None:
    patterns = ("policies/**/*.yaml", "tests/data/**/*.yaml") if target == "policy" else (
        "tests/data/**/*.json",)  # fmt: skip
    for pattern in patterns:
        for i, path in enumerate(sorted(ROOT.glob(pattern))):
            if path.stat().st_size < 64 << 10:
                shutil.copy(path, into / f"seed-{i}-{path.name}")
    if target == "store":
        (into / "seed-lab.json").write_text(
            '{"c1": {"handle": "c1", "ip": "198.18.0.2", "metadata": {"app_id": "a",'
            ' "space_id": "s", "container_workload": "staging"}}}'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("policy", "store"), required=True)
    parser.add_argument("--seconds", type=int, default=120)
    args, rest = parser.parse_known_args()
    corpus = Path(tempfile.mkdtemp(prefix=f"asg-fuzz-{args.target}-"))
    seed_corpus(args.target, corpus)
    target = policy_target if args.target == "policy" else store_target
    crashes = Path(tempfile.gettempdir()) / "asg-fuzz-crashes"
    crashes.mkdir(exist_ok=True)
    print(f"fuzzing {args.target} for {args.seconds} s; crashing inputs go to {crashes}/")
    argv = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-artifact_prefix={crashes}/{args.target}-",
        "-print_final_stats=1",
        "-max_len=4096",
        "-rss_limit_mb=4096",
        *rest,
        str(corpus),
    ]
    try:
        atheris.Setup(argv, target)
        atheris.Fuzz()
    finally:  # atheris exits the process when done; the corpus is scratch
        shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
