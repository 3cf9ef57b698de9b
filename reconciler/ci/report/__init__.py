"""Presentations of plans and policy tests (markdown for PRs, text for terminals, JSON)."""

from reconciler.ci.report.plan import (
    COMMENT_LIMIT,
    MARKER,
    PlanReport,
    Revision,
    render,
    render_json,
    render_markdown,
    render_text,
    summary_line,
)

__all__ = [
    "COMMENT_LIMIT",
    "MARKER",
    "PlanReport",
    "Revision",
    "render",
    "render_json",
    "render_markdown",
    "render_text",
    "summary_line",
]
