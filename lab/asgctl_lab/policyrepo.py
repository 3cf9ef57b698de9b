"""The lab's policy repository: seeding it, and an operator's working copy of it.

The repository is served by `gitserver.GitDaemon` (git daemon on the host's loopback, pushes
enabled); this module fills it and uses it.  `seed` makes the first commit from a plain
folder (the example `policies/` plus the lab's own description).  `Operator` is what a person
at a terminal would do: clone, edit YAML, commit, push, and fetch the cells' `status/<cell>`
branches to see what they applied.  The demo drives it so the story is told through git
exactly as an operator would tell it, not through back doors into the agents or the kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asgctl_lab import gitserver
from reconciler.sources.cellstore import InventoryError
from reconciler.status import document
from reconciler.status.branch import STATUS_FILE, STATUS_PREFIX, fetch_refspec
from reconciler.status.read import read_status_blobs

REPO_NAME = "policies.git"
IDENTITY = {
    "GIT_AUTHOR_NAME": "asgctl lab operator",
    "GIT_AUTHOR_EMAIL": "operator@lab.asgctl.invalid",
    "GIT_COMMITTER_NAME": "asgctl lab operator",
    "GIT_COMMITTER_EMAIL": "operator@lab.asgctl.invalid",
}


class GitError(RuntimeError):
    """A git command failed; the message carries its stderr."""


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for lab git commands: never prompt, a fixed identity, a HOME.

    Prompts would hang a demo forever on a misconfigured host, and a missing identity makes
    `git commit` fail on a fresh machine, which is exactly where `make demo` must work.
    """
    env = dict(os.environ)
    env.setdefault("HOME", "/root")
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.update(IDENTITY)
    if extra:
        env.update(extra)
    return env


def git(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
    timeout: float = 60.0,
) -> str:
    """Run one git command as the operator and return its stdout; GitError on failure."""
    try:
        return gitserver.git(*args, cwd=cwd, input=input, env=git_env(), timeout=timeout)
    except RuntimeError as exc:  # gitserver.git's failure, stderr in the message
        raise GitError(str(exc)) from None


def init_bare(git_root: Path) -> Path:
    """An empty bare repository `policies.git` under `git_root`, with `main` as its HEAD."""
    repo = git_root / REPO_NAME
    git("init", "--quiet", "--bare", "--initial-branch=main", "--", str(repo))
    # The agents force-push their status branches (each push is a new root commit).
    git("config", "receive.denyNonFastForwards", "false", cwd=repo)
    return repo


def seed(repo: Path, tree: Path, message: str) -> str:
    """Commit everything in `tree` (a plain folder) as the first commit of `main` in `repo`."""
    git("init", "--quiet", "--initial-branch=main", cwd=tree)
    git("add", "--all", cwd=tree)
    git("commit", "--quiet", "-m", message, cwd=tree)
    git("push", "--quiet", "--", str(repo), "main:main", cwd=tree)
    return git("rev-parse", "HEAD", cwd=tree).strip()


@dataclass(frozen=True, slots=True)
class CellStatus:
    """What a cell's status branch says, as far as the lab cares."""

    cell: str
    commit: str
    applied_revision: str
    ready: str
    reason: str
    document: Mapping[str, Any]

    @property
    def applied_sha(self) -> str:
        """`main@sha1:<sha>` -> `<sha>` (empty when nothing was applied yet)."""
        return self.applied_revision.rpartition(":")[2]


class Operator:
    """A working copy of the lab's policy repo, used the way a person would use one."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.workdir = Path(workdir)

    def clone(self) -> Operator:
        """A fresh clone of `main` (replacing any earlier one at `workdir`)."""
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        git("clone", "--quiet", "--branch", "main", "--", self.url, str(self.workdir))
        return self

    def path(self, relative: str) -> Path:
        return self.workdir / relative

    def read(self, relative: str) -> str:
        return self.path(relative).read_text(encoding="utf-8")

    def write(self, relative: str, text: str) -> None:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")

    def pull(self) -> str:
        """Bring `main` up to date (another operator may have pushed); returns HEAD."""
        git("pull", "--quiet", "--ff-only", "origin", "main", cwd=self.workdir)
        return self.head()

    def head(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.workdir).strip()

    def remote_head(self) -> str:
        """The server's `main` now (not our working copy's): what every agent pulls."""
        out = git("ls-remote", "--", self.url, "refs/heads/main", cwd=self.workdir)
        return out.split()[0] if out.strip() else ""

    def diff(self) -> str:
        """The pending edit, as `git diff` shows it (what the reviewer would read)."""
        git("add", "--all", cwd=self.workdir)
        return git("diff", "--cached", "--no-color", "--stat", "--patch", cwd=self.workdir)

    def commit_and_push(self, message: str) -> str:
        """Commit every change and push `main`; returns the new commit's SHA."""
        git("add", "--all", cwd=self.workdir)
        git("commit", "--quiet", "-m", message, cwd=self.workdir)
        git("push", "--quiet", "origin", "main", cwd=self.workdir)
        return self.head()

    def status_branches(self) -> dict[str, CellStatus]:
        """Every `status/<cell>` branch on the server, read from a fresh fetch."""
        git(
            "fetch",
            "--quiet",
            "--prune",
            "origin",
            fetch_refspec(),
            cwd=self.workdir,
        )
        refs = git(
            "for-each-ref",
            "--format=%(refname:strip=3) %(objectname)",
            f"refs/remotes/origin/{STATUS_PREFIX}",
            cwd=self.workdir,
        )
        out: dict[str, CellStatus] = {}
        found = [line.partition(" ") for line in refs.splitlines()]
        specs = [f"{commit}:{STATUS_FILE}" for _name, _, commit in found]
        # Status branches are read like `asgctl status` reads them (size first, the safe
        # loader, the status schema); one that cannot be used is left out, as if not there.
        try:
            blobs = read_status_blobs(str(self.workdir), specs)
        except InventoryError as exc:
            raise GitError(str(exc)) from None
        for (name, _, commit), spec, data in zip(found, specs, blobs, strict=True):
            if isinstance(data, InventoryError):
                continue
            with contextlib.suppress(InventoryError):
                doc = document.parse_status(data, spec).header
                out[name.removeprefix(STATUS_PREFIX)] = parse_status(
                    name.removeprefix(STATUS_PREFIX), commit, doc
                )
        return out


def parse_status(cell: str, commit: str, doc: Mapping[str, Any]) -> CellStatus:
    """Pick the fields the lab waits on out of a CellStatus document (pure)."""
    ready = document.condition(dict(doc), "Ready")
    return CellStatus(
        cell=cell,
        commit=commit,
        applied_revision=str(doc.get("lastAppliedRevision") or ""),
        ready=ready.status,
        reason=ready.reason,
        document=doc,
    )


def short(sha: str) -> str:
    return sha[:10]


def describe(shas: Sequence[str]) -> str:
    return ", ".join(short(s) for s in shas)
