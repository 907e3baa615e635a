"""The engine workers' seccomp filter (cffi_build/nitro_seccomp.c).

The filter is proven active by the kernel's own report (Seccomp: 2 in the
worker threads' /proc status) and by a forbidden call aborting the process
with a line naming it; and proven sufficient by serving every kind of ring
under it. Scenarios that may abort run in a child interpreter.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, Ring, XtsCipher
from tests.ringlayout import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    dwz_segment,
)
from tests.unit.test_crypto_xts import secret_of
from tests.unit.test_guest_memory import GPA, PEER, PEER_IP, TwoGuests, udp, wait_used
from tests.unit.virtq import FakeGuest, MiB, SplitRing, blk_req, disk_file, status_of

ROOT = Path(__file__).resolve().parents[2]
SYS_GETPID = 39
SYS_GETRUSAGE = 98  # x86-64
SYS_SOCKET = 41
SYS_SETSOCKOPT = 54
CAPACITY = 4096


def seccomp_mode(tid: str) -> int:
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    raise AssertionError("no Seccomp: line")


def modes_by_thread() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        if name.startswith("nitro-w"):
            out[name] = seccomp_mode(tid)
    return out


def test_workers_run_under_a_filter_and_the_rest_of_the_process_does_not() -> None:
    e = _datapath.Engine(2, seccomp=True)
    try:
        assert modes_by_thread() == {"nitro-w0": 2, "nitro-w1": 2}  # SECCOMP_MODE_FILTER
        assert seccomp_mode(str(os.getpid())) == 0
    finally:
        e.close()
    plain = _datapath.Engine(1)
    try:
        assert modes_by_thread() == {"nitro-w0": 0}
    finally:
        plain.close()


def test_calls_workers_make_are_allowed() -> None:
    e = _datapath.Engine(1, seccomp=True)
    try:
        assert e.test_syscall(0, SYS_GETPID) == os.getpid()
        # getrusage(RUSAGE_SELF, NULL): allowed, so the kernel reaches the
        # NULL (the adaptive poll window's look, nitro_engine.c)
        assert e.test_syscall(0, SYS_GETRUSAGE) == -errno.EFAULT
        # setsockopt(-1, IPPROTO_TCP, TCP_CORK, NULL, 0): the one option
        # allowed (an NBD ring's batches), so the kernel reaches the fd
        assert e.test_syscall(0, SYS_SETSOCKOPT, -1, socket.IPPROTO_TCP,
                              socket.TCP_CORK) == -errno.EBADF
    finally:
        e.close()


def test_without_the_filter_the_forbidden_call_just_runs() -> None:
    e = _datapath.Engine(1)
    try:
        assert e.test_syscall(0, SYS_SOCKET) == -errno.EAFNOSUPPORT  # socket(0, 0, 0)
    finally:
        e.close()


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# setsockopt is allowed for IPPROTO_TCP/TCP_CORK only: another TCP option,
# or the same number at another level, is refused.
@pytest.mark.parametrize("nr, args", [
    (SYS_SOCKET, ()),
    (SYS_SETSOCKOPT, (-1, socket.IPPROTO_TCP, socket.TCP_NODELAY)),
    (SYS_SETSOCKOPT, (-1, socket.SOL_SOCKET, socket.TCP_CORK)),
])
def test_a_forbidden_call_aborts_the_process_with_one_clear_line(
        nr: int, args: tuple[int, ...]) -> None:
    call = ", ".join(map(str, (0, nr, *args)))
    p = run_child("from nitro import _datapath; e = _datapath.Engine(1, seccomp=True); "
                  f"e.test_syscall({call}); print('still alive')")
    assert p.returncode == -6, p  # SIGABRT: systemd restarts nitro
    assert "still alive" not in p.stdout
    assert (f"nitro: FATAL: an engine worker made system call {nr}, which its "
            "seccomp filter does not allow; aborting") in p.stderr


# -- everything a worker does, under the filter --------------------------------------

def blk_ring_work(sync_io: bool, xts: bool) -> None:
    engine = _datapath.Engine(1, sync_io=sync_io, seccomp=True)
    cipher = None
    if xts:
        key = secret_of(bytes(range(64)))
        cipher = XtsCipher(key, 512)
        key.close()
    with disk_file(CAPACITY * 512) as fd, FakeGuest([(GPA, 8 * MiB)]) as g:
        params = BlkParams(fd, CAPACITY, xts=cipher, max_discard_sectors=64,
                           max_write_zeroes_sectors=64)
        stats = BlkStats()
        ring = SplitRing(g, num=64)
        r = Ring.blk(ring.vq, params, stats)
        engine.attach(r, 0)
        reqs = [blk_req(g, VIRTIO_BLK_T_OUT, sector=8, out=b"\x5a" * 4096),
                blk_req(g, VIRTIO_BLK_T_FLUSH),
                blk_req(g, VIRTIO_BLK_T_IN, sector=8, in_len=4096),
                blk_req(g, VIRTIO_BLK_T_GET_ID, in_len=20),
                blk_req(g, VIRTIO_BLK_T_DISCARD, out=dwz_segment(16, 8)),
                blk_req(g, VIRTIO_BLK_T_WRITE_ZEROES, out=dwz_segment(24, 8))]
        for q in reqs:
            ring.add_chain(q.bufs)
            ring.kick()
            wait_used(ring, 1)
        assert [status_of(g, q) for q in reqs] == [VIRTIO_BLK_S_OK] * len(reqs)
        assert g.read(reqs[2].data_gpa, 4096) == b"\x5a" * 4096
        engine.detach(r)
        r.close()
        ring.close()
        params.close()
    engine.close()  # thread exit, under the filter
    print("served")


def net_ring_work() -> None:
    n = TwoGuests(seccomp=True)
    n.send([udp(PEER, PEER_IP, 1200), udp(PEER, PEER_IP, 64)])
    assert n.received(2, 2) == [udp(PEER, PEER_IP, 1200), udp(PEER, PEER_IP, 64)]
    n.send([udp("ff:ff:ff:ff:ff:ff", "10.0.0.255", 100)])  # broadcast: the slow path
    n.received(2, 1)
    print("served", flush=True)
    os._exit(0)


def test_every_kind_of_ring_is_served_under_the_filter() -> None:
    for code in ("blk_ring_work(sync_io=False, xts=False)",
                 "blk_ring_work(sync_io=True, xts=False)",
                 "blk_ring_work(sync_io=False, xts=True)",
                 "blk_ring_work(sync_io=True, xts=True)",
                 "net_ring_work()"):
        p = run_child(f"from tests.unit.test_seccomp import *; {code}")
        assert p.returncode == 0 and "served" in p.stdout, (code, p.stdout, p.stderr)
