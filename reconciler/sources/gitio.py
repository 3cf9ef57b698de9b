"""The one way the product runs git: a subprocess per command, or one `cat-file` it owns.

Three callers used to reach git three ways (gitpython's `Repo`, a subprocess wrapper, raw
`cat-file` pipes).  Every product git call now goes through here, so the rules are kept once:

* git never prompts and never reads the operator's config (`git_env`): an agent has no
  terminal, and a `~/.gitconfig` with `url.insteadOf` or hooks must not change what it does;
* output is parsed in the C locale, and text is decoded as UTF-8 with `surrogateescape`
  (a commit message of invalid UTF-8 is data to refuse, not a crash);
* every command has a timeout, and a command that overruns is killed and reported as
  GitTimeout (never a bare `TimeoutExpired` that ends a caller's thread);
* callers put `--` before URLs and paths (`run(..., "fetch", "--", url, refspec)`), so a
  value from configuration or a status file is never read as an option;
* a failed fetch is classified into the reasons the agent's status reports (`classify`);
* processes are owned: `BlobReader` keeps one `git cat-file --batch` for many reads and
  closes it (gitpython's `Repo` kept one per object and leaked them in long runs).

gitpython is therefore no longer a dependency of the product: subprocess covers everything
it did, with the timeouts and process ownership above that its `Repo` objects lacked.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Self

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


FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
"""A full object name (SHA-1 or SHA-256), checked with `fullmatch`: the only spelling of a
commit that a status file, a state file or a server's listing may hand to git's command line
(never a ref, never an option, no trailing newline)."""


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


def redact_url(url: str) -> str:
    """`https://user:token@host/x` -> `https://***@host/x`: status and logs are world-readable."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]+@", r"\1***@", url)


def redacted(text: str, url: str) -> str:
    """`text` (git's words) with every spelling of `url` that carries credentials hidden."""
    shown = redact_url(url)
    return text.replace(url, shown) if shown != url else text


class GitTimeout(Exception):
    """git gave no answer within its timeout; it was killed with its process group."""


@dataclass(frozen=True, slots=True)
class Result:
    """What one git command did: its exit status and its output, decoded."""

    returncode: int
    stdout: str
    stderr: str


def _command(git_dir: str | os.PathLike[str] | None, args: Sequence[str]) -> list[str]:
    where = [f"--git-dir={os.fspath(git_dir)}"] if git_dir is not None else []
    return ["git", *where, *args]


def _environment(env: Mapping[str, str] | None) -> dict[str, str]:
    return {**git_env(), **(env or {}), "LC_ALL": "C"}


def run_bytes(
    git_dir: str | os.PathLike[str] | None,
    *args: str,
    timeout: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, bytes, bytes]:
    """`git [--git-dir=<git_dir>] <args>`: (exit status, stdout, stderr) as bytes.

    On timeout git is killed (`subprocess.run`; a helper it forked -- `git-remote-http`,
    `ssh` -- sees its pipes close and ends) and GitTimeout raised.  `git_dir` None runs git
    where the process stands, for `-C <dir>` and the like.
    """
    try:
        res = subprocess.run(
            _command(git_dir, args),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=_environment(env),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GitTimeout(f"git {_subcommand(args)}: no answer within {timeout:g} s") from None
    return res.returncode, res.stdout, res.stderr


def _subcommand(args: Sequence[str]) -> str:
    """The git command's name for messages: `-C <dir> cat-file ...` -> `cat-file`."""
    rest = list(args)
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in ("-C", "-c") else rest[1:]
    return rest[0] if rest else "git"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=5)


def decode(data: bytes) -> str:
    """git's output as text: UTF-8, with undecodable bytes kept as surrogates."""
    return data.decode("utf-8", "surrogateescape")


def run(
    git_dir: str | os.PathLike[str] | None,
    *args: str,
    timeout: float,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Result:
    """A git command's exit status and output as text; never raises for a non-zero exit.

    GitTimeout when it gives no answer within `timeout` seconds.
    """
    code, out, err = run_bytes(
        git_dir,
        *args,
        timeout=timeout,
        input=input.encode("utf-8", "surrogateescape") if input is not None else None,
        env=env,
    )
    return Result(code, decode(out), decode(err))


def run_git(
    git_dir: str | os.PathLike[str] | None,
    *args: str,
    timeout: float,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    error: type[Exception] = RuntimeError,
) -> str:
    """`git --git-dir=<git_dir> <args>` without prompts or operator config; its stdout.

    `env` adds to `git_env()` (e.g. a commit's author and date).  A non-zero exit or no answer
    within `timeout` seconds raises `error` with the subcommand and the last lines git wrote
    to stderr, so a caller's thread never dies of a bare timeout.
    """
    try:
        res = run(git_dir, *args, timeout=timeout, input=input, env=env)
    except GitTimeout as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"git {_subcommand(args)}: {exc}") from None
    if res.returncode != 0:
        lines = [x.strip() for x in res.stderr.splitlines() if x.strip()]
        raise error(f"git {_subcommand(args)}: " + (" / ".join(lines[-3:]) or "failed"))
    return res.stdout


def nul_fields(
    repo: str | os.PathLike[str], args: Sequence[str], cap: int, timeout: float = 120.0
) -> list[tuple[bytes, bool]]:
    """The NUL-terminated fields `git -C <repo> <args>` writes (a format of `%00`-ended
    atoms), each as `(its first cap bytes, whether it was longer)`, read as git writes them:
    a field of any length (a commit message a pusher made huge) costs at most `cap` bytes
    here.  Bytes after the last NUL are dropped.  OSError when git fails or gives no answer
    within `timeout` seconds (it is killed)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            _command(None, ["-C", os.fspath(repo), *args]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=_environment(None),
            start_new_session=True,
        )
        late = threading.Event()

        def stop() -> None:  # the reader below then sees the pipe end
            late.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        fields: list[tuple[bytes, bool]] = []
        field, cut = bytearray(), False
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(65536):
                parts = chunk.split(b"\0")
                for i, part in enumerate(parts):
                    cut = cut or len(field) + len(part) > cap
                    field += part[: max(0, cap - len(field))]
                    if i < len(parts) - 1:  # a NUL ends the field
                        fields.append((bytes(field), cut))
                        field, cut = bytearray(), False
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                _kill_group(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        if late.is_set():
            raise OSError(f"git {_subcommand(args)}: no answer within {timeout:g} s")
        if code != 0:
            err.seek(0)
            said = decode(err.read()[-2000:]).strip()
            raise OSError(f"git {_subcommand(args)} failed ({code}): {said[-300:]}")
        return fields


# -- reading objects -----------------------------------------------------------------------


def git_dir_of(path: str | os.PathLike[str], timeout: float = 60.0) -> str | None:
    """The git directory of the repository holding `path` (a work tree folder or a bare
    repository, searched upwards as git does); None when there is none."""
    try:
        res = run(None, "-C", os.fspath(path), "rev-parse", "--absolute-git-dir", timeout=timeout)
    except (GitTimeout, OSError):
        return None
    return res.stdout.rstrip("\n") if res.returncode == 0 else None


def resolve_commit(repo: str | os.PathLike[str], rev: str, timeout: float = 60.0) -> str | None:
    """The commit id `rev` names in the repository holding `repo`; None when it names none.

    `--end-of-options` keeps a revision from a command line (`--base -x`) from being an
    option of git's.
    """
    try:
        res = run(
            None,
            "-C",
            os.fspath(repo),
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            f"{rev}^{{commit}}",
            timeout=timeout,
        )
    except (GitTimeout, OSError):
        return None
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else None


def tracks(work_tree: str | os.PathLike[str], path: str, timeout: float = 60.0) -> bool:
    """Whether the work tree has `path` in its index (a committed or added path)."""
    try:
        res = run(None, "-C", os.fspath(work_tree), "ls-files", "--", path, timeout=timeout)
    except (GitTimeout, OSError):
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One entry of a tree object: its name, mode (e.g. 0o100644), type and object id."""

    name: str
    mode: int
    oid: str

    @property
    def type(self) -> str:
        """`tree`, `commit` (a submodule) or `blob` (files and symlinks), as the mode says."""
        kind = self.mode >> 12
        return "tree" if kind == 0o04 else "commit" if kind == 0o16 else "blob"


def parse_tree(data: bytes, oid_bytes: int) -> tuple[TreeEntry, ...]:
    """A raw tree object's entries, in stored order (`<mode> <name>\\0<binary id>`).

    Names are decoded as UTF-8 with `surrogateescape`, so any byte string round-trips.
    """
    out: list[TreeEntry] = []
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        nul = data.index(b"\0", space)
        end = nul + 1 + oid_bytes
        if end > len(data):
            raise ValueError("truncated tree object")
        out.append(
            TreeEntry(
                decode(data[space + 1 : nul]), int(data[pos:space], 8), data[nul + 1 : end].hex()
            )
        )
        pos = end
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """`git cat-file --batch-check` for one name: the object's id, type and size."""

    oid: str
    type: str
    size: int


class BlobReader:
    """Two long-lived `git cat-file` processes for many object reads, owned and closed by us.

    `--batch-check` answers `info` (id, type, size) and `--batch` answers `read`, so a caller
    can refuse an oversized object before a byte of it is read.  (Both modes exist in every
    git in use; `--batch-command` would need git 2.36.)  Use as a context manager, or call
    `close`: the processes end when the reader does, so a long-running agent or test suite
    never accumulates `cat-file` children.
    """

    def __init__(self, git_dir: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.git_dir = os.fspath(git_dir)
        self.timeout = timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _ask(self, mode: str, name: str) -> IO[bytes]:
        if "\n" in name:
            raise ValueError("an object name cannot hold a newline")
        proc = self._procs.get(mode)
        if proc is None:
            proc = self._procs[mode] = subprocess.Popen(
                _command(self.git_dir, ["cat-file", mode]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=_environment(None),
                start_new_session=True,
            )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(name.encode("utf-8", "surrogateescape") + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise OSError(f"{self.git_dir}: git cat-file ended") from None
        return proc.stdout

    def info(self, name: str) -> ObjectInfo | None:
        """The object `name` (an id or `<rev>:<path>`) names, or None when there is none."""
        header = self._ask("--batch-check", name).readline()
        if not header:
            raise OSError(f"{self.git_dir}: git cat-file ended")
        parts = header.split()
        if len(parts) != 3 or not parts[2].isdigit():
            return None  # "<name> missing" / "ambiguous"
        return ObjectInfo(parts[0].decode("ascii"), parts[1].decode("ascii"), int(parts[2]))

    def read(self, oid: str) -> bytes:
        """The content of object `oid` (whose size the caller has already accepted)."""
        out = self._ask("--batch", oid)
        parts = out.readline().split()
        if len(parts) != 3 or not parts[2].isdigit():
            raise OSError(f"{self.git_dir}: object {oid} cannot be read")
        size = int(parts[2])
        data = out.read(size)
        out.read(1)  # the newline after the content
        if len(data) != size:
            raise OSError(f"{self.git_dir}: git cat-file ended while reading {oid}")
        return data

    def tree(self, oid: str) -> tuple[TreeEntry, ...]:
        """The entries of tree `oid`; OSError when it is not a readable tree."""
        info = self.info(oid)
        if info is None or info.type != "tree":
            raise OSError(f"{self.git_dir}: {oid} is not a tree")
        try:
            return parse_tree(self.read(info.oid), len(info.oid) // 2)
        except ValueError as exc:
            raise OSError(f"{self.git_dir}: tree {oid}: {exc}") from None

    def close(self) -> None:
        """End both processes (closing stdin ends a cat-file; a stuck one is killed)."""
        procs, self._procs = list(self._procs.values()), {}
        for proc in procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def blob_sizes(
    repo: str | os.PathLike[str], names: Sequence[str], timeout: float = 120.0
) -> list[ObjectInfo | None]:
    """What each name (`<rev>:<path>` or an id) is, from one `git cat-file --batch-check`:
    its id, type and size, or None when it names nothing.  Nothing of any object is read, so
    a caller can refuse an oversized one first.  OSError when git itself cannot run."""
    if not names:
        return []
    if any("\n" in n for n in names):
        raise ValueError("an object name cannot hold a newline")
    checked = _cat_file(repo, "--batch-check", names, timeout).split(b"\n")
    out: list[ObjectInfo | None] = []
    for i in range(len(names)):
        header = checked[i].split() if i < len(checked) else []
        if len(header) != 3 or not header[2].isdigit():
            out.append(None)
        else:
            out.append(
                ObjectInfo(header[0].decode("ascii"), header[1].decode("ascii"), int(header[2]))
            )
    return out


def read_objects(
    repo: str | os.PathLike[str], wanted: Sequence[ObjectInfo], timeout: float = 120.0
) -> list[bytes | None]:
    """The contents of objects whose ids and sizes `blob_sizes` gave (and the caller
    accepted), from one `git cat-file --batch`; None for one that changed while being read
    (it, and the ones after it, are not trusted).  OSError when git itself cannot run."""
    if not wanted:
        return []
    data = _cat_file(repo, "--batch", [o.oid for o in wanted], timeout)
    out: list[bytes | None] = [None] * len(wanted)
    pos = 0
    for i, info in enumerate(wanted):
        eol = data.find(b"\n", pos)
        header = data[pos:eol].split() if eol >= 0 else []
        if header[:1] != [info.oid.encode()] or header[2:3] != [str(info.size).encode()]:
            break
        pos = eol + 1
        out[i] = data[pos : pos + info.size]
        pos += info.size + 1
    return out


def read_blobs(
    repo: str | os.PathLike[str], names: Sequence[str], limit: int, timeout: float = 120.0
) -> list[bytes | str]:
    """Many blobs at once: each one's bytes, or why it cannot be used (a short reason).

    Sizes come first (`blob_sizes`), so a blob over `limit` (say a file that compresses
    2 GB into 10 MB on the server) is never read; the rest come from one `read_objects`.
    Two processes for any number of blobs: a fleet of status branches costs two forks, not
    one per cell.  `repo` is a bare repository or any folder of a work tree.  OSError when
    git itself cannot run.
    """
    out: list[bytes | str] = []
    wanted: list[tuple[int, ObjectInfo]] = []
    for i, info in enumerate(blob_sizes(repo, names, timeout)):
        if info is None or info.type != "blob":
            out.append("no such file")
        elif info.size > limit:
            out.append(f"{info.size} bytes, over the limit of {limit} bytes")
        else:
            out.append(b"")
            wanted.append((i, info))
    read = read_objects(repo, [info for _i, info in wanted], timeout)
    for (i, _info), data in zip(wanted, read, strict=True):
        out[i] = data if data is not None else "changed while being read"
    return out


def _cat_file(
    repo: str | os.PathLike[str], mode: str, lines: Sequence[str], timeout: float
) -> bytes:
    try:
        code, out, err = run_bytes(
            None,
            "-C",
            os.fspath(repo),
            "cat-file",
            mode,
            timeout=timeout,
            input="".join(s + "\n" for s in lines).encode("utf-8", "surrogateescape"),
        )
    except GitTimeout as exc:
        raise OSError(str(exc)) from None
    if code != 0:
        raise OSError(f"git cat-file failed ({code}): {decode(err).strip()[-300:]}")
    return out
