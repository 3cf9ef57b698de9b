"""Putting policy-supplied strings into terminals, CI logs, markdown and code fences safely.

Names, descriptions, file names and directory entries come from pull requests.  In a PR
comment a backtick can close a code span, `<` can open HTML, `|` can split a table cell, a
newline can start a fake diff line, `@team` can ping people and a bidi control can make text
read backwards; in a terminal an escape sequence can rewrite the screen; in a GitHub Actions
log a line that starts with `::` (or holds `##[`) is a workflow command -- an annotation on
the PR, a masked secret, or `stop-commands`, which silences every real annotation after it.
Every such string goes through exactly one of these functions before it reaches output:

* `visible` -- one string, one line, for a terminal or the inside of a code fence;
* `md` -- inline markdown;
* `fence` -- a block of already `visible` lines as a markdown code block;
* `gh_data` / `gh_property` -- the message and the `key=value` properties of a workflow
  command we mean to emit (`::error file=...,title=...::message`);
* `log_text` -- a whole text or markdown document a CI job prints: no line of it can be read
  as a workflow command.
"""

from __future__ import annotations

import re

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -./,:=()+%'\"?;")
_BACKTICKS = re.compile(r"`+")
# GitHub's runner (actions/runner src/Runner.Common/ActionCommand.cs) reads a line as a
# command when, after TrimStart(), it starts with "::" (TryParseV2), or when "##[" occurs
# anywhere in it (the legacy TryParse).  TrimStart() trims every Unicode white space.
_LEGACY_COMMAND = "##["


def _escaped(ch: str) -> str:
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    if ord(ch) < 0x100:
        return f"\\x{ord(ch):02x}"
    return f"\\u{ord(ch):04x}"


def _is_control(ch: str) -> bool:
    """Control, format and separator characters: newlines, ESC, bidi marks, U+2028.

    Exactly what `str.isprintable` refuses (Unicode "Other" and "Separator", except the
    ASCII space), which lets a whole clean string pass in one C call.
    """
    return not ch.isprintable()


def visible(text: str) -> str:
    """Control, format and separator characters (newlines, ESC, bidi marks) as escapes.

    Safe for a terminal and for the inside of a code fence: one string stays one line.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escaped(ch) if _is_control(ch) else ch for ch in text)


def md(text: str) -> str:
    """Inline markdown (paragraphs, table cells, `<summary>`): only letters, digits and a few
    harmless punctuation marks stay literal; everything else becomes an HTML entity, which
    GitHub renders as the character but never as markup.  A colon next to a colon is an
    entity too, so a name can never start a `::command` line of the comment's source."""
    shown = visible(text)
    out = []
    for i, ch in enumerate(shown):
        doubled = ch == ":" and ":" in shown[max(0, i - 1) : i] + shown[i + 1 : i + 2]
        if (ch in _SAFE or ch.isalnum()) and not doubled:
            out.append(ch)
        else:
            out.append(f"&#{ord(ch)};")
    return "".join(out)


def fence(body: str, info: str = "") -> str:
    """A fenced code block that no backtick run inside `body` can close early."""
    longest = max((len(m) for m in _BACKTICKS.findall(body)), default=0)
    marks = "`" * max(3, longest + 1)
    return f"{marks}{info}\n{body}\n{marks}"


def gh_data(text: str) -> str:
    """The message of a workflow command (after its second `::`).

    GitHub's own escapes for `%`, CR and LF (the runner's `_escapeDataMappings`), so the
    message stays on the command's line and reads back as written; other control characters
    (ESC, bidi marks) are shown as `visible` shows them.
    """
    out = []
    for ch in str(text):
        if ch == "%":
            out.append("%25")
        elif ch == "\r":
            out.append("%0D")
        elif ch == "\n":
            out.append("%0A")
        elif _is_control(ch):
            out.append(_escaped(ch))
        else:
            out.append(ch)
    return "".join(out)


def gh_property(text: str) -> str:
    """A property value of a workflow command (`file=`, `title=`): `gh_data`, and `:` and `,`
    too, which would otherwise end the properties or start the next one."""
    return gh_data(text).replace(":", "%3A").replace(",", "%2C")


def log_text(text: str) -> str:
    """A whole document a CI job prints (text, markdown), with no line a workflow command.

    Applied to the finished document, so each line is judged as the runner will read it,
    however its pieces were put together: a line whose first non-blank characters are `::`
    gets its first colon shown as `\\x3a`, and every `##[` becomes `##\\x5b`.  Lines are
    split wherever Python splits lines (CR, LF, U+2028, ...), a superset of where the runner
    does.  We never print a line that starts with `::` ourselves, so only text from a policy
    is ever changed; our own annotations (`--format github`) are built with `gh_data` and
    `gh_property` and never pass through here.
    """
    out = []
    for line in text.replace(_LEGACY_COMMAND, "##\\x5b").splitlines(keepends=True):
        body = line.lstrip()
        if body.startswith("::"):
            line = line[: len(line) - len(body)] + "\\x3a" + body[1:]
        out.append(line)
    return "".join(out)
