"""Load and validate a policy repository: the entry points the CLI, CI plan and agent share."""

from __future__ import annotations

import os

from reconciler.core.model import Location, PolicySet
from reconciler.policy.findings import Finding
from reconciler.policy.source import (
    LoadErrors,
    SourceFile,
    locate,
    read_folder,
    read_git,
    require_real_folder,
)
from reconciler.policy.validate import Result, validate_documents
from reconciler.policy.yamlsafe import (
    DEFAULT_LIMITS,
    Budget,
    Document,
    Limits,
    LoadError,
    ParseCache,
    load_yaml,
)


def _load_error_findings(exc: LoadError) -> list[Finding]:
    errors = exc.errors if isinstance(exc, LoadErrors) else [exc]
    return [Finding.at(Location(e.file, e.line or 1, e.col or 1), e.message) for e in errors]


def parse_files(
    files: list[SourceFile], limits: Limits = DEFAULT_LIMITS, cache: ParseCache | None = None
) -> Result:
    """Parse and validate already-read files; a file that fails to parse is one finding.

    The files are one load: one budget of bytes and values spans them all.  With a `cache`
    shared by several loads (revisions of one repository), each distinct file is parsed and
    schema-checked once; the budget is charged as if it were parsed again.
    """
    docs: list[Document] = []
    findings: list[Finding] = []
    budget = Budget(limits)
    for f in files:
        try:
            docs.extend(load_yaml(f.path, f.data, limits, budget, cache))
        except LoadError as exc:
            findings.extend(_load_error_findings(exc))
    result = validate_documents(docs, cache)
    if not findings:
        return result
    return Result(result.policy, tuple(sorted(set(findings) | set(result.findings))))


def load_folder(
    path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS, cache: ParseCache | None = None
) -> Result:
    """Validate the policy files under a folder (or one file)."""
    try:
        files = read_folder(path, limits)
    except LoadError as exc:
        return Result(PolicySet(), tuple(_load_error_findings(exc)))
    return parse_files(files, limits, cache)


def load_revision(
    repo: str | os.PathLike[str],
    rev: str,
    subdir: str = "policies",
    limits: Limits = DEFAULT_LIMITS,
    cache: ParseCache | None = None,
) -> Result:
    """Validate the policy files of `subdir` at a git revision, without a checkout."""
    try:
        files = read_git(repo, rev, subdir, limits)
    except LoadError as exc:
        return Result(PolicySet(), tuple(_load_error_findings(exc)))
    return parse_files(files, limits, cache)


def load_policy(
    path: str | os.PathLike[str] = "policies",
    rev: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    cache: ParseCache | None = None,
) -> Result:
    """The policy folder `path` as it is on disk, or as it was at `rev` in its git repo.

    Several loads in one process (a plan's revisions) share a `cache` of parsed files."""
    if rev is None:
        return load_folder(path, limits, cache)
    place = locate(path)
    if place.top is None:
        return Result(
            PolicySet(), (Finding.at(Location(str(path), 1, 1), "not in a git repository"),)
        )
    try:
        # The repository is found on disk before the folder is read from git: a link on the
        # way could lead into another repository, so it is refused as the disk reader does.
        require_real_folder(place, str(path))
    except LoadError as exc:
        return Result(PolicySet(), tuple(_load_error_findings(exc)))
    return load_revision(place.top, rev, place.folder, limits, cache)
