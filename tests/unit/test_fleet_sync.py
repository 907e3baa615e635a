"""The fleet state -> the tunnels (nitro/fleet/sync.py, identity.py, node.FleetNode), sans-IO.

Two hosts' real FleetTunnels are fed the same etcd contents through their
own FleetState and TunnelSync, as their agents would, and must then
encapsulate and decapsulate each other's frames; a rekey is a new host
record on the watch.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import trio
import trio.testing

from nitro.fleet import identity, keys
from nitro.fleet.agent import FleetAgent
from nitro.fleet.etcd_codec import EventType, KeyValue, WatchEvent
from nitro.fleet.identity import IdentityError, LocalState, choose_index, index_owners
from nitro.fleet.node import FleetNode, RekeyRefused
from nitro.fleet.schema import HostRecord, InterfaceRecord, VpcRecord, index_key
from nitro.fleet.state import FleetState
from nitro.fleet.sync import TunnelSync, peer_of, rekey_reason
from nitro.fleet.tunnel import FleetTunnel

MTU = 1500
BLUE = VpcRecord("blue", ipaddress.IPv4Network("10.1.0.0/24"), 100, ipaddress.IPv4Address("10.1.0.1"))
RED = VpcRecord("red", ipaddress.IPv4Network("10.2.0.0/24"), 200, ipaddress.IPv4Address("10.2.0.1"))
EPOCH = 1_800_000_000
FRAME = bytes.fromhex("020000000002020000000001") + b"\x08\x00" + bytes(range(60))


class Host:
    """One host as the daemon builds it: a FleetTunnel fed by a TunnelSync
    from its own FleetState."""

    def __init__(self, tmp: Path, name: str, index: int, last: int, served: dict[str, int],
                 encrypt: bool = True) -> None:
        key_file = tmp / f"{name}.key"
        self.public = keys.generate_private_key(key_file)
        self.underlay = ipaddress.IPv4Address(f"192.0.2.{last}")
        self.tunnel = FleetTunnel.from_key_file(name, index, key_file, self.underlay.packed, MTU,
                                                encrypt=encrypt, epoch=EPOCH + last)
        self.record = HostRecord(name, self.underlay, self.public, index, self.tunnel.epoch)
        self.state = FleetState(name)
        self.sync = TunnelSync(self.tunnel, served)
        self.revision = 100

    def load(self, records) -> None:
        self.sync.apply(self.state.load([KeyValue(r.key, r.encode(), 1, 1) for r in records], 10))

    def put(self, record) -> None:
        self.revision += 1
        self.sync.apply(self.state.apply([WatchEvent(EventType.PUT, KeyValue(record.key, record.encode(), 1,
                                                                             self.revision))]))

    def delete(self, key: bytes) -> None:
        self.revision += 1
        self.sync.apply(self.state.apply([WatchEvent(EventType.DELETE, KeyValue(key, b"", 0, self.revision))]))

    def send(self, to: str, vni: int = 100, n: int = 1) -> list:
        slot = self.tunnel.slot(to)
        assert slot is not None, f"{to} is no peer"
        return self.tunnel.tunnel.encap(slot, vni, [FRAME] * n)

    def receive(self, packets: list) -> list:
        return [p if isinstance(p, str) else (p.frame == FRAME, p.vni, p.vpc, p.peer)
                for p in self.tunnel.tunnel.decap(packets)]


@pytest.fixture
def fleet(tmp_path):
    """a and b, both in blue (a's VPC 0, b's VPC 3); only b in red."""
    a = Host(tmp_path, "a", 1, 1, {"blue": 0})
    b = Host(tmp_path, "b", 2, 2, {"blue": 3, "red": 4})
    everything = [a.record, b.record, BLUE, RED,
                  InterfaceRecord("blue", ipaddress.IPv4Address("10.1.0.5"), "52:54:00:00:00:05", "a"),
                  InterfaceRecord("blue", ipaddress.IPv4Address("10.1.0.6"), "52:54:00:00:00:06", "b")]
    a.load(everything)
    b.load(everything)
    yield a, b
    a.tunnel.close()
    b.tunnel.close()


def test_two_hosts_fed_the_same_state_reach_each_other(fleet):
    a, b = fleet
    assert b.receive(a.send("b", n=3)) == [(True, 100, 3, b.tunnel.slot("a"))] * 3
    assert a.receive(b.send("a")) == [(True, 100, 0, a.tunnel.slot("b"))]
    assert a.sync.vnis == {"blue": 100} and b.sync.vnis == {"blue": 100, "red": 200}
    # a serves no red interface, so it refuses red's VNI.
    assert a.receive(b.send("a", vni=200)) == ["wrong_vni"]
    assert b.sync.peer_epochs == {"a": a.tunnel.epoch}
    out = a.tunnel.sa_statistics()
    assert [(e["peer"], e["index"], e["peer_epoch"], e["out"]["epoch"], e["out"]["packets"]) for e in out] == [
        ("b", 2, b.tunnel.epoch, a.tunnel.epoch, 3)]
    assert out[0]["inbound_epochs"] == [b.tunnel.epoch - 1, b.tunnel.epoch, b.tunnel.epoch + 1]
    # Both of b's packets authenticated (the VNI is checked after the ICV).
    assert out[0]["in"]["epoch"] == b.tunnel.epoch and out[0]["in"]["packets"] == 2


def test_rekey_overlap_drops_nothing(fleet):
    """a moves to E+1: what it sealed under E before the switch and under
    E+1 before b heard of it is accepted, and so is E's in flight after b
    learned E+1 from the watch."""
    a, b = fleet
    old = a.tunnel.epoch
    sealed_old = a.send("b", n=2)
    a.tunnel.set_epoch(old + 1)  # FleetNode.rekey: send under the new epoch, then publish
    sealed_new = a.send("b", n=2)
    assert b.receive(sealed_old[:1] + sealed_new[:1]) == [(True, 100, 3, b.tunnel.slot("a"))] * 2
    b.put(HostRecord("a", a.underlay, a.public, 1, old + 1))  # the watch brings a's new record
    assert b.sync.peer_epochs["a"] == old + 1
    assert b.receive(sealed_old[1:] + sealed_new[1:]) == [(True, 100, 3, b.tunnel.slot("a"))] * 2
    assert b.receive(a.send("b")) == [(True, 100, 3, b.tunnel.slot("a"))]
    (entry,) = b.tunnel.sa_statistics()
    assert entry["inbound_epochs"] == [old, old + 1, old + 2]
    # Two epochs on, E is gone: a sender only moves once the last move is published.
    a.tunnel.set_epoch(old + 2)
    b.put(HostRecord("a", a.underlay, a.public, 1, old + 2))
    assert b.receive(sealed_old[:1]) == ["unknown_spi"]
    assert b.tunnel.tunnel.stats()["drops"]["replay"] == 0


def test_peers_and_vpcs_going_away(fleet, tmp_path):
    a, b = fleet
    b.delete(BLUE.key)
    assert b.sync.vnis == {"red": 200}
    assert b.receive(a.send("b")) == ["wrong_vni"]
    b.put(BLUE)
    assert b.receive(a.send("b")) == [(True, 100, 3, b.tunnel.slot("a"))]
    a.delete(b.record.key)  # b's lease expired
    assert a.tunnel.slot("b") is None and a.tunnel.sa_statistics() == []
    assert a.receive(b.send("a")) == ["unknown_spi"]
    # A host whose key X25519 refuses (all zeros: a low-order point) is
    # skipped and counted; the others keep working.
    bad = HostRecord("c", ipaddress.IPv4Address("192.0.2.3"), bytes(32), 3, EPOCH)
    a.put(bad)
    assert a.sync.errors == 1 and "peer c" in a.sync.last_error
    a.put(b.record)
    assert a.receive(b.send("a")) == [(True, 100, 0, a.tunnel.slot("b"))]


def test_rekey_reason():
    assert rekey_reason(100.0, 0.0, 3600, False) is None
    assert rekey_reason(3600.0, 0.0, 3600, False) == "schedule"
    assert rekey_reason(1.0, 0.0, 3600, True) == "sequence"


# ---- the host index and the state file ----------------------------------------


def test_choose_index():
    assert choose_index({}, "a") == (1, False)
    assert choose_index({1: "b", 2: "c", 4: "d"}, "a") == (3, False)
    assert choose_index({1: "b", 2: "c"}, "a", wanted=9) == (9, False)  # the state directory's, still free
    assert choose_index({1: "b", 9: "c"}, "a", wanted=9) == (2, False)  # taken meanwhile: the lowest free
    assert choose_index({1: "b", 7: "a", 5: "a"}, "a", wanted=9) == (5, True)  # etcd decides
    owners = index_owners([KeyValue(index_key(3), b"x"), KeyValue(b"/nitro/index/zero", b"y"),
                           KeyValue(b"/nitro/hosts/q", b"{}")])
    assert owners == {3: "x"}


def test_state_file(tmp_path):
    path = tmp_path / identity.STATE_FILE
    assert identity.load_local(path, "a") == LocalState("a")
    identity.save_local(path, LocalState("a", 5, EPOCH))
    assert identity.load_local(path, "a") == LocalState("a", 5, EPOCH)
    assert json.loads(path.read_text()) == {"host": "a", "index": 5, "epoch": EPOCH}
    # Another host id's file: not its index, but epochs only grow anyway.
    assert identity.load_local(path, "b") == LocalState("b", None, EPOCH)
    path.write_text('{"host": "a", "index": "five"}')
    assert identity.load_local(path, "a") == LocalState("a")  # unreadable: as if lost (logged)
    with pytest.raises(IdentityError, match="cannot write"):
        identity.save_local(tmp_path / "missing" / identity.STATE_FILE, LocalState("a", 1, 1))


# ---- FleetNode.rekey ---------------------------------------------------------


def node(tmp_path: Path, encrypt: bool = True) -> FleetNode:
    h = Host(tmp_path, "a", 1, 1, {"blue": 0}, encrypt=encrypt)
    agent = FleetAgent(endpoints=["http://127.0.0.1:9"], host="a", underlay=h.underlay, public_key=h.public,
                       index=1, epoch=h.tunnel.epoch)
    return FleetNode(agent, h.tunnel, h.sync, tmp_path / identity.STATE_FILE, rekey_interval=3600)


def test_rekey_persists_sends_and_publishes_in_that_order(tmp_path):
    n = node(tmp_path)
    old = n.epoch
    with pytest.raises(RekeyRefused, match=f"epoch {old} is not in etcd yet"):
        n.rekey("manual")  # the agent never registered: peers do not know the current epoch
    n.agent.published = n.agent.record  # as after a put
    assert n.rekey("manual") == {"host": "a", "old_epoch": old, "epoch": old + 1, "reason": "manual"}
    assert identity.load_local(tmp_path / identity.STATE_FILE, "a") == LocalState("a", 1, old + 1)
    assert n.tunnel.epoch == old + 1 and n.agent.record.epoch == old + 1
    assert not n.agent.record_published  # the agent puts it when etcd answers
    with pytest.raises(RekeyRefused, match="not in etcd yet"):
        n.rekey("schedule")
    stats = n.statistics()
    assert (stats["epoch"], stats["published_epoch"], stats["rekeys"], stats["last_rekey_reason"]) == (
        old + 1, old, 1, "manual")
    n.close()


def test_rekey_refused_without_encryption(tmp_path):
    n = node(tmp_path, encrypt=False)
    n.agent.published = n.agent.record
    with pytest.raises(RekeyRefused, match="encryption is off"):
        n.rekey("manual")
    n.close()


def test_schedule_rekeys_when_the_sequence_space_is_half_used(tmp_path):
    n = node(tmp_path)
    b = Host(tmp_path, "b", 2, 2, {"blue": 3})
    n.tunnel.set_peer(peer_of(b.record))
    n.agent.published = n.agent.record
    old = n.epoch
    n.tunnel.tunnel.test_set_seq(n.tunnel.slot("b"), 2**31 + 1)
    assert n.tunnel.rekey_wanted()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n._rekey_loop)
            await trio.sleep(10)  # the loop looks every second; the clock jumps
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # Exactly one move: the new epoch is not published (no etcd here), so the loop waits.
    assert (n.epoch, n.rekeys, n.last_rekey_reason) == (old + 1, 1, "sequence")
    assert not n.tunnel.rekey_wanted()  # the new SA counts from 1
    n.close()
    b.tunnel.close()
