"""Load and validate a policy repository: the entry points the CLI, CI plan and agent share."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.model import Location, PolicySet
from reconciler.policy.findings import Finding
from reconciler.policy.source import LoadErrors, SourceFile, read_folder, read_git
from reconciler.policy.validate import Result, validate_documents
from reconciler.policy.yamlsafe import (
    DEFAULT_LIMITS,
    Document,
    Limits,
    LoadError,
    decode,
    load_documents,
)


def _load_error_findings(exc: LoadError) -> list[Finding]:
    errors = exc.errors if isinstance(exc, LoadErrors) else [exc]
    return [Finding.at(Location(e.file, e.line or 1, e.col or 1), e.message) for e in errors]


def parse_files(files: list[SourceFile], limits: Limits = DEFAULT_LIMITS) -> Result:
    """Parse and validate already-read files; a file that fails to parse is one finding."""
    docs: list[Document] = []
    findings: list[Finding] = []
    for f in files:
        try:
            docs.extend(load_documents(f.path, decode(f.path, f.data, limits), limits))
        except LoadError as exc:
            findings.extend(_load_error_findings(exc))
    result = validate_documents(docs)
    if not findings:
        return result
    return Result(result.policy, tuple(sorted(set(findings) | set(result.findings))))


def load_folder(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Result:
    """Validate the policy files under a folder (or one file)."""
    try:
        files = read_folder(path, limits)
    except LoadError as exc:
        return Result(PolicySet(), tuple(_load_error_findings(exc)))
    return parse_files(files, limits)


def load_revision(
    repo: str | os.PathLike[str],
    rev: str,
    subdir: str = "policies",
    limits: Limits = DEFAULT_LIMITS,
) -> Result:
    """Validate the policy files of `subdir` at a git revision, without a checkout."""
    try:
        files = read_git(repo, rev, subdir, limits)
    except LoadError as exc:
        return Result(PolicySet(), tuple(_load_error_findings(exc)))
    return parse_files(files, limits)


def repo_location(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The git work tree holding `path`, and `path` relative to it; None outside git.

    Finding paths are relative to the policy folder; code hosts want them relative to the
    repository, so annotations land on the right file of a pull request.
    """
    import git

    target = Path(path).resolve()
    probe = target if target.is_dir() else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        top = Path(git.Repo(probe, search_parent_directories=True).working_tree_dir or probe)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    top = top.resolve()
    return top, target.relative_to(top).as_posix() if target != top else ""


def load_policy(
    path: str | os.PathLike[str] = "policies",
    rev: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result:
    """The policy folder `path` as it is on disk, or as it was at `rev` in its git repo."""
    if rev is None:
        return load_folder(path, limits)
    where = repo_location(path)
    if where is None:
        return Result(
            PolicySet(), (Finding.at(Location(str(path), 1, 1), "not in a git repository"),)
        )
    top, subdir = where
    return load_revision(top, rev, subdir, limits)
