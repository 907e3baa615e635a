"""The engine (nitro_engine.c, nitro/engine.py): C workers serving rings on
fake guest memory, requests in flight out of order, assignment and
rebalancing, errors reported through the event fd."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nitro import _datapath
from nitro._datapath import BlkParams, GuestFault, Ring
from nitro.engine import Engine
from tests.ringlayout import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    blk_header,
)
from tests.unit.test_datapath_inflight import Region
from tests.unit.virtq import (
    Buf,
    FakeGuest,
    MiB,
    SplitRing,
    blk_req,
    disk_file,
    fill,
    guarded_guest,
    status_of,
)

GPA = 0x1000_0000
CAPACITY = 4096  # sectors: 2 MiB
DISK = fill(CAPACITY * 512, seed=7)


@pytest.fixture
def guest() -> Iterator[FakeGuest]:
    with guarded_guest(GPA, 8 * MiB) as g:
        yield g


@pytest.fixture
def params() -> Iterator[BlkParams]:
    with disk_file(CAPACITY * 512, DISK) as fd:
        p = BlkParams(fd, CAPACITY)
        yield p
        p.close()


def wait_used(ring: SplitRing, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    """Used elements until n arrived (the worker runs in its own thread)."""
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} completed"
        got += ring.take_used()
        time.sleep(0.001)
    return got


def worker_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:
            pass  # a thread that just exited
    return sorted(n for n in names if n.startswith("nitro-w"))


# -- the C engine ----------------------------------------------------------------

def test_workers_are_threads_of_their_own_and_stop_with_it() -> None:
    e = _datapath.Engine(3)
    try:
        assert worker_threads() == ["nitro-w0", "nitro-w1", "nitro-w2"]
    finally:
        e.close()
    assert worker_threads() == []


def test_a_worker_serves_kicked_requests(guest, params, stats) -> None:
    e = _datapath.Engine(1)
    with SplitRing(guest, num=16) as ring:
        r = Ring.blk(ring.vq, params, stats)
        e.attach(r, 0)
        try:
            assert r.worker == 0
            reads = [blk_req(guest, VIRTIO_BLK_T_IN, sector=8 * k, in_len=4096) for k in range(4)]
            for q in reads:
                ring.add_chain(q.bufs)
            ring.kick()
            assert sorted(h for h, _ in wait_used(ring, 4)) == sorted(range(0, 12, 3))
            for k, q in enumerate(reads):
                assert status_of(guest, q) == VIRTIO_BLK_S_OK
                assert guest.read(q.data_gpa, 4096) == DISK[8 * k * 512:(8 * k + 8) * 512]
            # Chains served, each once (a read is not counted again when it completes).
            assert e.worker_stats(0)["chains"] == 4
        finally:
            e.detach(r)
            r.close()
            e.close()
    assert stats.snapshot()["ops"]["in"]["requests"] == 4


def requests_then_attach(engine, guest, params, stats, region=None):
    """A 32 KiB read, then a GET_ID, both waiting when the worker first looks
    (within one pass's 64 KiB of io_uring I/O)."""
    ring = SplitRing(guest, num=16)
    if region is not None:
        region.attach(ring.vq)
    read = blk_req(guest, VIRTIO_BLK_T_IN, sector=0, in_len=32 * 1024)
    get_id = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20)
    heads = [ring.add_chain(read.bufs), ring.add_chain(get_id.bufs)]
    r = Ring.blk(ring.vq, params, stats)
    engine.attach(r, 0)
    return ring, r, heads, read


def test_requests_in_flight_complete_out_of_order(guest, params, stats) -> None:
    """The read goes to io_uring; the GET_ID, answered while the ring is
    polled, reaches the used ring first. Inflight tracking stays exact."""
    e = _datapath.Engine(1)
    assert e.worker_stats(0)["uring"] == 1
    region = Region(queue_size=16)
    ring, r, (read_head, id_head), read = requests_then_attach(e, guest, params, stats, region)
    try:
        assert [h for h, _ in wait_used(ring, 2)] == [id_head, read_head]
        assert guest.read(read.data_gpa, 32 * 1024) == DISK[:32 * 1024]
        assert region.marked() == []  # nothing left marked in flight
        assert e.worker_stats(0)["io_submitted"] >= 1
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()
        region.close()


def test_a_pass_ends_after_64_kib_of_io_uring_io(guest, params, stats) -> None:
    """A pass takes requests until 64 KiB of io_uring I/O, then submits and
    tells the guest before taking more (ASYNC_PASS_BYTES in nitro_blk.c):
    the frontend gets the first completions while the rest is copied. So a
    GET_ID queued behind four 128 KiB reads (one a pass) is answered after
    the first read; taken in one pass, it would be answered first."""
    e = _datapath.Engine(1)
    ring = SplitRing(guest, num=16)
    reads = [blk_req(guest, VIRTIO_BLK_T_IN, sector=256 * k, in_len=128 * 1024) for k in range(4)]
    heads = [ring.add_chain(q.bufs) for q in reads]
    id_head = ring.add_chain(blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20).bufs)
    r = Ring.blk(ring.vq, params, stats)
    e.attach(r, 0)
    try:
        got = [h for h, _ in wait_used(ring, 5)]
        assert got[0] == heads[0] and got.index(id_head) > 0, got
        for k, q in enumerate(reads):
            assert guest.read(q.data_gpa, 128 * 1024) == DISK[k * 128 * 1024:(k + 1) * 128 * 1024]
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()


def test_a_pass_of_writes_calls_the_guest_every_64_kib(guest, params, stats) -> None:
    """Writes are served inline, many a pass (8 MiB); the guest is called
    after each 64 KiB of them (SYNC_CALL_BYTES in nitro_blk.c), not once
    at the end, so it refills its ring while the worker writes on. Four
    64 KiB writes waiting when the worker first looks: one pass, four
    calls (the ring has no EVENT_IDX: every call is signalled)."""
    e = _datapath.Engine(1)
    ring = SplitRing(guest, num=16)
    data = [fill(64 * 1024, seed=k) for k in range(4)]
    for k, d in enumerate(data):
        ring.add_chain(blk_req(guest, VIRTIO_BLK_T_OUT, sector=128 * k, out=d).bufs)
    r = Ring.blk(ring.vq, params, stats)
    e.attach(r, 0)
    try:
        wait_used(ring, 4)
        assert ring.calls() == 4
        assert e.worker_stats(0)["chains"] == 4
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()


def test_a_pass_shares_one_clock_read_but_a_slow_request_restarts_it(guest, params, stats) -> None:
    """Requests of a pass are timed from one clock read (nitro_batch_ns):
    a synchronous 1 MiB write refreshes it, so the GET_ID taken after it
    in the same pass is not charged the write's time."""
    e = _datapath.Engine(1)
    ring = SplitRing(guest, num=16)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_OUT, sector=0, out=fill(MiB, seed=3)).bufs)
    ring.add_chain(blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20).bufs)
    r = Ring.blk(ring.vq, params, stats)
    e.attach(r, 0)  # both wait when the worker first looks: one pass
    try:
        wait_used(ring, 2)
        latency = stats.snapshot()["latency"]
        write, get_id = latency["out"]["sum_seconds"], latency["get_id"]["sum_seconds"]
        assert write > 0 and get_id < write / 4, (write, get_id)
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()


def test_without_io_uring_requests_complete_in_order(guest, params, stats) -> None:
    e = _datapath.Engine(1, sync_io=True)
    assert e.worker_stats(0)["uring"] == 0
    ring, r, heads, read = requests_then_attach(e, guest, params, stats)
    try:
        assert [h for h, _ in wait_used(ring, 2)] == heads
        assert e.worker_stats(0)["io_submitted"] == 0
    finally:
        e.detach(r)
        r.close()
        e.close()
        ring.close()


def test_detach_completes_in_flight_writes_and_reenables_kicks(guest, params, stats) -> None:
    e = _datapath.Engine(1, poll_us=0)
    with SplitRing(guest, num=64) as ring:
        r = Ring.blk(ring.vq, params, stats)
        e.attach(r, 0)
        writes = [blk_req(guest, VIRTIO_BLK_T_OUT, sector=k, out=fill(512, seed=k)) for k in range(20)]
        for q in writes:
            ring.add_chain(q.bufs)
        ring.kick()
        e.detach(r)
        # Whatever the worker took is complete; the rest waits for the next owner.
        taken = ring.take_used()
        assert r.in_flight == 0 and r.worker is None
        assert ring.used_flags() == 0  # kicks enabled: nobody polls it now
        e.attach(r, 0)
        taken += wait_used(ring, 20 - len(taken))
        assert len(taken) == 20
        assert all(status_of(guest, q) == VIRTIO_BLK_S_OK for q in writes)
        e.detach(r)
        r.close()
        e.close()


def test_a_hostile_ring_stops_alone_and_is_reported(guest, params, stats) -> None:
    e = _datapath.Engine(1)
    with SplitRing(guest, num=16) as bad, SplitRing(guest, num=16) as good:
        rb, rg = Ring.blk(bad.vq, params, stats), Ring.blk(good.vq, params, stats)
        e.attach(rb, 0)
        e.attach(rg, 0)
        bad.publish(99)  # a head outside the ring
        bad.kick()
        assert select.select([e.event_fd], [], [], 5)[0], "no error event"
        with pytest.raises(GuestFault) as exc:
            rb.check()
        assert exc.value.kind == "desc_index"
        rg.check()  # the other ring still serves
        q = blk_req(guest, VIRTIO_BLK_T_IN, sector=0, in_len=512)
        good.add_chain(q.bufs)
        good.kick()
        assert len(wait_used(good, 1)) == 1
        for r in (rb, rg):
            e.detach(r)
            r.close()
        e.close()


def test_many_rings_on_two_workers_all_progress(guest, params, stats) -> None:
    """256 rings on 2 threads: every one is served (no thread per ring)."""
    e = _datapath.Engine(2)
    rings = [SplitRing(guest, num=4) for _ in range(256)]
    crings = [Ring.blk(s.vq, params, stats) for s in rings]
    try:
        for i, r in enumerate(crings):
            e.attach(r, i % 2)
        for s in rings:
            s.add_chain(blk_req(guest, VIRTIO_BLK_T_IN, sector=0, in_len=512).bufs)
            s.kick()
        for s in rings:
            assert len(wait_used(s, 1)) == 1
        assert sum(e.worker_stats(w)["rings"] for w in range(2)) == 256
    finally:
        for r in crings:
            e.detach(r)
            r.close()
        e.close()
        for s in rings:
            s.close()


def test_bad_engine_arguments() -> None:
    with pytest.raises(_datapath.HostError):
        _datapath.Engine(0)
    with pytest.raises(_datapath.HostError):
        _datapath.Engine(1, poll_us=_datapath.POLL_MAX_US + 1)
    with pytest.raises(ValueError):
        _datapath.Engine(2, cpus=[0])


# -- assignment (nitro/engine.py) -----------------------------------------------------

def test_rings_go_to_the_least_loaded_worker_and_rebalance(guest, params, stats) -> None:
    async def main() -> None:
        engine = Engine(2, poll_us=0)
        rings = [SplitRing(guest, num=8) for _ in range(5)]
        crings = [Ring.blk(s.vq, params, stats) for s in rings]
        try:
            workers = [await engine.attach(r, pytest.fail, label=f"r{i}") for i, r in enumerate(crings)]
            assert workers == [0, 1, 0, 1, 0]
            assert engine.load() == [3, 2]
            # Two rings of worker 1 leave: one of worker 0's moves over.
            await engine.detach(crings[1])
            await engine.detach(crings[3])
            assert sorted(engine.load()) == [1, 2]
            for r in crings[0::2]:
                assert r.worker == engine.worker_of(r)  # C and Python agree
            stats_ = engine.statistics()
            assert stats_["blk_io"] == "io_uring"
            assert sum(len(w["ring_labels"]) for w in stats_["workers"]) == 3
            for r in crings[0::2]:
                await engine.detach(r)
            assert engine.load() == [0, 0]
        finally:
            for r in crings:
                r.close()
            engine.close()
            for s in rings:
                s.close()

    trio.run(main)


def test_a_ring_error_calls_its_owner_back_once(guest, params, stats) -> None:
    async def main() -> None:
        engine = Engine(1)
        errors: list[Exception] = []
        reported = trio.Event()

        def on_error(e: Exception) -> None:
            errors.append(e)
            reported.set()

        with SplitRing(guest, num=8) as bad:
            r = Ring.blk(bad.vq, params, stats)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.watch)
                await engine.attach(r, on_error, label="bad")
                bad.publish(42)
                bad.kick()
                with trio.fail_after(5):
                    await reported.wait()
                engine.report_errors()  # again: already reported
                nursery.cancel_scope.cancel()
            assert len(errors) == 1 and isinstance(errors[0], GuestFault)
            await engine.detach(r)
            r.close()
        engine.close()

    trio.run(main)


def test_buffers_straddling_regions_are_served(params, stats) -> None:
    """A read whose buffer crosses from one memory region into the next is
    two iovecs: the in-flight copy of them must keep both."""
    with FakeGuest([(GPA, MiB), (GPA + MiB, MiB)]) as g, SplitRing(g, num=8) as ring:
        e = _datapath.Engine(1)
        r = Ring.blk(ring.vq, params, stats)
        hdr = g.alloc(16)
        g.write(hdr, blk_header(VIRTIO_BLK_T_IN, 0))
        data = GPA + MiB - 2048
        status = g.alloc(1, align=1)
        ring.add_chain([Buf(hdr, 16), Buf(data, 4096, writable=True), Buf(status, 1, writable=True)])
        e.attach(r, 0)
        try:
            assert len(wait_used(ring, 1)) == 1
            assert g.read(status, 1) == bytes([VIRTIO_BLK_S_OK])
            assert g.read(data, 2048) + g.read(GPA + MiB, 2048) == DISK[:4096]
        finally:
            e.detach(r)
            r.close()
            e.close()
