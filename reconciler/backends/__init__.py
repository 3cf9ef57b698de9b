"""The dataplane edge: converge the kernel to a plan through one of several backends.

`contract` is what every backend provides and what the converge loop, status and metrics
use; `open_backend` picks a backend by name (`iptables/`, `nftables/`: one folder each, with
its renderer, parser, delta and kernel memory; `kernel/`: the plumbing they share).
"""

from __future__ import annotations

from reconciler.backends.contract import (
    AnyBackend,
    Backend,
    Change,
    ConvergeResult,
    Delta,
    Desired,
    Drift,
    FamilyResult,
    Mode,
    Observed,
    converge,
    installed_rules,
    remove,
)
from reconciler.backends.errors import (
    ApplyError,
    DataplaneError,
    ReadError,
    VariantError,
    VerifyError,
)
from reconciler.backends.iptables.backend import VARIANTS as IPTABLES_VARIANTS
from reconciler.backends.kernel.runner import Runner

BACKENDS = ("iptables", "libiptc", "nftables")
"""The dataplane backends a cell can run: the agent's `backend`, `apply`/`uninstall --backend`."""
VARIANT_CHOICES = ("auto", *IPTABLES_VARIANTS)
"""`--variant` / `variant`: an iptables variant, or `auto` to follow what the host uses."""


def open_backend(
    name: str = "iptables", variant: str = "auto", runner: Runner | None = None
) -> AnyBackend:
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
    "VARIANT_CHOICES",
    "AnyBackend",
    "ApplyError",
    "Backend",
    "Change",
    "ConvergeResult",
    "DataplaneError",
    "Delta",
    "Desired",
    "Drift",
    "FamilyResult",
    "Mode",
    "Observed",
    "ReadError",
    "Runner",
    "VariantError",
    "VerifyError",
    "converge",
    "installed_rules",
    "open_backend",
    "remove",
]
