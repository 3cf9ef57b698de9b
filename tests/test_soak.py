"""The short soak: 300 random policy and inventory changes converged in a lab namespace.

bench/soak.py runs 10,000 in `make soak`; here the same loop runs 300 cycles with the kernel
read back every 25, so `make test` catches a converge that drifts from its plan, leaves an
orphan chain or disturbs foreign rules long before anyone runs the full soak.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from asgctl_lab.netns import Lab
from bench.soak import run
from tests.conftest import require_netns
from tests.faultkit import record, scale

pytestmark = pytest.mark.netns


@pytest.mark.parametrize(
    ("backend", "variant", "cycles"),
    [("iptables", "legacy", scale(300, 2000)), ("nftables", "nft", scale(60, 1000))],
    ids=["iptables-legacy", "nftables"],
)
def test_short_soak_never_leaves_the_plan(
    make_lab: Callable[..., Lab], backend: str, variant: str, cycles: int
) -> None:
    require_netns()
    lab = make_lab(conntrack=False)
    figures = run(cycles, seed=3, backend=backend, variant=variant, verify_every=25,
                  netns=lab.cell)  # fmt: skip
    assert figures["violations"] == [], figures["violations"][:10]
    assert figures["verifications"] >= cycles // 25
    assert figures["cycles_that_changed_the_kernel"] > cycles // 3
    summary = {k: v for k, v in figures.items() if k not in ("samples", "edits_by_kind")}
    record("soak-short", **summary)
