"""The agent's edges that need no namespace: git fetch and cache, signatures, the status
writer, the inventory watcher and the fleet reader, against real git (file:// and a git
daemon on loopback).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from asgctl_lab.gitserver import GitDaemon, git
from reconciler.agent.fleet import read_fleet, render_fleet
from reconciler.agent.source import GitSource, SourceError
from reconciler.agent.verify import SignatureVerifier
from reconciler.agent.watch import InventoryWatcher
from reconciler.sources.gitio import classify
from reconciler.status.write import StatusWriter
from tests.agentkit import (  # noqa: F401 - fixtures
    git_server,
    local_repo,
    policy_repo,
    sg,
    ssh_signing_keys,
    tcp_rules,
)

pytestmark = pytest.mark.requires("git")


def _origin(tmp_path: Path, commits: int = 5) -> tuple[Path, Path, str]:
    """A work tree with `commits` commits pushed to a bare repo; returns (work, bare, url)."""
    repo = local_repo(tmp_path)
    for i in range(commits):
        repo.commit(f"c{i}", {"sg.yaml": sg("web", tcp_rules(i + 1))}, push=False)
    repo.push()
    return repo.root, repo.bare, repo.url


def test_first_fetch_is_shallow_and_later_ones_keep_the_history(tmp_path: Path) -> None:
    work, bare, url = _origin(tmp_path)
    src = GitSource(url, "main", tmp_path / "cache.git", depth=1)
    first = src.fetch()
    assert first.shallow and first.sha == git("rev-parse", "HEAD", cwd=work)
    assert git("--git-dir", str(src.path), "rev-list", "--count", first.sha) == "1"
    (work / "policies" / "more.yaml").write_text(sg("db", tcp_rules(1, net=2)))
    git("add", "-A", cwd=work)
    git("commit", "-qm", "next", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", "next2", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    second = src.fetch()
    assert src.is_ancestor(first.sha, second.sha)
    assert not src.is_ancestor(second.sha, first.sha)
    # Only the policy branch comes down: no tags, no other branches.
    git("tag", "v1", cwd=work)
    git("push", "-q", str(bare), "v1", "HEAD:refs/heads/status/other", cwd=work)
    src.fetch()
    refs = git("--git-dir", str(src.path), "for-each-ref", "--format=%(refname)")
    assert refs == "refs/remotes/origin/main"


def test_a_rewind_is_detected_even_from_a_shallow_cache(tmp_path: Path) -> None:
    work, bare, url = _origin(tmp_path)
    src = GitSource(url, "main", tmp_path / "cache.git", depth=1)
    applied = src.fetch().sha
    git("reset", "-q", "--hard", "HEAD~2", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", "rewritten", cwd=work)
    git("push", "-q", "--force", str(bare), "main", cwd=work)
    head = src.fetch().sha
    assert not src.is_ancestor(applied, head)
    # A cache that lost the applied commit (re-cloned shallow) unshallows before saying no.
    src.reset()
    src.fetch()
    assert not src.has_commit(applied)
    assert not src.is_ancestor(applied, head)
    assert src.is_ancestor(git("rev-parse", "HEAD~1", cwd=work), head)


def test_a_corrupt_cache_is_fetched_again(tmp_path: Path) -> None:
    _, _, url = _origin(tmp_path, commits=2)
    src = GitSource(url, "main", tmp_path / "cache.git", depth=0)
    sha = src.fetch().sha
    src.close()
    (src.path / "HEAD").write_text("garbage\n")
    for pack in (src.path / "objects").rglob("*"):
        if pack.is_file():
            pack.write_bytes(b"\0" * 16)
    fetched = GitSource(url, "main", tmp_path / "cache.git").fetch()
    assert fetched.sha == sha and fetched.recloned
    assert GitSource(url, "main", tmp_path / "cache.git").intact()


@pytest.mark.parametrize("client_protocol", [None, "0"])
def test_a_fetch_is_advertised_the_policy_branch_alone(
    tmp_path: Path,
    git_server: GitDaemon,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    client_protocol: str | None,
) -> None:
    """A fleet's repository holds one `status/<cell>` branch per cell; an agent's fetch must
    not be sent them all every interval (at 10,000 cells the server's work and the bytes grow
    with the fleet: bench/results/fleet.md).  Protocol v2's `ls-refs` with the refspec's
    `ref-prefix` makes the server advertise `refs/heads/main` alone -- also when the agent's
    environment asks git for protocol v0, which would advertise every ref."""
    bare = git_server.create("policy")
    work = tmp_path / "work"
    git("init", "-q", "-b", "main", str(work))
    git("commit", "-q", "--allow-empty", "-m", "policies", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    for i in range(40):
        git("push", "-q", str(bare), f"HEAD:refs/heads/status/cell-{i}", cwd=work)
    trace = tmp_path / "packets"
    monkeypatch.setenv("GIT_TRACE_PACKET", str(trace))
    if client_protocol is not None:
        monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'protocol.version'='{client_protocol}'")
    src = GitSource(git_server.url("policy"), "main", tmp_path / "cache.git")
    for _ in range(2):  # the first fetch (shallow) and a no-op one
        trace.unlink(missing_ok=True)
        src.fetch()
        packets = trace.read_text(errors="replace")
        advertised = set(re.findall(r"fetch< [0-9a-f]{40} (refs/\S+)", packets))
        assert "fetch< version 2" in packets
        assert "fetch> ref-prefix refs/heads/main" in packets
        assert advertised == {"refs/heads/main"}


def test_fetch_failures_are_classified(tmp_path: Path, git_server: GitDaemon) -> None:  # noqa: F811
    git_server.create("policy")
    src = GitSource(git_server.url("policy"), "main", tmp_path / "c1.git", timeout=10)
    with pytest.raises(SourceError) as e:
        src.fetch()  # an empty repository: no such branch
    assert e.value.reason == "BranchNotFound"
    git_server.stop()
    with pytest.raises(SourceError) as e:
        src.fetch()
    assert e.value.reason == "GitUnreachable" and "127.0.0.1" in e.value.message
    assert classify("fatal: Authentication failed for 'https://h/r.git'") == "AuthenticationFailed"
    assert classify("remote: fatal: bad object abc\nfatal: early EOF") == "GitUnreachable"
    assert classify("remote: error: object file x is corrupt") == "FetchFailed"
    missing = "fatal: '/x.git' does not appear to be a git repository\nfatal: Could not read"
    assert classify(missing) == "RepositoryNotFound"
    assert classify("error: object file x is empty\nfatal: loose object x is corrupt") == (
        "CacheCorrupt"
    )


# -- signatures ----------------------------------------------------------------------------


@pytest.mark.requires("ssh-keygen")
def test_ssh_signatures_trusted_untrusted_and_missing(tmp_path: Path) -> None:
    work, bare, url = _origin(tmp_path, commits=1)
    trusted, stranger, allowed = ssh_signing_keys(tmp_path)
    shas = {}
    for name, key in (("good", trusted), ("bad", stranger), ("none", None)):
        sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"] if key else []
        git(*sign, "commit", "-q", "--allow-empty", "-m", name, *(["-S"] if key else []), cwd=work)
        shas[name] = git("rev-parse", "HEAD", cwd=work)
    git("push", "-q", str(bare), "main", cwd=work)
    src = GitSource(url, "main", tmp_path / "cache.git", depth=0)
    src.fetch()
    v = SignatureVerifier(str(allowed), None, tmp_path / "vwork")
    good = v.verify(src.path, shas["good"], src.commit_info(shas["good"]).signed)
    assert good.ok and "ops@example.invalid" in good.signer
    bad = v.verify(src.path, shas["bad"], src.commit_info(shas["bad"]).signed)
    assert not bad.ok and bad.reason == "UntrustedSignature"
    none = v.verify(src.path, shas["none"], src.commit_info(shas["none"]).signed)
    assert not none.ok and none.reason == "UnsignedCommit"


@pytest.mark.requires("gpg")
def test_gpg_keyring_is_the_trust_list(tmp_path: Path) -> None:
    work, bare, url = _origin(tmp_path, commits=1)
    home = tmp_path / "signer-gnupg"
    home.mkdir(mode=0o700)
    env_home = {"GNUPGHOME": str(home)}
    import os

    env = {**os.environ, **env_home}
    try:
        subprocess.run(
            ["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key",
             "Signer <s@example.invalid>", "ed25519", "sign", "never"],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        fpr = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys"],
            check=True, env=env, capture_output=True, text=True,
        ).stdout.split("fpr:::::::::")[1].split(":")[0]  # fmt: skip
        pub = tmp_path / "trusted.asc"
        pub.write_bytes(
            subprocess.run(
                ["gpg", "--batch", "--armor", "--export", fpr], check=True, env=env,
                capture_output=True,
            ).stdout
        )  # fmt: skip
        subprocess.run(
            ["git", "-c", f"user.signingkey={fpr}", "commit", "-q", "--allow-empty", "-S",
             "-m", "gpg"],
            cwd=work, check=True, env={**env, "GIT_CONFIG_GLOBAL": "/dev/null",
                                       "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x",
                                       "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x"},
        )  # fmt: skip
        sha = git("rev-parse", "HEAD", cwd=work)
        git("push", "-q", str(bare), "main", cwd=work)
        src = GitSource(url, "main", tmp_path / "cache.git", depth=0)
        src.fetch()
        trusting = SignatureVerifier(None, str(pub), tmp_path / "v1").verify(src.path, sha, True)
        assert trusting.ok and "Signer" in trusting.signer
        empty = tmp_path / "empty.asc"
        empty.write_text("")
        other = SignatureVerifier(None, None, tmp_path / "v2").verify(src.path, sha, True)
        assert not other.ok and other.reason == "UntrustedSignature"
    finally:
        for h in (home, tmp_path / "v1" / "gnupg", tmp_path / "v2" / "gnupg"):
            subprocess.run(
                ["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(h)},
                check=False, capture_output=True,
            )  # fmt: skip


# -- status writer and fleet ---------------------------------------------------------------


def test_status_branch_stays_one_commit_and_never_touches_main(tmp_path: Path) -> None:
    _work, bare, url = _origin(tmp_path, commits=1)
    main_before = git("--git-dir", str(bare), "rev-parse", "main")
    w = StatusWriter(url, "status/cell-1", tmp_path / "status.git")
    for i in range(60):
        w.push(f"cell: cell-1\nn: {i}\n", f"status {i}", when=1_700_000_000 + i)
    assert git("--git-dir", str(bare), "rev-list", "--count", "status/cell-1") == "1"
    assert git("--git-dir", str(bare), "show", "status/cell-1:status.yaml").endswith("n: 59")
    assert git("--git-dir", str(bare), "ls-tree", "--name-only", "status/cell-1") == "status.yaml"
    assert git("--git-dir", str(bare), "rev-parse", "main") == main_before
    with pytest.raises(ValueError):
        StatusWriter(url, "main", tmp_path / "x.git")


def test_fleet_reads_every_status_branch(tmp_path: Path) -> None:
    work, _bare, url = _origin(tmp_path, commits=3)
    shas = git("rev-list", "main", cwd=work).split()
    for cell, sha, ready in (("cell-a", shas[0], "True"), ("cell-b", shas[2], "False")):
        doc = (
            f"cell: {cell}\nlastAppliedRevision: main@sha1:{sha}\nlastSyncTime: t\n"
            f"conditions:\n- {{type: Ready, status: '{ready}', reason: R, message: m}}\n"
            "counts: {installedRules: 12, cfEquivalentRules: 30, containers: 2}\n"
            "drift: {corrections: 1}\n"
        )
        StatusWriter(url, f"status/{cell}", tmp_path / f"{cell}.git").push(doc, "s")
    fleet = read_fleet(url, "main")
    assert [(c.cell, c.ready, c.behind) for c in fleet.cells] == [
        ("cell-a", "True", 0),
        ("cell-b", "False", 2),
    ]
    assert not fleet.all_ready
    text = render_fleet(fleet, "text")
    assert "cell-b" in text and "CF-EQUIV" in text


# -- inventory watcher ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_watcher_sees_a_replaced_file_quickly(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "store.json"
    path.write_text("{}")
    seen = threading.Event()
    w = InventoryWatcher(path, seen.set, mode=mode, poll=0.05)
    w.start()
    try:
        time.sleep(0.1)
        seen.clear()
        t0 = time.monotonic()
        tmp = tmp_path / ".store.json.tmp"
        tmp.write_text('{"a": 1}')
        tmp.replace(path)
        assert seen.wait(2.0)
        assert time.monotonic() - t0 < 0.5
        assert w.mechanism == mode
    finally:
        w.stop()
