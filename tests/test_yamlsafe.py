"""The safe YAML loader: positions for every value, limits on everything hostile."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import yaml

from reconciler.policy.yamlsafe import (
    Budget,
    Limits,
    LoadError,
    ParseCache,
    decode,
    load_documents,
    load_yaml,
)


def test_every_value_keeps_its_line_and_column():
    text = (
        "kind: SecurityGroup\nname: web\nrules:\n"
        "  - protocol: tcp\n    destination: [10.0.0.1, 10.0.0.2]\n"
    )
    (doc,) = load_documents("sg.yaml", text)
    assert doc.location(("rules", 0, "protocol")).line == 4
    assert doc.location(("rules", 0, "destination", 1)).col == 29
    # A missing key points at its nearest written parent.
    assert doc.location(("rules", 0, "ports")).line == 4


def test_multi_document_files_skip_empty_documents():
    docs = load_documents("f.yaml", "a: 1\n---\n---\nb: 2\n")
    assert [d.data for d in docs] == [{"a": 1}, {"b": 2}]
    assert [d.index for d in docs] == [0, 1]


def test_anchors_and_merge_keys_work_and_explicit_keys_win():
    text = "base: &b {protocol: tcp, ports: '80'}\nrule: {<<: *b, ports: '443'}\n"
    (doc,) = load_documents("f.yaml", text)
    assert doc.data["rule"] == {"ports": "443", "protocol": "tcp"}


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'", 2),
        ("x: !!python/object:os.system ls\n", "is not allowed in policy files", 1),
        ("x: !custom 1\n", "tag '!custom' is not allowed", 1),
        ("x: *nowhere\n", "unknown alias *nowhere", 1),
        ("{[1]: 2}\n", "a mapping key must be a plain value", 1),
        ("a: b: c\n", "mapping values are not allowed in this context", 1),
        ("a: [1, 2\n", "expected ',' or ']'", 2),
    ],
)
def test_malformed_yaml_names_the_line(text, message, line):
    with pytest.raises(LoadError) as err:
        load_documents("bad.yaml", text)
    assert message in str(err.value)
    assert err.value.file == "bad.yaml"
    assert err.value.line == line


def test_deep_nesting_is_refused_without_recursion():
    with pytest.raises(LoadError, match="nesting"):
        load_documents("deep.yaml", "a: " + "[" * 10_000 + "]" * 10_000)
    block = "".join("  " * i + "- \n" for i in range(1_000))
    with pytest.raises(LoadError, match="nesting deeper than 64 levels"):
        load_documents("deep.yaml", block)


def test_alias_bomb_is_refused_quickly():
    lines = ["l0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(LoadError, match="expands to more than"):
        load_documents("bomb.yaml", "\n".join(lines) + "\n")


def test_limits_on_size_and_document_count():
    with pytest.raises(LoadError, match="over the limit of 100 bytes"):
        decode("big.yaml", b"a: 1\n" * 100, Limits(max_file_bytes=100))
    with pytest.raises(LoadError, match="more than 3 documents"):
        load_documents("many.yaml", "a: 1\n---\n" * 5, Limits(max_documents=3))


def test_non_utf8_bytes_are_reported_with_position():
    with pytest.raises(LoadError) as err:
        decode("latin1.yaml", b"name: ok\ndescription: caf\xe9\n")
    assert str(err.value) == "latin1.yaml:2:17: file is not valid UTF-8"


def test_utf8_bom_is_accepted():
    assert decode("bom.yaml", b"\xef\xbb\xbfa: 1\n") == "a: 1\n"


# --- merge keys as every other YAML tool reads them ---------------------------------------


@pytest.mark.parametrize("quoted", ['"<<"', "'<<'"])
def test_a_quoted_merge_key_is_an_ordinary_key(quoted):
    """YAML 1.1's merge type is resolved from the PLAIN scalar `<<` only (PyYAML's resolver,
    libyaml, yq, ruamel): a quoted `"<<"` is a string key, so it cannot smuggle in values that
    a reviewer's tools show as an unknown key."""
    (doc,) = load_documents("f.yaml", f"{{{quoted}: {{destination: 0.0.0.0/0}}, protocol: all}}\n")
    assert doc.data == {"<<": {"destination": "0.0.0.0/0"}, "protocol": "all"}
    assert yaml.safe_load(f"{{{quoted}: {{a: 1}}}}") == {"<<": {"a": 1}}  # the same reading


def test_a_plain_merge_key_merges():
    (doc,) = load_documents("f.yaml", "a: {<<: {x: 1}, y: 2}\nb: ['<<']\n")
    assert doc.data == {"a": {"x": 1, "y": 2}, "b": ["<<"]}
    assert doc.data == yaml.safe_load("a: {<<: {x: 1}, y: 2}\nb: ['<<']\n")


@pytest.mark.parametrize("text", ["b: [<<]\n", "c: <<\n", "<<\n"])
def test_a_plain_lt_lt_that_is_not_a_key_is_refused_as_pyyaml_does(text):
    with pytest.raises(LoadError, match="a plain << is a merge key; quote it"):
        load_documents("f.yaml", text)
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(text)


def test_a_quoted_and_a_plain_merge_key_together_do_not_collide():
    (doc,) = load_documents("f.yaml", '{"<<": 1, <<: {x: 2}}\n')
    assert doc.data == {"<<": 1, "x": 2}


# --- budgets per file and per load, never per document --------------------------------------


def _bomb_document(levels: int = 6, width: int = 10) -> str:
    """About width**(levels-1) values from a few hundred bytes: each list repeats the last."""
    lines = ["l0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_the_value_budget_is_per_file_not_per_document():
    """Three documents of 1,237 values each: every one is under a 2,500 limit, the file is not."""
    text = "---\n".join([_bomb_document(levels=3)] * 3)
    with pytest.raises(LoadError) as err:
        load_documents("many.yaml", text, Limits(max_nodes=2_500))
    assert "file expands to more than 2500 values (all documents together" in err.value.message
    assert err.value.file == "many.yaml"
    assert err.value.line == 10  # in the third document (lines 9-11), where the count went over
    assert len(load_documents("one.yaml", _bomb_document(levels=3), Limits(max_nodes=2_500))) == 1


def test_alias_uses_are_budgeted_per_file():
    text = "---\n".join(["a: &x 1\nb: [*x, *x, *x]\n"] * 4)
    with pytest.raises(LoadError, match="more than 10 alias uses in one file") as err:
        load_documents("aliases.yaml", text, Limits(max_aliases=10))
    assert err.value.line == 11
    assert len(load_documents("aliases.yaml", text, Limits(max_aliases=12))) == 4


def test_one_budget_spans_every_file_of_a_load():
    limits = Limits(max_nodes=5_000, max_load_nodes=3_000)
    budget = Budget(limits)
    one = _bomb_document(levels=3).encode()  # 1,237 values
    load_yaml("a.yaml", one, limits, budget)
    load_yaml("b.yaml", one, limits, budget)
    with pytest.raises(LoadError) as err:
        load_yaml("c.yaml", one, limits, budget)
    assert err.value.file == "c.yaml" and err.value.line == 3
    assert "the policy files expand to more than 3000 values" in err.value.message
    load_yaml("c.yaml", one, limits)  # on its own, the same file is fine


def test_a_cached_file_still_counts_against_every_load_that_reads_it():
    """The parse cache a plan shares between revisions hands a file parsed once to every
    load reading the same bytes; each load is still charged its bytes and values, and the
    load that goes over fails on the same file and line as without the cache."""
    limits = Limits(max_nodes=5_000, max_load_nodes=3_000, max_load_bytes=10_000)
    cache = ParseCache()
    one = _bomb_document(levels=3).encode()  # 1,237 values
    first = load_yaml("a.yaml", one, limits, Budget(limits), cache)
    budget = Budget(limits)
    again = load_yaml("a.yaml", one, limits, budget, cache)
    assert again == first and again[0] is first[0]  # not parsed again
    assert budget.nodes_left == 3_000 - 1_237
    assert budget.bytes_left == 10_000 - len(one)
    load_yaml("b.yaml", one, limits, budget, cache)
    with pytest.raises(LoadError) as err:
        load_yaml("a.yaml", one, limits, budget, cache)  # cached, but over what is left
    assert err.value.file == "a.yaml" and err.value.line == 3
    assert "the policy files expand to more than 3000 values" in err.value.message
    assert budget.nodes_left < 0  # charged as the parse charges a failing file
    small = Limits(max_load_bytes=len(one) + 10)
    tight = Budget(small)
    load_yaml("a.yaml", one, small, tight, cache)
    with pytest.raises(LoadError, match="policy files add up to more than"):
        load_yaml("a.yaml", one, small, tight, cache)


def test_the_parse_cache_keys_on_name_bytes_and_limits():
    cache = ParseCache()
    text = b"kind: SecurityGroup\nname: web\n"
    (doc,) = load_yaml("a.yaml", text, cache=cache)
    (other,) = load_yaml("b.yaml", text, cache=cache)
    assert other.file == "b.yaml" and other is not doc  # findings keep their own file
    (changed,) = load_yaml("a.yaml", text.replace(b"web", b"db"), cache=cache)
    assert changed.data["name"] == "db"
    with pytest.raises(LoadError, match="more than 1 values"):
        load_yaml("a.yaml", text, Limits(max_nodes=1), cache=cache)  # stricter: parsed again
    with pytest.raises(LoadError):
        load_yaml("bad.yaml", b"a: [", cache=cache)
    with pytest.raises(LoadError):
        load_yaml("bad.yaml", b"a: [", cache=cache)  # a failure is never kept


def test_the_parse_cache_stops_keeping_files_past_its_size():
    cache = ParseCache(max_bytes=40)
    text = b"kind: SecurityGroup\nname: web\n"  # 30 bytes
    (a,) = load_yaml("a.yaml", text, cache=cache)
    assert load_yaml("a.yaml", text, cache=cache)[0] is a
    (b,) = load_yaml("b.yaml", text, cache=cache)  # over the 40 bytes: parsed, not kept
    assert load_yaml("b.yaml", text, cache=cache)[0] is not b
    cache.keep_note(b, "x")
    assert cache.note(b) is None  # notes only for documents the cache holds alive
    cache.keep_note(a, "x")
    assert cache.note(a) == "x"


def test_bytes_are_budgeted_per_file_and_per_load():
    limits = Limits(max_file_bytes=100, max_load_bytes=150)
    budget = Budget(limits)
    with pytest.raises(LoadError, match="file is 101 bytes, over the limit of 100 bytes"):
        load_yaml("big.yaml", b"#" * 101, limits, budget)
    load_yaml("a.yaml", b"#" * 79 + b"\na: 1\n", limits, budget)  # 85 bytes
    with pytest.raises(LoadError, match="policy files add up to more than 150 bytes") as err:
        load_yaml("b.yaml", b"#" * 79 + b"\na: 1\n", limits, budget)
    assert err.value.file == "b.yaml"


def test_a_multi_document_alias_bomb_is_refused_within_a_gigabyte(tmp_path):
    """The reported attack: 10,000 documents, each just under a per-document limit of 2,000,000
    values, used to cost minutes and gigabytes in validate, test, plan and on every agent.
    `asgctl validate` runs with its address space capped at 1 GB; it must refuse the file with
    a finding that names it and the line.  The timeout only guards against a hang."""
    bomb = tmp_path / "policies" / "bomb.yaml"
    bomb.parent.mkdir()
    bomb.write_text("---\n".join([_bomb_document(levels=6)] * 10_000))  # 6 MB, 1.1M values each
    gigabyte = 1024**3

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (gigabyte, gigabyte))

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from reconciler.cli import main; main()",
            "validate",
            str(bomb.parent),
        ],
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.startswith("bomb.yaml:13:")  # the second document's last line
    assert "file expands to more than 2000000 values" in result.stdout
