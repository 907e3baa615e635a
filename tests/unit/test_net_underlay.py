"""The switch across hosts (nitro_underlay.c) on fake guest rings: the remote
table, frames to another host (encapsulated, sent on a raw socket) and the
underlay ring (received, decapsulated, checked, delivered).

Two hosts in one process: host 1 is the switch under test (tests.unit.
test_net_switch.Net: ports A and B in VPC 0, C in VPC 1); host 2 is only a
FleetTunnel whose packets travel over loopback addresses of this test's
own (127.x.y.1 and .2), so the kernel's real raw sockets carry them.
"""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from nitro import _datapath
from nitro.devices.net.underlay import open_receive_socket, open_send_socket
from nitro.fleet import keys
from nitro.fleet.tunnel import FleetTunnel, Peer
from nitro.vpc import packets as pk
from tests.unit.test_engine import wait_used
from tests.unit.test_net_switch import A_IP, B_IP, HDR, A, C, Net, icmp, ip4
from tests.unit.test_seccomp import run_child

R, R_IP = "52:54:00:00:00:20", "10.0.0.20"   # a guest of VPC 0 on host 2
VNI = 100
EPOCH = 7


def send_to(sock: socket.socket, packet: bytes) -> None:
    sock.sendto(packet, (str(ipaddress.IPv4Address(packet[16:20])), 0))


class Fleet:
    """Host 1 (a Net) and host 2 (a FleetTunnel), peers of each other."""

    def __init__(self, tmp_path, encrypt: bool = True) -> None:
        x, y = random.randrange(1, 255), random.randrange(1, 255)
        self.l1, self.l2 = ipaddress.IPv4Address(f"127.{x}.{y}.1"), ipaddress.IPv4Address(f"127.{x}.{y}.2")
        self.net = Net()
        self.fleet1 = self._host("h1", 1, tmp_path, self.l1, encrypt)
        # Host 2 on a jumbo underlay: it can send host 1 what host 1 must refuse.
        self.fleet2 = self._host("h2", 2, tmp_path, self.l2, encrypt, mtu=9000)
        self.slot2 = self.fleet1.set_peer(Peer("h2", 2, self.fleet2.public_key, self.l2.packed, EPOCH))
        self.slot1 = self.fleet2.set_peer(Peer("h1", 1, self.fleet1.public_key, self.l1.packed, EPOCH))
        self.fleet1.serve_vni(VNI, 0)
        self.fleet2.serve_vni(VNI, 0)
        self.sw = self.net.sw
        self.sw.set_vni(0, VNI)
        self.sw.set_remote(0, ip4(R_IP), pk.mac_bytes(R), self.slot2)
        self.send = open_send_socket()
        self.sw.set_underlay(self.fleet1.tunnel, self.send.fileno())
        self.wire = open_receive_socket(self.l2, encrypt)  # host 2's: what host 1 sends it

    @staticmethod
    def _host(host: str, index: int, tmp_path, local, encrypt: bool, mtu: int = 1500) -> FleetTunnel:
        path = tmp_path / f"{host}.key"
        keys.generate_private_key(path)
        return FleetTunnel(host, index, keys.load_private_key(path), local.packed, mtu,
                           encrypt=encrypt, epoch=EPOCH)

    def on_wire(self, timeout: float = 2.0) -> list[bytes]:
        """Outer packets host 1 sent to host 2 (plain: UDP payloads)."""
        out = []
        while select.select([self.wire], [], [], timeout if not out else 0.05)[0]:
            out.append(self.wire.recv(65536))
        return out

    def from_host2(self, frames: list[bytes], vni: int = VNI) -> list[bytes]:
        """Host 2's outer packets carrying frames to host 1."""
        got = self.fleet2.tunnel.encap(self.slot1, vni, frames)
        assert all(isinstance(p, bytes) for p in got), got
        return got

    def close(self) -> None:
        self.sw.set_underlay(None)
        self.net.close()
        for s in (self.send, self.wire):
            s.close()
        self.fleet1.close()
        self.fleet2.close()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def to_r(size: int = 0, dst_mac: str = R, dst: str = R_IP) -> bytes:
    return icmp(dst_mac=dst_mac, dst=dst, size=size)


# -- the remote table ------------------------------------------------------------------

def test_remote_table_set_replace_remove_and_refusals():
    net = Net()
    try:
        sw = net.sw
        sw.set_remote(0, ip4(R_IP), pk.mac_bytes(R), 3)
        sw.set_remote(0, ip4(R_IP), pk.mac_bytes(R), 4)   # replaced, not added
        sw.set_remote(1, ip4(R_IP), pk.mac_bytes(R), 4)   # another VPC: its own entry
        assert sw.remote_count == 2
        for bad in [(0, ip4(A_IP), pk.mac_bytes(R), 3),        # a local port's address
                    (0, ip4("10.0.0.30"), pk.mac_bytes(A), 3),  # a local port's MAC
                    (0, ip4("10.0.0.30"), b"\x01" + bytes(5), 3),  # multicast
                    (9, ip4("10.0.0.30"), pk.mac_bytes(R), 3),  # no such VPC
                    (0, ip4("10.0.0.30"), pk.mac_bytes(R), _datapath.TUNNEL_MAX_PEERS)]:
            with pytest.raises(_datapath.FrontendError):
                sw.set_remote(*bad)
        sw.remove_remote(0, ip4(R_IP))
        with pytest.raises(_datapath.FrontendError):
            sw.remove_remote(0, ip4(R_IP))
        assert sw.remote_count == 1
    finally:
        net.close()


def test_remote_table_deletion_keeps_every_other_entry_findable():
    """Thousands of entries in one open-addressing table: removing half
    (backward-shift deletion, no tombstones) leaves the rest findable."""
    net = Net()
    try:
        sw = net.sw
        ips = [ipaddress.IPv4Address("10.1.0.0") + i for i in range(6000)]
        for i, ip in enumerate(ips):
            sw.set_remote(i % 2, ip.packed, bytes([2, 0, 0, 0, i >> 8 & 0xFF, i & 0xFF]), 1)
        for i, ip in enumerate(ips[::2]):
            sw.remove_remote((2 * i) % 2, ip.packed)
        assert sw.remote_count == 3000
        for i, ip in enumerate(ips):
            if i % 2:
                sw.remove_remote(1, ip.packed)   # raises if the entry got lost
            else:
                with pytest.raises(_datapath.FrontendError):
                    sw.remove_remote(0, ip.packed)
        assert sw.remote_count == 0
    finally:
        net.close()


def test_remote_table_is_bounded():
    net = Net()
    try:
        base = ipaddress.IPv4Address("10.64.0.0")
        for i in range(_datapath.NET_MAX_REMOTES):
            net.sw.set_remote(0, (base + i).packed, bytes([2, 1, 0, 0, i >> 8 & 0xFF, i & 0xFF]), 0)
        with pytest.raises(_datapath.LimitError):
            net.sw.set_remote(0, (base + 70000).packed, bytes([2, 9, 0, 0, 0, 1]), 0)
    finally:
        net.close()


# -- to another host ------------------------------------------------------------------

def test_a_frame_to_a_remote_interface_crosses_encrypted(fleet):
    # 1427 bytes is the largest inner frame a 1500-byte underlay carries
    # (73 bytes of ESP overhead at most); one more is dropped, never fragmented.
    frames = [to_r(), to_r(size=1000), to_r(size=1427 - 42)]  # padding: up to 1430 may fit
    for f in frames:
        assert fleet.net.send(f) == 1
    fleet.net.send(to_r(size=1431 - 42))
    wire = fleet.on_wire()
    assert len(wire) == 3
    for pkt, frame in zip(wire, frames, strict=True):
        assert pkt[9] == 50                       # ESP: nothing of the frame in clear
        assert frame[ETH_PAYLOAD:] not in pkt and frame[:12] not in pkt
    got = fleet.fleet2.tunnel.decap(wire)
    assert [g.frame for g in got] == frames
    assert {(g.vni, g.peer) for g in got} == {(VNI, fleet.slot1)}
    s = fleet.sw.underlay_stats(fleet.slot2)
    assert s["packets_out"] == 3 and s["bytes_out"] == sum(map(len, frames))
    assert fleet.sw.port_stats(0)["packets_out"] == 4  # the guest sent 4: the tunnel dropped one
    assert fleet.fleet1.tunnel.peer_stats(fleet.slot2)["packets_out"] == 3
    assert fleet.fleet1.tunnel.peer_stats(fleet.slot2)["drops"]["mtu"] == 1


ETH_PAYLOAD = 14


def test_only_unicast_ipv4_to_the_mapped_mac_crosses(fleet):
    fleet.net.attach_rx(1)
    fleet.net.send(to_r(dst_mac="52:54:00:00:00:99"))          # IP remote, MAC not its
    fleet.net.send(icmp(dst_mac=R, dst="10.0.0.77"))           # MAC remote, IP unmapped
    fleet.net.send(bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / IP(src=A_IP, dst="10.0.0.255") / UDP()))
    fleet.net.send(bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc=A_IP, pdst=R_IP)))
    assert fleet.on_wire(timeout=0.3) == []
    assert fleet.sw.port_stats(0)["drops"]["unknown_destination"] == 2
    assert len(fleet.net.received(1)) == 1                      # the broadcast stayed here
    assert fleet.sw.punt_pop() is not None                      # the ARP request went to nitro


def test_without_vni_or_underlay_remote_frames_are_dropped_and_counted(fleet):
    fleet.sw.set_vni(0, None)
    fleet.net.send(to_r())
    fleet.sw.set_vni(0, VNI)
    fleet.sw.set_underlay(None)
    fleet.net.send(to_r())
    assert fleet.on_wire(timeout=0.3) == []
    assert fleet.sw.underlay_stats(fleet.slot2)["drops"]["no_underlay"] == 2


def test_a_tso_super_frame_crosses_as_segments_with_checksums(fleet):
    payload = bytes(range(256)) * 12
    frame = bytes(Ether(src=A, dst=R) / IP(src=A_IP, dst=R_IP) / TCP(sport=1, dport=2, flags="A") / payload)
    # GSO_TCPV4 with NEEDS_CSUM: hdr_len 54, gso_size 1000, csum at the TCP header.
    hdr = bytes([1, 1]) + (54).to_bytes(2, "little") + (1000).to_bytes(2, "little") + \
        (34).to_bytes(2, "little") + (16).to_bytes(2, "little") + bytes(2)
    fleet.sw.set_port_features(0, (1 << 32) | (1 << 15) | (1 << 0) | (1 << 11))
    assert fleet.net.send(frame, hdr=hdr) == 1
    got = fleet.fleet2.tunnel.decap(fleet.on_wire())
    segs = [Ether(g.frame) for g in got]
    assert [len(s[TCP].payload) for s in segs] == [1000, 1000, 1000, 72]
    assert b"".join(bytes(s[TCP].payload) for s in segs) == payload
    for s in segs:  # scapy recomputes what nitro completed: they must agree
        rebuilt = Ether(bytes(s))
        del rebuilt[TCP].chksum
        assert Ether(bytes(rebuilt))[TCP].chksum == s[TCP].chksum


def test_a_full_socket_never_blocks_the_worker(fleet):
    fleet.send.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for _ in range(4):
        for _ in range(60):
            fleet.net.tx.add_chain(_chain(fleet.net, to_r(size=1300)))
        t = time.monotonic()
        _datapath.net_tx_serve(fleet.sw, 0, fleet.net.tx.vq, 0)
        assert time.monotonic() - t < 1.0
        fleet.net.tx.take_used()
    s = fleet.sw.underlay_stats(fleet.slot2)
    assert s["packets_out"] + s["drops"]["socket_full"] == 240
    assert s["packets_out"] > 0


def _chain(net: Net, frame: bytes):
    from tests.unit.virtq import Buf
    gpa = net.guest.alloc(HDR + len(frame))
    net.guest.write(gpa, bytes(HDR) + frame)
    return [Buf(gpa, HDR + len(frame))]


# -- from another host: the underlay ring ------------------------------------------------

class Receiver:
    """Host 1's underlay ring on an engine worker, and host 2's sender."""

    def __init__(self, fleet: Fleet, seccomp: bool = False) -> None:
        self.fleet = fleet
        encrypt = fleet.fleet1.encrypt
        self.sock = open_receive_socket(fleet.l1, encrypt)
        self.engine = _datapath.Engine(1, seccomp=seccomp)
        mode = _datapath.UNDERLAY_RAW if encrypt else _datapath.UNDERLAY_UDP
        self.ring = _datapath.Ring.underlay(fleet.sw, self.sock.fileno(), mode)
        self.engine.attach(self.ring, 0)
        self.out = open_send_socket()

    def send(self, packets: list[bytes]) -> None:
        for p in packets:
            send_to(self.out, p)

    def close(self) -> None:
        self.engine.detach(self.ring)
        self.ring.close()
        self.engine.close()
        self.sock.close()
        self.out.close()


@pytest.fixture
def rx(fleet):
    r = Receiver(fleet)
    yield r
    r.close()


def from_r(dst_mac: str = A, dst: str = A_IP, src_mac: str = R, src: str = R_IP, size: int = 0) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst) / ICMP() / (b"r" * size))


def wait_drops(fleet: Fleet, reason: str, n: int) -> None:
    deadline = time.monotonic() + 3
    while fleet.sw.underlay_stats()["drops"][reason] < n:
        assert time.monotonic() < deadline, fleet.sw.underlay_stats()
        time.sleep(0.005)


def test_frames_from_another_host_reach_the_guest_batched(fleet, rx):
    ring = fleet.net.attach_rx(0, bufs=16)
    frames = [from_r(size=i * 100) for i in range(10)]
    rx.send(fleet.from_host2(frames))
    used = wait_used(ring, 10)
    assert [fleet.net.guest.read(ring.bufs[h], n)[HDR:] for h, n in used] == frames
    assert fleet.sw.port_stats(0)["packets_in"] == 10
    s = fleet.sw.underlay_stats(fleet.slot2)
    assert s["packets_in"] == 10 and s["bytes_in"] == sum(map(len, frames))


def test_delivered_frames_are_the_senders_bytes_with_a_zero_header(fleet, rx):
    ring = fleet.net.attach_rx(0)
    frame = from_r(size=300)
    rx.send(fleet.from_host2([frame]))
    deadline = time.monotonic() + 3
    while ring.used_idx() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    (got,) = fleet.net.received(0)
    assert got[HDR:] == frame and got[:10] == bytes(10)


def test_forged_inner_sources_are_dropped_and_counted(fleet, rx):
    ring = fleet.net.attach_rx(0)
    fleet.sw.set_remote(0, ip4("10.0.0.21"), pk.mac_bytes("52:54:00:00:00:21"), 77)  # another host's
    rx.send(fleet.from_host2([
        from_r(src="10.0.0.99"),                       # an address nobody has
        from_r(src_mac="52:54:00:00:00:99"),           # R's address, another MAC
        from_r(src=B_IP, src_mac="52:54:00:00:00:0b"),  # a guest of host 1
        from_r(src="10.0.0.21", src_mac="52:54:00:00:00:21"),  # lives on another host
    ]))
    wait_drops(fleet, "spoofed_source", 4)
    assert fleet.sw.underlay_stats(fleet.slot2)["drops"]["spoofed_source"] == 4
    assert ring.used_idx() == 0


def test_wrong_destination_vni_mtu_and_non_ipv4_are_dropped_and_counted(fleet, rx):
    ring = fleet.net.attach_rx(0)
    fleet.fleet2.serve_vni(999, 0)
    rx.send(fleet.from_host2([from_r(dst_mac=C, dst="10.0.0.12")]))     # VPC 1's port
    rx.send(fleet.from_host2([from_r(size=1480)]))                      # over VPC 0's MTU
    rx.send(fleet.from_host2([bytes(Ether(src=R, dst=A, type=0x86DD) / (b"\0" * 60))]))
    rx.send(fleet.from_host2([from_r()], vni=999))                       # not served on host 1
    wait_drops(fleet, "bad_frame", 1)
    wait_drops(fleet, "mtu", 1)
    wait_drops(fleet, "unknown_destination", 1)
    deadline = time.monotonic() + 3
    while fleet.fleet1.tunnel.peer_stats(fleet.slot2)["drops"]["wrong_vni"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert ring.used_idx() == 0


def test_plain_geneve_crosses_both_ways(tmp_path):
    f = Fleet(tmp_path, encrypt=False)
    r = Receiver(f)
    try:
        f.net.send(to_r(size=200))
        (payload,) = f.on_wire()  # the UDP payload: Geneve (VNI), then the frame in clear
        assert payload[4:7] == VNI.to_bytes(3, "big") and payload[8:] == to_r(size=200)
        ring = f.net.attach_rx(0)
        r.send(f.from_host2([from_r(size=50)]))
        wait_used(ring, 1)
        assert f.sw.underlay_stats(f.slot2)["packets_in"] == 1
    finally:
        r.close()
        f.close()


# -- both ways through engine workers under the seccomp filter ------------------------------

def roundtrip_under_seccomp(tmp: str) -> None:
    from pathlib import Path
    f = Fleet(Path(tmp))
    r = Receiver(f, seccomp=True)
    rx_ring = f.net.attach_rx(0)
    tx = _datapath.Ring.net_tx(f.sw, 0, f.net.tx.vq)
    r.engine.attach(tx, 0)
    f.net.tx.add_chain(_chain(f.net, to_r(size=500)))
    f.net.tx.kick()
    wire = f.on_wire()
    (got,) = f.fleet2.tunnel.decap(wire)
    assert got.frame == to_r(size=500)
    r.send(f.from_host2([from_r(size=500)]))
    wait_used(rx_ring, 1)
    print("served", flush=True)
    import os
    os._exit(0)


def test_both_directions_are_served_by_workers_under_the_filter(tmp_path):
    p = run_child(f"from tests.unit.test_net_underlay import *; roundtrip_under_seccomp({str(tmp_path)!r})")
    assert p.returncode == 0 and "served" in p.stdout, (p.stdout, p.stderr)


# -- an outside implementation: scapy builds the packet as docs/fleet.md says -----------------

def test_a_packet_scapy_builds_reaches_the_guest(fleet, rx):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from scapy.contrib.geneve import GENEVE
    from scapy.layers.ipsec import ESP, SecurityAssociation

    from tests.unit.test_fleet_tunnel import documented_keymat, documented_spi

    key = X25519PrivateKey.generate()
    l3 = fleet.l1 + 2
    slot = fleet.fleet1.set_peer(Peer("outside", 3, key.public_key().public_bytes_raw(), l3.packed, EPOCH))
    fleet.sw.set_remote(0, ip4("10.0.0.30"), pk.mac_bytes("52:54:00:00:00:30"), slot)
    ring = fleet.net.attach_rx(0)
    frame = from_r(src_mac="52:54:00:00:00:30", src="10.0.0.30", size=100)
    sa = SecurityAssociation(ESP, spi=documented_spi(3, EPOCH), crypt_algo="AES-GCM", auth_algo="NULL",
                             crypt_key=documented_keymat(key, fleet.fleet1.public_key, "outside", "h1", EPOCH))
    clear = (IP(src=str(l3), dst=str(fleet.l1)) / UDP(sport=50000, dport=6081)
             / GENEVE(vni=VNI, proto=0x6558) / Ether(frame))
    rx.send([bytes(sa.encrypt(clear, seq_num=1))])
    (head, length), = wait_used(ring, 1)
    assert fleet.net.guest.read(ring.bufs[head], length)[HDR:] == frame
    assert fleet.sw.underlay_stats(slot)["packets_in"] == 1
