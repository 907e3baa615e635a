"""The fleet schema's records and the FleetState reducer (sans-IO)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from nitro.fleet import schema
from nitro.fleet.etcd_codec import EventType, KeyValue, WatchEvent
from nitro.fleet.schema import HostRecord, InterfaceRecord, RecordError, VpcRecord
from nitro.fleet.state import FleetState, Remote

KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))
HOST_A = HostRecord("a", IPv4Address("192.0.2.1"), KEY_A, 1, 1_800_000_000)
HOST_B = HostRecord("b", IPv4Address("192.0.2.2"), KEY_B, 2, 1_800_000_005)
BLUE = VpcRecord("blue", IPv4Network("10.1.0.0/24"), 100, IPv4Address("10.1.0.1"), 1450, (IPv4Address("10.1.0.2"),))
IF_A = InterfaceRecord("blue", IPv4Address("10.1.0.5"), "52:54:00:00:00:05", "a")
IF_B = InterfaceRecord("blue", IPv4Address("10.1.0.6"), "52:54:00:00:00:06", "b")
REMOTE_B = Remote("blue", 100, IF_B.ip, IF_B.mac, "b", HOST_B.underlay, KEY_B)


def kv(record, rev=1) -> KeyValue:
    return KeyValue(record.key, record.encode(), rev, rev)


def put(record, rev) -> WatchEvent:
    return WatchEvent(EventType.PUT, kv(record, rev))


def delete(key: bytes, rev) -> WatchEvent:
    return WatchEvent(EventType.DELETE, KeyValue(key, b"", 0, rev))


@pytest.mark.parametrize("record", [HOST_A, BLUE, IF_A])
def test_records_round_trip_through_their_keys(record):
    kind, ident = schema.decode_key(record.key)
    assert schema.decode_value(kind, ident, record.encode()) == record
    assert json.loads(record.encode())["version"] == schema.SCHEMA_VERSION


def test_the_documented_host_value():
    doc = json.loads(HOST_A.encode())
    assert doc == {"version": 1, "id": "a", "underlay": "192.0.2.1",
                   "public_key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                   "index": 1, "epoch": 1_800_000_000}
    assert HOST_A.key == b"/nitro/hosts/a" and IF_A.key == b"/nitro/interfaces/blue/10.1.0.5"
    assert BLUE.vni_key == b"/nitro/vnis/100"
    assert schema.index_key(7) == b"/nitro/index/7"
    assert schema.decode_value(*schema.decode_key(b"/nitro/index/7"), b"a") == "a"


@pytest.mark.parametrize(("key", "value", "why"), [
    (b"/nitro/hosts/a", b'{"version": 2, "id": "a"}', "schema version"),
    (b"/nitro/hosts/a", b"[]", "not a JSON object"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "b", "underlay": "192.0.2.1",
                                    "public_key": "AA=="}).encode(), "not the key's"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "a", "underlay": "192.0.2.1",
                                    "public_key": "AA=="}).encode(), "32 bytes"),
    (b"/nitro/vpcs/blue", json.dumps({"version": 1, "name": "blue", "cidr": "10.1.0.1/24", "vni": 5,
                                      "gateway": "10.1.0.1"}).encode(), "host bits"),
    (b"/nitro/vpcs/blue", json.dumps({"version": 1, "name": "blue", "cidr": "10.1.0.0/24", "vni": 1 << 24,
                                      "gateway": "10.1.0.1"}).encode(), "vni"),
    (b"/nitro/interfaces/blue/10.1.0.5", json.dumps({"version": 1, "vpc": "blue", "ip": "10.1.0.5",
                                                     "mac": "52:54:00:00:00:0G", "host": "a"}).encode(), "mac"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "a", "underlay": "192.0.2.1", "index": 0, "epoch": 0,
                                    "public_key": "A" * 43 + "="}).encode(), "index"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "a", "underlay": "192.0.2.1", "index": 1 << 24,
                                    "epoch": 0, "public_key": "A" * 43 + "="}).encode(), "index"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "a", "underlay": "192.0.2.1", "index": 1,
                                    "public_key": "A" * 43 + "="}).encode(), "epoch"),
    (b"/nitro/hosts/a", json.dumps({"version": 1, "id": "a", "underlay": "192.0.2.1", "index": 1, "epoch": -1,
                                    "public_key": "A" * 43 + "="}).encode(), "epoch"),
    (b"/nitro/index/0", b"a", "host index"),
    (b"/nitro/index/x", b"a", "host index"),
    (b"/nitro/index/5", b"not a host", "host id"),
    (b"/nitro/other/x", b"{}", "not part of the schema"),
    (b"/nitro/interfaces/blue", b"{}", "expected"),
])
def test_bad_records_are_refused(key, value, why):
    with pytest.raises(RecordError, match=why):
        schema.decode_value(*schema.decode_key(key), value)


def test_snapshot_derives_peers_and_remotes():
    s = FleetState("a")
    changes = s.load([kv(HOST_A), kv(HOST_B), kv(BLUE), kv(IF_A), kv(IF_B)], revision=9)
    assert s.revision == 9
    assert s.peers == {"b": HOST_B}  # not itself
    assert s.remotes == {("blue", IF_B.ip): REMOTE_B}  # its own interface is not remote
    assert [(c.view, c.kind, c.key) for c in changes] == [
        ("peers", "add", "b"), ("vpcs", "add", "blue"), ("remotes", "add", ("blue", IF_B.ip))]
    assert s.local_interfaces() == [IF_A]


def test_remote_needs_its_host_and_vpc():
    s = FleetState("a")
    assert s.apply([put(IF_B, 2)]) == []  # neither host b nor blue known yet
    assert [c.view for c in s.apply([put(HOST_B, 3)])] == ["peers"]
    (c,) = s.apply([put(BLUE, 4)])[1:]
    assert (c.view, c.kind, c.new) == ("remotes", "add", REMOTE_B)


def test_a_host_whose_lease_expired_takes_its_remotes_along():
    s = FleetState("a")
    s.load([kv(HOST_A), kv(HOST_B), kv(BLUE), kv(IF_B)], revision=5)
    # etcd deletes a lease's keys in one revision; the host key alone already withdraws.
    changes = s.apply([delete(HOST_B.key, 6)])
    assert [(c.view, c.kind) for c in changes] == [("remotes", "remove"), ("peers", "remove")]
    assert s.remotes == {} and s.peers == {}
    assert s.apply([delete(IF_B.key, 6)]) == []  # at or below the revision: already applied


def test_updates_and_order_of_changes():
    s = FleetState("a")
    s.load([kv(HOST_B), kv(BLUE), kv(IF_B)], revision=5)
    moved = InterfaceRecord("blue", IF_B.ip, "52:54:00:00:00:99", "b")
    (c,) = s.apply([put(moved, 6)])
    assert c.kind == "update" and c.old.mac == IF_B.mac and c.new.mac == moved.mac
    new_b = HostRecord("b", IPv4Address("192.0.2.20"), KEY_B, 2)
    changes = s.apply([put(new_b, 7)])
    assert [(c.view, c.kind) for c in changes] == [("peers", "update"), ("remotes", "update")]
    assert s.remotes[("blue", IF_B.ip)].underlay == IPv4Address("192.0.2.20")


def test_reload_after_compaction_yields_only_the_difference():
    s = FleetState("a")
    s.load([kv(HOST_B), kv(BLUE), kv(IF_B)], revision=5)
    if_c = InterfaceRecord("blue", IPv4Address("10.1.0.7"), "52:54:00:00:00:07", "b")
    changes = s.load([kv(HOST_B), kv(BLUE), kv(if_c)], revision=50)
    assert [(c.kind, c.key) for c in changes] == [("remove", ("blue", IF_B.ip)), ("add", ("blue", if_c.ip))]
    assert s.revision == 50


def test_invalid_values_are_counted_and_forget_the_old_value():
    s = FleetState("a")
    s.load([kv(HOST_B), kv(BLUE), kv(IF_B)], revision=5)
    changes = s.apply([WatchEvent(EventType.PUT, KeyValue(HOST_B.key, b'{"version": 9}', 1, 6))])
    assert [(c.view, c.kind) for c in changes] == [("remotes", "remove"), ("peers", "remove")]
    assert s.invalid == 1 and "schema version" in s.last_invalid
    s.apply([WatchEvent(EventType.PUT, KeyValue(b"/nitro/vnis/100", b"blue", 1, 7))])
    assert s.invalid == 1  # the VNI index is part of the schema, not of the state
    s.apply([WatchEvent(EventType.PUT, KeyValue(b"/nitro/index/2", b"b", 1, 8))])
    assert s.invalid == 1  # nor are the host index claims
    assert s.statistics()["revision"] == 8


def test_a_rekey_changes_only_the_peer():
    """A host's new epoch reaches the listener as one peers update; its
    interfaces (remotes) do not move."""
    s = FleetState("a")
    s.load([kv(HOST_B), kv(BLUE), kv(IF_B)], revision=5)
    rekeyed = HostRecord("b", HOST_B.underlay, KEY_B, 2, HOST_B.epoch + 1)
    (c,) = s.apply([put(rekeyed, 6)])
    assert (c.view, c.kind, c.old.epoch, c.new.epoch) == ("peers", "update", HOST_B.epoch, HOST_B.epoch + 1)
