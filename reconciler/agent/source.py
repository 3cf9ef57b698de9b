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
`DiskFull`, `FetchFailed`; `gitio.classify`).  A corrupt cache is deleted and fetched again
in the same call: it is a cache, the remote is the truth.  A cache is tagged with the
source it serves (`identity`, git config `asgctl.source`): one tagged for another source is
never fetched into but replaced, so the objects of two repositories never mix (an untagged
cache, from before the tag, is adopted).  Every git command goes through
`reconciler.sources.gitio` (timeouts that kill the whole process group, no prompts, no operator
config).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.sources import gitio
from reconciler.sources.gitio import classify

REMOTE_REF = "refs/remotes/origin/{branch}"
IDENTITY_KEY = "asgctl.source"
FETCH_PROTOCOL = ("-c", "protocol.version=2")
"""Every fetch speaks git protocol v2, whose `ls-refs` takes the refspec's `ref-prefix`: the
server then advertises the policy branch alone, never the fleet's `status/<cell>` branches.
Under protocol v0 it advertises every ref of the repository to every fetch -- at 10,000 cells,
10,000 refs per agent per interval (bench/results/fleet.md).  v2 is git's default since 2.26,
but `GIT_CONFIG_PARAMETERS` in the agent's environment (which `gitio.git_env` keeps) could
turn it off; a `-c` on the command line is read after it and wins.  A server that cannot
speak v2 still answers in v0: the pin costs nothing where it cannot help."""


class SourceError(Exception):
    """The branch could not be fetched; `reason` is the status condition's reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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
    from reconciler.escape import visible

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
    if not gitio.FULL_SHA.fullmatch(seen["tree"]):
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
        identity: str | None = None,
    ) -> None:
        self.url = url
        self.identity = identity
        """The source this cache may hold (`SourceRef.cache_id`); None: not checked."""
        self.branch = branch
        self.path = Path(cache_dir)
        self.depth = depth
        self.timeout = timeout
        self._ready = False
        self._recloned = False

    @property
    def ref(self) -> str:
        return REMOTE_REF.format(branch=self.branch)

    # -- the cache ---------------------------------------------------------------------------

    def _open(self) -> None:
        """Make sure the cache is a bare repository; a folder that is not one is replaced."""
        if self._ready:
            return
        if self.path.exists():
            res = self._git("rev-parse", "--is-bare-repository")
            if res.returncode == 0 and res.stdout.strip() == "true":
                tag = self.cached_identity()
                if self.identity is None or tag == self.identity:
                    self._ready = True
                    return
                if tag is None:  # a cache from before the tag: the configured source's
                    # Adopted even when the tag cannot be written (a full disk): it is
                    # adopted again next time, and a cache is never deleted for that.
                    self._git("config", IDENTITY_KEY, self.identity)
                    self._ready = True
                    return
            self.reset()  # not a repository, or another source's objects: start clean
            self._recloned = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for args in (
            ("init", "--quiet", "--bare"),
            ("config", "gc.auto", "0"),  # maintenance is ours, between cycles
            ("config", "core.logAllRefUpdates", "false"),
            ("config", "fetch.writeCommitGraph", "false"),
        ):
            res = self._git(*args)
            if res.returncode != 0:
                raise OSError(res.stderr.strip() or f"git {args[0]} failed")
        self._tag()
        self._ready = True

    def _tag(self) -> None:
        if self.identity is not None:
            res = self._git("config", IDENTITY_KEY, self.identity)
            if res.returncode != 0:
                raise OSError(res.stderr.strip() or "git config failed")

    def cached_identity(self) -> str | None:
        """The source the cache was made for (its tag), None when untagged or absent."""
        if not self.path.exists():
            return None
        res = self._git("config", "--get", IDENTITY_KEY)
        if res.returncode != 0:
            return None
        return res.stdout.strip() or None

    def reset(self) -> None:
        """Forget the cache entirely (it is corrupt); the next fetch starts from scratch."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        """Nothing stays open between git commands; the next one checks the cache again."""
        self._ready = False

    def _git(self, *args: str, timeout: float | None = None) -> gitio.Result:
        """Run git on the cache (C locale, our environment).

        Never raises for a non-zero exit; a run killed at the timeout is GitTimeout.
        """
        limit = timeout or self.timeout
        try:
            return gitio.run(self.path, *args, timeout=limit)
        except gitio.GitTimeout as exc:  # "git <subcommand>: no answer within <limit> s"
            raise SourceError("GitTimeout", str(exc)) from None

    def head(self) -> str | None:
        """The cached branch head, if the cache has one."""
        if not self.path.exists():
            return None
        res = self._git("rev-parse", "--verify", "--quiet", f"{self.ref}^{{commit}}")
        return res.stdout.strip() if res.returncode == 0 else None

    def has_commit(self, sha: str) -> bool:
        if not self.path.exists():
            return False
        return self._git("cat-file", "-e", f"{sha}^{{commit}}").returncode == 0

    def holds(self, sha: str) -> bool:
        """Is `sha` in the fetched branch's history?  Unshallows before saying no."""
        if self.has_commit(sha):
            return True
        if self.shallow:
            self._unshallow()
            return self.has_commit(sha)
        return False

    def _unshallow(self) -> None:
        res = self._git(
            *FETCH_PROTOCOL,
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
        except OSError as exc:
            raise SourceError("CacheCorrupt", f"cannot create the cache: {exc}") from None
        args = [
            *FETCH_PROTOCOL,
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-auto-gc",
        ]
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
                self._unshallow()
                continue
            return False
        return False

    def shows_ancestor(self, old: str, new: str) -> bool:
        """Does the history this cache already holds show `new` descending from `old` (or
        equal to it)?  Local only, never fetching: False when it cannot tell (`old` is not
        here, or lies beyond a shallow boundary).  For a cache that is kept, not fetched
        into -- the applied revision's old source after a move, which may be gone."""
        if not (self.has_commit(old) and self.has_commit(new)):
            return False
        return self._git("merge-base", "--is-ancestor", old, new).returncode == 0

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
