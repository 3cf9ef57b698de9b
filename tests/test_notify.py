"""`asgctl notify`: status branches, written by the real status writer into a real bare
repository, become GitHub commit statuses and signed webhooks on stand-in servers that answer
as GitHub documents (tests/notifykit.py).  Only changes are sent; retries follow GitHub's
rules; a hostile status branch gets nothing harmful posted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import git
from reconciler.notify.events import FAILURE, PENDING, SUCCESS, Notice, notice_of
from reconciler.notify.http import Retry
from reconciler.notify.run import Settings, load_sent, notify_once, watch
from reconciler.notify.sinks import GitHubStatuses, SinkError, Webhook
from reconciler.status.write import StatusWriter, dump_status
from tests.agentkit import ASGCTL, REPO_ROOT, local_repo, sg, tcp_rules, wait_for
from tests.notifykit import FakeGitHub, Scripted, SignedReceiver

TOKEN = "ghp_notify_test_token_0123456789"
SECRET = b"chat-bridge-secret"
CONTEXT = re.compile(r"^asgctl/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STATUS_PATH = re.compile(r"^/repos/acme/policy/statuses/[0-9a-f]{40}$")


class Fleet:
    """A policy repo with commits, and status branches pushed to it by the real writer."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.repo = local_repo(tmp_path)
        self.shas = [
            self.repo.commit(f"c{i}", {"sg.yaml": sg("web", tcp_rules(i + 1))}) for i in range(3)
        ]

    @property
    def url(self) -> str:
        return self.repo.url

    def push(self, cell: str, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else dump_status(doc)
        writer = StatusWriter(self.url, f"status/{cell}", self.tmp / "writers" / f"{cell}.git")
        writer.push(text, f"status {cell}", when=1_780_000_000)

    def delete(self, cell: str) -> None:
        git("--git-dir", str(self.repo.bare), "update-ref", "-d", f"refs/heads/status/{cell}")


def rev(sha: str) -> str:
    return f"main@sha1:{sha}"


def doc(
    cell: str,
    *,
    status: str = "True",
    reason: str = "ReconciliationSucceeded",
    message: str = "",
    applied: str = "",
    observed: str = "",
    attempted: str = "",
    refused: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A status document as the agent writes it (reconciler/agent/status.py)."""
    out: dict[str, Any] = {
        "apiVersion": "asgctl.io/v1",
        "kind": "CellStatus",
        "cell": cell,
        "reportedAt": "2026-12-06T06:00:00.000Z",
        "observedRevision": observed or applied,
        "lastAttemptedRevision": attempted or observed or applied,
        "lastAppliedRevision": applied,
        "conditions": [
            {
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": "2026-12-06T06:00:00.000Z",
            }
        ],
    }
    if refused is not None:
        out["refused"] = refused
    return out


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as server:
        yield server


class Sleeps(list[float]):
    """The waits a run asked for, instead of sleeping them (no wall clock in tests)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def settings(fleet: Fleet, github: FakeGitHub | None, **kw: Any) -> Settings:
    sink = GitHubStatuses("acme/policy", TOKEN, api=github.url) if github else None
    return Settings(source=fleet.url, state_file=fleet.tmp / "notify.json", github=sink, **kw)


def four_cells(fleet: Fleet) -> None:
    a, b, c = fleet.shas
    fleet.push("cell-applied", doc("cell-applied", applied=rev(c)))
    fleet.push(
        "cell-refused",
        doc(
            "cell-refused",
            status="False",
            reason="ValidationFailed",
            message="policy invalid",
            applied=rev(b),
            observed=rev(c),
            refused={
                "revision": rev(c),
                "reason": "ValidationFailed",
                "message": "sg.yaml:3: ports: 70000 is not a port",
            },
        ),
    )
    fleet.push(
        "cell-failing",
        doc(
            "cell-failing",
            status="False",
            reason="DataplaneUnavailable",
            message="iptables-restore: lock held",
            applied=rev(b),
            observed=rev(c),
            attempted=rev(c),
        ),
    )
    fleet.push(
        "cell-waiting",
        doc(
            "cell-waiting",
            reason="WaitingForWave",
            message="wave 1 not Ready",
            applied=rev(a),
            observed=rev(c),
        ),
    )


# -- what each cell's status becomes -------------------------------------------------------


def test_each_cell_gets_its_commit_status_on_the_revision_it_reports(
    fleet: Fleet, github: FakeGitHub
) -> None:
    four_cells(fleet)
    report = notify_once(settings(fleet, github))
    assert report.ok and len(report.sent) == 4
    _a, b, c = fleet.shas
    got = {body["context"]: (sha, body["state"]) for sha, body in github.statuses()}
    assert got == {
        "asgctl/cell-applied": (c, SUCCESS),
        "asgctl/cell-refused": (c, FAILURE),  # the head it refused, not what it enforces
        "asgctl/cell-failing": (c, FAILURE),
        "asgctl/cell-waiting": (c, PENDING),  # the head it waits to apply
    }
    refused = next(body for _s, body in github.statuses() if body["context"].endswith("refused"))
    assert refused["description"] == "ValidationFailed: sg.yaml:3: ports: 70000 is not a port"
    for seen in github.seen:
        assert STATUS_PATH.match(seen.path)
        assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
        assert seen.headers["Accept"] == "application/vnd.github+json"
        assert set(seen.json) <= {"state", "target_url", "description", "context"}
    assert b not in {sha for sha, _ in github.statuses()}


def test_a_rerun_sends_nothing_and_a_change_is_sent_once(fleet: Fleet, github: FakeGitHub) -> None:
    four_cells(fleet)
    assert notify_once(settings(fleet, github)).ok
    github.seen.clear()
    again = notify_once(settings(fleet, github))
    assert github.seen == [] and again.sent == [] and again.unchanged == 4
    # Only the message changed (a count, a time): not a new state, nothing sent.
    c = fleet.shas[2]
    fleet.push("cell-applied", doc("cell-applied", applied=rev(c), message="12 rules"))
    assert notify_once(settings(fleet, github)).sent == [] and github.seen == []
    # The waiting cell applies the head: one success, nothing else.
    fleet.push("cell-waiting", doc("cell-waiting", applied=rev(c)))
    assert len(notify_once(settings(fleet, github)).sent) == 1
    assert [(s, b_["context"], b_["state"]) for s, b_ in github.statuses()] == [
        (c, "asgctl/cell-waiting", SUCCESS)
    ]


def test_a_cell_whose_branch_is_gone_leaves_the_state_file(
    fleet: Fleet, github: FakeGitHub
) -> None:
    four_cells(fleet)
    notify_once(settings(fleet, github))
    fleet.delete("cell-failing")
    notify_once(settings(fleet, github))
    sent, warning = load_sent(fleet.tmp / "notify.json")
    assert warning == "" and sorted(sent) == ["cell-applied", "cell-refused", "cell-waiting"]


def test_a_cell_with_no_revision_yet_is_not_posted(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("fresh", doc("fresh", status="Unknown", reason="Progressing"))
    report = notify_once(settings(fleet, github))
    assert report.ok and github.seen == [] and report.sent == []


def test_ready_false_while_progressing_is_pending_not_failure() -> None:
    sha = "a" * 40
    found = notice_of(
        "c1",
        doc("c1", status="False", reason="Progressing", message="no metadata", observed=rev(sha)),
    )
    assert isinstance(found, Notice) and found.state == PENDING and found.sha == sha


# -- the webhook ---------------------------------------------------------------------------


def test_the_webhook_is_json_signed_with_hmac_sha256(fleet: Fleet) -> None:
    four_cells(fleet)
    with SignedReceiver(SECRET) as bridge:
        s = settings(fleet, None, webhook=Webhook(f"{bridge.url}/hooks/asgctl", SECRET))
        report = notify_once(s)
        assert report.ok and len(bridge.verified) == 4
        for seen in bridge.seen:
            mac = hmac.new(SECRET, seen.body, hashlib.sha256).hexdigest()
            assert seen.headers["X-Asgctl-Signature-256"] == f"sha256={mac}"
            assert seen.headers["X-Asgctl-Event"] == "cell-status"
        refused = next(v for v in bridge.verified if v["cell"] == "cell-refused")
        assert refused["state"] == FAILURE
        assert refused["revision"] == rev(fleet.shas[2]) and refused["sha"] == fleet.shas[2]
        assert refused["ready"] == {
            "status": "False",
            "reason": "ValidationFailed",
            "message": "sg.yaml:3: ports: 70000 is not a port",
        }
        assert refused["time"].endswith("Z") and refused["source"] == fleet.url
        bridge.seen.clear()
        assert notify_once(s).sent == [] and bridge.seen == []


def test_a_receiver_that_refuses_the_signature_is_a_failure_retried_next_run(
    fleet: Fleet,
) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    with SignedReceiver(b"another secret") as bridge:
        s = settings(fleet, None, webhook=Webhook(bridge.url, SECRET))
        report = notify_once(s)
        assert not report.ok and "401" in report.failed[0]
        assert len(bridge.seen) == 1  # 401: not retried within the run
        notify_once(s)
        assert len(bridge.seen) == 2  # nothing recorded, so the next run tries again


# -- GitHub's answers ----------------------------------------------------------------------


def test_5xx_is_retried_with_back_off_then_succeeds(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [Scripted(502), Scripted(503, body={"message": "unavailable"})]
    sleeps = Sleeps()
    report = notify_once(settings(fleet, github, retry=Retry(base=2, cap=30)), sleep=sleeps)
    assert report.ok and len(github.seen) == 3 and sleeps == [2, 4]


def test_429_waits_as_long_as_retry_after_says(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [
        Scripted(429, {"Retry-After": "7"}, {"message": "You have exceeded a secondary rate limit"})
    ]
    sleeps = Sleeps()
    report = notify_once(settings(fleet, github), sleep=sleeps)
    assert report.ok and sleeps == [7] and len(github.seen) == 2


def test_a_primary_rate_limit_waits_for_the_reset(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [
        Scripted(
            403,
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1780000030"},
            {"message": "API rate limit exceeded"},
        )
    ]
    sleeps = Sleeps()
    report = notify_once(settings(fleet, github), sleep=sleeps, clock=lambda: 1_780_000_000.0)
    assert report.ok and sleeps == [30]


def test_a_wait_longer_than_worth_sleeping_is_left_for_the_next_run(
    fleet: Fleet, github: FakeGitHub
) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [Scripted(429, {"Retry-After": "3600"})]
    sleeps = Sleeps()
    report = notify_once(settings(fleet, github), sleep=sleeps)
    assert sleeps == [] and not report.ok and "next run" in report.failed[0]
    assert len(notify_once(settings(fleet, github), sleep=sleeps).sent) == 1


def test_401_stops_the_run_with_a_clear_message(fleet: Fleet, github: FakeGitHub) -> None:
    four_cells(fleet)
    github.script = [Scripted(401, body={"message": "Bad credentials"})]
    report = notify_once(settings(fleet, github))
    assert len(github.seen) == 1  # the same token would be refused for every cell
    assert len(report.failed) == 1 and "401 unauthorized (Bad credentials)" in report.failed[0]
    assert TOKEN not in json.dumps(report.failed)


def test_403_without_a_rate_limit_is_a_permission_error(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [Scripted(403, body={"message": "Resource not accessible by integration"})]
    report = notify_once(settings(fleet, github), sleep=Sleeps())
    assert len(github.seen) == 1 and "403 forbidden" in report.failed[0]


def test_422_is_that_notice_s_problem_and_not_resent(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev("f" * 40)))  # a commit GitHub does not know
    fleet.push("c2", doc("c2", applied=rev(fleet.shas[0])))
    github.script = [Scripted(422, body={"message": "No commit found for SHA: " + "f" * 40})]
    report = notify_once(settings(fleet, github))
    assert report.ok and len(report.sent) == 1 and "rejected" in report.skipped[-1]
    github.seen.clear()
    notify_once(settings(fleet, github))
    assert github.seen == []


def test_a_hostile_answer_is_shown_escaped_and_cut(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    github.script = [
        Scripted(500, raw=b"[" * 60_000),  # would exhaust a plain json.loads' recursion
        Scripted(422, raw=json.dumps({"message": "\x1b[2J::error::x\n" + "m" * 10_000}).encode()),
    ]
    report = notify_once(settings(fleet, github), sleep=Sleeps())
    said = report.skipped[-1]
    assert "rejected" in said and "\x1b" not in said and "\n" not in said and len(said) < 400


def test_an_unreachable_api_is_named_after_the_retries(fleet: Fleet) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    sink = GitHubStatuses("acme/policy", TOKEN, api=f"http://127.0.0.1:{port}")
    sleeps = Sleeps()
    s2 = Settings(fleet.url, fleet.tmp / "n.json", github=sink, retry=Retry(attempts=3))
    report = notify_once(s2, sleep=sleeps)
    assert len(sleeps) == 2 and "unreachable" in report.failed[0]


def test_a_redirect_is_not_followed_with_the_token(fleet: Fleet, github: FakeGitHub) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    with FakeGitHub() as elsewhere:
        github.script = [Scripted(307, {"Location": f"{elsewhere.url}/steal"})]
        report = notify_once(settings(fleet, github))
        assert elsewhere.seen == [] and "redirect" in report.failed[0]


# -- hostile status branches ---------------------------------------------------------------


def test_a_hostile_status_branch_posts_nothing_harmful(fleet: Fleet, github: FakeGitHub) -> None:
    sha = fleet.shas[0]
    fleet.push("good", doc("good", applied=rev(sha)))
    # Names git allows in a ref but a cell name may not have.
    fleet.push("a/b", doc("a/b", applied=rev(sha)))
    fleet.push("evil\u202egnp", doc("x", applied=rev(sha)))
    fleet.push("zw\u200bsp", doc("x", applied=rev(sha)))
    # Revisions that are not <branch>@sha1:<40 hex>.
    for i, bad in enumerate(
        ["HEAD", "../x", "main@sha1:../../../orgs/acme", f"main@sha1:{sha}/../../x", sha[:12]]
    ):
        fleet.push(f"rev{i}", doc(f"rev{i}", applied=bad))
    fleet.push("refused-bad", doc("x", applied=rev(sha), refused={"revision": "HEAD"}))
    # Messages that try to break out of one line, ping people, or be huge.
    fleet.push(
        "loud",
        doc(
            "loud",
            status="False",
            reason="Bad\nReason\u202e@channel",
            message="line1\n::error::forged\x1b[2J @org/team <!channel> " + "x" * 1_000_000,
            applied=rev(sha),
        ),
    )
    fleet.push("huge", "cell: huge\nmessage: '" + "y" * (9 * 1024 * 1024) + "'\n")
    with SignedReceiver(SECRET) as bridge:
        s = settings(fleet, github, webhook=Webhook(bridge.url, SECRET))
        report = notify_once(s)
        assert report.ok
        contexts = sorted(body["context"] for _sha, body in github.statuses())
        assert contexts == ["asgctl/good", "asgctl/loud"]
        for seen in github.seen:
            assert STATUS_PATH.match(seen.path) and seen.path.endswith(sha)
            body = seen.json
            assert CONTEXT.match(body["context"])
            assert len(body["description"]) <= 140 and body["description"].isprintable()
        loud = next(v for v in bridge.verified if v["cell"] == "loud")
        assert len(loud["ready"]["message"]) <= 1000 and "\n" not in loud["ready"]["message"]
        assert loud["ready"]["message"].isprintable() and loud["ready"]["reason"].isprintable()
        assert "@" not in loud["text"] and "<" not in loud["text"] and "\n" not in loud["text"]
        assert len(bridge.body_sizes()) == 2 and max(bridge.body_sizes()) < 8192
    skipped = "\n".join(report.skipped)
    for cell in ("a/b", "evil\\u202egnp", "zw\\u200bsp", "rev0", "rev4", "refused-bad", "huge"):
        assert cell in skipped, cell
    assert "\u202e" not in skipped and "\n" not in "".join(report.skipped)
    sent, _ = load_sent(fleet.tmp / "notify.json")
    assert sorted(sent) == ["good", "loud"]


def test_a_flood_of_status_branches_is_read_only_up_to_max_cells(
    fleet: Fleet, github: FakeGitHub
) -> None:
    for i in range(5):
        fleet.push(f"c{i}", doc(f"c{i}", applied=rev(fleet.shas[0])))
    report = notify_once(settings(fleet, github, max_cells=3))
    assert len(github.seen) == 3 and "2 more status branches" in report.skipped[0]
    assert len(load_sent(fleet.tmp / "notify.json")[0]) == 3


def test_settings_from_outside_are_checked() -> None:
    for repo in ("acme", "acme/policy/x", "../x", "acme/..", "ac me/p"):
        with pytest.raises(SinkError):
            GitHubStatuses(repo, TOKEN)
    with pytest.raises(SinkError):
        GitHubStatuses("acme/p", "")
    with pytest.raises(SinkError):
        GitHubStatuses("acme/p", TOKEN, api="file:///etc/passwd")
    with pytest.raises(SinkError):
        Webhook("https://user:pw@chat.example/hook", SECRET)
    assert TOKEN not in repr(GitHubStatuses("acme/p", TOKEN))
    shown = repr(Webhook("https://chat.example/T0/B0/secretpath", SECRET))
    assert "secretpath" not in shown and "chat-bridge" not in shown


# -- the command ---------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ASGCTL, "notify", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        timeout=120,
    )


def test_the_command_posts_and_never_prints_the_token(fleet: Fleet, github: FakeGitHub) -> None:
    four_cells(fleet)
    state = str(fleet.tmp / "state.json")
    args = ("--source", fleet.url, "--state-file", state, "--github-repo", "acme/policy")
    ok = _cli(*args, "--github-api", github.url, env={"GITHUB_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert "4 sent" in ok.stderr and len(github.seen) == 4
    github.script = [Scripted(401, body={"message": "Bad credentials"})]
    fleet.push("cell-applied", doc("cell-applied", applied=rev(fleet.shas[0])))
    bad = _cli(*args, "--github-api", github.url, env={"GITHUB_TOKEN": TOKEN})
    assert bad.returncode == 1 and "401 unauthorized" in bad.stderr
    assert TOKEN not in bad.stderr + bad.stdout + ok.stderr + ok.stdout


def test_the_command_refuses_to_run_without_a_sink_or_a_token(fleet: Fleet) -> None:
    none = _cli("--source", fleet.url, env={})
    assert none.returncode == 2 and "nothing to notify" in none.stderr
    env = {"GITHUB_TOKEN": ""}
    no_token = _cli("--source", fleet.url, "--github-repo", "acme/policy", env=env)
    assert no_token.returncode == 2 and "$GITHUB_TOKEN" in no_token.stderr
    no_secret = _cli(
        "--source",
        fleet.url,
        "--webhook",
        "http://127.0.0.1:9/x",
        env={"ASGCTL_WEBHOOK_SECRET": ""},
    )
    assert no_secret.returncode == 2 and "ASGCTL_WEBHOOK_SECRET" in no_secret.stderr


def test_the_service_reports_a_cell_that_fails_within_an_interval(
    fleet: Fleet, github: FakeGitHub
) -> None:
    fleet.push("c1", doc("c1", applied=rev(fleet.shas[0])))
    stop = threading.Event()
    lines: list[str] = []
    service = threading.Thread(
        target=watch, args=(settings(fleet, github), 0.2, stop, lines.append), daemon=True
    )
    service.start()
    try:
        wait_for(lambda: len(github.seen) == 1, 30, what="the first success")
        fleet.push(
            "c1",
            doc(
                "c1",
                status="False",
                reason="EnforcementFailed",
                message="iptables-restore: exit 4",
                applied=rev(fleet.shas[0]),
                observed=rev(fleet.shas[1]),
            ),
        )
        wait_for(lambda: len(github.seen) == 2, 30, what="the failure")
    finally:
        stop.set()
        service.join(30)
    sha, body = list(github.statuses())[1]
    assert (sha, body["state"], body["context"]) == (fleet.shas[1], FAILURE, "asgctl/c1")
    assert body["description"] == "EnforcementFailed: iptables-restore: exit 4"
    assert any(line.startswith("sent github asgctl/c1 failure") for line in lines)
