"""Import Cloud Foundry security groups into policy documents (`asgctl import-cf`).

Accepted inputs:

* a bare rules array, as given to `cf create-security-group NAME rules.json` (the caller
  supplies NAME);
* one v3 security group resource (`GET /v3/security_groups/:guid`);
* v3 list responses (`GET /v3/security_groups`, `{pagination, resources}`): one page, or every
  page of a paginated listing given together; an incomplete set of pages is refused (by
  `pagination.total_results`), because importing part of a listing silently loses groups;
* a BOSH manifest (cf-deployment.yml) and BOSH ops files (YAML): Cloud Controller seeds
  `cc.security_group_definitions` of the `cloud_controller_ng` job on first start, marking the
  groups named in `cc.default_running_security_groups` / `default_staging_security_groups`
  globally enabled (cloud_controller_ng lib/cloud_controller/seeds.rb
  `create_seed_security_groups`).  Ops files are applied in the order given, like
  `bosh int manifest.yml -o ops.yml`, so an ops file can be imported alone or on a manifest.

Rules are judged exactly as Cloud Controller judges CF JSON: its v3 request validator
(`grammar.parse_rule`, messages `Rules[<index>]: ...`) and then its model validator
(`grammar.cf_exact_errors`: keys per protocol, `null`s, string-only `ports`).  One exception,
made on purpose: ICMP rules that carry `ports` are imported without them and with a warning
naming what was dropped.  CC's request validator never looks at `ports` on icmp, such rules
are found in real exports, and ports mean nothing to ICMP, so dropping them changes no packet;
refusing would fail the whole import.  (CC's model, `icmp_rule_validator.rb`, has no `ports`
key either, so CF would refuse to create such a rule today; the policy YAML refuses it too.)
CIDRs with host bits (`198.41.191.47/1`, which means `128.0.0.0/1`) are imported unchanged,
as CF reads them, with a warning.

The output describes exactly the same rules: values are kept as CF gave them (strings stay
strings, `"53, 5353"` is not rewritten), only empty descriptions are dropped, and bindings
become `running_spaces` / `staging_spaces` lists of space GUIDs plus `globally_enabled`.
Errors and warnings are prefixed with the group name; any error means nothing is written.

`import_cf` and `import_sources` are pure: data in, data out.  `import_files` reads the files
(JSON through the one safe JSON reader, YAML through the safe YAML loader).  Space GUIDs are not
resolved to `org/space` names here: CF's v3 presenter only shows the spaces the exporting user
can see and a GUID is always exact; the validator resolves GUIDs against the directory.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, parse_qsl, urlsplit

import yaml

from reconciler.policy.grammar import (
    ALLOWED_RULE_KEYS,
    cf_exact_errors,
    host_bits_notes,
    parse_rule,
)
from reconciler.policy.yamlsafe import LoadError, load_yaml
from reconciler.sources import jsonsafe

__all__ = [
    "SCHEMA_COMMENT",
    "Imported",
    "document_filename",
    "document_filenames",
    "dump_documents",
    "import_cf",
    "import_files",
    "import_sources",
]

SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/asgctl.schema.json"
MAX_NAME_LENGTH = 250  # SecurityGroupCreateMessage::MAX_SECURITY_GROUP_NAME_LENGTH
MAX_INPUT_BYTES = 256 * 1024 * 1024  # far above any CF export; keeps /dev/zero out of memory
MAX_RULES_CHAR_LENGTH = 2**24 - 1  # SecurityGroup::MAX_RULES_CHAR_LENGTH (serialized rules)
# Cloud Controller's v3 messages for the group itself (ActiveModel full messages).
MSG_RULES_NOT_ARRAY = "Rules must be an array"
MSG_NAME_BLANK = "Name can't be blank"
MSG_NAME_NOT_STRING = "Name must be a string"
MSG_NAME_TOO_LONG = f"Name is too long (maximum is {MAX_NAME_LENGTH} characters)"
# The model's: validates_format SECURITY_GROUP_NAME_REGEX (printable characters) and
# validate_rules_length.
MSG_NAME_FORMAT = "name is invalid (Cloud Controller allows printable characters only)"
MSG_RULES_TOO_LONG = f"rules length must not exceed {MAX_RULES_CHAR_LENGTH} characters"
MSG_GLOBAL_NOT_OBJECT = "Globally enabled must be an object"
MSG_GLOBAL_KEYS = "Globally enabled only allows keys 'running' or 'staging'"
MSG_GLOBAL_VALUES = "Globally enabled values must be booleans"

MSG_V2 = "this is a v2 API response; export the v3 form (README: Importing from Cloud Foundry)"
MSG_PAGES = "pass every page of /v3/security_groups (README: Importing from Cloud Foundry)"

_BINDINGS = ("running_spaces", "staging_spaces")
_RESOURCE_KEYS = ("guid", "name", "rules", "globally_enabled", "relationships")
_ICMP = ("icmp", "icmpv6")
_CC_KEYS = (
    "security_group_definitions",
    "default_running_security_groups",
    "default_staging_security_groups",
)
_DEFINITION_KEYS = ("name", "rules")
_YAML_SUFFIXES = (".yml", ".yaml")


class Imported(NamedTuple):
    """Documents to write, errors (any one means write nothing) and warnings (write anyway)."""

    documents: list[dict[str, Any]]
    errors: list[str]
    warnings: list[str]


def _is_v2_list(data: Mapping[str, Any]) -> bool:
    resources = data.get("resources")
    return (
        isinstance(resources, list)
        and bool(resources)
        and isinstance(resources[0], Mapping)
        and "entity" in resources[0]
    )


def _kind(data: object) -> str:
    """Which CF input this is: array, v2, list, resource, bosh-manifest, bosh-ops, unknown."""
    if isinstance(data, list):
        if data and all(isinstance(op, Mapping) and "type" in op and "path" in op for op in data):
            return "bosh-ops"
        return "array"
    if not isinstance(data, Mapping):
        return "unknown"
    if "entity" in data or _is_v2_list(data):
        return "v2"
    if "resources" in data:
        return "list"
    if "instance_groups" in data or isinstance(data.get("properties"), Mapping):
        return "bosh-manifest"
    if any(key in data for key in _RESOURCE_KEYS):
        return "resource"
    return "unknown"


def import_cf(data: object, *, name: str | None) -> Imported:
    """Convert one CF JSON input into SecurityGroup documents.

    `name` names the group of a bare rules array; for a resource or a list response it
    selects the group of that name (an error if there is none), so one group can be pulled
    out of a full `/v3/security_groups` dump.
    """
    if _kind(data) == "array" and name is None:
        return Imported([], ["a name is required to import a bare rules array"], [])
    return import_sources([("<input>", data)], name, prefix_files=False)


def import_sources(
    sources: Sequence[tuple[str, object]], name: str | None, *, prefix_files: bool = True
) -> Imported:
    """Documents from parsed inputs `(file, data)`, in order, with every error and warning.

    A bare rules array is named `name`, else its file's stem.  v3 list pages are pooled and
    must be complete; BOSH manifests and ops files are applied in order and then read as
    Cloud Controller's seeds.  For everything but a bare array, `name` picks one group.
    Group names must be unique across all inputs.
    """
    out = _Collector()
    pages: list[_Page] = []
    bosh = _BoshState()
    for file, data in sources:
        where = f"{file}: " if prefix_files else ""
        kind = _kind(data)
        if kind == "array":
            group_name = name if name is not None else Path(file).stem
            out.add(where, _convert(group_name, {"rules": data}, is_resource=False))
        elif kind == "v2":
            out.errors.append(f"{where}{MSG_V2}")
        elif kind == "list" and isinstance(data, Mapping):  # _kind says "list" for a mapping
            page, errors = _page(file, data)
            out.errors.extend(f"{where}{e}" for e in errors)
            if page is not None:
                pages.append(page)
        elif kind == "resource":
            assert isinstance(data, Mapping)
            if name is not None and data.get("name") != name:
                continue
            out.found = True
            out.add(where, _convert(data.get("name"), data, is_resource=True))
        elif kind in ("bosh-manifest", "bosh-ops"):
            errors = bosh.apply(data, kind)
            bosh.failed = bosh.failed or bool(errors)
            out.errors.extend(f"{where}{e}" for e in errors)
        else:
            out.errors.append(f"{where}{_unrecognised(data)}")
    if pages:
        _import_pages(pages, name, out, prefix_files)
    if bosh.used and not bosh.failed:  # after a broken manifest or op, the rest is noise
        for converted in bosh.groups(name):
            out.found = True
            out.add("", converted)
        out.errors.extend(bosh.errors)
    out.warnings.extend(bosh.warnings)
    if name is not None and not out.found and not out.array_named(name) and not out.errors:
        missing = _missing_pages(pages)
        hint = f" (pages {missing} were not given)" if missing else ""
        out.errors.append(f"security group {name!r} is not in the input{hint}")
    names = [d.get("name") for d in out.docs]
    dupes = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    out.errors.extend(f"Security group with name '{n}' already exists." for n in dupes)
    return Imported(out.docs, out.errors, out.warnings)


class _Collector:
    """Accumulates documents, errors and warnings across inputs."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.found = False

    def add(self, where: str, converted: tuple[dict[str, Any], list[str], list[str]]) -> None:
        doc, errors, warnings = converted
        self.docs.append(doc)
        self.errors.extend(f"{where}{e}" for e in errors)
        self.warnings.extend(f"{where}{w}" for w in warnings)

    def array_named(self, name: str) -> bool:
        return any(d.get("name") == name for d in self.docs)


def import_files(paths: Sequence[str], name: str | None) -> Imported:
    """Read the files (`.yml`/`.yaml` as BOSH YAML, anything else as JSON) and import them.

    Unreadable or hostile files are errors naming file, line and column, never tracebacks.
    """
    sources: list[tuple[str, object]] = []
    errors: list[str] = []
    for file in paths:
        try:
            with open(file, "rb") as f:
                raw = f.read(MAX_INPUT_BYTES + 1)
            if len(raw) > MAX_INPUT_BYTES:
                errors.append(f"{file}: larger than {MAX_INPUT_BYTES} bytes")
                continue
        except OSError as exc:
            errors.append(f"{file}: cannot read: {exc.strerror or exc}")
            continue
        if file.endswith(_YAML_SUFFIXES):
            try:
                docs = load_yaml(file, raw)
            except LoadError as exc:
                errors.append(str(exc))
                continue
            if len(docs) != 1:
                errors.append(f"{file}: expected one YAML document, found {len(docs)}")
                continue
            sources.append((file, docs[0].data))
            continue
        try:
            sources.append((file, jsonsafe.loads(raw, file, reject_duplicate_keys=True)))
        except jsonsafe.JsonInputError as exc:
            errors.append(str(exc))
    result = import_sources(sources, name)
    return Imported(result.documents, errors + result.errors, result.warnings)


def document_filename(name: str) -> str:
    """`<name>.yaml`, with anything but ASCII letters, digits, `-_.` replaced by `_`."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in name)
    return f"{safe.strip('.')[:120] or 'group'}.yaml"


def document_filenames(names: Sequence[str]) -> list[str]:
    """One distinct file per group: `a b` and `a_b` (or `Web` and `web`, on a file system
    that ignores case) would share `a_b.yaml`, and the second would silently replace the first."""
    taken: set[str] = set()
    out: list[str] = []
    for name in names:
        stem = document_filename(name).removesuffix(".yaml")
        candidate, n = f"{stem}.yaml", 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}.yaml"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def _unrecognised(data: object) -> str:
    kind = type(data).__name__
    return (
        f"input is not a CF rules array, a v3 security group, a v3 security group list, or a "
        f"BOSH manifest or ops file (got a JSON {kind})"
    )


# --------------------------------------------------------------------------------------------
# v3 list pages


@dataclass(frozen=True)
class _Page:
    """One `GET /v3/security_groups` page and what its pagination says about the whole."""

    file: str
    listing: str
    number: int | None
    total_results: int | None
    total_pages: int | None
    next_number: int | None
    resources: tuple[Any, ...]


def _href_page(link: object) -> int | None:
    """`page=N` of a pagination link (`{"href": ".../v3/security_groups?page=2&per_page=50"}`)."""
    href = link.get("href") if isinstance(link, Mapping) else None
    if not isinstance(href, str):
        return None
    values = parse_qs(urlsplit(href).query).get("page", [])
    text = values[0] if values else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def _listing(pagination: Mapping[str, Any], file: str) -> str:
    """Which listing a page belongs to: its links' path and query without `page`, so pages
    of one `cf curl` loop pool together while `?names=a` and `?names=b` stay apart.  A page
    without links is a listing of its own."""
    for key in ("first", "last", "next", "previous"):
        link = pagination.get(key)
        href = link.get("href") if isinstance(link, Mapping) else None
        if isinstance(href, str):
            url = urlsplit(href)
            query = sorted((k, v) for k, v in parse_qsl(url.query) if k != "page")
            return f"{url.path}?{query}"
    return f"file {file}"


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _page(file: str, data: Mapping[str, Any]) -> tuple[_Page | None, list[str]]:
    resources = data.get("resources")
    if not isinstance(resources, list):
        return None, ["resources must be an array"]
    pagination = data.get("pagination")
    if not isinstance(pagination, Mapping):
        pagination = {}
    next_number = _href_page(pagination.get("next"))
    previous = _href_page(pagination.get("previous"))
    if next_number is not None:
        number: int | None = next_number - 1
    elif previous is not None:
        number = previous + 1
    elif pagination.get("previous") is None:
        number = 1
    else:
        number = None
    page = _Page(
        file=file,
        listing=_listing(pagination, file),
        number=number,
        total_results=_count(pagination.get("total_results")),
        total_pages=_count(pagination.get("total_pages")),
        next_number=next_number if pagination.get("next") else None,
        resources=tuple(resources),
    )
    return page, []


def _missing_pages(pages: list[_Page]) -> str:
    """The page numbers a listing says it has and the given pages lack, as `2, 3`."""
    total = max((p.total_pages or 0 for p in pages), default=0)
    given = {p.number for p in pages}
    wanted = set(range(1, total + 1)) | {p.next_number for p in pages if p.next_number}
    return ", ".join(str(n) for n in sorted(wanted - given))


def _page_errors(pages: list[_Page]) -> list[str]:
    """Why the pages are not one complete listing, or nothing."""
    errors: list[str] = []
    by_number: dict[int, str] = {}
    for page in pages:
        if page.number is None:
            continue
        if page.number in by_number:
            errors.append(
                f"page {page.number} is given twice ({by_number[page.number]}, {page.file})"
            )
        by_number.setdefault(page.number, page.file)
    totals = {p.total_results for p in pages if p.total_results is not None}
    if len(totals) > 1:
        listed = ", ".join(f"{p.total_results} in {p.file}" for p in pages)
        errors.append(
            f"the pages disagree on pagination.total_results ({listed}): the list changed "
            "while it was fetched; fetch every page again"
        )
        return errors
    count = sum(len(p.resources) for p in pages)
    missing = _missing_pages(pages)
    if totals:
        (total,) = totals
        if count < total:
            hint = f" (missing pages: {missing})" if missing else ""
            errors.append(
                f"incomplete: the pages hold {count} of the {total} security groups that "
                f"pagination.total_results counts{hint}; {MSG_PAGES}"
            )
        elif count > total:
            errors.append(
                f"the pages hold {count} security groups but pagination.total_results says "
                f"{total}: the list changed while it was fetched; fetch every page again"
            )
    elif missing:
        errors.append(f"incomplete: pages {missing} are missing; {MSG_PAGES}")
    return errors


def _import_pages(pages: list[_Page], name: str | None, out: _Collector, prefix: bool) -> None:
    pages = sorted(pages, key=lambda p: (p.number is None, p.number or 0))
    if name is None:
        listings: dict[str, list[_Page]] = {}
        for page in pages:
            listings.setdefault(page.listing, []).append(page)
        for listing in listings.values():
            out.errors.extend(_page_errors(listing))
    for page in pages:
        where = f"{page.file}: " if prefix else ""
        for i, resource in enumerate(page.resources):
            if not isinstance(resource, Mapping):
                out.errors.append(f"{where}resources[{i}] must be an object")
                continue
            if name is not None and resource.get("name") != name:
                continue
            out.found = True
            out.add(where, _convert(resource.get("name"), resource, is_resource=True))


# --------------------------------------------------------------------------------------------
# BOSH manifests and ops files


class _BoshState:
    """`cc.security_group_definitions` and the default lists, as manifests and ops set them."""

    def __init__(self) -> None:
        self.cc: dict[str, Any] = {}
        self.used = False
        self.failed = False
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def apply(self, data: object, kind: str) -> list[str]:
        self.used = True
        if kind == "bosh-manifest":
            assert isinstance(data, Mapping)
            return self._manifest(data)
        assert isinstance(data, list)
        errors: list[str] = []
        for i, op in enumerate(data):
            message = self._op(op)
            if message:
                path = op.get("path") if isinstance(op, Mapping) else None
                # The end of a long path is the part that differs from the other operations.
                shown = "..." + path[-77:] if isinstance(path, str) and len(path) > 80 else path
                errors.append(f"ops[{i}] ({_short(shown)}): {message}")
        return errors

    def _manifest(self, data: Mapping[str, Any]) -> list[str]:
        found: list[tuple[str, Mapping[str, Any]]] = []
        groups = data.get("instance_groups")
        for group in groups if isinstance(groups, list) else []:
            jobs = group.get("jobs") if isinstance(group, Mapping) else None
            for job in jobs if isinstance(jobs, list) else []:
                if not isinstance(job, Mapping) or job.get("name") != "cloud_controller_ng":
                    continue
                props = job.get("properties")
                cc = props.get("cc") if isinstance(props, Mapping) else None
                if isinstance(cc, Mapping) and any(k in cc for k in _CC_KEYS):
                    found.append((f"instance group {_short(group.get('name'))}", cc))
        props = data.get("properties")
        cc = props.get("cc") if isinstance(props, Mapping) else None
        if not found and isinstance(cc, Mapping):
            found.append(("properties", cc))  # a BOSH v1 manifest's global properties
        if not found:
            return [
                "no cloud_controller_ng job with cc.security_group_definitions in this manifest"
            ]
        first_where, first = found[0]
        for where, other in found[1:]:
            if any(other.get(k) != first.get(k) for k in _CC_KEYS):
                return [f"{first_where} and {where} seed different security groups"]
        for key in _CC_KEYS:
            if key in first:
                self.cc[key] = copy.deepcopy(first[key])
        return []

    def _op(self, op: object) -> str | None:
        if not isinstance(op, Mapping):
            return "an operation must be a mapping"
        path, kind = op.get("path"), op.get("type")
        if not isinstance(path, str) or not path.startswith("/"):
            return "path must be a string starting with /"
        segments = path[1:].split("/")
        names = [s.removesuffix("?") for s in segments]
        for k in range(2, len(names) + 1):
            if names[k - 2 : k] == ["properties", "cc"]:
                break
        else:
            return None  # an operation on something else: not ours to judge
        if "jobs" in names[: k - 2]:
            job = names[names.index("jobs") + 1] if names.index("jobs") + 1 < k else ""
            if job != "name=cloud_controller_ng":
                if any(n in _CC_KEYS for n in names[k:]):
                    self.warnings.append(
                        f"{path}: only the cloud_controller_ng job seeds security groups; ignored"
                    )
                return None
        rest = segments[k:]
        if not rest:  # the whole `cc` mapping
            if kind != "replace" or not isinstance(op.get("value"), Mapping):
                return None
            value = op["value"]
            for key in _CC_KEYS:
                if key in value:
                    self.cc[key] = copy.deepcopy(value[key])
            return None
        if rest[0].removesuffix("?") not in _CC_KEYS:
            return None
        if kind not in ("replace", "remove"):
            return f"unknown operation type {_short(kind)}"
        optional = any(s.endswith("?") for s in segments[:k])
        return _apply_op(self.cc, rest, kind, copy.deepcopy(op.get("value")), optional)

    def groups(self, name: str | None) -> list[tuple[dict[str, Any], list[str], list[str]]]:
        definitions = self.cc.get("security_group_definitions")
        if definitions is None:
            self.errors.append("cc.security_group_definitions is not set")
            return []
        if not isinstance(definitions, list):
            self.errors.append("cc.security_group_definitions must be a list")
            return []
        defaults: dict[str, list[str]] = {}
        for key, lifecycle in (
            ("default_running_security_groups", "running"),
            ("default_staging_security_groups", "staging"),
        ):
            value = self.cc.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.errors.append(f"cc.{key} must be a list of group names")
                value = []
            defaults[lifecycle] = value
        defined = [d.get("name") for d in definitions if isinstance(d, Mapping)]  # may be [..]
        for lifecycle, listed in defaults.items():
            for group in listed:
                if group not in defined:
                    self.warnings.append(
                        f"cc.default_{lifecycle}_security_groups names {group!r}, which "
                        "cc.security_group_definitions does not define (Cloud Controller "
                        "ignores it)"
                    )
        out = []
        for i, definition in enumerate(definitions):
            if not isinstance(definition, Mapping):
                self.errors.append(f"cc.security_group_definitions[{i}] must be a mapping")
                continue
            unknown = [str(k) for k in definition if k not in _DEFINITION_KEYS]
            if unknown:
                self.errors.append(
                    f"cc.security_group_definitions[{i}]: unknown key(s) {', '.join(unknown)} "
                    "(a definition has name and rules)"
                )
            group_name = definition.get("name")
            if name is not None and group_name != name:
                continue
            doc, errors, warnings = _convert(group_name, definition, is_resource=False)
            enabled = {k: True for k, listed in defaults.items() if group_name in listed}
            if enabled:
                doc["globally_enabled"] = enabled
            out.append((doc, errors, warnings))
        return out


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _apply_op(
    root: dict[str, Any], segments: list[str], kind: str, value: Any, optional: bool
) -> str | None:
    """A BOSH `replace` / `remove` on `root` (the `cc` properties), as `bosh int` does it:
    `name=X` finds a list entry by name, `-` appends, `N` indexes, and a `?` segment makes the
    rest of the path optional (created when missing for replace, ignored for remove)."""
    node: Any = root
    for index, raw in enumerate(segments):
        last = index == len(segments) - 1
        optional = optional or raw.endswith("?")
        seg = raw.removesuffix("?")
        if isinstance(node, dict):
            if last:
                if kind == "replace" and (seg in node or optional):
                    node[seg] = value
                elif kind == "replace":
                    return f"{seg!r} is not there (add ? to create it)"
                elif seg in node:
                    del node[seg]
                elif not optional:
                    return f"cannot remove {seg!r}: it is not there"
                return None
            if seg not in node:
                if not optional:
                    return f"{seg!r} is not there (add ? to create it)"
                if kind == "remove":
                    return None  # nothing to remove on an optional path
                following = segments[index + 1].removesuffix("?")
                node[seg] = [] if following == "-" or following.startswith("name=") else {}
            node = node[seg]
        elif isinstance(node, list):
            if seg == "-":
                if not (last and kind == "replace"):
                    return "'-' can only append a value"
                node.append(value)
                return None
            if seg.startswith("name="):
                wanted = seg[len("name=") :]
                hits = [
                    i
                    for i, v in enumerate(node)
                    if isinstance(v, Mapping) and v.get("name") == wanted
                ]
                if not hits:
                    if not optional:
                        return f"no entry named {wanted!r}"
                    if kind == "remove":
                        return None
                    node.append(value if last else {"name": wanted})
                    if last:
                        return None
                    hits = [len(node) - 1]
                position = hits[0]
            elif seg.lstrip("-").isdigit() and seg.isascii() and len(seg) <= 9:
                position = int(seg)
                if not -len(node) <= position < len(node):
                    return f"index {position} is out of range"
            else:
                return f"cannot step into a list with {seg!r}"
            if last:
                if kind == "replace":
                    node[position] = value
                else:
                    del node[position]
                return None
            node = node[position]
        else:
            return f"cannot step into {type(node).__name__} with {seg!r}"
    return None


# --------------------------------------------------------------------------------------------
# One group


def _convert(
    name: object, source: Mapping[str, Any], *, is_resource: bool
) -> tuple[dict[str, Any], list[str], list[str]]:
    """One group: CF's checks on name, globally_enabled and rules, then the document."""
    errors: list[str] = []
    warnings: list[str] = []
    label = name if isinstance(name, str) and name else "<unnamed>"

    def fail(message: str) -> None:
        errors.append(f"{label}: {message}")

    if name is None or name == "":
        fail(MSG_NAME_BLANK)
    elif not isinstance(name, str):
        fail(MSG_NAME_NOT_STRING)
    elif len(name) > MAX_NAME_LENGTH:
        fail(MSG_NAME_TOO_LONG)
    elif not name.isprintable():
        fail(MSG_NAME_FORMAT)

    doc: dict[str, Any] = {"kind": "SecurityGroup", "name": name}

    rules_value = source.get("rules", [] if is_resource else None)
    rules: list[dict[str, Any]] = []
    if not isinstance(rules_value, list):
        fail(MSG_RULES_NOT_ARRAY)
    else:
        serialized = json.dumps(rules_value, ensure_ascii=False, separators=(",", ":"), default=str)
        if len(serialized) > MAX_RULES_CHAR_LENGTH:
            fail(MSG_RULES_TOO_LONG)
        for index, raw in enumerate(rules_value):
            rule_errors, rule_warnings, cleaned = _check_rule(raw)
            errors.extend(f"{label}: Rules[{index}]: {m}" for m in rule_errors)
            warnings.extend(f"{label}: Rules[{index}]: {m}" for m in rule_warnings)
            if cleaned is not None:
                rules.append(cleaned)
    doc["rules"] = rules

    if is_resource:
        enabled = source.get("globally_enabled")
        if enabled is not None:
            message = _check_globally_enabled(enabled)
            if message:
                fail(message)
            elif isinstance(enabled, Mapping) and enabled:
                doc["globally_enabled"] = {
                    k: enabled[k] for k in ("running", "staging") if k in enabled
                }
        relationships = source.get("relationships")
        for key in _BINDINGS:
            guids, message = _space_guids(relationships, key)
            if message:
                fail(message)
            if guids:
                doc[key] = guids
    return doc, errors, warnings


def _check_rule(raw: object) -> tuple[list[str], list[str], dict[str, Any] | None]:
    """Errors and warnings for one CF rule, and the rule as it is written out."""
    warnings: list[str] = []
    if isinstance(raw, Mapping) and raw.get("protocol") in _ICMP and "ports" in raw:
        warnings.append(
            f"ports {_short(json.dumps(raw['ports'], default=str))} dropped: {raw['protocol']} "
            "has no ports (Cloud Controller's request validator ignores them)"
        )
        raw = {k: v for k, v in raw.items() if k != "ports"}
    _, found = parse_rule(raw)
    seen = set(found)
    found += [e for e in cf_exact_errors(raw) if e not in seen]
    errors = [e.message for e in found]
    if isinstance(raw, Mapping) and not errors:
        warnings += [n.message for n in host_bits_notes(raw.get("destination"))]
    return errors, warnings, _clean_rule(raw) if isinstance(raw, Mapping) else None


def _clean_rule(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The rule as CF gave it, keys in CF's documented order, an empty description dropped
    (CF treats "" as no description, so the rule means the same without it)."""
    out: dict[str, Any] = {}
    for key in ALLOWED_RULE_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if key == "description" and value == "":
            continue
        out[key] = value
    return out


def _check_globally_enabled(enabled: object) -> str | None:
    """SecurityGroupCreateMessage#validate_globally_enabled, in its words."""
    if not isinstance(enabled, Mapping):
        return MSG_GLOBAL_NOT_OBJECT
    if any(k not in ("running", "staging") for k in enabled):
        return MSG_GLOBAL_KEYS
    if any(not isinstance(v, bool) for v in enabled.values()):
        return MSG_GLOBAL_VALUES
    return None


def _space_guids(relationships: object, key: str) -> tuple[list[str], str | None]:
    """`relationships.<key>.data[].guid` as a sorted list (order carries no meaning in CF)."""
    if relationships is None:
        return [], None
    if not isinstance(relationships, Mapping):
        return [], "Relationships must be an object"
    relationship = relationships.get(key)
    if relationship is None:
        return [], None
    data = relationship.get("data") if isinstance(relationship, Mapping) else None
    if not isinstance(data, list):
        return [], f"Relationships {key} must be an object with a data array"
    guids: set[str] = set()
    for item in data:
        guid = item.get("guid") if isinstance(item, Mapping) else None
        if not isinstance(guid, str) or not guid:
            return [], f"Relationships {key} data entries must be objects with a guid string"
        guids.add(guid)
    return sorted(guids), None


SCHEMA_FILE = ("schemas", "asgctl.schema.json")


def schema_comment_for(folder: Path) -> str | None:
    """The schema hint for a file written into `folder`: a path relative to it that reaches
    the policy repository's `schemas/asgctl.schema.json` (the nearest folder above holding
    one), so editors resolve it however deep the import goes; None when no folder above
    has one (a hint that resolves to nothing would only mislead)."""
    here = folder.resolve()
    for top in (here, *here.parents):
        schema = top.joinpath(*SCHEMA_FILE)
        if schema.is_file():
            return f"# yaml-language-server: $schema={os.path.relpath(schema, here)}"
    return None


def dump_documents(docs: list[dict[str, Any]], schema_comment: str | None = SCHEMA_COMMENT) -> str:
    """Multi-document YAML for a policy file, with the schema hint editors pick up.

    Rules are written one per line in flow style, like the examples in the design, so a
    pull request that changes one rule shows a one-line diff.  `schema_comment` is the hint
    (the default suits a file directly in a top-level `policies/`); None leaves it out.
    """
    body = yaml.dump_all(
        [_flow_rules(doc) for doc in docs],
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=10_000,
    )
    return body if schema_comment is None else f"{schema_comment}\n{body}"


class _FlowMap(dict[str, Any]):
    """Marks a mapping to be written in flow style (`{protocol: tcp, ...}`)."""


# libyaml's emitter when PyYAML has it (its wheels do): the same text as the pure-Python one
# at a fifth of the cost, which is what lets `asgctl cf sync` write a 200,000-app Directory
# in seconds.  The one difference: characters beyond U+FFFF (emoji) are written as \U escapes
# in a double-quoted string instead of literally; both read back as the same string.
_BaseDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_BaseDumper):  # type: ignore[valid-type,misc]  # a base picked at import time
    """SafeDumper that never writes `&id001` anchors: policy files are read by people."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _represent_flow_map(dumper: yaml.SafeDumper, data: _FlowMap) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    """Strings with line breaks or control characters (NEL, U+2028, tabs...) are written
    double-quoted with escapes: PyYAML's other styles fold some of them into spaces, and the
    imported file must say exactly what CF said."""
    style = None if data.isprintable() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(_FlowMap, _represent_flow_map)
_Dumper.add_representer(str, _represent_str)


def _flow_rules(doc: dict[str, Any]) -> dict[str, Any]:
    rules = doc.get("rules")
    if not isinstance(rules, list):
        return doc
    out = dict(doc)
    out["rules"] = [_FlowMap(r) if isinstance(r, dict) else r for r in rules]
    return out
