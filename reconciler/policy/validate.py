"""Validation in two layers: JSON Schema for shape, then Cloud Foundry's semantics.

The schema layer is what editors also run while typing; the semantic layer is Cloud
Controller's rule grammar (with its messages, so an operator's CF knowledge carries over),
references between documents, uniqueness, and warnings for rules that add nothing.  Rule
bodies are judged by the CF grammar alone, so one mistake yields one message, in CF's words.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from reconciler.core.cron import MAX_WINDOW_MINUTES, CronError, Window, parse_cron, parse_duration
from reconciler.core.endpoint import parse_endpoint
from reconciler.core.model import (
    AddressRange,
    App,
    Destination,
    Directory,
    EgressPolicy,
    Enforcement,
    Location,
    Org,
    PolicySet,
    PolicyTest,
    PortRange,
    Rollout,
    Rule,
    SecurityGroup,
    Space,
    Wave,
)
from reconciler.core.model import ChangeWindow as ChangeWindowModel
from reconciler.core.names import fqdn_entry
from reconciler.core.packetspace import Box, covers, rule_space
from reconciler.policy import grammar
from reconciler.policy.findings import Finding, field_path
from reconciler.policy.yamlsafe import Document, FieldPath, ParseCache

SourceType = Literal["app", "space", "default"]

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_FILES = {
    "SecurityGroup": "security-group.schema.json",
    "Destination": "destination.schema.json",
    "EgressPolicy": "egress-policy.schema.json",
    "Directory": "directory.schema.json",
    "PolicyTest": "policy-test.schema.json",
    "Rollout": "rollout.schema.json",
    "Enforcement": "enforcement.schema.json",
}
KINDS = tuple(SCHEMA_FILES)
_ALL_PORTS = (PortRange(1, 65535),)


@cache
def _validators() -> dict[str, Draft202012Validator]:
    resources = []
    for name in [*SCHEMA_FILES.values(), "asgctl.schema.json"]:
        contents = json.loads((SCHEMA_DIR / name).read_text())
        if name == SCHEMA_FILES["SecurityGroup"]:
            # Rule bodies are judged by the CF grammar alone (one message, in CF's words);
            # the schema keeps describing them for editors, but is not run over them here.
            contents["properties"]["rules"]["items"] = {}
        resources.append((name, Resource.from_contents(contents)))
    registry: Registry = Registry().with_resources(resources)
    return {
        kind: Draft202012Validator(registry[file].contents, registry=registry)
        for kind, file in SCHEMA_FILES.items()
    }


@dataclass(frozen=True)
class Result:
    """A validated policy set and everything found on the way.

    `policy` always holds what could be understood; callers must not act on it when
    `ok` is false, which is why the agent and `apply` check `ok` first.
    """

    policy: PolicySet
    findings: tuple[Finding, ...] = field(default=())

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors


class _Context:
    """Collects findings for one document, so every message carries file, line and subject."""

    def __init__(self, doc: Document, sink: list[Finding]):
        self.doc = doc
        self.sink = sink
        data = doc.data if isinstance(doc.data, dict) else {}
        kind = data.get("kind")
        name = data.get("name")
        self.kind = kind if isinstance(kind, str) else ""
        self.name = name if isinstance(name, str) else ""
        self.unsound: frozenset[FieldPath] = frozenset()
        """The parts the schema found fault with (top-level fields, or one PolicyTest case):
        checks that read only other parts still run, so one run reports everything."""
        self.directory_complete = True
        """False when a Directory document failed its schema: a name it may hold cannot be
        said to be missing."""

    def sound(self, path: FieldPath) -> bool:
        """Is the part at `path` schema-valid (so the semantic checks can read it)?"""
        return not any(path[: len(u)] == u for u in self.unsound)

    def loc(self, path: FieldPath = ()) -> Location:
        return self.doc.location(path)

    def error(self, path: FieldPath, message: str, severity: str = "error") -> None:
        self.sink.append(
            Finding.at(
                self.loc(path),
                message,
                kind=self.kind,
                name=self.name[:80],
                field=field_path(path),
                severity=severity,  # type: ignore[arg-type]  # "error" or "warning", by caller
            )
        )

    def warn(self, path: FieldPath, message: str) -> None:
        self.error(path, message, "warning")


def validate_documents(docs: Iterable[Document], cache: ParseCache | None = None) -> Result:
    """Validate every document and build the policy set; pure, deterministic.

    With the `cache` the documents came from, each one's schema check runs once however
    many loads share it (its findings are replayed for the others)."""
    findings: list[Finding] = []
    by_kind: dict[str, list[_Context]] = {k: [] for k in KINDS}
    # Documents that failed their schema still get the reference checks their sound parts
    # allow (and count for names others refer to): a schema error must not hide a reference
    # error until the next round.  They never become part of the policy.
    broken: dict[str, list[_Context]] = {k: [] for k in KINDS}
    every: dict[str, list[_Context]] = {k: [] for k in KINDS}
    for doc in docs:
        ctx = _Context(doc, findings)
        if not isinstance(doc.data, dict):
            ctx.error((), "a policy document must be a mapping with a 'kind'")
            continue
        kind = doc.data.get("kind")
        if not isinstance(kind, str) or kind not in SCHEMA_FILES:  # `kind: [a]` is unhashable
            ctx.error(("kind",), f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            continue
        (by_kind if _schema_ok(ctx, cache) else broken)[kind].append(ctx)
        every[kind].append(ctx)

    _check_unique_names(
        {k: [c for c in cs if c.sound(("name",))] for k, cs in every.items()}, findings
    )
    directory = _build_directory(by_kind["Directory"])
    if broken["Directory"]:
        for ctx in (c for cs in every.values() for c in cs):
            ctx.directory_complete = False
    groups = tuple(g for c in by_kind["SecurityGroup"] if (g := _security_group(c, directory)))
    destinations = tuple(d for c in by_kind["Destination"] if (d := _destination(c)))
    known = {d.name for d in destinations} | {
        c.name for c in every["Destination"] if c.name
    }  # a broken destination is reported once, not again by each policy using it
    policies = tuple(
        p for c in by_kind["EgressPolicy"] if (p := _egress_policy(c, directory, known))
    )
    tests = tuple(t for c in by_kind["PolicyTest"] for t in _policy_tests(c, directory))
    for ctx in broken["SecurityGroup"]:
        _security_group(ctx, directory)
    for ctx in broken["EgressPolicy"]:
        _egress_policy(ctx, directory, known)
    for ctx in broken["PolicyTest"]:
        _policy_tests(ctx, directory)
    rollouts = [r for c in by_kind["Rollout"] if (r := _rollout(c))]
    for ctx in broken["Rollout"]:
        _rollout(ctx)
    _check_one_rollout(every["Rollout"])
    enforcements = _enforcements(by_kind["Enforcement"], directory)
    for ctx in broken["Enforcement"]:
        _enforcement(ctx, directory)
    policy = PolicySet(
        security_groups=tuple(sorted(groups, key=lambda g: g.name)),
        destinations=tuple(sorted(destinations, key=lambda d: d.name)),
        egress_policies=tuple(sorted(policies, key=lambda p: p.name)),
        directory=directory,
        tests=tests,
        rollout=rollouts[0] if len(rollouts) == 1 and len(every["Rollout"]) == 1 else None,
        enforcements=tuple(sorted(enforcements, key=lambda e: e.name)),
    )
    return Result(policy, tuple(sorted(set(findings))))


def _schema_ok(ctx: _Context, cache: ParseCache | None = None) -> bool:
    """Schema findings for the document's shape (rule bodies are the grammar's)."""
    known = cache.note(ctx.doc) if cache is not None else None
    if known is None:
        validator = _validators()[ctx.doc.data["kind"]]
        errors: list[tuple[FieldPath, str]] = []
        unsound: set[FieldPath] = set()
        for err in validator.iter_errors(ctx.doc.data):
            path = tuple(err.absolute_path)
            errors.append((path, _schema_message(err)))
            unsound.update(_faulty_parts(err, path))
        known = (tuple(errors), frozenset(unsound))
        if cache is not None:
            cache.keep_note(ctx.doc, known)
    for path, message in known[0]:
        ctx.error(path, message)
    ctx.unsound = known[1]
    return not known[0]


def _faulty_parts(err: Any, path: FieldPath) -> set[FieldPath]:
    """The parts of a document a schema error makes unreadable: the top-level field it is
    in, or the PolicyTest case; a missing or unexpected key is the part it names, and an
    error about the document as a whole (path ()) takes all of it."""
    paths = [path]
    if isinstance(err.instance, dict) and err.validator == "required":
        paths = [(*path, k) for k in err.validator_value if k not in err.instance]
    elif isinstance(err.instance, dict) and err.validator == "additionalProperties":
        known = err.schema.get("properties", {})
        paths = [(*path, k) for k in err.instance if k not in known]
    return {p[: 2 if p[:1] == ("cases",) else 1] for p in paths}


def _schema_message(err: Any) -> str:
    if err.validator == "required":
        return str(err.message).replace("is a required property", "is required")
    if err.validator == "maxLength" and isinstance(err.instance, str):
        return f"must be at most {err.validator_value} characters (got {len(err.instance)})"
    if err.validator in ("anyOf", "oneOf") and err.context:
        best = min(err.context, key=lambda e: len(e.message))
        return f"{_short(err.instance)} is not valid: {best.message}"
    message = str(err.message)
    return message if len(message) < 300 else message[:297] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_unique_names(by_kind: dict[str, list[_Context]], findings: list[Finding]) -> None:
    for kind in ("SecurityGroup", "Destination", "EgressPolicy", "PolicyTest", "Enforcement"):
        seen: dict[str, Location] = {}
        for ctx in by_kind[kind]:
            first = seen.setdefault(ctx.name, ctx.loc(("name",)))
            if first != ctx.loc(("name",)):
                ctx.error(("name",), f"name is already used by {kind} at {first.short}")


def _build_directory(contexts: list[_Context]) -> Directory:
    orgs: list[Org] = []
    spaces: list[Space] = []
    apps: list[App] = []
    guids: dict[str, Location] = {}
    names: dict[tuple[str, ...], Location] = {}

    def claim(ctx: _Context, path: FieldPath, guid: str, scoped: tuple[str, ...]) -> bool:
        here = ctx.loc(path)
        if guid in guids:
            ctx.error((*path, "guid"), f"GUID {guid} is already used at {guids[guid].short}")
            return False
        if scoped in names:
            ctx.error(
                (*path, "name"), f"{'/'.join(scoped)} is already defined at {names[scoped].short}"
            )
            return False
        guids[guid] = names[scoped] = here
        return True

    for ctx in contexts:
        for i, org in enumerate(ctx.doc.data.get("orgs", [])):
            opath: FieldPath = ("orgs", i)
            if not claim(ctx, opath, org["guid"], (org["name"],)):
                continue
            orgs.append(Org(org["guid"], org["name"]))
            for j, space in enumerate(org.get("spaces", [])):
                spath: FieldPath = (*opath, "spaces", j)
                if not claim(ctx, spath, space["guid"], (org["name"], space["name"])):
                    continue
                spaces.append(Space(space["guid"], space["name"], org["guid"]))
                for k, app in enumerate(space.get("apps", [])):
                    apath: FieldPath = (*spath, "apps", k)
                    scoped = (org["name"], space["name"], app["name"])
                    if claim(ctx, apath, app["guid"], scoped):
                        apps.append(App(app["guid"], app["name"], space["guid"]))
    return Directory(tuple(orgs), tuple(spaces), tuple(apps))


def _resolve_space(ctx: _Context, directory: Directory, path: FieldPath, ref: str) -> str | None:
    if "/" in ref:
        if ref.count("/") != 1:
            ctx.error(path, f"space {ref!r} must be org/space or a space GUID")
            return None
        guid = directory.resolve_space(ref)
        if guid is None and ctx.directory_complete:
            ctx.error(path, f"space {ref!r} is not in the directory")
        return guid
    if ctx.directory_complete and directory.spaces and not directory.knows_space(ref):
        ctx.warn(path, f"space GUID {ref} is not in the directory")
    return ref


def _resolve_app(ctx: _Context, directory: Directory, path: FieldPath, ref: str) -> str | None:
    if "/" in ref:
        if ref.count("/") != 2:
            ctx.error(path, f"app {ref!r} must be org/space/app or an app GUID")
            return None
        guid = directory.resolve_app(ref)
        if guid is None and ctx.directory_complete:
            ctx.error(path, f"app {ref!r} is not in the directory")
        return guid
    if ctx.directory_complete and directory.apps and not directory.knows_app(ref):
        ctx.warn(path, f"app GUID {ref} is not in the directory")
    return ref


def _security_group(ctx: _Context, directory: Directory) -> SecurityGroup | None:
    data = ctx.doc.data
    rules: list[Rule] = []
    ok = True
    for i, raw in enumerate(data["rules"] if ctx.sound(("rules",)) else ()):
        rule, errors = grammar.parse_rule(raw, location=ctx.loc(("rules", i)))
        for err in errors:
            path: FieldPath = ("rules", i, err.field) if err.field else ("rules", i)
            ctx.error(path, _with_item(err))
        if rule is None:
            ok = False
        else:
            rules.append(rule)
            for note in grammar.host_bits_notes(raw.get("destination")):
                ctx.warn(("rules", i, "destination"), note.message)
    if ok:
        _check_redundant(ctx, rules)
    bindings: dict[str, list[str]] = {}
    for key in ("running_spaces", "staging_spaces"):
        resolved: list[str] = []
        for i, ref in enumerate(data.get(key, []) if ctx.sound((key,)) else ()):
            guid = _resolve_space(ctx, directory, (key, i), ref)
            if guid is None:
                ok = False
            elif guid in resolved:
                ctx.warn((key, i), f"space {ref!r} is listed twice")
            else:
                resolved.append(guid)
        bindings[key] = sorted(resolved)
    if not ok or ctx.unsound:
        return None
    enabled = data.get("globally_enabled", {})
    return SecurityGroup(
        name=data["name"],
        rules=tuple(rules),
        description=data.get("description", ""),
        running_default=bool(enabled.get("running", False)),
        staging_default=bool(enabled.get("staging", False)),
        running_spaces=tuple(bindings["running_spaces"]),
        staging_spaces=tuple(bindings["staging_spaces"]),
        location=ctx.loc(),
    )


def _with_item(err: grammar.FieldError) -> str:
    """CF's message, plus the list entry it is about: in a list of hundreds, CF never says."""
    if err.item is None:
        return err.message
    item = err.item if len(err.item) <= 60 else err.item[:57] + "..."
    return f"{err.message} (entry {item!r})"


_REDUNDANCY_BUDGET = 250_000


def _check_redundant(ctx: _Context, rules: list[Rule]) -> None:
    """Warn on duplicates and on rules a broader rule of the same group already covers.

    Such rules are harmless to packets (the compiler installs each once) but usually mean a
    copy-paste or a forgotten narrowing, which reviewers want to hear about.
    """
    sizes = [len(r.destinations) for r in rules]
    if sum(sizes) ** 2 > _REDUNDANCY_BUDGET:
        return
    # A rule can only cover another whose addresses lie inside its own span: checking the
    # spans first skips almost every pair without building rule items.
    spans = [
        (
            r.destinations[0].version,
            min(d.first for d in r.destinations),
            max(d.last for d in r.destinations),
        )
        for r in rules
    ]
    # Each rule's packets, built once when first compared: a group of n rules makes up to
    # n^2 comparisons, and building both sides on every one was most of this check's time.
    spaces: list[tuple[Box, ...] | None] = [None] * len(rules)

    def space(n: int) -> tuple[Box, ...]:
        known = spaces[n]
        if known is None:
            known = spaces[n] = rule_space(rules[n])
        return known

    first_seen: dict[Rule, int] = {}
    for i, rule in enumerate(rules):
        j = first_seen.setdefault(rule, i)
        if j != i:
            ctx.warn(("rules", i), f"duplicate of rules[{j}]")
            continue
        version, lo, hi = spans[i]
        for k, other in enumerate(rules):
            o_version, o_lo, o_hi = spans[k]
            if k == i or o_version != version or o_lo > lo or o_hi < hi:
                continue
            if other.protocol not in ("all", rule.protocol) or (rule.log and not other.log):
                continue
            if other == rule:
                continue
            covered = covers(space(k), space(i))
            if covered and not (k > i and covers(space(i), space(k))):
                ctx.warn(("rules", i), f"redundant: rules[{k}] already allows all of it")
                break


def _destination(ctx: _Context) -> Destination | None:
    data = ctx.doc.data
    protocol = data["protocol"]
    ips: tuple[AddressRange, ...] | None = ()
    if "ips" in data or "fqdns" not in data:
        ips, ip_errors = grammar.parse_destination_ips(data.get("ips"))
        for err in ip_errors:
            message = _with_item(err)
            if "fqdns" not in data and "ips" not in data:
                message = "a destination needs ips, fqdns or both"
            ctx.error(("ips",), message)
        if ips is not None:
            for note in grammar.host_bits_notes(data["ips"]):
                ctx.warn(("ips",), note.message)
    fqdns = _destination_fqdns(ctx) if "fqdns" in data else ()
    ports: tuple[PortRange, ...] = ()
    ok = ips is not None and fqdns is not None
    if "ports" in data:
        if protocol not in ("tcp", "udp"):
            ctx.error(("ports",), f"ports are not allowed for protocol {protocol}")
            ok = False
        else:
            parsed, port_errors = grammar.parse_port_ranges(data["ports"])
            for err in port_errors:
                ctx.error(("ports",), _with_item(err))
            ok = ok and parsed is not None
            ports = parsed or ()
    elif protocol in ("tcp", "udp"):
        # The policy server's default, kept so existing repositories mean what they meant; but
        # a grant to every port is rarely what was wanted, so the reviewer is told.
        ports = _ALL_PORTS
        if ips is not None and fqdns is not None:  # with unreadable ones there is no grant
            what = " and ".join(w for w, given in (("ips", ips), ("names", fqdns)) if given)
            ctx.warn(
                ("ports",), f"no ports given: {protocol} to these {what} on all ports (1-65535)"
            )
    icmp_type = data.get("icmp_type")
    icmp_code = data.get("icmp_code")
    if protocol in ("icmp", "icmpv6"):
        icmp_type = -1 if icmp_type is None else icmp_type
        icmp_code = -1 if icmp_code is None else icmp_code
    else:
        for key in ("icmp_type", "icmp_code"):
            if key in data:
                ctx.error((key,), f"{key} is only allowed for protocols icmp and icmpv6")
                ok = False
    if ips is not None:
        want = {"icmp": 4, "icmpv6": 6}.get(protocol)
        if want is not None and any(r.version != want for r in ips):
            ctx.error(("ips",), f"protocol {protocol} needs IPv{want} addresses")
            ok = False
    if not ok or ips is None or fqdns is None:
        return None
    return Destination(
        name=data["name"],
        protocol=protocol,
        ips=ips,
        ports=ports,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        description=data.get("description", ""),
        location=ctx.loc(),
        fqdns=fqdns,
    )


def _destination_fqdns(ctx: _Context) -> tuple[str, ...] | None:
    """A Destination's `fqdns`, each bad entry reported at its own line.  A wildcard is
    filled only from the answers containers receive (the agent's DNS interception,
    docs/fqdn.md): it is never resolved ahead, and never stands for everything."""
    raw = ctx.doc.data["fqdns"]
    entries = raw if isinstance(raw, list) else [raw]
    names: list[str] = []
    ok = True
    for i, entry in enumerate(entries):
        path: FieldPath = ("fqdns", i) if isinstance(raw, list) else ("fqdns",)
        name, message = fqdn_entry(entry)
        if message is not None:
            ctx.error(path, message)
            ok = False
        elif name is not None:
            names.append(name)
    return tuple(sorted(set(names))) if ok else None


def _principal(ctx: _Context, directory: Directory, key: str) -> tuple[Any, str | None, bool]:
    """An EgressPolicy's `source` or an Enforcement's `scope`: its type, the app or space
    GUID a name or id resolves to (a name not in the directory is an error, an unknown GUID
    a warning), and whether the document is sound so far."""
    field = ctx.doc.data[key] if ctx.sound((key,)) else {"type": None}
    kind = field["type"]
    ref = str(field.get("name") or field.get("id") or "")  # the schema made it a string
    guid: str | None = None
    ok = not ctx.unsound
    if kind == "app":
        guid = _resolve_app(ctx, directory, (key,), ref)
        ok = ok and guid is not None
    elif kind == "space":
        guid = _resolve_space(ctx, directory, (key,), ref)
        ok = ok and guid is not None
    return kind, guid, ok


def _egress_policy(
    ctx: _Context, directory: Directory, destinations: set[str]
) -> EgressPolicy | None:
    data = ctx.doc.data
    stype, source_id, ok = _principal(ctx, directory, "source")
    if ctx.sound(("destination",)) and data["destination"] not in destinations:
        ctx.error(("destination",), f"destination {data['destination']!r} is not defined")
        ok = False
    if not ok:
        return None
    return EgressPolicy(
        name=data["name"],
        source_type=cast(SourceType, stype),  # the schema allows only these
        source_id=source_id,
        destination=data["destination"],
        app_lifecycle=data.get("app_lifecycle", "all"),
        description=data.get("description", ""),
        location=ctx.loc(),
    )


def _enforcement(ctx: _Context, directory: Directory) -> Enforcement | None:
    """One Enforcement document: its scope resolved as an EgressPolicy source is (a name
    not in the directory is an error, an unknown GUID a warning), its mode as written."""
    data = ctx.doc.data
    stype, scope_id, ok = _principal(ctx, directory, "scope")
    if not ok:
        return None
    return Enforcement(
        name=data["name"],
        scope_type=cast(Literal["app", "space", "all"], stype),  # the schema allows only these
        scope_id=scope_id,
        mode=cast(Literal["audit", "enforce"], data["mode"]),
        description=data.get("description", ""),
        location=ctx.loc(),
    )


def _enforcements(contexts: list[_Context], directory: Directory) -> list[Enforcement]:
    """Every Enforcement document, and one mode per scope: two documents that give one app,
    space or `all` different modes are an error naming both (which one wins would otherwise
    be file order); a second one with the same mode only repeats the first (a warning)."""
    out: list[Enforcement] = []
    seen: dict[tuple[str, str | None], tuple[Enforcement, _Context]] = {}
    for ctx in sorted(contexts, key=lambda c: c.loc()):
        enf = _enforcement(ctx, directory)
        if enf is None:
            continue
        key = (enf.scope_type, enf.scope_id)
        first = seen.get(key)
        if first is None:
            seen[key] = (enf, ctx)
            out.append(enf)
            continue
        other, octx = first
        scope = enf.scope_text(directory)
        here = f"Enforcement/{enf.name} ({ctx.loc(('mode',)).short})"
        there = f"Enforcement/{other.name} ({octx.loc(('mode',)).short})"
        if other.mode != enf.mode:
            ctx.error(
                ("mode",),
                f"{here} puts {scope} in {enf.mode}, {there} in {other.mode}: "
                "one scope has one mode",
            )
        else:
            ctx.warn(("scope",), f"{scope} is already in {enf.mode} by {there}")
    return out


def _policy_tests(ctx: _Context, directory: Directory) -> list[PolicyTest]:
    out: list[PolicyTest] = []
    for i, case in enumerate(ctx.doc.data["cases"] if ctx.sound(("cases",)) else ()):
        base: FieldPath = ("cases", i)
        if not ctx.sound(base):
            continue
        try:
            endpoint = parse_endpoint(case["to"], case.get("icmp_type"), case.get("icmp_code"))
        except ValueError as exc:
            ctx.error((*base, "to"), str(exc))
            continue
        app = space = None
        if "app" in case:
            app = _resolve_app(ctx, directory, (*base, "app"), case["app"])
            if app is None:
                continue
        else:
            space = _resolve_space(ctx, directory, (*base, "space"), case["space"])
            if space is None:
                continue
        out.append(
            PolicyTest(
                name=f"{ctx.name}[{i}]",
                app=app,
                space=space,
                lifecycle=case.get("lifecycle", "running"),
                protocol=endpoint.protocol,
                address=endpoint.address_text,
                port=endpoint.port,
                expect=case["expect"],
                icmp_type=endpoint.icmp_type,
                icmp_code=endpoint.icmp_code,
                location=ctx.loc(base),
            )
        )
    return out


def _check_one_rollout(contexts: list[_Context]) -> None:
    """A repository says one thing about how its revisions roll out: two Rollout documents
    would leave the cells to pick one, so every one after the first is an error naming both."""
    if len(contexts) < 2:
        return
    ordered = sorted(contexts, key=lambda c: c.loc())
    first = ordered[0].loc()
    for ctx in ordered[1:]:
        ctx.error(
            ("kind",),
            f"a repository has at most one Rollout: this one ({ctx.loc().short}) and the one "
            f"at {first.short}",
        )


def _rollout(ctx: _Context) -> Rollout | None:
    """The Rollout document's meaning: durations and schedules parsed, wave names unique."""
    data = ctx.doc.data
    ok = not ctx.unsound
    waves: list[Wave] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(data.get("waves", []) if ctx.sound(("waves",)) else ()):
        path: FieldPath = ("waves", i)
        if raw["name"] in names:
            ctx.error(
                (*path, "name"), f"wave {raw['name']!r} is already waves[{names[raw['name']]}]"
            )
            ok = False
        names.setdefault(raw["name"], i)
        soak = 0.0
        try:
            soak = parse_duration(raw.get("soak", 0))
        except ValueError as exc:
            ctx.error((*path, "soak"), str(exc))
            ok = False
        waves.append(Wave(raw["name"], tuple(raw["cells"]), soak, ctx.loc(path)))
    windows: list[ChangeWindowModel] = []
    for i, raw in enumerate(data.get("windows", []) if ctx.sound(("windows",)) else ()):
        path = ("windows", i)
        try:
            cron = parse_cron(raw["schedule"])
        except CronError as exc:
            ctx.error((*path, "schedule"), str(exc))
            ok = False
            continue
        try:
            duration = parse_duration(raw["duration"])
        except ValueError as exc:
            ctx.error((*path, "duration"), str(exc))
            ok = False
            continue
        if not 60 <= duration <= MAX_WINDOW_MINUTES * 60:
            ctx.error((*path, "duration"), "a window lasts from 1m to 31 days")
            ok = False
            continue
        window = Window(cron, duration, raw["kind"])
        windows.append(ChangeWindowModel(window, raw.get("description", ""), ctx.loc(path)))
    pause = data.get("pause", False) if ctx.sound(("pause",)) else False
    if not ok:
        return None
    return Rollout(
        name=data["name"],
        waves=tuple(waves),
        halt=tuple(dict.fromkeys(data.get("halt", ["NotReady"]))),
        pause=pause is not False,
        pinned=pause["revision"] if isinstance(pause, dict) else None,
        windows=tuple(windows),
        location=ctx.loc(),
    )
