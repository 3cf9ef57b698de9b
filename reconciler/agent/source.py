"""The git edge: fetch one branch into a local bare cache, and answer questions about it.

Only the policy branch is fetched (`+refs/heads/<branch>:refs/remotes/origin/<branch>`, no
tags), so a cell never downloads the other cells' status branches.  The first fetch into an
empty cache is shallow (`fetch-depth`, default 1) -- a policy repo with years of history costs
a new cell one commit -- and every later fetch is an ordinary incremental one, so every commit
since the first is present and "does the new head descend from what we applied?" is a local
question.  When the answer is "no" in a shallow cache it is checked again after unshallowing,
since only a full history can prove a negative.

Failures are classified into the reasons the status reports (`GitUnreachable`,
`AuthenticationFailed`, `BranchNotFound`, `RepositoryNotFound`, `GitTimeout`, `CacheCorrupt`,
`DiskFull`, `FetchFailed`).  A
corrupt cache is deleted and fetched again in the same call: it is a cache, the remote is
the truth.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import git

REMOTE_REF = "refs/remotes/origin/{branch}"

_UNREACHABLE = (
    "connection refused",
    "could not resolve",
    "unable to connect",
    "unable to look up",
    "connection timed out",
    "no route to host",
    "network is unreachable",
    "connection reset",
    "remote end hung up unexpectedly",
    "failed to connect",
    "couldn't connect",
    "early eof",
)
_AUTH = (
    "authentication failed",
    "permission denied",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "access denied",
    "returned error: 401",
    "returned error: 403",
    "host key verification failed",
)
_CORRUPT = (
    "not a git repository",
    "corrupt",
    "bad object",
    "unable to read",
    "packfile",
    "index-pack",
    "missing object",
    "invalid object",
    "object file",
    "inflate",
    "bad file",
    "broken link",
    "fatal: bad config",
    "bad numeric config",
    "invalid gitfile",
)


_DISK_FULL = ("no space left on device", "disk quota exceeded")


class SourceError(Exception):
    """The branch could not be fetched; `reason` is the status condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def classify(stderr: str) -> str:
    """A git failure's reason from its stderr (first match wins: no branch, a full disk, auth,
    unreachable, no repository, corrupt cache).

    Only our own git's complaints can mean a corrupt *cache*; what the server says
    (`remote: ...`, `fatal: remote error: ...`) never does, or a broken server would make
    every agent throw its cache away on every cycle.
    """
    text = stderr.lower()
    if "couldn't find remote ref" in text:
        return "BranchNotFound"
    if any(s in text for s in _DISK_FULL):
        # Checked before the corruption markers: "unable to write loose object file: No
        # space left on device" is a full disk, and wiping the cache would not help it.
        return "DiskFull"
    if any(s in text for s in _AUTH):
        return "AuthenticationFailed"
    if any(s in text for s in _UNREACHABLE):
        return "GitUnreachable"
    if "does not appear to be a git repository" in text or "repository not found" in text:
        return "RepositoryNotFound"
    local = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(("remote:", "fatal: remote error", "error: remote"))
    )
    if any(s in local for s in _CORRUPT):
        return "CacheCorrupt"
    if "could not read from remote repository" in text:
        return "GitUnreachable"
    return "FetchFailed"


def git_env() -> dict[str, str]:
    """Never prompt (an agent has no terminal) and never read the operator's git config."""
    env = dict(os.environ)
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GIT_SSH_COMMAND": env.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
        }
    )
    return env


def run_git(
    git_dir: str | os.PathLike[str],
    *args: str,
    timeout: float,
    input: str | None = None,
    env: dict[str, str] | None = None,
    error: type[Exception] = RuntimeError,
) -> str:
    """`git --git-dir=<git_dir> <args>` without prompts or operator config; its stdout.

    `env` adds to `git_env()` (e.g. a commit's author and date).  A non-zero exit or no answer
    within `timeout` seconds raises `error` with the subcommand and the last lines git wrote
    to stderr, so a caller's thread never dies of a bare `TimeoutExpired`.
    """
    try:
        res = subprocess.run(
            ["git", f"--git-dir={git_dir}", *args],
            input=input,
            capture_output=True,
            text=True,
            env={**git_env(), **(env or {}), "LC_ALL": "C"},
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise error(f"git {args[0]}: no answer within {timeout:g} s") from None
    if res.returncode != 0:
        lines = [x.strip() for x in res.stderr.splitlines() if x.strip()]
        raise error(f"git {args[0]}: " + (" / ".join(lines[-3:]) or "failed"))
    return res.stdout


@dataclass(frozen=True, slots=True)
class _Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Fetched:
    """The head of the branch after a fetch, and what the fetch cost."""

    sha: str
    seconds: float
    recloned: bool = False
    shallow: bool = False


MAX_COMMIT_BYTES = 1024 * 1024
"""A commit object's header and message; a real one is a few KB even when signed."""
SUBJECT_CHARS = 200
"""How much of a commit's subject goes into logs and the status (the author chose it)."""
_IDENT = re.compile(r"^(.*) <([^<>\n]*)> ([0-9]{1,15}) ([+-][0-9]{4})$", re.ASCII)
_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class CommitInfo:
    sha: str
    message: str
    author: str
    committed_at: int
    signed: bool

    @property
    def subject(self) -> str:
        """The first line of the message, cut and with control characters escaped: it goes
        into the status and logs, and whoever pushed the commit wrote it."""
        return clip(self.message.strip().split("\n", 1)[0], SUBJECT_CHARS)


class MalformedCommit(Exception):
    """A commit git stores but that is not what `git commit` writes (a date of unicode
    digits, a missing committer, an absurd size); the agent refuses it like a bad signature."""


def clip(text: str, limit: int) -> str:
    """Untrusted text for a status or a log line: control characters escaped, at most
    `limit` characters (with `...` when cut)."""
    from reconciler.report.escape import visible

    shown = visible(text[: limit + 1])
    return shown if len(shown) <= limit else shown[: max(0, limit - 3)] + "..."


def parse_commit(sha: str, raw: str) -> CommitInfo:
    """The fields the agent uses from `git cat-file commit` output, strictly.

    Dates are ASCII digits (`str.isdigit()` also accepts `²²²`, which `int()` refuses), the
    tree, author and committer are each there exactly once, and anything else is a
    MalformedCommit naming what is wrong.
    """
    header, sep, message = raw.partition("\n\n")
    if not sep:
        header, message = raw.rstrip("\n"), ""
    seen: dict[str, str] = {}
    signed = False
    for line in header.split("\n"):
        if line.startswith(" "):
            continue  # the continuation of a multi-line header (gpgsig, mergetag)
        name, _, value = line.partition(" ")
        if name in ("gpgsig", "gpgsig-sha256"):
            signed = True
        if name in ("tree", "author", "committer"):
            if name in seen:
                raise MalformedCommit(f"commit {sha[:12]} has more than one {name!r} line")
            seen[name] = value
    for name in ("tree", "author", "committer"):
        if name not in seen:
            raise MalformedCommit(f"commit {sha[:12]} has no {name!r} line")
    if not _OID.match(seen["tree"]):
        raise MalformedCommit(f"commit {sha[:12]}: tree {clip(seen['tree'], 80)} is not an id")
    idents = {}
    for name in ("author", "committer"):
        m = _IDENT.match(seen[name])
        if m is None:
            raise MalformedCommit(
                f"commit {sha[:12]}: {name} {clip(seen[name], 120)} is not "
                "'Name <email> <seconds since 1970> <+hhmm>'"
            )
        idents[name] = m
    return CommitInfo(
        sha,
        message,
        idents["author"].group(1),
        int(idents["committer"].group(3)),
        signed,
    )


class GitSource:
    """A bare cache of one branch of one remote, under `cache_dir`."""

    def __init__(
        self,
        url: str,
        branch: str,
        cache_dir: str | os.PathLike[str],
        *,
        depth: int = 1,
        timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.branch = branch
        self.path = Path(cache_dir)
        self.depth = depth
        self.timeout = timeout
        self._repo: git.Repo | None = None
        self._recloned = False

    @property
    def ref(self) -> str:
        return REMOTE_REF.format(branch=self.branch)

    # -- the cache ---------------------------------------------------------------------------

    def _open(self) -> git.Repo:
        if self._repo is not None:
            return self._repo
        if self.path.exists():
            try:
                repo = git.Repo(self.path)
                if not repo.bare:
                    raise git.InvalidGitRepositoryError(str(self.path))
                self._repo = repo
                return repo
            except (git.InvalidGitRepositoryError, git.NoSuchPathError, ValueError, OSError):
                self.reset()
                self._recloned = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repo = git.Repo.init(self.path, bare=True)
        with repo.config_writer() as cw:
            cw.set_value("gc", "auto", "0")  # maintenance is ours, between cycles
            cw.set_value("core", "logAllRefUpdates", "false")
            cw.set_value("fetch", "writeCommitGraph", "false")
        self._repo = repo
        return repo

    def reset(self) -> None:
        """Forget the cache entirely (it is corrupt); the next fetch starts from scratch."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def _git(self, *args: str, timeout: float | None = None) -> _Run:
        """Run git on the cache (through gitpython, C locale, our environment).

        Never raises for a non-zero exit; a run killed at the timeout is GitTimeout.
        """
        limit = timeout or self.timeout
        t0 = time.monotonic()
        status, out, err = git.Git().execute(
            ["git", f"--git-dir={self.path}", *args],
            with_extended_output=True,
            with_exceptions=False,
            kill_after_timeout=limit,
            env=git_env(),
            strip_newline_in_stdout=False,
        )
        if status != 0 and time.monotonic() - t0 >= limit:
            raise SourceError("GitTimeout", f"git {args[0]}: no answer within {limit:g} s")
        return _Run(int(status or 0), str(out), str(err))

    def head(self) -> str | None:
        """The cached branch head, if the cache has one."""
        if not self.path.exists():
            return None
        res = self._git("rev-parse", "--verify", "--quiet", f"{self.ref}^{{commit}}")
        return res.stdout.strip() if res.returncode == 0 else None

    def has_commit(self, sha: str) -> bool:
        return self._git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0

    @property
    def shallow(self) -> bool:
        return (self.path / "shallow").exists()

    # -- fetch -------------------------------------------------------------------------------

    def fetch(self) -> Fetched:
        """Fetch the branch; re-create a corrupt cache once.  SourceError on failure."""
        t0 = time.perf_counter()
        self._recloned = False
        try:
            sha = self._fetch_once()
            return Fetched(sha, time.perf_counter() - t0, self._recloned, self.shallow)
        except SourceError as exc:
            if exc.reason == "DiskFull":
                # The failed fetch left the loose objects it managed to write, filling the
                # disk the state file and the status repo need too: drop them (no ref names
                # them), keep the history the cache already had.
                self._git("prune", "--expire=now")
            if exc.reason != "CacheCorrupt":
                raise
        self.reset()
        sha = self._fetch_once()
        return Fetched(sha, time.perf_counter() - t0, True, self.shallow)

    def _fetch_once(self) -> str:
        try:
            self._open()
        except (git.GitCommandError, OSError) as exc:
            raise SourceError("CacheCorrupt", f"cannot create the cache: {exc}") from None
        args = ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-auto-gc"]
        if self.depth > 0 and self.head() is None:
            args.append(f"--depth={self.depth}")
        refspec = f"+refs/heads/{self.branch}:{self.ref}"
        res = self._git(*args, "--", self.url, refspec)
        if res.returncode != 0:
            reason = classify(res.stderr)
            raise SourceError(reason, _git_message(res.stderr, self.url))
        sha = self.head()
        if sha is None or self._git("cat-file", "-e", f"{sha}^{{tree}}").returncode != 0:
            raise SourceError("CacheCorrupt", "the fetched head cannot be read from the cache")
        return sha

    # -- questions about commits -------------------------------------------------------------

    def is_ancestor(self, old: str, new: str) -> bool:
        """Does `new` descend from `old` (or equal it)?  Unshallows before saying no."""
        for attempt in range(2):
            if self.has_commit(old):
                res = self._git("merge-base", "--is-ancestor", old, new)
                if res.returncode == 0:
                    return True
                if res.returncode != 1:
                    raise SourceError("CacheCorrupt", _git_message(res.stderr, self.url))
            if attempt == 0 and self.shallow:
                res = self._git(
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--no-auto-gc",
                    "--unshallow",
                    "--",
                    self.url,
                    f"+refs/heads/{self.branch}:{self.ref}",
                )
                if res.returncode != 0:
                    raise SourceError(classify(res.stderr), _git_message(res.stderr, self.url))
                continue
            return False
        return False

    def commit_info(self, sha: str) -> CommitInfo:
        """The commit's fields, parsed strictly (`parse_commit`); its size is asked first, so
        a commit with a 70 MB message is refused without being read.

        SourceError when the cache cannot answer; MalformedCommit when the commit is bad.
        """
        size = self._git("cat-file", "-s", sha)
        if size.returncode != 0:
            raise SourceError("CacheCorrupt", f"commit {sha[:12]} cannot be read from the cache")
        if not size.stdout.strip().isascii() or not size.stdout.strip().isdigit():
            raise SourceError("CacheCorrupt", f"commit {sha[:12]}: git gave no size")
        if int(size.stdout) > MAX_COMMIT_BYTES:
            raise MalformedCommit(
                f"commit {sha[:12]} is {int(size.stdout)} bytes, over the limit of "
                f"{MAX_COMMIT_BYTES} bytes for a commit's header and message"
            )
        res = self._git("cat-file", "commit", sha)
        if res.returncode != 0:
            raise SourceError("CacheCorrupt", f"commit {sha[:12]} cannot be read from the cache")
        return parse_commit(sha, res.stdout)

    def intact(self) -> bool:
        """A full object check, for when a revision fails to load: cache fault or bad commit?"""
        res = self._git("fsck", "--no-progress", "--no-dangling", timeout=max(self.timeout, 120))
        return res.returncode == 0

    def maintain(self) -> None:
        """Between cycles: let git pack loose objects when there are many (cheap otherwise)."""
        self._git("-c", "gc.auto=6700", "gc", "--auto", "--quiet")


def _git_message(stderr: str, url: str) -> str:
    """git's own words, minus hints and progress, with the URL's credentials hidden."""
    from reconciler.agent.config import redact_url

    lines = [
        x.strip()
        for x in stderr.splitlines()
        if x.strip() and not x.lstrip().startswith(("hint:", "remote: Counting", "remote: Total"))
    ]
    text = " / ".join(lines[-3:]) or "git failed without a message"
    if url != redact_url(url):
        text = text.replace(url, redact_url(url))
    return text[:500]
