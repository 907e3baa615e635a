"""TCP segmentation offload in the C switch (nitro_pkt.c, nitro_switch.c): TSO
super-frames from a HOST_TSO port pass through to a GUEST_TSO port or are
cut into segments for the others and the uplink TAP; malformed GSO headers
are the sender's bad_header."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from nitro.vpc import packets as pk
from tests.ringlayout import NET_HDR, net_hdr, num_buffers
from tests.unit.test_net_switch import A_IP, B_IP, F_GUEST_CSUM, F_MRG, HDR, A, B, Net, ip4, link_local

V1 = 1 << 32
F_CSUM = 1 << 0
F_GUEST_TSO4, F_GUEST_TSO6 = 1 << 7, 1 << 8
F_HOST_TSO4, F_HOST_TSO6 = 1 << 11, 1 << 12
GSO_TCPV4, GSO_TCPV6 = 1, 4
A6, B6 = link_local(A), "fd00::b"  # a port's only IPv6 source is its link-local address
UP_MAC = "02:00:00:00:00:fe"
MSS = 1448  # 1500 - 20 (IPv4) - 32 (TCP with timestamps)
MSS6 = 1428  # 1500 - 40 (IPv6) - 32
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80

SENDER = V1 | F_MRG | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6
TSO_PEER = V1 | F_MRG | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6


def payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def tso_frame(n: int, v6: bool = False, flags: int = PSH | ACK, options: bytes = b"",
              dst_mac: str = B) -> tuple[bytes, int]:
    """A super-frame as a Linux guest sends it: IPv4 header checksum set,
    TCP checksum field = pseudo-header sum over the whole TCP length.
    Returns the frame and the TCP header's offset."""
    tcp = TCP(sport=4000, dport=5001, seq=0xFFFFF000, ack=77, flags=flags,
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
    if v6:
        l3 = IPv6(src=A6, dst=B6)
    else:
        l3 = IP(src=A_IP, dst=B_IP, id=0xFFFE, flags="DF", options=options)
    raw = bytearray(bytes(Ether(src=A, dst=dst_mac) / l3 / tcp / payload(n)))
    l4 = 14 + (40 if v6 else 20 + len(options))
    struct.pack_into("!H", raw, l4 + 16, pseudo_sum(bytes(raw), l4, len(raw) - l4, v6))
    return bytes(raw), l4


def pseudo_sum(frame: bytes, l4: int, tcplen: int, v6: bool) -> int:
    addrs = frame[14 + 8:14 + 40] if v6 else frame[14 + 12:14 + 20]
    extra = struct.pack("!IxxxB", tcplen, 6) if v6 else struct.pack("!xBH", 6, tcplen)
    return ~pk.checksum(addrs + extra) & 0xFFFF


def gso_hdr(gso_type: int, mss: int, l4: int, hdr_len: int = 0, flags: int = 1,
            csum_start: int | None = None, csum_offset: int = 16) -> bytes:
    start = l4 if csum_start is None else csum_start
    return net_hdr(flags, gso_type, hdr_len, mss, start, csum_offset, 0)


def tcp_csum_ok(frame: bytes, v6: bool) -> bool:
    l4 = 14 + (40 if v6 else (frame[14] & 0xF) * 4)
    tcplen = len(frame) - l4
    addrs = frame[14 + 8:14 + 40] if v6 else frame[14 + 12:14 + 20]
    extra = struct.pack("!IxxxB", tcplen, 6) if v6 else struct.pack("!xBH", 6, tcplen)
    return pk.checksum(addrs + extra + frame[l4:]) == 0


def frames(net: Net, port: int) -> list[tuple[bytes, bytes]]:
    """(header, frame) per delivered frame, merging num_buffers chains."""
    bufs = net.received(port)
    out = []
    while bufs:
        nb = num_buffers(bufs[0])
        whole = b"".join(bufs[:nb])
        bufs = bufs[nb:]
        out.append((whole[:HDR], whole[HDR:]))
    return out


@pytest.fixture
def net():
    n = Net()
    n.sw.set_port_features(0, SENDER)
    yield n
    n.close()


@pytest.mark.parametrize("v6", [False, True])
def test_super_frame_passes_through_to_a_guest_tso_peer(net, v6):
    net.sw.set_port_features(1, TSO_PEER)
    net.attach_rx(1, bufs=64, size=2048)
    n = 60000
    frame, l4 = tso_frame(n, v6)
    mss = MSS6 if v6 else MSS
    # The guest's hdr_len is only a hint: the receiver gets the real one.
    assert net.send(frame, gso_hdr(GSO_TCPV6 if v6 else GSO_TCPV4, mss, l4, hdr_len=l4)) == 1
    ((hdr, got),) = frames(net, 1)
    hlen = l4 + 32
    flags, gso_type, hdr_len, gso_size, start, off, nbuf = NET_HDR.unpack(hdr)
    assert (flags, gso_type, hdr_len, gso_size, start, off) == (
        1, GSO_TCPV6 if v6 else GSO_TCPV4, hlen, mss, l4, 16)
    assert nbuf > 1
    assert got == frame
    segs = -(-n // mss)
    wire = len(frame) + (segs - 1) * hlen
    a, b = net.sw.port_stats(0), net.sw.port_stats(1)
    assert (a["packets_out"], a["bytes_out"]) == (segs, wire)
    assert (b["packets_in"], b["bytes_in"]) == (segs, wire)
    assert net.guest.guards_intact()


def check_segments(segs: list[tuple[bytes, bytes]], frame: bytes, n: int, v6: bool,
                   partial: bool, flags: int, options: bytes = b"", mss: int = 0) -> None:
    l4 = 14 + (40 if v6 else 20 + len(options))
    mss = mss or (MSS6 if v6 else MSS)
    assert len(segs) == -(-n // mss)
    data = b""
    for i, (hdr, seg) in enumerate(segs):
        assert len(seg) <= 1514
        p = Ether(seg)
        ip = p[IPv6] if v6 else p[IP]
        tcp = p[TCP]
        if partial:
            assert struct.unpack("<BBHHHH", hdr[:10]) == (1, 0, 0, 0, l4, 16)
            assert struct.unpack_from("!H", seg, l4 + 16)[0] == pseudo_sum(seg, l4, len(seg) - l4, v6)
        else:
            assert hdr[:2] == b"\0\0"  # checksum complete, no GSO
            assert tcp_csum_ok(seg, v6)
        if v6:
            assert ip.plen == len(seg) - 54
        else:
            assert ip.len == len(seg) - 14 and ip.id == (0xFFFE + i) & 0xFFFF
            assert ip.flags == "DF" and seg[34:l4] == frame[34:l4]  # options
            assert pk.checksum(seg[14:l4]) == 0
        assert tcp.seq == (0xFFFFF000 + i * mss) & 0xFFFFFFFF and tcp.ack == 77
        want = flags
        if i < len(segs) - 1:
            want &= ~(FIN | PSH)
        if i > 0:
            want &= ~CWR
        assert int(tcp.flags) == want
        data += seg[l4 + 32:]
    assert data == payload(n)


@pytest.mark.parametrize("v6", [False, True])
def test_super_frame_is_segmented_for_a_peer_without_tso(net, v6):
    net.attach_rx(1, bufs=64, size=2048)
    n = 20000
    flags = FIN | PSH | ACK | CWR
    frame, l4 = tso_frame(n, v6, flags=flags)
    net.send(frame, gso_hdr(GSO_TCPV6 if v6 else GSO_TCPV4, MSS6 if v6 else MSS, l4))
    segs = frames(net, 1)
    check_segments(segs, frame, n, v6, partial=False, flags=flags)
    b = net.sw.port_stats(1)
    assert b["packets_in"] == len(segs) == net.sw.port_stats(0)["packets_out"]
    assert b["bytes_in"] == sum(len(s) for _, s in segs) == net.sw.port_stats(0)["bytes_out"]
    assert net.guest.guards_intact()


def test_segments_keep_the_checksum_partial_for_a_guest_csum_peer(net):
    net.sw.set_port_features(1, V1 | F_MRG | F_GUEST_CSUM | F_GUEST_TSO6)  # TSO6 only
    net.attach_rx(1, bufs=64, size=2048)
    frame, l4 = tso_frame(5000)
    net.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))
    check_segments(frames(net, 1), frame, 5000, False, partial=True, flags=PSH | ACK)


def test_ipv4_options_are_copied_into_every_segment(net):
    net.attach_rx(1, bufs=64, size=2048)
    opts = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL: IHL 6
    frame, l4 = tso_frame(4000, options=opts)
    net.send(frame, gso_hdr(GSO_TCPV4, MSS - 4, l4))
    segs = frames(net, 1)
    assert len(segs) == 3 and all(tcp_csum_ok(s, False) for _, s in segs)
    assert b"".join(s[l4 + 32:] for _, s in segs) == payload(4000)


def test_mtu_applies_per_segment(net):
    net.attach_rx(1, bufs=64, size=2048)
    frame, l4 = tso_frame(10000)
    net.send(frame, gso_hdr(GSO_TCPV4, MSS + 1, l4))  # 1515-byte segments
    assert frames(net, 1) == []
    assert net.sw.port_stats(0)["drops"]["mtu"] == 1
    net.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))  # 10 KB super-frame, 1514-byte segments
    assert len(frames(net, 1)) == 7


def test_uplink_tap_gets_segments_with_complete_checksums(net):
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        net.sw.set_uplink(0, tap.fileno(), pk.mac_bytes(UP_MAC))
        frame, l4 = tso_frame(9000, dst_mac=UP_MAC)
        net.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))
        peer.setblocking(False)
        got = []
        while True:
            try:
                got.append((bytes(10), peer.recv(70000)))
            except BlockingIOError:
                break
        check_segments(got, frame, 9000, False, partial=False, flags=PSH | ACK)
        up = net.sw.uplink_stats(0)
        assert up["packets_in"] == len(got) == 7
    finally:
        net.sw.set_uplink(0, -1, pk.mac_bytes(UP_MAC))
        tap.close()
        peer.close()


def _bad_cases():
    f4, l4 = tso_frame(3000)
    f6, l6 = tso_frame(3000, v6=True)
    udp = bytes(Ether(src=A, dst=B) / IP(src=A_IP, dst=B_IP) / UDP(sport=1, dport=2) / payload(3000))
    frag = bytearray(f4)
    frag[14 + 6] |= 0x20  # More Fragments
    short_ihl = bytearray(f4)
    short_ihl[14] = 0x44
    long_ihl = bytearray(f4[:14 + 60])
    long_ihl[14] = 0x4F
    struct.pack_into("!H", long_ihl, 16, 60)
    tot = bytearray(f4)
    struct.pack_into("!H", tot, 16, len(f4) - 14 - 1)
    doff = bytearray(f4)
    doff[l4 + 12] = 0x40
    bcast, _ = tso_frame(3000, dst_mac="ff:ff:ff:ff:ff:ff")
    mcast, _ = tso_frame(3000, v6=True, dst_mac="33:33:00:00:00:01")
    return {
        "gso_size 0": (f4, gso_hdr(GSO_TCPV4, 0, l4)),
        # 64 KiB at gso_size 1 would be ~65,000 segments per receiver.
        "gso_size 1": (f4, gso_hdr(GSO_TCPV4, 1, l4)),
        "gso_size 87, below Linux's TCP_MIN_MSS": (f4, gso_hdr(GSO_TCPV4, 87, l4)),
        "broadcast destination": (bcast, gso_hdr(GSO_TCPV4, MSS, l4)),
        "multicast destination": (mcast, gso_hdr(GSO_TCPV6, MSS6, l6)),
        "hdr_len beyond the frame": (f4, gso_hdr(GSO_TCPV4, MSS, l4, hdr_len=len(f4) + 1)),
        "csum_start outside": (f4, gso_hdr(GSO_TCPV4, MSS, l4, csum_start=len(f4) + 8)),
        "csum_start not the TCP header": (f4, gso_hdr(GSO_TCPV4, MSS, l4, csum_start=14)),
        "csum_offset not the TCP checksum": (f4, gso_hdr(GSO_TCPV4, MSS, l4, csum_offset=6)),
        "no NEEDS_CSUM": (f4, gso_hdr(GSO_TCPV4, MSS, l4, flags=0)),
        "ECN not offered": (f4, gso_hdr(GSO_TCPV4 | 0x80, MSS, l4)),
        "UFO not offered": (udp, gso_hdr(3, MSS, 34, csum_offset=6)),
        "UDP under TCPV4": (udp, gso_hdr(GSO_TCPV4, MSS, 34, csum_offset=6)),
        "IPv6 under TCPV4": (f6, gso_hdr(GSO_TCPV4, MSS, l6)),
        "IPv4 under TCPV6": (f4, gso_hdr(GSO_TCPV6, MSS, l4)),
        "IPv4 fragment": (bytes(frag), gso_hdr(GSO_TCPV4, MSS, l4)),
        "IHL below 5": (bytes(short_ihl), gso_hdr(GSO_TCPV4, MSS, 14 + 16)),
        "IHL past the frame": (bytes(long_ihl), gso_hdr(GSO_TCPV4, MSS, 14 + 60)),
        "IPv4 total length not the frame's": (bytes(tot), gso_hdr(GSO_TCPV4, MSS, l4)),
        "TCP data offset below 5": (bytes(doff), gso_hdr(GSO_TCPV4, MSS, l4)),
        "short IPv6 frame": (f6[:14 + 50], gso_hdr(GSO_TCPV6, MSS, l6)),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_gso_headers_are_bad_header(net, case):
    net.sw.set_port_features(1, TSO_PEER)
    net.attach_rx(1, bufs=64, size=2048)
    frame, hdr = BAD[case]
    net.send(frame, hdr)
    assert frames(net, 1) == []
    s = net.sw.port_stats(0)
    assert s["drops"]["bad_header"] == 1 and s["packets_out"] == 0


def test_smallest_gso_size_is_linuxs_tcp_min_mss(net):
    net.attach_rx(1, bufs=64, size=2048)
    frame, l4 = tso_frame(880)
    net.send(frame, gso_hdr(GSO_TCPV4, 88, l4))
    check_segments(frames(net, 1), frame, 880, False, partial=False, flags=PSH | ACK, mss=88)
    assert net.sw.port_stats(0)["packets_out"] == 10


def test_gso_type_needs_the_matching_host_tso_feature(net):
    net.sw.set_port_features(1, TSO_PEER)
    net.attach_rx(1, bufs=64, size=2048)
    f4, l4 = tso_frame(3000)
    f6, l6 = tso_frame(3000, v6=True)
    net.sw.set_port_features(0, V1 | F_MRG | F_CSUM | F_HOST_TSO6)
    net.send(f4, gso_hdr(GSO_TCPV4, MSS, l4))
    net.sw.set_port_features(0, V1 | F_MRG | F_CSUM | F_HOST_TSO4)
    net.send(f6, gso_hdr(GSO_TCPV6, MSS, l6))
    assert frames(net, 1) == []
    assert net.sw.port_stats(0)["drops"]["bad_header"] == 2
    net.send(f4, gso_hdr(GSO_TCPV4, MSS, l4))
    assert len(frames(net, 1)) == 1


def test_super_frame_too_big_for_a_buffer_without_mrg_is_no_rx_buffer(net):
    net.sw.set_port_features(1, TSO_PEER & ~F_MRG)
    net.attach_rx(1, bufs=8, size=4096)
    frame, l4 = tso_frame(30000)
    net.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))
    assert frames(net, 1) == []
    assert net.sw.port_stats(1)["drops"]["no_rx_buffer"] == 1
    assert net.guest.guards_intact()


def test_spoofed_super_frame_is_dropped_before_segmentation(net):
    net.attach_rx(1, bufs=64, size=2048)
    raw = bytearray(tso_frame(5000)[0])
    raw[14 + 12:14 + 16] = ip4("10.0.0.99")
    net.send(bytes(raw), gso_hdr(GSO_TCPV4, MSS, 34))
    assert frames(net, 1) == []
    assert net.sw.port_stats(0)["drops"]["spoofed_source"] == 1


def test_pps_limit_counts_segments_and_a_super_frame_larger_than_the_bucket_still_goes():
    n = Net(pps=10)  # bucket depth: 1 packet (rate / 10)
    try:
        n.sw.set_port_features(0, SENDER)
        n.attach_rx(1, bufs=64, size=2048)
        frame, l4 = tso_frame(10000)  # 7 segments
        n.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))
        assert len(frames(n, 1)) == 7
        n.send(frame, gso_hdr(GSO_TCPV4, MSS, l4))  # the bucket is in debt now
        s = n.sw.port_stats(0)
        assert s["packets_out"] == 7 and s["pps_allowance_exceeded"] == 1
    finally:
        n.close()


def test_tso_is_offered_and_its_feature_dependencies_are_enforced():
    from nitro.devices.net import config as netcfg

    offered = netcfg.device_features()
    for bit in (netcfg.VIRTIO_NET_F_HOST_TSO4, netcfg.VIRTIO_NET_F_HOST_TSO6,
                netcfg.VIRTIO_NET_F_GUEST_TSO4, netcfg.VIRTIO_NET_F_GUEST_TSO6):
        assert offered >> bit & 1
    for bit in (netcfg.VIRTIO_NET_F_HOST_ECN, netcfg.VIRTIO_NET_F_GUEST_ECN,
                netcfg.VIRTIO_NET_F_HOST_UFO, netcfg.VIRTIO_NET_F_GUEST_UFO):
        assert not offered >> bit & 1
    assert netcfg.missing_dependency(offered) is None
    assert netcfg.missing_dependency(SENDER | TSO_PEER) is None
    assert netcfg.missing_dependency(F_HOST_TSO4) == (11, 0)
    assert netcfg.missing_dependency(F_CSUM | F_GUEST_TSO6) == (8, 1)
    assert netcfg.missing_dependency(F_CSUM | F_HOST_TSO6 | 1 << 13) is None
    assert netcfg.missing_dependency(F_CSUM | 1 << 13) == (13, 11)
