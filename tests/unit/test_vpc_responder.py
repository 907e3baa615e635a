"""The sans-IO VPC responders against scapy-built frames."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from nitro.vpc import VpcResponder, gateway_mac
from nitro.vpc import packets as pk
from nitro.vpc.responder import Lease

A_MAC, B_MAC, UP_MAC = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "02:00:00:00:00:fe"
GW = ipaddress.IPv4Address("10.0.0.1")


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def responder(clock=None) -> VpcResponder:
    r = VpcResponder("blue", ipaddress.IPv4Network("10.0.0.0/24"), GW, mtu=1400,
                     dns=(ipaddress.IPv4Address("10.0.0.53"),), lease_seconds=600,
                     clock=clock or Clock())
    r.add_interface(0, pk.mac_bytes(A_MAC), ipaddress.IPv4Address("10.0.0.10"))
    r.add_interface(1, pk.mac_bytes(B_MAC), ipaddress.IPv4Address("10.0.0.11"))
    r.set_uplink(ipaddress.IPv4Address("10.0.0.254"), pk.mac_bytes(UP_MAC))
    return r


def arp_request(target: str, src_mac=A_MAC, src_ip="10.0.0.10") -> bytes:
    return bytes(Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=src_mac, psrc=src_ip, pdst=target))


def test_arp_for_gateway_peer_and_uplink():
    r = responder()
    gw = pk.mac_text(gateway_mac("blue"))
    for target, want in (("10.0.0.1", gw), ("10.0.0.11", B_MAC), ("10.0.0.254", UP_MAC)):
        (reply,) = r.handle(0, arp_request(target))
        p = Ether(reply)
        assert p.dst == A_MAC and p.src == want
        assert p[ARP].op == 2 and p[ARP].hwsrc == want and p[ARP].psrc == target
        assert p[ARP].hwdst == A_MAC and p[ARP].pdst == "10.0.0.10"
    assert r.counters["arp_replies"] == 3


def test_arp_unknown_own_and_replies_are_ignored():
    r = responder()
    assert r.handle(0, arp_request("10.0.0.77")) == []
    assert r.handle(0, arp_request("10.0.0.10")) == []  # duplicate address detection
    assert r.handle(0, arp_request("10.0.0.10", src_ip="0.0.0.0")) == []
    reply = bytes(Ether(src=A_MAC, dst=B_MAC) / ARP(op=2, hwsrc=A_MAC, psrc="10.0.0.10", pdst="10.0.0.11"))
    assert r.handle(0, reply) == []
    assert r.handle(9, arp_request("10.0.0.1")) == []  # not an interface of this VPC
    assert r.counters["arp_ignored"] == 4


def dhcp(msg_type: str, mac=A_MAC, ciaddr="0.0.0.0", src="0.0.0.0", dst="255.255.255.255", **opts) -> bytes:
    options = [("message-type", msg_type)] + list(opts.items()) + ["end"]
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=src, dst=dst) / UDP(sport=68, dport=67)
                 / BOOTP(chaddr=pk.mac_bytes(mac) + bytes(10), xid=0x1234, ciaddr=ciaddr, flags=0x8000)
                 / DHCP(options=options))


def opts(p) -> dict:
    return {o[0]: o[1:] if len(o) > 2 else o[1] for o in p[DHCP].options if isinstance(o, tuple)}


def test_dhcp_discover_offer_request_ack():
    r = responder()
    (offer,) = r.handle(0, dhcp("discover"))
    p = Ether(offer)
    assert p.dst == A_MAC and p[IP].src == "10.0.0.1" and p[IP].dst == "255.255.255.255"
    assert p[UDP].sport == 67 and p[UDP].dport == 68
    assert p[BOOTP].op == 2 and p[BOOTP].yiaddr == "10.0.0.10" and p[BOOTP].xid == 0x1234
    o = opts(p)
    assert o["message-type"] == 2 and o["server_id"] == "10.0.0.1"
    assert o["subnet_mask"] == "255.255.255.0" and o["router"] == "10.0.0.1"
    assert o["lease_time"] == 600 and o["interface-mtu"] == 1400 and o["name_server"] == "10.0.0.53"
    # checksums scapy recomputes must match what we sent
    assert IP(bytes(p[IP])).chksum == p[IP].chksum
    rebuilt = Ether(bytes(p))
    del rebuilt[UDP].chksum
    assert Ether(bytes(rebuilt))[UDP].chksum == p[UDP].chksum

    (ack,) = r.handle(0, dhcp("request", requested_addr="10.0.0.10", server_id="10.0.0.1"))
    a = Ether(ack)
    assert opts(a)["message-type"] == 5 and a[BOOTP].yiaddr == "10.0.0.10"
    assert r.statistics()["leases"][0]["state"] == "bound"


def test_dhcp_request_for_another_address_is_naked():
    r = responder()
    (nak,) = r.handle(0, dhcp("request", requested_addr="10.0.0.11"))
    p = Ether(nak)
    assert opts(p)["message-type"] == 6 and p[BOOTP].yiaddr == "0.0.0.0"
    assert r.counters["dhcp_naks"] == 1


def test_dhcp_renewal_is_unicast_and_extends_the_lease():
    clock = Clock()
    r = responder(clock)
    r.handle(0, dhcp("request", requested_addr="10.0.0.10"))
    clock.t += 400
    (ack,) = r.handle(0, dhcp("request", ciaddr="10.0.0.10", src="10.0.0.10", dst="10.0.0.1"))
    p = Ether(ack)
    assert opts(p)["message-type"] == 5 and p[IP].dst == "10.0.0.10"
    assert r.statistics()["leases"][0] == {"state": "bound", "expires_in": 600}


def test_dhcp_release_other_server_and_foreign_chaddr():
    r = responder()
    r.handle(0, dhcp("request", requested_addr="10.0.0.10"))
    assert r.handle(0, dhcp("release", ciaddr="10.0.0.10", server_id="10.0.0.1")) == []
    assert r.statistics()["leases"][0]["state"] == "released"
    assert r.handle(0, dhcp("request", requested_addr="10.0.0.10", server_id="10.9.9.9")) == []
    assert r.handle(0, dhcp("discover", mac=B_MAC)) == []  # chaddr is not port 0's MAC
    assert r.handle(0, b"\x00" * 20) == []


def test_icmp_echo_to_gateway():
    r = responder()
    req = bytes(Ether(src=A_MAC, dst=pk.mac_text(gateway_mac("blue")))
                / IP(src="10.0.0.10", dst="10.0.0.1") / ICMP(type=8, id=7, seq=3) / b"payload!")
    (reply,) = r.handle(0, req)
    p = Ether(reply)
    assert p.dst == A_MAC and p[IP].src == "10.0.0.1" and p[IP].dst == "10.0.0.10"
    assert p[ICMP].type == 0 and p[ICMP].id == 7 and p[ICMP].seq == 3 and bytes(p[ICMP].payload) == b"payload!"
    assert pk.checksum(bytes(p[ICMP])) == 0 and pk.checksum(bytes(p[IP])[:20]) == 0
    udp = bytes(Ether(src=A_MAC) / IP(src="10.0.0.10", dst="10.0.0.1") / UDP(dport=53) / b"x")
    assert r.handle(0, udp) == []
    assert r.counters == r.counters | {"icmp_echo_replies": 1, "gateway_ignored": 1}


def test_dhcp_foreign_ciaddr_is_never_a_destination():
    r = responder()
    # A renewal claiming someone else's address: NAKed, by broadcast.
    (nak,) = r.handle(0, dhcp("request", ciaddr="10.0.0.11", src="0.0.0.0"))
    p = Ether(nak)
    assert opts(p)["message-type"] == 6 and p[IP].dst == "255.255.255.255"
    # Even with the right requested address (a contradictory message).
    (nak,) = r.handle(0, dhcp("request", ciaddr="192.168.7.7", requested_addr="10.0.0.10"))
    assert opts(Ether(nak))["message-type"] == 6 and Ether(nak)[IP].dst == "255.255.255.255"
    # INFORM / DISCOVER with a foreign ciaddr: no answer at all.
    assert r.handle(0, dhcp("inform", ciaddr="10.0.0.99")) == []
    assert r.handle(0, dhcp("discover", ciaddr="8.8.8.8")) == []
    assert r.counters["dhcp_naks"] == 2 and r.counters["dhcp_ignored"] == 2
    assert 0 not in r.statistics()["leases"]
    # The interface's own address is unicast as before.
    (ack,) = r.handle(0, dhcp("inform", ciaddr="10.0.0.10", src="10.0.0.10"))
    assert Ether(ack)[IP].dst == "10.0.0.10" and Ether(ack)[BOOTP].ciaddr == "10.0.0.10"


def test_many_dns_servers_are_split_into_long_options():
    servers = tuple(ipaddress.IPv4Address(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(70))
    r = VpcResponder("blue", ipaddress.IPv4Network("10.0.0.0/24"), GW, dns=servers, clock=Clock())
    r.add_interface(0, pk.mac_bytes(A_MAC), ipaddress.IPv4Address("10.0.0.10"))
    (offer,) = r.handle(0, dhcp("discover"))
    payload = bytes(Ether(offer)[UDP].payload)
    msg = pk.Dhcp.parse(payload)
    assert msg is not None and msg.msg_type == pk.OFFER
    assert msg.options[pk.OPT_DNS] == b"".join(s.packed for s in servers)  # RFC 3396 concatenation
    # Each instance holds whole addresses: 63 + 7.
    i, lengths = 240, []
    while payload[i] != pk.OPT_END:
        if payload[i] == pk.OPT_DNS:
            lengths.append(payload[i + 1])
        i += 2 + payload[i + 1]
    assert lengths == [252, 28]


def test_encode_option():
    assert pk.encode_option(6, b"\1\2\3\4") == b"\6\4\1\2\3\4"
    assert pk.encode_option(12, b"") == b"\x0c\0"
    long = bytes(range(256)) * 2
    encoded = pk.encode_option(43, long)
    assert encoded[:2] == b"\x2b\xff" and encoded[257:259] == b"\x2b\xff" and encoded[514:516] == b"\x2b\x02"
    assert len(encoded) == 512 + 6
    with pytest.raises(ValueError, match="whole number of 4-byte items"):
        pk.encode_option(6, b"\1\2\3", unit=4)
    with pytest.raises(ValueError, match="option code"):
        pk.encode_option(255, b"")


def test_arp_lookup_by_address_many_interfaces():
    r = responder()
    for port in range(2, 200):
        r.add_interface(port, bytes([2, 0, 0, 0, port >> 8, port & 0xFF]), ipaddress.IPv4Address(f"10.0.0.{port + 20}"))
    (reply,) = r.handle(0, arp_request("10.0.0.219"))
    assert Ether(reply)[ARP].hwsrc == "02:00:00:00:00:c7"
    assert r.handle(199, arp_request("10.0.0.219", src_mac="02:00:00:00:00:c7", src_ip="10.0.0.219")) == []


def test_lease_and_statistics_from_another_thread():
    """statistics()/lease() run on the metrics thread while the trio thread
    adds and replaces leases: never 'dictionary changed size'."""
    r = responder()
    for port in range(2, 256):
        r.add_interface(port, bytes([2, 0, 0, 0, 1, port]), ipaddress.IPv4Address(f"10.0.0.{port}"))
    assert r.lease(0) is None
    errors = []
    stop = threading.Event()

    def scrape():
        try:
            while not stop.is_set():
                r.statistics()
                r.lease(7)
        except Exception as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=scrape)
    t.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for port in range(2, 256):
                r.leases[port] = Lease("offered", 0)
            r.leases.clear()
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert errors == []
    r.handle(0, dhcp("discover"))
    assert r.lease(0) == {"state": "offered", "expires_in": 60}
