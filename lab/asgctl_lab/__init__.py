"""Network-namespace lab for the end-to-end tests and the demo (needs root; see `netns`)."""

from asgctl_lab.netns import (
    Attachment,
    ContainerSpec,
    Lab,
    LabError,
    ServiceSpec,
    cleanup_stale,
    netns_unavailable_reason,
)
from asgctl_lab.probe import HeldConnection, Outcome, ProbeResult

__all__ = [
    "Attachment",
    "ContainerSpec",
    "HeldConnection",
    "Lab",
    "LabError",
    "Outcome",
    "ProbeResult",
    "ServiceSpec",
    "cleanup_stale",
    "netns_unavailable_reason",
]
