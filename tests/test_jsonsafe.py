"""The one reader for JSON from outside (`reconciler.sources.jsonsafe`): every hostile input is an
error naming source, line and column, never a traceback.  `import-cf` and the metadata store
reader both use it (tests/test_importcf_cli.py and tests/test_hostile_fields.py attack those)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.sources.jsonsafe import MAX_DEPTH, MAX_INT_DIGITS, JsonInputError, loads


def error_of(text: str | bytes, **kw: bool) -> str:
    with pytest.raises(JsonInputError) as err:
        loads(text, "in.json", **kw)
    return str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, "in.json:1:257: not valid JSON: nested too deeply (more than 256 levels)"),
        (
            '{"a":\n' * 50_000 + "1" + "}" * 50_000,
            "in.json:257:1: not valid JSON: nested too deeply",
        ),
        (
            '{"rules": [{"ports":\n ' + "9" * 5000 + "}]}",
            'in.json:2:2: not valid JSON: a number with 5000 digits (at most 100) in field "ports"',
        ),
        ("[-" + "1" * 101 + "]", "in.json:1:2: not valid JSON: a number with 101 digits"),
        ('{"type": NaN}', "in.json:1:10: not valid JSON: NaN"),
        ("[1, -Infinity]", "in.json:1:5: not valid JSON: -Infinity"),
        ('{"a": [1,]}', "in.json:1:10: not valid JSON: Expecting value"),
        (b'["\xff"]', "in.json:1:3: not valid JSON: not UTF-8"),
        ("", "in.json:1:1: not valid JSON: Expecting value"),
    ],
)
def test_hostile_json_is_an_error_that_says_where(text: str | bytes, message: str) -> None:
    assert error_of(text).startswith(message)


def test_strings_that_look_like_brackets_do_not_count_as_nesting() -> None:
    head = '["' + "[" * 2000 + '",'
    text = head + "[" * 100_000
    # The outer `[` is level 1; the 256th real bracket after the string goes past the limit.
    assert error_of(text).startswith(f"in.json:1:{len(head) + MAX_DEPTH}: ")


def test_deep_but_reasonable_and_long_but_bounded_values_are_read() -> None:
    assert loads("[" * 200 + "]" * 200, "x") is not None
    assert loads("9" * MAX_INT_DIGITS, "x") == int("9" * MAX_INT_DIGITS)
    assert loads("1" * 5000 + ".5", "x") > 0  # floats have no digit limit in Python
    assert loads('\ufeff{"a": 1}', "x") == {"a": 1}


def test_duplicate_keys_are_refused_when_asked_and_point_at_the_second() -> None:
    text = '{"ports": "443",\n "ports": "1-65535"}'
    assert loads(text, "x") == {"ports": "1-65535"}  # what every JSON reader silently does
    assert error_of(text, reject_duplicate_keys=True) == (
        'in.json:2:2: not valid JSON: duplicate key "ports"'
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}":,0123456789-eE.NaInfity \n\\', max_size=400))
def test_loads_raises_nothing_but_json_input_error(text: str) -> None:
    try:
        loads(text, "x", reject_duplicate_keys=True)
    except JsonInputError as exc:
        assert str(exc).startswith("x")
