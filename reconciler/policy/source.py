"""Reading the policy files of a repository: one reader, from a folder or from a git revision.

CI validates a pull request and the cells apply the merged commit, so both must read the same
files with the same rules, or what was reviewed is not what runs.  Each side only LISTS its
tree (the disk with `lstat`, never following a link; git from the commit's tree objects) into
the same `Listing`; which files are policy, and where each symlink leads, is then decided by
one pure function (`policy_files`) for both.  The rules:

* The policy folder must be a real folder of the repository: if it, or any folder between the
  repository's top and it, is a symlink, nothing is read (a PR that replaces `policies/` with
  a link to `/etc` would otherwise have every YAML file there validated and echoed).
* Names starting with `.` are not part of the policy tree, from disk and from git alike: they
  are not listed, not walked into and not reachable through a link.  (`.git` and editor
  droppings live there; a tree that CI skips must not be one the cells apply.)
* A `*.yaml`/`*.yml` name is a policy file.  If it is a symlink, it is resolved component by
  component as the kernel resolves it (a link to a folder is followed where it stands, and a
  `..` after it climbs from where it led), at most 8 links deep, and must end on a regular file
  without ever leaving the policy folder, even to come back.  Absolute links, links out of the
  folder, dangling links, loops and links through hidden names are findings.  Git's own
  lexical reading (`d/../a` is `a`) is never used: it disagrees with the kernel when `d` is a
  link.
* Entries with other names are never read: a symlink to a folder is not walked (on disk or in
  git), and a nested repository (a submodule, or a folder holding `.git`) is not part of the
  tree.
* Sizes and counts are budgeted before anything is read (`yamlsafe.Limits`/`Budget`), files
  are opened without following links (O_NOFOLLOW at every component), and a finding names
  the file and the link's own text, never anything read from outside.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from reconciler.policy.yamlsafe import DEFAULT_LIMITS, Budget, Limits, LoadError
from reconciler.sources import gitio

YAML_SUFFIXES = (".yaml", ".yml")
MAX_LINK_HOPS = 8  # Linux follows 40; policy needs a handful, and loops should fail fast
_MAX_LINK_TEXT = 4096  # PATH_MAX: a "link" blob longer than this cannot be checked out

EntryKind = Literal["file", "dir", "link", "other"]


@dataclass(frozen=True)
class SourceFile:
    """A policy file's path relative to the policy folder, and its raw bytes."""

    path: str
    data: bytes


@dataclass(frozen=True)
class Entry:
    """One listed name: a regular file, a folder, a symlink (with its text), or other.

    `other` is anything that is not a plain file, folder or link: a fifo or device on disk,
    a submodule in git, a nested repository on disk, a link blob too long to be a link.
    """

    kind: EntryKind
    target: str = ""


Listing = Mapping[str, Entry]  # "groups/web.yaml" -> Entry, relative to the policy folder


class LoadErrors(LoadError):
    """Several files failed to load; all are reported, not just the first."""

    def __init__(self, errors: list[LoadError]):
        super().__init__(errors[0].file, errors[0].message, errors[0].line, errors[0].col)
        self.errors = errors


# --- where the policy folder is -------------------------------------------------------------


@dataclass(frozen=True)
class RepoPlace:
    """Where a policy folder sits: its git work tree (if any) and its path inside it.

    `link` names the first symlinked folder between the repository's top and the policy
    folder (or the folder itself, outside git): such a folder is refused, from disk and git.
    """

    top: Path | None
    folder: str  # e.g. "policies"; "" for the repository root
    link: str | None = None

    @property
    def prefix(self) -> str:
        """What to put before a policy-relative file name to get a repository path."""
        return f"{self.folder}/" if self.folder else ""


def locate(path: str | os.PathLike[str]) -> RepoPlace:
    """Find the git work tree holding `path` without following links below its top.

    The path is made absolute lexically (the caller's own `..` is the caller's) and `.git` is
    looked for in its ancestors; the nearest is the top.  A symlink between the top and the
    path is reported in `link`.  So is a symlink that an enclosing repository tracks on the
    way to the top: a pull request's `policies -> /elsewhere/some-repo` makes that other
    repository look like the top.  (A link the enclosing repository does not track, such as
    `~/src -> /data/src` under a home-directory dotfiles repository, is the operator's own.)
    """
    absolute = Path(os.path.abspath(path))
    chain = [absolute, *absolute.parents]
    repos = [a for a in chain if os.path.lexists(a / ".git")]
    if not repos:
        link = absolute.name if absolute.is_symlink() else None
        return RepoPlace(None, Path(path).as_posix().rstrip("/"), link)
    top = repos[0]
    folder = absolute.relative_to(top).as_posix()
    place = RepoPlace(top, "" if folder == "." else folder)
    below = [a for a in chain if a != top and a.is_relative_to(top) and a.is_symlink()]
    if below:
        return replace(place, link=below[-1].relative_to(top).as_posix())
    for outer in repos[1:]:
        crossing = [
            a
            for a in chain
            if a != outer and a.is_relative_to(outer) and top.is_relative_to(a) and a.is_symlink()
        ]
        for a in reversed(crossing):
            if gitio.tracks(outer, a.relative_to(outer).as_posix()):
                return replace(place, link=a.relative_to(outer).as_posix())
    return place


def require_real_folder(place: RepoPlace, shown: str) -> None:
    """Refuse a policy folder reached through a symlink: nothing below it is read."""
    if place.link is not None:
        raise LoadError(
            shown,
            f"the policy folder goes through a symlink ({_clip(place.link)}); it must be a "
            "folder of the repository, so nothing was read",
        )


# --- the one set of rules -------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    """Names starting with `.` are not part of the policy tree (see the module docstring)."""
    return name.startswith(".")


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_link(listing: Listing, path: str) -> str:
    """The regular file the symlink at `path` leads to, resolved as the kernel would.

    Walks the link's text one component at a time from the link's folder: `.` stays, `..`
    climbs (never above the policy folder), a folder descends, a link splices its own text in
    where it stands.  Refused: absolute links, leaving the folder, hidden names, missing
    names, a file used as a folder, more than MAX_LINK_HOPS links, ending on a non-file.
    """
    text = listing[path].target
    shown = _clip(text)
    outside = LoadError(path, f"symlink points outside the policy tree ({shown})")
    # The same question asked lexically first, only for a clearer message: a target whose
    # `..` climb out of the folder is "outside" even when a name on the way is missing.
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(path), text))
    if text.startswith("/") or lexical == ".." or lexical.startswith("../"):
        raise outside
    done: list[str] = []
    todo = path.split("/")
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise outside
            done.pop()
            continue
        if is_hidden(part):
            raise LoadError(path, f"symlink goes through a hidden name ({shown})")
        here = "/".join([*done, part])
        entry = listing.get(here)
        if entry is None:
            raise LoadError(path, f"symlink target {shown} does not exist")
        if entry.kind == "link":
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise LoadError(path, "too many levels of symbolic links")
            if not entry.target or entry.target.startswith("/"):
                raise outside
            todo = [*entry.target.split("/"), *todo]
            continue
        if todo and entry.kind != "dir":
            raise LoadError(path, f"symlink target {shown} is not a file")
        done.append(part)
    resolved = "/".join(done)
    if listing.get(resolved, Entry("dir")).kind != "file":
        raise LoadError(path, f"symlink target {shown} is not a file")
    return resolved


def policy_files(
    listing: Listing, limits: Limits = DEFAULT_LIMITS
) -> tuple[list[tuple[str, str]], list[LoadError]]:
    """The policy files of a listing as (name, file to read), sorted; and what was refused."""
    chosen: list[tuple[str, str]] = []
    errors: list[LoadError] = []
    for name in sorted(listing):
        if not name.endswith(YAML_SUFFIXES):
            continue
        if len(chosen) + len(errors) >= limits.max_files:
            raise LoadError(name, f"more than {limits.max_files} policy files")
        entry = listing[name]
        try:
            if entry.kind == "link":
                chosen.append((name, resolve_link(listing, name)))
            elif entry.kind == "file":
                chosen.append((name, name))
            elif entry.kind == "other":
                errors.append(LoadError(name, "not a regular file, a folder or a symlink"))
        except LoadError as exc:
            errors.append(exc)
    return chosen, errors


def _read_all(
    listing: Listing, read: Callable[[str, str, Budget], bytes], limits: Limits
) -> list[SourceFile]:
    chosen, errors = policy_files(listing, limits)
    budget = Budget(limits)
    found: list[SourceFile] = []
    for name, real in chosen:
        try:
            found.append(SourceFile(name, read(real, name, budget)))
        except LoadError as exc:
            errors.append(exc)
    if errors:
        raise LoadErrors(sorted(errors, key=lambda e: e.file))
    return found


class _Counter:
    """Counts listed entries, so a tree of a million names is refused, not walked."""

    def __init__(self, limits: Limits):
        self.limit = limits.max_tree_entries
        self.count = 0

    def add(self, name: str) -> None:
        self.count += 1
        if self.count > self.limit:
            raise LoadError(name, f"more than {self.limit} entries below the policy folder")


# --- from disk ------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def read_folder(root: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[SourceFile]:
    """Every policy file under `root` on disk (or `root` itself, a file), by the rules above."""
    require_real_folder(locate(root), str(root))
    base = Path(root)
    try:
        mode = os.lstat(base).st_mode
    except FileNotFoundError:
        raise LoadError(str(root), "no such file or directory") from None
    except OSError as exc:
        raise LoadError(str(root), f"cannot read: {exc.strerror}") from None
    if stat.S_ISREG(mode):
        data = _read_disk(base.parent, base.name, base.name, Budget(limits))
        return [SourceFile(base.name, data)]
    if not stat.S_ISDIR(mode):
        raise LoadError(str(root), "not a folder or a regular file")
    listing = _disk_listing(base, limits)
    return _read_all(listing, lambda real, name, b: _read_disk(base, real, name, b), limits)


def _disk_listing(base: Path, limits: Limits) -> dict[str, Entry]:
    listing: dict[str, Entry] = {}
    counter = _Counter(limits)
    pending = [("", base)]
    while pending:
        rel, folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            raise LoadError(rel or ".", f"cannot list: {exc.strerror}") from None
        for de in entries:
            if is_hidden(de.name):
                continue
            name = f"{rel}/{de.name}" if rel else de.name
            counter.add(name)
            if de.is_symlink():
                listing[name] = Entry("link", os.readlink(de.path))
            elif de.is_dir(follow_symlinks=False):
                if os.path.lexists(os.path.join(de.path, ".git")):
                    listing[name] = Entry("other")  # a nested repository: git lists a commit
                else:
                    listing[name] = Entry("dir")
                    pending.append((name, Path(de.path)))
            elif de.is_file(follow_symlinks=False):
                listing[name] = Entry("file")
            else:
                listing[name] = Entry("other")
    return listing


def _read_disk(base: Path, real: str, name: str, budget: Budget) -> bytes:
    """Open `real` below `base` one component at a time, never following a link."""
    fds: list[int] = []
    try:
        fds.append(os.open(base, _DIR_FLAGS))
        *folders, leaf = real.split("/")
        for part in folders:
            fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
        fd = os.open(leaf, _FILE_FLAGS, dir_fd=fds[-1])
        fds.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError(name, "not a regular file")
        budget.spend_bytes(name, info.st_size)
        chunks: list[bytes] = []
        left = budget.limits.max_file_bytes + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > budget.limits.max_file_bytes:
            raise LoadError(name, f"file is over the limit of {budget.limits.max_file_bytes} bytes")
        return data
    except OSError as exc:
        raise LoadError(name, f"cannot read: {exc.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


# --- from git -------------------------------------------------------------------------------


def read_git(
    repo: str | os.PathLike[str],
    rev: str,
    subdir: str = "",
    limits: Limits = DEFAULT_LIMITS,
) -> list[SourceFile]:
    """Every policy file under `subdir` at `rev`, from git objects without a checkout.

    Trees are read one at a time through one `git cat-file` process (`gitio.BlobReader`),
    only those below non-hidden names, and each blob's size is asked before it is read.
    """
    git_dir = gitio.git_dir_of(repo)
    if git_dir is None:
        raise LoadError(str(repo), "not a git repository")
    sha = gitio.resolve_commit(git_dir, rev)
    if sha is None:
        raise LoadError(str(repo), f"unknown revision {rev!r}")
    with gitio.BlobReader(git_dir) as reader:
        try:
            return _read_git(reader, sha, rev, subdir, limits)
        except OSError as exc:
            raise LoadError(str(repo), f"cannot read {rev!r}: {exc}") from None


def _read_git(
    reader: gitio.BlobReader, sha: str, rev: str, subdir: str, limits: Limits
) -> list[SourceFile]:
    root = reader.info(f"{sha}^{{tree}}")
    if root is None:
        raise LoadError(rev, "the commit has no tree")
    prefix = subdir.strip("/")
    node = gitio.TreeEntry("", 0o040000, root.oid)
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        child = _git_child(reader, node, part) if node.type == "tree" else None
        if child is not None and _git_kind(child) == "link":
            require_real_folder(RepoPlace(None, prefix, "/".join(parts[: i + 1])), prefix)
        if child is None or (child.type != "tree" and i < len(parts) - 1):
            raise LoadError(prefix, f"no such folder at {rev}")
        node = child
    if node.type == "blob":
        if _git_kind(node) != "file":
            raise LoadError(prefix, "not a folder or a regular file")
        return [SourceFile(parts[-1], _read_blob(reader, node, parts[-1], Budget(limits)))]
    if node.type != "tree":
        raise LoadError(prefix, "not a folder or a regular file")
    listing, blobs = _git_listing(reader, node, limits)
    return _read_all(
        listing, lambda real, name, b: _read_blob(reader, blobs[real], name, b), limits
    )


def _git_child(
    reader: gitio.BlobReader, tree: gitio.TreeEntry, name: str
) -> gitio.TreeEntry | None:
    for item in reader.tree(tree.oid):
        if item.name == name:
            return item
    return None


def _git_kind(item: gitio.TreeEntry) -> EntryKind:
    if item.type == "tree":
        return "dir"
    if item.type != "blob":
        return "other"  # a submodule's commit
    if stat.S_ISLNK(item.mode):
        return "link"
    return "file" if stat.S_ISREG(item.mode) else "other"


def _git_listing(
    reader: gitio.BlobReader, tree: gitio.TreeEntry, limits: Limits
) -> tuple[dict[str, Entry], dict[str, gitio.TreeEntry]]:
    """The tree as a Listing, and each regular file's blob (looked up by path once, here)."""
    listing: dict[str, Entry] = {}
    blobs: dict[str, gitio.TreeEntry] = {}
    counter = _Counter(limits)
    pending: list[tuple[str, gitio.TreeEntry]] = [("", tree)]
    while pending:
        rel, folder = pending.pop()
        for item in reader.tree(folder.oid):
            if is_hidden(item.name):
                continue
            name = f"{rel}/{item.name}" if rel else item.name
            counter.add(name)
            kind = _git_kind(item)
            if kind == "link":
                info = reader.info(item.oid)
                if info is None or info.size > _MAX_LINK_TEXT:
                    listing[name] = Entry("other")
                    continue
                text = reader.read(info.oid).decode("utf-8", "surrogateescape")
                listing[name] = Entry("link", text)
            else:
                listing[name] = Entry(kind)
                if kind == "dir":
                    pending.append((name, item))
                elif kind == "file":
                    blobs[name] = item
    return listing, blobs


def _read_blob(reader: gitio.BlobReader, blob: gitio.TreeEntry, name: str, budget: Budget) -> bytes:
    info = reader.info(blob.oid)
    if info is None or info.type != "blob":
        raise LoadError(name, "cannot be read from git")
    budget.spend_bytes(name, info.size)
    return reader.read(info.oid)
