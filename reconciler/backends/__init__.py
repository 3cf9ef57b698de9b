"""The dataplane edge: read the kernel's state of our rules, and converge it to a plan.

`open_backend` picks a backend by name; `converge` runs one read-delta-apply-verify cycle.
Everything here does I/O except `compute_delta` and `parse_save`, which are pure.
"""

from __future__ import annotations

from reconciler.backends.contract import Backend, ConvergeResult, FamilyResult, Mode, converge
from reconciler.backends.errors import (
    ApplyError,
    DataplaneError,
    ReadError,
    VariantError,
    VerifyError,
)
from reconciler.backends.iptables.delta import compute_delta
from reconciler.backends.iptables.parse import parse_save
from reconciler.backends.kernel.runner import Runner
from reconciler.backends.records import Change, Delta, Drift, OwnedState

BACKENDS = ("iptables", "libiptc", "nftables")


def open_backend(
    name: str = "iptables", variant: str = "auto", runner: Runner | None = None
) -> Backend:
    """A backend for this host (or for the namespace `runner` runs in)."""
    if name == "iptables":
        from reconciler.backends.iptables.backend import IptablesBackend

        return IptablesBackend.open(variant, runner)
    if name == "libiptc":
        try:
            from reconciler.backends.iptables.libiptc import LibiptcBackend
        except ImportError as exc:
            raise DataplaneError(f"the libiptc backend is not available: {exc}") from None
        return LibiptcBackend.open(variant, runner)
    if name == "nftables":
        from reconciler.backends.nftables.backend import NftablesBackend

        return NftablesBackend.open(variant, runner)
    raise DataplaneError(f"unknown dataplane backend {name!r} (one of {', '.join(BACKENDS)})")


__all__ = [
    "BACKENDS",
    "ApplyError",
    "Backend",
    "Change",
    "ConvergeResult",
    "DataplaneError",
    "Delta",
    "Drift",
    "FamilyResult",
    "Mode",
    "OwnedState",
    "ReadError",
    "Runner",
    "VariantError",
    "VerifyError",
    "compute_delta",
    "converge",
    "open_backend",
    "parse_save",
]
