"""Helpers for the agent tests: a policy repo to commit to, agents as real processes, and
readers for what they leave behind (status branches, the kernel's chains).

Agents run as `asgctl agent ...` subprocesses in the host's network
namespace (so `git://127.0.0.1` reaches the test's git daemon) with their dataplane in a lab
cell namespace (`--netns`), exactly as the issue asks, and so a test can SIGKILL them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgctl_lab.gitserver import GitDaemon, git
from reconciler.backends import Runner, open_backend
from reconciler.backends.iptables.parse import OwnedState
from reconciler.core.model import Container
from reconciler.sources.cellstore import dump_store

REPO_ROOT = Path(__file__).resolve().parent.parent
ASGCTL = (sys.executable, "-c", "import sys; from reconciler.cli import main; sys.exit(main())")
"""The CLI, run by this interpreter (the venv's console script may not be on PATH)."""

SPACE = "space-prod"
ORG = "org-acme"


def sg(name: str, rules: list[str], running: bool = True, spaces: tuple[str, ...] = ()) -> str:
    """A SecurityGroup document; `rules` are flow-style YAML rule mappings."""
    body = "\n".join(f"  - {r}" for r in rules) or "  []"
    bound = f"running_spaces: [{', '.join(spaces)}]\n" if spaces else ""
    return (
        f"kind: SecurityGroup\nname: {name}\nrules:\n{body}\n"
        f"globally_enabled: {{running: {str(running).lower()}, staging: false}}\n{bound}"
    )


def tcp_rules(count: int, net: int = 1) -> list[str]:
    """`count` distinct tcp rules towards 198.19.<net>.0/24, each to its own port."""
    return [
        f'{{protocol: tcp, destination: 198.19.{net}.{(i - 1) % 250 + 1}, ports: "{1000 + i}"}}'
        for i in range(1, count + 1)
    ]


def container(handle: str, n: int, app: str = "app-web", space: str = SPACE) -> Container:
    return Container(handle, f"198.18.{n // 250}.{n % 250 + 2}", app, space, ORG, "", "app")


def write_store(path: Path, containers: list[Container]) -> Path:
    """Atomically, as CF does (write a temp file, rename it into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_store(containers))
    os.replace(tmp, path)
    return path


class PolicyRepo:
    """A work tree whose `main` is pushed to a bare repository on the test's git daemon."""

    def __init__(self, root: Path, url: str, bare: Path) -> None:
        self.root = root
        self.url = url
        self.bare = bare
        git("init", "-q", "-b", "main", str(root))

    def write(self, files: dict[str, str], clear: bool = True) -> None:
        folder = self.root / "policies"
        if clear and folder.exists():
            for p in folder.rglob("*.yaml"):
                p.unlink()
        for rel, text in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))

    def commit(
        self,
        message: str,
        files: dict[str, str] | None = None,
        *,
        sign_with: Path | None = None,
        push: bool = True,
    ) -> str:
        if files is not None:
            self.write(files)
        git("add", "-A", cwd=self.root)
        args = ["commit", "-q", "--allow-empty", "-m", message]
        if sign_with is not None:
            args = [
                "-c",
                "gpg.format=ssh",
                "-c",
                f"user.signingkey={sign_with}",
                *args,
                "-S",
            ]
        git(*args, cwd=self.root)
        sha = git("rev-parse", "HEAD", cwd=self.root)
        if push:
            self.push()
        return sha

    def push(self, force: bool = False) -> None:
        git("push", "-q", *(["--force"] if force else []), "--", self.url, "main", cwd=self.root)

    def reset(self, rev: str) -> None:
        git("reset", "-q", "--hard", rev, cwd=self.root)


def local_repo(tmp_path: Path) -> PolicyRepo:
    """A policy repo pushed to a bare repository on disk (file://), for in-process agents."""
    bare = tmp_path / "origin.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    return PolicyRepo(tmp_path / "work", f"file://{bare}", bare)


def ssh_signing_keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two SSH keys and an allowed-signers file trusting only the first.

    Returns (trusted .pub, stranger .pub, allowed_signers); git signs with a public key path
    as `user.signingkey` (PolicyRepo.commit's `sign_with`) and finds the private key next to it.
    """
    keys = []
    for name in ("trusted", "stranger"):
        k = tmp_path / name
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(k)], check=True
        )
        keys.append(k.with_suffix(".pub"))
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'ops@example.invalid namespaces="git" {keys[0].read_text()}')
    return keys[0], keys[1], allowed


def read_status(bare: Path, cell: str) -> dict[str, Any] | None:
    """The cell's status.yaml as pushed to the server, or None when there is none yet."""
    try:
        text = git("--git-dir", str(bare), "show", f"refs/heads/status/{cell}:status.yaml")
    except RuntimeError:
        return None
    return yaml.safe_load(text)


def ready(doc: dict[str, Any] | None) -> dict[str, Any]:
    for c in (doc or {}).get("conditions") or ():
        if c["type"] == "Ready":
            return c
    return {}


def applied(bare: Path, cell: str, sha: str) -> Callable[[], bool]:
    """For `wait_for`: the cell's status branch says it applied commit `sha` and is Ready."""

    def check() -> bool:
        doc = read_status(bare, cell)
        return (
            bool(doc)
            and doc["lastAppliedRevision"].endswith(f"@sha1:{sha}")
            and ready(doc)["status"] == "True"
        )

    return check


def cond(doc: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in (doc or {}).get("conditions") or ():
        if c["type"] == type_:
            return c
    return {}


@functools.lru_cache(maxsize=64)
def backend_for(netns: str) -> Any:
    """The iptables backend the agent in `netns` uses (the same variant choice)."""
    return open_backend("iptables", "auto", Runner.in_netns(netns))


def kernel(netns: str, family: int = 4) -> OwnedState:
    """Our chains in the namespace, read the way the agent reads them."""
    return backend_for(netns).read(family)


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


@dataclass
class AgentProc:
    """One `asgctl agent` process with its config file, logs and state directory."""

    name: str
    workdir: Path
    settings: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.err"

    @property
    def state_dir(self) -> Path:
        return Path(self.settings["state-dir"])

    def argv(self, *extra: str) -> list[str]:
        self.config_path.write_text(yaml.safe_dump(self.settings))
        return [
            *ASGCTL,
            "agent",
            "--config",
            str(self.config_path),
            *self.extra_args,
            *extra,
        ]

    def start(self, prefix: Sequence[str] = ()) -> AgentProc:
        """Start the agent, run under `prefix` (e.g. a wrapper that enters a mount namespace)."""
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*prefix, *self.argv()],
                stdout=out,
                stderr=err,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        return self

    def once(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.argv("--once"), capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout
        )
        with open(self.stdout_path, "a") as out, open(self.stderr_path, "a") as err:
            out.write(res.stdout)
            err.write(res.stderr)
        return res

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL the group if it does not exit."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.state_dir / "state.json").read_text())
        return {}

    def flow_records(self) -> list[dict[str, Any]]:
        """What the agent wrote to flows/flows.jsonl so far (none before its first window)."""
        path = self.state_dir / "flows" / "flows.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]

    def log_records(self, stream: str = "out") -> list[dict[str, Any]]:
        path = self.stdout_path if stream == "out" else self.stderr_path
        out = []
        for line in path.read_text().splitlines() if path.exists() else ():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitDaemon]:
    """`git daemon` on a free loopback port, serving tmp_path/srv; always stopped."""
    daemon = GitDaemon(tmp_path / "srv")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def policy_repo(tmp_path: Path, git_server: GitDaemon) -> PolicyRepo:
    bare = git_server.create("policy")
    return PolicyRepo(tmp_path / "work", git_server.url("policy"), bare)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """`agents(name, **settings)` -> an AgentProc (not started); all stopped after the test."""
    made: list[AgentProc] = []

    def make(name: str, **settings: Any) -> AgentProc:
        base: dict[str, Any] = {
            "cell": name,
            "state-dir": str(tmp_path / f"state-{name}"),
            "interval": "1s",
            "jitter": "10%",
            "retry-base": "200ms",
            "retry-cap": "1s",
            "heartbeat": "1h",
            "status-min-interval": "100ms",
            "git-timeout": "10s",
        }
        base.update({k.replace("_", "-"): v for k, v in settings.items()})
        a = AgentProc(name, tmp_path, base)
        made.append(a)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.stop()
