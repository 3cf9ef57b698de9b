"""What a name's set should hold, decided purely from answers, failures and the clock.

The rules (issue 15, item 3):
* an address lives in the kernel for the record's TTL clamped to [fqdn-min-ttl,
  fqdn-max-ttl]; the name is asked again at half that, so a working resolver renews its
  addresses before they lapse, and a resolver outage lets them lapse at their TTL;
* an address the name stops answering is not removed at once (a round-robin name answers a
  different subset each time, and containers keep connecting to what they were told); it
  lapses at its TTL like any other;
* a name holds at most fqdn-max-ips live addresses per family; an answer past that adds
  nothing more and is counted (`capped`), never by evicting what containers may be using;
* a wildcard is never resolved: it cannot be asked ahead of time; only the answers
  containers receive fill it (`fqdn.intercept`, docs/fqdn.md);
* an answer naming an address no container may be sent to through a name -- unspecified,
  loopback, link-local (the cloud metadata service at 169.254.169.254), multicast or
  reserved -- adds nothing: whoever controls a name's DNS must not be able to point a grant
  at the cell itself or its platform (`refused` counts them).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from reconciler.fqdn.kernelsets import Write

DEFAULT_MIN_TTL = 5
DEFAULT_MAX_TTL = 3600
DEFAULT_MAX_IPS = 1024
DEFAULT_INTERCEPT_QUEUE = 5353
STATUS_ADDRESSES = 32
"""Addresses per name a status document lists (the count is always complete)."""


@dataclass(frozen=True, slots=True)
class FqdnSettings:
    """The agent's `fqdn-*` settings."""

    min_ttl: int = DEFAULT_MIN_TTL
    max_ttl: int = DEFAULT_MAX_TTL
    max_ips: int = DEFAULT_MAX_IPS
    resolvers: tuple[str, ...] = ()
    """`address` or `address:port` ([v6]:port); empty: the cell's /etc/resolv.conf."""
    timeout: float = 2.0
    intercept: bool = True
    """Learn from the answers containers receive (`fqdn.intercept`): the first connection."""
    intercept_queue: int = DEFAULT_INTERCEPT_QUEUE
    """The NFQUEUE number holding answers, and the NFLOG group copying queries."""

    def __post_init__(self) -> None:
        if not 0 <= self.intercept_queue <= 65535:
            raise ValueError("fqdn-intercept-queue must be 0-65535")
        if not 1 <= self.min_ttl <= self.max_ttl:
            raise ValueError("fqdn-min-ttl must be at least 1 and at most fqdn-max-ttl")
        if self.max_ips < 1:
            raise ValueError("fqdn-max-ips must be at least 1")

    def clamp(self, ttl: int) -> int:
        return max(self.min_ttl, min(self.max_ttl, ttl))


@dataclass(frozen=True, slots=True)
class NameState:
    """One name in one family: its set, the addresses we put there and until when."""

    fqdn: str
    family: int
    set_name: str
    addresses: tuple[tuple[str, float], ...] = ()
    """(address, expires at), in the order they were first learned."""
    next_refresh: float = 0.0
    resolved_at: float | None = None
    error: str = ""
    capped: int = 0
    """Answers that had more addresses than fqdn-max-ips allowed in."""
    refused: int = 0
    """Addresses answered that no grant by name may reach (`usable`)."""

    @property
    def wildcard(self) -> bool:
        return self.fqdn.startswith("*.")

    def live(self, now: float) -> tuple[tuple[str, float], ...]:
        return tuple((a, t) for a, t in self.addresses if t > now)

    def to_dict(self, now: float, limit: int = STATUS_ADDRESSES) -> dict[str, object]:
        """For the status branch: bounded, with the full count."""
        live = self.live(now)
        out: dict[str, object] = {
            "fqdn": self.fqdn,
            "family": self.family,
            "set": self.set_name,
            "count": len(live),
            "addresses": [a for a, _ in live[:limit]],
        }
        if self.wildcard:
            out["note"] = "wildcard: filled only from the answers containers receive"
        if self.error:
            out["error"] = self.error
        if self.capped:
            out["capped"] = self.capped
        if self.refused:
            out["refused"] = self.refused
        return out


def usable(address: str) -> bool:
    """Whether an answered address may go into a name's set (see the module doc)."""
    ip = ipaddress.ip_address(address)
    return not (
        ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    )


def on_answer(
    state: NameState, addresses: tuple[str, ...], ttl: int, now: float, settings: FqdnSettings
) -> tuple[NameState, Write, bool]:
    """The state after an answer, the set write it needs, and whether the bound was hit."""
    timeout = settings.clamp(ttl)
    expires = now + timeout
    live = dict(state.live(now))
    accepted: list[str] = []
    hit = False
    refused = 0
    for address in addresses:
        if not usable(address):
            refused += 1
        elif address in live or len(live) < settings.max_ips:
            live[address] = expires
            accepted.append(address)
        else:
            hit = True
    new = replace(
        state,
        addresses=tuple(live.items()),
        next_refresh=now + max(1.0, timeout / 2),
        resolved_at=now,
        error="",
        capped=state.capped + (1 if hit else 0),
        refused=state.refused + refused,
    )
    write = Write(state.set_name, state.family, tuple((a, timeout) for a in accepted))
    return new, write, hit


def on_failure(state: NameState, error: str, now: float, settings: FqdnSettings) -> NameState:
    """A failed resolution: nothing is written, what is there lapses at its TTL, and the
    name is asked again after fqdn-min-ttl."""
    return replace(
        state,
        addresses=state.live(now),
        next_refresh=now + settings.min_ttl,
        error=error,
    )


def due(states: dict[tuple[int, str], NameState], now: float) -> list[NameState]:
    """Exact names whose refresh is due (wildcards never are)."""
    return [s for s in states.values() if not s.wildcard and s.next_refresh <= now]
