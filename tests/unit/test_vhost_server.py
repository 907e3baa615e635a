"""The trio layer's own guarantees (nitro/vhost/server.py) that need no
daemon: fds and C queues are released exactly once, whatever a frontend or
a concurrent metrics scrape does (issue 11 item 7)."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time

import trio

from nitro.vhost import server as srv
from nitro.vhost.backend import VhostUserBackend
from nitro.vhost.protocol import Request
from tests.unit.test_vhost_backend import FakeBlkDevice, FakeVq, fake_datapath


class SlowVq(FakeVq):
    """A C queue whose counters take a while to read, and that records
    being freed in the middle of a read (a use-after-free in C)."""

    reading = threading.Event()

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.freed_while_read = False
        self._in_stats = False

    def stats(self):
        self._in_stats = True
        SlowVq.reading.set()
        time.sleep(0.3)
        self._in_stats = False
        return {"kicks": 1, "calls": 0, "chains": 0, "faults": {}}

    def close(self):
        self.freed_while_read |= self._in_stats
        super().close()


class StatsDevice(FakeBlkDevice):
    kind = "blk"

    def statistics(self) -> dict:
        return {"kind": self.kind}


def test_a_session_ends_only_after_a_statistics_read_in_progress(tmp_path):
    """The metrics thread reads the session's C queues while the trio thread
    ends the session (frees them): the end waits for the read."""
    device = StatsDevice(num_queues=1)
    server = srv.VhostUserServer(device, tmp_path / "s.sock", device_id="d", engine=None)
    backend = VhostUserBackend(device, datapath=fake_datapath(Virtqueue=SlowVq))
    server._backend = backend
    SlowVq.reading.clear()
    got: list[dict] = []
    scrape = threading.Thread(target=lambda: got.append(server.statistics()))
    scrape.start()
    assert SlowVq.reading.wait(5)
    server._end_session(backend)
    scrape.join(5)
    vq = backend.vrings[0].vq
    assert vq.closed and not vq.freed_while_read
    assert got[0]["queues"][0]["kicks"] == 1
    # Afterwards the counters live on in Python only.
    assert server.statistics()["queues"][0]["kicks"] == 1


def _eventfds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                fds.add(int(name))
        except OSError:
            pass  # listdir's own fd, gone
    return fds


def test_fds_of_a_header_whose_payload_never_comes_are_closed_on_cancel():
    """A frontend sends a header with SCM_RIGHTS fds and holds back the
    payload; the read is then cancelled (shutdown, reload): the fds must
    not leak."""
    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sent = os.eventfd(0, os.EFD_CLOEXEC)
        with a, b:
            header = struct.pack("<III", int(Request.SET_VRING_KICK), 1, 8)
            await a.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sent]))])
            before = _eventfds()
            with trio.move_on_after(0.2) as scope:
                await srv._recv_message(b)
            assert scope.cancelled_caught
            # The fd received (a new eventfd) must be closed again.
            assert _eventfds() == before
        os.close(sent)

    trio.run(main)
