"""Human-readable account of a converge cycle, for `asgctl apply` and the agent's log.

Drift is listed rule by rule: it is someone else's change to a firewall, and an operator
needs to see exactly what was there instead of what the plan put there.
"""

from __future__ import annotations

from reconciler.backends.contract import ConvergeResult, Drift, FamilyResult

_VERB = {"apply": "", "dry-run": " (dry run: nothing sent)", "report-only": " (report only)"}


def format_text(result: ConvergeResult, transactions: bool = False) -> str:
    lines = [f"backend {result.backend}{_VERB.get(result.mode, '')}"]
    for fam in result.families:
        lines.extend(_family(fam, result.mode))
        if transactions and not fam.delta.empty:
            lines.append(f"# ipv{fam.family}: {_tool(result.backend, fam.family)}")
            lines.append(fam.delta.text().rstrip("\n"))
    return "\n".join(lines) + "\n"


def _tool(backend: str, family: int) -> str:
    """The command each backend feeds its transaction to, as the dry run's header."""
    if backend == "nftables":
        return "nft -j -f - (table inet asgctl)"
    if backend == "libiptc":
        return "one libiptc commit (shown as iptables-restore input)"
    variant = backend.removeprefix("iptables-")
    return f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-restore --noflush"


def _drift_state(fam: FamilyResult, drift: Drift, mode: str) -> str:
    if fam.sent and drift.repair:
        return "repaired"
    if mode in ("report-only", "dry-run"):
        return f"not repaired ({mode})"
    return "not repaired" if drift.repair else "not repaired (self-heal off)"


def _family(fam: FamilyResult, mode: str) -> list[str]:
    d = fam.delta
    head = f"ipv{fam.family}: "
    if fam.error is not None:
        # The error itself is the caller's to print, once, where errors go (stderr): a
        # permission failure shown here too reached a terminal twice.
        out = [head + "failed" + (" after sending its transaction" if fam.sent else "")]
    elif d.empty:
        out = [head + "in sync" + (f", {len(d.drift)} drift left alone" if d.drift else "")]
    elif mode == "report-only":
        # An audit: what differs is counted as what it is, and nothing would be sent.
        found = []
        if d.changes:
            found.append(f"{len(d.changes)} planned change(s)")
        if d.drift:
            found.append(f"{len(d.drift)} drift")
        out = [head + (", ".join(found) or "differs") + "; nothing sent (report-only)"]
    else:
        did = "sent" if fam.sent else "would send"
        parts = [f"{len(d.written)} chain(s) written", f"{len(d.deleted)} deleted"]
        if d.orphaned:
            parts.append(f"{len(d.orphaned)} flushed and kept")
        out = [head + f"{did} {len(d.ops)} line(s): " + ", ".join(parts)]
    for c in d.changes:
        out.append(f"  change {c}")
    for x in d.drift:
        out.append(f"  drift: {x}, {_drift_state(fam, x, mode)}")
        out.extend(f"      - {rule}" for rule in x.expected)
        out.extend(f"      + {rule}" for rule in x.found)
    out.extend(f"  note   {n}" for n in d.notes)
    return out
