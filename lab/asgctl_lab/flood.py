"""A UDP flood generator for the lab: `sendmmsg(2)` from a network namespace.

One process sends 1-byte datagrams as fast as the kernel takes them, 256 per system call,
so the kernel's path (the container's stack, the veth, the cell's rules), not an
interpreter loop, sets the rate -- what `hping3 --flood` does one `sendto` at a time.  Each
datagram goes to the next of `ports` destination ports from `first_port` on (1: a single
flow, a retrying client; 1,024: every packet its own flow, the aggregator's worst case).
It prints the datagrams the kernel accepted and the seconds it sent for: the caller
measures the achieved rate where it counts (a link or rule counter), never trusts this.

Used by the flood test (`tests/test_flows_flood.py`) and the flow benchmark
(`bench/flows_bench.py`); needs only the standard library (ctypes), in the namespace.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from asgctl_lab.nsenter import netns_exec_argv

SENDER = """\
import ctypes, ctypes.util, socket, struct, sys, time
dst, seconds, first, ports, src = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), \\
    int(sys.argv[4]), sys.argv[5]
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(IoVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]
BATCH = 256
payload = ctypes.create_string_buffer(b"x", 1)
iov = IoVec(ctypes.cast(payload, ctypes.c_void_p), 1)
ip = socket.inet_aton(dst)
batches = []
for b in range(max(1, ports // BATCH)):
    names = (ctypes.c_char * 16 * BATCH)()
    msgs = (MMsgHdr * BATCH)()
    for i in range(BATCH):
        port = first + (b * BATCH + i) % ports
        sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip + bytes(8)
        ctypes.memmove(names[i], sin, 16)
        msgs[i].hdr.name = ctypes.cast(names[i], ctypes.c_void_p)
        msgs[i].hdr.namelen = 16
        msgs[i].hdr.iov = ctypes.pointer(iov)
        msgs[i].hdr.iovlen = 1
    batches.append((names, msgs))  # the names too: msgs point into them
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if src:
    s.bind((src, 0))
fd, sent, k = s.fileno(), 0, 0
start = time.monotonic()
end = start + seconds
while time.monotonic() < end:
    n = libc.sendmmsg(fd, batches[k % len(batches)][1], BATCH, 0)
    k += 1
    if n > 0:
        sent += n
print(sent, time.monotonic() - start)
"""


def sender_argv(
    netns: str, destination: str, seconds: float, first_port: int, ports: int, source: str = ""
) -> list[str]:
    """The argv that floods `destination` from `netns` (bound to `source` when given)."""
    if first_port < 1 or ports < 1 or first_port + ports - 1 > 65535:
        raise ValueError(f"ports {first_port}..{first_port + ports - 1} are not all valid")
    script: Sequence[str] = (sys.executable, "-c", SENDER)
    args = (destination, str(seconds), str(first_port), str(ports), source)
    return netns_exec_argv(netns, [*script, *args])


def start_senders(
    netns: str,
    destination: str,
    seconds: float,
    count: int,
    ports: int,
    first_port: int = 1000,
    source: str = "",
) -> list[subprocess.Popen[str]]:
    """`count` senders, each on `ports` ports of its own (consecutive ranges)."""
    return [
        subprocess.Popen(
            sender_argv(netns, destination, seconds, first_port + i * ports, ports, source),
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]


def finish(senders: Sequence[subprocess.Popen[str]], timeout: float) -> tuple[int, float]:
    """(datagrams sent by all, the longest send window); kills whatever is left."""
    try:
        results = [s.communicate(timeout=timeout)[0].split() for s in senders]
    finally:
        for s in senders:
            if s.poll() is None:
                s.kill()
                s.wait()
    return sum(int(r[0]) for r in results), max(float(r[1]) for r in results)
