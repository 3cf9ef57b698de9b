"""Shared fixtures for the render and dataplane tests: the example and edge repositories as
loaded policy and plans, and a runner that records what it sends to the kernel.

Each caller still names its own cell when it compiles a plan (`case_plan(name, cell)`):
the cell name is part of every chain and comment, so goldens depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reconciler.backends import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, PolicySet
from reconciler.policy.load import load_folder
from reconciler.sources.cellstore import parse_store

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
CASES = {
    "example": (REPO / "policies", DATA / "example-store.json"),
    "edge": (DATA / "edge-policies", DATA / "edge-store.json"),
    "audit": (DATA / "audit-policies", DATA / "example-store.json"),
}
"""Policy folder and container store of each repository the render tests hold to goldens."""


def load_case(name: str) -> tuple[PolicySet, tuple[Container, ...]]:
    """CASES[name]'s policy (which must load cleanly) and containers."""
    policies, store = CASES[name]
    result = load_folder(policies)
    assert result.ok and result.policy is not None
    return result.policy, parse_store(store.read_text())


def case_plan(name: str, cell: str) -> CellPlan:
    """CASES[name] compiled for a cell called `cell`."""
    policy, containers = load_case(name)
    return compile_cell(policy, containers, cell)


def edge_plan() -> CellPlan:
    """Every rendering branch (protocols, ranges, multiport, ICMP, IPv6, logging)."""
    return case_plan("edge", "t")


@dataclass(frozen=True, slots=True)
class RecordingRunner(Runner):
    """A runner that remembers every command: to prove a no-op cycle sends nothing, and to
    count full reads and listings."""

    calls: list[tuple[str, ...]] = field(default_factory=list)

    def run(self, argv, stdin=None):  # type: ignore[no-untyped-def]
        self.calls.append(tuple(argv))
        return Runner.run(self, argv, stdin)

    def restores(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0].endswith("-restore")]

    def saves(self) -> int:
        return sum(1 for c in self.calls if c[0].endswith("-save"))

    def listings(self) -> int:
        return sum(1 for c in self.calls if "-S" in c)
