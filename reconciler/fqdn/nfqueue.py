"""Read NFQUEUE and give verdicts: a small client of our own over `kernel.nfnetlink`.

The DNS interception holds each answer to a container in the kernel until the agent has
put its addresses into the name's set (docs/fqdn.md).  The protocol is small
(linux/netfilter/nfnetlink_queue.h): bind a queue number, ask for whole packets, and for
each NFQNL_MSG_PACKET answer NFQNL_MSG_VERDICT with its packet id.  No library: the
maintained Python binding (NetfilterQueue) is a Cython wrapper around libnetfilter_queue, a
C build and a callback loop we would have to fit our own socket framing around; the
framing is already ours (`kernel.nfnetlink`, shared with NFLOG and the set writes).

Fail closed: the rules queue without `--queue-bypass`, so with no socket bound (agent down)
or a full queue (agent stuck) the kernel drops the answer; the kernel counts the second in
/proc/net/netfilter/nfnetlink_queue (`queue_dropped`, `user_dropped`), read by `drops`.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from reconciler.backends.kernel import nfnetlink as nl

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NF_DROP = 0
NF_ACCEPT = 1
COPY_RANGE = 0xFFFF
"""Whole packets: a DNS answer is parsed from its bytes."""
MAX_LEN = 1024
"""Answers the kernel holds for us at most; past that it drops them (counted)."""
RCVBUF = 4 * 1024 * 1024
PROC = "/proc/thread-self/net/netfilter/nfnetlink_queue"
"""Per network namespace; `thread-self`, as the reading thread may have entered the cell's."""


class NfqueueError(OSError):
    """The kernel refused to bind the queue (taken by another listener, no permission)."""


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One held packet: its id (what the verdict names) and its bytes from the IP header."""

    queue: int
    packet_id: int
    payload: bytes


def config_message(queue: int, attr: bytes, seq: int) -> bytes:
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    return nl.message(kind, flags, seq, socket.AF_UNSPEC, queue, attr)


def bind_messages(queue: int, maxlen: int = MAX_LEN) -> list[bytes]:
    """Bind `queue`, copy whole packets, hold at most `maxlen`."""
    cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)
    params = struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET)
    return [
        config_message(queue, nl.attr(NFQA_CFG_CMD, cmd), 1),
        config_message(queue, nl.attr(NFQA_CFG_PARAMS, params), 2),
        config_message(queue, nl.attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen)), 3),
    ]


def verdict_message(queue: int, packet_id: int, verdict: int) -> bytes:
    """NF_ACCEPT or NF_DROP for one held packet (no ACK asked: the verdict path is one send)."""
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
    hdr = nl.attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    return nl.message(kind, nl.NLM_F_REQUEST, 0, socket.AF_UNSPEC, queue, hdr)


def parse_packets(data: bytes) -> list[QueuedPacket]:
    """The held packets in one datagram (pure; malformed messages end the walk)."""
    out: list[QueuedPacket] = []
    for m in nl.messages(data):
        if m.kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            continue
        head = m.nfgen
        if head is None:
            continue
        _family, queue, attrs = head
        hdr = attrs.get(NFQA_PACKET_HDR)
        if hdr is None or len(hdr) < 4:
            continue
        (packet_id,) = struct.unpack_from("!I", hdr)
        out.append(QueuedPacket(queue, packet_id, attrs.get(NFQA_PAYLOAD, b"")))
    return out


@dataclass(frozen=True, slots=True)
class QueueDrops:
    """One queue's line of /proc/net/netfilter/nfnetlink_queue."""

    queue: int
    held: int
    queue_dropped: int
    user_dropped: int


def parse_proc(text: str) -> dict[int, QueueDrops]:
    """`queue peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id 1`
    per line; lines that do not read so are skipped."""
    out: dict[int, QueueDrops] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 7 or not all(p.isdigit() for p in parts[:7]):
            continue
        q = int(parts[0])
        out[q] = QueueDrops(q, int(parts[2]), int(parts[5]), int(parts[6]))
    return out


def read_proc() -> dict[int, QueueDrops]:
    """This thread's namespace's queues (none bound: empty)."""
    try:
        with open(PROC, encoding="ascii") as f:
            return parse_proc(f.read())
    except OSError:
        return {}


class NfqueueSocket:
    """One bound queue.  `receive` returns held packets, `verdict` releases one."""

    def __init__(
        self, queue: int, netns: str | None = None, *, maxlen: int = MAX_LEN, rcvbuf: int = RCVBUF
    ) -> None:
        self.queue = queue
        self.sock = nl.open_socket(rcvbuf, netns)
        try:
            self.sock.settimeout(2.0)
            for i, msg in enumerate(bind_messages(queue, maxlen), start=1):
                try:
                    nl.request(self.sock, msg, (i,), f"NFQUEUE {queue}")
                except nl.NetlinkError as exc:
                    raise NfqueueError(exc.errno, str(exc)) from None
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, timeout: float | None) -> list[QueuedPacket]:
        """Held packets of one datagram; [] after `timeout` (None: wait; 0: do not wait).
        ENOBUFS (our socket buffer overflowed: the kernel dropped packets, counted in
        /proc as `user_dropped`) is read past."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 17)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            return []
        return parse_packets(data)

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.sock.send(verdict_message(self.queue, packet_id, verdict))

    def close(self) -> None:
        try:
            self.sock.settimeout(0.5)
            cmd = struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)
            self.sock.send(config_message(self.queue, nl.attr(NFQA_CFG_CMD, cmd), 9))
        except OSError:
            pass
        self.sock.close()


def drops(netns: str | None, queue: int) -> QueueDrops | None:
    """The queue's counters in `netns` (None when nobody has it bound)."""
    if netns:
        from reconciler.backends.kernel.nsthread import run_in_netns

        table = run_in_netns(netns, read_proc)
    else:
        table = read_proc()
    return table.get(queue)
