"""Putting policy-supplied strings into terminals, markdown and code fences without harm.

Names, descriptions, file names and directory entries come from pull requests.  In a PR
comment a backtick can close a code span, `<` can open HTML, `|` can split a table cell, a
newline can start a fake diff line, `@team` can ping people and a bidi control can make text
read backwards; in a terminal an escape sequence can rewrite the screen.  Every such string
goes through exactly one of these functions before it reaches a template.
"""

from __future__ import annotations

import re
import unicodedata

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -./,:=()+%'\"?;")
_BACKTICKS = re.compile(r"`+")


def visible(text: str) -> str:
    """Control, format and separator characters (newlines, ESC, bidi marks) as escapes.

    Safe for a terminal and for the inside of a code fence: one string stays one line.
    """
    out = []
    for ch in str(text):
        if ch == " " or unicodedata.category(ch)[0] not in "CZ":
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def md(text: str) -> str:
    """Inline markdown (paragraphs, table cells, `<summary>`): only letters, digits and a few
    harmless punctuation marks stay literal; everything else becomes an HTML entity, which
    GitHub renders as the character but never as markup."""
    out = []
    for ch in visible(text):
        if ch in _SAFE or ch.isalnum():
            out.append(ch)
        else:
            out.append(f"&#{ord(ch)};")
    return "".join(out)


def fence(body: str, info: str = "") -> str:
    """A fenced code block that no backtick run inside `body` can close early."""
    longest = max((len(m) for m in _BACKTICKS.findall(body)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{body}\n{marks}"
