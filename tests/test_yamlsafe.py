"""The safe YAML loader: positions for every value, limits on everything hostile."""

from __future__ import annotations

import pytest

from reconciler.policy.yamlsafe import Limits, LoadError, decode, load_documents


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
