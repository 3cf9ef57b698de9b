"""`kind: Rollout`: one per repository, its waves, pause and windows read with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.policy.load import load_folder
from tests.policyrepo import write_tree

ROLLOUT = """
    kind: Rollout
    name: fleet
    waves:
      - name: canary
        cells: ["canary-*"]
        soak: 10m
      - name: half
        cells: ["cell-[0-4]*"]
        soak: 1h30m
    windows:
      - schedule: "0 22 * * mon-fri"
        duration: 2h
        kind: allow
      - schedule: "0 0 20 dec *"
        duration: 14d
        kind: deny
        description: year-end freeze
    """


def load(tmp_path: Path, files: dict[str, str]):  # type: ignore[no-untyped-def]
    write_tree(tmp_path, files)
    return load_folder(tmp_path)


def test_a_rollout_document_is_part_of_the_policy(tmp_path: Path) -> None:
    result = load(tmp_path, {"rollout.yaml": ROLLOUT})
    assert result.ok and result.findings == ()
    r = result.policy.rollout
    assert r is not None
    assert [(w.name, w.cells, w.soak) for w in r.waves] == [
        ("canary", ("canary-*",), 600.0),
        ("half", ("cell-[0-4]*",), 5400.0),
    ]
    assert [(c.window.cron.text, c.window.duration, c.window.kind) for c in r.windows] == [
        ("0 22 * * mon-fri", 7200.0, "allow"),
        ("0 0 20 dec *", 14 * 86400.0, "deny"),
    ]
    assert (r.pause, r.pinned, r.halt) == (False, None, ("NotReady",))
    assert r.windows[1].description == "year-end freeze"


@pytest.mark.parametrize(
    ("pause", "expected"),
    [
        ("true", (True, None)),
        ("false", (False, None)),
        ("{revision: " + "ab" * 20 + "}", (True, "ab" * 20)),
    ],
)
def test_pause_is_a_flag_or_a_pinned_revision(
    tmp_path: Path, pause: str, expected: tuple[bool, str | None]
) -> None:
    result = load(tmp_path, {"r.yaml": f"kind: Rollout\nname: r\npause: {pause}\n"})
    assert result.ok, result.findings
    assert result.policy.rollout is not None
    assert (result.policy.rollout.pause, result.policy.rollout.pinned) == expected


def test_a_second_rollout_is_an_error_naming_both_files_and_lines(tmp_path: Path) -> None:
    result = load(
        tmp_path,
        {
            "a.yaml": ROLLOUT,
            "b/more.yaml": "kind: SecurityGroup\nname: x\nrules: []\n---\n"
            "kind: Rollout\nname: other\n",
        },
    )
    assert not result.ok
    assert [str(f) for f in result.errors] == [
        "b/more.yaml:5:7: Rollout/other: kind: a repository has at most one Rollout: this one "
        "(b/more.yaml:5) and the one at a.yaml:1"
    ]
    assert result.policy.rollout is None  # never one of the two, picked at random


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            "waves: [{name: a, cells: [x], soak: 5 minutes}]",
            "r.yaml:3:37: Rollout/r: waves[0].soak: expected a duration such as 30s, 10m or 2h,"
            " got '5 minutes'",
        ),
        (
            "waves: [{name: a, cells: [x]}, {name: a, cells: [y]}]",
            "r.yaml:3:39: Rollout/r: waves[1].name: wave 'a' is already waves[0]",
        ),
        (
            'windows: [{schedule: "0 25 * * *", duration: 1h, kind: deny}]',
            "r.yaml:3:22: Rollout/r: windows[0].schedule: hour: 25 is outside 0-23",
        ),
        (
            'windows: [{schedule: "0 0 30 feb *", duration: 1h, kind: allow}]',
            "r.yaml:3:22: Rollout/r: windows[0].schedule: '0 0 30 feb *' never matches "
            "(no month has such a day)",
        ),
        (
            'windows: [{schedule: "0 0 * * *", duration: 40d, kind: allow}]',
            "r.yaml:3:45: Rollout/r: windows[0].duration: a window lasts from 1m to 31 days",
        ),
        (
            'windows: [{schedule: "0 0 * * *", duration: 1h, kind: maybe}]',
            "r.yaml:3:55: Rollout/r: windows[0].kind: 'maybe' is not one of ['allow', 'deny']",
        ),
        ("pause: {revision: main}", "r.yaml:3:8: Rollout/r: pause: {'revision': 'main'} is not"),
        ("halt: [DeniedFlowJump]", "r.yaml:3:8: Rollout/r: halt[0]: 'DeniedFlowJump' is not"),
    ],
)
def test_bad_rollout_documents_name_file_line_and_field(
    tmp_path: Path, doc: str, expected: str
) -> None:
    result = load(tmp_path, {"r.yaml": f"kind: Rollout\nname: r\n{doc}\n"})
    assert not result.ok
    assert str(result.errors[0]).startswith(expected), result.errors
    assert result.policy.rollout is None
