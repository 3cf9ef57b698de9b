"""docs/reliability.md's figures are the records of the last `make soak`, not typed in."""

from __future__ import annotations

import pytest

from bench import reliability_report as report
from tests.faultkit import Checks


def test_the_page_says_what_the_records_say() -> None:
    assert report.main(["--check"]) == 0, "run: python bench/reliability_report.py"


def test_every_figure_comes_from_a_record() -> None:
    """Change one count in one record: the generated page changes with it."""
    records = report.load_records()
    base = report.render(records, None)
    bumped = [dict(r) for r in records]
    bumped[0]["violations"] = report.violations_of(bumped[0]) + 1
    assert report.render(bumped, None) != base
    assert "| violations counted | 1 |" in report.render(
        [{**r, "violations": 0} for r in records[1:]] + [{**records[0], "violations": 1}], None
    )


def test_checks_are_counted_and_a_broken_one_fails_before_anything_is_recorded() -> None:
    checks = Checks()
    assert checks.check(True, "a") and not checks.check(False, "b: kernel changed")
    assert (checks.made, checks.broken) == (2, ["b: kernel changed"])
    with pytest.raises(AssertionError, match="1 of 2 checks broke"):
        checks.held()
    with pytest.raises(AssertionError, match="no invariant was checked"):
        Checks().held()
    ok = Checks()
    ok.check(True, "a")
    assert ok.held() == {"checks": 1, "violations": 0}
