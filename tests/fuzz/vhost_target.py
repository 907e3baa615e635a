"""The vhost-user fuzz target: codec.FrontendConnection + backend.VhostUserBackend
with the real C datapath (GuestMemory, Virtqueue, blk_serve) behind them.

The input is a sequence of records, each what one ``recvmsg`` could return:

    u8 ctl   bits 0-2: number of fds attached (0..7)
             bit 3:    fd kind: 0 a 2 MiB memfd (guest RAM), 1 an eventfd
             bit 4:    afterwards, serve every vring that should run (the
                       trio layer starting its workers), blk_serve(idle_ms=0)
             bit 5:    afterwards, end of stream (receive_data(b""))
    u16 len, then len bytes of stream data

``run_one(data)`` plays one input as a session and checks, like the trio
layer would rely on:
- only ProtocolError (RemoteProtocolError, BackendError) ever escapes the
  codec or the dispatcher; every reply is a well-formed REPLY message;
- every fd handed to the codec is closed by the end of the session (or was
  never closed twice: an fd number we still own keeps its inode).
Anything else raises, which atheris reports as a crash.

``session(...)`` builds inputs from Messages (seeds and regression tests).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from nitro import _datapath
from nitro.vhost.backend import VhostUserBackend
from nitro.vhost.codec import CLOSED, NEED_DATA, FrontendConnection, Message, ProtocolError
from nitro.vhost.protocol import HEADER_SIZE, REPLY, VERSION, Header

GUEST_RAM = 2 << 20
FD_MEMFD, FD_EVENTFD = 0, 8
SERVE, EOF = 16, 32


class FuzzBlkDevice:
    """The backend contract (docs/architecture.md), serving with the real C loop."""

    def __init__(self, disk_fd: int) -> None:
        self.device_features = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 12)
        self.protocol_features = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x10000
        self.num_queues = 2
        self.max_queue_size = 256
        self.config = bytes(range(60))
        self.params = _datapath.BlkParams(disk_fd, 128, max_discard_sectors=8,
                                          max_write_zeroes_sectors=8, serial=b"fuzz")
        self.stats = _datapath.BlkStats()

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise ValueError(f"config window {offset}+{size} beyond {len(self.config)} bytes")
        return self.config[offset:offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        pass

    def set_features(self, acked: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self.params.close()
        self.stats.close()


def _new_fd(kind: int) -> int:
    if kind == FD_EVENTFD:
        return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, GUEST_RAM)
    return fd


def _check_reply(reply: bytes | None, message: Message) -> None:
    if reply is None:
        return
    head = Header.decode(reply[:HEADER_SIZE])
    if head.request != message.request or head.flags != VERSION | REPLY \
            or head.size != len(reply) - HEADER_SIZE:
        raise AssertionError(f"malformed reply to {message.request.name}: {reply!r}")


class _Session:
    def __init__(self, disk_fd: int) -> None:
        self.device = FuzzBlkDevice(disk_fd)
        self.codec = FrontendConnection()
        self.backend = VhostUserBackend(self.device)
        self.made: list[tuple[int, int]] = []   # (fd, inode) handed to the codec
        self.eventfds: set[tuple[int, int]] = set()  # (fd, inode): numbers get reused
        self.alive = True

    def feed(self, data: bytes, fds: list[int], eof: bool) -> None:
        if data:
            self.codec.receive_data(data, fds)
        else:
            for fd in fds:
                os.close(fd)
        if eof:
            self.codec.receive_data(b"")
        while True:
            event = self.codec.next_event()
            if event is NEED_DATA or event is CLOSED:
                if event is CLOSED:
                    self.alive = False
                return
            assert isinstance(event, Message)
            self.backend.affected_vrings(event)
            _check_reply(self.backend.handle(event), event)

    def serve(self) -> None:
        """Run every ring that should run, as the trio layer would, for one
        idle_ms=0 pass. Only rings whose kick fd is an eventfd: a kick fd that
        is always readable (a regular file) makes the C loop spin until
        stopped, which this single-threaded harness cannot do."""
        for vring in self.backend.vrings:
            if not vring.should_run or vring.kick_fd is None:
                continue
            try:
                if (vring.kick_fd, os.fstat(vring.kick_fd).st_ino) not in self.eventfds:
                    continue
            except OSError:
                continue
            try:
                _datapath.blk_serve(vring.vq, self.device.params, self.device.stats, 0)
            except _datapath.GuestFault as e:
                vring.broken = e.kind
            except _datapath.DatapathError as e:
                vring.broken = f"host:{e}"

    def close(self) -> None:
        self.backend.close()
        self.codec.close()
        self.device.close()
        for fd, inode in self.made:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if st.st_ino == inode:
                os.close(fd)
                raise AssertionError(f"fd {fd} leaked: still open after the session")


def run_one(data: bytes, disk_fd: int) -> dict:
    """Play one input (format above) as a session; raises on a bug. Returns
    where the session got to: per vring (should_run, broken), the number of
    memory regions, and whether it ended in a protocol error."""
    s = _Session(disk_fd)
    error = None
    try:
        pos = 0
        while pos + 3 <= len(data) and s.alive:
            ctl = data[pos]
            (n,) = struct.unpack_from("<H", data, pos + 1)
            chunk = data[pos + 3:pos + 3 + n]
            pos += 3 + n
            kind = ctl & FD_EVENTFD
            fds = [_new_fd(kind) for _ in range(ctl & 7)]
            for fd in fds:
                s.made.append((fd, os.fstat(fd).st_ino))
                if kind == FD_EVENTFD:
                    s.eventfds.add(s.made[-1])
            try:
                s.feed(chunk, fds, bool(ctl & EOF))
            except ProtocolError as e:
                error = str(e)
                break  # the trio layer closes the connection
            if ctl & SERVE:
                s.serve()
            if ctl & EOF:
                break
        mem = s.backend.memory
        return {"vrings": [(v.should_run, v.broken) for v in s.backend.vrings],
                "regions": 0 if mem is None else len(mem), "error": error}
    finally:
        s.close()


# -- building inputs -------------------------------------------------------------------
def record(data: bytes, nfds: int = 0, fd_kind: int = FD_MEMFD, *, serve: bool = False,
           eof: bool = False) -> bytes:
    ctl = nfds | fd_kind | (SERVE if serve else 0) | (EOF if eof else 0)
    return struct.pack("<BH", ctl, len(data)) + data


def session(steps: Iterable[tuple[Message, int, int]], *, serve_each: bool = True) -> bytes:
    """Records for (message, nfds, fd_kind) steps, one message per record."""
    return b"".join(record(m.encode(), n, k, serve=serve_each) for m, n, k in steps)


# -- seeds ---------------------------------------------------------------------------------
def _seeds() -> dict[str, bytes]:
    from nitro.vhost.protocol import (
        NEED_REPLY,
        U64,
        DeviceConfig,
        MemoryRegion,
        MemoryTable,
        SingleMemoryRegion,
        VringAddr,
        VringFd,
        VringState,
    )
    from nitro.vhost.protocol import (
        Request as R,
    )

    ua = 0x7F00_0000_0000
    mib = 1 << 20
    low = MemoryRegion(0, mib, ua, 0)
    high = MemoryRegion(mib, mib, ua + mib, mib)
    moved = MemoryRegion(4 * mib, mib, ua + 8 * mib, 0)

    def m(req, payload=None, reply=True):
        return Message(req, VERSION | (NEED_REPLY if reply else 0), payload)

    def connect():
        yield m(R.GET_FEATURES), 0, 0
        yield m(R.GET_PROTOCOL_FEATURES), 0, 0
        yield m(R.SET_PROTOCOL_FEATURES, U64(0x1FFFF)), 0, 0
        yield m(R.GET_QUEUE_NUM), 0, 0
        yield m(R.GET_MAX_MEM_SLOTS), 0, 0
        yield m(R.SET_OWNER), 0, 0
        for i in range(2):
            yield m(R.SET_VRING_CALL, VringFd(i)), 1, FD_EVENTFD
        yield m(R.GET_CONFIG, DeviceConfig(0, 60, 0, bytes(60))), 0, 0
        yield m(R.SET_FEATURES, U64((1 << 32) | (1 << 29) | (1 << 28) | (1 << 30))), 0, 0

    def rings(base=0):
        for i in range(2):
            d = ua + 0x10000 + 0x10000 * i
            yield m(R.SET_VRING_NUM, VringState(i, 16)), 0, 0
            yield m(R.SET_VRING_BASE, VringState(i, base)), 0, 0
            yield m(R.SET_VRING_ADDR, VringAddr(i, 0, d, d + 0x200, d + 0x400, 0)), 0, 0
            yield m(R.SET_VRING_KICK, VringFd(i)), 1, FD_EVENTFD
            yield m(R.SET_VRING_CALL, VringFd(i)), 1, FD_EVENTFD
            yield m(R.SET_VRING_ENABLE, VringState(i, 1)), 0, 0
        yield m(R.SET_STATUS, U64(0xF)), 0, 0

    def start_table():
        yield from connect()
        yield m(R.SET_MEM_TABLE, MemoryTable((low, high))), 2, FD_MEMFD
        yield from rings()

    def start_slots():
        yield from connect()
        for r in (low, high):
            single = SingleMemoryRegion(r.guest_address, r.size, r.user_address, r.mmap_offset)
            yield m(R.ADD_MEM_REG, single), 1, FD_MEMFD
        yield from rings()

    def remap_running():
        yield from start_table()
        yield m(R.SET_MEM_TABLE, MemoryTable((high, low))), 2, FD_MEMFD
        yield m(R.SET_MEM_TABLE, MemoryTable((moved,))), 1, FD_MEMFD   # rings lost
        yield m(R.SET_MEM_TABLE, MemoryTable((low,))), 1, FD_MEMFD
        yield from rings()

    def rem_reg_running():
        yield from start_slots()
        yield m(R.REM_MEM_REG, SingleMemoryRegion(mib, mib, ua + mib, mib)), 1, FD_MEMFD
        yield m(R.REM_MEM_REG, SingleMemoryRegion(0, mib, ua, 0)), 1, FD_MEMFD
        yield m(R.ADD_MEM_REG, SingleMemoryRegion(0, mib, ua, 0)), 1, FD_MEMFD

    def restart():
        yield from start_table()
        for i in range(2):
            yield m(R.GET_VRING_BASE, VringState(i, 0)), 0, 0
        yield m(R.RESET_DEVICE), 0, 0
        yield from connect()
        yield from rings(base=7)  # avail->idx 0 is 7 behind: a guest fault

    seeds = {
        "qemu-start-set-mem-table": session(start_table()),
        "qemu-start-add-mem-reg": session(start_slots()),
        "set-mem-table-while-running": session(remap_running()),
        "rem-mem-reg-while-running": session(rem_reg_running()),
        "reset-and-restart": session(restart()),
    }
    # The whole start cut into 5-byte reads, a message's fds on its last one.
    split = b""
    for msg, nfds, kind in start_table():
        wire = msg.encode()
        cuts = list(range(0, len(wire), 5))
        split += b"".join(record(wire[k:k + 5], nfds if k == cuts[-1] else 0, kind)
                          for k in cuts)
    seeds["split-reads"] = split + record(b"", serve=True)
    seeds["garbage"] = (record(struct.pack("<III", 999, 1, 0))
                        + record(struct.pack("<III", 1, 0x3, 0), eof=True))
    seeds["eof-mid-message"] = record(struct.pack("<III", 1, 1, 8) + b"\0\0", 2, eof=True)
    return seeds


if __name__ == "__main__":
    from pathlib import Path

    out = Path(__file__).resolve().parent / "corpus" / "vhost"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("seed-*"):
        old.unlink()
    for name, data in _seeds().items():
        (out / f"seed-{name}").write_bytes(data)
