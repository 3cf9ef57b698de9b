"""`asgctl import-cf` end to end: CF JSON files in, a valid policy folder out."""

from __future__ import annotations

import json

from click.testing import CliRunner

from reconciler.cli import main
from reconciler.policy.load import load_folder
from tests.test_importcf import PUBLIC_NETWORKS, V2_DOCS_RULES, V3_DOCS_GROUP, rules_of, v3_list


def test_imported_folder_validates_and_describes_the_same_rules(tmp_path):
    (tmp_path / "dns.json").write_text(json.dumps(V2_DOCS_RULES))
    (tmp_path / "all.json").write_text(json.dumps(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS)))
    out = tmp_path / "policies"
    result = CliRunner().invoke(
        main,
        ["import-cf", str(tmp_path / "dns.json"), str(tmp_path / "all.json"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "dns.yaml",
        "my-group0.yaml",
        "public_networks.yaml",
    ]
    loaded = load_folder(out)
    # The docs' example ends in an allow-all rule, which makes two of its rules redundant.
    assert loaded.ok
    assert [f"{f.file} {f.field} {f.message}" for f in loaded.findings] == [
        "dns.yaml rules[0] redundant: rules[3] already allows all of it",
        "dns.yaml rules[2] redundant: rules[3] already allows all of it",
    ]
    groups = {g.name: g for g in loaded.policy.security_groups}
    assert list(groups["dns"].rules) == rules_of(V2_DOCS_RULES)
    assert list(groups["public_networks"].rules) == rules_of(PUBLIC_NETWORKS["rules"])
    assert groups["public_networks"].running_default and groups["public_networks"].staging_default
    assert groups["my-group0"].staging_spaces == ("space-guid-1", "space-guid-2")
    validate = CliRunner().invoke(main, ["validate", str(out)])
    assert validate.exit_code == 0


def test_name_picks_one_group_from_a_list(tmp_path):
    (tmp_path / "all.json").write_text(json.dumps(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS)))
    result = CliRunner().invoke(
        main, ["import-cf", str(tmp_path / "all.json"), "--name", "public_networks"]
    )
    assert result.exit_code == 0
    assert "name: public_networks" in result.output and "my-group0" not in result.output


def test_invalid_cf_rules_are_reported_with_cf_messages_and_nothing_is_written(tmp_path):
    bad = [{"protocol": "tcp", "destination": "10.0.0.1", "ports": "80-80"}]
    (tmp_path / "good.json").write_text(json.dumps(V2_DOCS_RULES))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["import-cf", str(tmp_path / "good.json"), str(tmp_path / "bad.json"), "--out", str(out)],
    )
    assert result.exit_code == 1
    assert "bad.json: " in result.output and "Rules[0]: ports must be a valid" in result.output
    assert "nothing was written" in result.output
    assert not out.exists()


def test_names_that_share_a_file_name_get_files_of_their_own(tmp_path):
    groups = [{"name": n, "rules": []} for n in ("a b", "a_b", "A_B", "a/b")]
    (tmp_path / "all.json").write_text(json.dumps(v3_list(*groups)))
    out = tmp_path / "policies"
    result = CliRunner().invoke(main, ["import-cf", str(tmp_path / "all.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "A_B-3.yaml",
        "a_b-2.yaml",
        "a_b-4.yaml",
        "a_b.yaml",
    ]
    assert sorted(g.name for g in load_folder(out).policy.security_groups) == sorted(
        g["name"] for g in groups
    )


def test_warnings_go_to_stderr_and_the_import_goes_ahead(tmp_path):
    rules = [{"protocol": "icmp", "destination": "10.0.0.0/8", "type": 8, "code": 0, "ports": "80"}]
    (tmp_path / "ping.json").write_text(json.dumps(rules))
    result = CliRunner().invoke(main, ["import-cf", str(tmp_path / "ping.json")])
    assert result.exit_code == 0
    assert result.stderr == (
        'warning: ping.json: ping: Rules[0]: ports "80" dropped: icmp has no ports '
        "(Cloud Controller's request validator ignores them)\n"
    ).replace("ping.json", str(tmp_path / "ping.json"), 1)
    assert "ports" not in result.stdout and "name: ping" in result.stdout


def test_out_writes_a_schema_hint_that_resolves_however_deep_the_folder(tmp_path):
    """Files imported into a nested folder of a policy repo point editors at the repo's
    schemas/asgctl.schema.json by a path that resolves from where they are; outside any
    repo with a schemas/ folder they carry no hint rather than a broken one."""
    (tmp_path / "all.json").write_text(json.dumps(v3_list(V3_DOCS_GROUP, PUBLIC_NETWORKS)))
    repo = tmp_path / "repo"
    (repo / "schemas").mkdir(parents=True)
    (repo / "schemas" / "asgctl.schema.json").write_text("{}")
    for out in (repo / "policies", repo / "policies" / "imported" / "from-cf"):
        result = CliRunner().invoke(
            main, ["import-cf", str(tmp_path / "all.json"), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        first = (out / "public_networks.yaml").read_text().splitlines()[0]
        prefix = "# yaml-language-server: $schema="
        assert first.startswith(prefix), first
        assert (out / first.removeprefix(prefix)).resolve() == (
            repo / "schemas" / "asgctl.schema.json"
        ).resolve()
    lone = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["import-cf", str(tmp_path / "all.json"), "--out", str(lone)])
    assert result.exit_code == 0, result.output
    assert "$schema" not in (lone / "public_networks.yaml").read_text()
    assert load_folder(lone).ok
