"""A converge loop to kill: `python -m tests.faultdriver SPEC.pickle`.

The kill -9 tests need a process that does nothing but the agent's dataplane work -- read
the kernel, compute the delta, iptables-restore, read back -- over and over, so that a
SIGKILL lands in every phase of it many times a second.  The agent itself also fetches,
loads and compiles between applies and starts in about a second, which is why the 200-kill
runs use this loop and a smaller number of kills goes to real agents.

SPEC holds the plans to alternate between, the namespace, and the backend.  Every converge
prints one line (`ok <n>` or `error <n> <message>`), so the test knows how many applies ran.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

from reconciler.backends import Runner, converge, open_backend


def main(spec_path: str) -> int:
    spec: dict[str, Any] = pickle.loads(Path(spec_path).read_bytes())
    plans = spec["plans"]
    backend = open_backend(
        spec.get("backend", "iptables"),
        spec["variant"],
        Runner((*spec.get("prefix", ()), "ip", "netns", "exec", spec["netns"])),
    )
    start = int(spec.get("start", 0))
    last = plans[(start - 1) % len(plans)] if start else None
    n = start
    while True:
        plan = plans[n % len(plans)]
        result = converge(backend, plan, last, families=tuple(spec.get("families", (4,))))
        n += 1
        if result.ok:
            last = plan
            print(f"ok {n}", flush=True)
        else:
            last = None  # unknown: the next cycle reads the kernel and decides from that
            errors = "; ".join(f.error or "" for f in result.families if f.error)
            print(f"error {n} {errors[:200]}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
