"""`asgctl plan` names apps and spaces only where the inventory agrees with the Directory.

The plan's principals are the inventory's containers, keyed by GUID (app_id, space_id,
org_id, as CF's metadata store and the status branches give them); their names come from
the pull request's own `directory.yaml`.  A PR that swaps two apps' GUIDs there would make
the plan say "marketing/web/blog gains MySQL" while the containers that gain it run in
payments/prod.  So a name is shown only when the inventory runs the app in the space the
Directory puts it in, and that space in the Directory's org; otherwise the plan shows the
GUID and says what each side claims.
"""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.ci.plan import run_plan
from reconciler.escape import md
from reconciler.sources.cellstore import dump_store
from tests.policyrepo import commit_all, write_tree
from tests.test_plan import (
    BACKEND,
    BLOG,
    CELLS,
    FRONTEND,
    MARKETING,
    PAYMENTS,
    PROD,
    WEB,
    c,
    edit,
    plan,
    policy_repo,
)

BLOG_GETS_MYSQL = """
    kind: EgressPolicy
    name: blog-to-mysql
    source: {type: app, name: marketing/web/blog}
    destination: mysql
    app_lifecycle: running
    """


def swap_app_guids(repo: Path, one: str, other: str) -> None:
    path = repo / "policies" / "directory.yaml"
    text = path.read_text()
    assert one in text and other in text
    path.write_text(text.replace(one, "@swap@").replace(other, one).replace("@swap@", other))


def principals(repo: Path, inventory: str = "cells") -> list[dict]:
    code, out = plan(repo, "json", inventory)
    assert code == 2, out
    return json.loads(out)["principals"]


def gaining(doc: list[dict], destination: str) -> list[dict]:
    return [p for p in doc if any(ch["destination"] == destination for ch in p["gained"])]


MYSQL = "198.19.10.10"


def test_an_honest_grant_names_the_app(tmp_path):
    """The control: the Directory and the inventory agree, so the plan names the blog."""
    repo = policy_repo(tmp_path)
    write_tree(repo / "policies", {"blog.yaml": BLOG_GETS_MYSQL})
    commit_all(repo, "the blog reads MySQL")
    (blog,) = gaining(principals(repo), MYSQL)
    assert blog["name"] == "marketing/web/blog" and blog["app_id"] == BLOG
    assert blog["name_verified"] is True and blog["name_mismatch"] is None


def test_swapped_app_guids_do_not_name_the_wrong_app(tmp_path):
    """The attack: swap the blog's and payments' frontend's GUIDs, then grant the "blog"."""
    repo = policy_repo(tmp_path)
    swap_app_guids(repo, FRONTEND, BLOG)
    write_tree(repo / "policies", {"blog.yaml": BLOG_GETS_MYSQL})
    commit_all(repo, "the blog reads MySQL")
    doc = principals(repo)
    (gainer,) = gaining(doc, MYSQL)
    # What gains MySQL is payments/prod/frontend's containers (cell-1), by the inventory.
    assert (gainer["app_id"], gainer["space_id"]) == (FRONTEND, PROD)
    assert gainer["containers"] == 1
    assert gainer["name"] == FRONTEND and gainer["name_verified"] is False
    assert gainer["name_mismatch"] == (
        f"directory says marketing/web/blog in space {WEB}, "
        f"inventory says space {PROD} (payments/prod)"
    )
    assert all(p["name"] != "marketing/web/blog" for p in doc)

    code, text = plan(repo, "text")
    assert code == 2
    title = (
        f"  {FRONTEND} [name unverified: directory says marketing/web/blog in space {WEB}, "
        f"inventory says space {PROD} (payments/prod)] (running; 1 container on 1 cell)"
    )
    assert title in text.splitlines()
    assert "\n  marketing/web/blog (" not in text
    assert (
        "Warning: 1 principal shown by GUID (name unverified): the directory puts the app "
        "or space elsewhere than the inventory runs it"
    ) in text
    code, markdown = plan(repo, "markdown")
    assert code == 2
    assert f"<b>{md(title.strip().split(' (running')[0])}</b>" in markdown
    assert "<b>marketing/web/blog" not in markdown


def test_swapped_guids_are_flagged_with_the_synthetic_inventory_too(tmp_path):
    """No status branches yet: the made-up cell puts each app where the base put it."""
    repo = policy_repo(tmp_path)
    swap_app_guids(repo, FRONTEND, BLOG)
    write_tree(repo / "policies", {"blog.yaml": BLOG_GETS_MYSQL})
    commit_all(repo, "the blog reads MySQL")
    report = run_plan(str(repo / "policies"), "HEAD~1", "HEAD", ["directory"])
    gainers = [p for p in report.diff.principals if p.gained and p.app_id == FRONTEND]
    assert gainers and all(p.name == FRONTEND and p.name_mismatch for p in gainers)
    assert not any(p.name == "marketing/web/blog" for p in report.diff.principals)


def test_an_org_the_inventory_disagrees_with_is_flagged_for_apps_and_spaces(tmp_path):
    """The blog's space runs under payments per the inventory, under marketing per the
    Directory: neither the app nor the app-less space container is named."""
    repo = policy_repo(tmp_path)
    (repo / "cells/cell-2.json").unlink()  # the blog in its true org
    cells = {"cells/cell-1/store.json": CELLS["cells/cell-1/store.json"]}
    cells["cells/cell-3/store.json"] = [
        c("blog-0", "198.18.3.2", BLOG, WEB, PAYMENTS),
        c("web-task", "198.18.3.3", "", WEB, PAYMENTS),
    ]
    for rel, containers in cells.items():
        write_tree(repo, {rel: dump_store(containers)})
    commit_all(repo, "inventory")
    write_tree(
        repo / "policies",
        {
            "cdn.yaml": """
                kind: Destination
                name: cdn-origin
                protocol: tcp
                ips: 198.19.70.0/28
                ports: [443]
                ---
                kind: EgressPolicy
                name: marketing-web-to-cdn
                source: {type: space, name: marketing/web}
                destination: cdn-origin
                """
        },
    )
    commit_all(repo, "marketing/web reaches the CDN origin")
    by_id = {(p["space_id"], p["app_id"]): p for p in gaining(principals(repo), "198.19.70.0/28")}
    assert set(by_id) == {(WEB, BLOG), (WEB, "")}
    app, space = by_id[(WEB, BLOG)], by_id[(WEB, "")]
    assert app["name"] == BLOG and space["name"] == WEB
    assert app["name_mismatch"] == (
        f"directory says marketing/web/blog in org {MARKETING}, inventory says org {PAYMENTS}"
    )
    assert space["name_mismatch"] == (
        f"directory says marketing/web in org {MARKETING}, inventory says org {PAYMENTS}"
    )


def test_an_unknown_app_is_shown_by_guid_without_a_mismatch(tmp_path):
    """An app the Directory does not list has no name to doubt: its GUID, as before."""
    repo = policy_repo(tmp_path)
    stranger = "a1b2c3d4-0099-4e5f-9a8b-000000000099"
    cells = dict(CELLS)
    cells["cells/cell-3/store.json"] = [c("stranger-0", "198.18.3.9", stranger, PROD, PAYMENTS)]
    for rel, containers in cells.items():
        write_tree(repo, {rel: dump_store(containers)})
    commit_all(repo, "inventory")
    edit(repo, "destinations.yaml", "ports: 8125", "ports: 8126")
    commit_all(repo, "metrics port")
    doc = {p["app_id"]: p for p in principals(repo)}
    assert doc[stranger]["name"] == stranger and doc[stranger]["name_verified"] is True
    assert doc[BACKEND]["name"] == "payments/prod/backend"
