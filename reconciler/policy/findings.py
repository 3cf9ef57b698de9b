"""Validation findings and their three presentations (text, JSON, GitHub annotations)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

from reconciler.core.model import Location
from reconciler.policy.yamlsafe import FieldPath

Severity = Literal["error", "warning"]


def field_path(path: FieldPath) -> str:
    """`('rules', 0, 'destination')` -> `rules[0].destination`, the form findings use."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(frozen=True, order=True)
class Finding:
    """One problem in a policy repo, pinned to the file, line and field that caused it."""

    file: str
    line: int
    col: int
    severity: Severity
    kind: str
    name: str
    field: str
    message: str

    @classmethod
    def at(
        cls,
        loc: Location,
        message: str,
        *,
        kind: str = "",
        name: str = "",
        field: str = "",
        severity: Severity = "error",
    ) -> Finding:
        return cls(loc.file, loc.line, loc.col, severity, kind, name, field, message)

    @property
    def subject(self) -> str:
        if self.kind and self.name:
            return f"{self.kind}/{self.name}"
        return self.kind

    def __str__(self) -> str:
        """One line, whatever the policy said: names and values quoted in messages come from
        pull requests, and a raw newline or escape sequence in them would forge extra lines
        (a fake `0 errors`) in CI logs or rewrite the terminal."""
        parts = [f"{self.file}:{self.line}:{self.col}"]
        if self.subject:
            parts.append(self.subject)
        if self.field:
            parts.append(self.field)
        message = self.message if self.severity == "error" else f"warning: {self.message}"
        from reconciler.escape import visible  # reconciler.ci.report imports this module

        return visible(": ".join([*parts, message]))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def github(self, prefix: str = "") -> str:
        """A workflow command, so the finding shows on the pull request's diff line.

        `prefix` is the policy folder's path in the repository: GitHub wants file paths
        relative to the repository root.  The file name, subject and message come from the
        pull request: each is escaped for its place in the command, so none can end it early
        or start another.
        """
        from reconciler.escape import gh_data, gh_property

        level = "error" if self.severity == "error" else "warning"
        title = ": ".join(p for p in (self.subject, self.field) if p) or "asgctl"
        file = f"{prefix.rstrip('/')}/{self.file}" if prefix else self.file
        return (
            f"::{level} file={gh_property(file)},line={self.line},col={self.col},"
            f"title={gh_property(title)}::{gh_data(self.message)}"
        )


def render_findings(
    findings: list[Finding] | tuple[Finding, ...], fmt: str, prefix: str = ""
) -> str:
    """Findings as `text` (one per line, then a count), `json` or `github` annotations.

    `prefix` (github only) is prepended to file paths to make them repository-relative.
    """
    ordered = sorted(findings)
    if fmt == "json":
        errors = sum(1 for f in ordered if f.severity == "error")
        doc = {
            "valid": errors == 0,
            "errors": errors,
            "warnings": len(ordered) - errors,
            "findings": [f.to_dict() for f in ordered],
        }
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "github":
        return "".join(f.github(prefix) + "\n" for f in ordered)
    from reconciler.escape import log_text

    lines = [str(f) for f in ordered]
    errors = sum(1 for f in ordered if f.severity == "error")
    warnings = len(ordered) - errors
    lines.append(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
    return log_text("\n".join(lines) + "\n")
