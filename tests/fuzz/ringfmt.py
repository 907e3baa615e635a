"""The ring fuzzers' input format (tests/fuzz/fuzz_ring.c): a builder for
seeds and a replay of any input through the Python API (nitro._datapath).

The format is documented at the top of fuzz_ring.c; this module mirrors it
exactly (same constants, same op numbers; the ring layouts themselves are
tests/ringlayout.py's) so an input found by
libFuzzer can be replayed through cffi: by the regression unit tests and by
tools/build-sanitized.sh under an ASan build of the extension.

``Program`` builds inputs: ``Program(num=4).descs(...).write(...).serve()``;
``replay(data)`` runs one and returns what the queue ended as.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, GuestFault, GuestMemory, Virtqueue
from tests.ringlayout import (
    DESC,
    PDESC,
    RING_IDX,
    U16,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    avail_ring_offset,
)

GUARD = 4096
REGION = 32768
SPAN = 2 * REGION
FILE_LEN = 3 * GUARD + 2 * REGION
OFF_A = GUARD
OFF_B = 2 * GUARD + REGION
CANARY = 0xA5
UADDR = 0x7F00_0000_0000
DISK_LEN = 256 * 512
MAX_OPS = 4096
MAX_SERVES = 16

# (gpa_a, gpa_b, uaddr_a, uaddr_b, has_b): fuzz_ring.c LAYOUTS.
LAYOUTS = (
    (0x10000, 0x10000 + REGION, UADDR, UADDR + REGION, True),
    (0x10000, 0x80000, UADDR, UADDR + 0x100000, True),
    (0x10000 + REGION, 0x10000, UADDR, UADDR + REGION, True),
    (0x10000, 0, UADDR, 0, False),
    (0x10000, 0x10000 + REGION, UADDR + 4096, UADDR + REGION + 4096, True),
    (0, 2**64 - 1 - REGION, UADDR, UADDR + REGION, True),
)
GPA_A = 0x10000            # guest-physical address of span offset 0 (layout 0)
GPA_B = GPA_A + REGION     # and of region B (layout 0)

F_INDIRECT = 1
F_EVENT_IDX = 2
F_RAW_ADDR = 4
F_READONLY = 8
F_PACKED = 0x80  # VIRTIO_F_RING_PACKED
CAPACITY_MAPPED = 0x100  # in the capacity field: serve through a mapping of the disk

OP_WRITE, OP_SERVE, OP_SETMEM, OP_RESET, OP_NUM, OP_DESCS, OP_FILL, OP_INFLIGHT = range(8)
OPS = 8
# fuzz_ring.c: one queue's region for 1024 entries of the larger (packed) layout
INFLIGHT_LEN = 32 + 32 * 1024
PACKED_BASE = 0x8000  # slot 0, wrap counter 1: a fresh packed ring


def gpa(off: int) -> int:
    """The guest-physical address of span offset ``off`` in layout 0."""
    return GPA_A + off


@dataclass
class Program:
    """One fuzz input. Offsets are span offsets (0..64 KiB): region A is
    [0, 32 KiB), region B [32 KiB, 64 KiB); in layout 0 span offset o is
    guest-physical GPA_A + o."""

    flags: int = 0
    log2_num: int = 2
    base: int = 0
    desc: int = 0x0000
    avail: int = 0x1000
    used: int = 0x2000
    capacity: int = 64
    max_discard: int = 0
    max_wz: int = 0
    layout: int = 0
    ops: bytearray = field(default_factory=bytearray)

    @property
    def num(self) -> int:
        return 1 << (self.log2_num % 11)

    def encode(self) -> bytes:
        head = struct.pack("<BBHHHHHHH", self.flags | (self.layout << 4), self.log2_num,
                           self.base, self.desc, self.avail, self.used, self.capacity,
                           self.max_discard, self.max_wz)
        return head + bytes(self.ops)

    # -- ops ----------------------------------------------------------------
    def write(self, off: int, data: bytes) -> Program:
        for k in range(0, len(data), 255):
            chunk = data[k:k + 255]
            self.ops += struct.pack("<BHB", OP_WRITE, off + k, len(chunk)) + chunk
        return self

    def serve(self) -> Program:
        self.ops.append(OP_SERVE)
        return self

    def set_mem(self, layout: int) -> Program:
        self.ops += bytes([OP_SETMEM, layout])
        return self

    def reset(self, base: int = 0) -> Program:
        self.ops += struct.pack("<BH", OP_RESET, base)
        return self

    def set_num(self, log2: int) -> Program:
        self.ops += bytes([OP_NUM, log2])
        return self

    def descs(self, off: int, count: int, addr: int, length: int, flags: int) -> Program:
        """count (1..256) descriptors at span offset off; i's next is i + 1."""
        self.ops += struct.pack("<BHBQIH", OP_DESCS, off, count - 1, addr, length, flags)
        return self

    def fill(self, off: int, length: int, byte: int) -> Program:
        self.ops += struct.pack("<BHHB", OP_FILL, off, length, byte)
        return self

    def inflight(self, off: int, data: bytes = b"") -> Program:
        """Write data (at most 255 bytes) at off in the inflight region and
        (re)attach the region to the queue."""
        self.ops += struct.pack("<BHB", OP_INFLIGHT, off, len(data)) + data
        return self

    # -- driver-side helpers ------------------------------------------------
    def desc_at(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                table: int | None = None) -> Program:
        base = self.desc if table is None else table
        return self.write(base + DESC.size * i, DESC.pack(addr, length, flags, next_))

    def packed_list(self, slot: int, descs: list[tuple[int, int, int]], id_: int,
                    wrap: int = 1) -> Program:
        """A packed ring list (addr, len, flags) from ``slot`` on, each made
        available for the driver's lap ``wrap`` (AVAIL/USED added), the id
        in the last one; the head is written last."""
        avail = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
        for k in range(len(descs) - 1, -1, -1):
            addr, length, flags = descs[k]
            self.write(self.desc + 16 * ((slot + k) % self.num),
                       PDESC.pack(addr, length, id_, flags | avail))
        return self

    def avail_ring(self, heads: list[int], idx: int | None = None, start: int | None = None) -> Program:
        """Put heads in the avail ring from slot ``start`` (default: base)
        and set avail->idx (default base + len(heads))."""
        start = self.base if start is None else start
        for k, h in enumerate(heads):
            self.write(self.avail + avail_ring_offset(start + k, self.num), U16.pack(h))
        idx = (start + len(heads)) if idx is None else idx
        return self.write(self.avail + RING_IDX, U16.pack(idx & 0xFFFF))


# -- replay through the Python API ------------------------------------------------
@dataclass
class Outcome:
    fault: str | None       # the queue's fault at the end (None: healthy)
    served: int             # requests/chains completed over all serve calls
    serve_errors: list[str]  # DatapathError names raised by serve calls
    guards_intact: bool
    faults_seen: list[str] = field(default_factory=list)  # every fault, in order


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> int:
        raw = self.data[self.pos:self.pos + n]
        self.pos += len(raw)
        return int.from_bytes(raw + bytes(n - len(raw)), "little")

    def bytes(self, n: int) -> bytes:
        raw = self.data[self.pos:self.pos + n]
        self.pos += len(raw)
        return raw


class _Replay:
    def __init__(self, data: bytes) -> None:
        self.guest_fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        self.disk_fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        os.ftruncate(self.guest_fd, FILE_LEN)
        os.ftruncate(self.disk_fd, DISK_LEN)
        self.mm = mmap.mmap(self.guest_fd, FILE_LEN)
        self.mm[:] = bytes([CANARY]) * FILE_LEN
        self.mm[OFF_A:OFF_A + REGION] = bytes(REGION)
        self.mm[OFF_B:OFF_B + REGION] = bytes(REGION)
        self.inflight_fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.inflight_fd, INFLIGHT_LEN)
        self.inflight_mm = mmap.mmap(self.inflight_fd, INFLIGHT_LEN)
        self.inflight = _datapath.InflightRegion(self.inflight_fd, INFLIGHT_LEN)
        self.r = _Reader(data)
        self.served = 0
        self.errors: list[str] = []
        self.faults: list[str] = []

    def close(self) -> None:
        self.inflight.close()  # the queue was closed first (run)
        self.mm.close()
        self.inflight_mm.close()
        for fd in (self.guest_fd, self.disk_fd, self.call_fd, self.inflight_fd):
            os.close(fd)

    @staticmethod
    def _span_uaddr(off: int) -> int:
        off %= SPAN
        return UADDR + off if off < REGION else UADDR + REGION + (off - REGION)

    def _span_write(self, off: int, data: bytes) -> None:
        for i, b in enumerate(data):
            o = off + i
            if o >= SPAN:
                break
            self.mm[OFF_A + o if o < REGION else OFF_B + o - REGION] = b

    def _make_mem(self, which: int) -> GuestMemory:
        ga, gb, ua, ub, has_b = LAYOUTS[which % len(LAYOUTS)]
        m = GuestMemory()
        m.add_region(self.guest_fd, ga, REGION, ua, OFF_A)
        if has_b:
            m.add_region(self.guest_fd, gb, REGION, ub, OFF_B)
        return m

    def _setup_queue(self, num: int, base: int) -> None:
        d, a, u = (self._span_uaddr(x) for x in (self.desc, self.avail, self.used))
        if not self.raw_addr:
            d, a, u = d & ~15, a & ~1, u & ~3
        for step in (lambda: self.vq.set_num(num),
                     lambda: self.vq.set_features(self.features),
                     lambda: self.vq.set_addr(self.mem, d, a, u)):
            try:
                step()
            except _datapath.FrontendError:
                pass  # refused, as in C; serving must then refuse too
        try:
            self.vq.base = base
        except _datapath.FrontendError:
            pass  # a packed position outside the ring: refused, as in C
        self.vq.set_fds(-1, self.call_fd)

    def _serve(self) -> None:
        try:
            self.served += _datapath.blk_serve(self.vq, self.params, self.stats, 0)
        except GuestFault as e:
            self.errors.append("GuestFault")
            self.faults.append(e.kind)
        except _datapath.DatapathError as e:
            self.errors.append(type(e).__name__)
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass

    def guards_intact(self) -> bool:
        return all(self.mm[o:o + GUARD] == bytes([CANARY]) * GUARD
                   for o in (0, OFF_A + REGION, OFF_B + REGION))

    def run(self) -> Outcome:
        r = self.r
        flags = r.take(1)
        num = 1 << (r.take(1) % 11)
        base = r.take(2)
        self.desc, self.avail, self.used = r.take(2), r.take(2), r.take(2)
        capacity = r.take(2)
        mapped, capacity = bool(capacity & CAPACITY_MAPPED), capacity % 256
        max_discard, max_wz = r.take(2) % 33, r.take(2) % 33
        self.features = ((flags & 1) << 28) | (((flags >> 1) & 1) << 29) | (
            (1 << 34) if flags & F_PACKED else 0)
        self.raw_addr = bool(flags & F_RAW_ADDR)
        self.params = BlkParams(self.disk_fd, capacity, readonly=bool(flags & F_READONLY),
                                max_discard_sectors=max_discard,
                                max_write_zeroes_sectors=max_wz, serial=b"fuzz-serial-0123456\0")
        self.stats = BlkStats()
        self.mem = self._make_mem((flags >> 4) & 7)
        self.vq = Virtqueue(0)
        try:
            if mapped:
                self.params.map_image()
            self._setup_queue(num, base)
            ops = serves = 0
            while r.left > 0 and ops < MAX_OPS:
                ops += 1
                op = r.take(1) % OPS
                if op == OP_WRITE:
                    off, n = r.take(2), r.take(1)
                    self._span_write(off, r.bytes(n))
                elif op == OP_SERVE:
                    serves += 1
                    if serves < MAX_SERVES:
                        self._serve()
                elif op == OP_SETMEM:
                    old, self.mem = self.mem, self._make_mem(r.take(1))
                    try:
                        self.vq.set_mem(self.mem)
                    except _datapath.FrontendError:
                        pass
                    old.close()
                elif op == OP_RESET:
                    self.vq.reset()
                    self.vq.clear_stop()
                    self._setup_queue(num, r.take(2))
                elif op == OP_NUM:
                    try:
                        self.vq.set_num(1 << (r.take(1) % 11))
                    except _datapath.FrontendError:
                        pass
                elif op == OP_DESCS:
                    off, count = r.take(2), r.take(1) + 1
                    addr, length, fl = r.take(8), r.take(4), r.take(2)
                    for i in range(count):
                        n = (i + 1) & 0xFFFF
                        packed = self.features >> 34 & 1
                        self._span_write(off + DESC.size * i, DESC.pack(addr, length, n if packed else fl,
                                                                 fl if packed else n))
                elif op == OP_FILL:
                    off, n, byte = r.take(2), r.take(2), r.take(1)
                    self._span_write(off, bytes([byte]) * n)
                elif op == OP_INFLIGHT:
                    off = r.take(2) % INFLIGHT_LEN
                    data = r.bytes(r.take(1))[:INFLIGHT_LEN - off]
                    self.inflight_mm[off:off + len(data)] = data
                    self.vq.set_inflight(self.inflight, 0, INFLIGHT_LEN)
            self._serve()
            assert self.stats.snapshot()["inflight"] == 0
            return Outcome(self.vq.fault, self.served, self.errors, self.guards_intact(),
                           self.faults)
        finally:
            self.vq.close()
            self.mem.close()
            self.params.close()
            self.stats.close()


def replay(data: bytes) -> Outcome:
    """Run one fuzz input through nitro._datapath (blk_serve for SERVE)."""
    rp = _Replay(data)
    try:
        return rp.run()
    finally:
        rp.close()
