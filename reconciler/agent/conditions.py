"""The names an agent reports: condition types, their statuses and every reason it gives.

One place for the words the status document, the metrics (`sync_failures_total{reason}`)
and the logs share, so a dashboard or an alert written against one of them matches what the
agent says, and a new reason is added here rather than spelled anew where it is raised.
They are plain strings (not an Enum): they go into YAML, JSON and metric labels as they are.

The source's own failure reasons (`GitUnreachable`, `CacheCorrupt`, ...) are named where git's
output is classified (`reconciler.agent.source`), and a signature check's by the verifier
(`reconciler.agent.verify`); the ones below that match them are the ones the cycle itself
decides on.
"""

from __future__ import annotations

from typing import Final

# -- condition types (Flux's vocabulary), in the order a status lists them ------------------

READY: Final = "Ready"
RECONCILING: Final = "Reconciling"
STALLED: Final = "Stalled"
SOURCE_VERIFIED: Final = "SourceVerified"
DRIFTED: Final = "Drifted"
CONDITION_TYPES: Final = (READY, RECONCILING, STALLED, SOURCE_VERIFIED, DRIFTED)

# -- a condition's status -------------------------------------------------------------------

TRUE: Final = "True"
FALSE: Final = "False"
UNKNOWN: Final = "Unknown"

# -- reasons: a cycle that converged, or that is still on its way -----------------------------

RECONCILIATION_SUCCEEDED: Final = "ReconciliationSucceeded"
PROGRESSING: Final = "Progressing"
"""Nothing to enforce yet (no revision, no container metadata): waiting, not failing."""
PROGRESSING_WITH_RETRY: Final = "ProgressingWithRetry"
"""Reconciling=True after a transient failure: the next attempt is scheduled."""
INVENTORY_INVALID: Final = "InventoryInvalid"

# -- reasons: a valid head held back by the repository's Rollout (Ready=True) -----------------
# The cell is healthy and enforces its applied revision (new containers and drift included);
# the head waits for its turn.  See `reconciler.agent.rollout`.

WAITING_FOR_WAVE: Final = "WaitingForWave"
"""A cell of an earlier wave has not yet reported the head Ready for its wave's soak time."""
ROLLOUT_HALTED: Final = "RolloutHalted"
"""A cell of an earlier wave is not Ready on the head (refused it, or fails to enforce it)."""
ROLLOUT_PAUSED: Final = "RolloutPaused"
"""The head's Rollout pauses rollouts (or pins them to another revision)."""
OUTSIDE_CHANGE_WINDOW: Final = "OutsideChangeWindow"
"""A deny window is open, or allow windows exist and none is open."""
ROLLOUT_HOLDS: Final = (WAITING_FOR_WAVE, ROLLOUT_HALTED, ROLLOUT_PAUSED, OUTSIDE_CHANGE_WINDOW)

# -- reasons: a head that is not applied and needs a human (Stalled=True) ---------------------

MALFORMED_COMMIT: Final = "MalformedCommit"
UNSIGNED_COMMIT: Final = "UnsignedCommit"
UNTRUSTED_SIGNATURE: Final = "UntrustedSignature"
VERIFICATION_FAILED: Final = "VerificationFailed"
HISTORY_REWRITTEN: Final = "HistoryRewritten"
VALIDATION_FAILED: Final = "ValidationFailed"
PLAN_REFUSED: Final = "PlanRefused"
"""Two different contents under one id: as a head's verdict a refusal; when the revision
already enforced meets new containers, a transient enforcement failure (kept installed)."""
MASS_REVOKE_BLOCKED: Final = "MassRevokeBlocked"
POLICY_TESTS_FAILED: Final = "PolicyTestsFailed"
"""With `policy-tests: enforce`, a head whose PolicyTest cases fail (the failures are listed)."""
REFUSALS: Final = (
    MALFORMED_COMMIT,
    UNSIGNED_COMMIT,
    UNTRUSTED_SIGNATURE,
    VERIFICATION_FAILED,
    HISTORY_REWRITTEN,
    VALIDATION_FAILED,
    PLAN_REFUSED,
    MASS_REVOKE_BLOCKED,
    POLICY_TESTS_FAILED,
)
"""Every reason a head's verdict can carry: the gates in `reconciler.agent.core` and the
verifier's refusals.  The applied revision stays enforced; only a new head is judged again."""

SOURCE_CHANGED: Final = "SourceChanged"
"""Not a condition's reason but an event's (log line, status `sourceChange`): the configured
source (repository URL, branch) is not the one the applied revision came from; its first
head is a fresh start, judged against the rules the cell enforces."""

# -- reasons: enforcement failed this cycle (transient: retried with back-off) ----------------

UNDERLAY_UNKNOWN: Final = "UnderlayUnknown"
DATAPLANE_UNAVAILABLE: Final = "DataplaneUnavailable"
ENFORCEMENT_FAILED: Final = "EnforcementFailed"
CACHE_CORRUPT: Final = "CacheCorrupt"
"""The fetch cache failed `git fsck` after a head failed to load (the source names it too)."""
INTERNAL_ERROR: Final = "InternalError"
"""A cycle that raised: counted in the failure metric, the rules left as they are."""

# -- reasons: signatures and drift -----------------------------------------------------------

VERIFICATION_DISABLED: Final = "VerificationDisabled"
NOT_CHECKED: Final = "NotChecked"
DRIFT_CORRECTED: Final = "DriftCorrected"
DRIFT_DETECTED: Final = "DriftDetected"
NO_DRIFT: Final = "NoDrift"
