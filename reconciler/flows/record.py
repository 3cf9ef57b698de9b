"""Flow records: the kernel's log prefixes, and the JSON record the agent writes per flow.

Both are contracts: the renderers write the prefixes into the kernel, the agent
(`reconciler.flows.collect`) reads them back, and `asgctl flows` (and audit mode and
`asgctl suggest` after it) read the records.  Change them only additively.

Kernel prefix scheme
--------------------
A logged verdict carries a prefix of the form ``ASG <VERDICT> <ID> `` (trailing space, as
the LOG target's prefixes have always had), the same in both backends and for both log
targets (iptables `LOG --log-prefix` / `NFLOG --nflog-prefix`, nft `log prefix` with or
without `group`)::

    ASG DENY <container log id>    final reject of a container's chain        -> deny
    ASG OK <rule log id>           a `log: true` rule accepting a new flow    -> allow
    ASG AUDIT <container log id>   final accept of an audited container's chain
                                   (kind: Enforcement, mode: audit): what would be
                                   rejected, logged and accepted              -> would-deny
    ASG DENY RATE                  the connection limit (outbound_connections) -> deny

An id is the first `LOG_ID_LEN` (16) hex digits of a plan id: a container's chain id (a
hash of its handle) or a rule's id (a hash of its match), as `cellplan.log_id` cuts them.
Nothing else is ever in a prefix -- no name from a policy file or the metadata store -- so a
prefix is at most 27 bytes (iptables LOG allows 29, NFLOG 64) and the agent maps it back
through the applied plan: a container id to its handle, addresses and app/space/org GUIDs
(and through the policy's Directory to names), a rule id to its group and the
SecurityGroup/EgressPolicy rule and file:line that asked for it (`Provenance`).  A prefix
that does not parse as exactly this (another program's NFLOG on our group, a kernel that
cut it) is counted as unparsed and never guessed at.

Flow record (one JSON object per line of `<state-dir>/flows/flows.jsonl`)
------------------------------------------------------------------------
One record per aggregate: packets of one (container, destination, port, protocol, verdict,
rule) seen in one window (default 10 s), with their count::

    {"v": 1,                          record format version
     "time": "2026-12-06T06:30:10Z",  first packet of the aggregate in the window (UTC)
     "end": "2026-12-06T06:30:14Z",   last packet of the aggregate
     "cell": "cell-1",
     "container": "<handle>",         CF container handle ("" when the source is unknown)
     "source": "198.18.0.2",          the container's address
     "app": "payments/prod/backend",  org/space/app by name via the Directory, else the GUID
     "app_id": "<guid>", "space": "payments/prod", "space_id": "<guid>",
     "org": "payments", "org_id": "<guid>",
     "destination": "198.19.0.9", "port": 443,   port: null for ICMP and other protocols
     "protocol": "tcp",               tcp | udp | icmp | icmpv6 | the IP protocol number
     "verdict": "deny",               deny | allow | would-deny
     "count": 3,                      packets the kernel logged (at least; see FlowLog.rate)
     "rule": {"id": "<32 hex>", "group": "<32 hex>",     allow only: which rule let it out
              "sources": ["SecurityGroup/x rules[0] (policies/x.yaml:7)", ...]},
     "reason": "rate-limit"}          only for the connection limit's denies

Always set: `time`, `end`, `cell`, `destination`, `protocol`, `verdict`, `count`; the rest
is "" (or null) when unknown -- `container` and the names when the source address is no
container of the applied plan.  A reader must accept unknown keys (later versions add,
never rename).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reconciler.core.cellplan import LOG_ID_LEN

RECORD_VERSION = 1
DENY, ALLOW, WOULD_DENY = "deny", "allow", "would-deny"
VERDICTS = (DENY, ALLOW, WOULD_DENY)
RATE_LIMIT = "rate-limit"
RATE_ID = "RATE"

_TOKEN = {DENY: "DENY", ALLOW: "OK", WOULD_DENY: "AUDIT"}
_VERDICT_OF = {v: k for k, v in _TOKEN.items()}
_HEX_ID = re.compile(rf"[0-9a-f]{{{LOG_ID_LEN}}}")
_PREFIX = re.compile(rf"ASG (DENY|OK|AUDIT) ([0-9a-f]{{{LOG_ID_LEN}}}|{RATE_ID}) ")


def log_prefix(verdict: str, log_id: str) -> str:
    """The prefix for one verdict and one id (`cellplan.log_id` of a chain or rule id, or
    `RATE_ID` for the connection limit's deny)."""
    if verdict not in _TOKEN:
        raise ValueError(f"no log prefix for verdict {verdict!r}")
    if not (_HEX_ID.fullmatch(log_id) or (log_id == RATE_ID and verdict == DENY)):
        raise ValueError(f"a log prefix carries a {LOG_ID_LEN}-digit hex id, not {log_id!r}")
    return f"ASG {_TOKEN[verdict]} {log_id} "


@dataclass(frozen=True, slots=True)
class Prefix:
    """A parsed prefix: the verdict and the id (`RATE_ID` for the connection limit)."""

    verdict: str
    id: str


def parse_prefix(raw: bytes | str) -> Prefix | None:
    """The verdict and id of a kernel prefix, or None when it is not exactly ours."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    m = _PREFIX.fullmatch(text)
    if m is None:
        return None
    verdict = _VERDICT_OF[m.group(1)]
    if m.group(2) == RATE_ID and verdict != DENY:
        return None
    return Prefix(verdict, m.group(2))


def iso(seconds: float) -> str:
    """UTC, to the second, with a Z: how every time in a record is written."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class RuleRef:
    """For an allow: the rule that let the flow out, its group and who asked for it."""

    id: str
    group: str
    sources: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "sources": list(self.sources)}


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One aggregate, as written (see the module docstring for every field)."""

    time: float
    end: float
    cell: str
    container: str
    source: str
    destination: str
    port: int | None
    protocol: str
    verdict: str
    count: int
    app: str = ""
    app_id: str = ""
    space: str = ""
    space_id: str = ""
    org: str = ""
    org_id: str = ""
    rule: RuleRef | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": RECORD_VERSION,
            "time": iso(self.time),
            "end": iso(self.end),
            "cell": self.cell,
            "container": self.container,
            "source": self.source,
            "app": self.app,
            "app_id": self.app_id,
            "space": self.space,
            "space_id": self.space_id,
            "org": self.org,
            "org_id": self.org_id,
            "destination": self.destination,
            "port": self.port,
            "protocol": self.protocol,
            "verdict": self.verdict,
            "count": self.count,
        }
        if self.rule is not None:
            out["rule"] = self.rule.to_dict()
        if self.reason:
            out["reason"] = self.reason
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False)
