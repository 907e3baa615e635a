"""Seed corpus for the ``net`` fuzz target (tests/fuzz/fuzz_net.c).

    python -m tests.fuzz.netseeds     # rewrites tests/fuzz/corpus/net/seed-*

The input format is described at the top of fuzz_net.c; `Prog` writes it.
Frames are built by hand with struct (no scapy) so the bytes never change
with a library version. Each seed aims at one path of the TX pipeline:
plain forwarding, each punted control frame, flooding, the uplink, TSO
super-frames (IPv4/IPv6, options, small and large gso_size, passed through
or segmented), NEEDS_CSUM at various offsets, VLAN tags, short and oversize
chains, RX buffers that are too small, split or missing, rate limits,
feature changes and RX ring resets between serves.
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
GSO_TCPV4, GSO_TCPV6 = 1, 4


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

    def rxbuf(self, port: int, count: int, size: int, cut: int = 0) -> Prog:
        self.b += struct.pack("<BBBHH", 2, port - 1, count, size - 1, cut)
        return self

    def feat(self, port: int, features: int) -> Prog:
        self.b += struct.pack("<BBB", 3, port, features)
        return self

    def rxreset(self, port: int) -> Prog:
        self.b += struct.pack("<BB", 4, port - 1)
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


def udp4_frame(dst_mac: bytes = B, dst: bytes = B_IP, payload: bytes = b"hello") -> bytes:
    u = udp(1234, 5678, payload)
    return eth(dst_mac, A, 0x0800) + ipv4(17, len(u), dst=dst) + u


def icmp_echo(dst: bytes = GW_IP, dst_mac: bytes = GW) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return eth(dst_mac, A, 0x0800) + ipv4(1, len(body), dst=dst) + body


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


SEEDS = _seeds()


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
