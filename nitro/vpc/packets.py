"""Just enough Ethernet/ARP/IPv4/UDP/ICMP/DHCP to parse and build the
control frames nitro answers (RFC 826, 791, 768, 792, 2131, 2132).

Parsers return None for anything malformed: a guest's bad frame is ignored,
never an exception in the daemon.
"""

from __future__ import annotations

import dataclasses
import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DHCP_MAGIC = b"\x63\x82\x53\x63"


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def mac_text(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def checksum(data: bytes) -> int:
    """RFC 1071 internet checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


@dataclasses.dataclass(frozen=True)
class Arp:
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes

    @classmethod
    def parse(cls, frame: bytes) -> Arp | None:
        if len(frame) < 42 or frame[12:14] != b"\x08\x06":
            return None
        htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
        if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
            return None
        return cls(op, frame[22:28], frame[28:32], frame[32:38], frame[38:42])

    def build(self, eth_dst: bytes) -> bytes:
        body = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, self.op) + self.sha + self.spa + self.tha + self.tpa
        return ethernet(eth_dst, self.sha, ETH_P_ARP, body)


@dataclasses.dataclass(frozen=True)
class Ipv4:
    src: bytes
    dst: bytes
    proto: int
    ttl: int
    payload: bytes

    @classmethod
    def parse(cls, frame: bytes) -> Ipv4 | None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
            return None
        ihl = (frame[14] & 0xF) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        if ihl < 20 or total < ihl or 14 + total > len(frame):
            return None
        if struct.unpack("!H", frame[20:22])[0] & 0x3FFF:
            return None  # fragments: not for the control plane
        return cls(frame[26:30], frame[30:34], frame[23], frame[22], frame[14 + ihl:14 + total])

    def build(self) -> bytes:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(self.payload), 0, 0x4000,
                          self.ttl, self.proto, 0, self.src, self.dst)
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        return hdr + self.payload


def udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, data: bytes) -> bytes:
    length = 8 + len(data)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    c = checksum(pseudo + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def parse_udp(ip: Ipv4) -> tuple[int, int, bytes] | None:
    if ip.proto != IPPROTO_UDP or len(ip.payload) < 8:
        return None
    sport, dport, length = struct.unpack("!HHH", ip.payload[:6])
    if length < 8 or length > len(ip.payload):
        return None
    return sport, dport, ip.payload[8:length]


# DHCP message types (RFC 2132 9.6).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_MTU = 1, 3, 6, 26
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MSG_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_RENEWAL, OPT_REBINDING, OPT_END, OPT_PAD = 58, 59, 255, 0
OPTION_MAX = 255  # an option's length is one byte
# Options that are lists of fixed-size items: split between items, not inside one.
OPTION_UNITS = {OPT_ROUTER: 4, OPT_DNS: 4}


def encode_option(code: int, value: bytes, unit: int = 1) -> bytes:
    """One option as code, length, value. A value longer than 255 bytes is
    split into several instances of the same code (RFC 3396 long options;
    the receiver concatenates them, as :meth:`Dhcp.parse` does), each a whole
    number of ``unit``-byte items so that a client that does not concatenate
    still reads a valid list (e.g. ``unit=4`` for addresses)."""
    if not 0 < code < OPT_END:
        raise ValueError(f"DHCP option code {code} is not 1..254")
    if not 0 < unit <= OPTION_MAX or len(value) % unit:
        raise ValueError(f"DHCP option {code}: {len(value)} bytes is not a whole number of {unit}-byte items")
    step = OPTION_MAX - OPTION_MAX % unit
    chunks = [value[i:i + step] for i in range(0, len(value), step)] or [b""]
    return b"".join(bytes([code, len(c)]) + c for c in chunks)


@dataclasses.dataclass(frozen=True)
class Dhcp:
    op: int
    xid: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    chaddr: bytes
    options: dict[int, bytes]

    @property
    def msg_type(self) -> int | None:
        v = self.options.get(OPT_MSG_TYPE)
        return v[0] if v and len(v) == 1 else None

    @classmethod
    def parse(cls, data: bytes) -> Dhcp | None:
        if len(data) < 240 or data[236:240] != DHCP_MAGIC or data[1] != 1 or data[2] != 6:
            return None
        op, _htype, _hlen, _hops, xid, _secs, flags = struct.unpack("!BBBBIHH", data[:12])
        options: dict[int, bytes] = {}
        i = 240
        while i < len(data):
            code = data[i]
            if code == OPT_END:
                break
            if code == OPT_PAD:
                i += 1
                continue
            if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
                return None
            n = data[i + 1]
            options[code] = options.get(code, b"") + data[i + 2:i + 2 + n]
            i += 2 + n
        return cls(op, xid, flags, data[12:16], data[16:20], data[28:34], options)

    def build(self, siaddr: bytes = b"\0" * 4) -> bytes:
        head = struct.pack("!BBBBIHH", self.op, 1, 6, 0, self.xid, 0, self.flags)
        body = (head + self.ciaddr + self.yiaddr + siaddr + b"\0" * 4
                + self.chaddr + b"\0" * 10 + b"\0" * 192 + DHCP_MAGIC)
        for code, value in self.options.items():
            body += encode_option(code, value, OPTION_UNITS.get(code, 1))
        body += bytes([OPT_END])
        return body + b"\0" * max(0, 300 - len(body))  # BOOTP minimum size
