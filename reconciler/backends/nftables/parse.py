"""Read our table out of `nft -j -n list` output, refusing anything ambiguous.

Pure: JSON text in, one family's slice of `inet asgctl` out.  Rules become the same canonical
strings the renderer writes; set elements become canonical text built from integers (nft
prints an interval as a prefix, a range or an address, and that must not make equal elements
differ).  Only objects of our table are kept; other tables (iptables-nft's, other programs')
are skipped without being looked at.  Anything in our table we do not recognise is kept as an
"other" object, so it is reported and removed rather than silently ignored.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.backends.errors import ReadError
from reconciler.backends.nftables.render import (
    ADDRESS_TYPES,
    NFT_FAMILY,
    TABLE,
    BaseHook,
    NftSet,
    canonical_rule,
    element_text,
    family_of,
)


@dataclass(frozen=True)
class NftState:
    """One family's slice of our table as the kernel holds it.

    `chains` holds every chain's rules as canonical strings; `base_hooks` says how base
    chains hook in; `sets` includes the dispatch map.  `elements_read` is false after a terse
    read: group sets' elements were not listed and are unknown, not empty.  `others` are
    objects of our table that are neither chain, set nor map (someone else's), keyed
    "kind name"; `other_slice` counts the other family's objects, which decides whether
    removing this slice may remove the table, and `other_elements` their set elements (with
    this slice's, the size of the table: what a full read costs).
    """

    family: int
    chains: Mapping[str, tuple[str, ...]]
    table: bool = False
    table_flags: tuple[str, ...] = ()
    base_hooks: Mapping[str, BaseHook] = field(default_factory=dict)
    sets: Mapping[str, NftSet] = field(default_factory=dict)
    others: Mapping[str, str] = field(default_factory=dict)
    other_slice: int = 0
    other_elements: int = 0
    elements_read: bool = True

    @property
    def empty(self) -> bool:
        """No chain of ours in this slice: a transaction now installs it."""
        return not self.chains

    @property
    def rule_count(self) -> int:
        elements = sum(len(s.elements or ()) for s in self.sets.values())
        return sum(len(r) for r in self.chains.values()) + elements


def parse_listing(text: str, family: int, *, elements_read: bool = True) -> NftState:
    """Our table's slice for `family` from `nft -j -n list table|ruleset` output.

    `text` may hold the whole ruleset: objects of other tables are skipped.  With
    `elements_read` false (output of `-t`), a set without elements is "not read", not empty.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ReadError(f"nft printed something that is not JSON: {exc}") from None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ReadError("nft JSON output has no `nftables` array")
    table = False
    table_flags: tuple[str, ...] = ()
    chains: dict[str, list[str]] = {}
    base_hooks: dict[str, BaseHook] = {}
    sets: dict[str, NftSet] = {}
    others: dict[str, str] = {}
    other_slice = 0
    other_elements = 0
    pending_rules: list[dict[str, Any]] = []
    for entry in items:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ReadError(f"unexpected entry in nft output: {str(entry)[:200]}")
        kind, body = next(iter(entry.items()))
        if kind == "metainfo":
            continue
        if not isinstance(body, dict):
            raise ReadError(f"unexpected {kind} in nft output: {str(body)[:200]}")
        if body.get("family") != NFT_FAMILY:
            continue
        if kind == "table":
            if body.get("name") == TABLE:
                table = True
                table_flags = tuple(sorted(_strings(body.get("flags"))))
            continue
        if body.get("table") != TABLE:
            continue
        name = body.get("name") if kind != "rule" else body.get("chain")
        if not isinstance(name, str):
            raise ReadError(f"{kind} without a name in our table: {str(body)[:200]}")
        if family_of(name) != family:
            if kind != "rule":
                other_slice += 1
                elem = body.get("elem")
                other_elements += len(elem) if isinstance(elem, list) else 0
            continue
        if kind == "chain":
            chains.setdefault(name, [])
            if "hook" in body:
                base_hooks[name] = BaseHook(
                    str(body.get("type", "")),
                    str(body.get("hook", "")),
                    int(body.get("prio", 0)),
                    str(body.get("policy", "accept")),
                )
        elif kind == "rule":
            pending_rules.append(body)
        elif kind in ("set", "map"):
            sets[name] = _parse_set(kind, body, elements_read)
        else:
            others[f"{kind} {name}"] = json.dumps(body, sort_keys=True)
    for body in pending_rules:
        chain = body["chain"]
        if chain not in chains:
            raise ReadError(f"rule for an unlisted chain {chain} in our table")
        expr = body.get("expr")
        if not isinstance(expr, list):
            raise ReadError(f"rule without expressions in chain {chain}")
        comment = body.get("comment")
        chains[chain].append(canonical_rule(expr, comment if isinstance(comment, str) else None))
    return NftState(
        family=family,
        chains={n: tuple(r) for n, r in chains.items()},
        table=table,
        table_flags=table_flags,
        base_hooks=base_hooks,
        sets=sets,
        others=others,
        other_slice=other_slice,
        other_elements=other_elements,
        elements_read=elements_read,
    )


def parse_set_listing(text: str, name: str) -> NftSet:
    """One set or map from `nft -j -n list set|map inet asgctl NAME` output."""
    try:
        items = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReadError(f"nft listing of {name} is not what was expected: {exc}") from None
    for entry in items:
        for kind in ("set", "map"):
            body = entry.get(kind) if isinstance(entry, dict) else None
            if isinstance(body, dict) and body.get("name") == name:
                return _parse_set(kind, body, True)
    raise ReadError(f"nft listing of {name} does not hold it")


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _parse_set(kind: str, body: Mapping[str, Any], elements_read: bool) -> NftSet:
    keys = tuple(_strings(body.get("type")))
    flags = tuple(sorted(_strings(body.get("flags"))))
    data = str(body.get("map", "")) if kind == "map" else ""
    raw = body.get("elem")
    timeout = body.get("timeout", 0)
    timeout = timeout if isinstance(timeout, int) and not isinstance(timeout, bool) else -1
    elements: frozenset[str] | None
    if "timeout" in flags:
        # Elements that expire are put there by packets (the connection-limit buckets),
        # not by a plan: they are state, never drift.
        elements = frozenset()
    elif raw is None:
        elements = frozenset() if elements_read else None
    else:
        if not isinstance(raw, list):
            raise ReadError(f"elements of {body.get('name')} are not a list")
        elements = frozenset(_element(keys, data, e) for e in raw)
    return NftSet(str(body["name"]), keys, flags, data, elements, timeout)


def _element(keys: Sequence[str], data: str, raw: Any) -> str:
    """Canonical text of one listed element; `json:` + the raw form when not understood."""
    try:
        if data:
            if not (isinstance(raw, list) and len(raw) == 2):
                raise ValueError("map element is not [key, value]")
            key, value = raw
            return f"{_key_text(keys, key)} : {_verdict_text(value)}"
        return _key_text(keys, raw)
    except (ValueError, KeyError, TypeError, IndexError):
        return "json:" + json.dumps(raw, sort_keys=True, separators=(",", ":"))


def _key_text(keys: Sequence[str], raw: Any) -> str:
    if isinstance(raw, dict) and "elem" in raw:  # an element with a comment, counter, ...
        raw = raw["elem"]["val"]
    if len(keys) > 1:
        fields = raw["concat"] if isinstance(raw, dict) else None
        if not isinstance(fields, list) or len(fields) != len(keys):
            raise ValueError("concatenation does not match the set's type")
    else:
        fields = [raw]
    box = tuple(_field_range(t, f) for t, f in zip(keys, fields, strict=True))
    return element_text(keys, box)


def _field_range(typ: str, raw: Any) -> tuple[int, int]:
    if isinstance(raw, dict):
        if "range" in raw:
            lo, hi = raw["range"]
            return _scalar(typ, lo), _scalar(typ, hi)
        if "prefix" in raw and typ in ADDRESS_TYPES:
            addr = _scalar(typ, raw["prefix"]["addr"])
            bits = 32 if typ == "ipv4_addr" else 128
            host = (1 << (bits - int(raw["prefix"]["len"]))) - 1
            return addr, addr | host
        raise ValueError(f"unknown element field {raw}")
    value = _scalar(typ, raw)
    return value, value


def _scalar(typ: str, raw: Any) -> int:
    if typ in ADDRESS_TYPES:
        if not isinstance(raw, str):
            raise ValueError("address is not a string")
        addr = ipaddress.ip_address(raw)
        if addr.version != (4 if typ == "ipv4_addr" else 6):
            raise ValueError("address of the wrong family")
        return int(addr)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"{typ} value {raw!r} is not a number")
    return raw


def _verdict_text(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        kind, arg = next(iter(value.items()))
        if isinstance(arg, dict) and isinstance(arg.get("target"), str):
            return f"{kind} {arg['target']}"
        if arg is None:
            return str(kind)
    if isinstance(value, str):
        return value
    raise ValueError(f"unknown verdict {value!r}")
