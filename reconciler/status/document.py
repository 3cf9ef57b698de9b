"""Reading an agent's `status.yaml` from a status branch: untrusted input, read with budgets.

Whoever can push a `status/<cell>` branch chooses every byte of that file, and two readers
trust it: `asgctl plan --inventory status` (which containers run where) and `asgctl status`
(the fleet table).  So, for both:

* the blob's size is asked of git (`git cat-file --batch-check`) and an oversized blob is
  never read (`reconciler.status.read.read_status_blobs`);
* the YAML is parsed by the project's one safe loader (`reconciler.policy.yamlsafe`: no alias
  expansion past a node budget, bounded depth, one document, no custom tags) -- never by a
  plain `yaml.load` whose result could be an alias bomb waiting for the first walk over it;
* the document is held to `schemas/cell-status.schema.json` (`StatusDocument.header`) and
  every container entry to the store file's rules (`containers_of`), and whatever is wrong
  is an `InventoryError` naming the branch and the field, so the caller skips that cell.

A fleet-wide plan reads ~150 KB of status per cell, and a full YAML load of that was most of
the plan's time.  `_fast_parts` reads the block style the agent writes without building the
whole document: it proves, line by line, that the file has exactly the structure it assumes
and returns None on anything else, which sends the file to the loader.  The property tests
(tests/test_status_input.py) feed both paths hostile files -- `containers:` inside quoted
strings, comments, flow style, anchors, tags, duplicate keys, odd indentation -- and require
that whenever the fast path answers, it answers exactly what the loader reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from reconciler.core.cellplan import DEFAULT_GATE, GateSettings
from reconciler.core.model import Container
from reconciler.policy import yamlsafe
from reconciler.sources.cellstore import InventoryError, parse_store_document
from reconciler.sources.gitio import FULL_SHA

MAX_STATUS_BYTES = 8 * 1024 * 1024
"""A cell of ~250 containers writes ~150 KB; 8 MB is room for ~13,000 containers."""
STATUS_LIMITS = yamlsafe.Limits(
    max_file_bytes=MAX_STATUS_BYTES,
    max_documents=1,
    max_depth=16,
    max_nodes=1_000_000,
)
_FAST_MAX_BYTES = 1024 * 1024
"""The fast path reads files up to this size only: without aliases (which it never takes),
YAML needs at least 4 bytes for 3 nodes (`{a},` in a flow sequence), so no such file can
reach the node budget, and the fast path and the loader agree on every file it reads."""
API_VERSION = "asgctl.io/v1"
KIND = "CellStatus"
"""The document's `apiVersion` and `kind` (the schema holds readers to the kind)."""
CONTRACT_KEYS = ("handle", "ip", "app_id", "space_id", "org_id", "workload")
_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "cell-status.schema.json"


@dataclass(frozen=True)
class StatusDocument:
    """A status file that passed the schema: its top-level fields without `containers`, and
    the `containers` entries (mappings, not yet held to the store rules)."""

    header: dict[str, Any]
    entries: tuple[Any, ...]


# -- the one loader, behind a seam ---------------------------------------------------------


def load_yaml(text: str, origin: str) -> Any:
    """The single document of `text`, loaded by the safe loader with the status budget.

    The seam to `yamlsafe`: everything in this module that loads YAML goes through here.
    """
    try:
        docs = yamlsafe.load_documents(origin, text, STATUS_LIMITS)
    except yamlsafe.LoadError as exc:
        raise InventoryError(str(exc)) from None  # names origin:line:column
    if len(docs) > 1:
        raise InventoryError(f"{origin}: more than one YAML document")
    return docs[0].data if docs else None


# -- the fast path -------------------------------------------------------------------------

_MARKERS = ("---", "...", "%")  # documents and directives, at the start of a line
_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
# Characters inside a block value: none after which YAML's reading of a line is no longer a
# matter of that line (tabs, carriage returns and the other line breaks PyYAML honours, a
# byte-order mark) nor any PyYAML refuses as non-printable.  The text around the block is
# read by the loader itself.
_SETTLED = "[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\ufffe\uffff{}]"
# A plain scalar that is one line and nothing but a scalar: no indicator first, no `: ` or
# ` #` inside, no trailing blank, no `:` at the end; and none that the loader resolves to a
# number or date but cannot construct (`0x_`, `._`, no such date, an integer past Python's
# digit limit), since the loader refuses those files.
_PLAIN_LINE = (
    r"(?![0-9]{4}-[0-9][0-9]?-[0-9][0-9]?[\nTt ]|0[bx]_+\n|\._+(?:[eE][-+][0-9]+)?\n|[0-9_]{4000})"
    + "[A-Za-z0-9_./]"
    + _SETTLED.format(" :")
    + "*(?:(?: (?=[^ \\n#])|:(?=[^ \\n]))"
    + _SETTLED.format(" :")
    + "*)*"
)
_QUOTED_LINE = "'" + _SETTLED.format("'") + "*(?:''" + _SETTLED.format("'") + "*)*'"
_VALUE = rf"(?:\[\]|\{{\}}|{_QUOTED_LINE}|{_PLAIN_LINE})"
_FIELD_RE = rf"{_KEY}:(?: {_VALUE}\n|\n(?:  - {_VALUE}\n)*)"
# The containers block as the agent writes it: entries of scalar or scalar-list fields.
_BLOCK = re.compile(rf"(?:- {_FIELD_RE}(?:  {_FIELD_RE})*)*")
# Every field line of the block: `- ` opens an entry, `  ` continues it.
_FIELDS = re.compile(rf"^(- |  )({_KEY}):(?: ([^\n]*))?$", re.M)
# One entry exactly as the agent writes it (`agent/status.py`): the contract fields in
# order, each a one-line scalar, then the agent's own fields, each at most once.  Its
# language is inside `_BLOCK`'s and its keys are fixed, distinct strings, so an entry it
# matches needs no per-field checks but the values' (`_agent_entries`).
_LIST_FIELD = rf"(?: {_VALUE}\n|\n(?:  - {_VALUE}\n)*)"
_AGENT_ENTRY = re.compile(
    "".join(f"{'- ' if i == 0 else '  '}{key}: ({_VALUE})\n" for i, key in enumerate(CONTRACT_KEYS))
    + rf"(?:  chain: {_VALUE}\n)?(?:  groups:{_LIST_FIELD})?(?:  sources:{_LIST_FIELD})?"
)
_TOP_KEY = re.compile(rf"{_KEY}:(?: |\n)")
_NEXT_TOP = re.compile(r"\n[^ \n-]|\n-[^ ]")
_CONTAINERS = "containers:"
_EMPTY = ("", " []", " ~", " null", " Null", " NULL")
_NULLS = ("~", "null", "Null", "NULL")
_UNSEEN: Any = object()

# YAML's implicit resolvers (null, bool, int, float, timestamp, merge, value) as one regex:
# a plain scalar it matches is not a string.  Each pattern pins its own first characters, so
# one match does what the resolver's per-first-character lookup does, at C speed.
_NOT_A_STRING = re.compile(
    "|".join(
        sorted(
            {
                f"(?:{regexp.pattern})"
                for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values()
                for _tag, regexp in resolvers
            }
        )
    ),
    re.X,
)


def _plain_is_string(value: str) -> bool:
    """Would YAML read this plain scalar as a string (not a number, bool, null or date)?"""
    return _NOT_A_STRING.match(value) is None


def _scalar(raw: str) -> Any:
    """A contract field's value as YAML reads it, or _UNSEEN when only the loader can say.

    `raw` already passed `_VALUE`: a one-line single-quoted scalar, `[]`, `{}`, or a
    one-line plain scalar, which YAML reads as its own text unless a resolver claims it.
    """
    if raw[0] == "'":
        return raw[1:-1].replace("''", "'")
    if raw in ("[]", "{}"):
        return _UNSEEN
    if _NOT_A_STRING.match(raw) is None:
        return raw
    return None if raw in _NULLS else _UNSEEN


def _mapping_part(text: str, origin: str) -> dict[str, Any] | None:
    """The text before or after the containers block, loaded on its own; None when that
    could read differently from the same lines inside the whole file."""
    if not text:
        return {}
    if _TOP_KEY.match(text) is None or "*" in text or "&" in text:
        return None  # not a block mapping at column 0, or aliases the budget must see whole
    try:
        doc = load_yaml(text, origin)
    except InventoryError:
        return None  # the full load says what is wrong, with the file's own line numbers
    return doc if isinstance(doc, dict) and "containers" not in doc else None


def _agent_entries(block: str, checked: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The contract fields of each entry when every entry of `block` is exactly the
    agent's (`_AGENT_ENTRY`, one after the other to the end); None when one is not (the
    per-field reading decides) or a value is one only the loader can read."""
    entries: list[dict[str, Any]] = []
    at = 0
    for m in _AGENT_ENTRY.finditer(block):
        if m.start() != at:
            return None
        at = m.end()
        values = []
        for raw in m.groups():
            value = checked.get(raw, _UNSEEN)
            if value is _UNSEEN:
                value = checked[raw] = _scalar(raw)
            if value is _UNSEEN:
                return None
            values.append(value)
        entries.append(dict(zip(CONTRACT_KEYS, values, strict=True)))
    return entries if at == len(block) else None


def _fast_parts(text: str, origin: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(everything but `containers`, the contract fields of each entry), without a full YAML
    load; None whenever the file is not exactly in the agent's block style (see the module
    docstring), and the caller loads it in full."""
    if len(text) > _FAST_MAX_BYTES or text.startswith(_MARKERS):
        return None
    if any("\n" + marker in text for marker in _MARKERS):
        return None
    at = 0 if text.startswith(_CONTAINERS) else text.find("\n" + _CONTAINERS) + 1
    if at == 0 and not text.startswith(_CONTAINERS):
        return None
    if text.find("\n" + _CONTAINERS, at) != -1:
        return None  # twice: the loader refuses a duplicate key
    eol = text.find("\n", at)
    eol = len(text) if eol == -1 else eol
    rest = text[at + len(_CONTAINERS) : eol]
    nxt = _NEXT_TOP.search(text, eol)
    body_end = nxt.start() + 1 if nxt else len(text)
    block = text[eol + 1 : body_end]
    if block and not block.endswith("\n"):
        return None
    if rest not in _EMPTY or (rest and block):
        return None
    checked: dict[str, Any] = {}
    agents = _agent_entries(block, checked)
    if agents is None and _BLOCK.fullmatch(block) is None:
        return None
    head = _mapping_part(text[:at], origin)
    tail = _mapping_part(text[body_end:], origin)
    if head is None or tail is None or head.keys() & tail.keys():
        return None
    if agents is not None:
        return {**head, **tail}, agents
    entries: list[dict[str, Any]] = []
    entry: dict[str, Any] = {}
    seen: set[str] = set()
    key_ok: dict[str, bool] = {}
    for dash, key, raw in _FIELDS.findall(block):
        if dash == "- ":
            entry, seen = {}, set()
            entries.append(entry)
        if key in seen:
            return None  # a duplicate key: the loader refuses the file
        seen.add(key)
        ok = key_ok.get(key)
        if ok is None:
            ok = key_ok[key] = _plain_is_string(key)
        if not ok:
            return None  # `null:`, `yes:`...: not the key it looks like
        if key not in CONTRACT_KEYS:
            continue
        if not raw:
            return None  # a list, or null by omission: the loader decides
        value = checked.get(raw, _UNSEEN)
        if value is _UNSEEN:
            value = checked[raw] = _scalar(raw)
        if value is _UNSEEN:
            return None
        entry[key] = value
    return {**head, **tail}, entries


# -- the claim: the applied revision from the document's first bytes ----------------------

CLAIM_BYTES = 16 * 1024
"""How much of a status document the claims read looks at.  The agent writes
`lastAppliedRevision` after `apiVersion`, `kind`, `cell`, `reportedAt`, `agent`, `source`
(every public setting), `observedRevision` and `lastAttemptedRevision`
(`agent/status.py`), and before its conditions and containers.  Measured with
`dump_status` of `build_status` for a real `AgentConfig` (tests/test_status_claims.py):
the line ends near byte 1,400 with typical settings, and near byte 12,400 with 600
deny-network CIDRs and 16 underlay interfaces, the settings that grow without bound.  16 KiB
is ten times the typical place and still holds such an outlier; a cell whose line lies
further is read as claiming nothing ("unknown" to the plan), which costs precision, never
safety.  Reading 16 KiB instead of a whole document (~100 KiB at 250 containers) is what
makes the claims of a whole fleet cheap."""
CLAIM_KEY = "lastAppliedRevision:"
_CLAIM_VALUE = re.compile(rf"{_VALUE}\n")


@dataclass(frozen=True)
class Claim:
    """What a status document's first `CLAIM_BYTES` say it enforces: `revision`, or None
    with `why` not.  A function of the blob alone (so every reader of the same blob gets
    the same answer), and not a parse of the document: `asgctl plan` checks it against the
    whole document for the cells it reads in full (`reconciler.status.read`)."""

    revision: str | None
    why: str = ""


def read_claim(data: bytes) -> Claim:
    """The claim in `data[:CLAIM_BYTES]`, by one rule: the prefix decodes as strict UTF-8
    (a character cut at the bound is dropped); the first line starting at column 0 with
    `lastAppliedRevision:` gives the claim, whose value must be what the fast path reads
    alone (`_VALUE` and `_scalar`: a one-line plain or single-quoted string, `''` being
    "") and end on a line break inside the prefix, followed by the document's end or by a
    line that cannot continue it (neither blank nor indented, nor past the bound).  No such
    line, a column-0 `containers:` line before it, or any other value: no claim, and why.
    The reasons name no branch: the answer is cached by blob id and shared by every cell
    pushing those bytes."""
    head = data[:CLAIM_BYTES]
    cut = len(data) > CLAIM_BYTES
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (cut and exc.reason == "unexpected end of data" and exc.end == len(head)):
            return Claim(None, f"not UTF-8 in the first {CLAIM_BYTES:,} bytes")
        text = head[: exc.start].decode("utf-8")
    lines = text.split("\n")
    for i, line in enumerate(lines[:-1]):  # whole lines only: the last may be cut
        if line.startswith(_CONTAINERS):
            return Claim(None, "a containers: line comes before the lastAppliedRevision: line")
        if not line.startswith(CLAIM_KEY):
            continue
        raw = line[len(CLAIM_KEY) :]
        value = (
            _scalar(raw[1:])
            if raw.startswith(" ") and _CLAIM_VALUE.fullmatch(raw[1:] + "\n")
            else _UNSEEN
        )
        after = lines[i + 1]  # a blank or indented next line may continue the scalar
        if not isinstance(value, str) or after[:1].isspace() or (not after and i + 2 < len(lines)):
            return Claim(None, "lastAppliedRevision is not a one-line string")
        if not after and cut:
            return Claim(
                None, f"the {CLAIM_KEY} line may go on past the first {CLAIM_BYTES:,} bytes"
            )
        return Claim(value)
    if cut:
        return Claim(None, f"no {CLAIM_KEY} line in the first {CLAIM_BYTES:,} bytes")
    return Claim(None, f"no {CLAIM_KEY} line")


CLAIM_TRAILER = "Asgctl-Applied-Revision"
"""The git trailer of the agent's status commit that states its claim (`write.commit_message`),
so a reader takes every cell's claim from one `git for-each-ref` over the commits
(`fetch.ref_trailers`) and reads no document for the cells it leaves out."""
NOTHING_APPLIED = "none"
"""The trailer's value for "nothing applied" (`lastAppliedRevision: ''` in the document).
Spelled out because git trims a trailer's value and `Key:` with nothing after it reads as a
line someone forgot to finish; and `none` because no revision the agent writes can be it
(`AgentConfig.revision` is always `<branch>@sha1:<sha>`).  A revision that *is* the text
`none` is written quoted (`'none'`), so the spelling never stands for anything else."""
MAX_TRAILER_BYTES = 1024
"""Bytes of a commit's `Asgctl-Applied-Revision` trailers (key, `: ` and value, all of them)
the reader keeps at most: a revision is ~60 bytes; more is no claim, never more memory."""


def trailer_value(revision: str) -> str | None:
    """`revision` as the agent's commit states it: `NOTHING_APPLIED` for "", the document's
    own one-line spelling otherwise (plain, or single-quoted when plain would read as
    something else); None for a revision the one-line grammar cannot hold, or too long for
    the reader to keep (`MAX_TRAILER_BYTES`): the commit then states no claim, and readers
    take the document's."""
    if revision == "":
        return NOTHING_APPLIED
    quoted = "'" + revision.replace("'", "''") + "'"
    for value in (revision, quoted):
        stated = value != NOTHING_APPLIED and _CLAIM_VALUE.fullmatch(value + "\n")
        if stated and _scalar(value) == revision:
            fits = len(f"{CLAIM_TRAILER}: {value}".encode()) <= MAX_TRAILER_BYTES
            return value if fits else None
    return None


def claim_of_trailers(items: tuple[str, ...], cut: bool) -> Claim | None:
    """The claim a status commit states in its `CLAIM_TRAILER` trailers (`items`: each
    `<key>: <value>` as git's trailer parser gave it, `cut` when they passed
    `MAX_TRAILER_BYTES`), by one rule: none -> None (the commit states nothing: an old
    agent's, or a hand-pushed one; the reader takes the document's first bytes); exactly one
    whose value is `NOTHING_APPLIED` or what `read_claim` accepts on a document's line ->
    that claim; more than one, or any other value -> no claim, and why.  A commit that
    states its claim badly is not given a second chance in the document: which of two
    places a claim came from never depends on how the first one is broken, and a cell with
    no claim is only "unknown" to the plan."""
    if cut:
        over = f"over {MAX_TRAILER_BYTES:,} bytes"
        return Claim(None, f"its commit's {CLAIM_TRAILER} trailers are {over}")
    if not items:
        return None
    if len(items) > 1:
        return Claim(None, f"its commit has {len(items)} {CLAIM_TRAILER} trailers, not one")
    raw = items[0].partition(": ")[2]
    if raw == NOTHING_APPLIED:
        return Claim("")
    value = _scalar(raw) if _CLAIM_VALUE.fullmatch(raw + "\n") else _UNSEEN
    if not isinstance(value, str):
        return Claim(None, f"its commit's {CLAIM_TRAILER} trailer is not a one-line string")
    return Claim(value)


# -- the document --------------------------------------------------------------------------


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = json.loads(_SCHEMA_FILE.read_text(encoding="utf-8"))
    # Container entries are held to the store rules by `containers_of`, with the same
    # messages on both paths; the schema keeps describing them for readers of the format.
    header = {**schema, "properties": {**schema["properties"], "containers": {}}}
    return Draft202012Validator(header)


def field_path(path: Any) -> str:
    """`('conditions', 0, 'status')` -> `conditions[0].status`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def _schema_message(err: Any) -> str:
    """A schema error in a few words: the value itself may be megabytes, so never quoted."""
    if err.validator == "type":
        types = err.validator_value
        names = " or ".join(types) if isinstance(types, list) else types
        return f"must be {names}, not {type(err.instance).__name__}"
    if err.validator in ("enum", "const"):
        allowed = err.validator_value if err.validator == "enum" else [err.validator_value]
        return "must be one of " + ", ".join(repr(a) for a in allowed)
    if err.validator == "required":
        return str(err.message)[:200]
    if err.validator in ("minimum", "maximum"):
        return f"must be {'at least' if err.validator == 'minimum' else 'at most'} " + str(
            err.validator_value
        )
    return f"fails the schema's {err.validator!r} rule"


def check_header(header: dict[str, Any], origin: str) -> None:
    """Hold the document (minus its containers) to the status schema; first error wins."""
    errors = sorted(_validator().iter_errors(header), key=lambda e: [str(p) for p in e.path])
    if errors:
        err = errors[0]
        raise InventoryError(f"{origin}: {field_path(err.absolute_path)}: {_schema_message(err)}")


def parse_status(data: bytes | str, origin: str) -> StatusDocument:
    """A status file's content, parsed and schema-checked; InventoryError naming the field."""
    if len(data) > MAX_STATUS_BYTES:
        raise InventoryError(f"{origin}: larger than {MAX_STATUS_BYTES} bytes")
    if isinstance(data, bytes):
        try:
            text = yamlsafe.decode(origin, data, STATUS_LIMITS)
        except yamlsafe.LoadError as exc:
            raise InventoryError(str(exc)) from None
    else:
        text = data
    fast = _fast_parts(text, origin)
    if fast is not None:
        header, entries = fast
    else:
        doc = load_yaml(text, origin)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise InventoryError(f"{origin}: must be a mapping (the agent's status document)")
        header = {k: v for k, v in doc.items() if k != "containers"}
        listed = doc.get("containers")
        if listed is None:
            listed = []
        if not isinstance(listed, list):
            raise InventoryError(f"{origin}: containers: must be a list")
        entries = listed
    check_header(header, origin)
    return StatusDocument(header, tuple(entries))


# -- what a status says ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One Flux-style condition: {type, status, reason, message, lastTransitionTime}.

    The agent writes these and every reader (`asgctl status`, the CI plan, the lab) reads them
    back through this one class; a condition the document lacks reads as `Unknown`.
    """

    type: str = ""
    status: str = "Unknown"  # True | False | Unknown
    reason: str = ""
    message: str = ""
    last_transition: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Condition:
        return cls(
            str(d.get("type", "")),
            str(d.get("status", "Unknown")),
            str(d.get("reason", "")),
            str(d.get("message", "")),
            str(d.get("lastTransitionTime", "")),
        )


@dataclass(frozen=True)
class StatusSummary:
    """What a cell's status says, as the fleet readers show it (`asgctl status`, the lab).

    Read from a header that passed the schema, so every field has its type; strings are the
    cell's own words (untrusted: the reader escapes them before a terminal sees them).
    """

    ready: Condition
    drifted: Condition
    applied_revision: str
    last_sync: str
    reported_at: str
    drift_corrections: int
    installed_rules: int
    cf_equivalent_rules: int
    containers: int
    refused: str
    """`<revision>: <reason>` of the revision the cell refused, or empty."""
    unused_rules: tuple[UnusedRule, ...] = ()
    """`log: true` rules with no flow for the cell's unused-after (at most 100)."""
    unused_total: int = 0


@dataclass(frozen=True)
class UnusedRule:
    """A rule that matched nothing for N days, as its cell reported it (untrusted text)."""

    id: str
    group: str
    last_hit: str
    sources: tuple[str, ...]


def _unused(flows: Any) -> tuple[tuple[UnusedRule, ...], int]:
    if not isinstance(flows, dict):
        return (), 0
    rules = tuple(
        UnusedRule(
            str(r.get("id", "")),
            str(r.get("group", "")),
            str(r.get("lastHit", "")),
            tuple(str(x) for x in r.get("sources") or ()),
        )
        for r in flows.get("unusedRules") or ()
        if isinstance(r, dict)
    )
    return rules, int(flows.get("unusedRulesTotal") or len(rules))


def condition(header: dict[str, Any], type_: str) -> Condition:
    """The first condition of `type_` in the document, or an Unknown one."""
    for c in header.get("conditions") or ():
        if isinstance(c, dict) and c.get("type") == type_:
            return Condition.from_dict(c)
    return Condition(type_)


def summarize(header: dict[str, Any]) -> StatusSummary:
    """The summary of a schema-checked document's header (`parse_status(...).header`)."""
    counts = header.get("counts") or {}
    drift = header.get("drift") or {}
    refused = header.get("refused") or {}
    unused, unused_total = _unused(header.get("flows"))
    return StatusSummary(
        ready=condition(header, "Ready"),
        drifted=condition(header, "Drifted"),
        applied_revision=str(header.get("lastAppliedRevision") or ""),
        last_sync=str(header.get("lastSyncTime") or ""),
        reported_at=str(header.get("reportedAt") or ""),
        drift_corrections=int(drift.get("corrections") or 0),
        installed_rules=int(counts.get("installedRules") or 0),
        cf_equivalent_rules=int(counts.get("cfEquivalentRules") or 0),
        containers=int(counts.get("containers") or 0),
        refused=(f"{refused.get('revision', '')}: {refused.get('reason', '')}" if refused else ""),
        unused_rules=unused,
        unused_total=unused_total,
    )


def revision_sha(revision: str) -> str:
    """`main@sha1:<sha>` -> `<sha>`; "" unless that is a full hex object name.

    A status document's revisions are the cell's own words and reach git's command line
    (`asgctl status`, `asgctl plan`): only a full hex name passes, never a ref or an option.
    """
    sha = revision.rsplit("sha1:", 1)[-1] if "sha1:" in revision else ""
    return sha if FULL_SHA.fullmatch(sha) else ""


def containers_of(doc: StatusDocument, origin: str) -> tuple[Container, ...]:
    """The document's containers: each entry a mapping whose contract fields are text (or
    null), each handle once; then the store file's own rules (`parse_store_document`) judge
    the values, exactly as they judge a `store.json`."""
    store: dict[str, Any] = {}
    for i, entry in enumerate(doc.entries):
        where = f"{origin}: containers[{i}]"
        if not isinstance(entry, dict):
            raise InventoryError(f"{where}: must be a mapping")
        for key in CONTRACT_KEYS:
            value = entry.get(key)
            if value is not None and not isinstance(value, str):
                raise InventoryError(f"{where}.{key}: must be a string, not {type(value).__name__}")
        handle = entry.get("handle")
        if not handle:
            raise InventoryError(f"{where}.handle: missing")
        if handle in store:
            raise InventoryError(f"{where}.handle: container {handle!r} is listed twice")
        store[handle] = {
            "handle": handle,
            "ip": entry.get("ip"),
            "metadata": {
                "app_id": entry.get("app_id") or "",
                "space_id": entry.get("space_id") or "",
                "org_id": entry.get("org_id") or "",
                "container_workload": entry.get("workload") or "app",
            },
        }
    return parse_store_document(store, origin)


_TRAILER = re.compile(r"[A-Za-z0-9-]{1,100}")


def reported_gate(doc: StatusDocument, origin: str) -> GateSettings:
    """The mass-revoke gate settings the cell's agent reports (`source.massRevoke*`), each
    missing one the default (an agent from before the key); InventoryError naming the field
    when a value is not one an agent could run with.  The schema has checked the types; the
    trailer is held to the exact key grammar, since it is shown in PR comments."""
    source = doc.header.get("source") or {}
    default = DEFAULT_GATE
    trailer = source.get("massRevokeTrailer", default.trailer)
    if not _TRAILER.fullmatch(trailer):
        raise InventoryError(f"{origin}: source.massRevokeTrailer: not a trailer key")
    return GateSettings(
        float(source.get("massRevokeThreshold", default.threshold)),
        int(source.get("massRevokeMin", default.minimum)),
        trailer,
    )


def containers_from_status(data: bytes | str, origin: str) -> tuple[Container, ...]:
    """The containers of a `status.yaml` (the status-branch contract), validated."""
    return containers_of(parse_status(data, origin), origin)
