"""NBD volume locks in etcd (nitro/fleet/volume_lock.py): the key an export
gets, the record, the transactions' bodies, and acquire/release against
scripted gateway answers (httpx's MockTransport, no socket)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import trio

from nitro.devices.blk.backends.nbd import parse_source
from nitro.fleet import schema, volume_lock
from nitro.fleet.etcd import EtcdClient
from nitro.fleet.etcd_codec import KeyValue, txn_request
from nitro.fleet.schema import RecordError, VolumeLockRecord
from nitro.fleet.state import FleetState
from nitro.fleet.volume_lock import VolumeHeldElsewhere

VOLUME = "nbd://10.0.0.9:10809/vol-1"
MINE = VolumeLockRecord(VOLUME, "host-a", "r0")
LEASE = 0x1234


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_key_is_the_canonical_export_escaped_whole():
    src = parse_source("nbds://Storage.example:10810/my disk/2")
    assert src.volume_name == "nbd://storage.example:10810/my%20disk%2F2"  # same data with or without TLS
    assert parse_source("nbd://storage.example:10810/my%20disk%2F2").volume_name == src.volume_name
    assert parse_source("nbd://[fd00::1]/x").volume_name == "nbd://[fd00::1]:10809/x"
    key = schema.volume_key(src.volume_name)
    assert key == b"/nitro/volumes/nbd%3A%2F%2Fstorage.example%3A10810%2Fmy%2520disk%252F2"
    assert schema.decode_key(key) == ("volume", src.volume_name)


def test_the_record_round_trips_and_is_documented():
    assert json.loads(MINE.encode()) == {"version": 1, "volume": VOLUME, "host": "host-a", "device": "r0"}
    assert schema.decode_value(*schema.decode_key(MINE.key), MINE.encode()) == MINE


@pytest.mark.parametrize(("key", "value", "why"), [
    (b"/nitro/volumes/", b"{}", "expected"),
    (b"/nitro/volumes/a/b", b"{}", "expected"),
    (schema.volume_key(VOLUME), json.dumps({"version": 1, "volume": "nbd://other:1/x", "host": "a",
                                            "device": "r0"}).encode(), "not the key's"),
    (schema.volume_key(VOLUME), json.dumps({"version": 1, "volume": VOLUME, "host": "a b",
                                            "device": "r0"}).encode(), "host"),
])
def test_bad_lock_records_are_refused(key, value, why):
    with pytest.raises(RecordError, match=why):
        schema.decode_value(*schema.decode_key(key), value)


def test_the_fleet_state_accepts_lock_keys_without_tables():
    s = FleetState("host-b")
    assert s.load([KeyValue(MINE.key, MINE.encode(), 2, 2)], revision=2) == []
    assert s.invalid == 0


def test_acquire_creates_only_an_absent_key_under_the_lease():
    body = txn_request(*volume_lock.acquire_txn(MINE, LEASE))
    assert body == {
        "compare": [{"target": "CREATE", "result": "EQUAL", "key": b64(MINE.key), "create_revision": "0"}],
        "success": [{"request_put": {"key": b64(MINE.key), "value": b64(MINE.encode()), "lease": str(LEASE)}}],
        "failure": [{"request_range": {"key": b64(MINE.key)}}]}


def test_release_deletes_only_this_record():
    body = txn_request(*volume_lock.release_txn(MINE))
    assert body == {"compare": [{"target": "VALUE", "result": "EQUAL", "key": b64(MINE.key),
                                 "value": b64(MINE.encode())}],
                    "success": [{"request_delete_range": {"key": b64(MINE.key)}}], "failure": []}


def _held_by(record: VolumeLockRecord, lease: int, mod_revision: int = 7) -> dict:
    """The gateway's answer to a failed acquire: the failure branch's range."""
    kv = {"key": b64(record.key), "value": b64(record.encode()), "create_revision": "5",
          "mod_revision": str(mod_revision), "version": "1", "lease": str(lease)}
    return {"header": {"revision": "9"},
            "responses": [{"response_range": {"header": {"revision": "9"}, "kvs": [kv], "count": "1"}}]}


def _run_acquire(answers: list[dict], record: VolumeLockRecord = MINE) -> list[dict]:
    """acquire() against scripted txn answers; the bodies it sent."""
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v3/kv/txn"
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=answers[len(sent) - 1])

    async def main():
        async with EtcdClient(["http://e:1"], transport=httpx.MockTransport(handler)) as etcd:
            await volume_lock.acquire(etcd, record, LEASE)

    trio.run(main)
    return sent


def test_a_free_volume_is_taken_in_one_transaction():
    assert len(_run_acquire([{"header": {"revision": "3"}, "succeeded": True}])) == 1


def test_another_hosts_lock_refuses_naming_the_holder():
    with pytest.raises(VolumeHeldElsewhere, match=r"attached on host host-b \(device d7\)") as e:
        _run_acquire([_held_by(VolumeLockRecord(VOLUME, "host-b", "d7"), 0x99)])
    assert e.value.holder == VolumeLockRecord(VOLUME, "host-b", "d7")


def test_this_hosts_old_lock_is_moved_to_the_new_lease_if_unchanged():
    sent = _run_acquire([_held_by(MINE, 0x77, mod_revision=7), {"header": {"revision": "10"}, "succeeded": True}])
    assert sent[1]["compare"] == [{"target": "MOD", "result": "EQUAL", "key": b64(MINE.key), "mod_revision": "7"}]
    assert sent[1]["success"] == sent[0]["success"]  # the put under LEASE


def test_another_device_of_this_daemon_is_refused():
    other = VolumeLockRecord(VOLUME, "host-a", "r1")
    with pytest.raises(VolumeHeldElsewhere, match="this host already, as device r1"):
        _run_acquire([_held_by(other, LEASE)])
