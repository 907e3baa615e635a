"""Seed corpus for the ``net`` fuzz target (tests/fuzz/fuzz_net.c).

    python -m tests.fuzz.netseeds     # rewrites tests/fuzz/corpus/net/seed-*

The input format is described at the top of fuzz_net.c; `Prog` writes it.
Frames are built by hand with struct (no scapy) so the bytes never change
with a library version. Each seed aims at one path of the TX pipeline:
plain forwarding, each punted control frame, flooding, the uplink, TSO
super-frames (IPv4/IPv6, options, small and large gso_size, passed through
or segmented), NEEDS_CSUM at various offsets, VLAN tags, short and oversize
chains, RX buffers that are too small, split or missing, rate limits,
feature changes and RX ring resets between serves; then frames from the
uplink TAP and from inject, ports with two queue pairs, and hostile split
and packed RX rings (EXPECT says what each of those must do).
"""

from __future__ import annotations

import struct
from pathlib import Path

from nitro.vpc.packets import checksum as csum
from tests.ringlayout import net_hdr

HERE = Path(__file__).resolve().parent

# Setup bits (fuzz_net.c header).
PORT2, PORT2_OTHER_VPC, UPLINK = 1, 2, 4
PPS0, BW_OUT0, BW_IN1, EVENT_IDX, NO_RX1 = 8, 16, 32, 64, 128
# Feature byte bits.
CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4, HOST_TSO6, MRG = (1 << i for i in range(7))
SENDER = CSUM | HOST_TSO4 | HOST_TSO6 | MRG
PEER = GUEST_CSUM | MRG
TSO_PEER = GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | MRG

A = bytes.fromhex("52540000000a")
B = bytes.fromhex("52540000000b")
C = bytes.fromhex("52540000000c")
GW = bytes.fromhex("020000000001")
UP = bytes.fromhex("0200000000fe")
BCAST = b"\xff" * 6
A_IP, B_IP, GW_IP = bytes([10, 0, 0, 10]), bytes([10, 0, 0, 11]), bytes([10, 0, 0, 1])
A6 = bytes.fromhex("fe80000000000000505400fffe00000a")  # A's link-local: its only IPv6 source
B6 = bytes.fromhex("fd00000000000000000000000000000b")
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
GSO_TCPV4, GSO_TCPV6 = 1, 4
# RAWRING mode bits and placements; RAWDESC address kinds (fuzz_net.c).
PACKED, INDIRECT, EVT = 1, 2, 4
USED_IN_HOLE, USED_AT_END, RINGS_IN_TX = 1 << 3, 2 << 3, 3 << 3
OWN, TX_BUFS, REGION_END, NO_MEMORY = range(4)
# Where a hostile ring puts its parts and first buffer in its region.
RAW_AVAIL, RAW_USED, RAW_BUF = 0x4000, 0x5000, 0x10000
# Descriptor flags: split (2.7.5) and packed (2.8.1).
NEXT, WRITE, INDIRECT_F = 1, 2, 4
P_AVAIL = 1 << 7


def rx(port: int, pair: int = 0) -> int:
    """fuzz_net.c's RX ring byte: 0..2 pair 0 of ports 1, 2, 0; 3..5 pair 1."""
    return 3 * pair + (port + 2) % 3


class Prog:
    def __init__(self, setup: int = PORT2 | UPLINK, mtu: int = 1500,
                 features: tuple[int, int, int] = (SENDER, PEER, PEER)):
        self.b = bytearray(struct.pack("<BH3B", setup, mtu, *features))

    def frame(self, data: bytes, fill_len: int = 0, fill: int = 0, ndesc: int = 1,
              cut: int = 0) -> Prog:
        self.b += struct.pack("<BH", 0, len(data)) + data
        self.b += struct.pack("<HBBH", fill_len, fill, ndesc - 1, cut)
        return self

    def serve(self) -> Prog:
        self.b.append(1)
        return self

    def rxbuf(self, port: int, count: int, size: int, cut: int = 0, pair: int = 0) -> Prog:
        self.b += struct.pack("<BBBHH", 2, rx(port, pair), count, size - 1, cut)
        return self

    def feat(self, port: int, features: int) -> Prog:
        self.b += struct.pack("<BBB", 3, port, features)
        return self

    def rxreset(self, port: int, pair: int = 0) -> Prog:
        self.b += struct.pack("<BB", 4, rx(port, pair))
        return self

    def txsel(self, port: int, pair: int = 0) -> Prog:
        self.b += struct.pack("<BB", 5, port | pair << 2)
        return self

    def rxdetach(self, port: int, pair: int = 0) -> Prog:
        self.b += struct.pack("<BB", 6, rx(port, pair))
        return self

    def uplink(self, data: bytes, fill_len: int = 0, fill: int = 0) -> Prog:
        self.b += struct.pack("<BH", 7, len(data)) + data + struct.pack("<HB", fill_len, fill)
        return self

    def upserve(self) -> Prog:
        self.b.append(8)
        return self

    def inject(self, port: int, data: bytes, fill_len: int = 0, fill: int = 0) -> Prog:
        self.b += struct.pack("<BBH", 9, port, len(data)) + data + struct.pack("<HB", fill_len, fill)
        return self

    def rawring(self, port: int, mode: int = 0, log2: int = 3, desc: int = 0,
                avail: int = RAW_AVAIL, used: int = RAW_USED, pair: int = 0) -> Prog:
        """A hostile RX ring; desc/avail/used are byte offsets in its region."""
        self.b += struct.pack("<BBBBHHH", 10, rx(port, pair), mode, log2, desc // 16,
                              avail // 2, used // 4)
        return self

    def rawdesc(self, port: int, index: int, count: int = 1, kind: int = 0,
                off: int = RAW_BUF, length: int = 2048, flags: int = WRITE, nxt: int = 0,
                pair: int = 0) -> Prog:
        self.b += struct.pack("<BBHBBIIHH", 11, rx(port, pair), index, count, kind, off,
                              length, flags, nxt)
        return self

    def rawavail(self, port: int, head: int, delta: int = 1, pair: int = 0) -> Prog:
        self.b += struct.pack("<BBHH", 12, rx(port, pair), head, delta)
        return self

    def rawwrite(self, port: int, off: int, data: bytes, pair: int = 0) -> Prog:
        self.b += struct.pack("<BBHB", 13, rx(port, pair), off // 4, len(data)) + data
        return self

    def encode(self) -> bytes:
        return bytes(self.b)


# ---- frames ----------------------------------------------------------------------

def eth(dst: bytes, src: bytes, etype: int) -> bytes:
    return dst + src + struct.pack("!H", etype)


def ipv4(proto: int, payload_len: int, src: bytes = A_IP, dst: bytes = B_IP,
         options: bytes = b"", frag: int = 0x4000, ident: int = 1) -> bytes:
    ihl = 5 + len(options) // 4
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + payload_len, ident, frag,
                    64, proto, 0, src, dst) + options
    return h[:10] + struct.pack("!H", csum(h)) + h[12:]


def ipv6(nh: int, payload_len: int, src: bytes = A6, dst: bytes = B6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, nh, 64, src, dst)


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp_hdr(flags: int = 0x18, options: bytes = b"") -> bytes:
    doff = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", 4000, 5001, 0xFFFFF000, 77, doff << 4, flags,
                       65535, 0, 0) + options


def udp4_frame(dst_mac: bytes = B, dst: bytes = B_IP, payload: bytes = b"hello",
               src_mac: bytes = A, src: bytes = A_IP) -> bytes:
    u = udp(1234, 5678, payload)
    return eth(dst_mac, src_mac, 0x0800) + ipv4(17, len(u), src=src, dst=dst) + u


def up_frame(dst_mac: bytes = B, dst: bytes = B_IP, payload: bytes = b"from the host") -> bytes:
    """A frame the host sends through the uplink TAP (any source is fine)."""
    return udp4_frame(dst_mac, dst, payload, src_mac=UP, src=bytes([8, 8, 8, 8]))


def icmp_echo(dst: bytes = GW_IP, dst_mac: bytes = GW) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return eth(dst_mac, A, 0x0800) + ipv4(1, len(body), dst=dst) + body


def echo6_to_ra(destopt: bool = False) -> bytes:
    """An ICMPv6 echo request to all nodes (behind a destination options
    header if destopt) whose last two bytes make the checksum of its
    ICMPv6 part come out 0x8600."""
    ext = bytes([58, 0, 1, 4, 0, 0, 0, 0]) if destopt else b""  # PadN
    def frame(word: int) -> bytes:
        icmp = struct.pack("!BBHHHH", 128, 0, 0, 1, 1, word)
        return eth(B, A, 0x86DD) + ipv6(60 if destopt else 58, len(ext + icmp), dst=ALL_NODES) \
            + ext + icmp
    start = 54 + len(ext)
    return frame(next(w for w in range(1 << 16) if csum(frame(w)[start:]) == 0x8600))


def arp(op: int, tpa: bytes, dst_mac: bytes = BCAST, tha: bytes = bytes(6)) -> bytes:
    return eth(dst_mac, A, 0x0806) + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op,
                                                 A, A_IP, tha, tpa)


def dhcp_discover() -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, 0x1234, 0, 0x8000,
                        bytes(4), bytes(4), bytes(4), bytes(4), A + bytes(10))
    bootp += bytes(192) + b"\x63\x82\x53\x63" + b"\x35\x01\x01\xff"
    u = udp(68, 67, bootp)
    return eth(BCAST, A, 0x0800) + ipv4(17, len(u), src=bytes(4), dst=b"\xff" * 4) + u


def tso4(paylen: int, options: bytes = b"", tcp_options: bytes = b"", dst_mac: bytes = B
         ) -> tuple[bytes, int, int]:
    """Headers of a TCPv4 super-frame whose paylen payload bytes come from
    the fill; returns (headers, l4 offset, header length)."""
    t = tcp_hdr(options=tcp_options)
    ip = ipv4(6, len(t) + paylen, options=options, frag=0x4000)
    head = eth(dst_mac, A, 0x0800) + ip + t
    return head, 14 + len(ip), len(head)


def tso6(paylen: int, dst_mac: bytes = B) -> tuple[bytes, int, int]:
    t = tcp_hdr()
    head = eth(dst_mac, A, 0x86DD) + ipv6(6, len(t) + paylen) + t
    return head, 54, len(head)


# ---- seeds -------------------------------------------------------------------------

def _seeds() -> dict[str, Prog]:
    s: dict[str, Prog] = {}
    s["udp-to-peer"] = Prog().rxbuf(1, 8, 2048).frame(net_hdr() + udp4_frame()).serve()
    s["udp-split-8-descs"] = Prog().rxbuf(1, 8, 2048).frame(
        net_hdr() + udp4_frame(payload=bytes(200)), ndesc=8, cut=5).serve()
    s["icmp-echo-to-gateway"] = Prog().frame(net_hdr() + icmp_echo()).serve()
    s["ipv4-to-gateway-dropped"] = Prog().frame(net_hdr() + udp4_frame(GW, GW_IP)).serve()
    s["arp-request-punted"] = Prog().frame(net_hdr() + arp(1, GW_IP)).serve()
    s["arp-reply-forwarded"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr() + arp(2, B_IP, dst_mac=B, tha=B)).serve()
    s["dhcp-discover"] = Prog().frame(net_hdr() + dhcp_discover()).serve()
    s["broadcast-flood"] = Prog().rxbuf(1, 4, 2048).rxbuf(2, 4, 2048).frame(
        net_hdr() + udp4_frame(BCAST, b"\xff" * 4)).serve()
    s["unicast-to-uplink"] = Prog().frame(net_hdr() + udp4_frame(UP, bytes([8, 8, 8, 8]))).serve()
    s["other-vpc-unknown"] = Prog(setup=PORT2 | PORT2_OTHER_VPC).rxbuf(2, 4, 2048).frame(
        net_hdr() + udp4_frame(C)).serve()
    s["spoofed-source"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr() + B + C + udp4_frame()[12:]).serve()
    s["vlan-tag"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr() + eth(B, A, 0x8100) + b"\x00\x05\x08\x00" + udp4_frame()[14:]).serve()
    s["ipv6-udp"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr() + eth(B, A, 0x86DD) + ipv6(17, 13) + udp(1, 2, b"hello")).serve()
    s["short-frames"] = (Prog().rxbuf(1, 8, 2048).frame(b"\0" * 10).frame(net_hdr() + A)
                         .frame(net_hdr() + B + A + b"\x08\x00").frame(net_hdr() + udp4_frame()[:30])
                         .serve())
    s["oversize-chain"] = Prog(mtu=65535).rxbuf(1, 32, 8192).frame(
        net_hdr() + eth(B, A, 0x88B5) + bytes(10), fill_len=65535, fill=0x5A, ndesc=3).serve()
    s["jumbo-mtu-9000"] = Prog(mtu=9000).rxbuf(1, 4, 8192).frame(
        net_hdr() + udp4_frame(payload=b"j"), fill_len=8000, fill=1).serve()
    s["over-mtu"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr() + eth(B, A, 0x88B5), fill_len=1501).serve()
    # NEEDS_CSUM: UDP checksum at 34 + 6; at the last 2 bytes; past the end;
    # to a peer without GUEST_CSUM (completed) and with it (kept partial).
    f = udp4_frame(payload=b"checksum me")
    s["needs-csum-udp"] = Prog(features=(SENDER, MRG, PEER)).rxbuf(1, 4, 2048).rxbuf(2, 4, 2048) \
        .frame(net_hdr(1, csum_start=34, csum_offset=6) + f) \
        .frame(net_hdr(1, csum_start=34, csum_offset=6) + udp4_frame(C)) \
        .serve()
    s["needs-csum-offsets"] = (Prog(features=(SENDER, MRG, PEER)).rxbuf(1, 16, 2048)
                               .frame(net_hdr(1, csum_start=len(f) - 2, csum_offset=0) + f)
                               .frame(net_hdr(1, csum_start=len(f) - 1, csum_offset=0) + f)
                               .frame(net_hdr(1, csum_start=0, csum_offset=len(f) - 2) + f)
                               .frame(net_hdr(1, csum_start=0xFFFF, csum_offset=0xFFFF) + f)
                               .frame(net_hdr(3) + f).serve())
    s["needs-csum-to-uplink"] = Prog(setup=UPLINK).frame(
        net_hdr(1, csum_start=34, csum_offset=6) + udp4_frame(UP, bytes([8, 8, 8, 8]))).serve()
    # The checksum on the ICMPv6 type: an echo request whose checksum comes
    # out 0x8600 (type 134, a Router Advertisement) at a peer that has it
    # completed (no GUEST_CSUM): bad_header (c11f884; before, it arrived).
    s["needs-csum-on-the-icmp6-type"] = Prog(features=(SENDER, MRG, MRG)).rxbuf(1, 4, 2048) \
        .frame(net_hdr(1, csum_start=54, csum_offset=0) + echo6_to_ra()).serve()
    s["needs-csum-on-the-icmp6-type-behind-destopt"] = Prog(features=(SENDER, MRG, MRG)) \
        .rxbuf(1, 4, 2048) \
        .frame(net_hdr(1, csum_start=62, csum_offset=0) + echo6_to_ra(destopt=True)).serve()
    # RX buffers: header split over two descriptors, too small without
    # MRG_RXBUF, smaller than the header (the ring is broken), none posted.
    s["rx-header-split"] = Prog().rxbuf(1, 4, 2048, cut=5).frame(net_hdr() + udp4_frame()).serve()
    s["rx-small-no-mrg"] = Prog(features=(SENDER, GUEST_CSUM, PEER)).rxbuf(1, 4, 64).frame(
        net_hdr() + udp4_frame(payload=bytes(100))).serve()
    s["rx-small-mrg"] = Prog().rxbuf(1, 32, 64).frame(
        net_hdr() + udp4_frame(payload=bytes(1000))).serve()
    s["rx-buffer-under-header"] = Prog().rxbuf(1, 2, 8).frame(net_hdr() + udp4_frame()).serve() \
        .rxbuf(1, 2, 2048).frame(net_hdr() + udp4_frame()).serve()
    s["rx-none"] = Prog(setup=PORT2 | NO_RX1).frame(net_hdr() + udp4_frame()).serve()
    s["rx-reset-and-features"] = (Prog().rxbuf(1, 4, 2048).frame(net_hdr() + udp4_frame()).serve()
                                  .rxreset(1).feat(1, 0).rxbuf(1, 4, 2048)
                                  .frame(net_hdr(1, csum_start=34, csum_offset=6) + udp4_frame()).serve())
    s["rate-limits"] = Prog(setup=PORT2 | UPLINK | PPS0 | BW_OUT0 | BW_IN1 | EVENT_IDX) \
        .rxbuf(1, 32, 2048)
    for _ in range(8):
        s["rate-limits"].frame(net_hdr() + udp4_frame(payload=b""), fill_len=1400)
    s["rate-limits"].serve()
    # TSO super-frames.
    head, l4, hl = tso4(20000)
    s["tso4-small-mss-segmented"] = Prog().rxbuf(1, 32, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 100, l4, 16) + head, fill_len=20000, fill=7).serve()
    head, l4, hl = tso4(60000, tcp_options=b"\x01\x01\x08\x0a" + bytes(8))
    s["tso4-large-passthrough"] = Prog(features=(SENDER, TSO_PEER, PEER)).rxbuf(1, 32, 8192) \
        .frame(net_hdr(1, GSO_TCPV4, hl, 1448, l4, 16) + head, fill_len=60000, fill=9, ndesc=4,
               cut=hl + 12).serve()
    s["tso4-to-uplink"] = Prog(setup=UPLINK).frame(
        net_hdr(1, GSO_TCPV4, 0, 1448, 34, 16) + tso4(6000, dst_mac=UP)[0], fill_len=6000).serve()
    head, l4, hl = tso4(3000, options=b"\x01\x01\x01\x00" * 2)
    s["tso4-ip-options"] = Prog().rxbuf(1, 8, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 1000, l4, 16) + head, fill_len=3000).serve()
    head, l4, hl = tso6(9000)
    s["tso6-segmented"] = Prog().rxbuf(1, 16, 2048).rxbuf(2, 16, 2048).frame(
        net_hdr(1, GSO_TCPV6, hl, 1428, l4, 16) + head, fill_len=9000, fill=3).serve()
    head, l4, hl = tso6(40000)
    s["tso6-passthrough-min-mss"] = Prog(features=(SENDER, TSO_PEER, TSO_PEER)).rxbuf(1, 32, 8192) \
        .frame(net_hdr(1, GSO_TCPV6, hl, 88, l4, 16) + head, fill_len=40000).serve()
    head, l4, hl = tso4(3000)
    s["tso4-mss-87-refused"] = Prog(setup=PORT2 | UPLINK).rxbuf(1, 32, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 87, l4, 16) + head, fill_len=3000).serve()
    head, l4, hl = tso4(3000, dst_mac=BCAST)
    s["tso4-broadcast-refused"] = Prog(setup=PORT2 | UPLINK).rxbuf(1, 32, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 1448, l4, 16) + head, fill_len=3000).serve()
    head, l4, hl = tso4(0)
    s["tso4-no-payload"] = Prog().rxbuf(1, 4, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 1448, l4, 16) + head).serve()
    head, l4, hl = tso4(5000)
    s["tso4-without-host-tso"] = Prog(features=(CSUM | MRG, PEER, PEER)).rxbuf(1, 8, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 1448, l4, 16) + head, fill_len=5000).serve()
    s["tso4-mss-over-mtu"] = Prog(mtu=576).rxbuf(1, 8, 2048).frame(
        net_hdr(1, GSO_TCPV4, hl, 1448, l4, 16) + head, fill_len=5000).serve()
    return s


# ---- frames from the uplink and the control plane, several queue pairs -----------------

def _uplink_seeds() -> dict[str, Prog]:
    s: dict[str, Prog] = {}
    s["uplink-to-peer"] = Prog().rxbuf(1, 4, 2048).uplink(up_frame()).upserve()
    s["uplink-flood"] = (Prog().rxreset(0).rxbuf(0, 4, 2048).rxbuf(1, 4, 2048).rxbuf(2, 4, 2048)
                         .uplink(up_frame(BCAST, b"\xff" * 4)).upserve())
    s["uplink-other-vpc"] = (Prog(setup=PORT2 | PORT2_OTHER_VPC | UPLINK).rxbuf(1, 4, 2048)
                             .rxbuf(2, 4, 2048).uplink(up_frame(C)).uplink(up_frame(BCAST))
                             .upserve())
    s["uplink-bad-datagrams"] = (Prog().rxbuf(1, 4, 2048).uplink(b"").uplink(bytes(10))
                                 .uplink(eth(B, UP, 0x8100) + b"\x00\x05\x08\x00" + up_frame()[14:])
                                 .uplink(eth(B, UP, 0x88B5), fill_len=1501)
                                 .uplink(up_frame()).upserve())
    s["uplink-absent"] = Prog(setup=PORT2).rxbuf(1, 4, 2048).uplink(up_frame()).upserve()
    s["uplink-max-frame-merged"] = (Prog(mtu=65535).rxbuf(1, 32, 8192)
                                    .uplink(eth(B, UP, 0x88B5), fill_len=65535, fill=0x77).upserve())
    s["uplink-many"] = Prog().rxbuf(1, 8, 2048)
    for i in range(6):
        s["uplink-many"].uplink(up_frame(payload=bytes([i]) * (100 * i)))
    s["uplink-many"].upserve()
    s["uplink-and-tx-interleaved"] = (Prog().rxbuf(1, 8, 2048).frame(net_hdr() + udp4_frame())
                                      .uplink(up_frame()).serve().upserve())
    s["uplink-rate-limited"] = Prog(setup=PORT2 | UPLINK | BW_IN1).rxbuf(1, 8, 2048)
    for _ in range(3):
        s["uplink-rate-limited"].uplink(up_frame(payload=bytes(1400)))
    s["uplink-rate-limited"].upserve()
    return s


def _inject_seeds() -> dict[str, Prog]:
    reply = arp(2, A_IP, dst_mac=B, tha=B)
    s: dict[str, Prog] = {}
    s["inject-arp-reply"] = Prog().rxbuf(1, 4, 2048).inject(1, reply)
    s["inject-no-ring"] = Prog().inject(0, reply)
    s["inject-no-buffers"] = Prog().inject(1, reply)
    s["inject-bad-lengths"] = (Prog().rxbuf(1, 4, 2048).inject(1, bytes(13))
                               .inject(1, eth(B, GW, 0x88B5), fill_len=2035)
                               .inject(3, reply)
                               .inject(1, eth(B, GW, 0x88B5), fill_len=2034))
    s["inject-pair-1"] = (Prog().rxdetach(1).rxreset(1, 1).rxbuf(1, 4, 2048, pair=1)
                          .inject(1, reply))
    s["inject-over-mtu"] = Prog(mtu=576).rxbuf(1, 4, 2048).inject(1, eth(B, GW, 0x88B5),
                                                                  fill_len=1900)
    return s


def _pair_seeds() -> dict[str, Prog]:
    from_b = udp4_frame(A, A_IP, src_mac=B, src=B_IP)
    s: dict[str, Prog] = {}
    # Port 1 sends (hint 1: port 0's pair 1 first), port 0 sends (hint 0: pair 0).
    s["pairs-spread-by-sender"] = (Prog().rxreset(0).rxreset(0, 1).rxbuf(0, 4, 2048)
                                   .rxbuf(0, 4, 2048, pair=1).rxreset(1, 1).rxbuf(1, 4, 2048)
                                   .rxbuf(1, 4, 2048, pair=1).txsel(1).frame(net_hdr() + from_b)
                                   .txsel(0).frame(net_hdr() + udp4_frame()).serve())
    s["pairs-gap"] = (Prog().rxdetach(1).rxreset(1, 1).rxbuf(1, 4, 2048, pair=1)
                      .frame(net_hdr() + udp4_frame()).serve())
    s["pairs-full-ring-no-spill"] = (Prog().rxreset(1, 1).rxbuf(1, 1, 2048).rxbuf(1, 4, 2048, pair=1)
                                     .frame(net_hdr() + udp4_frame()).frame(net_hdr() + udp4_frame())
                                     .frame(net_hdr() + udp4_frame(BCAST, b"\xff" * 4)).serve())
    s["pairs-tx-on-pair-1"] = Prog().rxbuf(1, 4, 2048).txsel(0, 1).frame(net_hdr() + udp4_frame()).serve()
    s["pairs-tx-several-rings"] = (Prog().rxreset(0).rxbuf(0, 4, 2048).rxbuf(1, 4, 2048).rxbuf(2, 4, 2048)
                                   .frame(net_hdr() + udp4_frame())
                                   .txsel(0, 1).frame(net_hdr() + udp4_frame(C, bytes([10, 0, 0, 12])))
                                   .txsel(1, 0).frame(net_hdr() + from_b)
                                   .txsel(1, 1).frame(net_hdr() + udp4_frame(
                                       BCAST, b"\xff" * 4, src_mac=B, src=B_IP)).serve())
    s["pairs-other-vpc-sender"] = (Prog(setup=PORT2 | PORT2_OTHER_VPC | UPLINK).rxbuf(1, 4, 2048)
                                   .txsel(2).frame(net_hdr() + udp4_frame(
                                       BCAST, b"\xff" * 4, src_mac=C, src=bytes([10, 0, 0, 12])))
                                   .serve())
    s["pairs-fast-path-batch"] = Prog().rxreset(1, 1).rxbuf(1, 16, 2048).rxbuf(1, 16, 2048, pair=1)
    for i in range(8):
        s["pairs-fast-path-batch"].frame(net_hdr() + udp4_frame(payload=bytes(50 * i)),
                                         ndesc=1 + i, cut=20)
    s["pairs-fast-path-batch"].serve()
    s["pairs-detach-between-serves"] = (Prog().rxbuf(1, 4, 2048).frame(net_hdr() + udp4_frame())
                                        .serve().rxdetach(1).frame(net_hdr() + udp4_frame()).serve()
                                        .rxreset(1).rxbuf(1, 4, 2048)
                                        .frame(net_hdr() + udp4_frame()).serve())
    return s


# ---- hostile RX rings ---------------------------------------------------------------------

def _hit(p: Prog) -> Prog:
    """Send port 1 a frame from each source: port 0's TX ring (fast path,
    then a flooded one: the slow path), the uplink, inject."""
    return (p.frame(net_hdr() + udp4_frame(payload=bytes(300)))
            .frame(net_hdr() + udp4_frame(BCAST, b"\xff" * 4)).serve()
            .uplink(up_frame()).upserve().inject(1, arp(2, A_IP, dst_mac=B, tha=B)))


def _raw(mode: int = 0, log2: int = 3, **ring) -> Prog:
    return Prog().rawring(1, mode, log2, **ring)


def _raw_split_seeds() -> dict[str, Prog]:
    def one(p: Prog = None, **desc) -> Prog:  # one buffer, made available
        return (p or _raw()).rawdesc(1, 0, **desc).rawavail(1, 0)

    s: dict[str, Prog] = {}
    s["raw-split-valid"] = _raw().rawdesc(1, 0, 4, length=2048)
    for head in range(4):
        s["raw-split-valid"].rawavail(1, head)
    s["raw-desc-out-of-memory"] = one(kind=NO_MEMORY, off=0x2000)
    s["raw-desc-top-of-space"] = one(kind=NO_MEMORY, off=2 * 100 + 1, length=4096)
    s["raw-desc-straddles-region-end"] = one(kind=REGION_END, off=100)
    s["raw-desc-loop"] = one(flags=WRITE | NEXT, nxt=0)
    s["raw-desc-next-out-of-range"] = one(flags=WRITE | NEXT, nxt=100)
    s["raw-head-out-of-range"] = _raw().rawdesc(1, 0).rawavail(1, 9999)
    s["raw-avail-idx-jump"] = _raw().rawdesc(1, 0).rawavail(1, 0, delta=1000)
    s["raw-zero-length"] = one(length=0)
    s["raw-too-short"] = one(length=8)
    s["raw-device-readable"] = one(flags=0)
    s["raw-indirect-out-of-range"] = one(_raw(INDIRECT), kind=NO_MEMORY, length=32, flags=INDIRECT_F)
    s["raw-indirect-bad-len"] = one(_raw(INDIRECT), off=0x8000, length=17, flags=INDIRECT_F)
    s["raw-indirect-nested"] = one(_raw(INDIRECT).rawdesc(1, 0x8000 | 0x800, flags=INDIRECT_F),
                                   off=0x8000, length=16, flags=INDIRECT_F)
    s["raw-indirect-valid"] = one(_raw(INDIRECT).rawdesc(1, 0x8000 | 0x800, length=1024,
                                                         flags=WRITE | NEXT, nxt=1)
                                  .rawdesc(1, 0x8000 | 0x801, off=RAW_BUF + 1024, length=1024),
                                  off=0x8000, length=32, flags=INDIRECT_F)
    s["raw-indirect-not-negotiated"] = one(off=0x8000, length=32, flags=INDIRECT_F)
    s["raw-used-outside-memory"] = one(_raw(USED_IN_HOLE))
    s["raw-used-at-region-end"] = one(_raw(USED_AT_END))
    s["raw-rings-in-tx-buffers"] = one(_raw(RINGS_IN_TX))
    # Buffers over the descriptor table, the avail ring, the used ring: the
    # frame's own bytes become the ring.
    s["raw-buffer-over-desc-table"] = _raw().rawdesc(1, 0, 4, off=0, length=64)
    s["raw-buffer-over-avail-ring"] = _raw().rawdesc(1, 0, 2, off=RAW_AVAIL, length=1024)
    s["raw-buffer-over-used-ring"] = _raw().rawdesc(1, 0, 2, off=RAW_USED, length=1024)
    for name in ("raw-buffer-over-desc-table", "raw-buffer-over-avail-ring", "raw-buffer-over-used-ring"):
        for head in range(4):
            s[name].rawavail(1, head)
    # One VM, two NICs: port 1's RX buffer is port 0's TX buffer (64 bytes
    # on, so that the fast path's copy reads and writes overlapping bytes).
    s["raw-buffer-in-tx-buffers"] = one(kind=TX_BUFS, off=64, length=4096)
    s["raw-event-idx"] = one(_raw(EVT)).rawwrite(1, RAW_AVAIL + 4 + 2 * 8, b"\x00\x00")
    return s


def _raw_packed_seeds() -> dict[str, Prog]:
    avail = WRITE | P_AVAIL

    def one(mode: int = 0, log2: int = 3, **desc) -> Prog:
        desc.setdefault("flags", avail)
        return _raw(PACKED | mode, log2).rawdesc(1, 0, **desc)

    s: dict[str, Prog] = {}
    s["raw-packed-valid"] = one(count=4)
    s["raw-packed-next-not-available"] = one(flags=avail | NEXT)
    s["raw-packed-id-out-of-range"] = one(nxt=99)
    s["raw-packed-loop"] = one(count=8, flags=avail | NEXT)
    s["raw-packed-out-of-memory"] = one(kind=NO_MEMORY, off=0x2000)
    s["raw-packed-zero-length"] = one(length=0)
    s["raw-packed-too-short"] = one(length=8)
    s["raw-packed-indirect-out-of-range"] = one(INDIRECT, kind=NO_MEMORY, length=32,
                                                flags=P_AVAIL | INDIRECT_F)
    s["raw-packed-indirect-valid"] = (one(INDIRECT, off=0x8000, length=32, flags=P_AVAIL | INDIRECT_F)
                                      .rawdesc(1, 0x8000 | 0x800, 2, length=1024, flags=WRITE))
    s["raw-packed-used-at-region-end"] = one(USED_AT_END, count=4)
    s["raw-packed-in-tx-buffers"] = _raw(PACKED | RINGS_IN_TX).rawdesc(1, 0, 2, flags=avail)
    # A ring of 2 that wraps: the second lap's descriptors carry wrap counter
    # 0 (AVAIL clear, USED set), and the driver asks for a call at slot 1.
    s["raw-packed-wrap-event-idx"] = _hit(one(EVT, log2=1, count=2)).rawdesc(
        1, 0, 2, flags=WRITE | 1 << 15).rawavail(1, 1 | 0x8000, 2)
    s["raw-packed-merged-buffers"] = one(count=8, length=64)
    return s


def _hostile_seeds() -> dict[str, Prog]:
    seeds = {**_raw_split_seeds(), **_raw_packed_seeds()}
    return {name: _hit(p) for name, p in seeds.items()}


def _all_seeds() -> dict[str, Prog]:
    return {**_seeds(), **_uplink_seeds(), **_inject_seeds(), **_pair_seeds(), **_hostile_seeds()}


SEEDS = _all_seeds()

# What a seed must do, as the harness counts it (FUZZ_NET_STATS=1: frames
# read back per source, uplink datagrams read, inject results, hostile
# rings attached or refused, ring faults by NITRO_FAULT_* number, frames in
# per port; "faults" is their sum). Checked by tests/fuzz/test_fuzz.py.
AVAIL_IDX, DESC_INDEX, DESC_ADDR, DESC_LOOP, BAD_INDIRECT, REQUEST = 1, 2, 3, 4, 5, 7


def _fault(kind: int) -> dict[str, int]:
    return {"raw_attached": 1, f"fault_{kind}": 1, "faults": 1}


def _clean(frames: int) -> dict[str, int]:
    return {"raw_attached": 1, "faults": 0, "in_1": frames}


EXPECT: dict[str, dict[str, int]] = {
    "needs-csum-on-the-icmp6-type": {"tx_chains": 1, "rx_tx": 0},
    "needs-csum-on-the-icmp6-type-behind-destopt": {"tx_chains": 1, "rx_tx": 0},
    "uplink-to-peer": {"up_read": 1, "rx_uplink": 1},
    "uplink-flood": {"up_read": 1, "rx_uplink": 3},
    "uplink-other-vpc": {"up_read": 2, "rx_uplink": 1, "in_2": 0},
    "uplink-bad-datagrams": {"up_read": 5, "rx_uplink": 1},
    "uplink-absent": {"up_read": 0, "rx_uplink": 0, "in_1": 0},
    "uplink-max-frame-merged": {"rx_uplink": 1},
    "uplink-many": {"up_read": 6, "rx_uplink": 6},
    "uplink-and-tx-interleaved": {"rx_tx": 1, "rx_uplink": 1},
    "inject-arp-reply": {"inject_1": 1, "rx_inject": 1},
    "inject-no-ring": {"inject_0": 1},
    "inject-no-buffers": {"inject_0": 1},
    "inject-bad-lengths": {"inject_arg": 3, "inject_1": 1, "rx_inject": 1},
    "inject-pair-1": {"inject_1": 1, "rx_inject": 1},
    "inject-over-mtu": {"inject_1": 1, "rx_inject": 1},
    "pairs-spread-by-sender": {"tx_chains": 2, "rx_tx": 2, "in_0": 1, "in_1": 1},
    "pairs-gap": {"rx_tx": 1},
    "pairs-full-ring-no-spill": {"tx_chains": 3, "rx_tx": 1},
    "pairs-tx-on-pair-1": {"tx_chains": 1, "rx_tx": 1},
    "pairs-tx-several-rings": {"tx_chains": 4, "rx_tx": 5},
    "pairs-other-vpc-sender": {"tx_chains": 1, "rx_tx": 0},
    "pairs-fast-path-batch": {"tx_chains": 8, "rx_tx": 8},
    "pairs-detach-between-serves": {"tx_chains": 3, "rx_tx": 2},
    "raw-split-valid": _clean(4),
    "raw-desc-out-of-memory": _fault(DESC_ADDR),
    "raw-desc-top-of-space": _fault(DESC_ADDR),
    "raw-desc-straddles-region-end": _fault(DESC_ADDR),
    "raw-desc-loop": _fault(DESC_LOOP),
    "raw-desc-next-out-of-range": _fault(DESC_INDEX),
    "raw-head-out-of-range": _fault(DESC_INDEX),
    "raw-avail-idx-jump": _fault(AVAIL_IDX),
    "raw-zero-length": _fault(REQUEST),
    "raw-too-short": _fault(REQUEST),
    "raw-device-readable": _fault(REQUEST),
    "raw-indirect-out-of-range": _fault(BAD_INDIRECT),
    "raw-indirect-bad-len": _fault(BAD_INDIRECT),
    "raw-indirect-nested": _fault(BAD_INDIRECT),
    "raw-indirect-not-negotiated": _fault(BAD_INDIRECT),
    "raw-indirect-valid": _clean(1),
    "raw-used-outside-memory": {"raw_refused": 1, "raw_attached": 0},
    "raw-used-at-region-end": {"raw_refused": 1, "raw_attached": 0},
    "raw-rings-in-tx-buffers": _clean(1),
    "raw-buffer-over-desc-table": _fault(DESC_ADDR),
    "raw-buffer-over-avail-ring": _clean(4),
    "raw-buffer-over-used-ring": _fault(REQUEST),
    "raw-buffer-in-tx-buffers": _clean(1),
    "raw-event-idx": _clean(1),
    "raw-packed-valid": _clean(4),
    "raw-packed-next-not-available": _fault(AVAIL_IDX),
    "raw-packed-id-out-of-range": _fault(DESC_INDEX),
    "raw-packed-loop": _fault(DESC_LOOP),
    "raw-packed-out-of-memory": _fault(DESC_ADDR),
    "raw-packed-zero-length": _fault(REQUEST),
    "raw-packed-too-short": _fault(REQUEST),
    "raw-packed-indirect-out-of-range": _fault(BAD_INDIRECT),
    "raw-packed-indirect-valid": _clean(1),
    "raw-packed-used-at-region-end": _clean(4),
    "raw-packed-in-tx-buffers": _clean(2),
    "raw-packed-wrap-event-idx": _clean(4),
    "raw-packed-merged-buffers": _clean(3),
}


def build() -> dict[str, bytes]:
    return {name: p.encode() for name, p in SEEDS.items()}


def main() -> None:
    out = HERE / "corpus" / "net"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("seed-*"):
        old.unlink()
    for name, data in build().items():
        (out / f"seed-{name}").write_bytes(data)
    print(f"{len(SEEDS)} seeds in {out}")


if __name__ == "__main__":
    main()
