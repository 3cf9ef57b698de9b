"""Reading a cell's containers from Cloud Foundry's container metadata store."""

from __future__ import annotations

import json

import pytest

from reconciler.core.model import Container
from reconciler.sources.cellstore import InventoryError, decode_store, dump_store, parse_store

REAL_CELL = {
    # As garden-external-networker writes it on a CF cell, extra metadata keys included.
    "0b9c6a5e-1a2b-4c3d-5e6f-7a8b9c0d1e2f": {
        "handle": "0b9c6a5e-1a2b-4c3d-5e6f-7a8b9c0d1e2f",
        "ip": "10.255.12.34",
        "metadata": {
            "app_id": "d5bbc5ed-886a-44e6-945d-67df1013fa16",
            "org_id": "2ac41bbf-8eae-4f28-abab-51ca38dea3e4",
            "space_id": "4246c57d-aefc-49cc-afe0-5f734e2656e8",
            "policy_group_id": "d5bbc5ed-886a-44e6-945d-67df1013fa16",
            "ports": "8080",
            "container_workload": "task",
        },
    },
    "staging-3f2e": {
        "handle": "staging-3f2e",
        "ip": "10.255.12.35",
        "metadata": {
            "app_id": "d5bbc5ed-886a-44e6-945d-67df1013fa16",
            "container_workload": "staging",
        },
    },
    "v6-app": {"handle": "v6-app", "ip": "FD00:18:0::0002", "metadata": None},
}


def test_a_real_cells_store_reads_unchanged():
    reading = decode_store(json.dumps(REAL_CELL))
    containers = reading.containers
    assert [c.handle for c in containers] == sorted(REAL_CELL)
    task = containers[0]
    assert task.workload == "task" and task.lifecycle == "running"
    assert task.space_id == "4246c57d-aefc-49cc-afe0-5f734e2656e8"
    staging = next(c for c in containers if c.handle == "staging-3f2e")
    assert staging.lifecycle == "staging" and staging.space_id == ""
    # `"metadata": null` is no app at all (silk's planner skips it): its IP is held to nothing.
    v6 = next(c for c in containers if c.handle == "v6-app")
    assert v6.ip == "fd00:18::2" and v6.version == 6 and v6.lifecycle == ""
    assert [(r.kind, r.handle, r.ip) for r in reading.rejected] == [
        ("held", "v6-app", "fd00:18::2")
    ]


def test_dump_and_parse_round_trip():
    containers = parse_store(json.dumps(REAL_CELL))
    assert parse_store(dump_store(containers)) == containers


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("{not json", "store.json:1:2: not valid JSON"),
        ('{"c1": {"handle": "c1", "ip": "10.0.0.1", "metad', "store.json:1:43: not valid JSON"),
        ("", "store.json:1:1: not valid JSON"),
        ("[]", "store.json: expected an object of handle -> container"),
        ("null", "store.json: expected an object of handle -> container"),
    ],
)
def test_only_an_unreadable_or_half_written_store_is_refused_whole(store, message):
    with pytest.raises(InventoryError) as err:
        parse_store(store)
    assert str(err.value).startswith(message)


GOOD = {
    "handle": "good",
    "ip": "10.0.0.9",
    "metadata": {"space_id": "s", "container_workload": "app"},
}


@pytest.mark.parametrize(
    ("key", "entry", "kind", "message"),
    [
        ("c1", {"handle": "c1"}, "skipped", "store.json: container 'c1': missing field 'ip'"),
        ("c1", {"ip": 167772161}, "skipped", "missing field 'ip'"),
        ("c1", {"ip": "10.0.0.300"}, "skipped", "ip '10.0.0.300' is not an IP address"),
        ("c1", {"ip": "fd00::1%eth0"}, "skipped", "has a zone id"),
        ("c1", {"ip": "0.0.0.0"}, "skipped", "ip 0.0.0.0 cannot be a container address"),
        ("c1", "10.0.0.1", "skipped", "entry must be an object"),
        ("c1", {"ip": "10.0.0.1"}, "held", "metadata is missing or null"),
        ("c1", {"ip": "10.0.0.1", "metadata": None}, "held", "metadata is missing or null"),
        ("c1", {"ip": "10.0.0.1", "metadata": "x"}, "held", "metadata must be an object"),
        ("c1", {"handle": "c2", "ip": "10.0.0.1", "metadata": {}}, "held", "differs from its key"),
        ("c1", {"ip": "10.0.0.1", "metadata": {"app_id": 7}}, "held", "metadata.app_id must be"),
        (
            "c1",
            {"ip": "10.0.0.1", "metadata": {"space_id": "a\nb"}},
            "held",
            "metadata.space_id must be printable text",
        ),
        (
            "c1",
            {"ip": "10.0.0.1", "metadata": {"container_workload": ["app"]}},
            "held",
            "metadata.container_workload must be",
        ),
        ("c\x1b[2J", {"ip": "10.0.0.1", "metadata": {}}, "held", "handle must be printable"),
        ("x" * 1025, {"ip": "10.0.0.1", "metadata": {}}, "held", "handle must be printable"),
    ],
)
def test_a_bad_entry_is_skipped_or_held_and_the_rest_of_the_store_is_read(
    key, entry, kind, message
):
    """One entry never invalidates the store: it is reported, and every other entry is used.
    An entry with a usable IP is *held* (its IP gets no access) rather than dropped, so its
    address never falls outside every chain."""
    reading = decode_store(json.dumps({key: entry, "good": GOOD}))
    assert [c.handle for c in reading.containers if c.handle == "good"] == ["good"]
    [rejected] = reading.rejected
    assert rejected.kind == kind and message in rejected.reason, rejected
    assert rejected.reason.startswith("store.json: container ")
    held = [c for c in reading.containers if c.handle != "good"]
    if kind == "skipped":
        assert held == [] and rejected.ip == ""
    else:
        [c] = held
        assert (c.ip, c.lifecycle, c.space_id, c.app_id) == ("10.0.0.1", "", "", "")
        assert rejected.ip == "10.0.0.1"
        assert c.handle == key or (c.handle.startswith("held-") and c.handle.isprintable())


def test_ids_are_free_text_as_in_cf():
    """Diego's network properties are a string map (cloudfoundry/bbs models/network.proto:7,
    `map<string, string> properties`) and silk's datastore checks only that the handle is set
    and the IP parses (cloudfoundry/silk-release src/code.cloudfoundry.org/lib/datastore/
    datastore.go:50-58); Cloud Controller writes GUIDs (cloudfoundry/cloud_controller_ng
    lib/cloud_controller/diego/protocol/container_network_info.rb:19-24), but nothing holds a
    store to them.  Printable text is accepted in every id and the handle."""
    store = {
        "a handle/with spaces": {
            "handle": "a handle/with spaces",
            "ip": "10.0.0.1",
            "metadata": {
                "app_id": "my app",
                "space_id": "système/prod",
                "org_id": "system",
                "policy_group_id": "Ünïcode app",
                "container_workload": "app",
            },
        }
    }
    reading = decode_store(json.dumps(store))
    assert reading.rejected == ()
    [c] = reading.containers
    assert (c.handle, c.space_id, c.org_id) == ("a handle/with spaces", "système/prod", "system")


def test_policy_group_id_names_the_app_as_in_silks_planner():
    """silk's planner reads the app as `policy_group_id` (cloudfoundry/silk-release
    src/code.cloudfoundry.org/vxlan-policy-agent/planner/planner.go@7fcef73:108 and :136, `AppID:
    policyGroupID`) and never reads `app_id`.  Without one, silk matches the container to no
    app-keyed policy; here `app_id` stands in, because the status-branch contract carries only
    `app_id` and CC always writes both the same (container_network_info.rb:19-20)."""
    store = {
        "both": {"ip": "10.0.0.1", "metadata": {"app_id": "a", "policy_group_id": "pg"}},
        "app-only": {"ip": "10.0.0.2", "metadata": {"app_id": "a"}},
        "none": {"ip": "10.0.0.3", "metadata": {}},
    }
    by = {c.handle: c for c in parse_store(json.dumps(store))}
    assert (by["both"].app_id, by["both"].policy_group_id) == ("pg", "pg")
    assert parse_store(dump_store(tuple(by.values()))) == tuple(sorted(by.values()))
    assert by["app-only"].app_id == "a"
    assert by["none"].app_id == ""


@pytest.mark.parametrize(
    ("metadata", "workload", "lifecycle"),
    [
        ({"container_workload": "app"}, "app", "running"),
        ({"container_workload": "task"}, "task", "running"),
        ({"container_workload": "staging"}, "staging", "staging"),
        ({}, "", ""),
        ({"container_workload": None}, "", ""),
        ({"container_workload": "vm"}, "vm", ""),
    ],
)
def test_container_workload_follows_silks_planner(metadata, workload, lifecycle):
    """silk reads `container_workload` as the container's purpose, "" when missing
    (planner.go@7fcef73:120-123), and binds staging ASGs to `staging` and running ASGs to `app` and
    `task` only (cloudfoundry/silk-release src/code.cloudfoundry.org/vxlan-policy-agent/
    planner/planner_linux.go@be375fe:189-192): any other purpose, none included, gets no rules."""
    store = {"c1": {"ip": "10.0.0.1", "metadata": {"space_id": "s", **metadata}}}
    reading = decode_store(json.dumps(store))
    assert reading.rejected == ()
    [c] = reading.containers
    assert (c.workload, c.lifecycle) == (workload, lifecycle)


def test_every_claimant_of_a_shared_ip_is_kept_and_reported():
    """A stale entry claiming a live container's IP (its container gone, the address reused)
    does not fail the store: both stay, each reported as `shared`; compile narrows the IP."""
    store = {
        "live": {"ip": "10.0.0.1", "metadata": {"space_id": "blog"}},
        "stale": {"ip": "10.0.0.1", "metadata": {"space_id": "payments"}},
        "other": {"ip": "10.0.0.2", "metadata": {"space_id": "blog"}},
    }
    reading = decode_store(json.dumps(store))
    assert [c.handle for c in reading.containers] == ["live", "other", "stale"]
    assert [(r.kind, r.handle, r.ip) for r in reading.rejected] == [
        ("shared", "live", "10.0.0.1"),
        ("shared", "stale", "10.0.0.1"),
    ]
    assert "also claimed by 'stale'" in reading.rejected[0].reason


def test_held_entries_never_share_a_handle():
    store = {
        "\x00": {"ip": "10.0.0.1"},
        "\x01": {"ip": "10.0.0.2"},
        "ok": {"ip": "10.0.0.3", "metadata": {}},
    }
    containers = parse_store(json.dumps(store))
    assert len({c.handle for c in containers}) == 3
    assert all(c.handle.isprintable() for c in containers)


def test_containers_sort_by_handle():
    a = Container("b", "10.0.0.2")
    b = Container("a", "10.0.0.1")
    assert parse_store(dump_store([a, b])) == (b, a)


def test_an_oversized_store_is_refused_from_its_size(tmp_path):
    from reconciler.sources.cellstore import MAX_STORE_BYTES, read_store

    huge = tmp_path / "store.json"
    with huge.open("wb") as f:
        f.truncate(MAX_STORE_BYTES + 1)
    with pytest.raises(InventoryError, match="larger than"):
        read_store(huge)
    with pytest.raises(InventoryError, match="No such file"):
        read_store(tmp_path / "missing.json")
