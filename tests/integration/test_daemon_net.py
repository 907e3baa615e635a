"""virtio-net on the real daemon, driven by the Python vhost-user frontend:
a guest that breaks its RX ring gets its device broken (not the daemon, not
the sender), even though that ring is only ever touched by other threads."""

from __future__ import annotations

import os
import struct
import time

import pytest

from nitro.vhost.protocol import U64, MemoryRegion, MemoryTable, Request, VringAddr, VringFd, VringState
from nitro.vhost.protocol import ProtocolFeature as PF
from tests.integration.frontend import GPA_BASE, MEM_SIZE, Frontend

pytestmark = pytest.mark.integration

A_MAC, B_MAC = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
CONFIG = f"""
[[vpc]]
id = "blue"
cidr = "10.0.0.0/24"
gateway = "10.0.0.1"
[[net]]
id = "a"
vpc = "blue"
mac = "{A_MAC}"
ip = "10.0.0.10"
[[net]]
id = "b"
vpc = "blue"
mac = "{B_MAC}"
ip = "10.0.0.11"
"""


class NetFrontend(Frontend):
    """Frontend.start() brings up vring 0; a net device's TX ring is vring 1."""

    def start_vring(self, index: int) -> None:
        features = self.call_u64(Request.GET_FEATURES) & self.features_mask
        pf = self.call_u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(pf & int(PF.REPLY_ACK | PF.MQ)))
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, U64(features), need_reply=True)
        self.ack(Request.SET_FEATURES)
        region = MemoryRegion(GPA_BASE, MEM_SIZE, self.uaddr, 0)
        self.send(Request.SET_MEM_TABLE, MemoryTable((region,)), fds=[self.memfd], need_reply=True)
        self.ack(Request.SET_MEM_TABLE)
        self.send(Request.SET_VRING_NUM, VringState(index, self.num))
        self.send(Request.SET_VRING_BASE, VringState(index, 0))
        self.send(Request.SET_VRING_ADDR, VringAddr(
            index, 0, self.uaddr + self.desc, self.uaddr + self.used, self.uaddr + self.avail, 0))
        self.send(Request.SET_VRING_CALL, VringFd(index), fds=[self.call])
        self.send(Request.SET_VRING_KICK, VringFd(index), fds=[self.kick])
        self.send(Request.SET_VRING_ENABLE, VringState(index, 1), need_reply=True)
        self.ack(Request.SET_VRING_ENABLE)


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def _icmp_a_to_b() -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 1, 0,
                     bytes([10, 0, 0, 10]), bytes([10, 0, 0, 11]))
    return _mac(B_MAC) + _mac(A_MAC) + b"\x08\x00" + ip + b"\x08\x00\xf7\xff\x00\x00\x00\x00"


def _send(a: NetFrontend, frame: bytes, slot: int) -> None:
    """One frame on A's TX ring (descriptor slot % num), waited for."""
    gpa = GPA_BASE + a.data + 4096 * (slot % a.num)
    a.write(gpa, frame)
    a.write_desc(slot % a.num, gpa, len(frame), 0)
    a.publish(slot % a.num)
    a.wait_used(1)


def _send_until(n, a: NetFrontend, frame: bytes, line: str) -> int:
    """Send until `line` is in the metrics: a receiver's RX ring is attached
    by its worker just after the SET_VRING_ENABLE reply, so the first
    frames may find no ring. Returns the frames sent."""
    deadline = time.monotonic() + 10
    slot = 0
    while line not in n.metrics():
        assert time.monotonic() < deadline, n.metrics()
        _send(a, frame, slot)
        slot += 1
        time.sleep(0.05)
    return slot


def test_broken_rx_ring_breaks_its_device_only(nitro, short_tmp_path):
    n = nitro(CONFIG)
    with NetFrontend(short_tmp_path / "a.sock") as a, NetFrontend(short_tmp_path / "b.sock") as b:
        b.start_vring(0)  # rx0
        buf = GPA_BASE + b.data
        b.write_desc(0, buf, 2048, 0)  # an RX buffer the device may not write
        b.publish(0)
        a.start_vring(1)  # tx0
        frame = bytes(12) + _icmp_a_to_b()
        _send_until(n, a, frame, 'nitro_device_broken{device="b",kind="net"} 1.0')
        assert "BROKEN (request)" in n.status()
        assert 'nitro_guest_errors_total{device="b",error="request",kind="net"} 1.0' in n.metrics()
        assert 'nitro_device_broken{device="a",kind="net"} 0.0' in n.metrics()
        assert b.used_idx() == 0  # nothing was written into the bad buffer's ring
    assert n.stop() == 0


def test_a_jammed_rx_call_eventfd_breaks_the_receiver_only(nitro, short_tmp_path):
    """Issue 11 item 1 on the switch: B makes its RX call eventfd blocking
    again (one file description, shared with nitro) and parks the counter at
    2^64-2. The worker delivering A's frame into B's RX ring then calls B
    while holding B's RX slot: before cffi_build/nitro_efd.c that write slept
    for good and took the only worker (A's TX ring too) with it."""
    n = nitro("[daemon]\nworkers = 1\n" + CONFIG)
    with NetFrontend(short_tmp_path / "a.sock") as a, NetFrontend(short_tmp_path / "b.sock") as b:
        b.start_vring(0)  # rx0
        for i in range(4):
            b.write_desc(i, GPA_BASE + b.data + 4096 * i, 2048, 2)  # WRITE: a good RX buffer
            b.publish(i)
        b.call_u64(Request.GET_FEATURES)  # a round trip: nitro holds the call fd
        os.set_blocking(b.call, True)
        os.eventfd_write(b.call, 0xFFFF_FFFF_FFFF_FFFE)
        a.start_vring(1)  # tx0
        frame = bytes(12) + _icmp_a_to_b()
        # Each send waits for A's TX ring to be served: the worker is not stuck.
        slot = _send_until(n, a, frame, 'nitro_device_broken{device="b",kind="net"} 1.0')
        assert b.used_idx() >= 1  # the frame was delivered before the call
        assert "BROKEN (eventfd)" in n.status()
        assert 'nitro_guest_errors_total{device="b",error="eventfd",kind="net"} 1.0' in n.metrics()
        for k in range(3):  # and A goes on sending (dropped: B is broken)
            _send(a, frame, slot + k)
        assert 'nitro_device_broken{device="a",kind="net"} 0.0' in n.metrics()
    assert n.proc.poll() is None
    assert n.stop() == 0
