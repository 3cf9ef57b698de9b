"""The lab's real DNS server (issue 15, item 4): dnsmasq in the lab's outside world.

What the FQDN tests and the demo lean on, checked on the wire: a round-robin name of 16
addresses is answered with all 16 and rotated on every query (whichever address a container
takes first changes from one lookup to the next, as with a CDN), and a record the provider
moves is served at its new address with no restart of the server.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from asgctl_lab.dns import LabDns, LabDnsError
from asgctl_lab.netns import Lab, ServiceSpec
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.requires("dnsmasq")]

RR = "rr.lab.example"
RR_ADDRESSES = [f"198.19.200.{i}" for i in range(16)]
DB = "db.lab.example"


def _server(make_lab: Callable[..., Lab]) -> tuple[Lab, LabDns]:
    require_netns()
    lab = make_lab([], [ServiceSpec("dns")])
    assert lab.workdir is not None
    return lab, LabDns(lab.services["dns"].netns, lab.services["dns"].ipv4, lab.workdir, ttl=2)


def test_a_round_robin_name_of_16_addresses_rotates_on_every_query(
    make_lab: Callable[..., Lab],
) -> None:
    _, dns = _server(make_lab)
    dns.start({RR: RR_ADDRESSES, DB: ["198.19.0.9"]})
    try:
        answers = [dns.answer_order(RR) for _ in range(32)]
        # Every answer carries the whole name: all 16 addresses, each once.
        assert all(sorted(a) == sorted(RR_ADDRESSES) for a in answers), answers[0]
        # The order moves on every query: consecutive answers start with different addresses,
        # and over 16 lookups each address comes first once (a rotation, not a shuffle that
        # could favour some).
        firsts = [a[0] for a in answers]
        assert all(x != y for x, y in itertools.pairwise(firsts)), firsts
        assert sorted(firsts[:16]) == sorted(RR_ADDRESSES), firsts
        assert firsts[16:] == firsts[:16]
        # A name of one address is untouched by it.
        assert {dns.answer_order(DB) for _ in range(3)} == {("198.19.0.9",)}
    finally:
        dns.stop()


def test_the_provider_moves_a_record_without_restarting_the_server(
    make_lab: Callable[..., Lab],
) -> None:
    _, dns = _server(make_lab)
    dns.start({RR: RR_ADDRESSES, DB: ["198.19.0.9"]})
    try:
        assert dns.proc is not None
        pid = dns.proc.pid
        dns.set_record(DB, ["198.19.0.10", "198.19.0.11"])
        assert sorted(dns.query(DB)) == ["198.19.0.10", "198.19.0.11"]
        assert dns.proc.pid == pid and dns.proc.poll() is None  # the same server process
        # The rotating name is still served whole, still rotating, after the reload.
        one, two = dns.answer_order(RR), dns.answer_order(RR)
        assert sorted(one) == sorted(RR_ADDRESSES) and one[0] != two[0]
        # The lab serves only its own names and ranges: nothing it could leak elsewhere.
        with pytest.raises(LabDnsError, match="lab names end in"):
            dns.set_record("db.example.com", ["198.19.0.9"])
        with pytest.raises(LabDnsError, match=r"198\.18\.0\.0/15"):
            dns.set_record(DB, ["203.0.113.7"])
        assert sorted(dns.query(DB)) == ["198.19.0.10", "198.19.0.11"]
    finally:
        dns.stop()
