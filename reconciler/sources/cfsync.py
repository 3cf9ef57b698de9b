"""`asgctl cf sync`: the Cloud Controller's orgs, spaces, apps and security groups as policy files.

Three steps, so the middle one is pure and the edges are small:

1. `read_foundation` lists `/v3/organizations`, `/v3/spaces`, `/v3/apps` and
   `/v3/security_groups` through `reconciler.sources.cc.Client`, keeping of each resource only
   what the files need (a foundation of 200,000 apps stays small in memory).
2. `render` turns that into file texts: one `Directory` per org under `directory/` and one
   `SecurityGroup` per group under `security-groups/`.  Groups are converted by `import-cf`'s
   converter (`importcf.import_sources`), so a rule means here exactly what it means to
   `asgctl import-cf` and to Cloud Controller; only the bindings are rewritten, from space GUIDs
   to `org/space` names.
3. `apply` writes what changed into the output folder, never touching a file it does not own.

Why the files look as they do:

* Stable: names and order come from CF's names and GUIDs only (no timestamps, no page order),
  so a second sync with nothing changed in CF changes no byte, and a change in CF is a small
  diff (one app is two lines of its org's file).
* Names where CF has them, GUIDs where a name cannot say which one is meant: a name the
  Directory cannot hold (a slash, whitespace, a control character: schemas/directory.schema.json
  `name`), a name two siblings share, or a name equal to a sibling's GUID is replaced by the
  GUID, with a warning.  Bindings are `org/space` when both names are usable, else the space
  GUID, which the validator resolves as exactly.
* One Directory file per org, not one file: the policy loader caps a file at 8 MiB
  (`yamlsafe.Limits.max_file_bytes`), and a foundation's 200,000 apps are about 15 MiB.
* Ownership: every file written starts with `MARKER`; a file without it is the operator's and
  is never written, moved or removed (a group whose file name is taken by one is an error).
  Directory files of orgs gone from CF are removed (they only name things, and a stale one
  would claim the GUID of the org's renamed file); security groups gone from CF are reported
  and removed only with `prune`, since removing one withdraws what it allowed.
* Hostile names cannot escape: file names come from `importcf.document_filename` (ASCII
  letters, digits, `-_.`), every written path is checked to stay inside its folder, the
  folders must be real folders (not symlinks), and YAML is written by the one dumper
  (`importcf.dump_documents`), which quotes whatever needs quoting.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.atomicfile import atomic_write_text
from reconciler.escape import visible
from reconciler.policy.importcf import (
    document_filenames,
    dump_documents,
    import_sources,
    schema_comment_for,
)
from reconciler.sources.cc import Client, Progress

__all__ = [
    "DIRECTORY_DIR",
    "GROUPS_DIR",
    "MARKER",
    "CFApp",
    "CFOrg",
    "CFSpace",
    "Foundation",
    "Outcome",
    "Rendered",
    "SyncError",
    "apply",
    "read_foundation",
    "render",
]

MARKER = "# Written by `asgctl cf sync` from the Cloud Controller; the next sync overwrites edits."
DIRECTORY_DIR = "directory"
GROUPS_DIR = "security-groups"
MAX_NAME = 255  # schemas/directory.schema.json $defs.name.maxLength
MAX_GUID = 64  # schemas/directory.schema.json $defs.guid.maxLength
_GUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # $defs.guid.pattern
_NAME = re.compile(r"[^/\s]+\Z")  # $defs.name.pattern
_GROUP_KEYS = ("guid", "name", "rules", "globally_enabled", "relationships")
_SHOWN = 5  # GUIDs listed in one warning before "and N more"


class SyncError(Exception):
    """The sync cannot go ahead; nothing was written."""


@dataclass(frozen=True)
class CFOrg:
    guid: object
    name: object


@dataclass(frozen=True)
class CFSpace:
    guid: object
    name: object
    org_guid: object


@dataclass(frozen=True)
class CFApp:
    guid: object
    name: object
    space_guid: object


@dataclass(frozen=True)
class Foundation:
    """What the Cloud Controller said, as read: values unchecked until `render` judges them."""

    orgs: tuple[CFOrg, ...] = ()
    spaces: tuple[CFSpace, ...] = ()
    apps: tuple[CFApp, ...] = ()
    groups: tuple[Mapping[str, Any], ...] = ()


def _related(resource: Mapping[str, Any], name: str) -> object:
    """`relationships.<name>.data.guid` of a v3 resource (a to-one relationship), or None."""
    relationships = resource.get("relationships")
    rel = relationships.get(name) if isinstance(relationships, Mapping) else None
    data = rel.get("data") if isinstance(rel, Mapping) else None
    return data.get("guid") if isinstance(data, Mapping) else None


def _pick_org(r: Mapping[str, Any]) -> CFOrg:
    return CFOrg(r.get("guid"), r.get("name"))


def _pick_space(r: Mapping[str, Any]) -> CFSpace:
    return CFSpace(r.get("guid"), r.get("name"), _related(r, "organization"))


def _pick_app(r: Mapping[str, Any]) -> CFApp:
    return CFApp(r.get("guid"), r.get("name"), _related(r, "space"))


def _pick_group(r: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fields the converter reads; `name` always present, so it is judged as a resource."""
    picked = {k: r[k] for k in _GROUP_KEYS if k in r}
    picked.setdefault("name", None)
    return picked


def read_foundation(client: Client, progress: Callable[[Progress], None]) -> Foundation:
    """Every org, space, app and security group the client can see."""
    orgs = client.list_all("/v3/organizations", _pick_org, progress=progress)
    spaces = client.list_all("/v3/spaces", _pick_space, progress=progress)
    apps = client.list_all("/v3/apps", _pick_app, progress=progress)
    # Groups become policy: duplicate JSON keys are refused, as for `import-cf`.
    groups = client.list_all("/v3/security_groups", _pick_group, strict=True, progress=progress)
    return Foundation(tuple(orgs), tuple(spaces), tuple(apps), tuple(groups))


# --------------------------------------------------------------------------------------------
# render: pure


@dataclass(frozen=True)
class Rendered:
    """The files a sync wants (relative path -> text), or why it cannot write any."""

    files: Mapping[str, str]
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)


def _guid_ok(guid: object) -> bool:
    return isinstance(guid, str) and len(guid) <= MAX_GUID and bool(_GUID.match(guid))


def _name_ok(name: object) -> bool:
    return (
        isinstance(name, str)
        and len(name) <= MAX_NAME
        and bool(_NAME.match(name))
        and name.isprintable()
    )


def _shown(value: object) -> str:
    text = visible(value if isinstance(value, str) else repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _display_names(
    siblings: Sequence[tuple[str, object]], where: str, warnings: list[str]
) -> dict[str, tuple[str, bool]]:
    """guid -> (name written, is it CF's name) for one level under one parent.

    CF's name is kept when the Directory can hold it, no sibling shares it and no sibling's
    GUID equals it; otherwise the GUID stands in (GUIDs are unique, so the result is too).
    """
    names = Counter(n for _, n in siblings if isinstance(n, str))
    guids = {g for g, _ in siblings}
    out: dict[str, tuple[str, bool]] = {}
    for guid, name in siblings:
        if not isinstance(name, str) or not _name_ok(name):
            why = "cannot be a Directory name (empty, a slash, whitespace or a control character)"
        elif names[name] == 1 and name not in guids:
            out[guid] = (name, True)
            continue
        elif names[name] > 1:
            why = "is shared by another one here"
        else:
            why = "is another one's GUID"
        warnings.append(f"{where} {guid}: name {_shown(name)} {why}; written as its GUID")
        out[guid] = (guid, False)
    return out


def _summarise(guids: Sequence[str]) -> str:
    shown = ", ".join(guids[:_SHOWN])
    return shown if len(guids) <= _SHOWN else f"{shown} and {len(guids) - _SHOWN} more"


def render(
    foundation: Foundation,
    directory_hint: str | None = None,
    groups_hint: str | None = None,
) -> Rendered:
    """The files for a foundation, keyed by path relative to the output folder.

    `directory_hint` / `groups_hint` are the schema comments for files in those folders
    (`importcf.schema_comment_for`), computed by the caller that knows where they go.
    """
    errors: list[str] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}

    def check_guid(kind: str, guid: object) -> bool:
        if not _guid_ok(guid):
            errors.append(f"{kind} GUID {_shown(guid)} is not a GUID (letters, digits, -_.)")
            return False
        assert isinstance(guid, str)
        if guid in seen:
            errors.append(f"{kind} GUID {guid} is also the GUID of {seen[guid]}")
            return False
        seen[guid] = kind
        return True

    orgs = [o for o in foundation.orgs if check_guid("org", o.guid)]
    spaces = [s for s in foundation.spaces if check_guid("space", s.guid)]
    apps = [a for a in foundation.apps if check_guid("app", a.guid)]

    org_names = _display_names([(str(o.guid), o.name) for o in orgs], "org", warnings)
    spaces_of: dict[str, list[CFSpace]] = {}
    orphan_spaces: list[str] = []
    for s in spaces:
        if isinstance(s.org_guid, str) and s.org_guid in org_names:
            spaces_of.setdefault(s.org_guid, []).append(s)
        else:
            orphan_spaces.append(str(s.guid))
    space_names: dict[str, tuple[str, bool]] = {}
    space_org: dict[str, str] = {}
    for org_guid, members in spaces_of.items():
        where = f"space of org {org_names[org_guid][0]}:"
        space_names |= _display_names([(str(s.guid), s.name) for s in members], where, warnings)
        space_org |= {str(s.guid): org_guid for s in members}
    apps_of: dict[str, list[CFApp]] = {}
    orphan_apps: list[str] = []
    for a in apps:
        if isinstance(a.space_guid, str) and a.space_guid in space_names:
            apps_of.setdefault(a.space_guid, []).append(a)
        else:
            orphan_apps.append(str(a.guid))
    app_names: dict[str, tuple[str, bool]] = {}
    for space_guid, in_space in apps_of.items():
        where = f"app in space {space_names[space_guid][0]}:"
        app_names |= _display_names([(str(a.guid), a.name) for a in in_space], where, warnings)
    if orphan_spaces:
        warnings.append(
            f"{len(orphan_spaces)} spaces belong to no org listed and are left out of the "
            f"Directory: {_summarise(sorted(orphan_spaces))}"
        )
    if orphan_apps:
        warnings.append(
            f"{len(orphan_apps)} apps belong to no space listed and are left out of the "
            f"Directory: {_summarise(sorted(orphan_apps))}"
        )

    def ordered(names: Mapping[str, tuple[str, bool]], guids: Iterable[str]) -> list[str]:
        return sorted(guids, key=lambda g: (names[g][0], g))

    files: dict[str, str] = {}
    org_guids = ordered(org_names, org_names)
    org_files = document_filenames([org_names[g][0] for g in org_guids])
    for org_guid, filename in zip(org_guids, org_files, strict=True):
        org: dict[str, Any] = {"name": org_names[org_guid][0], "guid": org_guid}
        space_list = []
        for sg in ordered(space_names, (str(s.guid) for s in spaces_of.get(org_guid, []))):
            space: dict[str, Any] = {"name": space_names[sg][0], "guid": sg}
            app_guids = ordered(app_names, (str(a.guid) for a in apps_of.get(sg, [])))
            if app_guids:
                space["apps"] = [{"name": app_names[g][0], "guid": g} for g in app_guids]
            space_list.append(space)
        if space_list:
            org["spaces"] = space_list
        doc = {"kind": "Directory", "orgs": [org]}
        files[f"{DIRECTORY_DIR}/{filename}"] = _owned(dump_documents([doc], directory_hint))

    def space_ref(guid: str) -> str:
        name, real = space_names.get(guid, ("", False))
        org_name, org_real = org_names.get(space_org.get(guid, ""), ("", False))
        return f"{org_name}/{name}" if real and org_real else guid

    imported = import_sources(
        [("/v3/security_groups", g) for g in foundation.groups], None, prefix_files=False
    )
    errors.extend(imported.errors)
    warnings.extend(imported.warnings)
    docs = sorted(imported.documents, key=lambda d: str(d.get("name")))
    for doc in docs:
        unseen: list[str] = []
        for key in ("running_spaces", "staging_spaces"):
            if key not in doc:
                continue
            refs = []
            for guid in doc[key]:
                if not isinstance(guid, str) or not _guid_ok(guid):
                    errors.append(f"{_shown(doc.get('name'))}: {key}: {_shown(guid)} is not a GUID")
                    continue
                if guid not in space_names:
                    unseen.append(guid)
                refs.append(space_ref(guid))
            doc[key] = sorted(refs)
        if unseen:
            warnings.append(
                f"{_shown(doc.get('name'))}: bound to {len(unseen)} spaces this client cannot "
                f"see, kept as GUIDs: {_summarise(sorted(set(unseen)))}"
            )
    group_files = document_filenames([str(d.get("name")) for d in docs])
    for doc, filename in zip(docs, group_files, strict=True):
        files[f"{GROUPS_DIR}/{filename}"] = _owned(dump_documents([doc], groups_hint))
    counts = {
        "orgs": len(org_names),
        "spaces": len(space_names),
        "apps": len(app_names),
        "security_groups": len(docs),
    }
    if errors:
        return Rendered({}, tuple(errors), tuple(warnings), counts)
    return Rendered(files, (), tuple(warnings), counts)


def _owned(text: str) -> str:
    return f"{MARKER}\n{text}"


# --------------------------------------------------------------------------------------------
# apply: the only writer


@dataclass(frozen=True)
class Outcome:
    """What a sync did to the output folder (paths relative to it, sorted)."""

    written: tuple[str, ...] = ()
    unchanged: int = 0
    removed: tuple[str, ...] = ()
    vanished: tuple[str, ...] = ()  # security groups gone from CF whose files remain


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _read_owned(path: Path, limit: int) -> str | None:
    """The text of `path` if it is a regular file this sync wrote (MARKER first), else None."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None  # a symlink (ELOOP), a fifo we will not block on, gone: not ours
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        data = fh.read(limit + 1)
    if not data.startswith(MARKER.encode() + b"\n"):
        return None
    if len(data) > limit:
        return ""  # ours, but larger than anything we write: rewritten
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _real_folder(path: Path, shown: str) -> None:
    """`path` exists as a real folder (created if missing), not a symlink or a file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.mkdir(mode=0o755)
        return
    if not stat.S_ISDIR(mode):
        raise SyncError(f"{shown} is not a folder (a symlink or a file); nothing was written")


def apply(out: Path, rendered: Rendered, *, prune: bool) -> Outcome:
    """Write `rendered` into `out`: changed files only, foreign files never.

    Everything is checked before the first write: a file name wanted by the sync but held
    by a file it does not own stops the sync with nothing written.
    """
    if rendered.errors:
        raise SyncError("the Cloud Controller's data cannot be written; nothing was written")
    out.mkdir(parents=True, exist_ok=True)
    _real_folder(out, str(out))
    limit = max((len(t.encode()) for t in rendered.files.values()), default=0) + 1
    owned: dict[str, str] = {}
    foreign: set[str] = set()
    for folder in (DIRECTORY_DIR, GROUPS_DIR):
        _real_folder(out / folder, str(out / folder))
        for entry in os.scandir(out / folder):
            rel = f"{folder}/{entry.name}"
            text = _read_owned(out / rel, max(limit, 16 * 1024 * 1024))
            if text is None:
                foreign.add(rel)
            else:
                owned[rel] = text
    taken = sorted(rel for rel in rendered.files if rel in foreign)
    if taken:
        raise SyncError(
            "these files were not written by `asgctl cf sync` and hold names it needs: "
            + ", ".join(str(out / rel) for rel in taken)
            + "; move them away (or sync into another folder); nothing was written"
        )
    base = out.resolve()
    written: list[str] = []
    unchanged = 0
    for rel in sorted(rendered.files):
        target = out / rel
        if target.resolve().parent != (base / rel).parent:
            raise SyncError(f"{rel}: would be written outside {out}; nothing more was written")
        text = rendered.files[rel]
        if owned.get(rel) == text:
            unchanged += 1
            continue
        atomic_write_text(target, text, mode=0o644)
        written.append(rel)
    removed: list[str] = []
    vanished: list[str] = []
    for rel in sorted(set(owned) - set(rendered.files)):
        if rel.startswith(f"{GROUPS_DIR}/"):
            vanished.append(rel)
            if not prune:
                continue
        (out / rel).unlink()
        removed.append(rel)
    return Outcome(tuple(written), unchanged, tuple(removed), tuple(vanished))


def schema_hints(out: Path) -> tuple[str | None, str | None]:
    """The schema comments for the Directory and group files under `out`."""
    return (
        schema_comment_for(out / DIRECTORY_DIR),
        schema_comment_for(out / GROUPS_DIR),
    )
