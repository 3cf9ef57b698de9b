"""`asgctl agent --listen-webhook`: a signed push makes a running agent sync before its
interval; a wrong signature, an oversized body, a push to another branch or a flood do not
(or only once per window).  A real agent runs its loop on a thread (in-memory dataplane, a
real file:// policy repo) and the requests are real HTTP on 127.0.0.1.

The headers are GitHub's (docs.github.com "Webhook events and payloads": `X-GitHub-Event`,
`X-Hub-Signature-256: sha256=<HMAC-SHA256 hex>`) and the generic form is Flux's
generic-hmac Receiver's idea under asgctl's own header (fluxcd.io, notification-controller
Receiver docs).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asgctl_lab.gitserver import GitDaemon
from asgctl_lab.netns import ContainerSpec, Lab
from reconciler.agent.config import ConfigError, build_config
from reconciler.agent.loop import STOP, SYNC, Agent
from reconciler.agent.state import AgentState
from reconciler.agent.webhook import MAX_BODY_BYTES, SyncTrigger, judge
from reconciler.notify.run import Settings, notify_once
from reconciler.notify.sinks import GitHubStatuses
from tests.agentkit import (  # noqa: F401 - fixtures
    ORG,
    SPACE,
    AgentProc,
    PolicyRepo,
    agents,
    container,
    git_server,
    local_repo,
    policy_repo,
    read_status,
    sg,
    tcp_rules,
    wait_for,
    write_store,
)
from tests.conftest import require_netns
from tests.notifykit import FakeGitHub
from tests.test_agent_loop import MemoryDataplane

SECRET = b"push-hook-secret"


def signed(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def push_body(ref: str = "refs/heads/main") -> bytes:
    return json.dumps({"ref": ref, "after": "0" * 40, "repository": {"name": "policy"}}).encode()


# -- the decision, request by request --------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "want"),
    [
        ({"X-GitHub-Event": "push"}, push_body(), (401, False)),  # unsigned
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(b"other")},
            push_body(),
            (401, False),
        ),
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(push_body(), b"x")},
            push_body(),
            (401, False),
        ),
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha1=" + "0" * 40},
            push_body(),
            (401, False),
        ),
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(push_body())},
            push_body(),
            (202, True),
        ),
        ({"X-GitHub-Event": "ping", "X-Hub-Signature-256": signed(b"{}")}, b"{}", (200, False)),
        ({"X-GitHub-Event": "issues", "X-Hub-Signature-256": signed(b"{}")}, b"{}", (202, False)),
        ({"X-Asgctl-Signature-256": signed(b"sync")}, b"sync", (202, True)),
        # An agent's own status push (and any other branch) is not a reason to sync.
        (
            {
                "X-GitHub-Event": "push",
                "X-Hub-Signature-256": signed(push_body("refs/heads/status/c1")),
            },
            push_body("refs/heads/status/c1"),
            (202, False),
        ),
        ({"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(b"[1]")}, b"[1]", (400, False)),
    ],
)
def test_a_request_is_judged_by_its_signature_first(
    headers: dict[str, str], body: bytes, want: tuple[int, bool]
) -> None:
    status, _outcome, fire = judge(SECRET, "main", headers, body)
    assert (status, fire) == want


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_sync_per_window_one_more_coalesced_the_rest_told_to_wait() -> None:
    fired: list[int] = []
    clock = Clock()
    trigger = SyncTrigger(lambda: fired.append(1), 30.0, clock)
    try:
        assert trigger.request()[0] == 202 and len(fired) == 1
        clock.now += 5
        status, said, _ = trigger.request()
        assert status == 202 and said.startswith("coalesced") and len(fired) == 1
        clock.now += 1
        status, _said, retry_after = trigger.request()
        assert status == 429 and retry_after == pytest.approx(24.0)
        clock.now += 30  # the window is over: this one syncs, and replaces the queued one
        assert trigger.request()[0] == 202 and len(fired) == 2
        assert trigger._timer is None
    finally:
        trigger.stop()


def test_a_coalesced_trigger_fires_at_the_end_of_the_window() -> None:
    fired = threading.Event()
    count: list[int] = []
    trigger = SyncTrigger(lambda: (count.append(1), fired.set()), 0.2)
    try:
        trigger.request()
        fired.clear()
        assert trigger.request()[1].startswith("coalesced")
        assert fired.wait(10) and len(count) == 2
    finally:
        trigger.stop()


# -- a running agent ----------------------------------------------------------------------


class CountingAgent(Agent):
    """The real agent; each sync cycle is counted, so "no sync happened" can be asserted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.syncs = 0

    def cycle(self, trigger: Any = SYNC) -> AgentState:
        if trigger == SYNC:
            self.syncs += 1
        return super().cycle(trigger)


@dataclass
class Running:
    agent: CountingAgent
    repo: PolicyRepo
    port: int
    err: io.StringIO

    def post(
        self, body: bytes, headers: dict[str, str], length: int | None = None
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest("POST", "/hook")
            conn.putheader("Content-Length", str(len(body) if length is None else length))
            conn.putheader("Content-Type", "application/json")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            # The receiver may answer and close before reading it all (413).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(body)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read().decode()
        finally:
            conn.close()

    def push_hook(self, ref: str = "refs/heads/main", secret: bytes = SECRET) -> int:
        body = push_body(ref)
        return self.post(
            body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(body, secret)}
        )[0]

    def applied(self) -> str | None:
        a = self.agent.state.applied
        return a.sha if a is not None else None


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    repo = local_repo(tmp_path)
    first = repo.commit("first", {"sg.yaml": sg("web", tcp_rules(2))})
    store = write_store(tmp_path / "store.json", [container("c0", 0)])
    secret_file = tmp_path / "hook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    cfg = build_config(
        {
            "source": repo.url,
            "cell": "hooked",
            "containers": str(store),
            "state-dir": str(tmp_path / "state"),
            "interval": "1h",  # only the webhook can make it sync again during the test
            "status-push": False,
            "listen-webhook": "127.0.0.1:0",
            "webhook-secret-file": str(secret_file),
            "webhook-min-interval": "1h",
        },
        {},
    )
    err = io.StringIO()
    agent = CountingAgent(cfg, out=io.StringIO(), err=err, backend=MemoryDataplane())
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.webhook is not None and agent.state.applied, 30, what="first sync")
        assert agent.webhook is not None and agent.state.applied.sha == first  # type: ignore[union-attr]
        yield Running(agent, repo, agent.webhook.address[1], err)
    finally:
        agent._stopping.set()
        agent.events.put(STOP)
        thread.join(30)
        assert not thread.is_alive()


def test_a_signed_push_syncs_before_the_interval(running: Running) -> None:
    second = running.repo.commit("second", {"sg.yaml": sg("web", tcp_rules(3))})
    assert running.push_hook() == 202
    wait_for(lambda: running.applied() == second, 30, what="the pushed revision applied")
    assert running.agent.syncs == 2
    records = [json.loads(x) for x in running.err.getvalue().splitlines()]
    assert {"event": "webhook", "status": 202, "outcome": "push: sync triggered"}.items() <= next(
        r for r in records if r.get("event") == "webhook"
    ).items()


def test_a_wrong_signature_is_401_and_syncs_nothing(running: Running) -> None:
    second = running.repo.commit("second", {"sg.yaml": sg("web", tcp_rules(3))})
    assert running.push_hook(secret=b"guessed") == 401
    body = push_body()
    assert running.post(body, {"X-GitHub-Event": "push"})[0] == 401  # unsigned
    assert running.agent.webhook is not None and running.agent.webhook.trigger.fired == 0
    assert running.agent.events.empty() and running.agent.syncs == 1
    # The receiver is still there for the real one, which is the first to trigger.
    assert running.push_hook() == 202
    wait_for(lambda: running.applied() == second, 30, what="the pushed revision applied")
    assert running.agent.syncs == 2


def test_a_flood_is_one_sync_per_window(running: Running) -> None:
    answers = [running.push_hook() for _ in range(20)]
    assert answers[:2] == [202, 202] and set(answers[2:]) == {429}
    status, headers, _ = running.post(
        push_body(), {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(push_body())}
    )
    assert status == 429 and int(headers["Retry-After"]) > 0
    wait_for(lambda: running.agent.syncs >= 2, 30, what="the triggered sync")
    assert running.agent.webhook is not None and running.agent.webhook.trigger.fired == 1
    assert running.agent.syncs == 2  # the coalesced one waits for the end of the hour


def test_an_oversized_or_unstated_body_is_refused_unread(running: Running) -> None:
    big = b"x" * (MAX_BODY_BYTES + 1)
    status, _h, _b = running.post(big, {"X-Hub-Signature-256": signed(big)})
    assert status == 413
    status, _h, _b = running.post(b"", {"X-Asgctl-Signature-256": signed(b"")}, length=-1)
    assert status == 400
    assert running.agent.webhook is not None and running.agent.webhook.trigger.fired == 0
    assert running.agent.syncs == 1


def test_a_slow_body_does_not_hold_the_receiver(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as s:
        s.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        answer = s.recv(4096)  # the rest never comes: the receiver gives up and answers
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    assert running.push_hook() == 202


def test_listening_needs_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASGCTL_WEBHOOK_SECRET", raising=False)
    base = {"source": "file:///x", "containers": "/x", "cell": "c", "listen-webhook": ":9292"}
    with pytest.raises(ConfigError, match="webhook-secret-file or \\$ASGCTL_WEBHOOK_SECRET"):
        build_config(base, {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no secret"):
        build_config({**base, "webhook-secret-file": str(empty)}, {})
    with pytest.raises(ConfigError, match="listen-webhook: expected HOST:PORT"):
        build_config({**base, "listen-webhook": "nowhere"}, {})
    monkeypatch.setenv("ASGCTL_WEBHOOK_SECRET", "s3cret")
    assert build_config(base, {}).listen_webhook == ":9292"


# -- end to end: a real agent process in a lab cell, and notify reading what it pushed ------


@pytest.mark.netns
@pytest.mark.requires("git")
def test_a_real_agent_syncs_on_a_push_and_notify_tells_github(
    tmp_path: Path,
    make_lab: Callable[..., Lab],
    git_server: GitDaemon,  # noqa: F811
    policy_repo: PolicyRepo,  # noqa: F811
    agents: Callable[..., AgentProc],  # noqa: F811
) -> None:
    require_netns()
    lab = make_lab([ContainerSpec("web", app_id="app-web", space_id=SPACE, org_id=ORG)], [])
    first = policy_repo.commit("two rules", {"sg.yaml": sg("web", tcp_rules(2))})
    secret_file = tmp_path / "hook.secret"
    secret_file.write_bytes(SECRET)
    agent = agents(
        "cell-w",
        source=policy_repo.url,
        containers=str(lab.write_store()),
        netns=lab.cell,
        interval="1h",
        **{
            "underlay-interface": "uplink0",
            "listen-webhook": "127.0.0.1:0",
            "webhook-secret-file": str(secret_file),
        },
    ).start()

    def applied(sha: str) -> Callable[[], bool]:
        def check() -> bool:
            doc = read_status(policy_repo.bare, "cell-w")
            return bool(doc) and doc["lastAppliedRevision"] == f"main@sha1:{sha}"

        return check

    wait_for(applied(first), 30, what="the first revision applied")
    listening = wait_for(
        lambda: next(
            (r for r in agent.log_records("err") if r.get("event") == "webhook-listening"), None
        ),
        10,
        what="the webhook address",
    )
    port = int(listening["address"].rsplit(":", 1)[1])
    second = policy_repo.commit("three rules", {"sg.yaml": sg("web", tcp_rules(3))})
    body = push_body()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/hook",
            body,
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": signed(body)},
        )
        assert conn.getresponse().status == 202
    finally:
        conn.close()
    wait_for(applied(second), 30, what="the pushed revision applied long before the 1h interval")

    with FakeGitHub() as github:
        settings = Settings(
            source=policy_repo.url,
            state_file=tmp_path / "notify.json",
            github=GitHubStatuses("acme/policy", "token", api=github.url),
        )
        report = notify_once(settings)
        assert report.ok, report.failed
        assert [(sha, b["context"], b["state"]) for sha, b in github.statuses()] == [
            (second, "asgctl/cell-w", "success")
        ]
