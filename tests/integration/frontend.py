"""A small vhost-user-blk front-end in Python, for driving the real daemon.

It plays QEMU's part: negotiates, shares one memfd as guest RAM, lays out a
split ring in it and submits requests, including hostile ones a real driver
never would (loops, wild addresses, avail index jumps). Slow by design: the
benchmark frontend is tools/vublk.c; this one is for correctness and abuse.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import time

from nitro.vhost.codec import Message
from nitro.vhost.protocol import (
    NEED_REPLY,
    U64,
    VERSION,
    DeviceConfig,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFd,
    VringState,
)
from tests import ringlayout as rl
from tests.ringlayout import DESC, U16, USED_ELEM, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, blk_header

GPA_BASE = 0x4000_0000
MEM_SIZE = 16 << 20
PROTOCOL_FEATURES_BIT = 1 << 30
VIRTIO_F_RING_PACKED = 1 << 34
# This frontend drives split rings: like any driver it acks only the ring
# format it implements (nitro offers packed ones too).
SPLIT_RINGS_ONLY = ~VIRTIO_F_RING_PACKED


class Frontend:
    def __init__(self, path, *, num: int = 64, features_mask: int = SPLIT_RINGS_ONLY) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.num = num
        self.memfd = os.memfd_create("frontend-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mm = mmap.mmap(self.memfd, MEM_SIZE)
        self.uaddr = 0x7F00_0000_0000  # what a frontend would report as its VA
        self.desc, self.avail, self.used = 0x0, 0x4000, 0x5000
        self.data = 0x10000
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = self.used_seen = 0
        self.features_mask = features_mask

    # -- messages ------------------------------------------------------------
    def send(self, request: Request, payload=None, fds=(), need_reply=False) -> None:
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.send_raw(Message(request, flags, payload).encode(), fds)

    def send_raw(self, data: bytes, fds=()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv_reply(self, request: Request) -> bytes:
        hdr = self._recv_exact(12)
        req, flags, size = struct.unpack("<III", hdr)
        assert req == request and flags & 0x4, (req, flags)
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("backend closed the connection")
            buf += chunk
        return buf

    def call_u64(self, request: Request) -> int:
        self.send(request)
        return struct.unpack("<Q", self.recv_reply(request))[0]

    # -- the start sequence QEMU uses -------------------------------------------
    def start(self, queues: int = 1, protocol_features: int = 0) -> int:
        """Negotiate (REPLY_ACK, CONFIG, MQ and `protocol_features` if
        offered), share the memory and start vring 0."""
        features = self.call_u64(Request.GET_FEATURES) & self.features_mask
        pf = self.call_u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(pf & int(
            ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ) | protocol_features))
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, U64(features), need_reply=True)
        self.ack(Request.SET_FEATURES)
        region = MemoryRegion(GPA_BASE, MEM_SIZE, self.uaddr, 0)
        self.send(Request.SET_MEM_TABLE, MemoryTable((region,)), fds=[self.memfd],
                  need_reply=True)
        self.ack(Request.SET_MEM_TABLE)
        self.send(Request.SET_VRING_NUM, VringState(0, self.num))
        self.send(Request.SET_VRING_BASE, VringState(0, 0))
        self.send(Request.SET_VRING_ADDR, VringAddr(
            0, 0, self.uaddr + self.desc, self.uaddr + self.used, self.uaddr + self.avail, 0))
        self.send(Request.SET_VRING_CALL, VringFd(0), fds=[self.call])
        self.send(Request.SET_VRING_KICK, VringFd(0), fds=[self.kick])
        self.send(Request.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
        self.ack(Request.SET_VRING_ENABLE)
        return features

    def ack(self, request: Request) -> None:
        (rc,) = struct.unpack("<Q", self.recv_reply(request))
        assert rc == 0, f"{request.name} failed: {rc}"

    def get_config(self, size: int = 60) -> bytes:
        self.send(Request.GET_CONFIG, DeviceConfig(0, size, 0, bytes(size)))
        return DeviceConfig.decode(self.recv_reply(Request.GET_CONFIG)).payload

    def get_vring_base(self) -> int:
        self.send(Request.GET_VRING_BASE, VringState(0, 0))
        return VringState.decode(self.recv_reply(Request.GET_VRING_BASE)).num

    def forget_ring(self) -> None:
        """After a device reset: an empty ring, indexes from 0 (the driver
        lays it out again before the next start)."""
        self.write(GPA_BASE + self.desc, bytes(self.used + 0x1000 - self.desc))
        self.avail_idx = self.used_seen = 0

    # -- guest memory and the ring ---------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GPA_BASE
        self.mm[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - GPA_BASE
        return self.mm[off:off + n]

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.write(GPA_BASE + self.desc + DESC.size * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, *heads: int, kick: bool = True) -> None:
        """Make the chains at `heads` available with one avail->idx update
        (one batch, as a driver adding several at once)."""
        for head in heads:
            self.write(GPA_BASE + self.avail + rl.avail_ring_offset(self.avail_idx, self.num),
                       U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)
        if kick:
            os.eventfd_write(self.kick, 1)

    def set_avail_idx(self, idx: int) -> None:
        self.write(GPA_BASE + self.avail + rl.RING_IDX, U16.pack(idx & 0xFFFF))

    def used_idx(self) -> int:
        return U16.unpack(self.read(GPA_BASE + self.used + rl.RING_IDX, U16.size))[0]

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"backend completed {(self.used_idx() - self.used_seen) & 0xFFFF} of {count}")
            select.select([self.call], [], [], 0.05)
        out = []
        for i in range(count):
            off = GPA_BASE + self.used + rl.used_ring_offset(self.used_seen + i, self.num)
            out.append(USED_ELEM.unpack(self.read(off, USED_ELEM.size)))
        self.used_seen = (self.used_seen + count) & 0xFFFF
        return out

    def blk_request(self, rtype: int, sector: int, data: bytes = b"", read_len: int = 0,
                    slot: int = 0) -> tuple[int, bytes]:
        """One request as a 3-descriptor chain; returns (status, data read)."""
        base = GPA_BASE + self.data + slot * (1 << 20)
        hdr, buf, status = base, base + 4096, base + 4096 + (1 << 19)
        self.write(hdr, blk_header(rtype, sector))
        d0, d1, d2 = 3 * slot, 3 * slot + 1, 3 * slot + 2
        self.write(status, b"\xee")
        if data:
            self.write(buf, data)
            self.write_desc(d0, hdr, 16, VRING_DESC_F_NEXT, d1)
            self.write_desc(d1, buf, len(data), VRING_DESC_F_NEXT, d2)
        elif read_len:
            self.write_desc(d0, hdr, 16, VRING_DESC_F_NEXT, d1)
            self.write_desc(d1, buf, read_len, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, d2)
        else:
            self.write_desc(d0, hdr, 16, VRING_DESC_F_NEXT, d2)
        self.write_desc(d2, status, 1, VRING_DESC_F_WRITE)
        self.publish(d0)
        self.wait_used(1)
        return self.read(status, 1)[0], self.read(buf, read_len)

    def close(self) -> None:
        self.sock.close()
        self.mm.close()
        for fd in (self.memfd, self.kick, self.call):
            os.close(fd)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
