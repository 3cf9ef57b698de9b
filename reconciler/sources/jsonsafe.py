"""One reader for JSON that comes from outside: CF exports, metadata stores.

Python's `json` module has three ways to fail on hostile input that are not `JSONDecodeError`:
its decoder recurses once per nesting level (`[[[[...` ends in RecursionError), integers over
4300 digits raise a ValueError that says neither where nor in which field, and it accepts
`NaN` / `Infinity`, which are not JSON (Ruby's parser, and so Cloud Controller, refuses them).
`loads` turns every one of these into a `JsonInputError` naming the source, line and column,
so no caller ever shows a traceback or has to remember the traps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from reconciler.policy.yamlsafe import LoadError

__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "JsonInputError", "loads"]

# No JSON we read nests deeper than ~8 levels or holds a number longer than an int64; these
# bounds leave generous room while staying far below Python's own limits.
MAX_DEPTH = 256
MAX_INT_DIGITS = 100
_KEY_BEFORE = re.compile(r'("(?:[^"\\]|\\.)*")\s*:\s*$')
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JsonInputError(LoadError, ValueError):
    """JSON that cannot be used, with where: `file:line:col: message` (as for policy YAML)."""


class _TooLong(Exception):
    def __init__(self, digits: str):
        super().__init__(digits)
        self.digits = digits


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLong(text)
    return int(text)


class _Constant(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _too_deep_at(text: str) -> int:
    """Index of the bracket that first goes past MAX_DEPTH (or the deepest one), strings skipped.

    Only run after the decoder has already failed, so ordinary input never pays for the scan.
    """
    depth = deepest = 0
    deepest_at = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
            if depth > deepest:
                deepest, deepest_at = depth, match.start()
        elif token in "]}":
            depth -= 1
    return deepest_at


def loads(data: str | bytes, source: str, *, reject_duplicate_keys: bool = False) -> Any:
    """Decode JSON, raising `JsonInputError` (file, line, column) for anything unusable.

    `reject_duplicate_keys`: `{"ports": "443", "ports": "1-65535"}` is valid JSON whose reader
    keeps the last key, while a reviewer reads the first; inputs that become policy refuse it.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise JsonInputError(source, "not valid JSON: not UTF-8", line, col) from None
    else:
        text = data.removeprefix("\ufeff")
    hook: Callable[[list[tuple[str, Any]]], Any] | None = (
        _reject_duplicates if reject_duplicate_keys else None
    )
    try:
        value = json.loads(
            text, parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=hook
        )
    except json.JSONDecodeError as exc:
        raise JsonInputError(source, f"not valid JSON: {exc.msg}", exc.lineno, exc.colno) from None
    except RecursionError:
        line, col = _position(text, _too_deep_at(text))
        message = f"not valid JSON: nested too deeply (more than {MAX_DEPTH} levels)"
        raise JsonInputError(source, message, line, col) from None
    except _Constant as exc:
        line, col = _position(text, max(text.find(exc.name), 0))
        raise JsonInputError(source, f"not valid JSON: {exc.name}", line, col) from None
    except _TooLong as exc:
        token = exc.digits
        start = text.find(token)
        line, col = _position(text, max(start, 0))
        digits = len(token.lstrip("-"))
        message = f"not valid JSON: a number with {digits} digits (at most {MAX_INT_DIGITS})"
        key = _KEY_BEFORE.search(text, max(0, start - 1000), start) if start >= 0 else None
        if key:
            message = f"{message} in field {key.group(1)}"
        raise JsonInputError(source, message, line, col) from None
    except _Duplicate as exc:
        # Point at the second occurrence: the one the reader would have silently kept.
        quoted = json.dumps(exc.key)
        first = text.find(quoted)
        second = text.find(quoted, first + 1) if first >= 0 else -1
        line, col = _position(text, max(second, first, 0))
        raise JsonInputError(source, f"not valid JSON: duplicate key {quoted}", line, col) from None
    except ValueError as exc:  # any other conversion limit of the json module
        raise JsonInputError(source, f"not valid JSON: {exc}") from None
    return value
