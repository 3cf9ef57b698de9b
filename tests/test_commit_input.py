"""Commits are untrusted input (issue 20, attacks 7 and 8).

7. One odd commit must not stall an agent or hide it: a committer date of `²²²` (which
   `str.isdigit()` accepts and `int()` refuses) and a 70 MB subject are refusals with a
   reason in the status -- the applied revision stays enforced, the agent keeps cycling, and
   what the status quotes of the commit is short and free of control characters.
8. A retired SSH signing key (`valid-before` in the past) cannot sign a commit whose
   committer date is set back to when the key was valid.

Real git throughout: a bare repository (file://), commits written by git, signatures made
and checked by ssh-keygen through git.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgctl_lab.gitserver import git
from reconciler.agent.config import build_config
from reconciler.agent.core import condition
from reconciler.agent.loop import SYNC, Agent
from reconciler.agent.source import MalformedCommit, parse_commit
from reconciler.agent.verify import SignatureVerifier, signers_valid_at
from tests.agentkit import (
    PolicyRepo,
    container,
    local_repo,
    sg,
    ssh_signing_keys,
    tcp_rules,
    write_store,
)
from tests.test_agent_loop import MemoryDataplane

pytestmark = pytest.mark.requires("git")
needs_ssh_keygen = pytest.mark.requires("ssh-keygen")


def _agent(tmp_path: Path, repo: PolicyRepo, **settings: Any) -> Agent:
    store = write_store(tmp_path / "store.json", [container("c0", 0), container("c1", 1)])
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "mem",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "retry-base": "1s",
            **settings,
        },
        {},
    )
    return Agent(cfg, out=io.StringIO(), err=io.StringIO(), backend=MemoryDataplane())


def _forge(repo: PolicyRepo, body_of: Any) -> str:
    """A commit object git stores but `git commit` would never write, on top of main."""
    parent = git("rev-parse", "HEAD", cwd=repo.root)
    tree = git("rev-parse", "HEAD^{tree}", cwd=repo.root)
    body = body_of(tree, parent)
    sha = git(
        "hash-object", "-t", "commit", "--literally", "-w", "--stdin", cwd=repo.root, input=body
    )
    git("update-ref", "refs/heads/main", sha, cwd=repo.root)
    repo.push()
    return sha


def _status(repo: PolicyRepo) -> tuple[dict[str, Any], int]:
    text = git("--git-dir", str(repo.bare), "show", "status/mem:status.yaml")
    return yaml.safe_load(text), len(text.encode())


def _cond(doc: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in doc["conditions"] if c["type"] == type_)


# -- attack 7: malformed commit metadata -----------------------------------------------------


def test_a_date_of_unicode_digits_is_refused_and_the_agent_keeps_enforcing(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    good = repo.commit("good", {"sg.yaml": sg("web", tcp_rules(3))})
    agent = _agent(tmp_path, repo)
    assert agent.cycle(SYNC).applied.sha == good  # type: ignore[union-attr]

    bad = _forge(
        repo,
        lambda tree, parent: (
            f"tree {tree}\nparent {parent}\nauthor Eve <eve@example.invalid> 1700000000 +0000\n"
            "committer Eve <eve@example.invalid> ²²² +0000\n\nodd date\n"
        ),
    )
    for _ in range(2):  # every cycle: a refusal, not an exception
        st = agent.cycle(SYNC)
        ready = condition(st.conditions, "Ready")
        assert ready is not None and (ready.status, ready.reason) == ("False", "MalformedCommit")
        assert "committer" in ready.message and f"still enforcing main@sha1:{good}" in ready.message
        assert condition(st.conditions, "Stalled").status == "True"  # type: ignore[union-attr]
        assert st.applied is not None and st.applied.sha == good
        assert st.head is not None and st.head.sha == bad
    assert agent.pusher is not None and agent.pusher.push_now().ok
    doc, _ = _status(repo)
    assert _cond(doc, "Ready")["reason"] == "MalformedCommit"
    assert doc["lastAppliedRevision"] == f"main@sha1:{good}"
    assert doc["refused"]["revision"] == f"main@sha1:{bad}"

    # The next ordinary commit on top is judged on its own and applied.
    fixed = repo.commit("fixed", {"sg.yaml": sg("web", tcp_rules(4))})
    st = agent.cycle(SYNC)
    assert st.applied is not None and st.applied.sha == fixed
    assert condition(st.conditions, "Ready").status == "True"  # type: ignore[union-attr]


def test_once_exits_1_with_the_refusal_in_the_status_not_a_traceback(tmp_path: Path) -> None:
    repo = local_repo(tmp_path)
    good = repo.commit("good", {"sg.yaml": sg("web", tcp_rules(3))})
    _agent(tmp_path, repo, once=True).run()
    _forge(
        repo,
        lambda tree, parent: (
            f"tree {tree}\nparent {parent}\nauthor Eve <e@x> 1 +0000\n"
            "committer Eve <e@x> ²²² +0000\n\nodd\n"
        ),
    )
    agent = _agent(tmp_path, repo, once=True)
    assert agent.run() == 1
    doc, _ = _status(repo)
    assert _cond(doc, "Ready")["reason"] == "MalformedCommit"
    assert doc["lastAppliedRevision"] == f"main@sha1:{good}"


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        ("author A <a@x> 1 +0000\ncommitter C <c@x> ²²² +0000", "committer"),
        ("author A <a@x> ١٢٣ +0000\ncommitter C <c@x> 1 +0000", "author"),
        ("author A <a@x> 1 +0000", "no 'committer' line"),
        ("committer C <c@x> 1 +0000", "no 'author' line"),
        ("author A <a@x> 1 +0000\ncommitter C <c@x> 1 +0000\ncommitter D <d@x> 2 +0000", "more"),
        ("author A <a@x> 1 +0000\ncommitter C <c@x> 1 +00:00", "committer"),
        ("author A <a@x> 1 +0000\ncommitter C <c@x> " + "9" * 40 + " +0000", "committer"),
    ],
)
def test_commit_headers_are_parsed_strictly(header: str, complaint: str) -> None:
    raw = f"tree {'a' * 40}\n{header}\n\nsubject\n"
    with pytest.raises(MalformedCommit, match=complaint):
        parse_commit("f" * 40, raw)


def test_a_well_formed_commit_parses() -> None:
    info = parse_commit(
        "f" * 40,
        f"tree {'a' * 40}\nparent {'b' * 40}\nauthor A B <a@x> 1700000000 +0100\n"
        "committer C <c@x> 1700000001 -0500\ngpgsig -----BEGIN SSH SIGNATURE-----\n x\n"
        " -----END SSH SIGNATURE-----\n\nsubject \x1b[31mred\n\nbody\n",
    )
    assert (info.author, info.committed_at, info.signed) == ("A B", 1700000001, True)
    assert info.subject == "subject \\x1b[31mred"


@needs_ssh_keygen
def test_a_70_mb_subject_is_refused_unread_and_the_status_stays_small(tmp_path: Path) -> None:
    trusted, _stranger, allowed = ssh_signing_keys(tmp_path)
    repo = local_repo(tmp_path)
    good = repo.commit("good", {"sg.yaml": sg("web", tcp_rules(3))}, sign_with=trusted)
    agent = _agent(tmp_path, repo, verify="signed", allowed_signers=str(allowed))
    assert agent.cycle(SYNC).applied.sha == good  # type: ignore[union-attr]

    message = tmp_path / "message"
    message.write_bytes(b"\x1b[2J" + b"A" * (70 * 1024 * 1024) + b"\n")
    git("commit", "-q", "--allow-empty", "-F", str(message), cwd=repo.root)
    repo.push()
    st = agent.cycle(SYNC)
    ready = condition(st.conditions, "Ready")
    assert ready is not None and ready.reason == "MalformedCommit" and "bytes" in ready.message
    verified = condition(st.conditions, "SourceVerified")
    assert verified is not None and (verified.status, verified.reason) == (
        "False",
        "MalformedCommit",
    )
    assert st.applied is not None and st.applied.sha == good
    assert agent.pusher is not None and agent.pusher.push_now().ok
    doc, size = _status(repo)
    assert size < 16 * 1024
    assert doc["lastAppliedRevision"] == f"main@sha1:{good}"

    # A long subject under the size limit: refused for its signature, quoted short and inert.
    message.write_bytes(b"\x1b[2J\rforged" + b"B" * 300_000 + b"\n")
    git("commit", "-q", "--allow-empty", "-F", str(message), cwd=repo.root)
    repo.push()
    st = agent.cycle(SYNC)
    assert condition(st.conditions, "Ready").reason == "UnsignedCommit"  # type: ignore[union-attr]
    assert agent.pusher.push_now().ok
    doc, size = _status(repo)
    subject = doc["refused"]["subject"]
    assert len(subject) <= 200 and subject.startswith("\\x1b[2J\\rforged")
    assert "\x1b" not in subject and size < 16 * 1024


# -- attack 8: a retired key and a backdated commit ------------------------------------------


def test_signer_validity_is_judged_by_the_agents_clock() -> None:
    now = time.mktime(time.strptime("20260601", "%Y%m%d"))
    lines = [
        '# comment',
        'retired@x namespaces="git",valid-before="20250101" ssh-ed25519 AAAA1',
        'current@x valid-after="20250101",valid-before="20270101Z" ssh-ed25519 AAAA2',
        'future@x valid-after="202701010000" ssh-ed25519 AAAA3',
        'plain@x ssh-ed25519 AAAA4',
        '"quoted principal",b@x namespaces="git,file" ssh-ed25519 AAAA5',
        'broken@x valid-before="2025-01-01" ssh-ed25519 AAAA6',
    ]  # fmt: skip
    kept = signers_valid_at("\n".join(lines), now)
    assert [x.split()[-1] for x in kept.splitlines()[1:]] == ["AAAA2", "AAAA4", "AAAA5"]
    assert kept.startswith("# comment\n")


def _backdated_env() -> dict[str, str]:
    """git's environment for a commit dated 2024-06-01, when the retired key was valid."""
    return {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "ops",
        "GIT_AUTHOR_EMAIL": "ops@example.invalid",
        "GIT_COMMITTER_NAME": "ops",
        "GIT_COMMITTER_EMAIL": "ops@example.invalid",
        "GIT_AUTHOR_DATE": "2024-06-01T12:00:00Z",
        "GIT_COMMITTER_DATE": "2024-06-01T12:00:00Z",
    }


@needs_ssh_keygen
def test_a_retired_key_cannot_sign_a_backdated_commit(tmp_path: Path) -> None:
    trusted, _stranger, _allowed = ssh_signing_keys(tmp_path)
    key = trusted.read_text().strip()
    retired = tmp_path / "allowed_retired"
    retired.write_text(f'ops@example.invalid namespaces="git",valid-before="20250101" {key}\n')
    current = tmp_path / "allowed_current"
    current.write_text(f'ops@example.invalid namespaces="git",valid-before="20990101" {key}\n')
    repo = local_repo(tmp_path)
    repo.commit("base", {"sg.yaml": sg("web", tcp_rules(1))})
    backdated = _backdated_env()
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={trusted}"]
    git(
        *sign,
        "commit",
        "-q",
        "--allow-empty",
        "-S",
        "-m",
        "backdated",
        cwd=repo.root,
        env=backdated,
    )
    sha = git("rev-parse", "HEAD", cwd=repo.root)

    # The attack is real: git alone checks the key at the commit's own (chosen) date.
    plain = subprocess.run(
        ["git", "-c", f"gpg.ssh.allowedSignersFile={retired}", "verify-commit", sha],
        cwd=repo.root,
        capture_output=True,
        text=True,
        env={**backdated, "LC_ALL": "C"},
        check=False,
    )
    assert plain.returncode == 0, plain.stderr

    git_dir = repo.root / ".git"
    check = SignatureVerifier(str(retired), None, tmp_path / "v1").verify(git_dir, sha, True)
    assert not check.ok and check.reason == "UntrustedSignature"
    # The same key while it is still valid signs the same commit.
    check = SignatureVerifier(str(current), None, tmp_path / "v2").verify(git_dir, sha, True)
    assert check.ok and "ops@example.invalid" in check.signer
    # And by an agent whose clock says 2030, the same key is retired too.
    late = SignatureVerifier(
        str(current), None, tmp_path / "v3", clock=lambda: 4_102_444_800.0 + 86400
    )
    assert not late.verify(git_dir, sha, True).ok


@needs_ssh_keygen
def test_an_agent_refuses_a_backdated_commit_by_a_retired_key(tmp_path: Path) -> None:
    trusted, _stranger, _allowed = ssh_signing_keys(tmp_path)
    key = trusted.read_text().strip()
    allowed = tmp_path / "allowed"
    allowed.write_text(f'ops@example.invalid namespaces="git",valid-before="20250101" {key}\n')
    repo = local_repo(tmp_path)
    backdated = _backdated_env()
    repo.write({"sg.yaml": sg("web", tcp_rules(3))})
    git("add", "-A", cwd=repo.root, env=backdated)
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={trusted}"]
    git(*sign, "commit", "-q", "-S", "-m", "backdated", cwd=repo.root, env=backdated)
    repo.push()
    agent = _agent(tmp_path, repo, verify="signed", allowed_signers=str(allowed))
    st = agent.cycle(SYNC)
    assert st.applied is None
    verified = condition(st.conditions, "SourceVerified")
    assert verified is not None and (verified.status, verified.reason) == (
        "False",
        "UntrustedSignature",
    )
    assert condition(st.conditions, "Stalled").status == "True"  # type: ignore[union-attr]
    assert st.head is not None and st.head.verdict is not None


def test_a_refused_revision_lists_a_bounded_number_of_inert_findings() -> None:
    """A pull request can produce thousands of findings quoting its own text: the status
    keeps the first hundred, escaped, and counts the rest."""
    from reconciler.agent.core import Refusal
    from reconciler.agent.state import AgentState, Head
    from reconciler.agent.status import MAX_FINDINGS, build_status
    from reconciler.policy.findings import Finding

    findings = tuple(
        Finding("p/sg.yaml", i + 1, 1, "error", "SecurityGroup", "web", "name", "bad \x1b[2J")
        for i in range(MAX_FINDINGS + 150)
    )
    state = AgentState(head=Head("b" * 40, "s", None, Refusal("ValidationFailed", "m", findings)))
    doc = build_status(
        state,
        cell="c",
        settings={},
        agent={},
        revision=lambda sha: sha,
        containers_path="/x",
        now="t",
    )
    listed = doc["refused"]["findings"]
    assert len(listed) == MAX_FINDINGS + 1 and listed[-1] == "... and 150 more"
    assert all("\x1b" not in f and "\\x1b[2J" in f for f in listed[:-1])
