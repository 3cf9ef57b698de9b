"""The plan diff understands names (issue 15, item 1): a PR that grants or revokes a name
shows it per principal, with the document responsible, and the cells' chains change."""

from __future__ import annotations

from tests.policyrepo import commit_all, write_tree
from tests.test_plan import edit, plan, policy_repo

REPLICA = """
    kind: Destination
    name: card-api
    protocol: tcp
    fqdns: api.card-network.example
    ports: 443
    ---
    kind: EgressPolicy
    name: backend-to-card-api
    source: {type: app, name: payments/prod/backend}
    destination: card-api
    app_lifecycle: running
    """


def test_a_name_granted_shows_as_gained_with_its_document(tmp_path):
    repo = policy_repo(tmp_path)
    write_tree(repo / "policies", {"card-api.yaml": REPLICA})
    commit_all(repo, "backend reaches the card API by name")
    code, text = plan(repo, "text")
    assert code == 2, text
    assert "+ tcp api.card-network.example port 443" in text
    assert "EgressPolicy/backend-to-card-api added (policies/card-api.yaml:7)" in text
    assert "2 containers gain access, 0 lose access" in text
    assert "-m set --match-set asgn4-" in text  # the chain diff shows the name rule


def test_a_name_changed_is_lost_and_gained(tmp_path):
    repo = policy_repo(tmp_path)
    write_tree(repo / "policies", {"card-api.yaml": REPLICA})
    commit_all(repo, "by name")
    edit(repo, "card-api.yaml", "api.card-network.example", "api2.card-network.example")
    commit_all(repo, "the provider renamed it")
    code, text = plan(repo, "text")
    assert code == 2, text
    assert "- tcp api.card-network.example port 443" in text
    assert "+ tcp api2.card-network.example port 443" in text
    assert "Destination/card-api fqdns changed (policies/card-api.yaml:1)" in text


def test_a_name_revoked_shows_as_lost_in_json(tmp_path):
    import json

    repo = policy_repo(tmp_path)
    write_tree(repo / "policies", {"card-api.yaml": REPLICA})
    commit_all(repo, "by name")
    (repo / "policies" / "card-api.yaml").unlink()
    commit_all(repo, "revoked")
    code, out = plan(repo, "json")
    assert code == 2, out
    doc = json.loads(out)
    lost = [c for p in doc["principals"] for c in p["lost"]]
    assert [c["destination"] for c in lost] == ["api.card-network.example"]
    assert lost[0]["ports"] == "443"
