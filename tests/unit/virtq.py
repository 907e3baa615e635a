"""Fake guest memory and split virtqueues for datapath unit tests.

``FakeGuest`` is a memfd laid out as ``[guard][region 0][guard][region 1]...
[guard]``. Each region is registered with a ``GuestMemory`` at the chosen
guest-physical address and a fake frontend virtual address, with its file
offset as ``mmap_offset`` (so C maps the guards too). The guards are filled
with ``CANARY`` and nothing may ever change them: ``guards_intact()`` is how
tests prove C wrote nothing outside guest memory.

``SplitRing`` lays out a split ring (virtio 1.2 section 2.7, layout in
tests/ringlayout.py) in a FakeGuest and plays the driver: it writes descriptors and the avail ring, reads the
used ring, and owns kick/call eventfds.

``blk_req``/``blk_params`` build virtio-blk requests and the params the
datapath tests serve with; tests/unit/conftest.py turns these into the
guest/ring/disk/params/stats fixtures.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

from nitro._datapath import BlkParams, GuestMemory, InflightRegion, Virtqueue, blk_serve
from nitro.vhost.protocol import inflight_queue_region_size
from tests import ringlayout as rl
from tests.ringlayout import (
    DESC,
    EVENT,
    PDESC,
    U16,
    USED_ELEM,
    VIRTIO_F_RING_PACKED,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    blk_header,
)

KiB = 1 << 10
MiB = 1 << 20
GUARD = 64 * KiB
CANARY = 0xA5
UADDR_BASE = 0x7F00_0000_0000
GPA = 0x1000_0000  # where a one-region test guest starts


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    file_off: int
    uaddr_base: int = UADDR_BASE

    @property
    def uaddr(self) -> int:
        return self.uaddr_base + self.file_off

    def __contains__(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


@dataclass(frozen=True)
class Buf:
    """One descriptor's buffer: guest-physical address, length, direction."""
    gpa: int
    length: int
    writable: bool = False


class FakeGuest:
    def __init__(self, regions: Sequence[tuple[int, int]] = ((0x1000_0000, 4 * MiB),),
                 uaddr_base: int = UADDR_BASE) -> None:
        self.fd = os.memfd_create("nitro-test-guest", os.MFD_CLOEXEC)
        self.regions: list[Region] = []
        off = GUARD
        for gpa, size in regions:
            self.regions.append(Region(gpa, size, off, uaddr_base))
            off += size + GUARD
        os.ftruncate(self.fd, off)
        self.mm = mmap.mmap(self.fd, off)
        self.mm[:] = bytes([CANARY]) * off
        for r in self.regions:
            self.mm[r.file_off:r.file_off + r.size] = bytes(r.size)
        self.mem = GuestMemory()
        for r in self.regions:
            self.mem.add_region(self.fd, r.gpa, r.size, r.uaddr, r.file_off)
        self._next = {r.gpa: r.gpa for r in self.regions}

    def close(self) -> None:
        self.mem.close()
        self.mm.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def region_of(self, gpa: int) -> Region:
        for r in self.regions:
            if gpa in r:
                return r
        raise ValueError(f"gpa {gpa:#x} is not guest memory")

    def _off(self, gpa: int, length: int) -> int:
        r = self.region_of(gpa)
        if gpa + length > r.gpa + r.size:
            raise ValueError(f"[{gpa:#x}, +{length}) leaves its region")
        return r.file_off + gpa - r.gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = self._off(gpa, len(data))
        self.mm[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self._off(gpa, length)
        return self.mm[off:off + length]

    def uaddr(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uaddr + gpa - r.gpa

    def alloc(self, size: int, align: int = 16, region: int = 0) -> int:
        """Bump-allocate size bytes of guest memory in a region."""
        r = self.regions[region]
        gpa = -(-self._next[r.gpa] // align) * align
        if gpa + size > r.gpa + r.size:
            raise MemoryError("fake guest region exhausted")
        self._next[r.gpa] = gpa + size
        return gpa

    def guards_intact(self) -> bool:
        spans = [(0, GUARD)] + [(r.file_off + r.size, GUARD) for r in self.regions]
        return all(self.mm[o:o + n] == bytes([CANARY]) * n for o, n in spans)


@contextlib.contextmanager
def guarded_guest(gpa: int, size: int) -> Iterator[FakeGuest]:
    """One-region guest memory whose guards must be intact when the test ends."""
    with FakeGuest([(gpa, size)]) as g:
        yield g
        assert g.guards_intact(), "C wrote outside guest memory"


@contextlib.contextmanager
def disk_file(size: int, content: bytes | None = None) -> Iterator[int]:
    """An unlinked temporary disk image of `size` bytes (zeros or `content`)."""
    fd, path = tempfile.mkstemp(prefix="nitro-disk-")
    os.unlink(path)
    try:
        if content is None:
            os.ftruncate(fd, size)
        else:
            os.pwrite(fd, content[:size], 0)
            os.fsync(fd)
        yield fd
    finally:
        os.close(fd)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class _Ring:
    """What both layouts' fake drivers share: the nitro Virtqueue serving
    the ring and the kick/call eventfds."""

    def __init__(self, guest: FakeGuest, num: int, kick: bool, call: bool) -> None:
        self.guest = guest
        self.num = num
        self.kick_fd = _eventfd() if kick else -1
        self.call_fd = _eventfd() if call else -1
        self.vq = Virtqueue(0)

    def close(self) -> None:
        self.vq.close()
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def calls(self) -> int:
        """How many times the device signalled the call fd since last asked."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0


class SplitRing(_Ring):
    """A split virtqueue in guest memory plus the nitro Virtqueue serving it."""

    def __init__(self, guest: FakeGuest, num: int = 16, features: int = 0,
                 kick: bool = True, call: bool = True) -> None:
        super().__init__(guest, num, kick, call)
        self.desc = guest.alloc(rl.desc_table_size(num), align=rl.DESC_ALIGN)
        self.avail = guest.alloc(rl.avail_size(num), align=rl.AVAIL_ALIGN)
        self.used = guest.alloc(rl.used_size(num), align=rl.USED_ALIGN)
        self.vq.set_num(num)
        self.vq.set_addr(guest.mem, guest.uaddr(self.desc), guest.uaddr(self.avail),
                         guest.uaddr(self.used))
        self.vq.set_features(features)
        self.vq.set_fds(self.kick_fd, self.call_fd)
        self.avail_idx = 0
        self.used_seen = 0
        self._next_desc = 0

    def rebase(self, idx: int) -> None:
        """Start the ring at index idx (as after a reconnect): avail->idx,
        used->idx and the device's last_avail_idx all become idx."""
        self.avail_idx = self.used_seen = idx & 0xFFFF
        self.set_avail_idx(idx)
        self.guest.write(self.used + rl.RING_IDX, U16.pack(idx & 0xFFFF))
        self.vq.base = idx & 0xFFFF
        # SET_VRING_ADDR is where the device reads used->idx back.
        self.vq.set_addr(self.guest.mem, self.guest.uaddr(self.desc),
                         self.guest.uaddr(self.avail), self.guest.uaddr(self.used))

    # -- descriptors ------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.guest.write(base + DESC.size * i, DESC.pack(addr, length, flags, next))

    def _take_descs(self, n: int) -> list[int]:
        idx = [(self._next_desc + k) % self.num for k in range(n)]
        self._next_desc = (self._next_desc + n) % self.num
        return idx

    def _write_chain(self, bufs: Sequence[Buf], ids: Sequence[int], table: int | None) -> None:
        for k, (b, i) in enumerate(zip(bufs, ids)):
            last = k == len(bufs) - 1
            flags = (VRING_DESC_F_WRITE if b.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(i, b.gpa, b.length, flags, 0 if last else ids[k + 1], table)

    def add_chain(self, bufs: Sequence[Buf], indirect: bool = False,
                  publish: bool = True) -> int:
        """Write a chain (or one descriptor pointing at an indirect table
        holding it) and, by default, publish it. Returns the head index."""
        if indirect:
            size = rl.desc_table_size(len(bufs))
            table = self.guest.alloc(size, align=rl.DESC_ALIGN)
            self._write_chain(bufs, range(len(bufs)), table)
            head = self._take_descs(1)[0]
            self.write_desc(head, table, size, VRING_DESC_F_INDIRECT)
        else:
            ids = self._take_descs(len(bufs))
            self._write_chain(bufs, ids, None)
            head = ids[0]
        if publish:
            self.publish(head)
        return head

    # -- avail ring -------------------------------------------------------
    def publish(self, *heads: int) -> None:
        for head in heads:
            self.guest.write(self.avail + rl.avail_ring_offset(self.avail_idx, self.num),
                             U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.guest.write(self.avail + rl.RING_IDX, U16.pack(idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.guest.write(self.avail + rl.RING_FLAGS, U16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.guest.write(self.avail + rl.used_event_offset(self.num), U16.pack(idx & 0xFFFF))

    # -- used ring --------------------------------------------------------
    def _used_u16(self, off: int) -> int:
        return int(U16.unpack(self.guest.read(self.used + off, U16.size))[0])

    def used_idx(self) -> int:
        return self._used_u16(rl.RING_IDX)

    def used_flags(self) -> int:
        return self._used_u16(rl.RING_FLAGS)

    def avail_event(self) -> int:
        return self._used_u16(rl.avail_event_offset(self.num))

    def used_elem(self, i: int) -> tuple[int, int]:
        off = self.used + rl.used_ring_offset(i, self.num)
        return USED_ELEM.unpack(self.guest.read(off, USED_ELEM.size))

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements published since the last call, as (id, len)."""
        end = self.used_idx()
        out = [self.used_elem(i) for i in range(self.used_seen, self.used_seen + ((end - self.used_seen) & 0xFFFF))]
        self.used_seen = end
        return out

    # -- notifications ----------------------------------------------------



class PackedRing(_Ring):
    """A packed virtqueue (virtio 1.2 section 2.8) in guest memory plus the
    nitro Virtqueue serving it, with the driver's side played here: buffer
    ids from a free list, wrap counters starting at 1, the head of a list
    made available last."""

    def __init__(self, guest: FakeGuest, num: int = 16, features: int = 0,
                 kick: bool = True, call: bool = True) -> None:
        super().__init__(guest, num, kick, call)
        self.desc = guest.alloc(16 * num, align=16)
        self.driver = guest.alloc(4, align=4)   # driver event suppression
        self.device = guest.alloc(4, align=4)   # device event suppression
        self.vq.set_num(num)
        self.vq.set_features(features | VIRTIO_F_RING_PACKED)
        self.vq.set_addr(guest.mem, guest.uaddr(self.desc), guest.uaddr(self.driver),
                         guest.uaddr(self.device))
        self.vq.set_fds(self.kick_fd, self.call_fd)
        self.avail_pos, self.avail_wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1
        self.free_ids = list(range(num))
        self.sizes: dict[int, int] = {}   # id -> descriptors of its list
        self.pending: list[tuple[int, int]] = []  # (slot, flags) of unpublished heads

    @property
    def outstanding(self) -> int:
        """Descriptors made available and not yet used."""
        return sum(self.sizes.values())

    # -- descriptors ------------------------------------------------------
    def write_desc(self, slot: int, addr: int, length: int, id_: int, flags: int,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.guest.write(base + 16 * slot, PDESC.pack(addr, length, id_, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        return PDESC.unpack(self.guest.read(self.desc + 16 * slot, 16))

    def _avail_flags(self) -> int:
        return VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED

    def place(self, entries: Sequence[tuple[int, int, int]], id_: int | None = None,
              publish: bool = True) -> int:
        """Put a list of raw (addr, len, flags) descriptors in the ring from
        the driver's position (AVAIL/USED added), the id in each; the head's
        flags last. Returns the id."""
        if self.outstanding + len(entries) > self.num:
            raise RuntimeError("driver would overfill the ring")
        id_ = self.free_ids.pop(0) if id_ is None else id_
        head = None
        for addr, length, flags in entries:
            flags |= self._avail_flags()
            if head is None:
                head = (self.avail_pos, flags)
                self.write_desc(self.avail_pos, addr, length, id_, 0)
            else:
                self.write_desc(self.avail_pos, addr, length, id_, flags)
            self.avail_pos += 1
            if self.avail_pos == self.num:
                self.avail_pos, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.sizes[id_] = self.sizes.get(id_, 0) + len(entries)
        assert head is not None
        self.pending.append(head)
        if publish:
            self.publish()
        return id_

    def publish(self) -> None:
        """Expose the heads written so far (their flags), oldest first."""
        for slot, flags in self.pending:
            self.guest.write(self.desc + 16 * slot + 14, U16.pack(flags))
        self.pending = []

    def add_chain(self, bufs: Sequence[Buf], indirect: bool = False, publish: bool = True,
                  id_: int | None = None) -> int:
        """A list of descriptors (or one pointing at an indirect table of
        them) for bufs, made available; returns its buffer id."""
        entries = [(b.gpa, b.length, VRING_DESC_F_WRITE if b.writable else 0) for b in bufs]
        if indirect:
            table = self.guest.alloc(16 * len(bufs), align=16)
            for i, (addr, length, flags) in enumerate(entries):
                self.write_desc(i, addr, length, 0, flags, table=table)
            entries = [(table, 16 * len(bufs), VRING_DESC_F_INDIRECT)]
        else:
            entries = [(a, n, f | (VRING_DESC_F_NEXT if k < len(entries) - 1 else 0))
                       for k, (a, n, f) in enumerate(entries)]
        return self.place(entries, id_, publish)

    # -- used descriptors ---------------------------------------------------
    def take_used(self) -> list[tuple[int, int]]:
        """Used descriptors written since the last call, as (id, len), read
        as a driver does (2.8.22): at its used position, skipping each
        list's size."""
        out = []
        while True:
            _, length, id_, flags = self.read_desc(self.used_pos)
            used = bool(flags & VIRTQ_DESC_F_USED)
            if used != bool(self.used_wrap) or bool(flags & VIRTQ_DESC_F_AVAIL) != used:
                return out
            assert id_ in self.sizes, f"used id {id_} was not available"
            out.append((id_, length))
            self.used_pos += self.sizes.pop(id_)
            if self.used_pos >= self.num:
                self.used_pos, self.used_wrap = self.used_pos - self.num, self.used_wrap ^ 1
            self.free_ids.append(id_)

    # -- event suppression ----------------------------------------------------
    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 1) -> None:
        """When the device should call (2.8.14): ENABLE, DISABLE or DESC at
        (off, wrap)."""
        self.guest.write(self.driver, EVENT.pack(off | wrap << 15, flags))

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote: when it wants kicks."""
        return EVENT.unpack(self.guest.read(self.device, 4))


class InflightBuffer:
    """One queue's inflight region (vhost-user.rst "Inflight I/O tracking")
    in a memfd: the test's own view (mm) plus the mapping C uses."""

    def __init__(self, queue_size: int, *, packed: bool = False) -> None:
        self.size = inflight_queue_region_size(queue_size, packed=packed)
        self.fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size)
        self.mapped = InflightRegion(self.fd, self.size)

    def close(self) -> None:
        self.mapped.close()
        self.mm.close()
        os.close(self.fd)

    def attach(self, vq: Virtqueue) -> None:
        vq.set_inflight(self.mapped, 0, self.size)


def fork_server(vq: Virtqueue, params: BlkParams, stats: Any) -> int:
    """A child process serving vq with blk_serve until it is killed (the
    backend that is going to crash); returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            blk_serve(vq, params, stats, -1)
        finally:
            os._exit(0)
    return pid


def crash(pid: int) -> None:
    """SIGKILL a fork_server() child wherever it is, and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def fill(length: int, seed: int = 1) -> bytes:
    """Deterministic test data with no zero bytes (zero-fill is visible)."""
    period = bytes((seed + 7 * i) % 251 + 1 for i in range(251))
    return (period * (length // 251 + 1))[:length]


# -- virtio-blk requests (layout: tests/ringlayout.py) --------------------------
STATUS_UNSET = 0xEE  # what the status byte holds until the device writes it


CAPACITY = 2048  # sectors of a test disk: 1 MiB
SERIAL = b"nitro-serial-0123456"  # exactly 20 bytes: no NUL
MAX_DWZ = 256  # discard / write-zeroes sectors offered


def blk_params(fd: int, capacity: int = CAPACITY, readonly: bool = False, **kw: int) -> BlkParams:
    """The params the datapath tests serve with: SERIAL, discard and write
    zeroes offered up to MAX_DWZ sectors; `kw` overrides the limits."""
    limits = {"max_discard_sectors": MAX_DWZ, "max_write_zeroes_sectors": MAX_DWZ, **kw}
    return BlkParams(fd, capacity, readonly=readonly, serial=SERIAL, **limits)


@dataclass
class BlkReq:
    """A request laid out in guest memory: header (+payload) readable, then
    data and status writable, each in its own descriptor."""
    bufs: list[Buf]
    status_gpa: int
    data_gpa: int | None


def blk_req(guest: FakeGuest, type_: int, sector: int = 0, out: bytes = b"",
            in_len: int = 0) -> BlkReq:
    hdr = guest.alloc(rl.BLK_HEADER.size)
    guest.write(hdr, blk_header(type_, sector))
    bufs = [Buf(hdr, rl.BLK_HEADER.size)]
    data = None
    if out:
        data = guest.alloc(len(out))
        guest.write(data, out)
        bufs.append(Buf(data, len(out)))
    if in_len:
        data = guest.alloc(in_len)
        guest.write(data, b"\xff" * in_len)
        bufs.append(Buf(data, in_len, writable=True))
    status = guest.alloc(1, align=1)
    guest.write(status, bytes([STATUS_UNSET]))
    bufs.append(Buf(status, 1, writable=True))
    return BlkReq(bufs, status, data)


def status_of(guest: FakeGuest, req: BlkReq) -> int:
    return guest.read(req.status_gpa, 1)[0]
