"""The C switch (nitro_net.c) on fake guest rings: TX classify -> RX copy."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from nitro import _datapath
from nitro.vpc import gateway_mac
from nitro.vpc import packets as pk
from tests.unit.virtq import Buf, FakeGuest, SplitRing

A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
A_IP, B_IP, C_IP = "10.0.0.10", "10.0.0.11", "10.0.0.12"
GW_MAC = gateway_mac("blue")
F_MRG = 1 << 15
F_GUEST_CSUM = 1 << 1
HDR = 12


def ip4(s: str) -> bytes:
    return bytes(int(x) for x in s.split("."))


class Net:
    """Three ports; A and B in VPC 0 (blue), C in VPC 1 (red, same CIDR)."""

    def __init__(self, **limits):
        self.sw = _datapath.Switch()
        self.sw.add_vpc(0, GW_MAC, ip4("10.0.0.1"), 1500)
        self.sw.add_vpc(1, gateway_mac("red"), ip4("10.0.0.1"), 1500)
        self.sw.add_port(0, 0, pk.mac_bytes(A), ip4(A_IP), **limits)
        self.sw.add_port(1, 0, pk.mac_bytes(B), ip4(B_IP))
        self.sw.add_port(2, 1, pk.mac_bytes(C), ip4(C_IP))
        self.guest = FakeGuest()
        self.tx = SplitRing(self.guest, num=64)
        self.rx = {}
        for port in (0, 1, 2):
            self.sw.set_port_features(port, (1 << 32) | F_MRG)

    def attach_rx(self, port: int, bufs: int = 8, size: int = 2048, features: int = 0) -> SplitRing:
        ring = SplitRing(self.guest, num=64, features=features)
        ring.bufs = []
        for _ in range(bufs):
            gpa = self.guest.alloc(size)
            ring.bufs.append(gpa)
            ring.add_chain([Buf(gpa, size, writable=True)])
        self.sw.attach_rx(port, 0, ring.vq)
        self.rx[port] = ring
        return ring

    def send(self, frame: bytes, hdr: bytes = bytes(HDR)) -> int:
        gpa = self.guest.alloc(len(hdr) + len(frame))
        self.guest.write(gpa, hdr + frame)
        self.tx.add_chain([Buf(gpa, len(hdr) + len(frame))])
        return _datapath.net_tx_serve(self.sw, 0, self.tx.vq, 0)

    def received(self, port: int) -> list[bytes]:
        ring = self.rx[port]
        out = []
        for head, length in ring.take_used():
            out.append(self.guest.read(ring.bufs[head], length))
        return out

    def close(self):
        for port in self.rx:
            self.sw.detach_rx(port, 0)
        for r in [self.tx, *self.rx.values()]:
            r.close()
        self.guest.close()
        self.sw.close()


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def icmp(dst_mac=B, src_mac=A, src=A_IP, dst=B_IP, size=0) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst) / ICMP() / (b"x" * size))


def test_unicast_to_peer_is_copied_with_header(net):
    net.attach_rx(1)
    frame = icmp()
    assert net.send(frame) == 1
    (got,) = net.received(1)
    assert got[HDR:] == frame
    assert struct.unpack_from("<H", got, 10)[0] == 1  # num_buffers
    assert net.tx.take_used() == [(0, 0)]
    a, b = net.sw.port_stats(0), net.sw.port_stats(1)
    assert a["packets_out"] == 1 and a["bytes_out"] == len(frame)
    assert b["packets_in"] == 1 and b["bytes_in"] == len(frame)
    assert net.guest.guards_intact()


def test_spoofed_mac_and_ip_are_dropped_and_counted(net):
    net.attach_rx(1)
    net.send(icmp(src_mac=C))
    net.send(icmp(src="10.0.0.99"))
    net.send(bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc="10.0.0.99", pdst=B_IP)))
    assert net.received(1) == []
    assert net.sw.port_stats(0)["drops"]["spoofed_source"] == 3
    assert net.sw.port_stats(0)["packets_out"] == 0


def test_other_vpc_and_unknown_mac_are_unknown_destination(net):
    net.attach_rx(2)
    net.send(icmp(dst_mac=C, dst=C_IP))
    net.send(icmp(dst_mac="52:54:00:99:99:99"))
    assert net.received(2) == []
    assert net.sw.port_stats(0)["drops"]["unknown_destination"] == 2


def test_broadcast_floods_only_the_vpc(net):
    net.attach_rx(1)
    net.attach_rx(2)
    frame = bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / IP(src=A_IP, dst="10.0.0.255") / UDP(dport=9))
    net.send(frame)
    assert [f[HDR:] for f in net.received(1)] == [frame]
    assert net.received(2) == []


def test_control_frames_are_punted_and_injection_delivers(net):
    rx_a = net.attach_rx(0)
    net.send(bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=A, psrc=A_IP, pdst="10.0.0.1")))
    dhcp = bytes(Ether(src=A, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / (b"\0" * 240))
    net.send(dhcp)
    net.send(icmp(dst_mac=pk.mac_text(GW_MAC), dst="10.0.0.1"))
    got = [net.sw.punt_pop() for _ in range(4)]
    assert [g[0] for g in got[:3]] == [0, 0, 0] and got[3] is None
    assert Ether(got[0][1])[ARP].pdst == "10.0.0.1" and got[1][1] == dhcp
    assert net.sw.port_stats(0)["punted"] == 3
    assert net.sw.inject(0, b"\x01" * 60)
    (frame,) = net.received(0)
    assert frame == bytes(10) + b"\x01\x00" + b"\x01" * 60
    assert rx_a.calls() >= 1


def test_no_rx_ring_or_no_buffer_is_no_rx_buffer(net):
    net.send(icmp())  # B has no RX ring attached
    net.attach_rx(1, bufs=1)
    net.send(icmp())
    net.send(icmp())  # the one buffer is used up
    assert len(net.received(1)) == 1
    assert net.sw.port_stats(1)["drops"]["no_rx_buffer"] == 2


def test_mergeable_buffers_span_chains_and_small_buffers_without_mrg_drop(net):
    net.attach_rx(1, bufs=8, size=512)
    frame = icmp(size=1200)
    net.send(frame)
    got = net.received(1)
    assert len(got) == 3 and b"".join(got)[HDR:] == frame
    assert struct.unpack_from("<H", got[0], 10)[0] == 3
    net.sw.set_port_features(1, 1 << 32)  # no MRG_RXBUF: one buffer must fit
    net.send(frame)
    assert net.received(1) == []
    assert net.sw.port_stats(1)["drops"]["no_rx_buffer"] == 1


def test_mtu_and_gso_header_are_dropped(net):
    net.attach_rx(1, size=4096)
    net.send(icmp(size=1500))
    gso = bytearray(HDR)
    gso[1] = 1  # VIRTIO_NET_HDR_GSO_TCPV4
    net.send(icmp(), hdr=bytes(gso))
    net.send(b"\x01" * 10)
    drops = net.sw.port_stats(0)["drops"]
    assert drops["mtu"] == 1 and drops["bad_header"] == 2


def test_partial_checksum_completed_for_peer_without_guest_csum(net):
    net.attach_rx(1)
    p = Ether(src=A, dst=B) / IP(src=A_IP, dst=B_IP) / UDP(sport=5, dport=6) / b"hello world"
    good = Ether(bytes(p))[UDP].chksum
    raw = bytearray(bytes(p))
    # The guest leaves the pseudo-header sum in the field (NEEDS_CSUM).
    pseudo = ip4(A_IP) + ip4(B_IP) + struct.pack("!BBH", 0, 17, 8 + 11)
    partial = (~pk.checksum(pseudo)) & 0xFFFF
    struct.pack_into("!H", raw, 34 + 6, partial)
    hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)  # NEEDS_CSUM, start 34, offset 6
    net.send(bytes(raw), hdr=hdr)
    (got,) = net.received(1)
    assert struct.unpack_from("!H", got, HDR + 40)[0] == good and got[0] == 0
    # With GUEST_CSUM the peer gets the partial frame and the flag.
    net.sw.set_port_features(1, (1 << 32) | F_MRG | F_GUEST_CSUM)
    net.send(bytes(raw), hdr=hdr)
    (got,) = net.received(1)
    assert got[0] == 1 and struct.unpack_from("!H", got, HDR + 40)[0] == partial


def test_detached_ring_is_not_touched(net):
    ring = net.attach_rx(1)
    net.sw.detach_rx(1, 0)
    net.send(icmp())
    assert ring.used_idx() == 0


def test_pps_allowance_drops_and_counts():
    n = Net(pps=10)
    try:
        n.attach_rx(1, bufs=60)
        for _ in range(40):
            n.send(icmp())
        s = n.sw.port_stats(0)
        assert s["pps_allowance_exceeded"] > 0
        assert s["packets_out"] + s["pps_allowance_exceeded"] == 40
        assert s["packets_out"] < 40
    finally:
        n.close()


def test_bw_out_allowance_drops_and_counts():
    n = Net(bw_out=20000)  # burst max(rate/10, one frame) = 1518 B
    try:
        n.attach_rx(1, bufs=60)
        for _ in range(10):
            n.send(icmp(size=1000))
        s = n.sw.port_stats(0)
        assert s["bw_out_allowance_exceeded"] >= 8 and s["packets_out"] >= 1
    finally:
        n.close()
