"""Errors of the dataplane edge.

Each names the step that failed, because the agent reacts differently: a read error must never
be taken for an empty table (it would "repair" by reinstalling everything, or worse, conclude
nothing is installed), an apply error leaves the previous rules in place and is retried, and a
verify error means the renderer and the kernel disagree about the canonical form.
"""

from __future__ import annotations


class DataplaneError(RuntimeError):
    """Something at the kernel edge failed; the message says what and why."""


class ReadError(DataplaneError):
    """The kernel state could not be read completely and unambiguously."""


class ApplyError(DataplaneError):
    """A transaction was refused; restore is atomic per table, so nothing of it was applied."""

    def __init__(self, message: str, line: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.text = text


class VerifyError(DataplaneError):
    """After a successful apply, the kernel still differs from the plan."""


class VariantError(DataplaneError):
    """The iptables variant (legacy or nft) cannot be chosen without mixing the two."""


class OwnershipError(DataplaneError):
    """A chain the plan needs exists in the kernel but is not ours (it lacks our ownership
    marker and is not in the last plan applied): taking it over would destroy another
    program's rules, so nothing is sent for that family until someone removes or renames it."""
