"""The DNS interception's decisions, on bytes (issue 15, items 2 and 3).

Which answers teach addresses: only the reply to a query the container itself sent (same
ports, resolver, transport, transaction id and question), for a name the container is
granted (exact, or one label under a wildcard), through the keeper's rules (TTL clamp,
fqdn-max-ips, refused addresses).  The pure parts (query table, question reading, grants)
are tested alone; `Interceptor.learn` against real ipsets in a namespace, fed packets built
here byte by byte.  The kernel path (NFLOG, NFQUEUE, real resolver) is
tests/test_fqdn_intercept_traffic.py.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator

import pytest

from asgctl_lab.netns import Lab
from reconciler.backends.errors import DataplaneError
from reconciler.backends.kernel import nfnetlink as nl
from reconciler.backends.kernel.packets import TCP, UDP, Segment, parse_segment
from reconciler.backends.kernel.runner import Runner
from reconciler.core.cellplan import CellPlan
from reconciler.core.compile import compile_cell
from reconciler.core.model import Container, Destination, EgressPolicy, PolicySet, PortRange
from reconciler.fqdn.answers import Flow, Grants, QueryTable, Question, dns_message, question
from reconciler.fqdn.dns import QTYPE_A, QTYPE_AAAA, QTYPE_CNAME, build_query
from reconciler.fqdn.hold import DnsHold, render
from reconciler.fqdn.intercept import Interceptor
from reconciler.fqdn.keeper import FqdnSettings
from reconciler.fqdn.kernelsets import IpsetWriter, Write, ensure_ipsets
from reconciler.fqdn.netlinksets import NetlinkSets, ipset_add, nft_batch
from reconciler.fqdn.nfqueue import NF_ACCEPT, parse_packets, parse_proc, verdict_message
from reconciler.fqdn.service import FqdnService
from tests.conftest import require_netns, skip_unless_available, tool_unavailable_reason
from tests.dnskit import record, response

WEB, OTHER, RESOLVER = "198.18.0.2", "198.18.0.6", "198.19.0.53"
DB, S3 = "db.lab.example", "*.s3.lab.example"


def udp4(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    """An IPv4/UDP packet as NFQUEUE hands it to us (checksums are not read)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, UDP, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return head + udp


def tcp6(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x18, 0, 0, 0) + data
    head = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), TCP, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst))  # fmt: skip
    return head + tcp


# -- packets and messages -----------------------------------------------------------------


def test_a_segment_is_read_from_udp_and_tcp_over_both_families() -> None:
    seg = parse_segment(udp4(WEB, 40000, RESOLVER, 53, b"hello"))
    assert seg == Segment(4, UDP, WEB, 40000, RESOLVER, 53, b"hello")
    seg6 = parse_segment(tcp6("fd00:18::2", 40001, "fd00:19::53", 53, b"\x00\x05hello"))
    assert seg6 == Segment(6, TCP, "fd00:18::2", 40001, "fd00:19::53", 53, b"\x00\x05hello")
    whole = udp4(WEB, 40000, RESOLVER, 53, b"hello")
    for cut in range(len(whole)):  # a packet cut anywhere is None or shorter, never a crash
        got = parse_segment(whole[:cut])
        assert got is None or len(got.data) < 5


def test_a_tcp_answer_is_read_only_when_one_segment_holds_all_of_it() -> None:
    message = build_query(7, DB, QTYPE_A)
    framed = struct.pack("!H", len(message)) + message
    assert dns_message(Segment(4, TCP, WEB, 1, RESOLVER, 53, framed)) == message
    assert dns_message(Segment(4, TCP, WEB, 1, RESOLVER, 53, framed[:-1])) is None
    assert dns_message(Segment(4, UDP, WEB, 1, RESOLVER, 53, message)) == message


def test_a_question_is_one_standard_query_or_its_response() -> None:
    query = build_query(7, DB, QTYPE_AAAA)
    assert question(query, response=False) == Question(7, DB, QTYPE_AAAA)
    assert question(query, response=True) is None  # a query is not an answer
    answer = response(7, DB, QTYPE_A, [record(DB, QTYPE_A, 60, "198.19.0.9")])
    assert question(answer, response=True) == Question(7, DB, QTYPE_A)
    notify = bytearray(answer)
    notify[2] |= 4 << 3  # opcode NOTIFY
    assert question(bytes(notify), response=True) is None
    two = bytearray(answer)
    two[5] = 2  # two questions
    assert question(bytes(two), response=True) is None
    mx = build_query(7, DB, 15)
    assert question(mx, response=False) is None  # only A and AAAA teach addresses


# -- the query table ----------------------------------------------------------------------

FLOW = Flow(UDP, WEB, 40000, RESOLVER, 53)
Q = Question(7, DB, QTYPE_A)


@pytest.mark.parametrize(
    ("flow", "q"),
    [
        (Flow(UDP, WEB, 40001, RESOLVER, 53), Q),  # another port of the container
        (Flow(UDP, OTHER, 40000, RESOLVER, 53), Q),  # another container
        (Flow(UDP, WEB, 40000, "198.19.0.54", 53), Q),  # another resolver
        (Flow(TCP, WEB, 40000, RESOLVER, 53), Q),  # another transport
        (FLOW, Question(8, DB, QTYPE_A)),  # another transaction id
        (FLOW, Question(7, "evil.lab.example", QTYPE_A)),  # another question
        (FLOW, Question(7, DB, QTYPE_AAAA)),  # another type
    ],
)
def test_an_answer_matches_only_its_own_query(flow: Flow, q: Question) -> None:
    table = QueryTable()
    table.add(FLOW, Q, 0.0)
    assert not table.take(flow, q, 1.0)
    assert table.take(FLOW, Q, 1.0)


def test_a_query_is_answered_once_and_waits_at_most_its_ttl() -> None:
    table = QueryTable(ttl=5.0)
    table.add(FLOW, Q, 0.0)
    assert table.take(FLOW, Q, 1.0)
    assert not table.take(FLOW, Q, 1.0), "a second answer to one query is unsolicited"
    table.add(FLOW, Q, 10.0)
    assert not table.take(FLOW, Q, 15.0), "expired"
    assert len(table) == 0


def test_the_table_is_bounded_per_container_and_in_all() -> None:
    table = QueryTable(per_container=2, limit=3)
    for i in range(3):
        table.add(Flow(UDP, WEB, 40000 + i, RESOLVER, 53), Q, 0.0)
    assert len(table) == 2 and table.evicted == 1  # the oldest of web's went
    assert not table.take(Flow(UDP, WEB, 40000, RESOLVER, 53), Q, 0.0)
    table.add(FLOW, Q, 0.0)
    table.add(Flow(UDP, OTHER, 1, RESOLVER, 53), Q, 0.0)
    table.add(Flow(UDP, OTHER, 2, RESOLVER, 53), Q, 0.0)
    assert len(table) <= 3 and table.evicted >= 2
    # A flood from one container cannot push out another's queries beyond its own share.
    assert table.take(Flow(UDP, OTHER, 2, RESOLVER, 53), Q, 0.0)


# -- grants -------------------------------------------------------------------------------


def plan() -> CellPlan:
    port = (PortRange(5432, 5432),)
    policy = PolicySet(
        destinations=(Destination("db", "tcp", (), port, fqdns=(DB, S3)),),
        egress_policies=(EgressPolicy("web", "app", "app-web", "db"),),
    )
    inventory = [Container("web", WEB, "app-web", "s"), Container("other", OTHER, "app-o", "s")]
    return compile_cell(policy, inventory, "c")


@pytest.mark.parametrize(
    ("container", "qname", "names"),
    [
        (WEB, DB, (DB,)),
        (WEB, "b.s3.lab.example", (S3,)),
        (WEB, "a.b.s3.lab.example", ()),  # a wildcard is one label, not more
        (WEB, "s3.lab.example", ()),
        (WEB, "x.db.lab.example", ()),
        (OTHER, DB, ()),  # not granted
    ],
)
def test_an_answer_fills_only_the_names_the_container_is_granted(
    container: str, qname: str, names: tuple[str, ...]
) -> None:
    assert Grants.of(plan()).names_for(container, qname) == names


# -- kernel messages ----------------------------------------------------------------------


def test_queue_packets_verdicts_and_proc_lines_read_as_the_kernel_writes_them() -> None:
    hdr = nl.attr(1, struct.pack("!IHB", 42, 0x0800, 4))
    payload = nl.attr(10, b"\x45packet")
    msg = nl.message((3 << 8) | 0, 0, 0, 2, 5353, hdr, payload)
    (p,) = parse_packets(msg + msg[:-3])  # a truncated second message ends the walk
    assert (p.queue, p.packet_id, p.payload) == (5353, 42, b"\x45packet")
    verdict = nl.messages(verdict_message(5353, 42, NF_ACCEPT))[0]
    assert verdict.nfgen is not None
    _family, queue, attrs = verdict.nfgen
    assert queue == 5353 and attrs[2] == struct.pack("!II", NF_ACCEPT, 42)
    table = parse_proc("5353  3001 0 2 65535 7 2 99 1\ngarbage\n")
    assert table[5353].queue_dropped == 7 and table[5353].user_dropped == 2


def test_an_ipset_add_and_an_nft_batch_carry_the_address_and_its_timeout() -> None:
    (m,) = nl.messages(ipset_add(9, "asgn4-ab", "198.19.0.9", 30))
    assert m.nfgen is not None
    family, _, attrs = m.nfgen
    assert family == 2 and attrs[2] == b"asgn4-ab\0"
    data = nl.attributes(attrs[7])
    assert nl.attributes(data[1])[1] == socket.inet_aton("198.19.0.9")
    assert data[6] == struct.pack("!I", 30)
    payload, acked, frame = nft_batch(100, "asgctl", [_write("asgn4-ab", ("198.19.0.9", 30))])
    assert frame == [100, 104] and acked == [101, 102, 103]  # add, delete, add with timeout
    kinds = [m.kind for m in nl.messages(payload)]
    assert kinds == [16, (10 << 8) | 12, (10 << 8) | 14, (10 << 8) | 12, 17]


def _write(set_name: str, *elements: tuple[str, int]) -> Write:
    return Write(set_name, 4, tuple(elements))


def test_the_hold_holds_only_trusted_resolvers_replies_and_never_bypasses() -> None:
    text = render(4, [(RESOLVER, 53), ("fd00::53", 53)], 5353)
    assert "fd00::53" not in text  # one family per transaction
    assert "--queue-bypass" not in text and "--fail-open" not in text
    answers = f"-s {RESOLVER}/32 -p udp -m udp --sport 53 -m addrtype ! --dst-type LOCAL "
    assert answers + "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j NFQUEUE" in text
    assert f"-d {RESOLVER}/32 -p udp -m udp --dport 53 -j NFLOG --nflog-group 5353" in text
    assert text.count('--comment "asg:owned"') == 2


# -- learning, against real ipsets --------------------------------------------------------


@pytest.fixture
def learner(make_lab: Callable[..., Lab]) -> Iterator[tuple[Interceptor, IpsetWriter]]:
    require_netns()
    skip_unless_available("ipset", tool_unavailable_reason("ipset"))
    lab = make_lab([], [], conntrack=False)
    runner = Runner.in_netns(lab.cell)
    p = plan()
    ensure_ipsets(runner, {f"asgn{f}-{sid}": f for f, _, sid in p.name_sets()})
    writer = IpsetWriter(runner)
    service = FqdnService(writer, FqdnSettings(min_ttl=5, max_ttl=60, max_ips=3), clients=[])
    service.want(p)
    hold = DnsHold(runner, "legacy", 5353)
    interceptor = Interceptor(service, hold, "ipset", [(RESOLVER, 53)], netns=lab.cell)
    interceptor.follow(p)
    interceptor._sets = NetlinkSets("ipset", lab.cell)  # the kept-open path, no queue needed
    try:
        yield interceptor, writer
    finally:
        interceptor._sets.close()


def timeouts(interceptor: Interceptor, writer: IpsetWriter, fqdn: str) -> dict[str, int]:
    """The name's IPv4 set in the kernel: address -> seconds left."""
    states = {s["fqdn"]: s for s in interceptor.service.status() if s["family"] == 4}
    return dict(writer.members(str(states[fqdn]["set"])) or {})


def members(interceptor: Interceptor, writer: IpsetWriter, fqdn: str) -> set[str]:
    return set(timeouts(interceptor, writer, fqdn))


def ask(interceptor: Interceptor, txid: int, qname: str, port: int = 40000) -> None:
    query = udp4(WEB, port, RESOLVER, 53, build_query(txid, qname, QTYPE_A))
    interceptor.note_query(query, interceptor.clock())


def answer(txid: int, qname: str, records: list[bytes], port: int = 40000) -> bytes:
    return udp4(RESOLVER, 53, WEB, port, response(txid, qname, QTYPE_A, records))


def test_only_the_reply_to_the_containers_own_query_teaches_addresses(
    learner: tuple[Interceptor, IpsetWriter],
) -> None:
    icpt, writer = learner
    good = [record(DB, QTYPE_A, 30, "198.19.0.9")]
    ask(icpt, 7, DB)
    assert icpt.learn(answer(8, DB, good)) == 0  # wrong id
    assert icpt.learn(answer(7, DB, good, port=40001)) == 0  # wrong port
    forged_q = udp4(RESOLVER, 53, WEB, 40000, response(7, DB, QTYPE_A, good, qd_name="x." + DB))
    assert icpt.learn(forged_q) == 0  # another question echoed (and a name not granted)
    assert members(icpt, writer, DB) == set()
    assert icpt.learn(answer(7, DB, good)) == 1
    assert members(icpt, writer, DB) == {"198.19.0.9"}
    evil = [record(DB, QTYPE_A, 30, "198.19.6.6")]
    assert icpt.learn(answer(7, DB, evil)) == 0, "a second answer to one query"
    assert members(icpt, writer, DB) == {"198.19.0.9"}
    assert icpt.metrics.unsolicited == 3 and icpt.metrics.not_granted == 1
    assert icpt.metrics.learned == 1


def test_an_answer_with_nothing_new_is_released_before_its_renewal_is_written(
    learner: tuple[Interceptor, IpsetWriter],
) -> None:
    """The verdict thread's path (`defer=True`): a name asked again gives addresses already
    in the set, so the container can connect before the renewal is written; an answer with
    a new address is still written before its release (reconciler/fqdn/intercept.py)."""
    icpt, writer = learner

    ask(icpt, 1, DB)
    assert icpt.learn(answer(1, DB, [record(DB, QTYPE_A, 10, "198.19.0.9")]), defer=True) == 1
    first = timeouts(icpt, writer, DB)
    assert set(first) == {"198.19.0.9"} and first["198.19.0.9"] <= 10

    ask(icpt, 2, DB)  # the same address, a longer TTL: nothing new, renewed after release
    assert icpt.learn(answer(2, DB, [record(DB, QTYPE_A, 60, "198.19.0.9")]), defer=True) == 0
    assert timeouts(icpt, writer, DB)["198.19.0.9"] <= 10, "not renewed yet"
    assert icpt.renew() == 1
    assert timeouts(icpt, writer, DB)["198.19.0.9"] > 10, "renewed once released"
    assert icpt.metrics.renewed_after_release == 1

    ask(icpt, 3, DB)  # a new address beside the known one: written before the release
    both = [record(DB, QTYPE_A, 60, "198.19.0.9"), record(DB, QTYPE_A, 60, "198.19.0.11")]
    assert icpt.learn(answer(3, DB, both), defer=True) == 1
    assert set(timeouts(icpt, writer, DB)) == {"198.19.0.9", "198.19.0.11"}
    assert icpt.renew() == 0


def test_cnames_are_followed_and_refused_addresses_and_the_bound_hold(
    learner: tuple[Interceptor, IpsetWriter],
) -> None:
    icpt, writer = learner
    chain = [
        record(DB, QTYPE_CNAME, 30, "edge.cdn.example"),
        record("edge.cdn.example", QTYPE_A, 30, "198.19.0.10"),
        record("edge.cdn.example", QTYPE_A, 30, "169.254.169.254"),  # metadata: refused
        record("edge.cdn.example", QTYPE_A, 30, "127.0.0.1"),  # loopback: refused
        record("unrelated.example", QTYPE_A, 30, "198.19.0.66"),  # off the chain
    ]
    ask(icpt, 1, DB)
    assert icpt.learn(answer(1, DB, chain)) == 1
    assert members(icpt, writer, DB) == {"198.19.0.10"}
    many = [record(DB, QTYPE_A, 30, f"198.19.1.{i}") for i in range(1, 6)]
    ask(icpt, 2, DB)
    icpt.learn(answer(2, DB, many))
    assert len(members(icpt, writer, DB)) == 3, "fqdn-max-ips (3 here) holds"
    assert icpt.service.metrics.capped[DB] == 1


def test_a_wildcard_learns_one_label_and_a_name_not_granted_nothing(
    learner: tuple[Interceptor, IpsetWriter],
) -> None:
    icpt, writer = learner
    ask(icpt, 3, "b.s3.lab.example")
    rec = [record("b.s3.lab.example", QTYPE_A, 30, "198.19.0.11")]
    assert icpt.learn(answer(3, "b.s3.lab.example", rec)) == 1
    assert members(icpt, writer, S3) == {"198.19.0.11"}
    ask(icpt, 4, "a.b.s3.lab.example")
    deep = [record("a.b.s3.lab.example", QTYPE_A, 30, "198.19.0.12")]
    assert icpt.learn(answer(4, "a.b.s3.lab.example", deep)) == 0
    assert members(icpt, writer, S3) == {"198.19.0.11"}
    assert icpt.metrics.not_granted == 1


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_a_host_chain_under_our_name_is_never_written_nor_removed(
    variant: str, make_lab: Callable[..., Lab]
) -> None:
    """A chain of the host's that happens to be called ASG-DNSQ (no ownership marker) is
    not ours: installing refuses, removing leaves it and its rules as they were."""
    require_netns()
    lab = make_lab([], [], conntrack=False)
    tool = f"iptables-{variant}"
    host = "*mangle\n:ASG-DNSQ - [0:0]\n-A ASG-DNSQ -p udp -j ACCEPT\nCOMMIT\n"
    lab.cell_exec([f"{tool}-restore", "--noflush"], input=host, check=True)
    hold = DnsHold(Runner.in_netns(lab.cell), variant, 5353)
    with pytest.raises(DataplaneError, match="not ours"):
        hold.install([(RESOLVER, 53)])
    assert not hold.remove()
    saved = lab.cell_exec([f"{tool}-save", "-t", "mangle"], check=True).stdout
    assert "-A ASG-DNSQ -p udp -j ACCEPT" in saved and "asg:" not in saved
