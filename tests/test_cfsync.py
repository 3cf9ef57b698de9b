"""`asgctl cf sync` against a stand-in Cloud Controller and UAA (tests/cfstandin.py).

The stand-in is a real HTTP server on 127.0.0.1 answering in the shapes cloud_controller_ng's
v3 docs give (its docstring cites each: root links, pagination, org/space/app/security group
objects, 429 Retry-After); the client and the sync run unmodified against it.  Every list is
served two entries a page unless a test says otherwise, so pagination is always exercised.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from reconciler.cli import main
from reconciler.sources.cc import CCError, Client
from reconciler.sources.cfsync import MARKER, read_foundation
from tests.cfstandin import CLIENT_ID, CLIENT_SECRET, StandIn, running

REPO = Path(__file__).resolve().parent.parent
ENV = {"ASGCTL_CF_CLIENT_ID": CLIENT_ID, "ASGCTL_CF_CLIENT_SECRET": CLIENT_SECRET}
API_RULES = [{"protocol": "tcp", "destination": "198.19.20.20", "ports": "443"}]
DNS_RULES = [{"protocol": "udp", "destination": "198.19.53.53", "ports": "53"}]


class Foundation:
    """A small foundation: three orgs, four spaces, four apps, four groups (two pages each)."""

    def __init__(self, standin: StandIn) -> None:
        self.cc = standin
        self.payments = standin.add_org("payments")
        self.marketing = standin.add_org("marketing")
        self.platform = standin.add_org("platform")
        self.prod = standin.add_space(self.payments, "prod")
        self.staging = standin.add_space(self.payments, "staging")
        self.web = standin.add_space(self.marketing, "web")
        self.tools = standin.add_space(self.platform, "tools")
        self.backend = standin.add_app(self.prod, "backend")
        self.frontend = standin.add_app(self.prod, "frontend")
        self.blog = standin.add_app(self.web, "blog")
        self.worker = standin.add_app(self.tools, "worker")
        standin.add_group("card-api", API_RULES, running=[self.prod], staging=[self.staging])
        standin.add_group(
            "platform-dns", DNS_RULES, globally_enabled={"running": True, "staging": True}
        )
        standin.add_group("tools-out", [{"protocol": "all", "destination": "198.19.99.0/24"}])
        standin.add_group(
            "blog-smtp",
            [{"protocol": "tcp", "destination": "198.19.25.25", "ports": "25"}],
            running=[self.web],
        )


@pytest.fixture
def cf() -> Iterator[Foundation]:
    with running(StandIn(max_per_page=2)) as standin:
        yield Foundation(standin)


def sync(api: str, out: Path, *extra: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(
        main, ["cf", "sync", "--api", api, "--out", str(out), *extra], env=env or ENV
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_store(path: Path, f: Foundation) -> Path:
    """A cell running backend (payments/prod) and blog (marketing/web), as CF's store.json."""
    entries = {
        "c-backend": ("198.18.1.2", f.backend, f.prod, f.payments),
        "c-blog": ("198.18.1.3", f.blog, f.web, f.marketing),
    }
    store = {
        handle: {
            "handle": handle,
            "ip": ip,
            "metadata": {
                "app_id": app,
                "space_id": space,
                "org_id": org,
                "policy_group_id": app,
                "container_workload": "app",
            },
        }
        for handle, (ip, app, space, org) in entries.items()
    }
    path.write_text(json.dumps(store))
    return path


def explain(policies: Path, store: Path, app: str, to: str = "198.19.20.20:443/tcp") -> Result:
    return CliRunner().invoke(
        main,
        [
            "explain",
            "--containers",
            str(store),
            "--policies",
            str(policies),
            "--app",
            app,
            "--to",
            to,
        ],
    )


def listed_pages(standin: StandIn, kind: str) -> list[str]:
    return [p for m, p, _ in standin.requests if m == "GET" and p.startswith(f"/v3/{kind}?")]


# --------------------------------------------------------------------------------------------
# The black-box check


def test_sync_writes_a_repo_that_validates_and_explains_by_name(cf: Foundation, tmp_path: Path):
    out = tmp_path / "repo" / "policies"
    result = sync(cf.cc.url, out)
    assert result.exit_code == 0, result.stderr
    assert "synced 3 orgs, 4 spaces, 4 apps and 4 security groups" in result.stdout
    for kind in ("organizations", "spaces", "apps", "security_groups"):
        # asked for 5000, granted 2: the second page is read through pagination.next
        pages = listed_pages(cf.cc, kind)
        assert pages[0] == f"/v3/{kind}?per_page=5000"
        assert pages[1:] == [f"/v3/{kind}?page=2&per_page=2"]
    validate = CliRunner().invoke(main, ["validate", str(out)])
    assert validate.exit_code == 0, validate.output
    group = yaml.safe_load((out / "security-groups/card-api.yaml").read_text())
    assert group["running_spaces"] == ["payments/prod"]  # a name, not a GUID
    assert group["staging_spaces"] == ["payments/staging"]

    store = write_store(tmp_path / "store.json", cf)
    allowed = explain(out, store, "payments/prod/backend")
    assert allowed.exit_code == 0, allowed.output
    assert "card-api" in allowed.output
    denied = explain(out, store, "marketing/web/blog")
    assert denied.exit_code == 3, denied.output


def test_second_sync_changes_no_byte_and_git_stays_clean(cf: Foundation, tmp_path: Path):
    repo = tmp_path / "repo"
    out = repo / "policies"
    assert sync(cf.cc.url, out).exit_code == 0
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sync")
    before = snapshot(repo / "policies")

    again = sync(cf.cc.url, out)
    assert again.exit_code == 0, again.stderr
    assert "0 written, 0 removed, 7 unchanged" in again.stdout
    assert snapshot(repo / "policies") == before
    assert git(repo, "status", "--porcelain") == ""


def test_unbind_in_cf_then_sync_turns_the_allow_into_a_deny(cf: Foundation, tmp_path: Path):
    repo = tmp_path / "repo"
    out = repo / "policies"
    store = write_store(tmp_path / "store.json", cf)
    assert sync(cf.cc.url, out).exit_code == 0
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sync")
    assert explain(out, store, "payments/prod/backend").exit_code == 0

    cf.cc.unbind("card-api", "running", cf.prod)  # cf unbind-security-group card-api payments prod
    result = sync(cf.cc.url, out)
    assert result.exit_code == 0, result.stderr
    assert "wrote security-groups/card-api.yaml" in result.stdout
    # the reviewer's diff: one file, the binding's lines only
    assert git(repo, "diff", "--numstat") == "0\t2\tpolicies/security-groups/card-api.yaml\n"
    assert explain(out, store, "payments/prod/backend").exit_code == 3


# --------------------------------------------------------------------------------------------
# Ownership: vanished groups, --prune, foreign files


def test_a_group_gone_from_cf_is_reported_and_removed_only_with_prune(
    cf: Foundation, tmp_path: Path
):
    out = tmp_path / "policies"
    assert sync(cf.cc.url, out).exit_code == 0
    cf.cc.groups.remove(cf.cc.group("tools-out"))  # cf delete-security-group tools-out

    kept = sync(cf.cc.url, out)
    assert kept.exit_code == 0
    assert "gone from CF: security-groups/tools-out.yaml (kept; --prune removes it)" in kept.stdout
    assert (out / "security-groups/tools-out.yaml").exists()

    report = json.loads(sync(cf.cc.url, out, "--prune", "--format", "json").stdout)
    assert report["vanished"] == [{"file": "security-groups/tools-out.yaml", "removed": True}]
    assert report["removed"] == ["security-groups/tools-out.yaml"]
    assert not (out / "security-groups/tools-out.yaml").exists()


def test_an_org_gone_from_cf_loses_its_directory_file_without_prune(cf: Foundation, tmp_path: Path):
    """A Directory file only names things; a stale one would claim GUIDs a renamed org's new
    file holds, so it goes with the org."""
    out = tmp_path / "policies"
    assert sync(cf.cc.url, out).exit_code == 0
    cf.cc.orgs[:] = [(g, "payments-eu" if g == cf.payments else n) for g, n in cf.cc.orgs]
    result = sync(cf.cc.url, out)
    assert "removed directory/payments.yaml" in result.stdout
    assert "wrote directory/payments-eu.yaml" in result.stdout
    # bindings follow the rename
    group = yaml.safe_load((out / "security-groups/card-api.yaml").read_text())
    assert group["running_spaces"] == ["payments-eu/prod"]
    assert CliRunner().invoke(main, ["validate", str(out)]).exit_code == 0


def test_files_it_does_not_own_are_never_touched(cf: Foundation, tmp_path: Path):
    out = tmp_path / "policies"
    (out / "security-groups").mkdir(parents=True)
    mine = {
        "security-groups/hand-written.yaml": "kind: SecurityGroup\nname: hand\nrules: []\n",
        "egress-policies.yaml": "# the operator's\n",
        "directory/README.md": "notes\n",
    }
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    assert sync(cf.cc.url, out, "--prune").exit_code == 0
    assert sync(cf.cc.url, out, "--prune").exit_code == 0
    for rel, text in mine.items():
        assert (out / rel).read_text() == text
    assert (out / "security-groups/card-api.yaml").read_text().startswith(MARKER + "\n")


def test_a_foreign_file_holding_a_groups_name_stops_the_sync_with_nothing_written(
    cf: Foundation, tmp_path: Path
):
    out = tmp_path / "policies"
    (out / "security-groups").mkdir(parents=True)
    (out / "security-groups/card-api.yaml").write_text("# mine\n")
    result = sync(cf.cc.url, out)
    assert result.exit_code == 1
    assert "security-groups/card-api.yaml" in result.stderr
    assert "nothing was written" in result.stderr
    assert snapshot(out) == {"security-groups/card-api.yaml": b"# mine\n"}


def test_a_symlinked_output_folder_is_refused(cf: Foundation, tmp_path: Path):
    """`security-groups` pointing elsewhere would make the sync write outside DIR."""
    out = tmp_path / "policies"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "security-groups").symlink_to(elsewhere)
    result = sync(cf.cc.url, out)
    assert result.exit_code == 1
    assert "is not a folder (a symlink or a file)" in result.stderr
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Names and GUIDs; hostile content


def test_ambiguous_or_unusable_names_fall_back_to_guids(tmp_path: Path):
    with running(StandIn(max_per_page=2)) as cc:
        acme = cc.add_org("acme")
        slash = cc.add_org("acme/eu")  # not a Directory name: written as its GUID
        twin_a = cc.add_space(acme, "prod")
        twin_b = cc.add_space(acme, "prod")  # two spaces share a name: both by GUID
        solo = cc.add_space(acme, "dev")
        other = cc.add_space(slash, "prod")
        spaced = cc.add_app(solo, "my app")
        fine = cc.add_app(solo, "api")
        cc.add_group("g", API_RULES, running=[twin_a, twin_b, solo, other])
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    group = yaml.safe_load((tmp_path / "p/security-groups/g.yaml").read_text())
    assert group["running_spaces"] == sorted([twin_a, twin_b, "acme/dev", other])
    directory = yaml.safe_load((tmp_path / "p/directory/acme.yaml").read_text())
    (org,) = directory["orgs"]
    assert [(s["name"], s["guid"]) for s in org["spaces"]] == sorted(
        [("dev", solo), (twin_a, twin_a), (twin_b, twin_b)]
    )
    dev = next(s for s in org["spaces"] if s["guid"] == solo)
    assert {a["name"] for a in dev["apps"]} == {"api", spaced}
    assert fine in {a["guid"] for a in dev["apps"]}
    assert (tmp_path / f"p/directory/{slash}.yaml").exists()
    assert "name 'acme/eu'" not in result.stderr  # shown plainly, not repr'd
    assert "name acme/eu cannot be a Directory name" in result.stderr
    assert "name prod is shared by another one here" in result.stderr
    assert CliRunner().invoke(main, ["validate", str(tmp_path / "p")]).exit_code == 0


HOSTILE_NAMES = [
    "../../../etc/passwd",
    "a\nkind: SecurityGroup",
    "- &anchor *alias: [x]",
    "#comment",
    "null",
    "'quoted\"",
    "C:\\win\\path",
    "\u202egnp.exe",
    "x" * 255,
]


def test_hostile_names_cannot_leave_the_folder_or_break_the_yaml(tmp_path: Path):
    out = tmp_path / "deep" / "policies"
    with running(StandIn(max_per_page=3)) as cc:
        spaces = []
        for i, name in enumerate(HOSTILE_NAMES):
            org = cc.add_org(name)
            spaces.append(cc.add_space(org, name))
            cc.add_app(spaces[-1], name)
            if name.isprintable():  # CC refuses unprintable group names (SECURITY_GROUP_NAME_REGEX)
                cc.add_group(name[:250], API_RULES, running=[spaces[-1]])
            else:
                cc.add_group(f"g{i}", API_RULES, running=[spaces[-1]])
        result = sync(cc.url, out)
    assert result.exit_code == 0, result.stderr
    every = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(out in p.parents for p in every)
    assert {p.parent.name for p in every} == {"directory", "security-groups"}
    names = set()
    for path in every:
        (doc,) = yaml.safe_load_all(path.read_text())
        if doc["kind"] == "SecurityGroup":
            names.add(doc["name"])
    assert {n[:250] for n in HOSTILE_NAMES if n.isprintable()} <= names
    validate = CliRunner().invoke(main, ["validate", str(out)])
    assert validate.exit_code == 0, validate.output
    assert "\n" not in "".join(result.stderr.splitlines())  # one warning, one line
    assert "\u202e" not in result.stderr


def test_a_group_cf_itself_would_refuse_stops_the_sync(tmp_path: Path):
    """A name with a line break (CC's SECURITY_GROUP_NAME_REGEX refuses it) or a rule CC's
    grammar refuses means the data did not come from a sane CC: nothing is written."""
    with running(StandIn()) as cc:
        cc.add_group("bad\nname", API_RULES)
        cc.add_group("bad-rule", [{"protocol": "tcp", "destination": "198.19.0.1", "ports": "0"}])
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 1
    assert "bad\\nname: name is invalid" in result.stderr
    assert "bad-rule: Rules[0]:" in result.stderr
    assert not (tmp_path / "p").exists()


def test_a_binding_that_is_not_a_guid_is_refused(tmp_path: Path):
    """`../x` or `org/space` as a space GUID would be read as a name path by the validator."""
    with running(StandIn()) as cc:
        cc.add_group("g", API_RULES, running=["payments/prod"])
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 1
    assert "g: running_spaces: payments/prod is not a GUID" in result.stderr


def test_a_group_with_a_duplicated_json_key_is_refused(tmp_path: Path):
    """`{"ports": "443", "ports": "1-65535"}`: a reviewer reads the first, a JSON reader keeps
    the last; what becomes policy is read by jsonsafe with duplicate keys refused."""
    with running(StandIn()) as cc:
        page = json.dumps(cc.page("security_groups", 1, 50))
        rule = (
            '{"protocol": "tcp", "destination": "198.19.0.1", "ports": "443", "ports": "1-65535"}'
        )
        body = page.replace(
            '"resources": []', f'"resources": [{{"guid": "g1", "name": "g", "rules": [{rule}]}}]'
        )
        body = body.replace('"total_results": 0', '"total_results": 1')
        cc.overrides["/v3/security_groups"] = body.encode()
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 1
    assert 'not valid JSON: duplicate key "ports"' in result.stderr
    assert not (tmp_path / "p").exists()


def test_a_page_larger_than_the_cap_is_refused(tmp_path: Path):
    with running(StandIn()) as cc:
        space = cc.add_space(cc.add_org("o"), "s")
        for i in range(200):
            cc.add_app(space, f"app-{i}")
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET, max_body=16 * 1024)
        with pytest.raises(CCError, match=r"GET .*/v3/apps\?per_page=5000: the response is \d+ "):
            read_foundation(client, lambda _p: None)


def test_pagination_next_to_another_host_is_not_followed(tmp_path: Path):
    """The bearer token goes only to the API's own origin and the listing's own path."""
    with running(StandIn()) as cc:
        page = cc.page("organizations", 1, 50)
        page["pagination"]["next"] = {"href": "http://198.51.100.1/v3/organizations?page=2"}
        cc.overrides["/v3/organizations"] = page
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET)
        with pytest.raises(CCError, match=r"pagination\.next points at http://198\.51\.100\.1/"):
            client.list_all("/v3/organizations", lambda r: r)


def test_a_pagination_loop_is_refused():
    with running(StandIn()) as cc:
        cc.add_org("o")
        page = cc.page("organizations", 1, 50)
        page["pagination"]["next"] = {"href": f"{cc.url}/v3/organizations?page=1&per_page=50"}
        page["pagination"]["total_results"] = 2
        cc.overrides["/v3/organizations"] = page
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET)
        with pytest.raises(CCError, match="loops back"):
            client.list_all("/v3/organizations", lambda r: r)


def test_a_listing_that_changed_while_paged_is_refused():
    """Offset pages shift when a resource is deleted mid-listing: one is then never seen."""
    with running(StandIn(max_per_page=2)) as cc:
        for i in range(4):
            cc.add_org(f"o{i}")
        seen: list[str] = []

        def pick(r: dict[str, Any]) -> str:
            seen.append(str(r["name"]))
            if len(seen) == 2:  # cf delete-org o0, between page 1 and page 2
                del cc.orgs[0]
            return str(r["name"])

        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET)
        # the first pass missed o2 (shifted onto page 1); the second pass is whole
        assert client.list_all("/v3/organizations", pick) == ["o1", "o2", "o3"]
        assert seen[:3] == ["o0", "o1", "o3"]


def test_a_listing_that_never_holds_still_is_refused():
    with running(StandIn(max_per_page=2)) as cc:
        for i in range(4):
            cc.add_org(f"o{i}")

        def pick(r: dict[str, Any]) -> str:
            if r["name"] == "o1":  # an org created after every first page
                cc.add_org(f"new-{len(cc.orgs)}")
            return str(r["name"])

        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET)
        with pytest.raises(CCError, match=r"organizations changed while it was read \(its pages "):
            client.list_all("/v3/organizations", pick)


# --------------------------------------------------------------------------------------------
# Auth, retries, errors


def test_a_token_refused_mid_sync_is_renewed_once_and_the_sync_completes():
    """CC answers 401 CF-InvalidAuthToken for a revoked/expired token; the client takes a new
    client_credentials grant (UAA gives that grant no refresh token) and goes on."""
    with running(StandIn(max_per_page=2)) as cc:
        f = Foundation(cc)
        cc.revoke_after = 3  # each token works for three requests
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET)
        found = read_foundation(client, lambda _p: None)
    assert len(found.apps) == 4 and len(found.groups) == 4
    assert f.backend in {a.guid for a in found.apps}
    assert cc.token_requests() == 3  # 8 listing pages, 3 uses a token


def test_a_token_about_to_expire_is_renewed_before_it_is_used():
    with running(StandIn(token_lifetime=20)) as cc:  # within the 30 s renewal margin
        Foundation(cc)
        read_foundation(Client(cc.url, CLIENT_ID, CLIENT_SECRET), lambda _p: None)
    listings = [p for m, p, _ in cc.requests if m == "GET" and p.startswith("/v3/")]
    assert cc.token_requests() == len(listings) == 4


def test_429_is_retried_after_what_retry_after_says():
    slept: list[float] = []
    with running(StandIn(max_per_page=2)) as cc:
        Foundation(cc)
        cc.fail("/v3/apps", 429, **{"Retry-After": "7"})
        found = read_foundation(
            Client(cc.url, CLIENT_ID, CLIENT_SECRET, sleep=slept.append), lambda _p: None
        )
    assert slept == [7.0]
    assert len(found.apps) == 4


def test_5xx_is_retried_with_back_off_then_succeeds():
    slept: list[float] = []
    with running(StandIn(max_per_page=2)) as cc:
        Foundation(cc)
        cc.fail("/v3/spaces", 500)
        cc.fail("/v3/spaces", 503)
        found = read_foundation(
            Client(cc.url, CLIENT_ID, CLIENT_SECRET, sleep=slept.append), lambda _p: None
        )
    assert slept == [0.5, 1.0]
    assert len(found.spaces) == 4


def test_5xx_that_never_ends_is_an_error_after_the_retries():
    slept: list[float] = []
    with running(StandIn()) as cc:
        cc.fail("/v3/organizations", 502, times=100)
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET, sleep=slept.append)
        with pytest.raises(CCError, match=r"GET .*/v3/organizations\?per_page=5000: HTTP 502"):
            client.list_all("/v3/organizations", lambda r: r)
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_a_retry_after_longer_than_the_sync_waits_is_an_error():
    with running(StandIn()) as cc:
        cc.fail("/v3/organizations", 429, **{"Retry-After": "3600"})
        client = Client(cc.url, CLIENT_ID, CLIENT_SECRET, sleep=lambda _s: None)
        with pytest.raises(CCError, match="Retry-After 3600 s, longer than the 120 s"):
            client.list_all("/v3/organizations", lambda r: r)


def secretless(result: Result, standin: StandIn) -> None:
    text = result.stdout + result.stderr
    assert CLIENT_SECRET not in text
    assert not any(token in text for token in standin.tokens)


def test_a_wrong_secret_is_a_clear_error_that_never_shows_the_secret(tmp_path: Path):
    with running(StandIn()) as cc:
        env = dict(ENV, ASGCTL_CF_CLIENT_SECRET="wrong-" + CLIENT_SECRET)
        result = sync(cc.url, tmp_path / "p", env=env)
    assert result.exit_code == 1
    assert f"UAA at {cc.url}/uaa refused the client credentials of 'asgctl-sync'" in result.stderr
    assert "wrong-" not in result.stdout + result.stderr
    secretless(result, cc)


def test_401_after_a_fresh_token_is_a_clear_error(tmp_path: Path):
    with running(StandIn()) as cc:
        cc.fail("/v3/organizations", 401, times=2)
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 1
    assert "401 Unauthorized: CF-Stand-in - injected 401" in result.stderr
    assert cc.token_requests() == 2
    secretless(result, cc)


def test_403_says_which_authority_the_client_needs(tmp_path: Path):
    with running(StandIn()) as cc:
        cc.fail("/v3/security_groups", 403)
        result = sync(cc.url, tmp_path / "p")
    assert result.exit_code == 1
    assert "403 Forbidden" in result.stderr
    assert "cloud_controller.admin_read_only" in result.stderr
    secretless(result, cc)


def test_unreachable_api_is_a_clear_error(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slept: list[float] = []
    client = Client(f"http://127.0.0.1:{port}", CLIENT_ID, CLIENT_SECRET, sleep=slept.append)
    with pytest.raises(
        CCError, match=rf"cannot reach http://127.0.0.1:{port} \(Connection refused"
    ):
        client.uaa_url()
    assert len(slept) == 5


def test_the_uaa_is_found_from_links_login_too():
    """Older foundations name the UAA only as `login` in the root document."""
    with running(StandIn(uaa_link="login")) as cc:
        Foundation(cc)
        found = read_foundation(Client(cc.url, CLIENT_ID, CLIENT_SECRET), lambda _p: None)
    assert len(found.orgs) == 3
    assert any(p == "/login/oauth/token" for m, p, _ in cc.requests if m == "POST")


def test_the_secret_is_never_a_flag(tmp_path: Path):
    result = CliRunner().invoke(
        main, ["cf", "sync", "--api", "http://x", "--out", str(tmp_path), "--client-secret", "s"]
    )
    assert result.exit_code == 2
    assert "No such option '--client-secret'" in result.stderr


def test_without_client_credentials_it_says_which_variables(tmp_path: Path):
    result = CliRunner().invoke(
        main, ["cf", "sync", "--api", "http://x", "--out", str(tmp_path)], env={}
    )
    assert result.exit_code == 1
    assert "give --client-id or set ASGCTL_CF_CLIENT_ID" in result.stderr


def test_plain_http_works_with_a_warning(cf: Foundation, tmp_path: Path):
    result = sync(cf.cc.url, tmp_path / "p")
    assert result.exit_code == 0
    assert f"warning: {cf.cc.url} is plain http" in result.stderr


# --------------------------------------------------------------------------------------------
# TLS


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.mark.requires("openssl")
def test_tls_untrusted_then_trusted_by_ca_cert_or_skipped(tls_cert: tuple[Path, Path], tmp_path):
    import ssl

    key, cert = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with running(StandIn(tls=context)) as cc:
        Foundation(cc)
        untrusted = sync(cc.url, tmp_path / "a")
        trusted = sync(cc.url, tmp_path / "b", "--ca-cert", str(cert))
        skipped = sync(cc.url, tmp_path / "c", "--skip-ssl-validation")
    assert untrusted.exit_code == 1
    assert f"TLS: the certificate of {cc.url} is not trusted" in untrusted.stderr
    assert "--ca-cert FILE" in untrusted.stderr
    assert trusted.exit_code == 0, trusted.stderr
    assert "warning" not in trusted.stderr
    assert skipped.exit_code == 0
    assert "--skip-ssl-validation: the Cloud Controller's and UAA's certificates are not" in (
        skipped.stderr
    )
    assert snapshot(tmp_path / "b") == snapshot(tmp_path / "c")


# --------------------------------------------------------------------------------------------
# Progress: on a terminal only


def _run_with_stderr(args: list[str], tty: bool) -> tuple[int, str, str]:
    """Run `asgctl` in a child whose stderr is a pseudo-terminal (tty) or a pipe."""
    command = [str(Path(sys.executable).parent / "asgctl"), *args]
    env = dict(os.environ, **ENV)
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=follower, env=env, cwd=REPO, text=True
    )
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    out = child.stdout.read() if child.stdout else ""
    return child.wait(timeout=60), out, seen.decode()


def test_progress_shows_on_a_terminal_and_never_when_piped_or_json(cf: Foundation, tmp_path):
    args = ["cf", "sync", "--api", cf.cc.url]
    code, _, on_tty = _run_with_stderr([*args, "--out", str(tmp_path / "a")], tty=True)
    assert code == 0
    assert "apps: page 2/2, 4/4 resources" in on_tty
    assert "security_groups: page 2/2, 4/4 resources" in on_tty
    code, _, piped = _run_with_stderr([*args, "--out", str(tmp_path / "b")], tty=False)
    assert code == 0
    assert "page" not in piped
    code, out, json_tty = _run_with_stderr(
        [*args, "--out", str(tmp_path / "c"), "--format", "json"], tty=True
    )
    assert code == 0
    assert "page" not in json_tty
    assert json.loads(out)["counts"] == {"orgs": 3, "spaces": 4, "apps": 4, "security_groups": 4}
