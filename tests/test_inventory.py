"""Reading a cell's containers from Cloud Foundry's container metadata store."""

from __future__ import annotations

import json

import pytest

from reconciler.inventory import InventoryError, dump_store, parse_store
from reconciler.model import Container

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
    containers = parse_store(json.dumps(REAL_CELL))
    assert [c.handle for c in containers] == sorted(REAL_CELL)
    task = containers[0]
    assert task.workload == "task" and task.lifecycle == "running"
    assert task.space_id == "4246c57d-aefc-49cc-afe0-5f734e2656e8"
    staging = next(c for c in containers if c.handle == "staging-3f2e")
    assert staging.lifecycle == "staging" and staging.space_id == ""
    v6 = next(c for c in containers if c.handle == "v6-app")
    assert v6.ip == "fd00:18::2" and v6.version == 6 and v6.workload == "app"


def test_dump_and_parse_round_trip():
    containers = parse_store(json.dumps(REAL_CELL))
    assert parse_store(dump_store(containers)) == containers


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("{not json", "store.json:1:2: not valid JSON"),
        ("[]", "store.json: expected an object of handle -> container"),
        ('{"c1": {"handle": "c1"}}', "store.json: container 'c1': missing field 'ip'"),
        (
            '{"c1": {"handle": "c1", "ip": "10.0.0.300"}}',
            "store.json: container 'c1': ip '10.0.0.300' is not an IP address",
        ),
        (
            '{"c1": {"handle": "c2", "ip": "10.0.0.1"}}',
            "store.json: container 'c1': handle field 'c2' differs from its key",
        ),
        (
            '{"c1": {"ip": "10.0.0.1"}, "c2": {"ip": "10.0.0.1"}}',
            "store.json: container 'c2': ip 10.0.0.1 is already used by container 'c1'",
        ),
        (
            '{"c1": {"ip": "10.0.0.1", "metadata": {"container_workload": "vm"}}}',
            "store.json: container 'c1': metadata.container_workload must be one of app, task, "
            "staging",
        ),
        (
            '{"c1": {"ip": "10.0.0.1", "metadata": {"app_id": 7}}}',
            "store.json: container 'c1': metadata.app_id must be a GUID",
        ),
        ('{"c1": {"ip": "0.0.0.0"}}', "store.json: container 'c1': ip 0.0.0.0 cannot be"),
    ],
)
def test_bad_stores_are_clear_errors_naming_the_handle(store, message):
    with pytest.raises(InventoryError) as err:
        parse_store(store)
    assert str(err.value).startswith(message)


def test_containers_sort_by_handle():
    a = Container("b", "10.0.0.2")
    b = Container("a", "10.0.0.1")
    assert parse_store(dump_store([a, b])) == (b, a)


def test_an_oversized_store_is_refused_from_its_size(tmp_path):
    from reconciler.inventory import MAX_STORE_BYTES, read_store

    huge = tmp_path / "store.json"
    with huge.open("wb") as f:
        f.truncate(MAX_STORE_BYTES + 1)
    with pytest.raises(InventoryError, match="larger than"):
        read_store(huge)
    with pytest.raises(InventoryError, match="No such file"):
        read_store(tmp_path / "missing.json")
