"""Fault injection for the reliability tests and the soak: mount views, locks, rivals, kills.

Everything here makes a fault happen *to a real process* -- a full disk under the agent's
state directory, the xtables lock held by someone else, another program editing FORWARD,
SIGKILL at a chosen moment -- and cleans up after itself however the test ends:

* `MountView` is a private mount namespace held open by a small `cat` process whose stdin is
  a pipe from us: tmpfs mounts and a private xtables lock live only in that namespace, so a
  test never fills or locks anything other engineers on the host use, and when the test
  process dies (even by SIGKILL) the pipe closes, `cat` exits and the kernel frees the
  namespace and its mounts.  Processes run inside it through `nsenter --mount`.
* `/run` is shared by every network namespace (``ip netns exec`` does not remount it), so
  a lock taken on the host's /run/xtables.lock would stall every iptables on the machine;
  the view bind-mounts a lock file of its own over it instead, and the agent under test and
  the lock holder both run in the view.
* `Rival` is "another program": a shell loop in the cell namespace that adds and deletes its
  own FORWARD rules and chains while we converge, and counts its own command failures (a
  failed `-D` means someone deleted its rule).
* `snapshot` reads the filter table with iptables-save, so "exactly the old or the new plan,
  and nobody else's rules touched" is checked on the kernel's own words.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.backends.iptables.backend import tool
from reconciler.backends.iptables.render import marker_rule, render_cell
from reconciler.core.cellplan import CellPlan

XTABLES_LOCK = "/run/xtables.lock"


# -- processes -------------------------------------------------------------------------------


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is `sid` (an agent started with a new session and
    its iptables-restore children, which outlive it when it is killed)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry))
    return out


def wait_session_gone(sid: int, timeout: float = 10.0) -> None:
    """Wait until nothing of session `sid` runs any more (SIGKILL what is left at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not session_pids(sid):
            return
        time.sleep(0.005)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"processes of session {sid} still ran after {timeout}s")


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def find_descendant(root: int, suffix: bytes, timeout: float) -> int | None:
    """A descendant of `root` whose argv[0] ends with `suffix` (e.g. b"-restore"), polled every
    half millisecond so the kill lands while it runs; None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack = [root]
        while stack:
            pid = stack.pop()
            kids = children(pid)
            for kid in kids:
                argv = cmdline(kid)
                if argv and argv[0].endswith(suffix):
                    return kid
            stack.extend(kids)
        time.sleep(0.0005)
    return None


def in_session(sid: int, needle: bytes) -> int | None:
    """A process of session `sid` whose command line contains `needle`."""
    for pid in session_pids(sid):
        if any(needle in part for part in cmdline(pid)):
            return pid
    return None


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process (ourselves by default), from /proc."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- a private mount namespace ---------------------------------------------------------------


class MountView:
    """A private mount namespace with tmpfs mounts and/or a private xtables lock.

    Create namespaces the view must see (lab cells) before starting it: a private view is a
    copy of the host's mounts at that moment.
    """

    def __init__(
        self, *, tmpfs: Mapping[str | Path, str] | None = None, private_lock: bool = False
    ) -> None:
        self.tmpfs = {Path(k): v for k, v in (tmpfs or {}).items()}
        self.private_lock = private_lock
        self.proc: subprocess.Popen[bytes] | None = None
        self._lockdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> MountView:
        steps = ["set -e"]
        for path, size in self.tmpfs.items():
            path.mkdir(parents=True, exist_ok=True)
            steps.append(
                f"mount -t tmpfs -o size={shlex.quote(size)},mode=0755 asgt-fault "
                f"{shlex.quote(str(path))}"
            )
        if self.private_lock:
            self._lockdir = tempfile.TemporaryDirectory(prefix="asgt-faultlock-")
            lock = Path(self._lockdir.name, "xtables.lock")
            lock.touch()
            steps.append(f"mount --bind {shlex.quote(str(lock))} {XTABLES_LOCK}")
        # `cat` lives exactly as long as our end of the pipe: the test's process.
        steps.append("echo ready")
        steps.append("exec cat >/dev/null")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(steps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.close()
            raise RuntimeError(f"mount view did not start: {err.strip()}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def prefix(self) -> list[str]:
        """Run a command in this view: `[*view.prefix, *argv]`."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--"]

    def path(self, path: str | Path) -> Path:
        """`path` as seen in the view (through /proc/<holder>/root)."""
        return Path(f"/proc/{self.pid}/root") / Path(path).relative_to("/")

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *argv],
            capture_output=True,
            text=True,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        if self._lockdir is not None:
            self._lockdir.cleanup()
            self._lockdir = None

    def __enter__(self) -> MountView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def fill(path: Path, chunk: int = 1 << 16) -> int:
    """Write zeros to `path` until the file system is full; returns the bytes written."""
    written = 0
    data = b"\0" * chunk
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(data)
            except OSError:
                if chunk == 1:
                    break
                chunk = max(1, chunk // 4)
                data = data[:chunk]
    return written


@contextlib.contextmanager
def xtables_lock_held(
    view: MountView, netns: str, seconds: float, *, timeout: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Hold the view's /run/xtables.lock from inside `netns` for `seconds` (or until the
    block ends, whichever is later the holder is always killed and reaped)."""
    argv = [
        *view.prefix,
        "ip",
        "netns",
        "exec",
        netns,
        "flock",
        "--exclusive",
        XTABLES_LOCK,
        "sh",
        "-c",
        f"echo locked; exec sleep {seconds}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"locked", "the lock holder did not get the lock"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait(timeout=timeout)


# -- another program's rules -----------------------------------------------------------------

FOREIGN_SETUP = (
    ":RIVAL-KEEP - [0:0]",
    "-A RIVAL-KEEP -p tcp -m tcp --dport 9 -m comment --comment rival-keep -j DROP",
    "-A FORWARD -s 198.18.210.1/32 -m comment --comment rival-first -j ACCEPT",
    "-A FORWARD -d 198.18.210.2/32 -j RIVAL-KEEP",
    "-A INPUT -s 198.18.210.3/32 -j DROP",
)
"""Rules another program owns for the whole test: they must read back unchanged."""


def install_foreign(netns: str, variant: str, runner_prefix: Sequence[str] = ()) -> None:
    text = "*filter\n" + "\n".join(FOREIGN_SETUP) + "\nCOMMIT\n"
    subprocess.run(
        [*runner_prefix, "ip", "netns", "exec", netns, tool(variant, 4, "restore"), "--noflush"],
        input=text,
        text=True,
        check=True,
        capture_output=True,
    )


class Rival:
    """A shell loop in `netns` adding and deleting its own FORWARD rules and chains.

    Each round inserts a rule at the top of FORWARD, appends one at the bottom, creates a
    chain with a jump to it, then removes all of it again by rule text.  It deletes only what
    it managed to add, so a failing delete means its rule had vanished (`lost`: someone
    deleted it).  An insert can fail without anything being lost: iptables-nft turns
    `-I FORWARD 2` into "insert before the rule with handle H" from its cache, and the
    kernel says ENOENT when another writer replaced that rule meanwhile (`raced`; the
    program sees the error and may retry, as it would with any other concurrent writer).
    """

    def __init__(self, netns: str, variant: str, workdir: Path, tag: int = 0) -> None:
        self.netns = netns
        self.variant = variant
        self.tag = tag
        self.stop_file = workdir / f"rival{tag}-{netns}.stop"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Rival:
        ipt = f"iptables-{self.variant} -w"
        script = """
n=0; lost=0; raced=0; other=0
add() { $IPT "$@" 2>>"$ERR" && return 0; raced=$((raced+1)); return 1; }
del() { $IPT "$@" 2>>"$ERR" || lost=$((lost+1)); }
run() { $IPT "$@" 2>>"$ERR" || other=$((other+1)); }
while [ ! -e "$STOP" ]; do
  n=$((n+1)); a=$((n % 250 + 1))
  top=0; bottom=0; jump=0
  add -I FORWARD 1 -s 198.18.$TOP.$a/32 -m comment --comment rival-top -j ACCEPT && top=1
  add -A FORWARD -d 198.18.$BOTTOM.$a/32 -m comment --comment rival-end -j DROP && bottom=1
  run -N RIVAL$TAG-$n
  run -A RIVAL$TAG-$n -m comment --comment rival-chain -j RETURN
  add -I FORWARD 2 -j RIVAL$TAG-$n && jump=1
  [ $top = 1 ] && del -D FORWARD -s 198.18.$TOP.$a/32 -m comment --comment rival-top -j ACCEPT
  [ $jump = 1 ] && del -D FORWARD -j RIVAL$TAG-$n
  [ $bottom = 1 ] && del -D FORWARD -d 198.18.$BOTTOM.$a/32 -m comment --comment rival-end -j DROP
  run -F RIVAL$TAG-$n
  run -X RIVAL$TAG-$n
done
echo "$n $lost $raced $other"
"""
        self.stop_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            "IPT": ipt,
            "TAG": str(self.tag),
            "TOP": str(211 + 2 * self.tag),
            "BOTTOM": str(212 + 2 * self.tag),
            "STOP": str(self.stop_file),
            "ERR": str(self.stop_file.with_suffix(".err")),
        }
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "sh", "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 30.0) -> RivalResult:
        """Finish the round in progress and say how it went."""
        if self.proc is None:
            return RivalResult(0, 0, 0, 0, "")
        self.stop_file.touch()
        proc, self.proc = self.proc, None
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.stop_file.unlink(missing_ok=True)
        err_file = self.stop_file.with_suffix(".err")
        errors = err_file.read_text() if err_file.exists() else ""
        err_file.unlink(missing_ok=True)
        rounds, lost, raced, other = (int(x) for x in out.split())
        return RivalResult(rounds, lost, raced, other, errors)


@dataclass(frozen=True)
class RivalResult:
    """Rounds run; deletes that found their rule gone; inserts that raced; other failures."""

    rounds: int
    lost: int
    raced: int
    other: int
    errors: str

    @property
    def commands(self) -> int:
        return self.rounds * 10


# -- reading the table -----------------------------------------------------------------------

Snapshot = dict[str, tuple[str, ...]]
"""chain -> its rules as iptables-save prints them (`:CHAIN` policy lines under `:policy`)."""


def snapshot(
    netns: str, variant: str, family: int = 4, prefix: Sequence[str] = ()
) -> tuple[Snapshot, str]:
    """The filter table of `netns` from iptables-save: every chain's rules, in order, and the
    raw text (for failure messages)."""
    res = subprocess.run(
        [*prefix, "ip", "netns", "exec", netns, tool(variant, family, "save"), "-t", "filter"],
        capture_output=True,
        text=True,
        check=True,
    )
    return parse_snapshot(res.stdout), res.stdout


def parse_snapshot(text: str) -> Snapshot:
    chains: dict[str, list[str]] = {}
    policies = []
    for line in text.splitlines():
        if not line or line.startswith(("#", "*", "COMMIT")):
            continue
        if line.startswith(":"):
            name, policy = line[1:].split()[:2]
            chains.setdefault(name, [])
            if policy != "-":
                policies.append(f"{name} {policy}")
            continue
        assert line.startswith("-A "), line
        chains.setdefault(line.split(" ", 2)[1], []).append(line)
    out = {k: tuple(v) for k, v in chains.items()}
    out[":policy"] = tuple(sorted(policies))
    return out


def expected_snapshot(foreign: Snapshot, plan: CellPlan | None, family: int = 4) -> Snapshot:
    """`foreign` (the table with none of ours) plus the plan's chains and its hooks, first."""
    out = dict(foreign)
    if plan is None:
        return out
    ruleset = render_cell(plan, family)
    out.update({name: (marker_rule(name), *rules) for name, rules in ruleset.chains.items()})
    if ruleset.chains:
        out["FORWARD"] = (*ruleset.hooks, *foreign.get("FORWARD", ()))
    return out


def match_plan(state: Snapshot, candidates: Mapping[str, Snapshot]) -> tuple[str | None, list[str]]:
    """Which candidate `state` equals exactly; else None and what differs from the nearest."""
    for name, want in candidates.items():
        if state == want:
            return name, []
    best: list[str] = []
    for name, want in candidates.items():
        diffs = [
            f"{name}: chain {c}: have {len(state.get(c, ()))} rules, want {len(want.get(c, ()))}"
            for c in sorted(set(state) | set(want))
            if state.get(c) != want.get(c)
        ]
        if not best or len(diffs) < len(best):
            best = diffs
    return None, best


def orphans(state: Snapshot, plan: CellPlan, family: int = 4) -> list[str]:
    """Chains of ours (ASG-*) in the kernel that the plan does not render."""
    want = set(render_cell(plan, family).chains)
    return sorted(c for c in state if c.startswith("ASG-") and c not in want)


class Checks:
    """The invariant checks of a fault run, counted as they are made.

    A run records how many checks it made and how many failed, as counted here, never a
    literal: `held()` fails the test with the first broken ones before anything is recorded.
    """

    def __init__(self) -> None:
        self.made = 0
        self.broken: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        self.made += 1
        if not ok:
            self.broken.append(what)
        return ok

    def held(self) -> dict[str, int]:
        """Assert none broke; the figures to record."""
        assert self.made > 0, "no invariant was checked"
        assert not self.broken, f"{len(self.broken)} of {self.made} checks broke: {self.broken[:3]}"
        return {"checks": self.made, "violations": len(self.broken)}


# -- scale and figures -----------------------------------------------------------------------

SOAK = os.environ.get("ASGCTL_SOAK", "").lower() not in ("", "0", "false", "no")
"""`make soak` sets ASGCTL_SOAK=1: the same tests, run at the issue's full sizes."""


def scale(fast: int, soak: int) -> int:
    """`fast` inside `make test`, `soak` inside `make soak`."""
    return soak if SOAK else fast


def record(test: str, **figures: object) -> None:
    """Append one JSON line of figures to $ASGCTL_RELIABILITY_LOG (the soak's report)."""
    import json

    from bench.common import machine, revision

    path = os.environ.get("ASGCTL_RELIABILITY_LOG")
    head = {"test": test, "soak": SOAK, "time": time.time(), "revision": revision()}
    line = json.dumps({**head, **figures, "machine": machine()})
    print(line)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
