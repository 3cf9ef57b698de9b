"""What a name's set holds over time (issue 15, items 2 and 3), decided without a clock.

The keeper is pure: answers, failures and `now` in, the next state and the set write out.
"""

from __future__ import annotations

import pytest

from reconciler.fqdn.keeper import FqdnSettings, NameState, due, on_answer, on_failure

S = FqdnSettings(min_ttl=5, max_ttl=300, max_ips=3)
DB = NameState("db.lab.example", 4, "asgn4-x")


def test_an_address_lives_for_the_ttl_clamped_and_is_asked_again_at_half():
    state, write, hit = on_answer(DB, ("198.19.0.2",), 60, 1000.0, S)
    assert write.elements == (("198.19.0.2", 60),)
    assert state.addresses == (("198.19.0.2", 1060.0),)
    assert state.next_refresh == 1030.0
    assert not hit


@pytest.mark.parametrize(("ttl", "kept"), [(0, 5), (1, 5), (300, 300), (86400, 300)])
def test_ttls_are_clamped_to_the_settings(ttl, kept):
    _, write, _ = on_answer(DB, ("198.19.0.2",), ttl, 0.0, S)
    assert write.elements == (("198.19.0.2", kept),)


def test_an_address_the_name_stops_answering_lapses_at_its_ttl_not_at_once():
    """Round robin: each answer names a subset; what containers were told stays valid."""
    state, _, _ = on_answer(DB, ("198.19.0.2",), 60, 0.0, S)
    state, write, _ = on_answer(state, ("198.19.0.3",), 60, 30.0, S)
    assert write.elements == (("198.19.0.3", 60),)  # the old one is not renewed...
    assert [a for a, _ in state.live(59.0)] == ["198.19.0.2", "198.19.0.3"]
    assert [a for a, _ in state.live(61.0)] == ["198.19.0.3"]  # ...and lapses at its TTL


def test_a_failure_writes_nothing_and_keeps_what_is_there_until_its_ttl():
    state, _, _ = on_answer(DB, ("198.19.0.2",), 60, 0.0, S)
    failed = on_failure(state, "no answer", 30.0, S)
    assert failed.live(59.0) == (("198.19.0.2", 60.0),)
    assert failed.live(60.0) == ()
    assert failed.next_refresh == 35.0
    assert failed.error == "no answer"


def test_a_name_holds_at_most_max_ips_and_counts_each_answer_that_hit_it():
    answer = tuple(f"198.19.0.{i}" for i in range(1, 6))
    state, write, hit = on_answer(DB, answer, 60, 0.0, S)
    assert hit and state.capped == 1
    assert [a for a, _ in write.elements] == list(answer[:3])
    # Renewing those in the set is always allowed; newcomers wait for room.
    state, write, hit = on_answer(state, answer[::-1], 60, 10.0, S)
    assert [a for a, _ in write.elements] == ["198.19.0.3", "198.19.0.2", "198.19.0.1"]
    assert hit and state.capped == 2
    # Once they lapse there is room again.
    state, write, hit = on_answer(state, ("198.19.0.5",), 60, 100.0, S)
    assert write.elements == (("198.19.0.5", 60),) and not hit


def test_wildcards_are_never_due():
    wild = NameState("*.s3.lab.example", 4, "asgn4-y")
    states = {(4, DB.fqdn): DB, (4, wild.fqdn): wild}
    assert due(states, 1e12) == [DB]


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        FqdnSettings(min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError):
        FqdnSettings(max_ips=0)


def test_status_is_bounded_and_counts_everything():
    answer = tuple(f"198.19.1.{i}" for i in range(1, 41))
    state, _, _ = on_answer(DB, answer, 60, 0.0, FqdnSettings(max_ips=1024))
    shown = state.to_dict(1.0)
    assert shown["count"] == 40
    assert len(shown["addresses"]) == 32


@pytest.mark.parametrize(
    "address",
    ["0.0.0.0", "127.0.0.1", "169.254.169.254", "224.0.0.1", "240.0.0.1", "::", "::1", "fe80::1"],
)
def test_an_answer_pointing_at_the_cell_or_its_platform_adds_nothing(address):
    """The attack: whoever controls a granted name's DNS answers the cloud metadata service
    (or loopback, ...) to reach it through the grant.  Nothing is added; it is counted."""
    state, write, _ = on_answer(DB, (address, "198.19.0.2"), 60, 0.0, S)
    assert [a for a, _ in write.elements] == ["198.19.0.2"]
    assert state.refused == 1
    assert state.to_dict(1.0)["refused"] == 1
