"""Entering network namespaces, from a thread (for sockets) or a child process (for commands).

Sockets keep the network namespace they were created in for their whole life, whichever
namespace the process moves to afterwards.  So a probe does not need a child process per
connection attempt: the calling thread steps into the container's namespace just long enough
to create the socket, steps back, and then connects from the test's own process.  That keeps
probes fast (no interpreter start-up per probe) and lets a test hold a connection open across
rule changes as an ordinary Python object.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from reconciler.backends.kernel.nsthread import NETNS_RUN_DIR, setns_net

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class NetnsError(RuntimeError):
    """A namespace could not be entered or a command that sets one up failed."""


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with the *calling thread* inside network namespace `name`.

    Only this thread moves (setns(2) on a network namespace is per thread), and it is always
    moved back, even when the body raises.  Keep the body short: create sockets, nothing else.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"network namespace {name!r} does not exist") from None
        try:
            setns_net(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns_net(home)
    finally:
        os.close(home)


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that lives in network namespace `name` (see the module docstring)."""
    with in_netns(name):
        return socket.socket(family, kind, proto)


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; with `check`, fail with its stderr in the error."""
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else dict(env),
    )
    if check and proc.returncode != 0:
        raise NetnsError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


Started = tuple[subprocess.Popen[str], str | None]
"""A command `start_command` started, and the script `wait_all` feeds to its stdin."""


def start_command(argv: Sequence[str], script: Sequence[str] | None = None) -> Started:
    """Start a setup command without waiting for it, so many namespaces are set up at once.

    `script`, if given, is fed to its stdin (one line each) by `wait_all`.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL if script is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, None if script is None else "\n".join(script) + "\n"


def start_ip_batch(ip_argv: Sequence[str], commands: Sequence[str]) -> Started:
    """Start `ip ... -batch -` running `commands`; `ip_argv` is e.g. ``["ip", "-n", ns]``."""
    return start_command([*ip_argv, "-batch", "-"], commands)


def wait_all(started: Sequence[Started], what: str, *, timeout: float) -> None:
    """Wait for commands started in parallel; raise NetnsError listing every one that failed."""
    errors = []
    for proc, script in started:
        _, err = proc.communicate(script, timeout=timeout)
        if proc.returncode != 0:
            argv = " ".join(map(str, proc.args))  # type: ignore[arg-type]  # a list, as we started it
            errors.append(f"{argv} ({proc.returncode}): {err.strip()}")
    if errors:
        raise NetnsError(f"{what} failed:\n" + "\n".join(errors))


def python_env() -> dict[str, str]:
    """Our environment with this checkout first on PYTHONPATH.

    So that `python -m reconciler...` children (echo servers, agents) import this code,
    whatever their working directory.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def netns_exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name` (ip netns exec execs, so PIDs match)."""
    return ["ip", "netns", "exec", name, *argv]


def enable_conntrack(netns: str, lab_id: str, comment: str) -> None:
    """Connection tracking on in `netns` from now on, as on a real cell.

    Otherwise conntrack starts only with the first rule that needs it, and a connection
    opened before that is picked up mid-stream as NEW (and cut by a default-reject ruleset).
    The table (`<lab_id>-lab`, with `comment`) is nft's own, so it is invisible to
    iptables-save (legacy or nft flavour) and never shows up in what the reconciler or the
    agents read back from the filter table.
    """
    ruleset = (
        f"table inet {lab_id}-lab {{\n"
        f'  comment "{comment}"\n'
        "  chain track {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        "    ct state new counter\n"
        "  }\n"
        "}\n"
    )
    run(netns_exec_argv(netns, ["nft", "-f", "-"]), input=ruleset)


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`), without the `(id: N)` suffix."""
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def safe_list_netns() -> list[str]:
    """`list_netns`, or [] when `ip` cannot be run at all (missing, timed out)."""
    try:
        return list_netns()
    except (OSError, subprocess.SubprocessError):
        return []


def netns_pids(name: str) -> list[int]:
    """PIDs of processes whose network namespace is `name`."""
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def list_links(netns: str | None = None) -> list[str]:
    """Interface names in `netns` (or the namespace we run in), without the `@peer` suffix."""
    argv = ["ip", "-o", "link", "show"] if netns is None else ["ip", "-n", netns, "-o", "link"]
    out = run(argv, check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def process_start_time(pid: int, *, zombie_is_dead: bool = True) -> int | None:
    """Start time in clock ticks since boot: with the PID it names one process for good.

    None for a process that is gone, or (unless `zombie_is_dead` is False) a zombie: dead,
    merely not yet reaped.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if zombie_is_dead and fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def remove_namespaces(lab_id: str) -> list[str]:
    """Delete every namespace and link named `<lab_id>-...`; returns what was removed.

    Processes inside are killed first: a process (or open socket) inside keeps a namespace
    alive after `ip netns del`, merely unnamed and so unfindable.  Our own process is spared
    (its main thread may be inside only to open a probe socket).
    """
    removed: list[str] = []
    namespaces = [n for n in safe_list_netns() if n.split("-", 1)[0] == lab_id]
    for ns in namespaces:
        for pid in netns_pids(ns):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    removed.append(f"process {pid} (in {ns})")
    for ns in namespaces:
        if run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(f"netns {ns}")
    for link in list_links():  # normally none: veth ends are created inside the namespaces
        if link.split("-", 1)[0] == lab_id and (
            run(["ip", "link", "del", link], check=False).returncode == 0
        ):
            removed.append(f"link {link}")
    return removed
