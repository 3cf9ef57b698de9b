"""Golden files: rendered output compared with reference files kept in the repo.

A mismatch fails with a unified diff and writes the actual output beside the reference
(`<name>.actual`, git-ignored); `UPDATE_GOLDEN=1 make test` rewrites the references.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN_DIR / name
    actual_path = path.with_name(path.name + ".actual")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        actual_path.unlink(missing_ok=True)
        return
    if not path.exists():
        actual_path.parent.mkdir(parents=True, exist_ok=True)
        actual_path.write_text(actual, encoding="utf-8")
        pytest.fail(f"golden file {path} is missing; actual output written to {actual_path}")
    expected = path.read_text(encoding="utf-8")
    if expected == actual:
        actual_path.unlink(missing_ok=True)
        return
    actual_path.write_text(actual, encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=str(path),
            tofile=str(actual_path),
        )
    )
    pytest.fail(f"output differs from golden file {path.name}:\n{diff}", pytrace=False)
