"""Pull-request text in CI output: no line of it can become a GitHub Actions workflow command.

The policy-PR workflow prints `asgctl validate` and `asgctl test` (`--format github`) and
`asgctl plan` (`--format text`; the markdown goes to the step summary and the PR comment)
into the job's log.  GitHub's runner reads a log line as a command when, after TrimStart(),
it starts with `::` (actions/runner src/Runner.Common/ActionCommand.cs, TryParseV2), or when
it holds `##[` anywhere (TryParse, the legacy form; both are tried,
src/Runner.Worker/ActionCommandManager.cs TryProcessCommand).  A file name, a document name
or a directory entry is written by the PR's author, so in any of them `::notice ...::` would
be an annotation of the author's choosing, `::add-mask::` would hide words of the log and
`::stop-commands::` would silence every real annotation after it.

`runner_reads` below reads output the way the runner does, and unescapes a command's
properties and message with the runner's own mappings (`_escapePropertyMappings`,
`_escapeDataMappings` in ActionCommand.cs).  Every test ends the same way: the only lines
the runner takes for commands are the annotations asgctl means to emit, and those carry the
hostile strings back exactly as they were written.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.core.model import Location
from reconciler.escape import gh_data, gh_property, log_text, md, visible
from reconciler.policy.findings import Finding, render_findings
from tests.policyrepo import commit_all, init_repo, write_tree

REPO = Path(__file__).resolve().parent.parent

# Strings a PR author controls, each aimed at one of the runner's parsers.
FILE_NAMES = (
    "::notice title=forged::owned.yaml",
    "::error file=a,line=1::x%0A::warning::y.yaml",
    "a\n::warning::newline.yaml",
    "b\r::warning::carriage-return.yaml",
    "\x1b[2J\x1b[31m::error::esc.yaml",
    "##[error]legacy.yaml",
    " \u00a0\u3000::add-mask::leading-blanks.yaml",
    "%0A::stop-commands::token.yaml",
)
DOC_NAMES = (
    "::error::forged\n::warning::second-line",
    "##[add-mask]hidden",
    "%0A%3A%2C,:=%25",
    "\x1b[31mred\r::notice::after-cr",
    "\u2028::notice::after-line-separator",
)
# Directory names: no slash and no white space (directory.schema.json), the rest is free.
ORG, SPACE, APP = "::notice::org", "##[error]space", "::stop-commands::%0A\x1b[2Japp"


# ----------------------------------------------------------------------------- the runner


def runner_lines(output: str) -> list[str]:
    """The runner's lines: .NET's ReadLine ends a line at CR, LF or CR LF."""
    return re.split(r"\r\n|\r|\n", output)


def _unescape(text: str, mappings: tuple[tuple[str, str], ...]) -> str:
    for escaped, raw in mappings:
        text = text.replace(escaped, raw)
    return text


_DATA = (("%0D", "\r"), ("%0A", "\n"), ("%25", "%"))
_PROPERTY = (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%"))


def runner_reads(line: str) -> tuple[str, dict[str, str], str] | None:
    """(command, properties, message) when the runner takes `line` for a `::` command.

    TryParseV2: trim leading white space; `::name key=value,key=value::message`.
    """
    message = line.lstrip()
    if not message.startswith("::"):
        return None
    end = message.find("::", 2)
    if end < 0:
        return None
    name, _, props = message[2:end].partition(" ")
    properties = {}
    for prop in props.strip().split(","):
        key, sep, value = prop.partition("=")
        if sep and key and value:
            properties[key] = _unescape(value, _PROPERTY)
    return name, properties, _unescape(message[end + 2 :], _DATA)


def commands_in(output: str) -> list[tuple[str, dict[str, str], str]]:
    """Every line the runner would act on; fails on any legacy `##[` outside our commands."""
    found = []
    for line in runner_lines(output):
        command = runner_reads(line)
        if command is None:
            assert "##[" not in line, f"legacy workflow command in {line!r}"
            assert not line.lstrip().startswith("::"), line
            continue
        found.append(command)
    return found


def assert_no_commands(output: str) -> None:
    assert commands_in(output) == [], output


def annotations(output: str) -> list[tuple[str, dict[str, str], str]]:
    """The workflow commands of `output`, all of them annotations of the shape asgctl emits."""
    found = commands_in(output)
    for name, properties, _ in found:
        assert name in ("error", "warning"), name
        assert set(properties) <= {"file", "line", "col", "title"}, properties
        assert properties["line"].isdigit() and properties["col"].isdigit(), properties
    return found


def cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------- escape.py


HOSTILE_ALPHABET = ":,%=\r\n\x1b[]#;\u2028\u00a0 \tA0"


def test_annotation_escapes_read_back_exactly_through_the_runner():
    rng = random.Random(9)
    for _ in range(2000):
        text = "".join(rng.choice(HOSTILE_ALPHABET) for _ in range(rng.randrange(0, 12)))
        text = text.replace("\x1b", "")  # ESC is shown escaped, not carried; see below
        text = text.replace("\u2028", "").replace("\u00a0", "").replace("\t", "")
        if not text.strip(" "):
            continue  # the runner drops a property without a value; ours always have one
        line = f"::error file={gh_property(text)},title={gh_property(text)}::{gh_data(text)}"
        assert len(runner_lines(line)) == 1, repr(line)
        # The runner trims the properties' text, so the last one loses trailing blanks.
        expect = {"file": text, "title": text.rstrip(" ")}
        assert runner_reads(line) == ("error", expect, text)


def test_annotations_show_terminal_controls_instead_of_carrying_them():
    title, message = gh_property("a\x1b[2Jb"), gh_data("c\x1b]0;x\x07\u202e")
    line = f"::error title={title}::{message}"
    assert "\x1b" not in line and "\u202e" not in line and "\x07" not in line
    assert runner_reads(line) == ("error", {"title": "a\\x1b[2Jb"}, "c\\x1b]0;x\\x07\\u202e")


def test_log_text_makes_every_would_be_command_line_inert():
    for blank in ("", " ", "\t", "   ", "\u00a0", "\u3000", "\u2003 "):
        assert_no_commands(log_text(f"{blank}::notice title=x::forged\n"))
        assert log_text(f"{blank}::x::y") == f"{blank}\\x3a:x::y"
    assert_no_commands(log_text("ok\r::warning::after-cr\u2028::error::after-ls\n"))
    assert log_text("see ##[error]x and ###[y]") == "see ##\\x5berror]x and ###\\x5by]"
    assert_no_commands(log_text("see ##[error]x and ###[y]"))


def test_log_text_leaves_ordinary_lines_alone():
    text = (
        "policies/a.yaml:3:5: Destination/x: ips: invalid\n"
        "    -A asg-0123 -d fd00::/8 -j ACCEPT\n"
        ":asg-0123 - [0:0]\n"
        "  SecurityGroup/dns rules[0] (policies/dns.yaml:4)  # a::b\n"
    )
    assert log_text(text) == text


def test_markdown_names_cannot_start_a_command_line():
    assert "::" not in md(ORG) and "##[" not in md(SPACE)
    assert md("fd00::1") == "fd00&#58;&#58;1" and md("a:b") == "a:b"
    assert_no_commands(md(ORG) + "\n" + md(APP))


def test_visible_escapes_exactly_unicode_other_and_separator_characters():
    """Every code point: the one-call fast path keeps nothing it should have escaped."""
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        control = ch != " " and unicodedata.category(ch)[0] in "CZ"
        assert (visible(ch) != ch) == control, hex(code)


def test_visible_shows_every_line_break_the_runner_knows():
    assert runner_lines(visible("a\r\nb\rc\nd\u2028e")) == ["a\\r\\nb\\rc\\nd\\u2028e"]


# ----------------------------------------------------------------------------- validate


def _yaml_str(text: str) -> str:
    """`text` as a double-quoted YAML scalar, control characters and all."""
    return '"' + text.encode("unicode_escape").decode().replace('"', '\\"') + '"'


def invalid_destination(name: str) -> str:
    """A Destination that fails validation (a bad address), so a finding names its file."""
    return f"kind: Destination\nname: {_yaml_str(name)}\nprotocol: tcp\nips: 198.19.0.300\n"


def hostile_repo(tmp_path: Path) -> Path:
    """A git repo whose policy folder holds an invalid document in every hostile file name,
    each document named by a hostile name too."""
    repo = init_repo(tmp_path / "repo")
    policies = repo / "policies"
    policies.mkdir()
    for file, name in hostile_documents():
        (policies / file).write_text(invalid_destination(name))
    return repo


def hostile_documents() -> list[tuple[str, str]]:
    """(file name, document name): every hostile file, each with its own hostile name."""
    return [(f, f"{DOC_NAMES[i % len(DOC_NAMES)]}-{i}") for i, f in enumerate(FILE_NAMES)]


def as_annotated(text: str) -> str:
    """What an annotation carries for `text`: line breaks as written (GitHub escapes them),
    other control characters shown as `visible` shows them."""
    return "".join(ch if ch in "\r\n" else visible(ch) for ch in text)


def test_validate_text_names_hostile_files_without_issuing_commands(tmp_path):
    repo = hostile_repo(tmp_path)
    result = cli("validate", str(repo / "policies"))
    assert result.exit_code == 1
    assert_no_commands(result.output)
    assert f"{len(FILE_NAMES)} errors" in result.output
    assert "\x1b" not in result.output
    assert "\\x3a:notice title=forged::owned.yaml:4:" in result.output


def test_validate_github_annotations_carry_hostile_names_exactly(tmp_path):
    repo = hostile_repo(tmp_path)
    result = cli("validate", str(repo / "policies"), "--format", "github")
    assert result.exit_code == 1
    found = annotations(result.output)
    assert sorted((p["file"], p["title"]) for _, p, _ in found) == sorted(
        (as_annotated(f"policies/{file}"), as_annotated(f"Destination/{name}: ips"))
        for file, name in hostile_documents()
    )
    titles = {p["title"] for _, p, _ in found}
    assert "Destination/%0A%3A%2C,:=%25-2: ips" in titles
    assert "Destination/\\x1b[31mred\r::notice::after-cr-3: ips" in titles
    assert all(m.startswith("invalid ip address '198.19.0.300'") for _, _, m in found)


# ----------------------------------------------------------------------------- test


def policy_test_repo(tmp_path: Path) -> Path:
    """The example repo with hostile directory names and a failing PolicyTest about them,
    kept in a hostile file name."""
    repo = init_repo(tmp_path / "repo")
    shutil.copytree(REPO / "policies", repo / "policies")
    shutil.rmtree(repo / "policies" / "tests")  # they name marketing/web/blog
    directory = repo / "policies" / "directory.yaml"
    text = directory.read_text()
    for old, new in (("marketing", ORG), ("web", SPACE), ("blog", APP)):
        text = text.replace(f"name: {old}", f"name: {_yaml_str(new)}")
    directory.write_text(text)
    app = _yaml_str(f"{ORG}/{SPACE}/{APP}")
    write_tree(
        repo / "policies",
        {
            FILE_NAMES[0]: f"""
                kind: PolicyTest
                name: {_yaml_str(DOC_NAMES[0])}
                cases:
                  - {{app: {app}, to: "198.19.10.10:3306", expect: allow}}
                """
        },
    )
    commit_all(repo, "hostile names")
    return repo


def test_policy_test_text_output_issues_no_commands(tmp_path):
    repo = policy_test_repo(tmp_path)
    result = cli("test", str(repo / "policies"), "--verbose")
    assert result.exit_code == 1, result.output
    assert_no_commands(result.output)
    assert "FAIL - " in result.output and "\x1b" not in result.output


def test_policy_test_github_annotation_carries_the_hostile_strings(tmp_path):
    repo = policy_test_repo(tmp_path)
    result = cli("test", str(repo / "policies"), "--format", "github")
    assert result.exit_code == 1, result.output
    (failure,) = annotations(result.output)
    level, properties, message = failure
    assert level == "error"
    assert properties["file"] == f"policies/{FILE_NAMES[0]}"
    assert properties["title"].startswith("PolicyTest/::error::forged\n::warning::second-line")
    assert message.startswith("expected allow, got deny: ")
    assert f"{ORG}/{SPACE}/::stop-commands::%0A\\x1b[2Japp (running)" in message


def test_policy_test_github_on_an_invalid_policy_annotates_instead_of_printing_text(tmp_path):
    repo = hostile_repo(tmp_path)
    result = cli("test", str(repo / "policies"), "--format", "github")
    assert result.exit_code == 1
    found = annotations(result.output)
    assert sorted(p["file"] for _, p, _ in found) == sorted(
        as_annotated(f"policies/{f}") for f in FILE_NAMES
    )


# ----------------------------------------------------------------------------- plan


def plan_repo(tmp_path: Path) -> Path:
    """Base: the example policies with hostile directory names.  Head: a grant to the
    hostile app of a hostile Destination, in a hostile file name."""
    repo = policy_test_repo(tmp_path)
    for rel in list((repo / "policies").iterdir()):
        if rel.name == FILE_NAMES[0]:
            rel.unlink()
    write_tree(
        repo,
        {
            "cells/cell-1/store.json": """
                {"blog-0": {"handle": "blog-0", "ip": "198.18.2.2", "metadata": {
                  "app_id": "a1b2c3d4-0009-4e5f-9a8b-000000000009",
                  "space_id": "7b1d2e4f-0008-4c3a-8f2b-000000000008",
                  "org_id": "5e2f3c8a-0007-4a6e-9d1e-000000000007",
                  "container_workload": "app"}}}
                """
        },
    )
    commit_all(repo, "base")
    app = _yaml_str(f"{ORG}/{SPACE}/{APP}")
    destination = _yaml_str(DOC_NAMES[0])
    write_tree(
        repo / "policies",
        {
            FILE_NAMES[2]: f"""
                kind: Destination
                name: {destination}
                description: {_yaml_str(DOC_NAMES[3])}
                protocol: tcp
                ips: 198.19.10.99
                ports: 443
                ---
                kind: EgressPolicy
                name: {_yaml_str(DOC_NAMES[1])}
                source: {{type: app, name: {app}}}
                destination: {destination}
                """
        },
    )
    commit_all(repo, "grant")
    return repo


def plan_output(repo: Path, fmt: str) -> str:
    result = cli(
        "plan",
        *("--base", "HEAD~1", "--head", "HEAD", "--policies", str(repo / "policies")),
        *("--inventory", str(repo / "cells"), "--format", fmt, "--detailed-exitcode"),
    )
    assert result.exit_code == 2, result.output
    return result.output


def test_plan_text_and_markdown_issue_no_commands(tmp_path):
    repo = plan_repo(tmp_path)
    text = plan_output(repo, "text")
    assert_no_commands(text)
    assert "\\x3a:notice::org/##\\x5berror]space/::stop-commands::%0A\\x1b[2Japp" in text
    markdown = plan_output(repo, "markdown")
    assert_no_commands(markdown)
    assert "&#58;&#58;notice&#58;&#58;org/&#35;&#35;&#91;error&#93;space/" in markdown
    for out in (text, markdown):
        assert "\x1b" not in out and "\u2028" not in out and "\r" not in out


@pytest.mark.parametrize("folder", ["policies", ""])
def test_plan_of_an_invalid_head_lists_hostile_files_without_commands(tmp_path, folder):
    """Findings open their lines with the file name when the policies are the repo's root."""
    repo = init_repo(tmp_path / "repo")
    policies = repo / folder if folder else repo
    write_tree(policies, {"ok.yaml": "kind: Destination\nname: a\nips: 198.19.0.1\n"})
    commit_all(repo, "base")
    for file, name in hostile_documents():
        (policies / file).write_text(invalid_destination(name))
    commit_all(repo, "hostile")
    for fmt in ("text", "markdown"):
        result = cli(
            "plan",
            *("--base", "HEAD~1", "--head", "HEAD", "--policies", str(policies)),
            *("--inventory", "directory", "--format", fmt),
        )
        assert result.exit_code == 1, result.output
        assert_no_commands(result.output)
        assert "owned.yaml" in result.output
        assert "\x1b" not in result.output


def test_findings_text_is_one_inert_line_per_finding():
    findings = [
        Finding.at(Location(file, 1, 1), name, kind="Destination", name=name)
        for file, name in hostile_documents()
    ]
    out = render_findings(findings, "text")
    assert_no_commands(out)
    assert len(runner_lines(out)) == len(findings) + 2  # the count, and the final newline
