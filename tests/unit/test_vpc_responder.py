"""The sans-IO VPC responders against scapy-built frames."""

from __future__ import annotations

import ipaddress

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from nitro.vpc import VpcResponder, gateway_mac
from nitro.vpc import packets as pk

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
