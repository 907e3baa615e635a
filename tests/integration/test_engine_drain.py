"""Detaching a remote ring whose server hangs (nitro_engine.c "Draining"):
the ring drains on its worker between the worker's other rings, so the
other tenants' rings on that worker keep serving and other rings attach
while it drains; the detach returns once every request the guest awaited
was answered, by the server or at its io_timeout. One worker, a real
nbdkit (stopped with SIGSTOP: a hung server), fake guest memory
(tests/unit/virtq.py) playing the drivers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from bench.ceph import CephCluster, ceph_cluster
from bench.nbd import NbdKit
from bench.proc import REPO
from nitro import _datapath
from nitro._datapath import BlkParams, BlkStats, GuestFault, NbdConn, NbdHandle, RbdImage, Ring
from nitro.engine import Engine
from nitro.metrics import NitroCollector
from tests.ringlayout import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from tests.unit.test_engine import wait_used
from tests.unit.virtq import GPA, FakeGuest, MiB, SplitRing, blk_req, disk_file, fill, guarded_guest, status_of

pytestmark = pytest.mark.integration

CAPACITY = 2048  # sectors: 1 MiB, the export and the local disk
WRITES = 4       # A's writes the hung server holds


def until(what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    with guarded_guest(GPA, 8 * MiB) as g:
        yield g


@pytest.fixture
def image(short_tmp_path: Path) -> Path:
    path = short_tmp_path / "export.img"
    path.write_bytes(bytes(CAPACITY * 512))
    return path


class RemoteRing:
    """Ring A: a blk ring on the NBD export, connected before it starts
    (on an RBD image: RbdRing)."""

    def __init__(self, guest: FakeGuest, server: NbdKit | None, io_timeout: float) -> None:
        self.params = BlkParams(-1, CAPACITY, io_timeout_ns=int(io_timeout * 1e9))
        self.stats = BlkStats()
        self.vring = SplitRing(guest, num=16)
        self.ring = self._ring(server, io_timeout)
        self.writes = [blk_req(guest, VIRTIO_BLK_T_OUT, sector=8 * k, out=fill(4096, seed=k + 1))
                       for k in range(WRITES)]

    def _ring(self, server: NbdKit | None, io_timeout: float) -> Ring:
        assert server is not None
        self.want_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.conn = NbdConn(self.want_fd, int(io_timeout * 1e9))
        self.conn.offer(NbdHandle(server.url()))
        return Ring.nbd(self.vring.vq, self.params, self.stats, self.conn)

    def written(self, data: bytes) -> bool:
        """Every write of start_writes is in `data` (the volume's bytes)."""
        return all(data[8 * k * 512:(8 * k + 8) * 512] == fill(4096, seed=k + 1) for k in range(WRITES))

    def start_writes(self) -> None:
        for q in self.writes:
            self.vring.add_chain(q.bufs)
        self.vring.kick()
        until("the worker took A's writes", lambda: self.stats.snapshot()["inflight"] == WRITES)

    def start_reads(self) -> list:
        """As many 4 KiB reads as start_writes writes; their requests."""
        reads = [blk_req(self.vring.guest, VIRTIO_BLK_T_IN, sector=8 * k, in_len=4096)
                 for k in range(WRITES)]
        for q in reads:
            self.vring.add_chain(q.bufs)
        self.vring.kick()
        until("the worker took A's reads", lambda: self.stats.snapshot()["inflight"] == WRITES)
        return reads

    def close(self) -> None:
        self.ring.close()
        self.vring.close()
        self.params.close()
        self._close_source()

    def _close_source(self) -> None:
        self.conn.close()
        os.close(self.want_fd)


class LocalRing:
    """Another tenant's ring on a local file (B, C)."""

    def __init__(self, guest: FakeGuest, fd: int) -> None:
        self.guest = guest
        self.params = BlkParams(fd, CAPACITY)
        self.stats = BlkStats()
        self.vring = SplitRing(guest, num=16)
        self.ring = Ring.blk(self.vring.vq, self.params, self.stats)

    def read_one(self, sector: int) -> None:
        """One request, its answer awaited (the worker serves it or not)."""
        q = blk_req(self.guest, VIRTIO_BLK_T_IN, sector=sector, in_len=4096)
        self.vring.add_chain(q.bufs)
        self.vring.kick()
        wait_used(self.vring, 1, timeout=10)
        assert status_of(self.guest, q) == VIRTIO_BLK_S_OK

    def close(self) -> None:
        self.ring.close()
        self.vring.close()
        self.params.close()


def draining(engine: _datapath.Engine) -> int:
    return engine.worker_stats(0)["draining"]


def freeze(pid: int) -> None:
    """SIGSTOP pid and return once every thread of it is stopped (a
    thread still running could answer a request sent after this)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                      for t in Path(f"/proc/{pid}/task").iterdir()]
        except FileNotFoundError:
            return False  # a thread that just exited: look again
        return all(st == "T" for st in states)

    until(f"{pid} stopped", stopped)


def stop(server: NbdKit) -> None:
    freeze(server.proc.pid)


def resume(server: NbdKit) -> None:
    os.kill(server.proc.pid, signal.SIGCONT)


def drain_beside_others(guest: FakeGuest, a: RemoteRing, hang: Callable[[], None],
                        resume_: Callable[[], None], volume: Callable[[], bytes]) -> None:
    """A's writes hang (hang()) when its detach starts: B, on the same
    (only) worker, keeps serving and C attaches and serves while A drains.
    The server resumes: A's writes are acknowledged (each once) and in
    volume(), and only then does A's detach return."""
    engine = _datapath.Engine(1, poll_us=0)
    with disk_file(CAPACITY * 512) as fd:
        b, c = LocalRing(guest, fd), LocalRing(guest, fd)
        try:
            engine.attach(a.ring, 0)
            engine.attach(b.ring, 0)
            hang()
            a.start_writes()
            detach = threading.Thread(target=engine.detach, args=(a.ring,))
            detach.start()
            until("A drains", lambda: draining(engine) == 1)
            for k in range(20):
                b.read_one(8 * k)
            engine.attach(c.ring, 0)
            c.read_one(0)
            # All of that while A's requests still waited for the server.
            assert draining(engine) == 1 and detach.is_alive()
            assert a.vring.take_used() == []
            resume_()
            detach.join(timeout=60)
            assert not detach.is_alive(), "A's detach never returned"
            assert a.ring.worker is None and draining(engine) == 0
            assert len(a.vring.take_used()) == WRITES  # each answered once
            assert [status_of(guest, q) for q in a.writes] == [VIRTIO_BLK_S_OK] * WRITES
            assert a.stats.snapshot()["inflight"] == 0
            assert a.written(volume())
            b.read_one(0)  # B still served after A left
        finally:
            resume_()
            for r in (a, b, c):
                engine.detach(r.ring)
            b.close()
            c.close()
            engine.close()


def test_a_draining_nbd_ring_holds_neither_its_worker_nor_attaches(guest, image, short_tmp_path):
    server = NbdKit(short_tmp_path, ["file", str(image)])
    a = RemoteRing(guest, server, io_timeout=60)
    try:
        drain_beside_others(guest, a, lambda: stop(server), lambda: resume(server), image.read_bytes)
    finally:
        a.close()
        server.kill()


@pytest.mark.parametrize("quit_meanwhile", [False, True])
def test_a_drain_ends_at_io_timeout_with_ioerr(guest, image, short_tmp_path, quit_meanwhile):
    """The server never answers: the drain ends at A's io_timeout, every
    write answered IOERR exactly once. Freeing the engine meanwhile: the
    worker quits once the drain ended, and the detach caller is woken."""
    engine = _datapath.Engine(1)
    server = NbdKit(short_tmp_path, ["file", str(image)])
    a = RemoteRing(guest, server, io_timeout=2)
    try:
        engine.attach(a.ring, 0)
        stop(server)
        a.start_writes()
        detach = threading.Thread(target=engine.detach, args=(a.ring,))
        detach.start()
        if quit_meanwhile:
            until("A drains", lambda: draining(engine) == 1)
            engine.close()
        detach.join(timeout=20)
        assert not detach.is_alive(), "A's detach never returned"
        assert a.ring.worker is None
        assert len(a.vring.take_used()) == WRITES
        assert [status_of(guest, q) for q in a.writes] == [VIRTIO_BLK_S_IOERR] * WRITES
        assert a.conn.stats()["timeouts"] == WRITES
        assert a.stats.snapshot()["inflight"] == 0
    finally:
        engine.close()
        a.close()
        server.kill()


async def until_draining(engine: Engine, worker: int) -> None:
    await trio.to_thread.run_sync(until, f"worker {worker} drains",
                                  lambda: engine.statistics()["workers"][worker]["draining"] == 1)


def run_resumed(engine: Engine, server: NbdKit, guest: FakeGuest, a: RemoteRing, others: list,
                errors: list[Exception], main: Callable, *args: object) -> None:
    """Run a control-plane scenario whose server main() resumes: A's writes
    were all answered OK, no ring was reported; then close everything."""
    try:
        trio.run(main, *args)
        assert [status_of(guest, q) for q in a.writes] == [VIRTIO_BLK_S_OK] * WRITES
        assert errors == []
    finally:
        resume(server)
        engine.close()
        for r in (a, *others):
            r.close()
        server.kill()


def draining_metric(engine: Engine) -> dict[str, float]:
    """nitro_engine_draining_rings per worker, as a scrape reads it."""
    fams = {m.name: m for m in NitroCollector(lambda: [], get_engine=engine.statistics).collect()}
    return {s.labels["worker"]: s.value for s in fams["nitro_engine_draining_rings"].samples}


def test_the_control_plane_attaches_while_a_ring_drains(guest, image, short_tmp_path):
    """nitro/engine.py: Engine.detach waits for a drain without its lock
    (and without the one engine thread it used to have), so another
    device's ring attaches meanwhile."""
    engine = Engine(1, poll_us=0)
    server = NbdKit(short_tmp_path, ["file", str(image)])
    errors: list[Exception] = []

    async def main(a: RemoteRing, c: LocalRing) -> None:
        await engine.attach(a.ring, errors.append, label="a")
        stop(server)
        a.start_writes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.detach, a.ring)
            await until_draining(engine, 0)
            with trio.fail_after(30):  # not the drain's 60 s
                assert await engine.attach(c.ring, errors.append, label="c") == 0
            assert engine.statistics()["workers"][0]["draining"] == 1
            assert draining_metric(engine) == {"0": 1}
            assert engine.worker_of(a.ring) is None  # no rebalancing can pick it
            resume(server)
        assert a.ring.worker is None and c.ring.worker == 0
        assert draining_metric(engine) == {"0": 0}
        await engine.detach(c.ring)

    with disk_file(CAPACITY * 512) as fd:
        a, c = RemoteRing(guest, server, io_timeout=60), LocalRing(guest, fd)
        run_resumed(engine, server, guest, a, [c], errors, main, a, c)


def test_a_rebalancing_move_drains_off_the_lock(guest, image, short_tmp_path):
    """Rebalancing moves A (hung writes) to the other worker: the move's
    detach drains without the lock, so another ring attaches meanwhile;
    A serves on its new worker once its writes were answered."""
    engine = Engine(2, poll_us=0)
    server = NbdKit(short_tmp_path, ["file", str(image)])
    errors: list[Exception] = []

    async def main(a: RemoteRing, locals_: list[LocalRing]) -> None:
        x, w, y, z, c = locals_
        assert [await engine.attach(r.ring, errors.append) for r in (x, a, w, z, y)] == [0, 1, 0, 1, 0]
        stop(server)
        a.start_writes()
        await engine.detach(x.ring)
        await engine.detach(y.ring)  # [1, 2]: nothing moves yet
        assert a.ring.worker == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.detach, w.ring)  # [0, 2]: A, first of worker 1, moves
            await until_draining(engine, 1)
            with trio.fail_after(30):  # not the drain's 60 s
                await engine.attach(c.ring, errors.append)
            assert engine.statistics()["workers"][1]["draining"] == 1
            resume(server)
        assert a.ring.worker == engine.worker_of(a.ring) == 0
        assert sorted(engine.load()) == [1, 2]
        for r in (a, z, c):
            await engine.detach(r.ring)

    with disk_file(CAPACITY * 512) as fd:
        a = RemoteRing(guest, server, io_timeout=60)
        locals_ = [LocalRing(guest, fd) for _ in range(5)]
        run_resumed(engine, server, guest, a, locals_, errors, main, a, locals_)


def truncated_while_draining(tmp: str, rbd: dict | None = None) -> None:
    """A child interpreter's scenario (a SIGBUS not recovered kills it,
    not the test run): A's guest memory vanishes while A drains; the
    server (nbdkit, or with `rbd` the cluster's OSD) then answers. The
    answers break A (fault "memory") instead of the process, the drain
    still ends with no request left counted in flight, B on the same
    worker serves on."""
    victim, other = FakeGuest([(GPA, 8 * MiB)]), FakeGuest([(GPA, 8 * MiB)])
    if rbd is None:
        image = Path(tmp) / "export.img"
        image.write_bytes(bytes(CAPACITY * 512))
        server = NbdKit(Path(tmp), ["file", str(image)])
        a: RemoteRing = RemoteRing(victim, server, io_timeout=60)
        hang, resume_ = (lambda: stop(server)), (lambda: resume(server))
    else:
        cluster = CephCluster(tmp=Path(tmp), conf=Path(rbd["conf"]), keyring=Path(rbd["keyring"]),
                              pool=rbd["pool"], user=rbd["user"])
        a = RbdRing(victim, cluster, rbd["image"], io_timeout=60)
        hang, resume_ = (lambda: freeze(rbd["osd"])), (lambda: os.kill(rbd["osd"], signal.SIGCONT))
    engine = _datapath.Engine(1, poll_us=0)
    with disk_file(CAPACITY * 512) as fd:
        b = LocalRing(other, fd)
        engine.attach(a.ring, 0)
        engine.attach(b.ring, 0)
        hang()
        a.start_writes()
        detach = threading.Thread(target=engine.detach, args=(a.ring,), daemon=True)
        detach.start()
        until("A drains", lambda: draining(engine) == 1)
        os.ftruncate(victim.fd, 0)  # the frontend takes A's guest RAM away
        resume_()
        detach.join(timeout=30)
        assert not detach.is_alive(), "A's drain never ended"
        with pytest.raises(GuestFault) as e:
            a.ring.check()
        assert e.value.kind == "memory"
        assert a.stats.snapshot()["inflight"] == 0
        b.read_one(0)
    if rbd is None:
        server.kill()
    print("survived", flush=True)
    os._exit(0)  # no finalizers: nothing may read the truncated guest


def run_in_child(tmp: Path, rbd: dict | None = None,
                 scenario: str = "truncated_while_draining") -> None:
    """One of this file's child scenarios (a SIGBUS not recovered kills the
    child, not the test run); it must print "survived"."""
    code = (f"from tests.integration.test_engine_drain import *; "
            f"{scenario}({str(tmp)!r}, {rbd!r})")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0 and "survived" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_a_ring_whose_memory_vanishes_while_draining_still_drains(short_tmp_path):
    run_in_child(short_tmp_path)


# -- RBD ---------------------------------------------------------------------------

class RbdRing(RemoteRing):
    """Ring A on an RBD image (librbd's aio: the ring's own drain op)."""

    def __init__(self, guest: FakeGuest, cluster: CephCluster, image: str, io_timeout: float) -> None:
        self.cluster, self.image_name = cluster, image
        super().__init__(guest, None, io_timeout)

    def _ring(self, server: NbdKit | None, io_timeout: float) -> Ring:
        c = self.cluster
        self.image = RbdImage(str(c.conf), c.user, str(c.keyring), c.pool, self.image_name, False)
        return Ring.blk_rbd(self.vring.vq, self.image, self.params, self.stats)

    def _close_source(self) -> None:
        self.image.close()

    def exported(self) -> bytes:
        return self.cluster.rbd("export", f"{self.cluster.pool}/{self.image_name}", "-")


@pytest.fixture(scope="module")
def cluster() -> Iterator[CephCluster]:
    with ceph_cluster() as c:
        yield c


def test_a_draining_rbd_ring_holds_neither_its_worker_nor_attaches(guest, cluster):
    """The OSD stopped (SIGSTOP: librbd waits for it) under A's writes."""
    cluster.rbd("create", "--size", f"{CAPACITY * 512 >> 20}M", f"{cluster.pool}/drain")
    osd = cluster.pids()["osd"]
    a = RbdRing(guest, cluster, "drain", io_timeout=60)
    try:
        drain_beside_others(guest, a, lambda: freeze(osd),
                            lambda: os.kill(osd, signal.SIGCONT), a.exported)
    finally:
        os.kill(osd, signal.SIGCONT)
        a.close()


def memory_fault(ring: Ring) -> bool:
    try:
        ring.check()
    except GuestFault as e:
        assert e.kind == "memory", e
        return True
    return False


@contextmanager
def rbd_reads_waiting(tmp: str, rbd: dict, io_timeout: float) -> Iterator[tuple]:
    """A child's setup: ring A on the RBD image and B on a local file, on
    one worker; the OSD frozen (librbd waits for it) under A's reads.
    Yields (A's guest, A, B, the engine, A's reads)."""
    victim, other = FakeGuest([(GPA, 8 * MiB)]), FakeGuest([(GPA, 8 * MiB)])
    cluster = CephCluster(tmp=Path(tmp), conf=Path(rbd["conf"]), keyring=Path(rbd["keyring"]),
                          pool=rbd["pool"], user=rbd["user"])
    a = RbdRing(victim, cluster, rbd["image"], io_timeout=io_timeout)
    engine = _datapath.Engine(1, poll_us=0)
    with disk_file(CAPACITY * 512) as fd:
        b = LocalRing(other, fd)
        engine.attach(a.ring, 0)
        engine.attach(b.ring, 0)
        freeze(rbd["osd"])
        yield victim, a, b, engine, a.start_reads()


def truncated_under_rbd_reads(tmp: str, rbd: dict) -> None:
    """A child interpreter's scenario: A's plain reads wait for the frozen
    OSD, A's guest memory vanishes, the OSD answers. librbd's own thread
    copies a read's data into the guest (nitro_rbd.c, rbd_read_deliver):
    its fault there, inside that copy's guard, breaks A (fault "memory"),
    not the process; A's requests all leave flight and B, on the same
    worker, serves on."""
    with rbd_reads_waiting(tmp, rbd, io_timeout=60) as (victim, a, b, engine, _):
        os.ftruncate(victim.fd, 0)  # the frontend takes A's guest RAM away
        os.kill(rbd["osd"], signal.SIGCONT)
        until("A breaks", lambda: memory_fault(a.ring), timeout=60)
        engine.detach(a.ring)
        assert a.stats.snapshot()["inflight"] == 0
        b.read_one(0)
    print("survived", flush=True)
    os._exit(0)  # no finalizers: nothing may read the truncated guest


def expired_after_memory_vanished(tmp: str, rbd: dict) -> None:
    """A child interpreter's scenario: A's reads wait for the frozen OSD,
    the part of A's guest memory past its ring (the requests' buffers)
    vanishes, and A's io_timeout (1 s) passes: the first IOERR answer
    faults on its status byte (the ring breaks, "memory"). That request
    left the awaited list before its answer, so A's detach neither waits
    for librbd (the OSD still frozen) nor later walks a request librbd's
    completion freed. B, on the same worker, serves on."""
    with rbd_reads_waiting(tmp, rbd, io_timeout=1) as (victim, a, b, engine, reads):
        # The ring's pages stay (allocated first), the requests' go: the
        # worker's wake-up at the deadline re-arms the ring without a fault.
        first = victim._off(reads[0].bufs[0].gpa, 1)
        os.ftruncate(victim.fd, -(-first // 4096) * 4096)
        until("A breaks at its io_timeout", lambda: memory_fault(a.ring), timeout=30)
        engine.detach(a.ring)  # nothing awaited: at once, the OSD still frozen
        # The answer the fault cut short stays counted while the broken ring
        # lives (docs/security.md), and no longer once it is freed.
        assert a.stats.snapshot()["inflight"] == 1
        a.ring.close()
        assert a.stats.snapshot()["inflight"] == 0
        os.kill(rbd["osd"], signal.SIGCONT)
        b.read_one(0)
        time.sleep(2)  # librbd completes the orphans meanwhile
        b.read_one(8)
    print("survived", flush=True)
    os._exit(0)  # no finalizers: nothing may read the truncated guest


def run_on_written_image(cluster: CephCluster, tmp: Path, image: str, scenario: str) -> None:
    """`scenario` in a child, on a new image written first (librbd answers
    a read of an object never written itself, without the OSD)."""
    data = tmp / "data"
    data.write_bytes(fill(CAPACITY * 512, seed=7))
    cluster.rbd("import", str(data), f"{cluster.pool}/{image}")
    osd = cluster.pids()["osd"]
    rbd = {"conf": str(cluster.conf), "keyring": str(cluster.keyring), "pool": cluster.pool,
           "user": cluster.user, "image": image, "osd": osd}
    try:
        run_in_child(tmp, rbd, scenario=scenario)
    finally:
        os.kill(osd, signal.SIGCONT)


def test_an_rbd_ring_past_its_io_timeout_with_its_memory_gone_still_detaches(cluster,
                                                                             short_tmp_path):
    run_on_written_image(cluster, short_tmp_path, "expire-rd", "expired_after_memory_vanished")


def test_an_rbd_read_whose_memory_vanishes_breaks_only_its_ring(cluster, short_tmp_path):
    run_on_written_image(cluster, short_tmp_path, "vanish-rd", "truncated_under_rbd_reads")


def test_an_rbd_ring_whose_memory_vanishes_while_draining_still_drains(cluster, short_tmp_path):
    """As for NBD: librbd's answers reach a ring whose guest memory is
    gone; the one being answered when the fault hit and those reaped with
    it are let go, not leaked (each counted out of flight once)."""
    cluster.rbd("create", "--size", f"{CAPACITY * 512 >> 20}M", f"{cluster.pool}/vanish")
    osd = cluster.pids()["osd"]
    rbd = {"conf": str(cluster.conf), "keyring": str(cluster.keyring), "pool": cluster.pool,
           "user": cluster.user, "image": "vanish", "osd": osd}
    try:
        run_in_child(short_tmp_path, rbd)
    finally:
        os.kill(osd, signal.SIGCONT)
