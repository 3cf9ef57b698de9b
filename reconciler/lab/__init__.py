"""Network-namespace lab for the end-to-end tests and the demo (needs root; see `netns`)."""

from reconciler.lab.netns import (
    ContainerSpec,
    Endpoint,
    Lab,
    LabError,
    ServiceSpec,
    cleanup_stale,
    netns_unavailable_reason,
)
from reconciler.lab.probe import HeldConnection, Outcome, ProbeResult

__all__ = [
    "ContainerSpec",
    "Endpoint",
    "HeldConnection",
    "Lab",
    "LabError",
    "Outcome",
    "ProbeResult",
    "ServiceSpec",
    "cleanup_stale",
    "netns_unavailable_reason",
]
