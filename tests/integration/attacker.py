"""A hostile tenant: vhost-user frontends (Python, no guest) that attack
the daemon the way a compromised guest or a hostile QEMU could (issue 11).

Used by the headline system test (tests/system/test_tenant.py) and by the
tenant benchmark (bench/tenant.py). Each attack runs for a while and
returns what it did; which counter must move is the caller's to check
(`counter_of`), since the point is that the daemon says what it refused.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from tests.integration.frontend import GPA_BASE, Frontend
from tests.integration.test_daemon_net import NetFrontend
from tests.ringlayout import VIRTIO_BLK_T_OUT, net_hdr

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_TCPV4 = 1
TX_RING = 1  # a virtio-net device's vring 1 is its first TX queue
SLOT = 1 << 16  # guest memory per TX slot: a whole super-frame fits


ATTACKER_MAC, ATTACKER_IP = "52:54:00:00:00:66", "10.0.0.66"
VICTIM_IP = "10.0.0.10"


def tenant_config(victim_mac: str, victim_disk: str = "64M") -> str:
    """nitro's config for a victim (disk vvol, interface vnet) and an
    attacker (disk avol, interface anet) on one VPC."""
    return f"""
[[blk]]
id = "vvol"
size = "{victim_disk}"

[[blk]]
id = "avol"
size = "16M"

[[vpc]]
id = "blue"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"

[[net]]
id = "vnet"
vpc = "blue"
mac = "{victim_mac}"
ip = "{VICTIM_IP}"

[[net]]
id = "anet"
vpc = "blue"
mac = "{ATTACKER_MAC}"
ip = "{ATTACKER_IP}"
"""


def arp_request(mac: str, ip: str, target: str) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip, pdst=target))


def dhcp_discover(mac: str, xid: int) -> bytes:
    chaddr = bytes(int(x, 16) for x in mac.split(":")) + bytes(10)
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000,
                        bytes(4), bytes(4), bytes(4), bytes(4), chaddr, bytes(64), bytes(128))
    options = b"\x63\x82\x53\x63" + b"\x35\x01\x01" + b"\xff"
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / (bootp + options))


def tiny_mss_super_frame(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str,
                         payload: int = 60000, mss: int = 1) -> bytes:
    """virtio_net_hdr + a TCP super-frame asking to be cut into `payload /
    mss` segments: tens of thousands of frames for every receiver."""
    frame = bytes(Ether(src=src_mac, dst=dst_mac) / IP(src=src_ip, dst=dst_ip)
                  / TCP(sport=4000, dport=5001, flags="PA") / bytes(payload))
    l4 = 14 + 20
    return net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, l4 + 20, mss, l4, 16) + frame


class NetAttacker(NetFrontend):
    """A frontend that only ever transmits: its TX ring, as fast as Python goes."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, num=16)
        self.start_vring(TX_RING)

    def send_for(self, frames: Callable[[int], bytes], seconds: float) -> int:
        """Transmit frames(i) for i = 0, 1, ... for `seconds`, a ring's worth
        per kick; returns how many the device took."""
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for slot in range(self.num):
                data = frames(sent + slot)
                gpa = GPA_BASE + self.data + SLOT * slot
                self.write(gpa, data)
                self.write_desc(slot, gpa, len(data), 0)
                self.publish(slot, kick=slot == self.num - 1)
            self.wait_used(self.num, timeout=10)
            sent += self.num
        return sent


def flood_link_local(sock: Path | str, mac: str, ip: str, seconds: float) -> int:
    """ARP requests and DHCP discovers, alternating, to nitro's services."""
    frames = [bytes(12) + (arp_request(mac, ip, f"10.0.0.{i + 20}") if i % 2 else dhcp_discover(mac, i))
              for i in range(64)]
    with NetAttacker(sock) as a:
        return a.send_for(lambda i: frames[i % len(frames)], seconds)


def tiny_mss_tso(sock: Path | str, mac: str, ip: str, victim_mac: str, victim_ip: str,
                 seconds: float) -> int:
    frame = tiny_mss_super_frame(mac, ip, victim_mac, victim_ip)
    with NetAttacker(sock) as a:
        return a.send_for(lambda i: frame, seconds)


def kick_storm(sock: Path | str, seconds: float) -> int:
    """Kicks with nothing behind them, as fast as a thread can write an eventfd."""
    n = 0
    with Frontend(sock) as fe:
        fe.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(1000):
                os.eventfd_write(fe.kick, 1)
            n += 1000
    return n


def blocking_call_eventfd(sock: Path | str, requests: int = 3) -> int:
    """Hand a call eventfd that is blocking and one below saturation: a
    write of 1 by the device would block forever (nitro makes it
    non-blocking when it takes it). Returns the requests completed."""
    with Frontend(sock) as fe:
        os.close(fe.call)
        fe.call = os.eventfd(0, os.EFD_CLOEXEC)
        os.eventfd_write(fe.call, 0xFFFF_FFFF_FFFF_FFFE)
        fe.start()
        done = 0
        for i in range(requests):
            status, _ = fe.blk_request(VIRTIO_BLK_T_OUT, i * 8, data=bytes([i]) * 4096)
            done += status == 0
        return done


def jammed_call_eventfd(sock: Path | str) -> int:
    """Take back the call eventfd nitro made non-blocking (the frontend
    shares its file description), park its counter one below saturation and
    complete a request: nitro's call after it would sleep in write() for
    good. Stays connected while nitro cuts that write short (its device
    breaks, fault "eventfd"). Returns the requests completed (1)."""
    with Frontend(sock) as fe:
        fe.start()
        fe.get_config()  # a round trip: nitro holds the call fd
        os.set_blocking(fe.call, True)
        os.eventfd_write(fe.call, 0xFFFF_FFFF_FFFF_FFFE)
        status, _ = fe.blk_request(VIRTIO_BLK_T_OUT, 0, data=b"j" * 4096)
        time.sleep(0.2)
        return int(status == 0)


def truncate_memory(sock: Path | str, until: Callable[[], bool], timeout: float = 10) -> bool:
    """Start a queue, shrink the shared guest memory to nothing, kick: the
    device's next read of the ring is past the end of the file (SIGBUS).
    Stays connected until until() (e.g. the device is broken) or timeout;
    returns until()'s last answer."""
    with Frontend(sock) as fe:
        fe.start()
        fe.get_config()
        os.ftruncate(fe.memfd, 0)
        os.eventfd_write(fe.kick, 1)
        deadline = time.monotonic() + timeout
        while not (done := until()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return done


def counter_of(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a Prometheus text page whose
    labels include `labels` (0 if none)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in metrics.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and want <= set((m.group(2) or "").split(",")):
            total += float(m.group(3))
    return total
