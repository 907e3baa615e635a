"""nitro.devices.net.underlay.Underlay, the API the fleet's control plane
calls: the switch's remote table, the responders' ARP answers, the peers'
SAs and the statistics move together. No daemon, no guests: a NetFabric
from a config and a FleetTunnel on a loopback address."""

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
from nitro.fleet.tunnel import FleetTunnel, Peer
from tests.unit.test_vpc_fabric import WEB, config

R, R_IP = "52:54:00:00:00:20", "10.0.0.20"


@pytest.fixture
def underlay(tmp_path):
    local = ipaddress.IPv4Address(f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.1")
    path = tmp_path / "h1.key"
    keys.generate_private_key(path)
    fabric = NetFabric(config())
    u = Underlay(fabric, FleetTunnel.from_key_file("h1", 1, path, local.packed, 1500, epoch=3), local)
    other = tmp_path / "h2.key"
    u.peer_public = keys.generate_private_key(other)
    yield u
    u.close()
    for d in fabric.devices:
        d.close()
    fabric.close()
    fabric.switch.close()


def arp_for(u: Underlay, ip: str) -> list[bytes]:
    frame = bytes(Ether(src=WEB, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=WEB, psrc="10.0.0.10", pdst=ip))
    return u._responders["blue"].handle(0, frame)


def test_remote_interfaces_are_mapped_answered_and_forgotten_with_their_host(underlay):
    u = underlay
    u.serve_vpc("blue", 100)
    with pytest.raises(UnderlayError, match="no peer"):
        u.set_remote("blue", R_IP, R, "h2")
    u.set_peer(Peer("h2", 2, u.peer_public, bytes([127, 0, 0, 2]), 3))
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
    peer = s["peers"]["h2"]
    assert peer["sa"]["epoch"] == 3 and peer["sa"]["spi"] == keys.spi(1, 3)
    assert peer["packets_out"] == 0 and set(peer["drops"]) >= {"auth", "replay", "spoofed_source", "mtu"}
    u.remove_peer("h2")
    assert u.switch.remote_count == 0 and arp_for(u, R_IP) == []
    assert u.statistics()["peers"] == {}


def test_the_underlay_ring_runs_on_an_engine_worker(underlay):
    async def main():
        engine = Engine(1)
        try:
            await underlay.start(engine)
            assert engine.statistics()["workers"][0]["ring_labels"] == ["underlay"]
            await underlay.stop(engine)
            assert engine.statistics()["workers"][0]["ring_labels"] == []
        finally:
            engine.close()
    trio.run(main)
