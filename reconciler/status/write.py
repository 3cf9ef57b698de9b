"""Writing a status branch: the document's text, and the commit that carries it.

`StatusWriter` never touches the policy branch or the fetch cache: it has its own bare
repository, makes a *new root commit* holding only `status.yaml` for every push, and
force-pushes exactly `refs/heads/status/<cell>`.  The branch is therefore always one commit
deep however long the agent runs, the replaced commits become unreachable garbage the server
prunes, and two agents can never conflict because each only ever names its own ref.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from reconciler.sources import gitio
from reconciler.status.branch import STATUS_FILE, STATUS_PREFIX, is_status_branch
from reconciler.status.document import CLAIM_TRAILER, trailer_value

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_status(doc: Mapping[str, Any]) -> str:
    """The document as the agent writes it: block style, keys in the document's order, one
    line per scalar (the layout `document.parse_status` reads without a full YAML load)."""
    text: str = yaml.dump(
        dict(doc),
        Dumper=_DUMPER,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )
    return text


class StatusPushError(Exception):
    """A status commit could not be made or pushed; the pusher retries with back-off."""


class StatusWriter:
    """Commits `status.yaml` as a new root commit and force-pushes it to `refs/heads/<branch>`."""

    def __init__(
        self, url: str, branch: str, repo_dir: str | os.PathLike[str], timeout: float = 30.0
    ) -> None:
        if not is_status_branch(branch):
            raise ValueError(
                f"refusing to write status to {branch!r}: not a {STATUS_PREFIX} branch"
            )
        self.url = url
        self.branch = branch
        self.path = Path(repo_dir)
        self.timeout = timeout
        self.pushes = 0

    def _git(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        out = gitio.run_git(
            self.path, *args, timeout=self.timeout, input=input, env=env, error=StatusPushError
        )
        return out.strip()

    def _ensure_repo(self) -> None:
        if (self.path / "HEAD").exists() and (self.path / "objects").is_dir():
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._git("init", "--quiet", "--bare")
        self._git("config", "gc.auto", "0")

    def commit(self, text: str, message: str, when: int) -> str:
        """A new root commit holding only status.yaml; returns its sha."""
        self._ensure_repo()
        try:
            blob = self._git("hash-object", "-w", "--stdin", input=text)
            tree = self._git("mktree", input=f"100644 blob {blob}\t{STATUS_FILE}\n")
        except StatusPushError:
            # A damaged local repo is only a scratch area: start a new one.
            shutil.rmtree(self.path, ignore_errors=True)
            self._ensure_repo()
            blob = self._git("hash-object", "-w", "--stdin", input=text)
            tree = self._git("mktree", input=f"100644 blob {blob}\t{STATUS_FILE}\n")
        ident = self.branch.replace("/", "-")
        env = {
            "GIT_AUTHOR_NAME": f"asgctl agent {ident}",
            "GIT_AUTHOR_EMAIL": f"{ident}@asgctl.invalid",
            "GIT_AUTHOR_DATE": f"{when} +0000",
            "GIT_COMMITTER_NAME": f"asgctl agent {ident}",
            "GIT_COMMITTER_EMAIL": f"{ident}@asgctl.invalid",
            "GIT_COMMITTER_DATE": f"{when} +0000",
        }
        return self._git("commit-tree", tree, "-m", message, env=env)

    def push(self, text: str, message: str, when: int | None = None) -> str:
        """Commit and force-push; StatusPushError on failure (the caller retries later)."""
        sha = self.commit(text, message, int(when if when is not None else time.time()))
        try:
            self._git(
                "push",
                "--quiet",
                "--force",
                "--no-verify",
                "--",
                self.url,
                f"{sha}:refs/heads/{self.branch}",
            )
        except StatusPushError as exc:  # logged and counted: never the URL's credentials
            raise StatusPushError(gitio.redacted(str(exc), self.url)) from None
        self.pushes += 1
        if self.pushes % 50 == 0:
            # Every push leaves the previous root commit unreachable here too.
            self._git("prune", "--expire=now")
        return sha


def commit_message(doc: Mapping[str, Any]) -> str:
    """The status commit's message: a subject naming the cell, its Ready condition and what
    it applied, then, after a blank line (git's trailer block is the message's last
    paragraph), the claim as a trailer, `Asgctl-Applied-Revision: <lastAppliedRevision>`
    (`document.trailer_value`: `none` for nothing applied), so a fleet reader takes every
    cell's claim from the commits alone (`read.read_claims`) and reads no document for the
    cells it leaves out.  A revision no trailer can hold states nothing (readers take the
    document's)."""
    ready: Mapping[str, Any] = next(
        (c for c in doc.get("conditions", ()) if c.get("type") == "Ready"), {}
    )
    applied = doc.get("lastAppliedRevision") or "nothing applied"
    subject = (
        f"status {doc.get('cell')}: Ready={ready.get('status', 'Unknown')} "
        f"({ready.get('reason', '')}), {applied}"
    )
    value = trailer_value(str(doc.get("lastAppliedRevision") or ""))
    return subject if value is None else f"{subject}\n\n{CLAIM_TRAILER}: {value}\n"
