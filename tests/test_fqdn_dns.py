"""The agent's own DNS client (issue 15, items 2 and 3): what counts as an answer.

Real UDP and TCP on loopback against `tests.dnskit.Responder`.  The attack: a forger that
knows when we ask (it sits on the path) sends replies ahead of the server's -- from another
port, with a wrong transaction id, for another question, with extra records for other names
-- and none of them adds an address; only the server's own answer does.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest

from reconciler.fqdn.dns import (
    MAX_CNAME_HOPS,
    Client,
    DnsError,
    NotOurs,
    build_query,
    parse_response,
    read_name,
    resolv_conf_servers,
)
from tests.dnskit import QTYPE_A, QTYPE_AAAA, QTYPE_CNAME, Responder, record, response

DB = "db.lab.example"


@pytest.fixture
def server() -> Iterator[Responder]:
    r = Responder({(DB, QTYPE_A): [record(DB, QTYPE_A, 30, "198.19.0.2")]})
    try:
        yield r
    finally:
        r.close()


def client(r: Responder, timeout: float = 1.0) -> Client:
    return Client("127.0.0.1", r.port, timeout)


def test_an_answer_gives_its_addresses_and_ttl(server):
    answer = client(server).query(DB, QTYPE_A)
    assert answer.addresses == ("198.19.0.2",)
    assert answer.ttl == 30


def test_a_cname_chain_is_followed_and_the_smallest_ttl_wins(server):
    server.zone[("api.lab.example", QTYPE_A)] = [
        record("api.lab.example", QTYPE_CNAME, 300, "edge.cdn.example"),
        record("edge.cdn.example", QTYPE_CNAME, 60, "pop1.cdn.example"),
        record("pop1.cdn.example", QTYPE_A, 120, "198.19.0.9"),
        record("pop1.cdn.example", QTYPE_A, 120, "198.19.0.10"),
    ]
    answer = client(server).query("api.lab.example", QTYPE_A)
    assert answer.addresses == ("198.19.0.10", "198.19.0.9")
    assert answer.ttl == 60
    assert answer.chain == ("api.lab.example", "edge.cdn.example", "pop1.cdn.example")


def test_records_off_the_chain_add_nothing(server):
    """An answer may carry records for other names (a poisoning attempt): only the chain
    from the name asked counts."""
    server.zone[(DB, QTYPE_A)] = [
        record("bank.example", QTYPE_A, 30, "198.19.6.6"),
        record(DB, QTYPE_A, 30, "198.19.0.2"),
        record("other.lab.example", QTYPE_CNAME, 30, DB),
    ]
    assert client(server).query(DB, QTYPE_A).addresses == ("198.19.0.2",)


def test_a_chain_longer_than_the_bound_is_refused(server):
    names = [f"n{i}.lab.example" for i in range(MAX_CNAME_HOPS + 2)]
    chain = [record(a, QTYPE_CNAME, 30, b) for a, b in itertools.pairwise(names)]
    server.zone[(names[0], QTYPE_A)] = chain
    with pytest.raises(DnsError, match="CNAME chain longer"):
        client(server).query(names[0], QTYPE_A)


def test_nxdomain_is_no_addresses(server):
    answer = client(server).query("gone.lab.example", QTYPE_A)
    assert answer.addresses == () and answer.rcode == 3


def test_a_truncated_answer_is_asked_again_over_tcp(server):
    server.truncate = True
    c = client(server)
    assert c.query(DB, QTYPE_A).addresses == ("198.19.0.2",)
    assert c.stats.truncated == 1


def test_aaaa_answers(server):
    server.zone[(DB, QTYPE_AAAA)] = [record(DB, QTYPE_AAAA, 30, "fd00:19::2")]
    assert client(server).query(DB, QTYPE_AAAA).addresses == ("fd00:19::2",)


def test_forged_replies_ahead_of_the_real_one_add_nothing(server):
    """The attack: replies raced ahead of the server's, each failing one check."""
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    evil = [record(DB, QTYPE_A, 3600, "198.19.6.6")]

    def race(sock, peer, txid, qname, qtype):
        # From another port, with the right id (an on-path forger sees it): the kernel
        # drops it on our connected socket before we ever read it.
        forger.sendto(response(txid, qname, qtype, evil), peer)
        # From the server's own port (a spoofed source), but a guessed id.
        sock.sendto(response(txid ^ 0x5A5A, qname, qtype, evil), peer)
        # The right id, but the answer to another question.
        sock.sendto(response(txid, qname, qtype, evil, qd_name="bank.example"), peer)
        sock.sendto(response(txid, qname, QTYPE_AAAA, evil), peer)
        # Not a response at all.
        sock.sendto(build_query(txid, qname, qtype), peer)

    server.before = race
    c = client(server)
    try:
        answer = c.query(DB, QTYPE_A)
    finally:
        forger.close()
    assert answer.addresses == ("198.19.0.2",)
    assert c.stats.ignored == 4
    assert set(c.stats.reasons) == {
        "wrong transaction id",
        "a different question",
        "not a response",
    }


def test_only_forged_replies_mean_no_answer(server):
    def forge(sock, peer, txid, qname, qtype):
        sock.sendto(response(txid ^ 1, qname, qtype, [record(DB, QTYPE_A, 60, "198.19.6.6")]), peer)

    server.before, server.silent = forge, True
    c = client(server, timeout=0.3)
    with pytest.raises(DnsError, match="no answer"):
        c.query(DB, QTYPE_A)
    assert c.stats.ignored == 1


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00", "shorter than a header"),
        (response(7, DB, QTYPE_A, [])[:13], "unreadable question"),
    ],
)
def test_malformed_messages_are_not_ours(data, why):
    with pytest.raises(NotOurs, match=why):
        parse_response(data, 7, DB, QTYPE_A)


def test_name_pointers_must_point_backwards():
    loop = b"\x00" * 12 + b"\xc0\x0c"  # a pointer to itself
    with pytest.raises(DnsError, match="backwards"):
        read_name(loop, 12)


def test_resolv_conf_nameservers():
    text = "search lab\nnameserver 198.19.0.53\nnameserver bogus\nnameserver fd00::53%eth0\n"
    assert resolv_conf_servers(text) == ("198.19.0.53", "fd00::53")
