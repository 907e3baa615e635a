"""Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split
layout) in the C datapath, on fake guest memory and a memfd region.

A "crash" is played two ways: by writing into the region what a backend
that died mid-request leaves there (deterministic, one case per test), and
by really SIGKILLing a forked child while it serves (the kill lands
anywhere; only what must hold wherever it lands is asserted).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator

import pytest

from nitro._datapath import (
    BlkParams,
    BlkStats,
    FrontendError,
    GuestFault,
    Virtqueue,
    blk_serve,
)
from tests.ringlayout import (
    INFLIGHT_DESC,
    INFLIGHT_HEADER,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    inflight_desc_offset,
)
from tests.unit.virtq import (
    CAPACITY,
    FakeGuest,
    InflightBuffer,
    SplitRing,
    blk_req,
    crash,
    fill,
    fork_server,
    status_of,
)

NUM = 16  # also the `ring` fixture's size (tests/unit/conftest.py)


class Region(InflightBuffer):
    """A split ring's inflight region, read and written field by field."""

    def __init__(self, queue_size: int = NUM) -> None:
        super().__init__(queue_size)

    def header(self) -> tuple[int, int, int, int, int]:
        return INFLIGHT_HEADER.unpack_from(self.mm, 0)

    def set_header(self, **kw: int) -> None:
        names = ("features", "version", "desc_num", "last_batch_head", "used_idx")
        values = dict(zip(names, self.header())) | kw
        INFLIGHT_HEADER.pack_into(self.mm, 0, *(values[n] for n in names))

    def desc(self, i: int) -> tuple[int, int, int]:
        return INFLIGHT_DESC.unpack_from(self.mm, inflight_desc_offset(i))

    def set_desc(self, i: int, inflight: int, counter: int, next: int = 0) -> None:
        INFLIGHT_DESC.pack_into(self.mm, inflight_desc_offset(i), inflight, next, counter)

    def marked(self) -> list[int]:
        entries = (self.size - INFLIGHT_HEADER.size) // INFLIGHT_DESC.size
        return [i for i in range(entries) if self.desc(i)[0]]


@pytest.fixture
def region() -> Iterator[Region]:
    r = Region()
    yield r
    r.close()


def write_req(guest: FakeGuest, n: int):
    return blk_req(guest, VIRTIO_BLK_T_OUT, sector=n, out=fill(512, seed=n))


def restarted(ring: SplitRing, region: Region, base: int | None = None) -> Virtqueue:
    """A new backend's queue on the same guest memory and region, as QEMU
    sets it up after we crashed: base is the used index."""
    vq = Virtqueue(0)
    vq.set_num(ring.num)
    vq.base = ring.used_idx() if base is None else base
    vq.set_addr(ring.guest.mem, ring.guest.uaddr(ring.desc), ring.guest.uaddr(ring.avail),
                ring.guest.uaddr(ring.used))
    vq.set_fds(ring.kick_fd, ring.call_fd)
    region.attach(vq)
    return vq


def serve_some(ring: SplitRing, guest: FakeGuest, params: BlkParams, stats: BlkStats,
               first: int, count: int) -> list[int]:
    heads = [ring.add_chain(write_req(guest, first + k).bufs) for k in range(count)]
    assert blk_serve(ring.vq, params, stats, 0) == count
    assert [h for h, _ in ring.take_used()] == heads
    return heads


# -- recording ----------------------------------------------------------------

def test_a_fresh_region_is_initialised_and_records_every_request(
        guest, ring, region, params, stats):
    region.attach(ring.vq)
    heads = serve_some(ring, guest, params, stats, 0, 3)
    features, version, desc_num, last_batch_head, used_idx = region.header()
    assert (features, version, desc_num) == (0, 1, NUM)
    assert (last_batch_head, used_idx) == (heads[-1], 3)
    assert region.marked() == []
    counters = [region.desc(h)[2] for h in heads]
    assert counters == sorted(counters) and len(set(counters)) == 3
    # The batch list: each completed head links to the one before it.
    assert region.desc(heads[2])[1] == heads[1] and region.desc(heads[1])[1] == heads[0]
    assert stats.snapshot()["resubmitted"] == 0


def test_a_region_too_small_for_the_ring_is_refused(ring):
    small = Region(queue_size=NUM // 2)
    try:
        with pytest.raises(FrontendError):
            small.attach(ring.vq)
        vq = Virtqueue(1)
        small.attach(vq)  # no size yet: fine
        with pytest.raises(FrontendError):
            vq.set_num(NUM)
        vq.set_num(NUM // 2)
        vq.set_inflight(None)
        vq.close()
        with pytest.raises(ValueError):
            small.mapped.pointer(8, small.size)
    finally:
        small.close()


# -- crash and restart ----------------------------------------------------------

def test_requests_in_flight_at_a_crash_are_resubmitted_in_counter_order(
        guest, ring, region, params, stats, disk):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 2)
    # The dead backend had fetched three more (an out-of-order backend: its
    # fetch counters do not follow the avail order) and completed none.
    reqs = [write_req(guest, 10 + k) for k in range(3)]
    heads = [ring.add_chain(r.bufs) for r in reqs]
    for h, counter in zip(heads, (9, 7, 8)):
        region.set_desc(h, 1, counter)
    ring.vq.close()

    vq = restarted(ring, region)
    try:
        assert vq.base == 2
        assert blk_serve(vq, params, stats, 0) == 3
        assert [h for h, _ in ring.take_used()] == [heads[1], heads[2], heads[0]]
        assert all(status_of(guest, r) == VIRTIO_BLK_S_OK for r in reqs)
        assert all(os.pread(disk, 512, (10 + k) * 512) == fill(512, seed=10 + k) for k in range(3))
        assert stats.snapshot()["resubmitted"] == 3
        assert region.marked() == [] and region.header()[4] == 5
        # Those avail slots were consumed: the next request is new work.
        assert vq.base == 5
        ring.vq = vq
        [h] = serve_some(ring, guest, params, stats, 20, 1)
        assert stats.snapshot()["resubmitted"] == 3
    finally:
        vq.close()


def test_a_torn_last_batch_is_repaired_not_resubmitted(guest, ring, region, params, stats):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 2)
    [h] = serve_some(ring, guest, params, stats, 2, 1)
    # Killed after publishing used->idx = 3 and before clearing the flag and
    # recording used_idx: the request is done, the region does not know yet.
    region.set_desc(h, 1, region.desc(h)[2], next=region.desc(h)[1])
    region.set_header(used_idx=2)
    ring.vq.close()

    vq = restarted(ring, region)
    try:
        assert blk_serve(vq, params, stats, 0) == 0
        assert ring.take_used() == []
        assert region.marked() == [] and region.header()[4] == 3
        assert vq.base == 3 and stats.snapshot()["resubmitted"] == 0
    finally:
        vq.close()


def test_a_clean_stop_and_start_resubmits_nothing(guest, ring, region, params, stats):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 4)
    base = ring.vq.base  # GET_VRING_BASE, then SET_VRING_BASE on restart
    ring.vq.close()
    vq = restarted(ring, region, base=base)
    try:
        assert blk_serve(vq, params, stats, 0) == 0
        assert vq.base == 4 and stats.snapshot()["resubmitted"] == 0
    finally:
        vq.close()


# -- hostile regions and rings: a guest fault, never a crash -------------------------

def _head_out_of_range(ring, region, big):
    big.set_desc(NUM + 3, 1, 1)
    return big


def _every_entry_marked(ring, region, big):
    for i in range(NUM):
        region.set_desc(i, 1, i)
    return region


def _unknown_version(ring, region, big):
    region.set_header(version=7)
    return region


def _batch_larger_than_the_ring(ring, region, big):
    region.set_header(used_idx=(ring.used_idx() - NUM - 1) & 0xFFFF)
    return region


def _batch_head_out_of_range(ring, region, big):
    region.set_header(used_idx=(ring.used_idx() - 1) & 0xFFFF, last_batch_head=NUM + 100)
    return region


@pytest.mark.parametrize("corrupt", [
    _head_out_of_range, _every_entry_marked, _unknown_version, _batch_larger_than_the_ring,
    _batch_head_out_of_range,
], ids=lambda f: f.__name__.strip("_"))
def test_a_hostile_region_is_a_guest_fault(guest, ring, region, params, stats, corrupt):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 2)
    big = Region(queue_size=2 * NUM)  # room for heads the ring cannot have
    try:
        big.set_header(version=1, desc_num=NUM, used_idx=ring.used_idx())
        target = corrupt(ring, region, big)
        ring.vq.close()
        vq = restarted(ring, target)
        try:
            with pytest.raises(GuestFault) as e:
                blk_serve(vq, params, stats, 0)
            assert e.value.kind == "inflight" and vq.fault == "inflight"
            assert vq.stats()["faults"]["inflight"] == 1
        finally:
            vq.close()
    finally:
        big.close()


def test_equal_counters_are_served_once_each_in_head_order(guest, ring, region, params, stats):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 1)
    reqs = [write_req(guest, 5 + k) for k in range(3)]
    heads = [ring.add_chain(r.bufs) for r in reqs]
    for h in heads:
        region.set_desc(h, 1, 42)
    ring.vq.close()
    vq = restarted(ring, region)
    try:
        assert blk_serve(vq, params, stats, 0) == 3
        assert [h for h, _ in ring.take_used()] == sorted(heads)
        assert region.marked() == []
    finally:
        vq.close()


def test_a_resubmitted_head_whose_chain_is_broken_is_a_guest_fault(
        guest, ring, region, params, stats):
    region.attach(ring.vq)
    serve_some(ring, guest, params, stats, 0, 1)
    req = write_req(guest, 3)
    head = ring.add_chain(req.bufs)
    region.set_desc(head, 1, 99)
    ring.write_desc(head, 0xDEAD_0000, 16)  # the guest rewrote it: not guest memory
    ring.vq.close()
    vq = restarted(ring, region)
    try:
        with pytest.raises(GuestFault) as e:
            blk_serve(vq, params, stats, 0)
        assert e.value.kind == "desc_addr"
    finally:
        vq.close()


# -- a real SIGKILL, anywhere -------------------------------------------------------------

def test_sigkill_while_serving_loses_and_repeats_no_completion(guest, region, disk):
    """A child serves while the parent plays the driver (at most 5 requests
    outstanding); the child is killed at a random moment and a new queue
    takes over. Requests are in flight together and may complete in any
    order; whatever instruction the kill hit, every request is completed
    exactly once, with its data on disk."""
    rng = random.Random(1234)
    ring = SplitRing(guest, num=64)
    # O_DSYNC makes each write slow enough (on a disk; not on tmpfs) for the
    # kill to land inside one now and then, which exercises resubmission.
    slow = os.open(f"/proc/self/fd/{disk}", os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC)
    params = BlkParams(slow, CAPACITY)
    stats = BlkStats()
    region_big = Region(queue_size=64)
    region_big.attach(ring.vq)
    outstanding: dict = {}  # head -> (request, sector)
    done = 0
    sector = 0
    kills = 4

    def submit_up_to_five() -> None:
        nonlocal sector
        while len(outstanding) < 5:
            req = write_req(guest, sector % CAPACITY)
            outstanding[ring.add_chain(req.bufs)] = (req, sector % CAPACITY)
            sector += 1

    def complete_used() -> int:
        n = 0
        for head, _ in ring.take_used():
            req, sec = outstanding.pop(head)  # KeyError: completed twice or never sent
            assert status_of(guest, req) == VIRTIO_BLK_S_OK
            assert os.pread(disk, 512, sec * 512) == fill(512, seed=sec)
            n += 1
        return n

    try:
        for _ in range(kills):
            pid = fork_server(ring.vq, params, stats)
            target = done + rng.randint(1, 40)
            while done < target:
                submit_up_to_five()
                ring.kick()
                done += complete_used()
            # Kill it while it is busy: fresh work, then a moment's grace.
            submit_up_to_five()
            ring.kick()
            time.sleep(rng.random() * 0.001)
            crash(pid)
            done += complete_used()
            old = ring.vq
            ring.vq = restarted(ring, region_big)
            old.close()
            # The new backend finishes everything the old one left.
            assert blk_serve(ring.vq, params, stats, 0) == len(outstanding)
            done += complete_used()
            assert not outstanding and region_big.marked() == []
        # Each kill can leave at most the 5 outstanding requests in flight.
        assert stats.snapshot()["resubmitted"] <= 5 * kills
    finally:
        ring.close()
        region_big.close()
        params.close()
        os.close(slow)
        stats.close()


def test_sigkill_with_requests_completing_out_of_order(guest, disk):
    """Reads go through io_uring and GET_IDs are answered while the ring is
    polled, so a batch of both completes out of order. A child serving such
    batches is SIGKILLed at random moments; after each restart every request
    is completed exactly once (no head lost, none twice) with the right data,
    and the region ends with nothing marked."""
    rng = random.Random(99)
    content = fill(CAPACITY * 512, seed=5)
    os.pwrite(disk, content, 0)
    ring = SplitRing(guest, num=64)
    params = BlkParams(disk, CAPACITY)
    stats = BlkStats()
    region = Region(queue_size=64)
    region.attach(ring.vq)
    outstanding: dict = {}  # head -> (request, sector or None for GET_ID), in submission order
    out_of_order = 0
    sector = 0

    def submit_batch() -> None:
        nonlocal sector
        heads = []
        while len(outstanding) < 6:
            if len(outstanding) % 2 == 0:
                req = blk_req(guest, VIRTIO_BLK_T_IN, sector % CAPACITY, in_len=512)
                item = (req, sector % CAPACITY)
                sector += 1
            else:
                req = blk_req(guest, VIRTIO_BLK_T_GET_ID, in_len=20)
                item = (req, None)
            head = ring.add_chain(req.bufs, publish=False)
            outstanding[head] = item
            heads.append(head)
        ring.publish(*heads)  # all at once: the server sees them in one pass
        ring.kick()

    def complete_used() -> int:
        nonlocal out_of_order
        n = 0
        for head, _ in ring.take_used():
            out_of_order += head != next(iter(outstanding))
            req, sec = outstanding.pop(head)  # KeyError: completed twice or never sent
            assert status_of(guest, req) == VIRTIO_BLK_S_OK
            if sec is not None:
                assert guest.read(req.data_gpa, 512) == content[sec * 512:(sec + 1) * 512]
            n += 1
        return n

    try:
        for _ in range(6):
            pid = fork_server(ring.vq, params, stats)
            for _ in range(rng.randint(1, 20)):
                submit_batch()
                deadline = time.monotonic() + 5
                while outstanding:
                    assert time.monotonic() < deadline, "the server stopped completing"
                    complete_used()
            submit_batch()
            time.sleep(rng.random() * 0.0005)
            crash(pid)
            complete_used()
            old = ring.vq
            ring.vq = restarted(ring, region)
            old.close()
            assert blk_serve(ring.vq, params, stats, 0) == len(outstanding)
            complete_used()
            assert not outstanding and region.marked() == []
        assert out_of_order > 0  # the property under test was exercised
    finally:
        ring.close()
        region.close()
        params.close()
        stats.close()
