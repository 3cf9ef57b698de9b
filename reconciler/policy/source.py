"""Reading the policy files of a repository: from a folder, or from any git revision.

The git path reads blobs straight from the object database (no checkout, no working tree), so
CI can load base and head of a pull request side by side and the agent can compile exactly the
commit it fetched.  Both paths apply the same rules: only `*.yaml`/`*.yml`, sizes checked
before reading, and symlinks followed only while they stay inside the policy tree, since a
link to `/etc/...` in a pull request must not become policy.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from reconciler.policy.yamlsafe import DEFAULT_LIMITS, Limits, LoadError

YAML_SUFFIXES = (".yaml", ".yml")
_MAX_LINK_HOPS = 8


@dataclass(frozen=True)
class SourceFile:
    """A policy file's repository-relative path and raw bytes."""

    path: str
    data: bytes


def read_folder(root: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> list[SourceFile]:
    """Every YAML file under `root`, sorted by path; errors for escaping links and huge files."""
    base = Path(root)
    if not base.exists():
        raise LoadError(str(root), "no such file or directory")
    if base.is_file():
        return [_read_file(base, base.name, base.parent.resolve(), limits)]
    real_root = base.resolve()
    found: list[SourceFile] = []
    errors: list[LoadError] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(YAML_SUFFIXES):
                continue
            full = Path(dirpath, name)
            rel = full.relative_to(base).as_posix()
            if len(found) + len(errors) >= limits.max_files:
                raise LoadError(rel, f"more than {limits.max_files} policy files")
            try:
                found.append(_read_file(full, rel, real_root, limits))
            except LoadError as exc:
                errors.append(exc)
        for d in list(dirnames):
            full = Path(dirpath, d)
            if full.is_symlink():
                rel = full.relative_to(base).as_posix()
                target = full.resolve()
                if not target.is_relative_to(real_root):
                    errors.append(
                        LoadError(rel, f"symlink points outside the policy tree ({target})")
                    )
                dirnames.remove(d)
    if errors:
        raise LoadErrors(errors)
    return found


def _read_file(full: Path, rel: str, real_root: Path, limits: Limits) -> SourceFile:
    if full.is_symlink():
        target = full.resolve()
        if not target.is_relative_to(real_root):
            raise LoadError(rel, f"symlink points outside the policy tree ({target})")
    try:
        size = full.stat().st_size
    except OSError as exc:
        raise LoadError(rel, f"cannot read: {exc.strerror}") from None
    if size > limits.max_file_bytes:
        raise LoadError(
            rel, f"file is {size} bytes, over the limit of {limits.max_file_bytes} bytes"
        )
    try:
        return SourceFile(rel, full.read_bytes())
    except OSError as exc:
        raise LoadError(rel, f"cannot read: {exc.strerror}") from None


class LoadErrors(LoadError):
    """Several files failed to load; all are reported, not just the first."""

    def __init__(self, errors: list[LoadError]):
        super().__init__(errors[0].file, errors[0].message, errors[0].line, errors[0].col)
        self.errors = errors


def read_git(
    repo: str | os.PathLike[str],
    rev: str,
    subdir: str = "",
    limits: Limits = DEFAULT_LIMITS,
) -> list[SourceFile]:
    """Every YAML file under `subdir` at `rev`, read from git objects without a checkout."""
    import git  # gitpython is slow to import; only git-reading paths pay for it

    try:
        repository = git.Repo(repo, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise LoadError(str(repo), "not a git repository") from None
    try:
        commit = repository.commit(rev)
    except (git.BadName, ValueError, git.GitCommandError):
        raise LoadError(str(repo), f"unknown revision {rev!r}") from None
    tree = commit.tree
    prefix = subdir.strip("/")
    if prefix:
        try:
            tree = tree / prefix
        except KeyError:
            raise LoadError(prefix, f"no such folder at {rev}") from None
        if tree.type != "tree":
            tree = None
    found: list[SourceFile] = []
    errors: list[LoadError] = []
    blobs = [commit.tree / prefix] if tree is None else list(tree.traverse())
    for item in sorted(blobs, key=lambda b: b.path):
        if item.type != "blob" or not item.path.endswith(YAML_SUFFIXES):
            continue
        rel = posixpath.relpath(item.path, prefix) if prefix and tree is not None else item.path
        if len(found) + len(errors) >= limits.max_files:
            raise LoadError(rel, f"more than {limits.max_files} policy files")
        try:
            blob = _follow_link(commit.tree, item, prefix, rel)
            if blob.size > limits.max_file_bytes:
                raise LoadError(
                    rel,
                    f"file is {blob.size} bytes, over the limit of {limits.max_file_bytes} bytes",
                )
            found.append(SourceFile(rel, blob.data_stream.read()))
        except LoadError as exc:
            errors.append(exc)
    if errors:
        raise LoadErrors(errors)
    return found


def _follow_link(root_tree, blob, prefix: str, rel: str):  # type: ignore[no-untyped-def]
    """A symlink blob's target, if it stays inside the policy folder at the same revision."""
    hops = 0
    while blob.mode == 0o120000:
        hops += 1
        if hops > _MAX_LINK_HOPS:
            raise LoadError(rel, "too many levels of symbolic links")
        target = blob.data_stream.read().decode("utf-8", "replace")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(blob.path), target))
        inside = prefix == "" or joined == prefix or joined.startswith(prefix + "/")
        if target.startswith("/") or joined.startswith("..") or not inside:
            raise LoadError(rel, f"symlink points outside the policy tree ({target})")
        try:
            blob = root_tree / joined
        except KeyError:
            raise LoadError(rel, f"symlink target {target} does not exist") from None
        if blob.type != "blob":
            raise LoadError(rel, f"symlink target {target} is not a file")
    return blob
