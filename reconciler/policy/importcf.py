"""Import Cloud Foundry security groups into policy documents (`asgctl import-cf`).

Accepted inputs, all as parsed JSON:

* a bare rules array, as given to `cf create-security-group NAME rules.json` (the caller
  supplies NAME);
* one v3 security group resource (`GET /v3/security_groups/:guid`);
* a v3 list response (`GET /v3/security_groups`, `{pagination, resources}`).

The output describes exactly the same rules: rule values are kept as CF gave them (strings
stay strings, `"53, 5353"` is not rewritten), only keys with `null` values and empty
descriptions are dropped, and bindings become `running_spaces` / `staging_spaces` lists of
space GUIDs plus `globally_enabled`.  Every rule is checked with the CF grammar first and
errors are reported in Cloud Controller's v3 form (`Rules[<index>]: <message>`), prefixed
with the group name, so the caller can refuse to write anything when one group is wrong.

`import_cf` is pure: data in, data out.  `import_files` reads the JSON files the command is
given (naming a bare rules array after its file) and adds the checks that span files;
`document_filename` is the file a group is written to.  Space GUIDs are not resolved to
`org/space` names here, because CF's v3 presenter only shows the spaces the exporting user
can see and a GUID is always exact; the validator resolves GUIDs against the repository's
directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from reconciler import jsonsafe
from reconciler.policy.grammar import ALLOWED_RULE_KEYS, parse_rule

__all__ = ["SCHEMA_COMMENT", "dump_documents", "import_cf"]

SCHEMA_COMMENT = "# yaml-language-server: $schema=../schemas/asgctl.schema.json"
MAX_NAME_LENGTH = 250  # SecurityGroupCreateMessage::MAX_SECURITY_GROUP_NAME_LENGTH
# Cloud Controller's v3 messages for the group itself (ActiveModel full messages).
MSG_RULES_NOT_ARRAY = "Rules must be an array"
MSG_NAME_BLANK = "Name can't be blank"
MSG_NAME_NOT_STRING = "Name must be a string"
MSG_NAME_TOO_LONG = f"Name is too long (maximum is {MAX_NAME_LENGTH} characters)"
MSG_GLOBAL_NOT_OBJECT = "Globally enabled must be an object"
MSG_GLOBAL_KEYS = "Globally enabled only allows keys 'running' or 'staging'"
MSG_GLOBAL_VALUES = "Globally enabled values must be booleans"

MSG_V2 = (
    "this is a v2 API response; export the v3 form with cf curl '/v3/security_groups?per_page=5000'"
)

_BINDINGS = ("running_spaces", "staging_spaces")
_RESOURCE_KEYS = ("guid", "name", "rules", "globally_enabled", "relationships")


def _is_v2_list(data: Mapping) -> bool:
    resources = data.get("resources")
    return (
        isinstance(resources, list)
        and bool(resources)
        and isinstance(resources[0], Mapping)
        and "entity" in resources[0]
    )


def import_cf(data: object, *, name: str | None) -> tuple[list[dict], list[str]]:
    """Convert CF input into SecurityGroup documents.

    `name` names the group of a bare rules array; for a resource or a list response it
    selects the group of that name (an error if there is none), so one group can be pulled
    out of a full `/v3/security_groups` dump.  Returns `(documents, errors)`; when `errors`
    is not empty the documents are incomplete and must not be written.
    """
    if isinstance(data, list):
        if name is None:
            return [], ["a name is required to import a bare rules array"]
        doc, errors = _convert(name, {"rules": data}, is_resource=False)
        return [doc], errors
    if not isinstance(data, Mapping):
        return [], [_unrecognised(data)]
    if "entity" in data or _is_v2_list(data):
        return [], [MSG_V2]
    if "resources" in data:
        return _import_list(data, name)
    if any(key in data for key in _RESOURCE_KEYS):
        if name is not None and data.get("name") != name:
            return [], [f"security group {name!r} is not in the input"]
        doc, errors = _convert(data.get("name"), data, is_resource=True)
        return [doc], errors
    return [], [_unrecognised(data)]


def import_files(paths: Sequence[str], name: str | None) -> tuple[list[dict], list[str]]:
    """Documents from CF JSON files, in order, and every error, each naming its file.

    A bare rules array has no name of its own: `name`, else the file's stem.  For a v3
    resource or list, `name` picks one group out of it.  Group names must be unique across
    all files.  Any error means nothing should be written.
    """
    docs: list[dict] = []
    errors: list[str] = []
    for file in paths:
        try:
            data = jsonsafe.loads(Path(file).read_bytes(), file, reject_duplicate_keys=True)
        except OSError as exc:
            errors.append(f"{file}: cannot read: {exc.strerror or exc}")
            continue
        except jsonsafe.JsonInputError as exc:
            errors.append(str(exc))
            continue
        group_name = (name or Path(file).stem) if isinstance(data, list) else name
        got, errs = import_cf(data, name=group_name)
        docs.extend(got)
        errors.extend(f"{file}: {e}" for e in errs)
    names = [d.get("name") for d in docs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    errors.extend(f"group name {n!r} appears more than once" for n in dupes)
    return docs, errors


def document_filename(name: str) -> str:
    """`<name>.yaml`, with anything but ASCII letters, digits, `-_.` replaced by `_`."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in name)
    return f"{safe.strip('.')[:120] or 'group'}.yaml"


def _unrecognised(data: object) -> str:
    kind = type(data).__name__
    return (
        f"input is not a CF rules array, a v3 security group, or a v3 security group list "
        f"(got a JSON {kind})"
    )


def _import_list(data: Mapping, name: str | None) -> tuple[list[dict], list[str]]:
    resources = data.get("resources")
    if not isinstance(resources, list):
        return [], ["resources must be an array"]
    errors: list[str] = []
    pagination = data.get("pagination")
    if isinstance(pagination, Mapping) and pagination.get("next"):
        errors.append(
            "the input is one page of a paginated list; fetch every security group at once "
            "(cf curl '/v3/security_groups?per_page=5000') so that none is left out"
        )
    docs: list[dict] = []
    seen: dict[str, int] = {}
    found = False
    for i, resource in enumerate(resources):
        if not isinstance(resource, Mapping):
            errors.append(f"resources[{i}] must be an object")
            continue
        group_name = resource.get("name")
        if name is not None and group_name != name:
            continue
        found = True
        if isinstance(group_name, str):
            if group_name in seen:
                errors.append(f"Security group with name '{group_name}' already exists.")
            seen.setdefault(group_name, i)
        doc, doc_errors = _convert(group_name, resource, is_resource=True)
        docs.append(doc)
        errors.extend(doc_errors)
    if name is not None and not found:
        errors.append(f"security group {name!r} is not in the input")
    return docs, errors


def _convert(name: object, source: Mapping, *, is_resource: bool) -> tuple[dict, list[str]]:
    """One group: CF's checks on name, globally_enabled and rules, then the document."""
    errors: list[str] = []
    label = name if isinstance(name, str) and name else "<unnamed>"

    def fail(message: str) -> None:
        errors.append(f"{label}: {message}")

    if name is None or name == "":
        fail(MSG_NAME_BLANK)
    elif not isinstance(name, str):
        fail(MSG_NAME_NOT_STRING)
    elif len(name) > MAX_NAME_LENGTH:
        fail(MSG_NAME_TOO_LONG)

    doc: dict[str, Any] = {"kind": "SecurityGroup", "name": name}

    rules_value = source.get("rules", [] if is_resource else None)
    rules: list[dict] = []
    if not isinstance(rules_value, list):
        fail(MSG_RULES_NOT_ARRAY)
    else:
        for index, raw in enumerate(rules_value):
            _, rule_errors = parse_rule(raw)
            for err in rule_errors:
                fail(f"Rules[{index}]: {err.message}")
            if isinstance(raw, Mapping):
                rules.append(_clean_rule(raw))
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
    return doc, errors


def _clean_rule(raw: Mapping) -> dict:
    """The rule as CF gave it, keys in CF's documented order, `null`s and "" descriptions
    dropped (both mean "not given" to CF, so the rule means the same without them)."""
    out: dict[str, Any] = {}
    for key in ALLOWED_RULE_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if value is None or (key == "description" and value == ""):
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


def dump_documents(docs: list[dict]) -> str:
    """Multi-document YAML for a policy file, with the schema hint editors pick up.

    Rules are written one per line in flow style, like the examples in the design, so a
    pull request that changes one rule shows a one-line diff.
    """
    body = yaml.dump_all(
        [_flow_rules(doc) for doc in docs],
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=10_000,
    )
    return f"{SCHEMA_COMMENT}\n{body}"


class _FlowMap(dict):
    """Marks a mapping to be written in flow style (`{protocol: tcp, ...}`)."""


class _Dumper(yaml.SafeDumper):
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


def _flow_rules(doc: dict) -> dict:
    rules = doc.get("rules")
    if not isinstance(rules, list):
        return doc
    out = dict(doc)
    out["rules"] = [_FlowMap(r) if isinstance(r, dict) else r for r in rules]
    return out
