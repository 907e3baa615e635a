"""nitro.devices.net.underlay.Underlay, the switch's side of the fleet, and
the TunnelSync that drives it from the fleet state: the switch's remote
table, the responders' ARP answers, the VNIs and the peers' SAs move
together, in the order the state's changes come. No daemon, no guests: a
NetFabric from a config and a FleetTunnel on a loopback address."""

from __future__ import annotations

import ipaddress
import random

import pytest
import trio
from scapy.layers.l2 import ARP, Ether

from nitro.devices.net.fabric import NetFabric
from nitro.devices.net.underlay import Underlay, UnderlayError
from nitro.engine import Engine
from nitro.fleet import keys
from nitro.fleet.etcd_codec import EventType, KeyValue, WatchEvent
from nitro.fleet.schema import HostRecord, InterfaceRecord, VpcRecord
from nitro.fleet.state import FleetState
from nitro.fleet.sync import TunnelSync
from nitro.fleet.tunnel import FleetTunnel, Peer
from tests.unit.test_vpc_fabric import WEB, config

R, R_IP = "52:54:00:00:00:20", "10.0.0.20"
BLUE = VpcRecord("blue", ipaddress.IPv4Network("10.0.0.0/24"), 100, ipaddress.IPv4Address("10.0.0.1"))


@pytest.fixture
def underlay(tmp_path):
    local = ipaddress.IPv4Address(f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.1")
    path = tmp_path / "h1.key"
    keys.generate_private_key(path)
    fabric = NetFabric(config())
    tunnel = FleetTunnel.from_key_file("h1", 1, path, local.packed, 1500, epoch=3)
    u = Underlay(fabric, tunnel, local)
    u.peer_public = keys.generate_private_key(tmp_path / "h2.key")
    u.other_public = keys.generate_private_key(tmp_path / "h3.key")
    yield u
    u.close()
    tunnel.close()  # its owner's, after the Underlay
    for d in fabric.devices:
        d.close()
    fabric.close()
    fabric.switch.close()


def arp_for(u: Underlay, ip: str) -> list[bytes]:
    frame = bytes(Ether(src=WEB, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=WEB, psrc="10.0.0.10", pdst=ip))
    return u._responders["blue"].handle(0, frame)


def answers(u: Underlay, ip: str) -> str | None:
    replies = arp_for(u, ip)
    return Ether(replies[0])[ARP].hwsrc if replies else None


def test_remote_interfaces_are_mapped_answered_and_forgotten_with_their_host(underlay):
    u = underlay
    u.serve_vpc("blue", 100)
    with pytest.raises(UnderlayError, match="no peer"):
        u.set_remote("blue", R_IP, R, "h2")
    u.fleet.set_peer(Peer("h2", 2, u.peer_public, bytes([127, 0, 0, 2]), 3))
    u.set_remote("blue", R_IP, R, "h2")
    (reply,) = arp_for(u, R_IP)
    assert Ether(reply)[ARP].hwsrc == R and Ether(reply)[ARP].psrc == R_IP
    assert u.switch.remote_count == 1
    with pytest.raises(UnderlayError, match="local interface"):
        u.set_remote("blue", "10.0.0.11", "52:54:00:00:00:99", "h2")   # db's address
    with pytest.raises(UnderlayError, match="not served"):
        u.set_remote("green", R_IP, R, "h2")
    s = u.statistics()
    assert s["remote_interfaces"] == 1 and s["vnis"] == {"blue": 100} and s["encrypt"]
    assert (s["state"], s["worker"]) == ("stopped", None)
    peer = s["peers"]["h2"]
    assert peer["sa"]["epoch"] == 3 and peer["sa"]["spi"] == keys.spi(1, 3)
    assert peer["packets_out"] == 0 and set(peer["drops"]) >= {"auth", "replay", "spoofed_source", "mtu"}
    u.forget_host("h2")
    assert u.switch.remote_count == 0 and arp_for(u, R_IP) == []


def test_the_underlay_ring_runs_on_an_engine_worker(underlay):
    async def main():
        engine = Engine(1)
        try:
            await underlay.start(engine)
            assert engine.statistics()["workers"][0]["ring_labels"] == ["underlay"]
            s = underlay.statistics()
            assert (s["state"], s["worker"]) == ("up", 0)
            await underlay.stop()
            await underlay.stop()  # again: nothing
            assert engine.statistics()["workers"][0]["ring_labels"] == []
        finally:
            engine.close()
    trio.run(main)


class Fleet:
    """h1's FleetState fed like the agent feeds it, applied by a TunnelSync."""

    def __init__(self, u: Underlay) -> None:
        self.u = u
        self.state = FleetState("h1")
        self.sync = TunnelSync(u.fleet, {"blue": 0})  # the switch's VPC 0 (config(): blue, red)
        self.revision = 10

    def record(self, host: str, public: bytes, index: int, last: int) -> HostRecord:
        return HostRecord(host, ipaddress.IPv4Address(f"127.0.0.{last}"), public, index, 5)

    def batch(self, deletes=(), puts=()) -> None:
        """One batch of watch events, as one etcd watch response."""
        events = []
        for k in deletes:
            self.revision += 1
            events.append(WatchEvent(EventType.DELETE, KeyValue(k, b"", 0, self.revision)))
        for r in puts:
            self.revision += 1
            events.append(WatchEvent(EventType.PUT, KeyValue(r.key, r.encode(), 1, self.revision)))
        self.sync.apply(self.state.apply(events))

    def put(self, *records) -> None:
        self.batch(puts=records)

    def delete(self, *keys_: bytes) -> None:
        self.batch(deletes=keys_)


def test_the_sync_drives_tunnel_and_switch_in_the_states_order(underlay):
    u, f = underlay, Fleet(underlay)
    h2 = f.record("h2", u.peer_public, 2, 2)
    r = InterfaceRecord("blue", ipaddress.IPv4Address(R_IP), R, "h2")
    f.put(BLUE, h2, r)
    assert f.sync.underlay is None and u.switch.remote_count == 0  # not attached: the tunnel only
    assert u.fleet.slot("h2") is not None and f.sync.vnis == {"blue": 100}
    f.sync.attach(u, f.state)  # catches up: VNI and remote
    assert u.statistics()["vnis"] == {"blue": 100} and u.switch.remote_count == 1 and answers(u, R_IP) == R

    # A remote in a VPC with no interface here, and one claiming a local
    # address: neither reaches the switch; the second is an error.
    red = VpcRecord("red", ipaddress.IPv4Network("10.9.0.0/24"), 200, ipaddress.IPv4Address("10.9.0.1"))
    bad = InterfaceRecord("blue", ipaddress.IPv4Address("10.0.0.10"), "52:54:00:00:00:31", "h2")
    f.put(red, InterfaceRecord("red", ipaddress.IPv4Address("10.9.0.5"), "52:54:00:00:00:30", "h2"), bad)
    assert u.switch.remote_count == 1 and f.sync.errors == 1 and "10.0.0.10" in f.sync.last_error

    # The host goes (its lease expired: its keys go together): its
    # interfaces leave the switch before its slot is freed, and a new host
    # may take the slot in the same batch.
    slot = u.fleet.slot("h2")
    h3 = f.record("h3", u.other_public, 3, 3)
    r3 = InterfaceRecord("blue", ipaddress.IPv4Address("10.0.0.30"), "52:54:00:00:00:33", "h3")
    f.batch(deletes=[h2.key, r.key, bad.key], puts=[h3, r3])
    assert u.fleet.slot("h2") is None and u.fleet.slot("h3") == slot
    assert u.switch.remote_count == 1 and answers(u, R_IP) is None and answers(u, "10.0.0.30") == r3.mac

    # An interface moves to another host: one update, mapped to its new host.
    f.put(h2, InterfaceRecord("blue", ipaddress.IPv4Address("10.0.0.30"), r3.mac, "h2"))
    assert u.switch.remote_count == 1 and set(u.statistics()["peers"]) == {"h2", "h3"}
    assert u._remotes[(r3.vpc, r3.ip)] == (bytes.fromhex(r3.mac.replace(":", "")), "h2")

    # The VPC is deleted: the switch stops sending its frames.
    f.delete(r3.key, BLUE.key)
    assert u.statistics()["vnis"] == {} and f.sync.vnis == {} and u.switch.remote_count == 0
    assert f.sync.detach() is u and f.sync.underlay is None
